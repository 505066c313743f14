-- Vendor access tokens (WeChat, WeCom, DingTalk, Feishu, GeTui), shared by every dispatch worker
-- so that one refresh serves them all.
CREATE TABLE vendor_tokens (
    key         TEXT PRIMARY KEY,     -- vendor and credential, e.g. `wechat:<appid>`
    token       TEXT NOT NULL,
    expires_at  BIGINT NOT NULL       -- unix ms
);

-- The vendor's id of each sent message, so receipts (pushed or pulled) find their message.
-- Several receivers may share one vendor id (Aliyun's BizId, DingTalk's task_id).
CREATE TABLE vendor_messages (
    vendor            TEXT NOT NULL,
    vendor_message_id TEXT NOT NULL,
    receiver          TEXT NOT NULL,
    message_id        TEXT NOT NULL,
    account_id        BIGINT,
    sent_at           BIGINT NOT NULL, -- unix ms
    receipt_at        BIGINT,          -- unix ms; NULL while no receipt has arrived
    event             TEXT NOT NULL,   -- JSON: the `sent` delivery event, the base of receipt events
    PRIMARY KEY (vendor, vendor_message_id, receiver)
);
CREATE INDEX vendor_messages_pending ON vendor_messages (account_id, sent_at) WHERE receipt_at IS NULL;
CREATE INDEX vendor_messages_by_message ON vendor_messages (message_id);

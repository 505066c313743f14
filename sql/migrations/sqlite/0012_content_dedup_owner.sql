-- A content-dedup key names its owner by 64 bits of the owning message's id instead of the id's
-- 36 characters: rows and pages halve, and with them the pages that a batch's inserts on random
-- keys dirty and write to the WAL. Keys from before keep owner 0 (no message gives them back).
CREATE TABLE content_dedup_owned (
    key         INTEGER PRIMARY KEY,   -- 64 bits of the SHA-256 of (app, template, receiver, content)
    owner       INTEGER NOT NULL,      -- the low 64 bits of the owning message's id
    expires_at  INTEGER NOT NULL
);
INSERT INTO content_dedup_owned (key, owner, expires_at)
    SELECT key, 0, expires_at FROM content_dedup;
DROP TABLE content_dedup;
ALTER TABLE content_dedup_owned RENAME TO content_dedup;

-- API keys get a public id, a name, scopes and an expiry; keys made before this migration keep
-- every right they had (`admin`). The audit log records who changed what.
ALTER TABLE api_keys ADD COLUMN key_id TEXT;
UPDATE api_keys SET key_id = substr(key_hash, 1, 16);
CREATE UNIQUE INDEX api_keys_by_id ON api_keys (key_id);
ALTER TABLE api_keys ADD COLUMN name TEXT NOT NULL DEFAULT '';
ALTER TABLE api_keys ADD COLUMN scopes TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE api_keys ADD COLUMN expires_at BIGINT;
CREATE INDEX api_keys_by_app ON api_keys (app_id);

CREATE TABLE audit_log (
    id          BIGSERIAL PRIMARY KEY,
    app_id      BIGINT NOT NULL,
    at          BIGINT NOT NULL,
    actor       TEXT NOT NULL,      -- the key id that made the change, or `cli`
    action      TEXT NOT NULL,      -- e.g. template.update
    target      TEXT NOT NULL,      -- e.g. template:42
    detail      TEXT NOT NULL       -- JSON; never a secret
);
CREATE INDEX audit_log_by_app ON audit_log (app_id, id);

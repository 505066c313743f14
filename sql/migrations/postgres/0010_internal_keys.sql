-- Keys herald's own processes share through the store and nothing else reads: today the key
-- that signs message records on herald.requests (name 'record_signing'), so that dispatch can
-- tell them from records a Kafka producer wrote. Created by the first process that needs it;
-- sealed with the secret key ring when one is set.
CREATE TABLE internal_keys (
    name       TEXT PRIMARY KEY,
    secret     TEXT NOT NULL,
    created_at BIGINT NOT NULL  -- unix milliseconds
);

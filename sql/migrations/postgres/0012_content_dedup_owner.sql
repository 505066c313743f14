-- A content-dedup key names its owner by 64 bits of the owning message's id instead of the id's
-- 36 characters (smaller rows and pages). Keys from before keep owner 0 (no message gives them
-- back).
ALTER TABLE content_dedup ADD COLUMN owner BIGINT NOT NULL DEFAULT 0;
ALTER TABLE content_dedup DROP COLUMN message_id;
ALTER TABLE content_dedup ALTER COLUMN owner DROP DEFAULT;

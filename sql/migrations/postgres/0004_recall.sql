-- Recall (POST /v1/messages/{id}/recall, POST /v1/templates/{id}/recall): each sent message's
-- app and template, so a template's messages are found by send time, and when it was recalled.
-- Rows written before this migration keep NULL app and template_id: they are still recalled by
-- message id (the app is read from the stored event) but not found by template.
ALTER TABLE vendor_messages
    ADD COLUMN app TEXT,
    ADD COLUMN template_id BIGINT,
    ADD COLUMN recalled_at BIGINT; -- unix ms; NULL while not recalled
CREATE INDEX vendor_messages_by_template ON vendor_messages (app, template_id, sent_at);

-- `GET /v1/apps/{app}/stats` counts an app's schedule rows per kind with the earliest due time:
-- without this index that was a scan of the whole schedule (every app's scheduled, deferred and
-- in-flight rows). With it the count reads only the app's index entries.
CREATE INDEX schedule_by_app ON schedule (app, kind, due_at);

-- Rate limits of vendor accounts, shared by every dispatch worker: each account's timeline is
-- reserved up to next_at (unix µs); a worker takes slots by moving it forward in one UPDATE
-- (the generic cell rate algorithm), so the limit holds across workers and restarts.
CREATE TABLE rate_limits (
    account_id BIGINT PRIMARY KEY,
    next_at BIGINT NOT NULL
);

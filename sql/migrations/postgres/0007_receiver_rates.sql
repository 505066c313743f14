-- Per-receiver rate limits (`receiver_rate_limits` in an app's policy): each receiver's timeline
-- (key: a 64-bit digest of app, limit, channel and receiver) is reserved up to next_at (unix µs),
-- moved forward one slot per message like rate_limits. Rows long in the past are pruned.
CREATE TABLE receiver_rates (
    receiver_key BIGINT PRIMARY KEY,
    next_at BIGINT NOT NULL
);
CREATE INDEX receiver_rates_by_next ON receiver_rates (next_at);

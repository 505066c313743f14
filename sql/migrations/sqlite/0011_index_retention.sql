-- Retention of the tracing index (`analytics.index_retention`) finds old messages by the time
-- of their latest state.
CREATE INDEX message_states_by_state_at ON message_states (state_at);

-- Indexes for the usual questions: a time window, one user's requests over
-- time, one route's requests over time.
-- depends: 0001_audit_log

CREATE INDEX audit_log_occurred_at_idx ON audit_log (occurred_at);
CREATE INDEX audit_log_user_id_occurred_at_idx ON audit_log (user_id, occurred_at);
CREATE INDEX audit_log_route_occurred_at_idx ON audit_log (route, occurred_at);

-- dps store schema v2 (SQLite): the durable queue of hub identity clean-ups. One task per
-- (instance, hub, device id); `hub_key` is the hub host lowercased, the device id is exact.
-- Times are Unix milliseconds. A task is claimed (`claim`, `claimed_until`) by whoever works on it.
CREATE TABLE hub_cleanup (
    instance        TEXT NOT NULL,
    hub_key         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    hub             TEXT NOT NULL,
    registration_id TEXT NOT NULL,
    action          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt    INTEGER NOT NULL,
    last_error      TEXT NULL,
    created         INTEGER NOT NULL,
    claim           TEXT NULL,
    claimed_until   INTEGER NULL,
    PRIMARY KEY (instance, hub_key, device_id)
);
CREATE INDEX hub_cleanup_due ON hub_cleanup (next_attempt);

-- dps store schema v2 (PostgreSQL): the durable queue of hub identity clean-ups. One task per
-- (instance, hub, device id); `hub_key` is the hub host lowercased, the device id is exact.
-- Times are Unix milliseconds. A task is claimed (`claim`, `claimed_until`) by whoever works on it;
-- claims take rows with `FOR UPDATE SKIP LOCKED`, so nodes sharing the database never claim one
-- task at once.
CREATE TABLE hub_cleanup (
    instance        TEXT NOT NULL COLLATE "C",
    hub_key         TEXT NOT NULL COLLATE "C",
    device_id       TEXT NOT NULL COLLATE "C",
    hub             TEXT NOT NULL,
    registration_id TEXT NOT NULL,
    action          TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt    BIGINT NOT NULL,
    last_error      TEXT NULL,
    created         BIGINT NOT NULL,
    claim           TEXT NULL,
    claimed_until   BIGINT NULL,
    PRIMARY KEY (instance, hub_key, device_id)
);
CREATE INDEX hub_cleanup_due ON hub_cleanup (next_attempt);

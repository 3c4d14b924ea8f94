-- dps store schema v4 (SQLite): the outbox of lifecycle events, written in the same transaction
-- as the change each event describes and removed once delivered. Times are Unix milliseconds.
-- A batch is claimed (`claim`, `claimed_until`) by the node that delivers it.
CREATE TABLE events_outbox (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL,
    instance      TEXT NOT NULL,
    kind          TEXT NOT NULL,
    body          TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  INTEGER NOT NULL,
    created       INTEGER NOT NULL,
    last_error    TEXT NULL,
    claim         TEXT NULL,
    claimed_until INTEGER NULL
);
CREATE INDEX events_outbox_due ON events_outbox (next_attempt);
CREATE INDEX events_outbox_created ON events_outbox (created);

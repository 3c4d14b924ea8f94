-- dps store schema v4 (PostgreSQL): the outbox of lifecycle events, written in the same
-- transaction as the change each event describes and removed once delivered. Times are Unix
-- milliseconds. A batch is claimed (`claim`, `claimed_until`) by the node that delivers it;
-- claims take rows with `FOR UPDATE SKIP LOCKED`, so nodes sharing the database never deliver
-- one batch at once.
CREATE TABLE events_outbox (
    seq           BIGSERIAL PRIMARY KEY,
    id            TEXT NOT NULL,
    instance      TEXT NOT NULL,
    kind          TEXT NOT NULL,
    body          TEXT NOT NULL,
    attempts      BIGINT NOT NULL DEFAULT 0,
    next_attempt  BIGINT NOT NULL,
    created       BIGINT NOT NULL,
    last_error    TEXT NULL,
    claim         TEXT NULL,
    claimed_until BIGINT NULL
);
CREATE INDEX events_outbox_due ON events_outbox (next_attempt);
CREATE INDEX events_outbox_created ON events_outbox (created);

-- dps store schema v1 (PostgreSQL). `key` and the other compared columns use COLLATE "C" so that
-- ordering is bytewise, the same as SQLite: cursor paging and the id_prefix range scan depend on it.
CREATE TABLE docs (
    collection TEXT NOT NULL COLLATE "C",
    scope      TEXT NOT NULL COLLATE "C",
    key        TEXT NOT NULL COLLATE "C",
    id         TEXT NOT NULL,
    etag       TEXT NOT NULL,
    body       TEXT NOT NULL,
    status     TEXT NULL COLLATE "C",
    kind       TEXT NULL COLLATE "C",
    grp        TEXT NULL COLLATE "C",
    hub        TEXT NULL COLLATE "C",
    PRIMARY KEY (collection, scope, key)
);
-- Partial indexes: documents without the attribute (e.g. enrollments have no hub) cost no
-- index write; `x = $1` implies `x IS NOT NULL`, so filters still use them.
CREATE INDEX docs_status ON docs (collection, scope, status, key) WHERE status IS NOT NULL;
CREATE INDEX docs_kind   ON docs (collection, scope, kind, key) WHERE kind IS NOT NULL;
CREATE INDEX docs_grp    ON docs (collection, scope, grp, key) WHERE grp IS NOT NULL;
CREATE INDEX docs_hub    ON docs (collection, scope, hub, key) WHERE hub IS NOT NULL;

CREATE TABLE audit (
    seq         BIGSERIAL PRIMARY KEY,
    ts          TEXT NOT NULL COLLATE "C",
    instance    TEXT NOT NULL COLLATE "C",
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL COLLATE "C",
    target_kind TEXT NOT NULL,
    target_id   TEXT NOT NULL,
    target_key  TEXT NOT NULL COLLATE "C",
    before      TEXT NULL,
    after       TEXT NULL
);
CREATE INDEX audit_instance ON audit (instance, seq);
CREATE INDEX audit_target   ON audit (target_key, seq);
CREATE INDEX audit_ts       ON audit (ts);

-- dps store schema v1 (SQLite). Keys are lowercase ids; TEXT compares bytewise (BINARY), which
-- gives the key order used by cursor paging and the id_prefix range scan.
CREATE TABLE docs (
    collection TEXT NOT NULL,
    scope      TEXT NOT NULL,
    key        TEXT NOT NULL,
    id         TEXT NOT NULL,
    etag       TEXT NOT NULL,
    body       TEXT NOT NULL,
    status     TEXT NULL,
    kind       TEXT NULL,
    grp        TEXT NULL,
    hub        TEXT NULL,
    PRIMARY KEY (collection, scope, key)
);
-- Partial indexes: documents without the attribute (e.g. enrollments have no hub) cost no
-- index write; `x = $1` implies `x IS NOT NULL`, so filters still use them.
CREATE INDEX docs_status ON docs (collection, scope, status, key) WHERE status IS NOT NULL;
CREATE INDEX docs_kind   ON docs (collection, scope, kind, key) WHERE kind IS NOT NULL;
CREATE INDEX docs_grp    ON docs (collection, scope, grp, key) WHERE grp IS NOT NULL;
CREATE INDEX docs_hub    ON docs (collection, scope, hub, key) WHERE hub IS NOT NULL;

CREATE TABLE audit (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    ts          TEXT NOT NULL,
    instance    TEXT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target_kind TEXT NOT NULL,
    target_id   TEXT NOT NULL,
    target_key  TEXT NOT NULL,
    before      TEXT NULL,
    after       TEXT NULL
);
CREATE INDEX audit_instance ON audit (instance, seq);
CREATE INDEX audit_target   ON audit (target_key, seq);
CREATE INDEX audit_ts       ON audit (ts);

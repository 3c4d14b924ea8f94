//! SQL shared by both engines: the filter and paging clauses, and the audit query. Only the
//! placeholder syntax differs between SQLite (`?N`) and PostgreSQL (`$N`).

use dps_core::store::{AuditQuery, Collection, Filter};

/// Largest page a single `query` returns; larger limits are clamped (callers page on).
pub(crate) const MAX_PAGE: usize = 10_000;
/// Audit entries returned when `AuditQuery::limit` is 0.
pub(crate) const DEFAULT_AUDIT_LIMIT: usize = 100;

/// Columns read for a document, in the order `row_to_doc` expects.
pub(crate) const DOC_COLUMNS: &str = "id, etag, body, status, kind, grp, hub, key";
/// Columns read for an audit entry.
pub(crate) const AUDIT_COLUMNS: &str =
    "seq, ts, instance, actor, action, target_kind, target_id, before, after";

/// The storage key of an id.
pub(crate) fn key_of(id: &str) -> String {
    id.to_lowercase()
}

/// Exclusive upper bound of the range of strings starting with `prefix`, so that a prefix match
/// is a range scan on an index (never `LIKE` with user input). U+10FFFF is the largest scalar
/// value, so it sorts after every other continuation in bytewise (UTF-8) order.
pub(crate) fn prefix_upper(prefix: &str) -> String {
    format!("{prefix}\u{10FFFF}")
}

/// Clamp a requested page size.
pub(crate) fn page_limit(limit: usize) -> usize {
    limit.clamp(1, MAX_PAGE)
}

/// Clamp a requested audit limit.
pub(crate) fn audit_limit(limit: usize) -> usize {
    if limit == 0 {
        DEFAULT_AUDIT_LIMIT
    } else {
        limit.min(MAX_PAGE)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// A bound parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Param {
    Text(String),
    Int(i64),
}

/// A statement with its parameters.
#[derive(Debug, Clone)]
pub(crate) struct Built {
    pub(crate) sql: String,
    pub(crate) params: Vec<Param>,
}

struct Builder {
    dialect: Dialect,
    clauses: Vec<String>,
    params: Vec<Param>,
}

impl Builder {
    fn new(dialect: Dialect) -> Self {
        Builder {
            dialect,
            clauses: Vec::new(),
            params: Vec::new(),
        }
    }

    fn bind(&mut self, p: Param) -> String {
        self.params.push(p);
        let n = self.params.len();
        match self.dialect {
            Dialect::Sqlite => format!("?{n}"),
            Dialect::Postgres => format!("${n}"),
        }
    }

    fn eq(&mut self, column: &str, value: String) {
        let ph = self.bind(Param::Text(value));
        self.clauses.push(format!("{column} = {ph}"));
    }

    fn prefix(&mut self, column: &str, prefix: String) {
        let upper = prefix_upper(&prefix);
        let lo = self.bind(Param::Text(prefix));
        let hi = self.bind(Param::Text(upper));
        self.clauses
            .push(format!("{column} >= {lo} AND {column} < {hi}"));
    }

    fn where_sql(&self) -> String {
        if self.clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", self.clauses.join(" AND "))
        }
    }
}

fn docs_filter(d: Dialect, c: Collection, scope: &str, filter: &Filter) -> Builder {
    let mut b = Builder::new(d);
    b.eq("collection", c.as_str().to_owned());
    b.eq("scope", scope.to_owned());
    if let Some(s) = &filter.status {
        b.eq("status", s.clone());
    }
    if let Some(k) = &filter.kind {
        b.eq("kind", k.clone());
    }
    if let Some(g) = &filter.group {
        b.eq("grp", g.to_lowercase());
    }
    if let Some(h) = &filter.hub {
        b.eq("hub", h.clone());
    }
    if let Some(p) = filter.id_prefix.as_deref().filter(|p| !p.is_empty()) {
        b.prefix("key", key_of(p));
    }
    b
}

/// `SELECT` of one page: keys strictly after the cursor, in key order, `limit + 1` rows so the
/// caller can tell whether more follow.
pub(crate) fn query(
    d: Dialect,
    c: Collection,
    scope: &str,
    filter: &Filter,
    after: Option<&str>,
    limit: usize,
) -> Built {
    let mut b = docs_filter(d, c, scope, filter);
    if let Some(cursor) = after {
        let ph = b.bind(Param::Text(key_of(cursor)));
        b.clauses.push(format!("key > {ph}"));
    }
    let where_sql = b.where_sql();
    let lim = b.bind(Param::Int(i64::try_from(limit + 1).unwrap_or(i64::MAX)));
    Built {
        sql: format!("SELECT {DOC_COLUMNS} FROM docs{where_sql} ORDER BY key LIMIT {lim}"),
        params: b.params,
    }
}

/// `SELECT count(*)` of matching documents.
pub(crate) fn count(d: Dialect, c: Collection, scope: &str, filter: &Filter) -> Built {
    let b = docs_filter(d, c, scope, filter);
    Built {
        sql: format!("SELECT count(*) FROM docs{}", b.where_sql()),
        params: b.params,
    }
}

/// Audit entries deleted per statement by a prune.
pub(crate) const PRUNE_BATCH: u64 = 5000;

/// `DELETE` of at most [`PRUNE_BATCH`] of the oldest audit entries stamped before `$1`.
pub(crate) fn prune_older_than(d: Dialect) -> String {
    prune_where(d, "ts < ")
}

/// `DELETE` of at most [`PRUNE_BATCH`] of the oldest audit entries with `seq <= $1`.
pub(crate) fn prune_up_to(d: Dialect) -> String {
    prune_where(d, "seq <= ")
}

fn prune_where(d: Dialect, cond: &str) -> String {
    let p = match d {
        Dialect::Sqlite => "?1",
        Dialect::Postgres => "$1",
    };
    format!(
        "DELETE FROM audit WHERE seq IN \
         (SELECT seq FROM audit WHERE {cond}{p} ORDER BY seq LIMIT {PRUNE_BATCH})"
    )
}

/// `SELECT` of the newest `seq` that a prune to `$1` rows deletes (none when fewer are kept).
pub(crate) fn prune_cut(d: Dialect) -> String {
    let p = match d {
        Dialect::Sqlite => "?1",
        Dialect::Postgres => "$1",
    };
    format!("SELECT seq FROM audit ORDER BY seq DESC LIMIT 1 OFFSET {p}")
}

/// `SELECT` of audit entries, oldest first.
pub(crate) fn audit(d: Dialect, q: &AuditQuery) -> Built {
    let mut b = Builder::new(d);
    if let Some(i) = &q.instance {
        b.eq("instance", i.clone());
    }
    if let Some(since) = &q.since {
        let ph = b.bind(Param::Text(since.clone()));
        b.clauses.push(format!("ts >= {ph}"));
    }
    if let Some(t) = &q.target_id {
        b.eq("target_key", key_of(t));
    }
    if let Some(a) = q.action_prefix.as_deref().filter(|a| !a.is_empty()) {
        b.prefix("action", a.to_owned());
    }
    if let Some(seq) = q.after_seq {
        let ph = b.bind(Param::Int(seq));
        b.clauses.push(format!("seq > {ph}"));
    }
    let where_sql = b.where_sql();
    let lim = b.bind(Param::Int(
        i64::try_from(audit_limit(q.limit)).unwrap_or(i64::MAX),
    ));
    Built {
        sql: format!("SELECT {AUDIT_COLUMNS} FROM audit{where_sql} ORDER BY seq LIMIT {lim}"),
        params: b.params,
    }
}

// ---------------------------------------------------------------------------------------------
// The hub clean-up queue. Written with SQLite's `?N` placeholders; [`pg`] turns them into `$N`.

/// Columns read for a clean-up task, in the order the engines' row readers expect.
pub(crate) const CLEANUP_COLUMNS: &str = "instance, hub, device_id, registration_id, action, \
     attempts, next_attempt, last_error, created, claim, claimed_until";

/// Queue a task (one per key; see [`dps_core::store::Write::EnqueueCleanup`]).
pub(crate) const CLEANUP_ENQUEUE: &str = "INSERT INTO hub_cleanup (instance, hub_key, device_id, \
     hub, registration_id, action, attempts, next_attempt, last_error, created, claim, \
     claimed_until) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
     ON CONFLICT (instance, hub_key, device_id) DO UPDATE SET hub = excluded.hub, \
     registration_id = excluded.registration_id, action = excluded.action, \
     next_attempt = excluded.next_attempt, claim = excluded.claim, \
     claimed_until = excluded.claimed_until";

/// Drop the task of a key.
pub(crate) const CLEANUP_CANCEL: &str =
    "DELETE FROM hub_cleanup WHERE instance = ?1 AND hub_key = ?2 AND device_id = ?3";

/// Remove a task under its claim.
pub(crate) const CLEANUP_COMPLETE: &str = "DELETE FROM hub_cleanup \
     WHERE instance = ?1 AND hub_key = ?2 AND device_id = ?3 AND claim = ?4";

/// Release a task under its claim for a later attempt.
pub(crate) const CLEANUP_RESCHEDULE: &str = "UPDATE hub_cleanup SET attempts = ?5, \
     next_attempt = ?6, last_error = ?7, claim = NULL, claimed_until = NULL \
     WHERE instance = ?1 AND hub_key = ?2 AND device_id = ?3 AND claim = ?4";

/// Which tasks are due and free at `?1`.
const CLEANUP_DUE: &str = "next_attempt <= ?1 AND (claimed_until IS NULL OR claimed_until <= ?1)";

/// Claim due tasks (SQLite: the single writer makes the select-and-update atomic).
pub(crate) fn cleanup_claim_sqlite() -> String {
    format!(
        "UPDATE hub_cleanup SET claim = ?2, claimed_until = ?3 WHERE rowid IN \
         (SELECT rowid FROM hub_cleanup WHERE {CLEANUP_DUE} ORDER BY next_attempt LIMIT ?4) \
         RETURNING {CLEANUP_COLUMNS}"
    )
}

/// Claim due tasks (PostgreSQL: rows another claim holds locked are skipped, and the locking
/// read re-checks the condition on the newest row version).
pub(crate) fn cleanup_claim_postgres() -> String {
    let cols = CLEANUP_COLUMNS
        .split(", ")
        .map(|c| format!("t.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    pg(&format!(
        "UPDATE hub_cleanup t SET claim = ?2, claimed_until = ?3 FROM \
         (SELECT instance, hub_key, device_id FROM hub_cleanup WHERE {CLEANUP_DUE} \
          ORDER BY next_attempt LIMIT ?4 FOR UPDATE SKIP LOCKED) d \
         WHERE t.instance = d.instance AND t.hub_key = d.hub_key AND t.device_id = d.device_id \
         RETURNING {cols}"
    ))
}

/// List tasks, oldest first (`?1`: the instance, or NULL for all; `?2`: the limit).
pub(crate) fn cleanup_list() -> String {
    format!(
        "SELECT {CLEANUP_COLUMNS} FROM hub_cleanup WHERE (CAST(?1 AS TEXT) IS NULL OR instance = ?1) \
         ORDER BY created, instance, hub_key, device_id LIMIT ?2"
    )
}

/// Count tasks.
pub(crate) const CLEANUP_COUNT: &str = "SELECT count(*) FROM hub_cleanup";

/// Registration records on a hub that hold or are about to hold an identity there
/// (`?1` scope, `?2` hub lowercased, `?3` the key not counted).
pub(crate) const HUB_CAPACITY_COUNT: &str = "SELECT count(*) FROM docs \
     WHERE collection = 'registration' AND scope = ?1 AND hub = ?2 \
     AND status IN ('assigned', 'assigning') AND key <> ?3";

// ---------------------------------------------------------------------------------------------
// The events outbox (`?N` placeholders as above).

/// Columns read for an outbox event, in the order the engines' row readers expect.
pub(crate) const EVENT_COLUMNS: &str = "seq, id, instance, kind, body, attempts, next_attempt, \
     created, last_error, claim, claimed_until";

/// Append an event.
pub(crate) const EVENT_INSERT: &str = "INSERT INTO events_outbox (id, instance, kind, body, \
     attempts, next_attempt, created, last_error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

/// Which events are due and free at `?1`.
const EVENT_DUE: &str = "next_attempt <= ?1 AND (claimed_until IS NULL OR claimed_until <= ?1)";

/// Claim due events (SQLite: the single writer makes the select-and-update atomic).
pub(crate) fn event_claim_sqlite() -> String {
    format!(
        "UPDATE events_outbox SET claim = ?2, claimed_until = ?3 WHERE seq IN \
         (SELECT seq FROM events_outbox WHERE {EVENT_DUE} ORDER BY seq LIMIT ?4) \
         RETURNING {EVENT_COLUMNS}"
    )
}

/// Claim due events (PostgreSQL: rows another claim holds locked are skipped).
pub(crate) fn event_claim_postgres() -> String {
    let cols = EVENT_COLUMNS
        .split(", ")
        .map(|c| format!("t.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    pg(&format!(
        "UPDATE events_outbox t SET claim = ?2, claimed_until = ?3 FROM \
         (SELECT seq FROM events_outbox WHERE {EVENT_DUE} \
          ORDER BY seq LIMIT ?4 FOR UPDATE SKIP LOCKED) d \
         WHERE t.seq = d.seq RETURNING {cols}"
    ))
}

/// Remove one event under its claim (`?1` seq, `?2` claim).
pub(crate) const EVENT_COMPLETE: &str = "DELETE FROM events_outbox WHERE seq = ?1 AND claim = ?2";

/// Release an event under its claim for a later attempt.
pub(crate) const EVENT_RESCHEDULE: &str = "UPDATE events_outbox SET attempts = ?3, \
     next_attempt = ?4, last_error = ?5, claim = NULL, claimed_until = NULL \
     WHERE seq = ?1 AND claim = ?2";

/// Drop events created before `?1`.
pub(crate) const EVENT_PRUNE_OLDER: &str = "DELETE FROM events_outbox WHERE created < ?1";

/// The `seq` of the newest event beyond the newest `?1` (drop it and everything older).
pub(crate) const EVENT_PRUNE_CUT: &str =
    "SELECT seq FROM events_outbox ORDER BY seq DESC LIMIT 1 OFFSET ?1";

/// Drop events up to `?1`.
pub(crate) const EVENT_PRUNE_UP_TO: &str = "DELETE FROM events_outbox WHERE seq <= ?1";

/// Count events.
pub(crate) const EVENT_COUNT: &str = "SELECT count(*) FROM events_outbox";

// ---------------------------------------------------------------------------------------------
// Node heartbeats (`?N` placeholders as above).

/// Create or refresh a heartbeat row.
pub(crate) const NODE_BEAT: &str = "INSERT INTO nodes (id, name, started, heartbeat, expires) \
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO UPDATE SET name = excluded.name, \
     heartbeat = excluded.heartbeat, expires = excluded.expires";

/// Every heartbeat row.
pub(crate) const NODE_LIST: &str =
    "SELECT id, name, started, heartbeat, expires FROM nodes ORDER BY id";

/// Remove the row `?1` (NULL: none) and the rows expired before `?2`.
pub(crate) const NODE_REMOVE: &str =
    "DELETE FROM nodes WHERE id = CAST(?1 AS TEXT) OR expires < ?2";

/// SQLite placeholders (`?N`) to PostgreSQL ones (`$N`). The statements above have no `?`
/// anywhere else.
pub(crate) fn pg(sql: &str) -> String {
    sql.replace('?', "$")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_uses_range_not_like_and_numbered_placeholders() {
        let f = Filter {
            status: Some("enabled".into()),
            group: Some("GrP".into()),
            id_prefix: Some("AbC".into()),
            ..Filter::default()
        };
        let b = query(
            Dialect::Postgres,
            Collection::Enrollment,
            "s",
            &f,
            Some("X"),
            10,
        );
        assert_eq!(
            b.sql,
            "SELECT id, etag, body, status, kind, grp, hub, key FROM docs WHERE collection = $1 \
             AND scope = $2 AND status = $3 AND grp = $4 AND key >= $5 AND key < $6 AND key > $7 \
             ORDER BY key LIMIT $8"
        );
        assert_eq!(b.params[3], Param::Text("grp".into()));
        assert_eq!(b.params[4], Param::Text("abc".into()));
        assert_eq!(b.params[6], Param::Text("x".into()));
        assert_eq!(b.params[7], Param::Int(11));
        let s = query(Dialect::Sqlite, Collection::Enrollment, "s", &f, None, 10);
        assert!(s.sql.contains("?6") && !s.sql.contains('$'));
    }

    #[test]
    fn limits_are_clamped() {
        assert_eq!(page_limit(0), 1);
        assert_eq!(page_limit(1_000_000), MAX_PAGE);
        assert_eq!(audit_limit(0), DEFAULT_AUDIT_LIMIT);
        assert_eq!(audit_limit(5), 5);
    }
}

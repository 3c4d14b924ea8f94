//! The PostgreSQL engine: tokio-postgres behind a deadpool pool.
//!
//! Every conditional write is one statement whose `WHERE`/`ON CONFLICT` carries the condition, so
//! the check and the write are atomic without explicit transactions or row locks. When a write
//! matches no row, a follow-up `SELECT` finds the current ETag for the `Conflict`; if that read
//! races with another writer and the condition would now hold, the write is retried.
//!
//! The registration path's `write_all` (a condition on the first write only, then unconditional
//! writes) goes through a group commit of our own ([`batch`]): concurrent calls share one
//! transaction of a few multi-row statements, which costs the database a fraction of a
//! transaction per call.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use dps_core::store::{
    AuditEntry, AuditQuery, CleanupAction, CleanupKey, CleanupTask, Collection, Doc, DocIndex,
    Expect, Filter, NodeBeat, OutboxEvent, Page, Store, StoreError, Write,
};
use tokio_postgres::types::ToSql;

use crate::migrate::{self, SCHEMA_VERSION};
use crate::pg_tls::{self, MakeRustlsConnect};
use crate::sql::{self, Dialect, Param};
use crate::{error_chain, redact_url, OpenError};

mod batch;
mod gate;
mod reads;

/// PostgreSQL tuning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Most connections in the pool.
    pub pool_size: usize,
    /// Schema to use (sets `search_path`); created if missing. `None` uses the server default.
    /// Only `[a-z0-9_]` is accepted.
    pub schema: Option<String>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            pool_size: 16,
            schema: None,
        }
    }
}

/// The PostgreSQL implementation of [`Store`], over TLS as the URL's `sslmode` says
/// ([`pg_tls`]).
pub struct PostgresStore {
    pool: Pool,
    /// One connection of its own for the node's heartbeat rows (`heartbeat`, `remove_nodes`): a node whose registrations keep every pooled connection busy must still
    /// renew its lease, or the other nodes take its in-flight work over while it is alive.
    beat: Pool,
    /// Group commit of concurrent `write_all` calls ([`batch`]).
    batcher: batch::Batcher,
    /// Grouped point reads ([`reads`]).
    reader: reads::Reader,
    url: String,
    /// The connection settings and TLS connector, for the dedicated `LISTEN` connection.
    listen: (tokio_postgres::Config, MakeRustlsConnect),
}

/// The channel on which the database announces changes of cached data (migration 3's trigger).
pub const CHANGES_CHANNEL: &str = "dps_changes";

/// What [`PostgresStore::watch_changes`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A document of `collection` in `scope` was written or deleted (committed).
    Doc {
        /// The collection's stored name (`instance`, `group`, `enrollment`, `certificate`,
        /// `denylist`).
        collection: String,
        /// The scope (instance name; empty for instances).
        scope: String,
    },
    /// The listening connection was (re-)established: changes made while it was down were not
    /// seen, so everything cached should be dropped.
    Listening,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.url)
            .finish()
    }
}

/// Arbitrary constant for `pg_advisory_xact_lock`, serializing concurrent migrators.
const MIGRATION_LOCK: i64 = 0x6470_735f_6d69_6772; // "dps_migr"

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(c) if *c == SqlState::DATA_CORRUPTED || *c == SqlState::INDEX_CORRUPTED => {
            StoreError::Corrupt(format!("postgres: {e}"))
        }
        _ => StoreError::Unavailable(format!("postgres: {e}")),
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(format!("postgres pool: {}", error_chain(&e)))
}

fn row_to_doc(r: &tokio_postgres::Row) -> Result<(Doc, String), StoreError> {
    let g = |i: usize| -> Result<Option<String>, StoreError> {
        r.try_get(i)
            .map_err(|e| StoreError::Corrupt(format!("postgres row: {e}")))
    };
    let req = |i: usize| -> Result<String, StoreError> {
        r.try_get(i)
            .map_err(|e| StoreError::Corrupt(format!("postgres row: {e}")))
    };
    Ok((
        Doc {
            id: req(0)?,
            etag: req(1)?,
            body: req(2)?,
            index: DocIndex {
                status: g(3)?,
                kind: g(4)?,
                group: g(5)?,
                hub: g(6)?,
            },
        },
        req(7)?,
    ))
}

fn to_pg(params: &[Param]) -> Vec<Box<dyn ToSql + Sync + Send>> {
    params
        .iter()
        .map(|p| -> Box<dyn ToSql + Sync + Send> {
            match p {
                Param::Text(s) => Box::new(s.clone()),
                Param::Int(i) => Box::new(*i),
            }
        })
        .collect()
}

fn refs(params: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|b| b.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// The parameters of [`UPSERT_SQL`] (and of the other `docs` writes, which use `$1`..`$10`
/// the same way) for a document.
fn doc_params(c: Collection, scope: &str, doc: &Doc) -> Vec<Box<dyn ToSql + Sync + Send>> {
    vec![
        Box::new(c.as_str()),
        Box::new(scope.to_owned()),
        Box::new(sql::key_of(&doc.id)),
        Box::new(doc.id.clone()),
        Box::new(doc.etag.clone()),
        Box::new(doc.body.clone()),
        Box::new(doc.index.status.clone()),
        Box::new(doc.index.kind.clone()),
        Box::new(doc.index.group.as_deref().map(str::to_lowercase)),
        Box::new(doc.index.hub.clone()),
    ]
}

/// The parameters of [`AUDIT_SQL`] for an entry (timestamp now when it has none).
fn audit_params(e: &AuditEntry) -> Vec<Box<dyn ToSql + Sync + Send>> {
    let ts = if e.timestamp.is_empty() {
        dps_core::clock::azure_timestamp(time::OffsetDateTime::now_utc())
    } else {
        e.timestamp.clone()
    };
    vec![
        Box::new(ts),
        Box::new(e.instance.clone()),
        Box::new(e.actor.clone()),
        Box::new(e.action.clone()),
        Box::new(e.target_kind.clone()),
        Box::new(e.target_id.clone()),
        Box::new(sql::key_of(&e.target_id)),
        Box::new(e.before.clone()),
        Box::new(e.after.clone()),
    ]
}

impl PostgresStore {
    /// Connect with default options and migrate.
    pub async fn open(url: &str) -> Result<Self, OpenError> {
        Self::open_with(url, PostgresOptions::default()).await
    }

    /// Connect with options and migrate.
    pub async fn open_with(url: &str, opts: PostgresOptions) -> Result<Self, OpenError> {
        let redacted = redact_url(url);
        let invalid = |e: pg_tls::PgTlsError| OpenError::InvalidOption {
            url: redacted.clone(),
            reason: e.to_string(),
        };
        let (driver_url, tls) = pg_tls::split_url(url).map_err(invalid)?;
        let mut cfg: tokio_postgres::Config =
            driver_url
                .parse()
                .map_err(|source| OpenError::PostgresUrl {
                    url: redacted.clone(),
                    source,
                })?;
        cfg.ssl_mode(tls.driver_mode());
        let connector: MakeRustlsConnect = tls.connector().map_err(invalid)?;
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(10));
        }
        if let Some(schema) = &opts.schema {
            if schema.is_empty()
                || !schema
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(OpenError::InvalidOption {
                    url: redacted,
                    reason: format!("schema `{schema}` must be non-empty [a-z0-9_]"),
                });
            }
            // Create the schema on a plain connection before the pool pins search_path to it.
            let (client, conn) =
                cfg.connect(connector.clone())
                    .await
                    .map_err(|source| OpenError::Postgres {
                        url: redacted.clone(),
                        source,
                    })?;
            let task = tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                .await
                .map_err(|source| OpenError::Postgres {
                    url: redacted.clone(),
                    source,
                })?;
            drop(client);
            let _ = task.await;
            cfg.options(format!("-c search_path={schema}"));
        }
        let mut listen_cfg = cfg.clone();
        // A half-open listening connection (a partition) is noticed and replaced.
        listen_cfg.keepalives(true);
        listen_cfg.keepalives_idle(Duration::from_secs(10));
        let listen = (listen_cfg, connector.clone());
        let build = |cfg: tokio_postgres::Config, size: usize, wait: Duration| {
            let mgr = Manager::from_config(
                cfg,
                connector.clone(),
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(mgr)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                .create_timeout(Some(Duration::from_secs(10)))
                .wait_timeout(Some(wait))
                .build()
                .map_err(|e| OpenError::PostgresPool {
                    url: redacted.clone(),
                    reason: e.to_string(),
                })
        };
        let pool = build(cfg.clone(), opts.pool_size.max(1), Duration::from_secs(30))?;
        let beat = build(cfg, 1, Duration::from_secs(10))?;
        let store = PostgresStore {
            batcher: batch::Batcher::start(pool.clone()),
            reader: reads::Reader::start(pool.clone()),
            pool,
            beat,
            url: redacted,
            listen,
        };
        store.migrate().await?;
        tracing::info!(url = %store.url, "postgres store open");
        Ok(store)
    }

    /// The rows a claim statement (`$1` now, `$2` claim, `$3` claimed until, `$4` limit) took:
    /// the clean-up queue's and the events outbox's claims under a lease.
    async fn claim_rows(
        &self,
        claim_sql: &str,
        now_ms: i64,
        claim: &str,
        claimed_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(claim_sql).await.map_err(pg_err)?;
        let limit = i64::try_from(sql::page_limit(limit)).unwrap_or(i64::MAX);
        client
            .query(&stmt, &[&now_ms, &claim, &claimed_until_ms, &limit])
            .await
            .map_err(pg_err)
    }

    /// Group commits so far: (transactions that committed more than one `write_all` call, the
    /// calls they committed). Exported as `dps_store_group_commits_total` and
    /// `dps_store_grouped_writes_total`.
    pub fn group_commits(&self) -> (u64, u64) {
        (self.batcher.batches(), self.batcher.batched())
    }

    /// The URL, password redacted.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Follow the changes announced on [`CHANGES_CHANNEL`] over a dedicated connection
    /// (`LISTEN`), reconnecting after a second when it drops. [`Change::Listening`] comes first
    /// and after each reconnection. The watch ends when the receiver is dropped.
    pub fn watch_changes(&self) -> tokio::sync::mpsc::Receiver<Change> {
        use futures::StreamExt;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let (cfg, connector) = self.listen.clone();
        let url = self.url.clone();
        tokio::spawn(async move {
            loop {
                match cfg.connect(connector.clone()).await {
                    Ok((client, mut conn)) => {
                        let (msgs_tx, mut msgs) = tokio::sync::mpsc::unbounded_channel();
                        let driver = tokio::spawn(async move {
                            let mut stream =
                                futures::stream::poll_fn(move |cx| conn.poll_message(cx));
                            while let Some(m) = stream.next().await {
                                match m {
                                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                        if msgs_tx.send(n.payload().to_owned()).is_err() {
                                            break;
                                        }
                                    }
                                    Ok(_) => {}
                                    Err(e) => {
                                        tracing::warn!(error = %e, "postgres LISTEN connection failed");
                                        break;
                                    }
                                }
                            }
                        });
                        let listening = async {
                            client
                                .batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))
                                .await?;
                            // The schema whose changes are ours (the channel is per database).
                            let row = client
                                .query_one("SELECT current_schema()::TEXT", &[])
                                .await?;
                            row.try_get::<_, String>(0)
                        };
                        match listening.await {
                            Ok(schema) => {
                                if tx.send(Change::Listening).await.is_err() {
                                    driver.abort();
                                    return;
                                }
                                while let Some(payload) = msgs.recv().await {
                                    let mut parts = payload.splitn(3, ' ');
                                    let (Some(in_schema), Some(collection)) =
                                        (parts.next(), parts.next())
                                    else {
                                        continue;
                                    };
                                    if in_schema != schema {
                                        continue;
                                    }
                                    let scope = parts.next().unwrap_or("");
                                    let change = Change::Doc {
                                        collection: collection.to_owned(),
                                        scope: scope.to_owned(),
                                    };
                                    if tx.send(change).await.is_err() {
                                        driver.abort();
                                        return;
                                    }
                                }
                            }
                            Err(e) => {
                                tracing::warn!(url = %url, error = %error_chain(&e), "postgres LISTEN failed")
                            }
                        }
                        driver.abort();
                    }
                    Err(e) => {
                        tracing::warn!(url = %url, error = %error_chain(&e), "postgres LISTEN connection failed")
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        rx
    }

    async fn migrate(&self) -> Result<(), OpenError> {
        let pool_fail = |e: deadpool_postgres::PoolError| OpenError::PostgresPool {
            url: self.url.clone(),
            reason: error_chain(&e),
        };
        let fail = |version, e: tokio_postgres::Error| OpenError::Migration {
            engine: "postgres",
            location: self.url.clone(),
            version,
            reason: error_chain(&e),
        };
        let mut client = self.pool.get().await.map_err(pool_fail)?;
        let tx = client.transaction().await.map_err(|e| fail(0, e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|e| fail(0, e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version BIGINT PRIMARY KEY, name TEXT NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await
        .map_err(|e| fail(0, e))?;
        let current: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
                &[],
            )
            .await
            .map_err(|e| fail(0, e))?
            .get(0);
        if current > SCHEMA_VERSION {
            return Err(OpenError::SchemaTooNew {
                engine: "postgres",
                location: self.url.clone(),
                found: current,
                supported: SCHEMA_VERSION,
            });
        }
        for m in migrate::POSTGRES.iter().filter(|m| m.version > current) {
            tx.batch_execute(m.sql)
                .await
                .map_err(|e| fail(m.version, e))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[&m.version, &m.name],
            )
            .await
            .map_err(|e| fail(m.version, e))?;
            tracing::info!(
                version = m.version,
                name = m.name,
                "postgres migration applied"
            );
        }
        tx.commit().await.map_err(|e| fail(SCHEMA_VERSION, e))
    }

    /// The schema version recorded in the database.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let row = client
            .query_one(
                "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
                &[],
            )
            .await
            .map_err(pg_err)?;
        row.try_get(0)
            .map_err(|e| StoreError::Corrupt(format!("postgres row: {e}")))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }
}

/// Writes without a condition, except possibly the first (the registration path: the
/// record's compare-and-set, then the built-in hub identity, the clean-up queue's changes
/// and the audit entry), in one transaction sent as one pipeline: `BEGIN`, the statements
/// and `COMMIT` leave in a single flight instead of one round trip each. Every request is
/// sent at the first poll of the joined futures, so the transaction is always closed on the
/// connection. If a statement fails, PostgreSQL aborts the transaction and the `COMMIT` rolls
/// it back; a first write whose condition does not hold fails on purpose (a division by
/// zero when it changed no row, [`COND_ETAG_SQL`], [`COND_ABSENT_SQL`]), which is reported
/// as the `Conflict`.
///
/// Used by the group commit ([`batch`]) for a lone call, and for each call of a batch that failed
/// as a whole.
async fn write_pipelined_on(
    client: &deadpool_postgres::Object,
    writes: &[Write],
) -> Result<(), StoreError> {
    let upsert = client.prepare_cached(UPSERT_SQL).await.map_err(pg_err)?;
    let first_condition = match writes.first() {
        Some(Write::Put {
            expect: e @ (Expect::Etag(_) | Expect::Absent),
            c,
            scope,
            doc,
        }) => Some((e.clone(), *c, scope.clone(), sql::key_of(&doc.id))),
        _ => None,
    };
    let cond = match &first_condition {
        Some((Expect::Etag(_), ..)) => {
            Some(client.prepare_cached(COND_ETAG_SQL).await.map_err(pg_err)?)
        }
        Some(_) => Some(
            client
                .prepare_cached(COND_ABSENT_SQL)
                .await
                .map_err(pg_err)?,
        ),
        None => None,
    };
    let audit = client.prepare_cached(AUDIT_SQL).await.map_err(pg_err)?;
    let has_cleanup = writes
        .iter()
        .any(|w| matches!(w, Write::EnqueueCleanup(_) | Write::CancelCleanup(_)));
    // The clean-up statements are prepared only when used: the hot path stays as it was.
    let (enqueue, cancel) = if has_cleanup {
        (
            Some(
                client
                    .prepare_cached(&sql::pg(sql::CLEANUP_ENQUEUE))
                    .await
                    .map_err(pg_err)?,
            ),
            Some(
                client
                    .prepare_cached(&sql::pg(sql::CLEANUP_CANCEL))
                    .await
                    .map_err(pg_err)?,
            ),
        )
    } else {
        (None, None)
    };
    // Likewise the outbox's insert: only when events are configured.
    let event = if writes.iter().any(|w| matches!(w, Write::Event(_))) {
        Some(
            client
                .prepare_cached(&sql::pg(sql::EVENT_INSERT))
                .await
                .map_err(pg_err)?,
        )
    } else {
        None
    };
    let owned: Vec<(
        &tokio_postgres::Statement,
        Vec<Box<dyn ToSql + Sync + Send>>,
    )> = writes
        .iter()
        .enumerate()
        .map(|(i, w)| match w {
            Write::Put {
                c,
                scope,
                doc,
                expect,
            } if i == 0 && cond.is_some() => {
                let mut p = doc_params(*c, scope, doc);
                if let Expect::Etag(e) = expect {
                    p.push(Box::new(e.clone()));
                }
                (cond.as_ref().expect("prepared above"), p)
            }
            Write::Put { c, scope, doc, .. } => (&upsert, doc_params(*c, scope, doc)),
            Write::Audit(e) => (&audit, audit_params(e)),
            Write::EnqueueCleanup(t) => (
                enqueue.as_ref().expect("prepared when used"),
                enqueue_params(t),
            ),
            Write::CancelCleanup(k) => {
                (cancel.as_ref().expect("prepared when used"), key_params(k))
            }
            Write::Event(e) => (event.as_ref().expect("prepared when used"), event_params(e)),
            Write::HubCapacity { .. } | Write::Delete { .. } => {
                unreachable!("write_all sends capacity checks and deletes through a transaction")
            }
        })
        .collect();
    let params: Vec<(&tokio_postgres::Statement, Vec<&(dyn ToSql + Sync)>)> =
        owned.iter().map(|(st, v)| (*st, refs(v))).collect();
    let pg: &tokio_postgres::Client = client;
    let (begin, results, commit) = tokio::join!(
        pg.batch_execute("BEGIN"),
        futures::future::join_all(params.iter().map(|(st, p)| pg.execute(*st, p))),
        pg.batch_execute("COMMIT"),
    );
    begin.map_err(pg_err)?;
    let mut results = results.into_iter();
    if let Some((_, c, scope, key)) = &first_condition {
        match results.next() {
            Some(Err(e))
                if e.code() == Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO) =>
            {
                // Rolled back by the `COMMIT` of the aborted transaction.
                commit.map_err(pg_err)?;
                return Err(StoreError::Conflict {
                    current: current_etag(client, *c, scope, key).await?,
                });
            }
            Some(r) => {
                r.map_err(pg_err)?;
            }
            None => {}
        }
    }
    for r in results {
        r.map_err(pg_err)?;
    }
    commit.map_err(pg_err)
}

async fn current_etag<C: GenericClient>(
    client: &C,
    c: Collection,
    scope: &str,
    key: &str,
) -> Result<Option<String>, StoreError> {
    let stmt = client
        .prepare_cached("SELECT etag FROM docs WHERE collection = $1 AND scope = $2 AND key = $3")
        .await
        .map_err(pg_err)?;
    let row = client
        .query_opt(&stmt, &[&c.as_str(), &scope, &key])
        .await
        .map_err(pg_err)?;
    row.map(|r| r.try_get::<_, String>(0))
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("postgres row: {e}")))
}

const UPSERT_SQL: &str =
    "INSERT INTO docs (collection, scope, key, id, etag, body, status, kind, grp, hub)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
     ON CONFLICT (collection, scope, key) DO UPDATE SET
     id = EXCLUDED.id, etag = EXCLUDED.etag, body = EXCLUDED.body,
     status = EXCLUDED.status, kind = EXCLUDED.kind, grp = EXCLUDED.grp, hub = EXCLUDED.hub";

/// The compare-and-set of a document in a pipeline (`$11`: the expected ETag): fails with a
/// division by zero when no row had that ETag, which aborts the transaction.
const COND_ETAG_SQL: &str = "WITH w AS (UPDATE docs SET id = $4, etag = $5, body = $6, \
     status = $7, kind = $8, grp = $9, hub = $10 \
     WHERE collection = $1 AND scope = $2 AND key = $3 AND etag = $11 RETURNING 1) \
     SELECT 1 / (SELECT count(*)::INT FROM w)";

/// The create of a document that must be absent, in a pipeline: fails with a division by zero
/// when it exists, which aborts the transaction.
const COND_ABSENT_SQL: &str = "WITH w AS (INSERT INTO docs \
     (collection, scope, key, id, etag, body, status, kind, grp, hub) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
     ON CONFLICT (collection, scope, key) DO NOTHING RETURNING 1) \
     SELECT 1 / (SELECT count(*)::INT FROM w)";

const AUDIT_SQL: &str = "INSERT INTO audit (ts, instance, actor, action, target_kind, target_id,
                                target_key, before, after)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// A conditional put on a client or inside a transaction.
/// A conditional delete inside a transaction (`Write::Delete`): the row is locked first, so the
/// condition holds until the commit.
async fn delete_on<C: GenericClient>(
    client: &C,
    c: Collection,
    scope: &str,
    id: &str,
    expect: &Expect,
) -> Result<(), StoreError> {
    let key = sql::key_of(id);
    let stmt = client
        .prepare_cached(
            "SELECT etag FROM docs WHERE collection = $1 AND scope = $2 AND key = $3 FOR UPDATE",
        )
        .await
        .map_err(pg_err)?;
    let current: Option<String> = client
        .query_opt(&stmt, &[&c.as_str(), &scope, &key])
        .await
        .map_err(pg_err)?
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("postgres row: {e}")))?;
    let holds = match (expect, &current) {
        (Expect::Any, _) => true,
        (Expect::Present, cur) => cur.is_some(),
        (Expect::Absent, cur) => cur.is_none(),
        (Expect::Etag(e), Some(cur)) => e == cur,
        (Expect::Etag(_), None) => false,
    };
    if !holds {
        return Err(StoreError::Conflict { current });
    }
    if current.is_some() {
        let stmt = client
            .prepare_cached("DELETE FROM docs WHERE collection = $1 AND scope = $2 AND key = $3")
            .await
            .map_err(pg_err)?;
        client
            .execute(&stmt, &[&c.as_str(), &scope, &key])
            .await
            .map_err(pg_err)?;
    }
    Ok(())
}

async fn put_on<C: GenericClient>(
    client: &C,
    c: Collection,
    scope: &str,
    doc: &Doc,
    expect: &Expect,
) -> Result<(), StoreError> {
    let key = sql::key_of(&doc.id);
    let owned = doc_params(c, scope, doc);
    let values = refs(&owned);
    const INSERT: &str =
        "INSERT INTO docs (collection, scope, key, id, etag, body, status, kind, grp, hub)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
    const UPDATE: &str = "UPDATE docs SET id = $4, etag = $5, body = $6, status = $7,
         kind = $8, grp = $9, hub = $10
         WHERE collection = $1 AND scope = $2 AND key = $3";
    let mut last = None;
    for _ in 0..RACE_RETRIES {
        match expect {
            Expect::Any => {
                let stmt = client.prepare_cached(UPSERT_SQL).await.map_err(pg_err)?;
                client.execute(&stmt, &values).await.map_err(pg_err)?;
                return Ok(());
            }
            Expect::Absent => {
                let stmt = client
                    .prepare_cached(&format!(
                        "{INSERT} ON CONFLICT (collection, scope, key) DO NOTHING"
                    ))
                    .await
                    .map_err(pg_err)?;
                if client.execute(&stmt, &values).await.map_err(pg_err)? == 1 {
                    return Ok(());
                }
                // Deleted since the insert saw it: try again.
                last = current_etag(client, c, scope, &key).await?;
                if last.is_some() {
                    break;
                }
            }
            Expect::Etag(e) => {
                let stmt = client
                    .prepare_cached(&format!("{UPDATE} AND etag = $11"))
                    .await
                    .map_err(pg_err)?;
                let mut with_etag = values.to_vec();
                with_etag.push(e);
                if client.execute(&stmt, &with_etag).await.map_err(pg_err)? == 1 {
                    return Ok(());
                }
                last = current_etag(client, c, scope, &key).await?;
                if last.as_ref() != Some(e) {
                    break;
                }
            }
            Expect::Present => {
                let stmt = client.prepare_cached(UPDATE).await.map_err(pg_err)?;
                if client.execute(&stmt, &values).await.map_err(pg_err)? == 1 {
                    return Ok(());
                }
                last = None;
                break;
            }
        }
    }
    Err(StoreError::Conflict { current: last })
}

/// The key's values for `$1`..`$3` of the clean-up statements.
fn key_params(k: &CleanupKey) -> Vec<Box<dyn ToSql + Sync + Send>> {
    vec![
        Box::new(k.instance.clone()),
        Box::new(k.hub.to_lowercase()),
        Box::new(k.device_id.clone()),
    ]
}

fn enqueue_params(t: &CleanupTask) -> Vec<Box<dyn ToSql + Sync + Send>> {
    let mut p = key_params(&t.key);
    p.push(Box::new(t.key.hub.clone()));
    p.push(Box::new(t.registration_id.clone()));
    p.push(Box::new(t.action.as_str()));
    p.push(Box::new(i64::from(t.attempts)));
    p.push(Box::new(t.next_attempt_ms));
    p.push(Box::new(t.last_error.clone()));
    p.push(Box::new(t.created_ms));
    p.push(Box::new(t.claim.clone()));
    p.push(Box::new(t.claimed_until_ms));
    p
}

fn event_params(e: &OutboxEvent) -> Vec<Box<dyn ToSql + Sync + Send>> {
    vec![
        Box::new(e.id.clone()),
        Box::new(e.instance.clone()),
        Box::new(e.kind.clone()),
        Box::new(e.body.clone()),
        Box::new(i64::from(e.attempts)),
        Box::new(e.next_attempt_ms),
        Box::new(e.created_ms),
        Box::new(e.last_error.clone()),
    ]
}

fn row_to_event(r: &tokio_postgres::Row) -> Result<OutboxEvent, StoreError> {
    let corrupt = |e: tokio_postgres::Error| StoreError::Corrupt(format!("postgres row: {e}"));
    let attempts: i64 = r.try_get(5).map_err(corrupt)?;
    Ok(OutboxEvent {
        seq: r.try_get(0).map_err(corrupt)?,
        id: r.try_get(1).map_err(corrupt)?,
        instance: r.try_get(2).map_err(corrupt)?,
        kind: r.try_get(3).map_err(corrupt)?,
        body: r.try_get(4).map_err(corrupt)?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        next_attempt_ms: r.try_get(6).map_err(corrupt)?,
        created_ms: r.try_get(7).map_err(corrupt)?,
        last_error: r.try_get(8).map_err(corrupt)?,
        claim: r.try_get(9).map_err(corrupt)?,
        claimed_until_ms: r.try_get(10).map_err(corrupt)?,
    })
}

fn row_to_task(r: &tokio_postgres::Row) -> Result<CleanupTask, StoreError> {
    let corrupt = |e: tokio_postgres::Error| StoreError::Corrupt(format!("postgres row: {e}"));
    let action: String = r.try_get(4).map_err(corrupt)?;
    let attempts: i64 = r.try_get(5).map_err(corrupt)?;
    Ok(CleanupTask {
        key: CleanupKey {
            instance: r.try_get(0).map_err(corrupt)?,
            hub: r.try_get(1).map_err(corrupt)?,
            device_id: r.try_get(2).map_err(corrupt)?,
        },
        registration_id: r.try_get(3).map_err(corrupt)?,
        action: CleanupAction::parse(&action)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown clean-up action '{action}'")))?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        next_attempt_ms: r.try_get(6).map_err(corrupt)?,
        last_error: r.try_get(7).map_err(corrupt)?,
        created_ms: r.try_get(8).map_err(corrupt)?,
        claim: r.try_get(9).map_err(corrupt)?,
        claimed_until_ms: r.try_get(10).map_err(corrupt)?,
    })
}

/// A clean-up queue statement on a client or inside a transaction; the rows changed.
async fn exec_on<C: GenericClient>(
    client: &C,
    sql: &str,
    params: &[Box<dyn ToSql + Sync + Send>],
) -> Result<u64, StoreError> {
    let stmt = client.prepare_cached(&sql::pg(sql)).await.map_err(pg_err)?;
    client.execute(&stmt, &refs(params)).await.map_err(pg_err)
}

/// An audit append on a client or inside a transaction.
async fn audit_on<C: GenericClient>(client: &C, e: &AuditEntry) -> Result<(), StoreError> {
    let stmt = client.prepare_cached(AUDIT_SQL).await.map_err(pg_err)?;
    client
        .execute(&stmt, &refs(&audit_params(e)))
        .await
        .map_err(pg_err)?;
    Ok(())
}

/// How many times a conditional write is retried when its follow-up read raced with another
/// writer. Each retry needs a concurrent change, so this is never reached in practice.
const RACE_RETRIES: usize = 16;

#[async_trait]
impl Store for PostgresStore {
    fn engine(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await.map_err(pg_err)?;
        Ok(())
    }

    async fn get(&self, c: Collection, scope: &str, id: &str) -> Result<Option<Doc>, StoreError> {
        // Concurrent point reads share a statement ([`reads`]).
        self.reader.get(c, scope, sql::key_of(id)).await
    }

    async fn put(
        &self,
        c: Collection,
        scope: &str,
        doc: Doc,
        expect: Expect,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        put_on(&client, c, scope, &doc, &expect).await
    }

    async fn delete(
        &self,
        c: Collection,
        scope: &str,
        id: &str,
        expect: Expect,
    ) -> Result<Option<Doc>, StoreError> {
        let client = self.client().await?;
        let key = sql::key_of(id);
        let coll = c.as_str();
        const DELETE: &str = "DELETE FROM docs WHERE collection = $1 AND scope = $2 AND key = $3";
        const RETURNING: &str = "RETURNING id, etag, body, status, kind, grp, hub, key";
        let mut last = None;
        for _ in 0..RACE_RETRIES {
            match &expect {
                Expect::Any | Expect::Present => {
                    let stmt = client
                        .prepare_cached(&format!("{DELETE} {RETURNING}"))
                        .await
                        .map_err(pg_err)?;
                    let row = client
                        .query_opt(&stmt, &[&coll, &scope, &key])
                        .await
                        .map_err(pg_err)?;
                    return match row {
                        Some(r) => Ok(Some(row_to_doc(&r)?.0)),
                        None if expect == Expect::Present => {
                            Err(StoreError::Conflict { current: None })
                        }
                        None => Ok(None),
                    };
                }
                Expect::Absent => {
                    return match current_etag(&client, c, scope, &key).await? {
                        Some(cur) => Err(StoreError::Conflict { current: Some(cur) }),
                        None => Ok(None),
                    };
                }
                Expect::Etag(e) => {
                    let stmt = client
                        .prepare_cached(&format!("{DELETE} AND etag = $4 {RETURNING}"))
                        .await
                        .map_err(pg_err)?;
                    let row = client
                        .query_opt(&stmt, &[&coll, &scope, &key, e])
                        .await
                        .map_err(pg_err)?;
                    if let Some(r) = row {
                        return Ok(Some(row_to_doc(&r)?.0));
                    }
                    last = current_etag(&client, c, scope, &key).await?;
                    if last.as_ref() != Some(e) {
                        break;
                    }
                }
            }
        }
        Err(StoreError::Conflict { current: last })
    }

    async fn query(
        &self,
        c: Collection,
        scope: &str,
        filter: &Filter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let limit = sql::page_limit(limit);
        let built = sql::query(Dialect::Postgres, c, scope, filter, after, limit);
        let client = self.client().await?;
        let stmt = client.prepare_cached(&built.sql).await.map_err(pg_err)?;
        let params = to_pg(&built.params);
        let rows = client.query(&stmt, &refs(&params)).await.map_err(pg_err)?;
        let rows = rows.iter().map(row_to_doc).collect::<Result<Vec<_>, _>>()?;
        Ok(crate::sqlite::page_from_rows(rows, limit))
    }

    async fn count(&self, c: Collection, scope: &str, filter: &Filter) -> Result<u64, StoreError> {
        let built = sql::count(Dialect::Postgres, c, scope, filter);
        let client = self.client().await?;
        let stmt = client.prepare_cached(&built.sql).await.map_err(pg_err)?;
        let params = to_pg(&built.params);
        let row = client
            .query_one(&stmt, &refs(&params))
            .await
            .map_err(pg_err)?;
        let n: i64 = row
            .try_get(0)
            .map_err(|e| StoreError::Corrupt(format!("postgres row: {e}")))?;
        u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative count {n}")))
    }

    async fn delete_scope(&self, c: Collection, scope: &str) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("DELETE FROM docs WHERE collection = $1 AND scope = $2")
            .await
            .map_err(pg_err)?;
        client
            .execute(&stmt, &[&c.as_str(), &scope])
            .await
            .map_err(pg_err)
    }

    async fn append_audit(&self, e: AuditEntry) -> Result<(), StoreError> {
        let client = self.client().await?;
        audit_on(&client, &e).await
    }

    async fn write_all(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        // A condition on the first write only (the registration path): in a batch with the
        // concurrent calls of the same shape (group commit). Other conditions go through a
        // transaction, one statement at a time.
        if batch::batchable(&writes) {
            return self.batcher.write(writes).await;
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        for w in &writes {
            match w {
                Write::Put {
                    c,
                    scope,
                    doc,
                    expect,
                } => put_on(&tx, *c, scope, doc, expect).await?,
                Write::Delete {
                    c,
                    scope,
                    id,
                    expect,
                } => delete_on(&tx, *c, scope, id, expect).await?,
                Write::Audit(e) => audit_on(&tx, e).await?,
                Write::EnqueueCleanup(t) => {
                    exec_on(&tx, sql::CLEANUP_ENQUEUE, &enqueue_params(t)).await?;
                }
                Write::CancelCleanup(k) => {
                    exec_on(&tx, sql::CLEANUP_CANCEL, &key_params(k)).await?;
                }
                Write::Event(e) => {
                    exec_on(&tx, sql::EVENT_INSERT, &event_params(e)).await?;
                }
                Write::HubCapacity {
                    scope,
                    hub,
                    max,
                    except,
                } => {
                    let hub = hub.to_lowercase();
                    // One writer per (scope, hub) at a time until commit: the count below sees
                    // every record committed by the previous holder.
                    tx.execute(
                        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                        &[&format!("dps-capacity {scope} {hub}")],
                    )
                    .await
                    .map_err(pg_err)?;
                    let stmt = tx
                        .prepare_cached(&sql::pg(sql::HUB_CAPACITY_COUNT))
                        .await
                        .map_err(pg_err)?;
                    let n: i64 = tx
                        .query_one(&stmt, &[scope, &hub, &sql::key_of(except)])
                        .await
                        .map_err(pg_err)?
                        .try_get(0)
                        .map_err(|e| StoreError::Corrupt(format!("postgres row: {e}")))?;
                    if u64::try_from(n).unwrap_or(0) >= *max {
                        return Err(StoreError::Conflict { current: None });
                    }
                }
            }
        }
        tx.commit().await.map_err(pg_err)
    }

    async fn claim_cleanup(
        &self,
        now_ms: i64,
        claim: &str,
        claimed_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<CleanupTask>, StoreError> {
        let rows = self
            .claim_rows(
                &sql::cleanup_claim_postgres(),
                now_ms,
                claim,
                claimed_until_ms,
                limit,
            )
            .await?;
        let mut tasks = rows
            .iter()
            .map(row_to_task)
            .collect::<Result<Vec<_>, _>>()?;
        tasks.sort_by_key(|t| t.next_attempt_ms);
        Ok(tasks)
    }

    async fn claim_events(
        &self,
        now_ms: i64,
        claim: &str,
        claimed_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let rows = self
            .claim_rows(
                &sql::event_claim_postgres(),
                now_ms,
                claim,
                claimed_until_ms,
                limit,
            )
            .await?;
        let mut events = rows
            .iter()
            .map(row_to_event)
            .collect::<Result<Vec<_>, _>>()?;
        events.sort_by_key(|e| e.seq);
        Ok(events)
    }

    async fn complete_events(&self, seqs: &[i64], claim: &str) -> Result<u64, StoreError> {
        if seqs.is_empty() {
            return Ok(0);
        }
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("DELETE FROM events_outbox WHERE seq = ANY($1) AND claim = $2")
            .await
            .map_err(pg_err)?;
        client
            .execute(&stmt, &[&seqs, &claim])
            .await
            .map_err(pg_err)
    }

    async fn reschedule_event(
        &self,
        seq: i64,
        claim: &str,
        attempts: u32,
        next_attempt_ms: i64,
        last_error: Option<&str>,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let p: Vec<Box<dyn ToSql + Sync + Send>> = vec![
            Box::new(seq),
            Box::new(claim.to_owned()),
            Box::new(i64::from(attempts)),
            Box::new(next_attempt_ms),
            Box::new(last_error.map(str::to_owned)),
        ];
        Ok(exec_on(&client, sql::EVENT_RESCHEDULE, &p).await? > 0)
    }

    async fn prune_events(
        &self,
        older_than_ms: Option<i64>,
        max_rows: Option<u64>,
    ) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let mut dropped = 0;
        if let Some(ms) = older_than_ms {
            let p: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(ms)];
            dropped += exec_on(&client, sql::EVENT_PRUNE_OLDER, &p).await?;
        }
        if let Some(max) = max_rows {
            let offset = i64::try_from(max).unwrap_or(i64::MAX);
            let stmt = client
                .prepare_cached(&sql::pg(sql::EVENT_PRUNE_CUT))
                .await
                .map_err(pg_err)?;
            let cut = client
                .query_opt(&stmt, &[&offset])
                .await
                .map_err(pg_err)?
                .map(|r| r.try_get::<_, i64>(0))
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("postgres row: {e}")))?;
            if let Some(cut) = cut {
                let p: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(cut)];
                dropped += exec_on(&client, sql::EVENT_PRUNE_UP_TO, &p).await?;
            }
        }
        Ok(dropped)
    }

    async fn count_events(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(sql::EVENT_COUNT, &[])
            .await
            .map_err(pg_err)?;
        let n: i64 = row
            .try_get(0)
            .map_err(|e| StoreError::Corrupt(format!("postgres row: {e}")))?;
        u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative count {n}")))
    }

    async fn complete_cleanup(&self, key: &CleanupKey, claim: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let mut p = key_params(key);
        p.push(Box::new(claim.to_owned()));
        Ok(exec_on(&client, sql::CLEANUP_COMPLETE, &p).await? > 0)
    }

    async fn reschedule_cleanup(
        &self,
        key: &CleanupKey,
        claim: &str,
        attempts: u32,
        next_attempt_ms: i64,
        last_error: Option<&str>,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let mut p = key_params(key);
        p.push(Box::new(claim.to_owned()));
        p.push(Box::new(i64::from(attempts)));
        p.push(Box::new(next_attempt_ms));
        p.push(Box::new(last_error.map(str::to_owned)));
        Ok(exec_on(&client, sql::CLEANUP_RESCHEDULE, &p).await? > 0)
    }

    async fn list_cleanup(
        &self,
        instance: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CleanupTask>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&sql::pg(&sql::cleanup_list()))
            .await
            .map_err(pg_err)?;
        let limit = i64::try_from(sql::page_limit(limit)).unwrap_or(i64::MAX);
        let rows = client
            .query(&stmt, &[&instance, &limit])
            .await
            .map_err(pg_err)?;
        rows.iter().map(row_to_task).collect()
    }

    async fn count_cleanup(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(sql::CLEANUP_COUNT, &[])
            .await
            .map_err(pg_err)?;
        let n: i64 = row
            .try_get(0)
            .map_err(|e| StoreError::Corrupt(format!("postgres row: {e}")))?;
        u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative count {n}")))
    }

    async fn heartbeat(&self, node: &NodeBeat) -> Result<(), StoreError> {
        let client = self.beat.get().await.map_err(pool_err)?;
        let stmt = client
            .prepare_cached(&sql::pg(sql::NODE_BEAT))
            .await
            .map_err(pg_err)?;
        client
            .execute(
                &stmt,
                &[
                    &node.id,
                    &node.name,
                    &node.started_ms,
                    &node.heartbeat_ms,
                    &node.expires_ms,
                ],
            )
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeBeat>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(sql::NODE_LIST)
            .await
            .map_err(pg_err)?;
        let rows = client.query(&stmt, &[]).await.map_err(pg_err)?;
        rows.iter()
            .map(|r| {
                let corrupt =
                    |e: tokio_postgres::Error| StoreError::Corrupt(format!("postgres row: {e}"));
                Ok(NodeBeat {
                    id: r.try_get(0).map_err(corrupt)?,
                    name: r.try_get(1).map_err(corrupt)?,
                    started_ms: r.try_get(2).map_err(corrupt)?,
                    heartbeat_ms: r.try_get(3).map_err(corrupt)?,
                    expires_ms: r.try_get(4).map_err(corrupt)?,
                })
            })
            .collect()
    }

    async fn remove_nodes(
        &self,
        id: Option<&str>,
        expired_before_ms: i64,
    ) -> Result<u64, StoreError> {
        let client = self.beat.get().await.map_err(pool_err)?;
        let stmt = client
            .prepare_cached(&sql::pg(sql::NODE_REMOVE))
            .await
            .map_err(pg_err)?;
        client
            .execute(&stmt, &[&id, &expired_before_ms])
            .await
            .map_err(pg_err)
    }

    async fn prune_audit(
        &self,
        older_than: Option<&str>,
        max_rows: Option<u64>,
    ) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let mut deleted = 0;
        if let Some(ts) = older_than {
            let stmt = client
                .prepare_cached(&sql::prune_older_than(Dialect::Postgres))
                .await
                .map_err(pg_err)?;
            loop {
                let n = client.execute(&stmt, &[&ts]).await.map_err(pg_err)?;
                deleted += n;
                if n < sql::PRUNE_BATCH {
                    break;
                }
            }
        }
        if let Some(max) = max_rows {
            let offset = i64::try_from(max).unwrap_or(i64::MAX);
            let stmt = client
                .prepare_cached(&sql::prune_cut(Dialect::Postgres))
                .await
                .map_err(pg_err)?;
            let cut: Option<i64> = client
                .query_opt(&stmt, &[&offset])
                .await
                .map_err(pg_err)?
                .map(|r| r.try_get(0))
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("postgres row: {e}")))?;
            if let Some(cut) = cut {
                let stmt = client
                    .prepare_cached(&sql::prune_up_to(Dialect::Postgres))
                    .await
                    .map_err(pg_err)?;
                loop {
                    let n = client.execute(&stmt, &[&cut]).await.map_err(pg_err)?;
                    deleted += n;
                    if n < sql::PRUNE_BATCH {
                        break;
                    }
                }
            }
        }
        Ok(deleted)
    }

    async fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let built = sql::audit(Dialect::Postgres, q);
        let client = self.client().await?;
        let stmt = client.prepare_cached(&built.sql).await.map_err(pg_err)?;
        let params = to_pg(&built.params);
        let rows = client.query(&stmt, &refs(&params)).await.map_err(pg_err)?;
        rows.iter()
            .map(|r| {
                let corrupt =
                    |e: tokio_postgres::Error| StoreError::Corrupt(format!("postgres row: {e}"));
                Ok(AuditEntry {
                    seq: r.try_get(0).map_err(corrupt)?,
                    timestamp: r.try_get(1).map_err(corrupt)?,
                    instance: r.try_get(2).map_err(corrupt)?,
                    actor: r.try_get(3).map_err(corrupt)?,
                    action: r.try_get(4).map_err(corrupt)?,
                    target_kind: r.try_get(5).map_err(corrupt)?,
                    target_id: r.try_get(6).map_err(corrupt)?,
                    before: r.try_get(7).map_err(corrupt)?,
                    after: r.try_get(8).map_err(corrupt)?,
                })
            })
            .collect()
    }
}

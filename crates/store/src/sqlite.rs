//! The SQLite engine: WAL, one writer thread with group commit, a pool of read-only connections.
//!
//! Why a dedicated writer thread: SQLite allows one writer at a time, and the cost of a durable
//! commit is one fsync (`synchronous=FULL`) no matter how many rows it carries. Funnelling every
//! write through one thread that drains its queue and commits the whole batch at once turns N
//! concurrent writers into one fsync per batch instead of N, without `SQLITE_BUSY` retries.
//! Each command keeps its own `Expect` check and its own answer; a command that fails its check
//! writes nothing and does not affect the others. If the batch itself fails (an I/O error), it is
//! rolled back and its commands are retried one transaction each, so one bad command cannot fail
//! its neighbours.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use dps_core::store::{
    AuditEntry, AuditQuery, CleanupAction, CleanupKey, CleanupTask, Collection, Doc, DocIndex,
    Expect, Filter, NodeBeat, OutboxEvent, Page, Store, StoreError, Write,
};
use rusqlite::types::Value;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use crate::migrate::{self, SCHEMA_VERSION};
use crate::sql::{self, Dialect, Param};
use crate::OpenError;

/// SQLite `synchronous` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// fsync on every commit: an acknowledged write survives power loss (default).
    #[default]
    Full,
    /// fsync at checkpoints only: consistent after a crash, but a power loss may roll back the
    /// last commits.
    Normal,
}

/// SQLite tuning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Durability of commits.
    pub synchronous: Synchronous,
    /// Idle read-only connections kept for reuse.
    pub read_connections: usize,
    /// Most write commands committed in one transaction.
    pub max_batch: usize,
    /// Capacity of the writer's queue (writers wait when it is full).
    pub queue: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Full,
            read_connections: 8,
            max_batch: 1024,
            queue: 8192,
        }
    }
}

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite implementation of [`Store`].
pub struct SqliteStore {
    path: PathBuf,
    writer: Option<mpsc::Sender<Cmd>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<ReadPool>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteStore {
    /// Open (creating the file and its parent directory) with default options, and migrate.
    /// Blocking: call from a blocking context or at startup.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        Self::open_with(path, SqliteOptions::default())
    }

    /// Open with options, and migrate. Blocking.
    pub fn open_with(path: &Path, opts: SqliteOptions) -> Result<Self, OpenError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| OpenError::CreateDir {
                path: parent.to_owned(),
                source,
            })?;
        }
        let sqlite_err = |source| OpenError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open(path).map_err(sqlite_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite_err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(sqlite_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(sqlite_err(rusqlite::Error::InvalidParameterName(format!(
                "journal_mode is {mode}, WAL required"
            ))));
        }
        let sync = match opts.synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        // A larger page cache keeps the upper levels of the five b-trees resident under random
        // inserts; a larger auto-checkpoint threshold lets a hot page be rewritten by many
        // commits in the WAL but copied back to the database file (and fsynced) once.
        conn.execute_batch(&format!(
            "PRAGMA synchronous={sync}; PRAGMA cache_size=-65536; PRAGMA wal_autocheckpoint=10000; \
             PRAGMA temp_store=MEMORY;"
        ))
        .map_err(sqlite_err)?;
        conn.set_prepared_statement_cache_capacity(32);
        migrate_sqlite(&mut conn, path)?;

        let readers = Arc::new(ReadPool {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
            max_idle: opts.read_connections.max(1),
        });
        // Open one reader now so that a broken file fails at open, not at the first read.
        let first = readers.connect().map_err(sqlite_err)?;
        readers.put_back(first);

        let (tx, rx) = mpsc::channel(opts.queue.max(1));
        let max_batch = opts.max_batch.max(1);
        let thread = std::thread::Builder::new()
            .name("dps-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, max_batch))
            .map_err(|source| OpenError::WriterThread {
                path: path.to_owned(),
                source,
            })?;
        tracing::info!(path = %path.display(), synchronous = sync, "sqlite store open");
        Ok(SqliteStore {
            path: path.to_owned(),
            writer: Some(tx),
            thread: Mutex::new(Some(thread)),
            readers,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version recorded in the database.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                [],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let pool = self.readers.clone();
        tokio::task::spawn_blocking(move || pool.with(f))
            .await
            .map_err(|e| StoreError::Unavailable(format!("sqlite read task failed: {e}")))?
    }

    /// Run a prune statement batch after batch (each its own write, so that other writes
    /// interleave) until a batch deletes less than a full one.
    async fn prune_batches(&self, sql: String, param: Param) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let op = Op::PruneAudit {
                sql: sql.clone(),
                param: param.clone(),
            };
            let n = self.write(op, Reply::Count).await?;
            deleted += n;
            if n < sql::PRUNE_BATCH {
                return Ok(deleted);
            }
        }
    }

    async fn write<T>(
        &self,
        op: Op,
        wrap: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Reply,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let writer = self
            .writer
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("sqlite store is closed".into()))?;
        writer
            .send(Cmd {
                op,
                reply: wrap(tx),
            })
            .await
            .map_err(|_| StoreError::Unavailable("sqlite writer thread stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("sqlite writer thread stopped".into()))?
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the queue ends the writer loop once it has committed what it holds; joining
        // makes a reopen right after a drop see a closed, checkpointable database.
        self.writer.take();
        let handle = self.thread.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!(path = %self.path.display(), "sqlite writer thread panicked");
            }
        }
    }
}

fn migrate_sqlite(conn: &mut Connection, path: &Path) -> Result<(), OpenError> {
    let location = path.display().to_string();
    let fail = |version, e: rusqlite::Error| OpenError::Migration {
        engine: "sqlite",
        location: location.clone(),
        version,
        reason: e.to_string(),
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| fail(0, e))?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)",
    )
    .map_err(|e| fail(0, e))?;
    let current: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )
        .map_err(|e| fail(0, e))?;
    if current > SCHEMA_VERSION {
        return Err(OpenError::SchemaTooNew {
            engine: "sqlite",
            location,
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    for m in migrate::SQLITE.iter().filter(|m| m.version > current) {
        tx.execute_batch(m.sql).map_err(|e| fail(m.version, e))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, datetime('now'))",
            params![m.version, m.name],
        )
        .map_err(|e| fail(m.version, e))?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "sqlite migration applied"
        );
    }
    tx.commit().map_err(|e| fail(SCHEMA_VERSION, e))
}

// ---------------------------------------------------------------------------------------------
// Reads

struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
}

impl ReadPool {
    fn connect(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // A reader's page cache is emptied at the start of every read after a commit (WAL), so
        // a large one only costs time to clear: pages come from the memory map instead.
        conn.execute_batch("PRAGMA cache_size=-1024; PRAGMA mmap_size=268435456;")?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(conn)
    }

    fn take_idle(&self) -> Option<Connection> {
        self.idle.lock().ok().and_then(|mut idle| idle.pop())
    }

    fn put_back(&self, conn: Connection) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.max_idle {
                idle.push(conn);
            }
        }
    }

    fn with<R>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R>) -> Result<R, StoreError> {
        let pooled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match pooled {
            Some(c) => c,
            None => self.connect().map_err(map_err)?,
        };
        match f(&conn) {
            Ok(r) => {
                self.put_back(conn);
                Ok(r)
            }
            // A failed connection is dropped rather than reused.
            Err(e) => Err(map_err(e)),
        }
    }
}

fn map_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode;
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) =>
        {
            StoreError::Corrupt(e.to_string())
        }
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Unavailable(format!("sqlite: {e}")),
    }
}

fn row_to_doc(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Doc, String)> {
    Ok((
        Doc {
            id: r.get(0)?,
            etag: r.get(1)?,
            body: r.get(2)?,
            index: DocIndex {
                status: r.get(3)?,
                kind: r.get(4)?,
                group: r.get(5)?,
                hub: r.get(6)?,
            },
        },
        r.get(7)?,
    ))
}

/// The key's values for `?1`..`?3` of the clean-up statements.
fn key_values(k: &CleanupKey) -> Vec<Value> {
    vec![
        Value::Text(k.instance.clone()),
        Value::Text(k.hub.to_lowercase()),
        Value::Text(k.device_id.clone()),
    ]
}

fn enqueue_op(t: &CleanupTask) -> Op {
    let mut params = key_values(&t.key);
    let opt = |s: &Option<String>| s.clone().map_or(Value::Null, Value::Text);
    params.extend([
        Value::Text(t.key.hub.clone()),
        Value::Text(t.registration_id.clone()),
        Value::Text(t.action.as_str().to_owned()),
        Value::Integer(i64::from(t.attempts)),
        Value::Integer(t.next_attempt_ms),
        opt(&t.last_error),
        Value::Integer(t.created_ms),
        opt(&t.claim),
        t.claimed_until_ms.map_or(Value::Null, Value::Integer),
    ]);
    Op::Exec {
        sql: sql::CLEANUP_ENQUEUE,
        params,
    }
}

fn event_op(e: &OutboxEvent) -> Op {
    Op::Exec {
        sql: sql::EVENT_INSERT,
        params: vec![
            Value::Text(e.id.clone()),
            Value::Text(e.instance.clone()),
            Value::Text(e.kind.clone()),
            Value::Text(e.body.clone()),
            Value::Integer(i64::from(e.attempts)),
            Value::Integer(e.next_attempt_ms),
            Value::Integer(e.created_ms),
            e.last_error.clone().map_or(Value::Null, Value::Text),
        ],
    }
}

fn row_to_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxEvent> {
    let attempts: i64 = r.get(5)?;
    Ok(OutboxEvent {
        seq: r.get(0)?,
        id: r.get(1)?,
        instance: r.get(2)?,
        kind: r.get(3)?,
        body: r.get(4)?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        next_attempt_ms: r.get(6)?,
        created_ms: r.get(7)?,
        last_error: r.get(8)?,
        claim: r.get(9)?,
        claimed_until_ms: r.get(10)?,
    })
}

fn row_to_task(r: &rusqlite::Row<'_>) -> rusqlite::Result<CleanupTask> {
    let action: String = r.get(4)?;
    let attempts: i64 = r.get(5)?;
    Ok(CleanupTask {
        key: CleanupKey {
            instance: r.get(0)?,
            hub: r.get(1)?,
            device_id: r.get(2)?,
        },
        registration_id: r.get(3)?,
        action: CleanupAction::parse(&action).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                4,
                rusqlite::types::Type::Text,
                format!("unknown clean-up action '{action}'").into(),
            )
        })?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        next_attempt_ms: r.get(6)?,
        last_error: r.get(7)?,
        created_ms: r.get(8)?,
        claim: r.get(9)?,
        claimed_until_ms: r.get(10)?,
    })
}

fn to_sql(params: &[Param]) -> Vec<rusqlite::types::Value> {
    params
        .iter()
        .map(|p| match p {
            Param::Text(s) => rusqlite::types::Value::Text(s.clone()),
            Param::Int(i) => rusqlite::types::Value::Integer(*i),
        })
        .collect()
}

fn get_doc(
    conn: &Connection,
    c: Collection,
    scope: &str,
    key: &str,
) -> rusqlite::Result<Option<Doc>> {
    conn.prepare_cached(
        "SELECT id, etag, body, status, kind, grp, hub, key FROM docs
         WHERE collection = ?1 AND scope = ?2 AND key = ?3",
    )?
    .query_row(params![c.as_str(), scope, key], row_to_doc)
    .optional()
    .map(|o| o.map(|(d, _)| d))
}

// ---------------------------------------------------------------------------------------------
// Writes

enum Op {
    Put {
        c: Collection,
        scope: String,
        doc: Doc,
        expect: Expect,
    },
    Delete {
        c: Collection,
        scope: String,
        id: String,
        expect: Expect,
    },
    DeleteScope {
        c: Collection,
        scope: String,
    },
    Audit(AuditEntry),
    /// Delete one batch of audit entries: `sql` with its one parameter.
    PruneAudit {
        sql: String,
        param: Param,
    },
    /// Several writes, all or none (a savepoint inside the batch's transaction).
    Many(Vec<Op>),
    /// A statement without a condition of its own (the clean-up queue's writes); answers the
    /// number of rows changed.
    Exec {
        sql: &'static str,
        params: Vec<rusqlite::types::Value>,
    },
    /// A capacity check (see [`Write::HubCapacity`]): a `Conflict` when the count reaches `max`.
    HubCapacity {
        scope: String,
        hub: String,
        max: i64,
        except: String,
    },
    /// Claim due clean-up tasks.
    ClaimCleanup {
        now_ms: i64,
        claim: String,
        claimed_until_ms: i64,
        limit: i64,
    },
    /// Claim due outbox events.
    ClaimEvents {
        now_ms: i64,
        claim: String,
        claimed_until_ms: i64,
        limit: i64,
    },
    /// Remove delivered events under a claim.
    CompleteEvents {
        seqs: Vec<i64>,
        claim: String,
    },
}

enum Reply {
    Unit(oneshot::Sender<Result<(), StoreError>>),
    Doc(oneshot::Sender<Result<Option<Doc>, StoreError>>),
    Count(oneshot::Sender<Result<u64, StoreError>>),
    Tasks(oneshot::Sender<Result<Vec<CleanupTask>, StoreError>>),
    Events(oneshot::Sender<Result<Vec<OutboxEvent>, StoreError>>),
}

struct Cmd {
    op: Op,
    reply: Reply,
}

/// The successful result of one command.
enum Answer {
    Unit,
    Doc(Option<Doc>),
    Count(u64),
    Tasks(Vec<CleanupTask>),
    Events(Vec<OutboxEvent>),
}

impl Reply {
    fn send(self, result: Result<Answer, StoreError>) {
        // A waiter that went away (cancelled request) is not an error: its write still happened.
        match (self, result) {
            (Reply::Unit(tx), Ok(Answer::Unit)) => drop(tx.send(Ok(()))),
            (Reply::Doc(tx), Ok(Answer::Doc(d))) => drop(tx.send(Ok(d))),
            (Reply::Count(tx), Ok(Answer::Count(n))) => drop(tx.send(Ok(n))),
            (Reply::Tasks(tx), Ok(Answer::Tasks(t))) => drop(tx.send(Ok(t))),
            (Reply::Events(tx), Ok(Answer::Events(t))) => drop(tx.send(Ok(t))),
            (Reply::Unit(tx), Err(e)) => drop(tx.send(Err(e))),
            (Reply::Doc(tx), Err(e)) => drop(tx.send(Err(e))),
            (Reply::Count(tx), Err(e)) => drop(tx.send(Err(e))),
            (Reply::Tasks(tx), Err(e)) => drop(tx.send(Err(e))),
            (Reply::Events(tx), Err(e)) => drop(tx.send(Err(e))),
            (reply, Ok(_)) => {
                let e = StoreError::Corrupt("internal: mismatched writer answer".into());
                reply.send(Err(e));
            }
        }
    }
}

fn check(expect: &Expect, current: Option<&str>) -> Result<(), StoreError> {
    let ok = match expect {
        Expect::Any => true,
        Expect::Absent => current.is_none(),
        Expect::Etag(e) => current == Some(e.as_str()),
        Expect::Present => current.is_some(),
    };
    if ok {
        Ok(())
    } else {
        Err(StoreError::Conflict {
            current: current.map(str::to_owned),
        })
    }
}

const UPSERT: &str =
    "INSERT INTO docs (collection, scope, key, id, etag, body, status, kind, grp, hub)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
     ON CONFLICT (collection, scope, key) DO UPDATE SET
       id = excluded.id, etag = excluded.etag, body = excluded.body,
       status = excluded.status, kind = excluded.kind, grp = excluded.grp, hub = excluded.hub";

/// Apply one command inside the open transaction. The outer error is a database failure (the
/// batch must be rolled back); the inner one is the command's own outcome (a `Conflict`).
fn apply(conn: &Connection, op: &Op) -> rusqlite::Result<Result<Answer, StoreError>> {
    match op {
        Op::Put {
            c,
            scope,
            doc,
            expect,
        } => {
            let key = sql::key_of(&doc.id);
            let current_etag = || -> rusqlite::Result<Option<String>> {
                conn.prepare_cached(
                    "SELECT etag FROM docs WHERE collection = ?1 AND scope = ?2 AND key = ?3",
                )?
                .query_row(params![c.as_str(), scope, key], |r| r.get(0))
                .optional()
            };
            // Creates (the hot path) and unconditional writes need no read before the write.
            let sql = match expect {
                Expect::Absent => {
                    "INSERT INTO docs (collection, scope, key, id, etag, body, status, kind, grp, hub)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT (collection, scope, key) DO NOTHING"
                }
                Expect::Any => UPSERT,
                Expect::Etag(_) | Expect::Present => {
                    if let Err(e) = check(expect, current_etag()?.as_deref()) {
                        return Ok(Err(e));
                    }
                    UPSERT
                }
            };
            let changed = conn.prepare_cached(sql)?.execute(params![
                c.as_str(),
                scope,
                key,
                doc.id,
                doc.etag,
                doc.body,
                doc.index.status,
                doc.index.kind,
                doc.index.group.as_deref().map(str::to_lowercase),
                doc.index.hub,
            ])?;
            if changed == 0 {
                // Only `Absent` can change nothing: the document exists.
                return Ok(Err(StoreError::Conflict {
                    current: current_etag()?,
                }));
            }
            Ok(Ok(Answer::Unit))
        }
        Op::Delete {
            c,
            scope,
            id,
            expect,
        } => {
            let key = sql::key_of(id);
            let current = get_doc(conn, *c, scope, &key)?;
            if let Err(e) = check(expect, current.as_ref().map(|d| d.etag.as_str())) {
                return Ok(Err(e));
            }
            if current.is_some() {
                conn.prepare_cached(
                    "DELETE FROM docs WHERE collection = ?1 AND scope = ?2 AND key = ?3",
                )?
                .execute(params![c.as_str(), scope, key])?;
            }
            Ok(Ok(Answer::Doc(current)))
        }
        Op::PruneAudit { sql, param } => {
            let n = conn
                .prepare_cached(sql)?
                .execute(rusqlite::params_from_iter(to_sql(std::slice::from_ref(
                    param,
                ))))?;
            Ok(Ok(Answer::Count(n as u64)))
        }
        Op::DeleteScope { c, scope } => {
            let n = conn
                .prepare_cached("DELETE FROM docs WHERE collection = ?1 AND scope = ?2")?
                .execute(params![c.as_str(), scope])?;
            Ok(Ok(Answer::Count(n as u64)))
        }
        Op::Many(ops) => {
            // Writes without a condition cannot fail on their own (a database error fails the
            // whole batch): no savepoint, whose sub-journal would copy every page touched.
            // Conditions checked before the first write (the registration path's capacity check
            // and compare-and-set on the record) fail before anything is written: no savepoint
            // either.
            let mut written = false;
            let mut unconditional = true;
            for op in ops {
                let (conditional, writes) = match op {
                    Op::Put { expect, .. } => (*expect != Expect::Any, true),
                    Op::HubCapacity { .. } => (true, false),
                    Op::Audit(_) | Op::Exec { .. } => (false, true),
                    _ => (true, true),
                };
                if conditional && written {
                    unconditional = false;
                    break;
                }
                written |= writes;
            }
            if unconditional {
                for op in ops {
                    if let Err(e) = apply(conn, op)? {
                        return Ok(Err(e));
                    }
                }
                return Ok(Ok(Answer::Unit));
            }
            conn.execute_batch("SAVEPOINT many")?;
            for op in ops {
                if let Err(e) = apply(conn, op)? {
                    conn.execute_batch("ROLLBACK TO many; RELEASE many")?;
                    return Ok(Err(e));
                }
            }
            conn.execute_batch("RELEASE many")?;
            Ok(Ok(Answer::Unit))
        }
        Op::HubCapacity {
            scope,
            hub,
            max,
            except,
        } => {
            let n: i64 = conn.prepare_cached(sql::HUB_CAPACITY_COUNT)?.query_row(
                params![scope, hub.to_lowercase(), sql::key_of(except)],
                |r| r.get(0),
            )?;
            if n >= *max {
                return Ok(Err(StoreError::Conflict { current: None }));
            }
            Ok(Ok(Answer::Unit))
        }
        Op::Exec { sql, params } => {
            let n = conn
                .prepare_cached(sql)?
                .execute(rusqlite::params_from_iter(params.iter()))?;
            Ok(Ok(Answer::Count(n as u64)))
        }
        Op::ClaimCleanup {
            now_ms,
            claim,
            claimed_until_ms,
            limit,
        } => {
            let mut stmt = conn.prepare_cached(&sql::cleanup_claim_sqlite())?;
            let rows =
                stmt.query_map(params![now_ms, claim, claimed_until_ms, limit], row_to_task)?;
            let mut tasks = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            tasks.sort_by_key(|t| t.next_attempt_ms);
            Ok(Ok(Answer::Tasks(tasks)))
        }
        Op::ClaimEvents {
            now_ms,
            claim,
            claimed_until_ms,
            limit,
        } => {
            let mut stmt = conn.prepare_cached(&sql::event_claim_sqlite())?;
            let rows = stmt.query_map(
                params![now_ms, claim, claimed_until_ms, limit],
                row_to_event,
            )?;
            let mut events = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            events.sort_by_key(|e| e.seq);
            Ok(Ok(Answer::Events(events)))
        }
        Op::CompleteEvents { seqs, claim } => {
            let mut stmt = conn.prepare_cached(sql::EVENT_COMPLETE)?;
            let mut n = 0u64;
            for seq in seqs {
                n += stmt.execute(params![seq, claim])? as u64;
            }
            Ok(Ok(Answer::Count(n)))
        }
        Op::Audit(e) => {
            let ts = if e.timestamp.is_empty() {
                dps_core::clock::azure_timestamp(time::OffsetDateTime::now_utc())
            } else {
                e.timestamp.clone()
            };
            conn.prepare_cached(
                "INSERT INTO audit (ts, instance, actor, action, target_kind, target_id,
                                    target_key, before, after)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                ts,
                e.instance,
                e.actor,
                e.action,
                e.target_kind,
                e.target_id,
                sql::key_of(&e.target_id),
                e.before,
                e.after,
            ])?;
            Ok(Ok(Answer::Unit))
        }
    }
}

/// Apply `cmds` in one transaction and commit. On a database error nothing is committed.
fn apply_batch(
    conn: &mut Connection,
    cmds: &[Cmd],
) -> rusqlite::Result<Vec<Result<Answer, StoreError>>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut out = Vec::with_capacity(cmds.len());
    for cmd in cmds {
        out.push(apply(&tx, &cmd.op)?);
    }
    tx.commit()?;
    Ok(out)
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<Cmd>, max_batch: usize) {
    let mut batch: Vec<Cmd> = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        match apply_batch(&mut conn, &batch) {
            Ok(results) => {
                for (cmd, r) in batch.drain(..).zip(results) {
                    cmd.reply.send(r);
                }
            }
            Err(e) if batch.len() == 1 => {
                tracing::warn!(error = %e, "sqlite write failed");
                if let Some(cmd) = batch.pop() {
                    cmd.reply.send(Err(map_err(e)));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, n = batch.len(), "sqlite batch failed; retrying one by one");
                for cmd in batch.drain(..) {
                    let one = std::slice::from_ref(&cmd);
                    let r = match apply_batch(&mut conn, one) {
                        Ok(mut rs) => rs
                            .pop()
                            .unwrap_or(Err(StoreError::Unavailable("sqlite: empty result".into()))),
                        Err(e) => Err(map_err(e)),
                    };
                    cmd.reply.send(r);
                }
            }
        }
    }
    // Queue closed: the store was dropped. Closing the connection checkpoints the WAL.
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "sqlite close failed");
    }
}

// ---------------------------------------------------------------------------------------------
// The port

#[async_trait]
impl Store for SqliteStore {
    fn engine(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.writer.as_ref().is_none_or(|w| w.is_closed()) {
            return Err(StoreError::Unavailable(
                "sqlite writer thread stopped".into(),
            ));
        }
        self.read(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)))
            .await
            .map(drop)
    }

    async fn get(&self, c: Collection, scope: &str, id: &str) -> Result<Option<Doc>, StoreError> {
        let key = sql::key_of(id);
        // A point read by primary key in WAL mode never waits for the writer and takes a few
        // microseconds from the page cache or the memory map: it runs on the calling thread when
        // a pooled connection is idle, because handing it to the blocking pool (two thread
        // wake-ups) costs more than the read itself. Queries and counts go to the pool.
        if let Some(conn) = self.readers.take_idle() {
            return match get_doc(&conn, c, scope, &key) {
                Ok(d) => {
                    self.readers.put_back(conn);
                    Ok(d)
                }
                Err(e) => Err(map_err(e)),
            };
        }
        let scope = scope.to_owned();
        self.read(move |conn| get_doc(conn, c, &scope, &key)).await
    }

    async fn put(
        &self,
        c: Collection,
        scope: &str,
        doc: Doc,
        expect: Expect,
    ) -> Result<(), StoreError> {
        let op = Op::Put {
            c,
            scope: scope.to_owned(),
            doc,
            expect,
        };
        self.write(op, Reply::Unit).await
    }

    async fn delete(
        &self,
        c: Collection,
        scope: &str,
        id: &str,
        expect: Expect,
    ) -> Result<Option<Doc>, StoreError> {
        let op = Op::Delete {
            c,
            scope: scope.to_owned(),
            id: id.to_owned(),
            expect,
        };
        self.write(op, Reply::Doc).await
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
        let built = sql::query(Dialect::Sqlite, c, scope, filter, after, limit);
        let rows = self
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(&built.sql)?;
                let rows = stmt.query_map(
                    rusqlite::params_from_iter(to_sql(&built.params)),
                    row_to_doc,
                )?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        Ok(page_from_rows(rows, limit))
    }

    async fn count(&self, c: Collection, scope: &str, filter: &Filter) -> Result<u64, StoreError> {
        let built = sql::count(Dialect::Sqlite, c, scope, filter);
        let n: i64 = self
            .read(move |conn| {
                conn.prepare_cached(&built.sql)?
                    .query_row(rusqlite::params_from_iter(to_sql(&built.params)), |r| {
                        r.get(0)
                    })
            })
            .await?;
        u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative count {n}")))
    }

    async fn delete_scope(&self, c: Collection, scope: &str) -> Result<u64, StoreError> {
        let op = Op::DeleteScope {
            c,
            scope: scope.to_owned(),
        };
        self.write(op, Reply::Count).await
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        self.write(Op::Audit(entry), Reply::Unit).await
    }

    async fn write_all(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let ops = writes
            .into_iter()
            .map(|w| match w {
                Write::Put {
                    c,
                    scope,
                    doc,
                    expect,
                } => Op::Put {
                    c,
                    scope,
                    doc,
                    expect,
                },
                Write::Delete {
                    c,
                    scope,
                    id,
                    expect,
                } => Op::Delete {
                    c,
                    scope,
                    id,
                    expect,
                },
                Write::Audit(e) => Op::Audit(e),
                Write::EnqueueCleanup(t) => enqueue_op(&t),
                Write::CancelCleanup(k) => Op::Exec {
                    sql: sql::CLEANUP_CANCEL,
                    params: key_values(&k),
                },
                Write::HubCapacity {
                    scope,
                    hub,
                    max,
                    except,
                } => Op::HubCapacity {
                    scope,
                    hub,
                    max: i64::try_from(max).unwrap_or(i64::MAX),
                    except,
                },
                Write::Event(e) => event_op(&e),
            })
            .collect();
        self.write(Op::Many(ops), Reply::Unit).await
    }

    async fn claim_events(
        &self,
        now_ms: i64,
        claim: &str,
        claimed_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let op = Op::ClaimEvents {
            now_ms,
            claim: claim.to_owned(),
            claimed_until_ms,
            limit: i64::try_from(sql::page_limit(limit)).unwrap_or(i64::MAX),
        };
        self.write(op, Reply::Events).await
    }

    async fn complete_events(&self, seqs: &[i64], claim: &str) -> Result<u64, StoreError> {
        if seqs.is_empty() {
            return Ok(0);
        }
        let op = Op::CompleteEvents {
            seqs: seqs.to_vec(),
            claim: claim.to_owned(),
        };
        self.write(op, Reply::Count).await
    }

    async fn reschedule_event(
        &self,
        seq: i64,
        claim: &str,
        attempts: u32,
        next_attempt_ms: i64,
        last_error: Option<&str>,
    ) -> Result<bool, StoreError> {
        let op = Op::Exec {
            sql: sql::EVENT_RESCHEDULE,
            params: vec![
                Value::Integer(seq),
                Value::Text(claim.to_owned()),
                Value::Integer(i64::from(attempts)),
                Value::Integer(next_attempt_ms),
                last_error.map_or(Value::Null, |e| Value::Text(e.to_owned())),
            ],
        };
        Ok(self.write(op, Reply::Count).await? > 0)
    }

    async fn prune_events(
        &self,
        older_than_ms: Option<i64>,
        max_rows: Option<u64>,
    ) -> Result<u64, StoreError> {
        let mut dropped = 0;
        if let Some(ms) = older_than_ms {
            let op = Op::Exec {
                sql: sql::EVENT_PRUNE_OLDER,
                params: vec![Value::Integer(ms)],
            };
            dropped += self.write(op, Reply::Count).await?;
        }
        if let Some(max) = max_rows {
            let offset = i64::try_from(max).unwrap_or(i64::MAX);
            let cut: Option<i64> = self
                .read(move |conn| {
                    conn.prepare_cached(sql::EVENT_PRUNE_CUT)?
                        .query_row(params![offset], |r| r.get(0))
                        .optional()
                })
                .await?;
            if let Some(cut) = cut {
                let op = Op::Exec {
                    sql: sql::EVENT_PRUNE_UP_TO,
                    params: vec![Value::Integer(cut)],
                };
                dropped += self.write(op, Reply::Count).await?;
            }
        }
        Ok(dropped)
    }

    async fn count_events(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .read(|conn| {
                conn.prepare_cached(sql::EVENT_COUNT)?
                    .query_row([], |r| r.get(0))
            })
            .await?;
        u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative count {n}")))
    }

    async fn claim_cleanup(
        &self,
        now_ms: i64,
        claim: &str,
        claimed_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<CleanupTask>, StoreError> {
        let op = Op::ClaimCleanup {
            now_ms,
            claim: claim.to_owned(),
            claimed_until_ms,
            limit: i64::try_from(sql::page_limit(limit)).unwrap_or(i64::MAX),
        };
        self.write(op, Reply::Tasks).await
    }

    async fn complete_cleanup(&self, key: &CleanupKey, claim: &str) -> Result<bool, StoreError> {
        let mut params = key_values(key);
        params.push(Value::Text(claim.to_owned()));
        let op = Op::Exec {
            sql: sql::CLEANUP_COMPLETE,
            params,
        };
        Ok(self.write(op, Reply::Count).await? > 0)
    }

    async fn reschedule_cleanup(
        &self,
        key: &CleanupKey,
        claim: &str,
        attempts: u32,
        next_attempt_ms: i64,
        last_error: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut params = key_values(key);
        params.extend([
            Value::Text(claim.to_owned()),
            Value::Integer(i64::from(attempts)),
            Value::Integer(next_attempt_ms),
            last_error.map_or(Value::Null, |e| Value::Text(e.to_owned())),
        ]);
        let op = Op::Exec {
            sql: sql::CLEANUP_RESCHEDULE,
            params,
        };
        Ok(self.write(op, Reply::Count).await? > 0)
    }

    async fn list_cleanup(
        &self,
        instance: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CleanupTask>, StoreError> {
        let instance = instance.map(str::to_owned);
        let limit = i64::try_from(sql::page_limit(limit)).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&sql::cleanup_list())?;
            let rows = stmt.query_map(params![instance, limit], row_to_task)?;
            rows.collect()
        })
        .await
    }

    async fn count_cleanup(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .read(|conn| {
                conn.prepare_cached(sql::CLEANUP_COUNT)?
                    .query_row([], |r| r.get(0))
            })
            .await?;
        u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative count {n}")))
    }

    async fn heartbeat(&self, node: &NodeBeat) -> Result<(), StoreError> {
        let op = Op::Exec {
            sql: sql::NODE_BEAT,
            params: vec![
                Value::Text(node.id.clone()),
                Value::Text(node.name.clone()),
                Value::Integer(node.started_ms),
                Value::Integer(node.heartbeat_ms),
                Value::Integer(node.expires_ms),
            ],
        };
        self.write(op, Reply::Count).await.map(|_| ())
    }

    async fn nodes(&self) -> Result<Vec<NodeBeat>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(sql::NODE_LIST)?;
            let rows = stmt.query_map([], |r| {
                Ok(NodeBeat {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    started_ms: r.get(2)?,
                    heartbeat_ms: r.get(3)?,
                    expires_ms: r.get(4)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn remove_nodes(
        &self,
        id: Option<&str>,
        expired_before_ms: i64,
    ) -> Result<u64, StoreError> {
        let op = Op::Exec {
            sql: sql::NODE_REMOVE,
            params: vec![
                id.map_or(Value::Null, |i| Value::Text(i.to_owned())),
                Value::Integer(expired_before_ms),
            ],
        };
        self.write(op, Reply::Count).await
    }

    async fn prune_audit(
        &self,
        older_than: Option<&str>,
        max_rows: Option<u64>,
    ) -> Result<u64, StoreError> {
        let mut deleted = 0;
        if let Some(ts) = older_than {
            deleted += self
                .prune_batches(
                    sql::prune_older_than(Dialect::Sqlite),
                    Param::Text(ts.to_owned()),
                )
                .await?;
        }
        if let Some(max) = max_rows {
            let offset = i64::try_from(max).unwrap_or(i64::MAX);
            let cut_sql = sql::prune_cut(Dialect::Sqlite);
            let cut: Option<i64> = self
                .read(move |conn| {
                    conn.prepare_cached(&cut_sql)?
                        .query_row(params![offset], |r| r.get(0))
                        .optional()
                })
                .await?;
            if let Some(cut) = cut {
                deleted += self
                    .prune_batches(sql::prune_up_to(Dialect::Sqlite), Param::Int(cut))
                    .await?;
            }
        }
        Ok(deleted)
    }

    async fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let built = sql::audit(Dialect::Sqlite, q);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&built.sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(to_sql(&built.params)), |r| {
                Ok(AuditEntry {
                    seq: r.get(0)?,
                    timestamp: r.get(1)?,
                    instance: r.get(2)?,
                    actor: r.get(3)?,
                    action: r.get(4)?,
                    target_kind: r.get(5)?,
                    target_id: r.get(6)?,
                    before: r.get(7)?,
                    after: r.get(8)?,
                })
            })?;
            rows.collect()
        })
        .await
    }
}

/// Turn `limit + 1` rows into a page: the extra row only says that more follow.
pub(crate) fn page_from_rows(mut rows: Vec<(Doc, String)>, limit: usize) -> Page {
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = if more {
        rows.last().map(|(_, key)| key.clone())
    } else {
        None
    };
    Page {
        docs: rows.into_iter().map(|(d, _)| d).collect(),
        next,
    }
}

//! Group commit on PostgreSQL: the `write_all` calls of concurrent registrations in one
//! transaction of a few multi-row statements.
//!
//! Each statement and each transaction costs a PostgreSQL backend far more than the rows it
//! writes: bind and executor set-up, a WAL flush per commit, a process wake-up per message. One
//! registration commits its record (a compare-and-set), the built-in hub's identity, the clean-up
//! queue's change and an audit entry: on their own, five statements and a commit. Here the calls
//! queue, and a committer takes every queued call (up to [`MAX_BATCH`]) and applies them as
//!
//! 1. `BEGIN`, then every call's condition at once: one `UPDATE .. FROM unnest(..)` for the
//!    compare-and-sets on an ETag and one `INSERT .. ON CONFLICT DO NOTHING` for the creates;
//!    the rows they return say which calls hold;
//! 2. the other writes of the calls that hold, one multi-row statement per kind, and `COMMIT`,
//!    in one flight.
//!
//! A call whose condition fails writes nothing and gets its `Conflict` with the current ETag, as
//! on its own. The calls of a batch touch disjoint keys (a call sharing a document or clean-up key
//! with an earlier call of the batch waits for the next batch, and a call that writes one key
//! twice goes alone), so the order of the kinds inside the transaction changes nothing. When a
//! batch fails as a whole (a deadlock with another node, a dropped connection), each of its calls
//! is applied again on its own: one bad call never fails the others. A lone call takes the one
//! pipelined transaction of [`write_pipelined_on`], as before.
//!
//! One batch is in flight at a time while the queue is short, so that calls arriving meanwhile
//! join the next batch; a queue of [`MAX_BATCH`] calls or more starts more batches at once, up to
//! [`COMMITTERS`], each on a pooled connection ([`super::gate`]). The rest of the pool serves
//! reads.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use deadpool_postgres::Pool;
use dps_core::store::{Collection, Expect, StoreError, Write};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_postgres::types::ToSql;

use super::gate::Gate;
use super::{pg_err, pool_err, write_pipelined_on};
use crate::sql;

/// Calls in one batch at most.
pub(super) const MAX_BATCH: usize = 128;

/// Batches in flight at once at most (each holds one pooled connection while it commits).
pub(super) const COMMITTERS: usize = 4;

/// Calls waiting for a committer at most; a caller beyond that waits to enqueue.
const QUEUE: usize = 4096;

/// One `write_all` call.
struct Job {
    writes: Vec<Write>,
    keys: Keys,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// The keys a call writes, as fingerprints: documents `(collection, scope, key)` and clean-up
/// tasks `(instance, hub key, device id)`, each hashed (keys compared as the store compares
/// them: lowercased). `None` when the call writes one key twice: it goes alone. Two different
/// keys with one fingerprint (a 64-bit hash with a random key per process) only make two calls
/// that could have shared a batch go one after the other; calls that write the same key never
/// share one. Fingerprints rather than the keys themselves: no strings copied or rehashed for
/// every call on the hot path.
type Keys = Option<Vec<u64>>;

fn keys_of(fp: &RandomState, writes: &[Write]) -> Keys {
    let mut keys = Vec::with_capacity(writes.len());
    for w in writes {
        let k = match w {
            Write::Put { c, scope, doc, .. } => fingerprint(fp, 0, [c.as_str(), scope], &doc.id),
            Write::EnqueueCleanup(t) => fingerprint(
                fp,
                1,
                [t.key.instance.as_str(), &t.key.hub.to_lowercase()],
                &t.key.device_id,
            ),
            Write::CancelCleanup(k) => fingerprint(
                fp,
                1,
                [k.instance.as_str(), &k.hub.to_lowercase()],
                &k.device_id,
            ),
            _ => continue,
        };
        if keys.contains(&k) {
            return None;
        }
        keys.push(k);
    }
    Some(keys)
}

/// The fingerprint of a key: its kind, two parts as they are, and a last part that is compared
/// lowercased for documents (`sql::key_of`) and as it is for clean-up tasks' device ids.
fn fingerprint(fp: &RandomState, kind: u8, parts: [&str; 2], last: &str) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = fp.build_hasher();
    kind.hash(&mut h);
    parts[0].hash(&mut h);
    parts[1].hash(&mut h);
    if kind == 0 {
        // Lowercased as `sql::key_of` does; an ASCII id (the common case) without allocating.
        // Both forms are fed the same way, so ids with one key (`KEY`, and `\u{212A}EY` with
        // the Kelvin sign) have one fingerprint.
        let owned;
        let key = if last.is_ascii() {
            last
        } else {
            owned = sql::key_of(last);
            &owned
        };
        dps_core::ids::hash_ascii_lowercase(&mut h, key);
        h.write_u8(0xFF);
    } else {
        last.hash(&mut h);
    }
    h.finish()
}

/// A hasher for fingerprints, which are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `u64`s are hashed with it; anything else is folded in, never lost.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type FingerprintSet = HashSet<u64, std::hash::BuildHasherDefault<Prehashed>>;

/// Can these writes be batched? Exactly what [`write_pipelined_on`] applies: a condition on the
/// first write only, the others unconditional puts, audit entries, clean-up changes and events.
pub(super) fn batchable(writes: &[Write]) -> bool {
    !writes.is_empty()
        && writes.iter().enumerate().all(|(i, w)| match w {
            Write::Put { expect, .. } => {
                *expect == Expect::Any
                    || (i == 0 && matches!(expect, Expect::Etag(_) | Expect::Absent))
            }
            Write::Audit(_)
            | Write::EnqueueCleanup(_)
            | Write::CancelCleanup(_)
            | Write::Event(_) => true,
            Write::HubCapacity { .. } | Write::Delete { .. } => false,
        })
}

/// The queue in front of the committers.
pub(super) struct Batcher {
    tx: mpsc::Sender<Job>,
    /// The key of the calls' key fingerprints ([`keys_of`]).
    fp: RandomState,
    /// Calls committed in a batch of more than one.
    batched: Arc<AtomicU64>,
    /// Batches of more than one call committed.
    batches: Arc<AtomicU64>,
}

impl Batcher {
    /// Start the committers on `pool`; they stop when the batcher is dropped.
    pub(super) fn start(pool: Pool) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let batched = Arc::new(AtomicU64::new(0));
        let batches = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(Gate::new(MAX_BATCH));
        for _ in 0..COMMITTERS {
            let counters = (batched.clone(), batches.clone());
            tokio::spawn(committer(pool.clone(), rx.clone(), gate.clone(), counters));
        }
        Batcher {
            tx,
            fp: RandomState::new(),
            batched,
            batches,
        }
    }

    /// Calls committed so far in a batch of more than one.
    pub(super) fn batched(&self) -> u64 {
        self.batched.load(Ordering::Relaxed)
    }

    /// Batches of more than one call committed so far.
    pub(super) fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Apply `writes` (which must be [`batchable`]) atomically, in a batch with other calls.
    pub(super) async fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let (done, answer) = oneshot::channel();
        let keys = keys_of(&self.fp, &writes);
        self.tx
            .send(Job { writes, keys, done })
            .await
            .map_err(|_| StoreError::Unavailable("postgres: the committers have stopped".into()))?;
        answer.await.map_err(|_| {
            StoreError::Unavailable("postgres: the committer ended without an answer".into())
        })?
    }
}

async fn committer(
    pool: Pool,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    gate: Arc<Gate>,
    counters: (Arc<AtomicU64>, Arc<AtomicU64>),
) {
    // A call that shared a key with the batch before: it starts the next one.
    let mut carry: Option<Job> = None;
    loop {
        let mut batch = Vec::new();
        let mut keys = FingerprintSet::default();
        // The receiver is held while waiting for a first call and while draining. A carried call
        // never waits for it: another committer may be holding it, idle, until a call comes.
        let (first, mut guard) = match carry.take() {
            Some(j) => (j, rx.try_lock().ok()),
            None => {
                let mut guard = rx.lock().await;
                match guard.recv().await {
                    Some(j) => (j, Some(guard)),
                    None => return,
                }
            }
        };
        // While another batch is in flight, the calls arriving meanwhile join this one.
        let in_flight = gate.enter(guard.as_deref()).await;
        let alone = first.keys.is_none();
        if let Some(k) = &first.keys {
            keys.extend(k.iter().copied());
        }
        batch.push(first);
        if let Some(rx) = guard.as_mut() {
            while !alone && batch.len() < MAX_BATCH {
                let Ok(job) = rx.try_recv() else { break };
                let fits = job
                    .keys
                    .as_ref()
                    .is_some_and(|k| k.iter().all(|k| !keys.contains(k)));
                if !fits {
                    carry = Some(job);
                    break;
                }
                keys.extend(job.keys.iter().flatten().copied());
                batch.push(job);
            }
        }
        drop(guard);
        run(&pool, batch, &counters).await;
        drop(in_flight);
    }
}

/// Apply a batch and answer its callers.
async fn run(pool: &Pool, batch: Vec<Job>, (batched, batches): &(Arc<AtomicU64>, Arc<AtomicU64>)) {
    let client = match pool.get().await {
        Ok(c) => c,
        Err(e) => {
            let e = pool_err(e);
            for job in batch {
                let _ = job.done.send(Err(e.clone()));
            }
            return;
        }
    };
    if batch.len() == 1 {
        let job = batch.into_iter().next().expect("one job");
        let r = write_pipelined_on(&client, &job.writes).await;
        let _ = job.done.send(r);
        return;
    }
    match apply(&client, &batch).await {
        Ok(results) => {
            batched.fetch_add(batch.len() as u64, Ordering::Relaxed);
            batches.fetch_add(1, Ordering::Relaxed);
            for (job, r) in batch.into_iter().zip(results) {
                let _ = job.done.send(r);
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, calls = batch.len(), "postgres batch failed; applying its calls one by one");
            drop(client);
            for job in batch {
                let r = match pool.get().await {
                    Ok(c) => write_pipelined_on(&c, &job.writes).await,
                    Err(e) => Err(pool_err(e)),
                };
                let _ = job.done.send(r);
            }
        }
    }
}

/// Columns of a multi-row statement, one array per parameter.
struct Cols {
    text: Vec<Vec<Option<String>>>,
    int: Vec<Vec<Option<i64>>>,
}

impl Cols {
    fn new(texts: usize, ints: usize) -> Self {
        Cols {
            text: vec![Vec::new(); texts],
            int: vec![Vec::new(); ints],
        }
    }

    fn rows(&self) -> usize {
        self.text.first().map_or(0, Vec::len)
    }

    fn row(&mut self, texts: Vec<Option<String>>, ints: Vec<Option<i64>>) {
        for (col, v) in self.text.iter_mut().zip(texts) {
            col.push(v);
        }
        for (col, v) in self.int.iter_mut().zip(ints) {
            col.push(v);
        }
    }

    /// The parameters: the text arrays, then the integer arrays.
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.text
            .iter()
            .map(|c| c as &(dyn ToSql + Sync))
            .chain(self.int.iter().map(|c| c as &(dyn ToSql + Sync)))
            .collect()
    }
}

fn doc_row(cols: &mut Cols, c: Collection, scope: &str, doc: &dps_core::store::Doc) -> String {
    let key = sql::key_of(&doc.id);
    cols.text[0].push(Some(c.as_str().to_owned()));
    cols.text[1].push(Some(scope.to_owned()));
    cols.text[2].push(Some(key.clone()));
    cols.text[3].push(Some(doc.id.clone()));
    cols.text[4].push(Some(doc.etag.clone()));
    cols.text[5].push(Some(doc.body.clone()));
    cols.text[6].push(doc.index.status.clone());
    cols.text[7].push(doc.index.kind.clone());
    cols.text[8].push(doc.index.group.as_deref().map(str::to_lowercase));
    cols.text[9].push(doc.index.hub.clone());
    key
}

/// Apply the calls of a batch in one transaction; the outcome of each call, or `Err` when the
/// batch failed as a whole (nothing of it committed).
async fn apply(
    client: &deadpool_postgres::Object,
    batch: &[Job],
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    // 1. The conditions.
    let mut on_etag = Cols::new(11, 0);
    let mut absent = Cols::new(10, 0);
    // (collection, scope, key) of a condition -> its call.
    let mut conditional: HashMap<(String, String, String), usize> = HashMap::new();
    for (i, job) in batch.iter().enumerate() {
        if let Some(Write::Put {
            c,
            scope,
            doc,
            expect,
        }) = job.writes.first()
        {
            let cols = match expect {
                Expect::Any => continue,
                Expect::Present => unreachable!("not batchable"),
                Expect::Etag(e) => {
                    on_etag.text[10].push(Some(e.clone()));
                    &mut on_etag
                }
                Expect::Absent => &mut absent,
            };
            let key = doc_row(cols, *c, scope, doc);
            conditional.insert((c.as_str().to_owned(), scope.clone(), key), i);
        }
    }
    let cas_etag = client.prepare_cached(CAS_ETAG_MANY).await.map_err(pg_err)?;
    let cas_absent = client
        .prepare_cached(CAS_ABSENT_MANY)
        .await
        .map_err(pg_err)?;
    let pg: &tokio_postgres::Client = client;
    let (p_etag, p_absent) = (on_etag.params(), absent.params());
    let (begin, etag_rows, absent_rows) = tokio::join!(
        pg.batch_execute("BEGIN"),
        async {
            if on_etag.rows() == 0 {
                return Ok(Vec::new());
            }
            pg.query(&cas_etag, &p_etag).await
        },
        async {
            if absent.rows() == 0 {
                return Ok(Vec::new());
            }
            pg.query(&cas_absent, &p_absent).await
        },
    );
    let held_rows = begin.and(etag_rows).and_then(|mut a| {
        absent_rows.map(|b| {
            a.extend(b);
            a
        })
    });
    let held_rows = match held_rows {
        Ok(r) => r,
        Err(e) => {
            let _ = pg.batch_execute("ROLLBACK").await;
            return Err(pg_err(e));
        }
    };
    let mut held = vec![true; batch.len()];
    for i in conditional.values() {
        held[*i] = false;
    }
    for r in &held_rows {
        let k: (String, String, String) = (
            r.try_get(0).map_err(corrupt)?,
            r.try_get(1).map_err(corrupt)?,
            r.try_get(2).map_err(corrupt)?,
        );
        if let Some(i) = conditional.get(&k) {
            held[*i] = true;
        }
    }

    // 2. The other writes of the calls that hold, and the current ETags of those that do not.
    let mut docs = Cols::new(10, 0);
    let mut audit = Cols::new(9, 0);
    let mut cancel = Cols::new(3, 0);
    let mut enqueue = Cols::new(8, 4);
    let mut events = Cols::new(5, 3);
    let mut failed = Cols::new(3, 0);
    for (job, held) in batch.iter().zip(&held) {
        for (n, w) in job.writes.iter().enumerate() {
            if !held {
                if n == 0 {
                    if let Write::Put { c, scope, doc, .. } = w {
                        failed.row(
                            vec![
                                Some(c.as_str().to_owned()),
                                Some(scope.clone()),
                                Some(sql::key_of(&doc.id)),
                            ],
                            vec![],
                        );
                    }
                }
                continue;
            }
            match w {
                Write::Put {
                    c,
                    scope,
                    doc,
                    expect: Expect::Any,
                } => {
                    doc_row(&mut docs, *c, scope, doc);
                }
                // The condition, applied above.
                Write::Put { .. } => {}
                Write::Audit(e) => {
                    let ts = if e.timestamp.is_empty() {
                        dps_core::clock::azure_timestamp(time::OffsetDateTime::now_utc())
                    } else {
                        e.timestamp.clone()
                    };
                    audit.row(
                        vec![
                            Some(ts),
                            Some(e.instance.clone()),
                            Some(e.actor.clone()),
                            Some(e.action.clone()),
                            Some(e.target_kind.clone()),
                            Some(e.target_id.clone()),
                            Some(sql::key_of(&e.target_id)),
                            e.before.clone(),
                            e.after.clone(),
                        ],
                        vec![],
                    );
                }
                Write::CancelCleanup(k) => cancel.row(
                    vec![
                        Some(k.instance.clone()),
                        Some(k.hub.to_lowercase()),
                        Some(k.device_id.clone()),
                    ],
                    vec![],
                ),
                Write::EnqueueCleanup(t) => enqueue.row(
                    vec![
                        Some(t.key.instance.clone()),
                        Some(t.key.hub.to_lowercase()),
                        Some(t.key.device_id.clone()),
                        Some(t.key.hub.clone()),
                        Some(t.registration_id.clone()),
                        Some(t.action.as_str().to_owned()),
                        t.last_error.clone(),
                        t.claim.clone(),
                    ],
                    vec![
                        Some(i64::from(t.attempts)),
                        Some(t.next_attempt_ms),
                        Some(t.created_ms),
                        t.claimed_until_ms,
                    ],
                ),
                Write::Event(e) => events.row(
                    vec![
                        Some(e.id.clone()),
                        Some(e.instance.clone()),
                        Some(e.kind.clone()),
                        Some(e.body.clone()),
                        e.last_error.clone(),
                    ],
                    vec![
                        Some(i64::from(e.attempts)),
                        Some(e.next_attempt_ms),
                        Some(e.created_ms),
                    ],
                ),
                Write::HubCapacity { .. } | Write::Delete { .. } => {
                    unreachable!("not batchable")
                }
            }
        }
    }
    let mut statements = Vec::new();
    for (sql, cols) in [
        (UPSERT_MANY, &docs),
        (AUDIT_MANY, &audit),
        (CANCEL_MANY, &cancel),
        (ENQUEUE_MANY, &enqueue),
        (EVENT_MANY, &events),
    ] {
        if cols.rows() > 0 {
            statements.push((client.prepare_cached(sql).await.map_err(pg_err)?, cols));
        }
    }
    let current = if failed.rows() > 0 {
        Some(client.prepare_cached(CURRENT_MANY).await.map_err(pg_err)?)
    } else {
        None
    };
    let params: Vec<_> = statements.iter().map(|(st, c)| (st, c.params())).collect();
    let p_failed = failed.params();
    let (writes, current_rows, commit) = tokio::join!(
        futures::future::join_all(params.iter().map(|(st, p)| pg.execute(*st, p))),
        async {
            match &current {
                Some(st) => pg.query(st, &p_failed).await,
                None => Ok(Vec::new()),
            }
        },
        pg.batch_execute("COMMIT"),
    );
    for r in writes {
        // The transaction is aborted: its `COMMIT` rolled it back.
        r.map_err(pg_err)?;
    }
    let current_rows = current_rows.map_err(pg_err)?;
    commit.map_err(pg_err)?;
    let mut etags: HashMap<(String, String, String), String> = HashMap::new();
    for r in &current_rows {
        etags.insert(
            (
                r.try_get(0).map_err(corrupt)?,
                r.try_get(1).map_err(corrupt)?,
                r.try_get(2).map_err(corrupt)?,
            ),
            r.try_get(3).map_err(corrupt)?,
        );
    }
    Ok(batch
        .iter()
        .zip(held)
        .map(|(job, held)| {
            if held {
                return Ok(());
            }
            let current = match job.writes.first() {
                Some(Write::Put { c, scope, doc, .. }) => etags
                    .get(&(c.as_str().to_owned(), scope.clone(), sql::key_of(&doc.id)))
                    .cloned(),
                _ => None,
            };
            Err(StoreError::Conflict { current })
        })
        .collect())
}

fn corrupt(e: tokio_postgres::Error) -> StoreError {
    StoreError::Corrupt(format!("postgres row: {e}"))
}

/// The compare-and-sets on an ETag (`$11`: the expected ETag of each row); returns the keys
/// written.
const CAS_ETAG_MANY: &str = "UPDATE docs AS d SET id = v.id, etag = v.etag, body = v.body, \
     status = v.status, kind = v.kind, grp = v.grp, hub = v.hub \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
     $7::text[], $8::text[], $9::text[], $10::text[], $11::text[]) \
     AS v(collection, scope, key, id, etag, body, status, kind, grp, hub, expect) \
     WHERE d.collection = v.collection COLLATE \"C\" AND d.scope = v.scope COLLATE \"C\" \
     AND d.key = v.key COLLATE \"C\" AND d.etag = v.expect \
     RETURNING d.collection, d.scope, d.key";

/// The creates of documents that must be absent; returns the keys written.
const CAS_ABSENT_MANY: &str = "INSERT INTO docs (collection, scope, key, id, etag, body, \
     status, kind, grp, hub) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], \
     $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[]) \
     ON CONFLICT (collection, scope, key) DO NOTHING RETURNING collection, scope, key";

/// Unconditional puts.
const UPSERT_MANY: &str = "INSERT INTO docs (collection, scope, key, id, etag, body, status, \
     kind, grp, hub) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], \
     $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[]) \
     ON CONFLICT (collection, scope, key) DO UPDATE SET id = EXCLUDED.id, etag = EXCLUDED.etag, \
     body = EXCLUDED.body, status = EXCLUDED.status, kind = EXCLUDED.kind, grp = EXCLUDED.grp, \
     hub = EXCLUDED.hub";

/// Audit entries, in the order of the batch (their sequence numbers follow it).
const AUDIT_MANY: &str = "INSERT INTO audit (ts, instance, actor, action, target_kind, \
     target_id, target_key, before, after) SELECT ts, instance, actor, action, target_kind, \
     target_id, target_key, before, after FROM unnest($1::text[], $2::text[], \
     $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[]) \
     WITH ORDINALITY AS v(ts, instance, actor, action, target_kind, target_id, target_key, \
     before, after, n) ORDER BY n";

/// Clean-up tasks dropped.
const CANCEL_MANY: &str = "DELETE FROM hub_cleanup AS h USING unnest($1::text[], $2::text[], \
     $3::text[]) AS v(instance, hub_key, device_id) WHERE h.instance = v.instance COLLATE \"C\" \
     AND h.hub_key = v.hub_key COLLATE \"C\" AND h.device_id = v.device_id COLLATE \"C\"";

/// Clean-up tasks queued (as `sql::CLEANUP_ENQUEUE`).
const ENQUEUE_MANY: &str = "INSERT INTO hub_cleanup (instance, hub_key, device_id, hub, \
     registration_id, action, last_error, claim, attempts, next_attempt, created, claimed_until) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
     $6::text[], $7::text[], $8::text[], $9::int8[], $10::int8[], $11::int8[], $12::int8[]) \
     ON CONFLICT (instance, hub_key, device_id) DO UPDATE SET hub = excluded.hub, \
     registration_id = excluded.registration_id, action = excluded.action, \
     next_attempt = excluded.next_attempt, claim = excluded.claim, \
     claimed_until = excluded.claimed_until";

/// Events, in the order of the batch.
const EVENT_MANY: &str = "INSERT INTO events_outbox (id, instance, kind, body, last_error, \
     attempts, next_attempt, created) SELECT id, instance, kind, body, last_error, attempts, \
     next_attempt, created FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], \
     $5::text[], $6::int8[], $7::int8[], $8::int8[]) WITH ORDINALITY \
     AS v(id, instance, kind, body, last_error, attempts, next_attempt, created, n) ORDER BY n";

/// The current ETags of documents whose condition failed.
const CURRENT_MANY: &str = "SELECT d.collection, d.scope, d.key, d.etag FROM docs AS d \
     JOIN unnest($1::text[], $2::text[], $3::text[]) AS v(collection, scope, key) \
     ON d.collection = v.collection COLLATE \"C\" AND d.scope = v.scope COLLATE \"C\" \
     AND d.key = v.key COLLATE \"C\"";

#[cfg(test)]
mod tests {
    use super::*;
    use dps_core::store::{CleanupKey, Collection, Doc};

    fn put(c: Collection, scope: &str, id: &str) -> Write {
        Write::Put {
            c,
            scope: scope.into(),
            doc: Doc {
                id: id.into(),
                etag: "e".into(),
                body: "{}".into(),
                index: Default::default(),
            },
            expect: Expect::Any,
        }
    }

    fn cancel(instance: &str, hub: &str, device: &str) -> Write {
        Write::CancelCleanup(CleanupKey {
            instance: instance.into(),
            hub: hub.into(),
            device_id: device.into(),
        })
    }

    #[test]
    fn fingerprints_compare_keys_as_the_store_does() {
        let fp = RandomState::new();
        let one = |w: Write| keys_of(&fp, &[w]).unwrap()[0];
        let r = Collection::Registration;
        // Document ids are compared lowercased, Unicode included (the Kelvin sign is a `k`);
        // long ids go through more than one chunk.
        assert_eq!(one(put(r, "i", "Meter-1")), one(put(r, "i", "meter-1")));
        assert_eq!(one(put(r, "i", "KEY")), one(put(r, "i", "\u{212A}ey")));
        let long = "A".repeat(150);
        assert_eq!(
            one(put(r, "i", &long)),
            one(put(r, "i", &long.to_lowercase()))
        );
        // Anything else tells keys apart: collection, scope, the parts' boundaries, the kind.
        assert_ne!(one(put(r, "i", "m")), one(put(Collection::Group, "i", "m")));
        assert_ne!(one(put(r, "i", "m")), one(put(r, "I", "m")));
        assert_ne!(one(put(r, "ab", "c")), one(put(r, "a", "bc")));
        assert_ne!(one(put(r, "i", "m")), one(put(r, "i", "m2")));
        // Clean-up tasks: hub lowercased, device id as it is.
        assert_eq!(
            one(cancel("i", "Hub.A", "d")),
            one(cancel("i", "hub.a", "d"))
        );
        assert_ne!(one(cancel("i", "h", "d")), one(cancel("i", "h", "D")));
        // One call writing one key twice goes alone.
        assert!(keys_of(&fp, &[put(r, "i", "m"), put(r, "i", "M")]).is_none());
        assert_eq!(
            keys_of(&fp, &[put(r, "i", "m"), cancel("i", "h", "m")])
                .unwrap()
                .len(),
            2
        );
    }
}

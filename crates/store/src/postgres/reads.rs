//! Point reads on PostgreSQL, grouped: the `get`s of concurrent registrations in one statement.
//!
//! Every registration reads its record before it writes it. On its own, each such read is a
//! statement of its own (bind, execute, a reply, a process wake-up on both sides), which costs
//! the database several times what the index lookup does. Here concurrent `get`s queue, and a
//! reader takes every queued one (up to [`MAX_READS`]) and answers them with one
//! `SELECT .. JOIN unnest(..)`. A lone read is the single-row statement, as before. A read is
//! queued after the caller's earlier writes were acknowledged, so it sees them (the statement
//! starts after they committed).

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::Pool;
use dps_core::store::{Collection, Doc, StoreError};
use tokio::sync::{mpsc, oneshot, Mutex};

use super::gate::Gate;
use super::{pg_err, pool_err, row_to_doc};

/// Reads in one statement at most.
const MAX_READS: usize = 128;

/// Statements in flight at once at most (each on a pooled connection); one while the queue is
/// shorter than [`MAX_READS`] ([`super::gate`]).
const READERS: usize = 4;

/// Reads waiting for a reader at most; a caller beyond that waits to enqueue.
const QUEUE: usize = 4096;

/// The single-row read.
const GET_ONE: &str = "SELECT id, etag, body, status, kind, grp, hub, key FROM docs \
     WHERE collection = $1 AND scope = $2 AND key = $3";

/// Many reads: the rows found, with their collection and scope (the key is column 7).
const GET_MANY: &str = "SELECT d.id, d.etag, d.body, d.status, d.kind, d.grp, d.hub, d.key, \
     d.collection, d.scope FROM docs AS d \
     JOIN unnest($1::text[], $2::text[], $3::text[]) AS v(collection, scope, key) \
     ON d.collection = v.collection COLLATE \"C\" AND d.scope = v.scope COLLATE \"C\" \
     AND d.key = v.key COLLATE \"C\"";

type Key = (&'static str, String, String);

struct Read {
    key: Key,
    done: oneshot::Sender<Result<Option<Doc>, StoreError>>,
}

/// The queue in front of the readers.
pub(super) struct Reader {
    tx: mpsc::Sender<Read>,
}

impl Reader {
    /// Start the readers on `pool`; they stop when the reader is dropped.
    pub(super) fn start(pool: Pool) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let gate = Arc::new(Gate::new(MAX_READS));
        for _ in 0..READERS {
            tokio::spawn(reader(pool.clone(), rx.clone(), gate.clone()));
        }
        Reader { tx }
    }

    /// The document `key` (lowercased id) of `c` in `scope`.
    pub(super) async fn get(
        &self,
        c: Collection,
        scope: &str,
        key: String,
    ) -> Result<Option<Doc>, StoreError> {
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Read {
                key: (c.as_str(), scope.to_owned(), key),
                done,
            })
            .await
            .map_err(|_| StoreError::Unavailable("postgres: the readers have stopped".into()))?;
        answer.await.map_err(|_| {
            StoreError::Unavailable("postgres: the reader ended without an answer".into())
        })?
    }
}

async fn reader(pool: Pool, rx: Arc<Mutex<mpsc::Receiver<Read>>>, gate: Arc<Gate>) {
    loop {
        let mut reads = Vec::new();
        let in_flight = {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(r) => reads.push(r),
                None => return,
            }
            // While another statement is in flight, the reads arriving meanwhile join this one.
            let in_flight = gate.enter(Some(&*rx)).await;
            while reads.len() < MAX_READS {
                let Ok(r) = rx.try_recv() else { break };
                reads.push(r);
            }
            in_flight
        };
        let result = match pool.get().await {
            Ok(client) => read(&client, &reads).await,
            Err(e) => Err(pool_err(e)),
        };
        drop(in_flight);
        match result {
            Ok(found) => {
                for r in reads {
                    let _ = r.done.send(Ok(found.get(&r.key).cloned()));
                }
            }
            Err(e) => {
                for r in reads {
                    let _ = r.done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The documents found among `reads`, by key.
async fn read(
    client: &deadpool_postgres::Object,
    reads: &[Read],
) -> Result<HashMap<Key, Doc>, StoreError> {
    let mut found = HashMap::with_capacity(reads.len());
    if let [one] = reads {
        let stmt = client.prepare_cached(GET_ONE).await.map_err(pg_err)?;
        let (c, scope, key) = &one.key;
        if let Some(row) = client
            .query_opt(&stmt, &[c, scope, key])
            .await
            .map_err(pg_err)?
        {
            found.insert(one.key.clone(), row_to_doc(&row)?.0);
        }
        return Ok(found);
    }
    let stmt = client.prepare_cached(GET_MANY).await.map_err(pg_err)?;
    let collections: Vec<&str> = reads.iter().map(|r| r.key.0).collect();
    let scopes: Vec<&str> = reads.iter().map(|r| r.key.1.as_str()).collect();
    let keys: Vec<&str> = reads.iter().map(|r| r.key.2.as_str()).collect();
    for row in client
        .query(&stmt, &[&collections, &scopes, &keys])
        .await
        .map_err(pg_err)?
    {
        let (doc, key) = row_to_doc(&row)?;
        let corrupt = |e: tokio_postgres::Error| StoreError::Corrupt(format!("postgres row: {e}"));
        let collection: String = row.try_get(8).map_err(corrupt)?;
        let scope: String = row.try_get(9).map_err(corrupt)?;
        // Map the stored collection name back to the requested one (a static string).
        let Some(c) = reads
            .iter()
            .map(|r| r.key.0)
            .find(|c| *c == collection.as_str())
        else {
            continue;
        };
        found.insert((c, scope, key), doc);
    }
    Ok(found)
}

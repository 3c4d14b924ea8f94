//! The store wrapper that writes the outbox: the event of every audit entry that is a lifecycle
//! event joins the entry's own write (see the module documentation of [`super`]).

use async_trait::async_trait;
use dps_core::store::{
    AuditEntry, AuditQuery, CleanupKey, CleanupTask, Collection, Doc, Expect, Filter, NodeBeat,
    OutboxEvent, Page, Store, StoreError, Write,
};
use std::sync::Arc;
use tokio::sync::Notify;

/// A [`Store`] that adds the outbox events of audit entries to the same transaction. Every
/// other call goes straight to the inner store.
pub struct EventsStore {
    inner: Arc<dyn Store>,
    wake: Arc<Notify>,
}

impl EventsStore {
    /// Wrap `inner`; `wake` is notified after events were committed (the dispatcher waits on it).
    pub fn new(inner: Arc<dyn Store>, wake: Arc<Notify>) -> Self {
        EventsStore { inner, wake }
    }

    /// The writes with their events added after them.
    fn with_events(writes: Vec<Write>) -> (Vec<Write>, bool) {
        let now = super::now_ms();
        let mut out = Vec::with_capacity(writes.len() + 1);
        let mut events = Vec::new();
        // A device moved between hubs: the assignment queues the removal of its identity on
        // another hub in the same write.
        let left: Vec<String> = writes
            .iter()
            .filter_map(|w| match w {
                Write::EnqueueCleanup(t) => Some(t.key.hub.clone()),
                _ => None,
            })
            .collect();
        for w in &writes {
            if let Write::Audit(e) = w {
                if let Some(ev) = super::event_of(e) {
                    events.push(super::outbox_write(&ev, now));
                    if e.action == "registration.assigned" && !left.is_empty() {
                        let to = e
                            .after
                            .as_deref()
                            .and_then(|a| serde_json::from_str::<serde_json::Value>(a).ok())
                            .and_then(|v| v["state"]["assignedHub"].as_str().map(str::to_owned));
                        for from in &left {
                            if to.as_deref().is_some_and(|t| t.eq_ignore_ascii_case(from)) {
                                continue; // same hub, another device id
                            }
                            let mv = super::moved_event(e, from, to.as_deref());
                            events.push(super::outbox_write(&mv, now));
                        }
                    }
                }
            }
        }
        let any = !events.is_empty();
        out.extend(writes);
        out.extend(events);
        (out, any)
    }
}

#[async_trait]
impl Store for EventsStore {
    fn engine(&self) -> &'static str {
        self.inner.engine()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn get(&self, c: Collection, scope: &str, id: &str) -> Result<Option<Doc>, StoreError> {
        self.inner.get(c, scope, id).await
    }
    async fn put(
        &self,
        c: Collection,
        scope: &str,
        doc: Doc,
        expect: Expect,
    ) -> Result<(), StoreError> {
        self.inner.put(c, scope, doc, expect).await
    }
    async fn delete(
        &self,
        c: Collection,
        scope: &str,
        id: &str,
        expect: Expect,
    ) -> Result<Option<Doc>, StoreError> {
        self.inner.delete(c, scope, id, expect).await
    }
    async fn query(
        &self,
        c: Collection,
        scope: &str,
        filter: &Filter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        self.inner.query(c, scope, filter, after, limit).await
    }
    async fn count(&self, c: Collection, scope: &str, filter: &Filter) -> Result<u64, StoreError> {
        self.inner.count(c, scope, filter).await
    }
    async fn delete_scope(&self, c: Collection, scope: &str) -> Result<u64, StoreError> {
        self.inner.delete_scope(c, scope).await
    }
    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        if super::type_of(&entry.action).is_none() {
            return self.inner.append_audit(entry).await;
        }
        self.write_all(vec![Write::Audit(entry)]).await
    }
    async fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        self.inner.list_audit(q).await
    }
    async fn prune_audit(
        &self,
        older_than: Option<&str>,
        max_rows: Option<u64>,
    ) -> Result<u64, StoreError> {
        self.inner.prune_audit(older_than, max_rows).await
    }
    async fn write_all(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let (writes, any) = Self::with_events(writes);
        self.inner.write_all(writes).await?;
        if any {
            self.wake.notify_one();
        }
        Ok(())
    }
    async fn claim_cleanup(
        &self,
        now_ms: i64,
        claim: &str,
        claimed_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<CleanupTask>, StoreError> {
        self.inner
            .claim_cleanup(now_ms, claim, claimed_until_ms, limit)
            .await
    }
    async fn complete_cleanup(&self, key: &CleanupKey, claim: &str) -> Result<bool, StoreError> {
        self.inner.complete_cleanup(key, claim).await
    }
    async fn reschedule_cleanup(
        &self,
        key: &CleanupKey,
        claim: &str,
        attempts: u32,
        next_attempt_ms: i64,
        last_error: Option<&str>,
    ) -> Result<bool, StoreError> {
        self.inner
            .reschedule_cleanup(key, claim, attempts, next_attempt_ms, last_error)
            .await
    }
    async fn list_cleanup(
        &self,
        instance: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CleanupTask>, StoreError> {
        self.inner.list_cleanup(instance, limit).await
    }
    async fn count_cleanup(&self) -> Result<u64, StoreError> {
        self.inner.count_cleanup().await
    }
    async fn claim_events(
        &self,
        now_ms: i64,
        claim: &str,
        claimed_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        self.inner
            .claim_events(now_ms, claim, claimed_until_ms, limit)
            .await
    }
    async fn complete_events(&self, seqs: &[i64], claim: &str) -> Result<u64, StoreError> {
        self.inner.complete_events(seqs, claim).await
    }
    async fn reschedule_event(
        &self,
        seq: i64,
        claim: &str,
        attempts: u32,
        next_attempt_ms: i64,
        last_error: Option<&str>,
    ) -> Result<bool, StoreError> {
        self.inner
            .reschedule_event(seq, claim, attempts, next_attempt_ms, last_error)
            .await
    }
    async fn prune_events(
        &self,
        older_than_ms: Option<i64>,
        max_rows: Option<u64>,
    ) -> Result<u64, StoreError> {
        self.inner.prune_events(older_than_ms, max_rows).await
    }
    async fn count_events(&self) -> Result<u64, StoreError> {
        self.inner.count_events().await
    }
    async fn heartbeat(&self, node: &NodeBeat) -> Result<(), StoreError> {
        self.inner.heartbeat(node).await
    }
    async fn nodes(&self) -> Result<Vec<NodeBeat>, StoreError> {
        self.inner.nodes().await
    }
    async fn remove_nodes(
        &self,
        id: Option<&str>,
        expired_before_ms: i64,
    ) -> Result<u64, StoreError> {
        self.inner.remove_nodes(id, expired_before_ms).await
    }
}

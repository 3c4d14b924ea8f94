//! The audit log: who changed what (before and after, secrets redacted), and every registration
//! outcome. Stored durably through the store's audit table.

use dps_core::clock::{azure_timestamp, Clock, SystemClock};
use dps_core::store::{AuditEntry, Store};
use serde::Serialize;
use std::sync::Arc;

/// Writes audit entries.
#[derive(Clone)]
pub struct Audit {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
}

/// Hide secrets in a JSON value: the one rule of [`dps_core::redact`].
pub fn redact(v: serde_json::Value) -> serde_json::Value {
    dps_core::redact::redact(v)
}

/// An entry's `before`/`after` text as JSON with secrets hidden, for answers: rows written
/// before the rule covered a field are hidden on the way out too. Text that is not JSON is
/// scrubbed as free text.
pub fn redacted_json(text: &str) -> serde_json::Value {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => redact(v),
        Err(_) => serde_json::Value::String(dps_core::redact::scrub(text).into_owned()),
    }
}

/// Prunes the audit log to its retention: entries older than `retention`, then the oldest
/// beyond `max_rows`.
pub struct Pruner {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Now.
    pub clock: Arc<dyn Clock>,
    /// Entries older than this are deleted; `None` keeps them.
    pub retention: Option<std::time::Duration>,
    /// At most this many entries are kept; `None`: no cap.
    pub max_rows: Option<u64>,
}

impl Pruner {
    /// Prune once; the number of entries deleted (counted in `dps_audit_pruned_total`). A
    /// failure is logged and retried at the next run.
    pub async fn prune(&self) -> u64 {
        if self.retention.is_none() && self.max_rows.is_none() {
            return 0;
        }
        let cut = self.retention.and_then(|r| {
            let r = time::Duration::try_from(r).ok()?;
            self.clock.now().checked_sub(r).map(azure_timestamp)
        });
        match self.store.prune_audit(cut.as_deref(), self.max_rows).await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(deleted = n, "audit log pruned");
                    metrics::counter!("dps_audit_pruned_total").increment(n);
                }
                n
            }
            Err(e) => {
                tracing::warn!(error = %e, "pruning the audit log failed");
                0
            }
        }
    }
}

impl Audit {
    /// Over a store, entries stamped with the system clock.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_clock(store, Arc::new(SystemClock))
    }

    /// Over a store, entries stamped with `clock`.
    pub fn with_clock(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Audit { store, clock }
    }

    /// Record a change or an outcome. Failures to write the audit log are logged, never
    /// surfaced to the client (the change itself already happened).
    pub async fn record<B: Serialize, A: Serialize>(
        &self,
        instance: &str,
        actor: &str,
        action: &str,
        target_kind: &str,
        target_id: &str,
        before: Option<&B>,
        after: Option<&A>,
    ) {
        let entry = self.entry(
            instance,
            actor,
            action,
            target_kind,
            target_id,
            before,
            after,
        );
        if let Err(e) = self.store.append_audit(entry).await {
            tracing::error!(error = %e, action, target_id, "failed to write the audit log");
        }
    }

    /// The entry [`record`](Self::record) would append, for a caller that writes it in one
    /// transaction with the change it describes (`Write::Audit`).
    #[allow(clippy::too_many_arguments)]
    pub fn entry<B: Serialize, A: Serialize>(
        &self,
        instance: &str,
        actor: &str,
        action: &str,
        target_kind: &str,
        target_id: &str,
        before: Option<&B>,
        after: Option<&A>,
    ) -> AuditEntry {
        let enc = |v: serde_json::Value| serde_json::to_string(&redact(v)).expect("json");
        AuditEntry {
            seq: 0,
            timestamp: azure_timestamp(self.clock.now()),
            instance: instance.to_string(),
            actor: actor.to_string(),
            action: action.to_string(),
            target_kind: target_kind.to_string(),
            target_id: target_id.to_string(),
            before: before.map(|b| enc(serde_json::to_value(b).expect("json"))),
            after: after.map(|a| enc(serde_json::to_value(a).expect("json"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn redacts_nested_keys() {
        let v = serde_json::json!({"attestation": {"symmetricKey": {"primaryKey": "s1", "secondaryKey": "s2"}}, "access_policy": [{"primary_key": "k"}], "x": "y"});
        let r = redact(v);
        assert_eq!(r["attestation"]["symmetricKey"]["primaryKey"], "<redacted>");
        assert_eq!(r["access_policy"][0]["primary_key"], "<redacted>");
        assert_eq!(r["x"], "y");
    }

    #[tokio::test]
    async fn the_pruner_cuts_by_age_from_its_clock_then_by_count() {
        use crate::usecases::testing::FixedClock;
        use dps_core::store::AuditQuery;
        let dir = tempfile::tempdir().unwrap();
        let store = dps_store::open_backend("", dir.path())
            .await
            .unwrap()
            .store();
        for day in ["01", "05", "08", "09", "10"] {
            let e = AuditEntry {
                timestamp: format!("2026-03-{day}T00:00:00.0000000Z"),
                action: "x".into(),
                target_id: day.into(),
                ..Default::default()
            };
            store.append_audit(e).await.unwrap();
        }
        let now = time::macros::datetime!(2026-03-10 12:00 UTC);
        let pruner = |retention_days: Option<u64>, max_rows| Pruner {
            store: store.clone(),
            clock: Arc::new(FixedClock(now)),
            retention: retention_days.map(|d| std::time::Duration::from_secs(d * 86_400)),
            max_rows,
        };
        let left = || async {
            store
                .list_audit(&AuditQuery {
                    limit: 100,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.target_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(pruner(None, None).prune().await, 0);
        // Three days back from 2026-03-10T12:00: the 1st and the 5th go.
        assert_eq!(pruner(Some(3), None).prune().await, 2);
        assert_eq!(left().await, ["08", "09", "10"]);
        assert_eq!(pruner(Some(3), Some(1)).prune().await, 2);
        assert_eq!(left().await, ["10"]);
    }

    #[test]
    fn old_rows_are_hidden_on_read() {
        let r = redacted_json(r#"{"options": {"secret": "w"}, "connection_string": "c"}"#);
        assert_eq!(
            r,
            serde_json::json!({"options": {"secret": "<redacted>"}, "connection_string": "<redacted>"})
        );
        assert_eq!(redacted_json("not json sig=abc"), "not json sig=<redacted>");
    }
}

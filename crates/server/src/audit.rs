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

/// Remove secrets from a JSON value: symmetric keys, access-policy keys, connection strings.
pub fn redact(mut v: serde_json::Value) -> serde_json::Value {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, val) in m.iter_mut() {
                    let lk = k.to_ascii_lowercase();
                    if matches!(
                        lk.as_str(),
                        "primarykey"
                            | "secondarykey"
                            | "primary_key"
                            | "secondary_key"
                            | "connection_string"
                            | "connectionstring"
                            | "sharedaccesskey"
                    ) && val.is_string()
                    {
                        *val = serde_json::Value::String("<redacted>".into());
                    } else {
                        walk(val);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut v);
    v
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
        let enc = |v: serde_json::Value| serde_json::to_string(&redact(v)).expect("json");
        let entry = AuditEntry {
            seq: 0,
            timestamp: azure_timestamp(self.clock.now()),
            instance: instance.to_string(),
            actor: actor.to_string(),
            action: action.to_string(),
            target_kind: target_kind.to_string(),
            target_id: target_id.to_string(),
            before: before.map(|b| enc(serde_json::to_value(b).expect("json"))),
            after: after.map(|a| enc(serde_json::to_value(a).expect("json"))),
        };
        if let Err(e) = self.store.append_audit(entry).await {
            tracing::error!(error = %e, action, target_id, "failed to write the audit log");
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
}

//! Lifecycle events: CloudEvents 1.0 (JSON, structured mode), one per fact, delivered at least
//! once to the configured sinks (`[[events.sink]]`: an HTTPS webhook, an MQTT topic, a NATS
//! subject). See `docs/events.md`.
//!
//! How an event is born: every fact dps reports is already written to the audit log, in the same
//! store transaction as the change it describes where there is one (a registration outcome with
//! its record, an issued certificate with its record, a revocation with the deny-list entry).
//! When at least one sink is configured, the store is wrapped in [`EventsStore`], which adds the
//! event of an audit entry ([`event_of`]) to the same `write_all` as a [`Write::Event`] into the
//! outbox: the event commits exactly when the audit entry does. Without sinks the store is not
//! wrapped and nothing extra is written.
//!
//! An event's `id` is derived from its audit entry (a hash of the instance, action, target,
//! timestamp and the entry's redacted `after`/`before`), so that `dps events tail`, which reads
//! the audit log, shows the same ids the sinks receive.
//!
//! The [`dispatch`] worker claims batches of the outbox with a lease (several nodes on one
//! PostgreSQL never deliver one batch at once), delivers them, and removes them; failures are
//! retried with exponential backoff and dead-lettered after `max_attempts`; the outbox is bounded
//! by `max_outbox_events` and `max_age_secs`.

pub mod dispatch;
pub mod sinks;
mod store;

pub use store::EventsStore;

use dps_core::store::{AuditEntry, OutboxEvent, Write};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The CloudEvents `type` of an audit action, if the action is a lifecycle event.
pub fn type_of(action: &str) -> Option<&'static str> {
    Some(match action {
        "registration.assigned" => "io.dps.registration.assigned",
        "registration.failed" => "io.dps.registration.failed",
        "registration.refused" => "io.dps.registration.refused",
        "registration.delete" => "io.dps.registration.deleted",
        "enrollment.create" => "io.dps.enrollment.created",
        "enrollment.update" => "io.dps.enrollment.updated",
        "enrollment.delete" => "io.dps.enrollment.deleted",
        "group.create" => "io.dps.enrollmentgroup.created",
        "group.update" => "io.dps.enrollmentgroup.updated",
        "group.delete" => "io.dps.enrollmentgroup.deleted",
        "certificate.issued" | "certificate.renewed" => "io.dps.certificate.issued",
        "certificate.revoked" => "io.dps.certificate.revoked",
        _ => return None,
    })
}

/// Every event type dps emits (documentation and the tail's filter check).
pub const TYPES: &[&str] = &[
    "io.dps.registration.assigned",
    "io.dps.registration.failed",
    "io.dps.registration.refused",
    "io.dps.registration.deleted",
    "io.dps.device.moved",
    "io.dps.enrollment.created",
    "io.dps.enrollment.updated",
    "io.dps.enrollment.deleted",
    "io.dps.enrollmentgroup.created",
    "io.dps.enrollmentgroup.updated",
    "io.dps.enrollmentgroup.deleted",
    "io.dps.certificate.issued",
    "io.dps.certificate.revoked",
    "io.dps.hub.health",
];

/// The `source` of an instance's events.
pub fn source_of(instance: &str) -> String {
    format!("/instances/{instance}")
}

/// A 128-bit id from `parts`, as 32 hex digits.
fn derive_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// The id of an audit entry's event.
pub fn id_of(e: &AuditEntry) -> String {
    derive_id(&[
        &e.instance,
        &e.action,
        &e.target_id,
        &e.timestamp,
        e.before.as_deref().unwrap_or(""),
        e.after.as_deref().unwrap_or(""),
    ])
}

/// A JSON text of the audit log as a value with secrets hidden.
fn data_of(text: Option<&str>) -> Value {
    text.map_or(Value::Null, crate::audit::redacted_json)
}

/// The CloudEvent of an audit entry, if its action is a lifecycle event.
pub fn event_of(e: &AuditEntry) -> Option<Value> {
    let ty = type_of(&e.action)?;
    let mut data = serde_json::Map::new();
    data.insert("action".into(), json!(e.action));
    data.insert("actor".into(), json!(e.actor));
    data.insert("targetKind".into(), json!(e.target_kind));
    if e.before.is_some() {
        data.insert("before".into(), data_of(e.before.as_deref()));
    }
    if e.after.is_some() {
        data.insert("after".into(), data_of(e.after.as_deref()));
    }
    Some(cloud_event(
        id_of(e),
        ty,
        &e.instance,
        &e.target_id,
        &e.timestamp,
        Value::Object(data),
    ))
}

/// A CloudEvents 1.0 JSON event.
pub fn cloud_event(
    id: String,
    ty: &str,
    instance: &str,
    subject: &str,
    time: &str,
    data: Value,
) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": source_of(instance),
        "type": ty,
        "subject": subject,
        "time": time,
        "datacontenttype": "application/json",
        "data": dps_core::redact::redact(data),
    })
}

/// The `io.dps.device.moved` event of an assignment that moved a device off `from_hub`.
pub fn moved_event(assigned: &AuditEntry, from_hub: &str, to_hub: Option<&str>) -> Value {
    cloud_event(
        derive_id(&[&id_of(assigned), "moved", from_hub]),
        "io.dps.device.moved",
        &assigned.instance,
        &assigned.target_id,
        &assigned.timestamp,
        json!({"fromHub": from_hub, "toHub": to_hub}),
    )
}

/// The `io.dps.hub.health` event of a hub whose health changed on this node.
pub fn hub_health_event(instance: &str, hub: &str, healthy: bool, time: &str, node: &str) -> Value {
    cloud_event(
        derive_id(&[
            instance,
            hub,
            time,
            node,
            if healthy { "up" } else { "down" },
        ]),
        "io.dps.hub.health",
        instance,
        hub,
        time,
        json!({"hub": hub, "healthy": healthy, "node": node}),
    )
}

/// Now, Unix milliseconds.
pub fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(i64::MAX)
}

/// The outbox write of an event.
pub fn outbox_write(ev: &Value, now_ms: i64) -> Write {
    let s = |k: &str| ev[k].as_str().unwrap_or_default().to_string();
    Write::Event(OutboxEvent {
        seq: 0,
        id: s("id"),
        instance: s("source")
            .strip_prefix("/instances/")
            .unwrap_or_default()
            .to_string(),
        kind: s("type"),
        body: ev.to_string(),
        attempts: 0,
        next_attempt_ms: now_ms,
        created_ms: now_ms,
        last_error: None,
        claim: None,
        claimed_until_ms: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(action: &str) -> AuditEntry {
        AuditEntry {
            timestamp: "2026-12-03T10:00:00.1234567Z".into(),
            instance: "default".into(),
            actor: "device".into(),
            action: action.into(),
            target_kind: "registration".into(),
            target_id: "dev-1".into(),
            after: Some(
                r#"{"registrationState":{"assignedHub":"h"},"attestation":{"symmetricKey":{"primaryKey":"s3cr3t"}}}"#
                    .into(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn an_assigned_entry_is_a_cloud_event_with_a_stable_id_and_no_secrets() {
        let e = entry("registration.assigned");
        let ev = event_of(&e).expect("an event");
        assert_eq!(ev["specversion"], "1.0");
        assert_eq!(ev["type"], "io.dps.registration.assigned");
        assert_eq!(ev["source"], "/instances/default");
        assert_eq!(ev["subject"], "dev-1");
        assert_eq!(ev["time"], "2026-12-03T10:00:00.1234567Z");
        assert_eq!(ev["id"], event_of(&e).unwrap()["id"]);
        assert_eq!(ev["id"].as_str().unwrap().len(), 32);
        assert_eq!(
            ev["data"]["after"]["attestation"]["symmetricKey"]["primaryKey"],
            "<redacted>"
        );
        assert!(!ev.to_string().contains("s3cr3t"));
        let mut other = e.clone();
        other.timestamp = "2026-12-03T10:00:00.1234568Z".into();
        assert_ne!(event_of(&other).unwrap()["id"], ev["id"]);
    }

    #[test]
    fn actions_outside_the_lifecycle_are_not_events() {
        assert!(event_of(&entry("fault.add")).is_none());
        assert!(event_of(&entry("instance.update")).is_none());
        for a in [
            "registration.failed",
            "registration.refused",
            "enrollment.create",
            "group.delete",
            "certificate.issued",
            "certificate.revoked",
        ] {
            let ty = type_of(a).unwrap();
            assert!(TYPES.contains(&ty), "{ty}");
        }
    }
}

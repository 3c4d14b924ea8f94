//! What happens to registrations outside a device's own request: hub identities follow
//! enrollment status changes, a deleted registration record may delete its hub identity, and
//! registrations interrupted by a crash are finished (recovery).

use super::Engine;
use dps_core::clock::azure_timestamp;
use dps_core::error::AssignmentFailure;
use dps_core::model::{RegistrationRecord, RegistrationStatus};
use dps_core::Result;
use std::time::{Duration, Instant};

impl Engine {
    /// Keep hub identities in step with enrollment changes: disabling an enrollment (or group)
    /// disables the identities of its assigned devices on their hubs; enabling it again enables
    /// them. Runs in the background; failures are logged per device.
    pub fn enrollment_status_changed(
        &self,
        instance: &str,
        individual: Option<&str>,
        group: Option<&str>,
        enabled: bool,
    ) {
        let me = self.self_arc();
        let instance = instance.to_string();
        let individual = individual.map(str::to_string);
        let group = group.map(str::to_string);
        tokio::spawn(async move {
            let records: Vec<RegistrationRecord> = if let Some(id) = individual {
                me.repo
                    .registration(&instance, &id)
                    .await
                    .ok()
                    .flatten()
                    .map(|(r, _)| r)
                    .into_iter()
                    .collect()
            } else if let Some(g) = group {
                let filter = dps_core::store::Filter {
                    group: Some(g.to_ascii_lowercase()),
                    status: Some("assigned".into()),
                    ..Default::default()
                };
                me.repo
                    .all::<RegistrationRecord>(
                        dps_core::store::Collection::Registration,
                        &instance,
                        &filter,
                    )
                    .await
                    .map(|v| v.into_iter().map(|(r, _)| r).collect())
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            let Some(inst) = me.instances.by_name(&instance) else {
                return;
            };
            for rec in records {
                let (Some(hub), Some(dev)) = (
                    rec.state.assigned_hub.as_deref(),
                    rec.state.device_id.as_deref(),
                ) else {
                    continue;
                };
                let Some(h) = inst.hub(hub) else { continue };
                let Ok(a) = me.hubs.adapter(h) else { continue };
                let t0 = Instant::now();
                let r = a.set_enabled(dev, enabled).await;
                me.hubs.record(hub, t0, &r);
                match r {
                    Ok(()) => {
                        me.audit
                            .record(
                                &instance,
                                "system",
                                if enabled {
                                    "hub_identity.enable"
                                } else {
                                    "hub_identity.disable"
                                },
                                "registration",
                                &rec.state.registration_id,
                                None::<&()>,
                                Some(&serde_json::json!({"hub": hub, "deviceId": dev})),
                            )
                            .await
                    }
                    Err(e) => {
                        tracing::warn!(registration_id = %rec.state.registration_id, hub, error = %e, "could not change the hub identity's status")
                    }
                }
            }
        });
    }

    /// A registration record was deleted through the service API: the next registration is an
    /// initial assignment. The hub identity is kept (as Azure does) unless the linked hub's
    /// `options.delete_identity_on_deregister` is true; then its removal is queued and tried at
    /// once (see `cleanup.rs`).
    pub async fn registration_deleted(&self, instance: &str, rec: &RegistrationRecord) {
        let Some(inst) = self.instances.by_name(instance) else {
            return;
        };
        let (Some(hub), Some(dev)) = (
            rec.state.assigned_hub.as_deref(),
            rec.state.device_id.as_deref(),
        ) else {
            return;
        };
        let Some(h) = inst.hub(hub) else { return };
        if h.options
            .get("delete_identity_on_deregister")
            .and_then(|v| v.as_bool())
            != Some(true)
        {
            return;
        }
        // Through the clean-up queue: a hub that is down now is cleaned up once it is back.
        self.cleanup_deregistered(&inst, &rec.state.registration_id, hub, dev)
            .await;
    }

    /// Finish what a crash interrupted: intents (records left `assigning` with a pending
    /// assignment) of nodes whose heartbeat has lapsed, and this node's own intents that no
    /// running assignment holds (a store failure ended it half-way), become `failed` with a
    /// retryable code, keeping the pending hub in their history so that the next registration
    /// updates or moves that identity instead of orphaning it. Intents of live nodes are never
    /// touched, however old. Intents written before nodes had ids (no owner) are ended once
    /// older than `unowned_after`.
    pub async fn recover(&self, unowned_after: Duration) -> Result<usize> {
        let cutoff = azure_timestamp(self.clock.now() - unowned_after);
        let live = self.live_nodes().await?;
        let mut n = 0;
        for inst in self.instances.list() {
            let filter = dps_core::store::Filter {
                status: Some("assigning".into()),
                ..Default::default()
            };
            let stuck = self
                .repo
                .all::<RegistrationRecord>(
                    dps_core::store::Collection::Registration,
                    &inst.name,
                    &filter,
                )
                .await?;
            for (rec, etag) in stuck {
                let orphan = match super::nodes::intent_owner(&rec) {
                    Some(owner) if owner == self.node_id() => !self.is_running(&inst.name, &rec),
                    Some(owner) => !live.contains(owner),
                    None => {
                        let started = rec
                            .pending
                            .as_ref()
                            .map(|p| p.started.clone())
                            .or(rec.state.last_updated_date_time_utc.clone())
                            .unwrap_or_default();
                        started <= cutoff
                    }
                };
                if orphan && self.finish_interrupted(&inst.name, rec, etag).await? {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Is an assignment of this node working on `rec`'s operation now?
    fn is_running(&self, instance: &str, rec: &RegistrationRecord) -> bool {
        let Some(op) = rec.operation_id.clone() else {
            return false;
        };
        self.running.lock().expect("running lock").contains(&(
            instance.to_ascii_lowercase(),
            rec.state.registration_id.to_ascii_lowercase(),
            op,
        ))
    }

    /// End an interrupted intent as failed-retryable, if the record is still the version read
    /// (`etag`): `false` when another writer changed it meanwhile (nothing is written then).
    pub(super) async fn finish_interrupted(
        &self,
        instance: &str,
        mut rec: RegistrationRecord,
        etag: String,
    ) -> Result<bool> {
        // The identity the intent was writing may be on its hub now. Unless it is the one the
        // device is assigned to anyway, it is queued for removal in the same transaction, so that
        // it is not left behind when the device registers again and ends up elsewhere (the queue
        // drops the task when the device is assigned to that hub with that id after all).
        let orphan = rec.pending.as_ref().filter(|p| {
            !(rec
                .state
                .assigned_hub
                .as_deref()
                .is_some_and(|h| h.eq_ignore_ascii_case(&p.hub))
                && rec.state.device_id.as_deref() == Some(p.device_id.as_str()))
        });
        let cleanup = orphan.map(|p| {
            self.new_cleanup(
                instance,
                &p.hub,
                &p.device_id,
                &rec.state.registration_id,
                false,
            )
        });
        let reason = match &rec.pending {
            Some(p) => format!(
                "interrupted while writing identity '{}' on hub '{}'{}; the device must register again",
                p.device_id,
                p.hub,
                p.owner
                    .as_deref()
                    .map(|o| format!(" (node {o} stopped)"))
                    .unwrap_or_default()
            ),
            None => "interrupted; the device must register again".to_string(),
        };
        tracing::warn!(registration_id = %rec.state.registration_id, reason = %reason, "ending an interrupted registration");
        let wire = dps_core::wire::assignment_failure(&AssignmentFailure::Interrupted);
        rec.state.status = Some(RegistrationStatus::Failed);
        rec.state.error_code = Some(wire.error_code);
        rec.state.error_message = Some(wire.message);
        rec.failure = Some(AssignmentFailure::Interrupted);
        rec.reason = Some(reason);
        rec.pending = None;
        rec.retry_after = Some(1);
        // What the hub holds is not known.
        rec.hub_write = None;
        let doc = crate::repo::Repo::registration_doc(&mut rec, self.new_etag());
        let after = doc.body.clone();
        let mut writes = vec![
            dps_core::store::Write::Put {
                c: dps_core::store::Collection::Registration,
                scope: instance.to_string(),
                doc,
                expect: dps_core::store::Expect::Etag(etag),
            },
            dps_core::store::Write::Audit(dps_core::store::AuditEntry {
                seq: 0,
                timestamp: azure_timestamp(self.clock.now()),
                instance: instance.to_string(),
                actor: "system".to_string(),
                action: "registration.recovered".to_string(),
                target_kind: "registration".to_string(),
                target_id: rec.state.registration_id.clone(),
                before: None,
                after: Some(after),
            }),
        ];
        writes.extend(cleanup.map(dps_core::store::Write::EnqueueCleanup));
        match self.repo.store.write_all(writes).await {
            Ok(()) => {
                metrics::counter!("dps_registrations_recovered_total").increment(1);
                Ok(true)
            }
            Err(dps_core::store::StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

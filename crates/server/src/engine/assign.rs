//! The assignment of an admitted device, under its per-device lock: plan reprovisioning from the
//! previous record, allocate a hub, write the intent (for hubs outside the store), write the
//! identity and twin to the hub, commit the final record with its audit entry, and clean up the
//! identity the device left behind. Failures end the record as `failed` with a domain
//! [`AssignmentFailure`]; only store failures are returned as errors.

use super::attest::Admitted;
use super::{ts, Engine, Failure};
use crate::repo::Repo;
use dps_core::device::Transport;
use dps_core::error::AssignmentFailure;
use dps_core::hub::{HubAuth, HubError, HubIdentity};
use dps_core::ids::DeviceId;
use dps_core::instance::{Instance, LinkedHub};
use dps_core::issuance::{CheckedCsr, CredentialPolicy};
use dps_core::model::*;
use dps_core::reprovision;
use dps_core::store::Write;
use dps_core::Result;
use std::time::Instant;

impl Engine {
    /// The assignment, under the per-device lock of this node and, across nodes sharing the
    /// store, the compare-and-set of the device's record: every write of the record is
    /// conditional on the version this attempt read (or last wrote). An attempt that loses the
    /// race (another node wrote the record meanwhile) starts again from the record as it is
    /// now; one that finds another live node's intent waits for that node to finish (a lapsed
    /// node's intent is ended first, see `lifecycle.rs`). So two registrations of one device on
    /// two nodes end with one record, one identity on one hub, and the same answer.
    ///
    /// Returns the final record (assigned, failed or disabled). `Err` for store failures, and
    /// `Throttled` when another node's assignment of the device outlasts the wait.
    pub(super) async fn assign(
        &self,
        adm: Admitted,
        op: &str,
        payload: Option<serde_json::Value>,
        transport: Transport,
        force: bool,
        csr: Option<(CredentialPolicy, CheckedCsr)>,
    ) -> Result<RegistrationRecord> {
        let inst = adm.instance.clone();
        let rid = adm.registration_id.clone();
        let _lock = self.lock_for(&inst.name, &rid.key()).lock().await;
        let started = Instant::now();
        let wait_until = started + self.foreign_intent_wait();
        let mut pause = std::time::Duration::from_millis(20);
        let mut conflicts = 0;
        loop {
            // Boxed: a record is large, and this future holds it across awaits.
            let existing = self
                .repo
                .registration(&inst.name, rid.as_str())
                .await?
                .map(|(rec, etag)| (Box::new(rec), etag));
            if let Some((rec, _)) = &existing {
                // The clean-up worker (of any node) is removing this device's identity from a
                // hub: writing it again now could be undone by that removal.
                if let Some(r) = rec
                    .removing
                    .as_ref()
                    .filter(|r| r.device_id == adm.device_id() && r.until_ms > self.now_ms())
                {
                    if Instant::now() >= wait_until {
                        tracing::warn!(registration_id = %rid, hub = %r.hub, "the removal of this device's old identity is still running; the device is told to retry");
                        return Err(dps_core::Error::Throttled {
                            retry_after: self.settings.busy_retry_after,
                        });
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_millis(250));
                    continue;
                }
            }
            if let Some((rec, etag)) = &existing {
                if let Some(owner) = self.foreign_intent(rec) {
                    if self.node_is_live(owner).await? {
                        if Instant::now() >= wait_until {
                            tracing::warn!(registration_id = %rid, node = owner, "another node's assignment of this device is still running; the device is told to retry");
                            return Err(dps_core::Error::Throttled {
                                retry_after: self.settings.busy_retry_after,
                            });
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(std::time::Duration::from_millis(250));
                        continue;
                    }
                    // Its node is dead: end its intent (unless something else changed the
                    // record meanwhile), then assign from the record as it is then.
                    Box::pin(self.finish_interrupted(&inst.name, (**rec).clone(), etag.clone()))
                        .await?;
                    continue;
                }
            }
            let existing = existing.map(|(mut rec, etag)| {
                // The version every write of this attempt is conditional on.
                rec.state.etag = Some(etag);
                rec
            });
            // Boxed: one attempt's future is large, and the loop's own stays small.
            match Box::pin(self.assign_once(
                &adm,
                op,
                payload.clone(),
                transport,
                force,
                existing,
                started,
                csr.as_ref(),
            ))
            .await
            {
                Err(dps_core::Error::Store(dps_core::store::StoreError::Conflict { .. }))
                    if conflicts < MAX_CONFLICTS =>
                {
                    conflicts += 1;
                    metrics::counter!("dps_registration_conflicts_total").increment(1);
                    tracing::debug!(registration_id = %rid, "the record changed under this attempt (another node); starting again");
                }
                other => return other,
            }
        }
    }

    /// One attempt of the assignment from `existing` (its `state.etag` is the stored version);
    /// a `Conflict` means another writer changed the record and nothing of this attempt was
    /// committed.
    #[allow(clippy::too_many_arguments)]
    async fn assign_once(
        &self,
        adm: &Admitted,
        op: &str,
        payload: Option<serde_json::Value>,
        transport: Transport,
        force: bool,
        existing: Option<Box<RegistrationRecord>>,
        started: Instant,
        csr: Option<&(CredentialPolicy, CheckedCsr)>,
    ) -> Result<RegistrationRecord> {
        let inst = adm.instance.clone();
        let rid = adm.registration_id.clone();
        let now = ts(self.clock.as_ref());
        let mut rec = existing.clone().unwrap_or_else(|| {
            Box::new(RegistrationRecord {
                state: DeviceRegistrationState {
                    registration_id: rid.to_string(),
                    created_date_time_utc: Some(now.clone()),
                    ..Default::default()
                },
                operation_id: None,
                recent_operations: Vec::new(),
                retry_after: None,
                enrollment_group_id: None,
                attestation: None,
                hub_history: Vec::new(),
                failure: None,
                reason: None,
                pending: None,
                transport: None,
                hub_write: None,
                issued: None,
                removing: None,
            })
        });
        if rec
            .removing
            .as_ref()
            .is_some_and(|r| r.until_ms <= self.now_ms())
        {
            rec.removing = None;
        }
        if let Some(prev) = rec.operation_id.replace(op.to_string()) {
            rec.recent_operations.push(prev);
            let excess = rec.recent_operations.len().saturating_sub(16);
            rec.recent_operations.drain(..excess);
        }
        rec.enrollment_group_id = adm.group_id();
        rec.attestation = Some(adm.attestation);
        rec.transport = Some(transport.as_str().to_string());
        rec.state.last_updated_date_time_utc = Some(now.clone());
        rec.state.symmetric_key = (adm.attestation == AttestationType::SymmetricKey
            && adm.group_id().is_some())
        .then(|| SymmetricKeyRegistrationResult {
            enrollment_group_id: adm.group_id(),
        });
        rec.state.x509 = adm.x509.clone();
        rec.state.tpm = adm.tpm.clone();
        rec.state.payload = None;
        let labels = (
            inst.name.clone(),
            transport.as_str(),
            adm.attestation.as_str(),
        );

        if !adm.enabled() {
            rec.state.status = Some(RegistrationStatus::Disabled);
            rec.state.error_code = None;
            rec.state.error_message = None;
            rec.failure = None;
            rec.state.substatus = None;
            rec.hub_write = None;
            rec.reason = Some(if adm.disabled_override {
                "the individual enrollment for this registration id is disabled (it overrides the group)".to_string()
            } else {
                "the enrollment is disabled".to_string()
            });
            self.commit(&inst.name, &mut rec, "registration.disabled", Vec::new())
                .await?;
            metrics::counter!("RegistrationAttempts", "instance" => labels.0, "hub" => "none", "protocol" => labels.1, "attestation" => labels.2, "result" => "disabled").increment(1);
            return Ok(*rec);
        }

        let settings = adm.settings();
        let current_hub = existing
            .as_ref()
            .and_then(|r| r.hub_history.last().cloned());
        let previous_device = existing.as_deref().and_then(|r| r.state.device_id.clone());
        let plan = reprovision::plan(current_hub.as_deref(), settings.reprovision());
        let device_id = adm.device_id();
        if let Err(e) = DeviceId::parse(&device_id) {
            return self
                .fail(
                    &inst,
                    &mut rec,
                    Failure {
                        failure: AssignmentFailure::InvalidDeviceId,
                        reason: e.to_string(),
                    },
                    labels,
                )
                .await;
        }

        // Allocation.
        let (hub, webhook_twin, webhook_payload) = match &plan {
            reprovision::Plan::KeepCurrent { hub } => match inst.hub(hub) {
                Some(h) => (h.clone(), None, None),
                None => {
                    let reason = format!(
                        "the device's current hub '{hub}' is no longer linked to instance '{}'",
                        inst.name
                    );
                    return self
                        .fail(
                            &inst,
                            &mut rec,
                            Failure {
                                failure: AssignmentFailure::NoHub,
                                reason,
                            },
                            labels,
                        )
                        .await;
                }
            },
            _ => match self
                .allocate(
                    adm,
                    settings,
                    current_hub.as_deref(),
                    previous_device.as_deref(),
                    payload.clone(),
                )
                .await
            {
                Ok(x) => x,
                Err(f) => {
                    rec.retry_after = f.failure.is_throttling().then_some(1);
                    return self.fail(&inst, &mut rec, f, labels).await;
                }
            },
        };
        let outcome = reprovision::outcome(&plan, &hub.host, &rec.hub_history, rec.state.substatus);

        rec.state.status = Some(RegistrationStatus::Assigning);
        rec.pending = Some(PendingAssignment {
            hub: hub.host.clone(),
            device_id: device_id.clone(),
            started: now.clone(),
            owner: Some(self.node_id().to_string()),
        });
        if !rec
            .hub_history
            .last()
            .is_some_and(|h| h.eq_ignore_ascii_case(&hub.host))
        {
            rec.hub_history.push(hub.host.clone());
        }
        if rec.hub_history.len() > 16 {
            rec.hub_history.remove(0);
        }

        // The hub side.
        if let Some(rule) = self.faults.take_hub_down(op, &hub.host) {
            let e = HubError::Unreachable {
                hub: hub.host.clone(),
                message: format!("injected fault (rule {rule}): the hub is down"),
            };
            return self
                .hub_failed(&inst, &mut rec, existing.as_deref(), &hub, e, labels)
                .await;
        }
        let adapter = match self.hubs.adapter(&hub) {
            Ok(a) => a,
            Err(e) => {
                return self
                    .hub_failed(&inst, &mut rec, existing.as_deref(), &hub, e, labels)
                    .await
            }
        };
        let mut twin: Option<TwinState> = None;
        if let Some(old) = &outcome.migrate_from {
            if let Some(old_hub) = inst.hub(old) {
                if let Ok(a) = self.hubs.adapter(old_hub) {
                    let t0 = Instant::now();
                    match a
                        .get_twin(previous_device.as_deref().unwrap_or(&device_id))
                        .await
                    {
                        // `None`: no device on the old hub, hence no twin to lose.
                        Ok(t) => twin = t,
                        // A migration must never lose the twin: when it cannot be read, end this
                        // attempt as retryable (before anything is written to the new hub, so
                        // the old identity and its twin stay where they are) instead of moving
                        // the device with the initial twin and deleting the old identity.
                        Err(e) => {
                            self.hubs.record(old, t0, &Err(e.clone()));
                            let e = match e {
                                HubError::Throttled { retry_after, .. } => HubError::Throttled {
                                    hub: old.clone(),
                                    retry_after,
                                },
                                other => HubError::Unreachable {
                                    hub: old.clone(),
                                    message: format!(
                                        "the twin to migrate could not be read; the device stays on its current hub until it can: {other}"
                                    ),
                                },
                            };
                            return self
                                .hub_failed(&inst, &mut rec, existing.as_deref(), &hub, e, labels)
                                .await;
                        }
                    }
                }
            }
            if twin.is_none() {
                twin = settings.initial_twin.clone();
            }
        } else if outcome.write_initial_twin {
            twin = webhook_twin
                .or_else(|| settings.initial_twin.clone())
                .or_else(|| Some(TwinState::default()));
        }
        // Certificate issuance: sign the device's CSR; its hub identity then authenticates with
        // the issued certificate. A failure to sign is ours (500) and writes nothing.
        let signed = match csr {
            Some((policy, checked)) => Some(
                Box::pin(
                    self.issuer
                        .sign(&inst, policy, rid.as_str(), &device_id, checked, op),
                )
                .await?,
            ),
            None => None,
        };
        let identity = HubIdentity {
            device_id: device_id.clone(),
            auth: match &signed {
                Some(s) => HubAuth::X509Thumbprint {
                    primary: s.reference.sha256_thumbprint.clone(),
                    secondary: None,
                },
                None => adm.hub_auth.clone(),
            },
            capabilities: settings.capabilities.clone().unwrap_or_default(),
            enabled: true,
        };
        let t0 = Instant::now();
        // A hub kept in our own store (the built-in registry) gets its identity in the same
        // transaction as the final record: no intent record is needed, there is nothing to
        // recover. Any other hub is written between an intent record (which says which hub we are
        // about to write, so that an interrupted registration is recovered) and the final record.
        let staged = match adapter.identity_write(&identity, twin.as_ref()).await {
            Ok(w) => w,
            Err(e) => {
                self.hubs.record(&hub.host, t0, &Err(e.clone()));
                return self
                    .hub_failed(&inst, &mut rec, existing.as_deref(), &hub, e, labels)
                    .await;
            }
        };
        // A hub outside the store is not written when the write would change nothing: the same
        // identity (device id, credentials, capabilities, enabled) from the same version of the
        // enrollment, as last written to this hub, and no twin to write (see
        // `dps_core::hub::write_fingerprint` and docs/linked-hubs.md).
        let kind = hub.kind.as_str();
        let fingerprint = staged.is_none().then(|| {
            dps_core::hub::write_fingerprint(&hub, &identity, adm.settings().etag.as_deref())
        });
        let unchanged = fingerprint.as_deref().is_some_and(|f| {
            twin.is_none()
                && !force
                && skip_unchanged(&hub)
                && existing.as_deref().is_some_and(|r| {
                    r.state.status == Some(RegistrationStatus::Assigned)
                        && r.state.device_id.as_deref() == Some(device_id.as_str())
                        && r.state
                            .assigned_hub
                            .as_deref()
                            .is_some_and(|h| h.eq_ignore_ascii_case(&hub.host))
                        && r.hub_write
                            .as_ref()
                            .is_some_and(|w| w.hub.eq_ignore_ascii_case(&hub.host) && w.sha256 == f)
                })
        });
        if unchanged {
            metrics::counter!("dps_hub_writes_skipped_total", "kind" => kind).increment(1);
        } else if staged.is_none() {
            if !self.lease_holds() {
                // This node's heartbeat has lapsed: another node may be ending its intents and
                // assigning the same device now. No intent, no hub write; the device retries.
                metrics::counter!("dps_node_fenced_total").increment(1);
                tracing::warn!(registration_id = %rid, "this node's lease has lapsed (its heartbeat could not be written): no hub write until it holds again");
                return Err(dps_core::Error::Store(
                    dps_core::store::StoreError::Unavailable(
                        "this node's lease has lapsed; try again".into(),
                    ),
                ));
            }
            // Until the write is confirmed, dps does not know what the hub holds.
            rec.hub_write = None;
            let expect = Self::expect_of(&rec);
            match capacity_check(&inst.name, &hub, existing.as_deref(), rid.as_str()) {
                None => {
                    self.repo
                        .put_registration(&inst.name, &mut rec, self.new_etag(), expect)
                        .await?
                }
                Some(check) => {
                    // The intent is the reservation: written only while the hub has room,
                    // counted by every node from then on.
                    let doc = Repo::registration_doc(&mut rec, self.new_etag());
                    self.repo
                        .store
                        .write_all(vec![
                            check,
                            Write::Put {
                                c: dps_core::store::Collection::Registration,
                                scope: inst.name.clone(),
                                doc,
                                expect,
                            },
                        ])
                        .await?;
                }
            }
            let t0 = Instant::now();
            let r = adapter.upsert_device(&identity, twin.as_ref()).await;
            self.hubs.record(&hub.host, t0, &r);
            if let Err(e) = r {
                return Box::pin(self.hub_failed_after_write(
                    &inst,
                    &mut rec,
                    existing.as_deref(),
                    &hub,
                    e,
                    labels,
                    Some(&device_id),
                ))
                .await;
            }
            metrics::counter!("dps_hub_writes_total", "kind" => kind).increment(1);
            rec.hub_write = fingerprint.map(|sha256| HubWrite {
                hub: hub.host.clone(),
                sha256,
            });
        } else {
            // The built-in registry's identity is written in the same transaction as the record
            // (no extra round trip); it is always written and keeps no fingerprint.
            rec.hub_write = None;
            metrics::counter!("dps_hub_writes_total", "kind" => kind).increment(1);
        }

        rec.state.status = Some(RegistrationStatus::Assigned);
        rec.state.assigned_hub = Some(hub.host.clone());
        rec.state.device_id = Some(device_id.clone());
        rec.state.substatus = Some(outcome.substatus);
        rec.state.error_code = None;
        rec.state.error_message = None;
        rec.failure = None;
        rec.state.payload = webhook_payload;
        rec.state.last_updated_date_time_utc = Some(ts(self.clock.as_ref()));
        rec.reason = None;
        rec.retry_after = None;
        rec.pending = None;
        let in_store = staged.is_some();
        // The identity the device leaves behind (on its previous hub, or its previous device id
        // on this hub) is queued for removal in the same transaction as the record that makes it
        // stale, so that neither a crash nor a hub that is down loses it; the queue's worker
        // retries until it is gone (see `cleanup.rs`). The first attempt is made right away.
        let stale = match &outcome.remove_from {
            Some(old) => inst.hub(old).map(|h| {
                (
                    h.clone(),
                    previous_device.clone().unwrap_or(device_id.clone()),
                )
            }),
            None => previous_device
                .clone()
                .filter(|p| *p != device_id)
                .map(|p| (hub.clone(), p)),
        }
        .filter(|(h, d)| !(h.host.eq_ignore_ascii_case(&hub.host) && *d == device_id));
        let cleanup = stale.map(|(h, d)| {
            let task = self.new_cleanup(&inst.name, &h.host, &d, rid.as_str(), true);
            (h, task)
        });
        let mut writes: Vec<Write> = staged.into_iter().collect();
        if in_store {
            // A hub kept in the store has no intent: the reservation is checked at the commit.
            writes.extend(capacity_check(
                &inst.name,
                &hub,
                existing.as_deref(),
                rid.as_str(),
            ));
        }
        if !unchanged {
            // The identity is written (again): a queued removal of it must not run.
            writes.push(Self::cancel_cleanup(&inst.name, &hub.host, &device_id));
        }
        if let Some((_, task)) = &cleanup {
            writes.push(Write::EnqueueCleanup(task.clone()));
        }
        let issued_kind = signed.as_ref().map(|s| {
            let renewed = existing.as_deref().is_some_and(|r| r.issued.is_some());
            writes.push(self.issuer.record_write(&inst.name, &s.record));
            writes.push(Write::Audit(dps_core::store::AuditEntry {
                seq: 0,
                timestamp: ts(self.clock.as_ref()),
                instance: inst.name.clone(),
                actor: "device".to_string(),
                action: if renewed {
                    "certificate.renewed"
                } else {
                    "certificate.issued"
                }
                .to_string(),
                target_kind: "issuedCertificate".to_string(),
                target_id: s.record.serial_number.clone(),
                before: None,
                after: serde_json::to_string(&s.record).ok(),
            }));
            rec.issued = Some(s.reference.clone());
            (
                s.record.policy.clone(),
                if renewed { "renewed" } else { "issued" },
            )
        });
        self.commit(&inst.name, &mut rec, "registration.assigned", writes)
            .await?;
        if let Some((policy, kind)) = issued_kind {
            metrics::counter!("CertificatesIssued", "instance" => inst.name.clone(), "policy" => policy, "kind" => kind).increment(1);
        }
        if in_store {
            self.hubs.record(&hub.host, t0, &Ok(()));
        }

        // Clean up the old identity: another hub, or another device id on the same hub.
        if let Some((old_hub, task)) = cleanup {
            match self.hubs.adapter(&old_hub) {
                Ok(a) => Box::pin(self.cleanup_first_attempt(task, a)).await,
                Err(e) => {
                    tracing::warn!(registration_id = %rid, hub = %old_hub.host, error = %e, "no adapter for the previous hub; the removal stays queued")
                }
            }
        }

        metrics::counter!("RegistrationAttempts", "instance" => labels.0.clone(), "hub" => hub.host.to_ascii_lowercase(), "protocol" => labels.1, "attestation" => labels.2, "result" => "assigned").increment(1);
        metrics::counter!("DeviceAssignments", "instance" => labels.0, "hub" => hub.host.to_ascii_lowercase(), "protocol" => labels.1, "attestation" => labels.2).increment(1);
        metrics::histogram!("dps_assignment_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(*rec)
    }

    /// Write the registration record and its audit entry (and `extra`: for a hub kept in our own
    /// store the device identity, and the clean-up queue's changes) in one store transaction.
    /// The audit entry holds the record as it is now, with its hub history and the precise
    /// reason; the entry before it in the log is the previous outcome.
    async fn commit(
        &self,
        instance: &str,
        rec: &mut RegistrationRecord,
        action: &str,
        extra: Vec<Write>,
    ) -> Result<()> {
        // Capacity checks, then the record: their conditions are checked before anything is
        // written.
        let mut writes = Vec::with_capacity(extra.len() + 2);
        let (checks, extra): (Vec<Write>, Vec<Write>) = extra
            .into_iter()
            .partition(|w| matches!(w, Write::HubCapacity { .. }));
        writes.extend(checks);
        let expect = Self::expect_of(rec);
        let doc = Repo::registration_doc(rec, self.new_etag());
        // The audit entry's `after` is the record without its list of earlier operation ids.
        // A record holds no secrets, but a custom allocation payload is anything: that one goes
        // through redaction. Otherwise the record's own JSON is reused when it is the same.
        let after = if rec.state.payload.is_none() && rec.recent_operations.is_empty() {
            doc.body.clone()
        } else {
            let mut view = rec.clone();
            view.recent_operations.clear();
            if view.state.payload.is_none() {
                serde_json::to_string(&view).expect("model types always serialize")
            } else {
                serde_json::to_string(&crate::audit::redact(
                    serde_json::to_value(&view).expect("model types always serialize"),
                ))
                .expect("json")
            }
        };
        writes.push(Write::Put {
            c: dps_core::store::Collection::Registration,
            scope: instance.to_string(),
            doc,
            expect,
        });
        writes.extend(extra);
        writes.push(Write::Audit(dps_core::store::AuditEntry {
            seq: 0,
            timestamp: ts(self.clock.as_ref()),
            instance: instance.to_string(),
            actor: "device".to_string(),
            action: action.to_string(),
            target_kind: "registration".to_string(),
            target_id: rec.state.registration_id.clone(),
            before: None,
            after: Some(after),
        }));
        self.repo.store.write_all(writes).await?;
        Ok(())
    }

    /// End the registration as `failed` (or retryable): the domain failure is stored, and the
    /// wire view (`errorCode`, `errorMessage`) is rendered from it by the one mapping.
    async fn fail(
        &self,
        inst: &Instance,
        rec: &mut RegistrationRecord,
        f: Failure,
        labels: (String, &'static str, &'static str),
    ) -> Result<RegistrationRecord> {
        Box::pin(self.fail_with(inst, rec, f, labels, Vec::new())).await
    }

    /// [`fail`](Self::fail), committing `extra` writes with the record.
    async fn fail_with(
        &self,
        inst: &Instance,
        rec: &mut RegistrationRecord,
        f: Failure,
        labels: (String, &'static str, &'static str),
        extra: Vec<Write>,
    ) -> Result<RegistrationRecord> {
        let Failure { failure, reason } = f;
        tracing::info!(registration_id = %rec.state.registration_id, failure = %failure, reason = %reason, "registration failed");
        let wire = dps_core::wire::assignment_failure(&failure);
        rec.state.status = Some(RegistrationStatus::Failed);
        rec.state.error_code = Some(wire.error_code);
        rec.state.error_message = Some(wire.message);
        rec.state.substatus = None;
        rec.state.last_updated_date_time_utc = Some(ts(self.clock.as_ref()));
        rec.reason = Some(reason);
        rec.pending = None;
        // What the hub holds is no longer known: the next assignment writes.
        rec.hub_write = None;
        let result = if failure.is_retryable() {
            "retry"
        } else {
            "failed"
        };
        rec.failure = Some(failure);
        self.commit(&inst.name, rec, "registration.failed", extra)
            .await?;
        metrics::counter!("RegistrationAttempts", "instance" => labels.0, "hub" => "none", "protocol" => labels.1, "attestation" => labels.2, "result" => result).increment(1);
        Ok(rec.clone())
    }

    async fn hub_failed(
        &self,
        inst: &Instance,
        rec: &mut RegistrationRecord,
        before: Option<&RegistrationRecord>,
        hub: &LinkedHub,
        e: HubError,
        labels: (String, &'static str, &'static str),
    ) -> Result<RegistrationRecord> {
        Box::pin(self.hub_failed_after_write(inst, rec, before, hub, e, labels, None)).await
    }

    /// A failed hub call; `written` is the device id when the call was the identity write
    /// itself.
    #[allow(clippy::too_many_arguments)]
    async fn hub_failed_after_write(
        &self,
        inst: &Instance,
        rec: &mut RegistrationRecord,
        before: Option<&RegistrationRecord>,
        hub: &LinkedHub,
        e: HubError,
        labels: (String, &'static str, &'static str),
        written: Option<&str>,
    ) -> Result<RegistrationRecord> {
        // The identity was not written: forget the intent so that history stays truthful.
        let mut extra = Vec::new();
        if rec
            .hub_history
            .last()
            .is_some_and(|h| h.eq_ignore_ascii_case(&hub.host))
            && before.is_none_or(|b| b.hub_history.last() != rec.hub_history.last())
        {
            rec.hub_history.pop();
            // A write that timed out or lost its connection may have reached the hub all the
            // same: the identity the device may have there is queued for removal (dropped by
            // the commit that assigns the device to this hub after all), so that it is not
            // left behind when the device ends up on another hub.
            if let (Some(device_id), HubError::Unreachable { .. }) = (written, &e) {
                let task = self.new_cleanup(
                    &inst.name,
                    &hub.host,
                    device_id,
                    &rec.state.registration_id,
                    false,
                );
                extra.push(Write::EnqueueCleanup(task));
            }
        }
        let failure = match &e {
            HubError::Unauthorized { .. } => AssignmentFailure::HubUnauthorized,
            HubError::Rejected { .. } => AssignmentFailure::HubRejected,
            HubError::Throttled { .. } => AssignmentFailure::HubThrottled,
            HubError::Unreachable { .. } => AssignmentFailure::HubUnreachable,
        };
        rec.retry_after = match &e {
            HubError::Throttled { retry_after, .. } => Some(*retry_after),
            HubError::Unreachable { .. } => Some(5),
            _ => None,
        };
        self.fail_with(
            inst,
            rec,
            Failure {
                failure,
                reason: e.to_string(),
            },
            labels,
            extra,
        )
        .await
    }
}

/// Attempts of one registration that lose the record's compare-and-set to another writer before
/// the error is returned (each loss needs another node's write of the same device).
const MAX_CONFLICTS: u32 = 8;

impl Engine {
    /// The condition of the next write of `rec`: the version it was read as or last written
    /// as (`state.etag`), or absent for a new record.
    pub(super) fn expect_of(rec: &RegistrationRecord) -> dps_core::store::Expect {
        rec.state.etag.clone().map_or(
            dps_core::store::Expect::Absent,
            dps_core::store::Expect::Etag,
        )
    }
}

/// The reservation of a place on `hub` when it has a `max_devices` and the device is not on it
/// already: the write that puts the device there (its intent, or for a hub kept in the store the
/// final record) fails as a conflict when the hub is full by then, counted in the store across
/// nodes (`dps_core::store::Write::HubCapacity`); the assignment then starts again and allocates
/// from the new count.
fn capacity_check(
    instance: &str,
    hub: &LinkedHub,
    existing: Option<&RegistrationRecord>,
    registration_id: &str,
) -> Option<Write> {
    let max = hub.max_devices?;
    let there = existing.is_some_and(|r| {
        r.state.status == Some(RegistrationStatus::Assigned)
            && r.state
                .assigned_hub
                .as_deref()
                .is_some_and(|h| h.eq_ignore_ascii_case(&hub.host))
    });
    (!there).then(|| Write::HubCapacity {
        scope: instance.to_string(),
        hub: hub.host.clone(),
        max,
        except: registration_id.to_string(),
    })
}

/// The linked hub's `skip_unchanged` option (default `true`): `false` writes the identity on
/// every registration, as before fingerprints.
fn skip_unchanged(hub: &LinkedHub) -> bool {
    hub.options
        .get("skip_unchanged")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(true)
}

//! The registration engine: the device use cases (register, operation status, status lookup,
//! MQTT CONNECT check) behind [`DeviceService`], shared by every transport.
//!
//! Flow of a registration:
//! 1. Resolve the instance from the ID scope, attest the device (symmetric key or X.509).
//! 2. Under a per-device lock: plan reprovisioning from the previous record, allocate a hub
//!    (hashed, static, geoLatency, custom webhook; unhealthy or full hubs skipped while another is
//!    eligible), write the record as `assigning` with the pending assignment (intent), write the
//!    identity and twin to the hub, then write the final record.
//! 3. The register call waits a short while for that work. Azure's behaviour (default) answers
//!    `202 assigning` and the first poll returns the result; `register_response = "immediate"`
//!    answers `200` directly when the work is done. Work that takes longer continues in the
//!    background and polls answer `202` with a longer `retry-after` meanwhile.

use crate::audit::Audit;
use crate::catalog::Catalog;
use crate::hubs::HubSet;
use crate::instances::Instances;
use crate::repo::Repo;
use dps_core::allocation::{self, AllocationError};
use dps_core::clock::{azure_timestamp, Clock};
use dps_core::device::{
    ConnectRefusal, DeviceCredential, DeviceRequest, DeviceResponse, DeviceService, Transport,
};
use dps_core::error::AuthFailure;
use dps_core::hub::{HubAuth, HubError, HubIdentity};
use dps_core::ids::{DeviceId, OperationId, RegistrationId};
use dps_core::instance::{Instance, LinkedHub, RegisterResponse};
use dps_core::model::*;
use dps_core::reprovision;
use dps_core::sas::{derive_device_key, SasToken};
use dps_core::store::Write;
use dps_core::wire::{codes, WireError};
use dps_core::{Error, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// This node's location (Azure region name or `lat,lon`), for geoLatency.
    pub node_location: Option<String>,
    /// How long the register call waits for the assignment before answering 202.
    pub inline_wait: Duration,
    /// Custom allocation webhook timeout.
    pub webhook_timeout: Duration,
    /// Retry-after when the result is ready.
    pub ready_retry_after: u32,
    /// Retry-after when work is still running.
    pub busy_retry_after: u32,
    /// Registrations in flight on this node beyond which new ones are throttled (429).
    pub max_inflight: usize,
    /// Refused attempts audited per second (burst ten times as many); 0: no limit.
    pub refused_audit_per_second: u32,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            node_location: None,
            inline_wait: Duration::from_secs(2),
            webhook_timeout: Duration::from_secs(10),
            ready_retry_after: 1,
            busy_retry_after: 3,
            max_inflight: 10_000,
            refused_audit_per_second: 100,
        }
    }
}

/// Where the device's enrollment came from.
#[derive(Debug, Clone)]
enum Source {
    Individual(Box<IndividualEnrollment>),
    Group(Box<EnrollmentGroup>),
}

/// A device that passed attestation.
#[derive(Debug, Clone)]
struct Admitted {
    instance: Arc<Instance>,
    registration_id: RegistrationId,
    source: Source,
    /// An individual enrollment for this registration id that is disabled (overrides a group).
    disabled_override: bool,
    attestation: AttestationType,
    hub_auth: HubAuth,
    x509: Option<X509RegistrationResult>,
}

impl Admitted {
    fn settings(&self) -> &EnrollmentSettings {
        match &self.source {
            Source::Individual(e) => &e.settings,
            Source::Group(g) => &g.settings,
        }
    }
    fn group_id(&self) -> Option<String> {
        match &self.source {
            Source::Group(g) => Some(g.enrollment_group_id.clone()),
            Source::Individual(_) => None,
        }
    }
    fn enabled(&self) -> bool {
        !self.disabled_override && self.settings().enabled()
    }
    fn device_id(&self) -> String {
        match &self.source {
            Source::Individual(e) => e
                .device_id
                .clone()
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| self.registration_id.to_string()),
            Source::Group(_) => self.registration_id.to_string(),
        }
    }
}

/// A failure of the assignment that ends the registration as `failed`.
struct Failure {
    code: u32,
    message: String,
    reason: String,
}

/// The registration engine.
pub struct Engine {
    /// Typed store access.
    pub repo: Repo,
    /// Instances.
    pub instances: Arc<Instances>,
    /// Linked hubs.
    pub hubs: Arc<HubSet>,
    /// Audit log.
    pub audit: Audit,
    clock: Arc<dyn Clock>,
    settings: EngineSettings,
    http: reqwest::Client,
    locks: Vec<tokio::sync::Mutex<()>>,
    inflight: AtomicUsize,
    /// Operations still running on this node: (instance, registration key) -> operation id.
    running: Mutex<HashMap<(String, String), String>>,
    catalog: Arc<Catalog>,
    /// Token bucket for audit entries of refused attempts: (last refill, tokens).
    refused_bucket: Mutex<(Instant, f64)>,
    me: std::sync::Weak<Engine>,
}

fn ts(clock: &dyn Clock) -> String {
    azure_timestamp(clock.now())
}

impl Engine {
    /// Build.
    pub fn new(
        repo: Repo,
        instances: Arc<Instances>,
        hubs: Arc<HubSet>,
        catalog: Arc<Catalog>,
        clock: Arc<dyn Clock>,
        settings: EngineSettings,
        http: reqwest::Client,
    ) -> Arc<Self> {
        let burst = f64::from(settings.refused_audit_per_second) * 10.0;
        Arc::new_cyclic(|me| Engine {
            me: me.clone(),
            audit: Audit::new(repo.store.clone()),
            repo,
            instances,
            hubs,
            clock,
            settings,
            http,
            locks: (0..1024).map(|_| tokio::sync::Mutex::new(())).collect(),
            inflight: AtomicUsize::new(0),
            running: Mutex::new(HashMap::new()),
            catalog,
            refused_bucket: Mutex::new((Instant::now(), burst)),
        })
    }

    /// May this refused attempt be written to the audit log? A token bucket of
    /// `refused_audit_per_second`, ten seconds deep, per node.
    fn take_refused_audit_token(&self) -> bool {
        let rate = f64::from(self.settings.refused_audit_per_second);
        if rate == 0.0 {
            return true;
        }
        let mut b = self.refused_bucket.lock().expect("bucket lock");
        let now = Instant::now();
        b.1 = (b.1 + now.duration_since(b.0).as_secs_f64() * rate).min(rate * 10.0);
        b.0 = now;
        if b.1 >= 1.0 {
            b.1 -= 1.0;
            true
        } else {
            false
        }
    }

    /// The cached enrollment groups and X.509 material.
    pub(crate) fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn lock_for(&self, instance: &str, reg_key: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        instance.to_ascii_lowercase().hash(&mut h);
        reg_key.hash(&mut h);
        &self.locks[(h.finish() % self.locks.len() as u64) as usize]
    }

    // ---------------------------------------------------------------- attestation

    async fn attest(
        &self,
        inst: &Arc<Instance>,
        rid: &RegistrationId,
        cred: &DeviceCredential,
    ) -> Result<Admitted> {
        match cred {
            DeviceCredential::Sas(token) => self.attest_sas(inst, rid, token).await,
            DeviceCredential::Certificates(chain) if !chain.is_empty() => {
                self.attest_x509(inst, rid, chain).await
            }
            _ => Err(AuthFailure::MissingCredential.into()),
        }
    }

    async fn attest_sas(
        &self,
        inst: &Arc<Instance>,
        rid: &RegistrationId,
        token: &str,
    ) -> Result<Admitted> {
        let tok = SasToken::parse(token).map_err(AuthFailure::from)?;
        let now = self.clock.now().unix_timestamp();
        let individual = self.repo.enrollment(&inst.name, rid.as_str()).await?;
        let mut individual_failure = None;
        if let Some(e) = &individual {
            if e.settings.attestation.kind == AttestationType::SymmetricKey {
                let sk = e
                    .settings
                    .attestation
                    .symmetric_key
                    .clone()
                    .unwrap_or_default();
                let keys: Vec<&str> = [sk.primary_key.as_deref(), sk.secondary_key.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect();
                match tok.verify_device(&inst.id_scope, rid.as_str(), keys, now) {
                    Ok(_) => {
                        return Ok(Admitted {
                            instance: inst.clone(),
                            registration_id: rid.clone(),
                            disabled_override: false,
                            attestation: AttestationType::SymmetricKey,
                            hub_auth: HubAuth::SymmetricKey {
                                primary: sk.primary_key.clone().unwrap_or_default(),
                                secondary: sk
                                    .secondary_key
                                    .clone()
                                    .or(sk.primary_key.clone())
                                    .unwrap_or_default(),
                            },
                            x509: None,
                            source: Source::Individual(Box::new(e.clone())),
                        })
                    }
                    Err(err) => individual_failure = Some(AuthFailure::Sas(err)),
                }
            } else {
                individual_failure = Some(AuthFailure::AttestationMismatch(format!(
                    "enrollment '{}' uses {} attestation, the device presented a SAS token",
                    e.registration_id,
                    e.settings.attestation.kind.as_str()
                )));
            }
            // An enabled individual enrollment is authoritative; only a disabled one lets us look
            // at the groups (to refuse a group device that the individual enrollment disables).
            if e.settings.enabled() {
                return Err(individual_failure.expect("set above").into());
            }
        }
        // Check audience and expiry once, for precise reasons.
        let expected = format!("{}/registrations/{}", inst.id_scope, rid.as_str());
        if !tok.sr.eq_ignore_ascii_case(&expected) {
            return Err(AuthFailure::Sas(dps_core::sas::SasError::WrongAudience {
                audience: tok.sr.clone(),
                expected,
            })
            .into());
        }
        tok.check_expiry(now).map_err(AuthFailure::from)?;
        for g in self
            .catalog
            .groups(&inst.name, "symmetricKey")
            .await?
            .iter()
        {
            let sk = g
                .settings
                .attestation
                .symmetric_key
                .clone()
                .unwrap_or_default();
            let derived: Vec<String> = [sk.primary_key.as_deref(), sk.secondary_key.as_deref()]
                .into_iter()
                .flatten()
                .filter_map(|k| derive_device_key(k, rid.as_str()))
                .collect();
            if tok
                .verify_device(
                    &inst.id_scope,
                    rid.as_str(),
                    derived.iter().map(String::as_str),
                    now,
                )
                .is_ok()
            {
                let primary = derived.first().cloned().unwrap_or_default();
                let secondary = derived.get(1).cloned().unwrap_or_else(|| primary.clone());
                let (source, disabled_override) = match &individual {
                    Some(e) => (Source::Individual(Box::new(e.clone())), true),
                    None => (Source::Group(Box::new(g.clone())), false),
                };
                return Ok(Admitted {
                    instance: inst.clone(),
                    registration_id: rid.clone(),
                    source,
                    disabled_override,
                    attestation: AttestationType::SymmetricKey,
                    hub_auth: HubAuth::SymmetricKey { primary, secondary },
                    x509: None,
                });
            }
        }
        Err(individual_failure
            .unwrap_or_else(|| AuthFailure::UnknownRegistration(rid.to_string()))
            .into())
    }

    async fn attest_x509(
        &self,
        inst: &Arc<Instance>,
        rid: &RegistrationId,
        chain: &[Vec<u8>],
    ) -> Result<Admitted> {
        crate::x509_attest::attest(self, inst, rid, chain)
            .await
            .map(|a| Admitted {
                instance: inst.clone(),
                registration_id: rid.clone(),
                disabled_override: a.disabled_override,
                attestation: AttestationType::X509,
                hub_auth: HubAuth::X509Thumbprint {
                    primary: a.leaf_sha256.clone(),
                    secondary: None,
                },
                x509: Some(a.result),
                source: match a.source {
                    crate::x509_attest::X509Source::Individual(e) => Source::Individual(e),
                    crate::x509_attest::X509Source::Group(g) => Source::Group(g),
                },
            })
    }

    pub(crate) fn now(&self) -> time::OffsetDateTime {
        self.clock.now()
    }

    // ---------------------------------------------------------------- responses

    fn device_state(rec: &RegistrationRecord) -> DeviceRegistrationState {
        let mut s = rec.state.clone();
        if s.status != Some(RegistrationStatus::Assigned) {
            s.substatus = None;
        }
        s
    }

    fn final_response(rec: &RegistrationRecord, op: &str) -> Result<DeviceResponse> {
        let status = rec.state.status.unwrap_or(RegistrationStatus::Unassigned);
        if status == RegistrationStatus::Failed {
            if let Some(code) = rec.state.error_code {
                if code / 1000 >= 429 {
                    // Retryable: the device is told to retry, not that it failed.
                    let retry_after = rec.retry_after.unwrap_or(5);
                    return Err(Error::HubUnavailable(if code == codes::THROTTLED {
                        HubError::Throttled {
                            hub: rec.state.assigned_hub.clone().unwrap_or_default(),
                            retry_after,
                        }
                    } else {
                        HubError::Unreachable {
                            hub: rec.state.assigned_hub.clone().unwrap_or_default(),
                            message: rec.reason.clone().unwrap_or_default(),
                        }
                    }));
                }
            }
        }
        Ok(DeviceResponse {
            status: 200,
            body: RegistrationOperationStatus {
                operation_id: op.to_string(),
                status,
                registration_state: Some(Self::device_state(rec)),
            },
            retry_after: None,
        })
    }

    fn assigning_response(
        &self,
        op: &str,
        rid: &str,
        retry_after: u32,
        with_state: bool,
    ) -> DeviceResponse {
        DeviceResponse {
            status: 202,
            body: RegistrationOperationStatus {
                operation_id: op.to_string(),
                status: RegistrationStatus::Assigning,
                registration_state: with_state.then(|| DeviceRegistrationState {
                    registration_id: rid.to_string(),
                    status: Some(RegistrationStatus::Assigning),
                    ..Default::default()
                }),
            },
            retry_after: Some(retry_after),
        }
    }

    // ---------------------------------------------------------------- use cases

    async fn register_inner(&self, req: DeviceRequest) -> Result<(DeviceResponse, &'static str)> {
        let inst = self
            .instances
            .by_scope(&req.id_scope)
            .ok_or_else(|| AuthFailure::UnknownInstance(req.id_scope.clone()))?;
        let rid = RegistrationId::parse(&req.registration_id)?;
        if req.body.csr.is_some()
            && req
                .api_version
                .as_deref()
                .is_some_and(|v| v < "2025-07-01-preview")
        {
            return Err(Error::invalid(
                "'csr' requires api-version 2025-07-01-preview or later",
            ));
        }
        // Throttled before attestation: a device told to come back costs no store read.
        let inflight = self.inflight.fetch_add(1, Ordering::SeqCst);
        struct Guard<'a>(&'a AtomicUsize);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                let n = self.0.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
                metrics::gauge!("dps_registrations_in_flight").set(n as f64);
            }
        }
        let _guard = Guard(&self.inflight);
        metrics::gauge!("dps_registrations_in_flight").set((inflight + 1) as f64);
        if inflight >= self.settings.max_inflight {
            let retry_after = (1 + inflight / self.settings.max_inflight.max(1)).min(30) as u32
                * self.settings.busy_retry_after;
            return Err(Error::Throttled { retry_after });
        }
        let adm = match self.attest(&inst, &rid, &req.credential).await {
            Ok(a) => a,
            Err(e) => {
                if let Error::Unauthorized(f) = &e {
                    tracing::info!(registration_id = %rid, id_scope = %inst.id_scope, reason = %f, "registration refused");
                    if self.take_refused_audit_token() {
                        self.audit
                            .record(&inst.name, "device", "registration.refused", "registration", rid.as_str(), None::<&()>, Some(&serde_json::json!({"reason": f.to_string(), "transport": req.transport.as_str()})))
                            .await;
                    } else {
                        metrics::counter!("dps_audit_refusals_dropped_total").increment(1);
                    }
                    metrics::counter!("AttestationAttempts", "instance" => inst.name.clone(), "protocol" => req.transport.as_str(), "attestation" => cred_kind(&req.credential), "result" => "failure").increment(1);
                }
                return Err(e);
            }
        };
        metrics::counter!("AttestationAttempts", "instance" => inst.name.clone(), "protocol" => req.transport.as_str(), "attestation" => adm.attestation.as_str(), "result" => "success").increment(1);
        let op = OperationId::generate().to_string();
        let reg_key = rid.key();
        let key = (inst.name.to_ascii_lowercase(), reg_key.clone());
        self.running
            .lock()
            .expect("running lock")
            .insert(key.clone(), op.clone());
        let work = {
            let op = op.clone();
            let payload = req.body.payload.clone();
            let transport = req.transport;
            let me = self.self_arc();
            async move {
                let r = me.assign(adm, &op, payload, transport).await;
                me.running.lock().expect("running lock").remove(&key);
                r
            }
        };
        // Boxed: the assignment's future is large, and moving it into the task would copy it.
        let handle = tokio::spawn(Box::pin(work));
        let mode = inst.register_response;
        match tokio::time::timeout(self.settings.inline_wait, handle).await {
            Ok(joined) => {
                let rec = joined
                    .map_err(|e| Error::Internal(format!("assignment task failed: {e}")))??;
                let outcome = rec.state.status.map(|s| s.as_str()).unwrap_or("unassigned");
                let resp = Self::final_response(&rec, &op)?;
                if mode == RegisterResponse::Immediate
                    || resp.body.status == RegistrationStatus::Disabled
                {
                    Ok((resp, outcome))
                } else {
                    Ok((
                        self.assigning_response(
                            &op,
                            rid.as_str(),
                            self.settings.ready_retry_after,
                            false,
                        ),
                        outcome,
                    ))
                }
            }
            Err(_) => Ok((
                self.assigning_response(&op, rid.as_str(), self.settings.busy_retry_after, false),
                "assigning",
            )),
        }
    }

    fn self_arc(&self) -> Arc<Engine> {
        self.me.upgrade().expect("engine is alive while serving")
    }

    /// The assignment, under the per-device lock. Returns the final record (assigned, failed or
    /// disabled). `Err` only for store failures.
    async fn assign(
        &self,
        adm: Admitted,
        op: &str,
        payload: Option<serde_json::Value>,
        transport: Transport,
    ) -> Result<RegistrationRecord> {
        let inst = adm.instance.clone();
        let rid = adm.registration_id.clone();
        let _lock = self.lock_for(&inst.name, &rid.key()).lock().await;
        let started = Instant::now();
        let existing = self
            .repo
            .registration(&inst.name, rid.as_str())
            .await?
            .map(|(r, _)| r);
        let now = ts(self.clock.as_ref());
        let mut rec = existing.clone().unwrap_or_else(|| RegistrationRecord {
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
            reason: None,
            pending: None,
            transport: None,
        });
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
            rec.state.substatus = None;
            rec.reason = Some(if adm.disabled_override {
                "the individual enrollment for this registration id is disabled (it overrides the group)".to_string()
            } else {
                "the enrollment is disabled".to_string()
            });
            self.commit(&inst.name, &mut rec, "registration.disabled", None)
                .await?;
            metrics::counter!("RegistrationAttempts", "instance" => labels.0, "hub" => "none", "protocol" => labels.1, "attestation" => labels.2, "result" => "disabled").increment(1);
            return Ok(rec);
        }

        let settings = adm.settings().clone();
        let current_hub = existing
            .as_ref()
            .and_then(|r| r.hub_history.last().cloned());
        let previous_device = existing.as_ref().and_then(|r| r.state.device_id.clone());
        let plan = reprovision::plan(current_hub.as_deref(), settings.reprovision());
        let device_id = adm.device_id();
        if let Err(e) = DeviceId::parse(&device_id) {
            return self
                .fail(
                    &inst,
                    &mut rec,
                    codes::INVALID_ARGUMENT,
                    "Invalid device id",
                    e.to_string(),
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
                            codes::NO_HUB,
                            "No IoT hub could be assigned",
                            reason,
                            labels,
                        )
                        .await;
                }
            },
            _ => match self
                .allocate(
                    &adm,
                    &settings,
                    current_hub.as_deref(),
                    previous_device.as_deref(),
                    payload.clone(),
                )
                .await
            {
                Ok(x) => x,
                Err(f) => {
                    rec.retry_after = (f.code == codes::THROTTLED).then_some(1);
                    return self
                        .fail(&inst, &mut rec, f.code, &f.message, f.reason, labels)
                        .await;
                }
            },
        };
        let outcome = reprovision::outcome(&plan, &hub.host, &rec.hub_history, rec.state.substatus);

        rec.state.status = Some(RegistrationStatus::Assigning);
        rec.pending = Some(PendingAssignment {
            hub: hub.host.clone(),
            device_id: device_id.clone(),
            started: now.clone(),
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
        let adapter = match self.hubs.adapter(&hub) {
            Ok(a) => a,
            Err(e) => {
                return self
                    .hub_failed(&inst, &mut rec, existing.as_ref(), &hub, e, labels)
                    .await
            }
        };
        let mut twin: Option<TwinState> = None;
        if let Some(old) = &outcome.migrate_from {
            if let Some(old_hub) = inst.hub(old) {
                if let Ok(a) = self.hubs.adapter(old_hub) {
                    match a
                        .get_twin(previous_device.as_deref().unwrap_or(&device_id))
                        .await
                    {
                        Ok(t) => twin = t,
                        Err(e) => {
                            tracing::warn!(registration_id = %rid, hub = %old, error = %e, "could not read the twin to migrate; using the initial twin")
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
        let identity = HubIdentity {
            device_id: device_id.clone(),
            auth: adm.hub_auth.clone(),
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
                    .hub_failed(&inst, &mut rec, existing.as_ref(), &hub, e, labels)
                    .await;
            }
        };
        if staged.is_none() {
            self.repo.put_registration(&inst.name, &mut rec).await?;
            let t0 = Instant::now();
            let r = adapter.upsert_device(&identity, twin.as_ref()).await;
            self.hubs.record(&hub.host, t0, &r);
            if let Err(e) = r {
                return self
                    .hub_failed(&inst, &mut rec, existing.as_ref(), &hub, e, labels)
                    .await;
            }
        }

        rec.state.status = Some(RegistrationStatus::Assigned);
        rec.state.assigned_hub = Some(hub.host.clone());
        rec.state.device_id = Some(device_id.clone());
        rec.state.substatus = Some(outcome.substatus);
        rec.state.error_code = None;
        rec.state.error_message = None;
        rec.state.payload = webhook_payload;
        rec.state.last_updated_date_time_utc = Some(ts(self.clock.as_ref()));
        rec.reason = None;
        rec.retry_after = None;
        rec.pending = None;
        let in_store = staged.is_some();
        self.commit(&inst.name, &mut rec, "registration.assigned", staged)
            .await?;
        if in_store {
            self.hubs.record(&hub.host, t0, &Ok(()));
        }

        // Clean up the old identity: another hub, or another device id on the same hub.
        if let Some(old) = &outcome.remove_from {
            if let Some(old_hub) = inst.hub(old) {
                if let Ok(a) = self.hubs.adapter(old_hub) {
                    if let Err(e) = a
                        .delete_device(previous_device.as_deref().unwrap_or(&device_id))
                        .await
                    {
                        tracing::warn!(registration_id = %rid, hub = %old, error = %e, "could not remove the identity from the previous hub");
                    }
                }
            }
        } else if let Some(prev) = previous_device.as_deref().filter(|p| *p != device_id) {
            if let Err(e) = adapter.delete_device(prev).await {
                tracing::warn!(registration_id = %rid, error = %e, "could not remove the previous device id");
            }
        }

        metrics::counter!("RegistrationAttempts", "instance" => labels.0.clone(), "hub" => hub.host.to_ascii_lowercase(), "protocol" => labels.1, "attestation" => labels.2, "result" => "assigned").increment(1);
        metrics::counter!("DeviceAssignments", "instance" => labels.0, "hub" => hub.host.to_ascii_lowercase(), "protocol" => labels.1, "attestation" => labels.2).increment(1);
        metrics::histogram!("dps_assignment_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(rec)
    }

    /// Write the registration record and its audit entry (and, for a hub kept in our own store,
    /// the device identity) in one store transaction. The audit entry holds the record as it is
    /// now, with its hub history and the precise reason; the entry before it in the log is the
    /// previous outcome.
    async fn commit(
        &self,
        instance: &str,
        rec: &mut RegistrationRecord,
        action: &str,
        identity: Option<Write>,
    ) -> Result<()> {
        let mut writes = Vec::with_capacity(3);
        writes.extend(identity);
        let doc = Repo::registration_doc(rec);
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
            expect: dps_core::store::Expect::Any,
        });
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

    #[allow(clippy::too_many_arguments)]
    async fn fail(
        &self,
        inst: &Instance,
        rec: &mut RegistrationRecord,
        code: u32,
        message: &str,
        reason: String,
        labels: (String, &'static str, &'static str),
    ) -> Result<RegistrationRecord> {
        tracing::info!(registration_id = %rec.state.registration_id, code, reason = %reason, "registration failed");
        rec.state.status = Some(RegistrationStatus::Failed);
        rec.state.error_code = Some(code);
        rec.state.error_message = Some(message.to_string());
        rec.state.substatus = None;
        rec.state.last_updated_date_time_utc = Some(ts(self.clock.as_ref()));
        rec.reason = Some(reason);
        rec.pending = None;
        self.commit(&inst.name, rec, "registration.failed", None)
            .await?;
        let result = if code / 1000 >= 429 {
            "retry"
        } else {
            "failed"
        };
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
        // The identity was not written: forget the intent so that history stays truthful.
        if rec
            .hub_history
            .last()
            .is_some_and(|h| h.eq_ignore_ascii_case(&hub.host))
            && before.is_none_or(|b| b.hub_history.last() != rec.hub_history.last())
        {
            rec.hub_history.pop();
        }
        let (code, message) = match &e {
            HubError::Unauthorized { .. } => (
                codes::HUB_UNAUTHORIZED,
                "DPS is not authorized on the IoT hub",
            ),
            HubError::Rejected { .. } => (
                codes::HUB_UNAUTHORIZED,
                "The IoT hub refused the device identity",
            ),
            HubError::Throttled { .. } => {
                (codes::THROTTLED, "The IoT hub is throttling; retry later")
            }
            HubError::Unreachable { .. } => (
                codes::HUB_UNREACHABLE,
                "The IoT hub is unavailable; retry later",
            ),
        };
        rec.retry_after = match &e {
            HubError::Throttled { retry_after, .. } => Some(*retry_after),
            HubError::Unreachable { .. } => Some(5),
            _ => None,
        };
        self.fail(inst, rec, code, message, e.to_string(), labels)
            .await
    }

    /// Choose the hub (and, for custom allocation, the webhook's twin and payload).
    async fn allocate(
        &self,
        adm: &Admitted,
        settings: &EnrollmentSettings,
        current_hub: Option<&str>,
        current_device: Option<&str>,
        payload: Option<serde_json::Value>,
    ) -> std::result::Result<(LinkedHub, Option<TwinState>, Option<serde_json::Value>), Failure>
    {
        let inst = &adm.instance;
        let policy = allocation::effective_policy(settings, inst.allocation_policy);
        let no_hub = |e: AllocationError| Failure {
            code: codes::NO_HUB,
            message: "No IoT hub could be assigned".into(),
            reason: e.to_string(),
        };
        let mut candidates =
            allocation::candidates(settings, policy, &inst.linked_hub).map_err(no_hub)?;
        // Capacity beyond Azure: a hub with max_devices that is full is not eligible.
        let mut full = Vec::new();
        for h in &candidates {
            if let Some(max) = h.max_devices {
                let filter = dps_core::store::Filter {
                    hub: Some(h.host.to_ascii_lowercase()),
                    status: Some("assigned".into()),
                    ..Default::default()
                };
                let n = self
                    .repo
                    .store
                    .count(
                        dps_core::store::Collection::Registration,
                        &inst.name,
                        &filter,
                    )
                    .await
                    .unwrap_or(0);
                let already_there = current_hub.is_some_and(|c| c.eq_ignore_ascii_case(&h.host));
                if n >= max && !already_there {
                    full.push(h.host.clone());
                }
            }
        }
        candidates.retain(|h| !full.contains(&h.host));
        if candidates.is_empty() {
            return Err(Failure {
                code: codes::NO_HUB,
                message: "No IoT hub could be assigned".into(),
                reason: format!(
                    "every eligible hub is at its max_devices: {}",
                    full.join(", ")
                ),
            });
        }
        // Health: skip unhealthy hubs while a healthy one is eligible.
        if policy != AllocationPolicy::Static {
            let healthy: Vec<&LinkedHub> = candidates
                .iter()
                .copied()
                .filter(|h| !self.hubs.unhealthy(&h.host))
                .collect();
            if !healthy.is_empty() {
                candidates = healthy;
            }
        }
        // Rate limits beyond Azure: hubs whose max_registrations_per_second is used up are
        // skipped while another is eligible; when all are, the device is told to retry.
        if candidates
            .iter()
            .any(|h| h.max_registrations_per_second.is_some())
        {
            let chosen_first = match policy {
                AllocationPolicy::Custom => None,
                _ => allocation::choose(
                    policy,
                    adm.registration_id.as_str(),
                    self.settings.node_location.as_deref(),
                    &candidates,
                )
                .ok(),
            };
            if let Some(first) = chosen_first {
                if !self.hubs.take_rate_token(first) {
                    let others: Vec<&LinkedHub> = candidates
                        .iter()
                        .copied()
                        .filter(|h| h.host != first.host)
                        .collect();
                    let next = allocation::choose(
                        policy,
                        adm.registration_id.as_str(),
                        self.settings.node_location.as_deref(),
                        &others,
                    )
                    .ok()
                    .filter(|h| self.hubs.take_rate_token(h));
                    return match next {
                        Some(h) => Ok((h.clone(), None, None)),
                        None => Err(Failure {
                            code: codes::THROTTLED,
                            message: "The linked hubs' provisioning rate is exhausted; retry later"
                                .into(),
                            reason: format!(
                                "max_registrations_per_second reached on {}",
                                first.host
                            ),
                        }),
                    };
                }
                return Ok((first.clone(), None, None));
            }
        }
        if policy == AllocationPolicy::Custom {
            let Some(def) = settings.custom_allocation_definition.clone() else {
                return Err(Failure {
                    code: codes::CUSTOM_ALLOCATION_FAILED,
                    message: "Custom allocation failed".into(),
                    reason: "custom allocation policy without customAllocationDefinition".into(),
                });
            };
            return self
                .custom_allocate(adm, &def, &candidates, current_hub, current_device, payload)
                .await;
        }
        let hub = allocation::choose(
            policy,
            adm.registration_id.as_str(),
            self.settings.node_location.as_deref(),
            &candidates,
        )
        .map_err(no_hub)?;
        Ok((hub.clone(), None, None))
    }

    async fn custom_allocate(
        &self,
        adm: &Admitted,
        def: &CustomAllocationDefinition,
        candidates: &[&LinkedHub],
        current_hub: Option<&str>,
        current_device: Option<&str>,
        payload: Option<serde_json::Value>,
    ) -> std::result::Result<(LinkedHub, Option<TwinState>, Option<serde_json::Value>), Failure>
    {
        let fail = |reason: String, message: String| Failure {
            code: codes::CUSTOM_ALLOCATION_FAILED,
            message,
            reason,
        };
        let mut ctx = serde_json::json!({ "registrationId": adm.registration_id.as_str() });
        if let Some(h) = current_hub {
            ctx["currentIotHubHostName"] = h.into();
        }
        if let Some(d) = current_device {
            ctx["currentDeviceId"] = d.into();
        }
        match adm.attestation {
            AttestationType::X509 => {
                let x = adm.x509.clone().unwrap_or_default();
                ctx["x509"] = serde_json::json!({"clientCertificate": x.certificate_info, "signingCertificate": x.signing_certificate_info});
            }
            _ => ctx["symmetricKey"] = serde_json::json!({}),
        }
        if let Some(p) = payload {
            ctx["payload"] = p;
        }
        let mut body = serde_json::json!({
            "deviceRuntimeContext": ctx,
            "linkedHubs": candidates.iter().map(|h| h.host.clone()).collect::<Vec<_>>(),
        });
        match &adm.source {
            Source::Individual(e) => {
                let mut e = (**e).clone();
                e.settings.attestation = e.settings.attestation.redacted();
                body["individualEnrollment"] = serde_json::to_value(e).expect("json");
            }
            Source::Group(g) => {
                let mut g = (**g).clone();
                g.settings.attestation = g.settings.attestation.redacted();
                body["enrollmentGroup"] = serde_json::to_value(g).expect("json");
            }
        }
        let resp = self
            .http
            .post(&def.webhook_url)
            .timeout(self.settings.webhook_timeout)
            .json(&body)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                let what = if e.is_timeout() {
                    "timed out".to_string()
                } else {
                    format!("failed: {e}")
                };
                return Err(fail(
                    format!("custom allocation webhook {what}"),
                    "Custom allocation failed: the webhook could not be reached".into(),
                ));
            }
        };
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(fail(
                format!("custom allocation webhook answered HTTP {status}"),
                format!("Custom allocation failed with status code: {status}"),
            ));
        }
        let v: serde_json::Value = match resp.json().await {
            Ok(v) => v,
            Err(e) => {
                return Err(fail(
                    format!("custom allocation webhook answered invalid JSON: {e}"),
                    "Custom allocation failed: invalid response".into(),
                ))
            }
        };
        let obj = v.as_object().cloned().unwrap_or_default();
        let get = |name: &str| {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let Some(hub_name) = get("iotHubHostName").and_then(|h| h.as_str().map(str::to_string))
        else {
            return Err(fail(
                "custom allocation webhook response has no iotHubHostName".into(),
                "Custom allocation failed: no hub in the response".into(),
            ));
        };
        let Some(hub) = candidates
            .iter()
            .find(|h| h.host.eq_ignore_ascii_case(&hub_name))
        else {
            return Err(fail(format!("custom allocation webhook chose '{hub_name}', which is not among the linked hubs offered"), "Custom allocation failed: the chosen hub is not linked".into()));
        };
        let twin = get("initialTwin")
            .filter(|t| !t.is_null())
            .and_then(|t| serde_json::from_value::<TwinState>(t).ok());
        let payload = get("payload").filter(|p| !p.is_null());
        Ok(((*hub).clone(), twin, payload))
    }

    async fn operation_status_inner(&self, req: DeviceRequest, op: &str) -> Result<DeviceResponse> {
        let inst = self
            .instances
            .by_scope(&req.id_scope)
            .ok_or_else(|| AuthFailure::UnknownInstance(req.id_scope.clone()))?;
        let rid = RegistrationId::parse(&req.registration_id)?;
        self.attest(&inst, &rid, &req.credential).await?;
        if self
            .running
            .lock()
            .expect("running lock")
            .get(&(inst.name.to_ascii_lowercase(), rid.key()))
            .is_some_and(|o| o == op)
        {
            return Ok(self.assigning_response(
                op,
                rid.as_str(),
                self.settings.busy_retry_after,
                true,
            ));
        }
        let rec = self
            .repo
            .registration(&inst.name, rid.as_str())
            .await?
            .map(|(r, _)| r);
        match rec {
            Some(rec)
                if rec.operation_id.as_deref() == Some(op)
                    || rec.recent_operations.iter().any(|o| o == op) =>
            {
                if rec.state.status == Some(RegistrationStatus::Assigning) {
                    return Ok(self.assigning_response(
                        op,
                        rid.as_str(),
                        self.settings.busy_retry_after,
                        true,
                    ));
                }
                Self::final_response(&rec, op)
            }
            _ => Err(Error::OperationNotFound(op.to_string())),
        }
    }

    async fn registration_status_inner(
        &self,
        req: DeviceRequest,
    ) -> Result<DeviceRegistrationState> {
        let inst = self
            .instances
            .by_scope(&req.id_scope)
            .ok_or_else(|| AuthFailure::UnknownInstance(req.id_scope.clone()))?;
        let rid = RegistrationId::parse(&req.registration_id)?;
        if req.body.csr.is_some() {
            return Err(Error::invalid(
                "a 'csr' is not accepted by the registration status lookup",
            ));
        }
        self.attest(&inst, &rid, &req.credential).await?;
        let rec = self
            .repo
            .registration(&inst.name, rid.as_str())
            .await?
            .map(|(r, _)| r);
        match rec {
            Some(r) => Ok(Self::device_state(&r)),
            None => Err(Error::not_found("registration", rid.as_str())),
        }
    }

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
    /// `options.delete_identity_on_deregister` is true.
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
        if let Ok(a) = self.hubs.adapter(h) {
            let t0 = Instant::now();
            let r = a.delete_device(dev).await;
            self.hubs.record(hub, t0, &r);
            if let Err(e) = r {
                tracing::warn!(registration_id = %rec.state.registration_id, hub, error = %e, "could not delete the hub identity of a deleted registration");
            }
        }
    }

    /// Finish what a crash interrupted: records left `assigning` (with a pending assignment)
    /// become `failed` with a retryable code, keeping the pending hub in their history so that the
    /// next registration updates or moves that identity instead of orphaning it.
    ///
    /// Only records whose pending assignment started more than `older_than` ago are touched, so
    /// that nodes sharing a store do not fail each other's registrations in flight.
    pub async fn recover(&self, older_than: Duration) -> Result<usize> {
        let cutoff = azure_timestamp(self.clock.now() - older_than);
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
            for (mut rec, _) in stuck {
                let started = rec
                    .pending
                    .as_ref()
                    .map(|p| p.started.clone())
                    .or(rec.state.last_updated_date_time_utc.clone())
                    .unwrap_or_default();
                if started > cutoff {
                    continue;
                }
                let _lock = self
                    .lock_for(&inst.name, &rec.state.registration_id.to_ascii_lowercase())
                    .lock()
                    .await;
                let reason = match &rec.pending {
                    Some(p) => format!("interrupted while writing identity '{}' on hub '{}'; the device must register again", p.device_id, p.hub),
                    None => "interrupted; the device must register again".to_string(),
                };
                rec.state.status = Some(RegistrationStatus::Failed);
                rec.state.error_code = Some(codes::HUB_UNREACHABLE);
                rec.state.error_message = Some("Registration was interrupted; retry".into());
                rec.reason = Some(reason);
                rec.pending = None;
                self.repo.put_registration(&inst.name, &mut rec).await?;
                self.audit
                    .record(
                        &inst.name,
                        "system",
                        "registration.recovered",
                        "registration",
                        &rec.state.registration_id.clone(),
                        None::<&()>,
                        Some(&rec),
                    )
                    .await;
                n += 1;
            }
        }
        Ok(n)
    }
}

fn log_wire(e: &Error, what: &str, rid: &str) -> WireError {
    let w = WireError::from(e);
    match e {
        Error::Store(_) | Error::Internal(_) => {
            tracing::error!(registration_id = rid, error = %e, "{what} failed")
        }
        _ => tracing::debug!(registration_id = rid, error = %e, "{what} refused"),
    }
    w
}

#[async_trait::async_trait]
impl DeviceService for Engine {
    async fn register(&self, req: DeviceRequest) -> std::result::Result<DeviceResponse, WireError> {
        let span = tracing::info_span!("register", registration_id = %req.registration_id, id_scope = %req.id_scope, transport = req.transport.as_str(), operation_id = tracing::field::Empty);
        let started = Instant::now();
        let rid = req.registration_id.clone();
        let transport = req.transport.as_str();
        let r = tracing::Instrument::instrument(self.register_inner(req), span.clone()).await;
        let result = match &r {
            Ok((_, outcome)) => *outcome,
            Err(_) => "error",
        };
        metrics::histogram!("dps_register_duration_seconds", "protocol" => transport, "result" => result).record(started.elapsed().as_secs_f64());
        r.map(|(resp, _)| {
            span.record("operation_id", resp.body.operation_id.as_str());
            resp
        })
        .map_err(|e| log_wire(&e, "register", &rid))
    }

    async fn operation_status(
        &self,
        req: DeviceRequest,
        operation_id: &str,
    ) -> std::result::Result<DeviceResponse, WireError> {
        let rid = req.registration_id.clone();
        self.operation_status_inner(req, operation_id)
            .await
            .map_err(|e| log_wire(&e, "operation status", &rid))
    }

    async fn registration_status(
        &self,
        req: DeviceRequest,
    ) -> std::result::Result<DeviceRegistrationState, WireError> {
        let rid = req.registration_id.clone();
        self.registration_status_inner(req)
            .await
            .map_err(|e| log_wire(&e, "registration status", &rid))
    }

    async fn authorize_connect(
        &self,
        id_scope: &str,
        registration_id: &str,
        credential: &DeviceCredential,
    ) -> std::result::Result<(), ConnectRefusal> {
        let Some(inst) = self.instances.by_scope(id_scope) else {
            return Err(ConnectRefusal::NotAuthorized);
        };
        let Ok(rid) = RegistrationId::parse(registration_id) else {
            return Err(ConnectRefusal::BadUsernameOrPassword);
        };
        match credential {
            DeviceCredential::Certificates(c) if !c.is_empty() => Ok(()),
            DeviceCredential::Sas(_) => match self.attest(&inst, &rid, credential).await {
                Ok(_) => Ok(()),
                Err(Error::Unauthorized(f)) => {
                    tracing::info!(registration_id, reason = %f, "MQTT connect refused");
                    Err(ConnectRefusal::NotAuthorized)
                }
                Err(e) => {
                    tracing::error!(registration_id, error = %e, "MQTT connect check failed");
                    Err(ConnectRefusal::ServerUnavailable)
                }
            },
            _ => Err(ConnectRefusal::NotAuthorized),
        }
    }
}

fn cred_kind(c: &DeviceCredential) -> &'static str {
    match c {
        DeviceCredential::Sas(_) => "symmetricKey",
        DeviceCredential::Certificates(_) => "x509",
        DeviceCredential::None => "none",
    }
}

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

mod allocate;
mod assign;
mod attest;
mod cleanup;
pub mod custom_allocation;
mod lifecycle;
mod nodes;
pub mod refusals;
#[cfg(test)]
mod tests;
mod tpm;

pub use cleanup::{CleanupPass, CleanupSettings};
pub use custom_allocation::{CustomAllocator, WebhookAllocator};
pub use nodes::NodeSettings;

use crate::audit::Audit;
use crate::catalog::Catalog;
use crate::hubs::HubSet;
use crate::instances::Instances;
use crate::repo::Repo;
use dps_core::clock::{azure_timestamp, Clock};
use dps_core::device::{
    ConnectRefusal, DeviceCredential, DeviceRequest, DeviceResponse, DeviceService, Transport,
};
use dps_core::error::{AssignmentFailure, AuthFailure};
use dps_core::ids::RegistrationId;
use dps_core::instance::{Instance, RegisterResponse};
use dps_core::model::*;
use dps_core::random::Random;
use dps_core::{Error, Result};
use std::collections::HashSet;
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
    /// Retry-after when the result is ready.
    pub ready_retry_after: u32,
    /// Retry-after when work is still running.
    pub busy_retry_after: u32,
    /// Registrations in flight on this node beyond which new ones are throttled (429).
    pub max_inflight: usize,
    /// Refused attempts audited per second on the node (burst ten times as many); 0: no limit.
    pub refused_audit_per_second: u32,
    /// Longest accepted device SAS token lifetime (`se` − now, seconds); 0: no limit.
    pub max_token_lifetime_secs: u64,
    /// Refused attempts audited per second per source (burst ten times as many); 0: no limit.
    pub refused_per_source_per_second: u32,
    /// Sources the per-source limit tracks at once.
    pub refused_max_sources: usize,
    /// The clean-up of old identities (retries, backoff, claims).
    pub cleanup: CleanupSettings,
    /// This node's name and heartbeat lease.
    pub node: NodeSettings,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            node_location: None,
            inline_wait: Duration::from_secs(2),
            ready_retry_after: 1,
            busy_retry_after: 3,
            max_inflight: 10_000,
            refused_audit_per_second: 100,
            max_token_lifetime_secs: 0,
            refused_per_source_per_second: 1,
            refused_max_sources: 10_000,
            cleanup: CleanupSettings::default(),
            node: NodeSettings::default(),
        }
    }
}

/// A failure of the assignment that ends the registration as `failed` (or retryable).
struct Failure {
    /// What the device and the service API are told (through `dps_core::wire`).
    failure: AssignmentFailure,
    /// The precise reason, for the record and the log.
    reason: String,
}

/// What the engine works with: the store, the instances, the linked hubs, the cached groups and
/// X.509 material, the clock, the source of randomness and the custom allocation webhook.
pub struct EnginePorts {
    /// Typed store access.
    pub repo: Repo,
    /// Instances.
    pub instances: Arc<Instances>,
    /// Linked hubs.
    pub hubs: Arc<HubSet>,
    /// Cached groups and X.509 material.
    pub catalog: Arc<Catalog>,
    /// Now.
    pub clock: Arc<dyn Clock>,
    /// Operation ids.
    pub random: Arc<dyn Random>,
    /// Custom allocation.
    pub custom_allocator: Arc<dyn CustomAllocator>,
}

/// The registration engine.
pub struct Engine {
    /// Typed store access (the engine's own: nothing outside the engine reaches the store
    /// through it).
    repo: Repo,
    instances: Arc<Instances>,
    hubs: Arc<HubSet>,
    audit: Audit,
    clock: Arc<dyn Clock>,
    random: Arc<dyn Random>,
    custom_allocator: Arc<dyn CustomAllocator>,
    settings: EngineSettings,
    locks: Vec<tokio::sync::Mutex<()>>,
    inflight: AtomicUsize,
    /// Operations still running on this node: (instance, registration key, operation id).
    /// Several registrations of one device may be queued on its lock at once; each operation
    /// stays "running" (polls answer 202) until its own assignment ends.
    running: Mutex<HashSet<(String, String, String)>>,
    catalog: Arc<Catalog>,
    /// Which refused attempts are audited (per source, per node).
    refusals: refusals::RefusalSampler,
    /// Fault injection rules in force on this node.
    faults: Arc<crate::faults::Faults>,
    /// The credential policies' issuing CAs (certificate issuance).
    issuer: Arc<crate::issuer::Issuer>,
    /// When this run started (Unix ms), for the heartbeat row.
    started_ms: i64,
    /// Until when (Unix ms) this node's last written heartbeat holds; `i64::MAX` until the
    /// first heartbeat (an engine that never writes one is not fenced). See
    /// [`Engine::lease_holds`](nodes).
    lease_until_ms: std::sync::atomic::AtomicI64,
    me: std::sync::Weak<Engine>,
}

/// The transport name fault rules match: WebSocket variants count as their protocol.
fn fault_transport(t: Transport) -> &'static str {
    match t {
        Transport::Https => "https",
        Transport::Mqtt | Transport::MqttWs => "mqtt",
        Transport::Amqp | Transport::AmqpWs => "amqp",
    }
}

fn ts(clock: &dyn Clock) -> String {
    azure_timestamp(clock.now())
}

impl Engine {
    /// Build.
    pub fn new(ports: EnginePorts, settings: EngineSettings) -> Arc<Self> {
        let EnginePorts {
            repo,
            instances,
            hubs,
            catalog,
            clock,
            random,
            custom_allocator,
        } = ports;
        let refusals = refusals::RefusalSampler::new(
            refusals::RefusalLimits {
                per_source_per_second: settings.refused_per_source_per_second,
                max_sources: settings.refused_max_sources,
                node_per_second: settings.refused_audit_per_second,
            },
            Instant::now(),
        );
        let issuer = Arc::new(crate::issuer::Issuer::new(
            repo.clone(),
            clock.clone(),
            random.clone(),
        ));
        let started_ms = nodes::unix_ms(clock.now());
        Arc::new_cyclic(|me| Engine {
            started_ms,
            lease_until_ms: std::sync::atomic::AtomicI64::new(i64::MAX),
            me: me.clone(),
            issuer,
            audit: Audit::with_clock(repo.store.clone(), clock.clone()),
            repo,
            instances,
            hubs,
            clock,
            random,
            custom_allocator,
            settings,
            locks: (0..1024).map(|_| tokio::sync::Mutex::new(())).collect(),
            inflight: AtomicUsize::new(0),
            running: Mutex::new(HashSet::new()),
            catalog,
            refusals,
            faults: Arc::default(),
        })
    }

    /// The fault injection rules of this node (configured at start, managed by the admin API).
    pub fn faults(&self) -> &Arc<crate::faults::Faults> {
        &self.faults
    }

    /// Adds a fault injection rule to an instance (admin API), audited as `fault.add`.
    pub async fn add_fault(
        &self,
        inst: &Instance,
        actor: &str,
        rule: dps_core::fault::FaultRule,
    ) -> Result<dps_core::fault::FaultRule> {
        use crate::faults::FaultRuleError;
        let rule = self.faults.add(&inst.name, rule).map_err(|e| match e {
            FaultRuleError::Exists(id) => Error::Conflict {
                kind: "fault rule",
                id,
            },
            other => Error::invalid(other.to_string()),
        })?;
        tracing::warn!(instance = %inst.name, rule = %rule.id, action = rule.action.as_str(), "fault injection rule added");
        self.audit
            .record(
                &inst.name,
                actor,
                "fault.add",
                "fault",
                &rule.id,
                None::<&()>,
                Some(&rule),
            )
            .await;
        Ok(rule)
    }

    /// Removes a fault injection rule (admin API), audited as `fault.remove`.
    pub async fn remove_fault(&self, inst: &Instance, actor: &str, id: &str) -> Result<()> {
        if !self.faults.remove(&inst.name, id) {
            return Err(Error::not_found("fault rule", id));
        }
        self.audit
            .record(
                &inst.name,
                actor,
                "fault.remove",
                "fault",
                id,
                None::<&()>,
                None::<&()>,
            )
            .await;
        Ok(())
    }

    /// The fault injection rule that fires for this admitted attempt, if any (called only when
    /// the node has rules): counted in `dps_faults_injected_total{action}`, logged, and audited
    /// as `fault.injected` (sampled like refusals).
    async fn injected_fault(
        &self,
        adm: &attest::Admitted,
        transport: Transport,
        peer: Option<std::net::IpAddr>,
    ) -> Option<dps_core::fault::FaultRule> {
        let group = adm.group_id();
        let attempt = dps_core::fault::FaultAttempt {
            point: dps_core::fault::FaultPoint::Register,
            registration_id: adm.registration_id.as_str(),
            enrollment_group: group.as_deref(),
            transport: fault_transport(transport),
            attestation: adm.attestation.as_str(),
        };
        let mut b = [0u8; 4];
        self.random.fill(&mut b);
        let draw = f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0);
        let rule =
            self.faults
                .pick(&adm.instance.name, &attempt, &ts(self.clock.as_ref()), draw)?;
        tracing::info!(registration_id = %adm.registration_id, rule = %rule.id, action = rule.action.as_str(), "fault injected");
        if self.refusals.admit(peer, Instant::now()).is_ok() {
            self.audit
                .record(
                    &adm.instance.name,
                    "fault",
                    "fault.injected",
                    "registration",
                    adm.registration_id.as_str(),
                    None::<&()>,
                    Some(&serde_json::json!({
                        "injected": true, "rule": rule.id, "action": rule.action.as_str(),
                        "transport": transport.as_str(),
                        "stage": rule.stage.map(|s| s.as_str()),
                    })),
                )
                .await;
        }
        Some(rule)
    }

    /// A connection-level fault (`drop` at `connect`/`subscribe`, `slowTls`) that fires now:
    /// counted, logged, and audited as `fault.injected` (written in the background: the
    /// transports ask synchronously). `registration_id` is empty for `slowTls`.
    pub fn connection_fault_rule(
        &self,
        instance: &str,
        point: dps_core::fault::FaultPoint,
        transport: &str,
        registration_id: &str,
        peer: Option<std::net::IpAddr>,
    ) -> Option<dps_core::fault::FaultRule> {
        if !self.faults.any() {
            return None;
        }
        let attempt = dps_core::fault::FaultAttempt {
            point,
            registration_id,
            enrollment_group: None,
            transport,
            attestation: "",
        };
        let mut b = [0u8; 4];
        self.random.fill(&mut b);
        let draw = f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0);
        let rule = self
            .faults
            .pick(instance, &attempt, &ts(self.clock.as_ref()), draw)?;
        tracing::info!(registration_id, instance, transport, rule = %rule.id, action = rule.action.as_str(), stage = rule.stage.map(|s| s.as_str()), "fault injected");
        if self.refusals.admit(peer, Instant::now()).is_ok() {
            let me = self.self_arc();
            let instance = instance.to_string();
            let target = if registration_id.is_empty() {
                "-".to_string()
            } else {
                registration_id.to_string()
            };
            let after = serde_json::json!({
                "injected": true, "rule": rule.id, "action": rule.action.as_str(),
                "transport": transport, "stage": rule.stage.map(|s| s.as_str()),
            });
            tokio::spawn(async move {
                me.audit
                    .record(
                        &instance,
                        "fault",
                        "fault.injected",
                        if target == "-" {
                            "connection"
                        } else {
                            "registration"
                        },
                        &target,
                        None::<&()>,
                        Some(&after),
                    )
                    .await;
            });
        }
        Some(rule)
    }

    /// A device attempt was refused (attestation failed): log it, count it in
    /// `AttestationAttempts{result="failure"}`, and audit it as `registration.refused` unless
    /// its source or the node is over the refusal audit rate (then it is counted in
    /// `dps_audit_refusals_dropped_total`). Every transport's refusals come here, MQTT CONNECT
    /// included.
    async fn refused(
        &self,
        inst: &Instance,
        rid: &RegistrationId,
        failure: &AuthFailure,
        transport: Transport,
        attestation: &'static str,
        peer: Option<std::net::IpAddr>,
    ) {
        tracing::info!(registration_id = %rid, id_scope = %inst.id_scope, transport = transport.as_str(), reason = %failure, "registration refused");
        match self.refusals.admit(peer, Instant::now()) {
            Ok(()) => {
                self.audit
                    .record(
                        &inst.name,
                        "device",
                        "registration.refused",
                        "registration",
                        rid.as_str(),
                        None::<&()>,
                        Some(&serde_json::json!({"reason": failure.to_string(), "transport": transport.as_str()})),
                    )
                    .await;
            }
            Err(limit) => {
                metrics::counter!("dps_audit_refusals_dropped_total", "limit" => limit.as_str())
                    .increment(1);
            }
        }
        metrics::counter!("AttestationAttempts", "instance" => inst.name.clone(), "protocol" => transport.as_str(), "attestation" => attestation, "result" => "failure").increment(1);
    }

    /// Symmetric-key group keys tried by device attestation on this node so far.
    pub fn group_keys_tried(&self) -> u64 {
        self.catalog.group_keys_tried()
    }

    /// The credential policies' issuing CAs (for the issuance use case: CA export, CRLs).
    pub fn issuer(&self) -> Arc<crate::issuer::Issuer> {
        self.issuer.clone()
    }

    /// The credential policy and the checked CSR of a registration that sent a `csr`: the
    /// enrollment must name a policy of the instance, the CSR must pass its checks, and the
    /// device must not have been issued a certificate within the policy's
    /// `min_renewal_interval_secs` (429 with the wait otherwise).
    async fn certificate_request(
        &self,
        adm: &attest::Admitted,
        field: &str,
    ) -> Result<(
        dps_core::issuance::CredentialPolicy,
        dps_core::issuance::CheckedCsr,
    )> {
        let inst = &adm.instance;
        let rid = &adm.registration_id;
        let Some(name) = adm
            .settings()
            .credential_policy_name
            .as_deref()
            .filter(|n| !n.is_empty())
        else {
            return Err(Error::invalid(format!(
                "the enrollment of '{rid}' has no credentialPolicyName, so dps issues it no \
                 certificate: send the registration without 'csr', or give the enrollment a \
                 credential policy"
            )));
        };
        let policy = inst.credential_policy(name).cloned().ok_or_else(|| {
            Error::invalid(format!(
                "the enrollment's credential policy '{name}' does not exist in this instance"
            ))
        })?;
        let der =
            dps_core::issuance::decode_csr(field).map_err(|e| Error::invalid(e.to_string()))?;
        let checked = dps_core::issuance::check_csr(&der, rid.as_str(), &policy)
            .map_err(|e| Error::invalid(e.to_string()))?;
        if policy.min_renewal_interval_secs > 0 {
            if let Some(prev) = self.record(&inst.name, rid).await?.and_then(|r| r.issued) {
                let next = prev
                    .issued_unix
                    .saturating_add(policy.min_renewal_interval_secs.min(i64::MAX as u64) as i64);
                let now = self.clock.now().unix_timestamp();
                if now < next {
                    metrics::counter!("dps_certificate_requests_throttled_total").increment(1);
                    tracing::info!(registration_id = %rid, policy = %policy.name, retry_after = next - now, "certificate request too soon after the last one");
                    return Err(Error::Throttled {
                        retry_after: (next - now).clamp(1, u32::MAX as i64) as u32,
                    });
                }
            }
        }
        Ok((policy, checked))
    }

    /// A fresh ETag for a registration record, from the injected source of randomness.
    fn new_etag(&self) -> String {
        dps_core::random::etag(self.random.as_ref())
    }

    /// The instance (from the ID scope) and the registration id a device request is for.
    fn addressee(&self, req: &DeviceRequest) -> Result<(Arc<Instance>, RegistrationId)> {
        let inst = self
            .instances
            .by_scope(&req.id_scope)
            .ok_or_else(|| AuthFailure::UnknownInstance(req.id_scope.clone()))?;
        Ok((inst, RegistrationId::parse(&req.registration_id)?))
    }

    /// The device's registration record, if any.
    pub(super) async fn record(
        &self,
        instance: &str,
        rid: &RegistrationId,
    ) -> Result<Option<RegistrationRecord>> {
        Ok(self
            .repo
            .registration(instance, rid.as_str())
            .await?
            .map(|(r, _)| r))
    }

    fn lock_for(&self, instance: &str, reg_key: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        instance.to_ascii_lowercase().hash(&mut h);
        reg_key.hash(&mut h);
        &self.locks[(h.finish() % self.locks.len() as u64) as usize]
    }

    // ---------------------------------------------------------------- responses

    fn device_state(rec: &RegistrationRecord) -> DeviceRegistrationState {
        let mut s = rec.state.clone();
        if s.status != Some(RegistrationStatus::Assigned) {
            s.substatus = None;
        }
        s
    }

    /// The answer of operation `op`: the registration state, with the issued certificate chain
    /// when this operation issued one (never in status lookups or the service API).
    fn final_response(rec: &RegistrationRecord, op: &str) -> Result<DeviceResponse> {
        let status = rec.state.status.unwrap_or(RegistrationStatus::Unassigned);
        if status == RegistrationStatus::Failed {
            // Records written before failures were stored in domain terms have only the code.
            let failure = rec.failure.clone().or_else(|| {
                rec.state
                    .error_code
                    .map(dps_core::wire::legacy_assignment_failure)
            });
            if let Some(failure) = failure.filter(AssignmentFailure::is_retryable) {
                // Retryable: the device is told to retry, not that it failed.
                return Err(Error::AssignmentRetry {
                    failure,
                    retry_after: rec.retry_after.unwrap_or(5),
                });
            }
        }
        Ok(DeviceResponse {
            status: 200,
            body: RegistrationOperationStatus {
                operation_id: op.to_string(),
                status,
                registration_state: Some({
                    let mut state = Self::device_state(rec);
                    if status == RegistrationStatus::Assigned {
                        if let Some(issued) = rec.issued.as_ref().filter(|i| i.operation_id == op) {
                            state.issued_certificate_chain = Some(issued.chain.clone());
                        }
                    }
                    state
                }),
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
        let (inst, rid) = self.addressee(&req)?;
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
        let mqtt = matches!(req.transport, Transport::Mqtt | Transport::MqttWs);
        let attested = if mqtt && req.body.tpm.is_some() {
            // Azure supports TPM over HTTPS and AMQP only.
            Err(AuthFailure::TpmOverMqtt.into())
        } else {
            self.attest_device(&inst, &rid, &req.credential, req.body.tpm.as_ref())
                .await
                .and_then(|a| {
                    if mqtt && a.attestation == AttestationType::Tpm {
                        Err(AuthFailure::TpmOverMqtt.into())
                    } else {
                        Ok(a)
                    }
                })
        };
        let adm = match attested {
            Ok(a) => a,
            Err(e) => {
                if let Error::Unauthorized(f) = &e {
                    let kind = if req.body.tpm.is_some() {
                        "tpm"
                    } else {
                        cred_kind(&req.credential)
                    };
                    // Boxed, as the other rare paths here: this future stays small.
                    Box::pin(self.refused(&inst, &rid, f, req.transport, kind, req.peer)).await;
                }
                return Err(e);
            }
        };
        metrics::counter!("AttestationAttempts", "instance" => inst.name.clone(), "protocol" => req.transport.as_str(), "attestation" => adm.attestation.as_str(), "result" => "success").increment(1);
        // No rules (the hot path): not looked up, nothing is drawn from the random source (its
        // sequence stays the one the other ids come from). Boxed, as the other rare paths here.
        let fault = if self.faults.any() {
            Box::pin(self.injected_fault(&adm, req.transport, req.peer)).await
        } else {
            None
        };
        let mut delay = Duration::ZERO;
        if let Some(f) = &fault {
            use dps_core::fault::FaultAction;
            match f.action {
                FaultAction::Throttle => {
                    return Err(Error::Throttled {
                        retry_after: f.retry_after.unwrap_or(5),
                    })
                }
                FaultAction::Fail => {
                    return Err(Error::Injected {
                        rule: f.id.clone(),
                        error_code: f.error_code.unwrap_or(500_000),
                        message: f
                            .message
                            .clone()
                            .unwrap_or_else(|| format!("Injected fault (rule {})", f.id)),
                    })
                }
                FaultAction::Delay => delay = Duration::from_millis(f.delay_ms.unwrap_or(0)),
                FaultAction::Drop if f.stage == Some(dps_core::fault::FaultStage::Register) => {
                    return Err(Error::Dropped {
                        rule: f.id.clone(),
                        response: None,
                    })
                }
                FaultAction::HubDown | FaultAction::Drop | FaultAction::SlowTls => {}
            }
        }
        // Stage `response`: processed as always, then the answer is dropped.
        let drop_response = fault
            .as_ref()
            .filter(|f| {
                f.action == dps_core::fault::FaultAction::Drop
                    && f.stage == Some(dps_core::fault::FaultStage::Response)
            })
            .map(|f| f.id.clone());
        let out: Result<(DeviceResponse, &'static str)> = async {
            let csr = match req.body.csr.as_deref() {
                Some(field) => Some(Box::pin(self.certificate_request(&adm, field)).await?),
                None => None,
            };
            let op = dps_core::random::operation_id(self.random.as_ref()).to_string();
            if let Some(f) = &fault {
                match f.action {
                    dps_core::fault::FaultAction::HubDown => self.faults.arm_hub_down(&op, f),
                    dps_core::fault::FaultAction::Delay if f.delay_polls.unwrap_or(0) > 0 => {
                        self.faults.hold_polls(&op, f.delay_polls.unwrap_or(0))
                    }
                    _ => {}
                }
            }
            let reg_key = rid.key();
            let key = (inst.name.to_ascii_lowercase(), reg_key.clone(), op.clone());
            self.running
                .lock()
                .expect("running lock")
                .insert(key.clone());
            let work = {
                let op = op.clone();
                let payload = req.body.payload.clone();
                let transport = req.transport;
                let force = req.force_registration;
                let me = self.self_arc();
                async move {
                    if !delay.is_zero() {
                        // An injected delay: the registration stays `assigning` meanwhile.
                        tokio::time::sleep(delay).await;
                    }
                    let r = me.assign(adm, &op, payload, transport, force, csr).await;
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
                    if self.faults.polls_held(&op) {
                        // An injected delay holds the result back for some polls.
                        return Ok((
                            self.assigning_response(
                                &op,
                                rid.as_str(),
                                self.settings.ready_retry_after,
                                false,
                            ),
                            "assigning",
                        ));
                    }
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
                    self.assigning_response(
                        &op,
                        rid.as_str(),
                        self.settings.busy_retry_after,
                        false,
                    ),
                    "assigning",
                )),
            }
        }
        .await;
        match (out, drop_response) {
            (Ok((resp, _)), Some(rule)) => Err(Error::Dropped {
                rule,
                response: Some(Box::new(resp)),
            }),
            (out, _) => out,
        }
    }

    fn self_arc(&self) -> Arc<Engine> {
        self.me.upgrade().expect("engine is alive while serving")
    }

    async fn operation_status_inner(&self, req: DeviceRequest, op: &str) -> Result<DeviceResponse> {
        let (inst, rid) = self.addressee(&req)?;
        self.attest(&inst, &rid, &req.credential).await?;
        if self.faults.poll_held(op) {
            return Ok(self.assigning_response(
                op,
                rid.as_str(),
                self.settings.ready_retry_after,
                true,
            ));
        }
        if self.running.lock().expect("running lock").contains(&(
            inst.name.to_ascii_lowercase(),
            rid.key(),
            op.to_string(),
        )) {
            return Ok(self.assigning_response(
                op,
                rid.as_str(),
                self.settings.busy_retry_after,
                true,
            ));
        }
        let rec = self.record(&inst.name, &rid).await?;
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
        let (inst, rid) = self.addressee(&req)?;
        if req.body.csr.is_some() {
            return Err(Error::invalid(
                "a 'csr' is not accepted by the registration status lookup",
            ));
        }
        self.attest(&inst, &rid, &req.credential).await?;
        let rec = self.record(&inst.name, &rid).await?;
        match rec {
            Some(r) => Ok(Self::device_state(&r)),
            None => Err(Error::not_found("registration", rid.as_str())),
        }
    }
}

/// Log a failed device call: our failures as errors, the client's as debug. The front end
/// renders the error through `dps_core::wire`.
fn logged(e: Error, what: &str, rid: &str) -> Error {
    match &e {
        Error::Store(_) | Error::Internal(_) => {
            tracing::error!(registration_id = rid, error = %e, "{what} failed")
        }
        _ => tracing::debug!(registration_id = rid, error = %e, "{what} refused"),
    }
    e
}

impl crate::tls::HandshakeFaults for Engine {
    fn active(&self) -> bool {
        self.faults.any()
    }

    /// The instance is the one named by SNI; without SNI (an IP address) or with an unknown
    /// name, the rules of every instance are tried.
    fn handshake_delay(
        &self,
        listener: &'static str,
        sni: Option<&str>,
        peer: std::net::SocketAddr,
    ) -> Option<Duration> {
        let instances = match sni.and_then(|h| self.instances.by_host(h)) {
            Some(i) => vec![i],
            None => self.instances.list(),
        };
        instances.iter().find_map(|inst| {
            self.connection_fault_rule(
                &inst.name,
                dps_core::fault::FaultPoint::TlsHandshake,
                listener,
                "",
                Some(peer.ip()),
            )
            .and_then(|r| r.delay_ms)
            .map(Duration::from_millis)
        })
    }
}

#[async_trait::async_trait]
impl DeviceService for Engine {
    fn connection_fault(
        &self,
        point: dps_core::fault::FaultPoint,
        transport: Transport,
        id_scope: &str,
        registration_id: &str,
        peer: Option<std::net::IpAddr>,
    ) -> bool {
        if !self.faults.any() {
            return false;
        }
        let Some(inst) = self.instances.by_scope(id_scope) else {
            return false;
        };
        self.connection_fault_rule(
            &inst.name,
            point,
            fault_transport(transport),
            registration_id,
            peer,
        )
        .is_some()
    }

    async fn register(&self, req: DeviceRequest) -> Result<DeviceResponse> {
        let span = tracing::info_span!("register", registration_id = %req.registration_id, id_scope = %req.id_scope, transport = req.transport.as_str(), operation_id = tracing::field::Empty);
        let started = Instant::now();
        let rid = req.registration_id.clone();
        let transport = req.transport.as_str();
        // Boxed: the registration's future is moved once, into the box, not into the span's
        // wrapper and then into this future.
        let r =
            tracing::Instrument::instrument(Box::pin(self.register_inner(req)), span.clone()).await;
        let result = match &r {
            Ok((_, outcome)) => *outcome,
            Err(_) => "error",
        };
        metrics::histogram!("dps_register_duration_seconds", "protocol" => transport, "result" => result).record(started.elapsed().as_secs_f64());
        r.map(|(resp, _)| {
            span.record("operation_id", resp.body.operation_id.as_str());
            resp
        })
        .map_err(|e| logged(e, "register", &rid))
    }

    async fn operation_status(
        &self,
        req: DeviceRequest,
        operation_id: &str,
    ) -> Result<DeviceResponse> {
        let rid = req.registration_id.clone();
        self.operation_status_inner(req, operation_id)
            .await
            .map_err(|e| logged(e, "operation status", &rid))
    }

    async fn registration_status(&self, req: DeviceRequest) -> Result<DeviceRegistrationState> {
        let rid = req.registration_id.clone();
        self.registration_status_inner(req)
            .await
            .map_err(|e| logged(e, "registration status", &rid))
    }

    async fn tpm_challenge(
        &self,
        id_scope: &str,
        registration_id: &str,
        tpm: &TpmAttestation,
        transport: Transport,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Vec<u8>> {
        let req_scope = id_scope.to_string();
        let inst = self
            .instances
            .by_scope(&req_scope)
            .ok_or_else(|| AuthFailure::UnknownInstance(req_scope.clone()))?;
        let rid = RegistrationId::parse(registration_id)?;
        let r = if matches!(transport, Transport::Mqtt | Transport::MqttWs) {
            Err(AuthFailure::TpmOverMqtt.into())
        } else {
            self.issue_tpm_activation(&inst, &rid, tpm).await
        };
        if let Err(Error::Unauthorized(f)) = &r {
            self.refused(&inst, &rid, f, transport, "tpm", peer).await;
        }
        r.map_err(|e| logged(e, "TPM challenge", registration_id))
    }

    async fn authorize_connect(
        &self,
        transport: Transport,
        id_scope: &str,
        registration_id: &str,
        credential: &DeviceCredential,
        peer: Option<std::net::IpAddr>,
    ) -> std::result::Result<(), ConnectRefusal> {
        let Some(inst) = self.instances.by_scope(id_scope) else {
            return Err(ConnectRefusal::NotAuthorized);
        };
        let Ok(rid) = RegistrationId::parse(registration_id) else {
            return Err(ConnectRefusal::BadUsernameOrPassword);
        };
        match credential {
            DeviceCredential::Certificates(c) if !c.is_empty() => Ok(()),
            DeviceCredential::Sas(_) | DeviceCredential::None => {
                let mqtt = matches!(transport, Transport::Mqtt | Transport::MqttWs);
                let attested = self.attest(&inst, &rid, credential).await.and_then(|a| {
                    if mqtt && a.attestation == AttestationType::Tpm {
                        // Azure supports TPM over HTTPS and AMQP (SASL `TPM`) only.
                        Err(AuthFailure::TpmOverMqtt.into())
                    } else {
                        Ok(a)
                    }
                });
                match attested {
                    Ok(_) => Ok(()),
                    Err(Error::Unauthorized(f)) => {
                        let kind = if f.is_tpm() {
                            "tpm"
                        } else {
                            cred_kind(credential)
                        };
                        self.refused(&inst, &rid, &f, transport, kind, peer).await;
                        Err(ConnectRefusal::NotAuthorized)
                    }
                    Err(e) => {
                        tracing::error!(registration_id, error = %e, "connect check failed");
                        Err(ConnectRefusal::ServerUnavailable)
                    }
                }
            }
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

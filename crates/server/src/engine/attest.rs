//! Attestation: which enrollment admits a device, from what it presented. SAS tokens are checked
//! against the individual enrollment's keys and then against the keys derived from each
//! symmetric-key group; certificate chains go through `dps_core::x509::verify::attest` with the
//! individual enrollment, the X.509 groups, the instance's CA certificates and its deny list.
//! Reads go through the [`crate::catalog::Catalog`] (groups, CA material) and the repository
//! (the individual enrollment).

use super::Engine;
use crate::issuer::IssuedCertificate;
use base64::Engine as _;
use dps_core::device::DeviceCredential;
use dps_core::error::AuthFailure;
use dps_core::hub::HubAuth;
use dps_core::ids::RegistrationId;
use dps_core::instance::Instance;
use dps_core::model::{
    AttestationType, EnrollmentGroup, EnrollmentSettings, IndividualEnrollment, TpmAttestation,
    X509RegistrationResult,
};
use dps_core::sas::SasToken;
use dps_core::store::Collection;
use dps_core::x509::verify::{attest as decide, X509Candidates, X509Match};
use dps_core::{Error, Result};
use std::sync::Arc;

/// From this many symmetric-key groups in an instance, a registration whose group this node
/// does not remember reads the device's registration record for its group before trying the
/// groups one by one. A read costs about what 15–30 groups tried cost (a key derivation and
/// up to two HMACs each, 0.6–1.2 µs); a device the store has never seen pays both.
const RECORD_HINT_AT: usize = 16;

/// Now as Azure writes timestamps (what certificate infos hold; they compare lexically).
fn azure_now(t: time::OffsetDateTime) -> String {
    dps_core::clock::azure_timestamp(t)
}

/// Where the device's enrollment came from.
#[derive(Debug, Clone)]
pub(super) enum Source {
    Individual(Box<IndividualEnrollment>),
    Group(Box<EnrollmentGroup>),
}

/// A device that passed attestation.
#[derive(Debug, Clone)]
pub(super) struct Admitted {
    pub(super) instance: Arc<Instance>,
    pub(super) registration_id: RegistrationId,
    pub(super) source: Source,
    /// An individual enrollment for this registration id that is disabled (overrides a group).
    pub(super) disabled_override: bool,
    pub(super) attestation: AttestationType,
    pub(super) hub_auth: HubAuth,
    pub(super) x509: Option<X509RegistrationResult>,
    /// TPM: `{"authenticationKey": <new activation blob for the hub key>}` for the
    /// registration state (register requests only).
    pub(super) tpm: Option<serde_json::Value>,
}

impl Admitted {
    pub(super) fn settings(&self) -> &EnrollmentSettings {
        match &self.source {
            Source::Individual(e) => &e.settings,
            Source::Group(g) => &g.settings,
        }
    }
    pub(super) fn group_id(&self) -> Option<String> {
        match &self.source {
            Source::Group(g) => Some(g.enrollment_group_id.clone()),
            Source::Individual(_) => None,
        }
    }
    pub(super) fn enabled(&self) -> bool {
        !self.disabled_override && self.settings().enabled()
    }
    pub(super) fn device_id(&self) -> String {
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

impl Engine {
    /// The device's individual enrollment. Not looked up when the instance has none at all
    /// (a fleet enrolled through groups only): see [`crate::catalog::Catalog`].
    pub(super) async fn individual_enrollment(
        &self,
        instance: &str,
        registration_id: &str,
    ) -> Result<Option<IndividualEnrollment>> {
        if !self.catalog.has_individual_enrollments(instance).await? {
            return Ok(None);
        }
        self.repo.enrollment(instance, registration_id).await
    }

    /// The position among `groups` of the group that `rid`'s registration record says admitted
    /// it, if that group is still there. Only an order for the search: the group's keys must
    /// still have signed the token. A store error is no hint (the search tries every group).
    async fn group_of_record(
        &self,
        instance: &str,
        rid: &RegistrationId,
        groups: &[dps_core::model::EnrollmentGroup],
    ) -> Option<usize> {
        let rec = match self.repo.registration(instance, rid.as_str()).await {
            Ok(r) => r?.0,
            Err(e) => {
                tracing::debug!(registration_id = %rid, error = %e, "no group hint from the registration record");
                return None;
            }
        };
        let gid = rec.enrollment_group_id?;
        groups.iter().position(|g| g.enrollment_group_id == gid)
    }

    pub(super) async fn attest(
        &self,
        inst: &Arc<Instance>,
        rid: &RegistrationId,
        cred: &DeviceCredential,
    ) -> Result<Admitted> {
        self.attest_device(inst, rid, cred, None).await
    }

    /// Attest a device from its credential and, for TPM devices, the `tpm` keys of its request:
    /// a TPM device without a credential gets [`Error::TpmChallenge`] (step 1 of §6.5.2).
    pub(super) async fn attest_device(
        &self,
        inst: &Arc<Instance>,
        rid: &RegistrationId,
        cred: &DeviceCredential,
        tpm: Option<&TpmAttestation>,
    ) -> Result<Admitted> {
        match cred {
            DeviceCredential::Sas(token) => self.attest_sas(inst, rid, token, tpm).await,
            // The other paths are boxed: their futures are large, and inline they would make
            // every attestation's future (moved on each call) as large as the largest path.
            DeviceCredential::Certificates(chain) if !chain.is_empty() => {
                if let Some(a) = Box::pin(self.attest_issued(inst, rid, chain)).await? {
                    return Ok(a);
                }
                Box::pin(self.attest_x509(inst, rid, chain)).await
            }
            _ => match tpm {
                Some(t) => {
                    let blob = Box::pin(self.issue_tpm_activation(inst, rid, t)).await?;
                    Err(Error::TpmChallenge {
                        authentication_key: base64::engine::general_purpose::STANDARD.encode(blob),
                    })
                }
                None => Err(AuthFailure::MissingCredential.into()),
            },
        }
    }

    async fn attest_sas(
        &self,
        inst: &Arc<Instance>,
        rid: &RegistrationId,
        token: &str,
        tpm: Option<&TpmAttestation>,
    ) -> Result<Admitted> {
        let tok = SasToken::parse(token).map_err(AuthFailure::from)?;
        let now = self.clock.now().unix_timestamp();
        tok.check_lifetime(now, self.settings.max_token_lifetime_secs)
            .map_err(AuthFailure::from)?;
        // Boxed: an enrollment is large, and this future holds it across the groups' lookup.
        let individual = self
            .individual_enrollment(&inst.name, rid.as_str())
            .await?
            .map(Box::new);
        let mut individual_failure = None;
        if let Some(e) = &individual {
            if e.settings.attestation.kind == AttestationType::Tpm {
                // A TPM enrollment is individual only and authoritative.
                // Boxed: the TPM path's future is large (see `attest_device`).
                return Box::pin(self.attest_tpm_sas(inst, rid, &tok, e, tpm, now)).await;
            }
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
                            tpm: None,
                            source: Source::Individual(e.clone()),
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
                if let Some(f) = individual_failure.take() {
                    return Err(f.into());
                }
            }
        }
        // Audience, key name and expiry checked once (in the order `verify_device` checks them
        // for individual enrollments), for precise reasons; then the keys.
        let check = match tok.device_signature_check(&inst.id_scope, rid.as_str(), now) {
            Ok(c) => Some(c),
            // An unreadable signature matches no group: unknown, as when no group signed.
            Err(dps_core::sas::SasError::BadSignature) => None,
            // A wrong key name stays the individual enrollment's refusal when it has one.
            Err(e @ dps_core::sas::SasError::WrongKeyName(_)) => {
                return Err(individual_failure.unwrap_or(AuthFailure::Sas(e)).into())
            }
            Err(e) => return Err(AuthFailure::Sas(e).into()),
        };
        let groups = self.catalog.groups(&inst.name, "symmetricKey").await?;
        if let Some(check) = check.filter(|_| !groups.is_empty()) {
            // The group that admitted this device last time first, then every group in order.
            let slot = self.catalog.hint_slot(&inst.name, rid.as_str());
            let mut hint = self.catalog.group_hint(slot).filter(|&i| i < groups.len());
            if hint.is_none() && groups.len() >= RECORD_HINT_AT {
                // Not remembered on this node (another node registered it, or this one
                // restarted): the group its registration record names, if it still exists.
                hint = self.group_of_record(&inst.name, rid, &groups).await;
            }
            let order = hint
                .into_iter()
                .chain((0..groups.len()).filter(|&i| Some(i) != hint));
            let mut tried = 0u64;
            for i in order {
                tried += 1;
                // A group's device keys: HMAC-SHA256(group key, registration id); the token must
                // be signed by one of them. A group with only a secondary key uses it for both.
                let (first, second) = match groups.keys(i) {
                    [Some(p), s] => (p, s.as_ref()),
                    [None, Some(s)] => (s, None),
                    [None, None] => continue,
                };
                let first = first.derive(rid.as_str());
                let second = second.map(|k| k.derive(rid.as_str()));
                if !(check.signed_by(&first) || second.is_some_and(|k| check.signed_by(&k))) {
                    continue;
                }
                self.catalog.count_group_keys_tried(tried);
                self.catalog.remember_group(slot, i);
                let b64 = |k: &[u8; 32]| base64::engine::general_purpose::STANDARD.encode(k);
                let primary = b64(&first);
                let secondary = second.map_or_else(|| primary.clone(), |k| b64(&k));
                let (source, disabled_override) = match &individual {
                    Some(e) => (Source::Individual(e.clone()), true),
                    None => (Source::Group(Box::new(groups[i].clone())), false),
                };
                return Ok(Admitted {
                    instance: inst.clone(),
                    registration_id: rid.clone(),
                    source,
                    disabled_override,
                    attestation: AttestationType::SymmetricKey,
                    hub_auth: HubAuth::SymmetricKey { primary, secondary },
                    x509: None,
                    tpm: None,
                });
            }
            self.catalog.count_group_keys_tried(tried);
        }
        Err(individual_failure
            .unwrap_or_else(|| AuthFailure::UnknownRegistration(rid.to_string()))
            .into())
    }

    /// A device presenting a certificate dps issued to it (certificate issuance): admitted by
    /// its original enrollment (the individual enrollment for its registration id, else the
    /// group its registration record names), so that it renews with the certificate it got.
    /// The leaf must be byte for byte the certificate dps recorded (same SHA-256 thumbprint;
    /// TLS proved the key), issued to this registration id, active, within its validity and
    /// not on the deny list. `None`: not a certificate dps issued (regular X.509 attestation
    /// decides).
    async fn attest_issued(
        &self,
        inst: &Arc<Instance>,
        rid: &RegistrationId,
        chain: &[Vec<u8>],
    ) -> Result<Option<Admitted>> {
        if inst.credential_policy.is_empty() {
            return Ok(None);
        }
        let leaf = &chain[0];
        let Ok(info) = dps_core::x509::certificate_info(leaf) else {
            return Ok(None);
        };
        let Some((issued, _)) = self
            .repo
            .get::<IssuedCertificate>(
                Collection::IssuedCertificate,
                &inst.name,
                &info.serial_number,
            )
            .await?
        else {
            return Ok(None);
        };
        if !dps_core::x509::thumbprint_eq(&issued.sha256_thumbprint, &info.sha256_thumbprint) {
            return Ok(None);
        }
        let refuse = |f: AuthFailure| -> Result<Option<Admitted>> {
            tracing::info!(registration_id = %rid, reason = %f, "issued certificate refused");
            Err(f.into())
        };
        if issued.status != "active" {
            return refuse(AuthFailure::Revoked(format!(
                "issued certificate serial {}",
                issued.serial_number
            )));
        }
        if !issued.registration_id.eq_ignore_ascii_case(rid.as_str()) {
            return refuse(AuthFailure::Certificate(format!(
                "the certificate was issued to registration '{}'",
                issued.registration_id
            )));
        }
        let now = azure_now(self.clock.now());
        if now < info.not_before_utc || now > info.not_after_utc {
            return refuse(AuthFailure::Certificate(format!(
                "the issued certificate is valid from {} to {}",
                info.not_before_utc, info.not_after_utc
            )));
        }
        if let Some(entry) = self.catalog.x509(&inst.name).await?.deny.is_revoked(leaf) {
            return refuse(AuthFailure::Revoked(entry));
        }
        let (source, group_id) = match self.individual_enrollment(&inst.name, rid.as_str()).await? {
            Some(e) => (Source::Individual(Box::new(e)), None),
            None => {
                let gid = self
                    .record(&inst.name, rid)
                    .await?
                    .and_then(|r| r.enrollment_group_id);
                let group = match &gid {
                    Some(g) => self
                        .repo
                        .get::<EnrollmentGroup>(Collection::Group, &inst.name, g)
                        .await?
                        .map(|(mut g, etag)| {
                            g.settings.etag = Some(etag);
                            g
                        }),
                    None => None,
                };
                match group {
                    Some(g) => (Source::Group(Box::new(g)), gid),
                    None => {
                        return refuse(AuthFailure::UnknownRegistration(rid.to_string()));
                    }
                }
            }
        };
        Ok(Some(Admitted {
            instance: inst.clone(),
            registration_id: rid.clone(),
            source,
            disabled_override: false,
            attestation: AttestationType::X509,
            hub_auth: HubAuth::X509Thumbprint {
                primary: info.sha256_thumbprint.clone(),
                secondary: None,
            },
            x509: Some(X509RegistrationResult {
                certificate_info: Some(info),
                enrollment_group_id: group_id,
                signing_certificate_info: None,
            }),
            tpm: None,
        }))
    }

    async fn attest_x509(
        &self,
        inst: &Arc<Instance>,
        rid: &RegistrationId,
        chain: &[Vec<u8>],
    ) -> Result<Admitted> {
        x509_admission(self, inst, rid, chain)
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
                tpm: None,
                source: match a.source {
                    X509Source::Individual(e) => Source::Individual(e),
                    X509Source::Group(g) => Source::Group(g),
                },
            })
    }
}

/// Which enrollment admitted the device.
enum X509Source {
    Individual(Box<IndividualEnrollment>),
    Group(Box<EnrollmentGroup>),
}

/// A device admitted by its certificate.
struct X509Admission {
    source: X509Source,
    disabled_override: bool,
    leaf_sha256: String,
    result: X509RegistrationResult,
}

async fn x509_admission(
    engine: &Engine,
    inst: &Arc<Instance>,
    rid: &RegistrationId,
    chain: &[Vec<u8>],
) -> Result<X509Admission> {
    let individual = engine
        .individual_enrollment(&inst.name, rid.as_str())
        .await?;
    let groups = engine.catalog.groups(&inst.name, "x509").await?;
    let material = engine.catalog.x509(&inst.name).await?;
    let candidates = X509Candidates {
        individual: individual.as_ref(),
        groups: &groups,
        ca_certificates: &material.cas,
        deny: &material.deny,
    };
    let now = engine.clock.now();
    let m = decide(rid.as_str(), chain, &candidates, now).map_err(|f| {
        tracing::info!(registration_id = %rid, reason = %f, code = f.code(), "X.509 attestation refused");
        AuthFailure::from(f)
    })?;
    let leaf = &chain[0];
    let leaf_info = dps_core::x509::certificate_info(leaf).ok();
    let leaf_sha256 = dps_core::x509::sha256_thumbprint(leaf);
    Ok(match m {
        X509Match::Individual(e) => X509Admission {
            source: X509Source::Individual(Box::new(e.clone())),
            disabled_override: false,
            leaf_sha256,
            result: X509RegistrationResult {
                certificate_info: leaf_info,
                enrollment_group_id: None,
                signing_certificate_info: None,
            },
        },
        X509Match::Group {
            group,
            signing_cert_der,
            ..
        } => {
            let signing = dps_core::x509::certificate_info(&signing_cert_der).ok();
            X509Admission {
                source: X509Source::Group(Box::new(group.clone())),
                disabled_override: false,
                leaf_sha256,
                result: X509RegistrationResult {
                    certificate_info: leaf_info,
                    enrollment_group_id: Some(group.enrollment_group_id.clone()),
                    signing_certificate_info: signing,
                },
            }
        }
    })
}

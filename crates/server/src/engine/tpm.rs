//! TPM attestation (protocol digest §6.5), transport-independent:
//!
//! 1. [`Engine::issue_tpm_activation`]: a device presents its endorsement key (EK) and storage root key
//!    (SRK) and no credential. If the EK is its individual TPM enrollment's (and the SRK the
//!    enrollment's, when it names one), dps draws a fresh HMAC key, stores it (the
//!    `TpmActivation` collection: shared by every node, survives restarts) and answers the
//!    activation blob that only that TPM can open. HTTPS renders it as the 401 challenge; the
//!    AMQP SASL `TPM` mechanism sends it in its challenge frames.
//! 2. [`Engine::attest_tpm_sas`]: the device signs a SAS token with that key inside its TPM.
//!    dps verifies it with the stored key; the hub identity gets the key as its symmetric key,
//!    and the assigned registration state carries a new blob for the same key
//!    (`registrationState.tpm.authenticationKey`), which the SDKs import before connecting.
//!
//! Refusals, each with its own reason in the log and the audit log: no TPM enrollment
//! (`404201`), unknown EK, wrong SRK, bad signature, replayed activation (a token signed with
//! the key of an earlier activation, after a newer one was issued: dps keeps the last
//! [`RETIRED_KEPT`] keys to tell it apart from a plain bad signature), and no activation.

use super::attest::{Admitted, Source};
use super::Engine;
use base64::Engine as _;
use dps_core::error::AuthFailure;
use dps_core::hub::HubAuth;
use dps_core::ids::RegistrationId;
use dps_core::instance::Instance;
use dps_core::model::{AttestationType, IndividualEnrollment, TpmAttestation};
use dps_core::sas::{SasError, SasToken};
use dps_core::store::{Collection, DocIndex, Expect};
use dps_core::tpm::{activation_blob, ActivationRandomness, PublicArea};
use dps_core::{Error, Result};
use std::sync::Arc;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Earlier activation keys kept per device, to recognise replays.
pub const RETIRED_KEPT: usize = 4;

/// The stored activation of one TPM device (scope: instance, id: registration id).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TpmActivation {
    /// Base64 TPM2B_PUBLIC of the EK the activation was made for.
    endorsement_key: String,
    /// Base64 TPM2B_PUBLIC of the SRK the key was duplicated to.
    storage_root_key: String,
    /// Base64 HMAC key (secret).
    key: String,
    /// Keys of earlier activations, newest first (secret).
    #[serde(default)]
    retired: Vec<String>,
    /// When it was issued.
    issued: String,
}

impl std::fmt::Debug for TpmActivation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmActivation")
            .field("issued", &self.issued)
            .finish_non_exhaustive()
    }
}

fn parse_key(text: &str, what: &'static str) -> Result<PublicArea> {
    PublicArea::from_base64(text, what).map_err(|e| Error::invalid(format!("tpm: {e}")))
}

/// The enrollment's EK and SRK (the SRK only when it names one).
fn enrolled_keys(e: &IndividualEnrollment) -> Result<(PublicArea, Option<PublicArea>)> {
    let t = e.settings.attestation.tpm.clone().unwrap_or_default();
    let ek = PublicArea::from_base64(&t.endorsement_key, "endorsement key").map_err(|err| {
        AuthFailure::TpmUnknownEndorsementKey(format!(
            "the enrollment's endorsement key is unusable: {err}"
        ))
    })?;
    let srk = match t.storage_root_key.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(
            PublicArea::from_base64(s, "storage root key").map_err(|err| {
                AuthFailure::TpmWrongStorageRootKey(format!(
                    "the enrollment's storage root key is unusable: {err}"
                ))
            })?,
        ),
        None => None,
    };
    Ok((ek, srk))
}

impl Engine {
    /// The device's individual TPM enrollment, or the refusal.
    async fn tpm_enrollment(
        &self,
        inst: &Instance,
        rid: &RegistrationId,
    ) -> Result<IndividualEnrollment> {
        match self.individual_enrollment(&inst.name, rid.as_str()).await? {
            Some(e) if e.settings.attestation.kind == AttestationType::Tpm => Ok(e),
            Some(e) => Err(AuthFailure::AttestationMismatch(format!(
                "enrollment '{}' uses {} attestation, the device presented a TPM",
                e.registration_id,
                e.settings.attestation.kind.as_str()
            ))
            .into()),
            None => Err(AuthFailure::TpmNotEnrolled(rid.to_string()).into()),
        }
    }

    /// Step 1 of TPM attestation: check the device's EK (and SRK) against its enrollment, issue
    /// a new activation (a fresh HMAC key, stored; the previous one is retired) and return the
    /// activation blob, raw bytes. Transport-independent: HTTPS answers it as the 401 challenge,
    /// the AMQP SASL `TPM` mechanism in its challenge frames.
    pub async fn issue_tpm_activation(
        &self,
        inst: &Arc<Instance>,
        rid: &RegistrationId,
        presented: &TpmAttestation,
    ) -> Result<Vec<u8>> {
        let ek = parse_key(&presented.endorsement_key, "endorsement key")?;
        let srk_text = presented
            .storage_root_key
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::invalid("tpm.storageRootKey is required"))?;
        let srk = parse_key(srk_text, "storage root key")?;
        let enrollment = self.tpm_enrollment(inst, rid).await?;
        let (enrolled_ek, enrolled_srk) = enrolled_keys(&enrollment)?;
        if !enrolled_ek.same_key(&ek) {
            return Err(AuthFailure::TpmUnknownEndorsementKey(format!(
                "the endorsement key presented is not enrollment '{}''s",
                enrollment.registration_id
            ))
            .into());
        }
        if let Some(s) = &enrolled_srk {
            if !s.same_key(&srk) {
                return Err(AuthFailure::TpmWrongStorageRootKey(format!(
                    "the storage root key presented is not the one enrollment '{}' names",
                    enrollment.registration_id
                ))
                .into());
            }
        }
        let mut key = [0u8; 32];
        self.random.fill(&mut key);
        let blob = activation_blob(
            &ek,
            &srk,
            &key,
            &ActivationRandomness::draw(self.random.as_ref()),
        )
        .map_err(|e| Error::invalid(format!("tpm: {e}")))?;
        let previous = self
            .repo
            .get::<TpmActivation>(Collection::TpmActivation, &inst.name, rid.as_str())
            .await?
            .map(|(a, _)| a);
        let mut retired = Vec::with_capacity(RETIRED_KEPT);
        if let Some(p) = previous {
            retired.push(p.key);
            retired.extend(p.retired);
        }
        retired.truncate(RETIRED_KEPT);
        let activation = TpmActivation {
            endorsement_key: B64.encode(ek.to_tpm2b()),
            storage_root_key: B64.encode(srk.to_tpm2b()),
            key: B64.encode(key),
            retired,
            issued: super::ts(self.clock.as_ref()),
        };
        self.repo
            .put(
                Collection::TpmActivation,
                &inst.name,
                rid.as_str(),
                &self.new_etag(),
                &activation,
                DocIndex::default(),
                Expect::Any,
            )
            .await?;
        tracing::info!(registration_id = %rid, id_scope = %inst.id_scope, "TPM activation issued");
        Ok(blob)
    }

    /// Step 2: a SAS token from a device whose individual enrollment is TPM. `presented` is the
    /// request's `tpm` (register requests carry it, polls do not); when present it must be the
    /// keys the activation was made for, and the admitted device gets a new activation blob
    /// for the same key (its `registrationState.tpm.authenticationKey`).
    pub(super) async fn attest_tpm_sas(
        &self,
        inst: &Arc<Instance>,
        rid: &RegistrationId,
        tok: &SasToken,
        enrollment: &IndividualEnrollment,
        presented: Option<&TpmAttestation>,
        now: i64,
    ) -> Result<Admitted> {
        let (enrolled_ek, enrolled_srk) = enrolled_keys(enrollment)?;
        let Some((activation, _)) = self
            .repo
            .get::<TpmActivation>(Collection::TpmActivation, &inst.name, rid.as_str())
            .await?
        else {
            return Err(AuthFailure::TpmNoActivation.into());
        };
        let ek = parse_key(&activation.endorsement_key, "endorsement key")?;
        let srk = parse_key(&activation.storage_root_key, "storage root key")?;
        if !enrolled_ek.same_key(&ek) {
            return Err(AuthFailure::TpmUnknownEndorsementKey(
                "the activation was made for another endorsement key than the enrollment's (the enrollment changed)".into(),
            )
            .into());
        }
        if enrolled_srk.as_ref().is_some_and(|s| !s.same_key(&srk)) {
            return Err(AuthFailure::TpmWrongStorageRootKey(
                "the activation was made for another storage root key than the enrollment's".into(),
            )
            .into());
        }
        if let Some(p) = presented {
            if !parse_key(&p.endorsement_key, "endorsement key")?.same_key(&ek) {
                return Err(AuthFailure::TpmUnknownEndorsementKey(
                    "the endorsement key presented is not the one the activation was made for"
                        .into(),
                )
                .into());
            }
            if let Some(s) = p.storage_root_key.as_deref().filter(|s| !s.is_empty()) {
                if !parse_key(s, "storage root key")?.same_key(&srk) {
                    return Err(AuthFailure::TpmWrongStorageRootKey(
                        "the storage root key presented is not the one the activation was made for"
                            .into(),
                    )
                    .into());
                }
            }
        }
        match tok.verify_device(&inst.id_scope, rid.as_str(), [activation.key.as_str()], now) {
            Ok(_) => {}
            Err(SasError::BadSignature) => {
                let replayed = activation.retired.iter().any(|old| {
                    tok.verify_device(&inst.id_scope, rid.as_str(), [old.as_str()], now)
                        .is_ok()
                });
                return Err(if replayed {
                    AuthFailure::TpmReplayedActivation
                } else {
                    AuthFailure::TpmBadSignature(SasError::BadSignature)
                }
                .into());
            }
            Err(e) => return Err(AuthFailure::TpmBadSignature(e).into()),
        }
        let tpm = match presented {
            Some(_) => {
                let key: [u8; 32] = B64
                    .decode(&activation.key)
                    .ok()
                    .and_then(|k| k.try_into().ok())
                    .ok_or_else(|| {
                        Error::Internal("stored TPM activation key is not 32 bytes".into())
                    })?;
                let blob = activation_blob(
                    &ek,
                    &srk,
                    &key,
                    &ActivationRandomness::draw(self.random.as_ref()),
                )
                .map_err(|e| Error::Internal(format!("TPM activation blob: {e}")))?;
                Some(serde_json::json!({"authenticationKey": B64.encode(blob)}))
            }
            None => None,
        };
        Ok(Admitted {
            instance: inst.clone(),
            registration_id: rid.clone(),
            source: Source::Individual(Box::new(enrollment.clone())),
            disabled_override: false,
            attestation: AttestationType::Tpm,
            hub_auth: HubAuth::SymmetricKey {
                primary: activation.key.clone(),
                secondary: activation.key,
            },
            x509: None,
            tpm,
        })
    }
}

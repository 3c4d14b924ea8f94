//! Individual enrollments and enrollment groups: read, create or replace (with ETag / If-Match
//! semantics), delete, the attestation mechanism, queries with paging and bulk operations.
//!
//! One implementation serves both kinds through the [`Enrollment`] trait. This module owns
//! their rules: settings normalization (generated keys, certificate info, linked hubs, policy
//! requirements), timestamps and ETags (from the injected clock and randomness), the audit
//! entries, dropping the catalog's cached groups when a group changes, and telling the engine
//! when an enrollment is enabled or disabled. What leaves it is the public view: symmetric keys
//! only in the answer to a write, certificate bodies never.
//!
//! It must not depend on HTTP or the front ends (see [`crate::usecases`]).

use super::{map_store, Caller, Context};
use crate::catalog::Catalog;
use crate::engine::Engine;
use crate::outbound::{Outbound, Target};
use crate::repo::{settings_index, Repo};
use dps_core::ids::{DeviceId, EnrollmentGroupId, RegistrationId};
use dps_core::instance::Instance;
use dps_core::model::{
    AllocationPolicy, AttestationMechanism, AttestationType, BulkMode, EnrollmentGroup,
    EnrollmentSettings, IndividualEnrollment,
};
use dps_core::random::{self, Random};
use dps_core::store::{Collection, DocIndex, Expect, Filter, Write};
use dps_core::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;

/// The most items a bulk operation takes.
pub const MAX_BULK_ITEMS: usize = 10;

/// What tells an individual enrollment from an enrollment group to the shared implementation.
pub trait Enrollment: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Where it is stored.
    const COLLECTION: Collection;
    /// Its model name (`IndividualEnrollment`, `EnrollmentGroup`).
    const NAME: &'static str;
    /// How errors and deletions name it (`enrollment`, `enrollment group`).
    const KIND: &'static str;
    /// The audit log's name for writes: target kind and action prefix (`enrollment`, `group`).
    const AUDIT: &'static str;
    /// The id field in its JSON (`registrationId`, `enrollmentGroupId`).
    const ID_FIELD: &'static str;
    /// Is it a group (what normalization allows; its changes drop the catalog's groups)?
    const IS_GROUP: bool;

    /// The id given in the body.
    fn id(&self) -> &str;
    /// The shared settings.
    fn settings(&self) -> &EnrollmentSettings;
    /// The shared settings, to change.
    fn settings_mut(&mut self) -> &mut EnrollmentSettings;
    /// Validate the id in the path.
    fn parse_id(id: &str) -> Result<String>;
    /// Kind-specific validation before the settings are normalized; read-only fields cleared.
    fn check(&mut self) -> Result<()> {
        Ok(())
    }
    /// Its index attributes in the store.
    fn index(&self) -> DocIndex {
        settings_index(self.settings())
    }
    /// What [`Engine::enrollment_status_changed`] is told: (individual, group).
    fn scope(id: &str) -> (Option<&str>, Option<&str>) {
        if Self::IS_GROUP {
            (None, Some(id))
        } else {
            (Some(id), None)
        }
    }
}

/// Implement [`Enrollment`] for a model type: its id field and id type, then the constants.
macro_rules! enrollment {
    ($t:ty, $id:ident: $id_type:ty, $c:ident, $name:literal, $kind:literal, $audit:literal,
     $id_field:literal, $group:literal $(, check: $check:path)?) => {
        impl Enrollment for $t {
            const COLLECTION: Collection = Collection::$c;
            const NAME: &'static str = $name;
            const KIND: &'static str = $kind;
            const AUDIT: &'static str = $audit;
            const ID_FIELD: &'static str = $id_field;
            const IS_GROUP: bool = $group;

            fn id(&self) -> &str {
                &self.$id
            }
            fn settings(&self) -> &EnrollmentSettings {
                &self.settings
            }
            fn settings_mut(&mut self) -> &mut EnrollmentSettings {
                &mut self.settings
            }
            fn parse_id(id: &str) -> Result<String> {
                Ok(<$id_type>::parse(id)?.as_str().to_string())
            }
            $(fn check(&mut self) -> Result<()> {
                $check(self)
            })?
        }
    };
}

enrollment!(
    IndividualEnrollment, registration_id: RegistrationId, Enrollment, "IndividualEnrollment",
    "enrollment", "enrollment", "registrationId", false, check: check_individual
);
enrollment!(
    EnrollmentGroup, enrollment_group_id: EnrollmentGroupId, Group, "EnrollmentGroup",
    "enrollment group", "group", "enrollmentGroupId", true
);

/// An individual enrollment's device id is valid; its registration state is read-only.
fn check_individual(e: &mut IndividualEnrollment) -> Result<()> {
    if let Some(d) = &e.device_id {
        DeviceId::parse(d)?;
    }
    e.registration_state = None;
    Ok(())
}

/// Strip one layer of surrounding quotes from an ETag (C# adds them).
pub fn strip_quotes(s: &str) -> &str {
    s.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s)
}

/// Validate and normalize an enrollment's settings: keys generated (from `random`) when absent,
/// certificates decoded with their info, hubs linked, policy requirements met.
pub fn normalize_settings(
    s: &mut EnrollmentSettings,
    inst: &Instance,
    is_group: bool,
    random: &dyn Random,
) -> Result<()> {
    let att = &mut s.attestation;
    match att.kind {
        AttestationType::SymmetricKey => {
            let sk = att.symmetric_key.get_or_insert_with(Default::default);
            for (name, k) in [
                ("primaryKey", &mut sk.primary_key),
                ("secondaryKey", &mut sk.secondary_key),
            ] {
                match k {
                    Some(key) if !dps_core::sas::valid_key(key) => {
                        return Err(Error::invalid(format!(
                            "attestation.symmetricKey.{name} must be base64 of 16 to 64 bytes"
                        )))
                    }
                    Some(_) => {}
                    None => *k = Some(random::symmetric_key(random)),
                }
            }
            att.x509 = None;
            att.tpm = None;
        }
        AttestationType::X509 => {
            let x = att.x509.as_mut().ok_or_else(|| {
                Error::invalid("attestation.type is x509 but attestation.x509 is missing")
            })?;
            let count = [
                x.client_certificates.is_some(),
                x.signing_certificates.is_some(),
                x.ca_references.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if count != 1 {
                return Err(Error::invalid("attestation.x509 needs exactly one of clientCertificates, signingCertificates, caReferences"));
            }
            if is_group && x.client_certificates.is_some() {
                return Err(Error::invalid("enrollment groups use signingCertificates or caReferences, not clientCertificates"));
            }
            if !is_group && x.ca_references.is_some() {
                return Err(Error::invalid("individual enrollments use clientCertificates (or signingCertificates), not caReferences"));
            }
            for certs in [&mut x.client_certificates, &mut x.signing_certificates]
                .into_iter()
                .flatten()
            {
                if certs.primary.is_none() {
                    return Err(Error::invalid(
                        "attestation.x509: a primary certificate is required",
                    ));
                }
                for c in [&mut certs.primary, &mut certs.secondary]
                    .into_iter()
                    .flatten()
                {
                    if c.certificate.is_none() && c.info.is_none() {
                        return Err(Error::invalid(
                            "attestation.x509: a certificate entry needs 'certificate'",
                        ));
                    }
                    dps_core::x509::normalize(c)
                        .map_err(|e| Error::invalid(format!("attestation.x509: {e}")))?;
                }
            }
            if let Some(r) = &x.ca_references {
                if r.primary.as_deref().is_none_or(str::is_empty) {
                    return Err(Error::invalid(
                        "attestation.x509.caReferences.primary is required",
                    ));
                }
            }
            att.symmetric_key = None;
            att.tpm = None;
        }
        AttestationType::Tpm => {
            if is_group {
                return Err(Error::invalid(
                    "TPM attestation is not allowed for enrollment groups",
                ));
            }
            let t = att.tpm.as_ref().ok_or_else(|| {
                Error::invalid("attestation.type is tpm but attestation.tpm is missing")
            })?;
            // The keys must be TPM2B_PUBLIC areas dps can make an activation for (RSA 2048 to
            // 4096 bits, SHA-256 names, AES-CFB), or no device could ever register.
            dps_core::tpm::PublicArea::from_base64(&t.endorsement_key, "endorsement key")
                .and_then(|k| k.check_activation_key("endorsement key"))
                .map_err(|e| {
                    Error::invalid(format!(
                        "attestation.tpm.endorsementKey must be a base64 TPM2B_PUBLIC: {e}"
                    ))
                })?;
            if let Some(srk) = t.storage_root_key.as_deref().filter(|s| !s.is_empty()) {
                dps_core::tpm::PublicArea::from_base64(srk, "storage root key")
                    .and_then(|k| k.check_activation_key("storage root key"))
                    .map_err(|e| {
                        Error::invalid(format!(
                            "attestation.tpm.storageRootKey must be a base64 TPM2B_PUBLIC: {e}"
                        ))
                    })?;
            }
            att.symmetric_key = None;
            att.x509 = None;
        }
        AttestationType::None => {
            return Err(Error::invalid(
                "attestation.type 'none' cannot be used by devices",
            ))
        }
    }
    if let Some(hubs) = &s.iot_hubs {
        for h in hubs {
            if inst.hub(h).is_none() {
                return Err(Error::invalid(format!(
                    "iotHubs: '{h}' is not a linked hub of this instance"
                )));
            }
        }
    }
    if let Some(h) = &s.iot_hub_host_name {
        if inst.hub(h).is_none() {
            return Err(Error::invalid(format!(
                "iotHubHostName: '{h}' is not a linked hub of this instance"
            )));
        }
    }
    match s.allocation_policy {
        Some(AllocationPolicy::Static) => {
            let n = s
                .iot_hubs
                .as_ref()
                .map(Vec::len)
                .unwrap_or(0)
                .max(usize::from(s.iot_hub_host_name.is_some()));
            if n != 1 {
                return Err(Error::invalid(
                    "the static allocation policy needs exactly one hub in iotHubs",
                ));
            }
        }
        Some(AllocationPolicy::Custom) => {
            let d = s.custom_allocation_definition.as_ref().ok_or_else(|| {
                Error::invalid("the custom allocation policy needs customAllocationDefinition")
            })?;
            if !(d.webhook_url.starts_with("https://") || d.webhook_url.starts_with("http://")) {
                return Err(Error::invalid(
                    "customAllocationDefinition.webhookUrl must be an http(s) URL",
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Symmetric keys written back as `"<redacted>"` (a client's GET → modify → PUT round trip
/// through a redacting tool) are kept from the stored enrollment, never stored as the
/// placeholder.
fn keep_stored_keys(s: &mut EnrollmentSettings, stored: Option<&EnrollmentSettings>) -> Result<()> {
    let Some(sk) = s.attestation.symmetric_key.as_mut() else {
        return Ok(());
    };
    let old = stored.and_then(|o| o.attestation.symmetric_key.as_ref());
    for (name, k, old_k) in [
        (
            "primaryKey",
            &mut sk.primary_key,
            old.and_then(|o| o.primary_key.as_ref()),
        ),
        (
            "secondaryKey",
            &mut sk.secondary_key,
            old.and_then(|o| o.secondary_key.as_ref()),
        ),
    ] {
        if k.as_deref() == Some(dps_core::redact::REDACTED) {
            *k = Some(old_k.cloned().ok_or_else(|| {
                Error::invalid(format!(
                    "attestation.symmetricKey.{name} is \"<redacted>\" but there is no stored key to keep"
                ))
            })?);
        }
    }
    Ok(())
}

/// The public view of an enrollment's attestation: certificate bodies removed, and symmetric
/// keys too unless `with_keys`.
fn public_settings(s: &mut EnrollmentSettings, with_keys: bool) {
    if with_keys {
        s.attestation.strip_certificate_bodies();
    } else {
        s.attestation = s.attestation.redacted();
    }
}

/// Individual enrollments and enrollment groups.
pub struct Enrollments {
    cx: Context,
    catalog: Arc<Catalog>,
    engine: Arc<Engine>,
    outbound: Arc<Outbound>,
}

impl Enrollments {
    /// In `cx`, with the catalog whose groups it invalidates, the engine it tells about status
    /// changes and the outbound policy custom allocation webhook URLs must follow.
    pub fn new(
        cx: Context,
        catalog: Arc<Catalog>,
        engine: Arc<Engine>,
        outbound: Arc<Outbound>,
    ) -> Self {
        Enrollments {
            cx,
            catalog,
            engine,
            outbound,
        }
    }

    /// The stored enrollment with its ETag.
    async fn stored<T: Enrollment>(&self, instance: &str, id: &str) -> Result<Option<T>> {
        Ok(self
            .cx
            .repo
            .get::<T>(T::COLLECTION, instance, id)
            .await?
            .map(|(mut e, etag)| {
                e.settings_mut().etag = Some(etag);
                e
            }))
    }

    /// An enrollment's public view (keys and certificate bodies removed).
    pub async fn get<T: Enrollment>(&self, instance: &str, id: &str) -> Result<T> {
        let mut e = self
            .stored::<T>(instance, id)
            .await?
            .ok_or_else(|| Error::not_found(T::KIND, id))?;
        public_settings(e.settings_mut(), false);
        Ok(e)
    }

    /// An enrollment's attestation mechanism (keys included, certificate bodies removed).
    pub async fn attestation_mechanism<T: Enrollment>(
        &self,
        instance: &str,
        id: &str,
    ) -> Result<AttestationMechanism> {
        let e = self
            .stored::<T>(instance, id)
            .await?
            .ok_or_else(|| Error::not_found(T::KIND, id))?;
        let mut m = e.settings().attestation.clone();
        m.strip_certificate_bodies();
        Ok(m)
    }

    /// Create or replace an enrollment under `expect`; what was written, as its writer may see
    /// it (keys included, certificate bodies removed).
    pub async fn put<T: Enrollment>(
        &self,
        caller: &Caller,
        id: &str,
        mut e: T,
        expect: Expect,
    ) -> Result<T> {
        let inst = &caller.instance;
        let id = T::parse_id(id)?;
        if !e.id().eq_ignore_ascii_case(&id) {
            return Err(Error::invalid(format!(
                "{} '{}' in the body does not match '{}' in the path",
                T::ID_FIELD,
                e.id(),
                id
            )));
        }
        e.check()?;
        if let Some(d) = &e.settings().custom_allocation_definition {
            self.outbound
                .policy()
                .check_url(&d.webhook_url, Target::Webhook)
                .map_err(|err| {
                    Error::invalid(format!("customAllocationDefinition.webhookUrl: {err}"))
                })?;
        }
        let existing = self.stored::<T>(&inst.name, &id).await?;
        keep_stored_keys(e.settings_mut(), existing.as_ref().map(|x| x.settings()))?;
        normalize_settings(e.settings_mut(), inst, T::IS_GROUP, &*self.cx.random)?;
        let now = self.cx.now();
        let s = e.settings_mut();
        s.created_date_time_utc = Some(
            existing
                .as_ref()
                .and_then(|x| x.settings().created_date_time_utc.clone())
                .unwrap_or_else(|| now.clone()),
        );
        s.last_updated_date_time_utc = Some(now);
        s.provisioning_status = Some(s.provisioning_status.unwrap_or_default());
        s.reprovision_policy = Some(s.reprovision());
        s.capabilities = Some(s.capabilities.clone().unwrap_or_default());
        let etag = self.cx.etag();
        s.etag = None;
        let doc = Repo::doc(&id, &etag, &e, e.index());
        e.settings_mut().etag = Some(etag);
        let action = if existing.is_some() {
            format!("{}.update", T::AUDIT)
        } else {
            format!("{}.create", T::AUDIT)
        };
        // The change and its audit entry (and so its lifecycle event, when sinks are
        // configured) are one transaction.
        let audit = self.cx.audit.entry(
            &inst.name,
            &caller.policy,
            &action,
            T::AUDIT,
            &id,
            existing.as_ref(),
            Some(&e),
        );
        self.cx
            .repo
            .store
            .write_all(vec![
                Write::Put {
                    c: T::COLLECTION,
                    scope: inst.name.clone(),
                    doc,
                    expect: expect.clone(),
                },
                Write::Audit(audit),
            ])
            .await
            .map_err(|s| map_store(s, T::KIND, &id, &expect))?;
        if T::IS_GROUP {
            self.catalog.groups_changed(&inst.name);
        } else {
            self.catalog.individuals_changed(&inst.name);
        }
        if let Some(old) = &existing {
            let enabled = e.settings().enabled();
            if old.settings().enabled() != enabled {
                let (individual, group) = T::scope(&id);
                self.engine
                    .enrollment_status_changed(&inst.name, individual, group, enabled);
            }
        }
        public_settings(e.settings_mut(), true);
        Ok(e)
    }

    /// Delete an enrollment (`Expect::Any`: it must exist).
    pub async fn delete<T: Enrollment>(
        &self,
        caller: &Caller,
        id: &str,
        expect: Expect,
    ) -> Result<()> {
        let action = format!("{}.delete", T::AUDIT);
        self.cx
            .remove_audited(caller, T::COLLECTION, T::KIND, id, expect, &action)
            .await?;
        if T::IS_GROUP {
            self.catalog.groups_changed(&caller.instance.name);
        } else {
            self.catalog.individuals_changed(&caller.instance.name);
        }
        Ok(())
    }

    /// One page of the instance's enrollments matching `filter`, public views; and the
    /// continuation of the next page.
    pub async fn query<T: Enrollment>(
        &self,
        instance: &str,
        filter: &Filter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<T>, Option<String>)> {
        let (list, next) = self
            .cx
            .repo
            .query::<T>(T::COLLECTION, instance, filter, after, limit)
            .await?;
        let items = list
            .into_iter()
            .map(|(mut e, etag)| {
                e.settings_mut().etag = Some(etag);
                public_settings(e.settings_mut(), false);
                e
            })
            .collect();
        Ok((items, next))
    }

    /// Apply a bulk operation to its items (JSON enrollments, each with its id and optional
    /// `etag`); the id and error of each item that failed. An item's failure does not stop
    /// the others.
    pub async fn bulk<T: Enrollment>(
        &self,
        caller: &Caller,
        mode: BulkMode,
        items: Vec<serde_json::Value>,
    ) -> Result<Vec<(String, Error)>> {
        if items.len() > MAX_BULK_ITEMS {
            return Err(Error::invalid(format!(
                "a bulk operation takes at most {MAX_BULK_ITEMS} items, got {}",
                items.len()
            )));
        }
        let mut failed = Vec::new();
        for item in items {
            let id = item
                .get(T::ID_FIELD)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string();
            let etag = item
                .get("etag")
                .and_then(|v| v.as_str())
                .map(|s| strip_quotes(s).to_string());
            let r = match mode {
                BulkMode::Delete => {
                    let expect = etag.map(Expect::Etag).unwrap_or(Expect::Any);
                    self.delete::<T>(caller, &id, expect).await
                }
                _ => {
                    let expect = match mode {
                        BulkMode::Create => Expect::Absent,
                        BulkMode::UpdateIfMatchETag => Expect::Etag(etag.unwrap_or_default()),
                        _ => Expect::Any,
                    };
                    match serde_json::from_value::<T>(item) {
                        Ok(e) => self.put(caller, &id, e, expect).await.map(|_| ()),
                        Err(e) => Err(Error::invalid(e.to_string())),
                    }
                }
            };
            if let Err(e) = r {
                failed.push((id, e));
            }
        }
        Ok(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usecases::testing::{fixture, Fixture, NOW};
    use dps_core::clock::azure_timestamp;
    use dps_core::store::AuditQuery;

    fn enrollments(f: &Fixture) -> Enrollments {
        Enrollments::new(
            f.cx.clone(),
            f.catalog.clone(),
            f.engine.clone(),
            crate::outbound::Outbound::permissive(),
        )
    }

    fn symmetric(id: &str) -> IndividualEnrollment {
        serde_json::from_value(serde_json::json!({
            "registrationId": id,
            "attestation": {"type": "symmetricKey"},
        }))
        .unwrap()
    }

    fn group(id: &str) -> EnrollmentGroup {
        serde_json::from_value(serde_json::json!({
            "enrollmentGroupId": id,
            "attestation": {"type": "symmetricKey"},
        }))
        .unwrap()
    }

    /// `dev-1`, symmetric keys generated, written unconditionally.
    async fn put_dev1(uc: &Enrollments, f: &Fixture) -> IndividualEnrollment {
        uc.put(&f.caller, "dev-1", symmetric("dev-1"), Expect::Any)
            .await
            .unwrap()
    }

    fn keys(e: &IndividualEnrollment) -> (Option<String>, Option<String>) {
        let sk = e.settings.attestation.symmetric_key.as_ref();
        (
            sk.and_then(|k| k.primary_key.clone()),
            sk.and_then(|k| k.secondary_key.clone()),
        )
    }
    #[tokio::test]
    async fn put_then_get() {
        let f = fixture(1).await;
        let uc = enrollments(&f);
        let put = put_dev1(&uc, &f).await;
        let (primary, secondary) = keys(&put);
        assert!(
            primary.is_some() && secondary.is_some(),
            "keys are generated"
        );
        let ts = azure_timestamp(NOW);
        assert_eq!(put.settings.created_date_time_utc.as_deref(), Some(&*ts));
        assert_eq!(
            put.settings.last_updated_date_time_utc.as_deref(),
            Some(&*ts)
        );
        let got: IndividualEnrollment = uc.get("default", "dev-1").await.unwrap();
        assert_eq!(got.registration_id, "dev-1");
        assert_eq!(got.settings.etag, put.settings.etag);
        assert_eq!(keys(&got), (None, None), "reads do not show keys");
        let m = uc
            .attestation_mechanism::<IndividualEnrollment>("default", "dev-1")
            .await
            .unwrap();
        assert_eq!(m.symmetric_key.unwrap().primary_key, primary);
        let audit =
            f.cx.repo
                .store
                .list_audit(&AuditQuery {
                    instance: Some("default".into()),
                    since: None,
                    target_id: Some("dev-1".into()),
                    action_prefix: None,
                    after_seq: None,
                    limit: 10,
                })
                .await
                .unwrap();
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].action, "enrollment.create");
        assert_eq!(audit[0].timestamp, ts);
        let missing = uc.get::<IndividualEnrollment>("default", "nobody").await;
        assert!(matches!(
            missing,
            Err(Error::NotFound {
                kind: "enrollment",
                ..
            })
        ));
    }

    #[tokio::test]
    async fn if_match_mismatch_fails_the_precondition() {
        let f = fixture(2).await;
        let uc = enrollments(&f);
        let first = put_dev1(&uc, &f).await;
        let stale = Expect::Etag("not-the-etag".into());
        let r = uc.put(&f.caller, "dev-1", symmetric("dev-1"), stale).await;
        assert!(matches!(r, Err(Error::PreconditionFailed { .. })), "{r:?}");
        let current = Expect::Etag(first.settings.etag.clone().unwrap());
        let second = uc
            .put(&f.caller, "dev-1", symmetric("dev-1"), current)
            .await
            .unwrap();
        assert_ne!(second.settings.etag, first.settings.etag);
        let r = uc
            .delete::<IndividualEnrollment>(&f.caller, "dev-1", Expect::Etag("old".into()))
            .await;
        assert!(matches!(r, Err(Error::PreconditionFailed { .. })), "{r:?}");
        uc.delete::<IndividualEnrollment>(&f.caller, "dev-1", Expect::Any)
            .await
            .unwrap();
        let r = uc
            .delete::<IndividualEnrollment>(&f.caller, "dev-1", Expect::Any)
            .await;
        assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn create_only_conflicts_when_present() {
        let f = fixture(3).await;
        let uc = enrollments(&f);
        uc.put(&f.caller, "g1", group("g1"), Expect::Absent)
            .await
            .unwrap();
        let r = uc.put(&f.caller, "g1", group("g1"), Expect::Absent).await;
        assert!(
            matches!(
                r,
                Err(Error::Conflict {
                    kind: "enrollment group",
                    ..
                })
            ),
            "{r:?}"
        );
        let r = uc.put(&f.caller, "g2", group("g2"), Expect::Present).await;
        assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn group_writes_invalidate_the_catalog() {
        let f = fixture(4).await;
        let uc = enrollments(&f);
        let cached = || async { f.catalog.groups("default", "symmetricKey").await.unwrap() };
        assert!(cached().await.is_empty());
        uc.put(&f.caller, "g1", group("g1"), Expect::Any)
            .await
            .unwrap();
        assert_eq!(
            cached().await.len(),
            1,
            "the write dropped the cached (empty) list"
        );
        uc.delete::<EnrollmentGroup>(&f.caller, "g1", Expect::Any)
            .await
            .unwrap();
        assert!(cached().await.is_empty());
    }

    #[tokio::test]
    async fn individual_writes_invalidate_the_catalog() {
        // A group-only instance skips the lookup of individual enrollments; the first one
        // created must be seen at once, and its deletion too.
        let f = fixture(4).await;
        let uc = enrollments(&f);
        let any = || async {
            f.catalog
                .has_individual_enrollments("default")
                .await
                .unwrap()
        };
        assert!(!any().await);
        put_dev1(&uc, &f).await;
        assert!(any().await, "the create dropped the cached answer");
        uc.delete::<IndividualEnrollment>(&f.caller, "dev-1", Expect::Any)
            .await
            .unwrap();
        assert!(!any().await, "the delete dropped the cached answer");
    }

    #[tokio::test]
    async fn keys_and_etags_follow_the_seed() {
        let put = |seed| async move {
            let f = fixture(seed).await;
            put_dev1(&enrollments(&f), &f).await
        };
        let (a, b, c) = (put(7).await, put(7).await, put(8).await);
        assert_eq!(keys(&a), keys(&b));
        assert_eq!(a.settings.etag, b.settings.etag);
        assert_ne!(keys(&a), keys(&c));
        assert!(dps_core::sas::valid_key(&keys(&a).0.unwrap()));
    }

    #[tokio::test]
    async fn path_and_body_must_agree() {
        let f = fixture(5).await;
        let r = enrollments(&f)
            .put(&f.caller, "dev-1", symmetric("dev-2"), Expect::Any)
            .await;
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    }

    #[tokio::test]
    async fn bulk_reports_failed_items_and_caps_their_number() {
        let f = fixture(6).await;
        let uc = enrollments(&f);
        let items = vec![
            serde_json::json!({"registrationId": "a", "attestation": {"type": "symmetricKey"}}),
            serde_json::json!({"registrationId": "b", "attestation": {"type": "none"}}),
        ];
        let failed = uc
            .bulk::<IndividualEnrollment>(&f.caller, BulkMode::Create, items)
            .await
            .unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, "b");
        assert!(uc.get::<IndividualEnrollment>("default", "a").await.is_ok());
        let too_many = vec![serde_json::json!({}); MAX_BULK_ITEMS + 1];
        let r = uc
            .bulk::<IndividualEnrollment>(&f.caller, BulkMode::Create, too_many)
            .await;
        assert!(matches!(r, Err(Error::InvalidArgument(_))));
    }
}

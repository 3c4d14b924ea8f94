//! An instance's CA certificates, with Azure's proof-of-possession flow (upload, generate a
//! verification code, prove possession of the CA's key with a certificate whose CN is that
//! code: the CA becomes verified; only verified CAs admit devices through `caReferences`), and
//! the instance's revocation deny list (beyond Azure).
//!
//! This module owns the stored shapes ([`StoredCa`], [`DenyEntry`]), their timestamps, ETags and
//! verification codes (from the injected clock and randomness), the audit entries, and dropping
//! the catalog's cached X.509 material when any of it changes. It also loads that material for
//! the catalog ([`load_cas`], [`load_deny_list`]).
//!
//! It must not depend on HTTP or the front ends (see [`crate::usecases`]).

use super::{Caller, Context};
use crate::catalog::Catalog;
use crate::repo::Repo;
use base64::Engine as _;
use dps_core::model::X509CertificateInfo;
use dps_core::store::{Collection, DocIndex, Expect, Filter};
use dps_core::x509::verify::{CaCertificate, DenyList};
use dps_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A stored CA certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredCa {
    /// Name (what `caReferences` names).
    pub name: String,
    /// Base64 DER.
    pub certificate: String,
    /// Parsed info.
    pub info: X509CertificateInfo,
    /// Proof of possession done.
    pub is_verified: bool,
    /// The outstanding verification code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_code: Option<String>,
    /// Created.
    pub created: String,
    /// Updated.
    pub updated: String,
}

impl StoredCa {
    /// The public view (the certificate body left out).
    pub fn public(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name, "isVerified": self.is_verified, "info": self.info,
            "verificationCode": self.verification_code, "created": self.created, "updated": self.updated,
        })
    }
}

/// A deny-list entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DenyEntry {
    /// `thumbprint` or `serial`.
    pub kind: String,
    /// Hex value as given.
    pub value: String,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Added.
    pub created: String,
}

/// The instance's CA certificates, for attestation.
pub async fn load_cas(repo: &Repo, instance: &str) -> Result<Vec<CaCertificate>> {
    let all = repo
        .all::<StoredCa>(Collection::Certificate, instance, &Filter::default())
        .await?;
    Ok(all
        .into_iter()
        .filter_map(|(c, _)| {
            let der = base64::engine::general_purpose::STANDARD
                .decode(&c.certificate)
                .ok()?;
            Some(CaCertificate {
                name: c.name,
                der,
                verified: c.is_verified,
            })
        })
        .collect())
}

/// The instance's deny list, for attestation.
pub async fn load_deny_list(repo: &Repo, instance: &str) -> Result<DenyList> {
    let all = repo
        .all::<DenyEntry>(Collection::DenyList, instance, &Filter::default())
        .await?;
    let mut d = DenyList::new();
    for (e, _) in all {
        if e.kind == "serial" {
            d.add_serial(&e.value);
        } else {
            d.add_thumbprint(&e.value);
        }
    }
    Ok(d)
}

/// CA certificates and the deny list.
pub struct Certificates {
    cx: Context,
    catalog: Arc<Catalog>,
}

impl Certificates {
    /// In `cx`, with the catalog whose X.509 material it invalidates.
    pub fn new(cx: Context, catalog: Arc<Catalog>) -> Self {
        Certificates { cx, catalog }
    }

    async fn record(
        &self,
        caller: &Caller,
        instance: &str,
        action: &str,
        id: &str,
        before: Option<serde_json::Value>,
        after: Option<serde_json::Value>,
    ) {
        self.cx
            .audit
            .record(
                instance,
                &caller.policy,
                action,
                "certificate",
                id,
                before.as_ref(),
                after.as_ref(),
            )
            .await
    }

    /// A CA or deny-list entry of the instance changed: effective at once on this node (other
    /// nodes sharing the store see it within the catalog's lifetime).
    fn changed(&self, instance: &str) {
        self.catalog.x509_changed(instance);
    }

    /// The instance's CA certificates.
    pub async fn list(&self, instance: &str) -> Result<Vec<StoredCa>> {
        Ok(self
            .cx
            .repo
            .all::<StoredCa>(Collection::Certificate, instance, &Filter::default())
            .await?
            .into_iter()
            .map(|(c, _)| c)
            .collect())
    }

    /// One CA certificate.
    pub async fn get(&self, instance: &str, name: &str) -> Result<StoredCa> {
        self.cx
            .repo
            .get::<StoredCa>(Collection::Certificate, instance, name)
            .await?
            .map(|(c, _)| c)
            .ok_or_else(|| Error::not_found("CA certificate", name))
    }

    async fn store(&self, instance: &str, c: &StoredCa) -> Result<()> {
        let index = DocIndex {
            status: Some(
                if c.is_verified {
                    "verified"
                } else {
                    "unverified"
                }
                .into(),
            ),
            ..Default::default()
        };
        self.cx
            .repo
            .put(
                Collection::Certificate,
                instance,
                &c.name,
                &self.cx.etag(),
                c,
                index,
                Expect::Any,
            )
            .await?;
        self.changed(instance);
        Ok(())
    }

    /// Upload (or replace) a CA certificate (DER); `verified` skips proof of possession.
    pub async fn put(
        &self,
        caller: &Caller,
        instance: &str,
        name: &str,
        der: &[u8],
        verified: bool,
    ) -> Result<StoredCa> {
        let info =
            dps_core::x509::certificate_info(der).map_err(|e| Error::invalid(e.to_string()))?;
        let before = self
            .cx
            .repo
            .get::<StoredCa>(Collection::Certificate, instance, name)
            .await?
            .map(|(c, _)| c);
        let now = self.cx.now();
        let c = StoredCa {
            name: name.to_string(),
            certificate: base64::engine::general_purpose::STANDARD.encode(der),
            info,
            is_verified: verified,
            verification_code: None,
            created: before
                .as_ref()
                .map(|b| b.created.clone())
                .unwrap_or_else(|| now.clone()),
            updated: now,
        };
        self.store(instance, &c).await?;
        self.record(
            caller,
            instance,
            "certificate.put",
            &c.name,
            before.as_ref().map(StoredCa::public),
            Some(c.public()),
        )
        .await;
        Ok(c)
    }

    /// Remove a CA certificate.
    pub async fn delete(&self, caller: &Caller, instance: &str, name: &str) -> Result<()> {
        let old = self
            .cx
            .repo
            .store
            .delete(Collection::Certificate, instance, name, Expect::Present)
            .await
            .map_err(|_| Error::not_found("CA certificate", name))?;
        self.changed(instance);
        let before = old
            .and_then(|d| serde_json::from_str::<StoredCa>(&d.body).ok())
            .map(|c| c.public());
        self.record(caller, instance, "certificate.delete", name, before, None)
            .await;
        Ok(())
    }

    /// Give a CA a fresh verification code (the CN the proof-of-possession certificate must
    /// carry); the CA and the code.
    pub async fn generate_verification_code(
        &self,
        caller: &Caller,
        instance: &str,
        name: &str,
    ) -> Result<(StoredCa, String)> {
        let mut c = self.get(instance, name).await?;
        let mut code = [0u8; 16];
        self.cx.random.fill(&mut code);
        let code = hex::encode_upper(code);
        c.verification_code = Some(code.clone());
        c.updated = self.cx.now();
        self.store(instance, &c).await?;
        self.record(
            caller,
            instance,
            "certificate.verification_code",
            &c.name,
            None,
            Some(c.public()),
        )
        .await;
        Ok((c, code))
    }

    /// Verify a CA with the proof-of-possession certificate (DER, or why the request's
    /// certificate could not be read: reported only once the CA has an outstanding code).
    pub async fn verify(
        &self,
        caller: &Caller,
        instance: &str,
        name: &str,
        proof: Result<Vec<u8>>,
    ) -> Result<StoredCa> {
        let mut c = self.get(instance, name).await?;
        let code = c
            .verification_code
            .clone()
            .ok_or_else(|| Error::invalid("generate a verification code first"))?;
        let vder = proof?;
        let ca_der = base64::engine::general_purpose::STANDARD
            .decode(&c.certificate)
            .map_err(|e| Error::Internal(e.to_string()))?;
        dps_core::x509::verify::verify_pop(&ca_der, &vder, &code, self.cx.clock.now())
            .map_err(|f| Error::invalid(format!("proof of possession failed: {f}")))?;
        c.is_verified = true;
        c.verification_code = None;
        c.updated = self.cx.now();
        self.store(instance, &c).await?;
        self.record(
            caller,
            instance,
            "certificate.verified",
            &c.name,
            None,
            Some(c.public()),
        )
        .await;
        Ok(c)
    }

    /// The instance's deny list.
    pub async fn deny_list(&self, instance: &str) -> Result<Vec<DenyEntry>> {
        Ok(self
            .cx
            .repo
            .all::<DenyEntry>(Collection::DenyList, instance, &Filter::default())
            .await?
            .into_iter()
            .map(|(e, _)| e)
            .collect())
    }

    /// Deny a certificate by thumbprint (the default `kind`) or serial number (hex `value`).
    pub async fn deny(
        &self,
        caller: &Caller,
        instance: &str,
        value: &str,
        kind: Option<&str>,
        reason: Option<String>,
    ) -> Result<DenyEntry> {
        let kind = kind.unwrap_or("thumbprint").to_ascii_lowercase();
        if kind != "thumbprint" && kind != "serial" {
            return Err(Error::invalid("kind must be 'thumbprint' or 'serial'"));
        }
        if value.is_empty() || !value.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return Err(Error::invalid(
                "the deny-list value must be hex (a thumbprint or a serial number)",
            ));
        }
        let e = DenyEntry {
            kind,
            value: value.to_string(),
            reason,
            created: self.cx.now(),
        };
        self.cx
            .repo
            .put(
                Collection::DenyList,
                instance,
                value,
                &self.cx.etag(),
                &e,
                DocIndex::default(),
                Expect::Any,
            )
            .await?;
        self.changed(instance);
        let after = serde_json::to_value(&e).map_err(|e| Error::Internal(e.to_string()))?;
        self.record(caller, instance, "denylist.add", value, None, Some(after))
            .await;
        Ok(e)
    }

    /// Remove a deny-list entry.
    pub async fn allow(&self, caller: &Caller, instance: &str, value: &str) -> Result<()> {
        let old = self
            .cx
            .repo
            .store
            .delete(Collection::DenyList, instance, value, Expect::Any)
            .await?;
        let Some(old) = old else {
            return Err(Error::not_found("deny-list entry", value));
        };
        self.changed(instance);
        self.record(
            caller,
            instance,
            "denylist.remove",
            value,
            serde_json::from_str(&old.body).ok(),
            None,
        )
        .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usecases::testing::fixture;

    #[tokio::test]
    async fn deny_list_entries_are_checked_and_reach_the_catalog() {
        let f = fixture(1).await;
        let uc = Certificates::new(f.cx.clone(), f.catalog.clone());
        let r = uc
            .deny(&f.caller, "default", "ABCD", Some("fingerprint"), None)
            .await;
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        let r = uc.deny(&f.caller, "default", "xyz", None, None).await;
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        assert!(f.catalog.x509("default").await.unwrap().deny.is_empty());
        let e = uc
            .deny(
                &f.caller,
                "default",
                "AB:CD",
                Some("Serial"),
                Some("lost".into()),
            )
            .await
            .unwrap();
        assert_eq!(e.kind, "serial");
        assert_eq!(
            e.created,
            dps_core::clock::azure_timestamp(crate::usecases::testing::NOW)
        );
        assert_eq!(uc.deny_list("default").await.unwrap().len(), 1);
        assert!(
            !f.catalog.x509("default").await.unwrap().deny.is_empty(),
            "the entry dropped the cached (empty) list"
        );
        uc.allow(&f.caller, "default", "AB:CD").await.unwrap();
        assert!(f.catalog.x509("default").await.unwrap().deny.is_empty());
        let r = uc.allow(&f.caller, "default", "AB:CD").await;
        assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn verification_needs_a_code_first() {
        let f = fixture(2).await;
        let uc = Certificates::new(f.cx.clone(), f.catalog.clone());
        let r = uc.verify(&f.caller, "default", "root", Ok(vec![])).await;
        assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
        let r = uc
            .generate_verification_code(&f.caller, "default", "root")
            .await;
        assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
        let r = uc.delete(&f.caller, "default", "root").await;
        assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
    }
}

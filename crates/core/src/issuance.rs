//! Certificate issuance at registration (api-version `2025-07-01-preview`): an instance's
//! credential policies and the checks a device's certificate signing request (CSR) must pass
//! before dps signs it.
//!
//! A device sends `csr` (base64 DER PKCS#10, no PEM armour) with its registration; its
//! enrollment names a credential policy (`credentialPolicyName`). The CSR must be validly
//! self-signed, carry a key of a type the policy accepts, and name the registration id as its
//! subject CN. Signing is the server's (it holds the CA key); this module only decides.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{OID_EC_P256, OID_NIST_EC_P384};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

/// Largest CSR accepted (DER bytes). An RSA-4096 CSR is about 1.2 KB.
pub const MAX_CSR_DER: usize = 8 * 1024;

/// A key type a credential policy accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyType {
    /// ECDSA on NIST P-256.
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    /// ECDSA on NIST P-384.
    #[serde(rename = "ecdsa-p384")]
    EcdsaP384,
    /// RSA, at least the policy's `rsa_min_bits` (2048 or more).
    #[serde(rename = "rsa")]
    Rsa,
}

impl KeyType {
    /// Every key type.
    pub const ALL: [KeyType; 3] = [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Rsa];
    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Rsa => "rsa",
        }
    }
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_key_types() -> Vec<KeyType> {
    KeyType::ALL.to_vec()
}
fn default_rsa_min_bits() -> u32 {
    2048
}
fn default_validity_days() -> u32 {
    30
}
fn default_min_renewal_interval() -> u64 {
    60
}
fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}

/// A credential policy of an instance: which CA signs, what it accepts, what it issues.
/// Snake case, like the rest of the instance (config file `[[instance.credential_policy]]`,
/// admin API instance JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct CredentialPolicy {
    /// Name (what an enrollment's `credentialPolicyName` refers to).
    pub name: String,
    /// Key types accepted in CSRs (default: all of `ecdsa-p256`, `ecdsa-p384`, `rsa`).
    #[serde(default = "default_key_types")]
    pub key_types: Vec<KeyType>,
    /// Smallest RSA modulus accepted, in bits (default 2048, never less).
    #[serde(default = "default_rsa_min_bits")]
    pub rsa_min_bits: u32,
    /// Validity of issued certificates, in days (default 30).
    #[serde(default = "default_validity_days")]
    pub validity_days: u32,
    /// A device gets at most one certificate per this many seconds (default 60); a CSR sooner
    /// is answered 429 with the wait.
    #[serde(default = "default_min_renewal_interval")]
    pub min_renewal_interval_secs: u64,
    /// Put the device id in a subjectAltName (URI `urn:dps:device:{deviceId}`; default true).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub san_device_id: bool,
    /// PEM file of the issuing CA certificate; absent: dps generates a CA for the policy and
    /// keeps it in its store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificate_file: Option<String>,
    /// PEM file of the issuing CA's private key (with `ca_certificate_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_key_file: Option<String>,
    /// PEM file of the certificates above the issuing CA (an intermediate's issuers up to the
    /// operator's root), appended to every issued chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_chain_file: Option<String>,
}

impl CredentialPolicy {
    /// A policy with the defaults and a generated CA.
    pub fn new(name: &str) -> Self {
        CredentialPolicy {
            name: name.to_string(),
            key_types: default_key_types(),
            rsa_min_bits: default_rsa_min_bits(),
            validity_days: default_validity_days(),
            min_renewal_interval_secs: default_min_renewal_interval(),
            san_device_id: true,
            ca_certificate_file: None,
            ca_key_file: None,
            ca_chain_file: None,
        }
    }

    /// Is the policy well formed? The reason when not.
    pub fn check(&self) -> Result<(), String> {
        let at = |m: &str| Err(format!("credential_policy '{}': {m}", self.name));
        if self.name.trim().is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            return Err(format!(
                "credential_policy name '{}' must be letters, digits, '-', '.' or '_'",
                self.name
            ));
        }
        if self.key_types.is_empty() {
            return at("key_types must not be empty");
        }
        if self.rsa_min_bits < 2048 || self.rsa_min_bits > 16384 {
            return at("rsa_min_bits must be 2048 to 16384");
        }
        if !(1..=3650).contains(&self.validity_days) {
            return at("validity_days must be 1 to 3650");
        }
        if self.ca_certificate_file.is_some() != self.ca_key_file.is_some() {
            return at("ca_certificate_file and ca_key_file go together");
        }
        if self.ca_chain_file.is_some() && self.ca_certificate_file.is_none() {
            return at("ca_chain_file needs ca_certificate_file and ca_key_file");
        }
        Ok(())
    }

    /// Does it use a CA dps generated (rather than a configured one)?
    pub fn generated_ca(&self) -> bool {
        self.ca_certificate_file.is_none()
    }
}

/// Why a CSR was refused. Client mistakes: the wire says 400 with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not base64, or PEM armour.
    #[error("'csr' must be the base64 of a DER PKCS#10 request (no PEM armour)")]
    Encoding,
    /// Too large.
    #[error("'csr' is larger than {MAX_CSR_DER} bytes")]
    TooLarge,
    /// Not a PKCS#10 request.
    #[error("'csr' is not a PKCS#10 certificate signing request: {0}")]
    Parse(String),
    /// The request's self-signature does not verify.
    #[error("the CSR's signature does not verify")]
    Signature,
    /// The key is not of a type the policy accepts.
    #[error("the CSR's key ({found}) is not accepted by credential policy '{policy}' (accepted: {accepted})")]
    KeyType {
        /// What the CSR carries.
        found: String,
        /// The policy.
        policy: String,
        /// What it accepts.
        accepted: String,
    },
    /// An RSA key below the policy's minimum.
    #[error(
        "the CSR's RSA key has {bits} bits; credential policy '{policy}' needs at least {min}"
    )]
    RsaTooSmall {
        /// Its size.
        bits: usize,
        /// The minimum.
        min: u32,
        /// The policy.
        policy: String,
    },
    /// The subject CN is not the registration id.
    #[error("the CSR's subject CN ({found}) must be the registration id '{expected}'")]
    CommonName {
        /// The CN found (`none` when absent).
        found: String,
        /// The registration id.
        expected: String,
    },
}

/// A CSR that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCsr {
    /// The request (DER).
    pub der: Vec<u8>,
    /// Its key type.
    pub key_type: KeyType,
    /// Its key size in bits.
    pub key_bits: usize,
}

/// Decode the `csr` field: base64 of DER, no PEM armour, at most [`MAX_CSR_DER`] bytes.
pub fn decode_csr(field: &str) -> Result<Vec<u8>, CsrError> {
    if field.contains("-----") {
        return Err(CsrError::Encoding);
    }
    // Base64 of MAX_CSR_DER bytes (plus line breaks some encoders add).
    if field.len() > MAX_CSR_DER / 3 * 4 + 512 {
        return Err(CsrError::TooLarge);
    }
    let compact: String = field.chars().filter(|c| !c.is_whitespace()).collect();
    let der = B64.decode(compact).map_err(|_| CsrError::Encoding)?;
    if der.len() > MAX_CSR_DER {
        return Err(CsrError::TooLarge);
    }
    Ok(der)
}

/// Check a CSR (DER) for `registration_id` against `policy`: it parses, its self-signature
/// verifies, its key is of an accepted type and size, and its subject CN is the registration
/// id. Nothing else in the request is used: the issued certificate's subject, extensions and
/// validity come from dps (see the server's issuer).
pub fn check_csr(
    der: &[u8],
    registration_id: &str,
    policy: &CredentialPolicy,
) -> Result<CheckedCsr, CsrError> {
    if der.len() > MAX_CSR_DER {
        return Err(CsrError::TooLarge);
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Parse("trailing bytes after the request".into()));
    }
    csr.verify_signature().map_err(|_| CsrError::Signature)?;
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let parsed = spki
        .parsed()
        .map_err(|e| CsrError::Parse(format!("public key: {e}")))?;
    let (key_type, bits) = match &parsed {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(c) if c == OID_EC_P256 => (Some(KeyType::EcdsaP256), point.key_size()),
                Some(c) if c == OID_NIST_EC_P384 => (Some(KeyType::EcdsaP384), point.key_size()),
                Some(c) => {
                    return Err(key_type_error(policy, format!("EC curve {c}")));
                }
                None => return Err(key_type_error(policy, "EC without a named curve".into())),
            }
        }
        PublicKey::RSA(rsa) => (Some(KeyType::Rsa), rsa.key_size()),
        PublicKey::DSA(_) => (None, 0),
        PublicKey::GostR3410(_) | PublicKey::GostR3410_2012(_) => (None, 0),
        PublicKey::Unknown(_) => (None, 0),
    };
    let key_type = match key_type {
        Some(k) if policy.key_types.contains(&k) => k,
        Some(k) => return Err(key_type_error(policy, k.as_str().to_string())),
        None => {
            return Err(key_type_error(
                policy,
                format!("algorithm {}", spki.algorithm.algorithm),
            ))
        }
    };
    if key_type == KeyType::Rsa && bits < policy.rsa_min_bits as usize {
        return Err(CsrError::RsaTooSmall {
            bits,
            min: policy.rsa_min_bits,
            policy: policy.name.clone(),
        });
    }
    let mut cns = info.subject.iter_common_name();
    let cn = cns.next().map(|a| a.as_str().map(str::to_string));
    let found = match (cn, cns.next()) {
        (Some(Ok(cn)), None) => cn,
        (Some(Ok(cn)), Some(_)) => format!("{cn} and more than one CN"),
        (Some(Err(_)), _) => "not a string".to_string(),
        (None, _) => "none".to_string(),
    };
    if found != registration_id {
        return Err(CsrError::CommonName {
            found,
            expected: registration_id.to_string(),
        });
    }
    Ok(CheckedCsr {
        der: der.to_vec(),
        key_type,
        key_bits: bits,
    })
}

fn key_type_error(policy: &CredentialPolicy, found: String) -> CsrError {
    CsrError::KeyType {
        found,
        policy: policy.name.clone(),
        accepted: policy
            .key_types
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

    fn csr_for(cn: Option<&str>, alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        dn.push(DnType::OrganizationName, "factory");
        params.distinguished_name = dn;
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn ecdsa_csrs_with_the_registration_id_pass() {
        let p = CredentialPolicy::new("devices");
        let der = csr_for(Some("dev-1"), &rcgen::PKCS_ECDSA_P256_SHA256);
        let c = check_csr(&der, "dev-1", &p).unwrap();
        assert_eq!((c.key_type, c.key_bits), (KeyType::EcdsaP256, 256));
        let der = csr_for(Some("dev-1"), &rcgen::PKCS_ECDSA_P384_SHA384);
        let c = check_csr(&der, "dev-1", &p).unwrap();
        assert_eq!((c.key_type, c.key_bits), (KeyType::EcdsaP384, 384));
        // The field as sent on the wire.
        let field = B64.encode(&der);
        assert_eq!(decode_csr(&field).unwrap(), der);
    }

    #[test]
    fn the_common_name_must_be_the_registration_id() {
        let p = CredentialPolicy::new("devices");
        let der = csr_for(Some("dev-2"), &rcgen::PKCS_ECDSA_P256_SHA256);
        let e = check_csr(&der, "dev-1", &p).unwrap_err();
        assert_eq!(
            e,
            CsrError::CommonName {
                found: "dev-2".into(),
                expected: "dev-1".into()
            }
        );
        let der = csr_for(None, &rcgen::PKCS_ECDSA_P256_SHA256);
        assert!(matches!(
            check_csr(&der, "dev-1", &p),
            Err(CsrError::CommonName { found, .. }) if found == "none"
        ));
    }

    #[test]
    fn key_types_outside_the_policy_are_refused() {
        let mut p = CredentialPolicy::new("p384-only");
        p.key_types = vec![KeyType::EcdsaP384];
        let der = csr_for(Some("dev-1"), &rcgen::PKCS_ECDSA_P256_SHA256);
        let e = check_csr(&der, "dev-1", &p).unwrap_err();
        assert!(
            matches!(&e, CsrError::KeyType { found, accepted, .. } if found == "ecdsa-p256" && accepted == "ecdsa-p384"),
            "{e}"
        );
        let der = csr_for(Some("dev-1"), &rcgen::PKCS_ED25519);
        assert!(matches!(
            check_csr(&der, "dev-1", &p),
            Err(CsrError::KeyType { .. })
        ));
    }

    #[test]
    fn rsa_keys_are_checked_against_the_policy_minimum() {
        // rcgen (aws-lc-rs) generates RSA-2048 keys.
        let der = csr_for(Some("dev-rsa"), &rcgen::PKCS_RSA_SHA256);
        let p = CredentialPolicy::new("devices");
        let c = check_csr(&der, "dev-rsa", &p).unwrap();
        assert_eq!((c.key_type, c.key_bits), (KeyType::Rsa, 2048));
        let mut p3072 = CredentialPolicy::new("strict");
        p3072.rsa_min_bits = 3072;
        assert!(matches!(
            check_csr(&der, "dev-rsa", &p3072),
            Err(CsrError::RsaTooSmall {
                bits: 2048,
                min: 3072,
                ..
            })
        ));
        let mut ec_only = CredentialPolicy::new("ec");
        ec_only.key_types = vec![KeyType::EcdsaP256, KeyType::EcdsaP384];
        assert!(matches!(
            check_csr(&der, "dev-rsa", &ec_only),
            Err(CsrError::KeyType { .. })
        ));
    }

    #[test]
    fn a_tampered_csr_fails_its_signature() {
        let p = CredentialPolicy::new("devices");
        let mut der = csr_for(Some("dev-1"), &rcgen::PKCS_ECDSA_P256_SHA256);
        // Change one byte of the subject ("dev-1" → "dev-2"): the signature no longer covers it.
        let at = der.windows(5).position(|w| w == b"dev-1").unwrap();
        der[at + 4] = b'2';
        assert_eq!(check_csr(&der, "dev-2", &p), Err(CsrError::Signature));
    }

    #[test]
    fn encodings_other_than_base64_der_are_refused() {
        assert_eq!(
            decode_csr(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----"
            ),
            Err(CsrError::Encoding)
        );
        assert_eq!(decode_csr("not base64!"), Err(CsrError::Encoding));
        let big = B64.encode(vec![0u8; MAX_CSR_DER + 1]);
        assert_eq!(decode_csr(&big), Err(CsrError::TooLarge));
        let p = CredentialPolicy::new("devices");
        assert!(matches!(
            check_csr(b"\x30\x03\x02\x01\x00", "d", &p),
            Err(CsrError::Parse(_))
        ));
    }

    #[test]
    fn policies_are_checked() {
        assert!(CredentialPolicy::new("ok-1.a_b").check().is_ok());
        assert!(CredentialPolicy::new("bad name").check().is_err());
        let mut p = CredentialPolicy::new("p");
        p.rsa_min_bits = 1024;
        assert!(p.check().unwrap_err().contains("rsa_min_bits"));
        let mut p = CredentialPolicy::new("p");
        p.ca_key_file = Some("k.pem".into());
        assert!(p.check().unwrap_err().contains("go together"));
        let mut p = CredentialPolicy::new("p");
        p.validity_days = 0;
        assert!(p.check().is_err());
        let p: CredentialPolicy =
            serde_json::from_str(r#"{"name":"x","key_types":["ecdsa-p384"]}"#).unwrap();
        assert_eq!(p.key_types, vec![KeyType::EcdsaP384]);
        assert_eq!(p.validity_days, 30);
        assert!(
            serde_json::from_str::<CredentialPolicy>(r#"{"name":"x","key_types":["dsa"]}"#)
                .is_err()
        );
    }
}

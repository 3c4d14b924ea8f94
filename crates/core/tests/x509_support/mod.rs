//! Reusable test-certificate factory (rcgen 0.14, aws-lc-rs) and enrollment builders for X.509
//! attestation tests. Copy freely.
//!
//! ```ignore
//! let root = Spec::ca("Root").alg(Alg::Rsa2048).self_signed();
//! let int = Spec::ca("Int").signed_by(&root);
//! let leaf = Spec::leaf("device-1").signed_by(&int);
//! let chain = vec![leaf.der.clone(), int.der.clone()];
//! ```
#![allow(dead_code)]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dps_core::model::{EnrollmentGroup, IndividualEnrollment, X509CertificateWithInfo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, CustomExtension, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
    PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256,
};
use time::{Duration, OffsetDateTime};

/// Key algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// ECDSA P-256 with SHA-256.
    EcdsaP256,
    /// RSA 2048 PKCS#1 v1.5 with SHA-256.
    Rsa2048,
}

/// A fresh key pair.
pub fn key(alg: Alg) -> KeyPair {
    match alg {
        Alg::EcdsaP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
        Alg::Rsa2048 => KeyPair::generate_for(&PKCS_RSA_SHA256),
    }
    .expect("key generation")
}

/// The reference "now" of the tests.
pub fn now() -> OffsetDateTime {
    // Whole seconds: X.509 times have no fractions.
    OffsetDateTime::from_unix_timestamp(OffsetDateTime::now_utc().unix_timestamp()).unwrap()
}

/// Certificate parameters under construction.
pub struct Spec {
    /// The rcgen parameters (adjust freely).
    pub params: CertificateParams,
    /// Key algorithm of the new certificate.
    pub alg: Alg,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "dps tests");
    if !cn.is_empty() {
        d.push(DnType::CommonName, cn);
    }
    d
}

impl Spec {
    fn base(cn: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(cn);
        let n = now();
        params.not_before = n - Duration::days(1);
        params.not_after = n + Duration::days(365);
        Self {
            params,
            alg: Alg::EcdsaP256,
        }
    }

    /// A CA certificate (CA:TRUE, keyCertSign + cRLSign + digitalSignature), ECDSA by default.
    /// An empty `cn` gives a subject without common name.
    pub fn ca(cn: &str) -> Self {
        let mut s = Self::base(cn);
        s.params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        s.params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        s
    }

    /// A device certificate (CA:FALSE, digitalSignature, EKU clientAuth), ECDSA by default.
    /// An empty `cn` gives a subject without common name.
    pub fn leaf(cn: &str) -> Self {
        let mut s = Self::base(cn);
        s.params.is_ca = IsCa::ExplicitNoCa;
        s.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        s.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        s
    }

    /// Key algorithm.
    pub fn alg(mut self, alg: Alg) -> Self {
        self.alg = alg;
        self
    }

    /// Validity period.
    pub fn valid(mut self, not_before: OffsetDateTime, not_after: OffsetDateTime) -> Self {
        self.params.not_before = not_before;
        self.params.not_after = not_after;
        self
    }

    /// Serial number.
    pub fn serial(mut self, serial: &[u8]) -> Self {
        self.params.serial_number = Some(SerialNumber::from_slice(serial));
        self
    }

    /// CA with a pathLenConstraint.
    pub fn path_len(mut self, n: u8) -> Self {
        self.params.is_ca = IsCa::Ca(BasicConstraints::Constrained(n));
        self
    }

    /// basicConstraints.
    pub fn basic_constraints(mut self, is_ca: IsCa) -> Self {
        self.params.is_ca = is_ca;
        self
    }

    /// keyUsage (empty: no extension).
    pub fn key_usages(mut self, ku: Vec<KeyUsagePurpose>) -> Self {
        self.params.key_usages = ku;
        self
    }

    /// extendedKeyUsage (empty: no extension).
    pub fn eku(mut self, eku: Vec<ExtendedKeyUsagePurpose>) -> Self {
        self.params.extended_key_usages = eku;
        self
    }

    /// Add an unknown critical extension.
    pub fn unknown_critical_extension(mut self) -> Self {
        let mut e = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 55555, 1], vec![5, 0]);
        e.set_criticality(true);
        self.params.custom_extensions.push(e);
        self
    }

    /// Self-sign.
    pub fn self_signed(self) -> TestCert {
        let issuer = CertifiedIssuer::self_signed(self.params, key(self.alg)).expect("self-sign");
        TestCert::from(issuer)
    }

    /// Sign with `issuer`'s key.
    pub fn signed_by(self, issuer: &TestCert) -> TestCert {
        let issuer =
            CertifiedIssuer::signed_by(self.params, key(self.alg), &issuer.issuer).expect("sign");
        TestCert::from(issuer)
    }
}

/// A generated certificate with its key (usable as an issuer).
pub struct TestCert {
    /// DER.
    pub der: Vec<u8>,
    /// rcgen issuer (certificate + key).
    pub issuer: CertifiedIssuer<'static, KeyPair>,
}

impl From<CertifiedIssuer<'static, KeyPair>> for TestCert {
    fn from(issuer: CertifiedIssuer<'static, KeyPair>) -> Self {
        Self {
            der: issuer.der().to_vec(),
            issuer,
        }
    }
}

impl TestCert {
    /// PEM certificate.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }
    /// PKCS#8 PEM private key.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }
    /// PKCS#8 DER private key.
    pub fn key_der(&self) -> Vec<u8> {
        self.issuer.key().serialize_der()
    }
    /// Base64 DER (how C# sends certificates).
    pub fn b64(&self) -> String {
        B64.encode(&self.der)
    }
    /// Uppercase hex SHA-1 thumbprint.
    pub fn sha1(&self) -> String {
        dps_core::x509::sha1_thumbprint(&self.der)
    }
    /// Uppercase hex SHA-256 thumbprint.
    pub fn sha256(&self) -> String {
        dps_core::x509::sha256_thumbprint(&self.der)
    }
}

/// A stored enrollment certificate entry, normalized as the service API stores it.
pub fn entry(der: &[u8]) -> serde_json::Value {
    let mut e = X509CertificateWithInfo {
        certificate: Some(B64.encode(der)),
        info: None,
    };
    dps_core::x509::normalize(&mut e).expect("normalize");
    serde_json::to_value(e).unwrap()
}

fn status(enabled: bool) -> &'static str {
    if enabled {
        "enabled"
    } else {
        "disabled"
    }
}

/// An individual enrollment with `clientCertificates`.
pub fn individual(
    registration_id: &str,
    primary: &[u8],
    secondary: Option<&[u8]>,
    enabled: bool,
) -> IndividualEnrollment {
    let mut cc = serde_json::json!({ "primary": entry(primary) });
    if let Some(s) = secondary {
        cc["secondary"] = entry(s);
    }
    serde_json::from_value(serde_json::json!({
        "registrationId": registration_id,
        "attestation": { "type": "x509", "x509": { "clientCertificates": cc } },
        "provisioningStatus": status(enabled),
    }))
    .unwrap()
}

/// An individual enrollment with symmetric keys.
pub fn individual_sas(registration_id: &str) -> IndividualEnrollment {
    serde_json::from_value(serde_json::json!({
        "registrationId": registration_id,
        "attestation": { "type": "symmetricKey", "symmetricKey": {
            "primaryKey": "AAAA", "secondaryKey": "BBBB" } },
    }))
    .unwrap()
}

/// An enrollment group with `signingCertificates`.
pub fn group_signing(
    id: &str,
    primary: &[u8],
    secondary: Option<&[u8]>,
    enabled: bool,
) -> EnrollmentGroup {
    let mut sc = serde_json::json!({ "primary": entry(primary) });
    if let Some(s) = secondary {
        sc["secondary"] = entry(s);
    }
    serde_json::from_value(serde_json::json!({
        "enrollmentGroupId": id,
        "attestation": { "type": "x509", "x509": { "signingCertificates": sc } },
        "provisioningStatus": status(enabled),
    }))
    .unwrap()
}

/// An enrollment group with `caReferences`.
pub fn group_ca(id: &str, primary: &str, secondary: Option<&str>) -> EnrollmentGroup {
    let mut refs = serde_json::json!({ "primary": primary });
    if let Some(s) = secondary {
        refs["secondary"] = serde_json::json!(s);
    }
    serde_json::from_value(serde_json::json!({
        "enrollmentGroupId": id,
        "attestation": { "type": "x509", "x509": { "caReferences": refs } },
    }))
    .unwrap()
}

/// A symmetric-key enrollment group (must be ignored by X.509 attestation).
pub fn group_sas(id: &str) -> EnrollmentGroup {
    serde_json::from_value(serde_json::json!({
        "enrollmentGroupId": id,
        "attestation": { "type": "symmetricKey", "symmetricKey": {
            "primaryKey": "AAAA", "secondaryKey": "BBBB" } },
    }))
    .unwrap()
}

/// A standard root → intermediate → leaf hierarchy.
pub struct Pki {
    /// Root CA.
    pub root: TestCert,
    /// Intermediate CA.
    pub int: TestCert,
    /// Device certificate, CN = registration id.
    pub leaf: TestCert,
}

impl Pki {
    /// Build one, all keys of `alg`.
    pub fn new(registration_id: &str, alg: Alg) -> Self {
        let root = Spec::ca("Test Root").alg(alg).self_signed();
        let int = Spec::ca("Test Intermediate").alg(alg).signed_by(&root);
        let leaf = Spec::leaf(registration_id).alg(alg).signed_by(&int);
        Self { root, int, leaf }
    }

    /// What a device normally sends: leaf and intermediate, no root.
    pub fn chain(&self) -> Vec<Vec<u8>> {
        vec![self.leaf.der.clone(), self.int.der.clone()]
    }
}

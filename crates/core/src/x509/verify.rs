//! X.509 attestation: chain verification, the enrollment decision, the instance deny list and CA
//! proof of possession. Pure: no I/O; the clock is an argument.
//!
//! # Decision order ([`attest`], protocol §6.4)
//!
//! 1. The leaf (first certificate the device sent over TLS) must parse and carry a subject common
//!    name of at most [`MAX_CN_LEN`] characters equal (ASCII case-insensitively) to the
//!    registration id.
//! 2. Every presented certificate is checked against the instance [`DenyList`] (SHA-1 and SHA-256
//!    thumbprints, serial number). So is the trust anchor finally chosen (a group's signing
//!    certificate or CA certificate that the device did not send).
//! 3. The leaf's validity period is checked against `now`.
//! 4. If an individual enrollment exists for the registration id, it alone decides:
//!    * it must be an X.509 enrollment, else [`CertFailure::AttestationMismatch`];
//!    * the leaf matching its `clientCertificates.primary|secondary` (SHA-1 or SHA-256
//!      thumbprint, or the stored DER) accepts the device (the TLS handshake proved possession of
//!      the key; no chain is required — self-signed device certificates are the usual case);
//!    * as an extension beyond Azure, an individual enrollment may carry `signingCertificates` or
//!      `caReferences`; the chain is then verified to them like a group's;
//!    * otherwise [`CertFailure::CertificateMismatch`]. We deliberately do **not** fall back to
//!      groups: the registration id is owned by the individual enrollment, and letting a group
//!      device take it over would mix two identities into one registration record.
//!
//!    A matching individual enrollment is returned even if it is disabled, so that an individual
//!    enrollment listing one device of a group batch overrides (e.g. disables) that device.
//! 5. Otherwise enrollment groups: the presented chain is walked upward from the first
//!    intermediate; the first certificate that is a group's signing certificate (by thumbprint),
//!    or the certificate of a CA named by a group's `caReferences`, decides; the chain is then
//!    verified to that certificate with [`verify_chain`] and its failure is final. If no presented
//!    certificate matches, the group certificates that issued the top of the presented chain are
//!    tried (devices normally send their chain *without* the root), and the first that verifies
//!    wins. A CA that is referenced but not verified is skipped and reported as
//!    [`CertFailure::CaNotVerified`] if nothing else matches.
//! 6. Nothing matched: [`CertFailure::UnknownIssuer`] when the top of the presented chain is not
//!    self-signed (typically a missing intermediate; DPS never fills intermediates in), else
//!    [`CertFailure::NoMatchingEnrollment`].
//!
//! Provisioning status is **not** decided here: the caller refuses a disabled enrollment.
//! On the wire every failure is 401002; [`CertFailure`]'s `Display` is the precise reason for the
//! registration record and the logs.

use std::borrow::Cow;
use std::collections::HashSet;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use webpki::{EndEntityCert, ExtendedKeyUsageValidator, KeyPurposeIdIter, KeyUsage};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{sha1_thumbprint, sha256_thumbprint, stored_der, thumbprint_eq};
use crate::clock::azure_timestamp;
use crate::error::AuthFailure;
use crate::model::{
    AttestationType, EnrollmentGroup, IndividualEnrollment, X509Attestation,
    X509CertificateWithInfo,
};

/// The longest accepted common name (= registration id) of an X.509 device.
pub const MAX_CN_LEN: usize = 64;

/// The most certificates a device may present (leaf included).
pub const MAX_CHAIN_LEN: usize = 10;

/// Why a certificate (chain) was refused. `Display` is the precise reason for the registration
/// record and the logs; the wire always says 401002.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertFailure {
    /// The device presented no certificate.
    #[error("no client certificate was presented")]
    NoCertificate,
    /// More certificates than [`MAX_CHAIN_LEN`], or a path too long to build.
    #[error("the certificate chain is too long")]
    ChainTooLong,
    /// A certificate does not parse.
    #[error("certificate does not parse: {0}")]
    Parse(String),
    /// The leaf has no subject common name.
    #[error("the device certificate has no subject common name")]
    NoCommonName,
    /// The leaf's common name is longer than [`MAX_CN_LEN`].
    #[error("the device certificate common name is {len} characters long; at most 64 are allowed")]
    CnTooLong {
        /// Its length in characters.
        len: usize,
    },
    /// The leaf's common name is not the registration id.
    #[error(
        "the certificate common name '{cn}' does not match the registration id '{registration_id}'"
    )]
    CnMismatch {
        /// The certificate's common name.
        cn: String,
        /// The registration id the device asked for.
        registration_id: String,
    },
    /// A certificate is on the instance deny list.
    #[error("certificate '{subject}' is revoked ({entry})")]
    Revoked {
        /// Subject of the revoked certificate.
        subject: String,
        /// The deny-list entry that matched, e.g. `SHA-1 thumbprint 0A1B…` or `serial 01F2`.
        entry: String,
    },
    /// A certificate's validity ended before now.
    #[error("certificate '{subject}' expired at {not_after}")]
    Expired {
        /// Subject of the expired certificate.
        subject: String,
        /// End of validity (Azure timestamp format).
        not_after: String,
    },
    /// A certificate's validity starts after now.
    #[error("certificate '{subject}' is not valid before {not_before}")]
    NotYetValid {
        /// Subject of the certificate.
        subject: String,
        /// Start of validity (Azure timestamp format).
        not_before: String,
    },
    /// The chain cannot be built: the issuer of a certificate is neither among the certificates
    /// the device sent nor an enrollment's signing or CA certificate.
    #[error("unknown issuer '{issuer}': not sent by the device and not the signing or verified CA certificate of any enrollment")]
    UnknownIssuer {
        /// Distinguished name of the missing issuer.
        issuer: String,
    },
    /// A signature along the chain does not verify.
    #[error("a certificate signature in the chain does not verify")]
    BadSignature,
    /// A signature algorithm or key type that is not accepted (e.g. SHA-1, RSA < 2048 bits).
    #[error("unsupported signature algorithm or key: {0}")]
    UnsupportedAlgorithm(String),
    /// A certificate used as an issuer lacks basicConstraints CA:TRUE or keyUsage keyCertSign.
    #[error("certificate '{subject}' issues certificates but is not a CA (basicConstraints CA:TRUE and keyUsage keyCertSign are required)")]
    NotACa {
        /// Subject of the offending certificate.
        subject: String,
    },
    /// The device certificate is a CA certificate.
    #[error("the device certificate is a CA certificate (basicConstraints CA:TRUE)")]
    LeafIsCa,
    /// A pathLenConstraint is exceeded.
    #[error("a CA's path length constraint is exceeded")]
    PathLenExceeded,
    /// The leaf has an extended key usage extension without clientAuth.
    #[error("the device certificate's extended key usage does not allow client authentication")]
    EkuNotClientAuth,
    /// The leaf has a key usage extension without digitalSignature.
    #[error("the device certificate's key usage does not allow digitalSignature")]
    KeyUsageNotDigitalSignature,
    /// The group references a CA certificate of the instance that has not been verified.
    #[error("CA certificate '{name}' is not verified")]
    CaNotVerified {
        /// The CA certificate's name in the instance.
        name: String,
    },
    /// An individual enrollment exists for the registration id, but none of its certificates
    /// matches the device's.
    #[error("the certificate does not match the individual enrollment '{registration_id}'")]
    CertificateMismatch {
        /// The registration id.
        registration_id: String,
    },
    /// The individual enrollment for the registration id does not use X.509.
    #[error("the individual enrollment '{registration_id}' does not use X.509 attestation")]
    AttestationMismatch {
        /// The registration id.
        registration_id: String,
    },
    /// A complete chain matched no enrollment.
    #[error("no enrollment matches the certificate chain")]
    NoMatchingEnrollment,
    /// A proof-of-possession certificate's common name is not the verification code.
    #[error("the verification certificate common name '{cn}' is not the verification code")]
    PopCodeMismatch {
        /// The certificate's common name.
        cn: String,
    },
    /// Any other certificate problem (unsupported critical extension, version…).
    #[error("invalid certificate: {0}")]
    Invalid(String),
}

impl CertFailure {
    /// A short stable reason code, for metrics labels and structured logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoCertificate => "noCertificate",
            Self::ChainTooLong => "chainTooLong",
            Self::Parse(_) => "parse",
            Self::NoCommonName => "noCommonName",
            Self::CnTooLong { .. } => "cnTooLong",
            Self::CnMismatch { .. } => "cnMismatch",
            Self::Revoked { .. } => "revoked",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "notYetValid",
            Self::UnknownIssuer { .. } => "unknownIssuer",
            Self::BadSignature => "badSignature",
            Self::UnsupportedAlgorithm(_) => "unsupportedAlgorithm",
            Self::NotACa { .. } => "notACa",
            Self::LeafIsCa => "leafIsCa",
            Self::PathLenExceeded => "pathLenExceeded",
            Self::EkuNotClientAuth => "ekuNotClientAuth",
            Self::KeyUsageNotDigitalSignature => "keyUsage",
            Self::CaNotVerified { .. } => "caNotVerified",
            Self::CertificateMismatch { .. } => "certificateMismatch",
            Self::AttestationMismatch { .. } => "attestationMismatch",
            Self::NoMatchingEnrollment => "noMatchingEnrollment",
            Self::PopCodeMismatch { .. } => "popCodeMismatch",
            Self::Invalid(_) => "invalid",
        }
    }
}

impl From<CertFailure> for AuthFailure {
    fn from(f: CertFailure) -> Self {
        match f {
            CertFailure::NoCertificate => AuthFailure::MissingCredential,
            CertFailure::Revoked { .. } => AuthFailure::Revoked(f.to_string()),
            CertFailure::AttestationMismatch { .. } => {
                AuthFailure::AttestationMismatch(f.to_string())
            }
            other => AuthFailure::Certificate(other.to_string()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deny list
// ---------------------------------------------------------------------------------------------

/// Instance-level revocation (beyond Azure): certificate thumbprints (SHA-1 or SHA-256 hex) and
/// serial numbers (hex). Entries are normalized: case, `:`/space/`-` separators and (for
/// serials) leading zeros do not matter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DenyList {
    thumbprints: HashSet<String>,
    serials: HashSet<String>,
}

fn normalize_hex(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, ':' | ' ' | '-' | '\t'))
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

fn normalize_serial(s: &str) -> String {
    let h = normalize_hex(s);
    let t = h.trim_start_matches('0');
    if t.is_empty() {
        "0".to_string()
    } else {
        t.to_string()
    }
}

impl DenyList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// A list from thumbprints and serials.
    pub fn from_entries<T, S>(
        thumbprints: impl IntoIterator<Item = T>,
        serials: impl IntoIterator<Item = S>,
    ) -> Self
    where
        T: AsRef<str>,
        S: AsRef<str>,
    {
        let mut d = Self::new();
        for t in thumbprints {
            d.add_thumbprint(t.as_ref());
        }
        for s in serials {
            d.add_serial(s.as_ref());
        }
        d
    }

    /// Deny a certificate by SHA-1 or SHA-256 thumbprint (hex, any case).
    pub fn add_thumbprint(&mut self, thumbprint: &str) {
        self.thumbprints.insert(normalize_hex(thumbprint));
    }

    /// Deny certificates by serial number (hex).
    pub fn add_serial(&mut self, serial: &str) {
        self.serials.insert(normalize_serial(serial));
    }

    /// True when nothing is denied.
    pub fn is_empty(&self) -> bool {
        self.thumbprints.is_empty() && self.serials.is_empty()
    }

    /// The matching entry (`SHA-1 thumbprint …`, `SHA-256 thumbprint …` or `serial …`) if the
    /// certificate is denied. A DER that does not parse is checked by thumbprint only.
    pub fn is_revoked(&self, der: &[u8]) -> Option<String> {
        if self.is_empty() {
            return None;
        }
        let s1 = sha1_thumbprint(der);
        if self.thumbprints.contains(&s1) {
            return Some(format!("SHA-1 thumbprint {s1}"));
        }
        let s256 = sha256_thumbprint(der);
        if self.thumbprints.contains(&s256) {
            return Some(format!("SHA-256 thumbprint {s256}"));
        }
        if let Ok((_, c)) = X509Certificate::from_der(der) {
            let serial = normalize_serial(&hex::encode_upper(c.raw_serial()));
            if self.serials.contains(&serial) {
                return Some(format!("serial {serial}"));
            }
        }
        None
    }

    fn check(&self, der: &[u8]) -> Result<(), CertFailure> {
        match self.is_revoked(der) {
            None => Ok(()),
            Some(entry) => Err(CertFailure::Revoked {
                subject: subject_of(der),
                entry,
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers over parsed certificates
// ---------------------------------------------------------------------------------------------

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CertFailure> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| CertFailure::Parse(e.to_string()))
}

fn subject_of(der: &[u8]) -> String {
    X509Certificate::from_der(der)
        .map(|(_, c)| c.subject().to_string())
        .unwrap_or_default()
}

fn unix_time(now: OffsetDateTime) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(now.unix_timestamp()).unwrap_or(0),
    ))
}

fn check_validity(c: &X509Certificate<'_>, now: OffsetDateTime) -> Result<(), CertFailure> {
    let v = c.validity();
    let t = now.unix_timestamp();
    if t < v.not_before.timestamp() {
        return Err(CertFailure::NotYetValid {
            subject: c.subject().to_string(),
            not_before: azure_timestamp(v.not_before.to_datetime()),
        });
    }
    if t > v.not_after.timestamp() {
        return Err(CertFailure::Expired {
            subject: c.subject().to_string(),
            not_after: azure_timestamp(v.not_after.to_datetime()),
        });
    }
    Ok(())
}

/// Require `c` to be usable as an issuer: basicConstraints CA:TRUE, and keyCertSign when a
/// keyUsage extension is present.
fn check_issuer(c: &X509Certificate<'_>) -> Result<(), CertFailure> {
    let not_a_ca = || CertFailure::NotACa {
        subject: c.subject().to_string(),
    };
    let bc = c
        .basic_constraints()
        .map_err(|e| CertFailure::Parse(e.to_string()))?;
    if !bc.is_some_and(|b| b.value.ca) {
        return Err(not_a_ca());
    }
    let ku = c
        .key_usage()
        .map_err(|e| CertFailure::Parse(e.to_string()))?;
    if ku.is_some_and(|k| !k.value.key_cert_sign()) {
        return Err(not_a_ca());
    }
    Ok(())
}

fn path_len(c: &X509Certificate<'_>) -> Option<u32> {
    c.basic_constraints()
        .ok()
        .flatten()
        .and_then(|b| b.value.path_len_constraint)
}

/// The subject common name of a parsed certificate (first CN attribute that is a string).
fn cn_of(c: &X509Certificate<'_>) -> Option<String> {
    c.subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_string)
}

/// Follow issuer → subject links from the leaf through the presented chain. Returns the index
/// of the last certificate reached (the top of the chain as actually linked).
fn chain_top(chain: &[Vec<u8>]) -> usize {
    let parsed: Vec<Option<X509Certificate<'_>>> = chain
        .iter()
        .map(|d| X509Certificate::from_der(d).ok().map(|(_, c)| c))
        .collect();
    let mut cur = 0usize;
    let mut visited = vec![0usize];
    loop {
        let Some(Some(c)) = parsed.get(cur) else {
            return cur;
        };
        if c.subject().as_raw() == c.issuer().as_raw() {
            return cur;
        }
        let next = parsed.iter().enumerate().find(|(i, p)| {
            !visited.contains(i)
                && p.as_ref()
                    .is_some_and(|p| p.subject().as_raw() == c.issuer().as_raw())
        });
        match next {
            Some((i, _)) => {
                visited.push(i);
                cur = i;
            }
            None => return cur,
        }
    }
}

/// The DN of the first issuer missing from the presented chain.
fn missing_issuer(chain: &[Vec<u8>]) -> String {
    chain
        .get(chain_top(chain))
        .map(|d| {
            X509Certificate::from_der(d)
                .map(|(_, c)| c.issuer().to_string())
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

/// Accept any extended key usage (proof-of-possession certificates).
struct AnyEku;

impl ExtendedKeyUsageValidator for AnyEku {
    fn validate(&self, _iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        Ok(())
    }
}

/// Translate a webpki failure into a precise reason. `certs` are every certificate that may be in
/// the path (presented chain then anchor), used to name the offending certificate.
#[allow(deprecated)]
fn map_webpki(e: webpki::Error, chain: &[Vec<u8>], anchor: &[u8]) -> CertFailure {
    use webpki::Error as E;
    let all = || {
        chain
            .iter()
            .map(Vec::as_slice)
            .chain(std::iter::once(anchor))
    };
    match e {
        E::CertExpired { not_after, .. } => {
            let secs = not_after.as_secs();
            let c = all()
                .filter_map(|d| parse(d).ok())
                .find(|c| u64::try_from(c.validity().not_after.timestamp()).ok() == Some(secs));
            match c {
                Some(c) => CertFailure::Expired {
                    subject: c.subject().to_string(),
                    not_after: azure_timestamp(c.validity().not_after.to_datetime()),
                },
                None => CertFailure::Expired {
                    subject: String::new(),
                    not_after: secs.to_string(),
                },
            }
        }
        E::CertNotValidYet { not_before, .. } => {
            let secs = not_before.as_secs();
            let c = all()
                .filter_map(|d| parse(d).ok())
                .find(|c| u64::try_from(c.validity().not_before.timestamp()).ok() == Some(secs));
            match c {
                Some(c) => CertFailure::NotYetValid {
                    subject: c.subject().to_string(),
                    not_before: azure_timestamp(c.validity().not_before.to_datetime()),
                },
                None => CertFailure::NotYetValid {
                    subject: String::new(),
                    not_before: secs.to_string(),
                },
            }
        }
        E::UnknownIssuer => CertFailure::UnknownIssuer {
            issuer: missing_issuer(chain),
        },
        E::InvalidSignatureForPublicKey | E::SignatureAlgorithmMismatch => {
            CertFailure::BadSignature
        }
        E::UnsupportedSignatureAlgorithm
        | E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKey
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            CertFailure::UnsupportedAlgorithm(format!("{e:?}"))
        }
        E::CaUsedAsEndEntity => CertFailure::LeafIsCa,
        E::EndEntityUsedAsCa => {
            let subject = all()
                .skip(1)
                .filter_map(|d| parse(d).ok())
                .find(|c| !c.is_ca())
                .map(|c| c.subject().to_string())
                .unwrap_or_default();
            CertFailure::NotACa { subject }
        }
        E::PathLenConstraintViolated => CertFailure::PathLenExceeded,
        E::RequiredEkuNotFound | E::RequiredEkuNotFoundContext(_) | E::EmptyEkuExtension => {
            CertFailure::EkuNotClientAuth
        }
        E::MaximumPathDepthExceeded
        | E::MaximumSignatureChecksExceeded
        | E::MaximumPathBuildCallsExceeded => CertFailure::ChainTooLong,
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertFailure::Parse(format!("{e:?}")),
        other => CertFailure::Invalid(format!("{other:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Chain verification
// ---------------------------------------------------------------------------------------------

/// Verify a device chain (DER, leaf first, as sent over TLS) to one trust anchor, which may be a
/// root or an intermediate (a group's signing certificate or an instance CA certificate).
///
/// Checks: every signature (RSA PKCS#1/PSS, ECDSA P-256/P-384/P-521, Ed25519; SHA-1 and RSA keys
/// under 2048 bits are refused by webpki), the validity period of every certificate in the path
/// *and of the anchor*, basicConstraints and pathLenConstraint (the anchor's too), keyUsage
/// keyCertSign on every issuer, the leaf's EKU (clientAuth if an EKU is present) and keyUsage
/// (digitalSignature if present). Missing intermediates are not filled in. Certificates sent
/// beyond the anchor are ignored.
///
/// If the leaf *is* the anchor (self-signed device certificate) only its validity is checked.
pub fn verify_chain(
    chain: &[Vec<u8>],
    anchor_der: &[u8],
    now: OffsetDateTime,
) -> Result<(), CertFailure> {
    let leaf_der = chain.first().ok_or(CertFailure::NoCertificate)?;
    if chain.len() > MAX_CHAIN_LEN {
        return Err(CertFailure::ChainTooLong);
    }
    let leaf = parse(leaf_der)?;
    let anchor = parse(anchor_der)?;
    if leaf_der.as_slice() == anchor_der {
        return check_validity(&leaf, now);
    }
    for d in &chain[1..] {
        parse(d)?;
    }
    check_validity(&anchor, now)?;
    check_issuer(&anchor)?;

    let anchor_cd = CertificateDer::from(anchor_der);
    let ta = webpki::anchor_from_trusted_cert(&anchor_cd)
        .map_err(|e| map_webpki(e, chain, anchor_der))?;
    let leaf_cd = CertificateDer::from(leaf_der.as_slice());
    let ee = EndEntityCert::try_from(&leaf_cd).map_err(|e| map_webpki(e, chain, anchor_der))?;
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .filter(|d| d.as_slice() != anchor_der)
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let anchors = [ta];
    let path = ee
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            unix_time(now),
            KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| map_webpki(e, chain, anchor_der))?;

    // webpki ignores keyUsage and the anchor's own constraints: check them here.
    if let Some(ku) = leaf
        .key_usage()
        .map_err(|e| CertFailure::Parse(e.to_string()))?
    {
        if !ku.value.digital_signature() {
            return Err(CertFailure::KeyUsageNotDigitalSignature);
        }
    }
    let mut sub_cas: u32 = 0;
    for c in path.intermediate_certificates() {
        let der = c.der();
        check_issuer(&parse(der.as_ref())?)?;
        sub_cas += 1;
    }
    if let Some(max) = path_len(&anchor) {
        if sub_cas > max {
            return Err(CertFailure::PathLenExceeded);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Proof of possession
// ---------------------------------------------------------------------------------------------

/// Proof of possession for a CA certificate of the instance (the "verified" flag): the
/// verification certificate's common name must be `expected_code` (ASCII case-insensitive), it
/// must be signed by the CA's key, and both must be valid now. The CA must be a CA certificate.
/// Any extended key usage is accepted on the verification certificate.
pub fn verify_pop(
    ca_der: &[u8],
    verification_cert_der: &[u8],
    expected_code: &str,
    now: OffsetDateTime,
) -> Result<(), CertFailure> {
    let ca = parse(ca_der)?;
    let vc = parse(verification_cert_der)?;
    let cn = cn_of(&vc).ok_or(CertFailure::NoCommonName)?;
    if expected_code.is_empty() || !cn.eq_ignore_ascii_case(expected_code.trim()) {
        return Err(CertFailure::PopCodeMismatch { cn });
    }
    check_validity(&ca, now)?;
    check_issuer(&ca)?;
    check_validity(&vc, now)?;
    let chain = [verification_cert_der.to_vec()];
    let ca_cd = CertificateDer::from(ca_der);
    let ta = webpki::anchor_from_trusted_cert(&ca_cd).map_err(|e| map_webpki(e, &chain, ca_der))?;
    let vc_cd = CertificateDer::from(verification_cert_der);
    let ee = EndEntityCert::try_from(&vc_cd).map_err(|e| map_webpki(e, &chain, ca_der))?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[ta],
        &[],
        unix_time(now),
        AnyEku,
        None,
        None,
    )
    .map_err(|e| map_webpki(e, &chain, ca_der))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Attestation decision
// ---------------------------------------------------------------------------------------------

/// A CA certificate registered in the instance (for `caReferences`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCertificate {
    /// Its name in the instance (what `caReferences` names; compared case-insensitively).
    pub name: String,
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Proof of possession done.
    pub verified: bool,
}

/// Everything [`attest`] may match a device chain against.
#[derive(Debug, Clone, Copy)]
pub struct X509Candidates<'a> {
    /// The individual enrollment for the registration id, if any (whatever its attestation).
    pub individual: Option<&'a IndividualEnrollment>,
    /// The instance's enrollment groups, in a stable order; non-X.509 groups are ignored. When
    /// two groups match the same certificate, the first wins.
    pub groups: &'a [EnrollmentGroup],
    /// The instance's CA certificates.
    pub ca_certificates: &'a [CaCertificate],
    /// The instance deny list.
    pub deny: &'a DenyList,
}

/// The enrollment that accepted the device.
#[derive(Debug, Clone, PartialEq)]
pub enum X509Match<'a> {
    /// An individual enrollment (possibly disabled: the caller checks).
    Individual(&'a IndividualEnrollment),
    /// An enrollment group (possibly disabled: the caller checks).
    Group {
        /// The group.
        group: &'a EnrollmentGroup,
        /// The certificate the chain was verified to (the group's signing certificate or the
        /// referenced CA certificate), DER; for `signingCertificateInfo` in the registration result.
        signing_cert_der: Vec<u8>,
        /// The CA certificate name when matched through `caReferences`.
        ca_name: Option<String>,
    },
}

#[derive(Clone, Copy)]
enum Owner<'a> {
    Individual(&'a IndividualEnrollment),
    Group(&'a EnrollmentGroup),
}

#[derive(Clone, Copy)]
enum Source<'a> {
    Signing(&'a X509CertificateWithInfo),
    Ca(&'a CaCertificate),
}

#[derive(Clone, Copy)]
struct Candidate<'a> {
    owner: Owner<'a>,
    source: Source<'a>,
}

/// A presented certificate with the values compared against enrollments.
struct Presented<'d> {
    der: &'d [u8],
    sha1: String,
    sha256: String,
    subject_raw: Vec<u8>,
    issuer_raw: Vec<u8>,
    issuer: String,
}

impl<'d> Presented<'d> {
    fn new(der: &'d [u8]) -> Result<Self, CertFailure> {
        let c = parse(der)?;
        Ok(Self {
            der,
            sha1: sha1_thumbprint(der),
            sha256: sha256_thumbprint(der),
            subject_raw: c.subject().as_raw().to_vec(),
            issuer_raw: c.issuer().as_raw().to_vec(),
            issuer: c.issuer().to_string(),
        })
    }
}

/// Does a stored enrollment certificate denote the presented certificate?
fn entry_matches(e: &X509CertificateWithInfo, p: &Presented<'_>) -> bool {
    if let Some(info) = &e.info {
        if (!info.sha1_thumbprint.is_empty() && thumbprint_eq(&info.sha1_thumbprint, &p.sha1))
            || (!info.sha256_thumbprint.is_empty()
                && thumbprint_eq(&info.sha256_thumbprint, &p.sha256))
        {
            return true;
        }
        if e.certificate.is_none() {
            return false;
        }
    }
    stored_der(e).is_some_and(|d| d == p.der)
}

impl<'a> Candidate<'a> {
    fn matches(&self, p: &Presented<'_>) -> bool {
        match self.source {
            Source::Signing(e) => entry_matches(e, p),
            Source::Ca(ca) => ca.der == p.der,
        }
    }

    fn der(&self) -> Option<Cow<'a, [u8]>> {
        match self.source {
            Source::Signing(e) => stored_der(e).map(Cow::Owned),
            Source::Ca(ca) => Some(Cow::Borrowed(ca.der.as_slice())),
        }
    }

    fn unverified(&self) -> Option<CertFailure> {
        match self.source {
            Source::Ca(ca) if !ca.verified => Some(CertFailure::CaNotVerified {
                name: ca.name.clone(),
            }),
            _ => None,
        }
    }

    fn into_match(self, anchor_der: Vec<u8>) -> X509Match<'a> {
        match self.owner {
            Owner::Individual(i) => X509Match::Individual(i),
            Owner::Group(group) => X509Match::Group {
                group,
                signing_cert_der: anchor_der,
                ca_name: match self.source {
                    Source::Ca(ca) => Some(ca.name.clone()),
                    Source::Signing(_) => None,
                },
            },
        }
    }
}

/// The signing certificates and referenced CA certificates of one X.509 attestation.
fn candidates_of<'a>(
    owner: Owner<'a>,
    x: &'a X509Attestation,
    cas: &'a [CaCertificate],
    out: &mut Vec<Candidate<'a>>,
) {
    if let Some(s) = &x.signing_certificates {
        for e in [&s.primary, &s.secondary].into_iter().flatten() {
            out.push(Candidate {
                owner,
                source: Source::Signing(e),
            });
        }
    }
    if let Some(r) = &x.ca_references {
        for name in [&r.primary, &r.secondary].into_iter().flatten() {
            if let Some(ca) = cas.iter().find(|c| c.name.eq_ignore_ascii_case(name)) {
                out.push(Candidate {
                    owner,
                    source: Source::Ca(ca),
                });
            }
        }
    }
}

enum Search<'a> {
    Found(X509Match<'a>),
    /// Nothing usable matched; the first soft failure (unverified CA, failed candidate).
    NotFound(Option<CertFailure>),
}

/// Walk the presented chain upward from the first intermediate, then try the certificates that
/// issued the top of the chain (protocol §6.4).
fn search<'a>(
    chain: &[Vec<u8>],
    presented: &[Presented<'_>],
    candidates: &[Candidate<'a>],
    deny: &DenyList,
    now: OffsetDateTime,
) -> Result<Search<'a>, CertFailure> {
    let mut soft: Option<CertFailure> = None;
    for p in presented.iter().skip(1) {
        for cand in candidates.iter().filter(|c| c.matches(p)) {
            if let Some(f) = cand.unverified() {
                soft.get_or_insert(f);
                continue;
            }
            // The first entry found decides.
            verify_chain(chain, p.der, now)?;
            return Ok(Search::Found(cand.into_match(p.der.to_vec())));
        }
    }
    let top = &presented[chain_top(chain)];
    let leaf = &presented[0];
    for cand in candidates {
        // Cheap pre-filter on the stored info (same DER always renders the same name), so that
        // many groups do not cost a decode each.
        if let Source::Signing(X509CertificateWithInfo {
            info: Some(info), ..
        }) = cand.source
        {
            if !info.subject_name.is_empty() && info.subject_name != top.issuer {
                continue;
            }
        }
        let Some(der) = cand.der() else { continue };
        if der.as_ref() == leaf.der || presented.iter().any(|p| p.der == der.as_ref()) {
            continue;
        }
        let Ok(c) = parse(&der) else { continue };
        if c.subject().as_raw() != top.issuer_raw.as_slice() {
            continue;
        }
        if let Some(f) = cand.unverified() {
            soft.get_or_insert(f);
            continue;
        }
        if let Err(f) = deny.check(&der) {
            soft.get_or_insert(f);
            continue;
        }
        match verify_chain(chain, &der, now) {
            Ok(()) => return Ok(Search::Found(cand.into_match(der.into_owned()))),
            Err(f) => {
                soft.get_or_insert(f);
            }
        }
    }
    Ok(Search::NotFound(soft))
}

/// Decide which enrollment accepts a device presenting `chain` (DER, leaf first, as sent over
/// TLS) for `registration_id`. See the [module documentation](self) for the order of checks.
/// The caller still refuses a disabled enrollment.
pub fn attest<'a>(
    registration_id: &str,
    chain: &[Vec<u8>],
    c: &X509Candidates<'a>,
    now: OffsetDateTime,
) -> Result<X509Match<'a>, CertFailure> {
    if chain.is_empty() {
        return Err(CertFailure::NoCertificate);
    }
    if chain.len() > MAX_CHAIN_LEN {
        return Err(CertFailure::ChainTooLong);
    }
    let presented = chain
        .iter()
        .map(|d| Presented::new(d))
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = parse(&chain[0])?;

    // 1. Common name = registration id.
    let cn = cn_of(&leaf).ok_or(CertFailure::NoCommonName)?;
    let len = cn.chars().count();
    if len > MAX_CN_LEN {
        return Err(CertFailure::CnTooLong { len });
    }
    if !cn.eq_ignore_ascii_case(registration_id) {
        return Err(CertFailure::CnMismatch {
            cn,
            registration_id: registration_id.to_string(),
        });
    }

    // 2. Deny list, every presented certificate.
    for d in chain {
        c.deny.check(d)?;
    }

    // 3. Leaf validity.
    check_validity(&leaf, now)?;

    // 4. The individual enrollment, if any, decides alone.
    if let Some(ind) = c.individual {
        let mismatch = || CertFailure::AttestationMismatch {
            registration_id: ind.registration_id.clone(),
        };
        let att = &ind.settings.attestation;
        if att.kind != AttestationType::X509 {
            return Err(mismatch());
        }
        let x = att.x509.as_ref().ok_or_else(mismatch)?;
        if let Some(cc) = &x.client_certificates {
            let hit = [&cc.primary, &cc.secondary]
                .into_iter()
                .flatten()
                .any(|e| entry_matches(e, &presented[0]));
            if hit {
                return Ok(X509Match::Individual(ind));
            }
        }
        let mut cands = Vec::new();
        candidates_of(Owner::Individual(ind), x, c.ca_certificates, &mut cands);
        if !cands.is_empty() {
            match search(chain, &presented, &cands, c.deny, now)? {
                Search::Found(m) => return Ok(m),
                Search::NotFound(Some(f)) => return Err(f),
                Search::NotFound(None) => {}
            }
        }
        return Err(CertFailure::CertificateMismatch {
            registration_id: ind.registration_id.clone(),
        });
    }

    // 5. Enrollment groups.
    let mut cands = Vec::new();
    for g in c.groups {
        let att = &g.settings.attestation;
        if att.kind != AttestationType::X509 {
            continue;
        }
        if let Some(x) = &att.x509 {
            candidates_of(Owner::Group(g), x, c.ca_certificates, &mut cands);
        }
    }
    match search(chain, &presented, &cands, c.deny, now)? {
        Search::Found(m) => Ok(m),
        Search::NotFound(Some(f)) => Err(f),
        Search::NotFound(None) => {
            // 6. Nothing matched.
            let top = &presented[chain_top(chain)];
            if top.subject_raw == top.issuer_raw {
                Err(CertFailure::NoMatchingEnrollment)
            } else {
                Err(CertFailure::UnknownIssuer {
                    issuer: missing_issuer(chain),
                })
            }
        }
    }
}

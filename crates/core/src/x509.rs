//! X.509 helpers: certificate input parsing (PEM or base64 DER), certificate info, thumbprints.
//! Chain verification for attestation lives in [`verify`].

use crate::model::{X509CertificateInfo, X509CertificateWithInfo};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

pub mod verify;

/// A certificate could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509Error {
    /// Not PEM, not base64 DER.
    #[error("certificate is neither PEM nor base64 DER")]
    Encoding,
    /// DER did not parse as a certificate.
    #[error("certificate does not parse: {0}")]
    Parse(String),
}

/// Decode a certificate given as PEM (`-----BEGIN CERTIFICATE-----`) or base64 DER into DER.
pub fn decode_certificate(input: &str) -> Result<Vec<u8>, X509Error> {
    let t = input.trim();
    let der = if t.contains("-----BEGIN") {
        let (_, pem) = parse_x509_pem(t.as_bytes()).map_err(|_| X509Error::Encoding)?;
        pem.contents
    } else {
        let compact: String = t.chars().filter(|c| !c.is_whitespace()).collect();
        B64.decode(compact).map_err(|_| X509Error::Encoding)?
    };
    X509Certificate::from_der(&der).map_err(|e| X509Error::Parse(e.to_string()))?;
    Ok(der)
}

/// Decode every certificate in a PEM bundle (or one base64 DER).
pub fn decode_chain(input: &str) -> Result<Vec<Vec<u8>>, X509Error> {
    if !input.contains("-----BEGIN") {
        return Ok(vec![decode_certificate(input)?]);
    }
    let mut out = Vec::new();
    for pem in Pem::iter_from_buffer(input.as_bytes()) {
        let pem = pem.map_err(|_| X509Error::Encoding)?;
        X509Certificate::from_der(&pem.contents).map_err(|e| X509Error::Parse(e.to_string()))?;
        out.push(pem.contents);
    }
    if out.is_empty() {
        return Err(X509Error::Encoding);
    }
    Ok(out)
}

/// Uppercase hex SHA-1 of the DER.
pub fn sha1_thumbprint(der: &[u8]) -> String {
    hex::encode_upper(Sha1::digest(der))
}

/// Uppercase hex SHA-256 of the DER.
pub fn sha256_thumbprint(der: &[u8]) -> String {
    hex::encode_upper(Sha256::digest(der))
}

fn asn1_time(t: &ASN1Time) -> String {
    crate::clock::azure_timestamp(t.to_datetime())
}

/// Parse the certificate's info.
pub fn certificate_info(der: &[u8]) -> Result<X509CertificateInfo, X509Error> {
    let (_, c) = X509Certificate::from_der(der).map_err(|e| X509Error::Parse(e.to_string()))?;
    Ok(X509CertificateInfo {
        subject_name: c.subject().to_string(),
        sha1_thumbprint: sha1_thumbprint(der),
        sha256_thumbprint: sha256_thumbprint(der),
        issuer_name: c.issuer().to_string(),
        not_before_utc: asn1_time(&c.validity().not_before),
        not_after_utc: asn1_time(&c.validity().not_after),
        serial_number: hex::encode_upper(c.raw_serial()),
        version: c.version().0 as i64 + 1,
    })
}

/// The subject common name.
pub fn common_name(der: &[u8]) -> Result<Option<String>, X509Error> {
    let (_, c) = X509Certificate::from_der(der).map_err(|e| X509Error::Parse(e.to_string()))?;
    let cn = c
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_string);
    Ok(cn)
}

/// Normalize a certificate from the service API: decode PEM or base64 DER, store base64 DER,
/// fill in `info`. A certificate-less entry keeps its info.
pub fn normalize(c: &mut X509CertificateWithInfo) -> Result<(), X509Error> {
    if let Some(text) = &c.certificate {
        let der = decode_certificate(text)?;
        c.info = Some(certificate_info(&der)?);
        c.certificate = Some(B64.encode(&der));
    }
    Ok(())
}

/// The DER of a stored certificate entry (base64 DER after [`normalize`]).
pub fn stored_der(c: &X509CertificateWithInfo) -> Option<Vec<u8>> {
    c.certificate
        .as_deref()
        .and_then(|t| decode_certificate(t).ok())
}

/// Compare two hex thumbprints case-insensitively.
pub fn thumbprint_eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

//! X.509 for `dps bench`: the CA (`--ca-cert`/`--ca-key`, or one made for the run) and the
//! device certificates it issues (CN = registration id).

use super::{now_stamp, BenchArgs};
use anyhow::{Context, Result};

/// The CA that issues the device certificates, and its certificate (PEM): `--ca-cert` and
/// `--ca-key`, else a new self-signed one.
pub(super) fn load_or_make_ca(
    a: &BenchArgs,
) -> Result<(rcgen::Issuer<'static, rcgen::KeyPair>, String)> {
    if let (Some(c), Some(k)) = (&a.ca_cert, &a.ca_key) {
        let cert_pem =
            std::fs::read_to_string(c).with_context(|| format!("cannot read {}", c.display()))?;
        let key_pem =
            std::fs::read_to_string(k).with_context(|| format!("cannot read {}", k.display()))?;
        let key = rcgen::KeyPair::from_pem(&key_pem).context("--ca-key is not a usable key")?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&cert_pem, key)
            .context("--ca-cert is not a usable certificate")?;
        return Ok((issuer, cert_pem));
    }
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("dps bench CA {}", now_stamp()),
    );
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    Ok((rcgen::Issuer::new(params, key), cert.pem()))
}

/// A device certificate (CN = `id`, client authentication) and its key, both PEM.
pub(super) fn issue_leaf(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    id: &str,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, id);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem().into_bytes(), key.serialize_pem().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::device::TransportArg;
    use crate::commands::enrollment_common::AttestationArg;

    #[test]
    fn leaf_certificates_have_the_registration_id() {
        let a = BenchArgs {
            devices: 1,
            concurrency: 1,
            rate: None,
            transport: TransportArg::Https,
            attestation: AttestationArg::X509,
            group_key: None,
            create_group: true,
            create_enrollments: false,
            id_scope: None,
            global_endpoint: None,
            keep_alive: false,
            storm: false,
            await_each_frame: false,
            json: false,
            prefix: None,
            admin_url: None,
            poll_interval_ms: None,
            ca_cert: None,
            ca_key: None,
            timeout: 1,
            cleanup: false,
            threads: None,
            no_handshake_baseline: false,
            baseline_handshakes: None,
        };
        let (issuer, ca_pem) = load_or_make_ca(&a).unwrap();
        assert!(ca_pem.contains("BEGIN CERTIFICATE"));
        let (chain, key) = issue_leaf(&issuer, "bench-dev-1").unwrap();
        assert!(dps_device::tls::parse_identity(&chain, &key).is_ok());
    }
}

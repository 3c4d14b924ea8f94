//! TLS client configuration (rustls with the aws-lc-rs provider only).

use crate::Error;
use rustls::client::Resumption;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// Which server certificates the device trusts.
#[derive(Clone, Debug, Default)]
pub enum Trust {
    /// The operating system's trust roots.
    #[default]
    System,
    /// Only the CA certificates in this PEM (e.g. the dps dev CA, `dps-data/ca.pem`).
    Pem(Vec<u8>),
    /// The system roots plus the CA certificates in this PEM.
    SystemAndPem(Vec<u8>),
    /// A prepared root store (share one across many simulated devices).
    Roots(Arc<RootCertStore>),
}

impl Trust {
    /// Trust only the CA certificates in the PEM file at `path`.
    pub fn pem_file(path: impl AsRef<Path>) -> Result<Trust, Error> {
        let path = path.as_ref();
        std::fs::read(path)
            .map(Trust::Pem)
            .map_err(|e| Error::Config(format!("cannot read CA file {}: {e}", path.display())))
    }

    /// Build the root store.
    pub fn root_store(&self) -> Result<Arc<RootCertStore>, Error> {
        let mut store = RootCertStore::empty();
        match self {
            Trust::Roots(r) => return Ok(r.clone()),
            Trust::System => add_system(&mut store),
            Trust::Pem(pem) => add_pem(&mut store, pem)?,
            Trust::SystemAndPem(pem) => {
                add_system(&mut store);
                add_pem(&mut store, pem)?;
            }
        }
        if store.is_empty() {
            return Err(Error::Config(
                "no trusted CA certificates (give a CA PEM file)".into(),
            ));
        }
        Ok(Arc::new(store))
    }
}

fn add_system(store: &mut RootCertStore) {
    let loaded = rustls_native_certs::load_native_certs();
    for c in loaded.certs {
        let _ = store.add(c);
    }
}

fn add_pem(store: &mut RootCertStore, pem: &[u8]) -> Result<(), Error> {
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| Error::Config(format!("invalid CA PEM: {e}")))?;
        store
            .add(cert)
            .map_err(|e| Error::Config(format!("unusable CA certificate: {e}")))?;
        n += 1;
    }
    if n == 0 {
        return Err(Error::Config(
            "the CA PEM holds no CERTIFICATE block".into(),
        ));
    }
    Ok(())
}

/// Parse a PEM certificate chain (leaf first) and a PEM private key.
pub fn parse_identity(
    cert_chain_pem: &[u8],
    key_pem: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let certs = CertificateDer::pem_slice_iter(cert_chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("invalid certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Config(
            "the certificate PEM holds no CERTIFICATE block".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| Error::Config(format!("invalid private key PEM: {e}")))?;
    Ok((certs, key))
}

/// Build a rustls client configuration: aws-lc-rs provider, the given roots, an optional client
/// certificate, ALPN and no session resumption (every simulated device is a fresh client).
pub fn client_config(
    roots: Arc<RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, Error> {
    let builder = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Tls(e.to_string()))?
    .with_root_certificates(roots);
    let mut cfg = match identity {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| Error::Config(format!("client certificate and key do not fit: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.resumption = Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Classify an I/O error from a TLS connect: rustls errors become [`Error::Tls`].
pub(crate) fn describe_tls_error(e: &std::io::Error) -> Error {
    let text = e.to_string();
    if let Some(inner) = e.get_ref() {
        if inner.downcast_ref::<rustls::Error>().is_some() {
            return Error::Tls(text);
        }
    }
    if text.contains("certificate") || text.contains("alert") || text.contains("handshake") {
        Error::Tls(text)
    } else {
        Error::Transport(text)
    }
}

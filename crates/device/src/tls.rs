//! TLS client configuration (rustls with the aws-lc-rs provider only).

use crate::client::Endpoint;
use crate::Error;
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

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

/// The aws-lc-rs crypto provider, built once per process and shared by every configuration.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// A configuration without client certificate: the shared provider, the safe default protocol
/// versions (TLS 1.3 and 1.2), webpki verification of the server against `roots`, no ALPN and no
/// session resumption (every simulated device is a fresh client).
fn base_config(roots: Arc<RootCertStore>) -> Result<ClientConfig, Error> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.resumption = Resumption::disabled();
    Ok(cfg)
}

/// Load a client certificate chain and its key (checks that they belong together).
fn cert_resolver(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> Result<Arc<dyn ResolvesClientCert>, Error> {
    let ck = CertifiedKey::from_der(certs, key, provider)
        .map_err(|e| Error::Config(format!("client certificate and key do not fit: {e}")))?;
    Ok(Arc::new(SingleCertAndKey::from(ck)))
}

/// Build a rustls client configuration: aws-lc-rs provider, the given roots, an optional client
/// certificate, ALPN and no session resumption (every simulated device is a fresh client).
///
/// Each call builds a new server verifier; to share one across many clients use [`ClientTls`].
pub fn client_config(
    roots: Arc<RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, Error> {
    let mut cfg = base_config(roots)?;
    if let Some((certs, key)) = identity {
        cfg.client_auth_cert_resolver = cert_resolver(certs, key, cfg.crypto_provider())?;
    }
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// TLS client settings prepared once and shared by any number of clients (load generators,
/// gateways provisioning many devices): the root store, the server certificate verifier and the
/// crypto provider are built once; the HTTPS (ALPN `http/1.1`) and MQTT (no ALPN) configurations
/// are shared as they are by symmetric-key clients. X.509 clients get their own configurations
/// from [`ClientTls::with_identity`], which reuse the same verifier and provider.
///
/// Server certificates are always verified against the trust roots.
///
/// ```no_run
/// use dps_device::{Auth, ClientTls, ProvisioningClient, Trust};
/// # fn run() -> Result<(), dps_device::Error> {
/// let tls = ClientTls::new(&Trust::pem_file("dps-data/ca.pem")?)?;
/// for i in 0..1000 {
///     let client = ProvisioningClient::builder()
///         .global_endpoint("localhost:8443")
///         .id_scope("0ne00000A0A")
///         .registration_id(format!("sensor-{i:04}"))
///         .auth(Auth::GroupKey("Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=".into()))
///         .tls(tls.clone())
///         .build()?;
///     # let _ = client;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ClientTls {
    pub(crate) https: Arc<ClientConfig>,
    pub(crate) mqtt: Arc<ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field(
                "client_certificate",
                &self.https.client_auth_cert_resolver.has_certs(),
            )
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Prepare the settings for `trust` (reads the system roots and parses the PEM once).
    pub fn new(trust: &Trust) -> Result<ClientTls, Error> {
        ClientTls::from_roots(trust.root_store()?)
    }

    /// Prepare the settings for a root store.
    pub fn from_roots(roots: Arc<RootCertStore>) -> Result<ClientTls, Error> {
        let mqtt = base_config(roots)?;
        let mut https = mqtt.clone();
        https.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ClientTls {
            https: Arc::new(https),
            mqtt: Arc::new(mqtt),
        })
    }

    /// The same settings presenting a client certificate chain (leaf first) and its key: the key
    /// is loaded once for both transports; the verifier and provider are shared.
    pub fn with_identity(
        &self,
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<ClientTls, Error> {
        let resolver = cert_resolver(certs, key, self.https.crypto_provider())?;
        let mut https = (*self.https).clone();
        https.client_auth_cert_resolver = resolver.clone();
        let mut mqtt = (*self.mqtt).clone();
        mqtt.client_auth_cert_resolver = resolver;
        Ok(ClientTls {
            https: Arc::new(https),
            mqtt: Arc::new(mqtt),
        })
    }

    /// The HTTPS configuration (ALPN `http/1.1`).
    pub fn https_config(&self) -> Arc<ClientConfig> {
        self.https.clone()
    }

    /// The MQTT configuration (no ALPN).
    pub fn mqtt_config(&self) -> Arc<ClientConfig> {
        self.mqtt.clone()
    }
}

/// Open a TCP connection (with `TCP_NODELAY`: small request/response packets must not wait
/// for Nagle) to the endpoint's pinned addresses, or else to its resolved host, from its local
/// address when it has one.
async fn connect_tcp(ep: &Endpoint) -> Result<TcpStream, Error> {
    let tcp = match (&ep.connect_addrs, ep.local_addr) {
        (Some(addrs), None) => TcpStream::connect(addrs.as_slice()).await,
        (None, None) => TcpStream::connect((ep.host.as_str(), ep.port)).await,
        (Some(addrs), Some(local)) => connect_from(local, addrs).await,
        (None, Some(local)) => match tokio::net::lookup_host((ep.host.as_str(), ep.port)).await {
            Ok(found) => connect_from(local, &found.collect::<Vec<_>>()).await,
            Err(e) => Err(e),
        },
    }
    .map_err(|e| Error::Transport(format!("cannot connect to {}:{}: {e}", ep.host, ep.port)))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Connect from `local` (any port) to the first of `addrs` of the same address family that
/// accepts.
async fn connect_from(local: IpAddr, addrs: &[SocketAddr]) -> std::io::Result<TcpStream> {
    let mut last = None;
    for &addr in addrs.iter().filter(|a| a.is_ipv4() == local.is_ipv4()) {
        let sock = if local.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        let attempt = match sock.bind(SocketAddr::new(local, 0)) {
            Ok(()) => sock.connect(addr).await,
            Err(e) => Err(e),
        };
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("no address of the local address's family ({local})"),
        )
    }))
}

/// TCP connect and complete the TLS handshake (the client's last flight is flushed), within the
/// endpoint's connect timeout.
pub(crate) async fn connect_tls(
    ep: &Endpoint,
    tls: &Arc<ClientConfig>,
) -> Result<TlsStream<TcpStream>, Error> {
    let work = async {
        let tcp = connect_tcp(ep).await?;
        TlsConnector::from(tls.clone())
            .connect(ep.server_name.clone(), tcp)
            .await
            .map_err(|e| describe_tls_error(&e))
    };
    match tokio::time::timeout(ep.connect_timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection from a chosen local address arrives from that address.
    #[tokio::test]
    async fn connects_from_the_local_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let local: IpAddr = "127.0.0.7".parse().unwrap();
        let targets = [server];
        let (client, accepted) = tokio::join!(connect_from(local, &targets), listener.accept());
        let client = client.unwrap();
        let (_, peer) = accepted.unwrap();
        assert_eq!(peer.ip(), local);
        assert_eq!(client.local_addr().unwrap().ip(), local);
    }

    /// No address of the local address's family: a clear error, not a panic.
    #[tokio::test]
    async fn refuses_a_family_mismatch() {
        let local: IpAddr = "::1".parse().unwrap();
        let e = connect_from(local, &["127.0.0.1:9".parse().unwrap()])
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("::1"), "{e}");
    }
}

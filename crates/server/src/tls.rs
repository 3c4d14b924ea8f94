//! TLS: the development CA and server certificate, and the server configuration.
//!
//! Devices present client certificates that are validated against *enrollments*, not against
//! system roots, so the server requests a client certificate without requiring one
//! ([`AcceptAnyClientCert`]) and hands the presented chain to attestation. The verifier still
//! checks the handshake signature: a device certificate presented without its private key is
//! refused.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName as RDn, ServerConfig, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// TLS setup failures, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// File.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Certificate generation failed.
    #[error("generating the development certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider (aws-lc-rs only).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The server's certificate material.
pub struct ServerPki {
    /// PEM chain.
    pub cert_pem: String,
    /// PEM key.
    pub key_pem: String,
    /// Path of the CA devices must trust (the development CA), if generated.
    pub ca_path: Option<PathBuf>,
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Write a generated file atomically; keys (`secret`) are created with mode 0600 from the start.
fn write(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    let written = if secret {
        crate::files::write_private_atomic(path, contents.as_bytes())
    } else {
        crate::files::write_atomic(path, contents.as_bytes(), 0o644)
    };
    written.map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Load the configured files, or create (once) and reuse the development CA and a server
/// certificate for `localhost`, `127.0.0.1` and `::1` in `data_dir`.
pub fn load_or_generate(
    data_dir: &Path,
    files: Option<(&Path, &Path)>,
) -> Result<ServerPki, TlsError> {
    if let Some((cert, key)) = files {
        return Ok(ServerPki {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            ca_path: None,
        });
    }
    std::fs::create_dir_all(data_dir).map_err(|source| TlsError::Io {
        path: data_dir.to_path_buf(),
        source,
    })?;
    let ca_cert = data_dir.join("ca.pem");
    let ca_key = data_dir.join("ca.key");
    let srv_cert = data_dir.join("server.pem");
    let srv_key = data_dir.join("server.key");
    if ca_cert.exists() && ca_key.exists() && srv_cert.exists() && srv_key.exists() {
        return Ok(ServerPki {
            cert_pem: read(&srv_cert)?,
            key_pem: read(&srv_key)?,
            ca_path: Some(ca_cert),
        });
    }
    let (ca_pem, ca_key_pem, cert_pem, key_pem) = generate_dev_pki()?;
    write(&ca_cert, &ca_pem, false)?;
    write(&ca_key, &ca_key_pem, true)?;
    write(&srv_cert, &cert_pem, false)?;
    write(&srv_key, &key_pem, true)?;
    tracing::info!(ca = %ca_cert.display(), "generated a development CA and server certificate");
    Ok(ServerPki {
        cert_pem,
        key_pem,
        ca_path: Some(ca_cert),
    })
}

/// Generate an ECDSA P-256 CA and a server certificate signed by it:
/// `(ca_pem, ca_key_pem, server_chain_pem, server_key_pem)`.
pub fn generate_dev_pki() -> Result<(String, String, String, String), TlsError> {
    let now = time::OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "dps development CA");
    dn.push(DnType::OrganizationName, "dps");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now - time::Duration::days(1);
    ca.not_after = now + time::Duration::days(3650);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, &ca_key);

    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec!["localhost".to_string()])?;
    p.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    p.subject_alt_names
        .push(SanType::IpAddress("::1".parse().expect("ip")));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "localhost");
    p.distinguished_name = dn;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(825);
    let cert = p.signed_by(&key, &issuer)?;
    Ok((
        ca_cert.pem(),
        ca_key.serialize_pem(),
        format!("{}{}", cert.pem(), ca_cert.pem()),
        key.serialize_pem(),
    ))
}

/// Parse a PEM chain.
pub fn parse_chain(pem: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        what: format!("bad PEM certificate: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// Parse a PEM private key.
pub fn parse_key(pem: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        what: format!("no usable private key: {e}"),
    })
}

/// Requests a client certificate, accepts any chain (attestation decides), but verifies the
/// handshake signature (proof of possession of the private key).
#[derive(Debug)]
pub struct AcceptAnyClientCert {
    provider: Arc<CryptoProvider>,
}

impl AcceptAnyClientCert {
    /// With the given provider's signature algorithms.
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        AcceptAnyClientCert { provider }
    }
}

impl ClientCertVerifier for AcceptAnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[RDn] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The server configuration, with ALPN `alpn` (e.g. h2 + http/1.1 for HTTPS, none for MQTT).
pub fn server_config(pki: &ServerPki, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
    // The server's cipher-suite preference: suites whose hash is SHA-256 first. SHA-256 runs on
    // the CPU's SHA extensions where SHA-384 does not, and AES-128 takes fewer rounds, so
    // every handshake (transcript, key schedule) and record is cheaper for the server and the
    // device alike; AES-256-GCM and ChaCha20 stay available.
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    let provider = Arc::new(p);
    let chain = parse_chain(&pki.cert_pem, Path::new("server certificate"))?;
    let key = parse_key(&pki.key_pem, Path::new("server key"))?;
    let mut cfg = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(Arc::new(AcceptAnyClientCert::new(provider)))
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    // No TLS 1.3 session tickets: a device provisions once and reconnects rarely, and the
    // Azure SDKs do not resume sessions, so tickets would cost every handshake two more
    // records and a session-cache entry (with the client's chain) for nothing.
    cfg.send_tls13_tickets = 0;
    cfg.ignore_client_order = true;
    Ok(Arc::new(cfg))
}

/// Fault injection at the TLS handshake (`slowTls`, `docs/testing-with-dps.md`).
pub trait HandshakeFaults: Send + Sync {
    /// Whether any rule is in force (else the handshake runs as always, without a look at
    /// the ClientHello).
    fn active(&self) -> bool;
    /// How long to hold this handshake: `listener` is `https`, `mqtt` or `amqp`, `sni` the
    /// server name the client asked for (none for an IP address).
    fn handshake_delay(
        &self,
        listener: &'static str,
        sni: Option<&str>,
        peer: std::net::SocketAddr,
    ) -> Option<std::time::Duration>;
}

/// A TLS listener: the one accept loop shared by HTTPS and MQTT. Each accepted connection is
/// admitted (or closed at once), handshaken with a timeout and served on its own task.
pub struct TlsListener {
    /// The bound socket.
    pub listener: tokio::net::TcpListener,
    /// The TLS configuration.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// Its name in logs and metrics (`https`, `mqtt`).
    pub name: &'static str,
    /// How long a handshake may take.
    pub handshake_timeout: std::time::Duration,
    /// At most this many handshakes in progress (see [`accept_each`]).
    pub max_pending_handshakes: usize,
    /// Fault injection rules acting on the handshake (none: never).
    pub faults: Option<Arc<dyn HandshakeFaults>>,
}

impl TlsListener {
    /// Serve forever. `admit` runs before the handshake: `None` closes the connection at once
    /// (for example a connection cap), `Some(guard)` keeps the guard for the connection's
    /// lifetime. `serve` gets the TLS stream, the client's certificate chain (DER, leaf first,
    /// empty when none) and the peer address.
    pub async fn serve<A, Adm, F, Fut>(self, admit: Adm, serve: F)
    where
        Adm: Fn(std::net::SocketAddr) -> Option<A> + Send + Sync + 'static,
        A: Send + 'static,
        F: Fn(
                tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
                Vec<Vec<u8>>,
                std::net::SocketAddr,
            ) -> Fut
            + Send
            + Sync
            + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let TlsListener {
            listener,
            acceptor,
            name,
            handshake_timeout,
            max_pending_handshakes,
            faults,
        } = self;
        let serve = Arc::new(serve);
        accept_each(
            listener,
            name,
            max_pending_handshakes,
            move |tcp, peer, permit| {
                let admitted = admit(peer);
                let acceptor = acceptor.clone();
                let serve = serve.clone();
                let faults = faults.clone();
                async move {
                    let Some(_admitted) = admitted else {
                        return;
                    };
                    let Some((tls, certs)) = handshake_with_faults(
                        &acceptor,
                        tcp,
                        peer,
                        handshake_timeout,
                        name,
                        permit,
                        faults.as_deref(),
                    )
                    .await
                    else {
                        return;
                    };
                    serve(tls, certs, peer).await
                }
            },
        )
        .await
    }
}

/// A place among the TLS handshakes in progress on a listener, held until the handshake ends.
pub struct HandshakePermit(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

/// Accept TCP connections on `listener` forever; each one (with `TCP_NODELAY`) is served by
/// `serve` on its own task. Accept errors (e.g. out of file descriptors) are logged and retried.
///
/// Admission: at most `max_pending` TLS handshakes are in progress at once. A connection
/// beyond that is closed at once (counted as `dps_tls_handshakes_total{result="shed"}`) and
/// the device retries it later. Without this, a reboot storm makes every handshake share the
/// CPU with thousands of others: all of them slow down together, many pass the device's (or
/// our) timeout after the expensive part was done, and the work is thrown away. Closing a
/// connection costs microseconds; a handshake costs hundreds.
pub async fn accept_each<F, Fut>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    max_pending: usize,
    serve: F,
) where
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr, HandshakePermit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let pending = Arc::new(tokio::sync::Semaphore::new(max_pending.max(1)));
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => match pending.clone().try_acquire_owned() {
                Ok(permit) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(serve(tcp, peer, HandshakePermit(permit)));
                }
                Err(_) => {
                    metrics::counter!("dps_tls_handshakes_total", "listener" => what, "result" => "shed").increment(1);
                    drop(tcp);
                }
            },
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// The server side of a TLS handshake with a timeout, counted in `dps_tls_handshakes_total`.
/// Returns the stream and the client's certificate chain (DER, leaf first; empty without one).
pub async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    timeout: std::time::Duration,
    listener: &'static str,
    permit: HandshakePermit,
) -> Option<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    Vec<Vec<u8>>,
)> {
    handshake_with_faults(acceptor, tcp, peer, timeout, listener, permit, None).await
}

/// [`handshake`], held by a `slowTls` fault injection rule when one fires: the ClientHello is
/// read (for its server name), the delay passes, then the handshake completes. The delay
/// counts against `timeout`.
pub async fn handshake_with_faults(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    timeout: std::time::Duration,
    listener: &'static str,
    permit: HandshakePermit,
    faults: Option<&dyn HandshakeFaults>,
) -> Option<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    Vec<Vec<u8>>,
)> {
    let run = async {
        match faults.filter(|f| f.active()) {
            None => acceptor.accept(tcp).await,
            Some(f) => {
                let start =
                    tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
                        .await?;
                let delay = f.handshake_delay(listener, start.client_hello().server_name(), peer);
                if let Some(d) = delay {
                    tokio::time::sleep(d).await;
                }
                start.into_stream(acceptor.config().clone()).await
            }
        }
    };
    let accepted = tokio::time::timeout(timeout, run).await;
    drop(permit);
    let tls = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics::counter!("dps_tls_handshakes_total", "listener" => listener, "result" => "failure").increment(1);
            tracing::debug!(%peer, listener, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            metrics::counter!("dps_tls_handshakes_total", "listener" => listener, "result" => "timeout").increment(1);
            return None;
        }
    };
    metrics::counter!("dps_tls_handshakes_total", "listener" => listener, "result" => "success")
        .increment(1);
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.to_vec()).collect())
        .unwrap_or_default();
    Some((tls, certs))
}

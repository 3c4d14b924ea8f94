//! PostgreSQL over TLS with rustls (aws-lc-rs): libpq's `sslmode`, `sslrootcert`, `sslcert`
//! and `sslkey` URL parameters on top of tokio-postgres, which itself only knows
//! `sslmode=disable|prefer|require` and no certificate files.
//!
//! | `sslmode` | TLS | server certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | when the server offers it | not verified (unless `sslrootcert` is given: as `verify-ca`) |
//! | `require` | always | not verified (unless `sslrootcert` is given: as `verify-ca`, like libpq) |
//! | `verify-ca` | always | chain to `sslrootcert`, any host name |
//! | `verify-full` | always | chain to `sslrootcert` and the host name (DNS name or IP address in the SAN) |
//!
//! `verify-ca` and `verify-full` need `sslrootcert` (a PEM file of one or more CA
//! certificates); libpq's fallback `~/.postgresql/root.crt` and `sslrootcert=system` are not
//! supported, so a missing trust anchor is an error rather than a silent downgrade.
//! `sslcert` and `sslkey` (PEM chain and PKCS#8/SEC1/PKCS#1 key) present a client certificate;
//! they go together. The TLS session exports `tls-server-end-point` channel binding for SCRAM.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, else plain (the default).
    #[default]
    Prefer,
    /// TLS, certificate not verified.
    Require,
    /// TLS, certificate chain verified against `sslrootcert`.
    VerifyCa,
    /// TLS, chain and host name verified.
    VerifyFull,
}

impl SslMode {
    fn parse(v: &str) -> Result<Self, PgTlsError> {
        Ok(match v {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(PgTlsError::InvalidMode(other.to_owned())),
        })
    }

    /// The name as in the URL.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Why the TLS settings of a PostgreSQL URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    /// `sslmode` has a value libpq does not define (or `allow`, which we do not support).
    #[error(
        "unsupported sslmode `{0}` (accepted: disable, prefer, require, verify-ca, verify-full)"
    )]
    InvalidMode(String),
    /// A verifying mode without a trust anchor.
    #[error(
        "sslmode={0} needs sslrootcert=/path/ca.pem (the CA that signed the server's certificate)"
    )]
    MissingRootCert(&'static str),
    /// Only one of `sslcert` and `sslkey`.
    #[error("sslcert and sslkey must be given together")]
    ClientCertHalf,
    /// A file could not be read or holds no usable PEM.
    #[error("{param} `{path}`: {reason}")]
    File {
        /// The URL parameter naming the file.
        param: &'static str,
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration (e.g. a key that does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The TLS settings of a PostgreSQL URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgTlsSettings {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`.
    pub root_cert: Option<PathBuf>,
    /// `sslcert`.
    pub cert: Option<PathBuf>,
    /// `sslkey`.
    pub key: Option<PathBuf>,
}

/// Split the TLS parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) out of a
/// `postgres://` URL: the URL without them (what tokio-postgres parses; its own `sslmode` is set
/// from [`PgTlsSettings::driver_mode`]) and the settings.
pub fn split_url(url: &str) -> Result<(String, PgTlsSettings), PgTlsError> {
    let mut settings = PgTlsSettings::default();
    let Some((head, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), settings));
    };
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let value = || percent_decode_str(v).decode_utf8_lossy().into_owned();
        match k {
            "sslmode" => settings.mode = SslMode::parse(&value())?,
            "sslrootcert" => settings.root_cert = Some(PathBuf::from(value())),
            "sslcert" => settings.cert = Some(PathBuf::from(value())),
            "sslkey" => settings.key = Some(PathBuf::from(value())),
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        head.to_owned()
    } else {
        format!("{head}?{}", rest.join("&"))
    };
    Ok((url, settings))
}

impl PgTlsSettings {
    /// What tokio-postgres is told: the verifying modes are `require` to it (the verification is
    /// ours).
    pub fn driver_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }

    /// The mode in effect: `prefer` and `require` with a `sslrootcert` verify the chain, as
    /// libpq does.
    pub fn effective_mode(&self) -> SslMode {
        match self.mode {
            SslMode::Prefer | SslMode::Require if self.root_cert.is_some() => SslMode::VerifyCa,
            m => m,
        }
    }

    /// Build the connector (reads the certificate and key files).
    pub fn connector(&self) -> Result<MakeRustlsConnect, PgTlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mode = self.effective_mode();
        let verifier: Arc<dyn ServerCertVerifier> = match mode {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => {
                Arc::new(NoVerification(provider.clone()))
            }
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let path = self
                    .root_cert
                    .as_deref()
                    .ok_or(PgTlsError::MissingRootCert(mode.as_str()))?;
                let roots = load_roots(path)?;
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| PgTlsError::File {
                            param: "sslrootcert",
                            path: path.to_owned(),
                            reason: e.to_string(),
                        })?;
                if mode == SslMode::VerifyCa {
                    Arc::new(ChainOnly(webpki))
                } else {
                    webpki
                }
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.cert, &self.key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = load_certs(cert, "sslcert")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| PgTlsError::File {
                    param: "sslkey",
                    path: key.to_owned(),
                    reason: format!("no usable PEM private key: {e}"),
                })?;
                builder.with_client_auth_cert(chain, key)?
            }
            _ => return Err(PgTlsError::ClientCertHalf),
        };
        Ok(MakeRustlsConnect {
            config: Arc::new(config),
            verify_name: mode == SslMode::VerifyFull,
        })
    }
}

fn load_certs(
    path: &Path,
    param: &'static str,
) -> Result<Vec<CertificateDer<'static>>, PgTlsError> {
    let fail = |reason: String| PgTlsError::File {
        param,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    if certs.is_empty() {
        return Err(fail("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, PgTlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path, "sslrootcert")? {
        roots.add(c).map_err(|e| PgTlsError::File {
            param: "sslrootcert",
            path: path.to_owned(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// `require`/`prefer`: the session is encrypted, the certificate is not checked (the handshake
/// signature still is, so the server proves it holds the key of the certificate it sent).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: WebPKI chain verification, the name mismatch forgiven (webpki checks the name
/// only after the chain, so a name error means the chain was good).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// tokio-postgres's `MakeTlsConnect` over tokio-rustls.
#[derive(Clone)]
pub struct MakeRustlsConnect {
    config: Arc<ClientConfig>,
    verify_name: bool,
}

impl std::fmt::Debug for MakeRustlsConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MakeRustlsConnect")
            .field("verify_name", &self.verify_name)
            .finish_non_exhaustive()
    }
}

impl<S> MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        let name = match ServerName::try_from(domain.to_owned()) {
            Ok(n) => n,
            Err(e) if self.verify_name => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("sslmode=verify-full: `{domain}` is not a DNS name or IP address: {e}"),
                ))
            }
            // Not verified: any name will do (an IP address sends no SNI).
            Err(_) => ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into()),
        };
        Ok(RustlsConnect {
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
            name,
        })
    }
}

/// One TLS handshake to come.
pub struct RustlsConnect {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = self.connector.connect(self.name, stream).await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// A TLS session to PostgreSQL.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    /// `tls-server-end-point` (RFC 5929): the hash of the server's certificate, with the hash of
    /// its signature algorithm (SHA-256 for MD5, SHA-1 and SHA-256; SHA-384; SHA-512). None for
    /// other algorithms (e.g. Ed25519), which RFC 5929 leaves undefined.
    fn channel_binding(&self) -> ChannelBinding {
        let Some(cert) = self
            .0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
        else {
            return ChannelBinding::none();
        };
        match end_point_hash(cert) {
            Some(h) => ChannelBinding::tls_server_end_point(h),
            None => ChannelBinding::none(),
        }
    }
}

fn end_point_hash(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let oid = cert.signature_algorithm.algorithm.to_id_string();
    match oid.as_str() {
        // md5WithRSA, sha1WithRSA, sha256WithRSA, ecdsa-with-SHA1, ecdsa-with-SHA256
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.2" => Some(sha2::Sha256::digest(der).to_vec()),
        // sha384WithRSA, ecdsa-with-SHA384
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Some(sha2::Sha384::digest(der).to_vec()),
        // sha512WithRSA, ecdsa-with-SHA512
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Some(sha2::Sha512::digest(der).to_vec()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_split_out_and_the_rest_kept() {
        let (url, s) = split_url(
            "postgres://u:p@h:5432/db?sslmode=verify-full&application_name=dps&sslrootcert=%2Fetc%2Fca.pem&sslcert=/c.pem&sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(url, "postgres://u:p@h:5432/db?application_name=dps");
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(s.cert.as_deref(), Some(Path::new("/c.pem")));
        assert_eq!(s.key.as_deref(), Some(Path::new("/k.pem")));
        let (url, s) = split_url("postgres://h/db").unwrap();
        assert_eq!((url.as_str(), s.mode), ("postgres://h/db", SslMode::Prefer));
        let (url, s) = split_url("postgres://h/db?sslmode=require").unwrap();
        assert_eq!(
            (url.as_str(), s.mode),
            ("postgres://h/db", SslMode::Require)
        );
        assert_eq!(s.driver_mode(), tokio_postgres::config::SslMode::Require);
    }

    #[test]
    fn bad_settings_are_named() {
        let e = split_url("postgres://h/db?sslmode=allow").unwrap_err();
        assert!(e.to_string().contains("allow"), "{e}");
        let (_, s) = split_url("postgres://h/db?sslmode=verify-full").unwrap();
        let e = s.connector().unwrap_err();
        assert!(e.to_string().contains("sslrootcert"), "{e}");
        let (_, s) = split_url("postgres://h/db?sslmode=require&sslcert=/c.pem").unwrap();
        assert!(matches!(s.connector(), Err(PgTlsError::ClientCertHalf)));
        let (_, s) =
            split_url("postgres://h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem").unwrap();
        let e = s.connector().unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn a_root_cert_makes_require_verify_the_chain() {
        let (_, s) = split_url("postgres://h/db?sslmode=require&sslrootcert=/ca.pem").unwrap();
        assert_eq!(s.effective_mode(), SslMode::VerifyCa);
        let (_, s) = split_url("postgres://h/db?sslmode=require").unwrap();
        assert_eq!(s.effective_mode(), SslMode::Require);
    }
}

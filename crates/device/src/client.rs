//! The provisioning client and its builder.

use crate::https::HttpsSession;
use crate::tls::{parse_identity, ClientTls, Trust};
use crate::wire::DEFAULT_API_VERSION;
use crate::Error;
use dps_core::model::{DeviceRegistrationState, RegistrationOperationStatus, RegistrationStatus};
use hyper::header::HeaderValue;
use rustls_pki_types::ServerName;
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the device proves who it is.
#[derive(Clone)]
#[non_exhaustive]
pub enum Auth {
    /// An individual enrollment's symmetric key (base64).
    SymmetricKey(String),
    /// An enrollment group's symmetric key (base64): the device key is derived from it with
    /// [`dps_core::sas::derive_device_key`] and the registration id.
    GroupKey(String),
    /// An X.509 certificate chain (leaf first, PEM) and its private key (PEM). The leaf's CN must
    /// be the registration id.
    X509 {
        /// Leaf certificate followed by any intermediates, PEM.
        cert_chain_pem: Vec<u8>,
        /// The leaf's private key, PEM (PKCS#8, PKCS#1 or SEC1).
        key_pem: Vec<u8>,
    },
    /// A TPM 2.0 reached through tpm2-tools (HTTPS, or AMQP with SASL `TPM`; Azure refuses TPM
    /// over MQTT): the EK and SRK are sent, dps's
    /// activation blob is opened in the TPM and SAS tokens are signed inside it.
    Tpm(crate::tpm::Tpm2Tools),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Auth::SymmetricKey(_) => "SymmetricKey(<redacted>)",
            Auth::GroupKey(_) => "GroupKey(<redacted>)",
            Auth::X509 { .. } => "X509 { .. }",
            Auth::Tpm(_) => "Tpm",
        })
    }
}

/// The device-API transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Transport {
    /// HTTPS (default port 443).
    #[default]
    Https,
    /// MQTT 3.1.1 over TLS (default port 8883).
    Mqtt,
    /// AMQP 1.0 over TLS (default port 5671).
    Amqp,
}

impl Transport {
    /// The default port of the transport.
    pub fn default_port(self) -> u16 {
        match self {
            Transport::Https => 443,
            Transport::Mqtt => 8883,
            Transport::Amqp => 5671,
        }
    }
}

/// Polling and retry rules.
#[derive(Clone, Debug)]
pub struct PollPolicy {
    /// Wait between polls when the service sends no `retry-after` (2 s, as the Azure SDKs).
    pub default_interval: Duration,
    /// Never wait less than this between polls.
    pub min_interval: Duration,
    /// Ignore the service's `retry-after` on `assigning` and wait exactly this long instead
    /// (benchmarks). Throttling (429) still honours the service's `retry-after`.
    pub override_interval: Option<Duration>,
    /// How many times a 429 or 5xx answer is retried before giving up.
    pub max_retries: u32,
    /// Cap on a single `retry-after` wait.
    pub max_wait: Duration,
}

impl Default for PollPolicy {
    fn default() -> Self {
        PollPolicy {
            default_interval: Duration::from_secs(2),
            min_interval: Duration::ZERO,
            override_interval: None,
            max_retries: 5,
            max_wait: Duration::from_secs(60),
        }
    }
}

impl PollPolicy {
    pub(crate) fn poll_wait(&self, retry_after: Option<Duration>) -> Duration {
        let w = self
            .override_interval
            .unwrap_or_else(|| retry_after.unwrap_or(self.default_interval));
        w.max(self.min_interval).min(self.max_wait)
    }
    pub(crate) fn retry_wait(&self, retry_after: Option<Duration>) -> Duration {
        retry_after
            .unwrap_or(self.default_interval)
            .max(self.min_interval)
            .min(self.max_wait)
    }
}

/// Where time went during one registration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timing {
    /// From the first byte sent (TCP connect for a fresh connection, the request write on a
    /// kept-alive one) to the final answer.
    pub elapsed: Duration,
    /// Register requests sent (1 plus retries after 429/5xx).
    pub attempts: u32,
    /// Operation-status polls sent.
    pub polls: u32,
    /// Whether a new connection (TCP + TLS) was opened for it.
    pub new_connection: bool,
}

/// The outcome of a successful registration (`assigned`).
#[derive(Clone, Debug)]
pub struct RegistrationResult {
    /// The operation id.
    pub operation_id: String,
    /// The final status (always `assigned` when returned through `Ok`).
    pub status: RegistrationStatus,
    /// The registration state (`assignedHub`, `deviceId`, `substatus`, `payload`, ...).
    pub state: DeviceRegistrationState,
    /// Timing, for benchmarks.
    pub timing: Timing,
}

impl RegistrationResult {
    /// The hub the device must connect to.
    pub fn assigned_hub(&self) -> Option<&str> {
        self.state.assigned_hub.as_deref()
    }
    /// The device id on that hub.
    pub fn device_id(&self) -> Option<&str> {
        self.state.device_id.as_deref()
    }
}

/// What to do after one response.
#[derive(Debug)]
pub(crate) enum Step {
    /// Finished: assigned.
    Done(String, Box<DeviceRegistrationState>),
    /// Still assigning: poll this operation after the wait.
    Poll(String, Duration),
    /// Transient error (429/5xx): repeat the same request after the wait.
    Retry(Duration, Error),
}

/// Interpret one device-API response (HTTP status or MQTT topic status, and the JSON body).
pub(crate) fn interpret(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
    policy: &PollPolicy,
) -> Result<Step, Error> {
    if status == 429 || status >= 500 {
        return Ok(Step::Retry(
            policy.retry_wait(retry_after),
            Error::from_status(status, body, retry_after),
        ));
    }
    if !(200..300).contains(&status) {
        return Err(Error::from_status(status, body, retry_after));
    }
    let op: RegistrationOperationStatus = serde_json::from_slice(body).map_err(|e| {
        Error::Protocol(format!(
            "unexpected response body ({e}): {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))
    })?;
    let mut state = op.registration_state.unwrap_or_default();
    match op.status {
        RegistrationStatus::Assigning | RegistrationStatus::Unassigned => {
            if op.operation_id.is_empty() {
                return Err(Error::Protocol(
                    "'assigning' response without an operationId".into(),
                ));
            }
            Ok(Step::Poll(op.operation_id, policy.poll_wait(retry_after)))
        }
        RegistrationStatus::Assigned => {
            if state.status.is_none() {
                state.status = Some(RegistrationStatus::Assigned);
            }
            Ok(Step::Done(op.operation_id, Box::new(state)))
        }
        RegistrationStatus::Failed => Err(Error::Failed {
            error_code: state.error_code,
            message: state.error_message.clone(),
            registration_state: Box::new(state),
        }),
        RegistrationStatus::Disabled => Err(Error::Disabled {
            registration_state: Box::new(state),
        }),
    }
}

/// Connection settings shared by all registrations of a client.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub host: String,
    pub port: u16,
    /// The TLS server name (SNI and certificate verification), parsed once.
    pub server_name: ServerName<'static>,
    /// The HTTP `Host` header, built once.
    pub host_header: HeaderValue,
    /// Connect to these addresses instead of resolving `host`.
    pub connect_addrs: Option<Vec<SocketAddr>>,
    /// The local (source) address of connections; the kernel's choice when `None`.
    pub local_addr: Option<IpAddr>,
    pub id_scope: String,
    pub api_version: String,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub policy: PollPolicy,
    pub sas_ttl: Duration,
    /// AMQP: await every frame of the connection setup (`fe2o3-amqp`'s client) instead of
    /// sending it in one flight.
    pub await_each_frame: bool,
}

/// The HTTP `Host` header for `host` and `port` (IPv6 literals in brackets, port 443 omitted).
fn host_header(host: &str, port: u16) -> Result<HeaderValue, Error> {
    let h = match (host.contains(':'), port) {
        (false, 443) => host.to_string(),
        (true, 443) => format!("[{host}]"),
        (false, p) => format!("{host}:{p}"),
        (true, p) => format!("[{host}]:{p}"),
    };
    HeaderValue::try_from(h).map_err(|_| Error::Config(format!("bad host name '{host}'")))
}

/// A device provisioning client: one device identity, one endpoint.
///
/// Build it with [`ProvisioningClient::builder`]; see the crate documentation for an example.
#[derive(Clone)]
pub struct ProvisioningClient {
    pub(crate) ep: Arc<Endpoint>,
    pub(crate) transport: Transport,
    pub(crate) registration_id: String,
    /// The device's symmetric key (derived already for group keys); `None` for X.509.
    pub(crate) key: Option<String>,
    /// The TPM, for TPM attestation.
    pub(crate) tpm: Option<crate::tpm::Tpm2Tools>,
    pub(crate) tls: ClientTls,
    pub(crate) payload: Option<Value>,
    /// A certificate signing request (base64 DER) sent with the registration.
    pub(crate) csr: Option<String>,
    pub(crate) total_timeout: Duration,
}

impl std::fmt::Debug for ProvisioningClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvisioningClient")
            .field("endpoint", &self.ep)
            .field("transport", &self.transport)
            .field("registration_id", &self.registration_id)
            .finish_non_exhaustive()
    }
}

impl ProvisioningClient {
    /// Start building a client.
    pub fn builder() -> ProvisioningClientBuilder {
        ProvisioningClientBuilder::default()
    }

    /// The registration id.
    pub fn registration_id(&self) -> &str {
        &self.registration_id
    }

    /// The transport.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Register the device: send the register request, poll until the service answers with a
    /// final status, and honour `retry-after` on `assigning`, 429 and 5xx.
    ///
    /// Returns the registration when it is `assigned`; every other outcome is an [`Error`]
    /// (`Failed`, `Disabled`, `Unauthorized`, ...).
    pub async fn register(&self) -> Result<RegistrationResult, Error> {
        let work = async {
            match self.transport {
                Transport::Https if self.tpm.is_some() => {
                    let mut s = self.https_session();
                    let r = s
                        .register_tpm(
                            &self.registration_id,
                            self.tpm.as_ref().expect("checked"),
                            self.payload.as_ref(),
                        )
                        .await;
                    s.close();
                    r
                }
                Transport::Mqtt if self.tpm.is_some() => Err(Error::Config(
                    "TPM attestation is not supported over MQTT (as in Azure); use HTTPS or AMQP"
                        .into(),
                )),
                Transport::Amqp if self.tpm.is_some() => {
                    crate::amqp::register_tpm(
                        &self.ep,
                        self.tls.mqtt.clone(),
                        &self.registration_id,
                        self.tpm.as_ref().expect("checked"),
                        self.payload.as_ref(),
                    )
                    .await
                }
                Transport::Https => {
                    let mut s = self.https_session();
                    let r = s
                        .register_with(
                            &self.registration_id,
                            self.key.as_deref(),
                            self.payload.as_ref(),
                            self.csr.as_deref(),
                        )
                        .await;
                    s.close();
                    r
                }
                Transport::Mqtt => {
                    crate::mqtt::register(
                        &self.ep,
                        self.tls.mqtt.clone(),
                        &self.registration_id,
                        self.key.as_deref(),
                        self.payload.as_ref(),
                        self.csr.as_deref(),
                    )
                    .await
                }
                Transport::Amqp if self.ep.await_each_frame => {
                    crate::amqp::register(
                        &self.ep,
                        self.tls.mqtt.clone(),
                        &self.registration_id,
                        self.key.as_deref(),
                        self.payload.as_ref(),
                    )
                    .await
                }
                Transport::Amqp => {
                    crate::amqp_flight::register(
                        &self.ep,
                        self.tls.mqtt.clone(),
                        &self.registration_id,
                        self.key.as_deref(),
                        self.payload.as_ref(),
                    )
                    .await
                }
            }
        };
        match tokio::time::timeout(self.total_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout),
        }
    }

    /// A kept-alive HTTPS session on this client's endpoint and TLS settings, for many
    /// registrations over one connection (see [`HttpsSession::register_once`]). It connects
    /// lazily and reconnects when the server closes the connection.
    pub fn https_session(&self) -> HttpsSession {
        HttpsSession::new(self.ep.clone(), self.tls.https.clone())
    }

    /// Open a fresh TCP connection to the device endpoint, complete the TLS handshake with this
    /// client's transport settings (port, ALPN, server verification, client certificate for
    /// X.509) and close it without sending anything: the cost of the bare handshake, a baseline
    /// for load tests. Returns the time from the TCP connect to the handshake's completion (the
    /// client's last flight written).
    ///
    /// It connects like [`ProvisioningClient::register`]: to the addresses given with
    /// [`ProvisioningClientBuilder::connect_addrs`] (else the resolved host), from the
    /// [`ProvisioningClientBuilder::local_address`], if any.
    pub async fn tls_handshake(&self) -> Result<Duration, Error> {
        let started = Instant::now();
        let config = match self.transport {
            Transport::Https => &self.tls.https,
            // AMQP uses the same TLS settings as MQTT (no ALPN).
            Transport::Mqtt | Transport::Amqp => &self.tls.mqtt,
        };
        let stream = crate::tls::connect_tls(&self.ep, config).await?;
        let elapsed = started.elapsed();
        drop(stream);
        Ok(elapsed)
    }
}

/// Builder for [`ProvisioningClient`].
#[derive(Default)]
pub struct ProvisioningClientBuilder {
    endpoint: Option<String>,
    port: Option<u16>,
    id_scope: Option<String>,
    registration_id: Option<String>,
    auth: Option<Auth>,
    transport: Transport,
    trust: Trust,
    tls: Option<ClientTls>,
    connect_addrs: Option<Vec<SocketAddr>>,
    local_addr: Option<IpAddr>,
    payload: Option<Value>,
    csr: Option<String>,
    api_version: Option<String>,
    connect_timeout: Option<Duration>,
    request_timeout: Option<Duration>,
    total_timeout: Option<Duration>,
    policy: PollPolicy,
    sas_ttl: Option<Duration>,
    await_each_frame: bool,
}

impl ProvisioningClientBuilder {
    /// The global device endpoint, `host` or `host:port` (e.g. `localhost:8443`).
    pub fn global_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }
    /// The port (overrides a port in the endpoint; default 443 for HTTPS, 8883 for MQTT).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }
    /// The instance's ID scope.
    pub fn id_scope(mut self, scope: impl Into<String>) -> Self {
        self.id_scope = Some(scope.into());
        self
    }
    /// The device's registration id.
    pub fn registration_id(mut self, id: impl Into<String>) -> Self {
        self.registration_id = Some(id.into());
        self
    }
    /// The credential.
    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = Some(auth);
        self
    }
    /// HTTPS (default), MQTT or AMQP.
    pub fn transport(mut self, t: Transport) -> Self {
        self.transport = t;
        self
    }
    /// Which server certificates to trust (default: the system roots).
    pub fn trust(mut self, trust: Trust) -> Self {
        self.trust = trust;
        self
    }
    /// Use TLS settings prepared once with [`ClientTls::new`] and shared with other clients
    /// (instead of building them from [`ProvisioningClientBuilder::trust`], which is then
    /// ignored). Symmetric-key clients then cost no TLS set-up at all; X.509 clients only load
    /// their own certificate and key.
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }
    /// Connect to these addresses (tried in order) instead of resolving the endpoint's host on
    /// every connection. The host is still the TLS server name (and the HTTP `Host` header).
    pub fn connect_addrs(mut self, addrs: impl Into<Vec<SocketAddr>>) -> Self {
        let addrs = addrs.into();
        self.connect_addrs = (!addrs.is_empty()).then_some(addrs);
        self
    }
    /// Open connections from this local address (any port), e.g. to simulate many devices with
    /// addresses of their own on one machine. One source address has only the kernel's
    /// ephemeral port range (about 28,000 ports) towards one server address.
    pub fn local_address(mut self, addr: IpAddr) -> Self {
        self.local_addr = Some(addr);
        self
    }
    /// AMQP only: await each frame of the connection setup (SASL mechanisms, outcome, header,
    /// OPEN, BEGIN, each ATTACH) and of the goodbye (`fe2o3-amqp`'s client; the Azure SDKs wait
    /// at least for the SASL exchange and the receiver link) instead of the default one flight (the whole setup in one write, then the request as soon as the
    /// service grants credit). For measuring what SDK-like devices cost the service.
    pub fn await_each_frame(mut self, yes: bool) -> Self {
        self.await_each_frame = yes;
        self
    }
    /// A certificate signing request (DER PKCS#10, subject CN = the registration id) sent with
    /// the registration: dps signs it when the enrollment has a credential policy, and the
    /// result's `state.issued_certificate_chain` holds the chain (leaf first). Needs
    /// api-version `2025-07-01-preview` or later (set it with [`Self::api_version`]).
    pub fn csr(mut self, der: &[u8]) -> Self {
        use base64::Engine as _;
        self.csr = Some(base64::engine::general_purpose::STANDARD.encode(der));
        self
    }

    /// A custom payload sent with the registration (any JSON).
    pub fn payload(mut self, payload: Value) -> Self {
        self.payload = Some(payload);
        self
    }
    /// The device API version (default `2019-03-31`).
    pub fn api_version(mut self, v: impl Into<String>) -> Self {
        self.api_version = Some(v.into());
        self
    }
    /// TCP + TLS connect timeout (default 10 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = Some(d);
        self
    }
    /// Timeout of one request (default 30 s).
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = Some(d);
        self
    }
    /// Timeout of a whole registration, polls and retries included (default 5 min).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.total_timeout = Some(d);
        self
    }
    /// Polling and retry rules.
    pub fn poll_policy(mut self, p: PollPolicy) -> Self {
        self.policy = p;
        self
    }
    /// Wait exactly this long between polls, whatever `retry-after` says (benchmarks).
    pub fn poll_interval_override(mut self, d: Duration) -> Self {
        self.policy.override_interval = Some(d);
        self
    }
    /// Lifetime of the SAS tokens the client signs (default 1 h).
    pub fn sas_ttl(mut self, d: Duration) -> Self {
        self.sas_ttl = Some(d);
        self
    }

    /// Check the settings and prepare TLS.
    pub fn build(self) -> Result<ProvisioningClient, Error> {
        let endpoint = self
            .endpoint
            .ok_or_else(|| Error::Config("the global endpoint is required".into()))?;
        let (host, port_in_ep) = split_host_port(&endpoint)?;
        let port = self
            .port
            .or(port_in_ep)
            .unwrap_or(self.transport.default_port());
        let id_scope = self
            .id_scope
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::Config("the ID scope is required".into()))?;
        let registration_id = self
            .registration_id
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::Config("the registration id is required".into()))?;
        let auth = self
            .auth
            .ok_or_else(|| Error::Config("a credential (key or certificate) is required".into()))?;
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| Error::Config(format!("bad host name '{host}': {e}")))?;
        let host_header = host_header(&host, port)?;
        let tls = match self.tls {
            Some(t) => t,
            None => ClientTls::new(&self.trust)?,
        };
        let mut tpm = None;
        let (key, identity) = match auth {
            Auth::Tpm(t) => {
                tpm = Some(t);
                (None, None)
            }
            Auth::SymmetricKey(k) => {
                if !dps_core::sas::valid_key(&k) {
                    return Err(Error::Config(
                        "the symmetric key must be base64 of 16 to 64 bytes".into(),
                    ));
                }
                (Some(k), None)
            }
            Auth::GroupKey(g) => {
                let k = dps_core::sas::derive_device_key(&g, &registration_id)
                    .ok_or_else(|| Error::Config("the group key is not valid base64".into()))?;
                (Some(k), None)
            }
            Auth::X509 {
                cert_chain_pem,
                key_pem,
            } => (None, Some(parse_identity(&cert_chain_pem, &key_pem)?)),
        };
        let tls = match identity {
            Some((certs, key)) => tls.with_identity(certs, key)?,
            None => tls,
        };
        Ok(ProvisioningClient {
            ep: Arc::new(Endpoint {
                host,
                port,
                server_name,
                host_header,
                connect_addrs: self.connect_addrs,
                local_addr: self.local_addr,
                id_scope,
                api_version: self
                    .api_version
                    .unwrap_or_else(|| DEFAULT_API_VERSION.to_string()),
                connect_timeout: self.connect_timeout.unwrap_or(Duration::from_secs(10)),
                request_timeout: self.request_timeout.unwrap_or(Duration::from_secs(30)),
                policy: self.policy,
                sas_ttl: self.sas_ttl.unwrap_or(Duration::from_secs(3600)),
                await_each_frame: self.await_each_frame,
            }),
            transport: self.transport,
            registration_id,
            key,
            tpm,
            tls,
            payload: self.payload,
            csr: self.csr,
            total_timeout: self.total_timeout.unwrap_or(Duration::from_secs(300)),
        })
    }
}

/// Split `host`, `host:port` or `[v6]:port`.
pub fn split_host_port(s: &str) -> Result<(String, Option<u16>), Error> {
    let s = s.trim();
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("mqtts://"))
        .unwrap_or(s)
        .trim_end_matches('/');
    if s.is_empty() {
        return Err(Error::Config("the global endpoint is empty".into()));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| Error::Config(format!("bad endpoint '{s}'")))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(
                p.parse()
                    .map_err(|_| Error::Config(format!("bad port in '{s}'")))?,
            ),
            None => None,
        };
        return Ok((h.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Ok((
            h.to_string(),
            Some(
                p.parse()
                    .map_err(|_| Error::Config(format!("bad port in '{s}'")))?,
            ),
        )),
        _ => Ok((s.to_string(), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("h").unwrap(), ("h".into(), None));
        assert_eq!(
            split_host_port("h.example:8443").unwrap(),
            ("h.example".into(), Some(8443))
        );
        assert_eq!(
            split_host_port("https://h:1/").unwrap(),
            ("h".into(), Some(1))
        );
        assert_eq!(
            split_host_port("[::1]:99").unwrap(),
            ("::1".into(), Some(99))
        );
        assert!(split_host_port("h:x").is_err());
    }

    #[test]
    fn interpret_statuses() {
        let p = PollPolicy::default();
        let s = interpret(
            202,
            br#"{"operationId":"op1","status":"assigning"}"#,
            Some(Duration::from_secs(3)),
            &p,
        )
        .unwrap();
        assert!(matches!(s, Step::Poll(ref op, d) if op == "op1" && d == Duration::from_secs(3)));
        let s = interpret(
            202,
            br#"{"operationId":"op1","status":"assigning"}"#,
            None,
            &p,
        )
        .unwrap();
        assert!(matches!(s, Step::Poll(_, d) if d == Duration::from_secs(2)));
        let s = interpret(
            200,
            br#"{"operationId":"op1","status":"assigned","registrationState":{"registrationId":"d","assignedHub":"h","deviceId":"d","status":"assigned","substatus":"initialAssignment"}}"#,
            None,
            &p,
        )
        .unwrap();
        assert!(matches!(s, Step::Done(_, ref st) if st.assigned_hub.as_deref() == Some("h")));
        let e = interpret(
            200,
            br#"{"operationId":"op1","status":"failed","registrationState":{"registrationId":"d","status":"failed","errorCode":400208,"errorMessage":"no hub"}}"#,
            None,
            &p,
        )
        .unwrap_err();
        assert!(matches!(
            e,
            Error::Failed {
                error_code: Some(400208),
                ..
            }
        ));
        assert_eq!(e.reason(), "failed_400208");
        let e = interpret(
            200,
            br#"{"operationId":"","status":"disabled","registrationState":{"registrationId":"d","status":"disabled"}}"#,
            None,
            &p,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Disabled { .. }));
        let s = interpret(429, b"{}", Some(Duration::from_secs(7)), &p).unwrap();
        assert!(matches!(s, Step::Retry(d, _) if d == Duration::from_secs(7)));
        assert!(matches!(
            interpret(
                404,
                br#"{"errorCode":404201,"message":"m","trackingId":"t"}"#,
                None,
                &p
            ),
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            interpret(200, b"nope", None, &p),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn override_and_minimum() {
        let p = PollPolicy {
            override_interval: Some(Duration::from_millis(50)),
            ..Default::default()
        };
        assert_eq!(
            p.poll_wait(Some(Duration::from_secs(3))),
            Duration::from_millis(50)
        );
        // Throttling still honours the service.
        assert_eq!(
            p.retry_wait(Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        let p = PollPolicy {
            min_interval: Duration::from_secs(1),
            ..Default::default()
        };
        assert_eq!(p.poll_wait(Some(Duration::ZERO)), Duration::from_secs(1));
    }

    #[test]
    fn host_headers() {
        assert_eq!(host_header("h", 443).unwrap(), "h");
        assert_eq!(host_header("h", 8443).unwrap(), "h:8443");
        assert_eq!(host_header("::1", 8443).unwrap(), "[::1]:8443");
        assert_eq!(host_header("::1", 443).unwrap(), "[::1]");
    }

    #[test]
    fn shared_tls_is_reused_not_rebuilt() {
        let tls = ClientTls::from_roots(Arc::new(rustls::RootCertStore::empty())).unwrap();
        let build = |rid: &str, t: Transport| {
            ProvisioningClient::builder()
                .global_endpoint("localhost:8443")
                .transport(t)
                .id_scope("0ne1")
                .registration_id(rid)
                .auth(Auth::GroupKey(dps_core::sas::generate_key()))
                .tls(tls.clone())
                .connect_addrs(vec![SocketAddr::from(([127, 0, 0, 1], 8443))])
                .build()
                .unwrap()
        };
        let (a, b) = (build("a", Transport::Https), build("b", Transport::Mqtt));
        assert!(Arc::ptr_eq(&a.tls.https, &b.tls.https));
        assert!(Arc::ptr_eq(&a.tls.mqtt, &tls.mqtt));
        assert_eq!(a.tls.https.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(a.tls.mqtt.alpn_protocols.is_empty());
        assert!(!a.tls.https.client_auth_cert_resolver.has_certs());
        assert_eq!(a.ep.host_header, "localhost:8443");
        assert_eq!(a.ep.connect_addrs.as_ref().map(Vec::len), Some(1));
        // A bad host name is a configuration error at build time.
        let e = ProvisioningClient::builder()
            .global_endpoint("bad host")
            .id_scope("0ne1")
            .registration_id("d")
            .auth(Auth::GroupKey(dps_core::sas::generate_key()))
            .tls(tls.clone())
            .build()
            .unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e:?}");
    }

    #[test]
    fn builder_validates() {
        let e = ProvisioningClient::builder()
            .global_endpoint("localhost:1")
            .id_scope("0ne1")
            .registration_id("d")
            .auth(Auth::SymmetricKey("***".into()))
            .trust(Trust::Roots(Arc::new(rustls::RootCertStore::empty())))
            .build()
            .unwrap_err();
        assert!(matches!(e, Error::Config(_)));
        let c = ProvisioningClient::builder()
            .global_endpoint("localhost")
            .transport(Transport::Mqtt)
            .id_scope("0ne1")
            .registration_id("d")
            .auth(Auth::GroupKey(dps_core::sas::generate_key()))
            .trust(Trust::Roots(Arc::new(rustls::RootCertStore::empty())))
            .build()
            .unwrap();
        assert_eq!(c.ep.port, 8883);
        assert!(c.key.is_some());
    }
}

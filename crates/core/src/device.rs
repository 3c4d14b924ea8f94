//! The device-facing port: the registration use cases as every transport (HTTPS, MQTT, MQTT
//! over WebSocket, AMQP, AMQP over WebSocket) sees them. Front ends translate their wire format into a [`DeviceRequest`]
//! and render the [`DeviceResponse`], or the domain [`Error`] through [`crate::wire`] (the one
//! mapping to wire errors); they hold no registration logic.

use crate::error::Error;
use crate::model::{DeviceRegistration, DeviceRegistrationState, RegistrationOperationStatus};
use async_trait::async_trait;

/// The transport a request arrived on (a small fixed set, used as a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// HTTPS.
    Https,
    /// MQTT over TLS.
    Mqtt,
    /// MQTT over WebSocket.
    MqttWs,
    /// AMQP 1.0 over TLS.
    Amqp,
    /// AMQP 1.0 over WebSocket.
    AmqpWs,
}

impl Transport {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Https => "https",
            Transport::Mqtt => "mqtt",
            Transport::MqttWs => "mqtt-ws",
            Transport::Amqp => "amqp",
            Transport::AmqpWs => "amqp-ws",
        }
    }
}

/// What the device presented to prove its identity.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum DeviceCredential {
    /// A SAS token (`SharedAccessSignature sr=...`).
    Sas(String),
    /// The TLS client certificate chain, DER, leaf first.
    Certificates(Vec<Vec<u8>>),
    /// Nothing.
    #[default]
    None,
}

impl std::fmt::Debug for DeviceCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceCredential::Sas(_) => f.write_str("Sas(<redacted>)"),
            DeviceCredential::Certificates(c) => write!(f, "Certificates(len={})", c.len()),
            DeviceCredential::None => f.write_str("None"),
        }
    }
}

/// A device request, transport-independent.
#[derive(Debug, Clone)]
pub struct DeviceRequest {
    /// ID scope from the path / username.
    pub id_scope: String,
    /// Registration id from the path / username / client id.
    pub registration_id: String,
    /// Credential.
    pub credential: DeviceCredential,
    /// Parsed body (lenient).
    pub body: DeviceRegistration,
    /// Transport.
    pub transport: Transport,
    /// api-version, when sent.
    pub api_version: Option<String>,
    /// `forceRegistration=true`.
    pub force_registration: bool,
    /// The network peer's address (the TCP source), when the transport knows it: what
    /// refusals are rate-limited by in the audit log.
    pub peer: Option<std::net::IpAddr>,
}

/// A successful device-API answer.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceResponse {
    /// 200 (final) or 202 (still assigning).
    pub status: u16,
    /// Body.
    pub body: RegistrationOperationStatus,
    /// Seconds the device should wait before polling.
    pub retry_after: Option<u32>,
}

/// Why an MQTT CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// CONNACK 4: bad user name or password (malformed).
    BadUsernameOrPassword,
    /// CONNACK 5: not authorized.
    NotAuthorized,
    /// CONNACK 3: server unavailable (retryable).
    ServerUnavailable,
}

/// The registration use cases.
#[async_trait]
pub trait DeviceService: Send + Sync + 'static {
    /// `PUT /{idScope}/registrations/{registrationId}/register` and its MQTT equivalent.
    async fn register(&self, req: DeviceRequest) -> Result<DeviceResponse, Error>;
    /// `GET .../operations/{operationId}` and its MQTT equivalent.
    async fn operation_status(
        &self,
        req: DeviceRequest,
        operation_id: &str,
    ) -> Result<DeviceResponse, Error>;
    /// `POST /{idScope}/registrations/{registrationId}`: the device's own registration state.
    async fn registration_status(
        &self,
        req: DeviceRequest,
    ) -> Result<DeviceRegistrationState, Error>;
    /// TPM attestation, step 1 (protocol digest §6.5), for a transport that runs the challenge
    /// outside a register request: the AMQP SASL `TPM` mechanism (§6.5.6) calls it with the EK
    /// from `sasl-init` and the SRK from the first `sasl-response`, and sends the returned
    /// activation blob (raw bytes) in its challenge frames. The device then proves itself with
    /// the SAS token of the final `sasl-response`, which the transport passes as
    /// [`DeviceCredential::Sas`] on its requests (register requests also carry `tpm`). HTTPS
    /// needs no call: a register request with `tpm` and no credential is answered with
    /// [`Error::TpmChallenge`].
    async fn tpm_challenge(
        &self,
        id_scope: &str,
        registration_id: &str,
        tpm: &crate::model::TpmAttestation,
        transport: Transport,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Vec<u8>, Error> {
        let _ = (id_scope, registration_id, tpm, transport, peer);
        Err(Error::Unsupported(
            "TPM attestation is not supported by this service".into(),
        ))
    }
    /// Check credentials when a connection authenticates (MQTT CONNECT, AMQP SASL PLAIN; SAS
    /// tokens: X.509 is checked at register time). `transport` labels refusals in the audit
    /// log and the metrics; `peer` is the network peer's address, when known.
    async fn authorize_connect(
        &self,
        transport: Transport,
        id_scope: &str,
        registration_id: &str,
        credential: &DeviceCredential,
        peer: Option<std::net::IpAddr>,
    ) -> Result<(), ConnectRefusal>;
    /// Whether a fault injection rule (`drop` at `connect` or `subscribe`) closes this
    /// connection now, at `point` ([`FaultPoint::Connect`]: MQTT after an accepted CONNECT, AMQP
    /// at ATTACH; [`FaultPoint::Subscribe`]: MQTT SUBSCRIBE). The transport then closes the
    /// connection without answering. No fault by default.
    ///
    /// [`FaultPoint::Connect`]: crate::fault::FaultPoint::Connect
    /// [`FaultPoint::Subscribe`]: crate::fault::FaultPoint::Subscribe
    fn connection_fault(
        &self,
        point: crate::fault::FaultPoint,
        transport: Transport,
        id_scope: &str,
        registration_id: &str,
        peer: Option<std::net::IpAddr>,
    ) -> bool {
        let _ = (point, transport, id_scope, registration_id, peer);
        false
    }
}

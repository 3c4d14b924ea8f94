//! The device API over AMQP 1.0 + TLS (protocol digest §5): one connection per registration,
//! as the Azure SDKs do.
//!
//! [`AmqpDeviceConnection`] is `fe2o3-amqp`'s client, which awaits each frame; the tests
//! and the `amqp_idle` bench use it as a client independent of dps's own AMQP code, and
//! [`crate::ProvisioningClient`] uses it with
//! [`crate::ProvisioningClientBuilder::await_each_frame`]. By default the client registers with
//! `crate::amqp_flight` instead: the same exchange with the connection setup in one flight, on
//! `dps-amqp`'s framing.
//!
//! The AMQP connection, session and links are `fe2o3-amqp`'s (a maintained client); TLS is
//! ours ([`crate::tls::connect_tls`]: pinned addresses, local address, shared configuration).
//! Symmetric keys authenticate with SASL `PLAIN` (authcid `{idScope}/registrations/{id}`,
//! password the SAS token); X.509 devices send no SASL layer (their TLS client certificate is
//! the credential), like the C, C# and Java SDKs. One session, a receiver link (source =
//! the registration address) and a sender link (target = the same), then: register (data
//! section with the JSON body, `iotdps-operation-type = iotdps-register`,
//! `iotdps-forceRegistration`), answers matched by `correlation-id`, polls with
//! `iotdps-get-operationstatus` and `iotdps-operation-id`. A `rejected` outcome carries the
//! error JSON in its description and `retry-after` in its info.

use crate::client::{interpret, Endpoint, RegistrationResult, Step, Timing};
use crate::wire::device_sas;
use crate::Error;
use dps_core::model::{DeviceRegistration, RegistrationStatus};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use fe2o3_amqp_types::definitions::Fields;
use fe2o3_amqp_types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageId, Outcome, Properties,
};
use fe2o3_amqp_types::primitives::{Binary, OrderedMap, SimpleValue, Symbol, Value};
use rustls::ClientConfig;
use serde_json::Value as Json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `iotdps-operation-type` of a registration request.
pub const OP_REGISTER: &str = "iotdps-register";
/// `iotdps-operation-type` of an operation-status poll.
pub const OP_STATUS: &str = "iotdps-get-operationstatus";

/// One answer of the service, as received (for callers that check the wire, e.g. tests).
#[derive(Debug, Clone)]
pub enum AmqpAnswer {
    /// The request was accepted and answered with a message.
    Message {
        /// `correlation-id` of the answer.
        correlation_id: Option<String>,
        /// Application properties, as text.
        properties: Vec<(String, String)>,
        /// The data-section body.
        body: Vec<u8>,
    },
    /// The request was settled `rejected`.
    Rejected {
        /// The error condition (e.g. `amqp:unauthorized-access`).
        condition: String,
        /// The error description (the DPS error JSON).
        description: Option<String>,
        /// The error's info map, as text.
        info: Vec<(String, String)>,
    },
}

impl AmqpAnswer {
    /// An application property (or, for a rejection, an info entry).
    pub fn property(&self, key: &str) -> Option<&str> {
        let list = match self {
            AmqpAnswer::Message { properties, .. } => properties,
            AmqpAnswer::Rejected { info, .. } => info,
        };
        list.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The HTTP-equivalent status, the JSON body and `retry-after`: what the HTTPS client
    /// interprets.
    pub fn as_http(&self) -> (u16, Vec<u8>, Option<Duration>) {
        let retry = self
            .property("retry-after")
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        match self {
            AmqpAnswer::Message { body, .. } => {
                let status = serde_json::from_slice::<Json>(body)
                    .ok()
                    .and_then(|v| v["status"].as_str().map(str::to_string));
                let code = match status.as_deref() {
                    Some("assigning") | Some("unassigned") => 202,
                    _ => 200,
                };
                (code, body.clone(), retry)
            }
            AmqpAnswer::Rejected {
                condition,
                description,
                ..
            } => {
                let body = description.clone().unwrap_or_default().into_bytes();
                let code = serde_json::from_slice::<Json>(&body)
                    .ok()
                    .and_then(|v| v["errorCode"].as_u64())
                    .map(|c| (c / 1000) as u16)
                    .unwrap_or(match condition.as_str() {
                        "amqp:unauthorized-access" => 401,
                        "amqp:not-found" => 404,
                        "com.microsoft:device-container-throttled" => 429,
                        "amqp:internal-error" => 500,
                        _ => 400,
                    });
                (code, body, retry)
            }
        }
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Symbol(s) => s.0.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Uint(n) => n.to_string(),
        Value::Int(n) => n.to_string(),
        Value::Ulong(n) => n.to_string(),
        Value::Long(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

/// The answer of a request the service settled `rejected`.
pub(crate) fn rejected_answer(r: fe2o3_amqp_types::messaging::Rejected) -> AmqpAnswer {
    let (condition, description, info) = match r.error {
        Some(e) => (
            match &e.condition {
                fe2o3_amqp_types::definitions::ErrorCondition::Custom(s) => s.0.clone(),
                other => match serde_amqp::to_value(other).ok() {
                    Some(Value::Symbol(s)) => s.0,
                    _ => format!("{other:?}"),
                },
            },
            e.description,
            e.info
                .map(|m| m.iter().map(|(k, v)| (k.0.clone(), text(v))).collect())
                .unwrap_or_default(),
        ),
        None => ("amqp:internal-error".into(), None, Vec::new()),
    };
    AmqpAnswer::Rejected {
        condition,
        description,
        info,
    }
}

pub(crate) fn simple_text(v: &SimpleValue) -> String {
    match v {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

fn amqp_error(what: &str, e: impl std::fmt::Display) -> Error {
    let s = e.to_string();
    // A SASL `auth` outcome is the service refusing the credential.
    if s.to_ascii_lowercase().contains("auth") {
        return Error::Unauthorized {
            error_code: None,
            message: format!("the server refused the AMQP connection ({what}: {s})"),
            tracking_id: None,
        };
    }
    Error::Transport(format!("AMQP {what}: {s}"))
}

/// One AMQP connection with its session and the two links of a registration.
pub struct AmqpDeviceConnection {
    conn: ConnectionHandle<()>,
    session: SessionHandle<()>,
    sender: Sender,
    receiver: Receiver,
    next_correlation: u64,
}

impl std::fmt::Debug for AmqpDeviceConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpDeviceConnection")
            .finish_non_exhaustive()
    }
}

impl AmqpDeviceConnection {
    /// TLS (with `tls`), then AMQP: SASL PLAIN with `sas_token` when given (else no SASL: the
    /// client certificate in `tls` is the credential), OPEN, BEGIN, the receiver and sender
    /// links on `address` (e.g. `{idScope}/registrations/{id}`).
    pub(crate) async fn open(
        ep: &Endpoint,
        tls: &Arc<ClientConfig>,
        address: &str,
        sas_token: Option<String>,
    ) -> Result<AmqpDeviceConnection, Error> {
        let io = crate::tls::connect_tls(ep, tls).await?;
        Self::open_on(io, &ep.host, &ep.api_version, address, sas_token).await
    }

    /// As [`AmqpDeviceConnection::open`], over an established stream (TLS or WebSocket).
    pub async fn open_on<Io>(
        io: Io,
        host: &str,
        api_version: &str,
        address: &str,
        sas_token: Option<String>,
    ) -> Result<AmqpDeviceConnection, Error>
    where
        Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
    {
        let mut b = Connection::builder()
            .container_id(format!("dps-device-{}", uuid_like()))
            .hostname(host)
            .scheme("amqp");
        if let Some(token) = sas_token {
            b = b.sasl_profile(SaslProfile::Plain {
                username: address.to_string(),
                password: token,
            });
        }
        let mut conn = b
            .open_with_stream(io)
            .await
            .map_err(|e| amqp_error("open", e))?;
        let mut session = Session::begin(&mut conn)
            .await
            .map_err(|e| amqp_error("begin", e))?;
        let mut props: Fields = OrderedMap::new();
        props.insert(
            Symbol::from("com.microsoft:api-version"),
            Value::String(api_version.to_string()),
        );
        props.insert(
            Symbol::from("com.microsoft:client-version"),
            Value::String(format!("dps-device/{}", env!("CARGO_PKG_VERSION"))),
        );
        let receiver = Receiver::builder()
            .name(format!("receiver-{}", uuid_like()))
            .source(address)
            .properties(props.clone())
            .attach(&mut session)
            .await
            .map_err(|e| amqp_error("attach (receiver)", e))?;
        let sender = Sender::builder()
            .name(format!("sender-{}", uuid_like()))
            .target(address)
            .properties(props)
            .attach(&mut session)
            .await
            .map_err(|e| amqp_error("attach (sender)", e))?;
        Ok(AmqpDeviceConnection {
            conn,
            session,
            sender,
            receiver,
            next_correlation: 0,
        })
    }

    /// Send one request and wait for its answer: `operation` is [`OP_REGISTER`] (with `body`)
    /// or [`OP_STATUS`] (with `operation_id`).
    pub async fn request(
        &mut self,
        operation: &str,
        operation_id: Option<&str>,
        force_registration: bool,
        body: &[u8],
    ) -> Result<AmqpAnswer, Error> {
        self.next_correlation += 1;
        let correlation = format!("{}-{}", uuid_like(), self.next_correlation);
        let mut app: OrderedMap<String, SimpleValue> = OrderedMap::new();
        app.insert(
            "iotdps-operation-type".into(),
            SimpleValue::String(operation.into()),
        );
        if let Some(op) = operation_id {
            app.insert("iotdps-operation-id".into(), SimpleValue::String(op.into()));
        }
        if operation == OP_REGISTER {
            app.insert(
                "iotdps-forceRegistration".into(),
                SimpleValue::Bool(force_registration),
            );
        }
        let msg = Message::builder()
            .properties(
                Properties::builder()
                    .correlation_id(MessageId::String(correlation.clone()))
                    .build(),
            )
            .application_properties(ApplicationProperties(app))
            .data(Data(Binary::from(body.to_vec())))
            .build();
        let outcome = self
            .sender
            .send(msg)
            .await
            .map_err(|e| amqp_error("send", e))?;
        match outcome {
            Outcome::Accepted(_) => {}
            Outcome::Rejected(r) => return Ok(rejected_answer(r)),
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected AMQP outcome {other:?}"
                )))
            }
        }
        // The answer with our correlation id (others are not ours: skipped).
        loop {
            let delivery = self
                .receiver
                .recv::<Body<Value>>()
                .await
                .map_err(|e| amqp_error("receive", e))?;
            self.receiver
                .accept(&delivery)
                .await
                .map_err(|e| amqp_error("accept", e))?;
            let m = delivery.into_message();
            let cid = m.properties.as_ref().and_then(|p| match &p.correlation_id {
                Some(MessageId::String(s)) => Some(s.clone()),
                Some(other) => Some(format!("{other:?}")),
                None => None,
            });
            if cid.as_deref() != Some(correlation.as_str()) {
                continue;
            }
            let properties = m
                .application_properties
                .map(|a| {
                    a.0.iter()
                        .map(|(k, v)| (k.clone(), simple_text(v)))
                        .collect()
                })
                .unwrap_or_default();
            let body = match m.body {
                Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
                _ => {
                    return Err(Error::Protocol(
                        "the AMQP answer's body is not a data section".into(),
                    ))
                }
            };
            return Ok(AmqpAnswer::Message {
                correlation_id: cid,
                properties,
                body,
            });
        }
    }

    /// Detach, end and close (errors ignored: the registration is over).
    pub async fn close(mut self) {
        let _ = self.sender.close().await;
        let _ = self.receiver.close().await;
        let _ = self.session.end().await;
        let _ = self.conn.close().await;
    }
}

pub(crate) fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{t:x}-{:x}", N.fetch_add(1, Ordering::Relaxed))
}

/// Register (and poll) over one AMQP connection until the registration is assigned or fails,
/// awaiting every frame of the setup and of the goodbye (`fe2o3-amqp`)
/// ([`crate::ProvisioningClientBuilder::await_each_frame`]; the default is
/// `crate::amqp_flight::register`).
pub(crate) async fn register(
    ep: &Endpoint,
    tls: Arc<ClientConfig>,
    registration_id: &str,
    key: Option<&str>,
    payload: Option<&Json>,
) -> Result<RegistrationResult, Error> {
    let started = Instant::now();
    let address = format!("{}/registrations/{}", ep.id_scope, registration_id);
    let token = match key {
        Some(k) => Some(
            device_sas(&ep.id_scope, registration_id, k, ep.sas_ttl)
                .ok_or_else(|| Error::Config("the symmetric key is not valid base64".into()))?,
        ),
        None => None,
    };
    let body = serde_json::to_vec(&DeviceRegistration {
        registration_id: Some(registration_id.to_string()),
        payload: payload.cloned(),
        ..Default::default()
    })
    .map_err(|e| Error::Config(format!("cannot encode the request: {e}")))?;
    let mut conn = tokio::time::timeout(
        ep.connect_timeout + ep.request_timeout,
        AmqpDeviceConnection::open(ep, &tls, &address, token),
    )
    .await
    .map_err(|_| Error::Timeout)??;
    let r = exchange(&mut conn, ep, &body, started).await;
    conn.close().await;
    r
}

/// How the SASL `TPM` exchange ended: the `sasl-outcome` code (0 ok, 1 auth, 2 sys, 3
/// sys-perm, 4 sys-temp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaslOutcomeCode(pub u8);

impl SaslOutcomeCode {
    /// `ok`.
    pub fn is_ok(self) -> bool {
        self.0 == 0
    }
}

async fn write_sasl<Io, T>(io: &mut Io, body: &T) -> Result<(), Error>
where
    Io: tokio::io::AsyncWrite + Unpin,
    T: serde::Serialize,
{
    use tokio::io::AsyncWriteExt;
    let body =
        serde_amqp::to_vec(body).map_err(|e| Error::Protocol(format!("SASL encode: {e}")))?;
    let mut f = Vec::with_capacity(8 + body.len());
    f.extend_from_slice(&((8 + body.len()) as u32).to_be_bytes());
    f.extend_from_slice(&[2, 1, 0, 0]); // doff 2, type SASL, channel 0
    f.extend_from_slice(&body);
    io.write_all(&f).await.map_err(transport)?;
    io.flush().await.map_err(transport)
}

/// One SASL frame's body (at most 64 KiB).
async fn read_sasl<Io>(io: &mut Io) -> Result<Vec<u8>, Error>
where
    Io: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; 8];
    io.read_exact(&mut h).await.map_err(transport)?;
    let size = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let doff = h[4] as usize * 4;
    if h[5] != 1 || doff < 8 || size < doff || size > 64 * 1024 {
        return Err(Error::Protocol("not a SASL frame".into()));
    }
    let mut rest = vec![0u8; size - 8];
    io.read_exact(&mut rest).await.map_err(transport)?;
    Ok(rest.split_off(doff - 8))
}

fn transport(e: std::io::Error) -> Error {
    Error::Transport(e.to_string())
}

/// The device side of the SASL `TPM` mechanism (protocol digest §6.5.6,
/// [`dps_amqp::sasl::tpm`]) on an established stream (TLS or WebSocket bytes): the SASL
/// header, `sasl-init` with the ID scope, registration id and raw EK, the raw SRK when asked,
/// the activation blob collected from its segments and given to `activate`, whose answer (the
/// SAS token signed in the TPM) goes back in the last response. Returns the outcome code;
/// after `ok` the stream is ready for the plain AMQP header
/// ([`AmqpDeviceConnection::open_on`] without a token).
pub async fn sasl_tpm<Io, F, Fut>(
    io: &mut Io,
    id_scope: &str,
    registration_id: &str,
    endorsement_key: &[u8],
    storage_root_key: &[u8],
    activate: F,
) -> Result<SaslOutcomeCode, Error>
where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    F: FnOnce(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Result<String, Error>>,
{
    use dps_amqp::sasl::tpm;
    use fe2o3_amqp_types::sasl::{SaslChallenge, SaslInit, SaslOutcome, SaslResponse};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    io.write_all(b"AMQP\x03\x01\x00\x00")
        .await
        .map_err(transport)?;
    let mut h = [0u8; 8];
    io.read_exact(&mut h).await.map_err(transport)?;
    if &h != b"AMQP\x03\x01\x00\x00" {
        return Err(Error::Protocol(
            "the service did not answer the SASL header".into(),
        ));
    }
    let _mechanisms = read_sasl(io).await?;
    let address = format!("{id_scope}/registrations/{registration_id}");
    write_sasl(
        io,
        &SaslInit {
            mechanism: Symbol::from("TPM"),
            initial_response: Some(Binary::from(tpm::init_response(
                id_scope,
                registration_id,
                endorsement_key,
            ))),
            hostname: Some(address),
        },
    )
    .await?;
    let mut reassembler = tpm::Reassembler::new();
    let mut activate = Some(activate);
    loop {
        let body = read_sasl(io).await?;
        if let Ok(o) = serde_amqp::from_slice::<SaslOutcome>(&body) {
            return Ok(SaslOutcomeCode(o.code as u8));
        }
        let c: SaslChallenge = serde_amqp::from_slice(&body)
            .map_err(|e| Error::Protocol(format!("expected sasl-challenge: {e}")))?;
        let response = if c.challenge.as_slice() == tpm::EMPTY {
            tpm::srk_response(storage_root_key)
        } else {
            match reassembler
                .push(&c.challenge)
                .map_err(|e| Error::Protocol(format!("SASL TPM: {e}")))?
            {
                None => tpm::EMPTY.to_vec(),
                Some(blob) => {
                    let f = activate
                        .take()
                        .ok_or_else(|| Error::Protocol("a second activation blob".into()))?;
                    tpm::token_response(&f(blob).await?)
                }
            }
        };
        write_sasl(
            io,
            &SaslResponse {
                response: Binary::from(response),
            },
        )
        .await?;
    }
}

/// Register a TPM device over AMQP: SASL `TPM` (the activation blob opened and the SAS token
/// signed in the TPM), then the register request with the EK and SRK in its body on the
/// authenticated connection, polls, and the hub key of the assigned state imported into the TPM.
pub(crate) async fn register_tpm(
    ep: &Endpoint,
    tls: Arc<ClientConfig>,
    registration_id: &str,
    tpm: &crate::tpm::Tpm2Tools,
    payload: Option<&Json>,
) -> Result<RegistrationResult, Error> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let started = Instant::now();
    let tools = tpm.clone();
    let keys = crate::https::blocking(move || tools.provision()).await?;
    let address = format!("{}/registrations/{}", ep.id_scope, registration_id);
    let body = serde_json::to_vec(&DeviceRegistration {
        registration_id: Some(registration_id.to_string()),
        tpm: Some(dps_core::model::TpmAttestation {
            endorsement_key: b64.encode(&keys.endorsement_key),
            storage_root_key: Some(b64.encode(&keys.storage_root_key)),
        }),
        payload: payload.cloned(),
        ..Default::default()
    })
    .map_err(|e| Error::Config(format!("cannot encode the request: {e}")))?;
    let connect = async {
        let mut io = crate::tls::connect_tls(ep, &tls).await?;
        let code = sasl_tpm(
            &mut io,
            &ep.id_scope,
            registration_id,
            &keys.endorsement_key,
            &keys.storage_root_key,
            |blob| {
                crate::https::tpm_activate_and_sign(
                    tpm,
                    blob,
                    &ep.id_scope,
                    registration_id,
                    ep.sas_ttl,
                )
            },
        )
        .await?;
        if !code.is_ok() {
            return Err(if code.0 == 1 {
                Error::Unauthorized {
                    error_code: None,
                    message: "the service refused the TPM (SASL outcome auth)".into(),
                    tracking_id: None,
                }
            } else {
                Error::Service {
                    status: 503,
                    error_code: None,
                    message: format!("SASL outcome {}", code.0),
                    tracking_id: None,
                }
            });
        }
        AmqpDeviceConnection::open_on(io, &ep.host, &ep.api_version, &address, None).await
    };
    // The TPM steps (ActivateCredential, Import, HMAC) run inside the connect budget.
    let mut conn = tokio::time::timeout(ep.connect_timeout + ep.request_timeout, connect)
        .await
        .map_err(|_| Error::Timeout)??;
    let r = exchange(&mut conn, ep, &body, started).await;
    conn.close().await;
    let result = r?;
    crate::https::tpm_import_hub_key(tpm, &result).await?;
    Ok(result)
}

async fn exchange(
    conn: &mut AmqpDeviceConnection,
    ep: &Endpoint,
    body: &[u8],
    started: Instant,
) -> Result<RegistrationResult, Error> {
    let mut timing = Timing {
        new_connection: true,
        ..Default::default()
    };
    let mut operation: Option<String> = None;
    let mut retries = 0u32;
    loop {
        let fut = match &operation {
            None => {
                timing.attempts += 1;
                conn.request(OP_REGISTER, None, false, body)
            }
            Some(op) => {
                timing.polls += 1;
                conn.request(OP_STATUS, Some(op), false, b"")
            }
        };
        let answer = tokio::time::timeout(ep.request_timeout, fut)
            .await
            .map_err(|_| Error::Timeout)??;
        let (status, resp, retry_after) = answer.as_http();
        let wait = match interpret(status, &resp, retry_after, &ep.policy)? {
            Step::Done(operation_id, state) => {
                timing.elapsed = started.elapsed();
                return Ok(RegistrationResult {
                    operation_id,
                    status: RegistrationStatus::Assigned,
                    state: *state,
                    timing,
                });
            }
            Step::Poll(op, wait) => {
                retries = 0;
                operation = Some(op);
                wait
            }
            Step::Retry(wait, err) => {
                retries += 1;
                if retries > ep.policy.max_retries {
                    return Err(err);
                }
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_http_statuses() {
        let m = AmqpAnswer::Message {
            correlation_id: None,
            properties: vec![("retry-after".into(), "3".into())],
            body: br#"{"operationId":"x","status":"assigning"}"#.to_vec(),
        };
        let (s, _, r) = m.as_http();
        assert_eq!((s, r), (202, Some(Duration::from_secs(3))));
        let m = AmqpAnswer::Rejected {
            condition: "com.microsoft:device-container-throttled".into(),
            description: Some(r#"{"errorCode":429001,"message":"x"}"#.into()),
            info: vec![("retry-after".into(), "5".into())],
        };
        let (s, _, r) = m.as_http();
        assert_eq!((s, r), (429, Some(Duration::from_secs(5))));
        let m = AmqpAnswer::Rejected {
            condition: "amqp:not-found".into(),
            description: Some("not JSON".into()),
            info: vec![],
        };
        assert_eq!(m.as_http().0, 404);
    }
}

//! The device API over MQTT 3.1.1 + TLS (protocol digest §4): one connection per registration.
//!
//! Packets are encoded and decoded with `rumqttc::mqttbytes::v4` (the codec only); the
//! connection is ours, so it is opened like an HTTPS one: the pinned addresses and local address
//! of the [`Endpoint`], the shared TLS configuration, no name resolution on a blocking thread
//! when addresses are pinned. The exchange is the Azure SDKs': CONNECT → CONNACK, SUBSCRIBE
//! `$dps/registrations/res/#` (QoS 1) → SUBACK, PUBLISH register (QoS 1), answers on the
//! response topic (acknowledged), PUBLISH operation-status polls, DISCONNECT.

use crate::client::{interpret, Endpoint, RegistrationResult, Step, Timing};
use crate::wire::{
    device_sas, mqtt_username, parse_response_topic, poll_topic, register_topic, RESPONSE_FILTER,
};
use crate::Error;
use bytes::BytesMut;
use dps_core::model::{DeviceRegistration, RegistrationStatus};
use rumqttc::mqttbytes::v4::{
    ConnectReturnCode, Packet, PubAck, Publish, Subscribe, SubscribeReasonCode,
};
use rumqttc::mqttbytes::{self, QoS};
use rustls::ClientConfig;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Largest packet accepted from the service: Azure's 96 KB message limit plus topic and headers.
const MAX_PACKET: usize = 100 * 1024;

/// Keep-alive announced in CONNECT (the Azure SDKs' default).
const KEEP_ALIVE_SECS: u16 = 60;

fn refused(code: ConnectReturnCode) -> Error {
    match code {
        ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword => {
            Error::Unauthorized {
                error_code: None,
                message: format!("the server refused the MQTT connection ({code:?})"),
                tracking_id: None,
            }
        }
        other => Error::Service {
            status: 503,
            error_code: None,
            message: format!("the server refused the MQTT connection ({other:?})"),
            tracking_id: None,
        },
    }
}

fn io_error(e: std::io::Error) -> Error {
    crate::tls::describe_tls_error(&e)
}

/// One MQTT connection: the TLS stream and its read and write buffers.
struct Conn {
    io: TlsStream<TcpStream>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Conn {
    async fn send(&mut self, packet: &Packet) -> Result<(), Error> {
        self.wbuf.clear();
        packet
            .write(&mut self.wbuf, usize::MAX)
            .map_err(|e| Error::Config(format!("cannot encode an MQTT packet: {e}")))?;
        self.io.write_all(&self.wbuf).await.map_err(io_error)?;
        self.io.flush().await.map_err(io_error)
    }

    /// The next packet from the service.
    async fn recv(&mut self) -> Result<Packet, Error> {
        loop {
            match Packet::read(&mut self.rbuf, MAX_PACKET) {
                Ok(p) => return Ok(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => {
                    return Err(Error::Protocol(format!(
                        "malformed MQTT packet from the service: {e}"
                    )))
                }
            }
            if self.io.read_buf(&mut self.rbuf).await.map_err(io_error)? == 0 {
                return Err(Error::Transport(
                    "the service closed the MQTT connection".into(),
                ));
            }
        }
    }

    /// TCP + TLS, CONNECT → CONNACK, SUBSCRIBE → SUBACK.
    async fn open(
        ep: &Endpoint,
        tls: &Arc<ClientConfig>,
        registration_id: &str,
        password: String,
    ) -> Result<Conn, Error> {
        let io = crate::tls::connect_tls(ep, tls, true).await?;
        let mut conn = Conn {
            io,
            rbuf: BytesMut::with_capacity(1024),
            wbuf: BytesMut::with_capacity(512),
        };
        let mut connect = rumqttc::mqttbytes::v4::Connect::new(registration_id);
        connect.keep_alive = KEEP_ALIVE_SECS;
        connect.clean_session = true;
        connect.set_login(
            mqtt_username(&ep.id_scope, registration_id, &ep.api_version),
            password,
        );
        conn.send(&Packet::Connect(connect)).await?;
        match conn.recv().await? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {}
            Packet::ConnAck(ack) => return Err(refused(ack.code)),
            other => return Err(Error::Protocol(format!("expected CONNACK, got {other:?}"))),
        }
        let mut subscribe = Subscribe::new(RESPONSE_FILTER, QoS::AtLeastOnce);
        subscribe.pkid = 1;
        conn.send(&Packet::Subscribe(subscribe)).await?;
        loop {
            match conn.recv().await? {
                Packet::SubAck(ack) if ack.pkid == 1 => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        return Err(Error::Protocol(
                            "the server refused the response subscription".into(),
                        ));
                    }
                    return Ok(conn);
                }
                Packet::PingResp => {}
                other => return Err(Error::Protocol(format!("expected SUBACK, got {other:?}"))),
            }
        }
    }

    /// Wait for the response to request `rid` (acknowledging QoS 1 deliveries), within
    /// `timeout`. Returns the status, retry-after and body.
    async fn response(
        &mut self,
        rid: &str,
        timeout: Duration,
    ) -> Result<(u16, Option<Duration>, bytes::Bytes), Error> {
        let work = async {
            loop {
                let Packet::Publish(p) = self.recv().await? else {
                    continue; // PUBACK of our request, PINGRESP
                };
                if p.qos == QoS::AtLeastOnce {
                    self.send(&Packet::PubAck(PubAck::new(p.pkid))).await?;
                }
                let Some(t) = parse_response_topic(&p.topic) else {
                    continue;
                };
                if t.rid == rid {
                    return Ok((t.status, t.retry_after, p.payload));
                }
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout),
        }
    }
}

/// Register one device over a fresh MQTT connection.
pub(crate) async fn register(
    ep: &Endpoint,
    tls: Arc<ClientConfig>,
    registration_id: &str,
    key: Option<&str>,
    payload: Option<&Value>,
) -> Result<RegistrationResult, Error> {
    let started = Instant::now();
    let mut timing = Timing {
        new_connection: true,
        ..Default::default()
    };
    let password = match key {
        Some(k) => device_sas(&ep.id_scope, registration_id, k, ep.sas_ttl)
            .ok_or_else(|| Error::Config("the device key is not valid base64".into()))?,
        None => String::new(),
    };
    let body = serde_json::to_vec(&DeviceRegistration {
        registration_id: Some(registration_id.to_string()),
        payload: payload.cloned(),
        ..Default::default()
    })
    .map_err(|e| Error::Config(e.to_string()))?;

    let mut conn = match tokio::time::timeout(
        ep.connect_timeout,
        Conn::open(ep, &tls, registration_id, password),
    )
    .await
    {
        Ok(r) => r?,
        Err(_) => return Err(Error::Timeout),
    };

    let mut rid: u64 = 0;
    let mut operation: Option<String> = None;
    let mut retries = 0u32;
    let result = loop {
        rid += 1;
        let (topic, payload) = match &operation {
            None => {
                timing.attempts += 1;
                (register_topic(rid), body.clone())
            }
            Some(op) => {
                timing.polls += 1;
                (poll_topic(rid, op), Vec::new())
            }
        };
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload);
        // Packet ids 2..=65535 (1 is the subscription's); one request is in flight at a time.
        publish.pkid = 2 + ((rid - 1) % 65_534) as u16;
        if let Err(e) = conn.send(&Packet::Publish(publish)).await {
            break Err(e);
        }
        let (status, retry_after, resp) =
            match conn.response(&rid.to_string(), ep.request_timeout).await {
                Ok(r) => r,
                Err(e) => break Err(e),
            };
        match interpret(status, &resp, retry_after, &ep.policy) {
            Ok(Step::Done(operation_id, state)) => {
                timing.elapsed = started.elapsed();
                break Ok(RegistrationResult {
                    operation_id,
                    status: RegistrationStatus::Assigned,
                    state: *state,
                    timing,
                });
            }
            Ok(Step::Poll(op, wait)) => {
                retries = 0;
                operation = Some(op);
                tokio::time::sleep(wait).await;
            }
            Ok(Step::Retry(wait, err)) => {
                retries += 1;
                if retries > ep.policy.max_retries {
                    break Err(err);
                }
                tokio::time::sleep(wait).await;
            }
            Err(e) => break Err(e),
        }
    };

    // Say goodbye politely, without letting it delay the caller for long.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        if conn.send(&Packet::Disconnect).await.is_ok() {
            let _ = conn.io.shutdown().await;
        }
    })
    .await;
    result
}

//! The per-connection MQTT state machine, free of I/O (in the style of rumqtt's `state.rs`).
//!
//! Feed it decoded packets with [`Session::handle`]; it answers with a list of [`Action`]s to
//! perform **in order**: packets to send, a credential check or a service call to run (feed
//! the outcome back with [`Session::connect_result`] / [`Session::call_result`]), or a close.
//! Because a `PUBACK` is emitted as a [`Action::Send`] before the matching [`Action::Call`],
//! a driver that performs actions in order always acknowledges before it answers.

use crate::topic::{self, RequestKind, TopicError, Username};
use bytes::Bytes;
use dps_core::clock::azure_timestamp;
use dps_core::device::{
    ConnectRefusal, DeviceCredential, DeviceRequest, DeviceResponse, DeviceService, Transport,
};
use dps_core::model::DeviceRegistration;
use dps_core::wire::WireError;
use dps_core::Error;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::QoS;
use std::sync::Arc;
use std::time::Duration;

/// `retry-after` added to a 202/429/5xx answer when the service gave none (Azure always sends one).
pub const DEFAULT_RETRY_AFTER: u32 = 3;

/// What the driver must do next.
#[derive(Debug)]
pub enum Action {
    /// Write this packet.
    Send(Packet),
    /// Run [`AuthorizeConnect::run`] and feed the result to [`Session::connect_result`].
    Authorize(AuthorizeConnect),
    /// Run [`ServiceCall::run`] and feed the outcome to [`Session::call_result`].
    Call(ServiceCall),
    /// Flush what was sent and close the connection.
    Close(CloseReason),
}

/// Why the session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// CONNECT was refused with this CONNACK code.
    Refused(ConnectReturnCode),
    /// The client broke the protocol.
    ProtocolViolation(&'static str),
    /// A fault injection rule (`drop`) closes the connection without answering.
    InjectedFault,
}

/// A credential check to run at CONNECT.
#[derive(Debug, Clone)]
pub struct AuthorizeConnect {
    /// The transport (MQTT or MQTT over WebSocket).
    pub transport: Transport,
    /// ID scope from the username.
    pub id_scope: String,
    /// Registration id.
    pub registration_id: String,
    /// SAS token or certificate chain.
    pub credential: DeviceCredential,
    /// The network peer's address, when known.
    pub peer: Option<std::net::IpAddr>,
}

impl AuthorizeConnect {
    /// Ask the service.
    pub async fn run(&self, service: &dyn DeviceService) -> Result<(), ConnectRefusal> {
        service
            .authorize_connect(
                self.transport,
                &self.id_scope,
                &self.registration_id,
                &self.credential,
                self.peer,
            )
            .await
    }
}

/// A device request to run against the [`DeviceService`].
#[derive(Debug, Clone)]
pub struct ServiceCall {
    /// `$rid` to answer on.
    pub rid: String,
    /// Register or poll.
    pub kind: RequestKind,
    /// The request.
    pub request: DeviceRequest,
}

/// A finished [`ServiceCall`].
#[derive(Debug, Clone)]
pub struct CallOutcome {
    /// `$rid` to answer on.
    pub rid: String,
    /// What the service said.
    pub result: Result<DeviceResponse, WireError>,
    /// A fault injection rule (`drop`) closes the connection instead of answering.
    pub dropped: bool,
}

impl ServiceCall {
    /// Run the call. Owns everything it needs, so it can be spawned or pushed into a
    /// `FuturesUnordered`.
    pub async fn run(self, service: Arc<dyn DeviceService>) -> CallOutcome {
        let result = match &self.kind {
            RequestKind::Register => service.register(self.request).await,
            RequestKind::OperationStatus { operation_id } => {
                service.operation_status(self.request, operation_id).await
            }
        };
        let dropped = matches!(result, Err(Error::Dropped { .. }));
        CallOutcome {
            rid: self.rid,
            // The one mapping from domain errors to wire errors.
            result: result.map_err(|e| WireError::from(&e)),
            dropped,
        }
    }
}

#[derive(Debug)]
struct Connected {
    id_scope: String,
    registration_id: String,
    api_version: Option<String>,
    credential: DeviceCredential,
}

#[derive(Debug)]
enum State {
    AwaitingConnect,
    Authorizing(Box<Connected>),
    Connected(Box<Connected>),
    Closed,
}

/// One device connection's protocol state.
#[derive(Debug)]
pub struct Session {
    transport: Transport,
    peer_certs: Vec<Vec<u8>>,
    peer: Option<std::net::IpAddr>,
    state: State,
    keep_alive: u16,
    granted: Option<QoS>,
    next_pkid: u16,
}

fn connack(code: ConnectReturnCode) -> Packet {
    Packet::ConnAck(ConnAck::new(code, false))
}

fn refuse(code: ConnectReturnCode) -> Vec<Action> {
    vec![
        Action::Send(connack(code)),
        Action::Close(CloseReason::Refused(code)),
    ]
}

fn violation(why: &'static str) -> Vec<Action> {
    vec![Action::Close(CloseReason::ProtocolViolation(why))]
}

impl Session {
    /// A new session for a connection on `transport`; `peer_certs` is the TLS client chain
    /// (DER, leaf first; empty when none), used as the credential when CONNECT has no password.
    pub fn new(transport: Transport, peer_certs: Vec<Vec<u8>>) -> Self {
        Session {
            transport,
            peer_certs,
            peer: None,
            state: State::AwaitingConnect,
            keep_alive: 0,
            granted: None,
            next_pkid: 0,
        }
    }

    /// The network peer's address, passed on with every credential check and request.
    pub fn with_peer(mut self, peer: Option<std::net::IpAddr>) -> Self {
        self.peer = peer;
        self
    }

    /// True until CONNECT has been received.
    pub fn awaiting_connect(&self) -> bool {
        matches!(self.state, State::AwaitingConnect)
    }

    /// True once CONNACK 0 has been sent.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Connected(_))
    }

    /// The client's keep-alive (None when 0 = disabled).
    pub fn keep_alive(&self) -> Option<Duration> {
        (self.keep_alive > 0).then(|| Duration::from_secs(self.keep_alive.into()))
    }

    /// ID scope and registration id once CONNECT was parsed.
    pub fn identity(&self) -> Option<(&str, &str)> {
        match &self.state {
            State::Authorizing(c) | State::Connected(c) => {
                Some((c.id_scope.as_str(), c.registration_id.as_str()))
            }
            _ => None,
        }
    }

    /// The transport of this connection.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The network peer's address, when known.
    pub fn peer(&self) -> Option<std::net::IpAddr> {
        self.peer
    }

    /// Granted QoS of the response subscription, if any.
    pub fn granted_qos(&self) -> Option<QoS> {
        self.granted
    }

    /// A CONNECT with an unsupported protocol level was received.
    pub fn unsupported_protocol(&mut self) -> Vec<Action> {
        self.state = State::Closed;
        refuse(ConnectReturnCode::RefusedProtocolVersion)
    }

    /// Handle one decoded packet.
    pub fn handle(&mut self, packet: Packet) -> Vec<Action> {
        match (&self.state, packet) {
            (State::AwaitingConnect, Packet::Connect(c)) => self.on_connect(c),
            (State::AwaitingConnect, _) => {
                self.state = State::Closed;
                violation("first packet must be CONNECT")
            }
            (State::Closed, _) => violation("session closed"),
            (State::Authorizing(_), _) => {
                self.state = State::Closed;
                violation("packet before CONNACK")
            }
            (State::Connected(_), p) => self.on_connected_packet(p),
        }
    }

    fn on_connect(&mut self, c: rumqttc::mqttbytes::v4::Connect) -> Vec<Action> {
        self.state = State::Closed;
        if c.protocol != rumqttc::mqttbytes::Protocol::V4 {
            return refuse(ConnectReturnCode::RefusedProtocolVersion);
        }
        let (username, password) = match c.login {
            Some(l) => (l.username, l.password),
            None => (String::new(), String::new()),
        };
        let Username {
            id_scope,
            registration_id,
            api_version,
            ..
        } = match topic::parse_username(&username) {
            Ok(u) => u,
            Err(e) => {
                tracing::info!(error = %e, "CONNECT refused: bad username");
                return refuse(ConnectReturnCode::BadUserNamePassword);
            }
        };
        if !registration_id.eq_ignore_ascii_case(&c.client_id) {
            tracing::info!("CONNECT refused: client id differs from username registration id");
            return refuse(ConnectReturnCode::BadUserNamePassword);
        }
        let credential = if !password.is_empty() {
            DeviceCredential::Sas(password)
        } else if !self.peer_certs.is_empty() {
            DeviceCredential::Certificates(std::mem::take(&mut self.peer_certs))
        } else {
            DeviceCredential::None
        };
        self.keep_alive = c.keep_alive;
        let auth = AuthorizeConnect {
            transport: self.transport,
            id_scope: id_scope.clone(),
            registration_id: registration_id.clone(),
            peer: self.peer,
            credential: credential.clone(),
        };
        self.state = State::Authorizing(Box::new(Connected {
            id_scope,
            registration_id,
            api_version,
            credential,
        }));
        vec![Action::Authorize(auth)]
    }

    /// Feed the outcome of an [`Action::Authorize`].
    pub fn connect_result(&mut self, result: Result<(), ConnectRefusal>) -> Vec<Action> {
        let state = std::mem::replace(&mut self.state, State::Closed);
        let State::Authorizing(ctx) = state else {
            return violation("unexpected connect result");
        };
        match result {
            Ok(()) => {
                self.state = State::Connected(ctx);
                vec![Action::Send(connack(ConnectReturnCode::Success))]
            }
            Err(r) => refuse(match r {
                ConnectRefusal::BadUsernameOrPassword => ConnectReturnCode::BadUserNamePassword,
                ConnectRefusal::NotAuthorized => ConnectReturnCode::NotAuthorized,
                ConnectRefusal::ServerUnavailable => ConnectReturnCode::ServiceUnavailable,
            }),
        }
    }

    fn on_connected_packet(&mut self, packet: Packet) -> Vec<Action> {
        match packet {
            Packet::PingReq => vec![Action::Send(Packet::PingResp)],
            Packet::Disconnect => {
                self.state = State::Closed;
                vec![Action::Close(CloseReason::ClientDisconnect)]
            }
            Packet::Subscribe(s) => {
                let codes = s
                    .filters
                    .iter()
                    .map(|f| {
                        if f.path == topic::RESPONSE_FILTER {
                            let q = if f.qos == QoS::AtMostOnce {
                                QoS::AtMostOnce
                            } else {
                                QoS::AtLeastOnce
                            };
                            self.granted = Some(q);
                            SubscribeReasonCode::Success(q)
                        } else {
                            SubscribeReasonCode::Failure
                        }
                    })
                    .collect();
                vec![Action::Send(Packet::SubAck(SubAck::new(s.pkid, codes)))]
            }
            Packet::Unsubscribe(u) => {
                if u.topics.iter().any(|t| t == topic::RESPONSE_FILTER) {
                    self.granted = None;
                }
                vec![Action::Send(Packet::UnsubAck(UnsubAck::new(u.pkid)))]
            }
            Packet::Publish(p) => self.on_publish(p),
            // Acks of our QoS 1 responses: nothing is retransmitted (sessions are never
            // persistent), so there is nothing to track.
            Packet::PubAck(_) => Vec::new(),
            Packet::Connect(_) => {
                self.state = State::Closed;
                violation("second CONNECT")
            }
            _ => {
                self.state = State::Closed;
                violation("unexpected packet type from client")
            }
        }
    }

    fn on_publish(&mut self, p: Publish) -> Vec<Action> {
        let mut out = Vec::with_capacity(2);
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => out.push(Action::Send(Packet::PubAck(PubAck::new(p.pkid)))),
            QoS::ExactlyOnce => {
                self.state = State::Closed;
                return violation("QoS 2 is not supported");
            }
        }
        let req = match topic::parse_request_topic(&p.topic) {
            Ok(r) => r,
            Err(TopicError::Unknown { rid: Some(rid) }) => {
                tracing::debug!(topic = %p.topic, "publish to unknown topic");
                let err = WireError::from(&Error::UnknownTopic);
                out.push(Action::Send(self.error_publish(&rid, &err)));
                return out;
            }
            Err(TopicError::MissingOperationId { rid }) => {
                let err = WireError::from(&Error::invalid("operationId is required"));
                out.push(Action::Send(self.error_publish(&rid, &err)));
                return out;
            }
            Err(e) => {
                tracing::debug!(topic = %p.topic, error = %e, "ignoring unanswerable publish");
                return out;
            }
        };
        // Poll bodies are ignored (SDKs send " ", "", or the full registration again).
        let body = match &req.kind {
            RequestKind::Register => match DeviceRegistration::parse_lenient(&p.payload) {
                Ok(b) => b,
                Err(e) => {
                    let err = WireError::from(&Error::invalid(format!(
                        "Request body is not valid JSON: {e}"
                    )));
                    out.push(Action::Send(self.error_publish(&req.rid, &err)));
                    return out;
                }
            },
            RequestKind::OperationStatus { .. } => DeviceRegistration::default(),
        };
        let State::Connected(ctx) = &self.state else {
            return violation("not connected");
        };
        let request = DeviceRequest {
            id_scope: ctx.id_scope.clone(),
            registration_id: ctx.registration_id.clone(),
            credential: ctx.credential.clone(),
            body,
            transport: self.transport,
            api_version: ctx.api_version.clone(),
            force_registration: false,
            peer: self.peer,
        };
        out.push(Action::Call(ServiceCall {
            rid: req.rid,
            kind: req.kind,
            request,
        }));
        out
    }

    /// Feed the outcome of an [`Action::Call`]: the response PUBLISH.
    pub fn call_result(&mut self, outcome: CallOutcome) -> Vec<Action> {
        if matches!(self.state, State::Closed) {
            return Vec::new();
        }
        if outcome.dropped {
            self.state = State::Closed;
            return vec![Action::Close(CloseReason::InjectedFault)];
        }
        let packet = match outcome.result {
            Ok(resp) => {
                let body = serde_json::to_vec(&resp.body).unwrap_or_else(|_| b"{}".to_vec());
                let retry_after = retry_after_for(resp.status, resp.retry_after);
                self.publish(resp.status, &outcome.rid, retry_after, body)
            }
            Err(err) => self.error_publish(&outcome.rid, &err),
        };
        vec![Action::Send(packet)]
    }

    fn error_publish(&mut self, rid: &str, err: &WireError) -> Packet {
        let tracking_id = uuid::Uuid::new_v4().to_string();
        let ts = azure_timestamp(time::OffsetDateTime::now_utc());
        let body = serde_json::to_vec(&err.body(&tracking_id, &ts)).unwrap_or_default();
        self.publish(
            err.status,
            rid,
            retry_after_for(err.status, err.retry_after),
            body,
        )
    }

    fn publish(
        &mut self,
        status: u16,
        rid: &str,
        retry_after: Option<u32>,
        body: Vec<u8>,
    ) -> Packet {
        let topic = topic::format_response_topic(status, rid, retry_after);
        // Before SUBSCRIBE (or after UNSUBSCRIBE) we still answer, at QoS 1 as Azure does.
        let qos = self.granted.unwrap_or(QoS::AtLeastOnce);
        let mut p = Publish::from_bytes(topic, qos, Bytes::from(body));
        if qos != QoS::AtMostOnce {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            p.pkid = self.next_pkid;
        }
        Packet::Publish(p)
    }
}

/// `retry-after` to put on a response topic: the service's value, or
/// [`DEFAULT_RETRY_AFTER`] on 202, 429 and 5xx when it gave none.
pub fn retry_after_for(status: u16, given: Option<u32>) -> Option<u32> {
    given.or((status == 202 || status == 429 || status >= 500).then_some(DEFAULT_RETRY_AFTER))
}

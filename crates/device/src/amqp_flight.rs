//! The AMQP registration of [`crate::ProvisioningClient`] (and so of `dps device register
//! --transport amqp` and `dps bench --transport amqp`), written directly on `dps-amqp`'s
//! framing and `fe2o3-amqp-types`' performatives so that the connection setup is **one flight**:
//!
//! 1. after the TLS handshake: the SASL header, `sasl-init` (PLAIN with the SAS token; none for
//!    X.509), the AMQP header, OPEN, BEGIN, ATTACH of the receiver link, ATTACH of the sender
//!    link and a FLOW giving the service credit on the receiver link, in one write;
//! 2. the service's answers (its headers, `sasl-mechanisms`, `sasl-outcome`, OPEN, BEGIN, both
//!    ATTACHes and the FLOW giving us credit) are read as they come; as soon as the sender
//!    link has credit the register TRANSFER goes out;
//! 3. the DISPOSITION (`accepted` or `rejected`) and the answer TRANSFER come back together;
//!    polls reuse the links; at the end the answer's DISPOSITION and CLOSE go out in one write
//!    and the connection is shut down without waiting for the service's CLOSE.
//!
//! Two round trips after TLS for an immediate answer, against about ten for a client that
//! waits for each frame (`fe2o3-amqp`'s [`crate::amqp::AmqpDeviceConnection`], which the tests
//! keep as an independent client). AMQP 1.0 allows pipelining the protocol header with OPEN and
//! the session and link frames (spec §2.4.1 "pipelined open"); sending `sasl-init` before the
//! `sasl-mechanisms` arrive is the optimistic SASL exchange that dps's server accepts (it reads
//! ahead) — a server that does not offer PLAIN answers `auth`, which is reported as
//! [`Error::Unauthorized`]. The Node SDK (rhea) waits for the SASL mechanisms and the outcome,
//! then pipelines the header, OPEN, BEGIN and the receiver ATTACH, and attaches its sender link
//! once the receiver link is up (the captures in `../shared/vectors/device-node-amqp-*.json`).

use crate::amqp::{AmqpAnswer, OP_REGISTER, OP_STATUS};
use crate::client::{interpret, Endpoint, RegistrationResult, Step, Timing};
use crate::wire::device_sas;
use crate::Error;
use bytes::BytesMut;
use dps_amqp::frame::{self, Decoded, ProtocolHeader, TYPE_AMQP, TYPE_SASL};
use dps_core::model::{DeviceRegistration, RegistrationStatus};
use fe2o3_amqp_types::definitions::{
    ErrorCondition, Fields, Handle, ReceiverSettleMode, Role, SenderSettleMode,
};
use fe2o3_amqp_types::messaging::message::DecodeIntoMessage;
use fe2o3_amqp_types::messaging::{
    Accepted, ApplicationProperties, Body, Data, DeliveryState, MessageId, Properties, Source,
    Target,
};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, Close, Disposition, Flow, Open, Performative, Transfer,
};
use fe2o3_amqp_types::primitives::{Binary, OrderedMap, SimpleValue, Symbol, Value};
use fe2o3_amqp_types::sasl::{SaslCode, SaslInit, SaslOutcome};
use rustls::ClientConfig;
use serde_json::Value as Json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Handle of our receiver link (the service's answers).
const RX: u32 = 0;
/// Handle of our sender link (our requests).
const TX: u32 = 1;
/// Credit we give the service on the receiver link, and our session window.
const CREDIT: u32 = 64;
/// Largest frame we accept (announced in our OPEN).
const MAX_FRAME: u32 = 64 * 1024;
/// Largest answer we reassemble.
const MAX_MESSAGE: usize = 256 * 1024;

fn protocol(msg: impl Into<String>) -> Error {
    Error::Protocol(msg.into())
}

fn io_err(e: std::io::Error) -> Error {
    Error::Transport(format!("AMQP: {e}"))
}

fn codec(e: serde_amqp::Error) -> Error {
    Error::Protocol(format!("AMQP codec: {e}"))
}

/// The error a service's CLOSE, END or DETACH carried.
fn refused(what: &str, e: Option<fe2o3_amqp_types::definitions::Error>) -> Error {
    let (cond, desc) = match e {
        Some(e) => (
            condition_text(&e.condition),
            e.description.unwrap_or_default(),
        ),
        None => (String::new(), String::new()),
    };
    let message = format!("the server closed the AMQP {what} ({cond}: {desc})");
    match cond.as_str() {
        "amqp:unauthorized-access" => Error::Unauthorized {
            error_code: None,
            message,
            tracking_id: None,
        },
        "amqp:not-found" => Error::NotFound {
            error_code: None,
            message,
            tracking_id: None,
        },
        _ => Error::Transport(message),
    }
}

fn condition_text(c: &ErrorCondition) -> String {
    match c {
        ErrorCondition::Custom(s) => s.0.clone(),
        other => match serde_amqp::to_value(other) {
            Ok(Value::Symbol(s)) => s.0,
            _ => format!("{other:?}"),
        },
    }
}

/// One AMQP connection of one registration, set up in one flight.
struct Conn<Io> {
    io: Io,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// The service's max-frame-size (from its OPEN; the minimum until then).
    peer_max_frame: usize,
    /// Credit of our sender link, as the service last granted it.
    credit: u32,
    delivery_count: u32,
    next_delivery_id: u32,
    /// Answer being reassembled (delivery id, bytes).
    partial: Option<(Option<u32>, Vec<u8>)>,
    /// Answers received and not yet settled (settled with the next write).
    to_settle: Vec<u32>,
    /// Session: the id of the service's next transfer frame (from its BEGIN), and of ours.
    next_incoming_id: u32,
    next_outgoing_id: u32,
    /// Receiver link: deliveries received, and the credit left of what we granted.
    rx_count: u32,
    rx_credit: u32,
}

impl<Io: AsyncRead + AsyncWrite + Unpin> Conn<Io> {
    fn put(&mut self, p: Performative, payload: &[u8]) -> Result<(), Error> {
        frame::encode(&mut self.wbuf, TYPE_AMQP, 0, &p, payload).map_err(codec)
    }

    async fn flush(&mut self) -> Result<(), Error> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        self.io.write_all(&self.wbuf).await.map_err(io_err)?;
        self.io.flush().await.map_err(io_err)?;
        self.wbuf.clear();
        Ok(())
    }

    async fn fill(&mut self, n: usize) -> Result<(), Error> {
        while self.rbuf.len() < n {
            self.rbuf.reserve(n.max(4096) - self.rbuf.len());
            if self.io.read_buf(&mut self.rbuf).await.map_err(io_err)? == 0 {
                return Err(Error::Transport(
                    "AMQP: the server closed the connection".into(),
                ));
            }
        }
        Ok(())
    }

    async fn header(&mut self) -> Result<ProtocolHeader, Error> {
        self.fill(8).await?;
        let h = self.rbuf.split_to(8);
        let mut b = [0u8; 8];
        b.copy_from_slice(&h);
        Ok(ProtocolHeader::parse(&b))
    }

    async fn frame(&mut self) -> Result<frame::RawFrame, Error> {
        loop {
            match frame::decode(&mut self.rbuf, MAX_FRAME as usize)
                .map_err(|e| protocol(format!("AMQP framing: {e}")))?
            {
                Decoded::Frame(f) if f.body.is_empty() => continue, // heartbeat
                Decoded::Frame(f) => return Ok(f),
                Decoded::NeedMore(n) => self.fill(n).await?,
            }
        }
    }

    /// Queue the whole connection setup (see the module documentation).
    fn queue_setup(
        &mut self,
        host: &str,
        api_version: &str,
        address: &str,
        sas_token: Option<&str>,
    ) -> Result<(), Error> {
        if let Some(token) = sas_token {
            self.wbuf.extend_from_slice(&frame::HEADER_SASL);
            let mut response = Vec::with_capacity(address.len() + token.len() + 2);
            response.push(0);
            response.extend_from_slice(address.as_bytes());
            response.push(0);
            response.extend_from_slice(token.as_bytes());
            let init = SaslInit {
                mechanism: Symbol::from("PLAIN"),
                initial_response: Some(Binary::from(response)),
                hostname: Some(host.to_string()),
            };
            frame::encode(&mut self.wbuf, TYPE_SASL, 0, &init, b"").map_err(codec)?;
        }
        self.wbuf.extend_from_slice(&frame::HEADER_AMQP);
        self.put(
            Performative::Open(Open {
                container_id: format!("dps-device-{}", crate::amqp::uuid_like()),
                hostname: Some(host.to_string()),
                max_frame_size: MAX_FRAME.into(),
                channel_max: 0.into(),
                idle_time_out: None,
                outgoing_locales: None,
                incoming_locales: None,
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            }),
            b"",
        )?;
        self.put(
            Performative::Begin(Begin {
                remote_channel: None,
                next_outgoing_id: 0,
                incoming_window: CREDIT,
                outgoing_window: CREDIT,
                handle_max: Handle(TX),
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            }),
            b"",
        )?;
        let mut props: Fields = OrderedMap::new();
        props.insert(
            Symbol::from("com.microsoft:api-version"),
            Value::String(api_version.to_string()),
        );
        props.insert(
            Symbol::from("com.microsoft:client-version"),
            Value::String(format!("dps-device/{}", env!("CARGO_PKG_VERSION"))),
        );
        let id = crate::amqp::uuid_like();
        for (handle, role) in [(RX, Role::Receiver), (TX, Role::Sender)] {
            let receiving = role == Role::Receiver;
            self.put(
                Performative::Attach(Attach {
                    name: format!("{}-{id}", if receiving { "receiver" } else { "sender" }),
                    handle: Handle(handle),
                    role,
                    snd_settle_mode: SenderSettleMode::Unsettled,
                    rcv_settle_mode: ReceiverSettleMode::First,
                    source: Some(Box::new(if receiving {
                        Source::builder().address(address.to_string()).build()
                    } else {
                        Source::builder().build()
                    })),
                    target: Some(Box::new(
                        if receiving {
                            Target::builder().build()
                        } else {
                            Target::builder().address(address.to_string()).build()
                        }
                        .into(),
                    )),
                    unsettled: None,
                    incomplete_unsettled: false,
                    initial_delivery_count: (!receiving).then_some(0),
                    max_message_size: None,
                    offered_capabilities: None,
                    desired_capabilities: None,
                    properties: Some(props.clone()),
                }),
                b"",
            )?;
        }
        // Credit for the answers. `next-incoming-id` stays null: the service's BEGIN has not
        // been seen yet (spec §2.7.4).
        self.put(
            Performative::Flow(Flow {
                next_incoming_id: None,
                incoming_window: CREDIT,
                next_outgoing_id: 0,
                outgoing_window: CREDIT,
                handle: Some(Handle(RX)),
                delivery_count: None,
                link_credit: Some(CREDIT),
                available: None,
                drain: false,
                echo: false,
                properties: None,
            }),
            b"",
        )
    }

    /// Read the service's side of the setup until our sender link has credit.
    async fn await_setup(&mut self, sasl: bool) -> Result<(), Error> {
        if sasl {
            if self.header().await? != ProtocolHeader::Sasl {
                return Err(protocol("the server did not answer with the SASL header"));
            }
            loop {
                let f = self.frame().await?;
                if f.frame_type != TYPE_SASL {
                    return Err(protocol("expected a SASL frame"));
                }
                // `sasl-mechanisms` (descriptor 0x40) is skipped: PLAIN was sent already.
                if f.body.get(..3) == Some(&[0x00, 0x53, 0x40][..]) {
                    continue;
                }
                let outcome: SaslOutcome = serde_amqp::from_slice(&f.body).map_err(codec)?;
                if outcome.code != SaslCode::Ok {
                    return Err(Error::Unauthorized {
                        error_code: None,
                        message: format!(
                            "the server refused the AMQP connection (SASL outcome {:?})",
                            outcome.code
                        ),
                        tracking_id: None,
                    });
                }
                break;
            }
        }
        match self.header().await? {
            ProtocolHeader::Amqp => {}
            ProtocolHeader::Sasl => {
                return Err(Error::Unauthorized {
                    error_code: None,
                    message: "the server requires SASL (no client certificate was accepted)".into(),
                    tracking_id: None,
                })
            }
            _ => return Err(protocol("the server did not answer with the AMQP header")),
        }
        while self.credit == 0 {
            self.step().await?;
        }
        Ok(())
    }

    /// Read and handle one AMQP frame; returns a finished answer or settlement, if any.
    async fn step(&mut self) -> Result<Option<Event>, Error> {
        let f = self.frame().await?;
        if f.frame_type != TYPE_AMQP {
            return Err(protocol("SASL frame after the AMQP header"));
        }
        let (p, payload) = frame::performative(&f.body).map_err(codec)?;
        match p {
            Performative::Open(o) => {
                self.peer_max_frame = o.max_frame_size.0.max(frame::MIN_MAX_FRAME_SIZE) as usize;
            }
            Performative::Begin(b) => self.next_incoming_id = b.next_outgoing_id,
            Performative::Attach(_) => {}
            Performative::Flow(fl) => {
                if fl.handle.as_ref().map(|h| h.0) == Some(TX) {
                    let count = fl.delivery_count.unwrap_or(self.delivery_count);
                    self.credit = count
                        .wrapping_add(fl.link_credit.unwrap_or(0))
                        .wrapping_sub(self.delivery_count);
                }
            }
            Performative::Detach(d) => return Err(refused("link", d.error)),
            Performative::End(e) => return Err(refused("session", e.error)),
            Performative::Close(c) => return Err(refused("connection", c.error)),
            Performative::Disposition(d) => {
                if d.role == Role::Receiver {
                    return Ok(Some(Event::Settled(d.first, d.last, d.state)));
                }
            }
            Performative::Transfer(t) => {
                if t.handle.0 != RX {
                    return Err(protocol("TRANSFER on a link that is not ours"));
                }
                self.next_incoming_id = self.next_incoming_id.wrapping_add(1);
                if self.partial.is_none() {
                    self.rx_count = self.rx_count.wrapping_add(1);
                    self.rx_credit = self.rx_credit.saturating_sub(1);
                }
                let (id, mut buf) = self.partial.take().unwrap_or((t.delivery_id, Vec::new()));
                if buf.len() + payload.len() > MAX_MESSAGE {
                    return Err(protocol("the AMQP answer is too large"));
                }
                buf.extend_from_slice(&payload);
                if t.more {
                    self.partial = Some((id, buf));
                } else if !t.aborted {
                    if !t.settled.unwrap_or(false) {
                        if let Some(id) = id {
                            self.to_settle.push(id);
                        }
                    }
                    return Ok(Some(Event::Answer(buf)));
                }
            }
        }
        Ok(None)
    }

    /// Queue the settlement of the answers received so far.
    fn queue_settlements(&mut self) -> Result<(), Error> {
        for id in std::mem::take(&mut self.to_settle) {
            self.put(
                Performative::Disposition(Disposition {
                    role: Role::Receiver,
                    first: id,
                    last: None,
                    settled: true,
                    state: Some(DeliveryState::Accepted(Accepted {})),
                    batchable: false,
                }),
                b"",
            )?;
        }
        Ok(())
    }

    /// Send one request and wait for its answer (as [`crate::amqp::AmqpDeviceConnection::request`]).
    async fn request(
        &mut self,
        operation: &str,
        operation_id: Option<&str>,
        body: &[u8],
    ) -> Result<AmqpAnswer, Error> {
        while self.credit == 0 {
            self.step().await?;
        }
        let correlation = format!("{}-{}", crate::amqp::uuid_like(), self.next_delivery_id);
        let msg = encode_request(operation, operation_id, &correlation, body)?;
        let delivery_id = self.next_delivery_id;
        self.next_delivery_id = self.next_delivery_id.wrapping_add(1);
        self.credit -= 1;
        self.delivery_count = self.delivery_count.wrapping_add(1);
        self.queue_settlements()?;
        if self.rx_credit < CREDIT / 2 {
            // Renew the service's credit and our session window for the answers.
            self.rx_credit = CREDIT;
            self.put(
                Performative::Flow(Flow {
                    next_incoming_id: Some(self.next_incoming_id),
                    incoming_window: CREDIT,
                    next_outgoing_id: self.next_outgoing_id,
                    outgoing_window: CREDIT,
                    handle: Some(Handle(RX)),
                    delivery_count: Some(self.rx_count),
                    link_credit: Some(CREDIT),
                    available: None,
                    drain: false,
                    echo: false,
                    properties: None,
                }),
                b"",
            )?;
        }
        let mut rest: &[u8] = &msg;
        let mut first = true;
        loop {
            let mut t = Transfer {
                handle: Handle(TX),
                delivery_id: first.then_some(delivery_id),
                delivery_tag: first
                    .then(|| serde_bytes::ByteBuf::from(delivery_id.to_be_bytes().to_vec())),
                message_format: first.then_some(0),
                settled: first.then_some(false),
                more: true,
                rcv_settle_mode: None,
                state: None,
                resume: false,
                aborted: false,
                batchable: false,
            };
            // Frame header, the performative (at most ~40 bytes here) and the chunk.
            let room = self.peer_max_frame.saturating_sub(64).max(1);
            let (chunk, tail) = rest.split_at(rest.len().min(room));
            t.more = !tail.is_empty();
            self.put(Performative::Transfer(t), chunk)?;
            self.next_outgoing_id = self.next_outgoing_id.wrapping_add(1);
            rest = tail;
            first = false;
            if rest.is_empty() {
                break;
            }
        }
        self.flush().await?;
        loop {
            match self.step().await? {
                Some(Event::Settled(first, last, state))
                    if first <= delivery_id && delivery_id <= last.unwrap_or(first) =>
                {
                    match state {
                        // The answer follows (or came first).
                        Some(DeliveryState::Accepted(_)) => {}
                        Some(DeliveryState::Rejected(r)) => {
                            return Ok(crate::amqp::rejected_answer(r));
                        }
                        other => {
                            return Err(protocol(format!("unexpected AMQP outcome {other:?}")))
                        }
                    }
                }
                Some(Event::Answer(raw)) => {
                    let answer = decode_answer(&raw)?;
                    if let AmqpAnswer::Message {
                        correlation_id: Some(c),
                        ..
                    } = &answer
                    {
                        if *c == correlation {
                            return Ok(answer);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Settle what was received, CLOSE, and shut the stream down (without waiting for the
    /// service's CLOSE).
    async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            if self.queue_settlements().is_ok()
                && self
                    .put(Performative::Close(Close { error: None }), b"")
                    .is_ok()
                && self.flush().await.is_ok()
            {
                let _ = self.io.shutdown().await;
            }
        })
        .await;
    }
}

enum Event {
    /// A DISPOSITION of our deliveries `first..=last`.
    Settled(u32, Option<u32>, Option<DeliveryState>),
    /// A complete answer message.
    Answer(Vec<u8>),
}

fn encode_request(
    operation: &str,
    operation_id: Option<&str>,
    correlation: &str,
    body: &[u8],
) -> Result<Vec<u8>, Error> {
    let mut app: OrderedMap<String, SimpleValue> = OrderedMap::new();
    app.insert(
        "iotdps-operation-type".into(),
        SimpleValue::String(operation.into()),
    );
    if let Some(op) = operation_id {
        app.insert("iotdps-operation-id".into(), SimpleValue::String(op.into()));
    }
    if operation == OP_REGISTER {
        app.insert("iotdps-forceRegistration".into(), SimpleValue::Bool(false));
    }
    let mut out = serde_amqp::to_vec(&Properties {
        correlation_id: Some(MessageId::String(correlation.to_string())),
        ..Default::default()
    })
    .map_err(codec)?;
    out.extend(serde_amqp::to_vec(&ApplicationProperties(app)).map_err(codec)?);
    out.extend(serde_amqp::to_vec(&Data(Binary::from(body.to_vec()))).map_err(codec)?);
    Ok(out)
}

fn decode_answer(raw: &[u8]) -> Result<AmqpAnswer, Error> {
    let m = Body::<Value>::decode_message_from_reader(serde_amqp::read::SliceReader::new(raw))
        .map_err(codec)?;
    let correlation_id = m.properties.as_ref().and_then(|p| match &p.correlation_id {
        Some(MessageId::String(s)) => Some(s.clone()),
        Some(other) => Some(format!("{other:?}")),
        None => None,
    });
    let properties = m
        .application_properties
        .map(|a| {
            a.0.iter()
                .map(|(k, v)| (k.clone(), crate::amqp::simple_text(v)))
                .collect()
        })
        .unwrap_or_default();
    let body = match m.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        _ => return Err(protocol("the AMQP answer's body is not a data section")),
    };
    Ok(AmqpAnswer::Message {
        correlation_id,
        properties,
        body,
    })
}

/// Register (and poll) over one AMQP connection until the registration is assigned or fails.
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
    // TCP + TLS within the connect timeout (`connect_tls`).
    let io = crate::tls::connect_tls(ep, &tls).await?;
    let mut conn = Conn {
        io,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        peer_max_frame: frame::MIN_MAX_FRAME_SIZE as usize,
        credit: 0,
        delivery_count: 0,
        next_delivery_id: 0,
        partial: None,
        to_settle: Vec::new(),
        next_incoming_id: 0,
        next_outgoing_id: 0,
        rx_count: 0,
        rx_credit: CREDIT,
    };
    let setup = async {
        conn.queue_setup(&ep.host, &ep.api_version, &address, token.as_deref())?;
        conn.flush().await?;
        conn.await_setup(token.is_some()).await
    };
    tokio::time::timeout(ep.request_timeout, setup)
        .await
        .map_err(|_| Error::Timeout)??;
    let r = exchange(&mut conn, ep, &body, started).await;
    conn.close().await;
    r
}

async fn exchange<Io: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<Io>,
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
                conn.request(OP_REGISTER, None, body)
            }
            Some(op) => {
                timing.polls += 1;
                conn.request(OP_STATUS, Some(op), b"")
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
    use fe2o3_amqp_types::definitions::AmqpError as Cond;

    #[test]
    fn a_request_is_what_the_server_parses() {
        let raw = encode_request(OP_STATUS, Some("op-1"), "c-1", b"").unwrap();
        let r = dps_amqp::message::parse_request(&raw).unwrap();
        assert_eq!(
            r.operation,
            dps_amqp::message::Operation::Status(Some("op-1".into()))
        );
        assert_eq!(r.correlation_id, Some(MessageId::String("c-1".into())));
        let raw = encode_request(OP_REGISTER, None, "c-2", br#"{"registrationId":"d"}"#).unwrap();
        let r = dps_amqp::message::parse_request(&raw).unwrap();
        assert_eq!(r.operation, dps_amqp::message::Operation::Register);
        assert_eq!(r.body, br#"{"registrationId":"d"}"#);
    }

    #[test]
    fn an_answer_of_the_server_decodes() {
        let raw = dps_amqp::message::response(
            Some(MessageId::String("c-1".into())),
            Some(OP_REGISTER),
            Some("assigning"),
            Some(3),
            br#"{"operationId":"o","status":"assigning"}"#,
        )
        .unwrap();
        let a = decode_answer(&raw).unwrap();
        assert_eq!(a.property("retry-after"), Some("3"));
        assert_eq!(a.as_http().0, 202);
        let AmqpAnswer::Message { correlation_id, .. } = a else {
            panic!("a message")
        };
        assert_eq!(correlation_id.as_deref(), Some("c-1"));
    }

    #[test]
    fn refusals_map_to_typed_errors() {
        let e = refused(
            "link",
            Some(fe2o3_amqp_types::definitions::Error {
                condition: ErrorCondition::AmqpError(Cond::UnauthorizedAccess),
                description: Some("no".into()),
                info: None,
            }),
        );
        assert!(matches!(e, Error::Unauthorized { .. }), "{e:?}");
        assert!(matches!(refused("connection", None), Error::Transport(_)));
    }
}

//! The async driver: one task per device connection. It negotiates the protocol header and
//! SASL, exchanges OPEN, then serves sessions and links: requests arrive as transfers on the
//! device's sender link, run against the [`DeviceService`] (concurrently, up to
//! [`AmqpLimits::max_inflight`]), are settled `accepted` or `rejected`, and answered on the
//! device's receiver link.

use crate::address::{self, RegistrationAddress};
use crate::frame::{self, Decoded, ProtocolHeader, RawFrame, TYPE_AMQP, TYPE_SASL};
use crate::message::{self, Operation};
use crate::sasl::Mechanism;
use crate::{AmqpError, AmqpLimits};
use bytes::{Bytes, BytesMut};
use dps_core::clock::azure_timestamp;
use dps_core::device::{
    ConnectRefusal, DeviceCredential, DeviceRequest, DeviceResponse, DeviceService, Transport,
};
use dps_core::error::Error;
use dps_core::model::DeviceRegistration;
use dps_core::wire::WireError;
use fe2o3_amqp_types::definitions::{
    AmqpError as Cond, ConnectionError, Error as AmqpErr, ErrorCondition, Handle, LinkError,
    ReceiverSettleMode, Role, SenderSettleMode,
};
use fe2o3_amqp_types::messaging::{Accepted, DeliveryState, MessageId, TargetArchetype};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, Close, Detach, Disposition, End, Flow, Open, Performative, Transfer,
};
use fe2o3_amqp_types::primitives::{Symbol, Value};
use fe2o3_amqp_types::sasl::{
    SaslChallenge, SaslCode, SaslInit, SaslMechanisms, SaslOutcome, SaslResponse,
};
use futures::stream::{FuturesUnordered, StreamExt};
use serde_amqp::primitives::Array;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};
use tracing::Instrument;

/// Largest frame accepted before our OPEN announced [`AmqpLimits::max_frame_size`]: the SASL
/// frames and the peer's OPEN. A SAS token and a host name are well under 1 KB; an OPEN with
/// properties under 2 KB.
pub const PRE_OPEN_MAX_FRAME: usize = 8 * 1024;
/// Session incoming window we announce (transfer frames).
const INCOMING_WINDOW: u32 = 2048;
/// Smallest read reservation (bytes).
const READ_CHUNK: usize = 1024;
/// Buffers above this capacity are released when they become empty.
const KEEP_CAPACITY: usize = 4096;
/// `com.microsoft:api-version` attach property.
const API_VERSION_KEY: &str = "com.microsoft:api-version";

type CallFuture = Pin<Box<dyn Future<Output = CallDone> + Send>>;

/// Run one device connection (AMQP 1.0 over an established TLS or WebSocket byte stream).
///
/// * `peer`: the network peer's address, when known.
/// * `peer_certs`: the TLS client certificate chain, DER, leaf first (empty if none): the
///   credential of X.509 devices (no SASL, or SASL `EXTERNAL`/`ANONYMOUS`).
/// * Returns `Ok(())` when the client closes the connection (CLOSE, or the end of the stream
///   between frames); an error otherwise. Never panics.
pub async fn serve_connection<S>(
    stream: S,
    peer: Option<std::net::IpAddr>,
    peer_certs: Vec<Vec<u8>>,
    transport: Transport,
    service: Arc<dyn DeviceService>,
    limits: AmqpLimits,
) -> Result<(), AmqpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let span = tracing::info_span!(
        "amqp_conn",
        transport = transport.as_str(),
        registration_id = tracing::field::Empty,
        id_scope = tracing::field::Empty,
    );
    let result = Driver {
        stream,
        peer,
        peer_certs,
        transport,
        service,
        limits,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        credential: DeviceCredential::None,
        sasl_identity: None,
        peer_max_frame: frame::MIN_MAX_FRAME_SIZE as usize,
        heartbeat: None,
        sessions: HashMap::new(),
        inflight: FuturesUnordered::new(),
        span: span.clone(),
    }
    .run()
    .instrument(span.clone())
    .await;
    span.in_scope(|| match &result {
        Ok(()) => tracing::debug!("connection closed"),
        Err(e) => tracing::info!(error = %e, "connection ended"),
    });
    result
}

/// A finished request, ready to be settled and answered.
struct CallDone {
    channel: u16,
    delivery_id: u32,
    settled: bool,
    correlation_id: Option<MessageId>,
    operation_type: &'static str,
    address: RegistrationAddress,
    result: Result<DeviceResponse, WireError>,
    /// A fault injection rule (`drop`) closes the connection instead of answering.
    dropped: bool,
}

#[derive(Debug)]
struct Link {
    /// Our role: `Sender` answers the device, `Receiver` takes its requests.
    role: Role,
    address: RegistrationAddress,
    api_version: Option<String>,
    delivery_count: u32,
    credit: u32,
    /// Encoded answers waiting for credit (our sender links).
    queue: VecDeque<Vec<u8>>,
}

#[derive(Debug)]
struct Partial {
    handle: u32,
    delivery_id: u32,
    settled: bool,
    buf: BytesMut,
}

#[derive(Debug)]
struct Session {
    next_outgoing_id: u32,
    next_incoming_id: u32,
    remote_incoming_window: u32,
    next_delivery_id: u32,
    links: HashMap<u32, Link>,
    partial: Option<Partial>,
}

struct Driver<S> {
    stream: S,
    peer: Option<std::net::IpAddr>,
    peer_certs: Vec<Vec<u8>>,
    transport: Transport,
    service: Arc<dyn DeviceService>,
    limits: AmqpLimits,
    rbuf: BytesMut,
    wbuf: BytesMut,
    credential: DeviceCredential,
    /// The registration SASL PLAIN authenticated (links must name it).
    sasl_identity: Option<RegistrationAddress>,
    peer_max_frame: usize,
    /// Send an empty frame after this long without writing (half the peer's idle time-out).
    heartbeat: Option<Duration>,
    sessions: HashMap<u16, Session>,
    inflight: FuturesUnordered<CallFuture>,
    span: tracing::Span,
}

fn err(cond: ErrorCondition, description: impl Into<String>) -> AmqpErr {
    AmqpErr {
        condition: cond,
        description: Some(description.into()),
        info: None,
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Driver<S> {
    async fn run(mut self) -> Result<(), AmqpError> {
        let open_deadline = Instant::now() + self.limits.open_timeout;
        match timeout(self.limits.open_timeout, self.handshake(open_deadline)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                // What the handshake queued before it failed (e.g. the SASL header and
                // mechanisms before an oversized frame that was already read): best effort.
                let _ = self.flush().await;
                return Err(e);
            }
            Err(_) => return Err(AmqpError::OpenTimeout),
        }
        self.serve().await
    }

    // ----- I/O helpers -------------------------------------------------------------------

    async fn flush(&mut self) -> Result<(), AmqpError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let w = async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        };
        match timeout(self.limits.write_timeout, w).await {
            Ok(r) => r?,
            Err(_) => return Err(AmqpError::WriteTimeout),
        }
        self.wbuf.clear();
        if self.wbuf.capacity() > KEEP_CAPACITY {
            self.wbuf = BytesMut::new();
        }
        Ok(())
    }

    /// Read until `rbuf` holds `n` bytes; `Ok(false)` at a clean end of stream. What is
    /// queued in `wbuf` is written first when a read has to wait, so that the handshake answers
    /// a client that pipelines (header, `sasl-init`, header, OPEN, ... in one flight) in one
    /// write, and one that waits for each frame as soon as it has to.
    async fn fill(&mut self, n: usize) -> Result<bool, AmqpError> {
        while self.rbuf.len() < n {
            self.flush().await?;
            self.rbuf
                .reserve(n.max(READ_CHUNK) - self.rbuf.len().min(n));
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn read_header(&mut self) -> Result<ProtocolHeader, AmqpError> {
        if !self.fill(8).await? {
            return Err(AmqpError::Protocol(
                "stream ended before the protocol header",
            ));
        }
        let h = self.rbuf.split_to(8);
        let mut b = [0u8; 8];
        b.copy_from_slice(&h);
        Ok(ProtocolHeader::parse(&b))
    }

    async fn read_frame(&mut self, max: usize) -> Result<RawFrame, AmqpError> {
        loop {
            match frame::decode(&mut self.rbuf, max)? {
                Decoded::Frame(f) => return Ok(f),
                Decoded::NeedMore(n) => {
                    if !self.fill(n).await? {
                        return Err(AmqpError::Protocol("stream ended during the handshake"));
                    }
                }
            }
        }
    }

    fn put(
        &mut self,
        channel: u16,
        p: Performative,
        payload: &[u8],
    ) -> Result<(), serde_amqp::Error> {
        frame::encode(&mut self.wbuf, TYPE_AMQP, channel, &p, payload)
    }

    /// Send CLOSE with `error` and end the connection with `reason`.
    async fn close_with(&mut self, error: AmqpErr, reason: AmqpError) -> AmqpError {
        tracing::debug!(condition = ?error.condition, description = ?error.description, "closing with an error");
        let _ = self.put(0, Performative::Close(Close { error: Some(error) }), b"");
        let _ = self.flush().await;
        reason
    }

    // ----- Handshake: protocol header, SASL, OPEN ----------------------------------------

    async fn handshake(&mut self, deadline: Instant) -> Result<(), AmqpError> {
        match self.read_header().await? {
            ProtocolHeader::Sasl => {
                self.wbuf.extend_from_slice(&frame::HEADER_SASL);
                self.sasl(deadline).await?;
                if self.read_header().await? != ProtocolHeader::Amqp {
                    self.wbuf.extend_from_slice(&frame::HEADER_AMQP);
                    self.flush().await?;
                    return Err(AmqpError::Protocol("expected AMQP 0 1 0 0 after SASL"));
                }
            }
            // No SASL layer: the C SDK, C# and Java with X.509 (and Node, per the captures).
            ProtocolHeader::Amqp if !self.peer_certs.is_empty() => {
                self.credential = DeviceCredential::Certificates(self.peer_certs.clone());
            }
            ProtocolHeader::Amqp => {
                // No certificate and no SASL: nothing to authenticate with. Answer with the
                // header we require (spec §2.2) and close.
                self.wbuf.extend_from_slice(&frame::HEADER_SASL);
                self.flush().await?;
                return Err(AmqpError::SaslRequired);
            }
            ProtocolHeader::Tls | ProtocolHeader::Other => {
                self.wbuf.extend_from_slice(&frame::HEADER_SASL);
                self.flush().await?;
                return Err(AmqpError::Protocol("unsupported protocol header"));
            }
        }
        self.wbuf.extend_from_slice(&frame::HEADER_AMQP);
        let f = self.read_frame(PRE_OPEN_MAX_FRAME).await?;
        let open = match (f.frame_type, frame::performative(&f.body)) {
            (TYPE_AMQP, Ok((Performative::Open(o), _))) => o,
            _ => {
                let e = err(
                    ErrorCondition::AmqpError(Cond::IllegalState),
                    "expected OPEN",
                );
                return Err(self
                    .close_with(e, AmqpError::Protocol("expected OPEN"))
                    .await);
            }
        };
        self.peer_max_frame = (open.max_frame_size.0.max(frame::MIN_MAX_FRAME_SIZE)) as usize;
        self.heartbeat = open
            .idle_time_out
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(u64::from(ms) / 2));
        let ours = Open {
            container_id: "dps".into(),
            hostname: None,
            max_frame_size: self.limits.max_frame_size.into(),
            channel_max: self.limits.max_sessions.saturating_sub(1).into(),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        // Written with the answers to what the client pipelined after its OPEN (`serve`
        // flushes before it waits).
        self.put(0, Performative::Open(ours), b"")?;
        let _ = deadline;
        Ok(())
    }

    async fn sasl(&mut self, deadline: Instant) -> Result<(), AmqpError> {
        let mechs = SaslMechanisms {
            sasl_server_mechanisms: Array::from(
                crate::sasl::advertised()
                    .iter()
                    .map(|m| Symbol::from(*m))
                    .collect::<Vec<_>>(),
            ),
        };
        frame::encode(&mut self.wbuf, TYPE_SASL, 0, &mechs, b"")?;
        // Written by `fill` when the sasl-init is not here yet.
        let f = self.read_frame(PRE_OPEN_MAX_FRAME).await?;
        let init: SaslInit = match f.frame_type {
            TYPE_SASL => {
                frame::check_encoding(&f.body)?;
                serde_amqp::from_slice(&f.body)?
            }
            _ => return Err(AmqpError::Protocol("expected sasl-init")),
        };
        let code = match Mechanism::parse(&init.mechanism.0) {
            Some(Mechanism::Plain) => self.sasl_plain(init, deadline).await,
            Some(Mechanism::Tpm) => self.sasl_tpm(init, deadline).await?,
            Some(Mechanism::External | Mechanism::Anonymous) if !self.peer_certs.is_empty() => {
                self.credential = DeviceCredential::Certificates(self.peer_certs.clone());
                SaslCode::Ok
            }
            // No certificate for EXTERNAL/ANONYMOUS, or a mechanism we do not implement.
            _ => SaslCode::Auth,
        };
        let outcome = SaslOutcome {
            code: code.clone(),
            additional_data: None,
        };
        frame::encode(&mut self.wbuf, TYPE_SASL, 0, &outcome, b"")?;
        if code != SaslCode::Ok {
            self.flush().await?;
            return Err(AmqpError::Refused(code as u8));
        }
        Ok(())
    }

    async fn sasl_plain(&mut self, init: SaslInit, deadline: Instant) -> SaslCode {
        let Some(creds) = init
            .initial_response
            .as_ref()
            .and_then(|r| address::parse_plain(r))
        else {
            return SaslCode::Auth;
        };
        let Ok(addr) = address::parse(&creds.authcid) else {
            return SaslCode::Auth;
        };
        self.span
            .record("registration_id", addr.registration_id.as_str());
        self.span.record("id_scope", addr.id_scope.as_str());
        let credential = DeviceCredential::Sas(creds.password);
        let check = self.service.authorize_connect(
            self.transport,
            &addr.id_scope,
            &addr.registration_id,
            &credential,
            self.peer,
        );
        match timeout(deadline.saturating_duration_since(Instant::now()), check).await {
            Ok(Ok(())) => {
                self.credential = credential;
                self.sasl_identity = Some(addr);
                SaslCode::Ok
            }
            Ok(Err(ConnectRefusal::NotAuthorized | ConnectRefusal::BadUsernameOrPassword)) => {
                SaslCode::Auth
            }
            Ok(Err(ConnectRefusal::ServerUnavailable)) => SaslCode::SysTemp,
            Err(_) => {
                tracing::warn!("authorize_connect timed out");
                SaslCode::SysTemp
            }
        }
    }

    /// SASL `TPM` (protocol digest §6.5.6, [`crate::sasl::tpm`]): EK in the init, SRK in the
    /// first response, the activation blob in segment challenges, the SAS token signed in the
    /// TPM in the answer to the last one, checked like a SASL PLAIN token. Malformed payloads
    /// and refusals give `auth`; a store that cannot answer `sys-temp`. All of it runs within
    /// the open deadline.
    async fn sasl_tpm(&mut self, init: SaslInit, deadline: Instant) -> Result<SaslCode, AmqpError> {
        use crate::sasl::tpm;
        let parsed = tpm::parse_init(
            init.initial_response
                .as_ref()
                .map(|r| r.as_slice())
                .unwrap_or(&[]),
            init.hostname.as_deref(),
        );
        let first = match parsed {
            Ok(i) => i,
            Err(e) => {
                tracing::info!(reason = %e, "SASL TPM refused");
                return Ok(SaslCode::Auth);
            }
        };
        self.span
            .record("registration_id", first.registration_id.as_str());
        self.span.record("id_scope", first.id_scope.as_str());
        // "Send the SRK".
        self.sasl_challenge(&tpm::EMPTY).await?;
        let srk = match tpm::parse_srk(&self.sasl_response().await?) {
            Ok(k) => k,
            Err(e) => {
                tracing::info!(reason = %e, "SASL TPM refused");
                return Ok(SaslCode::Auth);
            }
        };
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let keys = dps_core::model::TpmAttestation {
            endorsement_key: b64.encode(&first.endorsement_key),
            storage_root_key: Some(b64.encode(&srk)),
        };
        let issue = self.service.tpm_challenge(
            &first.id_scope,
            &first.registration_id,
            &keys,
            self.transport,
            self.peer,
        );
        let blob = match timeout(deadline.saturating_duration_since(Instant::now()), issue).await {
            Ok(Ok(blob)) => blob,
            Ok(Err(e)) => {
                // The engine logged and audited the refusal.
                let status = WireError::from(&e).status;
                return Ok(if status == 429 || status >= 500 {
                    SaslCode::SysTemp
                } else {
                    SaslCode::Auth
                });
            }
            Err(_) => {
                tracing::warn!("tpm_challenge timed out");
                return Ok(SaslCode::SysTemp);
            }
        };
        let segments = match tpm::segments(&blob) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "activation blob cannot be sent");
                return Ok(SaslCode::Sys);
            }
        };
        let n = segments.len();
        let mut token = None;
        for (i, seg) in segments.into_iter().enumerate() {
            self.sasl_challenge(&seg).await?;
            let answer = self.sasl_response().await?;
            let r = if i + 1 < n {
                tpm::parse_ack(&answer).map(|()| None)
            } else {
                tpm::parse_token(&answer).map(Some)
            };
            match r {
                Ok(t) => token = t,
                Err(e) => {
                    tracing::info!(reason = %e, "SASL TPM refused");
                    return Ok(SaslCode::Auth);
                }
            }
        }
        let Some(token) = token else {
            return Ok(SaslCode::Auth);
        };
        let credential = DeviceCredential::Sas(token);
        let check = self.service.authorize_connect(
            self.transport,
            &first.id_scope,
            &first.registration_id,
            &credential,
            self.peer,
        );
        Ok(
            match timeout(deadline.saturating_duration_since(Instant::now()), check).await {
                Ok(Ok(())) => {
                    self.credential = credential;
                    self.sasl_identity = Some(RegistrationAddress {
                        id_scope: first.id_scope,
                        registration_id: first.registration_id,
                    });
                    SaslCode::Ok
                }
                Ok(Err(ConnectRefusal::NotAuthorized | ConnectRefusal::BadUsernameOrPassword)) => {
                    SaslCode::Auth
                }
                Ok(Err(ConnectRefusal::ServerUnavailable)) => SaslCode::SysTemp,
                Err(_) => {
                    tracing::warn!("authorize_connect timed out");
                    SaslCode::SysTemp
                }
            },
        )
    }

    async fn sasl_challenge(&mut self, payload: &[u8]) -> Result<(), AmqpError> {
        let c = SaslChallenge {
            challenge: serde_bytes::ByteBuf::from(payload.to_vec()),
        };
        frame::encode(&mut self.wbuf, TYPE_SASL, 0, &c, b"")?;
        self.flush().await
    }

    async fn sasl_response(&mut self) -> Result<Vec<u8>, AmqpError> {
        let f = self.read_frame(PRE_OPEN_MAX_FRAME).await?;
        if f.frame_type != TYPE_SASL {
            return Err(AmqpError::Protocol("expected sasl-response"));
        }
        frame::check_encoding(&f.body)?;
        let r: SaslResponse = serde_amqp::from_slice(&f.body)?;
        Ok(r.response.into_vec())
    }

    // ----- After OPEN --------------------------------------------------------------------

    async fn serve(mut self) -> Result<(), AmqpError> {
        let mut last_request = Instant::now();
        let mut last_write = Instant::now();
        let max_frame = self.limits.max_frame_size as usize;
        let mut need = READ_CHUNK;
        loop {
            while self.inflight.len() < self.limits.max_inflight.max(1) {
                let f = match frame::decode(&mut self.rbuf, max_frame) {
                    Ok(Decoded::Frame(f)) => f,
                    Ok(Decoded::NeedMore(n)) => {
                        need = n;
                        break;
                    }
                    Err(e) => {
                        let desc = e.to_string();
                        let cond = match e {
                            frame::FrameError::TooLarge { .. } => {
                                ErrorCondition::ConnectionError(ConnectionError::FramingError)
                            }
                            frame::FrameError::Malformed => {
                                ErrorCondition::ConnectionError(ConnectionError::FramingError)
                            }
                        };
                        return Err(self.close_with(err(cond, desc), e.into()).await);
                    }
                };
                if f.body.is_empty() {
                    continue; // heartbeat
                }
                if f.frame_type != TYPE_AMQP {
                    let e = err(
                        ErrorCondition::ConnectionError(ConnectionError::FramingError),
                        "SASL frame after OPEN",
                    );
                    return Err(self
                        .close_with(e, AmqpError::Protocol("SASL frame after OPEN"))
                        .await);
                }
                let (p, payload) = match frame::performative(&f.body) {
                    Ok(x) => x,
                    Err(e) => {
                        let c = err(ErrorCondition::AmqpError(Cond::DecodeError), e.to_string());
                        return Err(self.close_with(c, AmqpError::Codec(e)).await);
                    }
                };
                if matches!(p, Performative::Transfer(_)) {
                    last_request = Instant::now();
                }
                match self.handle(f.channel, p, payload) {
                    Ok(true) => {}
                    Ok(false) => {
                        self.flush().await?;
                        return Ok(());
                    }
                    // Injected `drop`: closed without a word (no CLOSE frame).
                    Err((_, AmqpError::InjectedFault)) => return Err(AmqpError::InjectedFault),
                    Err((e, reason)) => return Err(self.close_with(e, reason).await),
                }
            }
            if !self.wbuf.is_empty() {
                self.flush().await?;
                last_write = Instant::now();
            }
            if self.rbuf.is_empty() && self.rbuf.capacity() > KEEP_CAPACITY {
                self.rbuf = BytesMut::new();
            }
            let can_read = self.inflight.len() < self.limits.max_inflight.max(1);
            if can_read && self.rbuf.capacity() - self.rbuf.len() < need.min(READ_CHUNK) {
                self.rbuf.reserve(need.max(READ_CHUNK));
            }
            let idle_deadline = last_request + self.limits.idle_timeout;
            let beat = self.heartbeat.map(|h| last_write + h);
            tokio::select! {
                biased;
                Some(done) = self.inflight.next(), if !self.inflight.is_empty() => {
                    if done.dropped {
                        // Injected `drop`: the connection closes without answering.
                        return Err(AmqpError::InjectedFault);
                    }
                    last_request = Instant::now();
                    if let Err((e, reason)) = self.finish(done) {
                        return Err(self.close_with(e, reason).await);
                    }
                }
                r = self.stream.read_buf(&mut self.rbuf), if can_read => {
                    if r? == 0 {
                        return if self.rbuf.is_empty() {
                            Ok(())
                        } else {
                            Err(AmqpError::Protocol("stream ended inside a frame"))
                        };
                    }
                }
                _ = sleep_until(beat.unwrap_or(idle_deadline)), if beat.is_some() => {
                    frame::heartbeat(&mut self.wbuf);
                }
                _ = sleep_until(idle_deadline), if can_read => {
                    let e = err(ErrorCondition::AmqpError(Cond::ResourceLimitExceeded), "idle timeout");
                    return Err(self.close_with(e, AmqpError::IdleTimeout).await);
                }
            }
        }
    }

    /// Handle one performative. `Ok(false)`: the peer closed the connection.
    #[allow(clippy::result_large_err)]
    fn handle(
        &mut self,
        ch: u16,
        p: Performative,
        payload: Bytes,
    ) -> Result<bool, (AmqpErr, AmqpError)> {
        let illegal = |what: &'static str| {
            (
                err(ErrorCondition::AmqpError(Cond::IllegalState), what),
                AmqpError::Protocol(what),
            )
        };
        match p {
            Performative::Open(_) => return Err(illegal("second OPEN")),
            Performative::Close(c) => {
                if let Some(e) = c.error {
                    tracing::debug!(condition = ?e.condition, "peer closed with an error");
                }
                self.put(0, Performative::Close(Close { error: None }), b"")
                    .map_err(illegal_codec)?;
                return Ok(false);
            }
            Performative::Begin(b) => self.begin(ch, b)?,
            Performative::End(_) => {
                self.sessions.remove(&ch);
                self.put(ch, Performative::End(End { error: None }), b"")
                    .map_err(illegal_codec)?;
            }
            Performative::Attach(a) => self.attach(ch, a)?,
            Performative::Detach(d) => {
                let s = self
                    .sessions
                    .get_mut(&ch)
                    .ok_or_else(|| illegal("no session"))?;
                s.links.remove(&d.handle.0);
                if s.partial.as_ref().is_some_and(|p| p.handle == d.handle.0) {
                    s.partial = None;
                }
                let reply = Detach {
                    handle: d.handle,
                    closed: d.closed,
                    error: None,
                };
                self.put(ch, Performative::Detach(reply), b"")
                    .map_err(illegal_codec)?;
            }
            Performative::Flow(f) => self.flow(ch, f)?,
            Performative::Transfer(t) => self.transfer(ch, t, payload)?,
            // The device settling our answers: nothing to keep.
            Performative::Disposition(_) => {}
        }
        Ok(true)
    }

    #[allow(clippy::result_large_err)]
    fn begin(&mut self, ch: u16, b: Begin) -> Result<(), (AmqpErr, AmqpError)> {
        if b.remote_channel.is_some() || self.sessions.contains_key(&ch) {
            return Err((
                err(
                    ErrorCondition::AmqpError(Cond::IllegalState),
                    "unexpected BEGIN",
                ),
                AmqpError::Protocol("unexpected BEGIN"),
            ));
        }
        if ch >= self.limits.max_sessions
            || self.sessions.len() >= self.limits.max_sessions as usize
        {
            return Err((
                err(
                    ErrorCondition::AmqpError(Cond::ResourceLimitExceeded),
                    "too many sessions",
                ),
                AmqpError::Limit("sessions"),
            ));
        }
        self.sessions.insert(
            ch,
            Session {
                next_outgoing_id: 0,
                next_incoming_id: b.next_outgoing_id,
                remote_incoming_window: b.incoming_window,
                next_delivery_id: 0,
                links: HashMap::new(),
                partial: None,
            },
        );
        let reply = Begin {
            remote_channel: Some(ch),
            next_outgoing_id: 0,
            incoming_window: INCOMING_WINDOW,
            outgoing_window: u32::MAX,
            handle_max: Handle((self.limits.max_links as u32).saturating_sub(1)),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.put(ch, Performative::Begin(reply), b"")
            .map_err(illegal_codec)
    }

    #[allow(clippy::result_large_err)]
    fn attach(&mut self, ch: u16, a: Attach) -> Result<(), (AmqpErr, AmqpError)> {
        let limits_links = self.limits.max_links;
        let credit = self.limits.link_credit;
        let max_message = self.limits.max_message_size as u64;
        let sasl_identity = self.sasl_identity.clone();
        let s = self.sessions.get_mut(&ch).ok_or_else(|| {
            (
                err(
                    ErrorCondition::AmqpError(Cond::IllegalState),
                    "ATTACH without a session",
                ),
                AmqpError::Protocol("ATTACH without a session"),
            )
        })?;
        let handle = a.handle.0;
        if s.links.contains_key(&handle) {
            return Err((
                err(
                    ErrorCondition::SessionError(
                        fe2o3_amqp_types::definitions::SessionError::HandleInUse,
                    ),
                    "handle in use",
                ),
                AmqpError::Protocol("handle in use"),
            ));
        }
        // The device's role decides ours; its source (receiver) or target (sender) names
        // the registration.
        let (our_role, raw_address) = match a.role {
            Role::Receiver => (
                Role::Sender,
                a.source.as_ref().and_then(|s| s.address.clone()),
            ),
            Role::Sender => (
                Role::Receiver,
                match a.target.as_deref() {
                    Some(TargetArchetype::Target(t)) => t.address.clone(),
                    #[allow(unreachable_patterns)]
                    _ => None,
                },
            ),
        };
        let parsed = raw_address
            .as_deref()
            .ok_or_else(|| "the link has no address".to_string())
            .and_then(|s| address::parse(s).map_err(|e| e.to_string()));
        let refusal = if s.links.len() >= limits_links {
            Some(err(
                ErrorCondition::AmqpError(Cond::ResourceLimitExceeded),
                "too many links",
            ))
        } else {
            match &parsed {
                Err(e) => Some(err(ErrorCondition::AmqpError(Cond::NotFound), e.clone())),
                Ok(addr) => match &sasl_identity {
                    Some(id) if !id.same_as(addr) => Some(err(
                        ErrorCondition::AmqpError(Cond::UnauthorizedAccess),
                        "the link address does not name the registration SASL authenticated",
                    )),
                    _ => None,
                },
            }
        };
        let refused = refusal.is_some();
        let properties = a.properties.clone();
        let reply = Attach {
            name: a.name.clone(),
            handle: a.handle.clone(),
            role: our_role.clone(),
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::First,
            // A refused link is answered with a null terminus, then detached (spec §2.6.3).
            source: if refused && our_role == Role::Sender {
                None
            } else {
                a.source.clone()
            },
            target: if refused && our_role == Role::Receiver {
                None
            } else {
                a.target.clone()
            },
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: (our_role == Role::Sender).then_some(0),
            max_message_size: (our_role == Role::Receiver).then_some(max_message),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let addr = match (refusal, parsed) {
            (None, Ok(addr)) => addr,
            (refusal, _) => {
                self.put(ch, Performative::Attach(reply), b"")
                    .map_err(illegal_codec)?;
                let d = Detach {
                    handle: a.handle,
                    closed: true,
                    error: refusal.or_else(|| {
                        Some(err(ErrorCondition::AmqpError(Cond::NotFound), "no address"))
                    }),
                };
                return self
                    .put(ch, Performative::Detach(d), b"")
                    .map_err(illegal_codec);
            }
        };
        self.span
            .record("registration_id", addr.registration_id.as_str());
        self.span.record("id_scope", addr.id_scope.as_str());
        if self.service.connection_fault(
            dps_core::fault::FaultPoint::Connect,
            self.transport,
            &addr.id_scope,
            &addr.registration_id,
            self.peer,
        ) {
            return Err((
                err(
                    ErrorCondition::AmqpError(Cond::InternalError),
                    "injected fault",
                ),
                AmqpError::InjectedFault,
            ));
        }
        let api_version = properties.and_then(|p| {
            p.get(&Symbol::from(API_VERSION_KEY)).and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Symbol(s) => Some(s.0.clone()),
                _ => None,
            })
        });
        let link = Link {
            role: our_role.clone(),
            address: addr,
            api_version,
            delivery_count: a.initial_delivery_count.unwrap_or(0),
            credit: 0,
            queue: VecDeque::new(),
        };
        s.links.insert(handle, link);
        self.put(ch, Performative::Attach(reply), b"")
            .map_err(illegal_codec)?;
        if our_role == Role::Receiver {
            self.grant(ch, handle, credit).map_err(illegal_codec)?;
        }
        Ok(())
    }

    /// Give the device `credit` on our receiver link `handle`.
    fn grant(&mut self, ch: u16, handle: u32, credit: u32) -> Result<(), serde_amqp::Error> {
        let Some(s) = self.sessions.get_mut(&ch) else {
            return Ok(());
        };
        let Some(l) = s.links.get_mut(&handle) else {
            return Ok(());
        };
        l.credit = credit;
        let f = Flow {
            next_incoming_id: Some(s.next_incoming_id),
            incoming_window: INCOMING_WINDOW,
            next_outgoing_id: s.next_outgoing_id,
            outgoing_window: u32::MAX,
            handle: Some(Handle(handle)),
            delivery_count: Some(l.delivery_count),
            link_credit: Some(credit),
            available: None,
            drain: false,
            echo: false,
            properties: None,
        };
        frame::encode(&mut self.wbuf, TYPE_AMQP, ch, &Performative::Flow(f), b"")
    }

    #[allow(clippy::result_large_err)]
    fn flow(&mut self, ch: u16, f: Flow) -> Result<(), (AmqpErr, AmqpError)> {
        let Some(s) = self.sessions.get_mut(&ch) else {
            return Err((
                err(
                    ErrorCondition::AmqpError(Cond::IllegalState),
                    "FLOW without a session",
                ),
                AmqpError::Protocol("FLOW without a session"),
            ));
        };
        s.remote_incoming_window = f
            .next_incoming_id
            .unwrap_or(0)
            .wrapping_add(f.incoming_window)
            .wrapping_sub(s.next_outgoing_id);
        let mut echo_link = None;
        if let Some(h) = &f.handle {
            if let Some(l) = s.links.get_mut(&h.0) {
                if l.role == Role::Sender {
                    let count = f.delivery_count.unwrap_or(l.delivery_count);
                    l.credit = count
                        .wrapping_add(f.link_credit.unwrap_or(0))
                        .wrapping_sub(l.delivery_count);
                    if f.drain && l.queue.is_empty() {
                        l.delivery_count = l.delivery_count.wrapping_add(l.credit);
                        l.credit = 0;
                        echo_link = Some(h.0);
                    }
                }
                if f.echo {
                    echo_link = Some(h.0);
                }
            }
        }
        self.pump(ch).map_err(illegal_codec)?;
        if let Some(h) = echo_link {
            let (credit, role) = {
                let s = &self.sessions[&ch];
                let l = &s.links[&h];
                (l.credit, l.role.clone())
            };
            if role == Role::Receiver {
                self.grant(ch, h, credit).map_err(illegal_codec)?;
            } else {
                let s = &self.sessions[&ch];
                let l = &s.links[&h];
                let f = Flow {
                    next_incoming_id: Some(s.next_incoming_id),
                    incoming_window: INCOMING_WINDOW,
                    next_outgoing_id: s.next_outgoing_id,
                    outgoing_window: u32::MAX,
                    handle: Some(Handle(h)),
                    delivery_count: Some(l.delivery_count),
                    link_credit: Some(l.credit),
                    available: Some(l.queue.len() as u32),
                    drain: f.drain,
                    echo: false,
                    properties: None,
                };
                self.put(ch, Performative::Flow(f), b"")
                    .map_err(illegal_codec)?;
            }
        }
        Ok(())
    }

    #[allow(clippy::result_large_err)]
    fn transfer(
        &mut self,
        ch: u16,
        t: Transfer,
        payload: Bytes,
    ) -> Result<(), (AmqpErr, AmqpError)> {
        let max_message = self.limits.max_message_size;
        let credit = self.limits.link_credit;
        let Some(s) = self.sessions.get_mut(&ch) else {
            return Err((
                err(
                    ErrorCondition::AmqpError(Cond::IllegalState),
                    "TRANSFER without a session",
                ),
                AmqpError::Protocol("TRANSFER without a session"),
            ));
        };
        s.next_incoming_id = s.next_incoming_id.wrapping_add(1);
        let handle = t.handle.0;
        let Some(link) = s
            .links
            .get_mut(&handle)
            .filter(|l| l.role == Role::Receiver)
        else {
            return Err((
                err(
                    ErrorCondition::SessionError(
                        fe2o3_amqp_types::definitions::SessionError::UnattachedHandle,
                    ),
                    "TRANSFER on a handle that is not a sender link",
                ),
                AmqpError::Protocol("TRANSFER on an unattached handle"),
            ));
        };
        let mut partial = match s.partial.take() {
            Some(p) if p.handle == handle => p,
            Some(_) => {
                return Err((
                    err(
                        ErrorCondition::AmqpError(Cond::IllegalState),
                        "interleaved transfers",
                    ),
                    AmqpError::Protocol("interleaved transfers"),
                ))
            }
            None => {
                let Some(delivery_id) = t.delivery_id else {
                    return Err((
                        err(
                            ErrorCondition::AmqpError(Cond::InvalidField),
                            "no delivery-id",
                        ),
                        AmqpError::Protocol("TRANSFER without a delivery-id"),
                    ));
                };
                link.delivery_count = link.delivery_count.wrapping_add(1);
                link.credit = link.credit.saturating_sub(1);
                Partial {
                    handle,
                    delivery_id,
                    settled: t.settled.unwrap_or(false),
                    buf: BytesMut::new(),
                }
            }
        };
        if t.aborted {
            return Ok(());
        }
        if partial.buf.len() + payload.len() > max_message {
            return Err((
                err(
                    ErrorCondition::LinkError(LinkError::MessageSizeExceeded),
                    format!("messages are limited to {max_message} bytes"),
                ),
                AmqpError::Limit("message size"),
            ));
        }
        partial.buf.extend_from_slice(&payload);
        partial.settled |= t.settled.unwrap_or(false);
        if t.more {
            s.partial = Some(partial);
            return Ok(());
        }
        let address = link.address.clone();
        let api_version = link.api_version.clone();
        let low = link.credit <= credit / 2;
        if low {
            self.grant(ch, handle, credit).map_err(illegal_codec)?;
        }
        self.request(ch, partial, address, api_version);
        Ok(())
    }

    /// Turn a complete request message into a service call (or an immediate rejection).
    fn request(
        &mut self,
        ch: u16,
        p: Partial,
        address: RegistrationAddress,
        api_version: Option<String>,
    ) {
        let service = self.service.clone();
        let mut done = CallDone {
            channel: ch,
            delivery_id: p.delivery_id,
            settled: p.settled,
            correlation_id: None,
            operation_type: message::OP_REGISTER,
            address: address.clone(),
            result: Err(WireError::from(&Error::invalid("unreadable message"))),
            dropped: false,
        };
        let req = match message::parse_request(&p.buf) {
            Ok(r) => r,
            Err(e) => {
                done.result = Err(WireError::from(&Error::invalid(format!(
                    "The request message could not be decoded: {e}"
                ))));
                self.inflight.push(Box::pin(async move { done }));
                return;
            }
        };
        done.correlation_id = req.correlation_id.clone();
        let body = match &req.operation {
            Operation::Register => match DeviceRegistration::parse_lenient(&req.body) {
                Ok(b) => b,
                Err(e) => {
                    done.result = Err(WireError::from(&Error::invalid(format!(
                        "Request body is not valid JSON: {e}"
                    ))));
                    self.inflight.push(Box::pin(async move { done }));
                    return;
                }
            },
            _ => DeviceRegistration::default(),
        };
        let request = DeviceRequest {
            id_scope: address.id_scope.clone(),
            registration_id: address.registration_id.clone(),
            credential: self.credential.clone(),
            body,
            transport: self.transport,
            api_version,
            force_registration: req.force_registration,
            peer: self.peer,
        };
        match req.operation {
            Operation::Register => {
                self.inflight.push(Box::pin(async move {
                    let r = service.register(request).await;
                    done.dropped = matches!(r, Err(Error::Dropped { .. }));
                    done.result = r.map_err(|e| WireError::from(&e));
                    done
                }));
            }
            Operation::Status(Some(op)) => {
                done.operation_type = message::OP_STATUS;
                self.inflight.push(Box::pin(async move {
                    done.result = service
                        .operation_status(request, &op)
                        .await
                        .map_err(|e| WireError::from(&e));
                    done
                }));
            }
            Operation::Status(None) => {
                done.operation_type = message::OP_STATUS;
                done.result = Err(WireError::from(&Error::invalid(
                    "iotdps-operation-id is required",
                )));
                self.inflight.push(Box::pin(async move { done }));
            }
            Operation::Unknown(t) => {
                done.result = Err(WireError::from(&Error::invalid(format!(
                    "iotdps-operation-type must be {} or {} (got {:?})",
                    message::OP_REGISTER,
                    message::OP_STATUS,
                    t.unwrap_or_default()
                ))));
                self.inflight.push(Box::pin(async move { done }));
            }
        }
    }

    /// Settle a finished request and queue its answer.
    #[allow(clippy::result_large_err)]
    fn finish(&mut self, done: CallDone) -> Result<(), (AmqpErr, AmqpError)> {
        if !self.sessions.contains_key(&done.channel) {
            return Ok(()); // the session ended meanwhile
        }
        let state = match &done.result {
            Ok(_) => DeliveryState::Accepted(Accepted {}),
            Err(e) => {
                let tracking_id = uuid::Uuid::new_v4().to_string();
                let ts = azure_timestamp(time::OffsetDateTime::now_utc());
                let json = serde_json::to_string(&e.body(&tracking_id, &ts)).unwrap_or_default();
                let retry = retry_after_for(e.status, e.retry_after);
                DeliveryState::Rejected(message::rejected(e.status, json, retry))
            }
        };
        if !done.settled {
            let d = Disposition {
                role: Role::Receiver,
                first: done.delivery_id,
                last: None,
                settled: true,
                state: Some(state),
                batchable: false,
            };
            self.put(done.channel, Performative::Disposition(d), b"")
                .map_err(illegal_codec)?;
        } else if let Err(e) = &done.result {
            tracing::debug!(
                status = e.status,
                "request was pre-settled; its error is not reported"
            );
        }
        let Ok(resp) = done.result else {
            return Ok(());
        };
        let json = serde_json::to_vec(&resp.body).unwrap_or_else(|_| b"{}".to_vec());
        let status = serde_json::to_value(resp.body.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string));
        let retry = retry_after_for(resp.status, resp.retry_after);
        let bytes = message::response(
            done.correlation_id,
            Some(done.operation_type),
            status.as_deref(),
            retry,
            &json,
        )
        .map_err(illegal_codec)?;
        let s = self.sessions.get_mut(&done.channel).expect("checked above");
        let Some(link) = s
            .links
            .values_mut()
            .find(|l| l.role == Role::Sender && l.address.same_as(&done.address))
        else {
            tracing::debug!("no receiver link for the answer; dropped");
            return Ok(());
        };
        if link.queue.len() >= 64 {
            return Err((
                err(
                    ErrorCondition::AmqpError(Cond::ResourceLimitExceeded),
                    "the device does not take its answers (no link credit)",
                ),
                AmqpError::Limit("queued answers"),
            ));
        }
        link.queue.push_back(bytes);
        self.pump(done.channel).map_err(illegal_codec)
    }

    /// Send queued answers on session `ch` while credit and window allow.
    fn pump(&mut self, ch: u16) -> Result<(), serde_amqp::Error> {
        let max_frame = self.peer_max_frame;
        let Some(s) = self.sessions.get_mut(&ch) else {
            return Ok(());
        };
        let handles: Vec<u32> = s.links.keys().copied().collect();
        for h in handles {
            loop {
                let l = s.links.get_mut(&h).expect("listed");
                if l.role != Role::Sender
                    || l.credit == 0
                    || l.queue.is_empty()
                    || s.remote_incoming_window == 0
                {
                    break;
                }
                let bytes = l.queue.pop_front().expect("not empty");
                l.credit -= 1;
                l.delivery_count = l.delivery_count.wrapping_add(1);
                let delivery_id = s.next_delivery_id;
                s.next_delivery_id = s.next_delivery_id.wrapping_add(1);
                let tag = delivery_id.to_be_bytes().to_vec();
                let mut rest: &[u8] = &bytes;
                let mut first = true;
                loop {
                    let mut t = Transfer {
                        handle: Handle(h),
                        delivery_id: first.then_some(delivery_id),
                        delivery_tag: first.then(|| serde_bytes::ByteBuf::from(tag.clone())),
                        message_format: first.then_some(0),
                        settled: first.then_some(false),
                        more: false,
                        rcv_settle_mode: None,
                        state: None,
                        resume: false,
                        aborted: false,
                        batchable: false,
                    };
                    let perf = serde_amqp::to_vec(&Performative::Transfer(t.clone()))?;
                    // Room for the performative with `more` set (one byte longer at most).
                    let room = max_frame.saturating_sub(8 + perf.len() + 1).max(1);
                    let (chunk, tail) = rest.split_at(rest.len().min(room));
                    t.more = !tail.is_empty();
                    frame::encode(
                        &mut self.wbuf,
                        TYPE_AMQP,
                        ch,
                        &Performative::Transfer(t),
                        chunk,
                    )?;
                    s.next_outgoing_id = s.next_outgoing_id.wrapping_add(1);
                    s.remote_incoming_window = s.remote_incoming_window.saturating_sub(1);
                    rest = tail;
                    first = false;
                    if rest.is_empty() {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

fn illegal_codec(e: serde_amqp::Error) -> (AmqpErr, AmqpError) {
    (
        err(
            ErrorCondition::AmqpError(Cond::InternalError),
            "encoding failed",
        ),
        AmqpError::Codec(e),
    )
}

/// `retry-after` on an answer: the service's value, or [`crate::DEFAULT_RETRY_AFTER`] on 202,
/// 429 and 5xx when it gave none (as over MQTT).
pub fn retry_after_for(status: u16, given: Option<u32>) -> Option<u32> {
    given
        .or((status == 202 || status == 429 || status >= 500).then_some(crate::DEFAULT_RETRY_AFTER))
}

//! The async driver: one task per device connection, reading bytes, decoding packets, running
//! the [`Session`]'s actions and writing the answers.

use crate::codec::{self, Decoded, Frame};
use crate::session::{Action, CallOutcome, CloseReason, Session};
use crate::{MqttError, MqttLimits};
use bytes::BytesMut;
use dps_core::device::{ConnectRefusal, DeviceService, Transport};
use dps_core::fault::FaultPoint;
use futures::stream::{FuturesUnordered, StreamExt};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};
use tracing::Instrument;

/// Smallest read reservation (bytes). Kept small: an idle connection holds at most this.
const READ_CHUNK: usize = 1024;
/// Buffers above this capacity are released when they become empty.
const KEEP_CAPACITY: usize = 4096;

type CallFuture = Pin<Box<dyn Future<Output = CallOutcome> + Send>>;

/// Run one device connection (MQTT 3.1.1 over an already-established TLS or WebSocket
/// byte stream) to completion.
///
/// * `peer`: the network peer's address, when known (passed on to the service with every
///   credential check and request).
/// * `peer_certs`: the TLS client certificate chain, DER, leaf first (empty if none). It is
///   the device credential when CONNECT carries no password (X.509 attestation).
/// * Returns `Ok(())` when the client sends DISCONNECT or closes the stream at a packet
///   boundary; an error for everything else (refused CONNECT, malformed or oversized packet,
///   protocol violation, timeouts, I/O). Only this connection is affected; never panics.
pub async fn serve_connection<S>(
    stream: S,
    peer: Option<std::net::IpAddr>,
    peer_certs: Vec<Vec<u8>>,
    transport: Transport,
    service: Arc<dyn DeviceService>,
    limits: MqttLimits,
) -> Result<(), MqttError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let span = tracing::info_span!(
        "mqtt_conn",
        transport = transport.as_str(),
        registration_id = tracing::field::Empty,
        id_scope = tracing::field::Empty,
    );
    let result = Driver {
        stream,
        session: Session::new(transport, peer_certs).with_peer(peer),
        service,
        limits,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
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

struct Driver<S> {
    stream: S,
    session: Session,
    service: Arc<dyn DeviceService>,
    limits: MqttLimits,
    rbuf: BytesMut,
    wbuf: BytesMut,
    inflight: FuturesUnordered<CallFuture>,
    span: tracing::Span,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Driver<S> {
    async fn run(mut self) -> Result<(), MqttError> {
        let connect_deadline = Instant::now() + self.limits.connect_timeout;
        let mut last_packet = Instant::now();
        let mut last_request = Instant::now();
        let mut need = READ_CHUNK;
        loop {
            // Decode and handle every complete packet, up to the in-flight bound.
            while self.inflight.len() < self.limits.max_inflight.max(1) {
                let frame = match codec::decode(
                    &mut self.rbuf,
                    self.limits.max_packet_size,
                    self.session.awaiting_connect(),
                )? {
                    Decoded::NeedMore(n) => {
                        need = n;
                        break;
                    }
                    Decoded::Frame(f) => f,
                };
                let now = Instant::now();
                last_packet = now;
                let actions = match frame {
                    Frame::UnsupportedProtocol => self.session.unsupported_protocol(),
                    Frame::Packet(p) => {
                        if !matches!(p, Packet::PingReq | Packet::PubAck(_)) {
                            last_request = now;
                        }
                        self.session.handle(p)
                    }
                };
                if let Some(end) = self.execute(actions, connect_deadline).await? {
                    self.flush().await?;
                    return end;
                }
            }
            self.flush().await?;
            if self.rbuf.is_empty() && self.rbuf.capacity() > KEEP_CAPACITY {
                self.rbuf = BytesMut::new();
            }

            let can_read = self.inflight.len() < self.limits.max_inflight.max(1);
            let deadline = if self.session.awaiting_connect() {
                connect_deadline
            } else {
                let idle = last_request + self.limits.idle_timeout;
                match self.session.keep_alive() {
                    Some(ka) => idle.min(last_packet + ka.mul_f32(1.5)),
                    None => idle,
                }
            };
            if can_read && self.rbuf.capacity() - self.rbuf.len() < need.min(READ_CHUNK) {
                self.rbuf.reserve(need.max(READ_CHUNK));
            }
            tokio::select! {
                biased;
                Some(outcome) = self.inflight.next(), if !self.inflight.is_empty() => {
                    // A finished call counts as activity (reading may have been paused).
                    last_packet = Instant::now();
                    let actions = self.session.call_result(outcome);
                    if let Some(end) = self.execute(actions, connect_deadline).await? {
                        self.flush().await?;
                        return end;
                    }
                }
                r = self.stream.read_buf(&mut self.rbuf), if can_read => {
                    if r? == 0 {
                        return if self.rbuf.is_empty() {
                            Ok(())
                        } else {
                            Err(MqttError::Protocol("stream ended inside a packet"))
                        };
                    }
                }
                _ = sleep_until(deadline), if can_read => {
                    return Err(if self.session.awaiting_connect() {
                        MqttError::ConnectTimeout
                    } else if deadline == last_request + self.limits.idle_timeout {
                        MqttError::IdleTimeout
                    } else {
                        MqttError::KeepAliveTimeout
                    });
                }
            }
        }
    }

    /// Perform actions in order. Returns `Some(result)` when the connection must end.
    async fn execute(
        &mut self,
        actions: Vec<Action>,
        connect_deadline: Instant,
    ) -> Result<Option<Result<(), MqttError>>, MqttError> {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Send(p) => {
                    let point = match &p {
                        Packet::ConnAck(c) if c.code == ConnectReturnCode::Success => {
                            Some(FaultPoint::Connect)
                        }
                        Packet::SubAck(_) => Some(FaultPoint::Subscribe),
                        _ => None,
                    };
                    if let (Some(point), Some((scope, rid))) = (point, self.session.identity()) {
                        // Injected `drop`: closed instead of the CONNACK / SUBACK.
                        if self.service.connection_fault(
                            point,
                            self.session.transport(),
                            scope,
                            rid,
                            self.session.peer(),
                        ) {
                            return Ok(Some(Err(MqttError::InjectedFault)));
                        }
                    }
                    codec::encode(&p, &mut self.wbuf)?
                }
                Action::Authorize(auth) => {
                    self.span
                        .record("registration_id", auth.registration_id.as_str());
                    self.span.record("id_scope", auth.id_scope.as_str());
                    // Flush nothing yet: CONNACK must be the first packet we send.
                    let r = match timeout(
                        connect_deadline.saturating_duration_since(Instant::now()),
                        auth.run(&*self.service),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => {
                            tracing::warn!("authorize_connect timed out");
                            Err(ConnectRefusal::ServerUnavailable)
                        }
                    };
                    for a in self.session.connect_result(r).into_iter().rev() {
                        queue.push_front(a);
                    }
                }
                Action::Call(call) => {
                    let svc = self.service.clone();
                    self.inflight.push(Box::pin(call.run(svc)));
                }
                Action::Close(reason) => {
                    return Ok(Some(match reason {
                        CloseReason::ClientDisconnect => Ok(()),
                        CloseReason::Refused(code) => Err(MqttError::Refused(code)),
                        CloseReason::ProtocolViolation(why) => Err(MqttError::Protocol(why)),
                        CloseReason::InjectedFault => Err(MqttError::InjectedFault),
                    }));
                }
            }
        }
        Ok(None)
    }

    async fn flush(&mut self) -> Result<(), MqttError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let write = async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        };
        timeout(self.limits.write_timeout, write)
            .await
            .map_err(|_| MqttError::WriteTimeout)??;
        self.wbuf.clear();
        if self.wbuf.capacity() > KEEP_CAPACITY {
            self.wbuf = BytesMut::new();
        }
        Ok(())
    }
}

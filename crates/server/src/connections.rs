//! Connection-level limits of the listeners, so that a client on the open internet cannot hold
//! a connection (a file descriptor and its buffers) for free:
//!
//! * [`Slots`]: a cap on the connections open at once on a listener (HTTPS) or a group of them
//!   (MQTT over TLS and over WebSocket share one). A connection beyond it is closed at once
//!   and counted in `dps_connections_refused_total{listener, reason="limit"}`.
//! * [`serve_http`]: one HTTPS connection (HTTP/1.1 or HTTP/2, by ALPN) served by hyper under
//!   deadlines it does not have itself: the request head (from the end of the TLS handshake for
//!   the first request, from its first byte for the next ones), the idle time between requests
//!   on a kept-alive connection, the request body, and a response write that makes no progress
//!   (a client that stops reading). Limits on header count and header bytes are hyper's own
//!   (`431` on HTTP/1.1).
//!
//! Every closed HTTPS connection is counted in `dps_connections_closed_total{listener, reason}`
//! with a reason from [`CloseReason`]; the open ones in `dps_connections_open{listener}`.

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response};
use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Listener labels of the connection metrics.
pub mod listener {
    /// The HTTPS listener (device, service and admin APIs).
    pub const HTTPS: &str = "https";
    /// The MQTT-over-TLS listener.
    pub const MQTT: &str = "mqtt";
    /// MQTT over WebSocket (upgraded on the HTTPS listener).
    pub const MQTT_WS: &str = "mqtt_ws";
    /// The AMQP-over-TLS listener.
    pub const AMQP: &str = "amqp";
    /// AMQP over WebSocket (upgraded on the HTTPS listener).
    pub const AMQP_WS: &str = "amqp_ws";
}

/// Why a connection was closed (the `reason` label of `dps_connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed it, or it ended after a response (`Connection: close`), or it was
    /// handed over to a WebSocket.
    Closed,
    /// A protocol or I/O error.
    Error,
    /// The request head was over `max_header_count` or `max_header_bytes` (answered `431`).
    HeaderLimit,
    /// The request head did not arrive within `http_header_timeout_ms`.
    HeadTimeout,
    /// No request within `http_idle_timeout_ms` on a kept-alive connection.
    IdleTimeout,
    /// The request body did not arrive within `http_body_timeout_ms` (answered `400`).
    BodyTimeout,
    /// A response write made no progress for `http_body_timeout_ms`.
    WriteTimeout,
    /// A fault injection rule (`drop`) closed it.
    InjectedFault,
}

impl CloseReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Closed => "closed",
            CloseReason::Error => "error",
            CloseReason::HeaderLimit => "header_limit",
            CloseReason::HeadTimeout => "head_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::BodyTimeout => "body_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::InjectedFault => "injected_fault",
        }
    }
}

/// A cap on connections open at once, shared by clones. [`Slots::try_acquire`] hands out a
/// [`Slot`] (released when dropped) or refuses.
#[derive(Clone, Debug)]
pub struct Slots {
    inner: Arc<SlotsInner>,
}

#[derive(Debug)]
struct SlotsInner {
    open: AtomicUsize,
    max: usize,
    /// A gauge set to the shared count (kept for `dps_mqtt_connections`).
    total_gauge: Option<&'static str>,
}

/// One connection's place among [`Slots`]; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<SlotsInner>,
    listener: &'static str,
}

impl Slots {
    /// At most `max` at once.
    pub fn new(max: usize) -> Slots {
        Slots {
            inner: Arc::new(SlotsInner {
                open: AtomicUsize::new(0),
                max,
                total_gauge: None,
            }),
        }
    }

    /// Also keep the gauge `name` set to the number of open connections across every listener
    /// sharing these slots.
    pub fn with_total_gauge(max: usize, name: &'static str) -> Slots {
        Slots {
            inner: Arc::new(SlotsInner {
                open: AtomicUsize::new(0),
                max,
                total_gauge: Some(name),
            }),
        }
    }

    /// A place for a connection on `listener` (a metric label from [`listener`]), or `None`
    /// when the cap is reached (counted as refused).
    pub fn try_acquire(&self, listener: &'static str) -> Option<Slot> {
        let max = self.inner.max;
        match self
            .inner
            .open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            }) {
            Ok(n) => {
                metrics::gauge!("dps_connections_open", "listener" => listener).increment(1.0);
                if let Some(g) = self.inner.total_gauge {
                    metrics::gauge!(g).set((n + 1) as f64);
                }
                Some(Slot {
                    slots: self.inner.clone(),
                    listener,
                })
            }
            Err(_) => {
                metrics::counter!("dps_connections_refused_total", "listener" => listener, "reason" => "limit")
                    .increment(1);
                None
            }
        }
    }

    /// Connections holding a place now.
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::SeqCst)
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.inner.max
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let n = self.slots.open.fetch_sub(1, Ordering::SeqCst) - 1;
        metrics::gauge!("dps_connections_open", "listener" => self.listener).decrement(1.0);
        if let Some(g) = self.slots.total_gauge {
            metrics::gauge!(g).set(n as f64);
        }
    }
}

/// Count a closed connection.
pub fn count_closed(listener: &'static str, reason: CloseReason) {
    metrics::counter!("dps_connections_closed_total", "listener" => listener, "reason" => reason.as_str())
        .increment(1);
}

/// The HTTP limits of one connection (see `docs/configuration.md`, `[limits]`).
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// From the end of the TLS handshake (first request) or the first byte of a request head
    /// (later requests) to the complete head.
    pub header_timeout: Duration,
    /// Between the end of a response and the first byte of the next request.
    pub idle_timeout: Duration,
    /// From the complete head to the end of the request body; also the longest a response
    /// write may stall.
    pub body_timeout: Duration,
    /// Header lines in a request head (HTTP/1.1).
    pub max_headers: usize,
    /// Bytes of a request head, request line included (HTTP/1.1); the header list size
    /// (HTTP/2).
    pub max_header_bytes: usize,
}

impl HttpLimits {
    /// From the configuration.
    pub fn from_config(l: &crate::config::Limits) -> HttpLimits {
        HttpLimits {
            header_timeout: Duration::from_millis(l.http_header_timeout_ms),
            idle_timeout: Duration::from_millis(l.http_idle_timeout_ms),
            body_timeout: Duration::from_millis(l.http_body_timeout_ms),
            max_headers: l.max_header_count,
            max_header_bytes: l.max_header_bytes,
        }
    }
}

/// What the watchdog of a connection knows. Updated by the I/O wrapper ([`Tracked`]) and the
/// service wrapper; a change that can move a deadline earlier wakes the watchdog.
struct ConnState {
    inner: Mutex<StateInner>,
    changed: Notify,
    h2: bool,
}

struct StateInner {
    /// Requests in the service (head received, response not yet produced).
    active: usize,
    /// Requests received so far.
    requests: u64,
    /// When the connection became idle (start, or the last response produced).
    idle_since: Instant,
    /// The first byte read since `idle_since` (HTTP/1.1: a request head has started).
    first_byte: Option<Instant>,
    /// Since when a write or flush has been waiting on the client.
    write_blocked: Option<Instant>,
    /// A request body timed out: the connection is closed after its answer.
    body_timed_out: bool,
    /// A fault injection rule closes the connection now.
    killed: bool,
}

impl ConnState {
    fn new(h2: bool) -> ConnState {
        ConnState {
            inner: Mutex::new(StateInner {
                active: 0,
                requests: 0,
                idle_since: Instant::now(),
                first_byte: None,
                write_blocked: None,
                body_timed_out: false,
                killed: false,
            }),
            changed: Notify::new(),
            h2,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StateInner> {
        // The critical sections cannot panic; recover the data anyway rather than propagate.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn request_started(self: &Arc<Self>) -> ActiveRequest {
        let mut s = self.lock();
        s.active += 1;
        s.requests += 1;
        drop(s);
        self.changed.notify_one();
        ActiveRequest(self.clone())
    }

    fn read_some(&self) {
        if self.h2 {
            return;
        }
        let mut s = self.lock();
        if s.active == 0 && s.first_byte.is_none() {
            s.first_byte = Some(Instant::now());
            drop(s);
            self.changed.notify_one();
        }
    }

    fn write_progress(&self, blocked: bool) {
        let mut s = self.lock();
        let newly_blocked = blocked && s.write_blocked.is_none();
        if newly_blocked {
            s.write_blocked = Some(Instant::now());
        } else if !blocked {
            s.write_blocked = None;
            // HTTP/1.1: a response still being written (slowly, but progressing) keeps the
            // connection from counting as idle. Not on HTTP/2, where the server also writes on
            // its own (PING answers) and a client could keep a connection open with pings.
            if !self.h2 && s.active == 0 && s.first_byte.is_none() && s.requests > 0 {
                s.idle_since = Instant::now();
            }
        }
        drop(s);
        if newly_blocked {
            self.changed.notify_one();
        }
    }

    /// The next deadline and what passing it means.
    fn deadline(&self, l: &HttpLimits) -> Option<(Instant, CloseReason)> {
        let s = self.lock();
        let mut next: Option<(Instant, CloseReason)> = None;
        let mut consider = |at: Instant, why: CloseReason| {
            if next.is_none_or(|(n, _)| at < n) {
                next = Some((at, why));
            }
        };
        if let Some(since) = s.write_blocked {
            consider(since + l.body_timeout, CloseReason::WriteTimeout);
        }
        if s.active == 0 {
            if s.requests == 0 {
                consider(s.idle_since + l.header_timeout, CloseReason::HeadTimeout);
            } else if let Some(first) = s.first_byte {
                consider(first + l.header_timeout, CloseReason::HeadTimeout);
            } else {
                consider(s.idle_since + l.idle_timeout, CloseReason::IdleTimeout);
            }
        }
        next
    }
}

/// A request in the service; dropping it (response produced, or the request abandoned) makes
/// the connection idle when it was the last one.
struct ActiveRequest(Arc<ConnState>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.active -= 1;
        if s.active == 0 {
            s.idle_since = Instant::now();
            s.first_byte = None;
        }
        drop(s);
        self.0.changed.notify_one();
    }
}

/// The connection's byte stream, reporting reads and stalled writes to its [`ConnState`].
struct Tracked<S> {
    io: S,
    state: Arc<ConnState>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.read_some();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        self.state.write_progress(r.is_pending());
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.state.write_progress(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.state.write_progress(r.is_pending());
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The error a request body yields when it does not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(pub Duration);

/// A request body with a deadline: past it, the body yields [`BodyTimeout`] and flags the
/// request.
struct TimedBody {
    inner: hyper::body::Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    timed_out: Arc<AtomicBool>,
    done: bool,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(r)) => Poll::Ready(Some(r.map_err(Into::into))),
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    self.done = true;
                    self.timed_out.store(true, Ordering::SeqCst);
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout(self.limit)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Closes the HTTPS connection a request came on, at once (fault injection `drop`): handed to
/// the handler as a request extension.
#[derive(Clone)]
pub struct ConnKill(Arc<ConnState>);

impl ConnKill {
    /// Close the connection (whatever was flushed so far is all the client gets).
    pub fn kill(&self) {
        self.0.lock().killed = true;
        self.0.changed.notify_one();
    }
}

impl std::fmt::Debug for ConnKill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnKill")
    }
}

/// Serve one HTTPS connection (after the TLS handshake) until it ends or a deadline passes.
/// `h2` selects HTTP/2 (ALPN `h2`), otherwise HTTP/1.1 with upgrades (WebSocket). `handler`
/// answers each request; a request whose body timed out is answered `400` (errorCode 400004)
/// instead of the handler's answer, and on HTTP/1.1 the connection is closed after it.
/// Returns why the connection ended (also counted in `dps_connections_closed_total`).
pub async fn serve_http<S, H, Fut>(
    io: S,
    h2: bool,
    limits: &HttpLimits,
    listener_label: &'static str,
    handler: H,
) -> CloseReason
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let state = Arc::new(ConnState::new(h2));
    let io = TokioIo::new(Tracked {
        io,
        state: state.clone(),
    });
    let svc = {
        let state = state.clone();
        let body_timeout = limits.body_timeout;
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let active = state.request_started();
            let state = state.clone();
            let handler = handler.clone();
            async move {
                let timed_out = Arc::new(AtomicBool::new(false));
                let kill = ConnKill(state.clone());
                let mut req = req.map(|inner| {
                    Body::new(TimedBody {
                        inner,
                        deadline: Box::pin(tokio::time::sleep(body_timeout)),
                        limit: body_timeout,
                        timed_out: timed_out.clone(),
                        done: false,
                    })
                });
                req.extensions_mut().insert(kill);
                let mut resp = handler(req).await;
                if timed_out.load(Ordering::SeqCst) {
                    resp = crate::http::err(&dps_core::Error::invalid(format!(
                        "the request body did not arrive within {} ms",
                        body_timeout.as_millis()
                    )));
                    if !state.h2 {
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    state.lock().body_timed_out = true;
                }
                drop(active);
                Ok::<_, std::convert::Infallible>(resp)
            }
        })
    };
    let conn: Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>> = if h2 {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        Box::pin(b.serve_connection(io, svc))
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.max_headers(limits.max_headers)
            .max_header_size(limits.max_header_bytes)
            // The read buffer bounds an incomplete head too (hyper's minimum is 8 KiB).
            .max_buf_size(limits.max_header_bytes.max(8192));
        Box::pin(b.serve_connection(io, svc).with_upgrades())
    };
    let reason = watch(conn, &state, limits).await;
    let reason = if reason == CloseReason::Closed && state.lock().body_timed_out {
        CloseReason::BodyTimeout
    } else {
        reason
    };
    count_closed(listener_label, reason);
    reason
}

/// Drive `conn` until it ends or the connection's next deadline passes (then drop it, which
/// closes the socket).
async fn watch(
    mut conn: Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>>,
    state: &ConnState,
    limits: &HttpLimits,
) -> CloseReason {
    loop {
        let next = state.deadline(limits);
        let expired = async {
            match next {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut conn => {
                return match r {
                    Ok(()) => CloseReason::Closed,
                    Err(e) if e.is_parse_too_large() => CloseReason::HeaderLimit,
                    Err(e) => {
                        tracing::debug!(error = %e, "HTTP connection ended with an error");
                        CloseReason::Error
                    }
                };
            }
            () = state.changed.notified() => {
                if state.lock().killed {
                    return CloseReason::InjectedFault;
                }
            }
            () = expired => {
                if let Some((at, why)) = state.deadline(limits) {
                    if at <= Instant::now() {
                        return why;
                    }
                }
            }
        }
    }
}

/// MQTT and AMQP over WebSocket settings, handed to the upgrade handler as a request
/// extension.
#[derive(Clone, Debug)]
pub struct WsSettings {
    /// The MQTT connection cap (shared with the MQTT-over-TLS listener).
    pub slots: Slots,
    /// The AMQP connection cap (shared with the AMQP-over-TLS listener).
    pub amqp_slots: Slots,
    /// Largest WebSocket message and frame (bytes).
    pub max_message_bytes: usize,
}

/// An upgraded WebSocket as one byte stream, for the MQTT and AMQP device endpoints: packets
/// and frames may be split across binary messages or share one, so the binary payloads are
/// read and written as a stream. Ping/pong is answered by the library, text messages are
/// skipped, and the stream ends at a close message; each write goes out as a binary message.
pub(crate) fn websocket_bytes(
    socket: axum::extract::ws::WebSocket,
) -> impl AsyncRead + AsyncWrite + Unpin + Send {
    use axum::extract::ws::Message;
    use futures::{SinkExt, StreamExt};
    use tokio_util::io::{CopyToBytes, SinkWriter, StreamReader};
    let (sink, stream) = socket.split();
    let stream = stream
        .take_while(|m| futures::future::ready(!matches!(m, Ok(Message::Close(_)))))
        .filter_map(|m| async move {
            match m {
                Ok(Message::Binary(b)) => Some(Ok(b)),
                Ok(_) => None,
                Err(e) => Some(Err(std::io::Error::other(e))),
            }
        });
    let sink = sink
        .with(|b: Bytes| async move { Ok::<_, axum::Error>(Message::Binary(b)) })
        .sink_map_err(std::io::Error::other);
    tokio::io::join(
        StreamReader::new(Box::pin(stream)),
        SinkWriter::new(CopyToBytes::new(Box::pin(sink))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_refuse_beyond_the_cap_and_free_on_drop() {
        let s = Slots::new(2);
        let a = s.try_acquire(listener::HTTPS).expect("first");
        let b = s.try_acquire(listener::HTTPS).expect("second");
        assert!(s.try_acquire(listener::HTTPS).is_none());
        assert_eq!(s.open(), 2);
        drop(a);
        let c = s.try_acquire(listener::HTTPS).expect("freed");
        assert_eq!(s.open(), 2);
        drop((b, c));
        assert_eq!(s.open(), 0);
    }

    fn limits() -> HttpLimits {
        HttpLimits {
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(5),
            max_headers: 100,
            max_header_bytes: 16384,
        }
    }

    #[tokio::test]
    async fn deadlines_follow_the_connection_state() {
        let l = limits();
        let st = Arc::new(ConnState::new(false));
        let (at, why) = st.deadline(&l).unwrap();
        assert_eq!(why, CloseReason::HeadTimeout);
        assert!(at <= Instant::now() + l.header_timeout);
        let req = st.request_started();
        assert!(
            st.deadline(&l).is_none(),
            "no deadline while a request is served"
        );
        drop(req);
        assert_eq!(st.deadline(&l).unwrap().1, CloseReason::IdleTimeout);
        st.read_some();
        assert_eq!(st.deadline(&l).unwrap().1, CloseReason::HeadTimeout);
        st.write_progress(true);
        let req = st.request_started();
        assert_eq!(st.deadline(&l).unwrap().1, CloseReason::WriteTimeout);
        st.write_progress(false);
        drop(req);
        assert_eq!(st.deadline(&l).unwrap().1, CloseReason::IdleTimeout);
    }
}

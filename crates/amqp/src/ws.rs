//! AMQP over WebSocket: adapt a stream/sink of binary WebSocket message payloads into a byte
//! stream and run [`serve_connection`] on it unchanged.
//!
//! AMQP frames may be split across binary messages or several may share one (AMQP WebSocket
//! binding, subprotocol `AMQPWSB10`), so the payloads are treated as one byte stream.

use crate::{serve_connection, AmqpError, AmqpLimits};
use bytes::Bytes;
use dps_core::device::{DeviceService, Transport};
use futures::{Sink, SinkExt, Stream, StreamExt};
use std::io;
use std::sync::Arc;
use tokio_util::io::{CopyToBytes, SinkWriter, StreamReader};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serve one AMQP-over-WebSocket connection.
///
/// * `stream` yields the payloads of the client's **binary** messages, in order. The caller
///   maps its WebSocket library's messages: skip ping/pong (the library answers pings), end
///   the stream on a close message, and either skip text messages or turn them into an error.
/// * `sink` takes the payloads to send; the caller wraps each in a binary message
///   (e.g. `sink.with(|b| async { Ok(Message::Binary(b)) })`).
/// * Everything else is as for [`serve_connection`] (use [`Transport::AmqpWs`]).
///
/// With axum 0.8 (the upgrade selects the `AMQPWSB10` subprotocol):
/// ```ignore
/// let (sink, stream) = socket.split();
/// let stream = stream.filter_map(|m| async move {
///     match m {
///         Ok(Message::Binary(b)) => Some(Ok(b)),
///         Ok(Message::Close(_)) => None, // then the stream ends below
///         Ok(_) => None,
///         Err(e) => Some(Err(e)),
///     }
/// });
/// let sink = sink.with(|b: Bytes| async move { Ok::<_, axum::Error>(Message::Binary(b)) });
/// dps_amqp::serve_ws_messages(Box::pin(stream), Box::pin(sink), peer, certs, Transport::AmqpWs, svc, limits).await
/// ```
/// (To stop at a close message use `take_while` before `filter_map`.)
pub async fn serve_ws_messages<St, Si, B, E>(
    stream: St,
    sink: Si,
    peer: Option<std::net::IpAddr>,
    peer_certs: Vec<Vec<u8>>,
    transport: Transport,
    service: Arc<dyn DeviceService>,
    limits: AmqpLimits,
) -> Result<(), AmqpError>
where
    St: Stream<Item = Result<B, E>> + Unpin + Send,
    B: Into<Bytes>,
    E: Into<BoxError>,
    Si: Sink<Bytes> + Unpin + Send,
    Si::Error: Into<BoxError>,
{
    let reader = StreamReader::new(stream.map(|r| r.map(Into::into).map_err(io::Error::other)));
    let writer = SinkWriter::new(CopyToBytes::new(sink.sink_map_err(io::Error::other)));
    serve_connection(
        tokio::io::join(reader, writer),
        peer,
        peer_certs,
        transport,
        service,
        limits,
    )
    .await
}

//! dps-mqtt: the MQTT 3.1.1 device endpoint of dps, over any
//! [`DeviceService`](dps_core::device::DeviceService).
//!
//! DPS is not a broker: every connection is one device talking to the provisioning service
//! (protocol digest §4). This crate translates MQTT into
//! [`DeviceRequest`](dps_core::device::DeviceRequest)s and renders the
//! [`DeviceResponse`](dps_core::device::DeviceResponse) or
//! [`WireError`](dps_core::wire::WireError) on the response topic of *that* connection only.
//! It holds no registration logic.
//!
//! # Layers
//! * [`topic`]: username / request-topic / response-topic parsing and formatting.
//! * [`codec`]: framing over `rumqttc::mqttbytes::v4` with the size check on the fixed header
//!   and a CONNECT protocol pre-check (MQTT 3.1 and 5 get CONNACK 1).
//! * [`session`]: the I/O-free state machine ([`Session`]), fed decoded packets, answering
//!   with [`Action`]s. Tested without sockets.
//! * [`serve_connection`]: the async driver for a TLS (or any) byte stream;
//!   [`serve_ws_messages`]: the same over WebSocket binary messages.
//!
//! # Behaviour
//! * CONNECT: client id = registration id; username
//!   `{idScope}/registrations/{registrationId}/api-version=..[&ClientVersion=..]`; the username's
//!   registration id must equal the client id (ASCII case-insensitively), else CONNACK 4; a bad
//!   username gives CONNACK 4. Password = SAS token; no password means X.509 (the TLS chain is
//!   the credential). `authorize_connect` refusals map to CONNACK 4/5/3 (3 also when the check
//!   outlives the connect timeout). Clean session 0 and 1 are both accepted; session-present is
//!   always 0.
//! * SUBSCRIBE `$dps/registrations/res/#` is granted at min(requested, 1); other filters get 0x80.
//!   UNSUBSCRIBE is acknowledged.
//! * PUBLISH register / operation-status: QoS 0 or 1 (QoS 2 closes the connection). For QoS 1
//!   the PUBACK is always written before the response. A register body that is not JSON gets a
//!   `res/400` (errorCode 400004); poll bodies are ignored. A status poll without `operationId`
//!   gets `res/400`. **Unknown topics**: answered `res/404` (errorCode 404000) when the topic has a
//!   `$rid`, otherwise ignored (after the PUBACK).
//! * Responses: `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`, `$rid` echoed
//!   byte for byte; `retry-after` is the service's value or, on 202/429/5xx without one,
//!   [`session::DEFAULT_RETRY_AFTER`]. QoS = granted subscription QoS; a device that publishes
//!   before subscribing (or after unsubscribing) is still answered, at QoS 1. Bodies are the
//!   HTTPS JSON (error bodies with a fresh uuid tracking id and an Azure timestamp).
//! * Keep-alive: PINGREQ → PINGRESP; the connection is dropped after 1.5 × keep-alive without a
//!   packet, after [`MqttLimits::idle_timeout`] without anything but pings/acks, and when
//!   CONNECT does not arrive within [`MqttLimits::connect_timeout`].
//! * Requests run concurrently up to [`MqttLimits::max_inflight`] per connection; beyond that
//!   the connection stops reading (TCP backpressure). Answers may come out of request order;
//!   `$rid` correlates them.
//!
//! # Memory per idle connection (documented estimate)
//! An idle, connected device costs: the driver future and [`Session`] (≈ 0.5 KB: state, ids,
//! api-version, SAS token or certificate chain — the chain is the largest item, ~1–3 KB for
//! X.509 devices), the read buffer (≤ 1 KB reserved while waiting; grown only to the size of an
//! actual packet and released back to 0 once it exceeds 4 KB and is drained), and an empty write
//! buffer (released after each flush if it grew beyond 4 KB). So ≈ 2 KB for SAS devices and
//! ≈ 3–5 KB for X.509 devices, plus whatever the server's TLS/WebSocket layer holds (rustls keeps
//! its own buffers, typically the dominant ~ tens of KB) and the tokio task. 10,000 idle
//! connections therefore cost ~20–50 MB in this crate.

pub mod codec;
mod conn;
mod fuzz;
pub mod session;
pub mod topic;
mod ws;

pub use conn::serve_connection;
pub use dps_core::device::Transport;
pub use fuzz::fuzz_entry;
pub use session::{Action, CallOutcome, CloseReason, ServiceCall, Session};
pub use ws::serve_ws_messages;

use std::time::Duration;

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct MqttLimits {
    /// Largest accepted packet remaining length in bytes (checked on the fixed header, before the
    /// body is buffered). Default: Azure's 96 KB message limit plus 4 KB for topic and headers.
    pub max_packet_size: usize,
    /// Service calls running concurrently per connection (at least 1).
    pub max_inflight: usize,
    /// Time allowed from accept to a CONNECT (and its credential check).
    pub connect_timeout: Duration,
    /// Disconnect after this long without a packet other than PINGREQ/PUBACK (also the bound
    /// when the client's keep-alive is 0).
    pub idle_timeout: Duration,
    /// Time allowed to write and flush one batch of packets (a client that stops reading).
    pub write_timeout: Duration,
}

impl Default for MqttLimits {
    fn default() -> Self {
        MqttLimits {
            max_packet_size: 96 * 1024 + 4 * 1024,
            max_inflight: 8,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The MQTT codec rejected the bytes.
    #[error("malformed packet: {0}")]
    Decode(rumqttc::mqttbytes::Error),
    /// A packet larger than [`MqttLimits::max_packet_size`].
    #[error("packet of {0} bytes exceeds the limit")]
    PacketTooLarge(usize),
    /// The client broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// CONNECT was refused (the CONNACK was sent).
    #[error("connect refused: {0:?}")]
    Refused(rumqttc::mqttbytes::v4::ConnectReturnCode),
    /// No CONNECT in time.
    #[error("no CONNECT within the connect timeout")]
    ConnectTimeout,
    /// Nothing from the client for 1.5 × keep-alive.
    #[error("keep-alive timeout")]
    KeepAliveTimeout,
    /// Only pings for [`MqttLimits::idle_timeout`].
    #[error("idle timeout")]
    IdleTimeout,
    /// The client did not read our packets in time.
    #[error("write timeout")]
    WriteTimeout,
    /// A fault injection rule (`drop`) closed the connection.
    #[error("closed by an injected fault")]
    InjectedFault,
}

//! dps-amqp: the AMQP 1.0 device endpoint of dps, over any
//! [`DeviceService`](dps_core::device::DeviceService) (protocol digest §5).
//!
//! Each connection is one device. This crate translates AMQP into
//! [`DeviceRequest`](dps_core::device::DeviceRequest)s and renders the
//! [`DeviceResponse`](dps_core::device::DeviceResponse) or
//! [`WireError`](dps_core::wire::WireError) as the SDKs expect; it holds no registration logic.
//!
//! # Implementation choice
//! The AMQP type system and codec come from `fe2o3-amqp-types` / `serde_amqp` (performatives,
//! SASL frames, message sections, error conditions): no hand-written AMQP types. The connection
//! state machine is ours, in one task per connection, because DPS needs things a general
//! broker/acceptor does not give: an asynchronous credential check *inside* SASL (the outcome
//! code must say whether the SAS token is valid), both protocol headers (SASL and the X.509
//! devices' plain `AMQP 0 1 0 0`), bounded frames before authentication, and a single small
//! task per idle connection. See docs/CONTRACTS.md.
//!
//! # Layers
//! * [`frame`]: protocol headers and the frame header, size-checked before buffering.
//! * [`address`]: link addresses in the SDKs' three forms, SASL PLAIN.
//! * [`sasl`]: the mechanisms, and [`sasl::tpm`], the payloads of the `TPM` mechanism.
//! * [`message`]: request parsing and response / rejection building.
//! * [`serve_connection`]: the async driver, over TLS or over WebSocket binary messages
//!   (subprotocol `AMQPWSB10`; the server turns the messages into one byte stream).
//!
//! # Behaviour
//! * Header `AMQP 3 1 0 0`: SASL with `PLAIN` (SAS token, checked before the outcome: `auth`
//!   when refused, `sys-temp` when the store is unavailable), `TPM` (the EK, the SRK, the
//!   activation blob in 400-byte segment challenges, the SAS token signed in the TPM, checked
//!   like PLAIN's: protocol digest §6.5.6), `EXTERNAL` / `ANONYMOUS` (the TLS
//!   client certificate; `auth` without one). Header `AMQP 0 1 0 0`: accepted with a client
//!   certificate (X.509 without SASL); without one we answer `AMQP 3 1 0 0` and close.
//! * Sessions up to [`AmqpLimits::max_sessions`], links up to [`AmqpLimits::max_links`] each.
//!   Link addresses must be `{idScope}/registrations/{registrationId}` (bare, `/`-prefixed or
//!   `amqps://host/...`); others are refused (attach with a null terminus, then detach with
//!   `amqp:not-found`); with SASL PLAIN they must name the authenticated registration
//!   (`amqp:unauthorized-access`).
//! * Requests: `iotdps-operation-type` `iotdps-register` (data-section JSON body,
//!   `iotdps-forceRegistration`) or `iotdps-get-operationstatus` (`iotdps-operation-id`; body
//!   ignored). Each is settled `accepted` and answered on the device's receiver link with
//!   `correlation-id` copied, `iotdps-operation-type`, `iotdps-status`, `retry-after` and
//!   `Retry-After` (202: the service's value or 3 s), and one data section; errors are settled
//!   `rejected` (condition by status, description = the error JSON, `info` with both
//!   retry-after keys on 429/5xx).
//! * Limits: frames ≤ [`PRE_OPEN_MAX_FRAME`] before OPEN and ≤ [`AmqpLimits::max_frame_size`]
//!   after; messages ≤ [`AmqpLimits::max_message_size`]; header, SASL and OPEN within
//!   [`AmqpLimits::open_timeout`]; closed after [`AmqpLimits::idle_timeout`] without a request.
//!
//! # Memory per idle connection (estimate; measured figures are in docs/benchmarks.md)
//! The driver future with its session/link maps (≈ 1 KB for one session and two links), the
//! credential (SAS token ≈ 0.3 KB, or the certificate chain 1–3 KB), a read buffer of at most
//! 1 KB while waiting and an empty write buffer; plus the TLS or WebSocket layer below.

pub mod address;
mod conn;
pub mod frame;
pub mod message;
pub mod sasl;

pub use conn::{retry_after_for, serve_connection, PRE_OPEN_MAX_FRAME};
pub use dps_core::device::Transport;

use std::time::Duration;

/// `retry-after` (seconds) on 202, 429 and 5xx when the service gave none.
pub const DEFAULT_RETRY_AFTER: u32 = 3;

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct AmqpLimits {
    /// max-frame-size we announce in OPEN and enforce afterwards (bytes, ≥ 512).
    pub max_frame_size: u32,
    /// Largest request message (all its transfer frames together).
    pub max_message_size: usize,
    /// Time allowed from accept to the end of OPEN (protocol header, SASL, credential check).
    pub open_timeout: Duration,
    /// Close after this long without a request.
    pub idle_timeout: Duration,
    /// Time allowed to write and flush (a client that stops reading).
    pub write_timeout: Duration,
    /// Requests running concurrently per connection (beyond: reading pauses).
    pub max_inflight: usize,
    /// Sessions per connection (channel-max + 1).
    pub max_sessions: u16,
    /// Links per session.
    pub max_links: usize,
    /// Link credit given on the device's sender link (renewed when half is used).
    pub link_credit: u32,
}

impl Default for AmqpLimits {
    fn default() -> Self {
        AmqpLimits {
            max_frame_size: 64 * 1024,
            max_message_size: 96 * 1024 + 4 * 1024,
            open_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(30),
            max_inflight: 8,
            max_sessions: 4,
            max_links: 8,
            link_credit: 100,
        }
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Framing error.
    #[error("framing: {0}")]
    Frame(#[from] frame::FrameError),
    /// A performative or SASL frame that does not decode.
    #[error("decode: {0}")]
    Codec(#[from] serde_amqp::Error),
    /// The client broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// A per-connection limit was exceeded.
    #[error("limit exceeded: {0}")]
    Limit(&'static str),
    /// SASL refused the client (the outcome code was sent).
    #[error("SASL refused with code {0}")]
    Refused(u8),
    /// Plain AMQP without a client certificate.
    #[error("no SASL and no client certificate")]
    SaslRequired,
    /// Header, SASL and OPEN did not complete in time.
    #[error("open timeout")]
    OpenTimeout,
    /// No request for the idle timeout.
    #[error("idle timeout")]
    IdleTimeout,
    /// The client did not read in time.
    #[error("write timeout")]
    WriteTimeout,
    /// A fault injection rule (`drop`) closed the connection.
    #[error("closed by an injected fault")]
    InjectedFault,
}

//! dps-device: a Rust device client for Azure-compatible Device Provisioning Services.
//!
//! Azure ships no supported Rust provisioning client; this is ours. It speaks the DPS device API
//! over **HTTPS**, **MQTT 3.1.1** and **AMQP 1.0** (all over TLS, rustls with the aws-lc-rs provider), and
//! authenticates with an individual **symmetric key**, a **group key** (the device key is derived
//! from it as Azure does), or an **X.509** certificate chain. It polls with the service's
//! `retry-after`, retries throttling (429) and 5xx answers a bounded number of times, and
//! returns typed errors ([`Error`]) that say why a device was not assigned.
//!
//! It works against dps and against Azure IoT Hub DPS alike.
//!
//! Over MQTT it sends CONNECT, SUBSCRIBE and the register PUBLISH in one flight (MQTT 3.1.1
//! §3.1.4 lets a client send packets right after CONNECT, and a server that refuses the CONNECT
//! must not process them): a registration takes the TLS handshake and one round trip, where the
//! Azure SDKs wait for CONNACK and SUBACK first (two more round trips; 600 ms on a 300 ms
//! cellular link).
//!
//! # Example
//!
//! ```no_run
//! use dps_device::{Auth, ProvisioningClient, Transport, Trust};
//!
//! # async fn run() -> Result<(), dps_device::Error> {
//! let client = ProvisioningClient::builder()
//!     .global_endpoint("localhost:8443")
//!     .id_scope("0ne00000A0A")
//!     .registration_id("sensor-001")
//!     .auth(Auth::SymmetricKey("Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=".into()))
//!     .transport(Transport::Https)
//!     .trust(Trust::pem_file("dps-data/ca.pem")?)
//!     .payload(serde_json::json!({"site": "plant-7"}))
//!     .build()?;
//! match client.register().await {
//!     Ok(r) => println!(
//!         "assigned to {} as {}",
//!         r.assigned_hub().unwrap_or("?"),
//!         r.device_id().unwrap_or("?")
//!     ),
//!     Err(dps_device::Error::Unauthorized { message, .. }) => eprintln!("wrong key: {message}"),
//!     Err(e) => eprintln!("not assigned: {e}"),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! For many registrations over one kept-alive connection (load generators), use
//! [`ProvisioningClient::https_session`] and [`HttpsSession::register_once`]. For many clients,
//! prepare the TLS settings once with [`ClientTls::new`] and give them to every builder with
//! [`ProvisioningClientBuilder::tls`]; [`ProvisioningClientBuilder::connect_addrs`] skips the
//! name resolution, and [`ProvisioningClientBuilder::local_address`] gives each simulated
//! device a source address of its own.
//!
//! Every [`RegistrationResult`] carries a [`Timing`]: the time from the first byte sent to the
//! final answer, and how many register attempts and polls it took.

pub mod amqp;
mod amqp_flight;
mod client;
mod error;
mod https;
mod mqtt;
pub mod tls;
pub mod tpm;
pub mod wire;

pub use client::{
    split_host_port, Auth, PollPolicy, ProvisioningClient, ProvisioningClientBuilder,
    RegistrationResult, Timing, Transport,
};
pub use dps_core::model::{DeviceRegistrationState, RegistrationStatus, Substatus};
pub use error::Error;
pub use https::HttpsSession;
pub use tls::{ClientTls, Trust};

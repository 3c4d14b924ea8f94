//! Memory of idle AMQP device connections (not a timed test).
//!
//! ```text
//! (needs about N + 100 open files in both processes; check `ulimit -n`)
//! cargo bench -p dps --bench amqp_idle -- [--connections N]
//! ```
//! Starts the real `dps serve` binary as a separate process (so its memory is its own), opens N
//! AMQP-over-TLS connections the way a device does (fresh TLS 1.3 handshake each, SASL PLAIN with
//! a valid SAS token of a group device, OPEN, BEGIN, the receiver and sender links on the
//! registration address) and leaves them idle, then reads the server's resident set size
//! (VmRSS) before and after. Prints one JSON line.

use dps_device::amqp::AmqpDeviceConnection;

mod idle;
fn main() {
    idle::run("amqp", connect);
}

/// SASL PLAIN with the SAS token, OPEN, BEGIN, both links.
async fn connect(d: idle::Device) -> Option<AmqpDeviceConnection> {
    let address = format!("{}/registrations/{}", idle::SCOPE, d.rid);
    AmqpDeviceConnection::open_on(d.stream, "localhost", "2019-03-31", &address, Some(d.sas))
        .await
        .ok()
}

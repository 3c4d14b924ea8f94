//! Memory of idle MQTT device connections (not a timed test).
//!
//! ```text
//! (needs about N + 100 open files in both processes; check `ulimit -n`)
//! cargo bench -p dps --bench mqtt_idle -- [--connections N]
//! ```
//! Starts the real `dps serve` binary as a separate process (so its memory is its own), opens N
//! MQTT-over-TLS connections (fresh TLS 1.3 handshake each, CONNECT with a valid SAS token of a
//! group device, SUBSCRIBE `$dps/registrations/res/#`) and leaves them idle, then reads the
//! server's resident set size (VmRSS) before and after. Prints one JSON line.

use rumqttc::mqttbytes::v4::{Connect, Packet, Subscribe};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod idle;

fn main() {
    idle::run("mqtt", connect);
}

/// CONNECT with the SAS token, wait for CONNACK 0, SUBSCRIBE, wait for SUBACK.
async fn connect(
    d: idle::Device,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let (mut s, rid, sas, scope) = (d.stream, d.rid.as_str(), d.sas, idle::SCOPE);
    let mut c = Connect::new(rid);
    c.keep_alive = 600;
    c.set_login(
        format!("{scope}/registrations/{rid}/api-version=2019-03-31"),
        sas,
    );
    let mut buf = bytes::BytesMut::new();
    c.write(&mut buf).ok()?;
    Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce)
        .write(&mut buf)
        .ok()?;
    s.write_all(&buf).await.ok()?;
    let mut got = bytes::BytesMut::new();
    let mut connack = false;
    let mut suback = false;
    while !(connack && suback) {
        let mut chunk = [0u8; 256];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&chunk[..n]);
        while let Ok(p) = Packet::read(&mut got, 1024) {
            match p {
                Packet::ConnAck(a)
                    if a.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success =>
                {
                    connack = true
                }
                Packet::ConnAck(_) => return None,
                Packet::SubAck(_) => suback = true,
                _ => {}
            }
        }
    }
    Some(s)
}

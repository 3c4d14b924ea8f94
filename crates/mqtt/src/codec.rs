//! Framing over `rumqttc::mqttbytes::v4`: size check on the fixed header (before the body is
//! buffered), a protocol-level pre-check of CONNECT (so MQTT 3.1 / 5 get CONNACK 1 rather than
//! a dropped connection), and decoding that never panics.

use crate::MqttError;
use bytes::{Buf, BytesMut};
use rumqttc::mqttbytes::{self, v4::Packet, PacketType};

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A packet.
    Packet(Packet),
    /// A CONNECT with a protocol name/level other than `MQTT`/4 (answer CONNACK 1, close).
    UnsupportedProtocol,
}

/// Result of trying to decode the front of the buffer.
#[derive(Debug)]
pub enum Decoded {
    /// A frame was consumed from the buffer.
    Frame(Frame),
    /// More bytes are needed; the hint says at least how many.
    NeedMore(usize),
}

/// Length of the fixed header (type byte + 1..4 remaining-length bytes) of a complete frame.
fn fixed_header_len(frame: &[u8]) -> usize {
    1 + frame
        .iter()
        .skip(1)
        .take(4)
        .position(|b| b & 0x80 == 0)
        .map_or(4, |p| p + 1)
}

/// Decode one frame from the front of `buf`. `max_packet_size` bounds the remaining length and
/// is checked as soon as the fixed header is complete. `expect_connect` is true until the
/// CONNECT has been seen: then the first packet must be a CONNECT and its protocol is
/// checked before rumqttc parses it.
pub fn decode(
    buf: &mut BytesMut,
    max_packet_size: usize,
    expect_connect: bool,
) -> Result<Decoded, MqttError> {
    let header = match mqttbytes::check(buf.iter(), max_packet_size) {
        Ok(h) => h,
        Err(mqttbytes::Error::InsufficientBytes(n)) => return Ok(Decoded::NeedMore(n)),
        Err(mqttbytes::Error::PayloadSizeLimitExceeded(n)) => {
            return Err(MqttError::PacketTooLarge(n))
        }
        Err(e) => return Err(MqttError::Decode(e)),
    };
    let len = header.frame_length();
    let packet_type = header.packet_type().map_err(MqttError::Decode)?;
    if expect_connect {
        if packet_type != PacketType::Connect {
            return Err(MqttError::Protocol("first packet must be CONNECT"));
        }
        let frame = &buf[..len];
        let body = &frame[fixed_header_len(frame).min(len)..];
        match connect_protocol(body) {
            Some((name, 4)) if name == b"MQTT" => {}
            Some((name, _)) if name == b"MQTT" || name == b"MQIsdp" => {
                buf.advance(len);
                return Ok(Decoded::Frame(Frame::UnsupportedProtocol));
            }
            _ => return Err(MqttError::Protocol("malformed CONNECT")),
        }
    } else if packet_type == PacketType::Connect {
        return Err(MqttError::Protocol("second CONNECT"));
    }
    // rumqttc's decoders are bounds-checked; the unwind guard is defence in depth so that a
    // decoder bug only ever closes one connection.
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Packet::read(buf, max_packet_size)
    }));
    match read {
        Ok(Ok(p)) => Ok(Decoded::Frame(Frame::Packet(p))),
        Ok(Err(e)) => Err(MqttError::Decode(e)),
        Err(_) => Err(MqttError::Protocol("decoder panicked")),
    }
}

/// Protocol name and level of a CONNECT's variable header.
fn connect_protocol(body: &[u8]) -> Option<(&[u8], u8)> {
    let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let name = body.get(2..2 + n)?;
    let level = *body.get(2 + n)?;
    Some((name, level))
}

/// Append the encoding of `packet` to `out`.
pub fn encode(packet: &Packet, out: &mut BytesMut) -> Result<(), MqttError> {
    packet
        .write(out, usize::MAX)
        .map(|_| ())
        .map_err(MqttError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::{Connect, PingReq};

    fn connect_bytes(level: u8, name: &str) -> BytesMut {
        let mut b = BytesMut::new();
        Packet::Connect(Connect::new("dev"))
            .write(&mut b, usize::MAX)
            .unwrap();
        // Patch the protocol name/level (same length names only) for the tests.
        if name.len() == 4 {
            b[4..8].copy_from_slice(name.as_bytes());
        }
        b[8] = level;
        b
    }

    #[test]
    fn protocol_levels() {
        let mut b = connect_bytes(4, "MQTT");
        assert!(matches!(
            decode(&mut b, 1024, true).unwrap(),
            Decoded::Frame(Frame::Packet(Packet::Connect(_)))
        ));
        assert!(b.is_empty());
        for level in [3, 5, 0] {
            let mut b = connect_bytes(level, "MQTT");
            assert!(matches!(
                decode(&mut b, 1024, true).unwrap(),
                Decoded::Frame(Frame::UnsupportedProtocol)
            ));
        }
        let mut b = connect_bytes(4, "XXXX");
        assert!(decode(&mut b, 1024, true).is_err());
    }

    #[test]
    fn first_packet_must_be_connect() {
        let mut b = BytesMut::new();
        PingReq.write(&mut b).unwrap();
        assert!(decode(&mut b, 1024, true).is_err());
    }

    #[test]
    fn size_checked_on_header() {
        // PUBLISH claiming 200 KB, only the header present.
        let mut b = BytesMut::from(&[0x30u8, 0xc0, 0x9a, 0x0c][..]);
        assert!(matches!(
            decode(&mut b, 1000, false),
            Err(MqttError::PacketTooLarge(_))
        ));
        let mut b = BytesMut::from(&[0x30u8][..]);
        assert!(matches!(
            decode(&mut b, 1000, false).unwrap(),
            Decoded::NeedMore(_)
        ));
    }
}

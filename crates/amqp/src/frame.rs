//! AMQP 1.0 framing (spec §2.3): the 8-byte protocol headers and the frame header
//! (`size:u32 doff:u8 type:u8 channel:u16`), with the size checked before a frame is buffered.
//! The frame bodies are encoded and decoded with `fe2o3-amqp-types` / `serde_amqp`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fe2o3_amqp_types::performatives::Performative;
use serde::Serialize;

/// `AMQP 0 1 0 0`: plain AMQP.
pub const HEADER_AMQP: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// `AMQP 3 1 0 0`: SASL security layer.
pub const HEADER_SASL: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// `AMQP 2 1 0 0`: TLS security layer (not offered: TLS is below AMQP here).
pub const HEADER_TLS: [u8; 8] = *b"AMQP\x02\x01\x00\x00";

/// Frame type of AMQP frames.
pub const TYPE_AMQP: u8 = 0;
/// Frame type of SASL frames.
pub const TYPE_SASL: u8 = 1;

/// The smallest max-frame-size a peer may announce (spec `MIN-MAX-FRAME-SIZE`).
pub const MIN_MAX_FRAME_SIZE: u32 = 512;

/// Which protocol header a peer sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolHeader {
    /// `AMQP 0 1 0 0`.
    Amqp,
    /// `AMQP 3 1 0 0`.
    Sasl,
    /// `AMQP 2 1 0 0`.
    Tls,
    /// Anything else (another version, or not AMQP).
    Other,
}

impl ProtocolHeader {
    /// Classify 8 bytes.
    pub fn parse(b: &[u8; 8]) -> ProtocolHeader {
        match *b {
            HEADER_AMQP => ProtocolHeader::Amqp,
            HEADER_SASL => ProtocolHeader::Sasl,
            HEADER_TLS => ProtocolHeader::Tls,
            _ => ProtocolHeader::Other,
        }
    }
}

/// One decoded frame: its type, channel and body (performative plus payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// [`TYPE_AMQP`] or [`TYPE_SASL`].
    pub frame_type: u8,
    /// Channel (AMQP frames; ignored for SASL).
    pub channel: u16,
    /// Frame body after the extended header; empty for heartbeats.
    pub body: Bytes,
}

/// Result of [`decode`].
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Not enough bytes yet; at least this many are needed in total.
    NeedMore(usize),
    /// A complete frame (removed from the buffer).
    Frame(RawFrame),
}

/// Framing errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// A frame larger than the current limit.
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Announced size.
        size: usize,
        /// Limit in force.
        limit: usize,
    },
    /// Size or data offset that cannot be right.
    #[error("malformed frame header")]
    Malformed,
}

/// Take one frame off `buf`. `max_frame` bounds the announced size, checked on the header
/// before the body is waited for.
pub fn decode(buf: &mut BytesMut, max_frame: usize) -> Result<Decoded, FrameError> {
    if buf.len() < 8 {
        return Ok(Decoded::NeedMore(8));
    }
    let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let doff = buf[4] as usize * 4;
    if size < 8 || doff < 8 || doff > size {
        return Err(FrameError::Malformed);
    }
    if size > max_frame {
        return Err(FrameError::TooLarge {
            size,
            limit: max_frame,
        });
    }
    if buf.len() < size {
        return Ok(Decoded::NeedMore(size));
    }
    let mut frame = buf.split_to(size);
    let frame_type = frame[5];
    let channel = u16::from_be_bytes([frame[6], frame[7]]);
    frame.advance(doff);
    Ok(Decoded::Frame(RawFrame {
        frame_type,
        channel,
        body: frame.freeze(),
    }))
}

/// Decode an AMQP frame body into its performative and the payload that follows it
/// (a transfer's message bytes; empty otherwise).
pub fn performative(body: &Bytes) -> Result<(Performative, Bytes), serde_amqp::Error> {
    let mut cursor = std::io::Cursor::new(body.as_ref());
    let p: Performative = {
        let reader = serde_amqp::read::IoReader::new(&mut cursor);
        let mut de = serde_amqp::de::Deserializer::new(reader);
        serde::Deserialize::deserialize(&mut de)?
    };
    let used = cursor.position() as usize;
    Ok((p, body.slice(used.min(body.len())..)))
}

/// Append one frame: header, then the serialized `body` value, then `payload`.
pub fn encode<T: Serialize>(
    out: &mut BytesMut,
    frame_type: u8,
    channel: u16,
    body: &T,
    payload: &[u8],
) -> Result<(), serde_amqp::Error> {
    let encoded = serde_amqp::to_vec(body)?;
    put_frame(out, frame_type, channel, &encoded, payload);
    Ok(())
}

/// Append one frame from already-encoded parts.
pub fn put_frame(out: &mut BytesMut, frame_type: u8, channel: u16, body: &[u8], payload: &[u8]) {
    let size = 8 + body.len() + payload.len();
    out.reserve(size);
    out.put_u32(size as u32);
    out.put_u8(2);
    out.put_u8(frame_type);
    out.put_u16(channel);
    out.put_slice(body);
    out.put_slice(payload);
}

/// Append an empty AMQP frame (a heartbeat).
pub fn heartbeat(out: &mut BytesMut) {
    put_frame(out, TYPE_AMQP, 0, &[], &[]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::performatives::{Close, Open};

    #[test]
    fn headers_are_classified() {
        assert_eq!(ProtocolHeader::parse(&HEADER_AMQP), ProtocolHeader::Amqp);
        assert_eq!(ProtocolHeader::parse(&HEADER_SASL), ProtocolHeader::Sasl);
        assert_eq!(ProtocolHeader::parse(&HEADER_TLS), ProtocolHeader::Tls);
        assert_eq!(ProtocolHeader::parse(b"GET / HT"), ProtocolHeader::Other);
        assert_eq!(
            ProtocolHeader::parse(b"AMQP\x00\x00\x09\x01"),
            ProtocolHeader::Other
        );
    }

    #[test]
    fn a_frame_round_trips_and_partial_input_waits() {
        let open = Open {
            container_id: "c".into(),
            hostname: Some("localhost".into()),
            max_frame_size: 65536.into(),
            channel_max: 7.into(),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let mut out = BytesMut::new();
        encode(
            &mut out,
            TYPE_AMQP,
            3,
            &Performative::Open(open.clone()),
            b"",
        )
        .unwrap();
        let full = out.clone();
        let mut part = BytesMut::from(&full[..5]);
        assert_eq!(decode(&mut part, 1024).unwrap(), Decoded::NeedMore(8));
        let mut part = BytesMut::from(&full[..full.len() - 1]);
        assert_eq!(
            decode(&mut part, 1024).unwrap(),
            Decoded::NeedMore(full.len())
        );
        let Decoded::Frame(f) = decode(&mut out, 1024).unwrap() else {
            panic!("frame expected")
        };
        assert!(out.is_empty());
        assert_eq!((f.frame_type, f.channel), (TYPE_AMQP, 3));
        let (p, payload) = performative(&f.body).unwrap();
        assert_eq!(p, Performative::Open(open));
        assert!(payload.is_empty());
    }

    #[test]
    fn the_size_is_checked_on_the_header() {
        let mut b = BytesMut::from(&[0u8, 1, 0, 0, 2, 0, 0, 0][..]);
        assert_eq!(
            decode(&mut b, 4096),
            Err(FrameError::TooLarge {
                size: 65536,
                limit: 4096
            })
        );
        let mut b = BytesMut::from(&[0u8, 0, 0, 4, 2, 0, 0, 0][..]);
        assert_eq!(decode(&mut b, 4096), Err(FrameError::Malformed));
        let mut b = BytesMut::from(&[0u8, 0, 0, 8, 3, 0, 0, 0][..]);
        assert_eq!(decode(&mut b, 4096), Err(FrameError::Malformed));
    }

    #[test]
    fn payload_after_the_performative_is_kept() {
        let mut out = BytesMut::new();
        encode(
            &mut out,
            TYPE_AMQP,
            0,
            &Performative::Close(Close { error: None }),
            b"xyz",
        )
        .unwrap();
        let Decoded::Frame(f) = decode(&mut out, 1024).unwrap() else {
            panic!("frame expected")
        };
        let (_, payload) = performative(&f.body).unwrap();
        assert_eq!(&payload[..], b"xyz");
    }

    #[test]
    fn heartbeats_are_empty_frames() {
        let mut out = BytesMut::new();
        heartbeat(&mut out);
        let Decoded::Frame(f) = decode(&mut out, 512).unwrap() else {
            panic!("frame expected")
        };
        assert!(f.body.is_empty());
    }
}

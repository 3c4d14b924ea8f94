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
    // The performative's own encoding must hold together before the decoder sees it (its
    // payload, a message that may go on in the next frame, is checked once it is whole). A
    // performative is a described value (§2.7); anything else would be checked only up to its
    // first value while the decoder, looking for the descriptor, read on into unchecked bytes.
    if body.first() != Some(&0x00) {
        return Err(invalid("a performative is a described value"));
    }
    value_len(body, 0).map_err(invalid)?;
    let mut cursor = std::io::Cursor::new(body.as_ref());
    let p: Performative = {
        let reader = serde_amqp::read::IoReader::new(&mut cursor);
        let mut de = serde_amqp::de::Deserializer::new(reader);
        serde::Deserialize::deserialize(&mut de)?
    };
    let used = cursor.position() as usize;
    Ok((p, body.slice(used.min(body.len())..)))
}

fn invalid(why: &'static str) -> serde_amqp::Error {
    <serde_amqp::Error as serde::de::Error>::custom(format!("malformed AMQP encoding: {why}"))
}

/// Deepest nesting of compound values accepted.
const MAX_DEPTH: usize = 32;

/// Check that `bytes` is a sequence of whole, well-formed AMQP values (spec §1.6) before it is
/// given to the decoder: every size fits in what is left, and no compound value claims more
/// elements than it has bytes. The decoder trusts those counts (a peer's `list32` with a count of
/// 2³² − 1 made it overflow), so untrusted bytes are checked first.
pub fn check_encoding(bytes: &[u8]) -> Result<(), serde_amqp::Error> {
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = value_len(rest, 0).map_err(invalid)?;
        rest = &rest[n..];
    }
    Ok(())
}

/// The length of the first encoded value of `b`.
fn value_len(b: &[u8], depth: usize) -> Result<usize, &'static str> {
    if depth > MAX_DEPTH {
        return Err("nested too deeply");
    }
    let code = *b.first().ok_or("truncated value")?;
    let fixed = |n: usize| {
        if b.len() > n {
            Ok(1 + n)
        } else {
            Err("truncated value")
        }
    };
    let be = |at: usize, width: usize| -> Result<usize, &'static str> {
        let f = b.get(at..at + width).ok_or("truncated size")?;
        Ok(f.iter().fold(0usize, |acc, x| (acc << 8) | usize::from(*x)))
    };
    match code {
        0x00 => {
            let d = value_len(&b[1..], depth + 1)?;
            let v = value_len(&b[1 + d..], depth + 1)?;
            Ok(1 + d + v)
        }
        0x40..=0x45 => Ok(1),
        0x50..=0x56 => fixed(1),
        0x60 | 0x61 => fixed(2),
        0x70..=0x74 => fixed(4),
        0x80..=0x84 => fixed(8),
        0x94 | 0x98 => fixed(16),
        0xa0 | 0xa1 | 0xa3 => {
            let n = be(1, 1)?;
            fixed(1 + n)
        }
        0xb0 | 0xb1 | 0xb3 => {
            let n = be(1, 4)?;
            fixed(4 + n)
        }
        0xc0 | 0xc1 | 0xd0 | 0xd1 | 0xe0 | 0xf0 => {
            let width = if matches!(code, 0xc0 | 0xc1 | 0xe0) {
                1
            } else {
                4
            };
            let size = be(1, width)?;
            let count = be(1 + width, width)?;
            let body = b
                .get(1 + width..1 + width + size)
                .ok_or("size beyond the data")?;
            if size < width || count > size {
                return Err("count beyond the size");
            }
            // A map's count is of keys and values together (§1.6.23): odd is malformed, and the
            // decoder, taking two at a time, would run past zero.
            if matches!(code, 0xc1 | 0xd1) && count % 2 == 1 {
                return Err("a map with a key and no value");
            }
            if matches!(code, 0xc0 | 0xc1 | 0xd0 | 0xd1) {
                let mut elems = &body[width..];
                for _ in 0..count {
                    let n = value_len(elems, depth + 1)?;
                    elems = &elems[n..];
                }
            }
            Ok(1 + width + size)
        }
        _ => Err("unknown constructor"),
    }
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

    /// Found by the `amqp_conn` fuzz target: a BEGIN whose `list32` claims 2³² − 1 fields made
    /// the decoder overflow (a panic in debug builds). Refused before decoding now.
    #[test]
    fn a_compound_claiming_more_than_it_holds_is_refused_not_decoded() {
        let begin: &[u8] = &[
            0x00, 0x53, 0x11, 0xd0, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x47, 0x43,
            0x70, 0x00, 0x00, 0x08, 0x00, 0x70, 0x00, 0x00, 0x08, 0x00,
        ];
        let e = performative(&Bytes::copy_from_slice(begin)).unwrap_err();
        assert!(e.to_string().contains("malformed AMQP encoding"), "{e}");
        // Every truncation and a count beyond the size are refused too; nothing panics.
        for n in 0..begin.len() {
            let _ = performative(&Bytes::copy_from_slice(&begin[..n]));
        }
        assert!(
            check_encoding(&[0xc0, 0x02, 0x05, 0x40]).is_err(),
            "count > size"
        );
        assert!(check_encoding(&[0xc0, 0x03, 0x02, 0x40, 0x40]).is_ok());
        // Found by the fuzz target too: a map with an odd count (a key without its value) made
        // the decoder's count of what is left run below zero.
        assert!(
            check_encoding(&[0xc1, 0x02, 0x01, 0x40]).is_err(),
            "odd map count"
        );
        assert!(check_encoding(&[0xc1, 0x03, 0x02, 0x40, 0x40]).is_ok());
        assert!(
            check_encoding(&[0xa1, 0x03, b'a', b'b']).is_err(),
            "short string"
        );
        let deep: Vec<u8> = std::iter::repeat_n(0x00, 100).collect();
        assert!(check_encoding(&deep).is_err(), "depth");
        // A real performative still decodes.
        let mut out = BytesMut::new();
        encode(&mut out, TYPE_AMQP, 0, &Close { error: None }, b"").unwrap();
        let body = Bytes::copy_from_slice(&out[8..]);
        assert!(matches!(
            performative(&body),
            Ok((Performative::Close(_), _))
        ));
    }

    /// Found by the `amqp_conn` fuzz target: an OPEN frame whose body began with a bare
    /// `smallulong` (no descriptor constructor) passed the check of its first value, and the
    /// decoder read on into a `list32` claiming 2³² − 1 fields (an overflow panic in debug
    /// builds). A body that is not a described value is refused before decoding.
    #[test]
    fn a_performative_that_is_not_a_described_value_is_refused_not_decoded() {
        let open: &[u8] = &[
            0x53, 0x10, 0x00, 0xd0, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x75, 0x7a, 0x7a,
        ];
        let e = performative(&Bytes::copy_from_slice(open)).unwrap_err();
        assert!(e.to_string().contains("described value"), "{e}");
        for n in 0..open.len() {
            let _ = performative(&Bytes::copy_from_slice(&open[..n]));
        }
    }

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

//! The payloads of the SASL `TPM` mechanism (protocol digest §6.5.6), both sides, without I/O.
//!
//! Every payload starts with a control byte: bit 7 "segment", bit 6 "last segment", bits 0–1
//! the sequence number (mod 4); a lone `0x00` means "not segmented". The exchange, as Azure's
//! SDKs run it (Node `SaslTpm`, C `prov_sasl_tpm.c`, C# `SaslTpmHandler`):
//!
//! | # | frame | payload |
//! |---|---|---|
//! | 1 | `sasl-init` (mechanism `TPM`) | `00` ‖ idScope ‖ `00` ‖ registrationId ‖ `00` ‖ EK (raw `TPM2B_PUBLIC`) |
//! | 2 | `sasl-challenge` | `00` ("send the SRK") |
//! | 3 | `sasl-response` | `00` ‖ SRK (raw `TPM2B_PUBLIC`) |
//! | 4 | `sasl-challenge` × n | `80 \| (last ? 40 : 0) \| seq` ‖ ≤ [`SEGMENT_SIZE`] bytes of the activation blob |
//! | 5 | `sasl-response` × n | `00` after a non-final segment; `00` ‖ SAS token after the last |
//! | 6 | `sasl-outcome` | `ok`, or `auth` when refused |
//!
//! A `sasl-init` of the form `00` ‖ EK (older C SDKs) is accepted too, with the registration
//! taken from the `hostname` field (`{idScope}/registrations/{registrationId}`).
//!
//! Limits (everything here is held before the device is authenticated): keys at most
//! [`MAX_KEY_SIZE`] bytes, the SAS token at most [`MAX_TOKEN_SIZE`], the blob at most
//! [`MAX_SEGMENTS`] segments. Segmented data *from* the device is refused (a 2048-bit EK and
//! SRK fit in one frame; no SDK segments them).

use crate::address;

/// Bytes of activation blob per `sasl-challenge` (within the 512-byte minimum max-frame-size
/// with the frame header, the performative and the control byte).
pub const SEGMENT_SIZE: usize = 400;
/// Most segments in one blob (a blob for RSA-2048 keys is ~ 870 bytes: 3 segments).
pub const MAX_SEGMENTS: usize = 16;
/// Largest EK or SRK accepted (a `TPM2B_PUBLIC` of an RSA-4096 key is ~ 600 bytes).
pub const MAX_KEY_SIZE: usize = 1280;
/// Largest SAS token accepted (the C SDK limits it to 470 bytes).
pub const MAX_TOKEN_SIZE: usize = 1024;
/// Control bit: this payload is a segment.
pub const SEGMENT: u8 = 0x80;
/// Control bit: this segment is the last one.
pub const LAST: u8 = 0x40;
/// Control bits: the sequence number.
pub const SEQUENCE: u8 = 0x03;
/// The server's first challenge ("send the SRK"), and the device's acknowledgement of a
/// non-final segment.
pub const EMPTY: [u8; 1] = [0x00];

/// Why a `TPM` payload is refused. The messages never contain key or token bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmSaslError {
    /// No payload where one is required.
    #[error("empty {0}")]
    Empty(&'static str),
    /// Segmented data from the device (unsupported), or an unknown control byte.
    #[error("{what}: unexpected control byte {byte:#04x}")]
    Control {
        /// Which payload.
        what: &'static str,
        /// The byte.
        byte: u8,
    },
    /// Not the documented layout.
    #[error("malformed {0}")]
    Shape(&'static str),
    /// Over a limit.
    #[error("{what} too large ({len} bytes, at most {max})")]
    TooLarge {
        /// Which payload.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A segment out of order.
    #[error("segment sequence {got}, expected {expected}")]
    Sequence {
        /// The expected sequence number.
        expected: u8,
        /// The one received.
        got: u8,
    },
}

/// What the device's `sasl-init` says.
#[derive(Clone, PartialEq, Eq)]
pub struct TpmInit {
    /// ID scope.
    pub id_scope: String,
    /// Registration id.
    pub registration_id: String,
    /// The EK, raw `TPM2B_PUBLIC`.
    pub endorsement_key: Vec<u8>,
}

impl std::fmt::Debug for TpmInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmInit")
            .field("id_scope", &self.id_scope)
            .field("registration_id", &self.registration_id)
            .field("endorsement_key_len", &self.endorsement_key.len())
            .finish()
    }
}

fn unsegmented<'a>(what: &'static str, payload: &'a [u8]) -> Result<&'a [u8], TpmSaslError> {
    match payload.split_first() {
        None => Err(TpmSaslError::Empty(what)),
        Some((0, rest)) => Ok(rest),
        Some((b, _)) => Err(TpmSaslError::Control { what, byte: *b }),
    }
}

fn key<'a>(what: &'static str, k: &'a [u8]) -> Result<&'a [u8], TpmSaslError> {
    if k.is_empty() {
        return Err(TpmSaslError::Empty(what));
    }
    if k.len() > MAX_KEY_SIZE {
        return Err(TpmSaslError::TooLarge {
            what,
            len: k.len(),
            max: MAX_KEY_SIZE,
        });
    }
    Ok(k)
}

fn id_text(b: &[u8]) -> Option<&str> {
    let ok = !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b':'));
    ok.then(|| std::str::from_utf8(b).ok()).flatten()
}

/// Server: the `sasl-init` initial response (and its `hostname`, for the EK-only form).
pub fn parse_init(initial: &[u8], hostname: Option<&str>) -> Result<TpmInit, TpmSaslError> {
    let rest = unsegmented("sasl-init", initial)?;
    let mut parts = rest.splitn(3, |b| *b == 0);
    if let (Some(scope), Some(rid), Some(ek)) = (parts.next(), parts.next(), parts.next()) {
        if let (Some(scope), Some(rid)) = (id_text(scope), id_text(rid)) {
            return Ok(TpmInit {
                id_scope: scope.to_string(),
                registration_id: rid.to_string(),
                endorsement_key: key("endorsement key", ek)?.to_vec(),
            });
        }
    }
    let addr = hostname
        .and_then(|h| address::parse(h).ok())
        .ok_or(TpmSaslError::Shape(
            "sasl-init (neither idScope/registrationId nor a registration hostname)",
        ))?;
    Ok(TpmInit {
        id_scope: addr.id_scope,
        registration_id: addr.registration_id,
        endorsement_key: key("endorsement key", rest)?.to_vec(),
    })
}

/// Server: the SRK from the first `sasl-response`.
pub fn parse_srk(response: &[u8]) -> Result<Vec<u8>, TpmSaslError> {
    Ok(key("storage root key", unsegmented("SRK response", response)?)?.to_vec())
}

/// Server: the device's acknowledgement of a non-final segment (a lone `00`).
pub fn parse_ack(response: &[u8]) -> Result<(), TpmSaslError> {
    match unsegmented("segment acknowledgement", response)? {
        [] => Ok(()),
        _ => Err(TpmSaslError::Shape("segment acknowledgement")),
    }
}

/// Server: the SAS token from the answer to the last segment.
pub fn parse_token(response: &[u8]) -> Result<String, TpmSaslError> {
    let t = unsegmented("SAS token response", response)?;
    if t.is_empty() {
        return Err(TpmSaslError::Empty("SAS token"));
    }
    if t.len() > MAX_TOKEN_SIZE {
        return Err(TpmSaslError::TooLarge {
            what: "SAS token",
            len: t.len(),
            max: MAX_TOKEN_SIZE,
        });
    }
    let s = std::str::from_utf8(t).map_err(|_| TpmSaslError::Shape("SAS token"))?;
    if s.chars().any(|c| c.is_control()) {
        return Err(TpmSaslError::Shape("SAS token"));
    }
    Ok(s.to_string())
}

/// Server: the activation blob as `sasl-challenge` payloads, control bytes included.
pub fn segments(blob: &[u8]) -> Result<Vec<Vec<u8>>, TpmSaslError> {
    if blob.is_empty() {
        return Err(TpmSaslError::Empty("activation blob"));
    }
    let n = blob.len().div_ceil(SEGMENT_SIZE);
    if n > MAX_SEGMENTS {
        return Err(TpmSaslError::TooLarge {
            what: "activation blob",
            len: blob.len(),
            max: MAX_SEGMENTS * SEGMENT_SIZE,
        });
    }
    Ok(blob
        .chunks(SEGMENT_SIZE)
        .enumerate()
        .map(|(i, chunk)| {
            let last = if i + 1 == n { LAST } else { 0 };
            let mut p = Vec::with_capacity(chunk.len() + 1);
            p.push(SEGMENT | last | (i as u8 & SEQUENCE));
            p.extend_from_slice(chunk);
            p
        })
        .collect())
}

/// Device: the `sasl-init` initial response (`00` ‖ scope ‖ `00` ‖ id ‖ `00` ‖ EK).
pub fn init_response(id_scope: &str, registration_id: &str, endorsement_key: &[u8]) -> Vec<u8> {
    let mut p =
        Vec::with_capacity(3 + id_scope.len() + registration_id.len() + endorsement_key.len());
    p.push(0);
    p.extend_from_slice(id_scope.as_bytes());
    p.push(0);
    p.extend_from_slice(registration_id.as_bytes());
    p.push(0);
    p.extend_from_slice(endorsement_key);
    p
}

/// Device: the answer to the first challenge (`00` ‖ SRK).
pub fn srk_response(storage_root_key: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(1 + storage_root_key.len());
    p.push(0);
    p.extend_from_slice(storage_root_key);
    p
}

/// Device: the answer to the last segment (`00` ‖ SAS token).
pub fn token_response(sas_token: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(1 + sas_token.len());
    p.push(0);
    p.extend_from_slice(sas_token.as_bytes());
    p
}

/// Device: collects the activation blob from the segment challenges, checking the sequence.
#[derive(Debug, Default)]
pub struct Reassembler {
    buf: Vec<u8>,
    count: usize,
}

impl Reassembler {
    /// A new, empty one.
    pub fn new() -> Self {
        Self::default()
    }

    /// Take one segment challenge: `Ok(None)` when more follow (answer [`EMPTY`]), the whole
    /// blob after the last one.
    pub fn push(&mut self, challenge: &[u8]) -> Result<Option<Vec<u8>>, TpmSaslError> {
        let (&control, chunk) = challenge
            .split_first()
            .ok_or(TpmSaslError::Empty("segment"))?;
        if control & SEGMENT == 0 || control & !(SEGMENT | LAST | SEQUENCE) != 0 {
            return Err(TpmSaslError::Control {
                what: "segment",
                byte: control,
            });
        }
        let expected = (self.count % 4) as u8;
        if control & SEQUENCE != expected {
            return Err(TpmSaslError::Sequence {
                expected,
                got: control & SEQUENCE,
            });
        }
        if chunk.is_empty() {
            return Err(TpmSaslError::Empty("segment"));
        }
        self.count += 1;
        if self.count > MAX_SEGMENTS || self.buf.len() + chunk.len() > MAX_SEGMENTS * SEGMENT_SIZE {
            return Err(TpmSaslError::TooLarge {
                what: "activation blob",
                len: self.buf.len() + chunk.len(),
                max: MAX_SEGMENTS * SEGMENT_SIZE,
            });
        }
        self.buf.extend_from_slice(chunk);
        Ok((control & LAST != 0).then(|| std::mem::take(&mut self.buf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ek() -> Vec<u8> {
        // The SDK samples' EK starts `01 3a 00 01 00 0b`: a 0x13a-byte TPMT_PUBLIC.
        let mut k = vec![0x01, 0x3a, 0x00, 0x01, 0x00, 0x0b];
        k.resize(2 + 0x13a, 0xab);
        k
    }

    #[test]
    fn the_node_sdk_init_parses() {
        let p = init_response("0ne00000A0A", "dev-1", &ek());
        let i = parse_init(&p, None).unwrap();
        assert_eq!(i.id_scope, "0ne00000A0A");
        assert_eq!(i.registration_id, "dev-1");
        assert_eq!(i.endorsement_key, ek());
        // An EK that contains NUL bytes stays whole.
        assert!(ek().contains(&0));
    }

    #[test]
    fn the_ek_only_init_takes_the_registration_from_the_hostname() {
        let mut p = vec![0];
        p.extend_from_slice(&ek());
        let i = parse_init(&p, Some("0ne1/registrations/dev-2")).unwrap();
        assert_eq!(
            (i.id_scope.as_str(), i.registration_id.as_str()),
            ("0ne1", "dev-2")
        );
        assert_eq!(i.endorsement_key, ek());
        assert!(matches!(parse_init(&p, None), Err(TpmSaslError::Shape(_))));
        assert!(matches!(
            parse_init(&p, Some("not an address")),
            Err(TpmSaslError::Shape(_))
        ));
    }

    #[test]
    fn malformed_inits_are_refused() {
        assert_eq!(parse_init(&[], None), Err(TpmSaslError::Empty("sasl-init")));
        // Segmented init (C SDK over 470 bytes): refused, not reassembled.
        let mut seg = init_response("s", "r", &ek());
        seg[0] = 0x80;
        assert!(matches!(
            parse_init(&seg, None),
            Err(TpmSaslError::Control { byte: 0x80, .. })
        ));
        // Scope and id but no EK.
        assert_eq!(
            parse_init(b"\0scope\0rid\0", None),
            Err(TpmSaslError::Empty("endorsement key"))
        );
        // A registration id with a slash is not an id: falls back to the hostname form.
        assert!(parse_init(b"\0scope\0a/b\0k", None).is_err());
        let big = init_response("s", "r", &vec![1u8; MAX_KEY_SIZE + 1]);
        assert!(matches!(
            parse_init(&big, None),
            Err(TpmSaslError::TooLarge { .. })
        ));
    }

    #[test]
    fn srk_ack_and_token_payloads() {
        assert_eq!(parse_srk(&srk_response(&ek())).unwrap(), ek());
        assert_eq!(
            parse_srk(&[0]),
            Err(TpmSaslError::Empty("storage root key"))
        );
        assert!(parse_srk(&[0xc0, 1, 2]).is_err());
        assert_eq!(parse_ack(&EMPTY), Ok(()));
        assert!(parse_ack(&[0, 1]).is_err());
        assert!(parse_ack(&[]).is_err());
        let t = "SharedAccessSignature sr=a&sig=b&se=1&skn=registration";
        assert_eq!(parse_token(&token_response(t)).unwrap(), t);
        assert!(parse_token(&[0]).is_err());
        assert!(parse_token(&[0, 0xff, 0xfe]).is_err());
        assert!(parse_token(&[0, b'a', b'\n']).is_err());
        assert!(matches!(
            parse_token(&token_response(&"a".repeat(MAX_TOKEN_SIZE + 1))),
            Err(TpmSaslError::TooLarge { .. })
        ));
    }

    #[test]
    fn segments_round_trip_with_control_bytes() {
        for len in [
            1,
            399,
            400,
            401,
            870,
            1200,
            1201,
            MAX_SEGMENTS * SEGMENT_SIZE,
        ] {
            let blob: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let segs = segments(&blob).unwrap();
            assert_eq!(segs.len(), len.div_ceil(SEGMENT_SIZE));
            for (i, s) in segs.iter().enumerate() {
                let last = i + 1 == segs.len();
                assert_eq!(s[0], 0x80 | if last { 0x40 } else { 0 } | (i as u8 % 4));
                assert!(s.len() >= 2 && s.len() <= SEGMENT_SIZE + 1);
            }
            let mut r = Reassembler::new();
            let mut out = None;
            for s in &segs {
                assert!(out.is_none());
                out = r.push(s).unwrap();
            }
            assert_eq!(out.unwrap(), blob);
        }
        assert!(segments(&[]).is_err());
        assert!(segments(&vec![0; MAX_SEGMENTS * SEGMENT_SIZE + 1]).is_err());
    }

    #[test]
    fn the_reassembler_refuses_bad_segments() {
        let mut r = Reassembler::new();
        assert!(r.push(&[]).is_err());
        assert!(Reassembler::new().push(&[0x00, 1]).is_err());
        assert!(Reassembler::new().push(&[0x80]).is_err());
        assert!(Reassembler::new().push(&[0x90, 1]).is_err());
        assert_eq!(
            Reassembler::new().push(&[0x81, 1]),
            Err(TpmSaslError::Sequence {
                expected: 0,
                got: 1
            })
        );
        let mut r = Reassembler::new();
        for i in 0..MAX_SEGMENTS {
            r.push(&[0x80 | (i as u8 % 4), 1]).unwrap();
        }
        assert!(matches!(
            r.push(&[0x80 | (MAX_SEGMENTS as u8 % 4), 1]),
            Err(TpmSaslError::TooLarge { .. })
        ));
    }

    /// Arbitrary bytes never panic any parser (a cheap deterministic fuzz).
    #[test]
    fn arbitrary_payloads_do_not_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let p: Vec<u8> = (0..len)
                .map(|_| {
                    let v = next() as u8;
                    // Bias towards the interesting bytes.
                    match v % 5 {
                        0 => 0,
                        1 => 0x80 | (v & 0x43),
                        _ => v,
                    }
                })
                .collect();
            let _ = parse_init(&p, Some("s/registrations/r"));
            let _ = parse_init(&p, None);
            let _ = parse_srk(&p);
            let _ = parse_ack(&p);
            let _ = parse_token(&p);
            let mut r = Reassembler::new();
            let _ = r.push(&p);
            let _ = r.push(&p);
        }
    }
}

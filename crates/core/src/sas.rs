//! Shared access signatures: parsing, verification (device and service tokens), signing, and
//! group-key derivation (protocol digest §6.1, §6.2, §7.1).
//!
//! The signature is computed over `sr` exactly as it appears in the token (still
//! percent-encoded), because clients disagree on the casing of the escapes and sign what they send.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};
use sha2::Sha256;
use std::fmt;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Allowed clock skew when checking expiry, in seconds (Microsoft's parser allows 5 minutes).
pub const CLOCK_SKEW_SECS: i64 = 300;

/// Why a token was refused. Kept precise for logs and registration records; the wire only ever
/// says 401002.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// Not of the form `SharedAccessSignature k=v&...`.
    #[error("malformed SAS token: {0}")]
    Malformed(&'static str),
    /// `se` is in the past (beyond the allowed skew).
    #[error("SAS token expired at {expiry}")]
    Expired {
        /// The token's expiry, seconds since the epoch.
        expiry: i64,
    },
    /// `sr` names another resource.
    #[error("SAS token audience '{audience}' does not match '{expected}'")]
    WrongAudience {
        /// Decoded `sr`.
        audience: String,
        /// What was expected.
        expected: String,
    },
    /// The key name (`skn`) is not acceptable here.
    #[error("SAS key name '{0}' is not accepted")]
    WrongKeyName(String),
    /// No key produced the signature.
    #[error("SAS signature does not match any key")]
    BadSignature,
    /// `se` is further in the future than the configured maximum token lifetime allows.
    #[error(
        "SAS token expiry {expiry} is more than {max_lifetime_secs} s in the future (the maximum token lifetime)"
    )]
    LifetimeTooLong {
        /// The token's expiry, seconds since the epoch.
        expiry: i64,
        /// The configured maximum lifetime, seconds.
        max_lifetime_secs: u64,
    },
}

/// A parsed SAS token. `Debug` never prints the signature.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as sent (percent-encoded).
    pub sr_raw: String,
    /// `sr` decoded.
    pub sr: String,
    /// Decoded signature (base64 text).
    sig: String,
    /// `se` exactly as sent.
    pub se_raw: String,
    /// Expiry, seconds since the epoch.
    pub expiry: i64,
    /// Decoded key name, when present.
    pub skn: Option<String>,
}

impl fmt::Debug for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SasToken")
            .field("sr", &self.sr)
            .field("expiry", &self.expiry)
            .field("skn", &self.skn)
            .finish_non_exhaustive()
    }
}

fn form_decode(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_decode_str(&s).decode_utf8_lossy().into_owned()
}

impl SasToken {
    /// Parse `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]` (fields in any order, names
    /// case-insensitive).
    pub fn parse(token: &str) -> Result<Self, SasError> {
        let token = token.trim();
        let rest = match token.get(..21) {
            Some(p) if p.eq_ignore_ascii_case("SharedAccessSignature") => &token[21..],
            _ => {
                return Err(SasError::Malformed(
                    "missing 'SharedAccessSignature' prefix",
                ))
            }
        };
        let rest = rest
            .strip_prefix(' ')
            .ok_or(SasError::Malformed("missing space after prefix"))?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for part in rest.split('&') {
            if part.is_empty() {
                continue;
            }
            let (k, v) = part
                .split_once('=')
                .ok_or(SasError::Malformed("field without '='"))?;
            match k.to_ascii_lowercase().as_str() {
                "sr" => sr = Some(v.to_string()),
                "sig" => sig = Some(form_decode(v)),
                "se" => se = Some(v.to_string()),
                "skn" => skn = Some(form_decode(v)),
                _ => {}
            }
        }
        let sr_raw = sr.ok_or(SasError::Malformed("missing 'sr'"))?;
        let sig = sig.ok_or(SasError::Malformed("missing 'sig'"))?;
        let se_raw = se.ok_or(SasError::Malformed("missing 'se'"))?;
        let expiry = form_decode(&se_raw)
            .trim()
            .parse::<i64>()
            .map_err(|_| SasError::Malformed("'se' is not a number"))?;
        Ok(SasToken {
            sr: form_decode(&sr_raw),
            sr_raw,
            sig,
            se_raw,
            expiry,
            skn,
        })
    }

    /// Check the expiry against `now` (seconds since the epoch) with [`CLOCK_SKEW_SECS`].
    pub fn check_expiry(&self, now: i64) -> Result<(), SasError> {
        if self.expiry.saturating_add(CLOCK_SKEW_SECS) < now {
            return Err(SasError::Expired {
                expiry: self.expiry,
            });
        }
        Ok(())
    }

    /// Check the expiry against a maximum token lifetime: refused when `se` is more than
    /// `max_lifetime_secs` + [`CLOCK_SKEW_SECS`] after `now` (the same skew [`check_expiry`]
    /// allows, for clients whose clock runs ahead). `max_lifetime_secs == 0`: no limit.
    ///
    /// [`check_expiry`]: SasToken::check_expiry
    pub fn check_lifetime(&self, now: i64, max_lifetime_secs: u64) -> Result<(), SasError> {
        if max_lifetime_secs == 0 {
            return Ok(());
        }
        let max = i64::try_from(max_lifetime_secs).unwrap_or(i64::MAX);
        let latest = now.saturating_add(max).saturating_add(CLOCK_SKEW_SECS);
        if self.expiry > latest {
            return Err(SasError::LifetimeTooLong {
                expiry: self.expiry,
                max_lifetime_secs,
            });
        }
        Ok(())
    }

    /// Verify the signature against any of `keys` (base64). Constant-time comparison.
    /// Returns the index of the key that matched.
    pub fn verify_signature<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Result<usize, SasError> {
        let Ok(sig) = B64.decode(self.sig.trim()) else {
            return Err(SasError::BadSignature);
        };
        let message = format!("{}\n{}", self.sr_raw, self.se_raw);
        let mut matched = None;
        for (i, key) in keys.into_iter().enumerate() {
            let Ok(k) = B64.decode(key) else { continue };
            let expected = hmac_sha256(&k, message.as_bytes());
            if bool::from(expected.as_slice().ct_eq(sig.as_slice())) && matched.is_none() {
                matched = Some(i);
            }
        }
        matched.ok_or(SasError::BadSignature)
    }

    /// The signature check of a device token (§6.1) for trying many keys: audience
    /// `{idScope}/registrations/{registrationId}` (case-insensitive), `skn` absent, empty or
    /// `registration`, and not expired are checked here, once; the keys are tried with
    /// [`SignatureCheck::signed_by`]. [`verify_device`](Self::verify_device) for one key list.
    pub fn device_signature_check(
        &self,
        id_scope: &str,
        registration_id: &str,
        now: i64,
    ) -> Result<SignatureCheck, SasError> {
        self.check_device_claims(id_scope, registration_id, now)?;
        let Ok(sig) = B64.decode(self.sig.trim()) else {
            return Err(SasError::BadSignature);
        };
        Ok(SignatureCheck {
            sig,
            message: format!("{}\n{}", self.sr_raw, self.se_raw),
        })
    }

    fn check_device_claims(
        &self,
        id_scope: &str,
        registration_id: &str,
        now: i64,
    ) -> Result<(), SasError> {
        let expected = format!("{id_scope}/registrations/{registration_id}");
        if !self.sr.eq_ignore_ascii_case(&expected) {
            return Err(SasError::WrongAudience {
                audience: self.sr.clone(),
                expected,
            });
        }
        match self.skn.as_deref() {
            None | Some("") | Some("registration") => {}
            Some(other) => return Err(SasError::WrongKeyName(other.to_string())),
        }
        self.check_expiry(now)
    }

    /// Verify a device token (§6.1): audience `{idScope}/registrations/{registrationId}`
    /// (case-insensitive), `skn` absent, empty or `registration`, not expired, signed by one of
    /// `keys`.
    pub fn verify_device<'a>(
        &self,
        id_scope: &str,
        registration_id: &str,
        keys: impl IntoIterator<Item = &'a str>,
        now: i64,
    ) -> Result<usize, SasError> {
        self.check_device_claims(id_scope, registration_id, now)?;
        self.verify_signature(keys)
    }

    /// For a service token: the host named by `sr` (its first segment, URL-decoded, port
    /// included as sent). The service API finds the instance by this host.
    pub fn audience_host(&self) -> &str {
        self.sr.split('/').next().unwrap_or("")
    }

    /// For a service token (§7.1): does `sr` cover a request to `host` with the path
    /// `path_segments` (percent-decoded)? The rule, Azure's "URI prefix computed by segment":
    ///
    /// - `sr` is taken URL-decoded and without trailing `/`, then split on `/`;
    /// - its first segment, without a `:port`, must equal `host` (without a port),
    ///   ASCII-case-insensitively;
    /// - each further segment of `sr` must equal the request path's segment at the same
    ///   position, ASCII-case-insensitively (so `host/enrollments` covers `/enrollments/x` but
    ///   neither `/enrollmentGroups/x` nor `/enroll`, and `host/enroll` covers nothing under
    ///   `/enrollments`); `sr` may not have more segments than the path.
    ///
    /// Empty segments (`host//enrollments`) never match.
    pub fn audience_covers(&self, host: &str, path_segments: &[&str]) -> bool {
        let aud = self.sr.trim_end_matches('/');
        let mut parts = aud.split('/');
        let aud_host = parts.next().unwrap_or("");
        if aud_host.is_empty() || !strip_port(aud_host).eq_ignore_ascii_case(strip_port(host)) {
            return false;
        }
        let mut path = path_segments.iter();
        for seg in parts {
            match path.next() {
                Some(p) if !seg.is_empty() && seg.eq_ignore_ascii_case(p) => {}
                _ => return false,
            }
        }
        true
    }
}

/// `host` without a `:port` (an IPv6 literal keeps its brackets' content only when a port
/// follows: `[::1]:443` → `::1`, `[::1]` → `::1`; a bare `::1` is left alone).
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    if host.matches(':').count() == 1 {
        return host.split(':').next().unwrap_or("");
    }
    host
}

/// HMAC-SHA256.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// The key of a device in a symmetric-key enrollment group:
/// base64(HMAC-SHA256(base64decode(group key), registration id)). `None` if the group key is not
/// valid base64.
pub fn derive_device_key(group_key_b64: &str, registration_id: &str) -> Option<String> {
    let k = B64.decode(group_key_b64).ok()?;
    Some(B64.encode(hmac_sha256(&k, registration_id.as_bytes())))
}

/// A symmetric-key enrollment group's key, prepared once: the HMAC state keyed by it (the key's
/// inner and outer blocks already hashed). Deriving a device's key from it costs two SHA-256
/// blocks instead of four, with no base64 round trip and no allocation. `Debug` prints nothing
/// of the key.
#[derive(Clone)]
pub struct GroupKey(HmacSha256);

impl fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GroupKey(<redacted>)")
    }
}

impl GroupKey {
    /// From the group key as stored (base64); `None` if it is not valid base64.
    pub fn new(group_key_b64: &str) -> Option<Self> {
        let k = B64.decode(group_key_b64).ok()?;
        Some(GroupKey(
            HmacSha256::new_from_slice(&k).expect("HMAC accepts any key length"),
        ))
    }

    /// The device's key (the raw 32 bytes whose base64 is [`derive_device_key`]'s answer).
    pub fn derive(&self, registration_id: &str) -> [u8; 32] {
        let mut mac = self.0.clone();
        mac.update(registration_id.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// A device token's signature check, prepared once (the signature decoded, the signed text
/// built) for trying many keys: an enrollment group's devices are checked against every
/// symmetric-key group of the instance.
pub struct SignatureCheck {
    sig: Vec<u8>,
    message: String,
}

impl SignatureCheck {
    /// Whether the key (raw bytes) signed the token. Constant-time comparison.
    pub fn signed_by(&self, key: &[u8]) -> bool {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
        mac.update(self.message.as_bytes());
        // `verify_slice` compares in constant time (and refuses a signature of another length).
        mac.verify_slice(&self.sig).is_ok()
    }
}

/// Build a SAS token (for dps's own clients and tests). `resource`, `sig` and `skn` are encoded
/// with every character but letters and digits escaped (uppercase escapes). That is stricter
/// than Azure's SDKs, which leave `-`, `_`, `.` and `~` literal (`encodeURIComponent`);
/// verifiers that sign over `sr` as sent (dps's own, above) accept both. The Azure IoT Hub
/// adapter makes its tokens as the SDKs do (`dps_server::hubs::azure`).
pub fn sign_token(
    resource: &str,
    key_b64: &str,
    key_name: Option<&str>,
    expiry: i64,
) -> Option<String> {
    let sr = utf8_percent_encode(resource, NON_ALPHANUMERIC).to_string();
    let key = B64.decode(key_b64).ok()?;
    let sig = B64.encode(hmac_sha256(&key, format!("{sr}\n{expiry}").as_bytes()));
    let sig = utf8_percent_encode(&sig, NON_ALPHANUMERIC).to_string();
    let mut t = format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}");
    if let Some(n) = key_name {
        t.push_str("&skn=");
        t.push_str(&utf8_percent_encode(n, NON_ALPHANUMERIC).to_string());
    }
    Some(t)
}

/// A fresh random 64-byte key, base64 (what Azure generates).
pub fn generate_key() -> String {
    let bytes: [u8; 32] = rand::random();
    let bytes2: [u8; 32] = rand::random();
    let mut all = bytes.to_vec();
    all.extend_from_slice(&bytes2);
    B64.encode(all)
}

/// Is this a valid symmetric key (base64, 16 to 64 bytes)?
pub fn valid_key(key_b64: &str) -> bool {
    matches!(B64.decode(key_b64), Ok(k) if (16..=64).contains(&k.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=";

    #[test]
    fn digest_vector_uppercase_escapes() {
        let t = SasToken::parse(
            "SharedAccessSignature sr=0ne00000A0A%2Fregistrations%2Fsn-007-888-abc-mac-a1-b2-c3-d4-e5-f6&sig=t6%2F8JHWQuQgM9mXdYf%2FuIqa3dKECOEk9Rr4WrFV19q0%3D&se=1700000000&skn=registration",
        )
        .unwrap();
        assert_eq!(
            t.verify_device(
                "0ne00000A0A",
                "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6",
                [KEY],
                1_700_000_000
            ),
            Ok(0)
        );
    }

    #[test]
    fn digest_vector_lowercase_escapes_signed_as_sent() {
        let t = SasToken::parse(
            "SharedAccessSignature sr=0ne00000A0A%2fregistrations%2fsn-007-888-abc-mac-a1-b2-c3-d4-e5-f6&sig=d0v1ROtrJfDl1lL%2b6Gm6mCyZUBsvFsT3HgNEOWfYmE0%3d&se=1700000000&skn=registration",
        )
        .unwrap();
        assert!(t
            .verify_device(
                "0ne00000a0a",
                "SN-007-888-abc-mac-a1-b2-c3-d4-e5-f6",
                [KEY],
                1_700_000_000
            )
            .is_ok());
    }

    #[test]
    fn group_key_derivation_matches_docs_vector() {
        // The docs vector: this group key derives the key above for this registration id.
        let derived = derive_device_key(
            "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
            "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6",
        )
        .unwrap();
        assert_eq!(derived, KEY);
    }

    #[test]
    fn expiry_skew_and_key_name_rules() {
        let tok = sign_token("s/registrations/d", KEY, None, 1000).unwrap();
        let t = SasToken::parse(&tok).unwrap();
        assert!(t.verify_device("s", "d", [KEY], 1000 + 300).is_ok());
        assert_eq!(
            t.verify_device("s", "d", [KEY], 1000 + 301),
            Err(SasError::Expired { expiry: 1000 })
        );
        let tok = sign_token("s/registrations/d", KEY, Some("other"), 1000).unwrap();
        let t = SasToken::parse(&tok).unwrap();
        assert!(matches!(
            t.verify_device("s", "d", [KEY], 1000),
            Err(SasError::WrongKeyName(_))
        ));
        // Java: literal slashes and an empty skn.
        let sr = "s/registrations/d";
        let sig = B64.encode(hmac_sha256(
            &B64.decode(KEY).unwrap(),
            format!("{sr}\n1000").as_bytes(),
        ));
        let sig = utf8_percent_encode(&sig, NON_ALPHANUMERIC).to_string();
        let t = SasToken::parse(&format!(
            "SharedAccessSignature sr={sr}&sig={sig}&se=1000&skn="
        ))
        .unwrap();
        assert!(t.verify_device("s", "d", [KEY], 1000).is_ok());
    }

    #[test]
    fn secondary_key_and_wrong_key() {
        let other = generate_key();
        let tok = sign_token("s/registrations/d", KEY, None, 1000).unwrap();
        let t = SasToken::parse(&tok).unwrap();
        assert_eq!(
            t.verify_device("s", "d", [other.as_str(), KEY], 1000),
            Ok(1)
        );
        assert_eq!(
            t.verify_device("s", "d", [other.as_str()], 1000),
            Err(SasError::BadSignature)
        );
        assert!(matches!(
            t.verify_device("s", "e", [KEY], 1000),
            Err(SasError::WrongAudience { .. })
        ));
    }

    #[test]
    fn a_prepared_group_key_derives_what_derive_device_key_does() {
        let g = GroupKey::new(KEY).unwrap();
        for rid in ["d", "meter-0001", "a.b_c-d:e"] {
            assert_eq!(
                B64.encode(g.derive(rid)),
                derive_device_key(KEY, rid).unwrap()
            );
        }
        assert!(GroupKey::new("not base64!").is_none());
        assert_eq!(format!("{g:?}"), "GroupKey(<redacted>)");
    }

    #[test]
    fn a_prepared_signature_check_accepts_the_signing_key_only() {
        let device = derive_device_key(KEY, "d").unwrap();
        let tok = sign_token("s/registrations/d", &device, Some("registration"), 1000).unwrap();
        let t = SasToken::parse(&tok).unwrap();
        let check = t.device_signature_check("s", "d", 1000).unwrap();
        let g = GroupKey::new(KEY).unwrap();
        assert!(check.signed_by(&g.derive("d")));
        assert!(!check.signed_by(&g.derive("e")));
        assert!(!check.signed_by(&B64.decode(KEY).unwrap()));
        // The claims are checked once, up front.
        assert!(matches!(
            t.device_signature_check("s", "e", 1000),
            Err(SasError::WrongAudience { .. })
        ));
        assert!(matches!(
            t.device_signature_check("s", "d", 1000 + CLOCK_SKEW_SECS + 1),
            Err(SasError::Expired { .. })
        ));
        let other = sign_token("s/registrations/d", &device, Some("owner"), 1000).unwrap();
        assert!(matches!(
            SasToken::parse(&other)
                .unwrap()
                .device_signature_check("s", "d", 1000),
            Err(SasError::WrongKeyName(_))
        ));
        // A signature of another length (or not base64) never matches.
        let short = tok.replace(
            &tok[tok.find("sig=").unwrap() + 4..tok.find("&se=").unwrap()],
            "AAAA",
        );
        let t = SasToken::parse(&short).unwrap();
        assert!(!t
            .device_signature_check("s", "d", 1000)
            .unwrap()
            .signed_by(&g.derive("d")));
        let junk = tok.replace(
            &tok[tok.find("sig=").unwrap() + 4..tok.find("&se=").unwrap()],
            "%25",
        );
        assert_eq!(
            SasToken::parse(&junk)
                .unwrap()
                .device_signature_check("s", "d", 1000)
                .err(),
            Some(SasError::BadSignature)
        );
    }

    #[test]
    fn debug_hides_signature() {
        let tok = sign_token("s/registrations/d", KEY, None, 1000).unwrap();
        let t = SasToken::parse(&tok).unwrap();
        assert!(!format!("{t:?}").contains("sig"));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "Bearer x",
            "SharedAccessSignature",
            "SharedAccessSignature sr=a&se=1",
            "SharedAccessSignature sr=a&sig=b&se=x",
        ] {
            assert!(SasToken::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lifetime_limit_allows_the_skew_and_refuses_beyond() {
        let now = 1_000_000;
        let tok = |se: i64| SasToken::parse(&sign_token("h", KEY, Some("p"), se).unwrap()).unwrap();
        // No limit.
        assert!(tok(now + 10 * 365 * 86_400).check_lifetime(now, 0).is_ok());
        // Exactly max, and max plus the skew: accepted.
        assert!(tok(now + 3600).check_lifetime(now, 3600).is_ok());
        assert!(tok(now + 3600 + CLOCK_SKEW_SECS)
            .check_lifetime(now, 3600)
            .is_ok());
        // One second beyond: refused.
        assert_eq!(
            tok(now + 3600 + CLOCK_SKEW_SECS + 1).check_lifetime(now, 3600),
            Err(SasError::LifetimeTooLong {
                expiry: now + 3600 + CLOCK_SKEW_SECS + 1,
                max_lifetime_secs: 3600
            })
        );
        // Huge limits do not overflow.
        assert!(tok(i64::MAX).check_lifetime(now, u64::MAX).is_ok());
        assert!(tok(i64::MAX).check_lifetime(now, 60).is_err());
    }

    #[test]
    fn service_audience_is_host_then_a_segment_prefix_of_the_path() {
        let t = |sr: &str| {
            SasToken::parse(&format!("SharedAccessSignature sr={sr}&sig=x&se=1&skn=p")).unwrap()
        };
        let p: &[&str] = &["enrollments", "dev-1"];
        // Host only, any case, with or without a port or a trailing slash, encoded or not.
        for sr in [
            "dps.example.net",
            "DPS.Example.NET",
            "dps.example.net:443",
            "dps.example.net/",
            "dps.example.net%2Fenrollments",
            "dps.example.net%2fEnrollments%2fDEV-1",
            "dps.example.net/enrollments/",
        ] {
            assert!(t(sr).audience_covers("dps.example.net", p), "{sr}");
        }
        // Another host, a host prefix, a string (not segment) prefix, a sibling path, a longer
        // path, an empty segment: refused.
        for sr in [
            "other.example.net",
            "dps.example",
            "dps.example.net.evil.com",
            "dps.example.net%2Fenroll",
            "dps.example.net/enrollmentGroups",
            "dps.example.net/enrollments/dev-1/attestationmechanism",
            "dps.example.net//enrollments",
            "",
            "/enrollments",
        ] {
            assert!(!t(sr).audience_covers("dps.example.net", p), "{sr}");
        }
        assert!(t("[::1]:443/enrollments").audience_covers("::1", p));
        assert_eq!(t("h%2Fx").audience_host(), "h");
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,300}") {
            let _ = SasToken::parse(&s);
            let _ = SasToken::parse(&format!("SharedAccessSignature {s}"));
        }
        #[test]
        fn sign_then_verify_round_trips(scope in "[0-9A-Za-z]{1,12}", id in "[a-z0-9][a-z0-9.-]{0,40}", se in 0i64..4_000_000_000) {
            let tok = sign_token(&format!("{scope}/registrations/{id}"), KEY, Some("registration"), se).unwrap();
            let t = SasToken::parse(&tok).unwrap();
            prop_assert!(t.verify_device(&scope, &id, [KEY], se).is_ok());
        }
    }
}

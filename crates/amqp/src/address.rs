//! Link addresses and SASL PLAIN identities: `{idScope}/registrations/{registrationId}` in the
//! three forms the SDKs send (protocol digest §5.2): bare (C#, Node), with a leading slash
//! (Java), and as a URL `amqps://{host}/{idScope}/registrations/{registrationId}` (C SDK).

/// The registration a link or SASL identity names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationAddress {
    /// ID scope.
    pub id_scope: String,
    /// Registration id.
    pub registration_id: String,
}

impl RegistrationAddress {
    /// Whether both name the same registration (ASCII case-insensitively, as the SAS `sr`).
    pub fn same_as(&self, other: &RegistrationAddress) -> bool {
        self.id_scope.eq_ignore_ascii_case(&other.id_scope)
            && self
                .registration_id
                .eq_ignore_ascii_case(&other.registration_id)
    }
}

/// Why an address was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Not `{idScope}/registrations/{registrationId}`.
    #[error("expected {{idScope}}/registrations/{{registrationId}}, got {0:?}")]
    Shape(String),
}

/// Parse a link address (or SASL authcid) in any of the SDK forms.
pub fn parse(address: &str) -> Result<RegistrationAddress, AddressError> {
    let bad = || AddressError::Shape(address.chars().take(200).collect());
    let mut rest = address.trim();
    for scheme in ["amqps://", "amqp://", "wss://", "ws://"] {
        // Compared as bytes: a byte index into text may fall inside a character.
        if rest
            .as_bytes()
            .get(..scheme.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(scheme.as_bytes()))
        {
            // Drop the scheme and the host.
            rest = &rest[scheme.len()..];
            rest = rest.split_once('/').map(|(_, p)| p).ok_or_else(bad)?;
            break;
        }
    }
    let rest = rest.trim_start_matches('/').trim_end_matches('/');
    let mut parts = rest.split('/');
    let (Some(scope), Some(kw), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if scope.is_empty() || id.is_empty() || !kw.eq_ignore_ascii_case("registrations") {
        return Err(bad());
    }
    Ok(RegistrationAddress {
        id_scope: scope.to_string(),
        registration_id: id.to_string(),
    })
}

/// A SASL PLAIN initial response (RFC 4616): `authzid NUL authcid NUL passwd`.
#[derive(Clone, PartialEq, Eq)]
pub struct PlainCredentials {
    /// Authentication identity: the registration address.
    pub authcid: String,
    /// Password: the device SAS token.
    pub password: String,
}

impl std::fmt::Debug for PlainCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainCredentials")
            .field("authcid", &self.authcid)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Split a PLAIN initial response. `None` when it is not three UTF-8 fields.
pub fn parse_plain(response: &[u8]) -> Option<PlainCredentials> {
    let mut it = response.split(|b| *b == 0);
    let (Some(_authzid), Some(authcid), Some(password), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return None;
    };
    Some(PlainCredentials {
        authcid: std::str::from_utf8(authcid).ok()?.to_string(),
        password: std::str::from_utf8(password).ok()?.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ra(s: &str, i: &str) -> RegistrationAddress {
        RegistrationAddress {
            id_scope: s.into(),
            registration_id: i.into(),
        }
    }

    /// Found by the `amqp_conn` fuzz target: a multi-byte character where a scheme would end.
    #[test]
    fn text_with_wide_characters_is_parsed_without_panicking() {
        let a = parse("0ne0\u{47c}APTURE/registrations/sym-node-amqp").unwrap();
        assert_eq!(a.registration_id, "sym-node-amqp");
        for s in [
            "ws:\u{47c}",
            "amqp\u{47c}//h/x",
            "\u{47c}\u{47c}\u{47c}\u{47c}\u{47c}",
        ] {
            let _ = parse(s);
        }
    }

    #[test]
    fn the_three_sdk_forms_parse() {
        let want = ra("0ne00CAPTURE", "sym-node-amqp");
        for a in [
            "0ne00CAPTURE/registrations/sym-node-amqp",
            "/0ne00CAPTURE/registrations/sym-node-amqp",
            "amqps://global.azure-devices-provisioning.net/0ne00CAPTURE/registrations/sym-node-amqp",
            "AMQPS://localhost:5671/0ne00CAPTURE/Registrations/sym-node-amqp",
        ] {
            assert_eq!(parse(a).unwrap(), want, "{a}");
        }
    }

    #[test]
    fn other_shapes_are_refused() {
        for a in [
            "",
            "/",
            "0ne00CAPTURE",
            "0ne00CAPTURE/registrations",
            "0ne00CAPTURE/registrations/",
            "0ne00CAPTURE/devices/x",
            "0ne00CAPTURE/registrations/x/extra",
            "amqps://hostonly",
            "$cbs",
        ] {
            assert!(parse(a).is_err(), "{a}");
        }
    }

    #[test]
    fn addresses_compare_case_insensitively() {
        assert!(ra("0ne0A", "Dev").same_as(&ra("0NE0a", "dev")));
        assert!(!ra("0ne0A", "dev").same_as(&ra("0ne0A", "dev2")));
    }

    #[test]
    fn plain_splits_into_identity_and_password() {
        // The Node SDK's initial response, from device-node-amqp-sym-assigned.json.
        let r = b"\x000ne00CAPTURE/registrations/sym-node-amqp\x00SharedAccessSignature sr=x&sig=y&se=1";
        let c = parse_plain(r).unwrap();
        assert_eq!(c.authcid, "0ne00CAPTURE/registrations/sym-node-amqp");
        assert_eq!(c.password, "SharedAccessSignature sr=x&sig=y&se=1");
        assert!(!format!("{c:?}").contains("sig=y"));
        assert!(parse_plain(b"only-one").is_none());
        assert!(parse_plain(b"a\0b").is_none());
        assert!(parse_plain(b"a\0b\0c\0d").is_none());
        assert!(parse_plain(b"\0\xff\0p").is_none());
    }
}

//! DPS MQTT naming: the CONNECT username, the request topics a device publishes to and the
//! response topics DPS answers on (protocol digest §4). Pure string functions, no panics on
//! any input.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// The only filter a device may subscribe to.
pub const RESPONSE_FILTER: &str = "$dps/registrations/res/#";
/// Path of the register request topic (followed by `?$rid=...`).
pub const REGISTER_PATH: &str = "$dps/registrations/PUT/iotdps-register/";
/// Path of the operation-status request topic (followed by `?$rid=...&operationId=...`).
pub const OPERATION_STATUS_PATH: &str = "$dps/registrations/GET/iotdps-get-operationstatus/";
/// Prefix of every response topic.
pub const RESPONSE_PREFIX: &str = "$dps/registrations/res/";

/// Characters left unescaped in query values we format (RFC 3986 unreserved).
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A parsed CONNECT username: `{idScope}/registrations/{registrationId}/api-version=...[&ClientVersion=...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username {
    /// ID scope (first segment).
    pub id_scope: String,
    /// Registration id (third segment).
    pub registration_id: String,
    /// `api-version`, percent-decoded, when present.
    pub api_version: Option<String>,
    /// `ClientVersion` (the SDK's user agent), percent-decoded, when present.
    pub client_version: Option<String>,
}

/// Why a username was rejected (answered with CONNACK 4).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    /// No username in CONNECT.
    #[error("missing username")]
    Missing,
    /// Fewer than three `/`-separated segments.
    #[error("username must be {{idScope}}/registrations/{{registrationId}}/...")]
    TooFewSegments,
    /// The second segment is not `registrations`.
    #[error("second username segment must be `registrations`")]
    NotRegistrations,
    /// Empty ID scope.
    #[error("empty id scope")]
    EmptyScope,
    /// Empty registration id.
    #[error("empty registration id")]
    EmptyRegistrationId,
}

/// Split a query string on `&` and the first `=`; values are returned raw (not decoded).
pub fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

fn decode(v: &str) -> String {
    percent_decode_str(v).decode_utf8_lossy().into_owned()
}

/// Parse a CONNECT username. Scope and registration id are taken verbatim; the remainder is a
/// query string (split on `&` and `=`, percent-decoded, unknown keys ignored, a leading `?`
/// tolerated). A missing `api-version` is accepted (`None`).
pub fn parse_username(username: &str) -> Result<Username, UsernameError> {
    if username.is_empty() {
        return Err(UsernameError::Missing);
    }
    let mut parts = username.splitn(4, '/');
    let scope = parts.next().unwrap_or_default();
    let registrations = parts.next().ok_or(UsernameError::TooFewSegments)?;
    let registration_id = parts.next().ok_or(UsernameError::TooFewSegments)?;
    let rest = parts.next().unwrap_or_default();
    if !registrations.eq_ignore_ascii_case("registrations") {
        return Err(UsernameError::NotRegistrations);
    }
    if scope.is_empty() {
        return Err(UsernameError::EmptyScope);
    }
    if registration_id.is_empty() {
        return Err(UsernameError::EmptyRegistrationId);
    }
    let rest = rest.strip_prefix('?').unwrap_or(rest);
    let mut api_version = None;
    let mut client_version = None;
    for (k, v) in query_pairs(rest) {
        let k = decode(k);
        if k.eq_ignore_ascii_case("api-version") {
            api_version.get_or_insert_with(|| decode(v));
        } else if k.eq_ignore_ascii_case("ClientVersion") {
            client_version.get_or_insert_with(|| decode(v));
        }
    }
    Ok(Username {
        id_scope: scope.to_string(),
        registration_id: registration_id.to_string(),
        api_version,
        client_version,
    })
}

/// Format a username the way the SDKs do (query values percent-encoded).
pub fn format_username(u: &Username) -> String {
    let mut s = format!("{}/registrations/{}/", u.id_scope, u.registration_id);
    let mut first = true;
    for (k, v) in [
        ("api-version", &u.api_version),
        ("ClientVersion", &u.client_version),
    ] {
        if let Some(v) = v {
            if !first {
                s.push('&');
            }
            first = false;
            s.push_str(k);
            s.push('=');
            s.extend(utf8_percent_encode(v, QUERY_VALUE));
        }
    }
    s
}

/// What a device asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// `PUT iotdps-register`.
    Register,
    /// `GET iotdps-get-operationstatus` with its (percent-decoded) operation id.
    OperationStatus {
        /// The operation id.
        operation_id: String,
    },
}

/// A parsed request topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTopic {
    /// `$rid`, raw, to be echoed byte for byte.
    pub rid: String,
    /// The operation.
    pub kind: RequestKind,
}

/// Why a request topic could not be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Not one of the two DPS request topics (`rid` when one could be found, to answer 404).
    #[error("unknown topic")]
    Unknown {
        /// `$rid`, if the topic had one.
        rid: Option<String>,
    },
    /// A DPS request topic without `$rid` (cannot be answered).
    #[error("missing $rid")]
    MissingRid,
    /// An operation-status topic without `operationId` (answered 400).
    #[error("missing operationId")]
    MissingOperationId {
        /// `$rid`.
        rid: String,
    },
}

/// Parse a topic a device published to. The path is matched ASCII-case-insensitively; the
/// query must carry `$rid` (the first one wins) and, for status polls, `operationId`.
pub fn parse_request_topic(topic: &str) -> Result<RequestTopic, TopicError> {
    let (path, query) = topic.split_once('?').unwrap_or((topic, ""));
    let mut rid = None;
    let mut operation_id = None;
    for (k, v) in query_pairs(query) {
        if k == "$rid" {
            rid.get_or_insert(v);
        } else if k.eq_ignore_ascii_case("operationId") {
            operation_id.get_or_insert(v);
        }
    }
    let is_register = path.eq_ignore_ascii_case(REGISTER_PATH);
    let is_status = path.eq_ignore_ascii_case(OPERATION_STATUS_PATH);
    if !is_register && !is_status {
        return Err(TopicError::Unknown {
            rid: rid.map(str::to_string),
        });
    }
    let rid = rid.ok_or(TopicError::MissingRid)?.to_string();
    let kind = if is_register {
        RequestKind::Register
    } else {
        match operation_id.map(decode) {
            Some(operation_id) if !operation_id.is_empty() => {
                RequestKind::OperationStatus { operation_id }
            }
            _ => return Err(TopicError::MissingOperationId { rid }),
        }
    };
    Ok(RequestTopic { rid, kind })
}

/// Format a request topic (used by tests and clients).
pub fn format_request_topic(req: &RequestTopic) -> String {
    match &req.kind {
        RequestKind::Register => format!("{REGISTER_PATH}?$rid={}", req.rid),
        RequestKind::OperationStatus { operation_id } => format!(
            "{OPERATION_STATUS_PATH}?$rid={}&operationId={}",
            req.rid,
            utf8_percent_encode(operation_id, QUERY_VALUE)
        ),
    }
}

/// A response topic: `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseTopic {
    /// HTTP-style status.
    pub status: u16,
    /// Echoed `$rid`.
    pub rid: String,
    /// `retry-after` seconds.
    pub retry_after: Option<u32>,
}

/// Format a response topic exactly as Azure does: `$rid` first, then `retry-after` if any.
pub fn format_response_topic(status: u16, rid: &str, retry_after: Option<u32>) -> String {
    match retry_after {
        Some(s) => format!("{RESPONSE_PREFIX}{status}/?$rid={rid}&retry-after={s}"),
        None => format!("{RESPONSE_PREFIX}{status}/?$rid={rid}"),
    }
}

/// Parse a response topic (strict: `$rid` must be the first parameter).
pub fn parse_response_topic(topic: &str) -> Option<ResponseTopic> {
    let rest = topic.strip_prefix(RESPONSE_PREFIX)?;
    let (status, query) = rest.split_once("/?")?;
    if status.is_empty() || !status.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let status: u16 = status.parse().ok()?;
    let mut pairs = query_pairs(query);
    let (k, rid) = pairs.next()?;
    if k != "$rid" {
        return None;
    }
    let mut retry_after = None;
    for (k, v) in pairs {
        if k.eq_ignore_ascii_case("retry-after") {
            retry_after = Some(v.parse().ok()?);
        }
    }
    Some(ResponseTopic {
        status,
        rid: rid.to_string(),
        retry_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sdk_usernames() {
        let u = parse_username("0ne00CAPTURE/registrations/sym-py-mqtt/api-version=2019-03-31&ClientVersion=azure-iot-device-provisioning-py%2F2.14.0%283.11.7%3BLinux%20%231%20SMP%20PREEMPT_DYNAMIC%20%400%3Bx86_64%29").unwrap();
        assert_eq!(u.id_scope, "0ne00CAPTURE");
        assert_eq!(u.registration_id, "sym-py-mqtt");
        assert_eq!(u.api_version.as_deref(), Some("2019-03-31"));
        assert_eq!(
            u.client_version.as_deref(),
            Some("azure-iot-device-provisioning-py/2.14.0(3.11.7;Linux #1 SMP PREEMPT_DYNAMIC @0;x86_64)")
        );
        // C SDK: raw, not encoded; Java: ClientVersion = api version.
        let u =
            parse_username("0ne1/registrations/dev/api-version=2021-06-01&ClientVersion=1.15.0")
                .unwrap();
        assert_eq!(u.client_version.as_deref(), Some("1.15.0"));
        let u = parse_username("s/registrations/d").unwrap();
        assert_eq!(u.api_version, None);
        let u = parse_username("s/registrations/d/?api-version=1&foo=bar&x").unwrap();
        assert_eq!(u.api_version.as_deref(), Some("1"));
        assert_eq!(parse_username(""), Err(UsernameError::Missing));
        assert_eq!(
            parse_username("s/registration/d/api-version=1"),
            Err(UsernameError::NotRegistrations)
        );
        assert_eq!(
            parse_username("s/registrations"),
            Err(UsernameError::TooFewSegments)
        );
        assert_eq!(
            parse_username("/registrations/d/"),
            Err(UsernameError::EmptyScope)
        );
        assert_eq!(
            parse_username("s/registrations//api-version=1"),
            Err(UsernameError::EmptyRegistrationId)
        );
    }

    #[test]
    fn request_topics() {
        let t = parse_request_topic(
            "$dps/registrations/PUT/iotdps-register/?$rid=c3324c89-6f08-49f6-98ca-635a8ee0e983",
        )
        .unwrap();
        assert_eq!(t.rid, "c3324c89-6f08-49f6-98ca-635a8ee0e983");
        assert_eq!(t.kind, RequestKind::Register);
        let t = parse_request_topic("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=4.d6d5f2e66a6d400d.bc8d9f04-8ce1-4bab-82b1-68dd97d11c43").unwrap();
        assert_eq!(t.rid, "2");
        assert_eq!(
            t.kind,
            RequestKind::OperationStatus {
                operation_id: "4.d6d5f2e66a6d400d.bc8d9f04-8ce1-4bab-82b1-68dd97d11c43".into()
            }
        );
        assert_eq!(
            parse_request_topic("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=7"),
            Err(TopicError::MissingOperationId { rid: "7".into() })
        );
        assert_eq!(
            parse_request_topic("$dps/registrations/PUT/iotdps-register/"),
            Err(TopicError::MissingRid)
        );
        assert_eq!(
            parse_request_topic("$dps/other/?$rid=9"),
            Err(TopicError::Unknown {
                rid: Some("9".into())
            })
        );
        assert_eq!(
            parse_request_topic("devices/x/messages"),
            Err(TopicError::Unknown { rid: None })
        );
    }

    #[test]
    fn response_topics() {
        assert_eq!(
            format_response_topic(202, "abc", Some(3)),
            "$dps/registrations/res/202/?$rid=abc&retry-after=3"
        );
        assert_eq!(
            format_response_topic(200, "1", None),
            "$dps/registrations/res/200/?$rid=1"
        );
        assert_eq!(
            parse_response_topic("$dps/registrations/res/429/?$rid=x&retry-after=3"),
            Some(ResponseTopic {
                status: 429,
                rid: "x".into(),
                retry_after: Some(3)
            })
        );
        assert_eq!(
            parse_response_topic("$dps/registrations/res/429/?retry-after=3&$rid=x"),
            None
        );
    }

    fn token() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._:-]{1,40}"
    }

    proptest! {
        #[test]
        fn username_round_trip(
            scope in token(),
            reg in token(),
            api in proptest::option::of("[0-9a-z-]{1,20}"),
            cv in proptest::option::of(any::<String>()),
        ) {
            let u = Username { id_scope: scope, registration_id: reg, api_version: api, client_version: cv };
            prop_assert_eq!(parse_username(&format_username(&u)), Ok(u));
        }

        #[test]
        fn request_topic_round_trip(rid in "[A-Za-z0-9._~-]{1,40}", op in proptest::option::of(any::<String>().prop_filter("nonempty", |s| !s.is_empty()))) {
            let kind = match op { Some(operation_id) => RequestKind::OperationStatus { operation_id }, None => RequestKind::Register };
            let t = RequestTopic { rid, kind };
            prop_assert_eq!(parse_request_topic(&format_request_topic(&t)), Ok(t));
        }

        #[test]
        fn response_topic_round_trip(status in 100u16..1000, rid in "[A-Za-z0-9._~$/-]{0,40}", ra in proptest::option::of(any::<u32>())) {
            let s = format_response_topic(status, &rid, ra);
            prop_assert!(s.starts_with("$dps/registrations/res/"));
            prop_assert_eq!(parse_response_topic(&s), Some(ResponseTopic { status, rid, retry_after: ra }));
        }

        #[test]
        fn no_panic_on_arbitrary_input(s in any::<String>()) {
            let _ = parse_username(&s);
            let _ = parse_request_topic(&s);
            let _ = parse_response_topic(&s);
        }

        #[test]
        fn no_panic_on_dps_like_input(s in "(\\$dps/registrations/(PUT|GET)/[a-z-]*/)?[?$=&a-zA-Z0-9%/]{0,60}") {
            let _ = parse_username(&s);
            let _ = parse_request_topic(&s);
            let _ = parse_response_topic(&s);
        }
    }
}

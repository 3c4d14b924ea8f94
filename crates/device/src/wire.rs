//! Wire helpers: SAS tokens, paths, MQTT usernames and topics (protocol digest §3, §4, §6.1).

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The device API version this client speaks by default.
pub const DEFAULT_API_VERSION: &str = "2019-03-31";

/// The client version reported in the MQTT username and HTTP `User-Agent`.
pub const CLIENT_VERSION: &str = concat!("dps-device/", env!("CARGO_PKG_VERSION"));

/// The subscription filter for responses.
pub const RESPONSE_FILTER: &str = "$dps/registrations/res/#";

/// Characters kept as is in a URL path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b':');

/// Characters kept as is in a query value.
const QUERY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn seg(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// Seconds since the epoch.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The device SAS token for `{scope}/registrations/{id}`, signed with `key_b64`, valid for `ttl`.
/// Returns `None` when the key is not base64.
pub fn device_sas(
    id_scope: &str,
    registration_id: &str,
    key_b64: &str,
    ttl: Duration,
) -> Option<String> {
    dps_core::sas::sign_token(
        &format!("{id_scope}/registrations/{registration_id}"),
        key_b64,
        Some("registration"),
        now_secs() + ttl.as_secs() as i64,
    )
}

/// `/{scope}/registrations/{id}/register?api-version={v}`.
pub fn register_path(id_scope: &str, registration_id: &str, api_version: &str) -> String {
    format!(
        "/{}/registrations/{}/register?api-version={}",
        seg(id_scope),
        seg(registration_id),
        utf8_percent_encode(api_version, QUERY)
    )
}

/// `/{scope}/registrations/{id}/operations/{op}?api-version={v}`.
pub fn operation_path(
    id_scope: &str,
    registration_id: &str,
    operation_id: &str,
    api_version: &str,
) -> String {
    format!(
        "/{}/registrations/{}/operations/{}?api-version={}",
        seg(id_scope),
        seg(registration_id),
        seg(operation_id),
        utf8_percent_encode(api_version, QUERY)
    )
}

/// The MQTT username: `{scope}/registrations/{id}/api-version={v}&ClientVersion={encoded}`.
pub fn mqtt_username(id_scope: &str, registration_id: &str, api_version: &str) -> String {
    format!(
        "{id_scope}/registrations/{registration_id}/api-version={api_version}&ClientVersion={}",
        utf8_percent_encode(CLIENT_VERSION, QUERY)
    )
}

/// The register topic for request id `rid`.
pub fn register_topic(rid: u64) -> String {
    format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}")
}

/// The operation-status topic for request id `rid`.
pub fn poll_topic(rid: u64, operation_id: &str) -> String {
    format!(
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={operation_id}"
    )
}

/// A parsed response topic `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseTopic {
    /// The HTTP-like status.
    pub status: u16,
    /// The echoed request id.
    pub rid: String,
    /// `retry-after`, when present and numeric.
    pub retry_after: Option<Duration>,
}

/// Parse a response topic; `None` if it is not one.
pub fn parse_response_topic(topic: &str) -> Option<ResponseTopic> {
    let rest = topic.strip_prefix("$dps/registrations/res/")?;
    let (status, query) = rest.split_once('/')?;
    let status: u16 = status.parse().ok()?;
    let query = query.strip_prefix('?').unwrap_or(query);
    let mut rid = None;
    let mut retry_after = None;
    for part in query.split('&') {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        if k == "$rid" {
            rid = Some(v.to_string());
        } else if k.eq_ignore_ascii_case("retry-after") {
            retry_after = v.trim().parse::<u64>().ok().map(Duration::from_secs);
        }
    }
    Some(ResponseTopic {
        status,
        rid: rid?,
        retry_after,
    })
}

/// Parse an HTTP `retry-after` header value (delta seconds; an HTTP date is ignored).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dps_core::sas::SasToken;

    #[test]
    fn response_topics_parse() {
        assert_eq!(
            parse_response_topic("$dps/registrations/res/202/?$rid=7&retry-after=3"),
            Some(ResponseTopic {
                status: 202,
                rid: "7".into(),
                retry_after: Some(Duration::from_secs(3))
            })
        );
        assert_eq!(
            parse_response_topic("$dps/registrations/res/200/?$rid=abc"),
            Some(ResponseTopic {
                status: 200,
                rid: "abc".into(),
                retry_after: None
            })
        );
        let t = parse_response_topic("$dps/registrations/res/429/?$rid=1&Retry-After=10").unwrap();
        assert_eq!(t.retry_after, Some(Duration::from_secs(10)));
        assert_eq!(
            parse_response_topic("$dps/registrations/res/abc/?$rid=1"),
            None
        );
        assert_eq!(
            parse_response_topic("$dps/registrations/res/200/?x=1"),
            None
        );
        assert_eq!(parse_response_topic("devices/x/messages"), None);
    }

    #[test]
    fn request_topics_and_username() {
        assert_eq!(
            register_topic(1),
            "$dps/registrations/PUT/iotdps-register/?$rid=1"
        );
        assert_eq!(
            poll_topic(2, "4.abc.def"),
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=4.abc.def"
        );
        let u = mqtt_username("0ne00000A0A", "dev-1", DEFAULT_API_VERSION);
        assert!(u.starts_with(
            "0ne00000A0A/registrations/dev-1/api-version=2019-03-31&ClientVersion=dps-device%2F"
        ));
    }

    #[test]
    fn paths_are_encoded() {
        assert_eq!(
            register_path("0ne1", "dev:1", "2019-03-31"),
            "/0ne1/registrations/dev:1/register?api-version=2019-03-31"
        );
        assert_eq!(
            operation_path("0ne1", "d", "4.a-b", "2019-03-31"),
            "/0ne1/registrations/d/operations/4.a-b?api-version=2019-03-31"
        );
        assert_eq!(
            register_path("s", "a b", "v"),
            "/s/registrations/a%20b/register?api-version=v"
        );
    }

    #[test]
    fn sas_token_verifies_with_core() {
        let key = dps_core::sas::generate_key();
        let tok = device_sas("0ne1", "dev-1", &key, Duration::from_secs(3600)).unwrap();
        assert!(tok.contains("skn=registration"));
        let t = SasToken::parse(&tok).unwrap();
        assert!(t
            .verify_device("0ne1", "dev-1", [key.as_str()], now_secs())
            .is_ok());
        assert!(device_sas("s", "d", "not base64!", Duration::from_secs(1)).is_none());
    }

    #[test]
    fn retry_after_values() {
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}

//! The MQTT naming parsers (CONNECT username, request and response topics) on arbitrary text,
//! with round trips: whatever parses formats back to a string that parses to the same value.
#![no_main]

use dps_mqtt::topic::{
    format_request_topic, format_username, parse_request_topic, parse_response_topic,
    parse_username, query_pairs,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(u) = parse_username(s) {
        let again = parse_username(&format_username(&u)).expect("formatted username parses");
        assert_eq!(again, u, "username round trip");
    }
    if let Ok(t) = parse_request_topic(s) {
        let again = parse_request_topic(&format_request_topic(&t)).expect("formatted topic parses");
        assert_eq!(again, t, "request topic round trip");
    }
    let _ = parse_response_topic(s);
    for _ in query_pairs(s) {}
});

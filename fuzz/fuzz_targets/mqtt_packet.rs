//! Arbitrary client byte streams through the MQTT decoder and session (`dps_mqtt::fuzz_entry`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dps_mqtt::fuzz_entry(data);
});

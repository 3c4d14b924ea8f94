//! SAS token parsing and verification on arbitrary input. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(t) = dps_core::sas::SasToken::parse(s) {
            let _ = t.verify_device("0ne00000A0A", "dev", ["a2V5a2V5a2V5a2V5a2V5a2V5"], 0);
            let _ = t.audience_covers("localhost", &["enrollments", "dev"]);
            let _ = t.audience_host();
            let _ = t.check_lifetime(0, 3600);
            let _ = t.check_lifetime(i64::MAX, u64::MAX);
        }
    }
});

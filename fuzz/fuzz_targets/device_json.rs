//! Device API bodies: the registration request (`DeviceRegistration`, parsed leniently as the
//! HTTPS and MQTT front ends do), and the service's answers re-serialized. Must never panic.
#![no_main]

use dps_core::model::{DeviceRegistration, RegistrationOperationStatus};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(reg) = DeviceRegistration::parse_lenient(data) {
        let text = serde_json::to_vec(&reg).expect("a parsed body serializes");
        DeviceRegistration::parse_lenient(&text).expect("a serialized body parses again");
    }
    // What a device SDK parses from us must also survive anything we could store and send.
    if let Ok(op) = serde_json::from_slice::<RegistrationOperationStatus>(data) {
        let _ = serde_json::to_vec(&op);
    }
});

//! Service API bodies through the server's own parsing and validation: individual enrollments
//! and enrollment groups (deserialize, `check`, then `normalize_settings` against an instance
//! with a linked hub, as a PUT does), bulk operations, and query specifications with the query
//! language parser. Must never panic.
#![no_main]

use dps_core::instance::{Instance, LinkedHub};
use dps_core::model::{
    BulkEnrollmentGroupOperation, BulkEnrollmentOperation, EnrollmentGroup, IndividualEnrollment,
};
use dps_core::random::SeededRandom;
use dps_server::service_api::parse_query;
use dps_server::usecases::enrollments::{normalize_settings, Enrollment};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn instance() -> &'static Instance {
    static I: OnceLock<Instance> = OnceLock::new();
    I.get_or_init(|| {
        Instance {
            name: "default".into(),
            id_scope: "0ne00000A0A".into(),
            hostnames: vec!["localhost".into()],
            access_policy: Vec::new(),
            linked_hub: vec![LinkedHub::registry("hub-1.example.net")],
            allocation_policy: Default::default(),
            register_response: Default::default(),
            credential_policy: Vec::new(),
        }
    })
}

fn put<T: Enrollment>(data: &[u8], is_group: bool) {
    if let Ok(mut e) = serde_json::from_slice::<T>(data) {
        if e.check().is_ok() {
            let random = SeededRandom::new(1);
            let _ = normalize_settings(e.settings_mut(), instance(), is_group, &random);
            let _ = serde_json::to_vec(&e);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    match sel % 5 {
        0 => put::<IndividualEnrollment>(body, false),
        1 => put::<EnrollmentGroup>(body, true),
        2 => {
            let _ = serde_json::from_slice::<BulkEnrollmentOperation>(body);
            let _ = serde_json::from_slice::<BulkEnrollmentGroupOperation>(body);
        }
        3 => {
            if let Ok(text) = std::str::from_utf8(body) {
                let _ = parse_query(text, &[]);
                let _ = parse_query(text, &[("status".into(), "assigned".into())]);
            }
        }
        _ => {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
                if let Some(q) = v.get("query").and_then(|q| q.as_str()) {
                    let _ = parse_query(q, &[]);
                }
            }
        }
    }
});

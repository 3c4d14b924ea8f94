//! Hub capacity beyond Azure: max_devices and max_registrations_per_second.

use crate::support::*;
use dps_core::instance::LinkedHub;
use serde_json::json;

#[tokio::test]
async fn a_full_hub_is_skipped_and_when_all_are_full_the_device_fails_400208() {
    let s = TestServer::spawn_with(|cfg| {
        let mut small = LinkedHub::registry("hub-small.example.net");
        small.max_devices = Some(1);
        cfg.instances[0].linked_hub = vec![small];
    })
    .await;
    let k1 = s.enroll("cap-1", json!({})).await;
    let k2 = s.enroll("cap-2", json!({})).await;
    assert_eq!(
        s.register("cap-1", &k1, None).await.body["status"],
        "assigned"
    );
    // The device already on the full hub may register again.
    assert_eq!(
        s.register("cap-1", &k1, None).await.body["status"],
        "assigned"
    );
    let r = s.register("cap-2", &k2, None).await;
    assert_eq!(r.body["status"], "failed", "{}", r.body);
    assert_eq!(r.body["registrationState"]["errorCode"], 400208);
}

#[tokio::test]
async fn a_hub_rate_limit_sends_the_overflow_elsewhere_then_asks_devices_to_retry() {
    let s = TestServer::spawn_with(|cfg| {
        let mut a = LinkedHub::registry("hub-slow-a.example.net");
        a.max_registrations_per_second = Some(1);
        let mut b = LinkedHub::registry("hub-slow-b.example.net");
        b.max_registrations_per_second = Some(1);
        cfg.instances[0].linked_hub = vec![a, b];
    })
    .await;
    let mut keys = Vec::new();
    for i in 0..4 {
        let rid = format!("rate-{i}");
        keys.push((rid.clone(), s.enroll(&rid, json!({})).await));
    }
    // All four at once, well inside one second.
    let results =
        futures::future::join_all(keys.iter().map(|(rid, k)| s.register(rid, k, None))).await;
    let mut statuses = Vec::new();
    let mut hubs = std::collections::HashSet::new();
    for r in results {
        if r.status == 200 {
            hubs.insert(
                r.body["registrationState"]["assignedHub"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        } else {
            assert_eq!(r.status, 429, "{}", r.body);
            assert!(r.headers.get("retry-after").is_some());
            assert_eq!(r.body["errorCode"], 429001);
        }
        statuses.push(r.status);
    }
    // Two tokens in total (one per hub) within the burst: two assigned, on both hubs, the rest told to retry.
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(hubs.len(), 2, "{hubs:?}");
}

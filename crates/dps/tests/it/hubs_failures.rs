//! Linked hubs that fail: down, unhealthy, credentials rotated, an unknown kind.

use crate::support::*;
use crate::support_iothub::*;
use crate::support_webhook::{webhook_hub, FakeWebhook};
use dps_core::instance::LinkedHub;
use reqwest::Method;
use serde_json::json;
use std::sync::atomic::Ordering;

#[tokio::test]
async fn a_burst_against_a_hub_that_is_down_leaves_no_device_assigning() {
    let url = format!("http://127.0.0.1:{}/hook", closed_port());
    let s = TestServer::spawn_with(|c| {
        c.instances[0].linked_hub = vec![webhook_hub("down.example.com", &url)]
    })
    .await;
    let key = s.enroll_group("burst", json!({})).await;
    let ids: Vec<String> = (0..30).map(|i| format!("burst-{i:02}")).collect();
    let results = futures::future::join_all(ids.iter().map(|id| {
        let dk = dps_core::sas::derive_device_key(&key, id).unwrap();
        let s = &s;
        async move { (id.clone(), s.register(id, &dk, None).await) }
    }))
    .await;
    for (id, r) in &results {
        assert!(
            r.status == 503 || r.status == 429,
            "{id}: {} {}",
            r.status,
            r.body
        );
        let ra = r
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        assert!(
            ra.is_some_and(|s| s >= 1),
            "{id}: no retry-after: {:?}",
            r.headers
        );
        let rec = s
            .call(
                Method::GET,
                &format!("/registrations/{id}"),
                Some(&s.owner()),
                None,
                &[],
            )
            .await;
        if rec.status == 200 {
            assert_ne!(rec.body["status"], "assigning", "{id} stuck: {}", rec.body);
            assert_ne!(rec.body["status"], "assigned", "{id}: {}", rec.body);
        } else {
            assert_eq!(rec.status, 404, "{id}: {}", rec.body);
        }
    }
}

#[tokio::test]
async fn an_unhealthy_hub_is_skipped_by_hashed_allocation() {
    let bad = FakeWebhook::start().await;
    bad.state.always.store(503, Ordering::SeqCst);
    let mut bad_hub = bad.linked_hub("bad.example.com");
    bad_hub.options.insert("retries".into(), 1.into());
    let s = TestServer::spawn_with(|c| {
        c.instances[0].linked_hub = vec![bad_hub, LinkedHub::registry("good.example.com")]
    })
    .await;
    let key = s.enroll_group("health", json!({})).await;
    let mut failed = 0;
    let mut i = 0;
    while failed < 3 {
        assert!(i < 60, "hashing never picked the bad hub");
        let id = format!("h-{i}");
        i += 1;
        let r = s
            .register(
                &id,
                &dps_core::sas::derive_device_key(&key, &id).unwrap(),
                None,
            )
            .await;
        if r.status == 503 {
            failed += 1;
        } else {
            assert_eq!(
                r.body["registrationState"]["assignedHub"], "good.example.com",
                "{}",
                r.body
            );
        }
    }
    let hubs = s
        .call(
            Method::GET,
            "/admin/instances/default/linkedHubs",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    assert_eq!(hubs.status, 200, "{}", hubs.body);
    let badh = hubs
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "bad.example.com")
        .unwrap()
        .clone();
    assert_eq!(badh["health"]["healthy"], false, "{badh}");
    // Within the cool-down, every new device lands on the healthy hub.
    for j in 0..12 {
        let id = format!("after-{j}");
        let r = s
            .register(
                &id,
                &dps_core::sas::derive_device_key(&key, &id).unwrap(),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{id}: {}", r.body);
        assert_eq!(
            r.body["registrationState"]["assignedHub"], "good.example.com",
            "{id}: {}",
            r.body
        );
    }
}

#[tokio::test]
async fn rotated_hub_credentials_fail_with_400209_and_are_reported() {
    let h = FakeIotHub::start("rotated.azure-devices.net").await;
    // dps still holds the old key.
    let stale = h.linked_hub(OWNER_KEY);
    let s = TestServer::spawn_with(|c| c.instances[0].linked_hub = vec![stale]).await;
    let key = s.enroll("rot-dev", json!({})).await;
    let r = s.register("rot-dev", &key, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "failed", "{}", r.body);
    assert_eq!(
        r.body["registrationState"]["errorCode"], 400209,
        "{}",
        r.body
    );
    assert!(*h.state.refused.lock().unwrap() >= 1);
    let hubs = s
        .call(
            Method::GET,
            "/admin/instances/default/linkedHubs",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    assert_eq!(hubs.status, 200, "{}", hubs.body);
    let hub = &hubs.body[0];
    assert_eq!(hub["health"]["credentials_refused"], true, "{hub}");
    assert_eq!(hub["connection_string"], "<redacted>");
    let rec = s
        .call(
            Method::GET,
            "/registrations/rot-dev",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    assert_eq!(rec.body["status"], "failed", "{}", rec.body);
    assert_eq!(rec.body["errorCode"], 400209, "{}", rec.body);
}

#[tokio::test]
async fn an_unknown_hub_kind_is_a_400_naming_the_hub_and_the_known_kinds() {
    let s = TestServer::spawn().await;
    let known = "(known: registry, mosquitto, azure-iothub, webhook, broker-auth)";
    let r = s
        .call(
            Method::PUT,
            "/admin/instances/default/linkedHubs/odd.example.net",
            Some(&s.owner()),
            Some(json!({"kind": "kafka"})),
            &[],
        )
        .await;
    assert_error(&r, 400, None);
    let m = r.body["message"].as_str().unwrap();
    assert!(
        m.contains(&format!(
            "linked hub 'odd.example.net': unknown kind 'kafka' {known}"
        )),
        "{m}"
    );
    let r = s
        .call(
            Method::PUT,
            "/admin/instances/second",
            Some(&s.owner()),
            Some(json!({"linked_hub": [{"host": "h2.example.net", "kind": "Registry"}]})),
            &[],
        )
        .await;
    assert_error(&r, 400, None);
    let m = r.body["message"].as_str().unwrap();
    assert!(
        m.contains(&format!(
            "linked hub 'h2.example.net': unknown kind 'Registry' {known}"
        )),
        "{m}"
    );
    // Nothing changed.
    let hubs = s
        .call(
            Method::GET,
            "/admin/instances/default/linkedHubs",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    assert_eq!(hubs.body.as_array().map(Vec::len), Some(2), "{}", hubs.body);
    assert_eq!(
        s.call(
            Method::GET,
            "/admin/instances/second",
            Some(&s.owner()),
            None,
            &[]
        )
        .await
        .status,
        404
    );
}

//! Fault injection (`docs/testing-with-dps.md`): each action as a device sees it over HTTPS,
//! visible to everyone (metric, audit, record), and refused on an instance that does not allow
//! it.

use crate::support::*;
use reqwest::Method;
use serde_json::{json, Value};

fn register_path(rid: &str) -> String {
    format!("/{SCOPE}/registrations/{rid}/register?api-version=2021-10-01")
}

async fn add_rule(s: &TestServer, rule: Value) -> Resp {
    s.call(
        Method::POST,
        "/admin/instances/default/faults",
        Some(&s.owner()),
        Some(rule),
        &[],
    )
    .await
}

async fn put_register(s: &TestServer, rid: &str, key: &str) -> Resp {
    s.call(
        Method::PUT,
        &register_path(rid),
        Some(&device_token(SCOPE, rid, key)),
        Some(json!({"registrationId": rid})),
        &[],
    )
    .await
}

async fn lab() -> TestServer {
    TestServer::spawn_with(|c| c.instances[0].allow_fault_injection = true).await
}

#[tokio::test]
async fn rules_are_refused_unless_the_instance_allows_them() {
    let s = TestServer::spawn().await;
    let r = add_rule(&s, json!({"action": "throttle"})).await;
    assert_error(&r, 400, None);
    assert!(
        r.body.to_string().contains("allow_fault_injection"),
        "{}",
        r.body
    );
    let r = s
        .call(
            Method::GET,
            "/admin/instances/default/faults",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["allowed"], false);
    assert_eq!(r.body["items"], json!([]));
    // And a device is never faulted there.
    let key = s.enroll("prod-1", json!({})).await;
    assert_eq!(s.register("prod-1", &key, None).await.status, 200);
}

#[tokio::test]
async fn throttle_answers_429_with_the_chosen_retry_after_on_the_first_request() {
    let s = lab().await;
    let r = add_rule(
        &s,
        json!({"action": "throttle", "registrationId": "thr-*", "retryAfter": 7, "count": 1}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let key = s.enroll("thr-1", json!({})).await;
    let r = put_register(&s, "thr-1", &key).await;
    assert_error(&r, 429, Some(429001));
    assert_eq!(r.header("retry-after").as_deref(), Some("7"));
    // Spent after one: the next attempt goes through, and the rule is gone.
    let r = s.register("thr-1", &key, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let l = s
        .call(
            Method::GET,
            "/admin/instances/default/faults",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    assert!(!l.body.to_string().contains(&id), "{}", l.body);
    // Visible: metric and audit (marked injected).
    let m = scrape(&s).await;
    // (The registry is shared by the tests of this process: at least this one.)
    assert!(sample(&m, "dps_faults_injected_total", &[("action", "throttle")]) >= 1.0);
    let a = s.audit_for("thr-1").await;
    let e = a
        .iter()
        .find(|e| e["action"] == "fault.injected")
        .expect("audited");
    assert_eq!(e["after"]["injected"], true);
    assert_eq!(e["after"]["rule"], id.as_str());
    // Other devices never matched.
    let other = s.enroll("calm-1", json!({})).await;
    assert_eq!(s.register("calm-1", &other, None).await.status, 200);
}

#[tokio::test]
async fn fail_answers_the_chosen_status_code_and_message() {
    let s = lab().await;
    let r = add_rule(
        &s,
        json!({"action": "fail", "registrationId": "fail-*", "errorCode": 500001, "message": "injected boom"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let key = s.enroll("fail-1", json!({})).await;
    let r = put_register(&s, "fail-1", &key).await;
    assert_error(&r, 500, Some(500001));
    assert_eq!(r.body["message"], "injected boom");
    assert!(r.body["trackingId"].is_string(), "{}", r.body);
    // A device that fails attestation is refused as always, not faulted.
    let r = put_register(&s, "fail-1", &dps_core::sas::generate_key()).await;
    assert_error(&r, 401, Some(401002));
}

#[tokio::test]
async fn delay_holds_the_registration_assigning_for_the_chosen_polls() {
    let s = lab().await;
    let r = add_rule(
        &s,
        json!({"action": "delay", "registrationId": "slow-1", "delayPolls": 3}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let key = s.enroll("slow-1", json!({})).await;
    let tok = device_token(SCOPE, "slow-1", &key);
    let r = put_register(&s, "slow-1", &key).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = r.body["operationId"].as_str().unwrap().to_string();
    let poll = format!("/{SCOPE}/registrations/slow-1/operations/{op}?api-version=2021-10-01");
    for n in 1..=3 {
        let r = s.call(Method::GET, &poll, Some(&tok), None, &[]).await;
        assert_eq!(r.status, 202, "poll {n}: {}", r.body);
        assert_eq!(r.body["status"], "assigning", "poll {n}");
    }
    let r = eventually(std::time::Duration::from_secs(10), || async {
        let r = s.call(Method::GET, &poll, Some(&tok), None, &[]).await;
        if r.status == 202 {
            Err(format!("still assigning: {}", r.body))
        } else {
            Ok(r)
        }
    })
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "assigned");
}

#[tokio::test]
async fn hub_down_ends_the_registration_retryable_with_the_reason_on_record() {
    let s = lab().await;
    let r = add_rule(
        &s,
        json!({"action": "hubDown", "id": "outage", "registrationId": "down-*", "count": 1}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let key = s.enroll("down-1", json!({})).await;
    let r = s.register("down-1", &key, None).await;
    assert_error(&r, 503, Some(503001));
    assert!(r.header("retry-after").is_some(), "retryable");
    // The record's reason names the rule: in the audit log's entry for the failed attempt.
    let a = s.audit_for("down-1").await;
    assert!(
        a.iter().any(|e| e["action"] == "registration.failed"
            && e.to_string().contains("injected fault (rule outage)")),
        "the failure says why: {a:?}"
    );
    // The outage was one attempt long: the device's retry is assigned.
    let r = s.register("down-1", &key, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "assigned");
}

#[tokio::test]
async fn rules_from_the_configuration_and_their_management() {
    let s = TestServer::spawn_with(|c| {
        c.instances[0].allow_fault_injection = true;
        c.instances[0].fault.push(
            serde_json::from_value(
                json!({"action": "fail", "registration_id": "cfg-*", "error_code": 404201}),
            )
            .unwrap(),
        );
    })
    .await;
    let key = s.enroll("cfg-1", json!({})).await;
    assert_error(&put_register(&s, "cfg-1", &key).await, 404, Some(404201));
    let r = add_rule(
        &s,
        json!({"action": "throttle", "id": "t1", "transport": "mqtt"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = add_rule(&s, json!({"action": "throttle", "id": "t1"})).await;
    assert_eq!(r.status, 409, "{}", r.body);
    let r = add_rule(&s, json!({"action": "fail"})).await;
    assert_error(&r, 400, None);
    assert!(r.body.to_string().contains("errorCode"), "{}", r.body);
    let l = s
        .call(
            Method::GET,
            "/admin/instances/default/faults",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    let items = l.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{}", l.body);
    assert!(items
        .iter()
        .any(|i| i["source"] == "config" && i["injected"] == 1));
    assert!(items
        .iter()
        .any(|i| i["id"] == "t1" && i["source"] == "api"));
    // The mqtt-only rule leaves HTTPS alone.
    let k2 = s.enroll("other-1", json!({})).await;
    assert_eq!(s.register("other-1", &k2, None).await.status, 200);
    let del = |id: &'static str| {
        let s = &s;
        async move {
            s.call(
                Method::DELETE,
                &format!("/admin/instances/default/faults/{id}"),
                Some(&s.owner()),
                None,
                &[],
            )
            .await
        }
    };
    assert_eq!(del("t1").await.status, 204);
    assert_error(&del("t1").await, 404, None);
    let a = s.audit("action=fault.").await;
    assert!(
        a.iter()
            .any(|e| e["action"] == "fault.add" && e["targetId"] == "t1"),
        "{a:?}"
    );
    assert!(
        a.iter()
            .any(|e| e["action"] == "fault.remove" && e["targetId"] == "t1"),
        "{a:?}"
    );
}

/// What our Rust client does with each fault, over HTTPS and MQTT (the rows of
/// `docs/testing-with-dps.md` for `dps device register` / `dps-device`).
#[tokio::test]
async fn the_rust_client_rides_out_throttling_delays_and_a_hub_outage() {
    use dps_device::{Auth, ProvisioningClient, Transport, Trust};
    use std::time::{Duration, Instant};
    let s = lab().await;
    let client = |rid: &str, key: &str, t: Transport| {
        let port = if matches!(t, Transport::Https) {
            s.server.https.port()
        } else {
            s.server.mqtt.expect("mqtt").port()
        };
        ProvisioningClient::builder()
            .global_endpoint("localhost")
            .port(port)
            .id_scope(SCOPE)
            .registration_id(rid)
            .auth(Auth::SymmetricKey(key.to_string()))
            .transport(t)
            .trust(Trust::Pem(s.ca_pem.clone().into_bytes()))
            .poll_interval_override(Duration::from_millis(50))
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client")
    };
    for (t, name) in [(Transport::Https, "h"), (Transport::Mqtt, "m")] {
        // Throttled twice with retry-after 1: the client waits the full second each time.
        let rid = format!("rc-thr-{name}");
        let key = s.enroll(&rid, json!({})).await;
        add_rule(
            &s,
            json!({"action": "throttle", "registrationId": rid, "retryAfter": 1, "count": 2}),
        )
        .await;
        let t0 = Instant::now();
        let r = client(&rid, &key, t)
            .register()
            .await
            .expect("assigned after throttling");
        assert!(r.assigned_hub().is_some());
        assert_eq!(r.timing.attempts, 3, "{name}: {:?}", r.timing);
        assert!(
            t0.elapsed() >= Duration::from_secs(2),
            "{name}: honoured retry-after"
        );

        // Held assigning for 4 polls: the client keeps polling and ends assigned.
        let rid = format!("rc-delay-{name}");
        let key = s.enroll(&rid, json!({})).await;
        add_rule(
            &s,
            json!({"action": "delay", "registrationId": rid, "delayPolls": 4}),
        )
        .await;
        let r = client(&rid, &key, t)
            .register()
            .await
            .expect("assigned after delay");
        assert!(r.timing.polls >= 5, "{name}: {:?}", r.timing);

        // The hub is down for one attempt: retryable, the client retries and is assigned.
        let rid = format!("rc-down-{name}");
        let key = s.enroll(&rid, json!({})).await;
        add_rule(
            &s,
            json!({"action": "hubDown", "registrationId": rid, "count": 1}),
        )
        .await;
        let r = client(&rid, &key, t)
            .register()
            .await
            .expect("assigned after the outage");
        assert!(r.assigned_hub().is_some(), "{name}");

        // A 500 is retried as transient too; a 400-class fault ends the attempt.
        let rid = format!("rc-fail-{name}");
        let key = s.enroll(&rid, json!({})).await;
        add_rule(
            &s,
            json!({"action": "fail", "registrationId": rid, "errorCode": 400004, "count": 1}),
        )
        .await;
        let e = client(&rid, &key, t)
            .register()
            .await
            .expect_err("400 is final");
        assert!(e.to_string().contains("400004"), "{name}: {e}");
    }
}

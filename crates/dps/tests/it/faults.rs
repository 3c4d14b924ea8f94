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

// ------------------------------------------------------------------ connection-level faults

/// The longest a connection-level test waits for the server to act.
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to `port` trusting the server's development CA (SNI `localhost`).
async fn tls_connect(ca_pem: &str, port: u16) -> std::io::Result<Tls> {
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(ca_pem.as_bytes()).expect("ca");
    roots.add(der).expect("root");
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
}

/// A raw MQTT 3.1.1 device connection over TLS.
struct RawMqtt {
    tls: Tls,
    buf: bytes::BytesMut,
}

/// What the server did next.
#[derive(Debug)]
enum Next {
    Packet(rumqttc::mqttbytes::v4::Packet),
    /// EOF or a reset: the connection is gone.
    Closed,
}

impl RawMqtt {
    async fn connect(s: &TestServer, rid: &str, key: &str) -> RawMqtt {
        use rumqttc::mqttbytes::v4::{Connect, Packet};
        let tls = tls_connect(&s.ca_pem, s.server.mqtt.expect("mqtt").port())
            .await
            .expect("TLS");
        let mut m = RawMqtt {
            tls,
            buf: bytes::BytesMut::new(),
        };
        let mut c = Connect::new(rid);
        c.keep_alive = 60;
        c.set_login(
            format!("{SCOPE}/registrations/{rid}/api-version=2019-03-31"),
            device_token(SCOPE, rid, key),
        );
        m.send(Packet::Connect(c)).await;
        m
    }

    async fn send(&mut self, p: rumqttc::mqttbytes::v4::Packet) {
        use tokio::io::AsyncWriteExt;
        let mut b = bytes::BytesMut::new();
        p.write(&mut b, usize::MAX).expect("encode");
        self.tls.write_all(&b).await.expect("send");
    }

    async fn next(&mut self) -> Next {
        use tokio::io::AsyncReadExt;
        let read = async {
            loop {
                if let Ok(p) = rumqttc::mqttbytes::v4::Packet::read(&mut self.buf, usize::MAX) {
                    return Next::Packet(p);
                }
                match self.tls.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return Next::Closed,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(PATIENCE, read)
            .await
            .expect("the server acts in time")
    }

    async fn subscribe(&mut self) {
        let mut sub = rumqttc::mqttbytes::v4::Subscribe::new(
            "$dps/registrations/res/#",
            rumqttc::mqttbytes::QoS::AtLeastOnce,
        );
        sub.pkid = 1;
        self.send(rumqttc::mqttbytes::v4::Packet::Subscribe(sub))
            .await;
    }

    async fn publish_register(&mut self, rid: &str) {
        let mut p = rumqttc::mqttbytes::v4::Publish::new(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            json!({ "registrationId": rid }).to_string(),
        );
        p.pkid = 7;
        self.send(rumqttc::mqttbytes::v4::Packet::Publish(p)).await;
    }
}

fn is_connack_ok(n: &Next) -> bool {
    matches!(n, Next::Packet(rumqttc::mqttbytes::v4::Packet::ConnAck(a))
        if a.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success)
}

#[tokio::test]
async fn drop_closes_mqtt_connections_after_connect_subscribe_publish_and_before_the_answer() {
    use rumqttc::mqttbytes::v4::Packet;
    let s = lab().await;
    // connect: closed instead of the CONNACK, once (count 1); the next CONNECT is accepted.
    let key = s.enroll("dc-1", json!({})).await;
    let r = add_rule(
        &s,
        json!({"action": "drop", "stage": "connect", "registrationId": "dc-*", "transport": "mqtt", "count": 1}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let mut m = RawMqtt::connect(&s, "dc-1", &key).await;
    let n = m.next().await;
    assert!(matches!(n, Next::Closed), "no CONNACK: {n:?}");
    let mut m = RawMqtt::connect(&s, "dc-1", &key).await;
    let n = m.next().await;
    assert!(is_connack_ok(&n), "the rule was spent: {n:?}");

    // subscribe: CONNACK, then closed instead of the SUBACK.
    let key = s.enroll("ds-1", json!({})).await;
    add_rule(
        &s,
        json!({"action": "drop", "stage": "subscribe", "registrationId": "ds-1"}),
    )
    .await;
    let mut m = RawMqtt::connect(&s, "ds-1", &key).await;
    let n = m.next().await;
    assert!(is_connack_ok(&n), "{n:?}");
    m.subscribe().await;
    let n = m.next().await;
    assert!(matches!(n, Next::Closed), "no SUBACK: {n:?}");

    // publish (= register): PUBACK, then closed; nothing was registered.
    let key = s.enroll("dp-1", json!({})).await;
    add_rule(
        &s,
        json!({"action": "drop", "stage": "publish", "registrationId": "dp-1"}),
    )
    .await;
    let mut m = RawMqtt::connect(&s, "dp-1", &key).await;
    assert!(is_connack_ok(&m.next().await));
    m.subscribe().await;
    assert!(matches!(m.next().await, Next::Packet(Packet::SubAck(_))));
    m.publish_register("dp-1").await;
    let n = m.next().await;
    assert!(
        matches!(n, Next::Packet(Packet::PubAck(ref a)) if a.pkid == 7),
        "{n:?}"
    );
    let n = m.next().await;
    assert!(matches!(n, Next::Closed), "no answer: {n:?}");
    assert_eq!(s.registration_record("dp-1").await.status, 404);

    // response: the registration is processed (assigned), but the answer never comes.
    let key = s.enroll("dr-1", json!({})).await;
    add_rule(
        &s,
        json!({"action": "drop", "stage": "response", "registrationId": "dr-1"}),
    )
    .await;
    let mut m = RawMqtt::connect(&s, "dr-1", &key).await;
    assert!(is_connack_ok(&m.next().await));
    m.subscribe().await;
    assert!(matches!(m.next().await, Next::Packet(Packet::SubAck(_))));
    m.publish_register("dr-1").await;
    assert!(matches!(m.next().await, Next::Packet(Packet::PubAck(_))));
    let n = m.next().await;
    assert!(matches!(n, Next::Closed), "no answer: {n:?}");
    let rec = eventually(PATIENCE, || async {
        let r = s.registration_record("dr-1").await;
        if r.status == 200 && r.body["status"] == "assigned" {
            Ok(r)
        } else {
            Err(format!("{} {}", r.status, r.body))
        }
    })
    .await;
    assert_eq!(rec.body["registrationId"], "dr-1");

    // Visible: metric and audit, with the stage.
    let m = scrape(&s).await;
    assert!(sample(&m, "dps_faults_injected_total", &[("action", "drop")]) >= 4.0);
    let a = eventually(PATIENCE, || async {
        let a = s.audit_for("ds-1").await;
        if a.iter().any(|e| e["action"] == "fault.injected") {
            Ok(a)
        } else {
            Err(format!("{a:?}"))
        }
    })
    .await;
    let e = a.iter().find(|e| e["action"] == "fault.injected").unwrap();
    assert_eq!(e["after"]["stage"], "subscribe");
    assert_eq!(e["after"]["action"], "drop");
}

#[tokio::test]
async fn drop_over_https_closes_before_any_answer_or_in_the_middle_of_the_body() {
    let s = lab().await;
    let raw = |rid: &str, key: &str| {
        let body = json!({ "registrationId": rid }).to_string();
        format!(
            "PUT {} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
            register_path(rid),
            device_token(SCOPE, rid, key),
            body.len(),
            body
        )
    };
    // register: closed before any answer; nothing registered.
    let key = s.enroll("hd-1", json!({})).await;
    let r = add_rule(
        &s,
        json!({"action": "drop", "stage": "register", "registrationId": "hd-1", "transport": "https"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let (head, body) = tokio::time::timeout(PATIENCE, s.try_raw_exchange(&raw("hd-1", &key)))
        .await
        .expect("closed in time");
    assert_eq!((head.as_str(), body.as_str()), ("", ""), "no answer at all");
    assert_eq!(s.registration_record("hd-1").await.status, 404);

    // response: the status line, the headers and part of the body, then the connection closes.
    let key = s.enroll("hr-1", json!({})).await;
    add_rule(
        &s,
        json!({"action": "drop", "stage": "response", "registrationId": "hr-1"}),
    )
    .await;
    let (head, body) = tokio::time::timeout(PATIENCE, s.try_raw_exchange(&raw("hr-1", &key)))
        .await
        .expect("closed in time");
    assert!(head.starts_with("HTTP/1.1 20"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().expect("number"))
        })
        .expect("content-length");
    assert!(
        !body.is_empty() && body.len() < length,
        "truncated: {} of {length} bytes: {body}",
        body.len()
    );
    assert!(
        serde_json::from_str::<Value>(&body).is_err(),
        "not whole JSON"
    );
    // Processed: the registration exists.
    let rec = eventually(PATIENCE, || async {
        let r = s.registration_record("hr-1").await;
        if r.status == 200 {
            Ok(r)
        } else {
            Err(format!("{} {}", r.status, r.body))
        }
    })
    .await;
    assert_eq!(rec.body["registrationId"], "hr-1");
    let m = scrape(&s).await;
    assert!(
        sample(
            &m,
            "dps_connections_closed_total",
            &[("listener", "https"), ("reason", "injected_fault")]
        ) >= 2.0,
        "counted as closed by a fault"
    );
}

#[tokio::test]
async fn drop_and_slow_tls_rules_are_checked() {
    let s = lab().await;
    for (rule, needle) in [
        (json!({"action": "drop"}), "stage"),
        (
            json!({"action": "drop", "stage": "subscribe", "transport": "https"}),
            "mqtt only",
        ),
        (
            json!({"action": "drop", "stage": "connect", "transport": "https"}),
            "not https",
        ),
        (
            json!({"action": "drop", "stage": "connect", "enrollmentGroup": "g"}),
            "enrollmentGroup",
        ),
        (json!({"action": "slowTls"}), "delayMs"),
        (
            json!({"action": "slowTls", "delayMs": 100, "registrationId": "x-*"}),
            "TLS handshake",
        ),
        (json!({"action": "throttle", "stage": "connect"}), "stage"),
    ] {
        let r = add_rule(&s, rule.clone()).await;
        assert_error(&r, 400, Some(400004));
        assert!(r.body.to_string().contains(needle), "{rule}: {}", r.body);
    }
}

#[tokio::test]
async fn slow_tls_holds_the_handshake_for_the_delay() {
    use std::time::{Duration, Instant};
    let s = lab().await;
    let delay = Duration::from_millis(600);
    let r = add_rule(
        &s,
        json!({"action": "slowTls", "delayMs": 600, "transport": "mqtt", "count": 1}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // HTTPS is not matched by an mqtt rule (nor counted).
    let https = tls_connect(&s.ca_pem, s.server.https.port());
    tokio::time::timeout(PATIENCE, https)
        .await
        .expect("in time")
        .expect("handshake");
    let l = s
        .call(
            Method::GET,
            "/admin/instances/default/faults",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    assert_eq!(l.body["items"][0]["injected"], 0, "{}", l.body);
    // MQTT: the handshake completes, no sooner than the delay.
    let t0 = Instant::now();
    tokio::time::timeout(
        PATIENCE,
        tls_connect(&s.ca_pem, s.server.mqtt.expect("mqtt").port()),
    )
    .await
    .expect("in time")
    .expect("handshake");
    let took = t0.elapsed();
    assert!(took >= delay, "held {took:?}");
    let m = scrape(&s).await;
    assert!(sample(&m, "dps_faults_injected_total", &[("action", "slowTls")]) >= 1.0);
    let a = eventually(PATIENCE, || async {
        let a = s.audit("action=fault.injected").await;
        if a.iter().any(|e| e["after"]["action"] == "slowTls") {
            Ok(a)
        } else {
            Err(format!("{a:?}"))
        }
    })
    .await;
    assert!(a.iter().any(|e| e["after"]["transport"] == "mqtt"));
}

/// What our Rust client does with `drop` (each stage, once) and `slowTls`, over HTTPS and MQTT
/// (rows of `docs/testing-with-dps.md`).
#[tokio::test]
async fn the_rust_client_meets_dropped_connections_and_a_slow_handshake() {
    use dps_device::{Auth, ProvisioningClient, Transport, Trust};
    use std::time::{Duration, Instant};
    let s = lab().await;
    let client = |rid: &str, key: &str, t: Transport| {
        let port = match t {
            Transport::Https => s.server.https.port(),
            Transport::Mqtt => s.server.mqtt.expect("mqtt").port(),
            Transport::Amqp => s.server.amqp.expect("amqp").port(),
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
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client")
    };
    for (t, name) in [
        (Transport::Https, "h"),
        (Transport::Mqtt, "m"),
        (Transport::Amqp, "a"),
    ] {
        let stages: &[&str] = match t {
            Transport::Mqtt => &["connect", "subscribe", "register", "response"],
            Transport::Amqp => &["connect", "register", "response"],
            Transport::Https => &["register", "response"],
        };
        // Observed: a dropped connection ends the attempt at once with a transport error, over
        // every transport (over AMQP since the client sets up in one flight and reads the
        // connection's end); the client does not retry it (the caller decides).
        for stage in stages {
            let rid = format!("rc-drop-{stage}-{name}");
            let key = s.enroll(&rid, json!({})).await;
            add_rule(
                &s,
                json!({"action": "drop", "stage": stage, "registrationId": rid, "count": 1}),
            )
            .await;
            let e = client(&rid, &key, t)
                .register()
                .await
                .expect_err("a dropped connection is an error");
            assert!(
                e.to_string().contains("transport error"),
                "{name} {stage}: {e}"
            );
            // Once: the caller's next attempt is assigned.
            let r = client(&rid, &key, t).register().await.expect("assigned");
            assert!(r.assigned_hub().is_some(), "{name} {stage}");
        }
        // slowTls: the handshake waits, the registration succeeds on the first attempt.
        let rid = format!("rc-slow-{name}");
        let key = s.enroll(&rid, json!({})).await;
        let transport = match t {
            Transport::Https => "https",
            Transport::Mqtt => "mqtt",
            Transport::Amqp => "amqp",
        };
        add_rule(
            &s,
            json!({"action": "slowTls", "delayMs": 700, "transport": transport, "count": 1}),
        )
        .await;
        let t0 = Instant::now();
        let r = client(&rid, &key, t).register().await.expect("assigned");
        assert_eq!(r.timing.attempts, 1, "{name}: {:?}", r.timing);
        assert!(t0.elapsed() >= Duration::from_millis(700), "{name}: held");
    }
}

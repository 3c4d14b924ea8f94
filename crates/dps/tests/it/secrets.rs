//! Secrets never leave: with known secret strings configured everywhere (access policies,
//! enrollment keys, linked-hub connection strings, a webhook secret, a client key file), no
//! admin or service answer that reads configuration back, no audit entry, no CLI list/show
//! output and no log line (debug level, spans included) contains any of them. A client that
//! writes an answer back (placeholders included) keeps the stored secrets.

use crate::support::*;
use dps_core::instance::{HubKind, LinkedHub, Right};
use dps_server::config::PolicyConfig;
use reqwest::Method;
use serde_json::{json, Value};
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// Base64 of 16..64 bytes where a key is needed; distinctive strings elsewhere.
const POLICY_KEY: &str = "c2VjcmV0LXBvbGljeS1rZXktMDEyMzQ1Njc4OWFiY2RlZg==";
const ENROLL_PRIMARY: &str = "c2VjcmV0LWVucm9sbG1lbnQtcHJpbWFyeS0wMTIzNDU2";
const ENROLL_SECONDARY: &str = "c2VjcmV0LWVucm9sbG1lbnQtc2Vjb25kYXJ5LTAxMjM0";
const GROUP_PRIMARY: &str = "c2VjcmV0LWdyb3VwLXByaW1hcnkta2V5LTAxMjM0NTY3";
const GROUP_SECONDARY: &str = "c2VjcmV0LWdyb3VwLXNlY29uZGFyeS1rZXktMDEyMzQ1";
const AZURE_HUB_KEY: &str = "QXp1cmVIdWJTZWNyZXRLZXlEb05vdExlYWs=";
const MQTT_PASSWORD: &str = "mosquitto-admin-Pa55w0rd-secret";
const HOOK_URL_PASSWORD: &str = "hook-url-Pa55w0rd-secret";
const WEBHOOK_SECRET: &str = "webhook-hmac-secret-do-not-leak";
const KEY_FILE_SECRET: &str = "KEYFILEBODYSECRETMIIEvQIBADANBgkqhkiG9w0BAQEFAASC";

const HUB_REGISTRY: &str = "hub-a.example.net";
const HUB_AZURE: &str = "secret-azure.example.net";
const HUB_MQTT: &str = "secret-mqtt.example.net";
const HUB_HOOK: &str = "secret-hook.example.net";
const HUB_BROKER: &str = "secret-broker.example.net";
const BROKER_AUTH_SECRET: &str = "broker-auth-secret-do-not-leak-01";

/// A `MakeWriter` collecting the formatted log output.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Which configured secret, if any, `text` contains.
fn leaked<'a>(text: &str, secrets: &'a [(String, &'static str)]) -> Option<&'a str> {
    secrets
        .iter()
        .find(|(s, _)| text.contains(s.as_str()))
        .map(|(_, name)| *name)
}

fn hub(host: &str, kind: HubKind, cs: String, options: Value) -> LinkedHub {
    let mut h = LinkedHub::new(host, kind);
    h.connection_string = Some(cs);
    h.options = options.as_object().cloned().unwrap_or_default();
    h
}

// A current-thread runtime (the default): every task of the in-process server runs on this
// thread, so the thread's default subscriber sees all of their logs.
#[tokio::test]
async fn no_configured_secret_appears_in_any_answer_log_or_cli_output() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // tracing-core treats a lone registered dispatcher like a global one: a callsite first hit
    // on another test's thread (no subscriber there) would be cached as disabled for ours too.
    // With a second live dispatcher it asks every dispatcher, ours included.
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("admin-client.key");
    let mut f = std::fs::File::create(&key_file).unwrap();
    writeln!(
        f,
        "-----BEGIN PRIVATE KEY-----\n{KEY_FILE_SECRET}\n-----END PRIVATE KEY-----"
    )
    .unwrap();
    let cert_file = dir.path().join("admin-client.pem");
    std::fs::write(&cert_file, "not a certificate").unwrap();
    let closed = closed_port();

    let mut cfg = config(dir.path());
    cfg.log.level = "debug".into();
    let inst = &mut cfg.instances[0];
    inst.access_policy.push(PolicyConfig {
        name: "secretpolicy".into(),
        primary_key: Some(POLICY_KEY.into()),
        secondary_key: Some(POLICY_KEY.into()),
        rights: vec![Right::ServiceConfig, Right::EnrollmentRead],
    });
    inst.linked_hub = vec![
        LinkedHub::registry(HUB_REGISTRY),
        hub(
            HUB_AZURE,
            HubKind::AzureIotHub,
            format!("HostName={HUB_AZURE};SharedAccessKeyName=iothubowner;SharedAccessKey={AZURE_HUB_KEY}"),
            json!({"endpoint": format!("https://127.0.0.1:{closed}"), "timeout_ms": 500}),
        ),
        hub(
            HUB_MQTT,
            HubKind::Mosquitto,
            format!("mqtts://admin:{MQTT_PASSWORD}@127.0.0.1:{closed}"),
            json!({"cert_file": cert_file, "key_file": key_file, "timeout_ms": 500}),
        ),
        hub(
            HUB_HOOK,
            HubKind::Webhook,
            format!("http://hook:{HOOK_URL_PASSWORD}@127.0.0.1:{closed}/hook"),
            json!({"secret": WEBHOOK_SECRET, "retries": 1, "timeout_ms": 500}),
        ),
        {
            let mut h = LinkedHub::new(HUB_BROKER, HubKind::BrokerAuth);
            h.options
                .insert("auth_secret".into(), BROKER_AUTH_SECRET.into());
            h
        },
    ];
    let s = TestServer::start_in(dir, cfg).await;
    let owner = s.owner();

    // Enrollments with known keys: an individual one assigned to the registry hub, one per
    // failing hub (so that each hub is used and records its last error), and a group.
    let put = |path: String, body: Value| {
        let owner = owner.clone();
        let s = &s;
        async move {
            let r = s
                .call(Method::PUT, &path, Some(&owner), Some(body), &[])
                .await;
            assert_eq!(r.status, 200, "{path}: {}", r.body);
            r
        }
    };
    let sym = |p: &str, q: &str| json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": p, "secondaryKey": q}});
    put(
        "/enrollments/sec-dev-1".into(),
        json!({"registrationId": "sec-dev-1", "attestation": sym(ENROLL_PRIMARY, ENROLL_SECONDARY),
               "iotHubs": [HUB_REGISTRY], "initialTwin": {"tags": {"site": "x"}}}),
    )
    .await;
    for (rid, h) in [
        ("sec-azure", HUB_AZURE),
        ("sec-mqtt", HUB_MQTT),
        ("sec-hook", HUB_HOOK),
        ("sec-broker", HUB_BROKER),
    ] {
        put(
            format!("/enrollments/{rid}"),
            json!({"registrationId": rid, "attestation": sym(ENROLL_PRIMARY, ENROLL_SECONDARY), "iotHubs": [h]}),
        )
        .await;
    }
    put(
        "/enrollmentGroups/sec-grp".into(),
        json!({"enrollmentGroupId": "sec-grp", "attestation": sym(GROUP_PRIMARY, GROUP_SECONDARY), "iotHubs": [HUB_REGISTRY]}),
    )
    .await;
    let device_key = derive_key(GROUP_PRIMARY, "sec-grp-dev-1");

    // Registrations: assigned, refused (wrong key), and one per failing hub.
    let ok = s.register("sec-dev-1", ENROLL_PRIMARY, None).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let ok = s.register("sec-grp-dev-1", &device_key, None).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let refused = s.register("sec-dev-1", POLICY_KEY, None).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    for rid in ["sec-azure", "sec-mqtt", "sec-hook"] {
        let _ = s.register(rid, ENROLL_PRIMARY, None).await;
    }
    // Each failing hub has recorded its error.
    eventually(Duration::from_secs(15), || async {
        let r = s
            .call(
                Method::GET,
                "/admin/instances/default/linkedhubs",
                Some(&s.owner()),
                None,
                &[],
            )
            .await;
        let failing = r
            .body
            .as_array()
            .into_iter()
            .flatten()
            .filter(|h| !h["health"]["last_error"].is_null())
            .count();
        if failing >= 3 {
            Ok(())
        } else {
            Err(r.body.to_string())
        }
    })
    .await;
    // A broker asks about a device on the broker-auth hub: its password, and the broker's
    // secret, must not leak either (right and wrong secret, right and wrong password).
    let ok = s.register("sec-broker", ENROLL_PRIMARY, None).await;
    assert_eq!(ok.body["status"], "assigned", "{}", ok.body);
    let broker_pw =
        dps_server::hubs::broker_auth::derive_password(ENROLL_PRIMARY, "sec-broker").unwrap();
    for (secret, pw, want) in [
        (BROKER_AUTH_SECRET, broker_pw.as_str(), (200, "allow")),
        (BROKER_AUTH_SECRET, "wrong-password", (200, "deny")),
        (
            "not-the-broker-secret-at-all",
            broker_pw.as_str(),
            (401, ""),
        ),
    ] {
        let r = s
            .client
            .post(format!(
                "{}/brokerAuth/default/{HUB_BROKER}/rabbitmq/user",
                s.base
            ))
            .header("authorization", format!("Bearer {secret}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "username=sec-broker&vhost=%2F&password={}",
                percent_encoding::utf8_percent_encode(pw, percent_encoding::NON_ALPHANUMERIC)
            ))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, want.0, "{text}");
        if status == 200 {
            assert_eq!(text, want.1);
        }
    }

    // A device token's signature must not leak either: the device reads its own state with it.
    let device_tok = device_token(SCOPE, "sec-dev-1", ENROLL_PRIMARY);
    let r = s
        .call(
            Method::POST,
            &format!("/{SCOPE}/registrations/sec-dev-1?api-version=2019-03-31"),
            Some(&device_tok),
            Some(json!({"registrationId": "sec-dev-1"})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    let secrets: Vec<(String, &'static str)> = vec![
        (OWNER_KEY.into(), "owner policy key"),
        (READER_KEY.into(), "reader policy key"),
        (POLICY_KEY.into(), "secretpolicy key"),
        (ENROLL_PRIMARY.into(), "enrollment primary key"),
        (ENROLL_SECONDARY.into(), "enrollment secondary key"),
        (GROUP_PRIMARY.into(), "group primary key"),
        (GROUP_SECONDARY.into(), "group secondary key"),
        (device_key.clone(), "derived device key"),
        (AZURE_HUB_KEY.into(), "azure hub SharedAccessKey"),
        (MQTT_PASSWORD.into(), "mosquitto password"),
        (HOOK_URL_PASSWORD.into(), "webhook URL password"),
        (WEBHOOK_SECRET.into(), "webhook options.secret"),
        (BROKER_AUTH_SECRET.into(), "broker-auth options.auth_secret"),
        (broker_pw.clone(), "a device's broker-auth password"),
        (KEY_FILE_SECRET.into(), "client key file contents"),
        (
            device_tok
                .rsplit("sig=")
                .next()
                .unwrap()
                .split('&')
                .next()
                .unwrap()
                .to_string(),
            "device SAS signature",
        ),
    ];

    // Every route that reads configuration back. (method, path, body)
    let routes: &[(Method, String, Option<Value>)] = &[
        (Method::GET, "/admin/instances".into(), None),
        (Method::GET, "/admin/instances/default".into(), None),
        (Method::GET, "/admin/instances/default/stats".into(), None),
        (
            Method::GET,
            "/admin/instances/default/linkedhubs".into(),
            None,
        ),
        (
            Method::GET,
            "/admin/instances/default/accesspolicies".into(),
            None,
        ),
        (
            Method::GET,
            format!("/admin/instances/default/hubs/{HUB_REGISTRY}/devices"),
            None,
        ),
        (
            Method::GET,
            format!("/admin/instances/default/hubs/{HUB_REGISTRY}/devices/sec-dev-1"),
            None,
        ),
        (
            Method::GET,
            format!("/admin/instances/default/hubs/{HUB_REGISTRY}/devices/sec-grp-dev-1"),
            None,
        ),
        (
            Method::GET,
            "/admin/instances/default/certificates".into(),
            None,
        ),
        (
            Method::GET,
            "/admin/instances/default/denylist".into(),
            None,
        ),
        (Method::GET, "/admin/audit?limit=10000".into(), None),
        (Method::GET, "/enrollments/sec-dev-1".into(), None),
        (
            Method::POST,
            "/enrollments/query".into(),
            Some(json!({"query": "*"})),
        ),
        (Method::GET, "/enrollmentGroups/sec-grp".into(), None),
        (
            Method::POST,
            "/enrollmentGroups/query".into(),
            Some(json!({"query": "*"})),
        ),
        (Method::GET, "/registrations/sec-dev-1".into(), None),
        (Method::GET, "/registrations/sec-grp-dev-1".into(), None),
        (Method::GET, "/registrations/sec-hook".into(), None),
        (
            Method::POST,
            "/registrations/sec-grp/query".into(),
            Some(json!({"query": "*"})),
        ),
    ];
    for (m, path, body) in routes {
        let r = s
            .call(m.clone(), path, Some(&owner), body.clone(), &[])
            .await;
        assert_eq!(r.status, 200, "{m} {path}: {}", r.body);
        let text = r.body.to_string();
        assert!(
            leaked(&text, &secrets).is_none(),
            "{m} {path} leaks the {}: {text}",
            leaked(&text, &secrets).unwrap()
        );
    }
    // The metrics carry no secret either.
    let metrics = reqwest::get(format!("http://{}/metrics", s.server.admin.unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(leaked(&metrics, &secrets), None, "metrics leak");

    // The CLI's list and show commands.
    let cs = format!("HostName=localhost;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={OWNER_KEY}");
    let cli: &[&[&str]] = &[
        &["instance", "list"],
        &["instance", "show", "default"],
        &["linked-hub", "list"],
        &["access-policy", "list"],
        &["enrollment", "list"],
        &["enrollment", "show", "sec-dev-1"],
        &["enrollment-group", "list"],
        &["enrollment-group", "show", "sec-grp"],
        &["registration", "show", "sec-dev-1"],
        &["registration", "list", "--group", "sec-grp"],
        &["hub", "device", "list", "--hub", HUB_REGISTRY],
        &["hub", "device", "show", "sec-dev-1", "--hub", HUB_REGISTRY],
        &["audit", "list", "--limit", "10000"],
    ];
    for args in cli {
        for output in ["json", "table"] {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dps"));
            cmd.args(["--output", output])
                .args(*args)
                .env("DPS_CONNECTION_STRING", &cs)
                .env("DPS_URL", &s.base)
                .env("DPS_CA_FILE", s.dir.path().join("ca.pem"));
            let out = tokio::task::spawn_blocking(move || cmd.output().expect("run dps"))
                .await
                .unwrap();
            let (stdout, stderr) = (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
            assert!(out.status.success(), "dps {args:?} failed: {stderr}");
            assert!(!stdout.trim().is_empty(), "dps {args:?} printed nothing");
            for text in [&stdout, &stderr] {
                assert!(
                    leaked(text, &secrets).is_none(),
                    "dps --output {output} {args:?} leaks the {}: {text}",
                    leaked(text, &secrets).unwrap()
                );
            }
        }
    }

    // GET → modify → PUT round trips keep the stored secrets.
    let hubs = s
        .call(
            Method::GET,
            "/admin/instances/default/linkedhubs",
            Some(&owner),
            None,
            &[],
        )
        .await
        .body;
    let mut hook = hubs
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == HUB_HOOK)
        .cloned()
        .unwrap();
    assert_eq!(hook["options"]["secret"], "<redacted>", "{hook}");
    assert_eq!(hook["connection_string"], "<redacted>", "{hook}");
    hook.as_object_mut().unwrap().remove("health");
    hook["options"]["retries"] = json!(2);
    let r = s
        .call(
            Method::PUT,
            &format!("/admin/instances/default/linkedhubs/{HUB_HOOK}"),
            Some(&owner),
            Some(hook),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let stored = s.server.app.instances.by_name("default").unwrap();
    let h = stored.hub(HUB_HOOK).unwrap();
    assert_eq!(
        h.options["secret"], WEBHOOK_SECRET,
        "the webhook secret is kept"
    );
    assert_eq!(h.options["retries"], 2, "the change is applied");
    assert_eq!(
        h.connection_string.as_deref(),
        Some(format!("http://hook:{HOOK_URL_PASSWORD}@127.0.0.1:{closed}/hook").as_str())
    );
    // The whole instance, written back as read.
    let mut whole = s
        .call(
            Method::GET,
            "/admin/instances/default",
            Some(&owner),
            None,
            &[],
        )
        .await
        .body;
    whole["hostnames"] = json!(["localhost", "dps.example.net"]);
    let r = s
        .call(
            Method::PUT,
            "/admin/instances/default",
            Some(&owner),
            Some(whole),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        leaked(&r.body["linked_hub"].to_string(), &secrets).is_none(),
        "the instance PUT answer shows no hub secret: {}",
        r.body
    );
    let stored = s.server.app.instances.by_name("default").unwrap();
    assert_eq!(
        stored.policy("secretpolicy").unwrap().primary_key,
        POLICY_KEY
    );
    assert_eq!(
        stored.hub(HUB_HOOK).unwrap().options["secret"],
        WEBHOOK_SECRET
    );
    assert_eq!(
        stored
            .hub(HUB_AZURE)
            .unwrap()
            .connection_string
            .as_deref()
            .unwrap(),
        format!(
            "HostName={HUB_AZURE};SharedAccessKeyName=iothubowner;SharedAccessKey={AZURE_HUB_KEY}"
        )
    );
    // An access policy written back: its keys still sign tokens.
    let policies = s
        .call(
            Method::GET,
            "/admin/instances/default/accesspolicies",
            Some(&owner),
            None,
            &[],
        )
        .await
        .body;
    let mut p = policies
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "secretpolicy")
        .cloned()
        .unwrap();
    assert_eq!(p["primary_key"], "<redacted>");
    p["rights"] = json!(["ServiceConfig", "EnrollmentRead", "EnrollmentWrite"]);
    let r = s
        .call(
            Method::PUT,
            "/admin/instances/default/accesspolicies/secretpolicy",
            Some(&owner),
            Some(p),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let tok = service_token("localhost", "secretpolicy", POLICY_KEY);
    let r = s
        .call(Method::GET, "/enrollments/sec-dev-1", Some(&tok), None, &[])
        .await;
    assert_eq!(r.status, 200, "the kept key still signs: {}", r.body);
    // An enrollment written back with placeholder keys keeps its keys.
    let mut e = s
        .call(
            Method::GET,
            "/enrollments/sec-dev-1",
            Some(&owner),
            None,
            &[],
        )
        .await
        .body;
    e["attestation"]["symmetricKey"] =
        json!({"primaryKey": "<redacted>", "secondaryKey": "<redacted>"});
    let etag = e["etag"].as_str().unwrap().to_string();
    let r = s
        .call(
            Method::PUT,
            "/enrollments/sec-dev-1",
            Some(&owner),
            Some(e),
            &[("if-match", &etag)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let m = s
        .call(
            Method::POST,
            "/enrollments/sec-dev-1/attestationmechanism",
            Some(&owner),
            None,
            &[],
        )
        .await;
    assert_eq!(
        m.body["symmetricKey"]["primaryKey"], ENROLL_PRIMARY,
        "{}",
        m.body
    );
    assert_eq!(
        m.body["symmetricKey"]["secondaryKey"], ENROLL_SECONDARY,
        "{}",
        m.body
    );
    // A placeholder with nothing stored behind it is refused, not stored.
    let r = s
        .call(
            Method::PUT,
            "/admin/instances/default/linkedhubs/new-hub.example.net",
            Some(&owner),
            Some(json!({"kind": "webhook", "connection_string": "<redacted>"})),
            &[],
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);

    // The audit log (written after the round trips too) and every log line.
    let r = s
        .call(
            Method::GET,
            "/admin/audit?limit=10000",
            Some(&owner),
            None,
            &[],
        )
        .await;
    let text = r.body.to_string();
    assert!(text.contains("linked_hub.put"), "{text}");
    assert_eq!(leaked(&text, &secrets), None, "the audit log leaks: {text}");
    let log = logs.text();
    assert!(
        log.contains("registration refused") && log.contains("DEBUG"),
        "the capture must hold the server's debug logs: {log}"
    );
    for line in log.lines() {
        assert!(
            leaked(line, &secrets).is_none(),
            "a log line leaks the {}: {line}",
            leaked(line, &secrets).unwrap()
        );
    }
}

//! Lifecycle events: the outbox and its sinks against real receivers (an HTTPS webhook with a
//! self-signed certificate in the test, Mosquitto on 1883, NATS on 4222), signature and retry,
//! dead letters, nothing written without a sink, and a `kill -9` of the real binary mid-burst
//! after which every registration a client saw `assigned` has its event delivered.

use crate::support::*;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use dps_server::config::{EventSinkConfig, EventSinkKind};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "events-hmac-secret";

/// A local HTTPS receiver with a self-signed certificate: checks the signature, fails on demand.
struct Receiver {
    url: String,
    ca_file: std::path::PathBuf,
    state: Arc<RecvState>,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct RecvState {
    /// Verified events, in arrival order (duplicates included).
    events: Mutex<Vec<Value>>,
    bad_signatures: AtomicU32,
    /// Answer the next N requests with 503.
    fail_next: AtomicU32,
    /// Answer every request with 500.
    always_fail: AtomicU32,
    hits: AtomicU32,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(State(st): State<Arc<RecvState>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    st.hits.fetch_add(1, Ordering::SeqCst);
    let want = format!(
        "sha256={}",
        hex::encode(dps_core::sas::hmac_sha256(SECRET.as_bytes(), &body))
    );
    let sig = headers
        .get("x-dps-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if sig != want {
        st.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    assert!(headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/cloudevents+json")));
    if st.always_fail.load(Ordering::SeqCst) > 0 {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    if st.fail_next.load(Ordering::SeqCst) > 0 {
        st.fail_next.fetch_sub(1, Ordering::SeqCst);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let v: Value = serde_json::from_slice(&body).expect("json event");
    st.events.lock().unwrap().push(v);
    StatusCode::NO_CONTENT
}

impl Receiver {
    async fn start() -> Receiver {
        let state = Arc::new(RecvState::default());
        let app = axum::Router::new()
            .route("/events", axum::routing::post(receive))
            .with_state(state.clone());
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let key =
            rustls_pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).expect("key");
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("receiver-ca.pem");
        std::fs::write(&ca_file, ck.cert.pem()).unwrap();
        Receiver {
            url: format!("https://localhost:{port}/events"),
            ca_file,
            state,
            _dir: dir,
            task,
        }
    }

    fn sink(&self) -> EventSinkConfig {
        EventSinkConfig {
            kind: EventSinkKind::Webhook,
            url: self.url.clone(),
            secret: Some(SECRET.into()),
            ca_file: Some(self.ca_file.clone()),
            topic: None,
            subject: None,
            username: None,
            password: None,
            timeout_ms: 2000,
        }
    }

    fn events(&self) -> Vec<Value> {
        self.state.events.lock().unwrap().clone()
    }

    /// Wait until an event of `ty` about `subject` arrived; returns it.
    async fn wait_for(&self, ty: &str, subject: &str) -> Value {
        eventually(Duration::from_secs(20), || async {
            self.events()
                .into_iter()
                .find(|e| e["type"] == ty && e["subject"] == subject)
                .ok_or_else(|| format!("no {ty} for {subject} yet: {:?}", self.events().len()))
        })
        .await
    }
}

/// Fast retries for tests.
fn fast(cfg: &mut dps_server::config::Config) {
    cfg.events.interval_ms = 50;
    cfg.events.initial_backoff_ms = 20;
    cfg.events.max_backoff_ms = 200;
}

fn check_cloud_event(e: &Value) {
    assert_eq!(e["specversion"], "1.0", "{e}");
    assert_eq!(e["source"], "/instances/default", "{e}");
    assert_eq!(e["datacontenttype"], "application/json", "{e}");
    assert_eq!(e["id"].as_str().map(str::len), Some(32), "{e}");
    assert!(e["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_https_webhook_gets_signed_cloud_events_retried_until_it_takes_them() {
    let rx = Receiver::start().await;
    // The first three deliveries fail: they are retried with backoff.
    rx.state.fail_next.store(3, Ordering::SeqCst);
    let s = TestServer::spawn_with(|c| {
        fast(c);
        c.events.sink = vec![rx.sink()];
    })
    .await;
    let key = s.enroll("ev-dev-1", json!({})).await;
    let r = s.register("ev-dev-1", &key, None).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    let created = rx.wait_for("io.dps.enrollment.created", "ev-dev-1").await;
    let assigned = rx
        .wait_for("io.dps.registration.assigned", "ev-dev-1")
        .await;
    check_cloud_event(&created);
    check_cloud_event(&assigned);
    assert_eq!(
        assigned["data"]["after"]["state"]["assignedHub"],
        r.body["registrationState"]["assignedHub"]
    );
    // No secret leaves: the enrollment's key is redacted.
    let all = serde_json::to_string(&rx.events()).unwrap();
    assert!(
        !all.contains(&key),
        "the enrollment key leaked into an event"
    );
    assert_eq!(
        created["data"]["after"]["attestation"]["symmetricKey"]["primaryKey"],
        "<redacted>"
    );
    assert!(rx.state.hits.load(Ordering::SeqCst) >= 5);
    assert_eq!(rx.state.bad_signatures.load(Ordering::SeqCst), 0);
    // A refused attempt (wrong key) and a deletion are events too.
    let bad = s
        .register(
            "ev-dev-1",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            None,
        )
        .await;
    assert_eq!(bad.status, 401, "{}", bad.body);
    rx.wait_for("io.dps.registration.refused", "ev-dev-1").await;
    let d = s
        .call(
            reqwest::Method::DELETE,
            "/enrollments/ev-dev-1",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    assert_eq!(d.status, 204, "{}", d.body);
    rx.wait_for("io.dps.enrollment.deleted", "ev-dev-1").await;
    // A device re-provisioned to another hub: assigned, and moved.
    let keys = (
        "bW92ZS1wcmltYXJ5LWtleS0wMTIzNDU2Nzg5YWJjZGVm".to_string(),
        "bW92ZS1zZWNvbmRhcnkta2V5LTAxMjM0NTY3ODlhYmNk".to_string(),
    );
    s.enroll(
        "ev-move-1",
        json!({"iotHubs": ["hub-a.example.net"], "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": keys.0, "secondaryKey": keys.1}}}),
    )
    .await;
    let r = s.register("ev-move-1", &keys.0, None).await;
    assert_eq!(
        r.body["registrationState"]["assignedHub"],
        "hub-a.example.net"
    );
    set_hubs(&s, "ev-move-1", &keys, json!(["hub-b.example.net"])).await;
    rx.wait_for("io.dps.enrollment.updated", "ev-move-1").await;
    let r = s.register("ev-move-1", &keys.0, None).await;
    assert_eq!(
        r.body["registrationState"]["assignedHub"],
        "hub-b.example.net"
    );
    let moved = rx.wait_for("io.dps.device.moved", "ev-move-1").await;
    check_cloud_event(&moved);
    assert_eq!(moved["data"]["fromHub"], "hub-a.example.net", "{moved}");
    assert_eq!(moved["data"]["toHub"], "hub-b.example.net", "{moved}");
    assert!(!serde_json::to_string(&rx.events())
        .unwrap()
        .contains(&keys.0));
    // The outbox drains and the metrics say so.
    let text = eventually(Duration::from_secs(10), || async {
        let t = scrape(&s).await;
        if sample(&t, "dps_events_outbox_depth", &[]) == 0.0 {
            Ok(t)
        } else {
            Err("outbox not empty".to_string())
        }
    })
    .await;
    assert!(sample(&text, "dps_events_delivered_total", &[("sink", "webhook")]) >= 4.0);
    assert!(sample(&text, "dps_events_failed_total", &[("sink", "webhook")]) >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sink_that_keeps_failing_dead_letters_after_max_attempts() {
    let rx = Receiver::start().await;
    rx.state.always_fail.store(1, Ordering::SeqCst);
    let s = TestServer::spawn_with(|c| {
        fast(c);
        c.events.max_attempts = 3;
        c.events.sink = vec![rx.sink()];
    })
    .await;
    let before = sample(
        &scrape(&s).await,
        "dps_events_dead_lettered_total",
        &[("sink", "webhook")],
    );
    s.enroll("ev-dead-1", json!({})).await;
    // Three attempts, then the event leaves the outbox as a dead letter.
    eventually(Duration::from_secs(20), || async {
        let t = scrape(&s).await;
        let n = sample(&t, "dps_events_dead_lettered_total", &[("sink", "webhook")]);
        if n > before {
            Ok(())
        } else {
            Err(format!("dead letters {n}"))
        }
    })
    .await;
    assert!(rx.state.hits.load(Ordering::SeqCst) >= 3);
    assert!(rx.events().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_sink_nothing_is_written_to_the_outbox() {
    let s = TestServer::spawn().await;
    let key = s.enroll("ev-none-1", json!({})).await;
    let r = s.register("ev-none-1", &key, None).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    // The same database, read beside the server.
    let store = dps_store::open_backend("", s.dir.path())
        .await
        .unwrap()
        .store();
    assert_eq!(store.count_events().await.unwrap(), 0);
    // The audit log has the facts.
    assert!(!s.audit_for("ev-none-1").await.is_empty());
}

fn service_required(what: &str, addr: &str) -> bool {
    if std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1)).is_ok()
    {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} is not running on {addr} (required under CI=true)"
    );
    eprintln!("skipped: {what} is not running on {addr}");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_mqtt_topic_on_mosquitto_gets_the_events() {
    if !service_required("Mosquitto", "127.0.0.1:1883") {
        return;
    }
    let topic = format!("dps-test/events/{}", uuid::Uuid::new_v4().simple());
    // Subscribe first.
    let mut opts = rumqttc::MqttOptions::new(
        format!("sub-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        "127.0.0.1",
        1883,
    );
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 16);
    client
        .subscribe(topic.clone(), rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let got = Arc::new(Mutex::new(Vec::<Value>::new()));
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let sink_got = got.clone();
    let poller = tokio::spawn(async move {
        let mut tx = Some(subscribed_tx);
        while let Ok(ev) = el.poll().await {
            match ev {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                    if let Some(t) = tx.take() {
                        let _ = t.send(());
                    }
                }
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    sink_got
                        .lock()
                        .unwrap()
                        .push(serde_json::from_slice(&p.payload).unwrap());
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
        .await
        .expect("suback in time")
        .unwrap();
    let t = topic.clone();
    let s = TestServer::spawn_with(move |c| {
        fast(c);
        c.events.sink = vec![EventSinkConfig {
            kind: EventSinkKind::Mqtt,
            url: "mqtt://127.0.0.1:1883".into(),
            secret: None,
            ca_file: None,
            topic: Some(t),
            subject: None,
            username: None,
            password: None,
            timeout_ms: 5000,
        }];
    })
    .await;
    let key = s.enroll("ev-mqtt-1", json!({})).await;
    let r = s.register("ev-mqtt-1", &key, None).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    let ev = eventually(Duration::from_secs(20), || async {
        got.lock()
            .unwrap()
            .iter()
            .find(|e| e["type"] == "io.dps.registration.assigned" && e["subject"] == "ev-mqtt-1")
            .cloned()
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    check_cloud_event(&ev);
    assert!(got
        .lock()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "io.dps.enrollment.created"));
    poller.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_subject_gets_the_events() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    if !service_required("NATS", "127.0.0.1:4222") {
        return;
    }
    let subject = format!("dps.test.events.{}", uuid::Uuid::new_v4().simple());
    let tcp = tokio::net::TcpStream::connect("127.0.0.1:4222")
        .await
        .unwrap();
    let (r, mut w) = tcp.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("INFO "), "{line}");
    w.write_all(format!("CONNECT {{\"verbose\":false}}\r\nSUB {subject} 1\r\nPING\r\n").as_bytes())
        .await
        .unwrap();
    // PONG: the subscription is in place.
    loop {
        line.clear();
        r.read_line(&mut line).await.unwrap();
        if line.trim() == "PONG" {
            break;
        }
    }
    let got = Arc::new(Mutex::new(Vec::<Value>::new()));
    let sink_got = got.clone();
    let reader = tokio::spawn(async move {
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let l = line.trim_end();
            if l == "PING" {
                let _ = w.write_all(b"PONG\r\n").await;
            } else if let Some(rest) = l.strip_prefix("MSG ") {
                let n: usize = rest.rsplit(' ').next().unwrap().parse().unwrap();
                let mut buf = vec![0u8; n + 2];
                r.read_exact(&mut buf).await.unwrap();
                sink_got
                    .lock()
                    .unwrap()
                    .push(serde_json::from_slice(&buf[..n]).unwrap());
            }
        }
    });
    let subj = subject.clone();
    let s = TestServer::spawn_with(move |c| {
        fast(c);
        c.events.sink = vec![EventSinkConfig {
            kind: EventSinkKind::Nats,
            url: "nats://127.0.0.1:4222".into(),
            secret: None,
            ca_file: None,
            topic: None,
            subject: Some(subj),
            username: None,
            password: None,
            timeout_ms: 5000,
        }];
    })
    .await;
    let key = s.enroll("ev-nats-1", json!({})).await;
    let r = s.register("ev-nats-1", &key, None).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    let ev = eventually(Duration::from_secs(20), || async {
        got.lock()
            .unwrap()
            .iter()
            .find(|e| e["type"] == "io.dps.registration.assigned" && e["subject"] == "ev-nats-1")
            .cloned()
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    check_cloud_event(&ev);
    reader.abort();
}

// ------------------------------------------------------------------------------------------------
// kill -9 mid-burst

/// A `dps serve` process.
struct Proc {
    child: Option<std::process::Child>,
    https: std::net::SocketAddr,
    ca: String,
}

impl Proc {
    async fn start(dir: &std::path::Path) -> Proc {
        let run = dir.join("run.json");
        let _ = std::fs::remove_file(&run);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("dps.log"))
            .unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dps"))
            .args(["serve", "--config"])
            .arg(dir.join("dps.toml"))
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dps serve");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(&run) {
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    let ca = std::fs::read_to_string(v["ca"].as_str().unwrap()).unwrap();
                    return Proc {
                        child: Some(child),
                        https: v["https"].as_str().unwrap().parse().unwrap(),
                        ca,
                    };
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "dps serve exited ({status}): {}",
                    std::fs::read_to_string(dir.join("dps.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "dps serve did not start in 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().expect("reaped");
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Register `rid` through `base` (200 `immediate` answers); `Some(true)` when assigned,
/// `Some(false)` for another answer, `None` when the server went away.
async fn register_once(client: &reqwest::Client, base: &str, rid: &str, key: &str) -> Option<bool> {
    let tok = device_token(SCOPE, rid, key);
    let resp = client
        .put(format!(
            "{base}/{SCOPE}/registrations/{rid}/register?api-version=2019-03-31"
        ))
        .header("authorization", tok)
        .json(&json!({"registrationId": rid}))
        .send()
        .await
        .ok()?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.ok()?;
    Some(status == 200 && body["status"] == "assigned")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_assignment_a_client_saw_is_delivered_after_kill_9_mid_burst() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"data_dir = "{data}"

[listen]
https = "127.0.0.1:0"
mqtt = ""
amqp = ""
admin = ""

[events]
interval_ms = 50
initial_backoff_ms = 20
max_backoff_ms = 200

[[events.sink]]
kind = "webhook"
url = "{url}"
secret = "{SECRET}"
ca_file = "{ca}"

[[instance]]
name = "default"
id_scope = "{SCOPE}"
hostnames = ["localhost"]
register_response = "immediate"

[[instance.access_policy]]
name = "provisioningserviceowner"
primary_key = "{OWNER_KEY}"
secondary_key = "{READER_KEY}"
rights = ["ServiceConfig", "EnrollmentRead", "EnrollmentWrite", "RegistrationStatusRead", "RegistrationStatusWrite"]

[[instance.linked_hub]]
host = "hub-a.example.net"
kind = "registry"
"#,
        data = dir.path().display(),
        url = rx.url,
        ca = rx.ca_file.display(),
    );
    std::fs::write(dir.path().join("dps.toml"), toml).unwrap();
    let mut node = Proc::start(dir.path()).await;
    let client = client_trusting(&node.ca, None);
    let base = |p: &Proc| format!("https://localhost:{}", p.https.port());
    // A group whose devices register with derived keys.
    let group_key = {
        let r = client
            .put(format!(
                "{}/enrollmentGroups/burst?api-version=2021-10-01",
                base(&node)
            ))
            .header(
                "authorization",
                service_token("localhost", "provisioningserviceowner", OWNER_KEY),
            )
            .json(&json!({"enrollmentGroupId": "burst", "attestation": {"type": "symmetricKey"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        v["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // The burst: 16 workers register devices one after another; the node is killed once 150
    // devices were assigned.
    const DEVICES: usize = 600;
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let url = base(&node);
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (client, url, seen, next, gk) = (
            client.clone(),
            url.clone(),
            seen.clone(),
            next.clone(),
            group_key.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= DEVICES {
                    return;
                }
                let rid = format!("burst-{i:04}");
                let key = derive_key(&gk, &rid);
                match register_once(&client, &url, &rid, &key).await {
                    Some(true) => {
                        seen.lock().unwrap().insert(rid);
                    }
                    Some(false) => {}
                    None => return, // the server is gone
                }
            }
        }));
    }
    eventually(Duration::from_secs(60), || async {
        let n = seen.lock().unwrap().len();
        if n >= 150 {
            Ok(())
        } else {
            Err(format!("{n} assigned"))
        }
    })
    .await;
    node.kill9();
    for w in workers {
        let _ = w.await;
    }
    let saw: HashSet<String> = seen.lock().unwrap().clone();
    let delivered_before = rx
        .events()
        .iter()
        .filter(|e| e["type"] == "io.dps.registration.assigned")
        .count();
    eprintln!(
        "killed after {} assignments seen by clients; {} assigned events delivered before the kill",
        saw.len(),
        delivered_before
    );
    // Restart: the outbox is delivered.
    let node2 = Proc::start(dir.path()).await;
    let missing = eventually(Duration::from_secs(60), || async {
        let got: HashSet<String> = rx
            .events()
            .iter()
            .filter(|e| e["type"] == "io.dps.registration.assigned")
            .filter_map(|e| e["subject"].as_str().map(str::to_owned))
            .collect();
        let missing: Vec<&String> = saw.iter().filter(|r| !got.contains(*r)).collect();
        if missing.is_empty() {
            Ok(missing.len())
        } else {
            Err(format!(
                "{} assignments without an event, e.g. {:?}",
                missing.len(),
                missing.first()
            ))
        }
    })
    .await;
    assert_eq!(missing, 0);
    // Duplicates (at least once) share their id and their content.
    let mut by_id: HashMap<String, Value> = HashMap::new();
    let mut duplicates = 0;
    for e in rx.events() {
        let id = e["id"].as_str().unwrap().to_string();
        if let Some(prev) = by_id.insert(id, e.clone()) {
            assert_eq!(prev, e, "one id, one event");
            duplicates += 1;
        }
    }
    eprintln!(
        "{} events received, {} distinct ids, {duplicates} duplicates",
        rx.events().len(),
        by_id.len()
    );
    assert_eq!(rx.state.bad_signatures.load(Ordering::SeqCst), 0);
    drop(node2);
}

// ------------------------------------------------------------------------------------------------
// dps events tail

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tail_shows_the_same_events_as_the_sinks_and_waits_for_new_ones() {
    let rx = Receiver::start().await;
    let s = TestServer::spawn_with(|c| {
        fast(c);
        c.events.sink = vec![rx.sink()];
    })
    .await;
    let key = s.enroll("ev-tail-1", json!({})).await;
    let r = s.register("ev-tail-1", &key, None).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    let sent = rx
        .wait_for("io.dps.registration.assigned", "ev-tail-1")
        .await;
    let tail = |q: String| {
        let s = &s;
        async move {
            s.call(
                reqwest::Method::GET,
                &format!("/admin/events?{q}"),
                Some(&s.owner()),
                None,
                &[],
            )
            .await
        }
    };
    let r = tail("since=2000-01-01&type=io.dps.registration.&limit=1000".into()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let events = r.body["events"].as_array().unwrap();
    assert!(events.iter().all(|e| e["type"]
        .as_str()
        .unwrap()
        .starts_with("io.dps.registration.")));
    let shown = events
        .iter()
        .find(|e| e["subject"] == "ev-tail-1" && e["type"] == "io.dps.registration.assigned")
        .expect("the assignment in the tail");
    assert_eq!(shown["id"], sent["id"], "one id for the tail and the sinks");
    assert_eq!(shown, &sent);
    let next = r.body["next"].as_i64().expect("a cursor");
    // Nothing new: a long poll waits, then answers empty with the same cursor.
    let t0 = Instant::now();
    let r = tail(format!("after={next}&wait=1")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body["events"].as_array().unwrap().is_empty(),
        "{}",
        r.body
    );
    assert!(t0.elapsed() >= Duration::from_millis(900));
    // A long poll answers as soon as an event arrives.
    let waiting = {
        let q = format!("after={next}&wait=30");
        let client = s.client.clone();
        let url = format!("{}/admin/events?{q}", s.base);
        let tok = s.owner();
        tokio::spawn(async move {
            let r = client
                .get(url)
                .header("authorization", tok)
                .send()
                .await
                .unwrap();
            r.json::<Value>().await.unwrap()
        })
    };
    s.enroll("ev-tail-2", json!({})).await;
    let got = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("answered before its wait ran out")
        .unwrap();
    assert_eq!(
        got["events"][0]["type"], "io.dps.enrollment.created",
        "{got}"
    );
    assert_eq!(got["events"][0]["subject"], "ev-tail-2", "{got}");
    // Bad input is a clear 400.
    let r = tail("wait=600".into()).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = tail("after=abc".into()).await;
    assert_eq!(r.status, 400, "{}", r.body);
    // A policy without ServiceConfig may not tail.
    let reader = service_token("localhost", "reader", READER_KEY);
    let r = s
        .call(
            reqwest::Method::GET,
            "/admin/events",
            Some(&reader),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.body);
    // The CLI prints them, one JSON event per line.
    let cs = format!(
        "HostName=localhost;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={OWNER_KEY}"
    );
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dps"));
    cmd.args([
        "events",
        "tail",
        "--since",
        "2000-01-01T00:00:00Z",
        "--type",
        "io.dps.enrollment.created",
        "--count",
        "2",
    ])
    .env("DPS_CONNECTION_STRING", cs)
    .env("DPS_URL", &s.base)
    .env("DPS_CA_FILE", s.dir.path().join("ca.pem"));
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run dps"))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    let subjects: Vec<&str> = lines
        .iter()
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    assert_eq!(subjects, ["ev-tail-1", "ev-tail-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hub_that_goes_down_is_a_hub_health_event_and_failures_are_events() {
    let rx = Receiver::start().await;
    let hook = crate::support_webhook::FakeWebhook::start().await;
    hook.state.always.store(503, Ordering::SeqCst);
    let hub = hook.linked_hub("hooked.example.net");
    let sink = rx.sink();
    let s = TestServer::spawn_with(move |c| {
        fast(c);
        c.events.sink = vec![sink];
        c.instances[0].linked_hub = vec![hub];
        c.instances[0].register_response = dps_core::instance::RegisterResponse::Immediate;
    })
    .await;
    for i in 0..3 {
        let rid = format!("ev-down-{i}");
        let key = s.enroll(&rid, json!({})).await;
        let r = s.register(&rid, &key, None).await;
        assert_ne!(r.body["status"], "assigned", "{}", r.body);
    }
    let failed = rx.wait_for("io.dps.registration.failed", "ev-down-0").await;
    check_cloud_event(&failed);
    let health = rx.wait_for("io.dps.hub.health", "hooked.example.net").await;
    check_cloud_event(&health);
    assert_eq!(health["data"]["healthy"], false, "{health}");
    assert_eq!(health["data"]["hub"], "hooked.example.net", "{health}");
}

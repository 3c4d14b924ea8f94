//! The outbound policy (`[outbound]`) on the real server: which webhook URLs an enrollment or a
//! linked hub may name, what dps connects to after resolving a name, redirects, the size of an
//! answer it reads; and the files holding secrets.

use crate::support::*;
use crate::support_webhook::webhook_hub;
use axum::body::Body;
use axum::response::Response;
use reqwest::Method;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

const HUB_A: &str = "hub-a.example.net";

/// How the test webhook answers `POST /alloc`.
#[derive(Clone, Copy)]
enum Answer {
    /// `{"iotHubHostName": HUB_A}`.
    Hub,
    /// 5 MiB of JSON, with its `Content-Length`.
    Huge,
    /// 5 MiB of JSON in chunks, without a `Content-Length`.
    HugeStreamed,
    /// `307` to `/target` (which would answer `Hub`).
    Redirect,
}

/// A real HTTP server on 127.0.0.1:0: `/alloc` answers as told, `/target` answers a hub; both
/// count their requests.
struct Hook {
    port: u16,
    alloc_hits: Arc<AtomicU32>,
    target_hits: Arc<AtomicU32>,
}

const FIVE_MIB: usize = 5 * 1024 * 1024;

fn huge_json() -> Vec<u8> {
    let mut v = br#"{"iotHubHostName":"hub-a.example.net","pad":""#.to_vec();
    v.resize(FIVE_MIB, b'x');
    v.extend_from_slice(br#""}"#);
    v
}

fn answer(a: Answer) -> Response {
    let json = |b: Vec<u8>| {
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from(b))
            .unwrap()
    };
    match a {
        Answer::Hub => json(json!({"iotHubHostName": HUB_A}).to_string().into_bytes()),
        Answer::Huge => json(huge_json()),
        Answer::HugeStreamed => {
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> = huge_json()
                .chunks(64 * 1024)
                .map(|c| Ok(c.to_vec()))
                .collect();
            Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Body::from_stream(futures::stream::iter(chunks)))
                .unwrap()
        }
        Answer::Redirect => Response::builder()
            .status(307)
            .header("location", "/target")
            .body(Body::empty())
            .unwrap(),
    }
}

async fn hook(a: Answer) -> Hook {
    let alloc_hits = Arc::new(AtomicU32::new(0));
    let target_hits = Arc::new(AtomicU32::new(0));
    let (ah, th) = (alloc_hits.clone(), target_hits.clone());
    let app = axum::Router::new()
        .route(
            "/alloc",
            axum::routing::post(move || async move {
                ah.fetch_add(1, Ordering::SeqCst);
                answer(a)
            }),
        )
        .route(
            "/target",
            axum::routing::any(move || async move {
                th.fetch_add(1, Ordering::SeqCst);
                answer(Answer::Hub)
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    Hook {
        port,
        alloc_hits,
        target_hits,
    }
}

fn custom(url: &str) -> Value {
    json!({"allocationPolicy": "custom", "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"}})
}

/// PUT an enrollment (or group) with this webhook URL.
async fn put_with_webhook(s: &TestServer, id: &str, url: &str, group: bool) -> Resp {
    let (path, mut body) = if group {
        (
            format!("/enrollmentGroups/{id}"),
            json!({"enrollmentGroupId": id, "attestation": {"type": "symmetricKey"}}),
        )
    } else {
        (
            format!("/enrollments/{id}"),
            json!({"registrationId": id, "attestation": {"type": "symmetricKey"}}),
        )
    };
    merge(&mut body, custom(url));
    s.call(Method::PUT, &path, Some(&s.owner()), Some(body), &[])
        .await
}

/// The primary key of the enrollment a PUT answered with.
fn primary_key(r: &Resp) -> String {
    r.body["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("primary key in the PUT answer")
        .to_string()
}

/// The final answer of a registration that failed with 400207, and the operator's reason (from
/// the audit log's `registration.failed` entry).
async fn failed_custom_allocation(s: &TestServer, rid: &str, key: &str) -> String {
    let r = s.register(rid, key, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "failed", "{}", r.body);
    assert_eq!(
        r.body["registrationState"]["errorCode"], 400207,
        "{}",
        r.body
    );
    failure_reason(s, rid).await
}

async fn failure_reason(s: &TestServer, rid: &str) -> String {
    let audit = s.audit_for(rid).await;
    let entry = audit
        .iter()
        .rev()
        .find(|e| e["action"] == "registration.failed")
        .unwrap_or_else(|| panic!("no registration.failed entry: {audit:?}"));
    entry.to_string()
}

#[tokio::test]
async fn metadata_and_link_local_webhook_urls_are_refused_at_put_even_with_private_allowed() {
    // The test config allows private addresses: these are refused regardless.
    let s = TestServer::spawn().await;
    for (i, (url, words)) in [
        (
            "http://169.254.169.254/latest/meta-data/iam",
            "cloud metadata",
        ),
        ("http://[fd00:ec2::254]/", "cloud metadata"),
        (
            "http://metadata.google.internal/computeMetadata/v1/",
            "cloud metadata",
        ),
        ("http://2852039166/", "cloud metadata"),
        ("http://169.254.10.1/alloc", "link-local"),
        ("http://[fe80::1]:8080/alloc", "link-local"),
    ]
    .into_iter()
    .enumerate()
    {
        for group in [false, true] {
            let r = put_with_webhook(&s, &format!("meta-{i}"), url, group).await;
            assert_error(&r, 400, None);
            let msg = r.body["message"].as_str().unwrap_or_default();
            assert!(
                msg.contains("customAllocationDefinition.webhookUrl") && msg.contains(words),
                "{url}: {msg}"
            );
        }
    }
    assert!(s.registration_record("meta-0").await.status == 404);

    // A linked hub through the admin API: the same rules.
    let mut hub = serde_json::to_value(webhook_hub(
        "meta-hub.example.net",
        "http://169.254.169.254/hook",
    ))
    .unwrap();
    hub.as_object_mut().unwrap().remove("host");
    let r = s
        .call(
            Method::PUT,
            "/admin/instances/default/linkedHubs/meta-hub.example.net",
            Some(&s.owner()),
            Some(hub),
            &[],
        )
        .await;
    assert_error(&r, 400, None);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("cloud metadata"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn private_webhook_urls_are_refused_by_default_and_allowed_with_the_flag() {
    let h = hook(Answer::Hub).await;
    let url = format!("http://127.0.0.1:{}/alloc", h.port);

    let strict = TestServer::spawn_with(|c| c.outbound.allow_private_addresses = false).await;
    for u in [
        url.as_str(),
        "http://[::1]/alloc",
        "https://10.1.2.3/alloc",
        "http://192.168.0.10/alloc",
    ] {
        let r = put_with_webhook(&strict, "priv-1", u, false).await;
        assert_error(&r, 400, None);
        let msg = r.body["message"].as_str().unwrap_or_default();
        assert!(msg.contains("allow_private_addresses"), "{u}: {msg}");
    }
    // A public URL is fine.
    let r = put_with_webhook(&strict, "pub-1", "https://alloc.example.com/api", false).await;
    assert_eq!(r.status, 200, "{}", r.body);

    let open = TestServer::spawn_with(|c| c.outbound.allow_private_addresses = true).await;
    let r = put_with_webhook(&open, "priv-1", &url, false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let key = primary_key(&r);
    let r = open.register("priv-1", &key, None).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    assert_eq!(r.body["registrationState"]["assignedHub"], HUB_A);
    assert_eq!(h.alloc_hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_linked_webhook_hub_on_a_private_address_stops_the_start_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dps.toml");
    let hub = "[[instance]]\nname = \"default\"\n[[instance.linked_hub]]\nhost = \"hooks\"\n\
               kind = \"webhook\"\nconnection_string = \"http://127.0.0.1:9/hook\"\n";
    std::fs::write(&file, hub).unwrap();
    let e = dps_server::config::Config::load(Some(&file), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("linked hub 'hooks'") && e.contains("allow_private_addresses"),
        "{e}"
    );
    std::fs::write(
        &file,
        format!("[outbound]\nallow_private_addresses = true\n{hub}"),
    )
    .unwrap();
    dps_server::config::Config::load(Some(&file), &Default::default()).expect("allowed");
    // Metadata addresses stay refused with the flag.
    std::fs::write(
        &file,
        format!(
            "[outbound]\nallow_private_addresses = true\n{}",
            hub.replace("127.0.0.1:9", "169.254.169.254")
        ),
    )
    .unwrap();
    let e = dps_server::config::Config::load(Some(&file), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cloud metadata"), "{e}");
}

#[tokio::test]
async fn allowed_webhook_hosts_narrow_the_urls_and_the_calls() {
    let h = hook(Answer::Hub).await;
    let s = TestServer::spawn_with(|c| {
        c.outbound.allow_private_addresses = true;
        c.outbound.allowed_webhook_hosts = vec!["localhost".into(), "*.hooks.example".into()];
    })
    .await;
    for u in [
        "https://other.example.com/alloc".to_string(),
        "https://hooks.example/alloc".to_string(),
        format!("http://127.0.0.1:{}/alloc", h.port),
    ] {
        let r = put_with_webhook(&s, "list-1", &u, false).await;
        assert_error(&r, 400, None);
        let msg = r.body["message"].as_str().unwrap_or_default();
        assert!(msg.contains("allowed_webhook_hosts"), "{u}: {msg}");
    }
    let r = put_with_webhook(&s, "list-2", "https://a.hooks.example/alloc", true).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A listed host is called.
    let r = put_with_webhook(
        &s,
        "list-3",
        &format!("http://localhost:{}/alloc", h.port),
        false,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let key = primary_key(&r);
    let r = s.register("list-3", &key, None).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    assert_eq!(h.alloc_hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_host_name_resolving_to_a_refused_address_is_refused_at_connect() {
    let h = hook(Answer::Hub).await;
    let s = TestServer::spawn_with(|c| c.outbound.allow_private_addresses = false).await;
    // Names are not resolved when written: the PUT is accepted...
    let r = put_with_webhook(
        &s,
        "rebind-1",
        &format!("http://localhost:{}/alloc", h.port),
        false,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let key = primary_key(&r);
    // ...and the addresses it resolves to are refused when dps connects.
    let reason = failed_custom_allocation(&s, "rebind-1", &key).await;
    assert!(
        reason.contains("refused by the outbound policy")
            && reason.contains("localhost (")
            && reason.contains("loopback")
            && reason.contains("allow_private_addresses"),
        "{reason}"
    );
    assert_eq!(
        h.alloc_hits.load(Ordering::SeqCst),
        0,
        "the webhook was called"
    );

    // The same for a webhook linked hub: the registration fails at once, without retries.
    let hub = webhook_hub(
        "rebind-hub.example.net",
        &format!("http://localhost:{}/alloc", h.port),
    );
    let s = TestServer::spawn_with(move |c| {
        c.outbound.allow_private_addresses = false;
        c.instances[0].linked_hub = vec![hub];
    })
    .await;
    let key = s.enroll("rebind-2", json!({})).await;
    let r = s.register("rebind-2", &key, None).await;
    assert_eq!(r.body["status"], "failed", "{}", r.body);
    let reason = failure_reason(&s, "rebind-2").await;
    assert!(
        reason.contains("refused by the outbound policy") && reason.contains("loopback"),
        "{reason}"
    );
    assert_eq!(h.alloc_hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_webhook_answering_5_mib_is_cut_at_the_limit_and_the_registration_fails_cleanly() {
    let s = TestServer::spawn().await;
    for (i, a) in [Answer::Huge, Answer::HugeStreamed].into_iter().enumerate() {
        let h = hook(a).await;
        let rid = format!("huge-{i}");
        let r = put_with_webhook(
            &s,
            &rid,
            &format!("http://127.0.0.1:{}/alloc", h.port),
            false,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let key = primary_key(&r);
        let reason = failed_custom_allocation(&s, &rid, &key).await;
        assert!(
            reason.contains("max_response_bytes (1048576 bytes)"),
            "{reason}"
        );
        assert_eq!(h.alloc_hits.load(Ordering::SeqCst), 1);
    }
    // The server still serves.
    let key = s.enroll("after-huge", json!({})).await;
    assert_eq!(
        s.register("after-huge", &key, None).await.body["status"],
        "assigned"
    );

    // A webhook linked hub answering 5 MiB: the identity write fails as rejected.
    let h = hook(Answer::HugeStreamed).await;
    let hub = webhook_hub(
        "huge-hub.example.net",
        &format!("http://127.0.0.1:{}/alloc", h.port),
    );
    let s = TestServer::spawn_with(move |c| c.instances[0].linked_hub = vec![hub]).await;
    let key = s.enroll("huge-hub", json!({})).await;
    let r = s.register("huge-hub", &key, None).await;
    assert_eq!(r.body["status"], "failed", "{}", r.body);
    let reason = failure_reason(&s, "huge-hub").await;
    assert!(reason.contains("max_response_bytes"), "{reason}");
    assert_eq!(
        h.alloc_hits.load(Ordering::SeqCst),
        1,
        "rejected: not retried"
    );
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let h = hook(Answer::Redirect).await;
    let s = TestServer::spawn().await;
    let r = put_with_webhook(
        &s,
        "redir-1",
        &format!("http://127.0.0.1:{}/alloc", h.port),
        false,
    )
    .await;
    let key = primary_key(&r);
    let r = s.register("redir-1", &key, None).await;
    assert_eq!(r.body["status"], "failed", "{}", r.body);
    assert_eq!(
        r.body["registrationState"]["errorMessage"],
        "Custom allocation failed with status code: 307"
    );
    assert_eq!(h.alloc_hits.load(Ordering::SeqCst), 1);
    assert_eq!(
        h.target_hits.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );

    // A webhook linked hub: the 3xx is an answer, not a hop.
    let hub = webhook_hub(
        "redir-hub.example.net",
        &format!("http://127.0.0.1:{}/alloc", h.port),
    );
    let s = TestServer::spawn_with(move |c| c.instances[0].linked_hub = vec![hub]).await;
    let key = s.enroll("redir-2", json!({})).await;
    let r = s.register("redir-2", &key, None).await;
    assert_eq!(r.body["status"], "failed", "{}", r.body);
    assert!(failure_reason(&s, "redir-2").await.contains("HTTP 307"));
    assert_eq!(
        h.target_hits.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn keys_and_run_json_are_created_private_and_replaced_atomically() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let s = TestServer::spawn().await;
    let dir = s.dir.path().to_path_buf();
    for f in ["ca.key", "server.key", "run.json"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&dir.join("ca.pem")) & 0o600, 0o600);
    // A second start in the same folder replaces run.json (made world-readable meanwhile, and
    // held open by a reader) with a new, private file.
    let cfg = config(&dir);
    let run = dir.join("run.json");
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o644)).unwrap();
    let old = std::fs::read_to_string(&run).unwrap();
    let reader = std::fs::File::open(&run).unwrap();
    let TestServer {
        server, dir: tmp, ..
    } = s;
    drop(server);
    let again = dps_server::server::start(cfg).await.expect("restarts");
    assert_eq!(mode(&run), 0o600);
    let new: Value = serde_json::from_str(&std::fs::read_to_string(&run).unwrap()).unwrap();
    assert_eq!(new["https"], again.https.to_string());
    assert_eq!(std::io::read_to_string(reader).unwrap(), old);
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `dps serve` with a bad value: exit status 1, one line naming the key, nothing bound, no panic.
#[tokio::test]
async fn dps_serve_names_the_key_of_a_bad_value_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "data_dir = \"{}\"\n[listen]\nhttps = \"127.0.0.1:0\"\nmqtt = \"\"\namqp = \"\"\nadmin = \"\"\n",
        dir.path().join("data").display()
    );
    for (extra, key) in [
        ("[log]\nlevel = \"info,dps=loud\"\n", "log.level"),
        ("[outbound]\nmax_response_bytes = 0\n", "outbound.max_response_bytes"),
        ("[limits]\nwebhook_timeout_ms = 0\n", "limits.webhook_timeout_ms"),
        (
            "[[instance]]\nname = \"default\"\n[[instance.linked_hub]]\nhost = \"h\"\n\
             kind = \"azure-iothub\"\nconnection_string = \"HostName=h;SharedAccessKeyName=p;SharedAccessKey= !!\"\n",
            "SharedAccessKey",
        ),
    ] {
        let file = dir.path().join("dps.toml");
        std::fs::write(&file, format!("{base}{extra}")).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dps"));
        cmd.args(["serve", "--config"]).arg(&file).env_remove("RUST_LOG");
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{key}: {err}");
        assert!(err.contains(key), "{key}: {err}");
        assert!(!err.contains("panicked"), "{key}: {err}");
        assert!(!dir.path().join("data").join("run.json").exists());
    }
}

/// The Azure IoT Hub adapter: connection strings with spaces around the key sign right, answers
/// are bounded, metadata endpoints refused, private endpoints allowed (Private Link) even when
/// webhooks may not reach private addresses.
#[tokio::test]
async fn the_azure_adapter_is_bounded_and_reads_spaced_connection_strings() {
    use crate::support_iothub::{FakeIotHub, HUB_KEY};
    use dps_core::hub::{HubAdapter, HubAuth, HubError, HubIdentity};
    use dps_server::hubs::azure::AzureIotHub;
    use dps_server::outbound::{Outbound, Policy, DEFAULT_MAX_RESPONSE_BYTES};
    let strict = Outbound::new(
        Policy::new(false, &[]),
        DEFAULT_MAX_RESPONSE_BYTES,
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    let identity = HubIdentity {
        device_id: "spaced-1".into(),
        auth: HubAuth::SymmetricKey {
            primary: OWNER_KEY.into(),
            secondary: READER_KEY.into(),
        },
        capabilities: Default::default(),
        enabled: true,
    };

    let h = FakeIotHub::start("spaced.azure-devices.net").await;
    let mut l = h.linked_hub(HUB_KEY);
    let cs = l.connection_string.clone().unwrap();
    l.connection_string = Some(format!(
        " {} ",
        cs.replace("SharedAccessKey=", "SharedAccessKey= ")
            .replace(';', " ; ")
    ));
    let a = AzureIotHub::new(&l, &strict);
    a.upsert_device(&identity, None)
        .await
        .expect("the hub accepts the token signed with the trimmed key");
    assert!(h.device("spaced-1").is_some());

    // A 5 MiB answer is refused unread.
    let mut l = h.linked_hub(HUB_KEY);
    let app = axum::Router::new().fallback(|| async { answer(Answer::HugeStreamed) });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    l.options
        .insert("endpoint".into(), format!("http://127.0.0.1:{port}").into());
    match AzureIotHub::new(&l, &strict).get_twin("x").await {
        Err(HubError::Rejected { message, .. }) => {
            assert!(message.contains("max_response_bytes"), "{message}")
        }
        other => panic!("{other:?}"),
    }

    // A metadata endpoint is refused without a request.
    l.options
        .insert("endpoint".into(), "http://169.254.169.254".into());
    match AzureIotHub::new(&l, &strict).get_twin("x").await {
        Err(HubError::Rejected { message, .. }) => {
            assert!(message.contains("cloud metadata"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

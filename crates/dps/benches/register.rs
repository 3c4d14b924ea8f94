//! Benchmark of the register path (not a timed test).
//!
//! ```text
//! cargo bench -p dps --bench register -- [--devices N] [--concurrency C] [--mode inprocess|https|https-keepalive|handshake] [--store URL]
//! ```
//! - `inprocess`: the engine's `register` called directly (attestation, allocation, store writes,
//!   hub write, audit) — the cost of dps itself without TLS or HTTP.
//! - `https`: a fresh TCP + TLS 1.3 connection per device (ECDSA P-256 server certificate, no
//!   resumption), `PUT .../register` then `GET .../operations/{id}`, as a real device does.
//! - `https-keepalive`: the same requests over kept-alive connections (one per worker).
//! - `handshake`: bare TLS handshakes against the same listener, for the ratio.
//!
//! Devices belong to one symmetric-key group (derived keys). The server runs in this process on
//! port 0 with SQLite in a temp dir (or `--store postgres://...`). Prints one JSON line per mode.

use dps_core::device::{DeviceCredential, DeviceRequest, DeviceService, Transport};
use dps_core::model::DeviceRegistration;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The same allocator as the `dps` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SCOPE: &str = "0ne0000BE01";
const OWNER: &str = "YmVuY2gtb3duZXIta2V5LTAxMjM0NTY3ODlhYmNkZWZnaGlqaw==";
const GROUP_KEY: &str = "YmVuY2gtZ3JvdXAta2V5LTAxMjM0NTY3ODlhYmNkZWZnaGlqaw==";

struct Args {
    devices: usize,
    concurrency: usize,
    modes: Vec<String>,
    store: String,
}

fn args() -> Args {
    let mut a = Args {
        devices: 2000,
        concurrency: 64,
        modes: vec![
            "inprocess".into(),
            "handshake".into(),
            "https".into(),
            "https-keepalive".into(),
        ],
        store: String::new(),
    };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        match v[i].as_str() {
            "--devices" => {
                a.devices = v[i + 1].parse().expect("--devices N");
                i += 1;
            }
            "--concurrency" => {
                a.concurrency = v[i + 1].parse().expect("--concurrency C");
                i += 1;
            }
            "--mode" => {
                a.modes = v[i + 1].split(',').map(str::to_string).collect();
                i += 1;
            }
            "--store" => {
                a.store = v[i + 1].clone();
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    a
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1000.0
}

fn report(mode: &str, n: usize, ok: usize, elapsed: Duration, mut lat: Vec<Duration>, store: &str) {
    lat.sort();
    let line = serde_json::json!({
        "mode": mode, "store": if store.is_empty() { "sqlite" } else { "postgres" }, "devices": n, "ok": ok,
        "per_second": (ok as f64 / elapsed.as_secs_f64()).round(),
        "p50_ms": pct(&lat, 0.5), "p90_ms": pct(&lat, 0.9), "p99_ms": pct(&lat, 0.99), "max_ms": lat.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0),
    });
    println!("{line}");
}

async fn run_pool<F, Fut>(n: usize, concurrency: usize, f: F) -> (usize, Duration, Vec<Duration>)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let f = f.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut ok = 0;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                if f(i).await {
                    ok += 1;
                    lat.push(t.elapsed());
                }
            }
            (ok, lat)
        }));
    }
    let mut ok = 0;
    let mut lat = Vec::new();
    for t in tasks {
        let (o, l) = t.await.expect("worker");
        ok += o;
        lat.extend(l);
    }
    (ok, start.elapsed(), lat)
}

fn device_key(rid: &str) -> String {
    dps_core::sas::derive_device_key(GROUP_KEY, rid).expect("key")
}

fn token(rid: &str) -> String {
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 3600;
    dps_core::sas::sign_token(
        &format!("{SCOPE}/registrations/{rid}"),
        &device_key(rid),
        Some("registration"),
        exp,
    )
    .expect("token")
}

fn tls_client(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("ca")).expect("ca");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: std::net::SocketAddr, cfg: Arc<rustls::ClientConfig>) -> Option<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").expect("name"),
            tcp,
        )
        .await
        .ok()?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(sender)
}

async fn request(
    s: &mut Sender,
    method: &str,
    path: &str,
    auth: &str,
    body: &'static str,
) -> Option<(u16, serde_json::Value)> {
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("authorization", auth)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .ok()?;
    let resp = s.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, serde_json::from_slice(&bytes).unwrap_or_default()))
}

async fn register_over(s: &mut Sender, rid: &str) -> bool {
    let tok = token(rid);
    let Some((st, body)) = request(
        s,
        "PUT",
        &format!("/{SCOPE}/registrations/{rid}/register?api-version=2019-03-31"),
        &tok,
        "{}",
    )
    .await
    else {
        return false;
    };
    if st == 200 {
        return body["status"] == "assigned";
    }
    if st != 202 {
        return false;
    }
    let op = body["operationId"].as_str().unwrap_or_default().to_string();
    // The result is ready when retry-after is 1; a real device waits that second. The benchmark
    // measures server work, so it polls at once.
    for _ in 0..50 {
        let Some((st, body)) = request(
            s,
            "GET",
            &format!("/{SCOPE}/registrations/{rid}/operations/{op}?api-version=2019-03-31"),
            &tok,
            "",
        )
        .await
        else {
            return false;
        };
        if st == 200 {
            return body["status"] == "assigned";
        }
        if st != 202 {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = dps_server::config::Config {
            data_dir: dir.path().to_path_buf(),
            store: a.store.clone(),
            listen: dps_server::config::Listen { https: "127.0.0.1:0".into(), mqtt: String::new(), amqp: String::new(), admin: String::new() },
            ..Default::default()
        };
        cfg.instances = vec![dps_server::config::InstanceConfig {
            name: format!("bench{}", std::process::id()),
            id_scope: Some(SCOPE.into()),
            hostnames: Some(vec!["localhost".into()]),
            access_policy: vec![dps_server::config::PolicyConfig { name: "owner".into(), primary_key: Some(OWNER.into()), secondary_key: Some(OWNER.into()), rights: dps_core::instance::Right::ALL.to_vec() }],
            linked_hub: vec![dps_core::instance::LinkedHub::registry("hub-1.bench"), dps_core::instance::LinkedHub::registry("hub-2.bench")],
            allocation_policy: Default::default(),
            register_response: dps_core::instance::RegisterResponse::Immediate,
            allow_fault_injection: false,
            fault: vec![],
            credential_policy: Vec::new(),
        }];
        let server = dps_server::server::start(cfg).await.expect("server");
        let ca_pem = std::fs::read_to_string(server.ca_path.as_ref().expect("ca")).expect("ca");
        // One symmetric-key group for every device.
        let client = reqwest::Client::builder().tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("ca")]).build().expect("client");
        let owner = dps_core::sas::sign_token("localhost", OWNER, Some("owner"), time::OffsetDateTime::now_utc().unix_timestamp() + 3600).expect("token");
        let r = client
            .put(format!("https://localhost:{}/enrollmentGroups/bench?api-version=2021-10-01", server.https.port()))
            .header("authorization", owner)
            .json(&serde_json::json!({"enrollmentGroupId": "bench", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}}}))
            .send()
            .await
            .expect("create group");
        assert!(r.status().is_success(), "group: {}", r.text().await.unwrap_or_default());
        let engine = server.app.engine.clone();
        let addr = server.https;
        let tls = tls_client(&ca_pem);
        for (round, mode) in a.modes.iter().enumerate() {
            let n = a.devices;
            let prefix = format!("r{round}-{mode}-");
            match mode.as_str() {
                "inprocess" => {
                    let engine = engine.clone();
                    let (ok, el, lat) = run_pool(n, a.concurrency, move |i| {
                        let engine = engine.clone();
                        let rid = format!("{prefix}{i}");
                        async move {
                            let req = DeviceRequest {
                                id_scope: SCOPE.into(),
                                registration_id: rid.clone(),
                                credential: DeviceCredential::Sas(token(&rid)),
                                body: DeviceRegistration::default(),
                                transport: Transport::Https,
                                api_version: Some("2019-03-31".into()),
                                force_registration: false,
                                peer: None,
                            };
                            matches!(engine.register(req).await, Ok(r) if r.body.status == dps_core::model::RegistrationStatus::Assigned)
                        }
                    })
                    .await;
                    report(mode, n, ok, el, lat, &a.store);
                }
                "handshake" => {
                    let tls = tls.clone();
                    let (ok, el, lat) = run_pool(n, a.concurrency, move |_| {
                        let tls = tls.clone();
                        async move {
                            let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else { return false };
                            tokio_rustls::TlsConnector::from(tls).connect(rustls::pki_types::ServerName::try_from("localhost").expect("name"), tcp).await.is_ok()
                        }
                    })
                    .await;
                    report(mode, n, ok, el, lat, &a.store);
                }
                "https" => {
                    let tls = tls.clone();
                    let (ok, el, lat) = run_pool(n, a.concurrency, move |i| {
                        let tls = tls.clone();
                        let rid = format!("{prefix}{i}");
                        async move {
                            let Some(mut s) = connect(addr, tls).await else { return false };
                            register_over(&mut s, &rid).await
                        }
                    })
                    .await;
                    report(mode, n, ok, el, lat, &a.store);
                }
                "https-keepalive" => {
                    let per = n.div_ceil(a.concurrency);
                    let tls = tls.clone();
                    let prefix = Arc::new(prefix);
                    let start = Instant::now();
                    let mut tasks = Vec::new();
                    for w in 0..a.concurrency {
                        let tls = tls.clone();
                        let prefix = prefix.clone();
                        tasks.push(tokio::spawn(async move {
                            let mut lat = Vec::new();
                            let Some(mut s) = connect(addr, tls).await else { return lat };
                            for j in 0..per {
                                let i = w * per + j;
                                if i >= n {
                                    break;
                                }
                                let t = Instant::now();
                                if register_over(&mut s, &format!("{prefix}{i}")).await {
                                    lat.push(t.elapsed());
                                }
                            }
                            lat
                        }));
                    }
                    let mut lat = Vec::new();
                    for t in tasks {
                        lat.extend(t.await.expect("worker"));
                    }
                    report(mode, n, lat.len(), start.elapsed(), lat, &a.store);
                }
                other => eprintln!("unknown mode {other}"),
            }
        }
    });
}

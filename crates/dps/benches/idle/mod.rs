//! What the idle-connection memory benchmarks (`mqtt_idle`, `amqp_idle`) share: the server they
//! start, the enrollment group, the device's TLS connection and SAS token, the connection
//! storm and the RSS reading. Each bench adds only its protocol's login.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// The ID scope of the benchmark's instance.
pub const SCOPE: &str = "0ne0000AB01";

/// A device's TLS connection to the listener, and what it logs in with.
pub struct Device {
    /// The TLS stream.
    pub stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    /// Its registration id.
    pub rid: String,
    /// A SAS token for `{SCOPE}/registrations/{rid}` signed with its derived group key.
    pub sas: String,
}

/// TLS connect as group device `rid`, with its SAS token.
async fn device(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    rid: &str,
) -> Option<Device> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").ok()?,
            tcp,
        )
        .await
        .ok()?;
    let key = dps_core::sas::derive_device_key(GROUP_KEY, rid)?;
    let sas = dps_core::sas::sign_token(
        &format!("{SCOPE}/registrations/{rid}"),
        &key,
        Some("registration"),
        time::OffsetDateTime::now_utc().unix_timestamp() + 3600,
    )?;
    Some(Device {
        stream,
        rid: rid.to_string(),
        sas,
    })
}

const GROUP_KEY: &str = "bXF0dC1pZGxlLWdyb3VwLWtleS0wMTIzNDU2Nzg5YWJjZGVm";

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Opens `--connections N` (default 200) idle device connections to a fresh `dps serve` whose
/// only device listener is `listener` (`"mqtt"` or `"amqp"`), each made by `connect` from a
/// TLS stream with the device's SAS token, and prints the server's memory per connection.
pub fn run<C, F, Fut>(listener: &'static str, connect: F)
where
    F: Fn(Device) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<C>> + Send,
    C: Send + 'static,
{
    let mut n = 200usize;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--connections") {
        n = args[i + 1].parse().expect("--connections N");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("dps.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\n[listen]\nhttps = \"127.0.0.1:0\"\nmqtt = \"{mqtt}\"\namqp = \"{amqp}\"\nadmin = \"\"\n[log]\nlevel = \"warn\"\n[limits]\nmax_{listener}_connections = 1000000\n[[instance]]\nname = \"default\"\nid_scope = \"{SCOPE}\"\nhostnames = [\"localhost\"]\n[[instance.linked_hub]]\nhost = \"hub.idle\"\n",
            dir.path().join("data").display(),
            // Only the listener measured (a second `{listener} = ...` line would be a duplicate key).
            mqtt = if listener == "mqtt" { "127.0.0.1:0" } else { "" },
            amqp = if listener == "amqp" { "127.0.0.1:0" } else { "" },
        ),
    )
    .expect("config");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dps"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start dps");
    let run_json = dir.path().join("data/run.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run_json.exists() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&run_json).expect("run.json")).expect("json");
    let addr: std::net::SocketAddr = run[listener]
        .as_str()
        .expect("listener")
        .parse()
        .expect("addr");
    let https_port = run["https"]
        .as_str()
        .expect("https")
        .rsplit(':')
        .next()
        .expect("port")
        .to_string();
    let cs = run["instances"][0]["connection_string"]
        .as_str()
        .expect("cs")
        .to_string();
    let ca_pem = std::fs::read_to_string(run["ca"].as_str().expect("ca")).expect("ca");
    let owner_key = cs
        .split("SharedAccessKey=")
        .nth(1)
        .expect("key")
        .to_string();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let pid = child.id();
    rt.block_on(async move {
        let client = reqwest::Client::builder().tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("ca")]).build().expect("client");
        let token = dps_core::sas::sign_token("localhost", &owner_key, Some("provisioningserviceowner"), time::OffsetDateTime::now_utc().unix_timestamp() + 3600).expect("token");
        let r = client
            .put(format!("https://localhost:{https_port}/enrollmentGroups/idle?api-version=2021-10-01"))
            .header("authorization", token)
            .json(&serde_json::json!({"enrollmentGroupId": "idle", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}}}))
            .send()
            .await
            .expect("group");
        assert!(r.status().is_success());

        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.expect("ca")).expect("ca");
        }
        let tls = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        // Warm up: one connection, so that lazily allocated server state is not counted per connection.
        let warm = connect(device(addr, tls.clone(), "warm-0").await.expect("warm-up TLS")).await.expect("warm-up connection");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = rss_kib(pid);
        let started = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::new();
        for i in 0..n {
            let tls = tls.clone();
            let sem = sem.clone();
            let connect = connect.clone();
            tasks.push(tokio::spawn(async move {
                let _p = sem.acquire().await.expect("semaphore");
                connect(device(addr, tls, &format!("idle-{i}")).await?).await
            }));
        }
        let mut conns = Vec::with_capacity(n);
        let mut failed = 0;
        for t in tasks {
            match t.await.expect("task") {
                Some(c) => conns.push(c),
                None => failed += 1,
            }
        }
        let connect_secs = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_kib(pid);
        let per = if conns.is_empty() { 0.0 } else { (after.saturating_sub(before)) as f64 * 1024.0 / conns.len() as f64 };
        println!(
            "{}",
            serde_json::json!({
                "connections": conns.len(), "failed": failed, "connect_seconds": connect_secs,
                "server_rss_before_kib": before, "server_rss_after_kib": after,
                "bytes_per_idle_connection": per.round(),
            })
        );
        drop(conns);
        drop(warm);
    });
    let _ = child.kill();
    let _ = child.wait();
}

//! Memory of idle MQTT device connections (not a timed test).
//!
//! ```text
//! (needs about N + 100 open files in both processes; check `ulimit -n`)
//! cargo bench -p dps --bench mqtt_idle -- [--connections N]
//! ```
//! Starts the real `dps serve` binary as a separate process (so its memory is its own), opens N
//! MQTT-over-TLS connections (fresh TLS 1.3 handshake each, CONNECT with a valid SAS token of a
//! group device, SUBSCRIBE `$dps/registrations/res/#`) and leaves them idle, then reads the
//! server's resident set size (VmRSS) before and after. Prints one JSON line.

use rumqttc::mqttbytes::v4::{Connect, Packet, Subscribe};
use rumqttc::mqttbytes::QoS;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GROUP_KEY: &str = "bXF0dC1pZGxlLWdyb3VwLWtleS0wMTIzNDU2Nzg5YWJjZGVm";

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
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
            "data_dir = \"{}\"\n[listen]\nhttps = \"127.0.0.1:0\"\nmqtt = \"127.0.0.1:0\"\namqp = \"\"\nadmin = \"\"\n[log]\nlevel = \"warn\"\n[limits]\nmax_mqtt_connections = 1000000\n[[instance]]\nname = \"default\"\nid_scope = \"0ne0000AB01\"\nhostnames = [\"localhost\"]\n[[instance.linked_hub]]\nhost = \"hub.idle\"\n",
            dir.path().join("data").display()
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
    let mqtt: std::net::SocketAddr = run["mqtt"].as_str().expect("mqtt").parse().expect("addr");
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
        let warm = connect(mqtt, tls.clone(), "warm-0").await.expect("warm-up connection");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = rss_kib(pid);
        let started = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::new();
        for i in 0..n {
            let tls = tls.clone();
            let sem = sem.clone();
            tasks.push(tokio::spawn(async move {
                let _p = sem.acquire().await.expect("semaphore");
                connect(mqtt, tls, &format!("idle-{i}")).await
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

/// TLS connect, CONNECT with a SAS token, wait for CONNACK 0, SUBSCRIBE, wait for SUBACK.
async fn connect(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    rid: &str,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").ok()?,
            tcp,
        )
        .await
        .ok()?;
    let key = dps_core::sas::derive_device_key(GROUP_KEY, rid)?;
    let scope = "0ne0000AB01";
    let sas = dps_core::sas::sign_token(
        &format!("{scope}/registrations/{rid}"),
        &key,
        Some("registration"),
        time::OffsetDateTime::now_utc().unix_timestamp() + 3600,
    )?;
    let mut c = Connect::new(rid);
    c.keep_alive = 600;
    c.set_login(
        format!("{scope}/registrations/{rid}/api-version=2019-03-31"),
        sas,
    );
    let mut buf = bytes::BytesMut::new();
    c.write(&mut buf).ok()?;
    Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce)
        .write(&mut buf)
        .ok()?;
    s.write_all(&buf).await.ok()?;
    let mut got = bytes::BytesMut::new();
    let mut connack = false;
    let mut suback = false;
    while !(connack && suback) {
        let mut chunk = [0u8; 256];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&chunk[..n]);
        while let Ok(p) = Packet::read(&mut got, 1024) {
            match p {
                Packet::ConnAck(a)
                    if a.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success =>
                {
                    connack = true
                }
                Packet::ConnAck(_) => return None,
                Packet::SubAck(_) => suback = true,
                _ => {}
            }
        }
    }
    Some(s)
}

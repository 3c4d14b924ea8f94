//! Test support: the real server in-process on port 0 with a SQLite store in a temp dir (or
//! PostgreSQL when `DPS_TEST_POSTGRES_URL` is set and the test asks for it), a TLS client that
//! trusts its development CA, and SAS helpers.

#![allow(dead_code)]

use dps_core::instance::{LinkedHub, RegisterResponse, Right};
use dps_server::config::{Config, InstanceConfig, Listen, PolicyConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const SCOPE: &str = "0ne00000T01";
pub const OWNER_KEY: &str = "dGVzdC1vd25lci1rZXktMDEyMzQ1Njc4OWFiY2RlZmdoaWprbG1ub3A=";
pub const READER_KEY: &str = "dGVzdC1yZWFkZXIta2V5LTAxMjM0NTY3ODlhYmNkZWZnaGlqa2xtbm8=";

pub struct TestServer {
    pub server: dps_server::server::Server,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
    pub base: String,
    pub ca_pem: String,
}

/// Builder for the test server's config. Like a local emulator, it lets webhooks and test
/// doubles run on 127.0.0.1 (`[outbound] allow_private_addresses = true`); the tests of the
/// outbound policy (`outbound.rs`) turn it off.
pub fn config(dir: &std::path::Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        listen: Listen {
            https: "127.0.0.1:0".into(),
            mqtt: "127.0.0.1:0".into(),
            amqp: "127.0.0.1:0".into(),
            admin: "127.0.0.1:0".into(),
        },
        outbound: dps_server::config::Outbound {
            allow_private_addresses: true,
            ..Default::default()
        },
        instances: vec![instance(
            "default",
            SCOPE,
            "localhost",
            vec![
                LinkedHub::registry("hub-a.example.net"),
                LinkedHub::registry("hub-b.example.net"),
            ],
        )],
        ..Config::default()
    }
}

pub fn instance(name: &str, scope: &str, host: &str, hubs: Vec<LinkedHub>) -> InstanceConfig {
    InstanceConfig {
        name: name.into(),
        id_scope: Some(scope.into()),
        hostnames: Some(vec![host.into()]),
        access_policy: vec![
            PolicyConfig {
                name: "provisioningserviceowner".into(),
                primary_key: Some(OWNER_KEY.into()),
                secondary_key: Some(READER_KEY.into()),
                rights: Right::ALL.to_vec(),
            },
            PolicyConfig {
                name: "reader".into(),
                primary_key: Some(READER_KEY.into()),
                secondary_key: Some(READER_KEY.into()),
                rights: vec![Right::EnrollmentRead],
            },
        ],
        linked_hub: hubs,
        allocation_policy: Default::default(),
        register_response: RegisterResponse::Accepted,
        allow_fault_injection: false,
        fault: vec![],
        credential_policy: Vec::new(),
    }
}

impl TestServer {
    pub async fn spawn() -> TestServer {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(f: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(dir.path());
        f(&mut cfg);
        Self::start_in(dir, cfg).await
    }

    pub async fn start_in(dir: tempfile::TempDir, cfg: Config) -> TestServer {
        let server = dps_server::server::start(cfg).await.expect("server starts");
        let ca_pem = std::fs::read_to_string(server.ca_path.as_ref().expect("dev CA")).expect("ca");
        let client = client_trusting(&ca_pem, None);
        let base = format!("https://localhost:{}", server.https.port());
        TestServer {
            server,
            dir,
            client,
            base,
            ca_pem,
        }
    }

    /// A service-API token for the owner policy.
    pub fn owner(&self) -> String {
        service_token("localhost", "provisioningserviceowner", OWNER_KEY)
    }
}

/// A reqwest client that trusts only the given CA (and optionally presents an identity PEM:
/// chain + PKCS#8 key).
pub fn client_trusting(ca_pem: &str, identity_pem: Option<&str>) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("ca pem");
    let mut b = reqwest::Client::builder()
        .tls_certs_only([ca])
        .resolve("localhost", "127.0.0.1:0".parse().unwrap());
    if let Some(id) = identity_pem {
        b = b.identity(reqwest::Identity::from_pem(id.as_bytes()).expect("identity"));
    }
    b.build().expect("client")
}

pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub fn service_token(host: &str, policy: &str, key: &str) -> String {
    dps_core::sas::sign_token(host, key, Some(policy), now() + 3600).expect("token")
}

pub fn device_token(scope: &str, rid: &str, key: &str) -> String {
    dps_core::sas::sign_token(
        &format!("{scope}/registrations/{rid}"),
        key,
        Some("registration"),
        now() + 3600,
    )
    .expect("token")
}

/// Poll `probe` until it returns Some or the deadline passes (then panic with the last state).
pub async fn eventually<T, F, Fut>(deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < deadline {
        match probe().await {
            Ok(v) => return v,
            Err(s) => last = s,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not met within {deadline:?}; last state: {last}");
}

pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: serde_json::Value,
}

impl TestServer {
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: Option<&str>,
        body: Option<serde_json::Value>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = if path.contains("api-version") {
            format!("{}{}", self.base, path)
        } else {
            format!("{}{}{}api-version=2021-10-01", self.base, path, sep)
        };
        let mut rb = self.client.request(method, url);
        if let Some(a) = auth {
            rb = rb.header("authorization", a);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.expect("request");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap_or_default();
        let body = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    /// Create a symmetric-key individual enrollment; returns its primary key.
    pub async fn enroll(&self, rid: &str, extra: serde_json::Value) -> String {
        let mut body =
            serde_json::json!({"registrationId": rid, "attestation": {"type": "symmetricKey"}});
        merge(&mut body, extra);
        let r = self
            .call(
                reqwest::Method::PUT,
                &format!("/enrollments/{rid}"),
                Some(&self.owner()),
                Some(body),
                &[],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .expect("key")
            .to_string()
    }

    /// Create a symmetric-key group; returns its primary key.
    pub async fn enroll_group(&self, gid: &str, extra: serde_json::Value) -> String {
        let mut body =
            serde_json::json!({"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}});
        merge(&mut body, extra);
        let r = self
            .call(
                reqwest::Method::PUT,
                &format!("/enrollmentGroups/{gid}"),
                Some(&self.owner()),
                Some(body),
                &[],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .expect("key")
            .to_string()
    }

    /// Register with a SAS key over HTTPS, polling until final. Returns (final HTTP status, body).
    pub async fn register(&self, rid: &str, key: &str, payload: Option<serde_json::Value>) -> Resp {
        let tok = device_token(SCOPE, rid, key);
        let mut body = serde_json::json!({"registrationId": rid});
        if let Some(p) = payload {
            body["payload"] = p;
        }
        let path = format!("/{SCOPE}/registrations/{rid}/register?api-version=2019-03-31");
        let r = self
            .call(reqwest::Method::PUT, &path, Some(&tok), Some(body), &[])
            .await;
        if r.status != 202 {
            return r;
        }
        let op = r.body["operationId"]
            .as_str()
            .expect("operation id")
            .to_string();
        let path = format!("/{SCOPE}/registrations/{rid}/operations/{op}?api-version=2019-03-31");
        eventually(Duration::from_secs(10), || {
            let path = path.clone();
            let tok = tok.clone();
            async move {
                let r = self
                    .call(reqwest::Method::GET, &path, Some(&tok), None, &[])
                    .await;
                if r.status == 202 {
                    Err(format!("still assigning: {}", r.body))
                } else {
                    Ok(r)
                }
            }
        })
        .await
    }
}

pub fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (a.as_object_mut(), b) {
        for (k, v) in b {
            a.insert(k, v);
        }
    }
}

// ---------------------------------------------------------------- helpers added by the
// service-API / auth / registration / vectors suites

/// Assert the Azure error body and `errorCode / 1000 == status`.
pub fn assert_error(r: &Resp, status: u16, code: Option<u64>) {
    assert_eq!(r.status, status, "{}", r.body);
    let ec = r.body["errorCode"]
        .as_u64()
        .unwrap_or_else(|| panic!("errorCode missing: {}", r.body));
    assert_eq!(
        ec / 1000,
        u64::from(status),
        "errorCode/1000 must equal the status: {}",
        r.body
    );
    if let Some(c) = code {
        assert_eq!(ec, c, "{}", r.body);
    }
    for k in ["trackingId", "message", "timestampUtc"] {
        assert!(r.body[k].is_string(), "{k} missing: {}", r.body);
    }
    let ct = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert_eq!(ct, "application/json; charset=utf-8");
}

/// A token signed by hand: base64(HMAC-SHA256(key, sr_raw + "\n" + se)), `sr` put in the token as
/// given (no encoding), so tests control exactly what is signed.
pub fn raw_token(
    sr_in_token: &str,
    signed_sr: &str,
    key_b64: &str,
    skn: Option<&str>,
    se: i64,
) -> String {
    use base64::Engine as _;
    use hmac::{KeyInit, Mac};
    let key = base64::engine::general_purpose::STANDARD
        .decode(key_b64)
        .expect("key");
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key).expect("hmac");
    mac.update(format!("{signed_sr}\n{se}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let sig =
        percent_encoding::utf8_percent_encode(&sig, percent_encoding::NON_ALPHANUMERIC).to_string();
    let mut t = format!("SharedAccessSignature sr={sr_in_token}&sig={sig}&se={se}");
    if let Some(n) = skn {
        t.push_str(&format!("&skn={n}"));
    }
    t
}

/// Derive a group device key: base64(HMAC-SHA256(base64decode(group key), registration id)).
pub fn derive_key(group_key: &str, rid: &str) -> String {
    use base64::Engine as _;
    use hmac::{KeyInit, Mac};
    let key = base64::engine::general_purpose::STANDARD
        .decode(group_key)
        .expect("key");
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key).expect("hmac");
    mac.update(rid.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// SHA-1 (FIPS 180-4), uppercase hex: an independent thumbprint computation for assertions.
pub fn sha1_hex(data: &[u8]) -> String {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for chunk in msg.chunks(64) {
        let mut w = [0u32; 80];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([
                chunk[4 * i],
                chunk[4 * i + 1],
                chunk[4 * i + 2],
                chunk[4 * i + 3],
            ]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let (mut a, mut b, mut c, mut d, mut e) = (h[0], h[1], h[2], h[3], h[4]);
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        h[0] = h[0].wrapping_add(a);
        h[1] = h[1].wrapping_add(b);
        h[2] = h[2].wrapping_add(c);
        h[3] = h[3].wrapping_add(d);
        h[4] = h[4].wrapping_add(e);
    }
    h.iter().map(|x| format!("{x:08X}")).collect()
}

/// SHA-256, uppercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode_upper(sha2::Sha256::digest(data))
}

impl TestServer {
    /// GET an identity on a built-in registry hub through the admin API.
    pub async fn hub_device(&self, hub: &str, device_id: &str) -> Resp {
        self.call(
            reqwest::Method::GET,
            &format!("/admin/instances/default/hubs/{hub}/devices/{device_id}"),
            Some(&self.owner()),
            None,
            &[],
        )
        .await
    }

    /// Every identity on a registry hub (all pages).
    pub async fn hub_devices(&self, hub: &str) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let mut cont: Option<String> = None;
        loop {
            let mut path = format!("/admin/instances/default/hubs/{hub}/devices?limit=1000");
            if let Some(c) = &cont {
                path.push_str(&format!(
                    "&continuation={}",
                    percent_encoding::utf8_percent_encode(c, percent_encoding::NON_ALPHANUMERIC)
                ));
            }
            let r = self
                .call(reqwest::Method::GET, &path, Some(&self.owner()), None, &[])
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
            out.extend(r.body["items"].as_array().cloned().unwrap_or_default());
            match r.body["continuation"].as_str() {
                Some(c) => cont = Some(c.to_string()),
                None => return out,
            }
        }
    }

    /// The service-API registration record.
    pub async fn registration_record(&self, rid: &str) -> Resp {
        self.call(
            reqwest::Method::GET,
            &format!("/registrations/{rid}"),
            Some(&self.owner()),
            None,
            &[],
        )
        .await
    }

    /// Audit entries for a target id.
    pub async fn audit_for(&self, target: &str) -> Vec<serde_json::Value> {
        self.audit(&format!("target={target}&limit=1000")).await
    }

    /// Audit entries answering `GET /admin/audit?{query}` (owner token).
    pub async fn audit(&self, query: &str) -> Vec<serde_json::Value> {
        let r = self
            .call(
                reqwest::Method::GET,
                &format!("/admin/audit?{query}"),
                Some(&self.owner()),
                None,
                &[],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body.as_array().cloned().unwrap_or_default()
    }

    /// [`raw_exchange`](Self::raw_exchange) that answers empty texts when the connection or
    /// the handshake fails instead of panicking.
    pub async fn try_raw_exchange(&self, request_head_and_body: &str) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut roots = rustls::RootCertStore::empty();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(self.ca_pem.as_bytes())
            .expect("ca der");
        roots.add(der).expect("root");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", self.server.https.port())).await
        else {
            return Default::default();
        };
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let Ok(mut tls) = connector.connect(name, tcp).await else {
            return Default::default();
        };
        if tls
            .write_all(request_head_and_body.as_bytes())
            .await
            .is_err()
        {
            return Default::default();
        }
        let mut buf = Vec::new();
        let _ = tls.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (head.to_string(), body.to_string())
    }

    /// One raw HTTP/1.1 exchange over TLS; returns the response head (status line and headers,
    /// exactly as sent) and the body text. For assertions on header-name casing.
    pub async fn raw_exchange(&self, request_head_and_body: &str) -> (String, String) {
        let r = self.try_raw_exchange(request_head_and_body).await;
        assert!(!r.0.is_empty(), "no response over TLS");
        r
    }
}

impl TestServer {
    /// A request with a raw text body and a full path (query string included as given: no
    /// api-version is added).
    pub async fn call_text(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        auth: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut rb = self
            .client
            .request(method, format!("{}{}", self.base, path_and_query));
        if let Some(a) = auth {
            rb = rb.header("authorization", a);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb
                .header("content-type", "application/json; charset=utf-8")
                .body(b.to_string());
        }
        let r = rb.send().await.expect("request");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap_or_default();
        let body = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        };
        Resp {
            status,
            headers,
            body,
        }
    }
}

impl Resp {
    /// A response header as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

/// Change an enrollment's hubs (GET does not return keys, so they are given again).
pub async fn set_hubs(s: &TestServer, rid: &str, keys: &(String, String), hubs: serde_json::Value) {
    let mut e = s
        .call(
            reqwest::Method::GET,
            &format!("/enrollments/{rid}"),
            Some(&s.owner()),
            None,
            &[],
        )
        .await
        .body;
    e["iotHubs"] = hubs;
    e["attestation"] = serde_json::json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": keys.0, "secondaryKey": keys.1}});
    let r = s
        .call(
            reqwest::Method::PUT,
            &format!("/enrollments/{rid}"),
            Some(&s.owner()),
            Some(e),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A local port with nothing listening on it (bound, read, released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A TCP listener that accepts connections and never answers (nor closes them while it lives):
/// what a hung hub looks like to an adapter.
pub struct SilentListener {
    /// `127.0.0.1:port`.
    pub addr: std::net::SocketAddr,
    accepted: Arc<std::sync::atomic::AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentListener {
    pub async fn start() -> SilentListener {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let n = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = l.accept().await {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(sock);
            }
        });
        SilentListener {
            addr,
            accepted,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u32 {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for SilentListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The admin listener's `/metrics` text.
pub async fn scrape(s: &TestServer) -> String {
    let admin = s.server.admin.expect("admin listener");
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// Sum of the samples of `metric` whose labels include every `label="value"` given.
pub fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

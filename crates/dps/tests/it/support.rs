//! Test support: the real server in-process on port 0 with a SQLite store in a temp dir (or
//! PostgreSQL when `DPS_TEST_POSTGRES_URL` is set and the test asks for it), a TLS client that
//! trusts its development CA, and SAS helpers.

#![allow(dead_code)]

use dps::config::{Config, InstanceConfig, Listen, PolicyConfig};
use dps_core::instance::{LinkedHub, RegisterResponse, Right};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const SCOPE: &str = "0ne00000T01";
pub const OWNER_KEY: &str = "dGVzdC1vd25lci1rZXktMDEyMzQ1Njc4OWFiY2RlZmdoaWprbG1ub3A=";
pub const READER_KEY: &str = "dGVzdC1yZWFkZXIta2V5LTAxMjM0NTY3ODlhYmNkZWZnaGlqa2xtbm8=";

pub struct TestServer {
    pub server: dps::server::Server,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
    pub base: String,
    pub ca_pem: String,
}

/// Builder for the test server's config.
pub fn config(dir: &std::path::Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        listen: Listen { https: "127.0.0.1:0".into(), mqtt: "127.0.0.1:0".into(), admin: "127.0.0.1:0".into() },
        instances: vec![instance("default", SCOPE, "localhost", vec![LinkedHub::registry("hub-a.example.net"), LinkedHub::registry("hub-b.example.net")])],
        ..Config::default()
    }
}

pub fn instance(name: &str, scope: &str, host: &str, hubs: Vec<LinkedHub>) -> InstanceConfig {
    InstanceConfig {
        name: name.into(),
        id_scope: Some(scope.into()),
        hostnames: Some(vec![host.into()]),
        access_policy: vec![
            PolicyConfig { name: "provisioningserviceowner".into(), primary_key: Some(OWNER_KEY.into()), secondary_key: Some(READER_KEY.into()), rights: Right::ALL.to_vec() },
            PolicyConfig { name: "reader".into(), primary_key: Some(READER_KEY.into()), secondary_key: Some(READER_KEY.into()), rights: vec![Right::EnrollmentRead] },
        ],
        linked_hub: hubs,
        allocation_policy: Default::default(),
        register_response: RegisterResponse::Accepted,
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
        let server = dps::server::start(cfg).await.expect("server starts");
        let ca_pem = std::fs::read_to_string(server.ca_path.as_ref().expect("dev CA")).expect("ca");
        let client = client_trusting(&ca_pem, None);
        let base = format!("https://localhost:{}", server.https.port());
        TestServer { server, dir, client, base, ca_pem }
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
    let mut b = reqwest::Client::builder().tls_certs_only([ca]).resolve("localhost", "127.0.0.1:0".parse().unwrap());
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
    dps_core::sas::sign_token(&format!("{scope}/registrations/{rid}"), key, Some("registration"), now() + 3600).expect("token")
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
    pub async fn call(&self, method: reqwest::Method, path: &str, auth: Option<&str>, body: Option<serde_json::Value>, headers: &[(&str, &str)]) -> Resp {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = if path.contains("api-version") { format!("{}{}", self.base, path) } else { format!("{}{}{}api-version=2021-10-01", self.base, path, sep) };
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
        let body = if text.is_empty() { serde_json::Value::Null } else { serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)) };
        Resp { status, headers, body }
    }

    /// Create a symmetric-key individual enrollment; returns its primary key.
    pub async fn enroll(&self, rid: &str, extra: serde_json::Value) -> String {
        let mut body = serde_json::json!({"registrationId": rid, "attestation": {"type": "symmetricKey"}});
        merge(&mut body, extra);
        let r = self.call(reqwest::Method::PUT, &format!("/enrollments/{rid}"), Some(&self.owner()), Some(body), &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["attestation"]["symmetricKey"]["primaryKey"].as_str().expect("key").to_string()
    }

    /// Create a symmetric-key group; returns its primary key.
    pub async fn enroll_group(&self, gid: &str, extra: serde_json::Value) -> String {
        let mut body = serde_json::json!({"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}});
        merge(&mut body, extra);
        let r = self.call(reqwest::Method::PUT, &format!("/enrollmentGroups/{gid}"), Some(&self.owner()), Some(body), &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["attestation"]["symmetricKey"]["primaryKey"].as_str().expect("key").to_string()
    }

    /// Register with a SAS key over HTTPS, polling until final. Returns (final HTTP status, body).
    pub async fn register(&self, rid: &str, key: &str, payload: Option<serde_json::Value>) -> Resp {
        let tok = device_token(SCOPE, rid, key);
        let mut body = serde_json::json!({"registrationId": rid});
        if let Some(p) = payload {
            body["payload"] = p;
        }
        let path = format!("/{SCOPE}/registrations/{rid}/register?api-version=2019-03-31");
        let r = self.call(reqwest::Method::PUT, &path, Some(&tok), Some(body), &[]).await;
        if r.status != 202 {
            return r;
        }
        let op = r.body["operationId"].as_str().expect("operation id").to_string();
        let path = format!("/{SCOPE}/registrations/{rid}/operations/{op}?api-version=2019-03-31");
        eventually(Duration::from_secs(10), || {
            let path = path.clone();
            let tok = tok.clone();
            async move {
                let r = self.call(reqwest::Method::GET, &path, Some(&tok), None, &[]).await;
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

pub type Shared<T> = Arc<T>;

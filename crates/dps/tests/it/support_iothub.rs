//! A local stand-in for Azure IoT Hub's service REST API (api-version 2021-04-12), written from
//! the published contract (the service swagger `service.json` and how Azure's service SDKs call
//! it: Node `azure-iothub`, Python `azure-iot-hub`, C# `Microsoft.Azure.Devices`), not from the
//! adapter. It shares no code with the adapter or with `dps_core::sas`: SAS verification, URL
//! decoding, ETags and error bodies are implemented here, and checked against tokens made by
//! the real SDKs (`hubs_azure::sdk_tokens_*`) and against the Node registry manager driving it
//! over HTTPS (`hubs_azure::node_registry_manager_*`).
//!
//! What it enforces:
//!
//! * **SAS**: `Authorization: SharedAccessSignature sr=…&sig=…&se=…&skn=…` (fields in any
//!   order); `sr` percent-decoded must be the hub host (or `host/…`); `sig` percent-decoded must
//!   be base64(HMAC-SHA256(policy key, sr-as-sent + "\n" + se-as-sent)) for the primary or
//!   secondary key of the policy named by `skn`; `se` in the future. Otherwise 401 (401002).
//! * **Rights** per policy: `GET /devices` needs RegistryRead, `PUT`/`DELETE /devices`
//!   RegistryWrite (which includes RegistryRead), every `/twins` call ServiceConnect; missing →
//!   401 401002 "Authorization rule … does not allow access".
//! * **ETags**: `If-Match` counts only when quoted (`"*"` or `"<etag>"`); an unquoted value is
//!   ignored, as the hub does in places. `PUT /devices` without a (quoted) `If-Match` creates
//!   (409001 when it exists), with one replaces (404001 when missing); a stale ETag is 412001.
//!   A `PUT` replaces the whole device: `deviceScope`, `parentScopes`, `statusReason` not sent
//!   are reset.
//! * **Errors** as current hubs send them: header `iothub-errorcode: <Name>` and body
//!   `{"Message":"{\"errorCode\":404001,\"trackingId\":…,\"message\":…,\"timestampUtc\":…}",
//!   "ExceptionMessage":"Tracking ID:…"}`.
//! * **Tiers** ([`Tier::Basic`]: every `/twins` call is 403 403010), **quota exhaustion** (403
//!   403002 on everything), **failover** (404 404012 on everything), **per-operation
//!   throttling** (registry operations beyond a budget → 429 429001), and injected answers for
//!   one route ([`FakeIotHub::inject`]).
//! * **Twins**: keys must not contain `.`, `$`, space or control characters (nor start with
//!   `$` where the client writes), nesting at most 10 objects deep, tags and desired properties
//!   at most 32 KB each; otherwise 400 400004.
//!
//! It serves plain HTTP ([`FakeIotHub::start`]) or HTTPS with its own CA
//! ([`FakeIotHub::start_tls`], for the Node SDK, which only speaks HTTPS).

#![allow(dead_code)]

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dps_core::instance::{HubKind, LinkedHub};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The policy dps is documented to use: RegistryRead, RegistryWrite, ServiceConnect.
pub const HUB_POLICY: &str = "dps-linker";
pub const HUB_KEY: &str = "ZmFrZS1pb3QtaHViLXBvbGljeS1rZXktMDEyMzQ1Njc4OWFiY2Q=";
/// The built-in `registryReadWrite` policy: RegistryRead, RegistryWrite, no ServiceConnect.
pub const READWRITE_POLICY: &str = "registryReadWrite";
pub const READWRITE_KEY: &str = "cmVnaXN0cnktcmVhZC13cml0ZS1rZXktMDEyMzQ1Njc4OWFiYw==";
/// The built-in `registryRead` policy: RegistryRead only.
pub const READ_POLICY: &str = "registryRead";
pub const READ_KEY: &str = "cmVnaXN0cnktcmVhZC1vbmx5LWtleS0wMTIzNDU2Nzg5YWJjZGVm";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    RegistryRead,
    RegistryWrite,
    ServiceConnect,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub primary: String,
    pub secondary: String,
    pub rights: Vec<Right>,
}

impl Policy {
    fn allows(&self, r: Right) -> bool {
        self.rights.contains(&r)
            || (r == Right::RegistryRead && self.rights.contains(&Right::RegistryWrite))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tier {
    /// S1–S3: registry and twins.
    #[default]
    Standard,
    /// B1–B3: no device twins.
    Basic,
}

/// An injected answer: the next `times` requests matching `method` and `path` (exact, decoded
/// path such as `/twins/d1`) get `status` with error `code`.
#[derive(Debug, Clone)]
pub struct Injected {
    pub method: Method,
    pub path: String,
    pub status: u16,
    pub code: u32,
    pub retry_after: Option<u32>,
    pub times: u32,
}

/// One request as received (after authentication).
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    /// `If-Match` exactly as sent.
    pub if_match: Option<String>,
    /// `sr` and `skn` exactly as sent (still percent-encoded).
    pub sr_raw: String,
    pub skn_raw: String,
    pub status: u16,
    pub code: Option<u32>,
}

pub struct FakeState {
    pub host: String,
    pub policies: Mutex<Vec<Policy>>,
    pub tier: Mutex<Tier>,
    /// Devices as the hub stores them (with `etag`, `generationId`, …).
    pub devices: Mutex<HashMap<String, Value>>,
    /// Twins: `{"tags", "desired", "etag", "version"}`.
    pub twins: Mutex<HashMap<String, Value>>,
    /// Daily message quota used up: every request 403002.
    pub quota_exhausted: Mutex<bool>,
    /// Failing over: every request 404012.
    pub failing_over: Mutex<bool>,
    /// Registry operations (`/devices`) allowed before 429001 (`None`: unlimited).
    pub registry_budget: Mutex<Option<u32>>,
    /// Registry operations served (counted against the budget).
    pub registry_ops: Mutex<u32>,
    pub injected: Mutex<Vec<Injected>>,
    pub log: Mutex<Vec<Logged>>,
    /// Requests refused for a bad or missing token.
    pub refused: Mutex<u32>,
    etags: AtomicU64,
}

pub struct FakeIotHub {
    pub base: String,
    pub state: Arc<FakeState>,
    /// The CA of an HTTPS stand-in (PEM), written to `ca_file`.
    pub ca_pem: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
    _dir: Option<tempfile::TempDir>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeIotHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn router(state: Arc<FakeState>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(state)
}

fn new_state(host: &str) -> Arc<FakeState> {
    Arc::new(FakeState {
        host: host.to_string(),
        policies: Mutex::new(vec![
            Policy {
                name: HUB_POLICY.into(),
                primary: HUB_KEY.into(),
                secondary: READWRITE_KEY.into(),
                rights: vec![
                    Right::RegistryRead,
                    Right::RegistryWrite,
                    Right::ServiceConnect,
                ],
            },
            Policy {
                name: READWRITE_POLICY.into(),
                primary: READWRITE_KEY.into(),
                secondary: READ_KEY.into(),
                rights: vec![Right::RegistryRead, Right::RegistryWrite],
            },
            Policy {
                name: READ_POLICY.into(),
                primary: READ_KEY.into(),
                secondary: READ_KEY.into(),
                rights: vec![Right::RegistryRead],
            },
        ]),
        tier: Mutex::new(Tier::Standard),
        devices: Mutex::default(),
        twins: Mutex::default(),
        quota_exhausted: Mutex::new(false),
        failing_over: Mutex::new(false),
        registry_budget: Mutex::new(None),
        registry_ops: Mutex::new(0),
        injected: Mutex::default(),
        log: Mutex::default(),
        refused: Mutex::new(0),
        etags: AtomicU64::new(1),
    })
}

impl FakeIotHub {
    /// Plain HTTP on 127.0.0.1, port 0.
    pub async fn start(host: &str) -> FakeIotHub {
        let state = new_state(host);
        let app = router(state.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        FakeIotHub {
            base,
            state,
            ca_pem: None,
            ca_file: None,
            _dir: None,
            task,
        }
    }

    /// HTTPS on 127.0.0.1, port 0, with a self-signed certificate for `host` and `localhost`
    /// (its PEM in [`Self::ca_pem`] and [`Self::ca_file`]).
    pub async fn start_tls(host: &str) -> FakeIotHub {
        let state = new_state(host);
        let app = router(state.clone());
        let ck = rcgen::generate_simple_self_signed(vec![host.to_string(), "localhost".into()])
            .expect("certificate");
        let cert_der = ck.cert.der().clone();
        let key_der =
            rustls_pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).expect("key");
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key_der)
        .expect("tls config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
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
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("iothub-ca.pem");
        let pem = ck.cert.pem();
        std::fs::write(&ca_file, &pem).expect("write ca");
        FakeIotHub {
            base: format!("https://localhost:{port}"),
            state,
            ca_pem: Some(pem),
            ca_file: Some(ca_file),
            _dir: Some(dir),
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.base.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub fn connection_string_for(&self, policy: &str, key: &str) -> String {
        format!(
            "HostName={};SharedAccessKeyName={policy};SharedAccessKey={key}",
            self.state.host
        )
    }

    pub fn connection_string_with(&self, key: &str) -> String {
        self.connection_string_for(HUB_POLICY, key)
    }

    /// The linked hub for dps with the documented policy (`host` = the hub host devices are
    /// told).
    pub fn linked_hub(&self, key: &str) -> LinkedHub {
        self.linked_hub_for(HUB_POLICY, key)
    }

    pub fn linked_hub_for(&self, policy: &str, key: &str) -> LinkedHub {
        let mut h = LinkedHub::new(&self.state.host, HubKind::AzureIotHub);
        h.connection_string = Some(self.connection_string_for(policy, key));
        h.options
            .insert("endpoint".into(), self.base.clone().into());
        h.options.insert("timeout_ms".into(), 3000.into());
        if let Some(ca) = &self.ca_file {
            h.options
                .insert("ca_file".into(), ca.display().to_string().into());
        }
        h
    }

    pub fn device(&self, id: &str) -> Option<Value> {
        self.state.devices.lock().unwrap().get(id).cloned()
    }

    pub fn twin(&self, id: &str) -> Option<Value> {
        self.state.twins.lock().unwrap().get(id).cloned()
    }

    /// Change a device as an operator would (portal, CLI): the ETag changes.
    pub fn edit_device(&self, id: &str, f: impl FnOnce(&mut Value)) {
        let mut devices = self.state.devices.lock().unwrap();
        let d = devices.get_mut(id).expect("device");
        f(d);
        d["etag"] = self.state.next_etag().into();
    }

    /// Change a twin as a back end would: its ETag and version change.
    pub fn edit_twin(&self, id: &str, f: impl FnOnce(&mut Value)) {
        let mut twins = self.state.twins.lock().unwrap();
        let t = twins.get_mut(id).expect("twin");
        f(t);
        t["etag"] = self.state.next_etag().into();
        t["version"] = (t["version"].as_u64().unwrap_or(1) + 1).into();
    }

    pub fn set_tier(&self, t: Tier) {
        *self.state.tier.lock().unwrap() = t;
    }

    pub fn set_quota_exhausted(&self, on: bool) {
        *self.state.quota_exhausted.lock().unwrap() = on;
    }

    pub fn set_failing_over(&self, on: bool) {
        *self.state.failing_over.lock().unwrap() = on;
    }

    /// Allow `n` more registry operations, then 429001 (`None`: unlimited).
    pub fn set_registry_budget(&self, n: Option<u32>) {
        *self.state.registry_ops.lock().unwrap() = 0;
        *self.state.registry_budget.lock().unwrap() = n;
    }

    pub fn registry_ops(&self) -> u32 {
        *self.state.registry_ops.lock().unwrap()
    }

    /// Answer the next `times` `method path` requests with `status` / `code`.
    pub fn inject(&self, method: Method, path: &str, status: u16, code: u32, times: u32) {
        self.state.injected.lock().unwrap().push(Injected {
            method,
            path: path.into(),
            status,
            code,
            retry_after: None,
            times,
        });
    }

    /// "METHOD /path if-match -> status" per authenticated request.
    pub fn log(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|l| {
                format!(
                    "{} {} {} -> {}",
                    l.method,
                    l.path,
                    l.if_match.as_deref().unwrap_or("-"),
                    l.status
                )
            })
            .collect()
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.state.log.lock().unwrap().clear();
    }
}

impl FakeState {
    fn next_etag(&self) -> String {
        let n = self.etags.fetch_add(1, Ordering::Relaxed);
        B64.encode(format!("etag-{n:08}"))
    }
}

// ------------------------------------------------------------------------------- SAS

/// Percent-decoding of one token field (`%XX`; a `+` stays a `+`: the SDKs escape it).
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The fields of a token, as sent.
pub struct RawToken {
    pub sr: String,
    pub sig: String,
    pub se: String,
    pub skn: String,
}

pub fn parse_token(header: &str) -> Result<RawToken, String> {
    let rest = header
        .strip_prefix("SharedAccessSignature ")
        .ok_or("not a SharedAccessSignature")?;
    let mut f: HashMap<&str, &str> = HashMap::new();
    for part in rest.split('&') {
        let (k, v) = part.split_once('=').ok_or("field without '='")?;
        if f.insert(k, v).is_some() {
            return Err(format!("field {k} twice"));
        }
    }
    let get = |k: &str| f.get(k).map(|v| v.to_string()).ok_or(format!("no {k}"));
    Ok(RawToken {
        sr: get("sr")?,
        sig: get("sig")?,
        se: get("se")?,
        skn: get("skn")?,
    })
}

/// Verify a service token for `host` against `policies` at `now`: the policy it names.
pub fn verify_token(
    header: &str,
    host: &str,
    policies: &[Policy],
    now: i64,
) -> Result<Policy, String> {
    let t = parse_token(header)?;
    let sr = percent_decode(&t.sr).ok_or("sr not decodable")?;
    let sr_host = sr.split('/').next().unwrap_or("");
    if !sr_host.eq_ignore_ascii_case(host) {
        return Err(format!("audience {sr} is not {host}"));
    }
    let se: i64 = t.se.parse().map_err(|_| "se not a number")?;
    if se <= now {
        return Err("token expired".into());
    }
    let skn = percent_decode(&t.skn).ok_or("skn not decodable")?;
    let policy = policies
        .iter()
        .find(|p| p.name == skn)
        .ok_or(format!("no policy {skn}"))?;
    let sig = B64
        .decode(percent_decode(&t.sig).ok_or("sig not decodable")?)
        .map_err(|_| "sig not base64")?;
    let message = format!("{}\n{}", t.sr, t.se);
    for key in [&policy.primary, &policy.secondary] {
        let k = B64.decode(key).expect("policy key");
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&k).expect("hmac");
        mac.update(message.as_bytes());
        if mac.verify_slice(&sig).is_ok() {
            return Ok(policy.clone());
        }
    }
    Err("signature does not match the policy's keys".into())
}

// ------------------------------------------------------------------------------- answers

fn error_name(code: u32) -> Option<&'static str> {
    Some(match code {
        400_001 => "InvalidProtocolVersion",
        400_004 => "ArgumentInvalid",
        401_002 => "IotHubUnauthorizedAccess",
        403_002 => "IotHubQuotaExceeded",
        404_001 => "DeviceNotFound",
        409_001 => "DeviceAlreadyExists",
        412_001 => "PreconditionFailed",
        429_001 => "ThrottlingException",
        500_001 => "ServerError",
        503_001 => "ServiceUnavailable",
        _ => return None,
    })
}

/// A current hub's error answer.
fn error(status: u16, code: u32, text: &str) -> Response {
    let inner = json!({
        "errorCode": code,
        "trackingId": uuid::Uuid::new_v4().simple().to_string(),
        "message": text,
        "timestampUtc": "2026-01-01T00:00:00.0000000Z",
    });
    let body = json!({
        "Message": inner.to_string(),
        "ExceptionMessage": format!("Tracking ID:{}-G:0-TimeStamp:01/01/2026 00:00:00", uuid::Uuid::new_v4().simple()),
    });
    let mut r = (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json; charset=utf-8")],
        body.to_string(),
    )
        .into_response();
    if let Some(name) = error_name(code) {
        r.headers_mut()
            .insert("iothub-errorcode", name.parse().unwrap());
    }
    r
}

fn ok(v: Value, etag: Option<&str>) -> Response {
    let mut r = (
        StatusCode::OK,
        [("content-type", "application/json; charset=utf-8")],
        v.to_string(),
    )
        .into_response();
    if let Some(e) = etag {
        r.headers_mut()
            .insert("etag", format!("\"{e}\"").parse().unwrap());
    }
    r
}

fn code_of(r: &Response) -> Option<u32> {
    r.headers()
        .get("x-standin-code")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

// ------------------------------------------------------------------------------- validation

/// `If-Match` as the hub reads it: only a quoted value counts.
#[derive(Debug, PartialEq)]
enum IfMatch {
    None,
    Any,
    Etag(String),
}

fn if_match(raw: Option<&str>) -> IfMatch {
    match raw.map(str::trim) {
        Some(v) if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') => {
            match &v[1..v.len() - 1] {
                "*" => IfMatch::Any,
                e => IfMatch::Etag(e.to_string()),
            }
        }
        _ => IfMatch::None,
    }
}

fn valid_auth(a: &Value) -> bool {
    match a["type"].as_str() {
        Some("sas") => {
            let k = |p: &str| {
                a.pointer(p)
                    .and_then(Value::as_str)
                    .is_some_and(|k| B64.decode(k).is_ok_and(|b| (16..=64).contains(&b.len())))
            };
            k("/symmetricKey/primaryKey") && k("/symmetricKey/secondaryKey")
        }
        Some("selfSigned") => a
            .pointer("/x509Thumbprint/primaryThumbprint")
            .and_then(Value::as_str)
            .is_some_and(|t| {
                (t.len() == 40 || t.len() == 64) && t.chars().all(|c| c.is_ascii_hexdigit())
            }),
        Some("certificateAuthority") | Some("none") => true,
        _ => false,
    }
}

/// Twin documents: keys without `.`, `$`, space or control characters (`$` allowed as the
/// first character only in what the hub adds, so not here), at most 10 nested objects.
fn check_twin_doc(v: &Value, depth: usize) -> Result<(), String> {
    if let Value::Object(m) = v {
        if depth > 10 {
            return Err("the twin is nested more than 10 levels deep".into());
        }
        for (k, val) in m {
            if k.is_empty()
                || k.len() > 1024
                || k.chars()
                    .any(|c| c == '.' || c == '$' || c == ' ' || c.is_control())
            {
                return Err(format!("invalid property name '{k}'"));
            }
            check_twin_doc(val, depth + 1)?;
        }
    }
    Ok(())
}

fn check_twin_part(v: &Value, what: &str) -> Result<(), String> {
    if !v.is_object() && !v.is_null() {
        return Err(format!("{what} must be an object"));
    }
    check_twin_doc(v, 1)?;
    if v.to_string().len() > 32 * 1024 {
        return Err(format!("{what} larger than 32 KB"));
    }
    Ok(())
}

fn merge_patch(target: &mut Value, patch: &Value) {
    if !target.is_object() {
        *target = json!({});
    }
    if let (Some(t), Some(p)) = (target.as_object_mut(), patch.as_object()) {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else if v.is_object() && t.get(k).is_some_and(Value::is_object) {
                merge_patch(t.get_mut(k).unwrap(), v);
            } else {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

fn with_meta(v: &Value, version: u64) -> Value {
    let mut m = v.as_object().cloned().unwrap_or_default();
    m.insert(
        "$metadata".into(),
        json!({"$lastUpdated": "2026-01-01T00:00:00Z"}),
    );
    m.insert("$version".into(), json!(version));
    Value::Object(m)
}

// ------------------------------------------------------------------------------- routes

async fn handle(
    State(state): State<Arc<FakeState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let policies = state.policies.lock().unwrap().clone();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let policy = match verify_token(auth, &state.host, &policies, now) {
        Ok(p) => p,
        Err(why) => {
            *state.refused.lock().unwrap() += 1;
            return error(401, 401_002, &format!("Unauthorized: {why}"));
        }
    };
    let raw = parse_token(auth).expect("verified");
    let path = percent_decode(uri.path()).unwrap_or_default();
    let if_match_raw = headers
        .get("if-match")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut r = route(
        &state,
        &policy,
        &method,
        &uri,
        &path,
        if_match_raw.as_deref(),
        &body,
    );
    let code = code_of(&r);
    r.headers_mut().remove("x-standin-code");
    state.log.lock().unwrap().push(Logged {
        method: method.to_string(),
        path,
        if_match: if_match_raw,
        sr_raw: raw.sr,
        skn_raw: raw.skn,
        status: r.status().as_u16(),
        code,
    });
    r
}

fn tagged(mut r: Response, code: u32) -> Response {
    r.headers_mut()
        .insert("x-standin-code", code.to_string().parse().unwrap());
    r
}

fn fail(status: u16, code: u32, text: &str) -> Response {
    tagged(error(status, code, text), code)
}

fn route(
    state: &FakeState,
    policy: &Policy,
    method: &Method,
    uri: &Uri,
    path: &str,
    if_match_raw: Option<&str>,
    body: &Bytes,
) -> Response {
    if *state.failing_over.lock().unwrap() {
        return fail(404, 404_012, "The IoT hub is failing over; retry later");
    }
    if *state.quota_exhausted.lock().unwrap() {
        return fail(
            403,
            403_002,
            "Total number of messages on IotHub exceeded the allocated quota",
        );
    }
    if !uri
        .query()
        .unwrap_or("")
        .split('&')
        .any(|q| q == "api-version=2021-04-12")
    {
        return fail(400, 400_001, "api-version 2021-04-12 expected");
    }
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (kind, id) = match segs.as_slice() {
        ["devices", id] if !id.is_empty() => ("devices", *id),
        ["twins", id] if !id.is_empty() => ("twins", *id),
        _ => return fail(404, 404_000, "no such route"),
    };
    let right = match (kind, method.as_str()) {
        ("devices", "GET") => Right::RegistryRead,
        ("devices", "PUT" | "DELETE") => Right::RegistryWrite,
        ("twins", "GET" | "PUT" | "PATCH") => Right::ServiceConnect,
        _ => return fail(405, 405_000, "method not allowed"),
    };
    if !policy.allows(right) {
        return fail(
            401,
            401_002,
            &format!(
                "Authorization rule '{}' does not allow access for '{right:?}'",
                policy.name
            ),
        );
    }
    if kind == "twins" && *state.tier.lock().unwrap() == Tier::Basic {
        return fail(
            403,
            403_010,
            "This operation is not valid for the current IoT Hub tier",
        );
    }
    if kind == "devices" {
        let budget = *state.registry_budget.lock().unwrap();
        let mut used = state.registry_ops.lock().unwrap();
        if budget.is_some_and(|b| *used >= b) {
            return fail(429, 429_001, "Registry operations throttled");
        }
        *used += 1;
    }
    {
        let mut inj = state.injected.lock().unwrap();
        if let Some(i) = inj
            .iter_mut()
            .find(|i| i.method == *method && i.path == path && i.times > 0)
        {
            i.times -= 1;
            let mut r = fail(i.status, i.code, "injected failure");
            if let Some(ra) = i.retry_after {
                r.headers_mut()
                    .insert("retry-after", ra.to_string().parse().unwrap());
            }
            return r;
        }
    }
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(_) => return fail(400, 400_004, "the body is not JSON"),
        }
    };
    let cond = if_match(if_match_raw);
    match kind {
        "devices" => devices(state, method, id, cond, &body),
        _ => twins(state, method, id, cond, &body),
    }
}

fn not_found(id: &str) -> Response {
    fail(404, 404_001, &format!("Device {id} not registered"))
}

fn devices(state: &FakeState, method: &Method, id: &str, cond: IfMatch, body: &Value) -> Response {
    let mut devices = state.devices.lock().unwrap();
    let current = devices.get(id).cloned();
    let stale = |cur: &Value| matches!(&cond, IfMatch::Etag(e) if cur["etag"].as_str() != Some(e));
    match method.as_str() {
        "GET" => match current {
            Some(d) => {
                let e = d["etag"].as_str().map(str::to_string);
                ok(d, e.as_deref())
            }
            None => not_found(id),
        },
        "DELETE" => match current {
            None => not_found(id),
            Some(cur) if stale(&cur) => fail(412, 412_001, "ETag mismatch"),
            Some(_) => {
                devices.remove(id);
                state.twins.lock().unwrap().remove(id);
                StatusCode::NO_CONTENT.into_response()
            }
        },
        _ => {
            // PUT: create without If-Match, replace with one.
            match (&cond, &current) {
                (IfMatch::None, Some(_)) => {
                    return fail(
                        409,
                        409_001,
                        &format!("A device with ID '{id}' is already registered."),
                    )
                }
                (IfMatch::Any | IfMatch::Etag(_), None) => return not_found(id),
                (_, Some(cur)) if stale(cur) => return fail(412, 412_001, "ETag mismatch"),
                _ => {}
            }
            if body["deviceId"].as_str() != Some(id) {
                return fail(400, 400_004, "deviceId in the body does not match the URL");
            }
            if !matches!(body["status"].as_str(), None | Some("enabled" | "disabled")) {
                return fail(400, 400_004, "invalid status");
            }
            if !valid_auth(&body["authentication"]) {
                return fail(400, 400_004, "invalid authentication");
            }
            // A full replacement: what is not sent is reset.
            let mut d = json!({
                "deviceId": id,
                "status": body["status"].as_str().unwrap_or("enabled"),
                "authentication": body["authentication"],
                "capabilities": {"iotEdge": body.pointer("/capabilities/iotEdge").and_then(Value::as_bool).unwrap_or(false)},
                "connectionState": "Disconnected",
                "cloudToDeviceMessageCount": 0,
                "generationId": current.as_ref().map(|c| c["generationId"].clone()).unwrap_or_else(|| json!(format!("6380{:014}", state.etags.load(Ordering::Relaxed)))),
                "etag": state.next_etag(),
            });
            for k in ["statusReason", "deviceScope", "parentScopes"] {
                if let Some(v) = body.get(k).filter(|v| !v.is_null()) {
                    d[k] = v.clone();
                }
            }
            devices.insert(id.to_string(), d.clone());
            drop(devices);
            if current.is_none() {
                state.twins.lock().unwrap().insert(
                    id.to_string(),
                    json!({"tags": {}, "desired": {}, "etag": state.next_etag(), "version": 1}),
                );
            }
            let e = d["etag"].as_str().map(str::to_string);
            ok(d, e.as_deref())
        }
    }
}

fn twins(state: &FakeState, method: &Method, id: &str, cond: IfMatch, body: &Value) -> Response {
    let Some(dev) = state.devices.lock().unwrap().get(id).cloned() else {
        return not_found(id);
    };
    let mut twins = state.twins.lock().unwrap();
    let t = twins.entry(id.to_string()).or_insert_with(
        || json!({"tags": {}, "desired": {}, "etag": "AAAAAAAAAAE=", "version": 1}),
    );
    if method != Method::GET {
        if let IfMatch::Etag(e) = &cond {
            if t["etag"].as_str() != Some(e) {
                return fail(412, 412_001, "ETag mismatch");
            }
        }
        let tags = body.get("tags").cloned().unwrap_or(Value::Null);
        let desired = body
            .pointer("/properties/desired")
            .cloned()
            .unwrap_or(Value::Null);
        if let Err(e) = check_twin_part(&tags, "tags").and(check_twin_part(&desired, "desired")) {
            return fail(400, 400_004, &e);
        }
        if method == Method::PUT {
            t["tags"] = if tags.is_null() { json!({}) } else { tags };
            t["desired"] = if desired.is_null() {
                json!({})
            } else {
                desired
            };
        } else {
            if !tags.is_null() {
                merge_patch(&mut t["tags"], &tags);
            }
            if !desired.is_null() {
                merge_patch(&mut t["desired"], &desired);
            }
        }
        if check_twin_part(&t["tags"], "tags")
            .and(check_twin_part(&t["desired"], "desired"))
            .is_err()
        {
            return fail(400, 400_004, "the twin would exceed its limits");
        }
        t["etag"] = state.next_etag().into();
        t["version"] = (t["version"].as_u64().unwrap_or(1) + 1).into();
    }
    let version = t["version"].as_u64().unwrap_or(1);
    let etag = t["etag"].as_str().unwrap_or("").to_string();
    ok(
        json!({
            "deviceId": id, "etag": etag, "deviceEtag": dev["etag"], "status": dev["status"],
            "connectionState": "Disconnected", "version": version,
            "authenticationType": dev["authentication"]["type"],
            "tags": t["tags"],
            "properties": {"desired": with_meta(&t["desired"], version), "reported": with_meta(&json!({}), 1)},
            "capabilities": dev["capabilities"],
        }),
        Some(&etag),
    )
}

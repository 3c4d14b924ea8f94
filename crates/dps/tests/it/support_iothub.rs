//! A local stand-in for Azure IoT Hub's service REST API, for CONTRACT tests of the
//! `azure-iothub` adapter (no real hub is reachable from CI). It follows the published contract
//! the adapter relies on, api-version 2021-04-12:
//!
//! * every request carries `Authorization: SharedAccessSignature sr={hubHost}&sig=…&se=…&skn={policy}`
//!   signed with the policy key; otherwise 401 `IotHubUnauthorizedAccess`;
//! * `PUT /devices/{id}` creates (409 `DeviceAlreadyExists` when it exists and no `If-Match`),
//!   `If-Match: *` replaces (404 `DeviceNotFound` when missing); `GET`, `DELETE` (404 when missing);
//! * `GET /twins/{id}`, `PUT /twins/{id}` (replace tags + desired), `PATCH /twins/{id}` (merge);
//! * errors as `{"Message":"ErrorCode:<code>;<text>","ExceptionMessage":"Tracking ID:…"}`;
//! * a switch to answer every request with 503, or 429 with `Retry-After`.

#![allow(dead_code)]

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use dps_core::instance::{HubKind, LinkedHub};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub const HUB_POLICY: &str = "registryReadWrite";
pub const HUB_KEY: &str = "ZmFrZS1pb3QtaHViLXBvbGljeS1rZXktMDEyMzQ1Njc4OWFiY2Q=";

#[derive(Default)]
pub struct FakeState {
    pub host: String,
    pub devices: Mutex<HashMap<String, Value>>,
    pub twins: Mutex<HashMap<String, Value>>,
    /// Answer everything with (status, retry-after).
    pub fail: Mutex<Option<(u16, Option<u32>)>>,
    /// "METHOD /path if-match" per request that passed auth.
    pub log: Mutex<Vec<String>>,
    /// Requests refused for a bad token.
    pub refused: Mutex<u32>,
}

pub struct FakeIotHub {
    pub base: String,
    pub state: Arc<FakeState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeIotHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeIotHub {
    pub async fn start(host: &str) -> FakeIotHub {
        let state = Arc::new(FakeState {
            host: host.to_string(),
            ..Default::default()
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        FakeIotHub { base, state, task }
    }

    pub fn connection_string_with(&self, key: &str) -> String {
        format!(
            "HostName={};SharedAccessKeyName={HUB_POLICY};SharedAccessKey={key}",
            self.state.host
        )
    }

    /// The linked hub for dps (`host` = the hub host devices are told).
    pub fn linked_hub(&self, key: &str) -> LinkedHub {
        let mut h = LinkedHub::new(&self.state.host, HubKind::AzureIotHub);
        h.connection_string = Some(self.connection_string_with(key));
        h.options
            .insert("endpoint".into(), self.base.clone().into());
        h.options.insert("timeout_ms".into(), 3000.into());
        h
    }

    pub fn device(&self, id: &str) -> Option<Value> {
        self.state.devices.lock().unwrap().get(id).cloned()
    }

    pub fn twin(&self, id: &str) -> Option<Value> {
        self.state.twins.lock().unwrap().get(id).cloned()
    }

    pub fn log(&self) -> Vec<String> {
        self.state.log.lock().unwrap().clone()
    }
}

fn error(status: StatusCode, code: &str, text: &str) -> Response {
    let body = json!({
        "Message": format!("ErrorCode:{code};{text}"),
        "ExceptionMessage": format!("Tracking ID:{}-G:0-TimeStamp:01/01/2026 00:00:00", uuid::Uuid::new_v4().simple()),
    });
    (
        status,
        [
            ("content-type", "application/json; charset=utf-8"),
            ("iothub-errorcode", code),
        ],
        body.to_string(),
    )
        .into_response()
}

fn ok(v: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json; charset=utf-8")],
        v.to_string(),
    )
        .into_response()
}

fn etag() -> String {
    format!("\"{}\"", uuid::Uuid::new_v4().simple())
}

fn authorized(state: &FakeState, headers: &HeaderMap) -> bool {
    let Some(h) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Ok(t) = dps_core::sas::SasToken::parse(h) else {
        return false;
    };
    t.sr.eq_ignore_ascii_case(&state.host)
        && t.skn.as_deref() == Some(HUB_POLICY)
        && t.check_expiry(time::OffsetDateTime::now_utc().unix_timestamp())
            .is_ok()
        && t.verify_signature([HUB_KEY]).is_ok()
}

fn with_meta(v: &Value) -> Value {
    let mut m = v.as_object().cloned().unwrap_or_default();
    m.insert(
        "$metadata".into(),
        json!({"$lastUpdated": "2026-01-01T00:00:00Z"}),
    );
    m.insert("$version".into(), json!(1));
    Value::Object(m)
}

fn strip_meta(v: &Value) -> Value {
    match v.as_object() {
        Some(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        None => json!({}),
    }
}

fn merge_patch(target: &mut Value, patch: &Value) {
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

fn valid_auth(a: &Value) -> bool {
    match a["type"].as_str() {
        Some("sas") => {
            use base64::Engine;
            let k = |p: &str| {
                a.pointer(p).and_then(Value::as_str).is_some_and(|k| {
                    base64::engine::general_purpose::STANDARD
                        .decode(k)
                        .is_ok_and(|b| b.len() >= 16)
                })
            };
            k("/symmetricKey/primaryKey") && k("/symmetricKey/secondaryKey")
        }
        Some("selfSigned") => a
            .pointer("/x509Thumbprint/primaryThumbprint")
            .and_then(Value::as_str)
            .is_some_and(|t| t.len() == 40 || t.len() == 64),
        _ => false,
    }
}

async fn handle(
    State(state): State<Arc<FakeState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&state, &headers) {
        *state.refused.lock().unwrap() += 1;
        return error(
            StatusCode::UNAUTHORIZED,
            "IotHubUnauthorizedAccess",
            "Unauthorized",
        );
    }
    if let Some((status, ra)) = *state.fail.lock().unwrap() {
        let s = StatusCode::from_u16(status).unwrap();
        let mut r = if status == 429 {
            error(s, "ThrottleBacklogLimitExceeded", "throttled")
        } else {
            error(s, "ServiceUnavailable", "unavailable")
        };
        if let Some(ra) = ra {
            r.headers_mut()
                .insert("retry-after", ra.to_string().parse().unwrap());
        }
        return r;
    }
    if uri.query() != Some("api-version=2021-04-12") {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidProtocolVersion",
            "api-version 2021-04-12 expected",
        );
    }
    let if_match = headers
        .get("if-match")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let path = uri.path().to_string();
    state.log.lock().unwrap().push(format!(
        "{method} {path} {}",
        if_match.as_deref().unwrap_or("-")
    ));
    let segs: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "ArgumentInvalid",
                    "body is not JSON",
                )
            }
        }
    };
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    match (segs.as_slice(), method) {
        (["devices", id], Method::PUT) => {
            let mut devices = state.devices.lock().unwrap();
            let exists = devices.contains_key(*id);
            match (&if_match, exists) {
                (None, true) => {
                    return error(
                        StatusCode::CONFLICT,
                        "DeviceAlreadyExists",
                        &format!("A device with ID '{id}' is already registered."),
                    )
                }
                (Some(_), false) => {
                    return error(
                        StatusCode::NOT_FOUND,
                        "DeviceNotFound",
                        &format!("Device {id} not registered"),
                    )
                }
                _ => {}
            }
            if body["deviceId"].as_str() != Some(*id) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "ArgumentInvalid",
                    "deviceId in the body does not match the URL",
                );
            }
            if !valid_auth(&body["authentication"]) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "ArgumentInvalid",
                    "invalid authentication",
                );
            }
            let mut d = body.clone();
            d["etag"] = etag().into();
            d["generationId"] = "638000000000000000".into();
            d["connectionState"] = "Disconnected".into();
            devices.insert(id.to_string(), d.clone());
            drop(devices);
            state
                .twins
                .lock()
                .unwrap()
                .entry(id.to_string())
                .or_insert_with(|| json!({"tags": {}, "desired": {}}));
            ok(d)
        }
        (["devices", id], Method::GET) => match state.devices.lock().unwrap().get(*id) {
            Some(d) => ok(d.clone()),
            None => error(
                StatusCode::NOT_FOUND,
                "DeviceNotFound",
                &format!("Device {id} not registered"),
            ),
        },
        (["devices", id], Method::DELETE) => {
            if if_match.is_none() {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidOperation",
                    "If-Match header required",
                );
            }
            if state.devices.lock().unwrap().remove(*id).is_none() {
                return error(
                    StatusCode::NOT_FOUND,
                    "DeviceNotFound",
                    &format!("Device {id} not registered"),
                );
            }
            state.twins.lock().unwrap().remove(*id);
            StatusCode::NO_CONTENT.into_response()
        }
        (["twins", id], m) if m == Method::GET || m == Method::PUT || m == Method::PATCH => {
            let Some(dev) = state.devices.lock().unwrap().get(*id).cloned() else {
                return error(
                    StatusCode::NOT_FOUND,
                    "DeviceNotFound",
                    &format!("Device {id} not registered"),
                );
            };
            let mut twins = state.twins.lock().unwrap();
            let t = twins
                .entry(id.to_string())
                .or_insert_with(|| json!({"tags": {}, "desired": {}}));
            if m == Method::PUT {
                t["tags"] = strip_meta(&body["tags"]);
                t["desired"] = strip_meta(
                    &body
                        .pointer("/properties/desired")
                        .cloned()
                        .unwrap_or(json!({})),
                );
            } else if m == Method::PATCH {
                merge_patch(&mut t["tags"], &body["tags"]);
                if let Some(d) = body.pointer("/properties/desired") {
                    merge_patch(&mut t["desired"], d);
                }
            }
            ok(json!({
                "deviceId": id, "etag": "AAAAAAAAAAE=", "deviceEtag": dev["etag"], "status": dev["status"],
                "connectionState": "Disconnected", "version": 2,
                "authenticationType": dev["authentication"]["type"],
                "tags": t["tags"],
                "properties": {"desired": with_meta(&t["desired"]), "reported": with_meta(&json!({}))},
                "capabilities": dev["capabilities"],
            }))
        }
        _ => error(StatusCode::NOT_FOUND, "NotFound", "no such route"),
    }
}

//! Test support for `webhook` linked hubs: [`FakeWebhook`], a local receiver that checks
//! `x-dps-signature` (HMAC-SHA256 of the body with [`SECRET`]: a wrong secret gets 401), keeps
//! a registry as docs/linked-hubs.md describes it, and fails on demand.

#![allow(dead_code)]

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use dps_core::instance::{HubKind, LinkedHub};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

pub const SECRET: &str = "webhook-shared-secret";

#[derive(Default)]
pub struct HookState {
    /// deviceId → last upsert body (twin kept when `twin` is null).
    pub devices: Mutex<HashMap<String, Value>>,
    /// Every verified request body.
    pub requests: Mutex<Vec<Value>>,
    /// Requests with a bad or missing signature.
    pub bad_signatures: AtomicU32,
    /// Answer the next N requests with `fail_status`.
    pub fail_next: AtomicU32,
    /// Answer every request with this status (0 = off).
    pub always: AtomicU32,
    pub fail_status: AtomicU32,
    pub hits: AtomicU32,
}

pub struct FakeWebhook {
    pub url: String,
    pub state: Arc<HookState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeWebhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeWebhook {
    pub async fn start() -> FakeWebhook {
        let state = Arc::new(HookState::default());
        state.fail_status.store(503, Ordering::SeqCst);
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(state.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        FakeWebhook { url, state, task }
    }

    pub fn linked_hub(&self, host: &str) -> LinkedHub {
        webhook_hub(host, &self.url)
    }
}

pub fn webhook_hub(host: &str, url: &str) -> LinkedHub {
    let mut h = LinkedHub::new(host, HubKind::Webhook);
    h.connection_string = Some(url.to_string());
    h.options.insert("secret".into(), SECRET.into());
    h.options.insert("timeout_ms".into(), 2000.into());
    h
}

async fn hook(State(st): State<Arc<HookState>>, headers: HeaderMap, body: Bytes) -> Response {
    st.hits.fetch_add(1, Ordering::SeqCst);
    let sig = headers
        .get("x-dps-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let want = format!(
        "sha256={}",
        hex::encode(dps_core::sas::hmac_sha256(SECRET.as_bytes(), &body))
    );
    if sig != want {
        st.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    let always = st.always.load(Ordering::SeqCst);
    if always != 0 {
        return (
            StatusCode::from_u16(always as u16).unwrap(),
            [("retry-after", "4")],
            "no",
        )
            .into_response();
    }
    if st.fail_next.load(Ordering::SeqCst) > 0 {
        st.fail_next.fetch_sub(1, Ordering::SeqCst);
        return StatusCode::from_u16(st.fail_status.load(Ordering::SeqCst) as u16)
            .unwrap()
            .into_response();
    }
    let v: Value = serde_json::from_slice(&body).unwrap();
    st.requests.lock().unwrap().push(v.clone());
    let id = v["deviceId"].as_str().unwrap_or_default().to_string();
    let mut devices = st.devices.lock().unwrap();
    match v["action"].as_str() {
        Some("upsert") => {
            let mut d = v.clone();
            if d["twin"].is_null() {
                d["twin"] = devices
                    .get(&id)
                    .map(|o| o["twin"].clone())
                    .unwrap_or(Value::Null);
            }
            devices.insert(id, d);
            StatusCode::NO_CONTENT.into_response()
        }
        Some("getTwin") => match devices.get(&id) {
            Some(d) => axum::Json(json!({"twin": d["twin"]})).into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        },
        Some("setEnabled") => match devices.get_mut(&id) {
            Some(d) => {
                d["enabled"] = v["enabled"].clone();
                StatusCode::NO_CONTENT.into_response()
            }
            None => StatusCode::NOT_FOUND.into_response(),
        },
        Some("delete") => match devices.remove(&id) {
            Some(_) => StatusCode::NO_CONTENT.into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        },
        _ => StatusCode::BAD_REQUEST.into_response(),
    }
}

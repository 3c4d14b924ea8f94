//! `webhook` linked hubs: a local receiver that checks `x-dps-signature` and keeps a registry.

use crate::support::*;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use dps_core::hub::{HubAdapter, HubAuth, HubError, HubIdentity};
use dps_core::instance::{HubKind, LinkedHub};
use dps_core::model::{TwinProperties, TwinState};
use dps_server::hubs::webhook::WebhookHub;
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
    let mut h = LinkedHub::registry(host);
    h.kind = HubKind::Webhook;
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

#[tokio::test]
async fn webhook_hub_receives_signed_identity_and_twin_on_assignment() {
    let w = FakeWebhook::start().await;
    let s = TestServer::spawn_with(|c| {
        c.instances[0].linked_hub = vec![w.linked_hub("things.example.com")]
    })
    .await;
    let key = s.enroll("wh-dev-1", json!({"initialTwin": {"tags": {"site": "s1"}, "properties": {"desired": {"fw": "1.2"}}}})).await;
    let r = s.register("wh-dev-1", &key, None).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    assert_eq!(
        r.body["registrationState"]["assignedHub"],
        "things.example.com"
    );
    assert_eq!(w.state.bad_signatures.load(Ordering::SeqCst), 0);
    let d = w
        .state
        .devices
        .lock()
        .unwrap()
        .get("wh-dev-1")
        .cloned()
        .expect("upserted");
    assert_eq!(d["action"], "upsert");
    assert_eq!(d["hub"], "things.example.com");
    assert_eq!(d["enabled"], true);
    assert_eq!(d["authentication"]["type"], "sas");
    assert_eq!(
        d["authentication"]["symmetricKey"]["primaryKey"],
        key.as_str()
    );
    assert_eq!(d["capabilities"], json!({"iotEdge": false}));
    assert_eq!(
        d["twin"],
        json!({"tags": {"site": "s1"}, "properties": {"desired": {"fw": "1.2"}}})
    );
    assert!(d["timestamp"].is_i64() && d["requestId"].is_string());
}

#[tokio::test]
async fn webhook_adapter_actions_retries_and_error_mapping() {
    let w = FakeWebhook::start().await;
    let http = reqwest::Client::new();
    let a = WebhookHub::new(&w.linked_hub("hook-hub"), &http);
    let id = HubIdentity {
        device_id: "w-1".into(),
        auth: HubAuth::X509Thumbprint {
            primary: "CD".repeat(32),
            secondary: None,
        },
        capabilities: Default::default(),
        enabled: true,
    };
    let twin = TwinState {
        tags: Some(json!({"t": 1})),
        properties: Some(TwinProperties {
            desired: Some(json!({"d": 2})),
        }),
    };
    a.upsert_device(&id, Some(&twin)).await.unwrap();
    assert_eq!(a.get_twin("w-1").await.unwrap(), Some(twin.clone()));
    assert_eq!(a.get_twin("nobody").await.unwrap(), None);
    a.set_enabled("w-1", false).await.unwrap();
    assert_eq!(w.state.devices.lock().unwrap()["w-1"]["enabled"], false);
    a.set_enabled("nobody", false).await.unwrap();
    a.delete_device("w-1").await.unwrap();
    a.delete_device("w-1").await.unwrap();
    let actions: Vec<String> = w
        .state
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        actions,
        [
            "upsert",
            "getTwin",
            "getTwin",
            "setEnabled",
            "setEnabled",
            "delete",
            "delete"
        ]
    );
    assert_eq!(
        w.state.requests.lock().unwrap()[0]["authentication"]["type"],
        "selfSigned"
    );

    // Two 503s then success: retried (3 tries in all).
    w.state.hits.store(0, Ordering::SeqCst);
    w.state.fail_next.store(2, Ordering::SeqCst);
    a.upsert_device(&id, None).await.unwrap();
    assert_eq!(w.state.hits.load(Ordering::SeqCst), 3);
    // Always 503: Unreachable after 3 tries.
    w.state.hits.store(0, Ordering::SeqCst);
    w.state.always.store(503, Ordering::SeqCst);
    assert!(matches!(
        a.upsert_device(&id, None).await,
        Err(HubError::Unreachable { .. })
    ));
    assert_eq!(w.state.hits.load(Ordering::SeqCst), 3);
    // 4xx: not retried.
    w.state.hits.store(0, Ordering::SeqCst);
    w.state.always.store(422, Ordering::SeqCst);
    assert!(matches!(
        a.upsert_device(&id, None).await,
        Err(HubError::Rejected { .. })
    ));
    assert_eq!(w.state.hits.load(Ordering::SeqCst), 1);
    w.state.always.store(429, Ordering::SeqCst);
    assert!(matches!(
        a.delete_device("w-1").await,
        Err(HubError::Throttled { retry_after: 4, .. })
    ));
    w.state.always.store(0, Ordering::SeqCst);

    // Wrong secret: the receiver refuses it → Unauthorized.
    let mut wrong = w.linked_hub("hook-hub");
    wrong.options.insert("secret".into(), "other".into());
    assert!(matches!(
        WebhookHub::new(&wrong, &http).delete_device("x").await,
        Err(HubError::Unauthorized { .. })
    ));
    assert_eq!(w.state.bad_signatures.load(Ordering::SeqCst), 1);
}

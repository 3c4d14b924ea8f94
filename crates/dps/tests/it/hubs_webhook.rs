//! `webhook` linked hubs against a local receiver that checks `x-dps-signature` and keeps a
//! registry (support_webhook.rs): the wire format, retries and status mapping. The adapter's
//! contract (upsert, twins, enable, delete, timeouts, refused credentials) is in
//! hub_contract.rs.

use crate::support::*;
use crate::support_webhook::*;
use dps_core::hub::{HubAdapter, HubAuth, HubError, HubIdentity};
use dps_core::model::{TwinProperties, TwinState};
use dps_server::hubs::webhook::WebhookHub;
use serde_json::json;
use std::sync::atomic::Ordering;

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
    let http = dps_server::outbound::Outbound::permissive();
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

//! `azure-iothub` linked hubs against the local IoT Hub stand-in (support_iothub.rs), not a
//! real Azure IoT Hub: provisioning end to end, the REST calls and the status mapping. The
//! adapter's part of the shared contract (upsert, twins, enable, delete, timeouts, refused
//! credentials) is in hub_contract.rs.

use crate::support::*;
use crate::support_iothub::*;
use dps_core::hub::{HubAdapter, HubAuth, HubError, HubIdentity};
use dps_core::model::{TwinProperties, TwinState};
use dps_server::hubs::azure::AzureIotHub;
use serde_json::json;

fn identity(id: &str) -> HubIdentity {
    HubIdentity {
        device_id: id.into(),
        auth: HubAuth::SymmetricKey {
            primary: OWNER_KEY.into(),
            secondary: READER_KEY.into(),
        },
        capabilities: Default::default(),
        enabled: true,
    }
}

#[tokio::test]
async fn azure_hub_provisioning_creates_identity_twin_and_migrates_between_hubs() {
    let h1 = FakeIotHub::start("fab-1.azure-devices.net").await;
    let h2 = FakeIotHub::start("fab-2.azure-devices.net").await;
    let (l1, l2) = (h1.linked_hub(HUB_KEY), h2.linked_hub(HUB_KEY));
    let s = TestServer::spawn_with(|c| c.instances[0].linked_hub = vec![l1, l2]).await;

    let keys = (dps_core::sas::generate_key(), dps_core::sas::generate_key());
    let key = s
        .enroll(
            "az-dev-1",
            json!({"iotHubs": ["fab-1.azure-devices.net"], "capabilities": {"iotEdge": true},
                   "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": keys.0, "secondaryKey": keys.1}},
                   "initialTwin": {"tags": {"facility": "north"}, "properties": {"desired": {"interval": 5}}}}),
        )
        .await;
    let r = s.register("az-dev-1", &key, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    assert_eq!(
        r.body["registrationState"]["assignedHub"],
        "fab-1.azure-devices.net"
    );

    let d = h1.device("az-dev-1").expect("identity created on hub 1");
    assert_eq!(d["authentication"]["type"], "sas");
    assert_eq!(
        d["authentication"]["symmetricKey"]["primaryKey"],
        key.as_str()
    );
    assert_eq!(d["capabilities"]["iotEdge"], true);
    assert_eq!(d["status"], "enabled");
    let t = h1.twin("az-dev-1").unwrap();
    assert_eq!(t["tags"], json!({"facility": "north"}));
    assert_eq!(t["desired"], json!({"interval": 5}));

    // The twin changes on the hub, then the enrollment moves the device to hub 2.
    h1.state.twins.lock().unwrap().get_mut("az-dev-1").unwrap()["desired"] =
        json!({"interval": 60});
    set_hubs(&s, "az-dev-1", &keys, json!(["fab-2.azure-devices.net"])).await;
    let r = s.register("az-dev-1", &key, None).await;
    assert_eq!(
        r.body["registrationState"]["assignedHub"], "fab-2.azure-devices.net",
        "{}",
        r.body
    );
    assert!(h2.device("az-dev-1").is_some());
    assert_eq!(
        h2.twin("az-dev-1").unwrap()["desired"],
        json!({"interval": 60}),
        "twin migrated"
    );
    assert!(
        h1.device("az-dev-1").is_none(),
        "identity removed from the old hub: {:?}",
        h1.log()
    );
    assert!(
        h1.log().iter().any(|l| l == "DELETE /devices/az-dev-1 *"),
        "{:?}",
        h1.log()
    );

    // Registering again on the same hub replaces the identity (409 → If-Match: *).
    let r = s.register("az-dev-1", &key, None).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    let log = h2.log();
    assert!(
        log.iter().any(|l| l == "PUT /devices/az-dev-1 *"),
        "{log:?}"
    );
}

#[tokio::test]
async fn azure_adapter_follows_the_rest_contract_and_maps_errors() {
    let h = FakeIotHub::start("contract.azure-devices.net").await;
    let http = reqwest::Client::new();
    let a = AzureIotHub::new(&h.linked_hub(HUB_KEY), &http);
    let twin = TwinState {
        tags: Some(json!({"a": 1})),
        properties: Some(TwinProperties {
            desired: Some(json!({"b": 2})),
        }),
    };

    a.upsert_device(&identity("c-1"), Some(&twin))
        .await
        .unwrap();
    a.upsert_device(&identity("c-1"), None).await.unwrap();
    assert_eq!(
        h.twin("c-1").unwrap()["tags"],
        json!({"a": 1}),
        "None keeps the twin"
    );
    let got = a.get_twin("c-1").await.unwrap().unwrap();
    assert_eq!(got.tags, Some(json!({"a": 1})));
    assert_eq!(
        got.properties.unwrap().desired,
        Some(json!({"b": 2})),
        "$metadata/$version stripped"
    );
    assert_eq!(a.get_twin("missing").await.unwrap(), None);

    a.set_enabled("c-1", false).await.unwrap();
    assert_eq!(h.device("c-1").unwrap()["status"], "disabled");
    assert_eq!(
        h.device("c-1").unwrap()["authentication"]["symmetricKey"]["primaryKey"],
        OWNER_KEY,
        "keys kept"
    );
    a.set_enabled("missing", true).await.unwrap();

    let x509 = HubIdentity {
        auth: HubAuth::X509Thumbprint {
            primary: "AB".repeat(32),
            secondary: None,
        },
        ..identity("c-x509")
    };
    a.upsert_device(&x509, None).await.unwrap();
    let d = h.device("c-x509").unwrap();
    assert_eq!(d["authentication"]["type"], "selfSigned");
    assert_eq!(
        d["authentication"]["x509Thumbprint"]["secondaryThumbprint"],
        "AB".repeat(32)
    );

    a.delete_device("c-1").await.unwrap();
    a.delete_device("c-1").await.unwrap(); // 404 is success

    // 429 with Retry-After → Throttled; 503 → Unreachable.
    *h.state.fail.lock().unwrap() = Some((429, Some(7)));
    assert!(matches!(
        a.upsert_device(&identity("c-2"), None).await,
        Err(HubError::Throttled { retry_after: 7, .. })
    ));
    *h.state.fail.lock().unwrap() = Some((503, None));
    assert!(matches!(
        a.get_twin("c-2").await,
        Err(HubError::Unreachable { .. })
    ));
    *h.state.fail.lock().unwrap() = None;

    // Other 4xx → Rejected, with Azure's error message.
    let bad = HubIdentity {
        device_id: "c-3".into(),
        auth: HubAuth::SymmetricKey {
            primary: "AA==".into(),
            secondary: "AA==".into(),
        },
        ..identity("c-3")
    };
    match a.upsert_device(&bad, None).await {
        Err(HubError::Rejected { message, .. }) => {
            assert!(message.contains("ArgumentInvalid"), "{message}")
        }
        other => panic!("{other:?}"),
    }

    // Rotated key → Unauthorized; nothing secret in the message.
    let rotated = AzureIotHub::new(&h.linked_hub(OWNER_KEY), &http);
    match rotated.upsert_device(&identity("c-4"), None).await {
        Err(HubError::Unauthorized { message, .. }) => {
            assert!(message.contains("IotHubUnauthorizedAccess"), "{message}");
            assert!(!message.contains(OWNER_KEY));
        }
        other => panic!("{other:?}"),
    }

    // Nothing listening → Unreachable.
    let mut down = h.linked_hub(HUB_KEY);
    let port = closed_port();
    down.options
        .insert("endpoint".into(), format!("http://127.0.0.1:{port}").into());
    let down = AzureIotHub::new(&down, &http);
    assert!(matches!(
        down.delete_device("x").await,
        Err(HubError::Unreachable { .. })
    ));

    // A broken connection string is reported on use, as Rejected.
    let mut broken = h.linked_hub(HUB_KEY);
    broken.connection_string = Some("HostName=x".into());
    assert!(matches!(
        AzureIotHub::new(&broken, &http).get_twin("x").await,
        Err(HubError::Rejected { .. })
    ));
}

//! The Rust device client (dps-device) against the real server: HTTPS, MQTT and AMQP over TLS,
//! individual and group keys, X.509, and typed errors.

use crate::support::*;
use dps_device::{Auth, Error, ProvisioningClient, Transport, Trust};
use serde_json::json;
use std::time::Duration;

fn client(s: &TestServer, rid: &str, auth: Auth, t: Transport) -> ProvisioningClient {
    let port = match t {
        Transport::Https => s.server.https.port(),
        Transport::Mqtt => s.server.mqtt.expect("mqtt listener").port(),
        Transport::Amqp => s.server.amqp.expect("amqp listener").port(),
    };
    ProvisioningClient::builder()
        .global_endpoint("localhost")
        .port(port)
        .id_scope(SCOPE)
        .registration_id(rid)
        .auth(auth)
        .transport(t)
        .trust(Trust::Pem(s.ca_pem.clone().into_bytes()))
        .poll_interval_override(Duration::from_millis(50))
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

#[tokio::test]
async fn the_rust_client_registers_over_https_mqtt_and_amqp_with_individual_and_group_keys() {
    let s = TestServer::spawn().await;
    let key = s.enroll("rc-ind", json!({})).await;
    let gkey = s.enroll_group("rc-grp", json!({})).await;
    for t in [Transport::Https, Transport::Mqtt, Transport::Amqp] {
        let r = client(&s, "rc-ind", Auth::SymmetricKey(key.clone()), t)
            .register()
            .await
            .expect("individual");
        assert_eq!(r.device_id(), Some("rc-ind"));
        // The instance answers 202 first (Azure's behaviour): one register, then polls.
        assert_eq!(r.timing.attempts, 1, "{t:?}");
        assert!(r.timing.polls >= 1, "{t:?}: {:?}", r.timing);
        assert!(r.timing.new_connection, "{t:?}");
        let rid = format!(
            "rc-grp-dev-{}",
            match t {
                Transport::Https => "h",
                Transport::Mqtt => "m",
                Transport::Amqp => "a",
            }
        );
        let r = client(&s, &rid, Auth::GroupKey(gkey.clone()), t)
            .register()
            .await
            .expect("group");
        assert!(r.assigned_hub().is_some());
        assert_eq!(
            r.state
                .symmetric_key
                .as_ref()
                .and_then(|k| k.enrollment_group_id.as_deref()),
            Some("rc-grp")
        );
    }
}

#[tokio::test]
async fn the_rust_client_reports_typed_errors() {
    let s = TestServer::spawn().await;
    let key = s
        .enroll("rc-dis", json!({"provisioningStatus": "disabled"}))
        .await;
    for t in [Transport::Https, Transport::Mqtt, Transport::Amqp] {
        let e = client(
            &s,
            "rc-unknown",
            Auth::SymmetricKey(dps_core::sas::generate_key()),
            t,
        )
        .register()
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Unauthorized { .. }), "{t:?}: {e:?}");
        let e = client(&s, "rc-dis", Auth::SymmetricKey(key.clone()), t)
            .register()
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Disabled { .. }), "{t:?}: {e:?}");
    }
}

//! `mosquitto` linked hubs against real Mosquitto 2.x brokers started by the test, with the
//! dynamic-security plugin (support_mosquitto.rs). Skipped (with a message) when mosquitto is
//! not installed, outside CI. The adapter's contract (upsert, twins, enable, delete, timeouts,
//! refused credentials) is in hub_contract.rs; these are the end-to-end and broker-specific
//! behaviours.

use crate::support::*;
use crate::support_mosquitto::*;
use dps_core::instance::{HubKind, LinkedHub};
use dps_server::hubs::mosquitto::derive_password;
use rumqttc::QoS;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn mosquitto_device_connects_with_its_credentials_and_only_reaches_its_topics() {
    let Some(b) = Broker::start().await else {
        return;
    };
    let s = TestServer::spawn_with(|c| {
        c.instances[0].linked_hub = vec![b.linked_hub("broker-a.local")]
    })
    .await;
    let key = s.enroll("mq-dev-1", json!({"initialTwin": {"tags": {"facility": "f1"}, "properties": {"desired": {"interval": 5}}}})).await;
    let r = s.register("mq-dev-1", &key, None).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    assert_eq!(r.body["registrationState"]["assignedHub"], "broker-a.local");

    // An admin watches every device topic.
    let (admin, el) = connect(b.port, "watcher", "admin", ADMIN_PW).await.unwrap();
    let mut watch = drive(el);
    let retained = subscribe(&admin, &mut watch, "devices/#").await;
    let _ = retained;

    // The device connects with username = device id and the derived password.
    let pw = derive_password(&key, "mq-dev-1").unwrap();
    assert!(
        connect(b.port, "mq-dev-1", "mq-dev-1", "wrong")
            .await
            .is_err(),
        "a wrong password is refused"
    );
    assert!(
        connect(b.port, "someone-else", "mq-dev-1", &pw)
            .await
            .is_err(),
        "the client id is pinned to the device id"
    );
    let (dev, el) = connect(b.port, "mq-dev-1", "mq-dev-1", &pw)
        .await
        .expect("device connects");
    let mut inbox = drive(el);
    // Its desired twin is waiting for it, retained.
    let got = subscribe(&dev, &mut inbox, "devices/mq-dev-1/twin/desired").await;
    let got = if got.iter().any(|m| m.0 == "devices/mq-dev-1/twin/desired") {
        got
    } else {
        next_until(&mut inbox, "devices/mq-dev-1/twin/desired").await
    };
    let desired = got
        .iter()
        .find(|m| m.0 == "devices/mq-dev-1/twin/desired")
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&desired.1).unwrap(),
        json!({"interval": 5})
    );

    // A publish to another device's topic is dropped; its own gets through (same connection,
    // so once the second arrives the first would have too).
    dev.publish(
        "devices/other-dev/telemetry",
        QoS::AtLeastOnce,
        false,
        "forbidden",
    )
    .await
    .unwrap();
    dev.publish(
        "devices/mq-dev-1/twin/desired",
        QoS::AtLeastOnce,
        false,
        "{\"spoofed\":1}",
    )
    .await
    .unwrap();
    dev.publish(
        "devices/mq-dev-1/telemetry",
        QoS::AtLeastOnce,
        false,
        "hello",
    )
    .await
    .unwrap();
    let seen = next_until(&mut watch, "devices/mq-dev-1/telemetry").await;
    assert_eq!(seen.last().unwrap().1, "hello");
    assert!(
        !seen.iter().any(|m| m.0 == "devices/other-dev/telemetry"),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|m| m.1.contains("spoofed")), "{seen:?}");

    // A second device can neither read nor write the first one's topics.
    let key2 = s.enroll("mq-dev-2", json!({})).await;
    assert_eq!(
        s.register("mq-dev-2", &key2, None).await.body["status"],
        "assigned"
    );
    let (dev2, el2) = connect(
        b.port,
        "mq-dev-2",
        "mq-dev-2",
        &derive_password(&key2, "mq-dev-2").unwrap(),
    )
    .await
    .unwrap();
    let mut inbox2 = drive(el2);
    subscribe(&dev2, &mut inbox2, "devices/mq-dev-1/#").await;
    dev.publish(
        "devices/mq-dev-1/telemetry",
        QoS::AtLeastOnce,
        false,
        "private",
    )
    .await
    .unwrap();
    let seen = next_until(&mut watch, "devices/mq-dev-1/telemetry").await;
    assert_eq!(seen.last().unwrap().1, "private");
    dev2.publish(
        "devices/mq-dev-2/telemetry",
        QoS::AtLeastOnce,
        false,
        "mine",
    )
    .await
    .unwrap();
    next_until(&mut watch, "devices/mq-dev-2/telemetry").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Ok(m) = inbox2.try_recv() {
        assert!(
            !m.0.starts_with("devices/mq-dev-1"),
            "device 2 received {m:?}"
        );
    }

    // Disabling and re-enabling through the adapter.
    let a = dps_server::hubs::mosquitto::MosquittoHub::new(&b.linked_hub("broker-a.local"));
    use dps_core::hub::HubAdapter;
    a.set_enabled("mq-dev-2", false).await.unwrap();
    assert!(connect(
        b.port,
        "mq-dev-2",
        "mq-dev-2",
        &derive_password(&key2, "mq-dev-2").unwrap()
    )
    .await
    .is_err());
    a.set_enabled("mq-dev-2", true).await.unwrap();
    assert!(connect(
        b.port,
        "mq-dev-2",
        "mq-dev-2",
        &derive_password(&key2, "mq-dev-2").unwrap()
    )
    .await
    .is_ok());
    let twin = a.get_twin("mq-dev-1").await.unwrap().expect("exists");
    assert_eq!(twin.tags, Some(json!({"facility": "f1"})));
    assert_eq!(a.get_twin("nobody").await.unwrap(), None);
    a.delete_device("mq-dev-2").await.unwrap();
    a.delete_device("mq-dev-2").await.unwrap();
}

#[tokio::test]
async fn mosquitto_reassignment_moves_the_device_to_the_other_broker() {
    let Some(a) = Broker::start().await else {
        return;
    };
    let Some(b) = Broker::start().await else {
        return;
    };
    let s = TestServer::spawn_with(|c| {
        c.instances[0].linked_hub = vec![
            a.linked_hub("broker-a.local"),
            b.linked_hub("broker-b.local"),
        ]
    })
    .await;
    let keys = (dps_core::sas::generate_key(), dps_core::sas::generate_key());
    let key = s
        .enroll(
            "mover",
            json!({"iotHubs": ["broker-a.local"], "initialTwin": {"tags": {"facility": "a"}, "properties": {"desired": {"mode": "x"}}},
                   "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": keys.0, "secondaryKey": keys.1}}}),
        )
        .await;
    let r = s.register("mover", &key, None).await;
    assert_eq!(
        r.body["registrationState"]["assignedHub"], "broker-a.local",
        "{}",
        r.body
    );
    let pw = derive_password(&key, "mover").unwrap();
    assert!(connect(a.port, "mover", "mover", &pw).await.is_ok());
    assert!(connect(b.port, "mover", "mover", &pw).await.is_err());

    set_hubs(&s, "mover", &keys, json!(["broker-b.local"])).await;
    let r = s.register("mover", &key, None).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    assert_eq!(
        r.body["registrationState"]["assignedHub"], "broker-b.local",
        "{}",
        r.body
    );

    let (dev, el) = connect(b.port, "mover", "mover", &pw)
        .await
        .expect("connects to broker B");
    assert!(
        connect(a.port, "mover", "mover", &pw).await.is_err(),
        "no longer accepted by broker A"
    );
    // The twin moved with it.
    let mut inbox = drive(el);
    let got = subscribe(&dev, &mut inbox, "devices/mover/twin/desired").await;
    let got = if got.iter().any(|m| m.0 == "devices/mover/twin/desired") {
        got
    } else {
        next_until(&mut inbox, "devices/mover/twin/desired").await
    };
    let m = got
        .iter()
        .find(|m| m.0 == "devices/mover/twin/desired")
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&m.1).unwrap(),
        json!({"mode": "x"})
    );
}

/// A broker that is down (nothing listening: the connection is refused at once) fails fast as
/// `Unreachable`; a broker that never answers and refused credentials are in hub_contract.rs.
#[tokio::test]
async fn mosquitto_down_maps_to_unreachable_fast() {
    use dps_core::hub::{HubAdapter, HubError};
    let mut h = LinkedHub::new("nowhere.local", HubKind::Mosquitto);
    h.connection_string = Some(format!("mqtt://admin:x@127.0.0.1:{}", closed_port()));
    h.options.insert("timeout_ms".into(), 1000.into());
    let a = dps_server::hubs::mosquitto::MosquittoHub::new(&h);
    let t0 = std::time::Instant::now();
    assert!(matches!(
        a.delete_device("d").await,
        Err(HubError::Unreachable { .. })
    ));
    assert!(t0.elapsed() < Duration::from_secs(3));
}

/// Read `rx` until a dynamic-security response carrying `correlation` arrives; returns how many
/// other responses came before it.
async fn responses_before(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    correlation: &str,
) -> usize {
    let mut others = 0;
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some((topic, body)) = rx.recv().await {
            if topic != dps_server::hubs::mosquitto::RESPONSE_TOPIC {
                continue;
            }
            if body.contains(correlation) {
                return;
            }
            others += 1;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no response for {correlation}"));
    others
}

/// Issue #14: a reboot storm of a provisioned fleet must not rewrite the broker's
/// dynamic-security file once per device. Every control message dps sends gets one response on
/// the response topic, which a watching admin sees in the broker's order; a sentinel command of
/// the watcher's own marks "everything before this has been answered".
#[tokio::test]
async fn mosquitto_re_registering_an_unchanged_device_sends_no_control_commands() {
    let Some(b) = Broker::start().await else {
        return;
    };
    let s = TestServer::spawn_with(|c| {
        c.instances[0].linked_hub = vec![b.linked_hub("broker-a.local")]
    })
    .await;
    // A watcher of its own (the broker kicks every `admin` session when dps grants its admin
    // client the twin-writer role), with the init's `admin` role: it may use the control topics.
    let r = dynsec(
        b.port,
        json!({"command": "createClient", "username": "control-watcher", "password": "watch-pw",
               "roles": [{"rolename": "admin"}]}),
    )
    .await;
    assert!(r.get("error").is_none(), "{r}");
    let (watcher, el) = connect(b.port, "control-watcher", "control-watcher", "watch-pw")
        .await
        .unwrap();
    let mut rx = drive(el);
    subscribe(
        &watcher,
        &mut rx,
        dps_server::hubs::mosquitto::RESPONSE_TOPIC,
    )
    .await;
    let sentinel = |n: u32| {
        let watcher = watcher.clone();
        async move {
            let id = format!("sentinel-{n}-{}", uuid::Uuid::new_v4().simple());
            watcher
                .publish(
                    dps_server::hubs::mosquitto::CONTROL_TOPIC,
                    QoS::AtLeastOnce,
                    false,
                    json!({"commands": [{"command": "getClient", "username": id, "correlationData": id}]}).to_string(),
                )
                .await
                .unwrap();
            id
        }
    };
    let metrics = || async {
        let admin = s.server.admin.expect("admin listener");
        let text = reqwest::get(format!("http://{admin}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let get = |name: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains("kind=\"mosquitto\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        (
            get("dps_hub_writes_total"),
            get("dps_hub_writes_skipped_total"),
        )
    };

    let key = s.enroll("storm-dev", json!({})).await;
    let before = metrics().await;
    let r = s.register("storm-dev", &key, None).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    let id = sentinel(1).await;
    let first = responses_before(&mut rx, &id).await;
    assert!(first >= 1, "the first registration writes to the broker");

    for i in 0..19 {
        let r = s.register("storm-dev", &key, None).await;
        assert_eq!(r.body["status"], "assigned", "registration {i}: {}", r.body);
        assert_eq!(r.body["registrationState"]["assignedHub"], "broker-a.local");
    }
    let id = sentinel(2).await;
    assert_eq!(
        responses_before(&mut rx, &id).await,
        0,
        "19 unchanged re-registrations sent control commands to the broker"
    );
    let after = metrics().await;
    assert!(after.0 - before.0 >= 1.0, "{before:?} -> {after:?}");
    assert!(after.1 - before.1 >= 19.0, "{before:?} -> {after:?}");

    // The device still logs in with its credentials.
    let pw = derive_password(&key, "storm-dev").unwrap();
    connect(b.port, "storm-dev", "storm-dev", &pw)
        .await
        .expect("the device connects after the storm");
    assert!(dynsec_client(b.port, "storm-dev").await.is_some());

    // forceRegistration writes again (the operator's and the device's way out).
    let tok = device_token(SCOPE, "storm-dev", &key);
    let r = s
        .call(
            reqwest::Method::PUT,
            &format!("/{SCOPE}/registrations/storm-dev/register?api-version=2019-03-31&forceRegistration=true"),
            Some(&tok),
            Some(json!({"registrationId": "storm-dev"})),
            &[],
        )
        .await;
    if r.status == 202 {
        let op = r.body["operationId"]
            .as_str()
            .expect("operation id")
            .to_string();
        let path =
            format!("/{SCOPE}/registrations/storm-dev/operations/{op}?api-version=2019-03-31");
        let done = eventually(Duration::from_secs(10), || {
            let (path, tok) = (path.clone(), tok.clone());
            let s = &s;
            async move {
                let r = s
                    .call(reqwest::Method::GET, &path, Some(&tok), None, &[])
                    .await;
                if r.status == 202 {
                    Err(format!("still assigning: {}", r.body))
                } else {
                    Ok(r)
                }
            }
        })
        .await;
        assert_eq!(done.body["status"], "assigned", "{}", done.body);
    } else {
        assert_eq!(r.body["status"], "assigned", "{}", r.body);
    }
    let id = sentinel(3).await;
    assert!(
        responses_before(&mut rx, &id).await >= 1,
        "forceRegistration writes"
    );
}

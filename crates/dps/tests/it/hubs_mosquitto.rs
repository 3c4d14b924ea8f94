//! `mosquitto` linked hubs against real Mosquitto 2.x brokers started by the test, with the
//! dynamic-security plugin (support_mosquitto.rs). Skipped (with a message) when mosquitto is
//! not installed, outside CI. The adapter's contract (upsert, twins, enable, delete, timeouts,
//! refused credentials) is in hub_contract.rs; these are the end-to-end and broker-specific
//! behaviours.

use crate::support::*;
use crate::support_mosquitto::*;
use dps_core::instance::{HubKind, LinkedHub};
use dps_server::hubs::mosquitto::{derive_password, shared_role_name, DEFAULT_SHARED_ROLES};
use rumqttc::QoS;
use serde_json::json;
use std::time::Duration;

/// The default shared role of a device.
fn shared(id: &str) -> String {
    shared_role_name("dps-devices", DEFAULT_SHARED_ROLES, id)
}

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

/// Issue #14: concurrent first registrations travel to the broker in a few control messages
/// (the adapter batches the commands of concurrent calls), each device gets exactly the
/// commands its layout needs, every device logs in with its own credentials, and it stays in
/// its own topic tree.
#[tokio::test]
async fn mosquitto_concurrent_registrations_are_batched_into_few_control_messages() {
    let Some(b) = Broker::start().await else {
        return;
    };
    // A hub name of its own: the metrics recorder is shared by the tests of this process.
    let mut hub = b.linked_hub("broker-batch.local");
    // A wide window and large batches, so that the assertion does not depend on how fast this
    // machine runs 40 registrations through dps.
    hub.options.insert("batch_window_ms".into(), 200.into());
    hub.options.insert("max_batch_commands".into(), 500.into());
    // Mosquitto 2.1 hashes each password with argon2id (~55 ms): 40 in one message take seconds.
    hub.options.insert("timeout_ms".into(), 30_000.into());
    let s = TestServer::spawn_with(|c| c.instances[0].linked_hub = vec![hub]).await;
    let mut watcher = ControlWatcher::start(b.port).await;
    // Prepare the link first (twin-writer role, version), with one device.
    let key0 = s.enroll("batch-warmup", json!({})).await;
    assert_eq!(
        s.register("batch-warmup", &key0, None).await.body["status"],
        "assigned"
    );
    watcher.since_last().await;
    let before = scrape(&s).await;

    const N: usize = 40;
    let ids: Vec<String> = (0..N).map(|i| format!("batch-dev-{i:02}")).collect();
    let mut keys = Vec::new();
    for id in &ids {
        keys.push(s.enroll(id, json!({})).await);
    }
    let results = futures::future::join_all(
        ids.iter()
            .zip(&keys)
            .map(|(id, key)| s.register(id, key, None)),
    )
    .await;
    for (id, r) in ids.iter().zip(&results) {
        assert_eq!(r.body["status"], "assigned", "{id}: {}", r.body);
    }
    let messages = watcher.since_last().await;
    let commands = answers(&messages);
    // The layout decides the commands per new device: 1 (shared role, 2.1+) or 2 (own role).
    let per_device = if b.substitutes_acls() { 1 } else { 2 };
    assert_eq!(
        commands.len(),
        N * per_device,
        "commands per first registration: {commands:?}"
    );
    assert!(
        commands.iter().all(|c| c.get("error").is_none()),
        "{commands:?}"
    );
    assert!(
        messages.len() <= N / 4,
        "{N} concurrent registrations took {} control messages",
        messages.len()
    );
    eprintln!(
        "{N} concurrent first registrations: {} control messages, {} commands",
        messages.len(),
        commands.len()
    );
    let after = scrape(&s).await;
    let delta = |m: &str| {
        let hub = [("hub", "broker-batch.local")];
        sample(&after, m, &hub) - sample(&before, m, &hub)
    };
    assert_eq!(
        delta("dps_mosquitto_control_messages_total"),
        messages.len() as f64
    );
    assert_eq!(
        delta("dps_mosquitto_control_commands_total"),
        commands.len() as f64
    );

    // Every device logs in with its own credentials; a few are checked for confinement.
    for (id, key) in ids.iter().zip(&keys) {
        let pw = derive_password(key, id).unwrap();
        connect(b.port, id, id, &pw)
            .await
            .unwrap_or_else(|e| panic!("{id} cannot log in: {e}"));
    }
    for (i, j) in [(0, 1), (17, 3), (39, 0)] {
        let pw = derive_password(&keys[i], &ids[i]).unwrap();
        assert_confined(b.port, "devices", &ids[i], &pw, &ids[j]).await;
    }
}

/// A command the broker refuses for one device fails that device only, although the others'
/// commands travel in the same control message.
#[tokio::test]
async fn mosquitto_a_refused_command_in_a_batch_fails_only_its_device() {
    use dps_core::hub::{HubAdapter, HubAuth, HubError, HubIdentity};
    let Some(b) = Broker::start().await else {
        return;
    };
    let mut hub = b.linked_hub("broker-a.local");
    hub.options.insert("batch_window_ms".into(), 300.into());
    hub.options.insert("max_batch_commands".into(), 500.into());
    hub.options.insert("timeout_ms".into(), 30_000.into());
    let a = dps_server::hubs::mosquitto::MosquittoHub::new(&hub);
    // Prepare the link (a first write), then watch.
    let ident = |id: &str| HubIdentity {
        device_id: id.to_string(),
        auth: HubAuth::SymmetricKey {
            primary: dps_core::sas::generate_key(),
            secondary: dps_core::sas::generate_key(),
        },
        enabled: true,
        capabilities: Default::default(),
    };
    a.upsert_device(&ident("warmup"), None).await.unwrap();
    let mut watcher = ControlWatcher::start(b.port).await;
    watcher.since_last().await;

    // A control character is valid JSON but not a valid MQTT username: the broker refuses it.
    let mut ids: Vec<String> = (0..6).map(|i| format!("good-{i}")).collect();
    ids.insert(3, "bad\u{1}id".to_string());
    let idents: Vec<HubIdentity> = ids.iter().map(|i| ident(i)).collect();
    let results = futures::future::join_all(idents.iter().map(|i| a.upsert_device(i, None))).await;
    for (id, r) in ids.iter().zip(&results) {
        if id.starts_with("bad") {
            assert!(
                matches!(r, Err(HubError::Rejected { message, .. }) if message.contains("UTF-8")),
                "{r:?}"
            );
        } else {
            assert!(r.is_ok(), "{id}: {r:?}");
        }
    }
    let messages = watcher.since_last().await;
    assert_eq!(
        messages.len(),
        1,
        "the seven upserts went out in one control message: {messages:?}"
    );
    let commands = answers(&messages);
    assert!(commands.iter().any(|c| c.get("error").is_some()));
    assert!(commands.iter().filter(|c| c.get("error").is_none()).count() >= 6);
    for id in ids.iter().filter(|i| i.starts_with("good")) {
        assert!(dynsec_client(b.port, id).await.is_some(), "{id}");
    }
}

/// On a broker without ACL substitution (Mosquitto 2.0.x) the default layout is a role per
/// device, and `device_role = "shared"` is refused rather than handing every device the
/// literal topic `devices/%u/#`; on 2.1+ the default is the shared role.
#[tokio::test]
async fn mosquitto_the_device_role_layout_follows_the_broker_version() {
    use dps_core::hub::{HubAdapter, HubAuth, HubError, HubIdentity};
    let Some(b) = Broker::start().await else {
        return;
    };
    let ident = |id: &str| HubIdentity {
        device_id: id.to_string(),
        auth: HubAuth::SymmetricKey {
            primary: dps_core::sas::generate_key(),
            secondary: dps_core::sas::generate_key(),
        },
        enabled: true,
        capabilities: Default::default(),
    };
    let auto = dps_server::hubs::mosquitto::MosquittoHub::new(&b.linked_hub("broker-a.local"));
    auto.upsert_device(&ident("layout-dev"), None)
        .await
        .unwrap();
    let c = dynsec_client(b.port, "layout-dev").await.expect("created");
    let mut forced = b.linked_hub("broker-a.local");
    forced.options.insert("device_role".into(), "shared".into());
    let forced = dps_server::hubs::mosquitto::MosquittoHub::new(&forced);
    let r = forced.upsert_device(&ident("layout-dev-2"), None).await;
    if b.substitutes_acls() {
        assert_eq!(role_names(&c), [shared("layout-dev")]);
        assert!(dynsec_role(b.port, "dps-device-layout-dev").await.is_none());
        r.expect("shared is fine on 2.1+");
    } else {
        assert_eq!(role_names(&c), ["dps-device-layout-dev"]);
        assert!(dynsec_role(b.port, &shared("layout-dev-2")).await.is_none());
        assert!(
            matches!(&r, Err(HubError::Rejected { message, .. }) if message.contains("2.1")),
            "{r:?}"
        );
        assert!(dynsec_client(b.port, "layout-dev-2").await.is_none());
    }
}

/// The shared layout: one `createClient` per new device, the shared role's ACLs keep devices
/// apart (checked when the broker substitutes `%u`, i.e. 2.1+: set DPS_TEST_MOSQUITTO_BIN and
/// DPS_TEST_MOSQUITTO_PLUGIN to such a build), and devices written earlier with a role of their
/// own are moved to the shared role (their old role deleted) when rewritten, and cleaned up
/// on delete. On 2.0.x the layout is forced on a broker that hides its version
/// (`sys_interval 0`), which exercises every command but not the ACLs.
#[tokio::test]
async fn mosquitto_shared_role_layout_and_migration_from_per_device_roles() {
    use dps_core::hub::{HubAdapter, HubAuth, HubIdentity};
    let Some(b) = Broker::start_with("sys_interval 0\n").await else {
        return;
    };
    let keys: std::collections::HashMap<&str, String> = ["legacy-a", "legacy-b", "new-a", "new-b"]
        .into_iter()
        .map(|id| (id, dps_core::sas::generate_key()))
        .collect();
    let ident = |id: &str| HubIdentity {
        device_id: id.to_string(),
        auth: HubAuth::SymmetricKey {
            primary: keys[id].clone(),
            secondary: dps_core::sas::generate_key(),
        },
        enabled: true,
        capabilities: Default::default(),
    };
    let pw = |id: &str| derive_password(&keys[id], id).unwrap();
    // Two devices written the old way: a role each.
    let mut old = b.linked_hub("broker-a.local");
    old.options
        .insert("device_role".into(), "per-device".into());
    let old = dps_server::hubs::mosquitto::MosquittoHub::new(&old);
    for id in ["legacy-a", "legacy-b"] {
        old.upsert_device(&ident(id), None).await.unwrap();
        assert!(dynsec_role(b.port, &format!("dps-device-{id}"))
            .await
            .is_some());
    }
    drop(old);

    let mut hub = b.linked_hub("broker-a.local");
    hub.options.insert("device_role".into(), "shared".into());
    let a = dps_server::hubs::mosquitto::MosquittoHub::new(&hub);
    // The link's preparation creates the shared role (with a first device).
    a.upsert_device(&ident("new-a"), None).await.unwrap();
    let role = dynsec_role(b.port, &shared("new-b"))
        .await
        .expect("shared role");
    let topics: Vec<&str> = role["acls"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["topic"].as_str())
        .collect();
    assert!(topics.contains(&"devices/%u/#"), "{role}");
    assert!(topics.contains(&"devices/%u/twin/desired"), "{role}");

    // A new device costs exactly one command.
    let mut watcher = ControlWatcher::start(b.port).await;
    watcher.since_last().await;
    a.upsert_device(&ident("new-b"), None).await.unwrap();
    let cmds = answers(&watcher.since_last().await);
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(cmds[0]["command"], "createClient");
    assert!(cmds[0].get("error").is_none(), "{cmds:?}");
    let c = dynsec_client(b.port, "new-b").await.unwrap();
    assert_eq!(role_names(&c), [shared("new-b")]);
    connect(b.port, "new-b", "new-b", &pw("new-b"))
        .await
        .expect("logs in");

    // Rewriting a legacy device moves it to the shared role and deletes its old role.
    a.upsert_device(&ident("legacy-a"), None).await.unwrap();
    let c = dynsec_client(b.port, "legacy-a").await.unwrap();
    assert_eq!(role_names(&c), [shared("legacy-a")]);
    assert!(dynsec_role(b.port, "dps-device-legacy-a").await.is_none());
    connect(b.port, "legacy-a", "legacy-a", &pw("legacy-a"))
        .await
        .expect("a migrated device still logs in");
    // A legacy device not rewritten keeps working with its own role...
    assert_eq!(
        role_names(&dynsec_client(b.port, "legacy-b").await.unwrap()),
        ["dps-device-legacy-b"]
    );
    assert_confined(b.port, "devices", "legacy-b", &pw("legacy-b"), "new-a").await;
    // ...and deleting it removes its role too.
    a.delete_device("legacy-b").await.unwrap();
    assert!(dynsec_client(b.port, "legacy-b").await.is_none());
    assert!(dynsec_role(b.port, "dps-device-legacy-b").await.is_none());
    // Deleting a shared-layout device leaves the shared role alone.
    a.delete_device("new-b").await.unwrap();
    assert!(dynsec_client(b.port, "new-b").await.is_none());
    assert!(dynsec_role(b.port, &shared("new-b")).await.is_some());

    if b.substitutes_acls() {
        assert_confined(b.port, "devices", "new-a", &pw("new-a"), "legacy-a").await;
        assert_confined(b.port, "devices", "legacy-a", &pw("legacy-a"), "new-a").await;
    } else {
        eprintln!(
            "NOTE: Mosquitto {:?} does not substitute %u in ACLs; the shared role's ACLs were not exercised (set DPS_TEST_MOSQUITTO_BIN/_PLUGIN to a 2.1 build)",
            b.version
        );
    }
}

//! `mosquitto` linked hubs against real Mosquitto 2.x brokers started by the test, with the
//! dynamic-security plugin. Skipped (with a message) when mosquitto is not installed.

use crate::support::*;
use dps_core::instance::{HubKind, LinkedHub};
use dps_server::hubs::mosquitto::derive_password;
use reqwest::Method;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::json;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const ADMIN_PW: &str = "adm1n-test-pw";

pub struct Broker {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_plugin() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/mosquitto_dynamic_security.so",
        "/usr/local/lib/mosquitto_dynamic_security.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Broker {
    /// Start a broker, or None (test skipped) when mosquitto, mosquitto_ctrl or the plugin is missing.
    pub async fn start() -> Option<Broker> {
        let bin = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
        let (Some(bin), Some(plugin)) = (bin, find_plugin()) else {
            eprintln!("SKIPPED: mosquitto 2.x with the dynamic-security plugin is not installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let dynsec = dir.path().join("dynsec.json");
        let init = Command::new("mosquitto_ctrl")
            .arg("dynsec")
            .arg("init")
            .arg(&dynsec)
            .arg("admin")
            .arg(ADMIN_PW)
            .stdout(Stdio::null())
            .status();
        if !init.is_ok_and(|s| s.success()) {
            eprintln!("SKIPPED: mosquitto_ctrl dynsec init failed or is missing");
            return None;
        }
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nuser root\npersistence false\nlog_dest none\nlistener {port} 127.0.0.1\nallow_anonymous false\nplugin {}\nplugin_opt_config_file {}\n",
                plugin.display(),
                dynsec.display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        let b = Broker {
            child,
            port,
            _dir: dir,
        };
        let start = std::time::Instant::now();
        loop {
            if connect(b.port, "probe", "admin", ADMIN_PW).await.is_ok() {
                return Some(b);
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "mosquitto did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn linked_hub(&self, host: &str) -> LinkedHub {
        let mut h = LinkedHub::registry(host);
        h.kind = HubKind::Mosquitto;
        h.connection_string = Some(format!("mqtt://admin:{ADMIN_PW}@127.0.0.1:{}", self.port));
        h.options.insert("timeout_ms".into(), 3000.into());
        h
    }
}

pub async fn connect(
    port: u16,
    client_id: &str,
    user: &str,
    pass: &str,
) -> Result<(AsyncClient, EventLoop), String> {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_credentials(user, pass);
    o.set_clean_session(true);
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut el) = AsyncClient::new(o, 16);
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "connect timed out".to_string())??;
    Ok((c, el))
}

/// Drive an event loop in the background, forwarding received publishes (and SUBACKs as
/// ("$suback", "")).
fn drive(mut el: EventLoop) -> tokio::sync::mpsc::UnboundedReceiver<(String, String)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((
                        p.topic.clone(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    ));
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(("$suback".into(), String::new()));
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    rx
}

async fn next_until(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    topic: &str,
) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(m) = rx.recv().await {
            let done = m.0 == topic;
            seen.push(m);
            if done {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no message on {topic}; saw {seen:?}"));
    seen
}

async fn subscribe(
    c: &AsyncClient,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    filter: &str,
) -> Vec<(String, String)> {
    c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    next_until(rx, "$suback").await
}

/// Change an enrollment's hubs (GET does not return keys, so they are given again).
pub async fn set_hubs(s: &TestServer, rid: &str, keys: &(String, String), hubs: serde_json::Value) {
    let mut e = s
        .call(
            Method::GET,
            &format!("/enrollments/{rid}"),
            Some(&s.owner()),
            None,
            &[],
        )
        .await
        .body;
    e["iotHubs"] = hubs;
    e["attestation"] = json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": keys.0, "secondaryKey": keys.1}});
    let r = s
        .call(
            Method::PUT,
            &format!("/enrollments/{rid}"),
            Some(&s.owner()),
            Some(e),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
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

#[tokio::test]
async fn mosquitto_down_or_wrong_admin_password_maps_to_hub_errors() {
    use dps_core::hub::{HubAdapter, HubError};
    let mut h = LinkedHub::registry("nowhere.local");
    h.kind = HubKind::Mosquitto;
    h.connection_string = Some(format!("mqtt://admin:x@127.0.0.1:{}", free_port()));
    h.options.insert("timeout_ms".into(), 1000.into());
    let a = dps_server::hubs::mosquitto::MosquittoHub::new(&h);
    let t0 = std::time::Instant::now();
    assert!(matches!(
        a.delete_device("d").await,
        Err(HubError::Unreachable { .. })
    ));
    assert!(t0.elapsed() < Duration::from_secs(3));
    let Some(b) = Broker::start().await else {
        return;
    };
    let mut h = b.linked_hub("broker.local");
    h.connection_string = Some(format!("mqtt://admin:wrong@127.0.0.1:{}", b.port));
    let a = dps_server::hubs::mosquitto::MosquittoHub::new(&h);
    assert!(matches!(
        a.get_twin("d").await,
        Err(HubError::Unauthorized { .. })
    ));
}

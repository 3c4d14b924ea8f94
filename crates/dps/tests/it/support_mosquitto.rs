//! Test support for `mosquitto` linked hubs: a real Mosquitto 2.x broker per test, with the
//! dynamic-security plugin and an `admin` client, plain MQTT clients for devices and admins, and
//! the dynamic-security `getClient` read-back.
//!
//! A broker that cannot be started skips the test with a message on a developer machine; under
//! `CI=true` (the CI machine has Mosquitto installed) it fails the test instead, so that a
//! broken CI image cannot turn the Mosquitto tests into silent passes.

#![allow(dead_code)]

use crate::support::*;
use dps_core::instance::{HubKind, LinkedHub};
use dps_server::hubs::mosquitto::{CONTROL_TOPIC, RESPONSE_TOPIC};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Skip (None) with a message, or fail under `CI=true`.
fn skip<T>(why: &str) -> Option<T> {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: {why}; the Mosquitto tests must run in CI"
    );
    eprintln!("SKIPPED: {why}");
    None
}

pub const ADMIN_PW: &str = "adm1n-test-pw";

pub struct Broker {
    child: Child,
    pub port: u16,
    /// The broker's version, from `mosquitto -h`.
    pub version: (u32, u32, u32),
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The broker binary: `DPS_TEST_MOSQUITTO_BIN` when set, else the system's.
fn broker_bin() -> Option<PathBuf> {
    std::env::var("DPS_TEST_MOSQUITTO_BIN")
        .ok()
        .map(PathBuf::from)
        .into_iter()
        .chain(
            ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
                .iter()
                .map(PathBuf::from),
        )
        .find(|p| p.exists())
}

fn find_plugin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("DPS_TEST_MOSQUITTO_PLUGIN") {
        return Some(PathBuf::from(p));
    }
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

impl Broker {
    /// Start a broker, or None (test skipped) when mosquitto, mosquitto_ctrl or the plugin is
    /// missing; under `CI=true` a missing broker fails the test instead (see [`skip`]).
    pub async fn start() -> Option<Broker> {
        Self::start_with("").await
    }

    /// [`Broker::start`] with extra `mosquitto.conf` lines (e.g. `"sys_interval 0\n"`). The
    /// broker binary and dynamic-security plugin come from `DPS_TEST_MOSQUITTO_BIN` and
    /// `DPS_TEST_MOSQUITTO_PLUGIN` when set (e.g. a Mosquitto 2.1 build), else from the system.
    pub async fn start_with(extra_conf: &str) -> Option<Broker> {
        let bin = broker_bin();
        let (Some(bin), Some(plugin)) = (bin, find_plugin()) else {
            return skip("mosquitto 2.x with the dynamic-security plugin is not installed");
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
            return skip("mosquitto_ctrl dynsec init failed or is missing");
        }
        let port = closed_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nuser root\npersistence false\nlog_dest none\nlistener {port} 127.0.0.1\nallow_anonymous false\nplugin {}\nplugin_opt_config_file {}\n{extra_conf}",
                plugin.display(),
                dynsec.display()
            ),
        )
        .unwrap();
        let help = Command::new(&bin).arg("-h").output().ok();
        let version = help
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .and_then(|t| {
                let v = t
                    .split("mosquitto version ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .to_string();
                let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
                Some((it.next()?, it.next()?, it.next().unwrap_or(0)))
            })
            .unwrap_or((0, 0, 0));
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
            version,
            _dir: dir,
        };
        eventually(Duration::from_secs(10), || async {
            connect(b.port, "probe", "admin", ADMIN_PW)
                .await
                .map(drop)
                .map_err(|e| format!("mosquitto did not start: {e}"))
        })
        .await;
        Some(b)
    }

    /// Do this broker's dynamic-security ACLs substitute `%u`/`%c` (Mosquitto 2.1+)?
    pub fn substitutes_acls(&self) -> bool {
        (self.version.0, self.version.1) >= (2, 1)
    }

    pub fn linked_hub(&self, host: &str) -> LinkedHub {
        let mut h = LinkedHub::new(host, HubKind::Mosquitto);
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
    connect_within(port, client_id, user, pass, Duration::from_secs(5)).await
}

/// [`connect`] to any MQTT 3.1.1 broker on loopback, waiting at most `within` for its CONNACK.
pub async fn connect_within(
    port: u16,
    client_id: &str,
    user: &str,
    pass: &str,
    within: Duration,
) -> Result<(AsyncClient, EventLoop), String> {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_credentials(user, pass);
    o.set_clean_session(true);
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut el) = AsyncClient::new(o, 16);
    tokio::time::timeout(within, async {
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
pub fn drive(mut el: EventLoop) -> tokio::sync::mpsc::UnboundedReceiver<(String, String)> {
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

pub async fn next_until(
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

pub async fn subscribe(
    c: &AsyncClient,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    filter: &str,
) -> Vec<(String, String)> {
    c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    next_until(rx, "$suback").await
}

/// One dynamic-security command as the broker's `admin` client; returns its response object
/// (`{"command": ..., "data": ...}` or `{"command": ..., "error": ...}`).
pub async fn dynsec(port: u16, command: Value) -> Value {
    let id = format!("dynsec-{}", uuid::Uuid::new_v4().simple());
    let (c, el) = connect(port, &id, "admin", ADMIN_PW)
        .await
        .expect("admin connects");
    let mut rx = drive(el);
    subscribe(&c, &mut rx, RESPONSE_TOPIC).await;
    c.publish(
        CONTROL_TOPIC,
        QoS::AtLeastOnce,
        false,
        json!({ "commands": [command] }).to_string(),
    )
    .await
    .expect("publish");
    let seen = next_until(&mut rx, RESPONSE_TOPIC).await;
    let (_, body) = seen.last().expect("the response");
    let v: Value = serde_json::from_str(body).expect("dynsec response is JSON");
    v["responses"][0].clone()
}

/// The broker's client `username` (`getClient` data), `None` when it does not exist.
pub async fn dynsec_client(port: u16, username: &str) -> Option<Value> {
    let r = dynsec(port, json!({"command": "getClient", "username": username})).await;
    match r["error"].as_str() {
        None => Some(r["data"]["client"].clone()),
        Some(e) if e.to_ascii_lowercase().contains("not found") => None,
        Some(e) => panic!("getClient {username}: {e}"),
    }
}

// ------------------------------------------------------------------------------------------------
// Stop and start again (hub_cleanup.rs): the same port, config and dynamic-security data.

impl Broker {
    /// Stop the broker (killed, as a crash or an outage), keeping its port and data for
    /// [`start_again`](Self::start_again).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The usernames of the dynamic-security clients in the broker's saved data (read from
    /// its file: meaningful while the broker is stopped).
    pub fn saved_clients(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self._dir.path().join("dynsec.json"))
            .expect("dynsec.json exists");
        let v: Value = serde_json::from_str(&text).expect("dynsec.json is JSON");
        v["clients"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["username"].as_str().map(str::to_owned))
            .collect()
    }

    /// Start the stopped broker again on its port with its config and dynamic-security data
    /// (clients created before the stop are still there); returns once `admin` can connect.
    pub async fn start_again(&mut self) {
        let bin = broker_bin().expect("mosquitto was found at start");
        self.child = Command::new(bin)
            .arg("-c")
            .arg(self._dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        let port = self.port;
        eventually(Duration::from_secs(10), || async move {
            connect(port, "probe", "admin", ADMIN_PW)
                .await
                .map(drop)
                .map_err(|e| format!("mosquitto did not start again: {e}"))
        })
        .await;
    }
}

/// An admin client of its own that watches the dynamic-security response topic: every control
/// message gets exactly one response message (one answer per command), in the broker's order,
/// so counting responses counts control messages (Mosquitto does not deliver `$CONTROL`
/// publishes to subscribers). A sentinel command of the watcher's own marks "everything before
/// this has been answered".
pub struct ControlWatcher {
    client: AsyncClient,
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
}

impl ControlWatcher {
    /// A watcher with the init's `admin` role (the broker kicks every `admin` session when dps
    /// grants its admin client the twin-writer role, so it has a client of its own).
    pub async fn start(port: u16) -> ControlWatcher {
        let user = format!("control-watcher-{}", uuid::Uuid::new_v4().simple());
        let r = dynsec(
            port,
            json!({"command": "createClient", "username": user, "password": "watch-pw",
                   "roles": [{"rolename": "admin"}]}),
        )
        .await;
        assert!(r.get("error").is_none(), "{r}");
        let (client, el) = connect(port, &user, &user, "watch-pw").await.unwrap();
        let mut rx = drive(el);
        subscribe(&client, &mut rx, RESPONSE_TOPIC).await;
        ControlWatcher { client, rx }
    }

    /// The response messages (each `{"responses": [...]}`) of every control message answered
    /// since the last call, others' than the watcher's own sentinels.
    pub async fn since_last(&mut self) -> Vec<Value> {
        let id = format!("sentinel-{}", uuid::Uuid::new_v4().simple());
        self.client
            .publish(
                CONTROL_TOPIC,
                QoS::AtLeastOnce,
                false,
                json!({"commands": [{"command": "getClient", "username": id, "correlationData": id}]})
                    .to_string(),
            )
            .await
            .unwrap();
        let mut seen = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some((topic, body)) = self.rx.recv().await {
                if topic != RESPONSE_TOPIC {
                    continue;
                }
                if body.contains(&id) {
                    return;
                }
                if body.contains("\"sentinel-") {
                    continue;
                }
                seen.push(serde_json::from_str::<Value>(&body).expect("response JSON"));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no response for {id}"));
        seen
    }
}

/// The commands answered in `messages` (from [`ControlWatcher::since_last`]).
pub fn answers(messages: &[Value]) -> Vec<Value> {
    messages
        .iter()
        .flat_map(|m| m["responses"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// A role's `getRole` data, `None` when it does not exist.
pub async fn dynsec_role(port: u16, rolename: &str) -> Option<Value> {
    let r = dynsec(port, json!({"command": "getRole", "rolename": rolename})).await;
    match r["error"].as_str() {
        None => Some(r["data"]["role"].clone()),
        Some(e) if e.to_ascii_lowercase().contains("not found") => None,
        Some(e) => panic!("getRole {rolename}: {e}"),
    }
}

/// The role names of a client (`getClient` data).
pub fn role_names(client: &Value) -> Vec<String> {
    client["roles"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["rolename"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Does a device (already connected as `dev`, receiving into `inbox`) get its own publish
/// through and is it kept out of `other`'s tree? Checked with an admin watcher on
/// `{prefix}/#`: a publish to the other tree is dropped, the device's own arrives; the device
/// subscribing to the other tree receives nothing of it.
pub async fn assert_confined(port: u16, prefix: &str, me: &str, pass: &str, other: &str) {
    let (admin, el) = connect(
        port,
        &format!("confine-{}", uuid::Uuid::new_v4().simple()),
        "admin",
        ADMIN_PW,
    )
    .await
    .unwrap();
    let mut watch = drive(el);
    subscribe(&admin, &mut watch, &format!("{prefix}/#")).await;
    let (dev, el) = connect(port, me, me, pass)
        .await
        .unwrap_or_else(|e| panic!("{me} connects: {e}"));
    let mut inbox = drive(el);
    let granted = subscribe(&dev, &mut inbox, &format!("{prefix}/{other}/#")).await;
    let _ = granted;
    dev.publish(
        format!("{prefix}/{other}/telemetry"),
        QoS::AtLeastOnce,
        false,
        "intrusion",
    )
    .await
    .unwrap();
    dev.publish(
        format!("{prefix}/{me}/telemetry"),
        QoS::AtLeastOnce,
        false,
        "mine",
    )
    .await
    .unwrap();
    let seen = next_until(&mut watch, &format!("{prefix}/{me}/telemetry")).await;
    assert!(
        !seen.iter().any(|m| m.1 == "intrusion"),
        "{me} published into {other}'s tree: {seen:?}"
    );
    // The admin publishes into the other tree; the device must not receive it, while a
    // publish into its own tree (after it, same connection) reaches it. (The admin may publish
    // under `{prefix}/+/twin/#` once dps has granted itself the twin-writer role.)
    admin
        .publish(
            format!("{prefix}/{other}/twin/probe"),
            QoS::AtLeastOnce,
            false,
            "secret",
        )
        .await
        .unwrap();
    let _ = dev
        .subscribe(format!("{prefix}/{me}/#"), QoS::AtLeastOnce)
        .await;
    next_until(&mut inbox, "$suback").await;
    admin
        .publish(
            format!("{prefix}/{me}/twin/probe"),
            QoS::AtLeastOnce,
            false,
            "for-me",
        )
        .await
        .unwrap();
    let got = next_until(&mut inbox, &format!("{prefix}/{me}/twin/probe")).await;
    assert!(
        !got.iter()
            .any(|m| m.0.starts_with(&format!("{prefix}/{other}/"))),
        "{me} received {other}'s messages: {got:?}"
    );
}

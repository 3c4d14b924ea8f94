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

impl Broker {
    /// Start a broker, or None (test skipped) when mosquitto, mosquitto_ctrl or the plugin is
    /// missing; under `CI=true` a missing broker fails the test instead (see [`skip`]).
    pub async fn start() -> Option<Broker> {
        let bin = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
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
        eventually(Duration::from_secs(10), || async {
            connect(b.port, "probe", "admin", ADMIN_PW)
                .await
                .map(drop)
                .map_err(|e| format!("mosquitto did not start: {e}"))
        })
        .await;
        Some(b)
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
        let bin = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("mosquitto was found at start");
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

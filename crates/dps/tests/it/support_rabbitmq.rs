//! Test support for `broker-auth` hubs with RabbitMQ: a private RabbitMQ node per test (its own
//! node name, ports, data and log directories, plugins file and config: the system RabbitMQ is
//! never touched), with the MQTT plugin and the HTTP auth backend pointing at the test server.
//!
//! A node that cannot be started skips the test with a message on a developer machine; under
//! `CI=true` it fails the test instead (as for Mosquitto, support_mosquitto.rs).

#![allow(dead_code)]

use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Skip (None) with a message, or fail under `CI=true`.
fn skip<T>(why: &str) -> Option<T> {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: {why}; the RabbitMQ tests must run in CI"
    );
    eprintln!("SKIPPED: {why}");
    None
}

/// A private RabbitMQ node, stopped (its whole process group) when dropped.
pub struct Rabbit {
    child: Child,
    /// The MQTT listener.
    pub mqtt_port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        // The node runs in its own process group (the start script, beam, erl_child_setup):
        // stop the group, then make sure.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-TERM", "--", &group])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

fn find_server() -> Option<PathBuf> {
    [
        "/usr/lib/rabbitmq/bin/rabbitmq-server",
        "/usr/local/lib/rabbitmq/bin/rabbitmq-server",
        "/opt/rabbitmq/sbin/rabbitmq-server",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// The paths of the HTTP auth backend for a broker-auth hub.
pub struct AuthTarget<'a> {
    /// `https://localhost:{port}` of the test server.
    pub base: &'a str,
    pub instance: &'a str,
    pub hub: &'a str,
    /// The hub's `auth_secret` (sent as basic auth from the URL's user info).
    pub secret: &'a str,
    /// The test server's CA (PEM).
    pub ca_pem: &'a str,
}

impl Rabbit {
    /// Start a node whose only auth backend is dps (`auth_backends.1 = http`), or None (test
    /// skipped) when RabbitMQ is not installed; under `CI=true` that fails the test instead.
    pub async fn start(target: AuthTarget<'_>) -> Option<Rabbit> {
        let Some(bin) = find_server() else {
            return skip("rabbitmq-server is not installed");
        };
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mqtt_port = closed_port();
        let amqp_port = closed_port();
        let dist_port = closed_port();
        std::fs::write(
            d.join("enabled_plugins"),
            "[rabbitmq_mqtt,rabbitmq_auth_backend_http].\n",
        )
        .unwrap();
        std::fs::write(d.join("rabbitmq-env.conf"), "").unwrap();
        std::fs::write(d.join("ca.pem"), target.ca_pem).unwrap();
        let base = target
            .base
            .replacen("https://", &format!("https://dps:{}@", target.secret), 1);
        let path = |q: &str| {
            format!(
                "{base}/brokerAuth/{}/{}/rabbitmq/{q}",
                target.instance, target.hub
            )
        };
        std::fs::write(
            d.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{amqp_port}\n\
                 mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}\n\
                 mqtt.allow_anonymous = false\n\
                 loopback_users = none\n\
                 auth_backends.1 = http\n\
                 auth_http.http_method = post\n\
                 auth_http.user_path = {}\n\
                 auth_http.vhost_path = {}\n\
                 auth_http.resource_path = {}\n\
                 auth_http.topic_path = {}\n",
                path("user"),
                path("vhost"),
                path("resource"),
                path("topic"),
            ),
        )
        .unwrap();
        // RabbitMQ 3.10's rabbitmq.conf schema has no auth_http.ssl_options: the TLS settings
        // for reaching dps (trust the test CA, verify the host name) go in advanced.config.
        std::fs::write(
            d.join("advanced.config"),
            format!(
                "[{{rabbitmq_auth_backend_http, [{{ssl_options, [{{cacertfile, \"{}\"}}, {{verify, verify_peer}}, {{depth, 3}}]}}]}}].\n",
                d.join("ca.pem").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("node.log")).unwrap();
        let mut cmd = Command::new(bin);
        cmd.env("HOME", d)
            .env(
                "RABBITMQ_NODENAME",
                format!("dps-test-{mqtt_port}@localhost"),
            )
            .env("RABBITMQ_NODE_PORT", amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_LOGS", "-")
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .current_dir(d)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return skip(&format!("rabbitmq-server does not start: {e}")),
        };
        let mut r = Rabbit {
            child,
            mqtt_port,
            dir,
        };
        // Up when the MQTT listener accepts connections (the node needs ~10 s on 2 cores).
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", mqtt_port))
                .await
                .is_ok()
            {
                break;
            }
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!(
                    "the RabbitMQ node exited ({status}) before its MQTT listener was up; log:\n{}",
                    r.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the RabbitMQ node's MQTT listener was not up within 90 s; log:\n{}",
                r.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Some(r)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of the node's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

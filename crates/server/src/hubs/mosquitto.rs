//! Mosquitto 2.x as a linked hub (`kind = "mosquitto"`), through its dynamic-security plugin.
//!
//! dps keeps one long-lived admin connection to the broker (rumqttc, MQTT 3.1.1, plain TCP on
//! loopback or TLS with `mqtts://`) and sends dynamic-security commands on
//! `$CONTROL/dynamic-security/v1`, matching the answers on `$CONTROL/dynamic-security/v1/response`
//! by their `correlationData`. The commands of concurrent calls are coalesced into one control
//! message by a per-connection batching task (options `batch_window_ms`, `max_batch_commands`);
//! each caller waits only for the answers to its own commands.
//!
//! Device ACLs come from one of two layouts (`device_role`):
//!
//! * `shared` (Mosquitto 2.1 or later, whose dynamic-security ACLs substitute `%u`/`%c`):
//!   identical roles `dps-devices-0` … `dps-devices-63` (options `shared_role`, `shared_roles`;
//!   see [`shared_role_name`]), created once per link, allowing publish, subscribe and receive
//!   on `{topic_prefix}/%u/#` and denying publish on `{topic_prefix}/%u/twin/desired` (that one
//!   belongs to the service). A new device costs one command: `createClient` with its role.
//! * `per-device` (Mosquitto 2.0.x, which has no substitution): a role `dps-device-{deviceId}`
//!   with the same ACLs spelled out for the device (two commands per new device).
//!
//! `auto` (the default) reads the broker's version from `$SYS/broker/version` at first use and
//! picks `shared` on 2.1 or later, `per-device` otherwise (also when the version is unknown).
//! A device written in one layout is moved to the other by its next write (`modifyClient` sets
//! its roles); moving to `shared` also deletes its old `dps-device-{deviceId}` role.
//!
//! Every device is a client with username = device id, client id restricted to the device id,
//! the role above, and a password (symmetric-key devices; see [`derive_password`]). X.509
//! devices get no password: the broker's TLS listener authenticates them by certificate with
//! `use_identity_as_username true` (username = certificate CN = device id).
//!
//! The twin is kept as two retained messages: `{topic_prefix}/{deviceId}/twin/desired` (the
//! desired properties, readable by the device) and `{twin_topic_prefix}/{deviceId}` (the whole
//! twin, tags included, readable only by admins; default prefix `dps/twins`), which is what
//! `get_twin` reads back for migration.
//!
//! Settings: `connection_string = "mqtt://admin:password@127.0.0.1:1883"` (or `mqtts://` with
//! `options.ca_file`), and options `topic_prefix`, `twin_topic_prefix`, `password_mode`
//! (`derived` | `primaryKey`), `timeout_ms`, `client_id`, `cert_file`/`key_file` (admin client
//! certificate), `device_role` (`auto` | `shared` | `per-device`), `shared_role`, `shared_roles`,
//! `batch_window_ms` (default 5, 0 = send what is queued at once), `max_batch_commands`
//! (default 50 on 2.1+, 8 on 2.0.x, which saves its file once per command) and
//! `max_inflight_messages` (default 2). See docs/linked-hubs.md.

use super::opt_str;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dps_core::hub::{HubAdapter, HubAuth, HubError, HubIdentity};
use dps_core::instance::LinkedHub;
use dps_core::model::TwinState;
use percent_encoding::percent_decode_str;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    TlsConfiguration, Transport,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, OnceCell};

/// Where dynamic-security commands go.
pub const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
/// Where their answers come back.
pub const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";
/// The role dps grants itself so that it may publish retained twins.
pub const ADMIN_TWIN_ROLE: &str = "dps-twin-writer";
/// The default name of the role shared by all devices (`device_role = "shared"`).
pub const SHARED_DEVICE_ROLE: &str = "dps-devices";
/// Default number of identical shared roles (`shared_roles`) the devices are spread over.
pub const DEFAULT_SHARED_ROLES: u32 = 64;
/// Where the broker tells its version (retained, unless `sys_interval 0`).
const VERSION_TOPIC: &str = "$SYS/broker/version";
/// Default `max_batch_commands` on a broker that saves its file once per control message (2.1+).
/// The broker answers a control message only when all of its commands are done, and 2.1 hashes
/// every password with argon2id (about 55 ms a command, measured): 50 commands stay well inside
/// the default 5 s timeout.
pub const DEFAULT_MAX_BATCH: usize = 50;
/// Default `max_batch_commands` on Mosquitto 2.0.x (or an unknown version): it saves its whole
/// file after every command (150 ms at 6,500 devices, 1 s at 25,000, measured on 2.0.11), so a
/// large batch saves nothing and only delays every answer in it.
pub const DEFAULT_MAX_BATCH_2_0: usize = 8;
/// Bound on one control message's payload (the admin connection's maximum packet is 1 MiB).
const MAX_BATCH_BYTES: usize = 900 * 1024;

/// The MQTT password of a symmetric-key device on a Mosquitto hub (`password_mode = "derived"`,
/// the default): `base64(HMAC-SHA256(base64decode(deviceKey), "mosquitto:" + deviceId))`, where
/// `deviceKey` is the device's primary key (for group enrollments: its derived device key).
/// `None` when the key is not base64.
pub fn derive_password(device_key_b64: &str, device_id: &str) -> Option<String> {
    let key = B64.decode(device_key_b64.trim()).ok()?;
    Some(B64.encode(dps_core::sas::hmac_sha256(
        &key,
        format!("mosquitto:{device_id}").as_bytes(),
    )))
}

/// Parsed settings.
#[derive(Clone)]
struct Settings {
    broker_host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    username: Option<String>,
    password: Option<String>,
    client_id: String,
    topic_prefix: String,
    twin_prefix: String,
    password_mode_derived: bool,
    timeout: Duration,
    device_role: RoleMode,
    shared_role: String,
    shared_roles: u32,
    batch_window: Duration,
    /// `None`: the default for the broker's version.
    max_batch: Option<usize>,
    max_inflight: usize,
}

/// The `device_role` option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RoleMode {
    Auto,
    Shared,
    PerDevice,
}

/// The `password_mode` option of the broker kinds (`mosquitto`, `broker-auth`): `true` for
/// `derived` (the default), `false` for `primaryKey`.
pub(crate) fn password_mode_derived(hub: &LinkedHub) -> Result<bool, String> {
    match opt_str(hub, "password_mode").unwrap_or("derived") {
        "derived" => Ok(true),
        "primaryKey" | "primary_key" => Ok(false),
        other => Err(format!(
            "unknown password_mode '{other}' (derived | primaryKey)"
        )),
    }
}

/// A symmetric-key device's broker password under `password_mode` ([`derive_password`], or the
/// primary key itself); `None` when a derivation is asked for and the key is not base64.
pub(crate) fn device_password(primary_key: &str, device_id: &str, derived: bool) -> Option<String> {
    if derived {
        derive_password(primary_key, device_id)
    } else {
        Some(primary_key.to_string())
    }
}

fn parse_settings(hub: &LinkedHub) -> Result<Settings, String> {
    let cs = hub
        .connection_string
        .as_deref()
        .ok_or("a mosquitto hub needs connection_string = \"mqtt://user:password@host:port\"")?;
    let url = reqwest::Url::parse(cs).map_err(|e| format!("invalid mosquitto URL: {e}"))?;
    let secure = match url.scheme() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" | "tls" => true,
        other => {
            return Err(format!(
                "unsupported scheme '{other}' (use mqtt:// or mqtts://)"
            ))
        }
    };
    let broker_host = url
        .host_str()
        .ok_or("the mosquitto URL has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url.port().unwrap_or(if secure { 8883 } else { 1883 });
    let dec = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    let username = (!url.username().is_empty()).then(|| dec(url.username()));
    let password = url.password().map(dec);
    let tls = if secure {
        let trust = match opt_str(hub, "ca_file") {
            Some(p) => dps_device::tls::Trust::pem_file(p).map_err(|e| e.to_string())?,
            None => dps_device::tls::Trust::System,
        };
        let roots = trust.root_store().map_err(|e| e.to_string())?;
        let identity = match (opt_str(hub, "cert_file"), opt_str(hub, "key_file")) {
            (Some(c), Some(k)) => {
                let chain = std::fs::read(c).map_err(|e| format!("{c}: {e}"))?;
                let key = std::fs::read(k).map_err(|e| format!("{k}: {e}"))?;
                Some(dps_device::tls::parse_identity(&chain, &key).map_err(|e| e.to_string())?)
            }
            _ => None,
        };
        Some(dps_device::tls::client_config(roots, identity, &[]).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let password_mode_derived = password_mode_derived(hub)?;
    let device_role = match opt_str(hub, "device_role").unwrap_or("auto") {
        "auto" => RoleMode::Auto,
        "shared" => RoleMode::Shared,
        "per-device" | "per_device" | "perDevice" => RoleMode::PerDevice,
        other => {
            return Err(format!(
                "unknown device_role '{other}' (auto | shared | per-device)"
            ))
        }
    };
    let shared_role = opt_str(hub, "shared_role")
        .unwrap_or(SHARED_DEVICE_ROLE)
        .to_string();
    if shared_role.is_empty() || shared_role.starts_with("dps-device-") {
        return Err(format!(
            "shared_role '{shared_role}' is empty or looks like a per-device role"
        ));
    }
    let ms = |k: &str| -> Result<Option<u64>, String> {
        match hub.options.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("{k} must be a non-negative integer")),
        }
    };
    let shared_roles = ms("shared_roles")?
        .unwrap_or(DEFAULT_SHARED_ROLES.into())
        .clamp(1, 1024) as u32;
    let batch_window = Duration::from_millis(ms("batch_window_ms")?.unwrap_or(5).min(1000));
    let max_batch = ms("max_batch_commands")?.map(|n| n.clamp(1, 10_000) as usize);
    let max_inflight = ms("max_inflight_messages")?.unwrap_or(2).clamp(1, 1000) as usize;
    let clean = |s: &str| s.trim_matches('/').to_string();
    Ok(Settings {
        broker_host,
        port,
        tls,
        username,
        password,
        client_id: opt_str(hub, "client_id")
            .map(str::to_string)
            .unwrap_or_else(|| format!("dps-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])),
        topic_prefix: clean(opt_str(hub, "topic_prefix").unwrap_or("devices")),
        twin_prefix: clean(opt_str(hub, "twin_topic_prefix").unwrap_or("dps/twins")),
        password_mode_derived,
        timeout: super::timeout_option(hub, 5000),
        device_role,
        shared_role,
        shared_roles,
        batch_window,
        max_batch,
        max_inflight,
    })
}

#[derive(Clone, Debug)]
enum Link {
    Connecting,
    Up,
    Down { unauthorized: bool, message: String },
}

#[derive(Default)]
struct Shared {
    /// Waiting dynsec commands by correlation id.
    pending: Mutex<HashMap<String, oneshot::Sender<Value>>>,
    /// Retained messages awaited by `get_twin` (and the broker version), by topic.
    retained: Mutex<HashMap<String, Option<Vec<u8>>>>,
    /// Most commands in one control message (set once the broker's version is known).
    max_batch: AtomicUsize,
    /// CONNACKs so far (a reconnection is a new number).
    connects: AtomicUsize,
    /// Control messages sent and not answered yet: a correlation id of each, and when it left.
    inflight: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Signalled when a control message is answered (or the link drops).
    answered: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One caller's commands, queued for the batching task: their JSON (joined by commas) and
/// their correlation ids.
struct Job {
    body: Vec<u8>,
    ids: Vec<String>,
}

/// The jobs that go out in one control message.
#[derive(Default)]
struct Batch {
    jobs: Vec<Job>,
    commands: usize,
    bytes: usize,
}

impl Batch {
    /// May `job` join without going over the limits? (An empty batch takes any job: a caller's
    /// commands are never split.)
    fn fits(&self, job: &Job, max_commands: usize) -> bool {
        self.jobs.is_empty()
            || (self.commands + job.ids.len() <= max_commands
                && self.bytes + job.body.len() < MAX_BATCH_BYTES)
    }

    fn full(&self, max_commands: usize) -> bool {
        self.commands >= max_commands || self.bytes >= MAX_BATCH_BYTES
    }

    fn push(&mut self, job: Job) {
        self.commands += job.ids.len();
        self.bytes += job.body.len() + 1;
        self.jobs.push(job);
    }

    /// The control message: `{"commands":[…]}`.
    fn payload(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes + 16);
        out.extend_from_slice(b"{\"commands\":[");
        for (i, j) in self.jobs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&j.body);
        }
        out.extend_from_slice(b"]}");
        out
    }
}

/// What `ensure_admin` found out, once per link.
#[derive(Clone, Copy, Debug)]
struct Prepared {
    /// Devices get the shared role (else a role of their own).
    shared: bool,
}

struct Conn {
    client: AsyncClient,
    shared: Arc<Shared>,
    state: watch::Receiver<Link>,
    queue: mpsc::UnboundedSender<Job>,
    task: tokio::task::JoinHandle<()>,
    batcher: tokio::task::JoinHandle<()>,
    admin: tokio::sync::Mutex<Option<Prepared>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
        self.batcher.abort();
    }
}

/// The Mosquitto adapter.
pub struct MosquittoHub {
    host: String,
    settings: Result<Settings, String>,
    conn: OnceCell<Arc<Conn>>,
}

impl MosquittoHub {
    /// An adapter for a linked hub; settings errors surface on every call as `Rejected`.
    pub fn new(hub: &LinkedHub) -> Self {
        static DESCRIBE: std::sync::Once = std::sync::Once::new();
        DESCRIBE.call_once(|| {
            metrics::describe_counter!(
                "dps_mosquitto_control_messages_total",
                "Dynamic-security control messages sent to Mosquitto hubs, by hub"
            );
            metrics::describe_counter!(
                "dps_mosquitto_control_commands_total",
                "Dynamic-security commands sent to Mosquitto hubs, by hub (divided by the messages: the batch size)"
            );
        });
        MosquittoHub {
            host: hub.host.to_ascii_lowercase(),
            settings: parse_settings(hub),
            conn: OnceCell::new(),
        }
    }

    fn rejected(&self, message: impl Into<String>) -> HubError {
        HubError::Rejected {
            hub: self.host.clone(),
            message: message.into(),
        }
    }

    fn unreachable(&self, message: impl Into<String>) -> HubError {
        HubError::Unreachable {
            hub: self.host.clone(),
            message: message.into(),
        }
    }

    fn settings(&self) -> Result<&Settings, HubError> {
        self.settings
            .as_ref()
            .map_err(|e| self.rejected(format!("misconfigured mosquitto hub: {e}")))
    }

    async fn conn(&self) -> Result<Arc<Conn>, HubError> {
        let s = self.settings()?.clone();
        let conn = self
            .conn
            .get_or_init(|| async move { Arc::new(start(s, self.host.clone())) })
            .await
            .clone();
        // Wait for the link (bounded); while it is known to be down, wait only a short grace
        // (a reconnect in progress) and then fail fast.
        let mut rx = conn.state.clone();
        let timeout = self.settings()?.timeout;
        let grace = tokio::time::Instant::now() + timeout.min(Duration::from_secs(1));
        let r = tokio::time::timeout(timeout, async {
            loop {
                let st = rx.borrow_and_update().clone();
                match st {
                    Link::Up => return Ok(()),
                    Link::Down {
                        unauthorized,
                        message,
                    } => match tokio::time::timeout_at(grace, rx.changed()).await {
                        Ok(Ok(())) => continue,
                        _ => return Err((unauthorized, message)),
                    },
                    Link::Connecting => {}
                }
                if rx.changed().await.is_err() {
                    return Err((false, "admin connection task ended".to_string()));
                }
            }
        })
        .await;
        match r {
            Ok(Ok(())) => Ok(conn),
            Ok(Err((true, m))) => Err(HubError::Unauthorized {
                hub: self.host.clone(),
                message: m,
            }),
            Ok(Err((false, m))) => Err(self.unreachable(m)),
            Err(_) => Err(self.unreachable("timed out connecting to the broker")),
        }
    }

    /// Queue dynsec commands for the next control message and wait for every answer (in
    /// order). Other callers' commands may travel in the same message; only ours are awaited.
    async fn exec(&self, conn: &Conn, mut commands: Vec<Value>) -> Result<Vec<Value>, HubError> {
        let mut waits = Vec::with_capacity(commands.len());
        let mut ids = Vec::with_capacity(commands.len());
        let mut body = Vec::new();
        {
            let mut pending = lock(&conn.shared.pending);
            for (i, c) in commands.iter_mut().enumerate() {
                let id = uuid::Uuid::new_v4().to_string();
                c["correlationData"] = Value::String(id.clone());
                let (tx, rx) = oneshot::channel();
                pending.insert(id.clone(), tx);
                waits.push(rx);
                ids.push(id);
                if i > 0 {
                    body.push(b',');
                }
                serde_json::to_writer(&mut body, c).expect("json");
            }
        }
        let timeout = self.settings()?.timeout;
        let job = Job {
            body,
            ids: ids.clone(),
        };
        let result = if conn.queue.send(job).is_err() {
            Ok(Err("the batching task ended".to_string()))
        } else {
            tokio::time::timeout(timeout, async {
                let mut out = Vec::with_capacity(waits.len());
                for rx in waits.iter_mut() {
                    out.push(
                        rx.await
                            .map_err(|_| "the admin connection was lost".to_string())?,
                    );
                }
                Ok::<_, String>(out)
            })
            .await
        };
        let mut pending = lock(&conn.shared.pending);
        for id in &ids {
            pending.remove(id);
        }
        drop(pending);
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(m)) => Err(self.unreachable(m)),
            Err(_) => Err(self.unreachable(
                "no answer from the dynamic-security plugin in time (is it loaded, and may the admin client use $CONTROL/dynamic-security?)",
            )),
        }
    }

    /// Prepare the link, once: grant the admin client the right to publish retained twins,
    /// learn the broker's version, choose the device role layout and create the shared role.
    ///
    /// The role `dps-twin-writer` gets `publishClientSend` on `{topic_prefix}/+/twin/#` and
    /// `{twin_topic_prefix}/#`, and is added to the admin client. Mosquitto disconnects a client
    /// whose roles change (the admin included), so after adding the role we wait for the link
    /// to come back. Operators may pre-grant the role; then nothing is changed.
    async fn ensure_admin(&self, conn: &Conn) -> Result<Prepared, HubError> {
        let mut ready = conn.admin.lock().await;
        if let Some(p) = *ready {
            return Ok(p);
        }
        let s = self.settings()?;
        // The broker sends the retained version right after the SUBACK, before it handles the
        // commands below: once their answers are in, the version (if any) has arrived.
        lock(&conn.shared.retained).insert(VERSION_TOPIC.to_string(), None);
        let subscribed = matches!(
            tokio::time::timeout(
                s.timeout,
                conn.client.subscribe(VERSION_TOPIC, QoS::AtMostOnce)
            )
            .await,
            Ok(Ok(()))
        );
        let acls = [
            format!("{}/+/twin/#", s.topic_prefix),
            format!("{}/#", s.twin_prefix),
        ];
        let mut cmds = vec![
            json!({"command": "createRole", "rolename": ADMIN_TWIN_ROLE, "textname": "dps: publish retained device twins"}),
        ];
        for t in &acls {
            cmds.push(json!({"command": "addRoleACL", "rolename": ADMIN_TWIN_ROLE, "acltype": "publishClientSend", "topic": t, "allow": true}));
        }
        if let Some(u) = &s.username {
            cmds.push(json!({"command": "getClient", "username": u}));
        }
        let answers = self.exec(conn, cmds).await;
        let version = lock(&conn.shared.retained)
            .remove(VERSION_TOPIC)
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        if subscribed {
            let _ = conn.client.try_unsubscribe(VERSION_TOPIC);
        }
        let answers = answers?;
        for r in &answers {
            if let Some(e) = error_of(r) {
                if !benign(e) {
                    tracing::warn!(hub = %self.host, command = %r["command"], error = %e, "mosquitto: could not prepare the twin-writer role");
                }
            }
        }

        let parsed = version.as_deref().and_then(parse_version);
        let substitutes = parsed.is_some_and(acl_substitution);
        let shared = match s.device_role {
            RoleMode::PerDevice => false,
            RoleMode::Auto => substitutes,
            RoleMode::Shared => {
                if parsed.is_some() && !substitutes {
                    return Err(self.rejected(format!(
                        "device_role = \"shared\" needs Mosquitto 2.1 or later (ACL %u substitution); this broker is '{}'",
                        version.unwrap_or_default()
                    )));
                }
                true
            }
        };
        let max_batch = s.max_batch.unwrap_or(if saves_per_message(parsed) {
            DEFAULT_MAX_BATCH
        } else {
            DEFAULT_MAX_BATCH_2_0
        });
        conn.shared.max_batch.store(max_batch, Ordering::Relaxed);
        if shared {
            self.ensure_shared_role(conn, s).await?;
        }

        let has_role = |v: &Value| {
            v.pointer("/data/client/roles")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|r| r["rolename"] == ADMIN_TWIN_ROLE))
        };
        if let (Some(u), Some(me)) = (&s.username, answers.last()) {
            if error_of(me).is_none() && !has_role(me) {
                // The broker kicks us when our roles change: 2.0.x at once (the answer may never
                // come), 2.1 a moment after answering. Wait for the reconnection; a broker that
                // does not kick costs this wait once.
                let before = conn.shared.connects.load(Ordering::SeqCst);
                let _ = self
                    .exec(
                        conn,
                        vec![json!({"command": "addClientRole", "username": u, "rolename": ADMIN_TWIN_ROLE})],
                    )
                    .await;
                let mut rx = conn.state.clone();
                let back = tokio::time::timeout(s.timeout, async {
                    loop {
                        if matches!(*rx.borrow_and_update(), Link::Up)
                            && conn.shared.connects.load(Ordering::SeqCst) > before
                        {
                            return true;
                        }
                        if rx.changed().await.is_err() {
                            return false;
                        }
                    }
                })
                .await;
                let up = matches!(back, Ok(true)) || matches!(*conn.state.borrow(), Link::Up);
                if !up {
                    return Err(self.unreachable("the broker did not take the admin client back after granting it the twin-writer role"));
                }
            }
        }
        tracing::info!(
            hub = %self.host,
            broker_version = version.as_deref().unwrap_or("unknown"),
            device_role = if shared { "shared" } else { "per-device" },
            max_batch_commands = max_batch,
            "mosquitto: hub prepared"
        );
        let p = Prepared { shared };
        *ready = Some(p);
        Ok(p)
    }

    /// Create the roles shared by all devices (or add their ACLs to existing ones).
    async fn ensure_shared_role(&self, conn: &Conn, s: &Settings) -> Result<(), HubError> {
        let acls = device_acls(&s.topic_prefix, "%u");
        let names = shared_role_names(&s.shared_role, s.shared_roles);
        let create = names
            .iter()
            .map(|r| json!({"command": "createRole", "rolename": r, "textname": "dps devices (ACLs by %u)", "acls": acls}))
            .collect();
        let answers = self.exec(conn, create).await?;
        let mut follow = Vec::new();
        for (name, r) in names.iter().zip(&answers) {
            match error_of(r) {
                None => {}
                Some(e) if benign(e) => {
                    for a in &acls {
                        let mut a = a.clone();
                        a["command"] = "addRoleACL".into();
                        a["rolename"] = name.clone().into();
                        follow.push(a);
                    }
                }
                Some(e) => return Err(self.rejected(format!("createRole {name}: {e}"))),
            }
        }
        if !follow.is_empty() {
            for r in self.exec(conn, follow).await? {
                if let Some(e) = error_of(&r) {
                    if !benign(e) {
                        return Err(self.rejected(format!("addRoleACL on a shared role: {e}")));
                    }
                }
            }
        }
        Ok(())
    }

    fn check_id(&self, device_id: &str) -> Result<(), HubError> {
        if device_id.is_empty() || device_id.contains(['/', '+', '#', '\0']) {
            return Err(self.rejected(format!(
                "device id '{device_id}' cannot be used in MQTT topics"
            )));
        }
        Ok(())
    }

    async fn publish_retained(
        &self,
        conn: &Conn,
        topic: String,
        payload: Vec<u8>,
    ) -> Result<(), HubError> {
        let timeout = self.settings()?.timeout;
        match tokio::time::timeout(
            timeout,
            conn.client.publish(topic, QoS::AtLeastOnce, true, payload),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.unreachable(format!("cannot publish: {e}"))),
            Err(_) => Err(self.unreachable("timed out queueing a publish")),
        }
    }
}

/// The ACLs of a device's role: everything under `{prefix}/{who}/#` (`who` is a device id, or
/// `%u` in the shared role) except publishing its desired twin.
fn device_acls(prefix: &str, who: &str) -> Vec<Value> {
    let own = format!("{prefix}/{who}/#");
    vec![
        json!({"acltype": "publishClientSend", "topic": format!("{prefix}/{who}/twin/desired"), "priority": 10, "allow": false}),
        json!({"acltype": "publishClientSend", "topic": own, "allow": true}),
        json!({"acltype": "publishClientReceive", "topic": own, "allow": true}),
        json!({"acltype": "subscribePattern", "topic": own, "allow": true}),
        json!({"acltype": "unsubscribePattern", "topic": own, "allow": true}),
    ]
}

/// The shared role of a device: `{base}-{n}` with `n = FNV-1a-32(device id) mod shards`, or
/// `{base}` itself when there is one shard. Devices are spread over several identical roles
/// because the plugin keeps each role's client list sorted by insertion: loading 50,000 clients
/// of one role took 2.0.11 339 s at start-up (7.5 s over 64 roles).
pub fn shared_role_name(base: &str, shards: u32, device_id: &str) -> String {
    if shards <= 1 {
        return base.to_string();
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in device_id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{base}-{}", h % shards)
}

fn shared_role_names(base: &str, shards: u32) -> Vec<String> {
    if shards <= 1 {
        return vec![base.to_string()];
    }
    (0..shards).map(|k| format!("{base}-{k}")).collect()
}

/// `(major, minor, patch)` from `$SYS/broker/version` ("mosquitto version 2.0.11").
fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let n = v.trim().rsplit(' ').next()?;
    let mut it = n.split(['.', '-', '~', '+']).map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

/// Dynamic-security ACLs substitute `%u`/`%c` from Mosquitto 2.1 on (none of 2.0.x does;
/// checked on 2.0.11 and in the 2.0.20 sources).
fn acl_substitution(v: (u32, u32, u32)) -> bool {
    (v.0, v.1) >= (2, 1)
}

/// The plugin saves its file once per control message from 2.1 on; 2.0.x saves after every
/// command (measured on 2.0.11). Unknown: assume the worst.
fn saves_per_message(v: Option<(u32, u32, u32)>) -> bool {
    v.is_some_and(|v| (v.0, v.1) >= (2, 1))
}

fn role_name(device_id: &str) -> String {
    format!("dps-device-{device_id}")
}

fn error_of(r: &Value) -> Option<&str> {
    r.get("error").and_then(Value::as_str)
}

/// "Already exists" / "already has" answers: the desired state is already there.
fn benign(e: &str) -> bool {
    let e = e.to_ascii_lowercase();
    e.contains("already")
}

fn not_found(e: &str) -> bool {
    e.to_ascii_lowercase().contains("not found")
}

/// Start the admin connection task and the batching task.
fn start(s: Settings, host: String) -> Conn {
    let mut opts = MqttOptions::new(s.client_id.clone(), s.broker_host.clone(), s.port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(u) = &s.username {
        opts.set_credentials(u.clone(), s.password.clone().unwrap_or_default());
    }
    if let Some(tls) = &s.tls {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    eventloop
        .network_options
        .set_connection_timeout(s.timeout.as_secs().clamp(1, 30));
    let shared = Arc::new(Shared::default());
    shared.max_batch.store(
        s.max_batch.unwrap_or(DEFAULT_MAX_BATCH_2_0),
        Ordering::Relaxed,
    );
    let (state_tx, state_rx) = watch::channel(Link::Connecting);
    let task = {
        let shared = shared.clone();
        let client = client.clone();
        let broker = format!("{}:{}", s.broker_host, s.port);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff = Duration::from_millis(200);
                        let _ = client.try_subscribe(RESPONSE_TOPIC, QoS::AtLeastOnce);
                        shared.connects.fetch_add(1, Ordering::SeqCst);
                        tracing::info!(broker = %broker, "mosquitto: admin connection up");
                        state_tx.send_replace(Link::Up);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.topic == RESPONSE_TOPIC {
                            dispatch(&shared, &p.payload);
                        } else if let Some(slot) = shared
                            .retained
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .get_mut(&p.topic)
                        {
                            *slot = Some(p.payload.to_vec());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let unauthorized = matches!(
                            e,
                            ConnectionError::ConnectionRefused(
                                ConnectReturnCode::NotAuthorized
                                    | ConnectReturnCode::BadUserNamePassword
                            )
                        );
                        let message =
                            dps_core::redact::scrub(&format!("broker {broker}: {e}")).into_owned();
                        if !matches!(&*state_tx.borrow(), Link::Down { .. }) {
                            tracing::warn!(error = %message, "mosquitto: admin connection down");
                        }
                        state_tx.send_replace(Link::Down {
                            unauthorized,
                            message,
                        });
                        // Fail waiting commands now rather than at their timeout.
                        lock(&shared.pending).clear();
                        lock(&shared.inflight).clear();
                        shared.answered.notify_one();
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        })
    };
    let (queue, jobs) = mpsc::unbounded_channel();
    let publisher = client.clone();
    let batcher = tokio::spawn(run_batcher(
        jobs,
        move |payload| {
            let c = publisher.clone();
            async move {
                c.publish(CONTROL_TOPIC, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_ok()
            }
        },
        shared.clone(),
        state_rx.clone(),
        Pace {
            window: s.batch_window,
            max_inflight: s.max_inflight,
            stale: s.timeout,
        },
        host,
    ));
    Conn {
        client,
        shared,
        state: state_rx,
        queue,
        task,
        batcher,
        admin: tokio::sync::Mutex::new(None),
    }
}

/// How the batching task paces control messages.
#[derive(Clone, Copy, Debug)]
struct Pace {
    /// How long the first queued job waits for others.
    window: Duration,
    /// Control messages sent and not answered yet, at most; while the broker works through
    /// them, new jobs gather into the next batch.
    max_inflight: usize,
    /// An unanswered message stops counting after this (its callers have given up).
    stale: Duration,
}

/// The batching task: takes the first queued job, waits up to `window` for more (or until the
/// batch is full), and sends them as one control message; then the next batch. While
/// `max_inflight` messages await their answer, it keeps gathering jobs (up to a full batch)
/// instead of sending: a busy broker gets fewer, larger messages (Mosquitto 2.1 saves its file
/// once per message). Commands whose caller has already given up (timed out) are not sent; when
/// the link is down, or the send fails, the batch's callers are failed at once.
async fn run_batcher<F, Fut>(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    mut publish: F,
    shared: Arc<Shared>,
    state: watch::Receiver<Link>,
    pace: Pace,
    hub: String,
) where
    F: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut carry: Option<Job> = None;
    loop {
        let first = match carry.take() {
            Some(j) => j,
            None => match jobs.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        let window = pace.window;
        let max = shared.max_batch.load(Ordering::Relaxed).max(1);
        let deadline = tokio::time::Instant::now() + window;
        let mut batch = Batch::default();
        batch.push(first);
        while !batch.full(max) {
            let next = match jobs.try_recv() {
                Ok(j) => Some(j),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) if window.is_zero() => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(deadline, jobs.recv())
                        .await
                        .ok()
                        .flatten()
                }
            };
            let Some(job) = next else { break };
            if batch.fits(&job, max) {
                batch.push(job);
            } else {
                carry = Some(job);
                break;
            }
        }
        // Wait for a free slot, gathering more jobs meanwhile.
        loop {
            {
                let mut inflight = lock(&shared.inflight);
                let now = tokio::time::Instant::now();
                inflight.retain(|_, t| now.duration_since(*t) < pace.stale);
                if inflight.len() < pace.max_inflight.max(1) {
                    break;
                }
            }
            let gather = carry.is_none() && !batch.full(max);
            tokio::select! {
                _ = shared.answered.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                j = jobs.recv(), if gather => match j {
                    Some(job) if batch.fits(&job, max) => batch.push(job),
                    Some(job) => carry = Some(job),
                    None => {}
                },
            }
        }
        // Drop what nobody waits for any more.
        {
            let pending = lock(&shared.pending);
            batch
                .jobs
                .retain(|j| j.ids.iter().all(|id| pending.contains_key(id)));
        }
        if batch.jobs.is_empty() {
            continue;
        }
        let commands: usize = batch.jobs.iter().map(|j| j.ids.len()).sum();
        let marker = batch.jobs[0].ids[0].clone();
        lock(&shared.inflight).insert(marker.clone(), tokio::time::Instant::now());
        let sent = if matches!(*state.borrow(), Link::Down { .. }) {
            false
        } else {
            publish(batch.payload()).await
        };
        if sent {
            metrics::counter!("dps_mosquitto_control_messages_total", "hub" => hub.clone())
                .increment(1);
            metrics::counter!("dps_mosquitto_control_commands_total", "hub" => hub.clone())
                .increment(commands as u64);
        } else {
            lock(&shared.inflight).remove(&marker);
            // Dropping the senders fails the callers now rather than at their timeout.
            let mut pending = lock(&shared.pending);
            for j in &batch.jobs {
                for id in &j.ids {
                    pending.remove(id);
                }
            }
        }
    }
}

fn dispatch(shared: &Shared, payload: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return;
    };
    let Some(responses) = v.get("responses").and_then(Value::as_array) else {
        return;
    };
    let mut pending = lock(&shared.pending);
    let mut inflight = lock(&shared.inflight);
    let mut freed = false;
    for r in responses {
        if let Some(id) = r.get("correlationData").and_then(Value::as_str) {
            freed |= inflight.remove(id).is_some();
            if let Some(tx) = pending.remove(id) {
                let _ = tx.send(r.clone());
            }
        }
    }
    if freed {
        shared.answered.notify_one();
    }
}

#[async_trait::async_trait]
impl HubAdapter for MosquittoHub {
    async fn upsert_device(
        &self,
        identity: &HubIdentity,
        twin: Option<&TwinState>,
    ) -> Result<(), HubError> {
        let id = identity.device_id.as_str();
        self.check_id(id)?;
        let s = self.settings()?;
        let password = match &identity.auth {
            HubAuth::SymmetricKey { primary, .. } => Some(
                device_password(primary, id, s.password_mode_derived)
                    .ok_or_else(|| self.rejected("the device key is not base64"))?,
            ),
            HubAuth::X509Thumbprint { .. } => None,
        };
        let conn = self.conn().await?;
        let prepared = self.ensure_admin(&conn).await?;
        if let Some(t) = twin {
            let t = t.for_hub();
            let desired = t
                .properties
                .as_ref()
                .and_then(|p| p.desired.clone())
                .unwrap_or_else(|| json!({}));
            self.publish_retained(
                &conn,
                format!("{}/{id}/twin/desired", s.topic_prefix),
                serde_json::to_vec(&desired).expect("json"),
            )
            .await?;
            self.publish_retained(
                &conn,
                format!("{}/{id}", s.twin_prefix),
                serde_json::to_vec(&t).expect("json"),
            )
            .await?;
        }
        // Shared layout: one createClient (the role exists). Per-device layout: the device's
        // own role first. A disabled identity is disabled in the same message.
        let role = if prepared.shared {
            shared_role_name(&s.shared_role, s.shared_roles, id)
        } else {
            role_name(id)
        };
        let mut client = json!({
            "username": id,
            "clientid": id,
            "textname": format!("dps device {id}"),
            "roles": [{"rolename": role}],
        });
        if let Some(p) = &password {
            client["password"] = Value::String(p.clone());
        }
        let mut create = client.clone();
        create["command"] = "createClient".into();
        let mut first = Vec::with_capacity(3);
        let acls = device_acls(&s.topic_prefix, id);
        if !prepared.shared {
            first.push(json!({"command": "createRole", "rolename": role, "textname": format!("dps device {id}"), "acls": acls}));
        }
        first.push(create);
        if !identity.enabled {
            first.push(json!({"command": "disableClient", "username": id}));
        }
        let answers = self.exec(&conn, first).await?;
        let (role_answer, client_answer) = if prepared.shared {
            (None, &answers[0])
        } else {
            (Some(&answers[0]), &answers[1])
        };
        let mut follow = Vec::new();
        if let Some(e) = role_answer.and_then(error_of) {
            if !benign(e) {
                return Err(self.rejected(format!("createRole: {e}")));
            }
            for a in &acls {
                let mut c = a.clone();
                c["command"] = "addRoleACL".into();
                c["rolename"] = role.clone().into();
                follow.push(c);
            }
        }
        match error_of(client_answer) {
            None => {}
            Some(e) if benign(e) => {
                // It exists: bring it up to date (password, roles: this also moves it between
                // the layouts), enable it, and drop a per-device role it no longer uses.
                let mut m = client.clone();
                m["command"] = "modifyClient".into();
                follow.push(m);
                if identity.enabled {
                    follow.push(json!({"command": "enableClient", "username": id}));
                }
                if prepared.shared {
                    follow.push(json!({"command": "deleteRole", "rolename": role_name(id)}));
                }
            }
            Some(e) => return Err(self.rejected(format!("createClient: {e}"))),
        }
        if !identity.enabled {
            if let Some(e) = answers.last().and_then(error_of) {
                return Err(self.rejected(format!("disableClient: {e}")));
            }
        }
        if !follow.is_empty() {
            for r in self.exec(&conn, follow).await? {
                if let Some(e) = error_of(&r) {
                    let gone = r["command"] == "deleteRole" && not_found(e);
                    if !benign(e) && !gone {
                        return Err(self.rejected(format!("{}: {e}", r["command"])));
                    }
                }
            }
        }
        Ok(())
    }

    async fn get_twin(&self, device_id: &str) -> Result<Option<TwinState>, HubError> {
        self.check_id(device_id)?;
        let topic = format!("{}/{device_id}", self.settings()?.twin_prefix);
        let conn = self.conn().await?;
        self.ensure_admin(&conn).await?;
        conn.shared
            .retained
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(topic.clone(), None);
        // The broker sends retained messages right after the SUBACK, before it handles our next
        // publish; so once the getClient answer is in, any retained twin has arrived too.
        let sub = match tokio::time::timeout(
            self.settings()?.timeout,
            conn.client.subscribe(topic.clone(), QoS::AtLeastOnce),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.unreachable(format!("cannot subscribe: {e}"))),
            Err(_) => Err(self.unreachable("timed out subscribing")),
        };
        let answer = match sub {
            Ok(()) => {
                self.exec(
                    &conn,
                    vec![json!({"command": "getClient", "username": device_id})],
                )
                .await
            }
            Err(e) => Err(e),
        };
        let _ = conn.client.try_unsubscribe(topic.clone());
        let payload = conn
            .shared
            .retained
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&topic)
            .flatten();
        let answer = answer?;
        if let Some(e) = error_of(&answer[0]) {
            if not_found(e) {
                return Ok(None);
            }
            return Err(self.rejected(format!("getClient: {e}")));
        }
        Ok(Some(
            payload
                .filter(|p| !p.is_empty())
                .and_then(|p| serde_json::from_slice::<TwinState>(&p).ok())
                .unwrap_or_default(),
        ))
    }

    async fn set_enabled(&self, device_id: &str, enabled: bool) -> Result<(), HubError> {
        self.check_id(device_id)?;
        let conn = self.conn().await?;
        self.ensure_admin(&conn).await?;
        let cmd = if enabled {
            "enableClient"
        } else {
            "disableClient"
        };
        let r = self
            .exec(&conn, vec![json!({"command": cmd, "username": device_id})])
            .await?;
        match error_of(&r[0]) {
            Some(e) if !not_found(e) => Err(self.rejected(format!("{cmd}: {e}"))),
            _ => Ok(()),
        }
    }

    async fn delete_device(&self, device_id: &str) -> Result<(), HubError> {
        self.check_id(device_id)?;
        let s = self.settings()?;
        let conn = self.conn().await?;
        self.ensure_admin(&conn).await?;
        let r = self
            .exec(
                &conn,
                // The device's own role: in use under the per-device layout, left over from it
                // under the shared one ("not found" when there is none).
                vec![
                    json!({"command": "deleteClient", "username": device_id}),
                    json!({"command": "deleteRole", "rolename": role_name(device_id)}),
                ],
            )
            .await?;
        for a in &r {
            if let Some(e) = error_of(a) {
                if !not_found(e) {
                    return Err(self.rejected(format!("{}: {e}", a["command"])));
                }
            }
        }
        // Clear the retained twin (empty retained payloads delete them).
        self.publish_retained(
            &conn,
            format!("{}/{device_id}/twin/desired", s.topic_prefix),
            Vec::new(),
        )
        .await?;
        self.publish_retained(&conn, format!("{}/{device_id}", s.twin_prefix), Vec::new())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_derivation_is_stable_and_documented() {
        // base64(HMAC-SHA256(base64decode(key), "mosquitto:" + id))
        let key = B64.encode(b"0123456789abcdef0123456789abcdef");
        let p = derive_password(&key, "dev-1").unwrap();
        let expect = B64.encode(dps_core::sas::hmac_sha256(
            b"0123456789abcdef0123456789abcdef",
            b"mosquitto:dev-1",
        ));
        assert_eq!(p, expect);
        assert!(derive_password("not base64!", "x").is_none());
    }

    #[test]
    fn settings_parse_the_url_and_options() {
        let mut hub = LinkedHub::registry("broker.example");
        hub.kind = dps_core::instance::HubKind::Mosquitto;
        hub.connection_string = Some("mqtt://adm%40in:p%3Ass@127.0.0.1:18830".into());
        hub.options.insert("topic_prefix".into(), "/d/".into());
        let s = parse_settings(&hub).unwrap();
        assert_eq!(
            (
                s.broker_host.as_str(),
                s.port,
                s.username.as_deref(),
                s.password.as_deref()
            ),
            ("127.0.0.1", 18830, Some("adm@in"), Some("p:ss"))
        );
        assert_eq!(s.topic_prefix, "d");
        assert!(s.tls.is_none());
        hub.connection_string = Some("http://x".into());
        assert!(parse_settings(&hub).is_err());
    }

    #[test]
    fn broker_versions_decide_the_role_layout_and_batch_size() {
        assert_eq!(parse_version("mosquitto version 2.0.11"), Some((2, 0, 11)));
        assert_eq!(parse_version("mosquitto version 2.1.0"), Some((2, 1, 0)));
        assert_eq!(parse_version("mosquitto version 2.1"), Some((2, 1, 0)));
        assert_eq!(parse_version("nonsense"), None);
        assert!(!acl_substitution((2, 0, 20)));
        assert!(acl_substitution((2, 1, 0)));
        assert!(acl_substitution((3, 0, 0)));
        assert!(!saves_per_message(None));
        assert!(!saves_per_message(Some((2, 0, 11))));
        assert!(saves_per_message(Some((2, 1, 2))));
    }

    #[test]
    fn shared_role_names_spread_devices_stably() {
        assert_eq!(shared_role_name("dps-devices", 1, "a"), "dps-devices");
        // FNV-1a-32("a") = 0xe40c292c
        assert_eq!(
            shared_role_name("r", 64, "a"),
            format!("r-{}", 0xe40c_292c_u32 % 64)
        );
        let names = shared_role_names("r", 64);
        assert_eq!(names.len(), 64);
        let mut used = std::collections::HashSet::new();
        for i in 0..2000 {
            let n = shared_role_name("r", 64, &format!("dev-{i}"));
            assert!(names.contains(&n));
            used.insert(n);
        }
        assert_eq!(used.len(), 64, "every shard is used");
    }

    #[test]
    fn batch_options_parse_and_bad_ones_are_refused() {
        let mut hub = LinkedHub::registry("broker.example");
        hub.kind = dps_core::instance::HubKind::Mosquitto;
        hub.connection_string = Some("mqtt://a:b@127.0.0.1:1883".into());
        let s = parse_settings(&hub).unwrap();
        assert_eq!(s.batch_window, Duration::from_millis(5));
        assert_eq!(s.max_batch, None);
        assert_eq!(s.device_role, RoleMode::Auto);
        assert_eq!(s.shared_role, SHARED_DEVICE_ROLE);
        assert_eq!(s.shared_roles, DEFAULT_SHARED_ROLES);
        hub.options.insert("batch_window_ms".into(), 0.into());
        hub.options
            .insert("max_batch_commands".into(), 50_000.into());
        hub.options
            .insert("device_role".into(), "per-device".into());
        let s = parse_settings(&hub).unwrap();
        assert_eq!(s.batch_window, Duration::ZERO);
        assert_eq!(s.max_batch, Some(10_000));
        assert_eq!(s.device_role, RoleMode::PerDevice);
        hub.options.insert("device_role".into(), "mine".into());
        assert!(parse_settings(&hub).is_err());
        hub.options.insert("device_role".into(), "shared".into());
        hub.options.insert("batch_window_ms".into(), "soon".into());
        assert!(parse_settings(&hub).is_err());
        hub.options.remove("batch_window_ms");
        hub.options
            .insert("shared_role".into(), "dps-device-x".into());
        assert!(parse_settings(&hub).is_err());
    }

    fn job(n: usize, tag: &str) -> Job {
        let cmds: Vec<Value> = (0..n)
            .map(|i| json!({"command": "getClient", "username": format!("{tag}-{i}"), "correlationData": format!("{tag}-{i}")}))
            .collect();
        Job {
            body: cmds
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(",")
                .into_bytes(),
            ids: (0..n).map(|i| format!("{tag}-{i}")).collect(),
        }
    }

    #[test]
    fn a_batch_keeps_callers_whole_and_in_order() {
        let mut b = Batch::default();
        assert!(b.fits(&job(20, "big"), 5), "an empty batch takes any job");
        b.push(job(2, "a"));
        assert!(b.fits(&job(3, "b"), 5));
        assert!(
            !b.fits(&job(4, "c"), 5),
            "a caller's commands are not split"
        );
        b.push(job(3, "b"));
        assert!(b.full(5));
        let v: Value = serde_json::from_slice(&b.payload()).unwrap();
        let names: Vec<&str> = v["commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["username"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a-0", "a-1", "b-0", "b-1", "b-2"]);
        // The byte bound: a batch never grows past ~900 KiB.
        let mut b = Batch::default();
        let fat = |t: &str| Job {
            body: format!("{{\"x\":\"{}\"}}", "y".repeat(400 * 1024)).into_bytes(),
            ids: vec![t.to_string()],
        };
        b.push(fat("1"));
        assert!(b.fits(&fat("2"), 500));
        b.push(fat("2"));
        assert!(!b.fits(&fat("3"), 500));
    }

    /// Run the batching task against a recording publisher.
    fn batcher(
        window_ms: u64,
        max: usize,
        max_inflight: usize,
        link: Link,
    ) -> (
        mpsc::UnboundedSender<Job>,
        mpsc::UnboundedReceiver<Value>,
        Arc<Shared>,
        watch::Sender<Link>,
    ) {
        let shared = Arc::new(Shared::default());
        shared.max_batch.store(max, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (state_tx, state_rx) = watch::channel(link);
        tokio::spawn(run_batcher(
            rx,
            move |p: Vec<u8>| {
                let out = out_tx.clone();
                async move { out.send(serde_json::from_slice(&p).unwrap()).is_ok() }
            },
            shared.clone(),
            state_rx,
            Pace {
                window: Duration::from_millis(window_ms),
                max_inflight,
                stale: Duration::from_secs(30),
            },
            "h".into(),
        ));
        (tx, out_rx, shared, state_tx)
    }

    fn wait_for(shared: &Shared, j: &Job) -> Vec<oneshot::Receiver<Value>> {
        let mut p = lock(&shared.pending);
        j.ids
            .iter()
            .map(|id| {
                let (tx, rx) = oneshot::channel();
                p.insert(id.clone(), tx);
                rx
            })
            .collect()
    }

    fn sizes(v: &Value) -> usize {
        v["commands"].as_array().unwrap().len()
    }

    #[tokio::test]
    async fn the_batcher_coalesces_within_the_window_and_splits_at_the_limit() {
        let (tx, mut out, shared, _link) = batcher(50, 10, 100, Link::Up);
        let mut held = Vec::new();
        for i in 0..8 {
            let j = job(3, &format!("d{i}"));
            held.push(wait_for(&shared, &j));
            tx.send(j).unwrap();
        }
        // 24 commands, at most 10 per message, callers never split: 9 + 9 + 6.
        let mut got = Vec::new();
        while got.iter().sum::<usize>() < 24 {
            let m = tokio::time::timeout(Duration::from_secs(5), out.recv())
                .await
                .expect("a control message")
                .unwrap();
            got.push(sizes(&m));
        }
        assert_eq!(got, [9, 9, 6]);
    }

    #[tokio::test]
    async fn the_batcher_with_no_window_sends_at_once_and_skips_abandoned_callers() {
        let (tx, mut out, shared, _link) = batcher(0, 500, 100, Link::Up);
        let gone = job(2, "gone");
        tx.send(gone).unwrap(); // nobody waits for it
        let j = job(1, "alive");
        let _rx = wait_for(&shared, &j);
        tx.send(j).unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), out.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m["commands"][0]["username"], "alive-0", "{m}");
        assert_eq!(sizes(&m), 1);
    }

    #[tokio::test]
    async fn the_batcher_fails_callers_at_once_while_the_link_is_down() {
        let (tx, mut out, shared, link) = batcher(0, 500, 100, Link::Up);
        link.send_replace(Link::Down {
            unauthorized: false,
            message: "gone".into(),
        });
        let j = job(2, "x");
        let mut rxs = wait_for(&shared, &j);
        tx.send(j).unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), rxs.remove(0))
            .await
            .expect("failed fast");
        assert!(r.is_err(), "the caller's answer channel is dropped");
        assert!(out.try_recv().is_err(), "nothing was sent");
    }

    #[tokio::test]
    async fn while_the_broker_is_busy_the_next_batch_gathers() {
        let (tx, mut out, shared, _link) = batcher(0, 500, 1, Link::Up);
        let first = job(1, "first");
        let _w = wait_for(&shared, &first);
        tx.send(first).unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), out.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sizes(&m), 1);
        // Unanswered: the next jobs wait and gather, whatever the (zero) window.
        let mut held = Vec::new();
        for i in 0..5 {
            let j = job(2, &format!("n{i}"));
            held.push(wait_for(&shared, &j));
            tx.send(j).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            out.try_recv().is_err(),
            "nothing sent while one is in flight"
        );
        // The answer frees the slot: one message with all five jobs.
        dispatch(
            &shared,
            json!({"responses": [{"command": "getClient", "correlationData": "first-0"}]})
                .to_string()
                .as_bytes(),
        );
        let m = tokio::time::timeout(Duration::from_secs(5), out.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sizes(&m), 10, "{m}");
    }
}

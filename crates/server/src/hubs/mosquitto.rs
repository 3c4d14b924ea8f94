//! Mosquitto 2.x as a linked hub (`kind = "mosquitto"`), through its dynamic-security plugin.
//!
//! dps keeps one long-lived admin connection to the broker (rumqttc, MQTT 3.1.1, plain TCP on
//! loopback or TLS with `mqtts://`) and sends dynamic-security commands on
//! `$CONTROL/dynamic-security/v1`, matching the answers on `$CONTROL/dynamic-security/v1/response`
//! by their `correlationData`. For each device it creates:
//!
//! * a role `dps-device-{deviceId}` allowing publish, subscribe and receive on
//!   `{topic_prefix}/{deviceId}/#` only (default prefix `devices`), and denying publish on
//!   `{topic_prefix}/{deviceId}/twin/desired` (that one belongs to the service);
//! * a client with username = device id, client id restricted to the device id, the role above,
//!   and a password (symmetric-key devices; see [`derive_password`]). X.509 devices get no
//!   password: the broker's TLS listener authenticates them by certificate with
//!   `use_identity_as_username true` (username = certificate CN = device id).
//!
//! The twin is kept as two retained messages: `{topic_prefix}/{deviceId}/twin/desired` (the
//! desired properties, readable by the device) and `{twin_topic_prefix}/{deviceId}` (the whole
//! twin, tags included, readable only by admins; default prefix `dps/twins`), which is what
//! `get_twin` reads back for migration.
//!
//! Settings: `connection_string = "mqtt://admin:password@127.0.0.1:1883"` (or `mqtts://` with
//! `options.ca_file`), and options `topic_prefix`, `twin_topic_prefix`, `password_mode`
//! (`derived` | `primaryKey`), `timeout_ms`, `client_id`, `cert_file`/`key_file` (admin client
//! certificate). See docs/linked-hubs.md.

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
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch, OnceCell};

/// Where dynamic-security commands go.
pub const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
/// Where their answers come back.
pub const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";
/// The role dps grants itself so that it may publish retained twins.
pub const ADMIN_TWIN_ROLE: &str = "dps-twin-writer";

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
}

fn opt_str<'a>(hub: &'a LinkedHub, k: &str) -> Option<&'a str> {
    hub.options.get(k).and_then(Value::as_str)
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
    let password_mode_derived = match opt_str(hub, "password_mode").unwrap_or("derived") {
        "derived" => true,
        "primaryKey" | "primary_key" => false,
        other => {
            return Err(format!(
                "unknown password_mode '{other}' (derived | primaryKey)"
            ))
        }
    };
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
    /// Retained messages awaited by `get_twin`, by topic.
    retained: Mutex<HashMap<String, Option<Vec<u8>>>>,
}

struct Conn {
    client: AsyncClient,
    shared: Arc<Shared>,
    state: watch::Receiver<Link>,
    task: tokio::task::JoinHandle<()>,
    admin_ready: tokio::sync::Mutex<bool>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
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
            .get_or_init(|| async move { Arc::new(start(s)) })
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

    /// Send a batch of dynsec commands and wait for every answer (in order).
    async fn exec(&self, conn: &Conn, mut commands: Vec<Value>) -> Result<Vec<Value>, HubError> {
        let mut waits = Vec::with_capacity(commands.len());
        {
            let mut pending = conn
                .shared
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for c in commands.iter_mut() {
                let id = uuid::Uuid::new_v4().to_string();
                c["correlationData"] = Value::String(id.clone());
                let (tx, rx) = oneshot::channel();
                pending.insert(id.clone(), tx);
                waits.push((id, rx));
            }
        }
        let body = serde_json::to_vec(&json!({ "commands": commands })).expect("json");
        let timeout = self.settings()?.timeout;
        let result = tokio::time::timeout(timeout, async {
            conn.client
                .publish(CONTROL_TOPIC, QoS::AtLeastOnce, false, body)
                .await
                .map_err(|e| format!("cannot send the command: {e}"))?;
            let mut out = Vec::with_capacity(waits.len());
            for (_, rx) in waits.iter_mut() {
                out.push(
                    rx.await
                        .map_err(|_| "the admin connection was lost".to_string())?,
                );
            }
            Ok::<_, String>(out)
        })
        .await;
        let mut pending = conn
            .shared
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (id, _) in &waits {
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

    /// Grant the admin client the right to publish retained twins (idempotent, once per link).
    ///
    /// The role `dps-twin-writer` gets `publishClientSend` on `{topic_prefix}/+/twin/#` and
    /// `{twin_topic_prefix}/#`, and is added to the admin client. Mosquitto disconnects a client
    /// whose roles change (the admin included), so after adding the role we wait for the link
    /// to come back. Operators may pre-grant the role; then nothing is changed.
    async fn ensure_admin(&self, conn: &Conn) -> Result<(), HubError> {
        let mut ready = conn.admin_ready.lock().await;
        if *ready {
            return Ok(());
        }
        let s = self.settings()?;
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
        let answers = self.exec(conn, cmds).await?;
        for r in &answers {
            if let Some(e) = error_of(r) {
                if !benign(e) {
                    tracing::warn!(hub = %self.host, command = %r["command"], error = %e, "mosquitto: could not prepare the twin-writer role");
                }
            }
        }
        let has_role = |v: &Value| {
            v.pointer("/data/client/roles")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|r| r["rolename"] == ADMIN_TWIN_ROLE))
        };
        if let (Some(u), Some(me)) = (&s.username, answers.last()) {
            if error_of(me).is_none() && !has_role(me) {
                // The broker kicks us when our roles change: the answer may never come.
                let _ = self
                    .exec(
                        conn,
                        vec![json!({"command": "addClientRole", "username": u, "rolename": ADMIN_TWIN_ROLE})],
                    )
                    .await;
                let mut rx = conn.state.clone();
                let up = tokio::time::timeout(s.timeout, async {
                    loop {
                        if matches!(*rx.borrow_and_update(), Link::Up) {
                            return true;
                        }
                        if rx.changed().await.is_err() {
                            return false;
                        }
                    }
                })
                .await;
                if !matches!(up, Ok(true)) {
                    return Err(self.unreachable("the broker did not take the admin client back after granting it the twin-writer role"));
                }
                tracing::info!(hub = %self.host, "mosquitto: granted the admin client the '{ADMIN_TWIN_ROLE}' role");
            }
        }
        *ready = true;
        Ok(())
    }

    fn device_acls(&self, device_id: &str) -> Result<Vec<Value>, HubError> {
        let p = &self.settings()?.topic_prefix;
        let own = format!("{p}/{device_id}/#");
        Ok(vec![
            json!({"acltype": "publishClientSend", "topic": format!("{p}/{device_id}/twin/desired"), "priority": 10, "allow": false}),
            json!({"acltype": "publishClientSend", "topic": own, "allow": true}),
            json!({"acltype": "publishClientReceive", "topic": own, "allow": true}),
            json!({"acltype": "subscribePattern", "topic": own, "allow": true}),
            json!({"acltype": "unsubscribePattern", "topic": own, "allow": true}),
        ])
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

/// Start the admin connection task.
fn start(s: Settings) -> Conn {
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
                        shared
                            .pending
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .clear();
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        })
    };
    Conn {
        client,
        shared,
        state: state_rx,
        task,
        admin_ready: tokio::sync::Mutex::new(false),
    }
}

fn dispatch(shared: &Shared, payload: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return;
    };
    let Some(responses) = v.get("responses").and_then(Value::as_array) else {
        return;
    };
    let mut pending = shared
        .pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for r in responses {
        if let Some(id) = r.get("correlationData").and_then(Value::as_str) {
            if let Some(tx) = pending.remove(id) {
                let _ = tx.send(r.clone());
            }
        }
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
            HubAuth::SymmetricKey { primary, .. } => Some(if s.password_mode_derived {
                derive_password(primary, id)
                    .ok_or_else(|| self.rejected("the device key is not base64"))?
            } else {
                primary.clone()
            }),
            HubAuth::X509Thumbprint { .. } => None,
        };
        let conn = self.conn().await?;
        self.ensure_admin(&conn).await?;
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
        let role = role_name(id);
        let acls = self.device_acls(id)?;
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
        let answers = self
            .exec(
                &conn,
                vec![
                    json!({"command": "createRole", "rolename": role, "textname": format!("dps device {id}"), "acls": acls}),
                    create,
                ],
            )
            .await?;
        let mut follow = Vec::new();
        if let Some(e) = error_of(&answers[0]) {
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
        let existed = match error_of(&answers[1]) {
            None => false,
            Some(e) if benign(e) => {
                let mut m = client.clone();
                m["command"] = "modifyClient".into();
                follow.push(m);
                true
            }
            Some(e) => return Err(self.rejected(format!("createClient: {e}"))),
        };
        if !identity.enabled {
            follow.push(json!({"command": "disableClient", "username": id}));
        } else if existed {
            follow.push(json!({"command": "enableClient", "username": id}));
        }
        if !follow.is_empty() {
            for r in self.exec(&conn, follow).await? {
                if let Some(e) = error_of(&r) {
                    if !benign(e) {
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
}

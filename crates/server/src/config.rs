//! Configuration: one typed struct, layered as built-in defaults, then the TOML file
//! (`--config`), then `DPS_*` environment variables (`__` separates nested keys, e.g.
//! `DPS_LISTEN__HTTPS`), then command-line flags. Relative paths resolve against the config
//! file's folder. The complete, commented example is `config/dps.example.toml` (parsed by a test).

use dps_core::instance::{AccessPolicy, Instance, LinkedHub, RegisterResponse, Right};
use dps_core::model::AllocationPolicy;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The whole configuration. Its `Debug` hides secrets (the store URL's password, access-policy
/// keys, linked-hub credentials) by the rule of [`dps_core::redact`].
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the embedded SQLite store, the development CA and `run.json` live.
    pub data_dir: PathBuf,
    /// Store URL: empty for SQLite in `data_dir`, `sqlite://path`, or `postgres://...`.
    pub store: String,
    /// This node's location (Azure region name, or `lat,lon`), for geoLatency allocation.
    pub location: Option<String>,
    /// The instance whose ServiceConfig policies may manage every instance.
    pub admin_instance: String,
    /// Listeners.
    pub listen: Listen,
    /// Server certificate; omitted: the generated development CA and certificate are used.
    pub tls: Option<TlsFiles>,
    /// Logging.
    pub log: Log,
    /// Limits and timeouts.
    pub limits: Limits,
    /// Authentication rules.
    pub auth: Auth,
    /// What outbound calls (webhooks, linked hubs) may reach and read.
    pub outbound: Outbound,
    /// Audit log retention and the sampling of refused attempts.
    pub audit: AuditConfig,
    /// The clean-up of identities devices left behind on hubs.
    pub hub_cleanup: HubCleanupConfig,
    /// This node among the nodes sharing a store: its name, heartbeat and lease.
    pub cluster: ClusterConfig,
    /// Lifecycle events (CloudEvents) through the outbox to the sinks (`docs/events.md`).
    pub events: EventsConfig,
    /// Provisioning instances declared here are created or updated at start.
    #[serde(rename = "instance")]
    pub instances: Vec<InstanceConfig>,
}

/// Listener addresses (port 0 allowed; the bound address is logged and written to `run.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Device API, service API, admin API and MQTT over WebSocket.
    pub https: String,
    /// MQTT over TLS; empty disables it.
    pub mqtt: String,
    /// AMQP 1.0 over TLS; empty disables it. (AMQP over WebSocket is served on `https`.)
    pub amqp: String,
    /// Metrics and health (plain HTTP; keep it on loopback); empty disables it.
    pub admin: String,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            https: "[::]:443".into(),
            mqtt: "[::]:8883".into(),
            amqp: "[::]:5671".into(),
            admin: "127.0.0.1:9090".into(),
        }
    }
}

/// PEM files for the server certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// `human` or `json`.
    pub format: String,
    /// An `EnvFilter` directive (`RUST_LOG` overrides it).
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: "human".into(),
            level: "info".into(),
        }
    }
}

/// Limits and timeouts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// How long a register call waits for the assignment before answering 202 (ms).
    pub register_wait_ms: u64,
    /// Custom allocation webhook timeout (ms).
    pub webhook_timeout_ms: u64,
    /// Registrations in flight on this node before new ones get 429.
    pub max_inflight_registrations: usize,
    /// TLS handshake timeout (ms).
    pub tls_handshake_timeout_ms: u64,
    /// TLS handshakes in progress at once on each listener; connections beyond are closed at
    /// once (the device retries) instead of slowing every handshake down.
    pub max_pending_handshakes: usize,
    /// Maximum request body (bytes).
    pub max_body_bytes: usize,
    /// Concurrent MQTT connections, over TLS and over WebSocket together (beyond: refused).
    pub max_mqtt_connections: usize,
    /// Concurrent AMQP connections, over TLS and over WebSocket together (beyond: refused).
    pub max_amqp_connections: usize,
    /// The AMQP max-frame-size dps announces in OPEN and enforces after it (bytes). Before
    /// OPEN (protocol header, SASL, the device's OPEN) frames are limited to 8 KiB whatever
    /// this says.
    pub amqp_max_frame_bytes: usize,
    /// Time allowed from an AMQP connection's TLS handshake (or WebSocket upgrade) to the end
    /// of OPEN: protocol header, SASL with the credential check (SASL `TPM`: the whole
    /// challenge, the device's TPM work included), OPEN (ms).
    pub amqp_open_timeout_ms: u64,
    /// Concurrent connections on the HTTPS listener (beyond: closed before the TLS handshake).
    pub max_https_connections: usize,
    /// Time allowed for an HTTPS request head: from the end of the TLS handshake for the first
    /// request on a connection, from the head's first byte for the next ones (ms).
    pub http_header_timeout_ms: u64,
    /// A kept-alive HTTPS connection with no request for this long is closed (ms).
    pub http_idle_timeout_ms: u64,
    /// Time allowed for an HTTPS request body after its head, and for a stalled response
    /// write (ms).
    pub http_body_timeout_ms: u64,
    /// Header lines in an HTTPS request head (beyond: 431).
    pub max_header_count: usize,
    /// Bytes of an HTTPS request head, request line included (beyond: 431).
    pub max_header_bytes: usize,
    /// Largest WebSocket message and frame on MQTT over WebSocket (bytes).
    pub ws_max_message_bytes: usize,
    /// A registration still `assigning` this long after it started, with no owning node (written
    /// by a dps from before node heartbeats), is considered interrupted and marked
    /// failed-retryable (ms). Intents with an owner follow the owner's heartbeat (`[cluster]`).
    pub recovery_after_ms: u64,
    /// Refused device attempts written to the audit log per second on this node (burst: ten
    /// times as many); beyond, they are counted in `dps_audit_refusals_dropped_total` and logged
    /// but not stored, so that an unauthenticated flood cannot fill the store. 0: no limit.
    pub refused_audit_per_second: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            register_wait_ms: 2000,
            webhook_timeout_ms: 10_000,
            max_inflight_registrations: 10_000,
            tls_handshake_timeout_ms: 10_000,
            max_pending_handshakes: 8192,
            max_body_bytes: 96 * 1024,
            max_mqtt_connections: 100_000,
            max_amqp_connections: 100_000,
            amqp_max_frame_bytes: 64 * 1024,
            amqp_open_timeout_ms: 10_000,
            max_https_connections: 20_000,
            http_header_timeout_ms: 10_000,
            http_idle_timeout_ms: 60_000,
            http_body_timeout_ms: 30_000,
            max_header_count: 100,
            max_header_bytes: 16 * 1024,
            ws_max_message_bytes: 128 * 1024,
            recovery_after_ms: 60_000,
            refused_audit_per_second: 100,
        }
    }
}

impl Limits {
    /// Check the connection limits: each must be within its range (named in the error).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ranges: [(&str, u64, u64, u64); 13] = [
            (
                "max_amqp_connections",
                self.max_amqp_connections as u64,
                1,
                10_000_000,
            ),
            (
                "amqp_max_frame_bytes",
                self.amqp_max_frame_bytes as u64,
                4096,
                1024 * 1024,
            ),
            (
                "amqp_open_timeout_ms",
                self.amqp_open_timeout_ms,
                100,
                600_000,
            ),
            (
                "tls_handshake_timeout_ms",
                self.tls_handshake_timeout_ms,
                100,
                600_000,
            ),
            (
                "http_header_timeout_ms",
                self.http_header_timeout_ms,
                1,
                600_000,
            ),
            (
                "http_idle_timeout_ms",
                self.http_idle_timeout_ms,
                1,
                86_400_000,
            ),
            (
                "http_body_timeout_ms",
                self.http_body_timeout_ms,
                1,
                600_000,
            ),
            (
                "max_https_connections",
                self.max_https_connections as u64,
                1,
                10_000_000,
            ),
            (
                "max_mqtt_connections",
                self.max_mqtt_connections as u64,
                1,
                10_000_000,
            ),
            (
                "max_pending_handshakes",
                self.max_pending_handshakes as u64,
                1,
                10_000_000,
            ),
            ("max_header_count", self.max_header_count as u64, 16, 1000),
            (
                "max_header_bytes",
                self.max_header_bytes as u64,
                4096,
                1024 * 1024,
            ),
            (
                "ws_max_message_bytes",
                self.ws_max_message_bytes as u64,
                4096,
                64 * 1024 * 1024,
            ),
        ];
        for (key, v, min, max) in ranges {
            if v < min || v > max {
                return Err(ConfigError::Invalid(format!(
                    "limits.{key} = {v} is out of range: it must be between {min} and {max}"
                )));
            }
        }
        self.validate_usable()
    }
}

/// Authentication rules.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// The longest SAS token lifetime accepted, in seconds: a device or service token whose
    /// expiry (`se`) is more than this (plus the 5-minute clock skew) after now is refused with
    /// 401 (`401002`). 0: no limit.
    pub max_token_lifetime_secs: u64,
}

/// Outbound calls: the custom allocation webhook, `webhook` linked hubs, the Azure IoT Hub
/// adapter (see [`crate::outbound`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Outbound {
    /// The most bytes of an answer read; a larger answer fails the call.
    pub max_response_bytes: usize,
    /// May webhook URLs reach loopback and private addresses (127.0.0.0/8, ::1, RFC 1918,
    /// fc00::/7, …)? Link-local and cloud metadata addresses are refused regardless.
    pub allow_private_addresses: bool,
    /// When not empty, the only hosts webhook URLs may name (`*.example.com` for subdomains).
    pub allowed_webhook_hosts: Vec<String>,
}

impl Default for Outbound {
    fn default() -> Self {
        Outbound {
            max_response_bytes: crate::outbound::DEFAULT_MAX_RESPONSE_BYTES,
            allow_private_addresses: false,
            allowed_webhook_hosts: Vec::new(),
        }
    }
}

/// Audit log retention and the sampling of refused device attempts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Entries older than this many days are pruned; 0 keeps them forever.
    pub retention_days: u32,
    /// At most this many entries are kept (the oldest pruned first); 0: no cap.
    pub max_rows: u64,
    /// How often the prune runs (ms).
    pub prune_interval_ms: u64,
    /// Refused device attempts written to the audit log per second per source address (IPv6:
    /// per /64), burst ten times as many; beyond, they are counted in
    /// `dps_audit_refusals_dropped_total{limit="source"}`. 0: no per-source limit.
    pub refused_per_source_per_second: u32,
    /// Source addresses the per-source limit tracks at once; refusals from further sources
    /// are dropped (`limit="node"`) until tracked sources go quiet.
    pub refused_max_sources: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            retention_days: 90,
            max_rows: 1_000_000,
            prune_interval_ms: 60_000,
            refused_per_source_per_second: 1,
            refused_max_sources: 10_000,
        }
    }
}

/// This node among the nodes sharing one store (PostgreSQL): every node keeps a heartbeat row
/// fresh; the intents of a node whose heartbeat has lapsed are taken over by the others.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The node's name in its heartbeat row and intents (a random part is added per run).
    /// Empty: the host name.
    pub node_name: String,
    /// How often the node writes its heartbeat and looks for interrupted work (ms).
    pub heartbeat_ms: u64,
    /// How long a heartbeat holds (ms): a node silent this long counts as dead and its intents
    /// are ended by the others.
    pub lease_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_name: String::new(),
            heartbeat_ms: 1000,
            lease_ms: 5000,
        }
    }
}

impl ClusterConfig {
    /// Check the ranges (named in the error).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(50..=60_000).contains(&self.heartbeat_ms) {
            return Err(invalid(format!(
                "cluster.heartbeat_ms = {} is out of range: it must be between 50 and 60000",
                self.heartbeat_ms
            )));
        }
        if self.lease_ms < 3 * self.heartbeat_ms || self.lease_ms > 600_000 {
            return Err(invalid(format!(
                "cluster.lease_ms = {} is out of range: it must be at least three heartbeats \
                 (3 x cluster.heartbeat_ms = {}) and at most 600000",
                self.lease_ms,
                3 * self.heartbeat_ms
            )));
        }
        if self.node_name.len() > 64
            || !self
                .node_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(format!(
                "cluster.node_name = '{}' must be at most 64 characters of [A-Za-z0-9._-]",
                self.node_name
            )));
        }
        Ok(())
    }

    /// The engine's node settings; an empty name becomes the host name (or `dps`).
    pub fn settings(&self) -> crate::engine::NodeSettings {
        let name = if self.node_name.is_empty() {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| {
                    h.trim()
                        .chars()
                        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                        .take(64)
                        .collect::<String>()
                })
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "dps".into())
        } else {
            self.node_name.clone()
        };
        let run = uuid::Uuid::new_v4().simple().to_string();
        crate::engine::NodeSettings {
            id: format!("{name}-{}", &run[..12]),
            name,
            lease: std::time::Duration::from_millis(self.lease_ms),
        }
    }
}

/// The clean-up of identities devices left behind on hubs (they moved to another hub, changed
/// device id, or their registration was deleted): a durable queue in the store, worked by a
/// background worker on every node, retried with exponential backoff until the hub confirms.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubCleanupConfig {
    /// How often the worker looks for due tasks (ms).
    pub interval_ms: u64,
    /// Delay before the first retry of a failed removal (ms); doubled after each failure.
    pub initial_backoff_ms: u64,
    /// Longest delay between two attempts (ms).
    pub max_backoff_ms: u64,
    /// How long a node holds a task it works on (ms); a task of a node that died is taken over
    /// by another node after this.
    pub lease_ms: u64,
    /// Tasks claimed per pass.
    pub batch: usize,
    /// After this many failed attempts each further failure is logged as an error (the task
    /// stays queued: it is never dropped while its hub is linked).
    pub warn_after_attempts: u32,
}

impl Default for HubCleanupConfig {
    fn default() -> Self {
        HubCleanupConfig {
            interval_ms: 1000,
            initial_backoff_ms: 1000,
            max_backoff_ms: 300_000,
            lease_ms: 120_000,
            batch: 16,
            warn_after_attempts: 10,
        }
    }
}

impl HubCleanupConfig {
    /// Check every value's range (named in the error).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ranges: [(&str, u64, u64, u64); 6] = [
            ("interval_ms", self.interval_ms, 10, 600_000),
            ("initial_backoff_ms", self.initial_backoff_ms, 10, 3_600_000),
            ("max_backoff_ms", self.max_backoff_ms, 10, 86_400_000),
            ("lease_ms", self.lease_ms, 1000, 3_600_000),
            ("batch", self.batch as u64, 1, 1000),
            (
                "warn_after_attempts",
                u64::from(self.warn_after_attempts),
                1,
                1_000_000,
            ),
        ];
        for (key, v, min, max) in ranges {
            if v < min || v > max {
                return Err(invalid(format!(
                    "hub_cleanup.{key} = {v} is out of range: it must be between {min} and {max}"
                )));
            }
        }
        if self.max_backoff_ms < self.initial_backoff_ms {
            return Err(invalid(format!(
                "hub_cleanup.max_backoff_ms = {} is below hub_cleanup.initial_backoff_ms = {}",
                self.max_backoff_ms, self.initial_backoff_ms
            )));
        }
        Ok(())
    }

    /// The engine's settings.
    pub fn settings(&self) -> crate::engine::CleanupSettings {
        crate::engine::CleanupSettings {
            initial_backoff: std::time::Duration::from_millis(self.initial_backoff_ms),
            max_backoff: std::time::Duration::from_millis(self.max_backoff_ms),
            lease: std::time::Duration::from_millis(self.lease_ms),
            batch: self.batch,
            warn_after_attempts: self.warn_after_attempts,
        }
    }
}

/// Lifecycle events: written to an outbox in the store in the same transaction as the change
/// they describe, then delivered at least once to every sink. No sink: nothing is written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Most events kept in the outbox; beyond, the oldest are dropped (counted in
    /// `dps_events_dropped_total{reason="size"}`).
    pub max_outbox_events: u64,
    /// Events older than this (seconds) are dropped undelivered
    /// (`dps_events_dropped_total{reason="age"}`).
    pub max_age_secs: u64,
    /// How often the dispatcher looks for due events when idle (ms).
    pub interval_ms: u64,
    /// Events claimed and delivered per pass.
    pub batch: usize,
    /// How long a node holds the batch it delivers (ms); a batch of a node that died is taken
    /// over after this.
    pub lease_ms: u64,
    /// Delay before the first retry of a failed delivery (ms); doubled after each failure.
    pub initial_backoff_ms: u64,
    /// Longest delay between two attempts (ms).
    pub max_backoff_ms: u64,
    /// After this many failed attempts an event is dead-lettered: removed from the outbox and
    /// counted in `dps_events_dead_lettered_total{sink}`.
    pub max_attempts: u32,
    /// The sinks (`[[events.sink]]`).
    pub sink: Vec<EventSinkConfig>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            max_outbox_events: 100_000,
            max_age_secs: 7 * 86_400,
            interval_ms: 500,
            batch: 64,
            lease_ms: 30_000,
            initial_backoff_ms: 1000,
            max_backoff_ms: 300_000,
            max_attempts: 20,
            sink: Vec::new(),
        }
    }
}

/// The kind of an event sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventSinkKind {
    /// An HTTPS webhook: one POST per event (`application/cloudevents+json`), signed.
    Webhook,
    /// An MQTT broker topic (QoS 1).
    Mqtt,
    /// A NATS subject.
    Nats,
}

impl EventSinkKind {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            EventSinkKind::Webhook => "webhook",
            EventSinkKind::Mqtt => "mqtt",
            EventSinkKind::Nats => "nats",
        }
    }
}

/// One event sink. `Debug` hides the secret and the password.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSinkConfig {
    /// `webhook`, `mqtt` or `nats`.
    pub kind: EventSinkKind,
    /// Webhook: the `https://` URL (`http://` only to a loopback address). MQTT:
    /// `mqtt://host:port` (or `mqtts://`). NATS: `nats://host:port`.
    pub url: String,
    /// Webhook: the HMAC-SHA256 key of the `X-Dps-Signature` header (required).
    #[serde(default)]
    pub secret: Option<String>,
    /// Webhook and `mqtts://`: an extra trusted CA (PEM) for the endpoint.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// MQTT: the topic (events of every type).
    #[serde(default)]
    pub topic: Option<String>,
    /// NATS: the subject.
    #[serde(default)]
    pub subject: Option<String>,
    /// MQTT / NATS user name.
    #[serde(default)]
    pub username: Option<String>,
    /// MQTT / NATS password.
    #[serde(default)]
    pub password: Option<String>,
    /// Timeout of one delivery (ms).
    #[serde(default = "default_sink_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_sink_timeout_ms() -> u64 {
    5000
}

impl std::fmt::Debug for EventSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hide = |o: &Option<String>| o.as_ref().map(|_| dps_core::redact::REDACTED);
        f.debug_struct("EventSinkConfig")
            .field("kind", &self.kind)
            .field("url", &dps_core::redact::scrub(&self.url))
            .field("secret", &hide(&self.secret))
            .field("ca_file", &self.ca_file)
            .field("topic", &self.topic)
            .field("subject", &self.subject)
            .field("username", &self.username)
            .field("password", &hide(&self.password))
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

impl EventsConfig {
    /// Check every value (named in the error).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ranges: [(&str, u64, u64, u64); 8] = [
            (
                "max_outbox_events",
                self.max_outbox_events,
                1,
                1_000_000_000,
            ),
            ("max_age_secs", self.max_age_secs, 60, 365 * 86_400),
            ("interval_ms", self.interval_ms, 10, 600_000),
            ("batch", self.batch as u64, 1, 1000),
            ("lease_ms", self.lease_ms, 1000, 3_600_000),
            ("initial_backoff_ms", self.initial_backoff_ms, 10, 3_600_000),
            ("max_backoff_ms", self.max_backoff_ms, 10, 86_400_000),
            ("max_attempts", u64::from(self.max_attempts), 1, 1_000_000),
        ];
        for (key, v, min, max) in ranges {
            if v < min || v > max {
                return Err(invalid(format!(
                    "events.{key} = {v} is out of range: it must be between {min} and {max}"
                )));
            }
        }
        for (i, s) in self.sink.iter().enumerate() {
            let what = format!("events.sink[{i}] ({})", s.kind.as_str());
            let need = |o: &Option<String>, key: &str| match o.as_deref() {
                Some(v) if !v.is_empty() => Ok(()),
                _ => Err(invalid(format!("{what}: '{key}' is required"))),
            };
            let scheme = s.url.split("://").next().unwrap_or("");
            match s.kind {
                EventSinkKind::Webhook => {
                    need(&s.secret, "secret")?;
                    let url = reqwest::Url::parse(&s.url)
                        .map_err(|e| invalid(format!("{what}: url '{}': {e}", s.url)))?;
                    let host = url.host_str().unwrap_or("");
                    let loopback = host == "localhost"
                        || host
                            .trim_matches(['[', ']'])
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|a| a.is_loopback());
                    if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
                        return Err(invalid(format!(
                            "{what}: url must be https:// (http:// only to a loopback address)"
                        )));
                    }
                }
                EventSinkKind::Mqtt => {
                    need(&s.topic, "topic")?;
                    if !matches!(scheme, "mqtt" | "mqtts") {
                        return Err(invalid(format!("{what}: url must be mqtt:// or mqtts://")));
                    }
                }
                EventSinkKind::Nats => {
                    need(&s.subject, "subject")?;
                    if scheme != "nats" {
                        return Err(invalid(format!("{what}: url must be nats://")));
                    }
                }
            }
            if !(100..=120_000).contains(&s.timeout_ms) {
                return Err(invalid(format!(
                    "{what}: timeout_ms = {} must be between 100 and 120000",
                    s.timeout_ms
                )));
            }
        }
        Ok(())
    }
}

/// An access policy in the config (keys generated when omitted, and kept). `Debug` hides the
/// keys.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Name.
    pub name: String,
    /// Base64 key.
    #[serde(default)]
    pub primary_key: Option<String>,
    /// Base64 key.
    #[serde(default)]
    pub secondary_key: Option<String>,
    /// Rights.
    pub rights: Vec<Right>,
}

impl std::fmt::Debug for PolicyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyConfig")
            .field("name", &self.name)
            .field("rights", &self.rights)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("store", &dps_core::redact::scrub(&self.store))
            .field("location", &self.location)
            .field("admin_instance", &self.admin_instance)
            .field("listen", &self.listen)
            .field("tls", &self.tls)
            .field("log", &self.log)
            .field("limits", &self.limits)
            .field("auth", &self.auth)
            .field("outbound", &self.outbound)
            .field("audit", &self.audit)
            .field("hub_cleanup", &self.hub_cleanup)
            .field("cluster", &self.cluster)
            .field("events", &self.events)
            .field("instances", &self.instances)
            .finish()
    }
}

/// A provisioning instance in the config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// Name.
    pub name: String,
    /// ID scope (generated and kept when omitted).
    #[serde(default)]
    pub id_scope: Option<String>,
    /// Service-API host names.
    #[serde(default)]
    pub hostnames: Option<Vec<String>>,
    /// Access policies (a `provisioningserviceowner` with every right when none is given).
    #[serde(default)]
    pub access_policy: Vec<PolicyConfig>,
    /// Linked hubs.
    #[serde(default)]
    pub linked_hub: Vec<LinkedHub>,
    /// Default allocation policy.
    #[serde(default)]
    pub allocation_policy: AllocationPolicy,
    /// `accepted` (202, Azure's behaviour) or `immediate` (200 when done).
    #[serde(default)]
    pub register_response: RegisterResponse,
    /// Whether this instance accepts fault injection rules (here and through the admin API).
    /// Only settable in this file: never set it on a production instance.
    #[serde(default)]
    pub allow_fault_injection: bool,
    /// Fault injection rules (`docs/testing-with-dps.md`); need `allow_fault_injection`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fault: Vec<dps_core::fault::FaultRule>,
    /// Credential policies (certificate issuance: the CAs that sign devices' CSRs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credential_policy: Vec<dps_core::issuance::CredentialPolicy>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./dps-data"),
            store: String::new(),
            location: None,
            admin_instance: "default".into(),
            listen: Listen::default(),
            tls: None,
            log: Log::default(),
            limits: Limits::default(),
            auth: Auth::default(),
            outbound: Outbound::default(),
            audit: AuditConfig::default(),
            hub_cleanup: HubCleanupConfig::default(),
            cluster: ClusterConfig::default(),
            events: EventsConfig::default(),
            instances: Vec::new(),
        }
    }
}

/// Command-line overrides (highest precedence).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    /// `--data-dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// `--store`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// `--location`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Listener overrides.
    #[serde(skip_serializing_if = "ListenOverrides::is_empty")]
    pub listen: ListenOverrides,
    /// `--log-format`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<LogOverride>,
}

/// Listener overrides.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ListenOverrides {
    /// `--https`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https: Option<String>,
    /// `--mqtt`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<String>,
    /// `--amqp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp: Option<String>,
    /// `--admin`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
}

impl ListenOverrides {
    fn is_empty(&self) -> bool {
        self.https.is_none() && self.mqtt.is_none() && self.amqp.is_none() && self.admin.is_none()
    }
}

/// Log override.
#[derive(Debug, Clone, Serialize)]
pub struct LogOverride {
    /// Format.
    pub format: String,
}

/// A configuration error, naming the key, file or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file does not exist.
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    /// A key has a wrong value or is unknown.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

const ENV_KEYS: &[&str] = &[
    "data_dir",
    "store",
    "location",
    "admin_instance",
    "listen",
    "tls",
    "log",
    "limits",
    "auth",
    "outbound",
    "audit",
    "hub_cleanup",
    "cluster",
    "events",
];

impl Config {
    /// Load: defaults, then `file`, then `DPS_*` env, then `overrides`; then resolve relative
    /// paths against the file's folder and validate.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = file {
            if !f.exists() {
                return Err(ConfigError::MissingFile(f.to_path_buf()));
            }
            fig = fig.merge(Toml::file_exact(f));
        }
        fig = fig.merge(Env::prefixed("DPS_").split("__").filter(|k| {
            // Only our config keys: DPS_CONNECTION_STRING, DPS_URL, ... belong to the CLI.
            let top = k
                .as_str()
                .split("__")
                .next()
                .unwrap_or("")
                .split('.')
                .next()
                .unwrap_or("");
            ENV_KEYS.iter().any(|e| top.eq_ignore_ascii_case(e))
        }));
        fig = fig.merge(Serialized::defaults(overrides));
        let mut cfg: Config = fig
            .extract()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(f) = file {
            let base = f.parent().map(Path::to_path_buf).unwrap_or_default();
            let base = if base.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                base
            };
            let resolve = |p: &Path| {
                if p.is_relative() {
                    base.join(p)
                } else {
                    p.to_path_buf()
                }
            };
            // A data dir given on the command line is relative to the working directory.
            if overrides.data_dir.is_none() {
                cfg.data_dir = resolve(&cfg.data_dir);
            }
            if let Some(t) = &mut cfg.tls {
                t.cert = resolve(&t.cert);
                t.key = resolve(&t.key);
            }
            for sink in &mut cfg.events.sink {
                if let Some(f) = &mut sink.ca_file {
                    *f = resolve(f);
                }
            }
            for i in &mut cfg.instances {
                for p in &mut i.credential_policy {
                    for f in [
                        &mut p.ca_certificate_file,
                        &mut p.ca_key_file,
                        &mut p.ca_chain_file,
                    ]
                    .into_iter()
                    .flatten()
                    {
                        *f = resolve(Path::new(f.as_str())).display().to_string();
                    }
                }
            }
            if let Some(p) = cfg.store.strip_prefix("sqlite://") {
                if Path::new(p).is_relative() {
                    cfg.store = format!("sqlite://{}", base.join(p).display());
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.log.format.as_str(), "human" | "json") {
            return Err(ConfigError::Invalid(format!(
                "log.format must be 'human' or 'json', not '{}'",
                self.log.format
            )));
        }
        for (key, v) in [
            ("listen.https", &self.listen.https),
            ("listen.mqtt", &self.listen.mqtt),
            ("listen.amqp", &self.listen.amqp),
            ("listen.admin", &self.listen.admin),
        ] {
            if key != "listen.https" && v.is_empty() {
                continue;
            }
            if v.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::Invalid(format!(
                    "{key} = '{v}' is not a socket address like '[::]:443' or '127.0.0.1:0'"
                )));
            }
        }
        if let Some(t) = &self.tls {
            for (key, p) in [("tls.cert", &t.cert), ("tls.key", &t.key)] {
                if !p.exists() {
                    return Err(ConfigError::Invalid(format!(
                        "{key}: file {} does not exist",
                        p.display()
                    )));
                }
            }
        }
        self.validate_globals()?;
        self.limits.validate()?;
        self.outbound.validate()?;
        self.hub_cleanup.validate()?;
        self.cluster.validate()?;
        self.events.validate()?;
        let policy = crate::outbound::Policy::new(
            self.outbound.allow_private_addresses,
            &self.outbound.allowed_webhook_hosts,
        );
        if self.audit.prune_interval_ms < 1000 {
            return Err(ConfigError::Invalid(format!(
                "audit.prune_interval_ms = {} is below 1000",
                self.audit.prune_interval_ms
            )));
        }
        if self.audit.refused_max_sources == 0 {
            return Err(ConfigError::Invalid(
                "audit.refused_max_sources must be at least 1".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, inst) in self.instances.iter().enumerate() {
            if !seen.insert(inst.name.to_ascii_lowercase()) {
                return Err(ConfigError::Invalid(format!(
                    "instance[{i}]: duplicate instance name '{}'",
                    inst.name
                )));
            }
            inst.validate(i, &policy)?;
            for p in &inst.access_policy {
                for (k, key) in [
                    ("primary_key", &p.primary_key),
                    ("secondary_key", &p.secondary_key),
                ] {
                    if let Some(key) = key {
                        if !dps_core::sas::valid_key(key) {
                            return Err(ConfigError::Invalid(format!(
                                "instance '{}': access_policy '{}': {k} must be base64 of 16 to 64 bytes",
                                inst.name, p.name
                            )));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

impl Config {
    /// The top-level values: `data_dir`, `store`, `location`, `admin_instance`.
    fn validate_globals(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir must not be empty"));
        }
        dps_store::parse_target(&self.store, &self.data_dir)
            .map_err(|e| invalid(format!("store: {e}")))?;
        if let Some(loc) = &self.location {
            let known = dps_core::allocation::region_coordinates(loc).is_some_and(|(lat, lon)| {
                (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon)
            });
            if !known {
                return Err(invalid(format!(
                    "location = '{loc}' is neither a known Azure region name (e.g. 'westeurope') \
                     nor 'latitude,longitude'"
                )));
            }
        }
        dps_core::ids::InstanceName::parse(&self.admin_instance)
            .map_err(|e| invalid(format!("admin_instance: {e}")))?;
        Ok(())
    }
}

impl Limits {
    /// Every other limit must be usable: no zero timeouts or capacities.
    fn validate_usable(&self) -> Result<(), ConfigError> {
        let ms = |key: &str, v: u64, min: u64, max: u64| {
            if (min..=max).contains(&v) {
                Ok(())
            } else {
                Err(invalid(format!(
                    "limits.{key} = {v} must be between {min} and {max} (milliseconds)"
                )))
            }
        };
        ms("register_wait_ms", self.register_wait_ms, 0, 60_000)?;
        ms("webhook_timeout_ms", self.webhook_timeout_ms, 100, 120_000)?;
        ms(
            "tls_handshake_timeout_ms",
            self.tls_handshake_timeout_ms,
            100,
            600_000,
        )?;
        ms(
            "recovery_after_ms",
            self.recovery_after_ms,
            1_000,
            86_400_000,
        )?;
        for (key, v) in [
            (
                "max_inflight_registrations",
                self.max_inflight_registrations,
            ),
            ("max_pending_handshakes", self.max_pending_handshakes),
            ("max_mqtt_connections", self.max_mqtt_connections),
        ] {
            if v == 0 {
                return Err(invalid(format!("limits.{key} must be at least 1")));
            }
        }
        if self.max_body_bytes < 1024 {
            return Err(invalid(format!(
                "limits.max_body_bytes = {} must be at least 1024",
                self.max_body_bytes
            )));
        }
        Ok(())
    }
}

impl Outbound {
    /// The limit must be usable; allowed hosts must be host names (`*.` prefix allowed).
    fn validate(&self) -> Result<(), ConfigError> {
        const MAX: usize = 256 * 1024 * 1024;
        if !(1024..=MAX).contains(&self.max_response_bytes) {
            return Err(invalid(format!(
                "outbound.max_response_bytes = {} must be between 1024 and {MAX}",
                self.max_response_bytes
            )));
        }
        for h in &self.allowed_webhook_hosts {
            let name = h.strip_prefix("*.").unwrap_or(h);
            let ok = !name.is_empty()
                && !name.contains(['*', '/', '@', '?', '#'])
                && !name.chars().any(char::is_whitespace)
                && (name.parse::<std::net::IpAddr>().is_ok() || !name.contains(':'));
            if !ok {
                return Err(invalid(format!(
                    "outbound.allowed_webhook_hosts: '{h}' is not a host name \
                     (write 'hooks.example.com' or '*.example.com', no scheme, port or path)"
                )));
            }
        }
        Ok(())
    }
}

impl InstanceConfig {
    /// The instance's own values and its linked hubs (`policy`: the outbound policy their
    /// URLs must follow).
    fn validate(&self, i: usize, policy: &crate::outbound::Policy) -> Result<(), ConfigError> {
        dps_core::ids::InstanceName::parse(&self.name)
            .map_err(|e| invalid(format!("instance[{i}].name: {e}")))?;
        let at = |what: String| invalid(format!("instance '{}': {what}", self.name));
        if let Some(scope) = &self.id_scope {
            dps_core::ids::IdScope::parse(scope).map_err(|e| at(format!("id_scope: {e}")))?;
        }
        if let Some(hosts) = &self.hostnames {
            if hosts.is_empty() || hosts.iter().any(|h| h.trim().is_empty()) {
                return Err(at(
                    "hostnames must list at least one non-empty host name".into()
                ));
            }
        }
        if self.allocation_policy == AllocationPolicy::Custom {
            return Err(at(
                "allocation_policy 'custom' cannot be an instance default (it needs an \
                 enrollment's customAllocationDefinition)"
                    .into(),
            ));
        }
        for p in &self.access_policy {
            if p.name.trim().is_empty() {
                return Err(at("access_policy: name must not be empty".into()));
            }
        }
        let mut names = std::collections::HashSet::new();
        for p in &self.credential_policy {
            p.check().map_err(&at)?;
            if !names.insert(p.name.to_ascii_lowercase()) {
                return Err(at(format!(
                    "credential_policy '{}': duplicate name",
                    p.name
                )));
            }
        }
        let mut hosts = std::collections::HashSet::new();
        for h in &self.linked_hub {
            let hub = |what: String| at(format!("linked_hub '{}': {what}", h.host));
            dps_core::ids::HubHost::parse(&h.host)
                .map_err(|e| at(format!("linked_hub host: {e}")))?;
            if !hosts.insert(h.host.to_ascii_lowercase()) {
                return Err(hub("duplicate host".into()));
            }
            if !(1..=1000).contains(&h.allocation_weight) {
                return Err(hub("allocation_weight must be 1 to 1000".into()));
            }
            match h.kind {
                dps_core::instance::HubKind::AzureIotHub => {
                    let cs = h
                        .connection_string
                        .as_deref()
                        .ok_or_else(|| hub("connection_string is required".into()))?;
                    crate::hubs::azure::HubConnectionString::parse(cs)
                        .map_err(|e| hub(format!("connection_string: {e}")))?;
                }
                dps_core::instance::HubKind::Webhook if h.connection_string.is_none() => {
                    return Err(hub("connection_string (the webhook URL) is required".into()));
                }
                dps_core::instance::HubKind::Mosquitto => {
                    let cs = h
                        .connection_string
                        .as_deref()
                        .ok_or_else(|| hub("connection_string is required".into()))?;
                    reqwest::Url::parse(cs)
                        .map_err(|e| hub(format!("connection_string is not a URL: {e}")))?;
                }
                _ => {}
            }
            policy.check_linked_hub(h).map_err(at)?;
        }
        if !self.fault.is_empty() && !self.allow_fault_injection {
            return Err(at(
                "fault: fault injection rules need allow_fault_injection = true on the instance"
                    .into(),
            ));
        }
        let mut ids = std::collections::HashSet::new();
        for (n, r) in self.fault.iter().enumerate() {
            let r = r
                .clone()
                .validated()
                .map_err(|e| at(format!("fault[{n}]: {e}")))?;
            if !r.id.is_empty() && !ids.insert(r.id.clone()) {
                return Err(at(format!("fault[{n}]: duplicate id '{}'", r.id)));
            }
        }
        Ok(())
    }
}

impl InstanceConfig {
    /// Merge with the stored instance (keys and scope generated earlier are kept).
    pub fn resolve(&self, stored: Option<&Instance>) -> Instance {
        let id_scope = self
            .id_scope
            .clone()
            .or_else(|| stored.map(|s| s.id_scope.clone()))
            .unwrap_or_else(|| dps_core::ids::IdScope::generate().to_string());
        let mut policies: Vec<AccessPolicy> = self
            .access_policy
            .iter()
            .map(|p| {
                let old = stored.and_then(|s| s.policy(&p.name));
                AccessPolicy {
                    name: p.name.clone(),
                    primary_key: p
                        .primary_key
                        .clone()
                        .or_else(|| old.map(|o| o.primary_key.clone()))
                        .unwrap_or_else(dps_core::sas::generate_key),
                    secondary_key: p
                        .secondary_key
                        .clone()
                        .or_else(|| old.map(|o| o.secondary_key.clone()))
                        .unwrap_or_else(dps_core::sas::generate_key),
                    rights: p.rights.clone(),
                }
            })
            .collect();
        if policies.is_empty() {
            policies = stored
                .map(|s| s.access_policy.clone())
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| vec![AccessPolicy::owner("provisioningserviceowner")]);
        }
        Instance {
            name: self.name.clone(),
            id_scope,
            hostnames: self
                .hostnames
                .clone()
                .or_else(|| stored.map(|s| s.hostnames.clone()))
                .unwrap_or_else(|| vec!["localhost".into()]),
            access_policy: policies,
            linked_hub: self.linked_hub.clone(),
            allocation_policy: self.allocation_policy,
            register_response: self.register_response,
            credential_policy: self.credential_policy.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_complete_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/dps.example.toml");
        let text = std::fs::read_to_string(&path).expect("example config exists");
        let cfg: Config = toml_parse(&text);
        assert_eq!(cfg.instances.len(), 3);
        assert_eq!(cfg.instances[0].linked_hub.len(), 2);
        assert!(!cfg.instances[0].allow_fault_injection);
        assert!(cfg.instances[2].allow_fault_injection);
        assert_eq!(cfg.instances[2].fault.len(), 6);
        for r in &cfg.instances[2].fault {
            r.clone()
                .validated()
                .expect("the example's rules are valid");
        }
        assert_eq!(
            cfg.instances[2].fault[4].stage,
            Some(dps_core::fault::FaultStage::Subscribe)
        );
        assert_eq!(cfg.listen.https, "[::]:443");
        assert_eq!(cfg.auth.max_token_lifetime_secs, 0);
        assert_eq!(cfg.outbound.max_response_bytes, 1_048_576);
        assert!(!cfg.outbound.allow_private_addresses);
        assert_eq!(cfg.hub_cleanup.max_backoff_ms, 300_000);
        cfg.validate().expect("every value of the example is valid");
    }

    #[test]
    fn the_hub_cleanup_section_has_validated_defaults() {
        let d = Config::default();
        d.hub_cleanup.validate().expect("defaults are valid");
        assert_eq!(d.hub_cleanup.initial_backoff_ms, 1000);
        let s = d.hub_cleanup.settings();
        assert_eq!(s.backoff(20), std::time::Duration::from_secs(300));
        let cfg = toml_parse(
            "[hub_cleanup]\ninterval_ms = 50\ninitial_backoff_ms = 100\nmax_backoff_ms = 400\n",
        );
        cfg.hub_cleanup
            .validate()
            .expect("small values for tests are valid");
        for (text, key) in [
            (
                "[hub_cleanup]\ninterval_ms = 0\n",
                "hub_cleanup.interval_ms",
            ),
            ("[hub_cleanup]\nbatch = 0\n", "hub_cleanup.batch"),
            ("[hub_cleanup]\nlease_ms = 10\n", "hub_cleanup.lease_ms"),
            (
                "[hub_cleanup]\ninitial_backoff_ms = 5000\nmax_backoff_ms = 1000\n",
                "hub_cleanup.max_backoff_ms",
            ),
        ] {
            let err = toml_parse(text).validate().unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn the_auth_section_parses_and_defaults_to_no_lifetime_limit() {
        assert_eq!(Config::default().auth.max_token_lifetime_secs, 0);
        let cfg = toml_parse("[auth]\nmax_token_lifetime_secs = 3600\n");
        assert_eq!(cfg.auth.max_token_lifetime_secs, 3600);
        let err = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("[auth]\nmax_lifetime = 1\n"))
            .extract::<Config>()
            .unwrap_err();
        assert!(err.to_string().contains("max_lifetime"), "{err}");
    }

    fn toml_parse(text: &str) -> Config {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .expect("valid config")
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("[listen]\nhttp = \"x\"\n"))
            .extract::<Config>()
            .unwrap_err();
        assert!(err.to_string().contains("http"), "{err}");
    }

    #[test]
    fn an_unknown_hub_kind_names_the_hub_and_the_known_kinds() {
        let err = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(
                "[[instance]]\nname = \"default\"\n[[instance.linked_hub]]\nhost = \"h\"\nkind = \"x\"\n",
            ))
            .extract::<Config>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "linked hub 'h': unknown kind 'x' (known: registry, mosquitto, azure-iothub, webhook, broker-auth)"
            ),
            "{err}"
        );
    }

    #[test]
    fn bad_listen_address_names_the_key() {
        let cfg = Config {
            listen: Listen {
                https: "nope".into(),
                ..Listen::default()
            },
            ..Config::default()
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("listen.https"), "{e}");
    }

    #[test]
    fn out_of_range_limits_name_the_key() {
        for (key, set) in [
            (
                "http_header_timeout_ms",
                (|l: &mut Limits| l.http_header_timeout_ms = 0) as fn(&mut Limits),
            ),
            ("http_idle_timeout_ms", |l| l.http_idle_timeout_ms = 0),
            ("http_body_timeout_ms", |l| l.http_body_timeout_ms = 0),
            ("max_https_connections", |l| l.max_https_connections = 0),
            ("max_header_count", |l| l.max_header_count = 5000),
            ("max_header_bytes", |l| l.max_header_bytes = 100),
            ("ws_max_message_bytes", |l| l.ws_max_message_bytes = 1 << 30),
            ("max_amqp_connections", |l| l.max_amqp_connections = 0),
            ("amqp_max_frame_bytes", |l| l.amqp_max_frame_bytes = 100),
            ("amqp_open_timeout_ms", |l| l.amqp_open_timeout_ms = 0),
        ] {
            let mut cfg = Config::default();
            set(&mut cfg.limits);
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("limits.{key}")), "{key}: {e}");
        }
        Config::default()
            .validate()
            .expect("the defaults are valid");
    }

    #[test]
    fn missing_file_is_named() {
        let e = Config::load(
            Some(Path::new("/nonexistent/dps.toml")),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/dps.toml"), "{e}");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        // In a Jail: tests that read the process environment must not run beside the one that
        // sets DPS_* variables.
        figment::Jail::expect_with(|_jail| {
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("dps.toml");
            std::fs::write(
                &f,
                "data_dir = \"data\"\n[listen]\nhttps = \"127.0.0.1:0\"\n",
            )
            .unwrap();
            let cfg = Config::load(Some(&f), &Overrides::default()).unwrap();
            assert_eq!(cfg.data_dir, dir.path().join("data"));
            Ok(())
        });
    }

    #[test]
    fn dps_environment_variables_override_the_file() {
        // Figment's Jail isolates the process environment for this test.
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "dps.toml",
                "data_dir = \"from-file\"\n[listen]\nhttps = \"127.0.0.1:1\"\n",
            )?;
            jail.set_env("DPS_DATA_DIR", "/tmp/from-env");
            jail.set_env("DPS_LISTEN__HTTPS", "127.0.0.1:0");
            jail.set_env("DPS_CONNECTION_STRING", "HostName=x");
            let cfg = Config::load(Some(Path::new("dps.toml")), &Overrides::default())
                .expect("config loads");
            assert_eq!(cfg.data_dir, PathBuf::from("/tmp/from-env"));
            assert_eq!(cfg.listen.https, "127.0.0.1:0");
            Ok(())
        });
    }

    #[test]
    fn bad_policy_key_is_named() {
        let cfg = Config {
            instances: vec![InstanceConfig {
                name: "a".into(),
                id_scope: None,
                hostnames: None,
                access_policy: vec![PolicyConfig {
                    name: "p".into(),
                    primary_key: Some("not base64!".into()),
                    secondary_key: None,
                    rights: vec![],
                }],
                linked_hub: vec![],
                allocation_policy: AllocationPolicy::Hashed,
                register_response: RegisterResponse::Accepted,
                allow_fault_injection: false,
                fault: vec![],
                credential_policy: Vec::new(),
            }],
            ..Config::default()
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("primary_key") && e.contains("'p'"), "{e}");
    }

    /// One bad value of each class: the error names its key.
    #[test]
    fn every_class_of_bad_value_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let base = || Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let hub = |kind: &str, cs: Option<&str>| -> LinkedHub {
            let mut v = serde_json::json!({"host": "hub-1.example.net", "kind": kind});
            if let Some(cs) = cs {
                v["connection_string"] = cs.into();
            }
            serde_json::from_value(v).unwrap()
        };
        let inst = |f: &dyn Fn(&mut InstanceConfig)| {
            let mut i = InstanceConfig {
                name: "default".into(),
                id_scope: None,
                hostnames: None,
                access_policy: vec![],
                linked_hub: vec![],
                allocation_policy: AllocationPolicy::Hashed,
                register_response: RegisterResponse::Accepted,
                allow_fault_injection: false,
                fault: vec![],
                credential_policy: Vec::new(),
            };
            f(&mut i);
            Config {
                instances: vec![i],
                ..base()
            }
        };
        let cases: Vec<(Config, &str)> = vec![
            (
                Config {
                    data_dir: PathBuf::new(),
                    ..base()
                },
                "data_dir",
            ),
            (
                Config {
                    store: "mysql://h/db".into(),
                    ..base()
                },
                "store",
            ),
            (
                Config {
                    store: "sqlite://?x=1".into(),
                    ..base()
                },
                "store",
            ),
            (
                Config {
                    location: Some("atlantis".into()),
                    ..base()
                },
                "location",
            ),
            (
                Config {
                    location: Some("91,0".into()),
                    ..base()
                },
                "location",
            ),
            (
                Config {
                    admin_instance: "".into(),
                    ..base()
                },
                "admin_instance",
            ),
            (
                Config {
                    log: Log {
                        format: "xml".into(),
                        ..Log::default()
                    },
                    ..base()
                },
                "log.format",
            ),
            (
                Config {
                    limits: Limits {
                        webhook_timeout_ms: 0,
                        ..Limits::default()
                    },
                    ..base()
                },
                "limits.webhook_timeout_ms",
            ),
            (
                Config {
                    limits: Limits {
                        register_wait_ms: 3_600_000,
                        ..Limits::default()
                    },
                    ..base()
                },
                "limits.register_wait_ms",
            ),
            (
                Config {
                    limits: Limits {
                        tls_handshake_timeout_ms: 0,
                        ..Limits::default()
                    },
                    ..base()
                },
                "limits.tls_handshake_timeout_ms",
            ),
            (
                Config {
                    limits: Limits {
                        recovery_after_ms: 0,
                        ..Limits::default()
                    },
                    ..base()
                },
                "limits.recovery_after_ms",
            ),
            (
                Config {
                    limits: Limits {
                        max_inflight_registrations: 0,
                        ..Limits::default()
                    },
                    ..base()
                },
                "limits.max_inflight_registrations",
            ),
            (
                Config {
                    limits: Limits {
                        max_pending_handshakes: 0,
                        ..Limits::default()
                    },
                    ..base()
                },
                "limits.max_pending_handshakes",
            ),
            (
                Config {
                    limits: Limits {
                        max_mqtt_connections: 0,
                        ..Limits::default()
                    },
                    ..base()
                },
                "limits.max_mqtt_connections",
            ),
            (
                Config {
                    limits: Limits {
                        max_body_bytes: 10,
                        ..Limits::default()
                    },
                    ..base()
                },
                "limits.max_body_bytes",
            ),
            (
                Config {
                    outbound: Outbound {
                        max_response_bytes: 0,
                        ..Outbound::default()
                    },
                    ..base()
                },
                "outbound.max_response_bytes",
            ),
            (
                Config {
                    outbound: Outbound {
                        allowed_webhook_hosts: vec!["https://x.example/".into()],
                        ..Outbound::default()
                    },
                    ..base()
                },
                "outbound.allowed_webhook_hosts",
            ),
            (
                Config {
                    outbound: Outbound {
                        allowed_webhook_hosts: vec!["a.*.example".into()],
                        ..Outbound::default()
                    },
                    ..base()
                },
                "outbound.allowed_webhook_hosts",
            ),
            (inst(&|i| i.name = "bad name!".into()), "instance[0].name"),
            (
                inst(&|i| i.id_scope = Some("not-a-scope".into())),
                "id_scope",
            ),
            (inst(&|i| i.hostnames = Some(vec![])), "hostnames"),
            (
                inst(&|i| i.allocation_policy = AllocationPolicy::Custom),
                "allocation_policy",
            ),
            (
                inst(&|i| i.linked_hub = vec![hub("registry", None), hub("registry", None)]),
                "duplicate host",
            ),
            (
                inst(&|i| {
                    let mut h = hub("registry", None);
                    h.allocation_weight = 0;
                    i.linked_hub = vec![h]
                }),
                "allocation_weight",
            ),
            (
                inst(&|i| i.linked_hub = vec![hub("azure-iothub", None)]),
                "connection_string is required",
            ),
            (
                inst(&|i| {
                    i.linked_hub = vec![hub(
                        "azure-iothub",
                        Some("HostName=h;SharedAccessKeyName=p;SharedAccessKey= %%"),
                    )]
                }),
                "connection_string: SharedAccessKey",
            ),
            (
                inst(&|i| i.linked_hub = vec![hub("webhook", None)]),
                "connection_string (the webhook URL)",
            ),
            (
                inst(&|i| i.linked_hub = vec![hub("webhook", Some("http://169.254.169.254/"))]),
                "metadata",
            ),
            (
                inst(&|i| i.linked_hub = vec![hub("webhook", Some("http://127.0.0.1:9/hook"))]),
                "allow_private_addresses",
            ),
            (
                inst(&|i| i.linked_hub = vec![hub("mosquitto", Some("not a url"))]),
                "connection_string is not a URL",
            ),
        ];
        for (cfg, key) in cases {
            let e = cfg.validate().expect_err(key).to_string();
            assert!(e.contains(key), "expected the error to name '{key}': {e}");
        }
        // The defaults, and the values beside each bad one, are valid.
        base().validate().unwrap();
        inst(&|i| {
            i.linked_hub = vec![hub(
                "azure-iothub",
                Some(
                    "HostName=h.azure-devices.net;SharedAccessKeyName=p;SharedAccessKey= c2VjcmV0 ",
                ),
            )]
        })
        .validate()
        .unwrap();
        let mut ok =
            inst(&|i| i.linked_hub = vec![hub("webhook", Some("http://127.0.0.1:9/hook"))]);
        ok.outbound.allow_private_addresses = true;
        ok.location = Some("47.6, -122.3".into());
        ok.validate().unwrap();
    }
}

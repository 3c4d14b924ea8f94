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
    /// Audit log retention and the sampling of refused attempts.
    pub audit: AuditConfig,
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
    /// Metrics and health (plain HTTP; keep it on loopback); empty disables it.
    pub admin: String,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            https: "[::]:443".into(),
            mqtt: "[::]:8883".into(),
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
    /// Concurrent MQTT connections (beyond: refused).
    pub max_mqtt_connections: usize,
    /// A registration still `assigning` this long after it started is considered interrupted
    /// (crash) and marked failed-retryable (ms).
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
            recovery_after_ms: 60_000,
            refused_audit_per_second: 100,
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
            .field("audit", &self.audit)
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
            audit: AuditConfig::default(),
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
    /// `--admin`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
}

impl ListenOverrides {
    fn is_empty(&self) -> bool {
        self.https.is_none() && self.mqtt.is_none() && self.admin.is_none()
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
    "audit",
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
        assert_eq!(cfg.instances.len(), 2);
        assert_eq!(cfg.instances[0].linked_hub.len(), 2);
        assert_eq!(cfg.listen.https, "[::]:443");
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
                "linked hub 'h': unknown kind 'x' (known: registry, mosquitto, azure-iothub, webhook)"
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
            }],
            ..Config::default()
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("primary_key") && e.contains("'p'"), "{e}");
    }
}

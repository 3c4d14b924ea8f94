//! Brokers that ask dps (`kind = "broker-auth"`): an MQTT broker delegates authentication and
//! authorization to dps over HTTP and keeps no per-device state.
//!
//! The identities live in dps's own store exactly as for the built-in registry (this adapter
//! wraps [`RegistryHub`]: same `HubDevice` documents, same twin, identity and registration
//! committed in one transaction). What the broker asks is answered by
//! [`crate::broker_auth_api`] (the HTTPS front end) from an
//! in-memory [`AuthCache`] of per-device facts (enabled, the SHA-256 of the expected password,
//! certificate login allowed), filled from the store on a miss and invalidated on every identity
//! write, enable/disable and delete made through this node.
//!
//! The rules are the Mosquitto adapter's (`hubs/mosquitto.rs`):
//!
//! * username = client id = device id;
//! * password = [`derive_password`]`(primaryKey, deviceId)` (`password_mode = "derived"`, the
//!   default) or the primary key itself (`password_mode = "primaryKey"`); X.509 devices log in
//!   with their certificate (the broker verifies it; username = certificate CN = device id) and
//!   no password;
//! * a device may publish, subscribe and receive on `{topic_prefix}/{deviceId}` and below only
//!   (default prefix `devices`), and may not publish to `{topic_prefix}/{deviceId}/twin/desired`;
//! * a disabled or deleted device is refused at once.
//!
//! Settings (`options`): `auth_secret` (required, at least 16 characters: what the broker
//! presents, as `Authorization: Bearer <secret>` or HTTP basic auth with the secret as password),
//! `previous_auth_secret` (also accepted, for rotation), `topic_prefix`, `password_mode`,
//! `cache_ttl_ms` (default 30000), `negative_cache_ttl_ms` (default 2000), `cache_max_entries`
//! (default 200000), `rabbitmq_vhost` (default `/`), `rabbitmq_exchange` (default `amq.topic`).
//! See docs/linked-hubs.md.

use super::opt_str;
use super::registry::{RegistryHub, StoredHubDevice};
use dps_core::hub::{HubAdapter, HubError, HubIdentity};
use dps_core::instance::LinkedHub;
use dps_core::model::TwinState;
use dps_core::store::{Collection, Store, Write};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

pub use super::mosquitto::derive_password;

/// How long an identity write staged for the engine's transaction keeps the cache from storing
/// an older version of that device (see [`AuthCache::load`]).
const PENDING_FOR: Duration = Duration::from_secs(30);

/// Parsed settings of a broker-auth hub.
#[derive(Clone)]
pub struct Settings {
    /// SHA-256 of every accepted broker secret.
    secrets: Vec<[u8; 32]>,
    /// Topic prefix (no leading or trailing `/`).
    pub topic_prefix: String,
    /// `password_mode = "derived"` (default) or `primaryKey`.
    pub password_derived: bool,
    /// How long a positive cache entry is trusted.
    pub cache_ttl: Duration,
    /// How long an unknown device is remembered.
    pub negative_ttl: Duration,
    /// Cache size bound.
    pub cache_max_entries: usize,
    /// The RabbitMQ virtual host devices may use.
    pub rabbitmq_vhost: String,
    /// The RabbitMQ exchange the MQTT plugin publishes to.
    pub rabbitmq_exchange: String,
}

fn opt_ms(hub: &LinkedHub, k: &str, default: u64) -> Duration {
    Duration::from_millis(
        hub.options
            .get(k)
            .and_then(Value::as_u64)
            .unwrap_or(default)
            .min(3_600_000),
    )
}

/// Parse a broker-auth hub's options.
pub fn parse_settings(hub: &LinkedHub) -> Result<Settings, String> {
    let mut secrets = Vec::new();
    for name in ["auth_secret", "previous_auth_secret"] {
        match hub.options.get(name) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.len() >= 16 => secrets.push(sha256(s.as_bytes())),
            Some(_) => {
                return Err(format!(
                    "options.{name} must be a string of at least 16 characters"
                ))
            }
        }
    }
    if opt_str(hub, "auth_secret").is_none() {
        return Err("a broker-auth hub needs options.auth_secret (what the broker presents to dps, at least 16 characters)".into());
    }
    let password_derived = super::mosquitto::password_mode_derived(hub)?;
    let topic_prefix = opt_str(hub, "topic_prefix")
        .unwrap_or("devices")
        .trim_matches('/')
        .to_string();
    if topic_prefix.is_empty() || topic_prefix.contains(['+', '#', '\0']) {
        return Err("options.topic_prefix must be a non-empty topic without wildcards".into());
    }
    Ok(Settings {
        secrets,
        topic_prefix,
        password_derived,
        cache_ttl: opt_ms(hub, "cache_ttl_ms", 30_000),
        negative_ttl: opt_ms(hub, "negative_cache_ttl_ms", 2_000),
        cache_max_entries: hub
            .options
            .get("cache_max_entries")
            .and_then(Value::as_u64)
            .unwrap_or(200_000)
            .clamp(1, 10_000_000) as usize,
        rabbitmq_vhost: opt_str(hub, "rabbitmq_vhost").unwrap_or("/").to_string(),
        rabbitmq_exchange: opt_str(hub, "rabbitmq_exchange")
            .unwrap_or("amq.topic")
            .to_string(),
    })
}

/// Check a broker-auth hub's settings (config files and the admin API).
pub fn check_settings(hub: &LinkedHub) -> Result<(), String> {
    parse_settings(hub).map(drop)
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

impl Settings {
    /// Is `presented` one of the hub's broker secrets? (Constant time per secret.)
    pub fn secret_matches(&self, presented: &[u8]) -> bool {
        let h = sha256(presented);
        let mut ok = subtle::Choice::from(0);
        for s in &self.secrets {
            ok |= s.ct_eq(&h);
        }
        ok.into()
    }
}

/// What dps knows about one device of the hub, as the auth answers need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    /// The identity is enabled.
    pub enabled: bool,
    /// SHA-256 of the expected password (symmetric-key devices).
    password_sha: Option<[u8; 32]>,
    /// The device logs in with a certificate (X.509 devices).
    pub certificate: bool,
}

impl Facts {
    fn of(dev: &StoredHubDevice, s: &Settings) -> Facts {
        let auth = &dev.authentication;
        let password_sha = match auth.get("type").and_then(Value::as_str) {
            Some("sas") => auth
                .pointer("/symmetricKey/primaryKey")
                .and_then(Value::as_str)
                .and_then(|k| {
                    super::mosquitto::device_password(k, &dev.device_id, s.password_derived)
                })
                .map(|p| sha256(p.as_bytes())),
            _ => None,
        };
        Facts {
            enabled: dev.status == "enabled",
            certificate: password_sha.is_none()
                && auth.get("type").and_then(Value::as_str) == Some("selfSigned"),
            password_sha,
        }
    }

    /// Does `password` match (constant time)? `false` for a device without a password.
    pub fn password_matches(&self, password: &[u8]) -> bool {
        match &self.password_sha {
            Some(expected) => expected.ct_eq(&sha256(password)).into(),
            None => false,
        }
    }
}

struct Cached {
    facts: Option<Facts>,
    at: Instant,
}

/// The per-hub cache of device facts.
pub struct AuthCache {
    host: String,
    store: Arc<dyn Store>,
    /// The options the settings were parsed from, and the settings.
    settings: RwLock<Option<(serde_json::Map<String, Value>, Arc<Settings>)>>,
    entries: RwLock<HashMap<String, Cached>>,
    /// Identity writes handed to the engine but maybe not committed yet: device id → (etag of
    /// the staged document, when).
    pending: Mutex<HashMap<String, (String, Instant)>>,
    /// Bumped by every invalidation: a fill started before an invalidation is not stored.
    epoch: AtomicU64,
}

impl AuthCache {
    /// An empty cache for `host`.
    pub fn new(store: Arc<dyn Store>, host: &str) -> Self {
        AuthCache {
            host: host.to_ascii_lowercase(),
            store,
            settings: RwLock::new(None),
            entries: RwLock::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
        }
    }

    /// The settings of `hub` (parsed once per change of its options; a change empties the
    /// cache, as facts depend on `password_mode`). The common case is one read lock and a
    /// comparison of the options.
    pub fn settings(&self, hub: &LinkedHub) -> Result<Arc<Settings>, String> {
        {
            let cur = self
                .settings
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((opts, s)) = cur.as_ref() {
                if *opts == hub.options {
                    return Ok(s.clone());
                }
            }
        }
        let fresh = Arc::new(parse_settings(hub)?);
        *self
            .settings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((hub.options.clone(), fresh.clone()));
        self.clear();
        Ok(fresh)
    }

    /// Forget everything.
    pub fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Forget one device (after a write through this node).
    pub fn invalidate(&self, device_id: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(device_id);
    }

    /// An identity document for `device_id` with `etag` was staged for a transaction that may
    /// commit later: until a load sees that version (or [`PENDING_FOR`] passes), loads of that
    /// device are answered but not cached.
    fn staged(&self, device_id: &str, etag: &str) {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(device_id.to_string(), (etag.to_string(), Instant::now()));
        self.invalidate(device_id);
    }

    /// The facts of a device (`None`: no such identity on this hub), from the cache or the
    /// store. `Err` is a store failure (the answer is then an error, never an allow).
    pub async fn facts(&self, s: &Settings, device_id: &str) -> Result<Option<Facts>, String> {
        {
            let map = self
                .entries
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(c) = map.get(device_id) {
                let ttl = if c.facts.is_some() {
                    s.cache_ttl
                } else {
                    s.negative_ttl
                };
                if c.at.elapsed() < ttl {
                    metrics::counter!("dps_broker_auth_cache_total", "result" => "hit")
                        .increment(1);
                    return Ok(c.facts.clone());
                }
            }
        }
        metrics::counter!("dps_broker_auth_cache_total", "result" => "miss").increment(1);
        self.load(s, device_id).await
    }

    async fn load(&self, s: &Settings, device_id: &str) -> Result<Option<Facts>, String> {
        let epoch = self.epoch.load(Ordering::SeqCst);
        let doc = self
            .store
            .get(Collection::HubDevice, &self.host, device_id)
            .await
            .map_err(|e| e.to_string())?;
        let (facts, etag) = match doc {
            Some(d) => {
                let dev: StoredHubDevice =
                    serde_json::from_str(&d.body).map_err(|e| e.to_string())?;
                // Device ids are case-sensitive: a document found under another spelling is
                // not this device.
                if dev.device_id == device_id {
                    (Some(Facts::of(&dev, s)), Some(d.etag))
                } else {
                    (None, None)
                }
            }
            None => (None, None),
        };
        let cacheable = {
            let mut pending = self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match pending.get(device_id) {
                Some((want, at)) if Some(want) != etag.as_ref() && at.elapsed() < PENDING_FOR => {
                    false
                }
                Some(_) => {
                    pending.remove(device_id);
                    true
                }
                None => true,
            }
        };
        if cacheable && s.negative_ttl.max(s.cache_ttl) > Duration::ZERO {
            let mut map = self
                .entries
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if self.epoch.load(Ordering::SeqCst) == epoch {
                if map.len() >= s.cache_max_entries {
                    map.clear();
                }
                map.insert(
                    device_id.to_string(),
                    Cached {
                        facts: facts.clone(),
                        at: Instant::now(),
                    },
                );
            }
        }
        Ok(facts)
    }

    /// Number of cached devices (tests, metrics).
    pub fn len(&self) -> usize {
        self.entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Is the cache empty?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The broker-auth adapter: the built-in registry's storage, plus cache invalidation.
pub struct BrokerAuthHub {
    inner: RegistryHub,
    cache: Arc<AuthCache>,
    hub: LinkedHub,
}

impl BrokerAuthHub {
    /// An adapter for `hub`, sharing `cache` with the auth endpoints.
    pub fn new(store: Arc<dyn Store>, hub: &LinkedHub, cache: Arc<AuthCache>) -> Self {
        BrokerAuthHub {
            inner: RegistryHub::new(store, &hub.host),
            cache,
            hub: hub.clone(),
        }
    }

    fn check(&self, identity: &HubIdentity) -> Result<(), HubError> {
        if let Err(e) = self.cache.settings(&self.hub) {
            return Err(HubError::Rejected {
                hub: self.hub.host.to_ascii_lowercase(),
                message: e,
            });
        }
        if !rules::valid_device_id(&identity.device_id) {
            return Err(HubError::Rejected {
                hub: self.hub.host.to_ascii_lowercase(),
                message: format!(
                    "device id '{}' cannot be used in MQTT topics",
                    identity.device_id
                ),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl HubAdapter for BrokerAuthHub {
    async fn upsert_device(
        &self,
        identity: &HubIdentity,
        twin: Option<&TwinState>,
    ) -> Result<(), HubError> {
        self.check(identity)?;
        let r = self.inner.upsert_device(identity, twin).await;
        self.cache.invalidate(&identity.device_id);
        r
    }

    async fn identity_write(
        &self,
        identity: &HubIdentity,
        twin: Option<&TwinState>,
    ) -> Result<Option<Write>, HubError> {
        self.check(identity)?;
        let w = self.inner.identity_write(identity, twin).await?;
        if let Some(Write::Put { doc, .. }) = &w {
            self.cache.staged(&identity.device_id, &doc.etag);
        } else {
            self.cache.invalidate(&identity.device_id);
        }
        Ok(w)
    }

    async fn get_twin(&self, device_id: &str) -> Result<Option<TwinState>, HubError> {
        self.inner.get_twin(device_id).await
    }

    async fn set_enabled(&self, device_id: &str, enabled: bool) -> Result<(), HubError> {
        let r = self.inner.set_enabled(device_id, enabled).await;
        self.cache.invalidate(device_id);
        r
    }

    async fn delete_device(&self, device_id: &str) -> Result<(), HubError> {
        let r = self.inner.delete_device(device_id).await;
        self.cache.invalidate(device_id);
        r
    }
}

/// The authorization rules, shared by every broker flavour.
pub mod rules {
    /// Can this device id be used in MQTT topics (no `/`, `+`, `#`, NUL; not empty)?
    pub fn valid_device_id(id: &str) -> bool {
        !id.is_empty() && !id.contains(['/', '+', '#', '\0'])
    }

    /// What a client wants to do with a topic.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Action {
        /// Publish to a topic name.
        Publish,
        /// Subscribe to a topic filter.
        Subscribe,
        /// Receive a message on a topic name.
        Receive,
    }

    impl Action {
        /// The metric label.
        pub fn label(self) -> &'static str {
            match self {
                Action::Publish => "publish",
                Action::Subscribe => "subscribe",
                Action::Receive => "receive",
            }
        }
    }

    /// May device `id` do `action` on the MQTT `topic`? Own tree only
    /// (`{prefix}/{id}` and below), never `{prefix}/{id}/twin/desired` for publishing, no
    /// wildcard in a published topic, no `$` topics.
    pub fn mqtt_topic_allowed(prefix: &str, id: &str, topic: &str, action: Action) -> bool {
        if !valid_device_id(id) || topic.starts_with('$') || topic.contains('\0') {
            return false;
        }
        let own = format!("{prefix}/{id}");
        let inside = topic == own
            || topic
                .strip_prefix(own.as_str())
                .is_some_and(|rest| rest.starts_with('/'));
        if !inside {
            return false;
        }
        match action {
            Action::Publish => {
                !topic.contains(['+', '#']) && topic != format!("{own}/twin/desired")
            }
            Action::Receive => !topic.contains(['+', '#']),
            Action::Subscribe => true,
        }
    }

    /// RabbitMQ's MQTT-to-AMQP topic mapping (`/` → `.`, `+` → `*`).
    pub fn to_amqp(topic: &str) -> String {
        topic.replace('/', ".").replace('+', "*")
    }

    /// Can this device id be used with RabbitMQ, whose routing keys use `.` as the level
    /// separator (a `.` or `*` in the id would make two devices' trees overlap)?
    pub fn valid_rabbitmq_device_id(id: &str) -> bool {
        valid_device_id(id) && !id.contains(['.', '*'])
    }

    /// The RabbitMQ flavour of [`mqtt_topic_allowed`], on an AMQP routing key: `write` is
    /// publishing, `read` subscribing (binding a queue with the filter as routing key).
    pub fn rabbitmq_routing_key_allowed(prefix: &str, id: &str, key: &str, write: bool) -> bool {
        if !valid_rabbitmq_device_id(id) {
            return false;
        }
        let own = to_amqp(&format!("{prefix}/{id}"));
        let inside = key == own
            || key
                .strip_prefix(own.as_str())
                .is_some_and(|rest| rest.starts_with('.'));
        if !inside {
            return false;
        }
        if write {
            !key.contains(['*', '#']) && key != format!("{own}.twin.desired")
        } else {
            true
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn own_tree_only() {
            use Action::*;
            let ok = |t: &str, a| mqtt_topic_allowed("devices", "d1", t, a);
            assert!(ok("devices/d1", Publish));
            assert!(ok("devices/d1/telemetry", Publish));
            assert!(ok("devices/d1/#", Subscribe));
            assert!(ok("devices/d1/+/x", Subscribe));
            assert!(ok("devices/d1/twin/desired", Subscribe));
            assert!(ok("devices/d1/twin/desired", Receive));
            assert!(!ok("devices/d1/twin/desired", Publish));
            assert!(!ok("devices/d1/#", Publish));
            assert!(!ok("devices/d10/x", Publish));
            assert!(!ok("devices/d2/x", Subscribe));
            assert!(!ok("devices/+/x", Subscribe));
            assert!(!ok("devices/#", Subscribe));
            assert!(!ok("#", Subscribe));
            assert!(!ok("$SYS/x", Subscribe));
            assert!(!ok("other/d1/x", Publish));
            assert!(!mqtt_topic_allowed(
                "devices",
                "a/b",
                "devices/a/b",
                Publish
            ));
        }

        #[test]
        fn rabbitmq_routing_keys() {
            let ok = |k: &str, w| rabbitmq_routing_key_allowed("devices", "d1", k, w);
            assert!(ok("devices.d1.telemetry", true));
            assert!(ok("devices.d1.#", false));
            assert!(ok("devices.d1.*.x", false));
            assert!(!ok("devices.d1.twin.desired", true));
            assert!(ok("devices.d1.twin.desired", false));
            assert!(!ok("devices.d1.#", true));
            assert!(!ok("devices.d10.x", true));
            assert!(!ok("devices.*.x", false));
            assert!(!ok("devices.#", false));
            assert!(!rabbitmq_routing_key_allowed(
                "devices",
                "a.b",
                "devices.a.b",
                true
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(opts: Value) -> LinkedHub {
        let mut h = LinkedHub::new("b.example.net", dps_core::instance::HubKind::BrokerAuth);
        h.options = opts.as_object().cloned().unwrap_or_default();
        h
    }

    #[test]
    fn settings_need_a_long_secret() {
        assert!(parse_settings(&hub(serde_json::json!({}))).is_err());
        assert!(parse_settings(&hub(serde_json::json!({"auth_secret": "short"}))).is_err());
        let s = parse_settings(&hub(
            serde_json::json!({"auth_secret": "0123456789abcdef", "previous_auth_secret": "fedcba9876543210"}),
        ))
        .unwrap();
        assert!(s.secret_matches(b"0123456789abcdef"));
        assert!(s.secret_matches(b"fedcba9876543210"));
        assert!(!s.secret_matches(b"0123456789abcdeg"));
        assert_eq!(s.topic_prefix, "devices");
        assert!(s.password_derived);
        assert!(parse_settings(&hub(
            serde_json::json!({"auth_secret": "0123456789abcdef", "password_mode": "x"})
        ))
        .is_err());
    }

    #[test]
    fn facts_hold_a_hash_of_the_password_only() {
        let s =
            parse_settings(&hub(serde_json::json!({"auth_secret": "0123456789abcdef"}))).unwrap();
        let key = dps_core::sas::generate_key();
        let dev = StoredHubDevice {
            device_id: "d1".into(),
            hub: "b.example.net".into(),
            status: "enabled".into(),
            authentication: serde_json::json!({"type": "sas", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}),
            capabilities: Default::default(),
            twin: Default::default(),
            last_updated_date_time_utc: String::new(),
        };
        let f = Facts::of(&dev, &s);
        assert!(f.enabled && !f.certificate);
        let pw = derive_password(&key, "d1").unwrap();
        assert!(f.password_matches(pw.as_bytes()));
        assert!(!f.password_matches(key.as_bytes()));
        assert!(!format!("{f:?}").contains(&pw));
        // An X.509 identity has no password: it may only log in with its certificate.
        let x = StoredHubDevice {
            authentication: serde_json::json!({"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "AB", "secondaryThumbprint": "AB"}}),
            status: "disabled".into(),
            ..dev
        };
        let f = Facts::of(&x, &s);
        assert!(f.certificate && !f.enabled);
        assert!(!f.password_matches(b""));
        assert!(!f.password_matches(pw.as_bytes()));
    }
}

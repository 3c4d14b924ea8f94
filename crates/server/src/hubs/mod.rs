//! Linked-hub adapters and hub health.
//!
//! [`HubSet`] builds one adapter per linked hub from its [`HubKind`], and tracks each hub's health
//! (recent failures, latency) so that allocation can skip a failing hub while another is
//! eligible and come back to it once it recovers (a half-open trial after a cool-down).

pub mod azure;
pub mod broker_auth;
pub mod fake;
mod http_client;
pub mod mosquitto;
pub mod registry;
pub mod webhook;

use dps_core::hub::{HubAdapter, HubError};
use dps_core::instance::{HubKind, LinkedHub};
use dps_core::store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failures in a row after which a hub counts as unhealthy.
pub const UNHEALTHY_AFTER: u32 = 3;
/// How long an unhealthy hub is skipped before a trial registration is allowed.
pub const COOL_DOWN: Duration = Duration::from_secs(15);

/// The hub's `timeout_ms` option (or `default_ms`), clamped to 100 ms ..= 120 s; every adapter
/// bounds its calls with it.
pub(crate) fn timeout_option(hub: &LinkedHub, default_ms: u64) -> Duration {
    Duration::from_millis(
        hub.options
            .get("timeout_ms")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(default_ms)
            .clamp(100, 120_000),
    )
}

/// A hub's string option `k`, if set (and a string).
pub(crate) fn opt_str<'a>(hub: &'a LinkedHub, k: &str) -> Option<&'a str> {
    hub.options.get(k).and_then(serde_json::Value::as_str)
}

/// Health of one hub.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// Consecutive failures.
    pub consecutive_failures: u32,
    /// Total failures.
    pub failures: u64,
    /// Total successes.
    pub successes: u64,
    /// When the last failure happened.
    pub last_failure: Option<Instant>,
    /// Last failure message.
    pub last_error: Option<String>,
    /// Smoothed latency in milliseconds.
    pub latency_ms: f64,
    /// The hub refused our credentials (rotated keys): reported loudly.
    pub credentials_refused: bool,
    /// The health last reported to the health listener (`false`: reported unhealthy).
    reported_unhealthy: bool,
}

impl Health {
    /// Should allocation avoid this hub right now?
    pub fn unhealthy(&self) -> bool {
        self.consecutive_failures >= UNHEALTHY_AFTER
            && self.last_failure.is_some_and(|t| t.elapsed() < COOL_DOWN)
    }
}

/// The adapters and health of all linked hubs.
pub struct HubSet {
    store: Arc<dyn Store>,
    outbound: Arc<crate::outbound::Outbound>,
    adapters: Mutex<HashMap<String, (LinkedHub, Arc<dyn HubAdapter>)>>,
    health: Mutex<HashMap<String, Health>>,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
    /// The auth caches of broker-auth hubs, by lowercased host: shared by the hub's adapter
    /// (which invalidates) and the broker endpoints (which read), kept across adapter rebuilds.
    broker_caches: Mutex<HashMap<String, Arc<broker_auth::AuthCache>>>,
    /// Told `(host, healthy)` when a hub turns unhealthy (`UNHEALTHY_AFTER` failures in a row)
    /// or healthy again (its first success after): the lifecycle events' `io.dps.hub.health`.
    health_listener: std::sync::OnceLock<tokio::sync::mpsc::Sender<(String, bool)>>,
}

impl HubSet {
    /// A new set.
    pub fn new(store: Arc<dyn Store>, outbound: Arc<crate::outbound::Outbound>) -> Self {
        HubSet {
            store,
            outbound,
            adapters: Mutex::new(HashMap::new()),
            health: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            broker_caches: Mutex::new(HashMap::new()),
            health_listener: std::sync::OnceLock::new(),
        }
    }

    /// Report health changes to `tx` (once; later calls are ignored). A full channel drops the
    /// report (logged).
    pub fn on_health_change(&self, tx: tokio::sync::mpsc::Sender<(String, bool)>) {
        let _ = self.health_listener.set(tx);
    }

    fn build(&self, hub: &LinkedHub) -> Arc<dyn HubAdapter> {
        match hub.kind {
            HubKind::Registry => {
                Arc::new(registry::RegistryHub::new(self.store.clone(), &hub.host))
            }
            HubKind::Mosquitto => Arc::new(mosquitto::MosquittoHub::new(hub)),
            HubKind::AzureIotHub => Arc::new(azure::AzureIotHub::new(hub, &self.outbound)),
            HubKind::Webhook => Arc::new(webhook::WebhookHub::new(hub, &self.outbound)),
            HubKind::BrokerAuth => Arc::new(broker_auth::BrokerAuthHub::new(
                self.store.clone(),
                hub,
                self.broker_auth_cache(hub),
            )),
        }
    }

    /// The auth cache of a broker-auth hub (created on first use).
    pub fn broker_auth_cache(&self, hub: &LinkedHub) -> Arc<broker_auth::AuthCache> {
        let key = hub.host.to_ascii_lowercase();
        self.broker_caches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key)
            .or_insert_with(|| Arc::new(broker_auth::AuthCache::new(self.store.clone(), &hub.host)))
            .clone()
    }

    /// What outbound calls may reach (linked hub settings are checked against it).
    pub fn outbound(&self) -> &crate::outbound::Outbound {
        &self.outbound
    }

    /// The adapter for a linked hub (built on first use, rebuilt when its settings change).
    ///
    /// Never fails today (an unknown kind is refused when the hub is read); the `Result` keeps
    /// the engine's call sites ready for adapters whose construction can fail.
    pub fn adapter(&self, hub: &LinkedHub) -> Result<Arc<dyn HubAdapter>, HubError> {
        let key = hub.host.to_ascii_lowercase();
        let mut map = self
            .adapters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((cfg, a)) = map.get(&key) {
            if cfg == hub {
                return Ok(a.clone());
            }
        }
        let a = self.build(hub);
        map.insert(key, (hub.clone(), a.clone()));
        Ok(a)
    }

    /// Use `adapter` for `hub` instead of the one its kind builds (engine tests install a
    /// [`fake::FakeHub`] this way). Replaced like any adapter when the hub's settings change.
    pub fn install(&self, hub: &LinkedHub, adapter: Arc<dyn HubAdapter>) {
        self.adapters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(hub.host.to_ascii_lowercase(), (hub.clone(), adapter));
    }

    /// Take one assignment token from the hub's rate limit (`max_registrations_per_second`);
    /// `true` when the hub has no limit or a token was available.
    pub fn take_rate_token(&self, hub: &LinkedHub) -> bool {
        let Some(rate) = hub.max_registrations_per_second.filter(|r| *r > 0) else {
            return true;
        };
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, at) = buckets
            .entry(hub.host.to_ascii_lowercase())
            .or_insert((rate as f64, Instant::now()));
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate as f64).min(rate as f64);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Is this hub unhealthy now?
    pub fn unhealthy(&self, host: &str) -> bool {
        self.health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&host.to_ascii_lowercase())
            .is_some_and(Health::unhealthy)
    }

    /// Record the outcome of a hub call.
    pub fn record(&self, host: &str, started: Instant, result: &Result<(), HubError>) {
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let mut map = self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let h = map.entry(host.to_ascii_lowercase()).or_default();
        h.latency_ms = if h.successes + h.failures == 0 {
            ms
        } else {
            h.latency_ms * 0.8 + ms * 0.2
        };
        let outcome = match result {
            Ok(()) => {
                h.consecutive_failures = 0;
                h.successes += 1;
                h.credentials_refused = false;
                "success"
            }
            Err(e) => {
                h.consecutive_failures += 1;
                h.failures += 1;
                h.last_failure = Some(Instant::now());
                h.last_error = Some(e.to_string());
                if matches!(e, HubError::Unauthorized { .. }) {
                    if !h.credentials_refused {
                        tracing::error!(hub = host, error = %e, "linked hub refuses dps's credentials: were its keys rotated? Update the linked hub's connection string");
                    }
                    h.credentials_refused = true;
                }
                "failure"
            }
        };
        metrics::histogram!("dps_hub_call_duration_seconds", "result" => outcome)
            .record(ms / 1000.0);
        metrics::gauge!("dps_hub_healthy", "hub" => host.to_ascii_lowercase())
            .set(if h.unhealthy() { 0.0 } else { 1.0 });
        let down = h.consecutive_failures >= UNHEALTHY_AFTER;
        if down != h.reported_unhealthy {
            h.reported_unhealthy = down;
            if let Some(tx) = self.health_listener.get() {
                if tx.try_send((host.to_ascii_lowercase(), !down)).is_err() {
                    tracing::warn!(
                        hub = host,
                        "hub health change not reported: the events queue is full"
                    );
                }
            }
        }
    }

    /// A snapshot of every hub's health.
    pub fn health_snapshot(&self) -> Vec<(String, Health)> {
        let map = self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut v: Vec<_> = map.iter().map(|(k, h)| (k.clone(), h.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

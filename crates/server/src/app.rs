//! The shared application state handed to every front end.

use crate::catalog::Catalog;
use crate::engine::Engine;
use crate::instances::Instances;
use crate::repo::Repo;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Application state.
pub struct App {
    /// The registration engine.
    pub engine: Arc<Engine>,
    /// Cached groups and X.509 material (the use cases invalidate what they change).
    pub catalog: Arc<Catalog>,
    /// Instances.
    pub instances: Arc<Instances>,
    /// Store access.
    pub repo: Repo,
    /// The instance whose ServiceConfig policies manage every instance.
    pub admin_instance: String,
    /// Maximum request body.
    pub max_body: usize,
    /// MQTT limits.
    pub mqtt_limits: dps_mqtt::MqttLimits,
    /// Set once every listener is bound.
    pub listening: AtomicBool,
    /// The store backend (for readiness: migrations current).
    pub backend: dps_store::Backend,
}

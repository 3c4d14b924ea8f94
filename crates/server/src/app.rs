//! The shared application state handed to every front end.

use crate::engine::Engine;
use crate::instances::Instances;
use crate::repo::Repo;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Application state.
pub struct App {
    /// The registration engine.
    pub engine: Arc<Engine>,
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

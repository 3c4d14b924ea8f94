//! The shared application state handed to every front end: the use cases (the only way the
//! handlers reach the store), the registration engine, the instances (for authorization) and
//! the clock (for token expiry).

use crate::engine::Engine;
use crate::instances::Instances;
use crate::usecases::admin::Admin;
use crate::usecases::certificates::Certificates;
use crate::usecases::enrollments::Enrollments;
use crate::usecases::registrations::Registrations;
use dps_core::clock::Clock;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Application state.
pub struct App {
    /// The registration engine.
    pub engine: Arc<Engine>,
    /// Instances (to authorize callers; changed through [`App::admin`]).
    pub instances: Arc<Instances>,
    /// Individual enrollments and enrollment groups.
    pub enrollments: Enrollments,
    /// Registration records.
    pub registrations: Registrations,
    /// CA certificates and the deny list.
    pub certificates: Certificates,
    /// Credential policies, issued certificates, revocation, CRLs (certificate issuance).
    pub issuance: crate::usecases::issuance::Issuance,
    /// Instances, linked hubs, access policies, hub devices, stats, audit log, readiness.
    pub admin: Admin,
    /// The clock (service SAS token expiry).
    pub clock: Arc<dyn Clock>,
    /// The instance whose ServiceConfig policies manage every instance.
    pub admin_instance: String,
    /// Maximum request body.
    pub max_body: usize,
    /// Longest accepted service SAS token lifetime (`se` − now, seconds); 0: no limit.
    pub max_token_lifetime_secs: u64,
    /// MQTT limits.
    pub mqtt_limits: dps_mqtt::MqttLimits,
    /// AMQP limits.
    pub amqp_limits: dps_amqp::AmqpLimits,
    /// Set once every listener is bound.
    pub listening: AtomicBool,
}

//! dps: an open, Azure-compatible Device Provisioning Service.
//!
//! This crate is the server: configuration, TLS, the HTTPS router (device API, Azure service
//! API, admin API, MQTT over WebSocket), the MQTT listener, the registration engine, the
//! linked-hub adapters and start-up. The domain lives in `dps-core`, storage in `dps-store`,
//! the MQTT session in `dps-mqtt`.

pub mod admin_api;
pub mod amqp_front;
pub mod app;
pub mod audit;
pub mod broker_auth_api;
pub mod catalog;
pub mod certificates;
pub mod config;
pub mod connections;
pub mod device_api;
pub mod engine;
pub mod events;
pub mod faults;
pub mod files;
pub mod http;
pub mod hub_cleanup;
pub mod hubs;
pub mod instances;
pub mod issuer;
pub mod metrics;
pub mod mqtt_front;
pub mod outbound;
pub mod repo;
pub mod routes;
pub mod server;
pub mod service_api;
pub mod tls;
pub mod usecases;

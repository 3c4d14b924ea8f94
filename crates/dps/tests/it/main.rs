//! Integration tests: the real server in-process on port 0.

mod service_api;
mod smoke;
mod support;
mod x509;
mod auth;
mod registration;
mod support_iothub;
mod hubs_azure;
mod hubs_webhook;
mod hubs_failures;
mod hubs_mosquitto;
mod vectors;

//! Integration tests: the real server in-process on port 0.

mod audit_limits;
mod auth;
mod authz_matrix;
mod cli;
mod connections;
mod device_client;
mod hub_contract;
mod hubs_azure;
mod hubs_broker_auth;
mod hubs_failures;
mod hubs_mosquitto;
mod hubs_webhook;
mod observability;
mod outbound;
mod registration;
mod registration_limits;
mod secrets;
mod service_api;
mod smoke;
mod support;
mod support_iothub;
mod support_mosquitto;
mod support_rabbitmq;
mod support_webhook;
mod vectors;
mod x509;

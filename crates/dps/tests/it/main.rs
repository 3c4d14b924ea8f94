//! Integration tests: the real server in-process on port 0.

mod service_api;
mod smoke;
mod support;
mod x509;
mod auth;
mod registration;

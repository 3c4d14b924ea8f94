//! Integration tests: the real server in-process on port 0.

mod support;
mod smoke;
mod service_api;

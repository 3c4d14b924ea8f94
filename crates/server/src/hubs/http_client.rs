//! What the HTTP-based adapters (`azure-iothub`, `webhook`) share: one HTTP client per hub and
//! its per-request timeout, read from the same linked-hub options, and the same reading of a
//! failed request, of an answer's body and of `Retry-After`.
//!
//! Options: `ca_file` (an extra trusted CA PEM bundle for the hub's endpoint: the hub then gets
//! its own client; otherwise it shares the server's), `timeout_ms` (see [`super::timeout_option`]).
//! Every client comes from [`crate::outbound`]: its address policy, no proxy, no redirect.

use crate::outbound::{Outbound, Target};
use dps_core::instance::LinkedHub;
use serde_json::Value;
use std::time::Duration;

/// The HTTP client of one hub and its per-request timeout.
pub(crate) struct HttpClient {
    /// The client (the shared one unless the hub has a `ca_file`).
    pub(crate) http: reqwest::Client,
    /// Per-request timeout.
    pub(crate) timeout: Duration,
    /// The most bytes of an answer read.
    pub(crate) max_response_bytes: usize,
}

impl HttpClient {
    /// The client for `hub`, a `target` of the outbound policy; `default_timeout_ms` when it has
    /// no `timeout_ms` option.
    pub(crate) fn for_hub(
        hub: &LinkedHub,
        outbound: &Outbound,
        target: Target,
        default_timeout_ms: u64,
    ) -> Result<Self, String> {
        let http = match hub.options.get("ca_file").and_then(Value::as_str) {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| format!("ca_file {path}: {e}"))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| format!("ca_file {path}: {e}"))?;
                outbound
                    .builder(target)
                    .tls_certs_merge(certs)
                    .build()
                    .map_err(|e| format!("HTTP client: {e}"))?
            }
            None => outbound.client(target).clone(),
        };
        Ok(HttpClient {
            http,
            timeout: super::timeout_option(hub, default_timeout_ms),
            max_response_bytes: outbound.max_response_bytes(),
        })
    }
}

/// Why a request got no answer (the URL left out: it may carry secrets).
pub(crate) fn send_error_text(e: reqwest::Error) -> String {
    crate::outbound::describe(e)
}

/// The `Retry-After` seconds of an answer, when given as a number.
pub(crate) fn retry_after(resp: &reqwest::Response) -> Option<u32> {
    resp.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
}

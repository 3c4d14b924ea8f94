//! Typed errors of the device client.

use dps_core::model::DeviceRegistrationState;
use std::time::Duration;

/// Why a registration did not end in `assigned`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The service refused the credential (HTTP 401, MQTT `res/401` or CONNACK 4/5).
    #[error("unauthorized{}: {message}{}", code_suffix(*.error_code), tracking_suffix(.tracking_id))]
    Unauthorized {
        /// Six-digit error code (e.g. 401002), when the service sent one.
        error_code: Option<u32>,
        /// The service's message.
        message: String,
        /// Tracking id, for the server logs.
        tracking_id: Option<String>,
    },
    /// No enrollment or registration was found (HTTP 404).
    #[error("not found{}: {message}{}", code_suffix(*.error_code), tracking_suffix(.tracking_id))]
    NotFound {
        /// Six-digit error code.
        error_code: Option<u32>,
        /// The service's message.
        message: String,
        /// Tracking id.
        tracking_id: Option<String>,
    },
    /// The service kept answering 429 after every retry.
    #[error("throttled by the service (last retry-after: {retry_after:?})")]
    Throttled {
        /// The last `retry-after` the service sent.
        retry_after: Option<Duration>,
    },
    /// The registration finished with status `failed`.
    #[error("registration failed{}: {}", code_suffix(*.error_code), .message.as_deref().unwrap_or("no reason given"))]
    Failed {
        /// `registrationState.errorCode`.
        error_code: Option<u32>,
        /// `registrationState.errorMessage`.
        message: Option<String>,
        /// The full registration state.
        registration_state: Box<DeviceRegistrationState>,
    },
    /// The enrollment (or group) is disabled.
    #[error("the enrollment is disabled")]
    Disabled {
        /// The registration state the service returned.
        registration_state: Box<DeviceRegistrationState>,
    },
    /// Any other error status from the service (400, 412, 5xx after retries, ...).
    #[error("service error {status}{}: {message}{}", code_suffix(*.error_code), tracking_suffix(.tracking_id))]
    Service {
        /// HTTP (or MQTT topic) status.
        status: u16,
        /// Six-digit error code.
        error_code: Option<u32>,
        /// The service's message.
        message: String,
        /// Tracking id.
        tracking_id: Option<String>,
    },
    /// Connecting, reading or writing failed.
    #[error("transport error: {0}")]
    Transport(String),
    /// TLS setup or handshake failed (untrusted server certificate, bad client certificate, ...).
    #[error("TLS error: {0}")]
    Tls(String),
    /// The operation did not finish within the configured timeout.
    #[error("timed out")]
    Timeout,
    /// The service answered something this client cannot understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The client was configured wrongly (bad key, unreadable PEM, missing field).
    #[error("configuration error: {0}")]
    Config(String),
    /// A TPM step failed (tpm2-tools missing, the TPM refused the activation, ...).
    #[error("TPM error: {0}")]
    Tpm(String),
}

fn code_suffix(code: Option<u32>) -> String {
    code.map(|c| format!(" ({c})")).unwrap_or_default()
}

fn tracking_suffix(t: &Option<String>) -> String {
    t.as_ref()
        .map(|t| format!(" [trackingId {t}]"))
        .unwrap_or_default()
}

impl Error {
    /// A short, stable reason label, used to group failures (e.g. by `dps bench`).
    pub fn reason(&self) -> String {
        match self {
            Error::Unauthorized { error_code, .. } => label("unauthorized", *error_code),
            Error::NotFound { error_code, .. } => label("not_found", *error_code),
            Error::Throttled { .. } => "throttled".into(),
            Error::Failed { error_code, .. } => label("failed", *error_code),
            Error::Disabled { .. } => "disabled".into(),
            Error::Service {
                status, error_code, ..
            } => match error_code {
                Some(c) => format!("service_{status}_{c}"),
                None => format!("service_{status}"),
            },
            Error::Transport(_) => "transport".into(),
            Error::Tls(_) => "tls".into(),
            Error::Timeout => "timeout".into(),
            Error::Protocol(_) => "protocol".into(),
            Error::Config(_) => "config".into(),
            Error::Tpm(_) => "tpm".into(),
        }
    }

    /// Whether retrying later may help (throttling, 5xx, transport trouble, timeouts).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Throttled { .. } | Error::Transport(_) | Error::Timeout => true,
            Error::Service { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// Build the error for a non-success status and its (error JSON) body.
    pub(crate) fn from_status(status: u16, body: &[u8], retry_after: Option<Duration>) -> Error {
        let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let field = |k: &str| parsed.as_ref().and_then(|v| v.get(k)).cloned();
        let error_code = field("errorCode").and_then(|v| {
            v.as_u64()
                .map(|n| n as u32)
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        });
        let message = field("message")
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| {
                let text = String::from_utf8_lossy(body).trim().to_string();
                if text.is_empty() {
                    format!("HTTP {status}")
                } else {
                    text
                }
            });
        let tracking_id = field("trackingId").and_then(|v| v.as_str().map(str::to_string));
        match status {
            401 | 403 => Error::Unauthorized {
                error_code,
                message,
                tracking_id,
            },
            404 => Error::NotFound {
                error_code,
                message,
                tracking_id,
            },
            429 => Error::Throttled { retry_after },
            _ => Error::Service {
                status,
                error_code,
                message,
                tracking_id,
            },
        }
    }
}

fn label(base: &str, code: Option<u32>) -> String {
    match code {
        Some(c) => format!("{base}_{c}"),
        None => base.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping_reads_error_body() {
        let e = Error::from_status(
            401,
            br#"{"errorCode":401002,"trackingId":"t-1","message":"Invalid certificate.","timestampUtc":"x"}"#,
            None,
        );
        match &e {
            Error::Unauthorized {
                error_code,
                message,
                tracking_id,
            } => {
                assert_eq!(*error_code, Some(401002));
                assert_eq!(message, "Invalid certificate.");
                assert_eq!(tracking_id.as_deref(), Some("t-1"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.reason(), "unauthorized_401002");
        assert!(e.to_string().contains("401002"));
        let e = Error::from_status(503, b"", None);
        assert!(e.is_transient());
        assert_eq!(e.reason(), "service_503");
        assert!(matches!(
            Error::from_status(429, b"{}", Some(Duration::from_secs(3))),
            Error::Throttled {
                retry_after: Some(_)
            }
        ));
    }
}

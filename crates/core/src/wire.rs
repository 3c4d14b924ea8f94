//! The one place where errors become DPS wire errors: HTTP status, six-digit `errorCode`
//! (`errorCode / 1000 == status`), message and retry-after. HTTPS and MQTT render the same
//! [`WireError`].

use crate::error::{AuthFailure, Error};
use crate::hub::HubError;
use crate::model::ErrorBody;
use crate::store::StoreError;

/// Six-digit DPS error codes used by dps.
pub mod codes {
    /// Bad request / invalid argument.
    pub const INVALID_ARGUMENT: u32 = 400_004;
    /// Custom allocation webhook failed.
    pub const CUSTOM_ALLOCATION_FAILED: u32 = 400_207;
    /// No hub could be assigned.
    pub const NO_HUB: u32 = 400_208;
    /// DPS was not authorized on the hub.
    pub const HUB_UNAUTHORIZED: u32 = 400_209;
    /// Device or service authentication failed.
    pub const UNAUTHORIZED: u32 = 401_002;
    /// Registration or enrollment not found.
    pub const NOT_FOUND: u32 = 404_201;
    /// Operation not found.
    pub const OPERATION_NOT_FOUND: u32 = 404_203;
    /// Method not allowed.
    pub const METHOD_NOT_ALLOWED: u32 = 405_000;
    /// Conflict (already exists).
    pub const CONFLICT: u32 = 409_201;
    /// ETag mismatch.
    pub const PRECONDITION_FAILED: u32 = 412_002;
    /// Request too large.
    pub const TOO_LARGE: u32 = 413_000;
    /// Throttled.
    pub const THROTTLED: u32 = 429_001;
    /// Internal error.
    pub const INTERNAL: u32 = 500_000;
    /// A linked hub is unreachable; retry.
    pub const HUB_UNREACHABLE: u32 = 503_001;
    /// The store is unavailable; retry.
    pub const STORE_UNAVAILABLE: u32 = 503_002;
}

/// An error as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    /// HTTP status (also the MQTT `res/{status}`).
    pub status: u16,
    /// Six-digit code.
    pub error_code: u32,
    /// Message safe to show to the client.
    pub message: String,
    /// Seconds to wait before retrying.
    pub retry_after: Option<u32>,
}

impl WireError {
    /// Build from parts.
    pub fn new(error_code: u32, message: impl Into<String>) -> Self {
        WireError {
            status: (error_code / 1000) as u16,
            error_code,
            message: message.into(),
            retry_after: None,
        }
    }
    /// The JSON body with a tracking id and timestamp.
    pub fn body(&self, tracking_id: &str, timestamp: &str) -> ErrorBody {
        ErrorBody {
            error_code: self.error_code,
            tracking_id: tracking_id.to_string(),
            message: self.message.clone(),
            timestamp_utc: timestamp.to_string(),
            info: None,
        }
    }
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        match e {
            Error::InvalidArgument(m) => WireError::new(codes::INVALID_ARGUMENT, m.clone()),
            Error::Unauthorized(f) => {
                // Never say more than Azure does about why a device was refused.
                let msg = match f {
                    AuthFailure::MissingRight { .. }
                    | AuthFailure::UnknownPolicy(_)
                    | AuthFailure::UnknownInstance(_) => {
                        format!("Unauthorized: {f}")
                    }
                    AuthFailure::MissingCredential
                    | AuthFailure::Sas(_)
                    | AuthFailure::UnknownRegistration(_)
                    | AuthFailure::KeyMismatch
                    | AuthFailure::Certificate(_)
                    | AuthFailure::Revoked(_)
                    | AuthFailure::AttestationMismatch(_) => "Unauthorized".to_string(),
                };
                WireError::new(codes::UNAUTHORIZED, msg)
            }
            Error::NotFound { .. } => WireError::new(codes::NOT_FOUND, e.to_string()),
            Error::OperationNotFound(_) => {
                WireError::new(codes::OPERATION_NOT_FOUND, e.to_string())
            }
            Error::PreconditionFailed { .. } => {
                WireError::new(codes::PRECONDITION_FAILED, e.to_string())
            }
            Error::Conflict { .. } => WireError::new(codes::CONFLICT, e.to_string()),
            Error::Throttled { retry_after } => WireError {
                retry_after: Some(*retry_after),
                ..WireError::new(codes::THROTTLED, "Operation was throttled")
            },
            Error::HubUnavailable(h) => match h {
                HubError::Throttled { retry_after, .. } => WireError {
                    retry_after: Some(*retry_after),
                    ..WireError::new(
                        codes::THROTTLED,
                        "The linked hub is throttling; retry later",
                    )
                },
                HubError::Unreachable { .. }
                | HubError::Unauthorized { .. }
                | HubError::Rejected { .. } => WireError {
                    retry_after: Some(5),
                    ..WireError::new(
                        codes::HUB_UNREACHABLE,
                        "The linked hub is unavailable; retry later",
                    )
                },
            },
            Error::Store(s) => match s {
                StoreError::Conflict { .. } => {
                    WireError::new(codes::PRECONDITION_FAILED, "Precondition failed")
                }
                StoreError::Unavailable(_) => WireError {
                    retry_after: Some(2),
                    ..WireError::new(
                        codes::STORE_UNAVAILABLE,
                        "Service temporarily unavailable; retry later",
                    )
                },
                StoreError::Corrupt(_) => WireError::new(codes::INTERNAL, "Internal error"),
            },
            Error::Internal(_) => WireError::new(codes::INTERNAL, "Internal error"),
            Error::Unsupported(m) => WireError::new(codes::METHOD_NOT_ALLOWED, m.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_divided_by_1000_is_the_status() {
        let errors = vec![
            Error::invalid("x"),
            Error::Unauthorized(AuthFailure::MissingCredential),
            Error::not_found("enrollment", "x"),
            Error::OperationNotFound("x".into()),
            Error::PreconditionFailed {
                kind: "enrollment",
                id: "x".into(),
            },
            Error::Conflict {
                kind: "enrollment",
                id: "x".into(),
            },
            Error::Throttled { retry_after: 3 },
            Error::HubUnavailable(HubError::Unreachable {
                hub: "h".into(),
                message: "down".into(),
            }),
            Error::HubUnavailable(HubError::Throttled {
                hub: "h".into(),
                retry_after: 7,
            }),
            Error::Store(StoreError::Unavailable("x".into())),
            Error::Internal("x".into()),
            Error::Unsupported("x".into()),
        ];
        for e in &errors {
            let w = WireError::from(e);
            assert_eq!(w.error_code / 1000, w.status as u32, "{e:?}");
        }
    }

    #[test]
    fn device_auth_failures_do_not_leak_the_reason() {
        let w = WireError::from(&Error::Unauthorized(AuthFailure::UnknownRegistration(
            "dev".into(),
        )));
        assert_eq!(w.message, "Unauthorized");
        assert_eq!(w.error_code, 401002);
    }

    #[test]
    fn throttling_carries_retry_after() {
        let w = WireError::from(&Error::Throttled { retry_after: 3 });
        assert_eq!((w.status, w.retry_after), (429, Some(3)));
    }
}

//! The one place where errors become DPS wire errors: HTTP status, six-digit `errorCode`
//! (`errorCode / 1000 == status`), message and retry-after. HTTPS and MQTT render the same
//! [`WireError`].
//!
//! Two exhaustive matches decide everything a device or a service client sees: `From<&Error>`
//! for request errors, and [`assignment_failure`] for the `errorCode`/`errorMessage` of a
//! registration that ended `failed`. Nothing else in the workspace names an error code (an
//! architecture test, `crates/dps/tests/architecture.rs`, checks it); `docs/device-api.md` and
//! `docs/service-api.md` list the same table.

use crate::error::{AssignmentFailure, AuthFailure, CustomAllocationFailure, Error};
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
    /// Registration or enrollment not found (also: no route for the path).
    pub const NOT_FOUND: u32 = 404_201;
    /// MQTT publish to a topic that is not a DPS request topic.
    pub const UNKNOWN_TOPIC: u32 = 404_000;
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
            Error::Unauthorized(AuthFailure::TpmNotEnrolled(_)) => {
                WireError::new(codes::NOT_FOUND, "Registration not found")
            }
            Error::Unauthorized(AuthFailure::TpmOverMqtt) => WireError::new(
                codes::INVALID_ARGUMENT,
                "TPM attestation is not supported over MQTT; use HTTPS or AMQP",
            ),
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
                    | AuthFailure::AttestationMismatch(_)
                    | AuthFailure::TpmNotEnrolled(_)
                    | AuthFailure::TpmUnknownEndorsementKey(_)
                    | AuthFailure::TpmWrongStorageRootKey(_)
                    | AuthFailure::TpmBadSignature(_)
                    | AuthFailure::TpmReplayedActivation
                    | AuthFailure::TpmNoActivation
                    | AuthFailure::TpmOverMqtt => "Unauthorized".to_string(),
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
            Error::Injected {
                error_code,
                message,
                ..
            } => WireError::new(*error_code, message.clone()),
            // The transports close the connection instead; this is only rendered by one that
            // cannot (then the device sees an internal error).
            Error::Dropped { .. } => WireError::new(codes::INTERNAL, "Connection dropped"),
            Error::Throttled { retry_after } => WireError {
                retry_after: Some(*retry_after),
                ..WireError::new(codes::THROTTLED, "Operation was throttled")
            },
            Error::AssignmentRetry {
                failure,
                retry_after,
            } => WireError {
                retry_after: Some(*retry_after),
                ..if failure.is_throttling() {
                    WireError::new(
                        codes::THROTTLED,
                        "The linked hub is throttling; retry later",
                    )
                } else {
                    WireError::new(
                        codes::HUB_UNREACHABLE,
                        "The linked hub is unavailable; retry later",
                    )
                }
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
            Error::NoRoute(m) => WireError::new(codes::NOT_FOUND, m.clone()),
            Error::UnknownTopic => WireError::new(codes::UNKNOWN_TOPIC, "Unknown topic"),
            Error::PayloadTooLarge { .. } => WireError::new(codes::TOO_LARGE, e.to_string()),
            // Rendered by `tpm_challenge` over HTTPS; a transport without the challenge
            // (MQTT) sees a plain refusal.
            Error::TpmChallenge { .. } => WireError::new(codes::UNAUTHORIZED, "Unauthorized"),
        }
    }
}

/// The TPM challenge answer (protocol digest §6.5.2): HTTP 401 with `authenticationKey` and
/// `keyName`, and no `status` or `errorCode` (the C SDK reads "no status" plus TPM as the
/// challenge). `None` for every other error.
pub fn tpm_challenge(e: &Error) -> Option<(u16, serde_json::Value)> {
    match e {
        Error::TpmChallenge { authentication_key } => Some((
            401,
            serde_json::json!({
                "message": "TPM activation required: activate the authenticationKey and sign a SAS token with it",
                "authenticationKey": authentication_key,
                "keyName": "registration",
            }),
        )),
        _ => None,
    }
}

/// The `errorCode` and `errorMessage` of a registration that ended `failed` (in the
/// registration state the device polls and the service API returns).
pub fn assignment_failure(f: &AssignmentFailure) -> WireError {
    let custom = |m: String| WireError::new(codes::CUSTOM_ALLOCATION_FAILED, m);
    match f {
        AssignmentFailure::InvalidDeviceId => {
            WireError::new(codes::INVALID_ARGUMENT, "Invalid device id")
        }
        AssignmentFailure::NoHub => WireError::new(codes::NO_HUB, "No IoT hub could be assigned"),
        AssignmentFailure::HubRateExhausted => WireError::new(
            codes::THROTTLED,
            "The linked hubs' provisioning rate is exhausted; retry later",
        ),
        AssignmentFailure::CustomAllocation { failure } => match failure {
            CustomAllocationFailure::NoDefinition => custom("Custom allocation failed".into()),
            CustomAllocationFailure::Unreachable => {
                custom("Custom allocation failed: the webhook could not be reached".into())
            }
            CustomAllocationFailure::Status { status } => custom(format!(
                "Custom allocation failed with status code: {status}"
            )),
            CustomAllocationFailure::InvalidResponse => {
                custom("Custom allocation failed: invalid response".into())
            }
            CustomAllocationFailure::NoHub => {
                custom("Custom allocation failed: no hub in the response".into())
            }
            CustomAllocationFailure::HubNotLinked => {
                custom("Custom allocation failed: the chosen hub is not linked".into())
            }
        },
        AssignmentFailure::HubUnauthorized => WireError::new(
            codes::HUB_UNAUTHORIZED,
            "DPS is not authorized on the IoT hub",
        ),
        AssignmentFailure::HubRejected => WireError::new(
            codes::HUB_UNAUTHORIZED,
            "The IoT hub refused the device identity",
        ),
        AssignmentFailure::HubThrottled => {
            WireError::new(codes::THROTTLED, "The IoT hub is throttling; retry later")
        }
        AssignmentFailure::HubUnreachable => WireError::new(
            codes::HUB_UNREACHABLE,
            "The IoT hub is unavailable; retry later",
        ),
        AssignmentFailure::Interrupted => WireError::new(
            codes::HUB_UNREACHABLE,
            "Registration was interrupted; retry",
        ),
    }
}

/// The failure of a record written before failures were stored as [`AssignmentFailure`] (only
/// its wire code was kept). Used when such a record is read; new records never need it.
pub fn legacy_assignment_failure(error_code: u32) -> AssignmentFailure {
    match error_code {
        codes::INVALID_ARGUMENT => AssignmentFailure::InvalidDeviceId,
        codes::CUSTOM_ALLOCATION_FAILED => AssignmentFailure::CustomAllocation {
            failure: CustomAllocationFailure::InvalidResponse,
        },
        codes::HUB_UNAUTHORIZED => AssignmentFailure::HubUnauthorized,
        codes::THROTTLED => AssignmentFailure::HubThrottled,
        codes::HUB_UNREACHABLE => AssignmentFailure::HubUnreachable,
        _ => AssignmentFailure::NoHub,
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
            Error::AssignmentRetry {
                failure: AssignmentFailure::HubUnreachable,
                retry_after: 5,
            },
            Error::AssignmentRetry {
                failure: AssignmentFailure::HubThrottled,
                retry_after: 7,
            },
            Error::NoRoute("x".into()),
            Error::UnknownTopic,
            Error::PayloadTooLarge { limit: 10 },
            Error::Store(StoreError::Unavailable("x".into())),
            Error::Internal("x".into()),
            Error::Unsupported("x".into()),
        ];
        for e in &errors {
            let w = WireError::from(e);
            assert_eq!(w.error_code / 1000, w.status as u32, "{e:?}");
        }
    }

    fn all_failures() -> Vec<AssignmentFailure> {
        use CustomAllocationFailure as C;
        let mut v = vec![
            AssignmentFailure::InvalidDeviceId,
            AssignmentFailure::NoHub,
            AssignmentFailure::HubRateExhausted,
            AssignmentFailure::HubUnauthorized,
            AssignmentFailure::HubRejected,
            AssignmentFailure::HubThrottled,
            AssignmentFailure::HubUnreachable,
            AssignmentFailure::Interrupted,
        ];
        for failure in [
            C::NoDefinition,
            C::Unreachable,
            C::Status { status: 500 },
            C::InvalidResponse,
            C::NoHub,
            C::HubNotLinked,
        ] {
            v.push(AssignmentFailure::CustomAllocation { failure });
        }
        v
    }

    #[test]
    fn assignment_failures_map_to_codes_whose_status_matches_retryability() {
        for f in all_failures() {
            let w = assignment_failure(&f);
            assert_eq!(w.error_code / 1000, w.status as u32, "{f:?}");
            assert_eq!(w.status >= 429, f.is_retryable(), "{f:?}");
            assert_eq!(w.status == 429, f.is_throttling(), "{f:?}");
        }
    }

    #[test]
    fn assignment_failures_round_trip_through_json() {
        for f in all_failures() {
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(serde_json::from_str::<AssignmentFailure>(&json).unwrap(), f);
        }
        assert_eq!(
            serde_json::to_string(&AssignmentFailure::CustomAllocation {
                failure: CustomAllocationFailure::Status { status: 502 }
            })
            .unwrap(),
            r#"{"kind":"customAllocation","failure":{"reason":"status","status":502}}"#
        );
    }

    #[test]
    fn legacy_codes_keep_their_retryability() {
        for f in all_failures() {
            let code = assignment_failure(&f).error_code;
            assert_eq!(
                legacy_assignment_failure(code).is_retryable(),
                f.is_retryable(),
                "{f:?}"
            );
        }
    }

    #[test]
    fn retry_answers_say_throttled_only_for_rate_limits() {
        let w = WireError::from(&Error::AssignmentRetry {
            failure: AssignmentFailure::HubRateExhausted,
            retry_after: 1,
        });
        assert_eq!((w.status, w.retry_after), (429, Some(1)));
        let w = WireError::from(&Error::AssignmentRetry {
            failure: AssignmentFailure::Interrupted,
            retry_after: 5,
        });
        assert_eq!(
            (w.status, w.error_code, w.retry_after),
            (503, 503_001, Some(5))
        );
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

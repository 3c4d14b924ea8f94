//! The domain error. Client mistakes and our own failures are kept apart; [`crate::wire`] is the
//! only place that turns them into DPS wire errors.

use crate::sas::SasError;
use crate::store::StoreError;

/// Why a device (or service client) failed to authenticate. Precise, for logs and registration
/// records; the wire always says 401002.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthFailure {
    /// No Authorization header / password / certificate.
    #[error("no credential was presented")]
    MissingCredential,
    /// The SAS token failed.
    #[error(transparent)]
    Sas(#[from] SasError),
    /// No enrollment (individual or group) matches this registration id and credential.
    #[error("no enrollment matches registration id '{0}'")]
    UnknownRegistration(String),
    /// A group key was used without deriving the device key.
    #[error("the key did not match; group devices must use the key derived from the group key")]
    KeyMismatch,
    /// An X.509 check failed.
    #[error("certificate rejected: {0}")]
    Certificate(String),
    /// The certificate is on the instance's deny list.
    #[error("certificate is revoked: {0}")]
    Revoked(String),
    /// The attestation kind does not match the enrollment.
    #[error("attestation mismatch: {0}")]
    AttestationMismatch(String),
    /// The access policy lacks a right (service API).
    #[error("access policy '{policy}' lacks the {right} right")]
    MissingRight {
        /// Policy name.
        policy: String,
        /// The right required.
        right: &'static str,
    },
    /// Unknown access policy.
    #[error("unknown access policy '{0}'")]
    UnknownPolicy(String),
    /// No instance answers to this host or scope.
    #[error("no provisioning instance answers to '{0}'")]
    UnknownInstance(String),
    /// TPM: no individual TPM enrollment has this registration id (the wire says 404201, as
    /// Azure does for an unknown TPM registration).
    #[error("TPM: no individual enrollment for registration id '{0}'")]
    TpmNotEnrolled(String),
    /// TPM: the endorsement key presented (or the one the activation was made for) is not the
    /// enrollment's.
    #[error("TPM: unknown endorsement key: {0}")]
    TpmUnknownEndorsementKey(String),
    /// TPM: the storage root key differs from the enrollment's or from the one the activation
    /// was made for.
    #[error("TPM: wrong storage root key: {0}")]
    TpmWrongStorageRootKey(String),
    /// TPM: the SAS token is not signed with the key of the device's current activation.
    #[error("TPM: bad signature: {0}")]
    TpmBadSignature(SasError),
    /// TPM: the SAS token is signed with the key of an earlier activation, replaced since by a
    /// newer one.
    #[error("TPM: replayed activation: the token is signed with the key of an earlier activation")]
    TpmReplayedActivation,
    /// TPM: a SAS token, but no activation was issued for this device (or it was removed).
    #[error("TPM: no activation was issued for this device; register without a token first")]
    TpmNoActivation,
    /// TPM attestation over MQTT (Azure does not support it either).
    #[error("TPM attestation is not supported over MQTT")]
    TpmOverMqtt,
}

impl AuthFailure {
    /// One of the TPM attestation refusals (the metrics' attestation label `tpm`).
    pub fn is_tpm(&self) -> bool {
        matches!(
            self,
            AuthFailure::TpmNotEnrolled(_)
                | AuthFailure::TpmUnknownEndorsementKey(_)
                | AuthFailure::TpmWrongStorageRootKey(_)
                | AuthFailure::TpmBadSignature(_)
                | AuthFailure::TpmReplayedActivation
                | AuthFailure::TpmNoActivation
                | AuthFailure::TpmOverMqtt
        )
    }
}

/// Why an assignment ended a registration as `failed` (or told the device to retry). Stored in
/// the registration record as this enum, never as a wire code: [`crate::wire`] decides the
/// `errorCode` and message the device and the service API see.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "camelCase")]
#[non_exhaustive]
pub enum AssignmentFailure {
    /// The enrollment names a device id that is not a valid device id.
    #[error("the enrollment's device id is invalid")]
    InvalidDeviceId,
    /// No linked hub could be chosen: none eligible, the current hub is no longer linked, or
    /// every eligible hub is at its `max_devices`.
    #[error("no IoT hub could be assigned")]
    NoHub,
    /// Every eligible hub's `max_registrations_per_second` is used up (retryable).
    #[error("the linked hubs' provisioning rate is exhausted")]
    HubRateExhausted,
    /// The custom allocation webhook did not choose a hub.
    #[error("custom allocation failed: {failure}")]
    CustomAllocation {
        /// What went wrong with the webhook.
        failure: CustomAllocationFailure,
    },
    /// The hub refused dps's own credentials.
    #[error("DPS is not authorized on the IoT hub")]
    HubUnauthorized,
    /// The hub refused the device identity.
    #[error("the IoT hub refused the device identity")]
    HubRejected,
    /// The hub throttled the identity write (retryable).
    #[error("the IoT hub is throttling")]
    HubThrottled,
    /// The hub could not be reached (retryable).
    #[error("the IoT hub is unavailable")]
    HubUnreachable,
    /// A crash interrupted the assignment; recovery ended it (retryable).
    #[error("the registration was interrupted")]
    Interrupted,
}

impl AssignmentFailure {
    /// May the device succeed by trying again later (the wire says 429 or 503, not `failed`)?
    pub fn is_retryable(&self) -> bool {
        match self {
            AssignmentFailure::HubRateExhausted
            | AssignmentFailure::HubThrottled
            | AssignmentFailure::HubUnreachable
            | AssignmentFailure::Interrupted => true,
            AssignmentFailure::InvalidDeviceId
            | AssignmentFailure::NoHub
            | AssignmentFailure::CustomAllocation { .. }
            | AssignmentFailure::HubUnauthorized
            | AssignmentFailure::HubRejected => false,
        }
    }

    /// Is the cause a rate limit (the device is told it was throttled)?
    pub fn is_throttling(&self) -> bool {
        matches!(
            self,
            AssignmentFailure::HubRateExhausted | AssignmentFailure::HubThrottled
        )
    }
}

/// How the custom allocation webhook failed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "camelCase")]
#[non_exhaustive]
pub enum CustomAllocationFailure {
    /// The custom policy has no `customAllocationDefinition`.
    #[error("no customAllocationDefinition")]
    NoDefinition,
    /// The webhook could not be reached (or timed out).
    #[error("the webhook could not be reached")]
    Unreachable,
    /// The webhook answered a non-2xx status.
    #[error("the webhook answered HTTP {status}")]
    Status {
        /// The HTTP status.
        status: u16,
    },
    /// The webhook's answer is not the JSON expected.
    #[error("invalid response")]
    InvalidResponse,
    /// The answer names no hub.
    #[error("no hub in the response")]
    NoHub,
    /// The answer names a hub that was not offered.
    #[error("the chosen hub is not linked")]
    HubNotLinked,
}

/// The domain error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A malformed or invalid request.
    #[error("{0}")]
    InvalidArgument(String),
    /// Authentication or authorization failed.
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] AuthFailure),
    /// An enrollment, group, registration, certificate, instance... does not exist.
    #[error("{kind} '{id}' not found")]
    NotFound {
        /// What kind of thing.
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// The device asked for an operation that is unknown.
    #[error("operation '{0}' not found")]
    OperationNotFound(String),
    /// ETag mismatch.
    #[error("precondition failed: the etag does not match the current {kind} '{id}'")]
    PreconditionFailed {
        /// What kind of thing.
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// The thing already exists.
    #[error("{kind} '{id}' already exists")]
    Conflict {
        /// What kind of thing.
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// Too many requests.
    #[error("throttled; retry after {retry_after} s")]
    Throttled {
        /// Seconds.
        retry_after: u32,
    },
    /// The registration's assignment failed in a way the device may retry (a linked hub
    /// throttling or unreachable, the hubs' rate used up, an interrupted assignment).
    #[error("assignment failed, retry after {retry_after} s: {failure}")]
    AssignmentRetry {
        /// Why.
        failure: AssignmentFailure,
        /// Seconds.
        retry_after: u32,
    },
    /// An error answer asked for by a fault injection rule (`docs/testing-with-dps.md`).
    #[error("injected fault (rule {rule}): {error_code} {message}")]
    Injected {
        /// The rule.
        rule: String,
        /// The six-digit code the device is sent.
        error_code: u32,
        /// The message the device is sent.
        message: String,
    },
    /// A `drop` fault injection rule closes the device's connection: the transport closes it
    /// instead of answering. `response` is the answer that would have been sent (stage
    /// `response`: the request was processed; HTTPS sends part of it), none when the request
    /// was not processed (stage `register`).
    #[error("injected fault (rule {rule}): connection dropped")]
    Dropped {
        /// The rule.
        rule: String,
        /// The answer the device does not get.
        response: Option<Box<crate::device::DeviceResponse>>,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A bug or an impossible state.
    #[error("internal error: {0}")]
    Internal(String),
    /// The method or route is not supported.
    #[error("{0}")]
    Unsupported(String),
    /// No route answers this path (HTTPS).
    #[error("{0}")]
    NoRoute(String),
    /// A device published to a topic that is not a DPS request topic (MQTT).
    #[error("unknown topic")]
    UnknownTopic,
    /// The request body is larger than the limit.
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// TPM attestation, first step: not an error of the device, but the HTTP answer is a 401
    /// carrying the activation blob (protocol digest §6.5.2).
    #[error("TPM activation challenge")]
    TpmChallenge {
        /// Base64 activation blob (encrypted to the device's EK; not a secret on the wire).
        authentication_key: String,
    },
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    /// Shorthand for [`Error::NotFound`].
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        Error::NotFound {
            kind,
            id: id.into(),
        }
    }
}

impl From<crate::ids::IdError> for Error {
    fn from(e: crate::ids::IdError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

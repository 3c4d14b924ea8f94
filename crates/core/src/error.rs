//! The domain error. Client mistakes and our own failures are kept apart; [`crate::wire`] is the
//! only place that turns them into DPS wire errors.

use crate::hub::HubError;
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
    /// A linked hub could not be reached or throttled us; the device should retry.
    #[error("linked hub unavailable: {0}")]
    HubUnavailable(HubError),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A bug or an impossible state.
    #[error("internal error: {0}")]
    Internal(String),
    /// The method or route is not supported.
    #[error("{0}")]
    Unsupported(String),
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

//! The linked-hub port: what dps does to a hub when it assigns a device.
//!
//! Contract for implementers: every call is a network call that can fail or be slow; it must be
//! idempotent (dps retries after crashes and re-registrations), and must bound its own time.

use crate::model::{DeviceCapabilities, TwinState};
use async_trait::async_trait;

/// How the device authenticates to the hub.
#[derive(Clone, PartialEq, Eq)]
pub enum HubAuth {
    /// Symmetric keys (base64).
    SymmetricKey {
        /// Primary.
        primary: String,
        /// Secondary.
        secondary: String,
    },
    /// X.509 "self-signed" with thumbprints of the device certificate (SHA-256 hex, uppercase).
    X509Thumbprint {
        /// Primary thumbprint.
        primary: String,
        /// Secondary thumbprint.
        secondary: Option<String>,
    },
}

impl std::fmt::Debug for HubAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HubAuth::SymmetricKey { .. } => f.write_str("SymmetricKey(<redacted>)"),
            HubAuth::X509Thumbprint { primary, .. } => write!(f, "X509Thumbprint({primary})"),
        }
    }
}

/// The identity dps creates on a hub.
#[derive(Debug, Clone, PartialEq)]
pub struct HubIdentity {
    /// Device id.
    pub device_id: String,
    /// Authentication.
    pub auth: HubAuth,
    /// Capabilities.
    pub capabilities: DeviceCapabilities,
    /// Enabled?
    pub enabled: bool,
}

/// A hub call failed. `Display` hides secret fragments an adapter's message may echo (see
/// [`crate::redact::scrub`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// The hub refused dps's credentials (401/403): rotated keys, wrong policy.
    #[error("hub {hub} refused dps's credentials: {}", crate::redact::scrub(.message))]
    Unauthorized {
        /// Hub host.
        hub: String,
        /// Detail.
        message: String,
    },
    /// Network failure, timeout, 5xx.
    #[error("hub {hub} unreachable: {}", crate::redact::scrub(.message))]
    Unreachable {
        /// Hub host.
        hub: String,
        /// Detail.
        message: String,
    },
    /// 429.
    #[error("hub {hub} throttled; retry after {retry_after} s")]
    Throttled {
        /// Hub host.
        hub: String,
        /// Seconds.
        retry_after: u32,
    },
    /// The hub rejected the request itself (4xx other than auth/throttle).
    #[error("hub {hub} rejected the request: {}", crate::redact::scrub(.message))]
    Rejected {
        /// Hub host.
        hub: String,
        /// Detail.
        message: String,
    },
}

/// A linked hub.
#[async_trait]
pub trait HubAdapter: Send + Sync + 'static {
    /// Create or update the identity; when `twin` is `Some`, replace tags and desired properties
    /// with it, otherwise keep the existing twin.
    async fn upsert_device(
        &self,
        identity: &HubIdentity,
        twin: Option<&TwinState>,
    ) -> Result<(), HubError>;
    /// Read the twin (tags and desired properties), `None` if the device does not exist.
    async fn get_twin(&self, device_id: &str) -> Result<Option<TwinState>, HubError>;
    /// Enable or disable the identity (a missing device is not an error).
    async fn set_enabled(&self, device_id: &str, enabled: bool) -> Result<(), HubError>;
    /// Delete the identity (a missing device is not an error).
    async fn delete_device(&self, device_id: &str) -> Result<(), HubError>;
    /// For a hub kept in dps's own store (the built-in registry): the store write that
    /// [`upsert_device`](Self::upsert_device) would make, without making it, so that the engine
    /// commits the identity, the registration record and the audit entry in one transaction.
    /// `None` (the default) for hubs outside the store, which get `upsert_device`.
    async fn identity_write(
        &self,
        _identity: &HubIdentity,
        _twin: Option<&TwinState>,
    ) -> Result<Option<crate::store::Write>, HubError> {
        Ok(None)
    }
}

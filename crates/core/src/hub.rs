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

/// The fingerprint of an identity write: SHA-256 (lowercase hex) over a canonical JSON array of
/// exactly what decides the hub's state for the device, in a fixed order: the hub (lowercased
/// host and kind), the device id, the credentials as sent to the hub (keys or thumbprints), the
/// capabilities, the enabled state, the version (ETag) of the enrollment that admitted the
/// device, and the hub's `write_epoch` option. The engine compares it with the one stored in the
/// registration record to skip a write that would change nothing (see `docs/linked-hubs.md`).
///
/// The twin is not part of it: a write that carries a twin (initial assignment, reset policy,
/// migration) is never skipped, because the twin on the hub may have changed since.
pub fn write_fingerprint(
    hub: &crate::instance::LinkedHub,
    identity: &HubIdentity,
    enrollment_etag: Option<&str>,
) -> String {
    use sha2::{Digest, Sha256};
    let auth = match &identity.auth {
        HubAuth::SymmetricKey { primary, secondary } => {
            serde_json::json!(["symmetricKey", primary, secondary])
        }
        HubAuth::X509Thumbprint { primary, secondary } => {
            serde_json::json!(["x509", primary, secondary])
        }
    };
    let canonical = serde_json::json!([
        "dps-hub-write-v1",
        hub.host.to_ascii_lowercase(),
        hub.kind.as_str(),
        identity.device_id,
        auth,
        identity.capabilities.iot_edge,
        identity.enabled,
        enrollment_etag,
        hub.options.get("write_epoch"),
    ]);
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
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

//! The Azure DPS JSON models (protocol digest §2 and §7.6), shared by the service API, the
//! device API, the store and the clients.
//!
//! Field names and shapes follow Azure exactly; optional fields are omitted when absent.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// `enabled` or `disabled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProvisioningStatus {
    /// Devices may register (the default).
    #[default]
    Enabled,
    /// Devices are refused with `disabled`.
    Disabled,
}

impl ProvisioningStatus {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
        }
    }
}

impl Serialize for ProvisioningStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
impl<'de> Deserialize<'de> for ProvisioningStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.to_ascii_lowercase().as_str() {
            "enabled" => Ok(Self::Enabled),
            "disabled" => Ok(Self::Disabled),
            _ => Err(serde::de::Error::custom(format!(
                "provisioningStatus must be 'enabled' or 'disabled', not '{s}'"
            ))),
        }
    }
}

/// The allocation policy of an enrollment or instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AllocationPolicy {
    /// Evenly weighted distribution (rendezvous hashing).
    #[default]
    Hashed,
    /// Lowest latency: the hub nearest to the receiving node.
    GeoLatency,
    /// The enrollment's single hub.
    Static,
    /// A webhook decides.
    Custom,
}

impl AllocationPolicy {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hashed => "hashed",
            Self::GeoLatency => "geoLatency",
            Self::Static => "static",
            Self::Custom => "custom",
        }
    }
}
impl Serialize for AllocationPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
impl<'de> Deserialize<'de> for AllocationPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.to_ascii_lowercase().as_str() {
            "hashed" => Ok(Self::Hashed),
            "geolatency" => Ok(Self::GeoLatency),
            "static" => Ok(Self::Static),
            "custom" => Ok(Self::Custom),
            _ => Err(serde::de::Error::custom(format!(
                "allocationPolicy must be one of hashed, geoLatency, static, custom; not '{s}'"
            ))),
        }
    }
}

/// Attestation type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AttestationType {
    /// No attestation (not usable by devices).
    None,
    /// TPM 2.0 endorsement key.
    Tpm,
    /// X.509 certificates.
    X509,
    /// Symmetric keys.
    SymmetricKey,
}

impl AttestationType {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Tpm => "tpm",
            Self::X509 => "x509",
            Self::SymmetricKey => "symmetricKey",
        }
    }
}

/// `{ "primaryKey", "secondaryKey" }`.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyAttestation {
    /// Base64 primary key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    /// Base64 secondary key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
}

impl std::fmt::Debug for SymmetricKeyAttestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SymmetricKeyAttestation { <redacted> }")
    }
}

/// `{ "endorsementKey", "storageRootKey" }`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmAttestation {
    /// Base64 TPM2B_PUBLIC of the EK.
    #[serde(default)]
    pub endorsement_key: String,
    /// Base64 TPM2B_PUBLIC of the SRK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_root_key: Option<String>,
}

/// Parsed information about a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CertificateInfo {
    /// Subject distinguished name.
    pub subject_name: String,
    /// Hex SHA-1 of the DER.
    pub sha1_thumbprint: String,
    /// Hex SHA-256 of the DER.
    pub sha256_thumbprint: String,
    /// Issuer distinguished name.
    pub issuer_name: String,
    /// Start of validity.
    pub not_before_utc: String,
    /// End of validity.
    pub not_after_utc: String,
    /// Hex serial number.
    pub serial_number: String,
    /// X.509 version (3 for v3).
    pub version: i64,
}

/// A certificate with its info. On input `certificate` is PEM or base64 DER; stored as base64
/// DER; on output it is omitted and `info` is filled in.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CertificateWithInfo {
    /// The certificate (PEM or base64 DER).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Parsed info.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<X509CertificateInfo>,
}

/// Primary and secondary certificates.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Certificates {
    /// Primary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<X509CertificateWithInfo>,
    /// Secondary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secondary: Option<X509CertificateWithInfo>,
}

/// References to CA certificates registered in the instance.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CaReferences {
    /// Primary CA name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Secondary CA name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secondary: Option<String>,
}

/// X.509 attestation: exactly one of the three.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Attestation {
    /// Individual enrollments: the device's own certificates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_certificates: Option<X509Certificates>,
    /// Groups: root or intermediate certificates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_certificates: Option<X509Certificates>,
    /// Groups: verified CA certificates of the instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_references: Option<X509CaReferences>,
}

/// The attestation mechanism.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestationMechanism {
    /// Which kind.
    #[serde(rename = "type")]
    pub kind: AttestationType,
    /// TPM details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmAttestation>,
    /// X.509 details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509Attestation>,
    /// Symmetric keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyAttestation>,
}

impl AttestationMechanism {
    /// The same mechanism without secrets (symmetric keys) and without certificate bodies:
    /// what GET, query and webhooks return.
    pub fn redacted(&self) -> Self {
        let mut m = self.clone();
        if let Some(sk) = &mut m.symmetric_key {
            sk.primary_key = None;
            sk.secondary_key = None;
        }
        m.strip_certificate_bodies();
        m
    }

    /// Drop `certificate` texts, keeping `info`.
    pub fn strip_certificate_bodies(&mut self) {
        if let Some(x) = &mut self.x509 {
            for c in [&mut x.client_certificates, &mut x.signing_certificates]
                .into_iter()
                .flatten()
            {
                for cert in [&mut c.primary, &mut c.secondary].into_iter().flatten() {
                    cert.certificate = None;
                }
            }
        }
    }
}

/// `{ "iotEdge": bool }`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCapabilities {
    /// Is the device an IoT Edge device?
    #[serde(default)]
    pub iot_edge: bool,
}

/// Twin properties.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TwinProperties {
    /// Desired properties.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired: Option<Value>,
}

/// `{ "tags", "properties": { "desired" } }`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TwinState {
    /// Tags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Value>,
    /// Properties.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<TwinProperties>,
}

impl TwinState {
    /// The twin with `$metadata` / `$version` removed from its collections, ready for a hub.
    pub fn for_hub(&self) -> TwinState {
        fn strip(v: &Option<Value>) -> Option<Value> {
            v.as_ref().map(|v| match v {
                Value::Object(m) => Value::Object(
                    m.iter()
                        .filter(|(k, _)| !k.starts_with('$'))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                ),
                other => other.clone(),
            })
        }
        TwinState {
            tags: strip(&self.tags),
            properties: self.properties.as_ref().map(|p| TwinProperties {
                desired: strip(&p.desired),
            }),
        }
    }
}

/// `{ "updateHubAssignment", "migrateDeviceData" }`, both default true.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    /// Run allocation again on re-registration.
    #[serde(default = "yes")]
    pub update_hub_assignment: bool,
    /// Carry the twin when the hub changes.
    #[serde(default = "yes")]
    pub migrate_device_data: bool,
}

fn yes() -> bool {
    true
}

impl Default for ReprovisionPolicy {
    fn default() -> Self {
        Self {
            update_hub_assignment: true,
            migrate_device_data: true,
        }
    }
}

/// The custom allocation webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomAllocationDefinition {
    /// Where to POST.
    pub webhook_url: String,
    /// The API version of the enrollment schema sent to it.
    pub api_version: String,
}

/// Fields common to individual enrollments and groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentSettings {
    /// Attestation.
    pub attestation: AttestationMechanism,
    /// Capabilities.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    /// Legacy single hub.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    /// Initial twin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<TwinState>,
    /// ETag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Enabled or disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provisioning_status: Option<ProvisioningStatus>,
    /// Reprovisioning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    /// Created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Last updated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// Allocation policy; absent means the instance default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<AllocationPolicy>,
    /// The hubs this enrollment may use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    /// Custom allocation webhook.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
    /// Credential policy (>= 2025-07-01-preview).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_policy_name: Option<String>,
}

impl EnrollmentSettings {
    /// Enabled unless `provisioningStatus` is `disabled`.
    pub fn enabled(&self) -> bool {
        self.provisioning_status != Some(ProvisioningStatus::Disabled)
    }
    /// The reprovision policy, defaulted.
    pub fn reprovision(&self) -> ReprovisionPolicy {
        self.reprovision_policy.unwrap_or_default()
    }
}

/// An individual enrollment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndividualEnrollment {
    /// The device's registration id.
    pub registration_id: String,
    /// Device id on the hub (defaults to the registration id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Read-only: the current registration state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationState>,
    /// Free-form device information.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optional_device_information: Option<Value>,
    /// Shared settings.
    #[serde(flatten)]
    pub settings: EnrollmentSettings,
}

/// An enrollment group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentGroup {
    /// Group id.
    pub enrollment_group_id: String,
    /// Shared settings.
    #[serde(flatten)]
    pub settings: EnrollmentSettings,
}

/// Registration status values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RegistrationStatus {
    /// Not assigned.
    Unassigned,
    /// In progress.
    Assigning,
    /// Done.
    Assigned,
    /// Failed (with errorCode / errorMessage).
    Failed,
    /// The enrollment is disabled.
    Disabled,
}

impl RegistrationStatus {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unassigned => "unassigned",
            Self::Assigning => "assigning",
            Self::Assigned => "assigned",
            Self::Failed => "failed",
            Self::Disabled => "disabled",
        }
    }
}

/// Substatus of an assigned registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Substatus {
    /// First assignment (or same hub again).
    InitialAssignment,
    /// Moved, twin carried.
    DeviceDataMigrated,
    /// Moved (or reset), twin reset to the initial twin.
    DeviceDataReset,
    /// Moved back to a hub it had before.
    ReprovisionedToInitialAssignment,
}

/// `{ "enrollmentGroupId" }` under `symmetricKey` in a registration result.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyRegistrationResult {
    /// The group, when registered through one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
}

/// X.509 part of a registration result.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509RegistrationResult {
    /// The device certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_info: Option<X509CertificateInfo>,
    /// The group, when registered through one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// The certificate that admitted it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_certificate_info: Option<X509CertificateInfo>,
}

/// The registration state (device-API `registrationState` and service-API registration record).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistrationState {
    /// Registration id.
    pub registration_id: String,
    /// Created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Assigned hub host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    /// Device id on the hub.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<RegistrationStatus>,
    /// Substatus (assigned only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub substatus: Option<Substatus>,
    /// Six-digit error code (failed only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    /// Error message (failed only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// Last updated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// ETag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Custom allocation payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// Symmetric-key details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyRegistrationResult>,
    /// X.509 details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509RegistrationResult>,
    /// TPM details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Value>,
    /// Issued certificate chain (CSR flow).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issued_certificate_chain: Option<Vec<String>>,
}

/// The device-API operation response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationOperationStatus {
    /// Operation id (empty string for a disabled enrollment, as Azure sends).
    pub operation_id: String,
    /// Status.
    pub status: RegistrationStatus,
    /// The registration state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationState>,
}

/// The device-API request body (tolerant: every field optional).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistration {
    /// Registration id (the transport's id wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    /// TPM keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmAttestation>,
    /// Custom payload, any JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// CSR (base64 DER).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

impl DeviceRegistration {
    /// Parse a request body leniently: empty, whitespace or `{}` bodies are an empty request.
    pub fn parse_lenient(body: &[u8]) -> Result<Self, serde_json::Error> {
        let trimmed = body
            .iter()
            .copied()
            .skip_while(|b| b.is_ascii_whitespace())
            .collect::<Vec<_>>();
        if trimmed.is_empty() {
            return Ok(Self::default());
        }
        serde_json::from_slice(body)
    }
}

/// The DPS error body (§1.5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Six-digit code; `errorCode / 1000` is the HTTP status.
    pub error_code: u32,
    /// Tracking id (also in `x-ms-request-id`).
    pub tracking_id: String,
    /// Human-readable message.
    pub message: String,
    /// When.
    pub timestamp_utc: String,
    /// Extra details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<Value>,
}

/// Bulk operation mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BulkMode {
    /// Create; fail items that exist.
    Create,
    /// Upsert.
    Update,
    /// Upsert with each item's etag checked.
    UpdateIfMatchETag,
    /// Delete.
    Delete,
}

/// Bulk request for individual enrollments.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperation {
    /// Mode.
    pub mode: BulkMode,
    /// Items.
    #[serde(default)]
    pub enrollments: Vec<Value>,
}

/// Bulk request for groups.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentGroupOperation {
    /// Mode.
    pub mode: BulkMode,
    /// Items.
    #[serde(default)]
    pub enrollment_groups: Vec<Value>,
}

/// One failed bulk item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperationError {
    /// Item id (registration id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    /// Item id (group id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// Error code.
    pub error_code: u32,
    /// Message.
    pub error_status: String,
}

/// Bulk result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperationResult {
    /// All items succeeded.
    pub is_successful: bool,
    /// Failed items.
    pub errors: Vec<BulkEnrollmentOperationError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrollment_round_trips_all_fields() {
        let json = serde_json::json!({
            "registrationId": "dev1",
            "deviceId": "hubdev1",
            "optionalDeviceInformation": {"a": 1},
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "a2V5", "secondaryKey": "a2V5Mg=="}},
            "capabilities": {"iotEdge": true},
            "iotHubHostName": "hub1",
            "initialTwin": {"tags": {"t": 1}, "properties": {"desired": {"d": 2}}},
            "etag": "e1",
            "provisioningStatus": "disabled",
            "reprovisionPolicy": {"updateHubAssignment": false, "migrateDeviceData": true},
            "createdDateTimeUtc": "2026-01-01T00:00:00.0000000Z",
            "lastUpdatedDateTimeUtc": "2026-01-01T00:00:00.0000000Z",
            "allocationPolicy": "geoLatency",
            "iotHubs": ["hub1", "hub2"],
            "customAllocationDefinition": {"webhookUrl": "https://x", "apiVersion": "2021-10-01"}
        });
        let e: IndividualEnrollment = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(&e).unwrap(), json);
    }

    #[test]
    fn allocation_policy_accepts_lowercase_geolatency() {
        let p: AllocationPolicy = serde_json::from_str("\"geolatency\"").unwrap();
        assert_eq!(p, AllocationPolicy::GeoLatency);
        assert!(serde_json::from_str::<AllocationPolicy>("\"nearest\"").is_err());
    }

    #[test]
    fn lenient_device_registration() {
        assert_eq!(
            DeviceRegistration::parse_lenient(b" ").unwrap(),
            DeviceRegistration::default()
        );
        assert_eq!(
            DeviceRegistration::parse_lenient(b"{}").unwrap(),
            DeviceRegistration::default()
        );
        let r = DeviceRegistration::parse_lenient(br#"{"registrationId":"d","payload":[1,2]}"#)
            .unwrap();
        assert_eq!(r.payload, Some(serde_json::json!([1, 2])));
    }

    #[test]
    fn redaction_drops_keys_and_certificate_bodies() {
        let m = AttestationMechanism {
            kind: AttestationType::SymmetricKey,
            tpm: None,
            x509: None,
            symmetric_key: Some(SymmetricKeyAttestation {
                primary_key: Some("k".into()),
                secondary_key: Some("k2".into()),
            }),
        };
        let r = serde_json::to_value(m.redacted()).unwrap();
        assert_eq!(
            r,
            serde_json::json!({"type": "symmetricKey", "symmetricKey": {}})
        );
    }
}

/// The registration record dps stores (internal; [`RegistrationRecord::state`] is what the wire
/// shows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationRecord {
    /// The wire view.
    pub state: DeviceRegistrationState,
    /// The current operation id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    /// Earlier operation ids of this device (most recent last, at most 16), so that a device
    /// polling an operation that a concurrent or retried registration superseded still gets the
    /// current answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_operations: Vec<String>,
    /// The group that admitted the device, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// Attestation type used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestationType>,
    /// Hubs the device was assigned to before, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hub_history: Vec<String>,
    /// Why the last assignment failed (domain terms; the wire code and message in `state`
    /// are rendered from it by `dps_core::wire::assignment_failure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<crate::error::AssignmentFailure>,
    /// A precise, operator-facing reason for the last failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Work in flight (intent log): present while `assigning`, so that a crash between the hub
    /// write and the record write is finished on restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingAssignment>,
    /// For a retryable failure: how long the device should wait (e.g. the hub's own Retry-After).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u32>,
    /// Transport of the last attempt (`https`, `mqtt`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// What dps last wrote to the assigned hub for this device (a hub outside dps's store), so
    /// that a re-registration that would write the same again does not write at all. Cleared
    /// whenever the hub's state is no longer known to match (failure, disabled, intent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_write: Option<HubWrite>,
    /// The last certificate dps issued to this device (certificate issuance). Its chain goes
    /// to the device only in the answer of the operation that issued it (never in status
    /// lookups nor in the service API's registration records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued: Option<IssuedCertificateRef>,
    /// An identity of this device that the clean-up worker is removing from a hub right now
    /// (a fence): a registration that would write that identity waits until the removal is
    /// done or the fence has expired, so that a removal never lands after the identity was
    /// written again, whichever nodes the two run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removing: Option<Removing>,
}

/// The fence of an identity removal in progress (see [`RegistrationRecord::removing`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Removing {
    /// The hub.
    pub hub: String,
    /// The device id.
    pub device_id: String,
    /// The fence holds until then (Unix ms).
    pub until_ms: i64,
}

/// A certificate dps issued to a device, as kept with its registration record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCertificateRef {
    /// Serial number (uppercase hex).
    pub serial_number: String,
    /// SHA-256 thumbprint of the leaf (uppercase hex).
    pub sha256_thumbprint: String,
    /// Validity start.
    pub not_before_utc: String,
    /// Validity end.
    pub not_after_utc: String,
    /// The credential policy that issued it.
    pub policy: String,
    /// When it was issued (Unix seconds), for the renewal rate limit.
    pub issued_unix: i64,
    /// The operation that issued it.
    pub operation_id: String,
    /// The chain (base64 DER, leaf first, ending with the root).
    pub chain: Vec<String>,
}

/// The fingerprint of the last identity write to a hub (`dps_core::hub::write_fingerprint`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubWrite {
    /// The hub written to (host as linked).
    pub hub: String,
    /// SHA-256 (lowercase hex) of the canonical form of the write.
    pub sha256: String,
}

/// An assignment that was decided but not yet confirmed on the hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingAssignment {
    /// Target hub.
    pub hub: String,
    /// Device id.
    pub device_id: String,
    /// Started at (Azure format).
    pub started: String,
    /// The node that writes the identity (its id for this run, see
    /// `dps_core::store::NodeBeat`): the intent is its own until its heartbeat lapses. `None` in
    /// records written before nodes had ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

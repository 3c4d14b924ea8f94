//! Provisioning instances: ID scope, service host names, access policies and linked hubs.

use crate::model::AllocationPolicy;
use serde::{Deserialize, Serialize};

/// A right of a shared access policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Right {
    /// Admin API (instances, linked hubs, policies, certificates).
    ServiceConfig,
    /// Read enrollments and groups.
    EnrollmentRead,
    /// Write enrollments and groups.
    EnrollmentWrite,
    /// Read registration records.
    RegistrationStatusRead,
    /// Delete registration records.
    RegistrationStatusWrite,
}

impl Right {
    /// All rights.
    pub const ALL: [Right; 5] = [
        Right::ServiceConfig,
        Right::EnrollmentRead,
        Right::EnrollmentWrite,
        Right::RegistrationStatusRead,
        Right::RegistrationStatusWrite,
    ];
    /// Name.
    pub fn as_str(self) -> &'static str {
        match self {
            Right::ServiceConfig => "ServiceConfig",
            Right::EnrollmentRead => "EnrollmentRead",
            Right::EnrollmentWrite => "EnrollmentWrite",
            Right::RegistrationStatusRead => "RegistrationStatusRead",
            Right::RegistrationStatusWrite => "RegistrationStatusWrite",
        }
    }
}

/// A shared access policy.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub struct AccessPolicy {
    /// Policy name (`skn`).
    pub name: String,
    /// Base64 primary key.
    pub primary_key: String,
    /// Base64 secondary key.
    pub secondary_key: String,
    /// Rights.
    pub rights: Vec<Right>,
}

impl std::fmt::Debug for AccessPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessPolicy")
            .field("name", &self.name)
            .field("rights", &self.rights)
            .finish_non_exhaustive()
    }
}

impl AccessPolicy {
    /// A policy with every right and fresh keys.
    pub fn owner(name: &str) -> Self {
        AccessPolicy {
            name: name.to_string(),
            primary_key: crate::sas::generate_key(),
            secondary_key: crate::sas::generate_key(),
            rights: Right::ALL.to_vec(),
        }
    }
    /// Does it grant `r`?
    pub fn has(&self, r: Right) -> bool {
        self.rights.contains(&r)
    }
    /// The policy with keys hidden.
    pub fn redacted(&self) -> Self {
        AccessPolicy {
            primary_key: crate::redact::REDACTED.into(),
            secondary_key: crate::redact::REDACTED.into(),
            ..self.clone()
        }
    }
}

fn default_weight() -> u32 {
    1
}
fn yes() -> bool {
    true
}

/// The adapter kind of a linked hub. Serialized as its configuration name (`registry`,
/// `mosquitto`, `azure-iothub`, `webhook`, `broker-auth`), the one list of kinds every layer uses: config
/// files, the admin API, stored instances and the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HubKind {
    /// The built-in device registry (identities and twins in dps's own store).
    #[default]
    Registry,
    /// Mosquitto 2.x through its dynamic-security plugin.
    Mosquitto,
    /// Azure IoT Hub through its service REST API.
    AzureIotHub,
    /// A generic signed webhook.
    Webhook,
    /// An MQTT broker that delegates authentication and authorization to dps over HTTP
    /// (RabbitMQ's HTTP auth backend, EMQX HTTP authn/authz, VerneMQ webhooks,
    /// mosquitto-go-auth): identities and twins kept in dps's own store, as for `registry`.
    BrokerAuth,
}

impl HubKind {
    /// Every kind, in the order the docs and errors list them.
    pub const ALL: [HubKind; 5] = [
        HubKind::Registry,
        HubKind::Mosquitto,
        HubKind::AzureIotHub,
        HubKind::Webhook,
        HubKind::BrokerAuth,
    ];

    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            HubKind::Registry => "registry",
            HubKind::Mosquitto => "mosquitto",
            HubKind::AzureIotHub => "azure-iothub",
            HubKind::Webhook => "webhook",
            HubKind::BrokerAuth => "broker-auth",
        }
    }
}

impl std::fmt::Display for HubKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A hub kind name that is not one of [`HubKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind '{0}' (known: {known})", known = HubKind::ALL.map(HubKind::as_str).join(", "))]
pub struct UnknownHubKind(pub String);

impl std::str::FromStr for HubKind {
    type Err = UnknownHubKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HubKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownHubKind(s.to_string()))
    }
}

impl Serialize for HubKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for HubKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A linked hub. Its `Debug` hides the connection string and the secret options.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "LinkedHubDoc")]
pub struct LinkedHub {
    /// Host name devices are told (`assignedHub`).
    pub host: String,
    /// Adapter kind (default `registry`).
    pub kind: HubKind,
    /// Weight for hashed allocation (1..=1000).
    pub allocation_weight: u32,
    /// Whether allocation may pick it.
    pub apply_allocation_policy: bool,
    /// Region name (e.g. `eastus`), for geoLatency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Adapter connection string or URL (secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_string: Option<String>,
    /// Maximum number of devices allocation may place on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_devices: Option<u64>,
    /// Maximum new assignments per second allocation may send to it (token bucket, burst of one
    /// second's worth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_registrations_per_second: Option<u32>,
    /// Adapter-specific options.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub options: serde_json::Map<String, serde_json::Value>,
}

/// A linked hub as written (config file, admin API body, stored instance), with its kind still
/// text: parsing the kind here, where the host is known, lets an unknown kind name its hub
/// (`linked hub 'h': unknown kind 'x' (known: ...)`) wherever a hub is read.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
struct LinkedHubDoc {
    host: String,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default = "default_weight")]
    allocation_weight: u32,
    #[serde(default = "yes")]
    apply_allocation_policy: bool,
    #[serde(default)]
    location: Option<String>,
    #[serde(default)]
    connection_string: Option<String>,
    #[serde(default)]
    max_devices: Option<u64>,
    #[serde(default)]
    max_registrations_per_second: Option<u32>,
    #[serde(default)]
    options: serde_json::Map<String, serde_json::Value>,
}

impl TryFrom<LinkedHubDoc> for LinkedHub {
    type Error = String;
    fn try_from(d: LinkedHubDoc) -> Result<Self, String> {
        let kind = match d.kind {
            Some(k) => k
                .parse()
                .map_err(|e| format!("linked hub '{}': {e}", d.host))?,
            None => HubKind::default(),
        };
        Ok(LinkedHub {
            host: d.host,
            kind,
            allocation_weight: d.allocation_weight,
            apply_allocation_policy: d.apply_allocation_policy,
            location: d.location,
            connection_string: d.connection_string,
            max_devices: d.max_devices,
            max_registrations_per_second: d.max_registrations_per_second,
            options: d.options,
        })
    }
}

impl LinkedHub {
    /// A built-in registry hub.
    pub fn registry(host: &str) -> Self {
        Self::new(host, HubKind::Registry)
    }
    /// A hub of `kind` with the defaults of a config file entry.
    pub fn new(host: &str, kind: HubKind) -> Self {
        LinkedHub {
            host: host.to_string(),
            kind,
            allocation_weight: default_weight(),
            apply_allocation_policy: true,
            location: None,
            connection_string: None,
            max_devices: None,
            max_registrations_per_second: None,
            options: Default::default(),
        }
    }
    /// The hub with secrets hidden: the connection string, and the options the
    /// [redaction rule](crate::redact) names secret.
    pub fn redacted(&self) -> Self {
        let mut h = self.clone();
        if h.connection_string.is_some() {
            h.connection_string = Some(crate::redact::REDACTED.into());
        }
        crate::redact::redact_map_in_place(&mut h.options);
        h
    }
}

impl std::fmt::Debug for LinkedHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = self.redacted();
        f.debug_struct("LinkedHub")
            .field("host", &h.host)
            .field("kind", &h.kind)
            .field("allocation_weight", &h.allocation_weight)
            .field("apply_allocation_policy", &h.apply_allocation_policy)
            .field("location", &h.location)
            .field("connection_string", &h.connection_string)
            .field("max_devices", &h.max_devices)
            .field(
                "max_registrations_per_second",
                &h.max_registrations_per_second,
            )
            .field("options", &h.options)
            .finish()
    }
}

/// How the register call answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterResponse {
    /// `202 assigning` with an operation id; the first poll has the result (Azure's behaviour).
    #[default]
    Accepted,
    /// `200 assigned` directly when the work is done in time.
    Immediate,
}

/// A provisioning instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub struct Instance {
    /// Name.
    pub name: String,
    /// ID scope.
    pub id_scope: String,
    /// Service-API host names this instance answers to.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Access policies.
    #[serde(default)]
    pub access_policy: Vec<AccessPolicy>,
    /// Linked hubs.
    #[serde(default)]
    pub linked_hub: Vec<LinkedHub>,
    /// Default allocation policy (not `custom`).
    #[serde(default)]
    pub allocation_policy: AllocationPolicy,
    /// Register response mode.
    #[serde(default)]
    pub register_response: RegisterResponse,
    /// Credential policies: the CAs that sign devices' CSRs (certificate issuance).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credential_policy: Vec<crate::issuance::CredentialPolicy>,
}

impl Instance {
    /// Find a credential policy by name (case-insensitive).
    pub fn credential_policy(&self, name: &str) -> Option<&crate::issuance::CredentialPolicy> {
        self.credential_policy
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }
    /// Find an access policy by name.
    pub fn policy(&self, name: &str) -> Option<&AccessPolicy> {
        self.access_policy.iter().find(|p| p.name == name)
    }
    /// Find a linked hub by host (case-insensitive).
    pub fn hub(&self, host: &str) -> Option<&LinkedHub> {
        self.linked_hub
            .iter()
            .find(|h| h.host.eq_ignore_ascii_case(host))
    }
    /// The instance with secrets hidden.
    pub fn redacted(&self) -> Self {
        Instance {
            access_policy: self
                .access_policy
                .iter()
                .map(AccessPolicy::redacted)
                .collect(),
            linked_hub: self.linked_hub.iter().map(LinkedHub::redacted).collect(),
            ..self.clone()
        }
    }
    /// Validate invariants.
    pub fn validate(&self) -> Result<(), String> {
        crate::ids::InstanceName::parse(&self.name).map_err(|e| e.to_string())?;
        crate::ids::IdScope::parse(&self.id_scope).map_err(|e| e.to_string())?;
        if self.allocation_policy == AllocationPolicy::Custom {
            return Err(format!(
                "instance '{}': 'custom' cannot be the default allocation policy",
                self.name
            ));
        }
        for p in &self.access_policy {
            if !crate::sas::valid_key(&p.primary_key) || !crate::sas::valid_key(&p.secondary_key) {
                return Err(format!(
                    "access policy '{}': keys must be base64 of 16 to 64 bytes",
                    p.name
                ));
            }
        }
        for h in &self.linked_hub {
            crate::ids::HubHost::parse(&h.host).map_err(|e| e.to_string())?;
            if !(1..=1000).contains(&h.allocation_weight) {
                return Err(format!(
                    "linked hub '{}': allocation_weight must be 1 to 1000",
                    h.host
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_kinds_serialize_as_their_config_names() {
        for (k, name) in
            HubKind::ALL
                .into_iter()
                .zip(["registry", "mosquitto", "azure-iothub", "webhook"])
        {
            assert_eq!(serde_json::to_value(k).unwrap(), name);
            assert_eq!(serde_json::from_value::<HubKind>(name.into()).unwrap(), k);
            assert_eq!(name.parse::<HubKind>().unwrap(), k);
        }
    }

    #[test]
    fn a_linked_hub_reads_as_before_and_an_unknown_kind_names_its_hub() {
        let h: LinkedHub = serde_json::from_value(serde_json::json!({"host": "h1"})).unwrap();
        assert_eq!(h, LinkedHub::registry("h1"));
        assert_eq!(
            serde_json::to_value(&h).unwrap(),
            serde_json::json!({"host": "h1", "kind": "registry", "allocation_weight": 1, "apply_allocation_policy": true})
        );
        let h: LinkedHub =
            serde_json::from_value(serde_json::json!({"host": "h2", "kind": "azure-iothub"}))
                .unwrap();
        assert_eq!(h.kind, HubKind::AzureIotHub);
        let e = serde_json::from_value::<LinkedHub>(serde_json::json!({"host": "h", "kind": "x"}))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "linked hub 'h': unknown kind 'x' (known: registry, mosquitto, azure-iothub, webhook, broker-auth)"
        );
    }
}

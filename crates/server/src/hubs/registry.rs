//! The built-in device registry hub (`kind = "registry"`): identities and twins kept in dps's
//! own store, listable with `dps hub device list`, so that the emulator works with no hub at all.

use dps_core::clock::azure_timestamp;
use dps_core::hub::{HubAdapter, HubAuth, HubError, HubIdentity};
use dps_core::model::{DeviceCapabilities, TwinState};
use dps_core::store::{Collection, Doc, DocIndex, Expect, Store, StoreError, Write};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A device identity in the built-in registry, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredHubDevice {
    /// Device id.
    pub device_id: String,
    /// Hub host.
    pub hub: String,
    /// `enabled` or `disabled`.
    pub status: String,
    /// Authentication (`type` = `sas` with keys, or `selfSigned` with thumbprints).
    pub authentication: serde_json::Value,
    /// Capabilities.
    pub capabilities: DeviceCapabilities,
    /// Twin.
    pub twin: TwinState,
    /// Last change.
    pub last_updated_date_time_utc: String,
}

impl StoredHubDevice {
    /// The public view: keys removed.
    pub fn public(&self, etag: &str) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("serializable");
        if let Some(sk) = v.pointer_mut("/authentication/symmetricKey") {
            *sk = serde_json::json!({});
        }
        v["etag"] = serde_json::Value::String(etag.to_string());
        v
    }
}

/// The registry hub adapter.
pub struct RegistryHub {
    store: Arc<dyn Store>,
    host: String,
}

impl RegistryHub {
    /// A registry for `host`, stored in the `HubDevice` collection under scope = host.
    pub fn new(store: Arc<dyn Store>, host: &str) -> Self {
        RegistryHub {
            store,
            host: host.to_ascii_lowercase(),
        }
    }

    fn err(&self, e: StoreError) -> HubError {
        HubError::Unreachable {
            hub: self.host.clone(),
            message: e.to_string(),
        }
    }

    async fn load(&self, device_id: &str) -> Result<Option<(StoredHubDevice, String)>, HubError> {
        match self
            .store
            .get(Collection::HubDevice, &self.host, device_id)
            .await
            .map_err(|e| self.err(e))?
        {
            Some(d) => {
                let v = serde_json::from_str(&d.body)
                    .map_err(|e| self.err(StoreError::Corrupt(e.to_string())))?;
                Ok(Some((v, d.etag)))
            }
            None => Ok(None),
        }
    }

    /// The stored document of an identity; the existing twin is read only when it is kept.
    async fn identity_doc(
        &self,
        identity: &HubIdentity,
        twin: Option<&TwinState>,
    ) -> Result<Doc, HubError> {
        let twin = match twin {
            Some(t) => t.for_hub(),
            None => self
                .load(&identity.device_id)
                .await?
                .map(|(d, _)| d.twin)
                .unwrap_or_default(),
        };
        let dev = StoredHubDevice {
            device_id: identity.device_id.clone(),
            hub: self.host.clone(),
            status: if identity.enabled {
                "enabled"
            } else {
                "disabled"
            }
            .to_string(),
            authentication: auth_json(&identity.auth),
            capabilities: identity.capabilities.clone(),
            twin,
            last_updated_date_time_utc: azure_timestamp(time::OffsetDateTime::now_utc()),
        };
        Ok(Self::doc(&dev))
    }

    fn doc(dev: &StoredHubDevice) -> Doc {
        Doc {
            id: dev.device_id.clone(),
            etag: dps_core::store::new_etag(),
            body: serde_json::to_string(dev).expect("serializable"),
            // No index attributes: identities are listed by key only, and each attribute
            // would be one more index entry written by every registration.
            index: DocIndex::default(),
        }
    }

    async fn save(&self, dev: &StoredHubDevice) -> Result<(), HubError> {
        let doc = Self::doc(dev);
        self.store
            .put(Collection::HubDevice, &self.host, doc, Expect::Any)
            .await
            .map_err(|e| self.err(e))
    }
}

fn auth_json(a: &HubAuth) -> serde_json::Value {
    match a {
        HubAuth::SymmetricKey { primary, secondary } => {
            serde_json::json!({"type": "sas", "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary}})
        }
        HubAuth::X509Thumbprint { primary, secondary } => serde_json::json!({
            "type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": primary, "secondaryThumbprint": secondary.clone().unwrap_or_else(|| primary.clone())}
        }),
    }
}

#[async_trait::async_trait]
impl HubAdapter for RegistryHub {
    async fn upsert_device(
        &self,
        identity: &HubIdentity,
        twin: Option<&TwinState>,
    ) -> Result<(), HubError> {
        let doc = self.identity_doc(identity, twin).await?;
        self.store
            .put(Collection::HubDevice, &self.host, doc, Expect::Any)
            .await
            .map_err(|e| self.err(e))
    }

    async fn identity_write(
        &self,
        identity: &HubIdentity,
        twin: Option<&TwinState>,
    ) -> Result<Option<Write>, HubError> {
        Ok(Some(Write::Put {
            c: Collection::HubDevice,
            scope: self.host.clone(),
            doc: self.identity_doc(identity, twin).await?,
            expect: Expect::Any,
        }))
    }

    async fn get_twin(&self, device_id: &str) -> Result<Option<TwinState>, HubError> {
        Ok(self.load(device_id).await?.map(|(d, _)| d.twin))
    }

    async fn set_enabled(&self, device_id: &str, enabled: bool) -> Result<(), HubError> {
        if let Some((mut d, _)) = self.load(device_id).await? {
            d.status = if enabled { "enabled" } else { "disabled" }.to_string();
            d.last_updated_date_time_utc = azure_timestamp(time::OffsetDateTime::now_utc());
            self.save(&d).await?;
        }
        Ok(())
    }

    async fn delete_device(&self, device_id: &str) -> Result<(), HubError> {
        self.store
            .delete(Collection::HubDevice, &self.host, device_id, Expect::Any)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

//! Azure IoT Hub as a linked hub (`kind = "azure-iothub"`), through the hub's public REST API
//! (identity registry `/devices/{id}` and twins `/twins/{id}`, api-version 2021-04-12), with a
//! SAS token from the linked hub's connection string (`sr={HostName}`, `skn={policy}`).
//!
//! Settings: `connection_string = "HostName=...;SharedAccessKeyName=...;SharedAccessKey=..."`
//! (the policy needs "Registry write"), options `endpoint` (base URL override, e.g. a test
//! double), `ca_file` (extra trusted CA PEM for that endpoint), `timeout_ms` (default 10000).

use super::http_client::{retry_after, send_error_text, HttpClient};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dps_core::hub::{HubAdapter, HubAuth, HubError, HubIdentity};
use dps_core::instance::LinkedHub;
use dps_core::model::{TwinProperties, TwinState};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

/// The IoT Hub REST api-version used.
pub const API_VERSION: &str = "2021-04-12";

/// Characters escaped in a device id path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A parsed `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`.
#[derive(Clone)]
pub struct HubConnectionString {
    /// Hub host name (`sr` of the tokens).
    pub host_name: String,
    /// Policy name (`skn`).
    pub key_name: String,
    /// Policy key (base64).
    key: String,
}

impl std::fmt::Debug for HubConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConnectionString")
            .field("host_name", &self.host_name)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl HubConnectionString {
    /// Parse; the error never repeats the key.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut host = None;
        let mut name = None;
        let mut key = None;
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                return Err("malformed connection string (expected key=value pairs)".into());
            };
            match k.to_ascii_lowercase().as_str() {
                "hostname" => host = Some(v.to_string()),
                "sharedaccesskeyname" => name = Some(v.to_string()),
                "sharedaccesskey" => key = Some(v.to_string()),
                _ => {}
            }
        }
        let (Some(host_name), Some(key_name), Some(key)) = (host, name, key) else {
            return Err(
                "the connection string needs HostName, SharedAccessKeyName and SharedAccessKey"
                    .into(),
            );
        };
        if !matches!(B64.decode(key.trim()), Ok(k) if !k.is_empty()) {
            return Err("SharedAccessKey is not a valid base64 key".into());
        }
        Ok(HubConnectionString {
            host_name,
            key_name,
            key,
        })
    }

    /// A service token valid for `ttl_secs`.
    pub fn token(&self, ttl_secs: i64) -> String {
        let se = time::OffsetDateTime::now_utc().unix_timestamp() + ttl_secs;
        dps_core::sas::sign_token(&self.host_name, &self.key, Some(&self.key_name), se)
            .expect("key checked at parse")
    }
}

struct Ready {
    cs: HubConnectionString,
    base: String,
    http: reqwest::Client,
    timeout: Duration,
}

/// The Azure IoT Hub adapter.
pub struct AzureIotHub {
    host: String,
    ready: Result<Ready, String>,
}

fn build(hub: &LinkedHub, shared: &reqwest::Client) -> Result<Ready, String> {
    let cs = HubConnectionString::parse(
        hub.connection_string
            .as_deref()
            .ok_or("an azure-iothub hub needs connection_string")?,
    )?;
    let base = hub
        .options
        .get("endpoint")
        .and_then(Value::as_str)
        .map(|e| e.trim_end_matches('/').to_string())
        .unwrap_or_else(|| format!("https://{}", cs.host_name));
    let HttpClient { http, timeout } = HttpClient::for_hub(hub, shared, 10_000)?;
    Ok(Ready {
        cs,
        base,
        http,
        timeout,
    })
}

fn auth_json(a: &HubAuth) -> Value {
    match a {
        HubAuth::SymmetricKey { primary, secondary } => json!({
            "type": "sas",
            "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary},
            "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null}
        }),
        HubAuth::X509Thumbprint { primary, secondary } => json!({
            "type": "selfSigned",
            "symmetricKey": {"primaryKey": null, "secondaryKey": null},
            "x509Thumbprint": {
                "primaryThumbprint": primary,
                "secondaryThumbprint": secondary.clone().unwrap_or_else(|| primary.clone())
            }
        }),
    }
}

/// Azure's error body: `{"Message":"ErrorCode:DeviceNotFound;...","ExceptionMessage":"..."}`.
fn error_text(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(v) => {
            let m = v
                .get("Message")
                .or_else(|| v.get("message"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let x = v
                .get("ExceptionMessage")
                .and_then(Value::as_str)
                .unwrap_or("");
            format!("{m} {x}").trim().to_string()
        }
        Err(_) => body.chars().take(300).collect(),
    }
}

struct Answer {
    status: StatusCode,
    body: String,
}

impl AzureIotHub {
    /// An adapter for a linked hub; settings errors surface on every call as `Rejected`.
    pub fn new(hub: &LinkedHub, shared: &reqwest::Client) -> Self {
        AzureIotHub {
            host: hub.host.to_ascii_lowercase(),
            ready: build(hub, shared),
        }
    }

    fn ready(&self) -> Result<&Ready, HubError> {
        self.ready.as_ref().map_err(|e| HubError::Rejected {
            hub: self.host.clone(),
            message: format!("misconfigured azure-iothub hub: {e}"),
        })
    }

    /// One REST call; 2xx and 404/409/412 are returned, every other status becomes an error.
    async fn call(
        &self,
        method: Method,
        path: &str,
        if_match: bool,
        body: Option<&Value>,
    ) -> Result<Answer, HubError> {
        let r = self.ready()?;
        let url = format!("{}{path}?api-version={API_VERSION}", r.base);
        let mut rb = r
            .http
            .request(method, url)
            .timeout(r.timeout)
            .header("authorization", r.cs.token(3600))
            .header("accept", "application/json");
        if if_match {
            rb = rb.header("if-match", "*");
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb.send().await.map_err(|e| HubError::Unreachable {
            hub: self.host.clone(),
            message: send_error_text(e),
        })?;
        let status = resp.status();
        let retry_after = retry_after(&resp);
        let body = resp.text().await.unwrap_or_default();
        match status.as_u16() {
            200..=299 | 404 | 409 | 412 => Ok(Answer { status, body }),
            401 | 403 => Err(HubError::Unauthorized {
                hub: self.host.clone(),
                message: format!("{status}: {}", error_text(&body)),
            }),
            429 => Err(HubError::Throttled {
                hub: self.host.clone(),
                retry_after: retry_after.unwrap_or(10).clamp(1, 3600),
            }),
            500..=599 => Err(HubError::Unreachable {
                hub: self.host.clone(),
                message: format!("{status}: {}", error_text(&body)),
            }),
            _ => Err(self.rejected(status, &body)),
        }
    }

    fn rejected(&self, status: StatusCode, body: &str) -> HubError {
        HubError::Rejected {
            hub: self.host.clone(),
            message: format!("{status}: {}", error_text(body)),
        }
    }

    fn ok_or_reject(&self, a: Answer) -> Result<Answer, HubError> {
        if a.status.is_success() {
            Ok(a)
        } else {
            Err(self.rejected(a.status, &a.body))
        }
    }
}

fn seg(id: &str) -> String {
    utf8_percent_encode(id, SEGMENT).to_string()
}

#[async_trait::async_trait]
impl HubAdapter for AzureIotHub {
    async fn upsert_device(
        &self,
        identity: &HubIdentity,
        twin: Option<&TwinState>,
    ) -> Result<(), HubError> {
        let path = format!("/devices/{}", seg(&identity.device_id));
        let device = json!({
            "deviceId": identity.device_id,
            "status": if identity.enabled { "enabled" } else { "disabled" },
            "authentication": auth_json(&identity.auth),
            "capabilities": {"iotEdge": identity.capabilities.iot_edge},
        });
        // Create; when it exists (409/412), replace with If-Match: * (a 404 then means it was
        // deleted in between: create again).
        let mut a = self.call(Method::PUT, &path, false, Some(&device)).await?;
        if matches!(a.status.as_u16(), 409 | 412) {
            a = self.call(Method::PUT, &path, true, Some(&device)).await?;
            if a.status == StatusCode::NOT_FOUND {
                a = self.call(Method::PUT, &path, false, Some(&device)).await?;
            }
        }
        self.ok_or_reject(a)?;
        if let Some(t) = twin {
            // Replace tags and desired properties (the adapter contract), hence PUT, not PATCH.
            let t = t.for_hub();
            let body = json!({
                "deviceId": identity.device_id,
                "tags": t.tags.unwrap_or_else(|| json!({})),
                "properties": {"desired": t.properties.and_then(|p| p.desired).unwrap_or_else(|| json!({}))},
            });
            let a = self
                .call(
                    Method::PUT,
                    &format!("/twins/{}", seg(&identity.device_id)),
                    true,
                    Some(&body),
                )
                .await?;
            self.ok_or_reject(a)?;
        }
        Ok(())
    }

    async fn get_twin(&self, device_id: &str) -> Result<Option<TwinState>, HubError> {
        let a = self
            .call(
                Method::GET,
                &format!("/twins/{}", seg(device_id)),
                false,
                None,
            )
            .await?;
        if a.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let a = self.ok_or_reject(a)?;
        let v: Value = serde_json::from_str(&a.body).map_err(|e| HubError::Unreachable {
            hub: self.host.clone(),
            message: format!("unreadable twin: {e}"),
        })?;
        let t = TwinState {
            tags: v.get("tags").filter(|t| !t.is_null()).cloned(),
            properties: Some(TwinProperties {
                desired: v.pointer("/properties/desired").cloned(),
            }),
        };
        Ok(Some(t.for_hub()))
    }

    async fn set_enabled(&self, device_id: &str, enabled: bool) -> Result<(), HubError> {
        let path = format!("/devices/{}", seg(device_id));
        let a = self.call(Method::GET, &path, false, None).await?;
        if a.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        let a = self.ok_or_reject(a)?;
        let mut dev: Value = serde_json::from_str(&a.body).map_err(|e| HubError::Unreachable {
            hub: self.host.clone(),
            message: format!("unreadable device: {e}"),
        })?;
        dev["status"] = Value::String(if enabled { "enabled" } else { "disabled" }.into());
        let a = self.call(Method::PUT, &path, true, Some(&dev)).await?;
        if a.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        self.ok_or_reject(a).map(|_| ())
    }

    async fn delete_device(&self, device_id: &str) -> Result<(), HubError> {
        let a = self
            .call(
                Method::DELETE,
                &format!("/devices/{}", seg(device_id)),
                true,
                None,
            )
            .await?;
        if a.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        self.ok_or_reject(a).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_string_parses_and_hides_its_key() {
        let cs = HubConnectionString::parse(
            "HostName=h.azure-devices.net;SharedAccessKeyName=registryReadWrite;SharedAccessKey=c2VjcmV0LWtleS0wMTIzNDU2Nzg5",
        )
        .unwrap();
        assert_eq!(cs.host_name, "h.azure-devices.net");
        assert!(!format!("{cs:?}").contains("c2Vj"));
        let t = dps_core::sas::SasToken::parse(&cs.token(60)).unwrap();
        assert_eq!(t.sr, "h.azure-devices.net");
        assert_eq!(t.skn.as_deref(), Some("registryReadWrite"));
        assert!(HubConnectionString::parse("HostName=x").is_err());
    }

    #[test]
    fn device_ids_are_escaped_in_paths() {
        assert_eq!(seg("a b/c:d"), "a%20b%2Fc%3Ad");
    }
}

//! A generic webhook as a linked hub (`kind = "webhook"`): dps POSTs every identity operation
//! to a URL as JSON, signed with HMAC-SHA256, so that any platform (EMQX, HiveMQ, ThingsBoard,
//! an in-house registry) can be a linked hub.
//!
//! Request body (one object per call):
//! ```json
//! {"action": "upsert" | "delete" | "setEnabled" | "getTwin",
//!  "hub": "<linked hub host>", "deviceId": "...",
//!  "authentication": {...}, "capabilities": {"iotEdge": false},
//!  "twin": {"tags": {...}, "properties": {"desired": {...}}} | null,
//!  "enabled": true, "timestamp": 1700000000, "requestId": "<uuid>"}
//! ```
//! (`authentication`, `capabilities` and `twin` only for `upsert`; `enabled` for `upsert` and
//! `setEnabled`; `twin: null` on upsert means "keep the existing twin".)
//! Header `x-dps-signature: sha256=<hex HMAC-SHA256(options.secret, raw body)>` when a secret
//! is set. Any 2xx is success; `getTwin` answers `{"twin": {...}}`, or `{"twin": null}` / 404
//! when the device does not exist; 404 on `delete` and `setEnabled` is success.
//! Failures: 401/403 → Unauthorized, 429 → Throttled (Retry-After), 5xx / connect errors /
//! timeouts are retried (options.retries tries in all, default 3, backoff 200 ms doubling) and
//! then Unreachable, other 4xx → Rejected at once. Redirects are not followed (3xx → Rejected).
//! The URL follows the outbound policy ([`crate::outbound`]; a refused URL or address →
//! Rejected at once), and answers are read up to `[outbound] max_response_bytes` (a larger one
//! → Rejected).

use super::http_client::{retry_after, send_error_text, HttpClient};
use crate::outbound::{Outbound, Target};
use dps_core::hub::{HubAdapter, HubAuth, HubError, HubIdentity};
use dps_core::instance::LinkedHub;
use dps_core::model::TwinState;
use serde_json::{json, Value};
use std::time::Duration;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-dps-signature";

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(dps_core::sas::hmac_sha256(secret, body))
    )
}

struct Ready {
    url: String,
    http: reqwest::Client,
    timeout: Duration,
    max_response_bytes: usize,
    tries: u32,
}

/// The webhook adapter.
pub struct WebhookHub {
    host: String,
    secret: Option<Vec<u8>>,
    ready: Result<Ready, String>,
}

fn build(hub: &LinkedHub, outbound: &Outbound) -> Result<Ready, String> {
    let url = hub
        .connection_string
        .clone()
        .ok_or("a webhook hub needs connection_string = \"https://...\"")?;
    outbound
        .policy()
        .check_url(&url, Target::Webhook)
        .map_err(|e| format!("webhook URL: {e}"))?;
    let HttpClient {
        http,
        timeout,
        max_response_bytes,
    } = HttpClient::for_hub(hub, outbound, Target::Webhook, 5000)?;
    let tries = hub
        .options
        .get("retries")
        .and_then(Value::as_u64)
        .unwrap_or(3)
        .clamp(1, 10) as u32;
    Ok(Ready {
        url,
        http,
        timeout,
        max_response_bytes,
        tries,
    })
}

fn auth_json(a: &HubAuth) -> Value {
    match a {
        HubAuth::SymmetricKey { primary, secondary } => json!({
            "type": "sas", "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary}
        }),
        HubAuth::X509Thumbprint { primary, secondary } => json!({
            "type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": primary, "secondaryThumbprint": secondary.clone().unwrap_or_else(|| primary.clone())}
        }),
    }
}

enum Outcome {
    Ok(String),
    NotFound,
}

impl WebhookHub {
    /// An adapter for a linked hub; settings errors surface on every call as `Rejected`.
    pub fn new(hub: &LinkedHub, outbound: &Outbound) -> Self {
        WebhookHub {
            host: hub.host.to_ascii_lowercase(),
            secret: hub
                .options
                .get("secret")
                .and_then(Value::as_str)
                .map(|s| s.as_bytes().to_vec()),
            ready: build(hub, outbound),
        }
    }

    fn base(&self, action: &str, device_id: &str) -> Value {
        json!({
            "action": action,
            "hub": self.host,
            "deviceId": device_id,
            "timestamp": time::OffsetDateTime::now_utc().unix_timestamp(),
            "requestId": uuid::Uuid::new_v4().to_string(),
        })
    }

    async fn post(&self, body: &Value) -> Result<Outcome, HubError> {
        let r = self.ready.as_ref().map_err(|e| HubError::Rejected {
            hub: self.host.clone(),
            message: format!("misconfigured webhook hub: {e}"),
        })?;
        let bytes = serde_json::to_vec(body).map_err(|e| HubError::Rejected {
            hub: self.host.clone(),
            message: format!("request body: {e}"),
        })?;
        let sig = self.secret.as_ref().map(|s| signature(s, &bytes));
        let mut last = String::new();
        for attempt in 0..r.tries {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << (attempt - 1).min(5))).await;
            }
            let mut rb = r
                .http
                .post(&r.url)
                .timeout(r.timeout)
                .header("content-type", "application/json")
                .body(bytes.clone());
            if let Some(s) = &sig {
                rb = rb.header(SIGNATURE_HEADER, s);
            }
            let resp = match rb.send().await {
                Ok(resp) => resp,
                Err(e) => {
                    if let Some(refused) = crate::outbound::refusal(&e) {
                        // The policy will refuse the next try too.
                        return Err(HubError::Rejected {
                            hub: self.host.clone(),
                            message: format!("refused by the outbound policy: {refused}"),
                        });
                    }
                    last = send_error_text(e);
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let retry_after = retry_after(&resp);
            let text = match crate::outbound::read_limited(resp, r.max_response_bytes).await {
                Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                Err(e @ crate::outbound::OutboundError::TooLarge { .. }) => {
                    return Err(HubError::Rejected {
                        hub: self.host.clone(),
                        message: format!("HTTP {status}: {e}"),
                    })
                }
                Err(e) => {
                    last = format!("HTTP {status}: {e}");
                    continue;
                }
            };
            let short: String = text.chars().take(300).collect();
            match status {
                200..=299 => return Ok(Outcome::Ok(text)),
                404 => return Ok(Outcome::NotFound),
                401 | 403 => {
                    return Err(HubError::Unauthorized {
                        hub: self.host.clone(),
                        message: format!("HTTP {status}: {short}"),
                    })
                }
                429 => {
                    return Err(HubError::Throttled {
                        hub: self.host.clone(),
                        retry_after: retry_after.unwrap_or(10).clamp(1, 3600),
                    })
                }
                500..=599 => last = format!("HTTP {status}: {short}"),
                _ => {
                    return Err(HubError::Rejected {
                        hub: self.host.clone(),
                        message: format!("HTTP {status}: {short}"),
                    })
                }
            }
        }
        Err(HubError::Unreachable {
            hub: self.host.clone(),
            message: format!("{last} (after {} tries)", r.tries),
        })
    }
}

#[async_trait::async_trait]
impl HubAdapter for WebhookHub {
    async fn upsert_device(
        &self,
        identity: &HubIdentity,
        twin: Option<&TwinState>,
    ) -> Result<(), HubError> {
        let mut b = self.base("upsert", &identity.device_id);
        b["authentication"] = auth_json(&identity.auth);
        b["capabilities"] = json!({"iotEdge": identity.capabilities.iot_edge});
        b["twin"] = match twin {
            Some(t) => serde_json::to_value(t.for_hub()).map_err(|e| HubError::Rejected {
                hub: self.host.clone(),
                message: format!("twin: {e}"),
            })?,
            None => Value::Null,
        };
        b["enabled"] = identity.enabled.into();
        match self.post(&b).await? {
            Outcome::Ok(_) => Ok(()),
            Outcome::NotFound => Err(HubError::Rejected {
                hub: self.host.clone(),
                message: "HTTP 404 on upsert".into(),
            }),
        }
    }

    async fn get_twin(&self, device_id: &str) -> Result<Option<TwinState>, HubError> {
        match self.post(&self.base("getTwin", device_id)).await? {
            Outcome::NotFound => Ok(None),
            Outcome::Ok(text) => {
                let v: Value = serde_json::from_str(&text).map_err(|e| HubError::Rejected {
                    hub: self.host.clone(),
                    message: format!("getTwin: the answer is not JSON: {e}"),
                })?;
                match v.get("twin") {
                    None | Some(Value::Null) => Ok(None),
                    Some(t) => serde_json::from_value::<TwinState>(t.clone())
                        .map(|t| Some(t.for_hub()))
                        .map_err(|e| HubError::Rejected {
                            hub: self.host.clone(),
                            message: format!("getTwin: invalid twin: {e}"),
                        }),
                }
            }
        }
    }

    async fn set_enabled(&self, device_id: &str, enabled: bool) -> Result<(), HubError> {
        let mut b = self.base("setEnabled", device_id);
        b["enabled"] = enabled.into();
        self.post(&b).await.map(|_| ())
    }

    async fn delete_device(&self, device_id: &str) -> Result<(), HubError> {
        self.post(&self.base("delete", device_id)).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hex_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

//! Custom allocation (Azure's "custom" policy): the enrollment names a webhook; dps sends it the
//! device's runtime context, the enrollment (keys redacted) and the eligible hubs, and the webhook
//! answers the hub, optionally with an initial twin and a payload for the device.
//!
//! The HTTP call sits behind the small [`CustomAllocator`] trait so that the engine's decisions
//! (which hubs are offered, what happens with the answer) are unit-tested with a fake; the real
//! implementation is [`WebhookAllocator`].

use super::attest::{Admitted, Source};
use super::{Engine, Failure};
use crate::outbound::{Outbound, OutboundError, Target};
use dps_core::error::{AssignmentFailure, CustomAllocationFailure};
use dps_core::instance::LinkedHub;
use dps_core::model::{AttestationType, CustomAllocationDefinition, TwinState};
use std::sync::Arc;
use std::time::Duration;

/// What the webhook is asked: its URL and Azure's request body.
#[derive(Debug, Clone)]
pub struct CustomAllocationRequest {
    /// The enrollment's `customAllocationDefinition.webhookUrl`.
    pub url: String,
    /// `{"deviceRuntimeContext": …, "linkedHubs": […], "individualEnrollment"|"enrollmentGroup": …}`.
    pub body: serde_json::Value,
}

/// The webhook's answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CustomAllocationAnswer {
    /// `iotHubHostName`.
    pub hub: Option<String>,
    /// `initialTwin`.
    pub initial_twin: Option<TwinState>,
    /// `payload`, returned to the device.
    pub payload: Option<serde_json::Value>,
}

/// A failed call: what went wrong (for the device) and a precise reason (for the operator).
#[derive(Debug, Clone, PartialEq)]
pub struct CustomAllocationError {
    /// What the device is told.
    pub failure: CustomAllocationFailure,
    /// What the registration record and the log say.
    pub reason: String,
}

/// Asks the custom allocation webhook. Implementations must bound the call in time.
#[async_trait::async_trait]
pub trait CustomAllocator: Send + Sync {
    /// Call the webhook.
    async fn allocate(
        &self,
        req: CustomAllocationRequest,
    ) -> Result<CustomAllocationAnswer, CustomAllocationError>;
}

/// The real webhook over HTTP(S), with a timeout per call, under the outbound policy (the URL
/// and the addresses it resolves to; no proxy, no redirect) and reading at most
/// `[outbound] max_response_bytes` of the answer.
pub struct WebhookAllocator {
    outbound: Arc<Outbound>,
    timeout: Duration,
}

impl WebhookAllocator {
    /// A webhook client.
    pub fn new(outbound: Arc<Outbound>, timeout: Duration) -> Self {
        WebhookAllocator { outbound, timeout }
    }
}

/// Read the webhook's JSON answer (field names case-insensitive, as Azure reads them).
pub fn parse_answer(v: &serde_json::Value) -> CustomAllocationAnswer {
    let empty = serde_json::Map::new();
    let obj = v.as_object().unwrap_or(&empty);
    let get = |name: &str| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_null())
    };
    CustomAllocationAnswer {
        hub: get("iotHubHostName").and_then(|h| h.as_str().map(str::to_string)),
        initial_twin: get("initialTwin").and_then(|t| serde_json::from_value(t).ok()),
        payload: get("payload"),
    }
}

#[async_trait::async_trait]
impl CustomAllocator for WebhookAllocator {
    async fn allocate(
        &self,
        req: CustomAllocationRequest,
    ) -> Result<CustomAllocationAnswer, CustomAllocationError> {
        let fail = |failure, reason| CustomAllocationError { failure, reason };
        let url = self
            .outbound
            .policy()
            .check_url(&req.url, Target::Webhook)
            .map_err(|e| {
                fail(
                    CustomAllocationFailure::Unreachable,
                    format!("custom allocation webhook refused by the outbound policy: {e}"),
                )
            })?;
        let resp = self
            .outbound
            .client(Target::Webhook)
            .post(url)
            .timeout(self.timeout)
            .json(&req.body)
            .send()
            .await
            .map_err(|e| {
                let what = match crate::outbound::refusal(&e) {
                    Some(r) => format!("refused by the outbound policy: {r}"),
                    None if e.is_timeout() => "timed out".to_string(),
                    None => format!("failed: {}", crate::outbound::describe(e.without_url())),
                };
                fail(
                    CustomAllocationFailure::Unreachable,
                    format!("custom allocation webhook {what}"),
                )
            })?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(fail(
                CustomAllocationFailure::Status { status },
                format!("custom allocation webhook answered HTTP {status}"),
            ));
        }
        let body = crate::outbound::read_limited(resp, self.outbound.max_response_bytes())
            .await
            .map_err(|e| match e {
                OutboundError::TooLarge { .. } => fail(
                    CustomAllocationFailure::InvalidResponse,
                    format!("custom allocation webhook answer refused: {e}"),
                ),
                e => fail(
                    CustomAllocationFailure::Unreachable,
                    format!("custom allocation webhook: {e}"),
                ),
            })?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            fail(
                CustomAllocationFailure::InvalidResponse,
                format!("custom allocation webhook answered invalid JSON: {e}"),
            )
        })?;
        Ok(parse_answer(&v))
    }
}

impl Engine {
    /// Ask the webhook to choose among `candidates`, and check its answer.
    pub(super) async fn custom_allocate(
        &self,
        adm: &Admitted,
        def: &CustomAllocationDefinition,
        candidates: &[&LinkedHub],
        current_hub: Option<&str>,
        current_device: Option<&str>,
        payload: Option<serde_json::Value>,
    ) -> Result<super::allocate::Allocation, Failure> {
        let fail = |failure, reason| Failure {
            failure: AssignmentFailure::CustomAllocation { failure },
            reason,
        };
        let req = CustomAllocationRequest {
            url: def.webhook_url.clone(),
            body: request_body(adm, candidates, current_hub, current_device, payload),
        };
        let answer = self
            .custom_allocator
            .allocate(req)
            .await
            .map_err(|e| fail(e.failure, e.reason))?;
        let Some(hub_name) = answer.hub else {
            return Err(fail(
                CustomAllocationFailure::NoHub,
                "custom allocation webhook response has no iotHubHostName".into(),
            ));
        };
        let Some(hub) = candidates
            .iter()
            .find(|h| h.host.eq_ignore_ascii_case(&hub_name))
        else {
            return Err(fail(
                CustomAllocationFailure::HubNotLinked,
                format!("custom allocation webhook chose '{hub_name}', which is not among the linked hubs offered"),
            ));
        };
        Ok(((*hub).clone(), answer.initial_twin, answer.payload))
    }
}

/// Azure's custom allocation request body.
fn request_body(
    adm: &Admitted,
    candidates: &[&LinkedHub],
    current_hub: Option<&str>,
    current_device: Option<&str>,
    payload: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut ctx = serde_json::json!({ "registrationId": adm.registration_id.as_str() });
    if let Some(h) = current_hub {
        ctx["currentIotHubHostName"] = h.into();
    }
    if let Some(d) = current_device {
        ctx["currentDeviceId"] = d.into();
    }
    match adm.attestation {
        AttestationType::X509 => {
            let x = adm.x509.clone().unwrap_or_default();
            ctx["x509"] = serde_json::json!({"clientCertificate": x.certificate_info, "signingCertificate": x.signing_certificate_info});
        }
        _ => ctx["symmetricKey"] = serde_json::json!({}),
    }
    if let Some(p) = payload {
        ctx["payload"] = p;
    }
    let mut body = serde_json::json!({
        "deviceRuntimeContext": ctx,
        "linkedHubs": candidates.iter().map(|h| h.host.clone()).collect::<Vec<_>>(),
    });
    // The enrollment goes to the webhook with its secrets removed.
    match &adm.source {
        Source::Individual(e) => {
            let mut e = (**e).clone();
            e.settings.attestation = e.settings.attestation.redacted();
            body["individualEnrollment"] = serde_json::to_value(e).unwrap_or_default();
        }
        Source::Group(g) => {
            let mut g = (**g).clone();
            g.settings.attestation = g.settings.attestation.redacted();
            body["enrollmentGroup"] = serde_json::to_value(g).unwrap_or_default();
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_case_insensitively_and_nulls_are_absent() {
        let a = parse_answer(&serde_json::json!({
            "IOTHUBHOSTNAME": "hub-1", "initialTwin": null, "Payload": {"a": 1}
        }));
        assert_eq!(a.hub.as_deref(), Some("hub-1"));
        assert_eq!(a.initial_twin, None);
        assert_eq!(a.payload, Some(serde_json::json!({"a": 1})));
        assert_eq!(parse_answer(&serde_json::json!([1, 2])), Default::default());
    }
}

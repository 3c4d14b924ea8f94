//! Azure IoT Hub as a linked hub (`kind = "azure-iothub"`), through the hub's public service REST
//! API (identity registry `/devices/{id}` and twins `/twins/{id}`, api-version 2021-04-12), with a
//! SAS token from the linked hub's connection string (`sr={HostName}`, `skn={policy}`).
//!
//! Settings: `connection_string = "HostName=...;SharedAccessKeyName=...;SharedAccessKey=..."`.
//! The policy needs **RegistryRead, RegistryWrite and ServiceConnect**: registry writes create
//! and update identities, ServiceConnect writes and reads twins (the built-in `registryReadWrite`
//! policy lacks ServiceConnect; see docs/linked-hubs.md). Options: `endpoint` (base URL
//! override, e.g. a test double), `ca_file` (extra trusted CA PEM for that endpoint),
//! `timeout_ms` (per request, default 10000), `deadline_ms` (all requests of one adapter call,
//! e.g. one registration's upsert, default [`DEFAULT_DEADLINE_MS`]). Calls go through
//! [`crate::outbound`]: link-local and metadata addresses refused (private ones allowed: a hub
//! behind a private endpoint resolves to one), no proxy, no redirect, answers read up to
//! `[outbound] max_response_bytes`.
//!
//! What the hub answers is classified by its error code, not its status alone ([`classify`]):
//! the numeric `errorCode` of current hubs (in the JSON body, or JSON inside its `Message`), the
//! `iothub-errorcode` header, or the older `ErrorCode:Name;…` text.

use super::http_client::{retry_after, send_error_text, HttpClient};
use crate::outbound::{Outbound, Target};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dps_core::hub::{HubAdapter, HubAuth, HubError, HubIdentity};
use dps_core::instance::LinkedHub;
use dps_core::model::{TwinProperties, TwinState};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The IoT Hub REST api-version used.
pub const API_VERSION: &str = "2021-04-12";

/// Default bound of all requests of one adapter call (`deadline_ms`).
pub const DEFAULT_DEADLINE_MS: u64 = 20_000;

/// What `encodeURIComponent` leaves literal, less `!'()*` (the Node SDK's
/// `encodeUriComponentStrict`, which Python's `quote_plus` matches for these values): letters,
/// digits and `-_.~`. Used for `sr`, `sig`, `skn` and device ids in paths.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn enc(s: &str) -> String {
    utf8_percent_encode(s, URI_COMPONENT).to_string()
}

/// A parsed `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`.
#[derive(Clone)]
pub struct HubConnectionString {
    /// Hub host name (`sr` of the tokens).
    pub host_name: String,
    /// Policy name (`skn`).
    pub key_name: String,
    /// Policy key (decoded).
    key: Vec<u8>,
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
            // Spaces around names and values (`SharedAccessKey= abc`) are not part of them.
            let (k, v) = (k.trim(), v.trim());
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
        if host_name.is_empty() || key_name.is_empty() {
            return Err("HostName and SharedAccessKeyName must not be empty".into());
        }
        let key = match B64.decode(&key) {
            Ok(k) if !k.is_empty() => k,
            _ => return Err("SharedAccessKey is not a valid base64 key".into()),
        };
        Ok(HubConnectionString {
            host_name,
            key_name,
            key,
        })
    }

    /// A service token valid for `ttl_secs`.
    pub fn token(&self, ttl_secs: i64) -> String {
        self.token_at(time::OffsetDateTime::now_utc().unix_timestamp() + ttl_secs)
    }

    /// The service token expiring at `se` (Unix seconds), as Azure's service SDKs make it
    /// (Node `azure-iothub`, Python `azure-iot-hub`): `sr` is the host name and `skn` the policy
    /// name, each percent-encoded like `encodeURIComponent` (`.`, `-`, `_`, `~` stay literal, so
    /// a host name goes out unchanged); `sig` = base64(HMAC-SHA256(key, sr + "\n" + se)),
    /// encoded the same way. Field order as Node's: `sr`, `sig`, `skn`, `se`.
    pub fn token_at(&self, se: i64) -> String {
        let sr = enc(&self.host_name);
        let sig = B64.encode(dps_core::sas::hmac_sha256(
            &self.key,
            format!("{sr}\n{se}").as_bytes(),
        ));
        format!(
            "SharedAccessSignature sr={sr}&sig={}&skn={}&se={se}",
            enc(&sig),
            enc(&self.key_name)
        )
    }
}

struct Ready {
    cs: HubConnectionString,
    base: String,
    http: reqwest::Client,
    timeout: Duration,
    max_response_bytes: usize,
    deadline: Duration,
}

/// The Azure IoT Hub adapter.
pub struct AzureIotHub {
    host: String,
    ready: Result<Ready, String>,
}

/// The base URL the adapter calls: the `endpoint` option, else `https://{HostName}` of the
/// connection string; `None` when neither can be read.
pub fn endpoint_of(hub: &LinkedHub) -> Option<String> {
    match hub.options.get("endpoint").and_then(Value::as_str) {
        Some(e) => Some(e.trim_end_matches('/').to_string()),
        None => {
            let cs = HubConnectionString::parse(hub.connection_string.as_deref()?).ok()?;
            Some(format!("https://{}", cs.host_name))
        }
    }
}

fn build(hub: &LinkedHub, outbound: &Outbound) -> Result<Ready, String> {
    let cs = HubConnectionString::parse(
        hub.connection_string
            .as_deref()
            .ok_or("an azure-iothub hub needs connection_string")?,
    )?;
    let base = endpoint_of(hub).unwrap_or_else(|| format!("https://{}", cs.host_name));
    outbound
        .policy()
        .check_url(&base, Target::Hub)
        .map_err(|e| format!("endpoint: {e}"))?;
    let HttpClient {
        http,
        timeout,
        max_response_bytes,
    } = HttpClient::for_hub(hub, outbound, Target::Hub, 10_000)?;
    let deadline = Duration::from_millis(
        hub.options
            .get("deadline_ms")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_DEADLINE_MS)
            .clamp(100, 600_000),
    );
    Ok(Ready {
        cs,
        base,
        http,
        timeout,
        max_response_bytes,
        deadline,
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

/// Does the device the hub holds already carry what dps would write (status, credentials,
/// capabilities)? Then a re-registration needs no write at all.
fn same_identity(dev: &Value, want: &Value) -> bool {
    let auth_eq = |p: &str| {
        dev.pointer(p).filter(|v| !v.is_null()) == want.pointer(p).filter(|v| !v.is_null())
    };
    dev["status"] == want["status"]
        && dev.pointer("/authentication/type") == want.pointer("/authentication/type")
        && auth_eq("/authentication/symmetricKey/primaryKey")
        && auth_eq("/authentication/symmetricKey/secondaryKey")
        && auth_eq("/authentication/x509Thumbprint/primaryThumbprint")
        && auth_eq("/authentication/x509Thumbprint/secondaryThumbprint")
        && dev
            .pointer("/capabilities/iotEdge")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            == want
                .pointer("/capabilities/iotEdge")
                .and_then(Value::as_bool)
                .unwrap_or(false)
}

/// The error code of a failed answer: the six-digit number when the hub gives one, else the
/// number of a known name. Current hubs put `{"errorCode":404001,…}` as JSON text inside the
/// body's `Message` (or, in places, at the top level) and the name in `iothub-errorcode`; older
/// ones answer `{"Message":"ErrorCode:DeviceNotFound;…"}`.
pub fn error_code(header: Option<&str>, body: &str) -> Option<u32> {
    fn numeric(v: &Value) -> Option<u32> {
        match v {
            Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            Value::String(s) => s.trim().parse().ok().or_else(|| code_of_name(s.trim())),
            _ => None,
        }
    }
    fn from_json(v: &Value) -> Option<u32> {
        for k in ["errorCode", "ErrorCode"] {
            if let Some(c) = v.get(k).and_then(numeric) {
                return Some(c);
            }
        }
        for k in ["Message", "message"] {
            if let Some(m) = v.get(k).and_then(Value::as_str) {
                if let Ok(inner) = serde_json::from_str::<Value>(m) {
                    if let Some(c) = from_json(&inner) {
                        return Some(c);
                    }
                }
                if let Some(rest) = m.trim().strip_prefix("ErrorCode:") {
                    let name = rest.split(';').next().unwrap_or("").trim();
                    if let Some(c) = name.parse().ok().or_else(|| code_of_name(name)) {
                        return Some(c);
                    }
                }
            }
        }
        None
    }
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| from_json(&v))
        .or_else(|| {
            let h = header?.trim();
            h.parse().ok().or_else(|| code_of_name(h))
        })
}

/// The six-digit codes of the error names the registry and twin calls can answer.
fn code_of_name(name: &str) -> Option<u32> {
    Some(match name {
        "InvalidProtocolVersion" => 400_001,
        "InvalidOperation" => 400_003,
        "ArgumentInvalid" => 400_004,
        "ArgumentNull" => 400_005,
        "IotHubFormatError" => 400_006,
        "IotHubSuspended" => 400_020,
        "IotHubNotFound" => 401_001,
        "IotHubUnauthorizedAccess" => 401_002,
        "IotHubUnauthorized" => 401_003,
        "IotHubQuotaExceeded" => 403_002,
        "DeviceNotFound" => 404_001,
        "DeviceAlreadyExists" => 409_001,
        "PreconditionFailed" => 412_001,
        "ThrottlingException" => 429_001,
        "ThrottleBacklogLimitExceeded" => 429_002,
        "ServerError" => 500_001,
        "ServiceUnavailable" => 503_001,
        _ => return None,
    })
}

/// The hub's daily message quota (403002) resets at 00:00 UTC: seconds until then.
fn until_quota_reset(now_unix: i64) -> u32 {
    (86_400 - now_unix.rem_euclid(86_400)).clamp(1, 86_400) as u32
}

/// How one answer of the hub is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx.
    Ok,
    /// 404 DeviceNotFound (404001): the device does not exist. Any other 404 is not this.
    Absent,
    /// 409 DeviceAlreadyExists.
    Exists,
    /// The `If-Match` ETag did not match: 412 (412001), or 400023.
    Stale,
    /// A failure.
    Failed(HubError),
}

/// Read an answer: the error code decides, the status only where there is no code.
///
/// | answer | verdict |
/// |---|---|
/// | 401 (any code) | `Unauthorized` |
/// | 403002 quota exceeded | `Throttled` until 00:00 UTC |
/// | 403010 tier (Basic: no twins) | `Rejected`, a configuration error |
/// | other 403 (403001 …) | `Rejected` |
/// | 404001 DeviceNotFound | absent |
/// | other 404 (404012 failover, no code) | `Unreachable` |
/// | 409 | exists |
/// | 412, 400023 | stale ETag |
/// | 400024, 400029, 400030 | `Unreachable` (transient) |
/// | other 4xx | `Rejected` |
/// | 429 | `Throttled` (`Retry-After`, else 10 s) |
/// | 5xx | `Unreachable` |
pub fn classify(
    hub: &str,
    status: u16,
    code: Option<u32>,
    retry_after: Option<u32>,
    detail: &str,
) -> Verdict {
    let hub = hub.to_string();
    let message = match code {
        Some(c) => format!("HTTP {status}, error {c}: {detail}"),
        None => format!("HTTP {status}: {detail}"),
    };
    match (status, code) {
        (200..=299, _) => Verdict::Ok,
        (401, _) => Verdict::Failed(HubError::Unauthorized { hub, message }),
        (403, Some(403_002)) => Verdict::Failed(HubError::Throttled {
            hub,
            retry_after: until_quota_reset(time::OffsetDateTime::now_utc().unix_timestamp()),
        }),
        (403, Some(403_010)) => Verdict::Failed(HubError::Rejected {
            hub,
            message: format!(
                "hub configuration: this hub's tier does not support the operation (a Basic-tier \
                 hub has no device twins; use a Standard tier or enrollments without initial \
                 twins): {message}"
            ),
        }),
        (404, Some(404_001)) => Verdict::Absent,
        (404, _) => Verdict::Failed(HubError::Unreachable { hub, message }),
        (409, _) => Verdict::Exists,
        (412, _) | (400, Some(400_023)) => Verdict::Stale,
        (400, Some(400_024 | 400_029 | 400_030)) => {
            Verdict::Failed(HubError::Unreachable { hub, message })
        }
        (429, _) => Verdict::Failed(HubError::Throttled {
            hub,
            retry_after: retry_after.unwrap_or(10).clamp(1, 3600),
        }),
        (500..=599, _) => Verdict::Failed(HubError::Unreachable { hub, message }),
        _ => Verdict::Failed(HubError::Rejected { hub, message }),
    }
}

/// The readable part of an error body (for messages; never contains secrets).
fn error_text(body: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return body.chars().take(300).collect();
    };
    let m = v
        .get("Message")
        .or_else(|| v.get("message"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let m = match serde_json::from_str::<Value>(m) {
        Ok(inner) => inner
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or(m)
            .to_string(),
        Err(_) => m.to_string(),
    };
    let x = v
        .get("ExceptionMessage")
        .and_then(Value::as_str)
        .unwrap_or("");
    format!("{m} {x}").trim().chars().take(500).collect()
}

/// One answer of the hub.
struct Answer {
    verdict: Verdict,
    code: Option<u32>,
    body: String,
}

/// `If-Match` values as the SDKs send them: quoted (`"*"`, `"<etag>"`).
fn quoted(etag: &str) -> String {
    if etag.len() >= 2 && etag.starts_with('"') && etag.ends_with('"') {
        etag.to_string()
    } else {
        format!("\"{etag}\"")
    }
}

/// One adapter call: its requests share one deadline.
struct Call<'a> {
    hub: &'a AzureIotHub,
    r: &'a Ready,
    deadline: Instant,
}

impl Call<'_> {
    async fn request(
        &self,
        method: Method,
        path: &str,
        if_match: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Answer, HubError> {
        let host = &self.hub.host;
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HubError::Unreachable {
                hub: host.clone(),
                message: format!(
                    "deadline of {} ms for this hub operation exceeded",
                    self.r.deadline.as_millis()
                ),
            });
        }
        let url = format!("{}{path}?api-version={API_VERSION}", self.r.base);
        let mut rb = self
            .r
            .http
            .request(method, url)
            .timeout(self.r.timeout.min(left))
            .header("authorization", self.r.cs.token(3600))
            .header("accept", "application/json");
        if let Some(m) = if_match {
            rb = rb.header("if-match", quoted(m));
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb.send().await.map_err(|e| {
            if let Some(refused) = crate::outbound::refusal(&e) {
                return HubError::Rejected {
                    hub: host.clone(),
                    message: format!("refused by the outbound policy: {refused}"),
                };
            }
            HubError::Unreachable {
                hub: host.clone(),
                message: if Instant::now() >= self.deadline {
                    format!(
                        "deadline of {} ms for this hub operation exceeded",
                        self.r.deadline.as_millis()
                    )
                } else {
                    send_error_text(e)
                },
            }
        })?;
        let status = resp.status().as_u16();
        let ra = retry_after(&resp);
        let header = resp
            .headers()
            .get("iothub-errorcode")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = match crate::outbound::read_limited(resp, self.r.max_response_bytes).await {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e @ crate::outbound::OutboundError::TooLarge { .. }) => {
                return Err(HubError::Rejected {
                    hub: host.clone(),
                    message: format!("HTTP {status}: {e}"),
                })
            }
            Err(e) => {
                return Err(HubError::Unreachable {
                    hub: host.clone(),
                    message: format!("HTTP {status}: {e}"),
                })
            }
        };
        let code = if (200..300).contains(&status) {
            None
        } else {
            error_code(header.as_deref(), &body)
        };
        let verdict = classify(host, status, code, ra, &error_text(&body));
        Ok(Answer {
            verdict,
            code,
            body,
        })
    }

    fn json(&self, a: &Answer, what: &str) -> Result<Value, HubError> {
        serde_json::from_str(&a.body).map_err(|e| HubError::Unreachable {
            hub: self.hub.host.clone(),
            message: format!("unreadable {what}: {e}"),
        })
    }

    /// An answer that is none of the outcomes the caller handles.
    fn unexpected(&self, a: Answer, what: &str) -> HubError {
        match a.verdict {
            Verdict::Failed(e) => e,
            v => HubError::Rejected {
                hub: self.hub.host.clone(),
                message: format!("{what}: unexpected answer ({v:?}): {}", error_text(&a.body)),
            },
        }
    }

    /// `GET /devices/{id}`: the device, or `None` when it does not exist (404001).
    async fn get_device(&self, path: &str) -> Result<Option<Value>, HubError> {
        let a = self.request(Method::GET, path, None, None).await?;
        match a.verdict {
            Verdict::Ok => Ok(Some(self.json(&a, "device")?)),
            Verdict::Absent => Ok(None),
            _ => Err(self.unexpected(a, "read device")),
        }
    }
}

impl AzureIotHub {
    /// An adapter for a linked hub; settings errors surface on every call as `Rejected`.
    pub fn new(hub: &LinkedHub, outbound: &Outbound) -> Self {
        AzureIotHub {
            host: hub.host.to_ascii_lowercase(),
            ready: build(hub, outbound),
        }
    }

    fn call(&self) -> Result<Call<'_>, HubError> {
        let r = self.ready.as_ref().map_err(|e| HubError::Rejected {
            hub: self.host.clone(),
            message: format!("misconfigured azure-iothub hub: {e}"),
        })?;
        Ok(Call {
            hub: self,
            r,
            deadline: Instant::now() + r.deadline,
        })
    }
}

fn seg(id: &str) -> String {
    enc(id)
}

/// Is there anything in this twin to write (tags or desired properties)?
fn twin_is_empty(t: &TwinState) -> bool {
    let empty = |v: &Option<Value>| match v {
        None | Some(Value::Null) => true,
        Some(Value::Object(m)) => m.is_empty(),
        Some(_) => false,
    };
    empty(&t.tags) && t.properties.as_ref().is_none_or(|p| empty(&p.desired))
}

/// Attempts at a conditional write that the hub answers "ETag stale" or "exists"/"absent"
/// because someone else changed the device in between: the first, then one retry.
const WRITE_ATTEMPTS: usize = 2;

#[async_trait::async_trait]
impl HubAdapter for AzureIotHub {
    /// Create or replace the identity, then (when given and not empty on a fresh identity) the
    /// twin, all within `deadline_ms`:
    ///
    /// * with a twin (an initial assignment or a move: the device is most likely new here):
    ///   `PUT /devices/{id}` without `If-Match` creates it in one request; on 409 the device is
    ///   read and replaced as below;
    /// * without a twin (a re-registration): `GET /devices/{id}`; when the hub already holds the
    ///   same status, credentials and capabilities nothing is written (one request); otherwise
    ///   the device read is written back with dps's fields changed and every other field kept
    ///   (`deviceScope`, `parentScopes`, `statusReason`: a full PUT would reset them), under
    ///   `If-Match: "<its etag>"`. A stale ETag (someone changed it in between) is read and
    ///   written once more.
    /// * twin: `PUT /twins/{id}` with `If-Match: "*"` replacing tags and desired properties,
    ///   unless the identity was just created and the twin is empty (a new identity's twin is
    ///   already empty: writing it would only need ServiceConnect for nothing).
    async fn upsert_device(
        &self,
        identity: &HubIdentity,
        twin: Option<&TwinState>,
    ) -> Result<(), HubError> {
        let call = self.call()?;
        let path = format!("/devices/{}", seg(&identity.device_id));
        let want = json!({
            "deviceId": identity.device_id,
            "status": if identity.enabled { "enabled" } else { "disabled" },
            "authentication": auth_json(&identity.auth),
            "capabilities": {"iotEdge": identity.capabilities.iot_edge},
        });
        let mut created = false;
        let mut try_create = twin.is_some();
        let mut done = false;
        for _ in 0..=WRITE_ATTEMPTS {
            if try_create {
                let a = call.request(Method::PUT, &path, None, Some(&want)).await?;
                match a.verdict {
                    Verdict::Ok => {
                        created = true;
                        done = true;
                        break;
                    }
                    Verdict::Exists => {}
                    _ => return Err(call.unexpected(a, "create device")),
                }
            }
            // It exists (or probably does): read it and replace it conditionally.
            let Some(dev) = call.get_device(&path).await? else {
                try_create = true;
                continue;
            };
            if same_identity(&dev, &want) {
                done = true;
                break;
            }
            let etag = dev
                .get("etag")
                .and_then(Value::as_str)
                .unwrap_or("*")
                .to_string();
            let mut body = dev;
            for k in ["deviceId", "status", "authentication", "capabilities"] {
                body[k] = want[k].clone();
            }
            let a = call
                .request(Method::PUT, &path, Some(&etag), Some(&body))
                .await?;
            match a.verdict {
                Verdict::Ok => {
                    done = true;
                    break;
                }
                // Changed or deleted in between: read again (or create).
                Verdict::Stale => try_create = false,
                Verdict::Absent => try_create = true,
                _ => return Err(call.unexpected(a, "replace device")),
            }
        }
        if !done {
            return Err(HubError::Unreachable {
                hub: self.host.clone(),
                message: "the device kept changing on the hub while dps wrote it".into(),
            });
        }
        let Some(t) = twin else { return Ok(()) };
        let t = t.for_hub();
        if created && twin_is_empty(&t) {
            return Ok(());
        }
        // Replace tags and desired properties (the adapter contract), hence PUT, not PATCH.
        let body = json!({
            "deviceId": identity.device_id,
            "tags": t.tags.unwrap_or_else(|| json!({})),
            "properties": {"desired": t.properties.and_then(|p| p.desired).unwrap_or_else(|| json!({}))},
        });
        let a = call
            .request(
                Method::PUT,
                &format!("/twins/{}", seg(&identity.device_id)),
                Some("*"),
                Some(&body),
            )
            .await?;
        match a.verdict {
            Verdict::Ok => Ok(()),
            Verdict::Failed(HubError::Unauthorized { hub, message }) => {
                Err(HubError::Unauthorized {
                    hub,
                    message: format!(
                        "twin write refused: the policy '{}' needs ServiceConnect to write twins ({message})",
                        call.r.cs.key_name
                    ),
                })
            }
            _ => Err(call.unexpected(a, "write twin")),
        }
    }

    /// `GET /twins/{id}`; `None` when the device does not exist (404001), or when the hub's tier
    /// has no twins (403010, Basic): there is then no twin to carry.
    async fn get_twin(&self, device_id: &str) -> Result<Option<TwinState>, HubError> {
        let call = self.call()?;
        let a = call
            .request(
                Method::GET,
                &format!("/twins/{}", seg(device_id)),
                None,
                None,
            )
            .await?;
        match &a.verdict {
            Verdict::Ok => {}
            Verdict::Absent => return Ok(None),
            _ if a.code == Some(403_010) => return Ok(None),
            _ => return Err(call.unexpected(a, "read twin")),
        }
        let v = call.json(&a, "twin")?;
        let t = TwinState {
            tags: v.get("tags").filter(|t| !t.is_null()).cloned(),
            properties: Some(TwinProperties {
                desired: v.pointer("/properties/desired").cloned(),
            }),
        };
        Ok(Some(t.for_hub()))
    }

    /// `GET /devices/{id}`, then `PUT` it back with `status` changed under
    /// `If-Match: "<its etag>"`; a stale ETag is read and written once more.
    async fn set_enabled(&self, device_id: &str, enabled: bool) -> Result<(), HubError> {
        let call = self.call()?;
        let path = format!("/devices/{}", seg(device_id));
        let status = if enabled { "enabled" } else { "disabled" };
        for _ in 0..WRITE_ATTEMPTS {
            let Some(mut dev) = call.get_device(&path).await? else {
                return Ok(());
            };
            if dev["status"] == status {
                return Ok(());
            }
            let etag = dev
                .get("etag")
                .and_then(Value::as_str)
                .unwrap_or("*")
                .to_string();
            dev["status"] = Value::String(status.into());
            let a = call
                .request(Method::PUT, &path, Some(&etag), Some(&dev))
                .await?;
            match a.verdict {
                Verdict::Ok | Verdict::Absent => return Ok(()),
                Verdict::Stale => continue,
                _ => return Err(call.unexpected(a, "update device")),
            }
        }
        Err(HubError::Unreachable {
            hub: self.host.clone(),
            message: "the device kept changing on the hub while dps updated it".into(),
        })
    }

    /// `DELETE /devices/{id}` with `If-Match: "*"`; absent counts as done.
    async fn delete_device(&self, device_id: &str) -> Result<(), HubError> {
        let call = self.call()?;
        let a = call
            .request(
                Method::DELETE,
                &format!("/devices/{}", seg(device_id)),
                Some("*"),
                None,
            )
            .await?;
        match a.verdict {
            Verdict::Ok | Verdict::Absent => Ok(()),
            _ => Err(call.unexpected(a, "delete device")),
        }
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
    fn spaces_around_names_and_values_are_not_part_of_them() {
        let tight = HubConnectionString::parse(
            "HostName=h.azure-devices.net;SharedAccessKeyName=p;SharedAccessKey=c2VjcmV0LWtleS0wMTIzNDU2Nzg5",
        )
        .unwrap();
        let spaced = HubConnectionString::parse(
            " HostName = h.azure-devices.net ; SharedAccessKeyName= p ;SharedAccessKey= c2VjcmV0LWtleS0wMTIzNDU2Nzg5 ",
        )
        .unwrap();
        assert_eq!(spaced.host_name, "h.azure-devices.net");
        assert_eq!(spaced.key_name, "p");
        assert_eq!(
            spaced.token_at(1_900_000_000),
            tight.token_at(1_900_000_000)
        );
        for bad in [
            "HostName=h;SharedAccessKeyName=p;SharedAccessKey= ",
            "HostName=h;SharedAccessKeyName=p;SharedAccessKey=not base64!",
            "HostName= ;SharedAccessKeyName=p;SharedAccessKey=c2VjcmV0",
            "HostName=h;SharedAccessKeyName=;SharedAccessKey=c2VjcmV0",
            "HostName=h;SharedAccessKey",
            "",
        ] {
            let e = HubConnectionString::parse(bad).unwrap_err();
            assert!(!e.contains("c2Vj"), "the error repeats the key: {e}");
        }
    }

    #[test]
    fn device_ids_are_escaped_in_paths() {
        assert_eq!(seg("a b/c:d"), "a%20b%2Fc%3Ad");
        assert_eq!(seg("dev-1.a_b~c"), "dev-1.a_b~c");
    }

    /// The token of the Node SDK (`azure-iothub` 1.16.6,
    /// `SharedAccessSignature.create(host, policy, key, 1900000000).toString()`), byte for byte.
    #[test]
    fn service_token_is_the_node_sdks() {
        let cs = HubConnectionString::parse(
            "HostName=my-hub.azure-devices.net;SharedAccessKeyName=dps-linker;SharedAccessKey=ZmFrZS1pb3QtaHViLXBvbGljeS1rZXktMDEyMzQ1Njc4OWFiY2Q=",
        )
        .unwrap();
        assert_eq!(
            cs.token_at(1_900_000_000),
            "SharedAccessSignature sr=my-hub.azure-devices.net&sig=go9ZCzkkB5Vq8kQGs7FF6egsiWdXPlA9tPbrC8JudAs%3D&skn=dps-linker&se=1900000000"
        );
    }

    #[test]
    fn error_codes_from_every_format() {
        let current = r#"{"Message":"{\"errorCode\":404001,\"trackingId\":\"t\",\"message\":\"Device not found\",\"timestampUtc\":\"2026-01-01T00:00:00Z\"}","ExceptionMessage":""}"#;
        assert_eq!(error_code(Some("DeviceNotFound"), current), Some(404_001));
        assert_eq!(error_code(None, r#"{"errorCode":403002}"#), Some(403_002));
        assert_eq!(
            error_code(
                None,
                r#"{"Message":"ErrorCode:PreconditionFailed;etag","ExceptionMessage":""}"#
            ),
            Some(412_001)
        );
        assert_eq!(error_code(Some("404012"), ""), Some(404_012));
        assert_eq!(
            error_code(Some("ThrottlingException"), "not json"),
            Some(429_001)
        );
        assert_eq!(error_code(None, ""), None);
        assert_eq!(error_text(current), "Device not found");
    }

    #[test]
    fn classification_follows_the_code() {
        let c = |s, code| classify("h", s, code, None, "x");
        assert!(matches!(
            c(401, Some(401_002)),
            Verdict::Failed(HubError::Unauthorized { .. })
        ));
        assert!(matches!(
            c(403, Some(403_002)),
            Verdict::Failed(HubError::Throttled { .. })
        ));
        assert!(matches!(
            c(403, Some(403_001)),
            Verdict::Failed(HubError::Rejected { .. })
        ));
        assert!(matches!(
            c(403, None),
            Verdict::Failed(HubError::Rejected { .. })
        ));
        assert_eq!(c(404, Some(404_001)), Verdict::Absent);
        assert!(matches!(
            c(404, Some(404_012)),
            Verdict::Failed(HubError::Unreachable { .. })
        ));
        assert!(matches!(
            c(404, None),
            Verdict::Failed(HubError::Unreachable { .. })
        ));
        assert_eq!(c(412, Some(412_001)), Verdict::Stale);
        assert_eq!(c(400, Some(400_023)), Verdict::Stale);
        for t in [400_024, 400_029, 400_030] {
            assert!(matches!(
                c(400, Some(t)),
                Verdict::Failed(HubError::Unreachable { .. })
            ));
        }
        assert!(matches!(
            c(400, Some(400_004)),
            Verdict::Failed(HubError::Rejected { .. })
        ));
        assert_eq!(until_quota_reset(86_400 * 5 + 3_600), 82_800);
    }
}

//! Connection strings and the HTTP client for the service and admin APIs.

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The service API version the CLI speaks.
pub const SERVICE_API_VERSION: &str = "2021-10-01";

/// Largest page the CLI asks for.
const PAGE_SIZE: usize = 100;

/// `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// The service host name (selects the instance).
    pub host_name: String,
    /// The access policy name.
    pub key_name: String,
    /// The base64 policy key.
    pub key: String,
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl ConnectionString {
    /// Parse a connection string; the error names what is wrong.
    pub fn parse(s: &str) -> Result<Self> {
        let (mut host, mut name, mut key) = (None, None, None);
        for part in s.trim().split(';') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (k, v) = part.split_once('=').ok_or_else(|| {
                anyhow!("connection string: '{part}' is not of the form Key=Value")
            })?;
            match k {
                "HostName" => host = Some(v.to_string()),
                "SharedAccessKeyName" => name = Some(v.to_string()),
                "SharedAccessKey" => key = Some(v.to_string()),
                _ => {}
            }
        }
        let host_name = host
            .filter(|h| !h.is_empty())
            .ok_or_else(|| anyhow!("connection string: HostName is missing"))?;
        let key_name = name
            .filter(|h| !h.is_empty())
            .ok_or_else(|| anyhow!("connection string: SharedAccessKeyName is missing"))?;
        let key = key
            .filter(|h| !h.is_empty())
            .ok_or_else(|| anyhow!("connection string: SharedAccessKey is missing"))?;
        if B64.decode(&key).is_err() {
            bail!("connection string: SharedAccessKey is not valid base64");
        }
        Ok(ConnectionString {
            host_name,
            key_name,
            key,
        })
    }

    /// A service SAS token for this policy, valid for an hour.
    pub fn token(&self) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        dps_core::sas::sign_token(&self.host_name, &self.key, Some(&self.key_name), now + 3600)
            .unwrap_or_default()
    }
}

/// An error answer from the service.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Six-digit code.
    pub error_code: Option<u64>,
    /// The service's message.
    pub message: String,
    /// Tracking id.
    pub tracking_id: Option<String>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (HTTP {}", self.message, self.status)?;
        if let Some(c) = self.error_code {
            write!(f, ", errorCode {c}")?;
        }
        if let Some(t) = &self.tracking_id {
            write!(f, ", trackingId {t}")?;
        }
        write!(f, ")")
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    fn from_body(status: StatusCode, body: &[u8]) -> Self {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let text = String::from_utf8_lossy(body).trim().to_string();
        ApiError {
            status: status.as_u16(),
            error_code: v.get("errorCode").and_then(|c| {
                c.as_u64()
                    .or_else(|| c.as_str().and_then(|s| s.parse().ok()))
            }),
            message: v
                .get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| {
                    if text.is_empty() {
                        status
                            .canonical_reason()
                            .unwrap_or("request failed")
                            .to_string()
                    } else {
                        text
                    }
                }),
            tracking_id: v
                .get("trackingId")
                .and_then(|m| m.as_str())
                .map(str::to_string),
        }
    }
}

/// The CA certificates the CLI trusts besides the system roots: `--ca-file`, or
/// `./dps-data/ca.pem` when it exists.
pub fn extra_ca_file(ca_file: Option<&Path>) -> Option<PathBuf> {
    match ca_file {
        Some(p) => Some(p.to_path_buf()),
        None => {
            let p = PathBuf::from("dps-data/ca.pem");
            p.exists().then_some(p)
        }
    }
}

/// The service/admin API client.
pub struct Service {
    http: reqwest::Client,
    base: String,
    conn: ConnectionString,
}

/// A response: status, headers, JSON body (`Null` when empty).
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Value,
}

impl Service {
    /// A client for `conn`, reaching `url` (default `https://{HostName}`).
    pub fn new(conn: ConnectionString, url: Option<&str>, ca_file: Option<&Path>) -> Result<Self> {
        let base = url
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_else(|| format!("https://{}", conn.host_name));
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .user_agent(concat!("dps-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = extra_ca_file(ca_file) {
            let pem = std::fs::read(&path)
                .with_context(|| format!("cannot read CA file {}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("CA file {} is not a PEM bundle", path.display()))?;
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder.build().context("building the HTTP client")?;
        Ok(Service { http, base, conn })
    }

    /// The connection string in use.
    pub fn connection(&self) -> &ConnectionString {
        &self.conn
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Send a request; non-2xx answers become [`ApiError`].
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> Result<Reply> {
        let url = format!("{}{}", self.base, path);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .header("Authorization", self.conn.token())
            .header("Accept", "application/json");
        for (k, v) in headers {
            req = req.header(*k, HeaderValue::from_str(v).context("bad header value")?);
        }
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json; charset=utf-8")
                .body(serde_json::to_vec(b)?);
        }
        let resp = req.send().await.map_err(|e| {
            let chain = error_chain(&e);
            let hint = if chain.contains("UnknownIssuer") {
                " (the server's certificate is not trusted: pass --ca-file with its CA, \
                     e.g. dps-data/ca.pem)"
            } else {
                ""
            };
            anyhow!("{method} {url}: {chain}{hint}")
        })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| anyhow!("{method} {url}: reading the answer: {e}"))?;
        if !status.is_success() {
            return Err(ApiError::from_body(status, &bytes).into());
        }
        let body = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .with_context(|| format!("{method} {url}: the answer is not JSON"))?
        };
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// GET returning the raw body (PEM, DER): non-2xx answers become [`ApiError`].
    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        let url = format!("{}{}", self.base, path);
        let resp = self
            .http
            .get(&url)
            .header("Authorization", self.conn.token())
            .send()
            .await
            .map_err(|e| anyhow!("GET {url}: {}", error_chain(&e)))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| anyhow!("GET {url}: reading the answer: {e}"))?;
        if !status.is_success() {
            return Err(ApiError::from_body(status, &bytes).into());
        }
        Ok(bytes.to_vec())
    }

    /// GET returning the body.
    pub async fn get(&self, path: &str) -> Result<Value> {
        Ok(self.call(Method::GET, path, None, &[]).await?.body)
    }

    /// Run a service-API query (`POST …/query`), following `x-ms-continuation` until the last
    /// page or until `top` items were read.
    pub async fn query_all(
        &self,
        path: &str,
        query: &Value,
        top: Option<usize>,
    ) -> Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let want = match top {
                Some(t) => {
                    if items.len() >= t {
                        break;
                    }
                    (t - items.len()).min(PAGE_SIZE)
                }
                None => PAGE_SIZE,
            };
            let mut headers = vec![("x-ms-max-item-count", want.to_string())];
            if let Some(c) = &continuation {
                headers.push(("x-ms-continuation", c.clone()));
            }
            let reply = self.call(Method::POST, path, Some(query), &headers).await?;
            match reply.body {
                Value::Array(a) => items.extend(a),
                Value::Null => {}
                other => bail!("the query answer is not a JSON array: {other}"),
            }
            continuation = reply
                .headers
                .get("x-ms-continuation")
                .and_then(|v| v.to_str().ok())
                .filter(|s| !s.is_empty())
                .map(str::to_string);
            if continuation.is_none() {
                break;
            }
        }
        if let Some(t) = top {
            items.truncate(t);
        }
        Ok(items)
    }
}

/// A service-API path with `api-version`.
pub fn svc_path(path: &str, query: &[(&str, Option<String>)]) -> String {
    let mut s = format!("{path}?api-version={SERVICE_API_VERSION}");
    for (k, v) in query {
        if let Some(v) = v {
            s.push('&');
            s.push_str(k);
            s.push('=');
            s.push_str(&enc(v));
        }
    }
    s
}

/// Percent-encode a path segment or query value.
pub fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings() {
        let c = ConnectionString::parse(
            "HostName=dps.example;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=a2V5a2V5a2V5a2V5a2V5a2V5;",
        )
        .unwrap();
        assert_eq!(c.host_name, "dps.example");
        assert_eq!(c.key_name, "provisioningserviceowner");
        assert!(!format!("{c:?}").contains("a2V5"));
        let t = dps_core::sas::SasToken::parse(&c.token()).unwrap();
        assert_eq!(t.sr, "dps.example");
        assert!(t.verify_signature([c.key.as_str()]).is_ok());

        let e = ConnectionString::parse("SharedAccessKeyName=p;SharedAccessKey=a2V5").unwrap_err();
        assert!(e.to_string().contains("HostName"), "{e}");
        let e = ConnectionString::parse("HostName=h;SharedAccessKeyName=p;SharedAccessKey=%%%")
            .unwrap_err();
        assert!(e.to_string().contains("base64"), "{e}");
        let e = ConnectionString::parse("HostName=h;SharedAccessKeyName=p").unwrap_err();
        assert!(e.to_string().contains("SharedAccessKey"), "{e}");
        assert!(ConnectionString::parse("garbage").is_err());
        // '=' inside the key survives (split at the first '=').
        let c =
            ConnectionString::parse("HostName=h;SharedAccessKeyName=p;SharedAccessKey=a2V5a2U=")
                .unwrap();
        assert_eq!(c.key, "a2V5a2U=");
    }

    #[test]
    fn paths() {
        assert_eq!(
            svc_path(
                "/enrollments/query",
                &[("status", Some("enabled".into())), ("prefix", None)]
            ),
            "/enrollments/query?api-version=2021-10-01&status=enabled"
        );
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn api_error_display() {
        let e = ApiError::from_body(
            StatusCode::NOT_FOUND,
            br#"{"errorCode":404201,"message":"Enrollment 'x' not found.","trackingId":"t1"}"#,
        );
        assert_eq!(
            e.to_string(),
            "Enrollment 'x' not found. (HTTP 404, errorCode 404201, trackingId t1)"
        );
        let e = ApiError::from_body(StatusCode::BAD_GATEWAY, b"");
        assert!(e.to_string().starts_with("Bad Gateway"));
    }
}

#[cfg(test)]
mod paging_tests {
    use super::*;
    use axum::http::HeaderMap as AxHeaders;
    use axum::routing::post;
    use axum::Json;

    /// A fake service API: 7 items, pages of `x-ms-max-item-count`, continuation = next index.
    async fn query(headers: AxHeaders) -> (AxHeaders, Json<Value>) {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            auth.starts_with("SharedAccessSignature sr=h%2Eexample&") && auth.contains("skn=p"),
            "{auth}"
        );
        let n: usize = headers
            .get("x-ms-max-item-count")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(100)
            .min(3);
        let start: usize = headers
            .get("x-ms-continuation")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let end = (start + n).min(7);
        let items: Vec<Value> = (start..end).map(json_item).collect();
        let mut h = AxHeaders::new();
        h.insert("x-ms-item-type", "enrollment".parse().unwrap());
        if end < 7 {
            h.insert("x-ms-continuation", end.to_string().parse().unwrap());
        }
        (h, Json(Value::Array(items)))
    }

    fn json_item(i: usize) -> Value {
        serde_json::json!({"registrationId": format!("d{i}")})
    }

    #[tokio::test]
    async fn query_follows_continuations_and_respects_top() {
        let app = axum::Router::new().route("/enrollments/query", post(query));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let conn = ConnectionString::parse(
            "HostName=h.example;SharedAccessKeyName=p;SharedAccessKey=a2V5a2V5a2V5a2V5",
        )
        .unwrap();
        let svc = Service::new(conn, Some(&format!("http://{addr}")), None).unwrap();
        let q = serde_json::json!({"query": "SELECT * FROM enrollments"});
        let all = svc
            .query_all(&svc_path("/enrollments/query", &[]), &q, None)
            .await
            .unwrap();
        let ids: Vec<&str> = all
            .iter()
            .map(|v| v["registrationId"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["d0", "d1", "d2", "d3", "d4", "d5", "d6"]);
        let top = svc
            .query_all(&svc_path("/enrollments/query", &[]), &q, Some(4))
            .await
            .unwrap();
        assert_eq!(top.len(), 4);
        // A 404 from the fake becomes an ApiError.
        let e = svc.get("/nope").await.unwrap_err();
        assert_eq!(e.downcast_ref::<ApiError>().unwrap().status, 404);
    }
}

//! The HTTP endpoints brokers call: `/brokerAuth/{instance}/{hub}/{flavour}/{check}` on dps's
//! HTTPS listener (routes in [`crate::routes`], family `BrokerAuth`).
//!
//! Every request is authenticated with the hub's broker secret (`Authorization: Bearer
//! <secret>`, or basic auth with the secret as password, e.g. from `https://dps:<secret>@host/…`
//! in the broker's URL setting) before its body is read; a broker that fails gets `401`. Then
//! the question is answered from the hub's [`AuthCache`] (in the hubs layer, shared with the
//! hub's adapter that invalidates it) in the flavour's own format. A store failure is an error answer (`503`), never an allow. Passwords are never
//! logged; nothing of a request is logged at all.

use crate::app::App;
use crate::hubs::broker_auth::rules::{self, Action};
use crate::hubs::broker_auth::{AuthCache, Facts, Settings};
use crate::routes::BrokerCheck;
use axum::body::Body;
use axum::http::{header, HeaderMap, Request, Response, StatusCode};
use base64::Engine;
use dps_core::instance::HubKind;
use serde_json::{json, Map, Value};
use std::time::Instant;

/// Largest request body read (VerneMQ's `auth_on_publish` carries the payload unless the hook
/// is configured with `no_payload = on`).
const MAX_BODY: usize = 256 * 1024;

/// A decision of the rules, before it is rendered in a broker's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Allow,
    Deny,
    /// Not a device of this hub: let the broker's next backend decide (a deny where the broker
    /// has no such notion).
    Ignore,
}

impl Decision {
    fn label(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Ignore => "ignore",
        }
    }
    fn of(b: bool) -> Decision {
        if b {
            Decision::Allow
        } else {
            Decision::Deny
        }
    }
}

/// The metric `kind` of a check.
fn kind_of(check: BrokerCheck) -> &'static str {
    use BrokerCheck::*;
    match check {
        RabbitUser | EmqxAuthn | VerneRegister | GoUser => "connect",
        RabbitVhost => "vhost",
        RabbitResource => "resource",
        RabbitTopic | EmqxAuthz | GoAcl => "topic",
        VernePublish => "publish",
        VerneSubscribe => "subscribe",
        GoSuperuser => "superuser",
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from(body))
        .expect("valid response")
}

fn json_ok(v: Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from(v.to_string()))
        .expect("valid response")
}

fn count(kind: &'static str, result: &'static str) {
    metrics::counter!("dps_broker_auth_checks_total", "kind" => kind, "result" => result)
        .increment(1);
}

/// The broker's secret from `Authorization` (Bearer, or Basic with the secret as password).
fn presented_secret(h: &HeaderMap) -> Option<Vec<u8>> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(rest.as_bytes().to_vec())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let colon = raw.iter().position(|b| *b == b':')?;
        Some(raw[colon + 1..].to_vec())
    } else {
        None
    }
}

/// The request's parameters: query string, then a form or JSON body (JSON scalars as text;
/// the JSON object itself is kept for VerneMQ's topic list).
struct Params {
    map: Vec<(String, String)>,
    json: Option<Map<String, Value>>,
}

impl Params {
    fn get(&self, k: &str) -> Option<&str> {
        self.map
            .iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
    fn parse(query: Vec<(String, String)>, ctype: &str, body: &[u8]) -> Params {
        let mut map = query;
        let mut json = None;
        let body_trimmed = body.iter().position(|b| !b.is_ascii_whitespace());
        if ctype.contains("json") || body_trimmed.is_some_and(|i| body[i] == b'{') {
            if let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(body) {
                for (k, v) in &o {
                    let s = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        _ => continue,
                    };
                    map.push((k.clone(), s));
                }
                json = Some(o);
            }
        } else if !body.is_empty() {
            for (k, v) in form_urlencoded(body) {
                map.push((k, v));
            }
        }
        Params { map, json }
    }
}

fn form_urlencoded(body: &[u8]) -> Vec<(String, String)> {
    let d = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (d(k), d(v))
        })
        .collect()
}

/// Answer one broker request (`segs`: the decoded path, `brokerAuth/{instance}/{hub}/…`).
pub async fn handle(
    app: &App,
    req: Request<Body>,
    segs: &[String],
    check: BrokerCheck,
) -> Response<Body> {
    let started = Instant::now();
    let kind = kind_of(check);
    let (Some(instance), Some(host)) = (segs.get(1), segs.get(2)) else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    let Some(inst) = app.instances.by_name(instance) else {
        return text(StatusCode::NOT_FOUND, "no such instance");
    };
    let Some(hub) = inst.hub(host).filter(|h| h.kind == HubKind::BrokerAuth) else {
        return text(StatusCode::NOT_FOUND, "no such broker-auth hub");
    };
    let cache = app.admin.hubs().broker_auth_cache(hub);
    let settings = match cache.settings(hub) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(hub = %hub.host, error = %e, "broker-auth hub is misconfigured");
            count(kind, "error");
            return text(StatusCode::SERVICE_UNAVAILABLE, "hub misconfigured");
        }
    };
    // The broker first, before the body is read.
    if !presented_secret(req.headers()).is_some_and(|s| settings.secret_matches(&s)) {
        count(kind, "unauthorized");
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(header::WWW_AUTHENTICATE, "Bearer")
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Body::from("the broker's secret is missing or wrong"))
            .expect("valid response");
    }
    let query = crate::http::query_params(req.uri());
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let vernemq_m5 = req
        .headers()
        .get("vernemq-hook")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|h| h.ends_with("_m5"));
    let body = match crate::http::read_body(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let p = Params::parse(query, &ctype, &body);
    let ask = Ask {
        cache: &cache,
        s: &settings,
    };
    let resp = match answer(&ask, check, &p, vernemq_m5).await {
        Ok((decision, resp)) => {
            count(kind, decision.label());
            resp
        }
        Err(e) => {
            tracing::warn!(hub = %hub.host, error = %e, "broker-auth check failed: the store did not answer");
            count(kind, "error");
            text(StatusCode::SERVICE_UNAVAILABLE, "dps cannot answer now")
        }
    };
    metrics::histogram!("dps_broker_auth_check_duration_seconds", "kind" => kind)
        .record(started.elapsed().as_secs_f64());
    resp
}

struct Ask<'a> {
    cache: &'a AuthCache,
    s: &'a Settings,
}

impl Ask<'_> {
    /// The facts of an enabled device, `None` when there is no such device (`Ignore`), `Some(None)`
    /// when it exists but is disabled.
    async fn device(&self, id: &str) -> Result<Option<Option<Facts>>, String> {
        if !rules::valid_device_id(id) {
            return Ok(None);
        }
        Ok(match self.cache.facts(self.s, id).await? {
            None => None,
            Some(f) if f.enabled => Some(Some(f)),
            Some(_) => Some(None),
        })
    }

    /// May `username` (with `client_id` when the broker says it) connect with `password` (or
    /// with a certificate when `password` is `None` and `certificate_login`)?
    async fn connect(
        &self,
        username: &str,
        client_id: Option<&str>,
        password: Option<&str>,
        certificate_login: bool,
    ) -> Result<Decision, String> {
        let Some(dev) = self.device(username).await? else {
            return Ok(Decision::Ignore);
        };
        let Some(f) = dev else {
            return Ok(Decision::Deny);
        };
        if client_id.is_some_and(|c| c != username) {
            return Ok(Decision::Deny);
        }
        Ok(Decision::of(match password {
            Some(p) if !p.is_empty() => f.password_matches(p.as_bytes()),
            _ => certificate_login && f.certificate,
        }))
    }

    /// May `username` (client id `client_id` if given) do `action` on MQTT `topic`?
    async fn topic(
        &self,
        username: &str,
        client_id: Option<&str>,
        topic: &str,
        action: Action,
    ) -> Result<Decision, String> {
        let Some(dev) = self.device(username).await? else {
            return Ok(Decision::Ignore);
        };
        Ok(Decision::of(
            dev.is_some()
                && client_id.is_none_or(|c| c == username)
                && rules::mqtt_topic_allowed(&self.s.topic_prefix, username, topic, action),
        ))
    }
}

async fn answer(
    a: &Ask<'_>,
    check: BrokerCheck,
    p: &Params,
    vernemq_m5: bool,
) -> Result<(Decision, Response<Body>), String> {
    use BrokerCheck::*;
    let username = p.get("username").unwrap_or("");
    match check {
        RabbitUser | RabbitVhost | RabbitResource | RabbitTopic => {
            let d = rabbitmq(a, check, p).await?;
            let body = if d == Decision::Allow {
                "allow"
            } else {
                "deny"
            };
            Ok((d, text(StatusCode::OK, body)))
        }
        EmqxAuthn => {
            let d = a
                .connect(
                    username,
                    p.get("clientid"),
                    p.get("password"),
                    p.get("cert_common_name")
                        .is_some_and(|cn| !cn.is_empty() && cn == username),
                )
                .await?;
            Ok((
                d,
                json_ok(json!({"result": d.label(), "is_superuser": false})),
            ))
        }
        EmqxAuthz => {
            let topic = p.get("topic").unwrap_or("");
            let d = match p.get("action").unwrap_or("") {
                "publish" => {
                    a.topic(username, p.get("clientid"), topic, Action::Publish)
                        .await?
                }
                "subscribe" => {
                    a.topic(username, p.get("clientid"), topic, Action::Subscribe)
                        .await?
                }
                "all" => {
                    let x = a
                        .topic(username, p.get("clientid"), topic, Action::Publish)
                        .await?;
                    if x == Decision::Allow {
                        a.topic(username, p.get("clientid"), topic, Action::Subscribe)
                            .await?
                    } else {
                        x
                    }
                }
                _ => Decision::Deny,
            };
            Ok((d, json_ok(json!({"result": d.label()}))))
        }
        VerneRegister => {
            let d = a
                .connect(username, p.get("client_id"), p.get("password"), false)
                .await?;
            Ok((d, vernemq(d)))
        }
        VernePublish => {
            let d = a
                .topic(
                    username,
                    p.get("client_id"),
                    p.get("topic").unwrap_or(""),
                    Action::Publish,
                )
                .await?;
            Ok((d, vernemq(d)))
        }
        VerneSubscribe => {
            let topics: Vec<(String, Value)> = p
                .json
                .as_ref()
                .and_then(|o| o.get("topics"))
                .and_then(Value::as_array)
                .map(|v| {
                    v.iter()
                        .map(|t| {
                            (
                                t.get("topic")
                                    .and_then(Value::as_str)
                                    .unwrap_or("")
                                    .to_string(),
                                t.get("qos").cloned().unwrap_or(json!(0)),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut decisions = Vec::with_capacity(topics.len());
            for (t, _) in &topics {
                decisions.push(
                    a.topic(username, p.get("client_id"), t, Action::Subscribe)
                        .await?,
                );
            }
            if topics.is_empty() {
                return Ok((Decision::Deny, vernemq(Decision::Deny)));
            }
            if decisions.contains(&Decision::Ignore) {
                return Ok((Decision::Ignore, vernemq(Decision::Ignore)));
            }
            let allowed = decisions.iter().filter(|d| **d == Decision::Allow).count();
            if allowed == topics.len() {
                Ok((Decision::Allow, vernemq(Decision::Allow)))
            } else if allowed == 0 || vernemq_m5 {
                // MQTT 5 hooks read per-topic changes from `modifiers`: refuse the whole
                // request rather than risk a format the broker would ignore.
                Ok((Decision::Deny, vernemq(Decision::Deny)))
            } else {
                // Some topics refused: QoS 128 rejects them one by one.
                let list: Vec<Value> = topics
                    .iter()
                    .zip(&decisions)
                    .map(|((t, q), d)| {
                        json!({"topic": t, "qos": if *d == Decision::Allow { q.clone() } else { json!(128) }})
                    })
                    .collect();
                Ok((
                    Decision::Deny,
                    json_ok(json!({"result": "ok", "topics": list})),
                ))
            }
        }
        GoUser => {
            let d = a
                .connect(username, p.get("clientid"), p.get("password"), false)
                .await?;
            Ok((d, go_auth(d)))
        }
        GoSuperuser => Ok((Decision::Deny, go_auth(Decision::Deny))),
        GoAcl => {
            let action = match p.get("acc").unwrap_or("") {
                "1" => Some(Action::Receive),
                "2" => Some(Action::Publish),
                "4" => Some(Action::Subscribe),
                // Read and write at once: both must be allowed.
                "3" => None,
                _ => return Ok((Decision::Deny, go_auth(Decision::Deny))),
            };
            let topic = p.get("topic").unwrap_or("");
            let d = match action {
                Some(act) => a.topic(username, p.get("clientid"), topic, act).await?,
                None => {
                    let x = a
                        .topic(username, p.get("clientid"), topic, Action::Publish)
                        .await?;
                    if x == Decision::Allow {
                        a.topic(username, p.get("clientid"), topic, Action::Receive)
                            .await?
                    } else {
                        x
                    }
                }
            };
            Ok((d, go_auth(d)))
        }
    }
}

/// RabbitMQ's four questions (`rabbitmq_auth_backend_http`, 3.x): `user` (username, password,
/// vhost, client_id), `vhost` (username, vhost, ip, client_id), `resource` (username, vhost,
/// resource, name, permission) and `topic` (… routing_key, variable_map.client_id).
async fn rabbitmq(a: &Ask<'_>, check: BrokerCheck, p: &Params) -> Result<Decision, String> {
    let username = p.get("username").unwrap_or("");
    if !rules::valid_rabbitmq_device_id(username) {
        return Ok(Decision::Deny);
    }
    let client_id = p
        .get("client_id")
        .or_else(|| p.get("variable_map.client_id"));
    let vhost_ok = p.get("vhost").is_none_or(|v| v == a.s.rabbitmq_vhost);
    let d = match check {
        BrokerCheck::RabbitUser => {
            // No password: RabbitMQ's certificate login (`ssl_cert_login`), username = CN.
            let password = p.get("password");
            let d = a
                .connect(username, client_id, password, password.is_none())
                .await?;
            if vhost_ok {
                d
            } else {
                Decision::Deny
            }
        }
        BrokerCheck::RabbitVhost => {
            let enabled = matches!(a.device(username).await?, Some(Some(_)));
            Decision::of(
                enabled
                    && p.get("vhost") == Some(a.s.rabbitmq_vhost.as_str())
                    && client_id.is_none_or(|c| c == username),
            )
        }
        BrokerCheck::RabbitResource => {
            let enabled = matches!(a.device(username).await?, Some(Some(_)));
            let name = p.get("name").unwrap_or("");
            let permission = p.get("permission").unwrap_or("");
            let own_queue = name
                .strip_prefix("mqtt-subscription-")
                .and_then(|r| r.strip_prefix(username))
                .is_some_and(|q| q == "qos0" || q == "qos1");
            let allowed = match p.get("resource").unwrap_or("") {
                "exchange" => {
                    name == a.s.rabbitmq_exchange && (permission == "write" || permission == "read")
                }
                "queue" => own_queue && matches!(permission, "configure" | "write" | "read"),
                _ => false,
            };
            Decision::of(enabled && vhost_ok && allowed)
        }
        _ => {
            let enabled = matches!(a.device(username).await?, Some(Some(_)));
            let write = match p.get("permission") {
                Some("write") => true,
                Some("read") => false,
                _ => return Ok(Decision::Deny),
            };
            Decision::of(
                enabled
                    && vhost_ok
                    && client_id.is_none_or(|c| c == username)
                    && p.get("name") == Some(a.s.rabbitmq_exchange.as_str())
                    && rules::rabbitmq_routing_key_allowed(
                        &a.s.topic_prefix,
                        username,
                        p.get("routing_key").unwrap_or(""),
                        write,
                    ),
            )
        }
    };
    Ok(d)
}

/// VerneMQ's answer: `ok`, an error, or `next` (another plugin decides).
fn vernemq(d: Decision) -> Response<Body> {
    json_ok(match d {
        Decision::Allow => json!({"result": "ok"}),
        Decision::Deny => json!({"result": {"error": "not_allowed"}}),
        Decision::Ignore => json!({"result": "next"}),
    })
}

/// mosquitto-go-auth's HTTP backend (`http_response_mode status`, the default): 200 allows,
/// 403 refuses (the plugin then asks its next backend). The body `ok` also suits
/// `http_response_mode text`.
fn go_auth(d: Decision) -> Response<Body> {
    if d == Decision::Allow {
        text(StatusCode::OK, "ok")
    } else {
        text(StatusCode::FORBIDDEN, "denied")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_come_from_bearer_or_basic() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(presented_secret(&h).as_deref(), Some(&b"abc"[..]));
        let b = base64::engine::general_purpose::STANDARD.encode("rabbit:s3cr:et");
        h.insert(header::AUTHORIZATION, format!("Basic {b}").parse().unwrap());
        assert_eq!(presented_secret(&h).as_deref(), Some(&b"s3cr:et"[..]));
        h.insert(
            header::AUTHORIZATION,
            "SharedAccessSignature x".parse().unwrap(),
        );
        assert_eq!(presented_secret(&h), None);
    }

    #[test]
    fn params_from_form_json_and_query() {
        let p = Params::parse(
            vec![("a".into(), "1".into())],
            "application/x-www-form-urlencoded",
            b"username=d1&password=a%2Bb%3D&variable_map.client_id=d1",
        );
        assert_eq!(p.get("username"), Some("d1"));
        assert_eq!(p.get("password"), Some("a+b="));
        assert_eq!(p.get("variable_map.client_id"), Some("d1"));
        assert_eq!(p.get("a"), Some("1"));
        let p = Params::parse(vec![], "application/json", br#"{"username":"d1","acc":4}"#);
        assert_eq!(p.get("acc"), Some("4"));
    }
}

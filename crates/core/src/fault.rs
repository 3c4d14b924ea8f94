//! Fault injection rules: how dps misbehaves on purpose so that device firmware can be tested
//! against throttling, slow assignments, failures and unreachable hubs (see
//! `docs/testing-with-dps.md`). This module is the rule itself (what it matches, what it does,
//! its validation); the server keeps the active rules and applies them.
//!
//! A rule matches a registration attempt of one instance on its registration id (a glob with
//! `*` and `?`, case-insensitive), enrollment group, transport and attestation (each optional),
//! with a probability, at most `count` times and until `expires`. Most rules apply to register
//! requests, after the device is authenticated: a device that fails attestation is refused as
//! always. Connection-level rules act earlier, where less is known (see [`FaultPoint`]):
//! `drop` at `connect` or `subscribe` (registration id and transport only) and `slowTls`
//! (transport and instance only: the TLS handshake comes before any registration id).

use serde::{Deserialize, Serialize};

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FaultAction {
    /// `429` with `retry-after` (`retryAfter` seconds), on the register request itself.
    Throttle,
    /// The registration stays `assigning`: for `delayPolls` polls, and/or `delayMs`
    /// milliseconds before its assignment starts.
    Delay,
    /// An error answer with `errorCode` (its status is the code's first three digits, as in
    /// Azure's codes: 500001 is a 500) and `message`.
    Fail,
    /// The linked hub (`hub`, or whichever hub the registration is assigned to) answers as
    /// unreachable: the registration ends retryable, as with a real outage.
    HubDown,
    /// The connection is closed at `stage`: after MQTT CONNECT or AMQP ATTACH (`connect`),
    /// after MQTT SUBSCRIBE (`subscribe`), when the register request arrives, before it is
    /// processed (`register`), or after it was processed, instead of (MQTT, AMQP) or in the
    /// middle of (HTTPS) the answer (`response`).
    Drop,
    /// The TLS handshake is held `delayMs` milliseconds before it completes.
    SlowTls,
}

/// Where a `drop` rule closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FaultStage {
    /// MQTT: after CONNECT (no CONNACK is sent). AMQP: at the first ATTACH (after OPEN and
    /// SASL). Not HTTPS.
    Connect,
    /// MQTT: after SUBSCRIBE (no SUBACK is sent). MQTT only.
    Subscribe,
    /// When the register request arrives (MQTT after its PUBACK), before it is processed:
    /// the device gets no answer and nothing is registered. HTTPS: closed before any response.
    #[serde(alias = "publish")]
    Register,
    /// After the register request was processed (the registration goes on): MQTT and AMQP
    /// close instead of answering; HTTPS sends the status line, the headers and part of the
    /// body, then closes.
    Response,
}

impl FaultStage {
    /// The name used in the API, the audit log and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultStage::Connect => "connect",
            FaultStage::Subscribe => "subscribe",
            FaultStage::Register => "register",
            FaultStage::Response => "response",
        }
    }
}

/// Where in a device's exchange a rule is matched (what is known there differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// The TLS handshake: transport and the instance named by SNI (`slowTls`).
    TlsHandshake,
    /// MQTT CONNECT / AMQP ATTACH: registration id and transport (`drop` at `connect`).
    Connect,
    /// MQTT SUBSCRIBE: registration id and transport (`drop` at `subscribe`).
    Subscribe,
    /// A register request of an authenticated device: everything (all other rules).
    Register,
}

impl FaultAction {
    /// The name used in metrics labels, the audit log and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultAction::Throttle => "throttle",
            FaultAction::Delay => "delay",
            FaultAction::Fail => "fail",
            FaultAction::HubDown => "hubDown",
            FaultAction::Drop => "drop",
            FaultAction::SlowTls => "slowTls",
        }
    }
}

fn one() -> f64 {
    1.0
}

/// One fault injection rule (JSON in camelCase; the configuration file also accepts the
/// snake_case names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultRule {
    /// Id (given by dps when empty).
    #[serde(default)]
    pub id: String,
    /// What it does.
    pub action: FaultAction,
    /// Registration ids it matches: a glob (`*` any run, `?` one character), case-insensitive.
    /// All when absent.
    #[serde(
        default,
        alias = "registration_id",
        skip_serializing_if = "Option::is_none"
    )]
    pub registration_id: Option<String>,
    /// Only devices of this enrollment group.
    #[serde(
        default,
        alias = "enrollment_group",
        skip_serializing_if = "Option::is_none"
    )]
    pub enrollment_group: Option<String>,
    /// Only this transport: `https`, `mqtt` or `amqp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Only this attestation: `symmetricKey`, `x509` or `tpm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<String>,
    /// Chance that a matching attempt gets the fault, 0 to 1.
    #[serde(default = "one")]
    pub probability: f64,
    /// At most this many injections, then the rule is spent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The rule ends at this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// throttle: the `retry-after` seconds.
    #[serde(
        default,
        alias = "retry_after",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_after: Option<u32>,
    /// delay: polls answered `assigning` before the result.
    #[serde(
        default,
        alias = "delay_polls",
        skip_serializing_if = "Option::is_none"
    )]
    pub delay_polls: Option<u32>,
    /// delay: milliseconds before the assignment starts; slowTls: milliseconds the TLS
    /// handshake is held.
    #[serde(default, alias = "delay_ms", skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// drop: where the connection is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<FaultStage>,
    /// fail: the six-digit error code.
    #[serde(default, alias = "error_code", skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    /// fail: the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// hubDown: the linked hub that is down (any when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
}

/// Longest delay a rule may ask for (one hour), and most polls.
pub const MAX_DELAY_MS: u64 = 3_600_000;
/// Most polls a delay may hold a registration for.
pub const MAX_DELAY_POLLS: u32 = 1000;
/// Longest TLS handshake hold a slowTls rule may ask for (one minute).
pub const MAX_SLOW_TLS_MS: u64 = 60_000;

impl FaultRule {
    /// Checks the rule; the error says which field is wrong and why. Returns the rule with its
    /// expiry normalized to the stored time format.
    pub fn validated(mut self) -> Result<Self, String> {
        if !(0.0..=1.0).contains(&self.probability) || self.probability.is_nan() {
            return Err(format!(
                "probability must be between 0 and 1, not {}",
                self.probability
            ));
        }
        if self.count == Some(0) {
            return Err("count must be at least 1 (omit it for no limit)".into());
        }
        if let Some(t) = &self.transport {
            if !matches!(t.as_str(), "https" | "mqtt" | "amqp") {
                return Err(format!("transport must be https, mqtt or amqp, not '{t}'"));
            }
        }
        if let Some(a) = &self.attestation {
            if !matches!(a.as_str(), "symmetricKey" | "x509" | "tpm") {
                return Err(format!(
                    "attestation must be symmetricKey, x509 or tpm, not '{a}'"
                ));
            }
        }
        if let Some(g) = &self.registration_id {
            if g.is_empty() || g.len() > 128 {
                return Err("registrationId must be a glob of 1 to 128 characters".into());
            }
        }
        if let Some(e) = &self.expires {
            self.expires = Some(
                crate::clock::normalize_timestamp(e)
                    .ok_or_else(|| format!("expires must be an RFC 3339 time, not '{e}'"))?,
            );
        }
        let only = |field: &str, set: bool, action: &str| -> Result<(), String> {
            if set {
                Err(format!("{field} does not apply to a {action} rule"))
            } else {
                Ok(())
            }
        };
        let a = self.action.as_str();
        match self.action {
            FaultAction::Throttle => {
                let r = self.retry_after.get_or_insert(5);
                if *r == 0 || *r > 3600 {
                    return Err(format!("retryAfter must be 1 to 3600 seconds, not {r}"));
                }
            }
            FaultAction::Delay => {
                let polls = self.delay_polls.unwrap_or(0);
                let ms = self.delay_ms.unwrap_or(0);
                if polls == 0 && ms == 0 {
                    return Err("a delay rule needs delayPolls or delayMs".into());
                }
                if polls > MAX_DELAY_POLLS || ms > MAX_DELAY_MS {
                    return Err(format!(
                        "a delay is at most {MAX_DELAY_POLLS} polls and {MAX_DELAY_MS} ms"
                    ));
                }
            }
            FaultAction::Fail => {
                let code = self
                    .error_code
                    .ok_or("a fail rule needs errorCode (six digits, e.g. 500001)")?;
                if !(400_000..=599_999).contains(&code) {
                    return Err(format!(
                        "errorCode must be six digits from 400000 to 599999, not {code}"
                    ));
                }
                if self.message.as_ref().is_some_and(|m| m.len() > 512) {
                    return Err("message is at most 512 characters".into());
                }
            }
            FaultAction::HubDown => {}
            FaultAction::Drop => {
                let stage = self.stage.ok_or(
                    "a drop rule needs stage: connect, subscribe, register (or publish) or response",
                )?;
                let t = self.transport.as_deref();
                match stage {
                    FaultStage::Connect if t == Some("https") => {
                        return Err("stage connect applies to mqtt and amqp, not https (use register: closed before any response)".into());
                    }
                    FaultStage::Subscribe if t.is_some_and(|t| t != "mqtt") => {
                        return Err("stage subscribe applies to mqtt only".into());
                    }
                    _ => {}
                }
                if matches!(stage, FaultStage::Connect | FaultStage::Subscribe)
                    && (self.enrollment_group.is_some() || self.attestation.is_some())
                {
                    return Err(format!(
                        "at stage {} only registrationId and transport are known: enrollmentGroup and attestation cannot be matched there",
                        stage.as_str()
                    ));
                }
            }
            FaultAction::SlowTls => {
                let ms = self.delay_ms.ok_or("a slowTls rule needs delayMs")?;
                if ms == 0 || ms > MAX_SLOW_TLS_MS {
                    return Err(format!(
                        "delayMs of a slowTls rule must be 1 to {MAX_SLOW_TLS_MS}, not {ms}"
                    ));
                }
                if self.registration_id.is_some()
                    || self.enrollment_group.is_some()
                    || self.attestation.is_some()
                {
                    return Err("a slowTls rule matches on transport only (and its instance, by the TLS server name): registrationId, enrollmentGroup and attestation are unknown during the TLS handshake".into());
                }
            }
        }
        if self.action != FaultAction::Drop {
            only("stage", self.stage.is_some(), a)?;
        }
        if self.action != FaultAction::Throttle {
            only("retryAfter", self.retry_after.is_some(), a)?;
        }
        if self.action != FaultAction::Delay {
            only("delayPolls", self.delay_polls.is_some(), a)?;
            if self.action != FaultAction::SlowTls {
                only("delayMs", self.delay_ms.is_some(), a)?;
            }
        }
        if self.action != FaultAction::Fail {
            only(
                "errorCode/message",
                self.error_code.is_some() || self.message.is_some(),
                a,
            )?;
        }
        if self.action != FaultAction::HubDown {
            only("hub", self.hub.is_some(), a)?;
        }
        Ok(self)
    }

    /// Where the rule is matched.
    pub fn point(&self) -> FaultPoint {
        match (self.action, self.stage) {
            (FaultAction::SlowTls, _) => FaultPoint::TlsHandshake,
            (FaultAction::Drop, Some(FaultStage::Connect)) => FaultPoint::Connect,
            (FaultAction::Drop, Some(FaultStage::Subscribe)) => FaultPoint::Subscribe,
            _ => FaultPoint::Register,
        }
    }

    /// Whether the rule matches an attempt (probability, count and expiry aside).
    pub fn matches(&self, attempt: &FaultAttempt<'_>) -> bool {
        self.point() == attempt.point
            && self
                .registration_id
                .as_deref()
                .is_none_or(|g| glob_match(g, attempt.registration_id))
            && self
                .enrollment_group
                .as_deref()
                .is_none_or(|g| attempt.enrollment_group == Some(g))
            && self
                .transport
                .as_deref()
                .is_none_or(|t| t == attempt.transport)
            && self
                .attestation
                .as_deref()
                .is_none_or(|a| a == attempt.attestation)
    }

    /// Whether the rule has expired at `now` (a stored-format timestamp).
    pub fn expired(&self, now: &str) -> bool {
        self.expires.as_deref().is_some_and(|e| e <= now)
    }
}

/// What a rule is matched against.
#[derive(Debug, Clone, Copy)]
pub struct FaultAttempt<'a> {
    /// Where (only rules of this point match).
    pub point: FaultPoint,
    /// The registration id (empty during the TLS handshake).
    pub registration_id: &'a str,
    /// The enrollment group the device was admitted by, if any.
    pub enrollment_group: Option<&'a str>,
    /// `https`, `mqtt` or `amqp`.
    pub transport: &'a str,
    /// `symmetricKey`, `x509` or `tpm`.
    pub attestation: &'a str,
}

/// `*` matches any run of characters, `?` one; ASCII case-insensitive. Iterative, with one
/// backtracking point: linear in practice, never exponential.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().map(|c| c.to_ascii_lowercase()).collect();
    let t: Vec<char> = text.chars().map(|c| c.to_ascii_lowercase()).collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: serde_json::Value) -> Result<FaultRule, String> {
        serde_json::from_value::<FaultRule>(json)
            .map_err(|e| e.to_string())?
            .validated()
    }

    #[test]
    fn globs() {
        assert!(glob_match("meter-*", "Meter-0001"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*-17*", "dev-17-x"));
        assert!(!glob_match("*-7*", "dev-17-x"));
        assert!(!glob_match("dev-*-x", "dev-17-y"));
        assert!(glob_match("dev", "DEV"));
        assert!(!glob_match("dev", "dev2"));
        // Many stars against a long text stays fast.
        let long = "a".repeat(5000);
        assert!(!glob_match("*a*a*a*a*a*a*b", &long));
    }

    #[test]
    fn validation_names_the_field() {
        assert!(
            rule(serde_json::json!({"action": "throttle"}))
                .unwrap()
                .retry_after
                == Some(5)
        );
        let e = rule(serde_json::json!({"action": "fail"})).unwrap_err();
        assert!(e.contains("errorCode"), "{e}");
        let e = rule(serde_json::json!({"action": "fail", "errorCode": 200001})).unwrap_err();
        assert!(e.contains("400000"), "{e}");
        let e = rule(serde_json::json!({"action": "delay"})).unwrap_err();
        assert!(e.contains("delayPolls"), "{e}");
        let e = rule(serde_json::json!({"action": "throttle", "probability": 2})).unwrap_err();
        assert!(e.contains("probability"), "{e}");
        let e = rule(serde_json::json!({"action": "throttle", "errorCode": 500001})).unwrap_err();
        assert!(e.contains("errorCode"), "{e}");
        let e = rule(serde_json::json!({"action": "hubDown", "transport": "coap"})).unwrap_err();
        assert!(e.contains("transport"), "{e}");
        let e = rule(serde_json::json!({"action": "throttle", "count": 0})).unwrap_err();
        assert!(e.contains("count"), "{e}");
        let e = rule(serde_json::json!({"action": "hubDown", "expires": "soon"})).unwrap_err();
        assert!(e.contains("expires"), "{e}");
        let e = rule(serde_json::json!({"action": "explode"})).unwrap_err();
        assert!(e.contains("unknown variant"), "{e}");
        let r = rule(serde_json::json!({"action": "hubDown", "expires": "2030-01-01T00:00:00Z"}))
            .unwrap();
        assert_eq!(r.expires.as_deref(), Some("2030-01-01T00:00:00.0000000Z"));
        assert!(!r.expired("2029-12-31T23:59:59.0000000Z"));
        assert!(r.expired("2030-01-01T00:00:00.0000000Z"));
        // The configuration's snake_case names.
        let r =
            rule(serde_json::json!({"action": "delay", "delay_polls": 2, "registration_id": "x*"}))
                .unwrap();
        assert_eq!(r.delay_polls, Some(2));
        assert_eq!(r.registration_id.as_deref(), Some("x*"));
    }

    #[test]
    fn matching() {
        let r = rule(serde_json::json!({
            "action": "throttle", "registrationId": "meter-*", "enrollmentGroup": "g1",
            "transport": "mqtt", "attestation": "x509"
        }))
        .unwrap();
        let a = FaultAttempt {
            point: FaultPoint::Register,
            registration_id: "meter-1",
            enrollment_group: Some("g1"),
            transport: "mqtt",
            attestation: "x509",
        };
        assert!(r.matches(&a));
        assert!(!r.matches(&FaultAttempt {
            registration_id: "pump-1",
            ..a
        }));
        assert!(!r.matches(&FaultAttempt {
            enrollment_group: None,
            ..a
        }));
        assert!(!r.matches(&FaultAttempt {
            transport: "https",
            ..a
        }));
        assert!(!r.matches(&FaultAttempt {
            attestation: "symmetricKey",
            ..a
        }));
        let any = rule(serde_json::json!({"action": "hubDown"})).unwrap();
        assert!(any.matches(&FaultAttempt {
            enrollment_group: None,
            ..a
        }));
        assert!(!any.matches(&FaultAttempt {
            point: FaultPoint::Connect,
            ..a
        }));
    }

    #[test]
    fn drop_and_slow_tls_rules() {
        let r = rule(serde_json::json!({"action": "drop", "stage": "publish"})).unwrap();
        assert_eq!(r.stage, Some(FaultStage::Register));
        assert_eq!(r.point(), FaultPoint::Register);
        let r = rule(
            serde_json::json!({"action": "drop", "stage": "subscribe", "registrationId": "s-*"}),
        )
        .unwrap();
        assert_eq!(r.point(), FaultPoint::Subscribe);
        let at = |point, id| FaultAttempt {
            point,
            registration_id: id,
            enrollment_group: None,
            transport: "mqtt",
            attestation: "",
        };
        assert!(r.matches(&at(FaultPoint::Subscribe, "s-1")));
        assert!(!r.matches(&at(FaultPoint::Subscribe, "t-1")));
        assert!(!r.matches(&at(FaultPoint::Register, "s-1")));
        let e = rule(serde_json::json!({"action": "drop"})).unwrap_err();
        assert!(e.contains("stage"), "{e}");
        let e = rule(serde_json::json!({"action": "drop", "stage": "later"})).unwrap_err();
        assert!(e.contains("unknown variant"), "{e}");
        let e =
            rule(serde_json::json!({"action": "drop", "stage": "subscribe", "transport": "amqp"}))
                .unwrap_err();
        assert!(e.contains("mqtt only"), "{e}");
        let e =
            rule(serde_json::json!({"action": "drop", "stage": "connect", "transport": "https"}))
                .unwrap_err();
        assert!(e.contains("not https"), "{e}");
        let e =
            rule(serde_json::json!({"action": "drop", "stage": "connect", "enrollmentGroup": "g"}))
                .unwrap_err();
        assert!(e.contains("enrollmentGroup"), "{e}");
        let e = rule(serde_json::json!({"action": "throttle", "stage": "connect"})).unwrap_err();
        assert!(e.contains("stage"), "{e}");
        let r = rule(serde_json::json!({"action": "slowTls", "delayMs": 500, "transport": "mqtt"}))
            .unwrap();
        assert_eq!(r.point(), FaultPoint::TlsHandshake);
        assert!(r.matches(&at(FaultPoint::TlsHandshake, "")));
        let e = rule(serde_json::json!({"action": "slowTls"})).unwrap_err();
        assert!(e.contains("delayMs"), "{e}");
        let e = rule(serde_json::json!({"action": "slowTls", "delayMs": 60001})).unwrap_err();
        assert!(e.contains("delayMs"), "{e}");
        let e =
            rule(serde_json::json!({"action": "slowTls", "delayMs": 10, "registrationId": "x"}))
                .unwrap_err();
        assert!(e.contains("unknown during the TLS handshake"), "{e}");
        let e = rule(serde_json::json!({"action": "slowTls", "delayMs": 10, "delayPolls": 1}))
            .unwrap_err();
        assert!(e.contains("delayPolls"), "{e}");
        let e = rule(serde_json::json!({"action": "hubDown", "delayMs": 10})).unwrap_err();
        assert!(e.contains("delayMs"), "{e}");
    }
}

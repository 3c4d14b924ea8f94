//! The fault injection rules in force on this node (`docs/testing-with-dps.md`): those of the
//! configuration file, and those added through the admin API (`dps fault add`), which live in
//! this node's memory until removed, spent (`count`), expired or the node restarts.
//!
//! Only instances with `allow_fault_injection = true` in the configuration file accept rules;
//! that switch cannot be set through the API, so no fault reaches an instance by accident.

use dps_core::fault::{FaultAttempt, FaultRule};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

/// Why a rule was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum FaultRuleError {
    /// The instance does not allow fault injection.
    #[error("fault injection is not allowed on instance '{0}': set allow_fault_injection = true for it in the configuration file")]
    NotAllowed(String),
    /// The rule is invalid.
    #[error("invalid fault rule: {0}")]
    Invalid(String),
    /// A rule with that id exists.
    #[error("a fault rule '{0}' exists already on this instance")]
    Exists(String),
}

struct Active {
    /// Instance name, lower-case.
    instance: String,
    rule: FaultRule,
    injected: AtomicU64,
    from_config: bool,
}

/// A rule in force, as listed.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedRule {
    /// The instance.
    pub instance: String,
    /// The rule.
    #[serde(flatten)]
    pub rule: FaultRule,
    /// Injections so far.
    pub injected: u64,
    /// `config` or `api`.
    pub source: &'static str,
}

/// The rules of this node, and the per-operation effects of faults already injected.
#[derive(Default)]
pub struct Faults {
    allowed: RwLock<HashSet<String>>,
    rules: RwLock<Vec<Active>>,
    /// Operation id -> polls still to answer `assigning` (delay rules).
    held_polls: Mutex<HashMap<String, u32>>,
    /// Operation id -> (rule id, hub or any) of an injected hub outage.
    hub_down: Mutex<HashMap<String, (String, Option<String>)>>,
    next_id: AtomicU64,
}

impl Faults {
    /// Sets the instances that allow fault injection and the configuration's rules (rules
    /// added through the API are kept).
    pub fn configure(
        &self,
        allowed: impl IntoIterator<Item = String>,
        config_rules: Vec<(String, FaultRule)>,
    ) -> Result<(), FaultRuleError> {
        let allowed: HashSet<String> = allowed
            .into_iter()
            .map(|i| i.to_ascii_lowercase())
            .collect();
        let mut fresh = Vec::new();
        for (instance, rule) in config_rules {
            let instance = instance.to_ascii_lowercase();
            if !allowed.contains(&instance) {
                return Err(FaultRuleError::NotAllowed(instance));
            }
            let mut rule = rule.validated().map_err(FaultRuleError::Invalid)?;
            if rule.id.is_empty() {
                rule.id = format!("config-{}", fresh.len() + 1);
            }
            fresh.push(Active {
                instance,
                rule,
                injected: AtomicU64::new(0),
                from_config: true,
            });
        }
        *self.allowed.write().expect("faults lock") = allowed;
        let mut rules = self.rules.write().expect("faults lock");
        rules.retain(|r| !r.from_config);
        rules.extend(fresh);
        Ok(())
    }

    /// Whether any rule is in force (the registration path checks nothing else when none is).
    pub fn any(&self) -> bool {
        !self.rules.read().expect("faults lock").is_empty()
    }

    /// Adds a rule through the API; returns it with its id.
    pub fn add(&self, instance: &str, rule: FaultRule) -> Result<FaultRule, FaultRuleError> {
        let instance = instance.to_ascii_lowercase();
        if !self
            .allowed
            .read()
            .expect("faults lock")
            .contains(&instance)
        {
            return Err(FaultRuleError::NotAllowed(instance));
        }
        let mut rule = rule.validated().map_err(FaultRuleError::Invalid)?;
        let mut rules = self.rules.write().expect("faults lock");
        if rule.id.is_empty() {
            rule.id = format!("f{}", self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        } else if rule.id.len() > 64
            || !rule
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(FaultRuleError::Invalid(
                "id must be 1 to 64 letters, digits, '-', '_' or '.'".into(),
            ));
        }
        if rules
            .iter()
            .any(|r| r.instance == instance && r.rule.id == rule.id)
        {
            return Err(FaultRuleError::Exists(rule.id));
        }
        rules.push(Active {
            instance,
            rule: rule.clone(),
            injected: AtomicU64::new(0),
            from_config: false,
        });
        metrics::gauge!("dps_fault_rules").set(rules.len() as f64);
        Ok(rule)
    }

    /// Removes a rule; whether it existed.
    pub fn remove(&self, instance: &str, id: &str) -> bool {
        let instance = instance.to_ascii_lowercase();
        let mut rules = self.rules.write().expect("faults lock");
        let before = rules.len();
        rules.retain(|r| !(r.instance == instance && r.rule.id == id));
        metrics::gauge!("dps_fault_rules").set(rules.len() as f64);
        rules.len() != before
    }

    /// The rules in force (of one instance, or all).
    pub fn list(&self, instance: Option<&str>) -> Vec<ListedRule> {
        self.rules
            .read()
            .expect("faults lock")
            .iter()
            .filter(|r| instance.is_none_or(|i| r.instance.eq_ignore_ascii_case(i)))
            .map(|r| ListedRule {
                instance: r.instance.clone(),
                rule: r.rule.clone(),
                injected: r.injected.load(Ordering::Relaxed),
                source: if r.from_config { "config" } else { "api" },
            })
            .collect()
    }

    /// The first rule that fires for this attempt: it matches, is not spent or expired, and
    /// wins its probability draw (`draw` in [0, 1)). Counts the injection.
    pub fn pick(
        &self,
        instance: &str,
        attempt: &FaultAttempt<'_>,
        now: &str,
        draw: f64,
    ) -> Option<FaultRule> {
        if !self.any() {
            return None;
        }
        let mut spent = false;
        let mut fired = None;
        {
            let rules = self.rules.read().expect("faults lock");
            for r in rules.iter() {
                if !r.instance.eq_ignore_ascii_case(instance) || !r.rule.matches(attempt) {
                    continue;
                }
                if r.rule.expired(now) {
                    spent = true;
                    continue;
                }
                if draw >= r.rule.probability {
                    continue;
                }
                let n = r.injected.fetch_add(1, Ordering::Relaxed);
                if r.rule.count.is_some_and(|c| n >= c) {
                    spent = true;
                    continue;
                }
                if r.rule.count.is_some_and(|c| n + 1 >= c) {
                    spent = true;
                }
                fired = Some(r.rule.clone());
                break;
            }
        }
        if spent {
            // Spent and expired rules go; they are listed until then.
            let mut rules = self.rules.write().expect("faults lock");
            rules.retain(|r| {
                !(r.rule.expired(now)
                    || r.rule
                        .count
                        .is_some_and(|c| r.injected.load(Ordering::Relaxed) >= c))
            });
            metrics::gauge!("dps_fault_rules").set(rules.len() as f64);
        }
        if let Some(f) = &fired {
            metrics::counter!("dps_faults_injected_total", "action" => f.action.as_str())
                .increment(1);
        }
        fired
    }

    /// Holds an operation `assigning` for `polls` polls.
    pub fn hold_polls(&self, operation_id: &str, polls: u32) {
        let mut held = self.held_polls.lock().expect("faults lock");
        if held.len() < 100_000 {
            held.insert(operation_id.to_string(), polls);
        }
    }

    /// Whether this poll of the operation is held (and counts it).
    pub fn poll_held(&self, operation_id: &str) -> bool {
        let mut held = self.held_polls.lock().expect("faults lock");
        match held.get_mut(operation_id) {
            Some(0) | None => {
                held.remove(operation_id);
                false
            }
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    held.remove(operation_id);
                }
                true
            }
        }
    }

    /// Whether this operation's polls are still held.
    pub fn polls_held(&self, operation_id: &str) -> bool {
        self.held_polls
            .lock()
            .expect("faults lock")
            .get(operation_id)
            .is_some_and(|n| *n > 0)
    }

    /// Makes the hub (or any hub) of this operation's assignment unreachable.
    pub fn arm_hub_down(&self, operation_id: &str, rule: &FaultRule) {
        let mut m = self.hub_down.lock().expect("faults lock");
        if m.len() < 100_000 {
            m.insert(
                operation_id.to_string(),
                (rule.id.clone(), rule.hub.clone()),
            );
        }
    }

    /// The rule id of an injected outage of `hub` for this operation, if any (taken once).
    pub fn take_hub_down(&self, operation_id: &str, hub: &str) -> Option<String> {
        let mut m = self.hub_down.lock().expect("faults lock");
        let (rule, which) = m.remove(operation_id)?;
        which
            .is_none_or(|h| h.eq_ignore_ascii_case(hub))
            .then_some(rule)
    }

    /// Whether an instance allows fault injection.
    pub fn allowed(&self, instance: &str) -> bool {
        self.allowed
            .read()
            .expect("faults lock")
            .contains(&instance.to_ascii_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: serde_json::Value) -> FaultRule {
        serde_json::from_value(json).unwrap()
    }
    const NOW: &str = "2026-01-01T00:00:00.0000000Z";
    fn attempt(id: &str) -> FaultAttempt<'_> {
        FaultAttempt {
            point: dps_core::fault::FaultPoint::Register,
            registration_id: id,
            enrollment_group: None,
            transport: "https",
            attestation: "symmetricKey",
        }
    }

    #[test]
    fn only_allowed_instances_take_rules() {
        let f = Faults::default();
        let e = f
            .configure(
                ["lab".to_string()],
                vec![(
                    "prod".into(),
                    rule(serde_json::json!({"action": "throttle"})),
                )],
            )
            .unwrap_err();
        assert!(matches!(e, FaultRuleError::NotAllowed(_)), "{e}");
        f.configure(["Lab".to_string()], vec![]).unwrap();
        assert!(f
            .add("prod", rule(serde_json::json!({"action": "throttle"})))
            .is_err());
        let r = f
            .add("lab", rule(serde_json::json!({"action": "throttle"})))
            .unwrap();
        assert_eq!(r.id, "f1");
        assert!(matches!(
            f.add(
                "lab",
                rule(serde_json::json!({"action": "throttle", "id": "f1"}))
            ),
            Err(FaultRuleError::Exists(_))
        ));
        assert!(f.pick("prod", &attempt("d"), NOW, 0.0).is_none());
        assert!(f.pick("LAB", &attempt("d"), NOW, 0.0).is_some());
        assert!(f.remove("lab", "f1"));
        assert!(f.pick("lab", &attempt("d"), NOW, 0.0).is_none());
    }

    #[test]
    fn count_probability_and_expiry() {
        let f = Faults::default();
        f.configure(["lab".to_string()], vec![]).unwrap();
        f.add(
            "lab",
            rule(serde_json::json!({"action": "throttle", "count": 2, "probability": 0.5})),
        )
        .unwrap();
        assert!(
            f.pick("lab", &attempt("d"), NOW, 0.7).is_none(),
            "lost the draw"
        );
        assert!(f.pick("lab", &attempt("d"), NOW, 0.2).is_some());
        assert!(f.pick("lab", &attempt("d"), NOW, 0.2).is_some());
        assert!(f.pick("lab", &attempt("d"), NOW, 0.2).is_none(), "spent");
        assert!(f.list(None).is_empty(), "spent rules go");
        f.add(
            "lab",
            rule(serde_json::json!({"action": "hubDown", "expires": "2026-01-01T00:00:01Z"})),
        )
        .unwrap();
        assert!(f.pick("lab", &attempt("d"), NOW, 0.0).is_some());
        assert!(f
            .pick("lab", &attempt("d"), "2026-01-01T00:00:01.0000000Z", 0.0)
            .is_none());
        assert!(f.list(None).is_empty(), "expired rules go");
    }

    #[test]
    fn held_polls_and_hub_outages_are_per_operation() {
        let f = Faults::default();
        f.hold_polls("op1", 2);
        assert!(f.polls_held("op1"));
        assert!(f.poll_held("op1"));
        assert!(f.poll_held("op1"));
        assert!(!f.poll_held("op1"));
        assert!(!f.poll_held("op2"));
        let r = rule(serde_json::json!({"action": "hubDown", "hub": "hub-a", "id": "x"}));
        f.arm_hub_down("op1", &r);
        assert_eq!(f.take_hub_down("op1", "hub-b"), None);
        assert_eq!(f.take_hub_down("op1", "hub-a"), None, "taken once");
        f.arm_hub_down("op1", &r);
        assert_eq!(f.take_hub_down("op1", "HUB-A").as_deref(), Some("x"));
    }
}

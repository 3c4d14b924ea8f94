//! Administration: provisioning instances (through [`Instances`]), their linked hubs (with the
//! hubs' health) and access policies, the built-in registry's devices, per-instance stats, the
//! audit log, and the store's readiness.
//!
//! This module owns the defaults of what it creates (ID scopes and access-policy keys from the
//! injected randomness, the owner policy of a new instance), the rule that the admin instance
//! stays, and the audit entries of instance changes. Who may act on which instance is the
//! caller's concern (the admin API authorizes before calling).
//!
//! It must not depend on HTTP or the front ends (see [`crate::usecases`]).

use super::{Caller, Context};
use crate::hubs::registry::StoredHubDevice;
use crate::hubs::HubSet;
use crate::instances::Instances;
use dps_core::instance::{AccessPolicy, Instance, LinkedHub, Right};
use dps_core::random;
use dps_core::redact;
use dps_core::store::{AuditEntry, AuditQuery, Collection, Filter};
use dps_core::{Error, Result};
use std::collections::HashMap;
use std::sync::Arc;

/// What `/readyz` reports of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// The store answers.
    pub store: bool,
    /// Its schema is the one this build expects.
    pub migrations_current: bool,
}

/// Instances, linked hubs, access policies, hub devices, stats, the audit log, readiness.
pub struct Admin {
    cx: Context,
    backend: dps_store::Backend,
    instances: Arc<Instances>,
    hubs: Arc<HubSet>,
    admin_instance: String,
}

fn invalid(what: &str) -> impl Fn(serde_json::Error) -> Error + '_ {
    move |e| Error::invalid(format!("invalid {what}: {e}"))
}

/// Put back the stored secrets a client wrote back as `"<redacted>"` (a GET → modify → PUT
/// round trip), from `old`, the stored object the body replaces.
fn keep_secrets<T: serde::Serialize>(
    v: &mut serde_json::Value,
    old: Option<&T>,
    what: &str,
) -> Result<()> {
    let old = old.map(|o| serde_json::to_value(o).unwrap_or_default());
    redact::restore(v, old.as_ref()).map_err(|e| Error::invalid(format!("invalid {what}: {e}")))
}

/// Credential policies through the admin API: each well formed, names unique, and CA files
/// only as the configuration file set them (a file path from the API would let an instance's
/// administrator sign with any key file the server can read, another instance's included).
fn check_credential_policies(inst: &Instance, existing: Option<&Instance>) -> Result<()> {
    let mut names = std::collections::HashSet::new();
    for p in &inst.credential_policy {
        p.check().map_err(Error::invalid)?;
        if !names.insert(p.name.to_ascii_lowercase()) {
            return Err(Error::invalid(format!(
                "credential_policy '{}': duplicate name",
                p.name
            )));
        }
        if !p.generated_ca() || p.ca_chain_file.is_some() {
            let same = existing
                .and_then(|e| e.credential_policy(&p.name))
                .is_some_and(|old| {
                    old.ca_certificate_file == p.ca_certificate_file
                        && old.ca_key_file == p.ca_key_file
                        && old.ca_chain_file == p.ca_chain_file
                });
            if !same {
                return Err(Error::invalid(format!(
                    "credential_policy '{}': CA files (ca_certificate_file, ca_key_file, \
                     ca_chain_file) are set in the configuration file only; through the API \
                     a policy gets a generated CA",
                    p.name
                )));
            }
        }
    }
    Ok(())
}

impl Admin {
    /// The linked hubs' adapters and state (the broker-auth endpoints read their caches).
    pub fn hubs(&self) -> &HubSet {
        &self.hubs
    }

    /// In `cx`, with the store's backend (for readiness), the instances, the linked hubs (for
    /// their health) and the name of the admin instance.
    pub fn new(
        cx: Context,
        backend: dps_store::Backend,
        instances: Arc<Instances>,
        hubs: Arc<HubSet>,
        admin_instance: String,
    ) -> Self {
        Admin {
            cx,
            backend,
            instances,
            hubs,
            admin_instance,
        }
    }

    /// Is the store ready: reachable, its schema current?
    pub async fn readiness(&self) -> Readiness {
        Readiness {
            store: self.cx.repo.store.ping().await.is_ok(),
            migrations_current: self.backend.migrations_current().await.unwrap_or(false),
        }
    }

    /// The instances `visible` selects, secrets hidden.
    pub fn list_instances(&self, visible: impl Fn(&Instance) -> bool) -> Vec<Instance> {
        self.instances
            .list()
            .iter()
            .filter(|i| visible(i))
            .map(|i| i.redacted())
            .collect()
    }

    async fn save(&self, caller: &Caller, inst: &Instance, action: &str) -> Result<()> {
        let before = self.instances.put(inst).await?;
        self.cx
            .audit
            .record(
                &inst.name,
                &caller.policy,
                action,
                "instance",
                &inst.name,
                before.as_ref().map(Instance::redacted).as_ref(),
                Some(&inst.redacted()),
            )
            .await;
        Ok(())
    }

    /// Create or replace the instance `name` from its JSON; an ID scope is generated and an
    /// owner policy created when none is given (or kept from the instance it replaces). The
    /// instance as written, its access-policy keys included (a new instance's generated owner
    /// keys are shown once this way) and its linked hubs' secrets hidden.
    pub async fn put_instance(
        &self,
        caller: &Caller,
        name: &str,
        mut v: serde_json::Value,
    ) -> Result<Instance> {
        v["name"] = name.into();
        let existing = self.instances.by_name(name);
        keep_secrets(&mut v, existing.as_deref(), "instance")?;
        if v.get("id_scope").is_none() {
            v["id_scope"] = existing
                .as_ref()
                .map(|i| i.id_scope.clone())
                .unwrap_or_else(|| random::id_scope(&*self.cx.random).to_string())
                .into();
        }
        let mut inst: Instance = serde_json::from_value(v).map_err(invalid("instance"))?;
        for hub in &inst.linked_hub {
            self.check_hub(hub)?;
        }
        check_credential_policies(&inst, existing.as_deref())?;
        if inst.access_policy.is_empty() {
            inst.access_policy = existing
                .as_ref()
                .map(|i| i.access_policy.clone())
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| vec![self.owner_policy("provisioningserviceowner")]);
        }
        let action = if existing.is_some() {
            "instance.update"
        } else {
            "instance.create"
        };
        self.save(caller, &inst, action).await?;
        let mut shown = inst;
        shown.linked_hub = shown.linked_hub.iter().map(LinkedHub::redacted).collect();
        Ok(shown)
    }

    /// A linked hub's URLs must follow the outbound policy.
    fn check_hub(&self, hub: &LinkedHub) -> Result<()> {
        self.hubs
            .outbound()
            .policy()
            .check_linked_hub(hub)
            .map_err(Error::invalid)
    }

    fn owner_policy(&self, name: &str) -> AccessPolicy {
        AccessPolicy {
            name: name.to_string(),
            primary_key: random::symmetric_key(&*self.cx.random),
            secondary_key: random::symmetric_key(&*self.cx.random),
            rights: Right::ALL.to_vec(),
        }
    }

    /// Delete an instance with everything it holds (not the admin instance).
    pub async fn delete_instance(&self, caller: &Caller, inst: &Instance) -> Result<()> {
        if inst.name.eq_ignore_ascii_case(&self.admin_instance) {
            return Err(Error::invalid("the admin instance cannot be deleted"));
        }
        let old = self.instances.delete(&inst.name).await?;
        self.cx
            .audit
            .record(
                &old.name,
                &caller.policy,
                "instance.delete",
                "instance",
                &old.name,
                Some(&old.redacted()),
                None::<&()>,
            )
            .await;
        Ok(())
    }

    /// Counts of the instance's enrollments, groups, registrations per status and assigned
    /// devices per linked hub.
    pub async fn stats(&self, inst: &Instance) -> Result<serde_json::Value> {
        let store = &self.cx.repo.store;
        let mut regs = serde_json::Map::new();
        for s in ["assigned", "assigning", "failed", "disabled"] {
            let n = store
                .count(
                    Collection::Registration,
                    &inst.name,
                    &Filter {
                        status: Some(s.into()),
                        ..Default::default()
                    },
                )
                .await?;
            regs.insert(s.into(), n.into());
        }
        let mut hubs = serde_json::Map::new();
        for h in &inst.linked_hub {
            let n = store
                .count(
                    Collection::Registration,
                    &inst.name,
                    &Filter {
                        hub: Some(h.host.to_ascii_lowercase()),
                        status: Some("assigned".into()),
                        ..Default::default()
                    },
                )
                .await?;
            hubs.insert(h.host.clone(), n.into());
        }
        Ok(serde_json::json!({
            "enrollments": store.count(Collection::Enrollment, &inst.name, &Filter::default()).await?,
            "groups": store.count(Collection::Group, &inst.name, &Filter::default()).await?,
            "registrations": regs,
            "devicesPerHub": hubs,
        }))
    }

    /// The instance's linked hubs, secrets hidden, each with its health on this node.
    pub fn linked_hubs(&self, inst: &Instance) -> Vec<serde_json::Value> {
        let health: HashMap<String, crate::hubs::Health> =
            self.hubs.health_snapshot().into_iter().collect();
        inst.linked_hub
            .iter()
            .map(|h| {
                let mut v = serde_json::to_value(h.redacted()).unwrap_or_default();
                let hh = health
                    .get(&h.host.to_ascii_lowercase())
                    .cloned()
                    .unwrap_or_default();
                v["health"] = serde_json::json!({
                    "healthy": !hh.unhealthy(),
                    "consecutive_failures": hh.consecutive_failures,
                    "failures": hh.failures,
                    "successes": hh.successes,
                    "latency_ms": hh.latency_ms,
                    "last_error": hh.last_error.as_deref().map(|e| redact::scrub(e).into_owned()),
                    "credentials_refused": hh.credentials_refused,
                });
                v
            })
            .collect()
    }

    /// Link (or replace) the hub `host` from its JSON; the hub, secrets hidden.
    pub async fn put_linked_hub(
        &self,
        caller: &Caller,
        inst: &Instance,
        host: &str,
        mut v: serde_json::Value,
    ) -> Result<LinkedHub> {
        v["host"] = host.into();
        keep_secrets(&mut v, inst.hub(host), "linked hub")?;
        let hub: LinkedHub = serde_json::from_value(v).map_err(invalid("linked hub"))?;
        self.check_hub(&hub)?;
        let mut new = inst.clone();
        new.linked_hub
            .retain(|h| !h.host.eq_ignore_ascii_case(&hub.host));
        new.linked_hub.push(hub.clone());
        self.save(caller, &new, "linked_hub.put").await?;
        Ok(hub.redacted())
    }

    /// Unlink the hub `host`.
    pub async fn remove_linked_hub(
        &self,
        caller: &Caller,
        inst: &Instance,
        host: &str,
    ) -> Result<()> {
        let mut new = inst.clone();
        new.linked_hub
            .retain(|h| !h.host.eq_ignore_ascii_case(host));
        if new.linked_hub.len() == inst.linked_hub.len() {
            return Err(Error::not_found("linked hub", host));
        }
        self.save(caller, &new, "linked_hub.remove").await
    }

    /// Create or replace the access policy `name` from its JSON; keys absent from it are kept
    /// from the policy it replaces, or generated. The policy, keys included.
    pub async fn put_access_policy(
        &self,
        caller: &Caller,
        inst: &Instance,
        name: &str,
        mut v: serde_json::Value,
    ) -> Result<AccessPolicy> {
        v["name"] = name.into();
        let old = inst.policy(name).cloned();
        keep_secrets(&mut v, old.as_ref(), "access policy")?;
        for (field, old_key) in [
            ("primary_key", old.as_ref().map(|o| o.primary_key.clone())),
            (
                "secondary_key",
                old.as_ref().map(|o| o.secondary_key.clone()),
            ),
        ] {
            if v.get(field).is_none() {
                v[field] = old_key
                    .unwrap_or_else(|| random::symmetric_key(&*self.cx.random))
                    .into();
            }
        }
        let p: AccessPolicy = serde_json::from_value(v).map_err(invalid("access policy"))?;
        let mut new = inst.clone();
        new.access_policy.retain(|x| x.name != p.name);
        new.access_policy.push(p.clone());
        self.save(caller, &new, "access_policy.put").await?;
        Ok(p)
    }

    /// Remove the access policy `name`; a policy with the ServiceConfig right must remain.
    pub async fn remove_access_policy(
        &self,
        caller: &Caller,
        inst: &Instance,
        name: &str,
    ) -> Result<()> {
        let mut new = inst.clone();
        new.access_policy.retain(|x| x.name != name);
        if new.access_policy.len() == inst.access_policy.len() {
            return Err(Error::not_found("access policy", name));
        }
        if !new
            .access_policy
            .iter()
            .any(|p| p.has(Right::ServiceConfig))
        {
            return Err(Error::invalid(
                "an instance must keep at least one policy with the ServiceConfig right",
            ));
        }
        self.save(caller, &new, "access_policy.remove").await
    }

    fn hub<'a>(inst: &'a Instance, host: &str) -> Result<&'a LinkedHub> {
        inst.hub(host)
            .ok_or_else(|| Error::not_found("linked hub", host))
    }

    /// One page of the devices the built-in registry holds for a linked hub (keys removed),
    /// and the continuation of the next page.
    pub async fn hub_devices(
        &self,
        inst: &Instance,
        host: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<serde_json::Value>, Option<String>)> {
        let hub = Self::hub(inst, host)?;
        let page = self
            .cx
            .repo
            .store
            .query(
                Collection::HubDevice,
                &hub.host.to_ascii_lowercase(),
                &Filter::default(),
                after,
                limit,
            )
            .await?;
        let items = page
            .docs
            .iter()
            .filter_map(|d| {
                serde_json::from_str::<StoredHubDevice>(&d.body)
                    .ok()
                    .map(|x| x.public(&d.etag))
            })
            .collect();
        Ok((items, page.next))
    }

    /// One device of the built-in registry for a linked hub (keys removed).
    pub async fn hub_device(
        &self,
        inst: &Instance,
        host: &str,
        id: &str,
    ) -> Result<serde_json::Value> {
        let hub = Self::hub(inst, host)?;
        let d = self
            .cx
            .repo
            .store
            .get(Collection::HubDevice, &hub.host.to_ascii_lowercase(), id)
            .await?
            .ok_or_else(|| Error::not_found("hub device", id))?;
        let dev: StoredHubDevice =
            serde_json::from_str(&d.body).map_err(|e| Error::Internal(e.to_string()))?;
        Ok(dev.public(&d.etag))
    }

    /// Audit entries matching the query.
    pub async fn audit_log(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>> {
        Ok(self.cx.repo.store.list_audit(q).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usecases::testing::{fixture, Fixture};

    fn admin(f: &Fixture) -> Admin {
        Admin::new(
            f.cx.clone(),
            f.backend.clone(),
            f.instances.clone(),
            f.hubs.clone(),
            "default".into(),
        )
    }

    #[tokio::test]
    async fn new_instances_get_seeded_scopes_and_owner_keys() {
        let put = |seed| async move {
            let f = fixture(seed).await;
            admin(&f)
                .put_instance(&f.caller, "second", serde_json::json!({}))
                .await
                .unwrap()
        };
        let (a, b) = (put(3).await, put(3).await);
        assert!(a.id_scope.starts_with("0ne"));
        assert_eq!(a.id_scope, b.id_scope);
        assert_eq!(a.access_policy, b.access_policy);
        assert_eq!(a.access_policy[0].name, "provisioningserviceowner");
    }

    #[tokio::test]
    async fn the_admin_instance_and_its_last_config_policy_stay() {
        let f = fixture(4).await;
        let uc = admin(&f);
        let inst = f.instances.by_name("default").unwrap();
        let r = uc.delete_instance(&f.caller, &inst).await;
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        let r = uc
            .remove_access_policy(&f.caller, &inst, "provisioningserviceowner")
            .await;
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        let r = uc.remove_linked_hub(&f.caller, &inst, "nowhere").await;
        assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
        let ready = uc.readiness().await;
        assert!(ready.store && ready.migrations_current);
    }
}

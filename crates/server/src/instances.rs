//! The provisioning instances, cached in memory and kept in the store.
//!
//! Lookups (by ID scope for the device API, by host name for the service API) hit an immutable
//! snapshot; writes go to the store and then swap the snapshot. Nodes sharing a PostgreSQL store
//! reload the snapshot periodically ([`Instances::reload`]).

use dps_core::instance::Instance;
use dps_core::store::{Collection, DocIndex, Expect, Filter};
use dps_core::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::repo::Repo;

#[derive(Default)]
struct Snapshot {
    list: Vec<Arc<Instance>>,
    by_scope: HashMap<String, Arc<Instance>>,
    by_host: HashMap<String, Arc<Instance>>,
    by_name: HashMap<String, Arc<Instance>>,
}

impl Snapshot {
    fn build(list: Vec<Instance>) -> Self {
        let mut s = Snapshot::default();
        for i in list {
            let i = Arc::new(i);
            s.by_scope
                .insert(i.id_scope.to_ascii_lowercase(), i.clone());
            for h in &i.hostnames {
                s.by_host.insert(h.to_ascii_lowercase(), i.clone());
            }
            s.by_name.insert(i.name.to_ascii_lowercase(), i.clone());
            s.list.push(i);
        }
        s.list.sort_by(|a, b| a.name.cmp(&b.name));
        s
    }
}

/// The instances.
pub struct Instances {
    repo: Repo,
    snap: RwLock<Arc<Snapshot>>,
}

impl Instances {
    /// Load from the store.
    pub async fn load(repo: Repo) -> Result<Self> {
        let me = Instances {
            repo,
            snap: RwLock::new(Arc::new(Snapshot::default())),
        };
        me.reload().await?;
        Ok(me)
    }

    /// Re-read every instance from the store.
    pub async fn reload(&self) -> Result<()> {
        let all = self
            .repo
            .all::<Instance>(Collection::Instance, "", &Filter::default())
            .await?;
        let snap = Snapshot::build(all.into_iter().map(|(i, _)| i).collect());
        *self
            .snap
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(snap);
        Ok(())
    }

    fn snap(&self) -> Arc<Snapshot> {
        self.snap
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// All instances.
    pub fn list(&self) -> Vec<Arc<Instance>> {
        self.snap().list.clone()
    }

    /// By ID scope (case-insensitive).
    pub fn by_scope(&self, scope: &str) -> Option<Arc<Instance>> {
        self.snap()
            .by_scope
            .get(&scope.to_ascii_lowercase())
            .cloned()
    }

    /// By service host name (case-insensitive, port ignored).
    pub fn by_host(&self, host: &str) -> Option<Arc<Instance>> {
        let h = host.to_ascii_lowercase();
        let snap = self.snap();
        if let Some(i) = snap.by_host.get(&h) {
            return Some(i.clone());
        }
        // Strip a port, but not from a bare IPv6 address.
        let no_port = if let Some(rest) = h.strip_prefix('[') {
            rest.split(']').next().map(|s| s.to_string())
        } else if h.matches(':').count() == 1 {
            h.split(':').next().map(|s| s.to_string())
        } else {
            None
        };
        no_port.and_then(|n| snap.by_host.get(&n).cloned())
    }

    /// By name (case-insensitive).
    pub fn by_name(&self, name: &str) -> Option<Arc<Instance>> {
        self.snap().by_name.get(&name.to_ascii_lowercase()).cloned()
    }

    /// Create or replace an instance. Checks that its scope and host names are not used by
    /// another instance.
    pub async fn put(&self, inst: &Instance) -> Result<Option<Instance>> {
        inst.validate().map_err(Error::InvalidArgument)?;
        let snap = self.snap();
        for other in &snap.list {
            if other.name.eq_ignore_ascii_case(&inst.name) {
                continue;
            }
            if other.id_scope.eq_ignore_ascii_case(&inst.id_scope) {
                return Err(Error::invalid(format!(
                    "ID scope '{}' is already used by instance '{}'",
                    inst.id_scope, other.name
                )));
            }
            for h in &inst.hostnames {
                if other.hostnames.iter().any(|o| o.eq_ignore_ascii_case(h)) {
                    return Err(Error::invalid(format!(
                        "host name '{h}' is already used by instance '{}'",
                        other.name
                    )));
                }
            }
        }
        let before = snap
            .by_name
            .get(&inst.name.to_ascii_lowercase())
            .map(|i| (**i).clone());
        self.repo
            .put(
                Collection::Instance,
                "",
                &inst.name,
                &dps_core::store::new_etag(),
                inst,
                DocIndex::default(),
                Expect::Any,
            )
            .await?;
        self.reload().await?;
        Ok(before)
    }

    /// Delete an instance (its enrollments, groups, registrations and certificates too).
    pub async fn delete(&self, name: &str) -> Result<Instance> {
        let inst = self
            .by_name(name)
            .ok_or_else(|| Error::not_found("instance", name))?;
        for c in [
            Collection::Enrollment,
            Collection::Group,
            Collection::Registration,
            Collection::Certificate,
            Collection::DenyList,
            Collection::IssuingCa,
            Collection::IssuedCertificate,
            Collection::TpmActivation,
        ] {
            self.repo.store.delete_scope(c, &inst.name).await?;
        }
        self.repo
            .store
            .delete(Collection::Instance, "", &inst.name, Expect::Any)
            .await?;
        self.reload().await?;
        Ok((*inst).clone())
    }
}

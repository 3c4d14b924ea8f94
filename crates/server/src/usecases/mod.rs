//! The use cases: the only way the service API, the admin API and the CA flow reach the store.
//!
//! Each use-case type holds what it needs (typed store access, the audit log, the caches it
//! invalidates, the clock and the source of randomness, the registration engine where a change
//! must reach it) and owns the rules of its area: validation, timestamps, ETags, generated keys,
//! audit entries and cache invalidation. Handlers parse a request, call one use case and write
//! the answer.
//!
//! Use cases speak the domain: they return [`dps_core::Result`] with domain values. They must
//! not depend on HTTP (`axum`, `hyper`, responses, headers, status codes) nor on the front ends
//! (`crate::http`, `crate::service_api`, `crate::admin_api`, `crate::device_api`); the mapping
//! of their errors to the wire stays in `dps_core::wire`.

pub mod admin;
pub mod certificates;
pub mod enrollments;
pub mod issuance;
pub mod registrations;

use crate::audit::Audit;
use crate::repo::Repo;
use dps_core::clock::{azure_timestamp, Clock};
use dps_core::instance::Instance;
use dps_core::random::{self, Random};
use dps_core::store::{Collection, Doc, Expect, Store, StoreError, Write};
use dps_core::{Error, Result};
use std::sync::Arc;

/// Who is calling: the instance and the access policy name (the audit log's actor).
pub struct Caller {
    /// Instance.
    pub instance: Arc<Instance>,
    /// Policy name.
    pub policy: String,
}

/// A store conflict in the words of the request's precondition.
fn map_store(e: StoreError, kind: &'static str, id: &str, expect: &Expect) -> Error {
    match e {
        StoreError::Conflict { current } => match (expect, current) {
            (Expect::Absent, _) => Error::Conflict {
                kind,
                id: id.to_string(),
            },
            (Expect::Present, None) => Error::not_found(kind, id),
            _ => Error::PreconditionFailed {
                kind,
                id: id.to_string(),
            },
        },
        other => Error::Store(other),
    }
}

/// What every use case holds: typed store access, the audit log, the clock and the source of
/// randomness (timestamps, ETags, generated keys and ids come from these two only).
#[derive(Clone)]
pub struct Context {
    repo: Repo,
    audit: Audit,
    clock: Arc<dyn Clock>,
    random: Arc<dyn Random>,
}

impl Context {
    /// Over a store, with a clock and a source of randomness (the audit log uses the clock).
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, random: Arc<dyn Random>) -> Self {
        Context {
            repo: Repo::new(store.clone()),
            audit: Audit::with_clock(store, clock.clone()),
            clock,
            random,
        }
    }

    /// Now, as Azure writes timestamps.
    fn now(&self) -> String {
        azure_timestamp(self.clock.now())
    }

    /// A fresh ETag.
    fn etag(&self) -> String {
        random::etag(&*self.random)
    }

    /// Delete a document (`Expect::Any`: it must exist) and audit its removal by the caller
    /// as `action`, in one transaction (so the lifecycle event, when sinks are configured,
    /// cannot be lost to a crash between the two). Returns the deleted document.
    async fn remove_audited(
        &self,
        caller: &Caller,
        c: Collection,
        kind: &'static str,
        id: &str,
        expect: Expect,
        action: &str,
    ) -> Result<Doc> {
        let scope = &caller.instance.name;
        for _ in 0..8 {
            let old = self
                .repo
                .store
                .get(c, scope, id)
                .await?
                .ok_or_else(|| Error::not_found(kind, id))?;
            let holds = match &expect {
                Expect::Any | Expect::Present => true,
                Expect::Absent => false,
                Expect::Etag(e) => *e == old.etag,
            };
            if !holds {
                let current = Some(old.etag.clone());
                return Err(map_store(
                    StoreError::Conflict { current },
                    kind,
                    id,
                    &expect,
                ));
            }
            let before: serde_json::Value = serde_json::from_str(&old.body).unwrap_or_default();
            let entry = self.audit.entry(
                scope,
                &caller.policy,
                action,
                kind,
                id,
                Some(&before),
                None::<&()>,
            );
            let writes = vec![
                Write::Delete {
                    c,
                    scope: scope.clone(),
                    id: id.to_string(),
                    expect: Expect::Etag(old.etag.clone()),
                },
                Write::Audit(entry),
            ];
            match self.repo.store.write_all(writes).await {
                Ok(()) => return Ok(old),
                // Changed or deleted meanwhile: look again.
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(Error::Store(e)),
            }
        }
        Err(Error::Store(StoreError::Unavailable(format!(
            "{kind} '{id}' kept changing while it was deleted; try again"
        ))))
    }
}

/// What the use cases' unit tests run on: a real SQLite store in a temporary folder, a fixed
/// clock, a seeded source of randomness and the `default` instance with one linked hub.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Caller, Context};
    use crate::catalog::Catalog;
    use crate::engine::{Engine, EngineSettings};
    use crate::hubs::HubSet;
    use crate::instances::Instances;
    use crate::repo::Repo;
    use dps_core::clock::Clock;
    use dps_core::instance::{AccessPolicy, Instance, LinkedHub};
    use dps_core::random::SeededRandom;
    use std::sync::Arc;
    use time::OffsetDateTime;

    /// When every test's clock stands.
    pub const NOW: OffsetDateTime = time::macros::datetime!(2026-01-02 03:04:05.1234567 UTC);

    /// A clock that does not move.
    pub struct FixedClock(pub OffsetDateTime);

    impl Clock for FixedClock {
        fn now(&self) -> OffsetDateTime {
            self.0
        }
    }

    /// A store, the shared use-case context and what the use cases are built with.
    pub struct Fixture {
        _dir: tempfile::TempDir,
        pub cx: Context,
        pub backend: dps_store::Backend,
        pub catalog: Arc<Catalog>,
        pub engine: Arc<Engine>,
        pub instances: Arc<Instances>,
        pub hubs: Arc<HubSet>,
        /// The owner of `default`.
        pub caller: Caller,
    }

    /// A fresh store holding the `default` instance; randomness seeded with `seed`.
    pub async fn fixture(seed: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let backend = dps_store::open_backend("", dir.path()).await.unwrap();
        let store = backend.store();
        let repo = Repo::new(store.clone());
        let instances = Arc::new(Instances::load(repo.clone()).await.unwrap());
        let inst = Instance {
            name: "default".into(),
            id_scope: "0ne00000001".into(),
            hostnames: vec!["default.localhost".into()],
            access_policy: vec![AccessPolicy::owner("provisioningserviceowner")],
            linked_hub: vec![LinkedHub::registry("hub.localhost")],
            allocation_policy: Default::default(),
            register_response: Default::default(),
            credential_policy: Vec::new(),
        };
        instances.put(&inst).await.unwrap();
        let clock = Arc::new(FixedClock(NOW));
        let catalog = Catalog::new(repo.clone());
        let outbound = crate::outbound::Outbound::permissive();
        let hubs = Arc::new(HubSet::new(store.clone(), outbound.clone()));
        let engine = Engine::new(
            crate::engine::EnginePorts {
                repo,
                instances: instances.clone(),
                hubs: hubs.clone(),
                catalog: catalog.clone(),
                clock: clock.clone(),
                random: Arc::new(SeededRandom::new(seed)),
                custom_allocator: Arc::new(crate::engine::WebhookAllocator::new(
                    outbound,
                    std::time::Duration::from_secs(1),
                )),
            },
            EngineSettings::default(),
        );
        let cx = Context::new(store, clock, Arc::new(SeededRandom::new(seed)));
        let caller = Caller {
            instance: instances.by_name("default").unwrap(),
            policy: "provisioningserviceowner".into(),
        };
        Fixture {
            _dir: dir,
            cx,
            backend,
            catalog,
            engine,
            instances,
            hubs,
            caller,
        }
    }
}

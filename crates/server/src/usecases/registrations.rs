//! Registration records as the service API sees them: read one, delete one (the engine is told,
//! so that the hub identity follows the linked hub's options), query a group's records.
//!
//! It must not depend on HTTP or the front ends (see [`crate::usecases`]).

use super::{Caller, Context};
use crate::engine::Engine;
use dps_core::model::{DeviceRegistrationState, RegistrationRecord};
use dps_core::store::{Collection, Expect, Filter};
use dps_core::{Error, Result};
use std::sync::Arc;

/// Registration records.
pub struct Registrations {
    cx: Context,
    engine: Arc<Engine>,
}

impl Registrations {
    /// In `cx`, with the engine it tells about deletions.
    pub fn new(cx: Context, engine: Arc<Engine>) -> Self {
        Registrations { cx, engine }
    }

    /// A device's registration state.
    pub async fn get(&self, instance: &str, id: &str) -> Result<DeviceRegistrationState> {
        let (r, _) = self
            .cx
            .repo
            .registration(instance, id)
            .await?
            .ok_or_else(|| Error::not_found("registration", id))?;
        Ok(r.state)
    }

    /// Delete a registration record (`Expect::Any`: it must exist); the next registration of
    /// the device is an initial assignment.
    pub async fn delete(&self, caller: &Caller, id: &str, expect: Expect) -> Result<()> {
        let old = self
            .cx
            .remove_audited(
                caller,
                Collection::Registration,
                "registration",
                id,
                expect,
                "registration.delete",
            )
            .await?;
        if let Ok(rec) = serde_json::from_str::<RegistrationRecord>(&old.body) {
            self.engine
                .registration_deleted(&caller.instance.name, &rec)
                .await;
        }
        Ok(())
    }

    /// One page of the registration states of a group's devices (optionally of one status),
    /// and the continuation of the next page.
    pub async fn query_group(
        &self,
        instance: &str,
        group: &str,
        status: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<DeviceRegistrationState>, Option<String>)> {
        let filter = Filter {
            group: Some(group.to_ascii_lowercase()),
            status: status.map(str::to_ascii_lowercase),
            ..Default::default()
        };
        let (items, next) = self
            .cx
            .repo
            .query::<RegistrationRecord>(Collection::Registration, instance, &filter, after, limit)
            .await?;
        Ok((items.into_iter().map(|(r, _)| r.state).collect(), next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usecases::testing::fixture;

    #[tokio::test]
    async fn missing_records_are_not_found() {
        let f = fixture(1).await;
        let uc = Registrations::new(f.cx.clone(), f.engine.clone());
        let r = uc.get("default", "dev-1").await;
        assert!(
            matches!(
                r,
                Err(Error::NotFound {
                    kind: "registration",
                    ..
                })
            ),
            "{r:?}"
        );
        let r = uc.delete(&f.caller, "dev-1", Expect::Any).await;
        assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
        let (items, next) = uc
            .query_group("default", "G1", Some("Assigned"), None, 10)
            .await
            .unwrap();
        assert!(items.is_empty() && next.is_none());
    }
}

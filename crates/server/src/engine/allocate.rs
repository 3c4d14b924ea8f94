//! Allocation: which linked hub a device gets. The enrollment's policy (hashed, static,
//! geoLatency, custom) picks among the eligible hubs (`dps_core::allocation`); beyond Azure,
//! hubs at their `max_devices` are not eligible, unhealthy hubs are skipped while a healthy one
//! is eligible, and hubs whose `max_registrations_per_second` is used up are skipped (the device
//! is told to retry when all are). Custom allocation asks the [`super::CustomAllocator`].

use super::attest::Admitted;
use super::{Engine, Failure};
use dps_core::allocation::{self, AllocationError};
use dps_core::error::{AssignmentFailure, CustomAllocationFailure};
use dps_core::instance::LinkedHub;
use dps_core::model::{AllocationPolicy, EnrollmentSettings, TwinState};

/// The chosen hub, and the custom allocation webhook's initial twin and payload.
pub(super) type Allocation = (LinkedHub, Option<TwinState>, Option<serde_json::Value>);

impl Engine {
    /// Choose the hub (and, for custom allocation, the webhook's twin and payload).
    pub(super) async fn allocate(
        &self,
        adm: &Admitted,
        settings: &EnrollmentSettings,
        current_hub: Option<&str>,
        current_device: Option<&str>,
        payload: Option<serde_json::Value>,
    ) -> Result<Allocation, Failure> {
        let inst = &adm.instance;
        let policy = allocation::effective_policy(settings, inst.allocation_policy);
        let no_hub = |e: AllocationError| Failure {
            failure: AssignmentFailure::NoHub,
            reason: e.to_string(),
        };
        let mut candidates =
            allocation::candidates(settings, policy, &inst.linked_hub).map_err(no_hub)?;
        // Capacity beyond Azure: a hub with max_devices that is full is not eligible.
        let mut full = Vec::new();
        for h in &candidates {
            if let Some(max) = h.max_devices {
                // Assigned devices and intents about to write the hub (their reservations).
                let mut n = 0;
                for status in ["assigned", "assigning"] {
                    let filter = dps_core::store::Filter {
                        hub: Some(h.host.to_ascii_lowercase()),
                        status: Some(status.into()),
                        ..Default::default()
                    };
                    n += self
                        .repo
                        .store
                        .count(
                            dps_core::store::Collection::Registration,
                            &inst.name,
                            &filter,
                        )
                        .await
                        .unwrap_or(0);
                }
                let already_there = current_hub.is_some_and(|c| c.eq_ignore_ascii_case(&h.host));
                if n >= max && !already_there {
                    full.push(h.host.clone());
                }
            }
        }
        candidates.retain(|h| !full.contains(&h.host));
        if candidates.is_empty() {
            return Err(Failure {
                failure: AssignmentFailure::NoHub,
                reason: format!(
                    "every eligible hub is at its max_devices: {}",
                    full.join(", ")
                ),
            });
        }
        // Health: skip unhealthy hubs while a healthy one is eligible.
        if policy != AllocationPolicy::Static {
            let healthy: Vec<&LinkedHub> = candidates
                .iter()
                .copied()
                .filter(|h| !self.hubs.unhealthy(&h.host))
                .collect();
            if !healthy.is_empty() {
                candidates = healthy;
            }
        }
        // Rate limits beyond Azure: hubs whose max_registrations_per_second is used up are
        // skipped while another is eligible; when all are, the device is told to retry.
        if candidates
            .iter()
            .any(|h| h.max_registrations_per_second.is_some())
        {
            let chosen_first = match policy {
                AllocationPolicy::Custom => None,
                _ => allocation::choose(
                    policy,
                    adm.registration_id.as_str(),
                    self.settings.node_location.as_deref(),
                    &candidates,
                )
                .ok(),
            };
            if let Some(first) = chosen_first {
                if !self.hubs.take_rate_token(first) {
                    let others: Vec<&LinkedHub> = candidates
                        .iter()
                        .copied()
                        .filter(|h| h.host != first.host)
                        .collect();
                    let next = allocation::choose(
                        policy,
                        adm.registration_id.as_str(),
                        self.settings.node_location.as_deref(),
                        &others,
                    )
                    .ok()
                    .filter(|h| self.hubs.take_rate_token(h));
                    return match next {
                        Some(h) => Ok((h.clone(), None, None)),
                        None => Err(Failure {
                            failure: AssignmentFailure::HubRateExhausted,
                            reason: format!(
                                "max_registrations_per_second reached on {}",
                                first.host
                            ),
                        }),
                    };
                }
                return Ok((first.clone(), None, None));
            }
        }
        if policy == AllocationPolicy::Custom {
            let Some(def) = settings.custom_allocation_definition.clone() else {
                return Err(Failure {
                    failure: AssignmentFailure::CustomAllocation {
                        failure: CustomAllocationFailure::NoDefinition,
                    },
                    reason: "custom allocation policy without customAllocationDefinition".into(),
                });
            };
            // Boxed: the webhook call's future is large (see `Engine::assign`).
            return Box::pin(self.custom_allocate(
                adm,
                &def,
                &candidates,
                current_hub,
                current_device,
                payload,
            ))
            .await;
        }
        let hub = allocation::choose(
            policy,
            adm.registration_id.as_str(),
            self.settings.node_location.as_deref(),
            &candidates,
        )
        .map_err(no_hub)?;
        Ok((hub.clone(), None, None))
    }
}

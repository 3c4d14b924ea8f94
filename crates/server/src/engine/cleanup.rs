//! The clean-up of old identities: an identity a device left behind on a hub (it moved to
//! another hub, its device id changed, or its registration was deleted) is removed through a
//! durable queue in the store, so that a hub that is down at the time is cleaned up once it is
//! back. For a broker a stale login is a live credential: a task is never dropped while its hub
//! is linked and the device has not come back to it.
//!
//! - The registration commit queues the task in the same transaction as the record that makes
//!   the identity stale (claimed by the engine for its first attempt), and cancels any task for
//!   the identity it writes. The engine then tries the delete at once, as before the queue.
//! - [`Engine::cleanup_pass`] (run by [`crate::hub_cleanup`]) claims due tasks in small batches
//!   and retries with exponential backoff; a hub that fails in a pass gets no more calls in that
//!   pass, and an unhealthy hub gets one trial call per pass.
//! - Before every delete the device's registration is read under its per-device lock: a device
//!   that is assigned (or being assigned) to that hub with that device id again keeps its
//!   identity and the task is dropped (or postponed). Then the record is fenced
//!   ([`RegistrationRecord::removing`], a compare-and-set against the version read) for the time
//!   of the delete: a registration of the device on any node that would write that identity
//!   waits for the fence to go (or expire), and one that wrote its intent first makes the
//!   fence's compare-and-set fail, so the delete is put off. The first attempt right after a
//!   registration's own commit is not fenced (the device has just left that identity).

use super::Engine;
use dps_core::hub::HubAdapter;
use dps_core::instance::Instance;
use dps_core::model::{RegistrationRecord, RegistrationStatus, Removing};
use dps_core::store::{CleanupAction, CleanupKey, CleanupTask, Write};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Settings of the clean-up of old identities (`[hub_cleanup]` in the config).
#[derive(Debug, Clone)]
pub struct CleanupSettings {
    /// Delay before the first retry; doubled after every failure.
    pub initial_backoff: Duration,
    /// Longest delay between two attempts.
    pub max_backoff: Duration,
    /// How long a claim holds: a task whose worker died is taken over after this.
    pub lease: Duration,
    /// Tasks claimed per pass.
    pub batch: usize,
    /// After this many failed attempts every further failure is logged as an error.
    pub warn_after_attempts: u32,
}

impl Default for CleanupSettings {
    fn default() -> Self {
        CleanupSettings {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            lease: Duration::from_secs(120),
            batch: 16,
            warn_after_attempts: 10,
        }
    }
}

impl CleanupSettings {
    /// The delay after `failures` failed attempts (≥ 1): the initial backoff doubled per
    /// further failure, at most the maximum.
    pub fn backoff(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(30);
        self.initial_backoff
            .saturating_mul(1u32 << shift)
            .min(self.max_backoff)
    }
}

/// What one pass of the worker did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanupPass {
    /// Tasks claimed.
    pub claimed: usize,
    /// Identities deleted (task done).
    pub deleted: usize,
    /// Attempts that failed (task rescheduled).
    pub failed: usize,
    /// Tasks dropped without a delete (the device came back, the hub or instance is gone).
    pub cancelled: usize,
    /// Tasks put off without an attempt (their hub failed earlier in the pass, is unhealthy,
    /// or the device is being assigned to it right now).
    pub deferred: usize,
}

/// Is the identity `key` in use again by the registration `rec`: assigned there now (`Some(true)`)
/// or being assigned there (`Some(false)`)?
fn in_use(rec: &RegistrationRecord, key: &CleanupKey) -> Option<bool> {
    let same = |hub: &str, dev: &str| hub.eq_ignore_ascii_case(&key.hub) && dev == key.device_id;
    if rec.state.status == Some(RegistrationStatus::Assigned)
        && rec
            .state
            .assigned_hub
            .as_deref()
            .zip(rec.state.device_id.as_deref())
            .is_some_and(|(h, d)| same(h, d))
    {
        return Some(true);
    }
    if rec.state.status == Some(RegistrationStatus::Assigning)
        && rec
            .pending
            .as_ref()
            .is_some_and(|p| same(&p.hub, &p.device_id))
    {
        return Some(false);
    }
    None
}

/// What [`Engine::fence_removal`] did.
enum Fence {
    /// The record carries the fence.
    Set,
    /// The registration has no record (deleted): nothing to fence.
    NoRecord,
    /// The record changed since it was read, or the identity is in use again: no delete now.
    Lost,
}

fn result_metric(result: &'static str) {
    metrics::counter!("dps_hub_cleanup_attempts_total", "result" => result).increment(1);
}

/// How a hub fared so far in one pass.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HubTurn {
    /// Calls allowed.
    Open,
    /// Unhealthy: this call is its one trial.
    Trial,
    /// Failed (or its trial is used up): no more calls this pass.
    Closed,
}

impl Engine {
    /// Unix milliseconds now, by the engine's clock.
    pub(super) fn now_ms(&self) -> i64 {
        i64::try_from(self.clock.now().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
    }

    fn ms(d: Duration) -> i64 {
        i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
    }

    /// A new task for the identity `device_id` on `hub` left behind by registration `rid`. When
    /// `claim` is true it is claimed by the caller (for its first attempt right away), with
    /// the claim token returned; otherwise it is left for the worker.
    pub(super) fn new_cleanup(
        &self,
        instance: &str,
        hub: &str,
        device_id: &str,
        rid: &str,
        claim: bool,
    ) -> CleanupTask {
        let now = self.now_ms();
        let s = &self.settings.cleanup;
        CleanupTask {
            key: CleanupKey {
                instance: instance.to_string(),
                hub: hub.to_string(),
                device_id: device_id.to_string(),
            },
            registration_id: rid.to_string(),
            action: CleanupAction::Delete,
            attempts: 0,
            next_attempt_ms: if claim {
                now.saturating_add(Self::ms(s.initial_backoff))
            } else {
                now
            },
            last_error: None,
            created_ms: now,
            claim: claim.then(|| dps_core::random::etag(self.random.as_ref())),
            claimed_until_ms: claim.then(|| now.saturating_add(Self::ms(s.lease))),
        }
    }

    /// The write that drops a task for `device_id` on `hub` (the identity is written again).
    pub(super) fn cancel_cleanup(instance: &str, hub: &str, device_id: &str) -> Write {
        Write::CancelCleanup(CleanupKey {
            instance: instance.to_string(),
            hub: hub.to_string(),
            device_id: device_id.to_string(),
        })
    }

    /// The first attempt of a task the caller queued claimed (see [`new_cleanup`](Self::new_cleanup)),
    /// under the device's lock, right after the commit that queued it.
    pub(super) async fn cleanup_first_attempt(
        &self,
        task: CleanupTask,
        adapter: Arc<dyn HubAdapter>,
    ) {
        if task.claim.is_none() {
            return;
        }
        self.attempt(task, adapter).await;
    }

    /// Call the hub for a claimed task and complete or reschedule it. `true` when the identity
    /// is gone.
    async fn attempt(&self, task: CleanupTask, adapter: Arc<dyn HubAdapter>) -> bool {
        let Some(claim) = task.claim.clone() else {
            return false;
        };
        let key = &task.key;
        let t0 = Instant::now();
        let r = match task.action {
            CleanupAction::Delete => adapter.delete_device(&key.device_id).await,
        };
        self.hubs.record(&key.hub, t0, &r);
        match r {
            Ok(()) => {
                result_metric("success");
                if let Err(e) = self.repo.store.complete_cleanup(key, &claim).await {
                    // The identity is gone; the task is retried once its claim expires and
                    // finds nothing to delete.
                    tracing::warn!(instance = %key.instance, hub = %key.hub, device_id = %key.device_id, error = %e, "could not complete a hub clean-up task");
                }
                if task.attempts > 0 {
                    tracing::info!(instance = %key.instance, hub = %key.hub, device_id = %key.device_id, attempts = task.attempts, "old identity removed from the hub after failed attempts");
                    self.audit
                        .record(
                            &key.instance,
                            "system",
                            "hub_identity.cleanup",
                            "registration",
                            &task.registration_id,
                            None::<&()>,
                            Some(&serde_json::json!({
                                "hub": key.hub,
                                "deviceId": key.device_id,
                                "action": task.action.as_str(),
                                "failedAttempts": task.attempts,
                            })),
                        )
                        .await;
                }
                true
            }
            Err(e) => {
                result_metric("failure");
                let attempts = task.attempts.saturating_add(1);
                let s = &self.settings.cleanup;
                let delay = s.backoff(attempts);
                let error = dps_core::redact::scrub(&e.to_string()).into_owned();
                if attempts >= s.warn_after_attempts {
                    tracing::error!(instance = %key.instance, hub = %key.hub, device_id = %key.device_id, registration_id = %task.registration_id, attempts, retry_in_ms = delay.as_millis() as u64, error = %error, "an old identity (a live credential) still cannot be removed from its hub; retrying");
                } else {
                    tracing::warn!(instance = %key.instance, hub = %key.hub, device_id = %key.device_id, registration_id = %task.registration_id, attempts, retry_in_ms = delay.as_millis() as u64, error = %error, "could not remove an old identity from its hub; it stays queued");
                }
                let next = self.now_ms().saturating_add(Self::ms(delay));
                if let Err(e) = self
                    .repo
                    .store
                    .reschedule_cleanup(key, &claim, attempts, next, Some(&error))
                    .await
                {
                    // The task keeps its claim until the lease ends, then is retried.
                    tracing::warn!(instance = %key.instance, hub = %key.hub, device_id = %key.device_id, error = %e, "could not reschedule a hub clean-up task");
                }
                false
            }
        }
    }

    /// Put a claimed task off without an attempt.
    async fn defer(&self, task: &CleanupTask, claim: &str, delay: Duration) {
        let next = self.now_ms().saturating_add(Self::ms(delay));
        if let Err(e) = self
            .repo
            .store
            .reschedule_cleanup(
                &task.key,
                claim,
                task.attempts,
                next,
                task.last_error.as_deref(),
            )
            .await
        {
            tracing::warn!(instance = %task.key.instance, hub = %task.key.hub, error = %e, "could not put a hub clean-up task off");
        }
    }

    /// Drop a claimed task without an attempt.
    async fn drop_task(&self, task: &CleanupTask, claim: &str, why: &str) {
        result_metric("cancelled");
        tracing::info!(instance = %task.key.instance, hub = %task.key.hub, device_id = %task.key.device_id, reason = why, "hub clean-up task dropped");
        if let Err(e) = self.repo.store.complete_cleanup(&task.key, claim).await {
            tracing::warn!(instance = %task.key.instance, hub = %task.key.hub, error = %e, "could not drop a hub clean-up task");
        }
    }

    /// Is the identity in use again: assigned (`Some(true)`) or being assigned (`Some(false)`)
    /// to that hub with that device id by the task's registration, or by the registration
    /// whose id is the device id?
    async fn identity_in_use(&self, task: &CleanupTask) -> dps_core::Result<Option<bool>> {
        let mut ids = vec![task.registration_id.clone()];
        if !task
            .key
            .device_id
            .eq_ignore_ascii_case(&task.registration_id)
        {
            ids.push(task.key.device_id.clone());
        }
        let mut found = None;
        for id in ids {
            if let Some((rec, _)) = self.repo.registration(&task.key.instance, &id).await? {
                match in_use(&rec, &task.key) {
                    Some(true) => return Ok(Some(true)),
                    Some(false) => found = Some(false),
                    None => {}
                }
            }
        }
        Ok(found)
    }

    /// How long a removal fence holds: longer than any hub call, short enough that a worker
    /// that died with its fence set holds a registration up only briefly.
    fn fence_ttl(&self) -> Duration {
        (self.settings.cleanup.lease / 4).max(Duration::from_secs(10))
    }

    /// Set the fence on the record of the task's registration (compare-and-set against the
    /// version just read; an identity in use again is never fenced).
    async fn fence_removal(&self, task: &CleanupTask) -> dps_core::Result<Fence> {
        let key = &task.key;
        let Some((mut rec, etag)) = self
            .repo
            .registration(&key.instance, &task.registration_id)
            .await?
        else {
            return Ok(Fence::NoRecord);
        };
        if in_use(&rec, key).is_some() {
            return Ok(Fence::Lost);
        }
        rec.removing = Some(Removing {
            hub: key.hub.clone(),
            device_id: key.device_id.clone(),
            until_ms: self.now_ms().saturating_add(Self::ms(self.fence_ttl())),
        });
        Ok(if self.put_if_unchanged(&key.instance, rec, etag).await? {
            Fence::Set
        } else {
            Fence::Lost
        })
    }

    /// Write `rec` if its stored version is still `etag`; `false` when it changed meanwhile.
    async fn put_if_unchanged(
        &self,
        instance: &str,
        mut rec: RegistrationRecord,
        etag: String,
    ) -> dps_core::Result<bool> {
        let expect = dps_core::store::Expect::Etag(etag);
        match self
            .repo
            .put_registration(instance, &mut rec, self.new_etag(), expect)
            .await
        {
            Ok(()) => Ok(true),
            Err(dps_core::Error::Store(dps_core::store::StoreError::Conflict { .. })) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Take the fence down (it expires by itself when this fails).
    async fn unfence_removal(&self, task: &CleanupTask) {
        let key = &task.key;
        for _ in 0..4 {
            let read = self
                .repo
                .registration(&key.instance, &task.registration_id)
                .await;
            let Ok(Some((mut rec, etag))) = read else {
                return;
            };
            if !rec.removing.as_ref().is_some_and(|r| {
                r.hub.eq_ignore_ascii_case(&key.hub) && r.device_id == key.device_id
            }) {
                return;
            }
            rec.removing = None;
            match self.put_if_unchanged(&key.instance, rec, etag).await {
                Ok(false) => continue,
                Ok(true) => return,
                Err(e) => {
                    tracing::warn!(instance = %key.instance, error = %e, "could not take down the fence of a hub clean-up; it expires by itself");
                    return;
                }
            }
        }
    }

    /// Queue the removal of the identity of a deleted registration (the linked hub's
    /// `delete_identity_on_deregister`) and try it at once.
    pub(super) async fn cleanup_deregistered(
        &self,
        inst: &Instance,
        rid: &str,
        hub: &str,
        dev: &str,
    ) {
        let Some(h) = inst.hub(hub) else { return };
        let _lock = self
            .lock_for(&inst.name, &rid.to_ascii_lowercase())
            .lock()
            .await;
        let task = self.new_cleanup(&inst.name, &h.host, dev, rid, true);
        // The device may have registered again between the deletion and this lock.
        match self.identity_in_use(&task).await {
            Ok(Some(_)) => return,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(registration_id = %rid, hub, error = %e, "could not read the registration before removing the identity of a deleted registration");
            }
        }
        if let Err(e) = self
            .repo
            .store
            .write_all(vec![Write::EnqueueCleanup(task.clone())])
            .await
        {
            tracing::warn!(registration_id = %rid, hub, error = %e, "could not queue the removal of the identity of a deleted registration; trying once");
        }
        match self.hubs.adapter(h) {
            Ok(a) => self.cleanup_first_attempt(task, a).await,
            Err(e) => {
                tracing::warn!(registration_id = %rid, hub, error = %e, "no adapter for the hub of a deleted registration")
            }
        }
    }

    /// The queued clean-ups, of one instance or all, oldest first, at most `limit`.
    pub async fn cleanup_queue(
        &self,
        instance: Option<&str>,
        limit: usize,
    ) -> dps_core::Result<Vec<CleanupTask>> {
        Ok(self.repo.store.list_cleanup(instance, limit).await?)
    }

    /// One pass of the clean-up worker: claim due tasks (at most the configured batch) and work
    /// them. Tasks of a hub that fails in this pass are put off without a call; an unhealthy hub
    /// gets one trial call per pass.
    pub async fn cleanup_pass(&self) -> dps_core::Result<CleanupPass> {
        let s = self.settings.cleanup.clone();
        let claim = dps_core::random::etag(self.random.as_ref());
        let now = self.now_ms();
        let tasks = self
            .repo
            .store
            .claim_cleanup(
                now,
                &claim,
                now.saturating_add(Self::ms(s.lease)),
                s.batch.max(1),
            )
            .await?;
        let mut pass = CleanupPass {
            claimed: tasks.len(),
            ..Default::default()
        };
        let mut turns: HashMap<String, HubTurn> = HashMap::new();
        let started = Instant::now();
        for task in tasks {
            let key = task.key.clone();
            // Slow hubs must not let the claims run out under this pass: the rest go back.
            if started.elapsed() > s.lease / 2 {
                self.defer(&task, &claim, Duration::ZERO).await;
                pass.deferred += 1;
                continue;
            }
            let Some(inst) = self.instances.by_name(&key.instance) else {
                self.drop_task(&task, &claim, "the instance no longer exists")
                    .await;
                pass.cancelled += 1;
                continue;
            };
            let Some(hub) = inst.hub(&key.hub).cloned() else {
                tracing::warn!(instance = %key.instance, hub = %key.hub, device_id = %key.device_id, "the hub of a queued identity clean-up is no longer linked: the identity is left on it");
                self.audit
                    .record(
                        &key.instance,
                        "system",
                        "hub_identity.cleanup_abandoned",
                        "registration",
                        &task.registration_id,
                        None::<&()>,
                        Some(&serde_json::json!({
                            "hub": key.hub,
                            "deviceId": key.device_id,
                            "reason": "the hub is no longer linked to the instance",
                        })),
                    )
                    .await;
                self.drop_task(&task, &claim, "the hub is no longer linked")
                    .await;
                pass.cancelled += 1;
                continue;
            };
            let hub_key = hub.host.to_ascii_lowercase();
            let turn = *turns.entry(hub_key.clone()).or_insert_with(|| {
                if self.hubs.unhealthy(&hub.host) {
                    HubTurn::Trial
                } else {
                    HubTurn::Open
                }
            });
            if turn == HubTurn::Closed {
                self.defer(&task, &claim, s.backoff(task.attempts.max(1)))
                    .await;
                pass.deferred += 1;
                continue;
            }
            let adapter = match self.hubs.adapter(&hub) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(hub = %hub.host, error = %e, "no adapter for a hub clean-up");
                    self.defer(&task, &claim, s.backoff(task.attempts.max(1)))
                        .await;
                    pass.deferred += 1;
                    continue;
                }
            };
            let _lock = self
                .lock_for(&key.instance, &task.registration_id.to_ascii_lowercase())
                .lock()
                .await;
            match self.identity_in_use(&task).await {
                Ok(Some(true)) => {
                    self.drop_task(&task, &claim, "the device is assigned to that hub again")
                        .await;
                    pass.cancelled += 1;
                    continue;
                }
                Ok(Some(false)) => {
                    self.defer(&task, &claim, s.initial_backoff).await;
                    pass.deferred += 1;
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    // Never delete without knowing that the device has not come back.
                    tracing::warn!(instance = %key.instance, error = %e, "could not read the registration of a hub clean-up task");
                    self.defer(&task, &claim, s.initial_backoff).await;
                    pass.deferred += 1;
                    continue;
                }
            }
            // Fence the device's record for the time of the delete, so that a registration of
            // the device on another node does not write this identity while it is removed.
            let fenced = match self.fence_removal(&task).await {
                Ok(Fence::Set) => true,
                Ok(Fence::NoRecord) => false,
                Ok(Fence::Lost) => {
                    // The record changed since it was read (the device registers right now).
                    self.defer(&task, &claim, s.initial_backoff).await;
                    pass.deferred += 1;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(instance = %key.instance, error = %e, "could not fence the registration of a hub clean-up task");
                    self.defer(&task, &claim, s.initial_backoff).await;
                    pass.deferred += 1;
                    continue;
                }
            };
            let task = CleanupTask {
                claim: Some(claim.clone()),
                ..task
            };
            let done = self.attempt(task.clone(), adapter).await;
            if fenced {
                self.unfence_removal(&task).await;
            }
            if done {
                pass.deleted += 1;
                if turn == HubTurn::Trial {
                    turns.insert(hub_key, HubTurn::Open);
                }
            } else {
                pass.failed += 1;
                turns.insert(hub_key, HubTurn::Closed);
            }
        }
        Ok(pass)
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_initial_delay_up_to_the_maximum() {
        let s = CleanupSettings {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            ..Default::default()
        };
        let got: Vec<_> = [1, 2, 3, 4, 9, 10, 50, u32::MAX]
            .iter()
            .map(|n| s.backoff(*n).as_secs())
            .collect();
        assert_eq!(got, [1, 2, 4, 8, 256, 300, 300, 300]);
        assert_eq!(s.backoff(0), Duration::from_secs(1));
    }
}

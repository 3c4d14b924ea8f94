//! The dispatcher: claims due events from the outbox in batches under a lease, delivers each
//! batch to every sink, removes what was delivered, reschedules failures with exponential
//! backoff, dead-letters events after `max_attempts`, and keeps the outbox within its bounds.

use super::sinks::Sink;
use crate::config::EventsConfig;
use dps_core::store::{OutboxEvent, Store};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How often the outbox bounds are enforced and the depth gauge refreshed.
const PRUNE_EVERY: Duration = Duration::from_secs(5);

/// The dispatcher of one node.
pub struct Dispatcher {
    store: Arc<dyn Store>,
    sinks: Vec<Sink>,
    cfg: EventsConfig,
    wake: Arc<Notify>,
    claim: String,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Events claimed.
    pub claimed: usize,
    /// Removed after every sink took them.
    pub delivered: usize,
    /// Rescheduled after a failure.
    pub retried: usize,
    /// Removed after the last attempt failed.
    pub dead_lettered: usize,
}

impl Dispatcher {
    /// A dispatcher over `store` (the inner store: it writes no events itself).
    pub fn new(
        store: Arc<dyn Store>,
        cfg: &EventsConfig,
        wake: Arc<Notify>,
    ) -> Result<Self, String> {
        let sinks = cfg
            .sink
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Sink::from_config(s)
                    .map_err(|e| format!("events.sink[{i}] ({}): {e}", s.kind.as_str()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Dispatcher {
            store,
            sinks,
            cfg: cfg.clone(),
            wake,
            claim: uuid::Uuid::new_v4().to_string(),
        })
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let base = self.cfg.initial_backoff_ms;
        let ms = base.saturating_mul(1u64 << attempts.saturating_sub(1).min(30));
        Duration::from_millis(ms.min(self.cfg.max_backoff_ms))
    }

    /// Claim one batch and deliver it.
    pub async fn pass(&self) -> Result<Pass, dps_core::store::StoreError> {
        let now = super::now_ms();
        let lease = i64::try_from(self.cfg.lease_ms).unwrap_or(i64::MAX);
        let batch = self
            .store
            .claim_events(now, &self.claim, now.saturating_add(lease), self.cfg.batch)
            .await?;
        let mut pass = Pass {
            claimed: batch.len(),
            ..Pass::default()
        };
        if batch.is_empty() {
            return Ok(pass);
        }
        let refs: Vec<&OutboxEvent> = batch.iter().collect();
        // Every sink gets the whole batch (concurrently); an event is done when every sink
        // took it.
        let results = futures::future::join_all(self.sinks.iter().map(|s| s.deliver(&refs))).await;
        let mut done = Vec::new();
        for (i, e) in batch.iter().enumerate() {
            let mut failed: Vec<(&Sink, &String)> = Vec::new();
            for (s, r) in self.sinks.iter().zip(&results) {
                match r.get(i) {
                    Some(Ok(())) => {
                        metrics::counter!("dps_events_delivered_total", "sink" => s.kind().as_str())
                            .increment(1);
                    }
                    Some(Err(err)) => {
                        metrics::counter!("dps_events_failed_total", "sink" => s.kind().as_str())
                            .increment(1);
                        failed.push((s, err));
                    }
                    None => {}
                }
            }
            if failed.is_empty() {
                done.push(e.seq);
                pass.delivered += 1;
                continue;
            }
            let attempts = e.attempts.saturating_add(1);
            let error = failed
                .iter()
                .map(|(s, err)| format!("{}: {}", s.kind().as_str(), err))
                .collect::<Vec<_>>()
                .join("; ");
            let error = dps_core::redact::scrub(&error).into_owned();
            if attempts >= self.cfg.max_attempts {
                for (s, _) in &failed {
                    metrics::counter!("dps_events_dead_lettered_total", "sink" => s.kind().as_str())
                        .increment(1);
                }
                tracing::error!(event_id = %e.id, event_type = %e.kind, attempts, error = %error, "event dead-lettered: its last delivery attempt failed");
                done.push(e.seq);
                pass.dead_lettered += 1;
            } else {
                let next = super::now_ms().saturating_add(
                    i64::try_from(self.backoff(attempts).as_millis()).unwrap_or(i64::MAX),
                );
                tracing::warn!(event_id = %e.id, event_type = %e.kind, attempts, error = %error, "event delivery failed; retrying");
                self.store
                    .reschedule_event(e.seq, &self.claim, attempts, next, Some(&error))
                    .await?;
                pass.retried += 1;
            }
        }
        self.store.complete_events(&done, &self.claim).await?;
        Ok(pass)
    }

    /// Enforce the outbox bounds (age, then size), counting what was dropped, and refresh the
    /// depth gauge.
    pub async fn prune(&self) {
        let max_age = i64::try_from(self.cfg.max_age_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let cut = super::now_ms().saturating_sub(max_age);
        match self.store.prune_events(Some(cut), None).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(
                    dropped = n,
                    "events older than events.max_age_secs dropped undelivered"
                );
                metrics::counter!("dps_events_dropped_total", "reason" => "age").increment(n);
            }
            Err(e) => tracing::warn!(error = %e, "pruning the events outbox failed"),
        }
        match self
            .store
            .prune_events(None, Some(self.cfg.max_outbox_events))
            .await
        {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(
                    dropped = n,
                    "events beyond events.max_outbox_events dropped undelivered"
                );
                metrics::counter!("dps_events_dropped_total", "reason" => "size").increment(n);
            }
            Err(e) => tracing::warn!(error = %e, "pruning the events outbox failed"),
        }
        match self.store.count_events().await {
            Ok(n) => metrics::gauge!("dps_events_outbox_depth").set(n as f64),
            Err(e) => tracing::debug!(error = %e, "counting the events outbox failed"),
        }
    }

    /// Run forever (spawned at start; aborted with the server): a pass whenever events were
    /// written on this node or `interval_ms` passed, more passes while batches come back full.
    pub async fn run(self) {
        let every = Duration::from_millis(self.cfg.interval_ms);
        let mut last_prune: Option<Instant> = None;
        loop {
            if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
                self.prune().await;
                last_prune = Some(Instant::now());
            }
            for _ in 0..64 {
                match self.pass().await {
                    Ok(p) => {
                        if p.claimed > 0 {
                            tracing::debug!(?p, "events pass");
                        }
                        if p.claimed < self.cfg.batch || p.retried > 0 {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "events pass failed");
                        break;
                    }
                }
            }
            let _ = tokio::time::timeout(every, self.wake.notified()).await;
        }
    }
}

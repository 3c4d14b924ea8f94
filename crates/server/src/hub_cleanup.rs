//! The background worker of the clean-up of old identities (see the engine's `cleanup.rs`):
//! every `[hub_cleanup] interval_ms` it works the due tasks of the durable queue in batches
//! (another batch at once while batches come back full), and keeps the
//! `dps_hub_cleanup_pending` gauge. Every node runs one; claims keep them off each other's
//! tasks.

use crate::engine::Engine;
use dps_core::store::Store;
use std::sync::Arc;
use std::time::Duration;

/// Most passes in a row before the worker waits for its next tick (other work gets a turn).
const MAX_PASSES_PER_TICK: usize = 64;

/// Work the queue until a pass claims less than a full batch, then refresh the pending gauge.
pub async fn tick(engine: &Engine, store: &dyn Store, batch: usize) {
    for _ in 0..MAX_PASSES_PER_TICK {
        match engine.cleanup_pass().await {
            Ok(pass) => {
                if pass.claimed > 0 {
                    tracing::debug!(?pass, "hub clean-up pass");
                }
                if pass.claimed < batch.max(1) {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "hub clean-up pass failed");
                break;
            }
        }
    }
    match store.count_cleanup().await {
        Ok(n) => metrics::gauge!("dps_hub_cleanup_pending").set(n as f64),
        Err(e) => tracing::debug!(error = %e, "counting hub clean-up tasks failed"),
    }
}

/// Run the worker forever (spawned at start; aborted with the server).
pub async fn run(engine: Arc<Engine>, store: Arc<dyn Store>, every: Duration, batch: usize) {
    let mut t = tokio::time::interval(every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        t.tick().await;
        tick(&engine, store.as_ref(), batch).await;
    }
}

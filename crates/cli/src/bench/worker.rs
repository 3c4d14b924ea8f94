//! The workers of `dps bench`: each takes the next device, waits for its start time (`--rate`),
//! registers it (over a fresh connection, a kept-alive one or as a storm device) and records
//! the outcome.

use super::fleet::Fleet;
use super::report::Outcome;
use super::setup::Device;
use super::{keep_alive, storm};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One worker: a task that registers devices one after the other.
pub(super) struct Worker {
    pub(super) fleet: Arc<Fleet>,
    /// The next device to register, shared by all workers.
    pub(super) next: Arc<AtomicUsize>,
    /// Devices assigned and failed so far (for the progress line).
    pub(super) ok: Arc<AtomicUsize>,
    pub(super) fail: Arc<AtomicUsize>,
    pub(super) rate: Option<f64>,
    pub(super) started: Instant,
    pub(super) keep_alive: bool,
    pub(super) storm: bool,
}

impl Worker {
    /// One device's registration: over the worker's kept-alive session, as a storm device
    /// (retrying broken connections), or over a fresh connection. The connection's state
    /// machine is boxed, so that this future stays small: a storm spawns a task per device up
    /// front, and the devices waiting for a socket must not each hold one (1,000,000 of them
    /// held 7.5 GB).
    async fn register_device(
        &self,
        i: usize,
        d: &Device,
        session: &mut Option<dps_device::HttpsSession>,
    ) -> Result<dps_device::RegistrationResult, dps_device::Error> {
        let fleet = &self.fleet;
        if self.keep_alive {
            keep_alive::register(fleet, i, d, session).await
        } else if self.storm {
            storm::register(fleet, i, d).await
        } else {
            match fleet.client(i) {
                Ok(c) => Box::pin(c.register()).await,
                Err(e) => Err(e),
            }
        }
    }

    /// Register devices until none is left; their outcomes.
    pub(super) async fn run(self) -> Vec<Outcome> {
        let fleet = self.fleet.clone();
        let mut out = Vec::new();
        let mut session: Option<dps_device::HttpsSession> = None;
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(d) = fleet.devices.get(i) else {
                break;
            };
            if let Some(rate) = self.rate {
                let at = self.started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
            }
            let res = self.register_device(i, d, &mut session).await;
            let o = match res {
                Ok(r) => {
                    self.ok.fetch_add(1, Ordering::Relaxed);
                    Outcome {
                        ok: true,
                        reason: None,
                        latency: r.timing.elapsed,
                        attempts: r.timing.attempts,
                        polls: r.timing.polls,
                        hub: r.state.assigned_hub.clone(),
                    }
                }
                Err(e) => {
                    self.fail.fetch_add(1, Ordering::Relaxed);
                    Outcome {
                        ok: false,
                        reason: Some(e.reason()),
                        latency: Duration::ZERO,
                        attempts: 0,
                        polls: 0,
                        hub: None,
                    }
                }
            };
            out.push(o);
        }
        out
    }
}

//! The handshake baseline of `dps bench`: bare TCP + TLS handshakes against the device endpoint
//! with the devices' TLS settings, the ceiling a fresh-connection registration cannot beat.

use super::fleet::Fleet;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The bare TLS handshake baseline.
#[derive(Debug, Clone)]
pub(super) struct Baseline {
    /// Handshakes attempted.
    pub(super) attempted: usize,
    /// Handshakes in flight at once.
    pub(super) concurrency: usize,
    /// Handshake times (TCP connect to handshake complete) of the successful ones, sorted.
    pub(super) latencies: Vec<Duration>,
    /// Failed handshakes by reason.
    pub(super) by_reason: BTreeMap<String, usize>,
    pub(super) wall: Duration,
}

impl Baseline {
    pub(super) fn successes(&self) -> usize {
        self.latencies.len()
    }
    pub(super) fn failures(&self) -> usize {
        self.attempted - self.successes()
    }
    /// Successful handshakes per second.
    pub(super) fn rate(&self) -> f64 {
        if self.wall.as_secs_f64() > 0.0 {
            self.successes() as f64 / self.wall.as_secs_f64()
        } else {
            0.0
        }
    }
}

/// Open `n` fresh TCP + TLS connections to the device endpoint, `concurrency` at a time, with the
/// devices' TLS settings (the device's certificate for X.509; the MQTT port and settings for
/// MQTT), complete each handshake and close the connection without sending anything.
pub(super) async fn handshake_baseline(
    fleet: Arc<Fleet>,
    n: usize,
    concurrency: usize,
) -> Baseline {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let concurrency = concurrency.min(n).max(1);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let fleet = fleet.clone();
        let next = next.clone();
        set.spawn(async move {
            let mut lat = Vec::new();
            let mut failed: Vec<String> = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let r = match fleet.client(i) {
                    Ok(c) => c.tls_handshake().await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(t) => lat.push(t),
                    Err(e) => failed.push(e.reason()),
                }
            }
            (lat, failed)
        });
    }
    let mut latencies = Vec::with_capacity(n);
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok((lat, failed)) => {
                latencies.extend(lat);
                for f in failed {
                    *by_reason.entry(f).or_default() += 1;
                }
            }
            Err(e) => *by_reason.entry(format!("panic: {e}")).or_default() += 1,
        }
    }
    let wall = started.elapsed();
    latencies.sort();
    Baseline {
        attempted: n,
        concurrency,
        latencies,
        by_reason,
        wall,
    }
}

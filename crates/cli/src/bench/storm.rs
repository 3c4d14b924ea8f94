//! Reboot-storm mode of `dps bench` (`--storm`): every device starts at once, holds a socket
//! only within the process's budget, and retries a broken connection as a real device would.

use super::fleet::Fleet;
use super::setup::Device;
use std::time::{Duration, Instant};

/// How many connections a storm may hold at once: this process's open-file limit (soft; the
/// `dps` binary raised it to the hard one at start) less 256 for everything else. Without it,
/// the devices beyond the limit fail to open a socket (EMFILE), back off and retry, and a
/// 1,000,000-device storm spends the generator's CPU on that churn instead of on the devices
/// that are connected.
pub(super) fn socket_budget() -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let limit = soft.map_or(1 << 20, |n| usize::try_from(n).unwrap_or(1 << 20));
    limit.saturating_sub(256).max(64)
}

/// Register device `i` as a storm device.
pub(super) async fn register(
    fleet: &Fleet,
    i: usize,
    d: &Device,
) -> Result<dps_device::RegistrationResult, dps_device::Error> {
    // Reboot storm: like a real device, retry a connection that timed out or broke
    // (with a jittered backoff) until the per-device deadline, instead of giving up.
    let deadline = Instant::now() + fleet.timeout;
    let mut backoff = Duration::from_millis(500);
    loop {
        let socket = match &fleet.sockets {
            Some(s) => s.acquire().await.ok(),
            None => None,
        };
        // Boxed only now: the devices waiting for a socket hold no connection state.
        let r = match fleet.client(i) {
            Ok(c) => Box::pin(c.register()).await,
            Err(e) => Err(e),
        };
        drop(socket);
        match r {
            Err(e)
                if matches!(
                    e,
                    dps_device::Error::Timeout
                        | dps_device::Error::Transport(_)
                        | dps_device::Error::Tls(_)
                ) && Instant::now() + backoff < deadline =>
            {
                let jitter = Duration::from_millis(u64::from(rand_jitter(&d.id)) % 1000);
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            other => break other,
        }
    }
}

/// A cheap per-device jitter (no RNG dependency): a hash of the registration id and the clock.
fn rand_jitter(id: &str) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    Instant::now().hash(&mut h);
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_budget_leaves_room_below_the_open_file_limit() {
        assert!(socket_budget() >= 64);
    }
}

//! Which refused device attempts reach the audit log: a token bucket per source (the peer's
//! address; IPv6 by its /64, which one host usually holds whole) in a bounded table, and a
//! node-wide bucket behind it. A flood of refusals is still logged and counted in
//! `AttestationAttempts{result="failure"}`; only its audit rows are sampled, so that an
//! unauthenticated client cannot fill the store.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a refusal was not audited (the `limit` label of `dps_audit_refusals_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Its source is over `audit.refused_per_source_per_second`.
    Source,
    /// The node is over `limits.refused_audit_per_second`, or the source table is full.
    Node,
}

impl Dropped {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::Source => "source",
            Dropped::Node => "node",
        }
    }
}

/// Limits of [`RefusalSampler`]; a rate of 0 disables that limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalLimits {
    /// Audited refusals per second per source (burst: ten seconds' worth).
    pub per_source_per_second: u32,
    /// Sources tracked at once.
    pub max_sources: usize,
    /// Audited refusals per second on the node (burst: ten seconds' worth).
    pub node_per_second: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    at: Instant,
    tokens: f64,
}

impl Bucket {
    fn full(at: Instant, burst: f64) -> Self {
        Bucket { at, tokens: burst }
    }
    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        self.tokens =
            (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate).min(burst);
        self.at = now;
    }
    fn take(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct State {
    sources: HashMap<Option<IpAddr>, Bucket>,
    node: Bucket,
    last_sweep: Instant,
}

/// Decides, per refused attempt, whether it is written to the audit log.
pub struct RefusalSampler {
    limits: RefusalLimits,
    state: Mutex<State>,
}

/// The key a source is limited by: IPv4 addresses whole, IPv6 addresses by their /64.
fn source_key(peer: Option<IpAddr>) -> Option<IpAddr> {
    peer.map(|ip| match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    })
}

impl RefusalSampler {
    /// A sampler with these limits, buckets full at `now`.
    pub fn new(limits: RefusalLimits, now: Instant) -> Self {
        RefusalSampler {
            limits,
            state: Mutex::new(State {
                sources: HashMap::new(),
                node: Bucket::full(now, Self::node_burst(&limits)),
                last_sweep: now,
            }),
        }
    }

    fn node_burst(l: &RefusalLimits) -> f64 {
        f64::from(l.node_per_second) * 10.0
    }

    fn source_burst(l: &RefusalLimits) -> f64 {
        f64::from(l.per_source_per_second) * 10.0
    }

    /// May a refusal from `peer` at `now` be audited? `Err` names the limit that dropped it.
    pub fn admit(&self, peer: Option<IpAddr>, now: Instant) -> Result<(), Dropped> {
        let l = self.limits;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if l.per_source_per_second > 0 {
            let (rate, burst) = (f64::from(l.per_source_per_second), Self::source_burst(&l));
            let key = source_key(peer);
            if !st.sources.contains_key(&key) && st.sources.len() >= l.max_sources.max(1) {
                // Forget the sources whose bucket has refilled (they start full again anyway),
                // at most ten times a second so that a spray of new sources stays cheap.
                if now.saturating_duration_since(st.last_sweep) >= Duration::from_millis(100) {
                    st.last_sweep = now;
                    let refill = Duration::from_secs_f64(burst / rate);
                    st.sources
                        .retain(|_, b| now.saturating_duration_since(b.at) < refill);
                }
                if st.sources.len() >= l.max_sources.max(1) {
                    return Err(Dropped::Node);
                }
            }
            let b = st
                .sources
                .entry(key)
                .or_insert_with(|| Bucket::full(now, burst));
            b.refill(now, rate, burst);
            if !b.take() {
                return Err(Dropped::Source);
            }
        }
        if l.node_per_second > 0 {
            let (rate, burst) = (f64::from(l.node_per_second), Self::node_burst(&l));
            st.node.refill(now, rate, burst);
            if !st.node.take() {
                return Err(Dropped::Node);
            }
        }
        Ok(())
    }

    /// Sources tracked now.
    pub fn sources(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sources
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn one_source_gets_its_rate_and_others_are_not_starved() {
        let t0 = Instant::now();
        let s = RefusalSampler::new(
            RefusalLimits {
                per_source_per_second: 2,
                max_sources: 100,
                node_per_second: 0,
            },
            t0,
        );
        let admitted = (0..50)
            .filter(|_| s.admit(ip("192.0.2.1"), t0).is_ok())
            .count();
        assert_eq!(admitted, 20, "ten seconds' worth of burst");
        assert_eq!(s.admit(ip("192.0.2.1"), t0), Err(Dropped::Source));
        // Another source has its own bucket.
        assert!(s.admit(ip("192.0.2.2"), t0).is_ok());
        // One second later the first source has two more.
        let t1 = t0 + Duration::from_secs(1);
        assert!(s.admit(ip("192.0.2.1"), t1).is_ok());
        assert!(s.admit(ip("192.0.2.1"), t1).is_ok());
        assert_eq!(s.admit(ip("192.0.2.1"), t1), Err(Dropped::Source));
    }

    #[test]
    fn ipv6_sources_are_grouped_by_their_64() {
        let t0 = Instant::now();
        let s = RefusalSampler::new(
            RefusalLimits {
                per_source_per_second: 1,
                max_sources: 100,
                node_per_second: 0,
            },
            t0,
        );
        for _ in 0..10 {
            assert!(s.admit(ip("2001:db8:1:2::1"), t0).is_ok());
        }
        assert_eq!(
            s.admit(ip("2001:db8:1:2:ffff::9"), t0),
            Err(Dropped::Source)
        );
        assert!(s.admit(ip("2001:db8:1:3::1"), t0).is_ok());
        for _ in 0..10 {
            assert!(s.admit(ip("::ffff:192.0.2.7"), t0).is_ok());
        }
        assert_eq!(s.admit(ip("192.0.2.7"), t0), Err(Dropped::Source));
    }

    #[test]
    fn the_source_table_is_bounded_and_the_node_cap_holds() {
        let t0 = Instant::now();
        let s = RefusalSampler::new(
            RefusalLimits {
                per_source_per_second: 1,
                max_sources: 3,
                node_per_second: 0,
            },
            t0,
        );
        for i in 1..=3 {
            assert!(s.admit(ip(&format!("192.0.2.{i}")), t0).is_ok());
        }
        assert_eq!(s.admit(ip("192.0.2.4"), t0), Err(Dropped::Node));
        assert_eq!(s.sources(), 3);
        // Once the known sources have refilled, they are forgotten to make room.
        let later = t0 + Duration::from_secs(11);
        assert!(s.admit(ip("192.0.2.4"), later).is_ok());
        assert_eq!(s.sources(), 1);

        let node = RefusalSampler::new(
            RefusalLimits {
                per_source_per_second: 0,
                max_sources: 3,
                node_per_second: 1,
            },
            t0,
        );
        let admitted = (0..100)
            .filter(|i| node.admit(ip(&format!("198.51.100.{i}")), t0).is_ok())
            .count();
        assert_eq!(admitted, 10, "ten seconds' worth of burst");
        assert_eq!(node.sources(), 0, "no per-source limit: no table");
    }
}

//! The report of `dps bench`: counts, failures by reason, devices by hub, throughput, latency
//! percentiles and the ratio to the handshake baseline, as a table or JSON.

use super::baseline::Baseline;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// One device's outcome.
#[derive(Debug, Clone)]
pub(super) struct Outcome {
    pub(super) ok: bool,
    pub(super) reason: Option<String>,
    pub(super) latency: Duration,
    pub(super) attempts: u32,
    pub(super) polls: u32,
    pub(super) hub: Option<String>,
}

/// The figures of a run.
pub(super) struct Report {
    pub(super) total: usize,
    pub(super) successes: usize,
    pub(super) failures: usize,
    pub(super) by_reason: Vec<(String, usize)>,
    pub(super) by_hub: Vec<(String, usize)>,
    pub(super) wall: Duration,
    pub(super) throughput: f64,
    pub(super) p50: Duration,
    pub(super) p90: Duration,
    pub(super) p99: Duration,
    pub(super) max: Duration,
    pub(super) mean: Duration,
    pub(super) retries: u64,
    pub(super) polls: u64,
    /// The bare TLS handshake baseline (fresh-connection runs).
    pub(super) baseline: Option<Baseline>,
}

/// The q-quantile (0..=1) of sorted values (nearest rank).
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Report {
    pub(super) fn build(outcomes: &[Outcome], wall: Duration) -> Report {
        let mut lat: Vec<Duration> = outcomes
            .iter()
            .filter(|o| o.ok)
            .map(|o| o.latency)
            .collect();
        lat.sort();
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        let mut hubs: BTreeMap<String, usize> = BTreeMap::new();
        for o in outcomes {
            if let Some(r) = &o.reason {
                *reasons.entry(r.clone()).or_default() += 1;
            }
            if let Some(h) = &o.hub {
                *hubs.entry(h.clone()).or_default() += 1;
            }
        }
        let sort = |m: BTreeMap<String, usize>| {
            let mut v: Vec<(String, usize)> = m.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            v
        };
        let successes = lat.len();
        let mean = if lat.is_empty() {
            Duration::ZERO
        } else {
            lat.iter().sum::<Duration>() / lat.len() as u32
        };
        Report {
            total: outcomes.len(),
            successes,
            failures: outcomes.len() - successes,
            by_reason: sort(reasons),
            by_hub: sort(hubs),
            wall,
            throughput: if wall.as_secs_f64() > 0.0 {
                successes as f64 / wall.as_secs_f64()
            } else {
                0.0
            },
            p50: percentile(&lat, 0.50),
            p90: percentile(&lat, 0.90),
            p99: percentile(&lat, 0.99),
            max: lat.last().copied().unwrap_or_default(),
            mean,
            retries: outcomes
                .iter()
                .filter(|o| o.ok)
                .map(|o| u64::from(o.attempts.saturating_sub(1)))
                .sum(),
            polls: outcomes.iter().map(|o| u64::from(o.polls)).sum(),
            baseline: None,
        }
    }

    /// Baseline handshakes per second (`None` without a baseline or when none succeeded).
    fn handshakes_per_second(&self) -> Option<f64> {
        self.baseline
            .as_ref()
            .map(Baseline::rate)
            .filter(|r| *r > 0.0)
    }

    /// Registrations per second ÷ baseline handshakes per second.
    fn ratio_to_handshakes(&self) -> Option<f64> {
        self.handshakes_per_second().map(|h| self.throughput / h)
    }

    pub(super) fn to_json(&self) -> Value {
        let ms = |d: Duration| (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
        json!({
            "total": self.total,
            "successes": self.successes,
            "failures": self.failures,
            "failuresByReason": self.by_reason.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "assignedByHub": self.by_hub.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "wallSeconds": self.wall.as_secs_f64(),
            "throughputPerSecond": self.throughput,
            "latencyMs": {"p50": ms(self.p50), "p90": ms(self.p90), "p99": ms(self.p99), "max": ms(self.max), "mean": ms(self.mean)},
            "throttleRetries": self.retries,
            "polls": self.polls,
            "handshakesPerSecond": self.handshakes_per_second(),
            "ratioToHandshakes": self.ratio_to_handshakes(),
            "handshakeBaseline": self.baseline.as_ref().map(|b| json!({
                "handshakes": b.attempted,
                "concurrency": b.concurrency,
                "successes": b.successes(),
                "failures": b.failures(),
                "failuresByReason": b.by_reason.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "wallSeconds": b.wall.as_secs_f64(),
                "latencyMs": {"p50": ms(percentile(&b.latencies, 0.50)), "p90": ms(percentile(&b.latencies, 0.90)), "p99": ms(percentile(&b.latencies, 0.99))},
            })),
        })
    }

    pub(super) fn to_text(&self) -> String {
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
        let mut rows = vec![
            vec!["devices".to_string(), self.total.to_string()],
            vec!["assigned".into(), self.successes.to_string()],
            vec!["failed".into(), self.failures.to_string()],
            vec![
                "wall time".into(),
                format!("{:.2} s", self.wall.as_secs_f64()),
            ],
            vec![
                "throughput".into(),
                format!("{:.1} registrations/s", self.throughput),
            ],
            vec!["latency p50".into(), ms(self.p50)],
            vec!["latency p90".into(), ms(self.p90)],
            vec!["latency p99".into(), ms(self.p99)],
            vec!["latency max".into(), ms(self.max)],
            vec!["latency mean".into(), ms(self.mean)],
            vec!["polls".into(), self.polls.to_string()],
            vec!["retries (429/5xx)".into(), self.retries.to_string()],
        ];
        if let Some(b) = &self.baseline {
            rows.push(vec![
                "TLS handshakes (baseline)".into(),
                format!(
                    "{:.1} handshakes/s ({} of {} ok, p50 {})",
                    b.rate(),
                    b.successes(),
                    b.attempted,
                    ms(percentile(&b.latencies, 0.50))
                ),
            ]);
            for (r, n) in &b.by_reason {
                rows.push(vec![format!("handshake failed: {r}"), n.to_string()]);
            }
            rows.push(vec![
                "registrations/handshakes".into(),
                match self.ratio_to_handshakes() {
                    Some(q) => format!("{:.1} %", q * 100.0),
                    None => "-".into(),
                },
            ]);
        }
        for (r, n) in &self.by_reason {
            rows.push(vec![format!("failed: {r}"), n.to_string()]);
        }
        for (h, n) in &self.by_hub {
            rows.push(vec![format!("hub: {h}"), n.to_string()]);
        }
        crate::table::render(&["RESULT", "VALUE"], &rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
        assert_eq!(percentile(&v[..1], 0.9), Duration::from_millis(1));
    }

    #[test]
    fn report_counts() {
        let ok = |ms, hub: &str| Outcome {
            ok: true,
            reason: None,
            latency: Duration::from_millis(ms),
            attempts: 2,
            polls: 1,
            hub: Some(hub.into()),
        };
        let bad = |r: &str| Outcome {
            ok: false,
            reason: Some(r.into()),
            latency: Duration::ZERO,
            attempts: 0,
            polls: 0,
            hub: None,
        };
        let r = Report::build(
            &[
                ok(10, "h1"),
                ok(30, "h2"),
                ok(20, "h1"),
                bad("throttled"),
                bad("throttled"),
                bad("tls"),
            ],
            Duration::from_secs(1),
        );
        assert_eq!((r.total, r.successes, r.failures), (6, 3, 3));
        assert_eq!(r.by_reason[0], ("throttled".to_string(), 2));
        assert_eq!(r.by_hub[0], ("h1".to_string(), 2));
        assert_eq!(r.max, Duration::from_millis(30));
        assert_eq!(r.retries, 3);
        assert!((r.throughput - 3.0).abs() < 1e-9);
        let j = r.to_json();
        assert_eq!(j["failuresByReason"]["tls"], 1);
        assert!(j["handshakesPerSecond"].is_null());
        assert!(j["ratioToHandshakes"].is_null());
        assert!(j["handshakeBaseline"].is_null());
        assert!(r.to_text().contains("failed: throttled"));
        assert!(!r.to_text().contains("handshakes"));
    }

    #[test]
    fn report_ratio_to_handshakes() {
        let ok = Outcome {
            ok: true,
            reason: None,
            latency: Duration::from_millis(5),
            attempts: 1,
            polls: 0,
            hub: Some("h".into()),
        };
        let mut r = Report::build(&vec![ok; 300], Duration::from_secs(1));
        let mut by_reason = BTreeMap::new();
        by_reason.insert("tls".to_string(), 1);
        r.baseline = Some(Baseline {
            attempted: 1001,
            concurrency: 8,
            latencies: vec![Duration::from_millis(2); 1000],
            by_reason,
            wall: Duration::from_secs(2),
        });
        let j = r.to_json();
        assert!((j["handshakesPerSecond"].as_f64().unwrap() - 500.0).abs() < 1e-9);
        assert!((j["ratioToHandshakes"].as_f64().unwrap() - 0.6).abs() < 1e-9);
        assert_eq!(j["handshakeBaseline"]["failures"], 1);
        assert_eq!(j["handshakeBaseline"]["failuresByReason"]["tls"], 1);
        assert_eq!(j["handshakeBaseline"]["latencyMs"]["p50"], 2.0);
        let t = r.to_text();
        assert!(t.contains("500.0 handshakes/s"), "{t}");
        assert!(t.contains("60.0 %"), "{t}");
        // No successful handshake: no rate, no ratio.
        r.baseline = Some(Baseline {
            attempted: 3,
            concurrency: 1,
            latencies: vec![],
            by_reason: BTreeMap::new(),
            wall: Duration::from_secs(1),
        });
        assert!(r.to_json()["ratioToHandshakes"].is_null());
    }
}

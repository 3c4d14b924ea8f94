//! The server's counters for `dps bench --admin-url`: Prometheus text scraped before and after
//! the run, and what changed.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::time::Duration;

/// GET the admin listener's `/metrics`.
pub(super) async fn scrape(admin_url: &str) -> Result<BTreeMap<String, f64>> {
    let base = admin_url.trim_end_matches('/');
    let base = if base.contains("://") {
        base.to_string()
    } else {
        format!("http://{base}")
    };
    let url = if base.ends_with("/metrics") {
        base.to_string()
    } else {
        format!("{base}/metrics")
    };
    let text = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .error_for_status()?
        .text()
        .await?;
    Ok(parse_metrics(&text))
}

/// Parse Prometheus text: `name{labels} value` → value (comments and histogram buckets skipped).
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if name.contains("_bucket") {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            m.insert(name.trim().to_string(), v);
        }
    }
    m
}

/// Metrics whose value changed during the run (after − before), dps_* first.
pub(super) fn metric_deltas(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            let name = k.split('{').next().unwrap_or(k);
            (d != 0.0 && !name.ends_with("_sum")).then(|| (k.clone(), d))
        })
        .collect()
}

/// A metric value: whole numbers without decimals.
pub(super) fn format_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_and_delta() {
        let before =
            parse_metrics("# HELP x\ndps_registrations_total{status=\"assigned\"} 5\nup 1\n");
        let after = parse_metrics(
            "dps_registrations_total{status=\"assigned\"} 25\nup 1\nh_bucket{le=\"1\"} 3\nlat_sum 2.5\n",
        );
        let d = metric_deltas(&before, &after);
        assert_eq!(
            d.get("dps_registrations_total{status=\"assigned\"}"),
            Some(&20.0)
        );
        assert!(!d.contains_key("up"));
        assert!(d
            .keys()
            .all(|k| !k.contains("bucket") && !k.ends_with("_sum")));
    }
}

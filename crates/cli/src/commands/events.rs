//! `dps events …`: lifecycle events (admin API `GET /admin/events`).

use crate::service::{enc, Service};
use crate::Globals;
use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::Value;

/// `dps events …`
#[derive(Subcommand, Debug)]
pub enum EventsCommand {
    /// Follow lifecycle events live (CloudEvents JSON, one per line), from now or `--since`.
    Tail {
        /// Start at this time (RFC 3339) instead of now.
        #[arg(long)]
        since: Option<String>,
        /// Only this instance (the admin instance sees all by default).
        #[arg(long)]
        instance: Option<String>,
        /// Only event types starting with this (e.g. `io.dps.registration.`).
        #[arg(long = "type")]
        type_prefix: Option<String>,
        /// Stop after this many events (default: follow until interrupted).
        #[arg(long)]
        count: Option<usize>,
        /// Stop when no event arrived for this many seconds (default: never).
        #[arg(long)]
        idle_exit_secs: Option<u64>,
    },
}

/// Run `dps events …`.
pub(crate) async fn run(_g: &Globals, svc: &Service, c: EventsCommand) -> Result<()> {
    let EventsCommand::Tail {
        since,
        instance,
        type_prefix,
        count,
        idle_exit_secs,
    } = c;
    let since = match since {
        Some(s) => {
            time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                .with_context(|| format!("--since '{s}' is not an RFC 3339 time"))?;
            s
        }
        None => time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .context("formatting now")?,
    };
    let mut fixed = Vec::new();
    if let Some(i) = &instance {
        fixed.push(format!("instance={}", enc(i)));
    }
    if let Some(t) = &type_prefix {
        fixed.push(format!("type={}", enc(t)));
    }
    let mut cursor: Option<i64> = None;
    let mut printed = 0usize;
    let mut idle_since = std::time::Instant::now();
    loop {
        let wait = idle_exit_secs.map_or(25, |s| s.clamp(1, 25));
        let mut q = fixed.clone();
        q.push(format!("wait={wait}"));
        match cursor {
            Some(c) => q.push(format!("after={c}")),
            None => q.push(format!("since={}", enc(&since))),
        }
        let v = svc.get(&format!("/admin/events?{}", q.join("&"))).await?;
        if let Some(n) = v.get("next").and_then(Value::as_i64) {
            cursor = Some(n);
        }
        let events = v
            .get("events")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if !events.is_empty() {
            idle_since = std::time::Instant::now();
        }
        for e in events {
            println!("{e}");
            printed += 1;
            if count.is_some_and(|c| printed >= c) {
                return Ok(());
            }
        }
        if idle_exit_secs.is_some_and(|s| idle_since.elapsed().as_secs() >= s) {
            return Ok(());
        }
    }
}

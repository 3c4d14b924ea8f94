//! `dps bench`: a fleet load generator built on `dps-device`.
//!
//! N simulated devices register over HTTPS or MQTT, with symmetric keys (individual enrollments
//! created for them, or a group with derived keys) or X.509 certificates issued on the fly by a
//! CA that an enrollment group trusts. By default every device opens its own TLS connection;
//! `--keep-alive` reuses one connection per worker. `--storm` starts every device at once (a
//! reboot storm) and lets the client honour `retry-after`. The report gives successes, failures
//! by reason, throughput, latency percentiles (first byte sent to assigned) and, with
//! `--admin-url`, the server's counters.
//!
//! Runs with fresh TLS connections first measure a baseline: bare TCP + TLS handshakes against
//! the same endpoint with the same concurrency and TLS settings, and nothing else. The report
//! then gives registrations/s as a fraction of handshakes/s, the ceiling a fresh-connection
//! registration cannot beat on the same machine.
//!
//! The generator runs on a multi-threaded runtime (one worker per CPU, `--threads`), shares one
//! TLS configuration (root store, verifier, provider) across all simulated devices, and resolves
//! the HTTPS endpoint once, so that it costs as little as possible next to a server on the same
//! machine.
//!
//! The module is split by concept: `setup` (credentials, created enrollments, cleanup),
//! `x509` (the CA and device certificates), `fleet` (the client settings the simulated
//! devices share), `addresses` (their source addresses), `worker` (one worker's loop and a
//! fresh-connection registration), `keep_alive` and `storm` (the other two ways to register),
//! `baseline` (the bare TLS handshake baseline), `progress`, `report` (statistics) and
//! `metrics` (the server's counters).

mod addresses;
mod baseline;
pub mod broker_auth;
mod fleet;
mod keep_alive;
mod metrics;
mod progress;
mod report;
mod setup;
mod storm;
mod worker;
mod x509;

use crate::commands::device::{default_endpoint, device_trust, TransportArg};
use crate::commands::enrollment_common::AttestationArg;
use crate::commands::instance::resolve_instance;
use crate::service::enc;
use crate::{Globals, OutputFormat};
use anyhow::{anyhow, bail, Result};
use baseline::handshake_baseline;
use clap::Args;
use dps_device::{ClientTls, PollPolicy};
use fleet::Fleet;
use metrics::{format_num, metric_deltas, scrape};
use progress::spawn_progress;
use report::Report;
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storm::socket_budget;
use worker::Worker;

/// `dps bench` arguments.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Number of simulated devices.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Target start rate, devices per second (default: as fast as the concurrency allows).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Transport.
    #[arg(long, value_enum, default_value_t = TransportArg::Https)]
    pub transport: TransportArg,
    /// Attestation: symmetricKey or x509.
    #[arg(long, value_enum, default_value = "symmetricKey")]
    pub attestation: AttestationArg,
    /// Key of an existing symmetric-key enrollment group (device keys are derived from it).
    #[arg(long, conflicts_with_all = ["create_group", "create_enrollments"])]
    pub group_key: Option<String>,
    /// Create an enrollment group `bench-<timestamp>` (needs the connection string).
    #[arg(long, conflicts_with = "create_enrollments")]
    pub create_group: bool,
    /// Create one individual enrollment per device (symmetric keys; bulk API).
    #[arg(long)]
    pub create_enrollments: bool,
    /// The ID scope (default: read from the instance with the connection string).
    #[arg(long)]
    pub id_scope: Option<String>,
    /// Device endpoint host:port (default: the --url / connection string host).
    #[arg(long)]
    pub global_endpoint: Option<String>,
    /// Reuse one HTTPS connection per worker instead of a fresh TLS connection per device.
    #[arg(long)]
    pub keep_alive: bool,
    /// Reboot storm: every device registers at once and honours Retry-After.
    #[arg(long)]
    pub storm: bool,
    /// AMQP: await every frame of the connection setup and goodbye (`fe2o3-amqp`'s client,
    /// about ten round trips) instead of the one-flight setup (two round trips).
    #[arg(long)]
    pub await_each_frame: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Registration id prefix (default `bench-<timestamp>-`).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Admin listener URL (e.g. http://127.0.0.1:9090) to scrape /metrics before and after.
    #[arg(long)]
    pub admin_url: Option<String>,
    /// Poll every this many ms, whatever retry-after says (throttling is still honoured).
    #[arg(long)]
    pub poll_interval_ms: Option<u64>,
    /// X.509: the CA certificate (PEM) of an existing group, to issue device certificates.
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// X.509: that CA's private key (PEM).
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Per-device timeout in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Delete the group or enrollments the bench created when done.
    #[arg(long)]
    pub cleanup: bool,
    /// Runtime worker threads of the load generator (default: the number of CPUs).
    #[arg(long, value_parser = parse_threads)]
    pub threads: Option<usize>,
    /// Skip the TLS handshake baseline that fresh-connection runs measure first.
    #[arg(long)]
    pub no_handshake_baseline: bool,
    /// Handshakes in the baseline, --concurrency at a time (default: the number of devices, at
    /// most 20000; a longer baseline is a steadier one).
    #[arg(long, conflicts_with = "no_handshake_baseline")]
    pub baseline_handshakes: Option<usize>,
}

/// The default number of runtime worker threads: the available parallelism.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

fn parse_threads(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("must be a whole number of at least 1".into()),
    }
}

/// Baseline handshakes when `--baseline-handshakes` is not given.
const DEFAULT_BASELINE_MAX: usize = 20_000;

fn now_stamp() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

pub(crate) async fn run(g: &Globals, a: BenchArgs) -> Result<ExitCode> {
    if a.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if let Some(r) = a.rate {
        if r <= 0.0 || !r.is_finite() {
            bail!("--rate must be a positive number");
        }
    }
    if a.attestation == AttestationArg::Tpm {
        bail!("the bench supports symmetricKey and x509 attestation");
    }
    if a.keep_alive && a.transport != TransportArg::Https {
        bail!("--keep-alive applies to HTTPS only (an MQTT or AMQP connection carries one device)");
    }
    if a.await_each_frame && a.transport != TransportArg::Amqp {
        bail!("--await-each-frame applies to AMQP only");
    }
    if a.keep_alive && a.attestation == AttestationArg::X509 {
        bail!("--keep-alive cannot be used with x509 (the TLS connection is the device identity)");
    }
    let json_out = a.json || g.output == OutputFormat::Json;
    let stamp = now_stamp();
    let prefix = a
        .prefix
        .clone()
        .unwrap_or_else(|| format!("bench-{stamp}-"));
    let ids: Vec<String> = (0..a.devices).map(|i| format!("{prefix}{i:06}")).collect();

    let svc = if a.create_group
        || a.create_enrollments
        || a.id_scope.is_none()
        || g.connection_string.is_some()
    {
        Some(g.service()?)
    } else {
        None
    };
    let id_scope = match &a.id_scope {
        Some(s) => s.clone(),
        None => {
            let svc = svc
                .as_ref()
                .ok_or_else(|| anyhow!("give --id-scope or a connection string"))?;
            let name = resolve_instance(svc, None).await?;
            let inst = svc.get(&format!("/admin/instances/{}", enc(&name))).await?;
            inst.get("id_scope")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| anyhow!("instance '{name}' has no id_scope; pass --id-scope"))?
        }
    };
    let endpoint = a
        .global_endpoint
        .clone()
        .unwrap_or_else(|| default_endpoint(g, a.transport));

    // ---- setup: credentials ----
    let setup_started = Instant::now();
    let (devices, created) = setup::devices(&a, svc.as_ref(), &ids, &stamp, json_out).await?;
    let setup_time = setup_started.elapsed();
    if !json_out {
        eprintln!(
            "bench: {} devices, {} over {}, {}{}, scope {id_scope}, endpoint {endpoint}{}, {} threads (setup {:.1}s)",
            a.devices,
            a.attestation.as_str(),
            match a.transport {
                TransportArg::Https => "https",
                TransportArg::Mqtt => "mqtt",
                TransportArg::Amqp => "amqp",
            },
            if a.storm {
                "reboot storm".to_string()
            } else {
                format!("concurrency {}", a.concurrency)
            },
            a.rate.map(|r| format!(", rate {r}/s")).unwrap_or_default(),
            if a.keep_alive { ", kept-alive connections" } else { ", fresh TLS per device" },
            tokio::runtime::Handle::current().metrics().num_workers(),
            setup_time.as_secs_f64()
        );
    }

    // ---- shared client settings ----
    // One TLS configuration (roots, verifier, provider) for every simulated device, and the
    // endpoint resolved once.
    let tls = ClientTls::new(&device_trust(g)?)?;
    let policy = PollPolicy {
        override_interval: a.poll_interval_ms.map(Duration::from_millis),
        max_retries: if a.storm { 50 } else { 5 },
        ..Default::default()
    };
    let mut fleet = Fleet {
        devices,
        endpoint: endpoint.clone(),
        id_scope: id_scope.clone(),
        transport: a.transport,
        tls,
        connect_addrs: None,
        policy,
        timeout: Duration::from_secs(a.timeout),
        sockets: a
            .storm
            .then(|| Arc::new(tokio::sync::Semaphore::new(socket_budget()))),
        await_each_frame: a.await_each_frame,
    };
    fleet.pin_addresses().await;
    let fleet = Arc::new(fleet);
    let threads = tokio::runtime::Handle::current().metrics().num_workers();

    // ---- baseline: bare TLS handshakes ----
    let baseline_n = if a.keep_alive || a.no_handshake_baseline {
        0
    } else {
        a.baseline_handshakes
            .unwrap_or_else(|| a.devices.min(DEFAULT_BASELINE_MAX))
    };
    let baseline = if baseline_n > 0 {
        if !json_out {
            eprintln!(
                "bench: handshake baseline: {baseline_n} TCP + TLS handshakes, concurrency {}",
                a.concurrency.min(baseline_n)
            );
        }
        let b = handshake_baseline(fleet.clone(), baseline_n, a.concurrency).await;
        if !json_out {
            eprintln!(
                "bench: {:.1} handshakes/s ({} failed) in {:.2}s",
                b.rate(),
                b.failures(),
                b.wall.as_secs_f64()
            );
        }
        Some(b)
    } else {
        None
    };

    // ---- run ----
    let metrics_before = match &a.admin_url {
        Some(u) => scrape(u).await.ok(),
        None => None,
    };
    let next = Arc::new(AtomicUsize::new(0));
    let done_ok = Arc::new(AtomicUsize::new(0));
    let done_fail = Arc::new(AtomicUsize::new(0));
    let workers = if a.storm {
        a.devices
    } else {
        a.concurrency.min(a.devices)
    };
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let ctx = Worker {
            fleet: fleet.clone(),
            next: next.clone(),
            ok: done_ok.clone(),
            fail: done_fail.clone(),
            rate: if a.storm { None } else { a.rate },
            started,
            keep_alive: a.keep_alive,
            storm: a.storm,
        };
        set.spawn(ctx.run());
    }
    let progress = spawn_progress(
        a.devices,
        done_ok.clone(),
        done_fail.clone(),
        started,
        !json_out && std::io::stderr().is_terminal(),
    );
    let mut outcomes = Vec::with_capacity(a.devices);
    while let Some(r) = set.join_next().await {
        outcomes.extend(r.map_err(|e| anyhow!("a bench worker failed: {e}"))?);
    }
    let wall = started.elapsed();
    progress.abort();
    if !json_out && std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }

    let metrics_after = match &a.admin_url {
        Some(u) => Some(scrape(u).await),
        None => None,
    };

    // ---- report ----
    let mut report = Report::build(&outcomes, wall);
    report.baseline = baseline;
    let metrics = match (metrics_before, metrics_after) {
        (before, Some(Ok(after))) => Some(metric_deltas(&before.unwrap_or_default(), &after)),
        (_, Some(Err(e))) => {
            eprintln!("bench: could not scrape metrics: {e:#}");
            None
        }
        _ => None,
    };
    if json_out {
        let mut v = report.to_json();
        v["devices"] = json!(a.devices);
        v["transport"] = json!(match a.transport {
            TransportArg::Https => "https",
            TransportArg::Mqtt => "mqtt",
            TransportArg::Amqp => "amqp",
        });
        v["attestation"] = json!(a.attestation.as_str());
        v["keepAlive"] = json!(a.keep_alive);
        v["storm"] = json!(a.storm);
        v["awaitEachFrame"] = json!(a.await_each_frame);
        v["concurrency"] = json!(workers);
        v["threads"] = json!(threads);
        v["setupSeconds"] = json!(setup_time.as_secs_f64());
        if let Some(g) = &created.group {
            v["group"] = json!(g);
        }
        if let Some(m) = &metrics {
            v["serverMetrics"] = json!(m);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", report.to_text());
        if let Some(m) = &metrics {
            println!("server counters (change during the run):");
            let rows: Vec<Vec<String>> = m
                .iter()
                .map(|(k, v)| vec![k.clone(), format_num(*v)])
                .collect();
            print!(
                "{}",
                crate::table::render(&["  METRIC", "DELTA"], &indent(rows))
            );
        }
    }

    if a.cleanup {
        if let Some(svc) = &svc {
            setup::cleanup(svc, &created).await;
        }
    }
    Ok(if report.failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn indent(rows: Vec<Vec<String>>) -> Vec<Vec<String>> {
    rows.into_iter()
        .map(|mut r| {
            r[0] = format!("  {}", r[0]);
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_must_be_positive() {
        assert_eq!(parse_threads("3"), Ok(3));
        assert!(parse_threads("0").is_err());
        assert!(parse_threads("x").is_err());
        assert!(default_threads() >= 1);
    }
}

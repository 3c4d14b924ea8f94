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

use crate::commands::device::{default_endpoint, device_trust, TransportArg};
use crate::commands::enrollment_common::AttestationArg;
use crate::commands::instance::resolve_instance;
use crate::service::{enc, svc_path, Service};
use crate::{Globals, OutputFormat};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use dps_device::{Auth, ClientTls, PollPolicy, ProvisioningClient};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// One device's credential.
enum Cred {
    Key(String),
    Cert { chain: Vec<u8>, key: Vec<u8> },
}

struct Device {
    id: String,
    cred: Cred,
}

/// One device's outcome.
#[derive(Debug, Clone)]
struct Outcome {
    ok: bool,
    reason: Option<String>,
    latency: Duration,
    attempts: u32,
    polls: u32,
    hub: Option<String>,
}

/// What was created during setup (for cleanup).
#[derive(Default)]
struct Created {
    group: Option<String>,
    enrollments: Vec<String>,
}

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
    if a.keep_alive && a.transport == TransportArg::Mqtt {
        bail!("--keep-alive applies to HTTPS only (an MQTT connection carries one device)");
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
    let mut created = Created::default();
    let setup_started = Instant::now();
    let devices: Vec<Device> = match a.attestation {
        AttestationArg::X509 => {
            let (issuer, ca_pem) = load_or_make_ca(&a)?;
            if a.create_group {
                let svc = svc.as_ref().expect("service");
                let gid = format!("bench-{stamp}");
                put_group(
                    svc,
                    &gid,
                    json!({"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": ca_pem}}}}),
                )
                .await?;
                created.group = Some(gid);
            } else if a.ca_cert.is_none() {
                bail!("x509 needs --create-group, or --ca-cert/--ca-key of a CA an enrollment group trusts");
            }
            let mut v = Vec::with_capacity(ids.len());
            for id in &ids {
                let (chain, key) = issue_leaf(&issuer, id)?;
                v.push(Device {
                    id: id.clone(),
                    cred: Cred::Cert { chain, key },
                });
            }
            v
        }
        _ => {
            if let Some(gk) = &a.group_key {
                derive_all(&ids, gk)?
            } else if a.create_group {
                let svc = svc.as_ref().expect("service");
                let gid = format!("bench-{stamp}");
                let gk = dps_core::sas::generate_key();
                put_group(
                    svc,
                    &gid,
                    json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": gk, "secondaryKey": dps_core::sas::generate_key()}}),
                )
                .await?;
                created.group = Some(gid);
                derive_all(&ids, &gk)?
            } else if a.create_enrollments {
                let svc = svc.as_ref().expect("service");
                let devs: Vec<Device> = ids
                    .iter()
                    .map(|id| Device {
                        id: id.clone(),
                        cred: Cred::Key(dps_core::sas::generate_key()),
                    })
                    .collect();
                bulk_create(svc, &devs, json_out).await?;
                created.enrollments = ids.clone();
                devs
            } else {
                bail!("give --group-key, --create-group or --create-enrollments");
            }
        }
    };
    let setup_time = setup_started.elapsed();
    if !json_out {
        eprintln!(
            "bench: {} devices, {} over {}, {}{}, scope {id_scope}, endpoint {endpoint}{}, {} threads (setup {:.1}s)",
            a.devices,
            a.attestation.as_str(),
            match a.transport {
                TransportArg::Https => "https",
                TransportArg::Mqtt => "mqtt",
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
        });
        v["attestation"] = json!(a.attestation.as_str());
        v["keepAlive"] = json!(a.keep_alive);
        v["storm"] = json!(a.storm);
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
            cleanup(svc, &created).await;
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

fn derive_all(ids: &[String], group_key: &str) -> Result<Vec<Device>> {
    ids.iter()
        .map(|id| {
            let k = dps_core::sas::derive_device_key(group_key, id)
                .ok_or_else(|| anyhow!("--group-key is not valid base64"))?;
            Ok(Device {
                id: id.clone(),
                cred: Cred::Key(k),
            })
        })
        .collect()
}

async fn put_group(svc: &Service, gid: &str, attestation: Value) -> Result<()> {
    let body = json!({
        "enrollmentGroupId": gid,
        "attestation": attestation,
        "provisioningStatus": "enabled",
    });
    svc.call(
        Method::PUT,
        &svc_path(&format!("/enrollmentGroups/{}", enc(gid)), &[]),
        Some(&body),
        &[],
    )
    .await
    .with_context(|| format!("creating enrollment group '{gid}'"))?;
    Ok(())
}

async fn bulk_create(svc: &Service, devs: &[Device], quiet: bool) -> Result<()> {
    let path = svc_path("/enrollments", &[]);
    for (n, chunk) in devs.chunks(10).enumerate() {
        let items: Vec<Value> = chunk
            .iter()
            .map(|d| {
                let Cred::Key(k) = &d.cred else {
                    unreachable!("symmetric keys only")
                };
                json!({
                    "registrationId": d.id,
                    "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": dps_core::sas::generate_key()}},
                    "provisioningStatus": "enabled",
                })
            })
            .collect();
        let r = svc
            .call(
                Method::POST,
                &path,
                Some(&json!({"mode": "create", "enrollments": items})),
                &[],
            )
            .await
            .context("creating enrollments (bulk)")?;
        if r.body.get("isSuccessful").and_then(Value::as_bool) == Some(false) {
            bail!("creating enrollments failed: {}", r.body["errors"]);
        }
        if !quiet && std::io::stderr().is_terminal() {
            eprint!(
                "\rcreating enrollments: {}/{}",
                (n * 10 + chunk.len()),
                devs.len()
            );
        }
    }
    if !quiet && std::io::stderr().is_terminal() {
        eprintln!();
    }
    Ok(())
}

async fn cleanup(svc: &Service, c: &Created) {
    if let Some(gid) = &c.group {
        if let Err(e) = svc
            .call(
                Method::DELETE,
                &svc_path(&format!("/enrollmentGroups/{}", enc(gid)), &[]),
                None,
                &[],
            )
            .await
        {
            eprintln!("bench: could not delete group '{gid}': {e:#}");
        }
    }
    let path = svc_path("/enrollments", &[]);
    for chunk in c.enrollments.chunks(10) {
        let items: Vec<Value> = chunk
            .iter()
            .map(|id| json!({"registrationId": id, "attestation": {"type": "symmetricKey"}}))
            .collect();
        if let Err(e) = svc
            .call(
                Method::POST,
                &path,
                Some(&json!({"mode": "delete", "enrollments": items})),
                &[],
            )
            .await
        {
            eprintln!("bench: could not delete enrollments: {e:#}");
            break;
        }
    }
}

// ---- X.509 ----

fn load_or_make_ca(a: &BenchArgs) -> Result<(rcgen::Issuer<'static, rcgen::KeyPair>, String)> {
    if let (Some(c), Some(k)) = (&a.ca_cert, &a.ca_key) {
        let cert_pem =
            std::fs::read_to_string(c).with_context(|| format!("cannot read {}", c.display()))?;
        let key_pem =
            std::fs::read_to_string(k).with_context(|| format!("cannot read {}", k.display()))?;
        let key = rcgen::KeyPair::from_pem(&key_pem).context("--ca-key is not a usable key")?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&cert_pem, key)
            .context("--ca-cert is not a usable certificate")?;
        return Ok((issuer, cert_pem));
    }
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("dps bench CA {}", now_stamp()),
    );
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    Ok((rcgen::Issuer::new(params, key), cert.pem()))
}

fn issue_leaf(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    id: &str,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, id);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem().into_bytes(), key.serialize_pem().into_bytes()))
}

/// The simulated fleet and the client settings every device shares.
struct Fleet {
    devices: Vec<Device>,
    endpoint: String,
    id_scope: String,
    transport: TransportArg,
    /// Built once; symmetric-key devices use it as is, X.509 devices add their certificate.
    tls: ClientTls,
    /// The endpoint's addresses, resolved once.
    connect_addrs: Option<Vec<SocketAddr>>,
    policy: PollPolicy,
    timeout: Duration,
    /// Storm: connections this process may hold at once (see [`socket_budget`]); a device
    /// waits for a place (first come, first served) before it connects.
    sockets: Option<Arc<tokio::sync::Semaphore>>,
}

impl Fleet {
    fn client(&self, i: usize) -> Result<ProvisioningClient, dps_device::Error> {
        let d = &self.devices[i % self.devices.len()];
        let auth = match &d.cred {
            Cred::Key(k) => Auth::SymmetricKey(k.clone()),
            Cred::Cert { chain, key } => Auth::X509 {
                cert_chain_pem: chain.clone(),
                key_pem: key.clone(),
            },
        };
        let mut b = ProvisioningClient::builder()
            .global_endpoint(self.endpoint.as_str())
            .id_scope(self.id_scope.as_str())
            .registration_id(d.id.as_str())
            .auth(auth)
            .transport(self.transport.into())
            .tls(self.tls.clone())
            .poll_policy(self.policy.clone())
            .timeout(self.timeout);
        if let Some(addrs) = &self.connect_addrs {
            b = b.connect_addrs(addrs.clone());
            let ip = addrs[0].ip();
            if ip.is_loopback() && ip.is_ipv4() {
                b = b.local_address(IpAddr::V4(loopback_source(i)));
            }
        }
        b.build()
    }

    /// Resolve the endpoint once, so that the simulated devices neither resolve the name nor
    /// try an unreachable address on every connection. With several addresses, the first one a
    /// TLS handshake succeeds with goes first. Left unpinned when the name does not resolve (the
    /// devices then report the error).
    async fn pin_addresses(&mut self) {
        let Ok((host, port)) = dps_device::split_host_port(&self.endpoint) else {
            return;
        };
        let port = port.unwrap_or(dps_device::Transport::from(self.transport).default_port());
        let Ok(found) = tokio::net::lookup_host((host.as_str(), port)).await else {
            return;
        };
        let mut addrs: Vec<SocketAddr> = found.collect();
        if addrs.len() > 1 {
            for i in 0..addrs.len() {
                self.connect_addrs = Some(vec![addrs[i]]);
                let reachable = match (!self.devices.is_empty()).then(|| self.client(0)) {
                    Some(Ok(c)) => c.tls_handshake().await.is_ok(),
                    _ => false,
                };
                if reachable {
                    addrs[..=i].rotate_right(1);
                    break;
                }
            }
        }
        self.connect_addrs = (!addrs.is_empty()).then_some(addrs);
    }
}

/// How many connections a storm may hold at once: this process's open-file limit (soft; the
/// `dps` binary raised it to the hard one at start) less 256 for everything else. Without it,
/// the devices beyond the limit fail to open a socket (EMFILE), back off and retry, and a
/// 1,000,000-device storm spends the generator's CPU on that churn instead of on the devices
/// that are connected.
fn socket_budget() -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let limit = soft.map_or(1 << 20, |n| usize::try_from(n).unwrap_or(1 << 20));
    limit.saturating_sub(256).max(64)
}

/// The source address of simulated device `i` towards a loopback (IPv4) endpoint: its own
/// address in 127.64.0.0/10, as every real device has its own address. From one source address
/// the kernel has only its ephemeral port range (about 28,000 ports) towards the server, and a
/// reboot storm holding more connections than that makes every `connect()` search the whole
/// range (measured: two thirds of the load generator's CPU in a 100,000-device storm).
fn loopback_source(i: usize) -> Ipv4Addr {
    let i = i % (64 * 250 * 250);
    Ipv4Addr::new(
        127,
        64 + (i / 62_500) as u8,
        ((i / 250) % 250) as u8 + 1,
        (i % 250) as u8 + 2,
    )
}

// ---- handshake baseline ----

/// The bare TLS handshake baseline.
#[derive(Debug, Clone)]
struct Baseline {
    /// Handshakes attempted.
    attempted: usize,
    /// Handshakes in flight at once.
    concurrency: usize,
    /// Handshake times (TCP connect to handshake complete) of the successful ones, sorted.
    latencies: Vec<Duration>,
    /// Failed handshakes by reason.
    by_reason: BTreeMap<String, usize>,
    wall: Duration,
}

impl Baseline {
    fn successes(&self) -> usize {
        self.latencies.len()
    }
    fn failures(&self) -> usize {
        self.attempted - self.successes()
    }
    /// Successful handshakes per second.
    fn rate(&self) -> f64 {
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
async fn handshake_baseline(fleet: Arc<Fleet>, n: usize, concurrency: usize) -> Baseline {
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

// ---- workers ----

struct Worker {
    fleet: Arc<Fleet>,
    next: Arc<AtomicUsize>,
    ok: Arc<AtomicUsize>,
    fail: Arc<AtomicUsize>,
    rate: Option<f64>,
    started: Instant,
    keep_alive: bool,
    storm: bool,
}

/// A cheap per-device jitter (no RNG dependency): a hash of the registration id and the clock.
fn rand_jitter(id: &str) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    Instant::now().hash(&mut h);
    h.finish() as u32
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
            let s = match session {
                Some(s) => Ok(s),
                None => fleet.client(i).map(|c| session.insert(c.https_session())),
            };
            match s {
                Ok(s) => {
                    let key = match &d.cred {
                        Cred::Key(k) => Some(k.as_str()),
                        Cred::Cert { .. } => None,
                    };
                    let once = Box::pin(s.register_once(&d.id, key, None));
                    match tokio::time::timeout(fleet.timeout, once).await {
                        Ok(r) => r,
                        Err(_) => Err(dps_device::Error::Timeout),
                    }
                }
                Err(e) => Err(e),
            }
        } else if self.storm {
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
        } else {
            match fleet.client(i) {
                Ok(c) => Box::pin(c.register()).await,
                Err(e) => Err(e),
            }
        }
    }

    async fn run(self) -> Vec<Outcome> {
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

fn spawn_progress(
    total: usize,
    ok: Arc<AtomicUsize>,
    fail: Arc<AtomicUsize>,
    started: Instant,
    enabled: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !enabled {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let (o, f) = (ok.load(Ordering::Relaxed), fail.load(Ordering::Relaxed));
            eprint!("\r\x1b[2K{}", progress_line(total, o, f, started.elapsed()));
            let _ = std::io::stderr().flush();
        }
    })
}

/// `[#####.....] 50/100  ok 49  failed 1  123.4/s  2.0s`
fn progress_line(total: usize, ok: usize, fail: usize, elapsed: Duration) -> String {
    let done = ok + fail;
    let width = 30;
    let filled = (done * width).checked_div(total).unwrap_or(0).min(width);
    let rate = if elapsed.as_secs_f64() > 0.0 {
        done as f64 / elapsed.as_secs_f64()
    } else {
        0.0
    };
    format!(
        "[{}{}] {done}/{total}  ok {ok}  failed {fail}  {rate:.1}/s  {:.1}s",
        "#".repeat(filled),
        ".".repeat(width - filled),
        elapsed.as_secs_f64()
    )
}

// ---- report ----

struct Report {
    total: usize,
    successes: usize,
    failures: usize,
    by_reason: Vec<(String, usize)>,
    by_hub: Vec<(String, usize)>,
    wall: Duration,
    throughput: f64,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
    mean: Duration,
    retries: u64,
    polls: u64,
    /// The bare TLS handshake baseline (fresh-connection runs).
    baseline: Option<Baseline>,
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
    fn build(outcomes: &[Outcome], wall: Duration) -> Report {
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

    fn to_json(&self) -> Value {
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

    fn to_text(&self) -> String {
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

// ---- metrics ----

async fn scrape(admin_url: &str) -> Result<BTreeMap<String, f64>> {
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
fn metric_deltas(
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

fn format_num(v: f64) -> String {
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

    #[test]
    fn threads_must_be_positive() {
        assert_eq!(parse_threads("3"), Ok(3));
        assert!(parse_threads("0").is_err());
        assert!(parse_threads("x").is_err());
        assert!(default_threads() >= 1);
    }

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

    #[test]
    fn socket_budget_leaves_room_below_the_open_file_limit() {
        assert!(socket_budget() >= 64);
    }

    #[test]
    fn loopback_sources_are_distinct_host_addresses() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..1_000_000 {
            let a = loopback_source(i);
            assert!(a.is_loopback(), "{a}");
            let o = a.octets();
            assert!(o[3] != 0 && o[3] != 255 && o[2] != 0, "{a}");
            assert!(seen.insert(a), "device {i} shares {a}");
        }
    }

    #[test]
    fn progress_renders() {
        let l = progress_line(100, 40, 10, Duration::from_secs(2));
        assert!(l.starts_with("[###############..............."));
        assert!(l.contains("50/100"));
        assert!(l.contains("25.0/s"));
        assert!(progress_line(0, 0, 0, Duration::ZERO).contains("0/0"));
    }

    #[test]
    fn leaf_certificates_have_the_registration_id() {
        let a = BenchArgs {
            devices: 1,
            concurrency: 1,
            rate: None,
            transport: TransportArg::Https,
            attestation: AttestationArg::X509,
            group_key: None,
            create_group: true,
            create_enrollments: false,
            id_scope: None,
            global_endpoint: None,
            keep_alive: false,
            storm: false,
            json: false,
            prefix: None,
            admin_url: None,
            poll_interval_ms: None,
            ca_cert: None,
            ca_key: None,
            timeout: 1,
            cleanup: false,
            threads: None,
            no_handshake_baseline: false,
            baseline_handshakes: None,
        };
        let (issuer, ca_pem) = load_or_make_ca(&a).unwrap();
        assert!(ca_pem.contains("BEGIN CERTIFICATE"));
        let (chain, key) = issue_leaf(&issuer, "bench-dev-1").unwrap();
        assert!(dps_device::tls::parse_identity(&chain, &key).is_ok());
    }
}

//! `dps bench-broker-auth`: load on the endpoints a broker-auth hub's broker calls.
//!
//! `--connections` workers each keep one HTTPS connection alive (HTTP/1.1, like the brokers'
//! HTTP clients) and send broker questions back to back for `--duration` seconds, spread over
//! `--devices` distinct devices `{prefix}{i:06}` (the ids `dps bench --prefix` registers). The
//! devices' passwords are derived from the enrollment group's key (`--group-key`), as a device
//! would. `--check connect` asks "may it connect with this password", `topic` "may it publish on
//! its own tree", `mixed` (default) alternates. The report gives checks/s, how many were
//! allowed (every question is one that must be allowed: anything else is counted as a
//! failure), and latency percentiles measured from request sent to answer read.

use crate::{Globals, OutputFormat};
use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which question to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckArg {
    /// Username/password checks.
    Connect,
    /// Publish on the device's own tree.
    Topic,
    /// Alternate connect and topic.
    Mixed,
}

/// Which broker's contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FlavourArg {
    /// RabbitMQ's HTTP auth backend (form body, `allow`/`deny`).
    Rabbitmq,
    /// EMQX HTTP authentication/authorization (JSON).
    Emqx,
}

/// `dps bench-broker-auth` arguments.
#[derive(Args, Debug, Clone)]
pub struct BrokerAuthBenchArgs {
    /// The broker-auth linked hub (its host name).
    #[arg(long)]
    pub hub: String,
    /// The provisioning instance.
    #[arg(long, default_value = "default")]
    pub instance: String,
    /// The hub's broker secret (`options.auth_secret`).
    #[arg(long, env = "DPS_BROKER_AUTH_SECRET", hide_env_values = true)]
    pub secret: String,
    /// The enrollment group's primary key (the devices' keys and passwords derive from it).
    #[arg(long, env = "DPS_BENCH_GROUP_KEY", hide_env_values = true)]
    pub group_key: String,
    /// Device id prefix (ids are `{prefix}{i:06}`).
    #[arg(long)]
    pub prefix: String,
    /// Number of distinct devices.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Concurrent keep-alive HTTPS connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Offered load in checks per second over all connections (default: as fast as the
    /// connections go, each sending its next question when the last is answered). A server
    /// that cannot keep up shows as checks/s below this rate.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Question asked.
    #[arg(long, value_enum, default_value_t = CheckArg::Mixed)]
    pub check: CheckArg,
    /// Broker contract.
    #[arg(long, value_enum, default_value_t = FlavourArg::Rabbitmq)]
    pub flavour: FlavourArg,
    /// The hub's `password_mode`: derived (default) or primaryKey.
    #[arg(long, default_value = "derived")]
    pub password_mode: String,
    /// The hub's `topic_prefix`.
    #[arg(long, default_value = "devices")]
    pub topic_prefix: String,
    /// Runtime worker threads (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// The password a device presents (the hub's `password_mode`).
fn password(group_key: &str, id: &str, derived: bool) -> Result<String> {
    let key =
        dps_core::sas::derive_device_key(group_key, id).context("--group-key is not base64")?;
    if !derived {
        return Ok(key);
    }
    let raw = B64.decode(key.trim()).context("derived key")?;
    Ok(B64.encode(dps_core::sas::hmac_sha256(
        &raw,
        format!("mosquitto:{id}").as_bytes(),
    )))
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}={}",
                percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// One prepared request: path suffix, content type, body.
struct Req {
    path: String,
    ctype: &'static str,
    body: String,
}

fn prepare(a: &BrokerAuthBenchArgs, base: &str) -> Result<Vec<Req>> {
    let derived = match a.password_mode.as_str() {
        "derived" => true,
        "primaryKey" => false,
        other => bail!("unknown --password-mode '{other}' (derived | primaryKey)"),
    };
    let root = format!("{base}/brokerAuth/{}/{}", a.instance, a.hub);
    let mut v = Vec::with_capacity(a.devices * 2);
    for i in 0..a.devices {
        let id = format!("{}{i:06}", a.prefix);
        let topic = format!("{}/{id}/telemetry", a.topic_prefix);
        let connect = matches!(a.check, CheckArg::Connect | CheckArg::Mixed);
        let pub_ = matches!(a.check, CheckArg::Topic | CheckArg::Mixed);
        if connect {
            let pw = password(&a.group_key, &id, derived)?;
            v.push(match a.flavour {
                FlavourArg::Rabbitmq => Req {
                    path: format!("{root}/rabbitmq/user"),
                    ctype: "application/x-www-form-urlencoded",
                    body: form(&[
                        ("username", &id),
                        ("password", &pw),
                        ("vhost", "/"),
                        ("client_id", &id),
                    ]),
                },
                FlavourArg::Emqx => Req {
                    path: format!("{root}/emqx/authn"),
                    ctype: "application/json",
                    body: json!({"username": id, "clientid": id, "password": pw}).to_string(),
                },
            });
        }
        if pub_ {
            v.push(match a.flavour {
                FlavourArg::Rabbitmq => Req {
                    path: format!("{root}/rabbitmq/topic"),
                    ctype: "application/x-www-form-urlencoded",
                    body: form(&[
                        ("username", &id),
                        ("vhost", "/"),
                        ("resource", "topic"),
                        ("name", "amq.topic"),
                        ("permission", "write"),
                        ("routing_key", &topic.replace('/', ".")),
                        ("variable_map.client_id", &id),
                    ]),
                },
                FlavourArg::Emqx => Req {
                    path: format!("{root}/emqx/authz"),
                    ctype: "application/json",
                    body:
                        json!({"username": id, "clientid": id, "action": "publish", "topic": topic})
                            .to_string(),
                },
            });
        }
    }
    Ok(v)
}

fn allowed(flavour: FlavourArg, status: u16, body: &str) -> bool {
    status == 200
        && match flavour {
            FlavourArg::Rabbitmq => body.trim() == "allow",
            FlavourArg::Emqx => {
                serde_json::from_str::<Value>(body).is_ok_and(|v| v["result"] == "allow")
            }
        }
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct BrokerAuthReport {
    /// Questions answered.
    pub checks: u64,
    /// Answered "allow".
    pub allowed: u64,
    /// Anything else (deny, errors, transport failures).
    pub failed: u64,
    /// Wall time.
    pub wall: Duration,
    /// p50, p90, p99, max latency.
    pub p50: Duration,
    /// p90.
    pub p90: Duration,
    /// p99.
    pub p99: Duration,
    /// max.
    pub max: Duration,
    /// `--rate`, if given.
    pub offered: Option<f64>,
}

impl BrokerAuthReport {
    /// Checks per second.
    pub fn rate(&self) -> f64 {
        self.checks as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// JSON form.
    pub fn to_json(&self) -> Value {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        json!({
            "checks": self.checks,
            "allowed": self.allowed,
            "failed": self.failed,
            "wallSeconds": self.wall.as_secs_f64(),
            "checksPerSecond": (self.rate() * 10.0).round() / 10.0,
            "offeredPerSecond": self.offered,
            "latencyMs": {"p50": ms(self.p50), "p90": ms(self.p90), "p99": ms(self.p99), "max": ms(self.max)},
        })
    }
}

fn percentile(sorted: &[u32], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Duration::from_micros(sorted[rank - 1] as u64)
}

/// Run the load and build the report (the library entry point; tests call it directly).
pub async fn measure(
    a: &BrokerAuthBenchArgs,
    base: &str,
    ca_pem: Option<&[u8]>,
) -> Result<BrokerAuthReport> {
    if a.devices == 0 || a.connections == 0 {
        bail!("--devices and --connections must be at least 1");
    }
    let reqs = Arc::new(prepare(a, base.trim_end_matches('/'))?);
    let auth = format!("Bearer {}", a.secret);
    let duration = Duration::from_secs_f64(a.duration.max(0.1));
    // Every worker first opens its connection (one unmeasured question: the TLS handshake is
    // not what is measured), then all start together.
    let barrier = Arc::new(tokio::sync::Barrier::new(a.connections));
    let start = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut tasks = Vec::with_capacity(a.connections);
    for w in 0..a.connections {
        // One client with one connection per worker: `connections` keep-alive connections.
        let mut b = reqwest::Client::builder()
            .http1_only()
            .pool_max_idle_per_host(1)
            .timeout(Duration::from_secs(10))
            .user_agent("dps-bench-broker-auth");
        if let Some(pem) = ca_pem {
            b = b.tls_certs_merge(
                reqwest::Certificate::from_pem_bundle(pem).context("CA file is not PEM")?,
            );
        }
        let client = b.build().context("building the HTTP client")?;
        let reqs = reqs.clone();
        let auth = auth.clone();
        let flavour = a.flavour;
        let stride = a.connections;
        // With --rate: this worker's share, one question every `every`.
        let every = a
            .rate
            .filter(|r| *r > 0.0)
            .map(|r| Duration::from_secs_f64(a.connections as f64 / r));
        let offset = every
            .map(|e| e.mul_f64(w as f64 / a.connections as f64))
            .unwrap_or_default();
        let barrier = barrier.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let warm = &reqs[w % reqs.len()];
            if let Ok(r) = client
                .post(&warm.path)
                .header("authorization", &auth)
                .header("content-type", warm.ctype)
                .body(warm.body.clone())
                .send()
                .await
            {
                let _ = r.bytes().await;
            }
            barrier.wait().await;
            let started = *start.get_or_init(Instant::now);
            let deadline = started + duration;
            let mut due = started + offset;
            let mut lat: Vec<u32> = Vec::with_capacity(4096);
            let (mut ok, mut bad) = (0u64, 0u64);
            let mut i = w % reqs.len();
            while Instant::now() < deadline {
                let r = &reqs[i];
                i = (i + stride) % reqs.len();
                if let Some(e) = every {
                    tokio::time::sleep_until(due.into()).await;
                    due += e;
                }
                let t0 = Instant::now();
                if t0 >= deadline {
                    break;
                }
                let res = client
                    .post(&r.path)
                    .header("authorization", &auth)
                    .header("content-type", r.ctype)
                    .body(r.body.clone())
                    .send()
                    .await;
                let good = match res {
                    Ok(resp) => {
                        let st = resp.status().as_u16();
                        let text = resp.text().await.unwrap_or_default();
                        allowed(flavour, st, &text)
                    }
                    Err(_) => false,
                };
                lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                if good {
                    ok += 1;
                } else {
                    bad += 1;
                }
            }
            (lat, ok, bad)
        }));
    }
    let mut lat = Vec::new();
    let (mut ok, mut bad) = (0, 0);
    for t in tasks {
        let (l, o, b) = t.await.context("a worker panicked")?;
        lat.extend(l);
        ok += o;
        bad += b;
    }
    let wall = start.get().map(Instant::elapsed).unwrap_or_default();
    lat.sort_unstable();
    Ok(BrokerAuthReport {
        checks: ok + bad,
        allowed: ok,
        failed: bad,
        wall,
        p50: percentile(&lat, 0.50),
        p90: percentile(&lat, 0.90),
        p99: percentile(&lat, 0.99),
        max: lat
            .last()
            .map(|m| Duration::from_micros(*m as u64))
            .unwrap_or_default(),
        offered: a.rate,
    })
}

/// `dps bench-broker-auth`.
pub async fn run(g: &Globals, a: BrokerAuthBenchArgs) -> Result<ExitCode> {
    let base = g
        .url
        .clone()
        .context("--url (or DPS_URL) is required: the dps HTTPS endpoint the broker calls")?;
    let ca = match crate::service::extra_ca_file(g.ca_file.as_deref()) {
        Some(p) => Some(std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    let r = measure(&a, &base, ca.as_deref()).await?;
    match g.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&r.to_json())?),
        _ => {
            let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
            println!(
                "checks        {}\nallowed       {}\nfailed        {}\nwall          {:.2} s\nchecks/s      {:.0}\nlatency p50   {}\nlatency p90   {}\nlatency p99   {}\nlatency max   {}",
                r.checks,
                r.allowed,
                r.failed,
                r.wall.as_secs_f64(),
                r.rate(),
                ms(r.p50),
                ms(r.p90),
                ms(r.p99),
                ms(r.max)
            );
        }
    }
    Ok(if r.failed == 0 && r.checks > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

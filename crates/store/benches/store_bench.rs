//! Store benchmark (a program, not a timed test).
//!
//! ```text
//! cargo bench -p dps-store --bench store_bench -- --engine sqlite --n 100000 --batch-concurrency 64
//! cargo bench -p dps-store --bench store_bench -- --engine postgres \
//!     --url postgres://postgres@127.0.0.1:5432/test --n 100000 --batch-concurrency 64
//! ```
//!
//! Creates N enrollment-shaped documents (~600-byte JSON bodies, random-order ids) with
//! `Expect::Absent` from many concurrent tasks, then measures get-by-id, a filtered page
//! (status filter, limit 100) and paging through everything. SQLite defaults to a file in a temp
//! dir; PostgreSQL uses a fresh schema `bench_<uuid>` (dropped at the end) in the database given
//! by `--url` or `DPS_TEST_POSTGRES_URL`. With no arguments it runs at N = 1000 (CI smoke).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dps_core::store::{Collection, Doc, DocIndex, Expect, Filter, Store};
use dps_store::{PostgresOptions, PostgresStore, SqliteOptions, SqliteStore, Synchronous};

const E: Collection = Collection::Enrollment;
const SCOPE: &str = "bench";

struct Args {
    engine: String,
    url: Option<String>,
    n: usize,
    concurrency: usize,
    synchronous: Synchronous,
    pool: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: store_bench [--engine sqlite|postgres] [--url URL_OR_PATH] [--n N] \
         [--batch-concurrency C] [--synchronous full|normal] [--pool P]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        engine: "sqlite".into(),
        url: None,
        n: 1000,
        concurrency: 64,
        synchronous: Synchronous::Full,
        pool: 16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--engine" => a.engine = val(),
            "--url" => a.url = Some(val()),
            "--n" => a.n = val().parse().unwrap_or_else(|_| usage()),
            "--batch-concurrency" | "--concurrency" => {
                a.concurrency = val().parse().unwrap_or_else(|_| usage())
            }
            "--pool" => a.pool = val().parse().unwrap_or_else(|_| usage()),
            "--synchronous" => {
                a.synchronous = match val().as_str() {
                    "full" => Synchronous::Full,
                    "normal" => Synchronous::Normal,
                    _ => usage(),
                }
            }
            // Passed by `cargo bench` / `cargo test --benches`.
            "--bench" | "--test" => {}
            _ => usage(),
        }
    }
    a
}

/// splitmix64: a bijection, so ids are unique and arrive in random key order.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn id_of(i: usize) -> String {
    format!("device-{:016x}", mix(i as u64))
}

fn enrollment(i: usize) -> Doc {
    let id = id_of(i);
    let status = if i.is_multiple_of(10) {
        "disabled"
    } else {
        "enabled"
    };
    let kind = ["symmetricKey", "x509", "tpm"][i % 3];
    let body = format!(
        r#"{{"registrationId":"{id}","attestation":{{"type":"symmetricKey","symmetricKey":{{"primaryKey":"q1Yw2G3bJTV6u8z3kJ6PcJ0C5x0l0xZkqY8yq3bVw7MmXJH0k9TQ4aWc2mZ3sQ8eP5nW1rB6tY9uI2oK4lE7g=="}}}},"capabilities":{{"iotEdge":false}},"iotHubHostName":"hub-{hub}.azure-devices.net","initialTwin":{{"tags":{{"site":"plant-{site}","line":"{line}"}},"properties":{{"desired":{{"telemetryInterval":30}}}}}},"provisioningStatus":"{status}","reprovisionPolicy":{{"updateHubAssignment":true,"migrateDeviceData":true}},"allocationPolicy":"hashed","createdDateTimeUtc":"2026-01-01T00:00:00.0000000Z","lastUpdatedDateTimeUtc":"2026-01-01T00:00:00.0000000Z","etag":"{etag}"}}"#,
        hub = i % 4,
        site = i % 97,
        line = i % 13,
        etag = i,
    );
    Doc {
        id,
        etag: format!("{i}"),
        body,
        index: DocIndex {
            status: Some(status.into()),
            kind: Some(kind.into()),
            group: None,
            hub: None,
        },
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// Run `total` operations from `concurrency` tasks; returns (elapsed, sorted latencies).
async fn run_concurrent<F, Fut>(
    total: usize,
    concurrency: usize,
    op: F,
) -> (Duration, Vec<Duration>)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let op = op.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                op(i).await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await.expect("bench task panicked"));
    }
    let elapsed = start.elapsed();
    all.sort();
    (elapsed, all)
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let _tmp;
    let mut pg_cleanup = None;
    let store: Arc<dyn Store> = match args.engine.as_str() {
        "sqlite" => {
            let path = match &args.url {
                Some(u) => std::path::PathBuf::from(u.strip_prefix("sqlite://").unwrap_or(u)),
                None => {
                    _tmp = tempfile::tempdir().expect("temp dir");
                    _tmp.path().join("bench.sqlite3")
                }
            };
            let opts = SqliteOptions {
                synchronous: args.synchronous,
                ..SqliteOptions::default()
            };
            println!("engine: sqlite {} ({:?})", path.display(), args.synchronous);
            Arc::new(SqliteStore::open_with(&path, opts).expect("open sqlite"))
        }
        "postgres" => {
            let url = args
                .url
                .clone()
                .or_else(|| std::env::var("DPS_TEST_POSTGRES_URL").ok())
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());
            let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
            println!(
                "engine: postgres {} schema {schema} pool {}",
                dps_store::redact_url(&url),
                args.pool
            );
            let opts = PostgresOptions {
                pool_size: args.pool,
                schema: Some(schema.clone()),
            };
            let s = PostgresStore::open_with(&url, opts)
                .await
                .expect("open postgres");
            pg_cleanup = Some((url, schema));
            Arc::new(s)
        }
        _ => usage(),
    };
    let n = args.n;
    let c = args.concurrency;
    println!(
        "n = {n}, concurrency = {c}, body ≈ {} bytes",
        enrollment(0).body.len()
    );

    // 1. Creates.
    let s = store.clone();
    let (el, lat) = run_concurrent(n, c, move |i| {
        let s = s.clone();
        async move {
            s.put(E, SCOPE, enrollment(i), Expect::Absent)
                .await
                .expect("create");
        }
    })
    .await;
    println!(
        "create (Expect::Absent): {n} in {:.2} s = {:.0} creates/s; latency p50 {} p99 {}",
        el.as_secs_f64(),
        n as f64 / el.as_secs_f64(),
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99))
    );

    // 2. Gets by id (random order, mixed case).
    let gets = n.min(200_000);
    let s = store.clone();
    let (el, lat) = run_concurrent(gets, c, move |i| {
        let s = s.clone();
        async move {
            let j = (mix(i as u64 ^ 0xABCD) % n as u64) as usize;
            let id = id_of(j).to_uppercase();
            let d = s.get(E, SCOPE, &id).await.expect("get");
            assert!(d.is_some(), "missing {id}");
        }
    })
    .await;
    println!(
        "get by id: {gets} in {:.2} s = {:.0} gets/s; latency p50 {} p99 {}",
        el.as_secs_f64(),
        gets as f64 / el.as_secs_f64(),
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99))
    );

    // 3. Filtered page: status = disabled (10% of docs), limit 100, from random cursors.
    let filter = Filter {
        status: Some("disabled".into()),
        ..Filter::default()
    };
    let mut lat = Vec::new();
    for i in 0..200 {
        let cursor = if i == 0 {
            None
        } else {
            Some(id_of(i * 7919 % n))
        };
        let t = Instant::now();
        let page = store
            .query(E, SCOPE, &filter, cursor.as_deref(), 100)
            .await
            .expect("query");
        lat.push(t.elapsed());
        assert!(page
            .docs
            .iter()
            .all(|d| d.index.status.as_deref() == Some("disabled")));
    }
    lat.sort();
    println!(
        "filtered page (status=disabled, limit 100, 200 random cursors, sequential): p50 {} p99 {}",
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99))
    );
    let t = Instant::now();
    let disabled = store.count(E, SCOPE, &filter).await.expect("count");
    println!("count (status=disabled) = {disabled}: {}", ms(t.elapsed()));

    // 4. Page through everything.
    let t = Instant::now();
    let (mut pages, mut docs) = (0usize, 0usize);
    let mut cursor: Option<String> = None;
    loop {
        let page = store
            .query(E, SCOPE, &Filter::default(), cursor.as_deref(), 100)
            .await
            .expect("page");
        pages += 1;
        docs += page.docs.len();
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let el = t.elapsed();
    assert_eq!(docs, n, "paging must see every document once");
    println!(
        "page through all (limit 100): {pages} pages, {docs} docs in {:.2} s = {:.0} pages/s ({:.0} docs/s)",
        el.as_secs_f64(),
        pages as f64 / el.as_secs_f64(),
        docs as f64 / el.as_secs_f64()
    );

    drop(store);
    if let Some((url, schema)) = pg_cleanup {
        if let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            let _ = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .await;
        }
    }
}

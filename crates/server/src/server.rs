//! Start-up: configuration, store, instances, TLS, listeners, and the `run.json` file that
//! tells tools where everything is.

use crate::app::App;
use crate::config::Config;
use crate::engine::{Engine, EngineSettings};
use crate::hubs::HubSet;
use crate::instances::Instances;
use crate::repo::Repo;
use anyhow::{anyhow, Context};
use axum::routing::get;
use dps_core::clock::{Clock, SystemClock};
use dps_core::random::{Random, SystemRandom};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What a started server exposes.
pub struct Server {
    /// Bound HTTPS address.
    pub https: SocketAddr,
    /// Bound MQTT address.
    pub mqtt: Option<SocketAddr>,
    /// Bound AMQP address.
    pub amqp: Option<SocketAddr>,
    /// Bound admin address.
    pub admin: Option<SocketAddr>,
    /// The CA devices must trust (development CA), if generated.
    pub ca_path: Option<PathBuf>,
    /// `(name, id scope, owner connection string)` per instance.
    pub instances: Vec<(String, String, Option<String>)>,
    /// The `run.json` file (mode 0600) that holds the addresses and the connection strings.
    pub run_json: PathBuf,
    /// The application.
    pub app: Arc<App>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder.
pub fn metrics_handle() -> PrometheusHandle {
    METRICS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ])
                .expect("static buckets")
                .build_recorder();
            let handle = recorder.handle();
            // A test binary may have installed one already; then ours just is not global.
            let _ = metrics::set_global_recorder(recorder);
            crate::metrics::describe();
            handle
        })
        .clone()
}

async fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    let sa: SocketAddr = addr
        .parse()
        .with_context(|| format!("listen.{what} = '{addr}' is not a socket address"))?;
    // A deep accept backlog: a reboot storm opens thousands of connections at once, and the
    // default (1024) makes the kernel drop SYNs, which devices see as connect timeouts.
    let listen = |sa: SocketAddr| -> std::io::Result<TcpListener> {
        let sock = if sa.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        sock.bind(sa)?;
        sock.listen(8192)
    };
    match listen(sa) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(anyhow!(
            "cannot bind listen.{what} = {sa}: permission denied. Ports below 1024 need root or \
             `sudo setcap cap_net_bind_service=+ep $(which dps)`; or choose another port with \
             --{what} / DPS_LISTEN__{} (Azure's SDKs need 443 and 8883; several cannot change port)",
            what.to_uppercase()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            Err(anyhow!("cannot bind listen.{what} = {sa}: the address is already in use by another process"))
        }
        Err(e) => Err(anyhow!("cannot bind listen.{what} = {sa}: {e}")),
    }
}

fn connection_string(inst: &dps_core::instance::Instance) -> Option<String> {
    let p = inst
        .access_policy
        .iter()
        .find(|p| p.name == "provisioningserviceowner")
        .or_else(|| {
            inst.access_policy
                .iter()
                .find(|p| p.has(dps_core::instance::Right::ServiceConfig))
        })?;
    let host = inst.hostnames.first()?;
    Some(format!(
        "HostName={host};SharedAccessKeyName={};SharedAccessKey={}",
        p.name, p.primary_key
    ))
}

/// Start everything; returns once every listener is bound.
pub async fn start(cfg: Config) -> anyhow::Result<Server> {
    let metrics = metrics_handle();
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    let backend = dps_store::open_backend(&cfg.store, &cfg.data_dir)
        .await
        .context("opening the store")?;
    // Lifecycle events: with a sink configured, the store writes the event of every audit entry
    // into the outbox in the same transaction (`events::EventsStore`); without one, nothing.
    let events_wake = Arc::new(tokio::sync::Notify::new());
    let dispatcher = if cfg.events.sink.is_empty() {
        None
    } else {
        Some(
            crate::events::dispatch::Dispatcher::new(
                backend.store(),
                &cfg.events,
                events_wake.clone(),
            )
            .map_err(|e| anyhow!("events: {e}"))?,
        )
    };
    let store: Arc<dyn dps_core::store::Store> = if dispatcher.is_some() {
        Arc::new(crate::events::EventsStore::new(
            backend.store(),
            events_wake,
        ))
    } else {
        backend.store()
    };
    let repo = Repo::new(store.clone());
    let instances = Arc::new(
        Instances::load(repo.clone())
            .await
            .map_err(|e| anyhow!("loading instances: {e}"))?,
    );

    // Apply the instances declared in the config; make sure at least `default` exists.
    let declared: Vec<_> = if cfg.instances.is_empty() && instances.list().is_empty() {
        vec![crate::config::InstanceConfig {
            name: "default".into(),
            id_scope: None,
            hostnames: None,
            access_policy: vec![],
            linked_hub: vec![dps_core::instance::LinkedHub::registry("hub.localhost")],
            allocation_policy: Default::default(),
            register_response: Default::default(),
            allow_fault_injection: false,
            fault: vec![],
            credential_policy: Vec::new(),
        }]
    } else {
        cfg.instances.clone()
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let random: Arc<dyn Random> = Arc::new(SystemRandom);
    let audit = crate::audit::Audit::with_clock(store.clone(), clock.clone());
    for ic in &declared {
        let stored = instances.by_name(&ic.name);
        let inst = ic.resolve(stored.as_deref());
        if stored.as_deref() != Some(&inst) {
            let before = instances
                .put(&inst)
                .await
                .map_err(|e| anyhow!("instance '{}': {e}", ic.name))?;
            let action = if before.is_some() {
                "instance.update"
            } else {
                "instance.create"
            };
            audit
                .record(
                    &inst.name,
                    "config",
                    action,
                    "instance",
                    &inst.name,
                    before.as_ref().map(|b| b.redacted()).as_ref(),
                    Some(&inst.redacted()),
                )
                .await;
        }
    }

    let pki = crate::tls::load_or_generate(
        &cfg.data_dir,
        cfg.tls
            .as_ref()
            .map(|t| (t.cert.as_path(), t.key.as_path())),
    )?;
    let https_tls = crate::tls::server_config(&pki, &[b"h2", b"http/1.1"])?;
    let mqtt_tls = crate::tls::server_config(&pki, &[])?;
    let amqp_tls = mqtt_tls.clone();

    let outbound = Arc::new(
        crate::outbound::Outbound::from_config(
            &cfg.outbound,
            Duration::from_millis(cfg.limits.webhook_timeout_ms),
        )
        .context("building the HTTP client")?,
    );
    let hubs = Arc::new(HubSet::new(store.clone(), outbound.clone()));
    let health_store = store.clone();
    let settings = EngineSettings {
        node_location: cfg.location.clone(),
        inline_wait: Duration::from_millis(cfg.limits.register_wait_ms),
        max_inflight: cfg.limits.max_inflight_registrations,
        refused_audit_per_second: cfg.limits.refused_audit_per_second,
        max_token_lifetime_secs: cfg.auth.max_token_lifetime_secs,
        refused_per_source_per_second: cfg.audit.refused_per_source_per_second,
        refused_max_sources: cfg.audit.refused_max_sources,
        cleanup: cfg.hub_cleanup.settings(),
        node: cfg.cluster.settings(),
        ..EngineSettings::default()
    };
    let catalog = crate::catalog::Catalog::new(repo.clone());
    let custom_allocator = Arc::new(crate::engine::WebhookAllocator::new(
        outbound.clone(),
        Duration::from_millis(cfg.limits.webhook_timeout_ms),
    ));
    let engine = Engine::new(
        crate::engine::EnginePorts {
            repo: repo.clone(),
            instances: instances.clone(),
            hubs: hubs.clone(),
            catalog: catalog.clone(),
            clock: clock.clone(),
            random: random.clone(),
            custom_allocator,
        },
        settings,
    );
    engine
        .faults()
        .configure(
            declared
                .iter()
                .filter(|i| i.allow_fault_injection)
                .map(|i| i.name.clone()),
            declared
                .iter()
                .flat_map(|i| i.fault.iter().map(|r| (i.name.clone(), r.clone())))
                .collect(),
        )
        .map_err(|e| anyhow!("fault injection: {e}"))?;
    for i in declared.iter().filter(|i| i.allow_fault_injection) {
        tracing::warn!(instance = %i.name, rules = i.fault.len(), "fault injection is allowed on this instance: devices may get injected errors, delays and outages (never on production)");
    }
    // This node's heartbeat row exists before it writes any intent, so that no other node
    // takes its work for a dead node's.
    engine
        .heartbeat()
        .await
        .map_err(|e| anyhow!("writing this node's heartbeat: {e}"))?;
    tracing::info!(node = engine.node_id(), "node started");
    let recovery_after = Duration::from_millis(cfg.limits.recovery_after_ms);
    match engine.recover(recovery_after).await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            count = n,
            "recovered registrations interrupted by a previous stop"
        ),
        Err(e) => return Err(anyhow!("recovering interrupted registrations: {e}")),
    }
    let pruner = crate::audit::Pruner {
        store: store.clone(),
        clock: clock.clone(),
        retention: (cfg.audit.retention_days > 0)
            .then(|| Duration::from_secs(u64::from(cfg.audit.retention_days) * 86_400)),
        max_rows: (cfg.audit.max_rows > 0).then_some(cfg.audit.max_rows),
    };
    let cleanup_store = store.clone();
    // Changes other nodes make (PostgreSQL `LISTEN/NOTIFY`); polling stays as the fallback.
    let changes = backend.watch_changes();
    if let dps_store::Backend::Postgres(pg) = &backend {
        // The group commit's counters, as metrics (the store crate keeps no metrics of its own).
        let pg = Arc::downgrade(pg);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let Some(pg) = pg.upgrade() else { break };
                let (batches, calls) = pg.group_commits();
                metrics::counter!("dps_store_group_commits_total").absolute(batches);
                metrics::counter!("dps_store_grouped_writes_total").absolute(calls);
            }
        });
    }
    let watched_catalog = catalog.clone();
    let cx = crate::usecases::Context::new(store, clock.clone(), random);
    let app = Arc::new(App {
        enrollments: crate::usecases::enrollments::Enrollments::new(
            cx.clone(),
            catalog.clone(),
            engine.clone(),
            outbound,
        ),
        registrations: crate::usecases::registrations::Registrations::new(
            cx.clone(),
            engine.clone(),
        ),
        certificates: crate::usecases::certificates::Certificates::new(cx.clone(), catalog.clone()),
        issuance: crate::usecases::issuance::Issuance::new(cx.clone(), catalog, engine.issuer()),
        admin: crate::usecases::admin::Admin::new(
            cx,
            backend,
            instances.clone(),
            hubs,
            cfg.admin_instance.clone(),
        ),
        engine,
        instances: instances.clone(),
        clock,
        admin_instance: cfg.admin_instance.clone(),
        max_body: cfg.limits.max_body_bytes,
        max_token_lifetime_secs: cfg.auth.max_token_lifetime_secs,
        mqtt_limits: dps_mqtt::MqttLimits::default(),
        amqp_limits: dps_amqp::AmqpLimits {
            max_frame_size: u32::try_from(cfg.limits.amqp_max_frame_bytes).unwrap_or(u32::MAX),
            open_timeout: Duration::from_millis(cfg.limits.amqp_open_timeout_ms),
            ..dps_amqp::AmqpLimits::default()
        },
        listening: Default::default(),
    });

    let handshake = Duration::from_millis(cfg.limits.tls_handshake_timeout_ms);
    let mut tasks = Vec::new();
    let https = bind(&cfg.listen.https, "https").await?;
    let https_addr = https.local_addr()?;
    // One MQTT connection cap for MQTT over TLS and MQTT over WebSocket.
    let mqtt_slots = crate::connections::Slots::with_total_gauge(
        cfg.limits.max_mqtt_connections,
        "dps_mqtt_connections",
    );
    // One AMQP connection cap for AMQP over TLS and AMQP over WebSocket.
    let amqp_slots = crate::connections::Slots::with_total_gauge(
        cfg.limits.max_amqp_connections,
        "dps_amqp_connections",
    );
    tasks.push(tokio::spawn(crate::http::serve_https(
        https,
        tokio_rustls::TlsAcceptor::from(https_tls),
        app.clone(),
        handshake,
        cfg.limits.max_pending_handshakes,
        crate::http::HttpsConnections {
            slots: crate::connections::Slots::new(cfg.limits.max_https_connections),
            http: crate::connections::HttpLimits::from_config(&cfg.limits),
            ws: crate::connections::WsSettings {
                slots: mqtt_slots.clone(),
                amqp_slots: amqp_slots.clone(),
                max_message_bytes: cfg.limits.ws_max_message_bytes,
            },
        },
    )));
    let mqtt_addr = if cfg.listen.mqtt.is_empty() {
        None
    } else {
        let l = bind(&cfg.listen.mqtt, "mqtt").await?;
        let a = l.local_addr()?;
        tasks.push(tokio::spawn(crate::mqtt_front::serve_mqtt(
            l,
            tokio_rustls::TlsAcceptor::from(mqtt_tls),
            app.clone(),
            handshake,
            mqtt_slots,
            cfg.limits.max_pending_handshakes,
        )));
        Some(a)
    };
    let amqp_addr = if cfg.listen.amqp.is_empty() {
        None
    } else {
        let l = bind(&cfg.listen.amqp, "amqp").await?;
        let a = l.local_addr()?;
        tasks.push(tokio::spawn(crate::amqp_front::serve_amqp(
            l,
            tokio_rustls::TlsAcceptor::from(amqp_tls),
            app.clone(),
            handshake,
            amqp_slots,
            cfg.limits.max_pending_handshakes,
        )));
        Some(a)
    };
    let admin_addr = if cfg.listen.admin.is_empty() {
        None
    } else {
        let l = bind(&cfg.listen.admin, "admin").await?;
        let a = l.local_addr()?;
        let router = admin_router(app.clone(), metrics);
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(l, router).await;
        }));
        Some(a)
    };
    // The heartbeat, and the intents of nodes whose heartbeat lapsed (or this node's own that
    // a store failure left behind) are ended, every `cluster.heartbeat_ms`.
    {
        let engine = app.engine.clone();
        let every = Duration::from_millis(cfg.cluster.heartbeat_ms);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = engine.heartbeat().await {
                    tracing::warn!(error = %e, "writing this node's heartbeat failed");
                    metrics::counter!("dps_node_heartbeat_failures_total").increment(1);
                    continue;
                }
                match engine.recover(recovery_after).await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(count = n, "recovered interrupted registrations"),
                    Err(e) => {
                        tracing::warn!(error = %e, "recovering interrupted registrations failed")
                    }
                }
            }
        }));
    }
    // Lifecycle events are delivered from the outbox to the sinks; hub health changes become
    // `io.dps.hub.health` events of every instance that links the hub.
    if let Some(d) = dispatcher {
        tasks.push(tokio::spawn(d.run()));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, bool)>(1024);
        app.admin.hubs().on_health_change(tx);
        let (store, instances, node) = (
            health_store,
            instances.clone(),
            app.engine.node_id().to_string(),
        );
        tasks.push(tokio::spawn(async move {
            while let Some((hub, healthy)) = rx.recv().await {
                let now = crate::events::now_ms();
                let time = dps_core::clock::azure_timestamp(time::OffsetDateTime::now_utc());
                let writes: Vec<dps_core::store::Write> = instances
                    .list()
                    .iter()
                    .filter(|i| {
                        i.linked_hub
                            .iter()
                            .any(|h| h.host.eq_ignore_ascii_case(&hub))
                    })
                    .map(|i| {
                        let ev =
                            crate::events::hub_health_event(&i.name, &hub, healthy, &time, &node);
                        crate::events::outbox_write(&ev, now)
                    })
                    .collect();
                if writes.is_empty() {
                    continue;
                }
                if let Err(e) = store.write_all(writes).await {
                    tracing::warn!(hub = %hub, error = %e, "writing a hub health event failed");
                }
            }
        }));
    }
    // Identities left behind on hubs are removed through the durable queue, retried until done.
    tasks.push(tokio::spawn(crate::hub_cleanup::run(
        app.engine.clone(),
        cleanup_store,
        Duration::from_millis(cfg.hub_cleanup.interval_ms),
        cfg.hub_cleanup.batch,
    )));
    // The audit log is pruned to its retention (age and row count).
    {
        let every = Duration::from_millis(cfg.audit.prune_interval_ms.max(1000));
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                pruner.prune().await;
            }
        }));
    }
    // Nodes sharing a store pick up changes made elsewhere at once (PostgreSQL notifications)
    // and, as a fallback, by polling: instances every 5 s, the catalog's entries expire after
    // 2 s.
    if let Some(mut rx) = changes {
        let instances = instances.clone();
        let catalog = watched_catalog;
        tasks.push(tokio::spawn(async move {
            while let Some(change) = rx.recv().await {
                apply_change(&instances, &catalog, change).await;
            }
        }));
    }
    {
        let instances = instances.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                if let Err(e) = instances.reload().await {
                    tracing::warn!(error = %e, "reloading instances failed");
                }
            }
        }));
    }
    app.listening.store(true, Ordering::SeqCst);
    let list = instances
        .list()
        .iter()
        .map(|i| (i.name.clone(), i.id_scope.clone(), connection_string(i)))
        .collect();
    let server = Server {
        https: https_addr,
        mqtt: mqtt_addr,
        amqp: amqp_addr,
        admin: admin_addr,
        ca_path: pki.ca_path.clone(),
        instances: list,
        run_json: cfg.data_dir.join("run.json"),
        app,
        tasks,
    };
    write_run_json(&cfg, &server)?;
    Ok(server)
}

/// Drop what a change made by any node (announced by PostgreSQL) makes stale.
async fn apply_change(
    instances: &Instances,
    catalog: &crate::catalog::Catalog,
    change: dps_store::Change,
) {
    use dps_core::store::Collection;
    let reload = |why: &'static str| async move {
        if let Err(e) = instances.reload().await {
            tracing::warn!(error = %e, why, "reloading instances failed");
        }
    };
    match change {
        dps_store::Change::Listening => {
            reload("listening").await;
            catalog.invalidate_all();
        }
        dps_store::Change::Doc { collection, scope } => {
            metrics::counter!("dps_change_notifications_total").increment(1);
            if collection == Collection::Instance.as_str() {
                reload("instance changed").await;
            } else if collection == Collection::Group.as_str() {
                catalog.groups_changed(&scope);
            } else if collection == Collection::Enrollment.as_str() {
                catalog.individuals_changed(&scope);
            } else if collection == Collection::Certificate.as_str()
                || collection == Collection::DenyList.as_str()
            {
                catalog.x509_changed(&scope);
            }
        }
    }
}

fn write_run_json(cfg: &Config, s: &Server) -> anyhow::Result<()> {
    let v = serde_json::json!({
        "https": s.https.to_string(),
        "mqtt": s.mqtt.map(|a| a.to_string()),
        "amqp": s.amqp.map(|a| a.to_string()),
        "admin": s.admin.map(|a| a.to_string()),
        "ca": s.ca_path.as_ref().map(|p| std::fs::canonicalize(p).unwrap_or(p.clone()).display().to_string()),
        "instances": s.instances.iter().map(|(n, scope, cs)| serde_json::json!({"name": n, "id_scope": scope, "connection_string": cs})).collect::<Vec<_>>(),
    });
    // It holds the owner connection string: private from the start.
    let path = cfg.data_dir.join("run.json");
    crate::files::write_private_atomic(&path, &serde_json::to_vec_pretty(&v)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn admin_router(app: Arc<App>, metrics: PrometheusHandle) -> axum::Router {
    let ready_app = app.clone();
    let metrics_app = app.clone();
    axum::Router::new()
        .route(
            "/metrics",
            get(move || async move {
                // Counters the hot path keeps as plain atomics, published when scraped.
                metrics::counter!("dps_sas_group_keys_tried_total")
                    .absolute(metrics_app.engine.group_keys_tried());
                metrics.render()
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let app = ready_app.clone();
                async move {
                    let ready = app.admin.readiness().await;
                    let (store_ok, migrations) = (ready.store, ready.migrations_current);
                    let listening = app.listening.load(Ordering::SeqCst);
                    let body = serde_json::json!({"store": store_ok, "migrations_current": migrations, "listeners_bound": listening});
                    let status = if store_ok && migrations && listening { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
                    (status, axum::Json(body))
                }
            }),
        )
}

/// Print what an operator needs on start. The owner connection strings are printed only to a
/// terminal (the quickstart); under a service manager stdout ends up in a log, so they are
/// pointed to in `run.json` instead.
pub fn print_banner(s: &Server) {
    use std::io::IsTerminal;
    let to_terminal = std::io::stdout().is_terminal();
    println!("dps {} is running", env!("CARGO_PKG_VERSION"));
    println!("  https (device + service API): {}", s.https);
    if let Some(m) = s.mqtt {
        println!("  mqtt:                         {m}");
    }
    if let Some(a) = s.amqp {
        println!("  amqp:                         {a}");
    }
    if let Some(a) = s.admin {
        println!("  admin (metrics, health):      http://{a}");
    }
    if let Some(ca) = &s.ca_path {
        println!("  CA certificate devices must trust: {}", ca.display());
    }
    for (name, scope, cs) in &s.instances {
        println!("  instance '{name}': ID scope {scope}");
        match cs {
            Some(cs) if to_terminal => println!("    connection string: {cs}"),
            Some(_) => println!(
                "    connection string: in {} (not printed: stdout is not a terminal)",
                s.run_json.display()
            ),
            None => {}
        }
    }
}

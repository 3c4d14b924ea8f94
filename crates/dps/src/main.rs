//! The `dps` binary: `dps serve` runs the server; every other command is the operator CLI
//! (`dps-cli`), which talks to a running server through its service and admin APIs.

use clap::Parser;
use dps_cli::{Cli, Command, LogFormat};
use dps_server::config::{Config, ListenOverrides, LogOverride, Overrides};
use std::process::ExitCode;

/// mimalloc: the registration path allocates many small, short-lived buffers on several
/// threads (JSON, HTTP, TLS records); glibc's malloc spent ~15 % of the server's CPU on them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let open_files = raise_open_files_limit();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(a) => {
            let overrides = Overrides {
                data_dir: a.data_dir,
                store: a.store,
                location: a.location,
                listen: ListenOverrides {
                    https: a.https,
                    mqtt: a.mqtt,
                    amqp: a.amqp,
                    admin: a.admin,
                },
                log: matches!(cli.log_format, LogFormat::Json).then(|| LogOverride {
                    format: "json".into(),
                }),
            };
            serve(a.config, overrides, open_files)
        }
        _ => dps_cli::run(cli),
    }
}

/// Every connection holds a file descriptor: raise the soft open-file limit to the hard one
/// (as a server needs; `dps bench` too, whose storm holds one per simulated device). Returns
/// the soft limit before and after (`None`: unlimited), or the error.
fn raise_open_files_limit() -> Result<(Option<u64>, Option<u64>), std::io::Error> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let before = getrlimit(Resource::Nofile);
    if before.current != before.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: before.maximum,
                maximum: before.maximum,
            },
        )?;
    }
    Ok((before.current, getrlimit(Resource::Nofile).current))
}

fn serve(
    config: Option<std::path::PathBuf>,
    overrides: Overrides,
    open_files: Result<(Option<u64>, Option<u64>), std::io::Error>,
) -> ExitCode {
    let cfg = match Config::load(config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = init_logging(&cfg) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let limit = |l: Option<u64>| l.map_or("unlimited".to_string(), |n| n.to_string());
    let files_now = open_files.as_ref().ok().and_then(|(_, now)| *now);
    match open_files {
        Ok((before, after)) if before != after => {
            tracing::info!(from = %limit(before), to = %limit(after), "raised the open-file limit")
        }
        Ok((_, now)) => tracing::info!(limit = %limit(now), "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    // The connection caps only act if they are reached before the open-file limit is.
    if let Some(files) = files_now {
        let caps = (cfg.limits.max_https_connections as u64)
            .saturating_add(cfg.limits.max_mqtt_connections as u64);
        if caps > files {
            tracing::warn!(
                open_file_limit = files,
                max_https_connections = cfg.limits.max_https_connections,
                max_mqtt_connections = cfg.limits.max_mqtt_connections,
                "the connection limits add up to more than the open-file limit: at that limit \
                 new connections wait in the accept queue instead of being refused; raise the \
                 hard limit (LimitNOFILE=) or lower the connection limits"
            );
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let server = match dps_server::server::start(cfg).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        dps_server::server::print_banner(&server);
        shutdown_signal().await;
        tracing::info!("shutting down");
        let engine = server.app.engine.clone();
        drop(server);
        // A clean stop removes this node's heartbeat row: other nodes sharing the store end
        // what it left in flight at once instead of after the lease.
        if let Err(e) = engine.leave().await {
            tracing::warn!(error = %e, "could not remove this node's heartbeat");
        }
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_logging(cfg: &Config) -> Result<(), String> {
    let filter = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(f) => f,
        Err(_) => tracing_subscriber::EnvFilter::try_new(&cfg.log.level).map_err(|e| {
            format!(
                "invalid configuration: log.level = '{}' is not a filter directive: {e}",
                cfg.log.level
            )
        })?,
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        b.json().init();
    } else {
        b.init();
    }
    Ok(())
}

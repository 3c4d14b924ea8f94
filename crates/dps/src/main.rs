//! The `dps` binary: `dps serve` runs the server; every other command is the operator CLI.

use clap::Parser;
use dps::config::{Config, ListenOverrides, LogOverride, Overrides};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "dps",
    version,
    about = "dps: an open, Azure-compatible Device Provisioning Service"
)]
enum Cmd {
    /// Run the server.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Config file (TOML).
    #[arg(long, env = "DPS_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// Store URL.
    #[arg(long)]
    store: Option<String>,
    /// HTTPS listen address.
    #[arg(long)]
    https: Option<String>,
    /// MQTT listen address.
    #[arg(long)]
    mqtt: Option<String>,
    /// Admin listen address.
    #[arg(long)]
    admin: Option<String>,
    /// This node's location.
    #[arg(long)]
    location: Option<String>,
    /// human or json.
    #[arg(long)]
    log_format: Option<String>,
}

fn main() -> ExitCode {
    let Cmd::Serve(a) = Cmd::parse();
    let overrides = Overrides {
        data_dir: a.data_dir,
        store: a.store,
        location: a.location,
        listen: ListenOverrides {
            https: a.https,
            mqtt: a.mqtt,
            admin: a.admin,
        },
        log: a.log_format.map(|format| LogOverride { format }),
    };
    serve(a.config, overrides)
}

fn serve(config: Option<std::path::PathBuf>, overrides: Overrides) -> ExitCode {
    let cfg = match Config::load(config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&cfg);
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
        let server = match dps::server::start(cfg).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        dps::server::print_banner(&server);
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        drop(server);
        ExitCode::SUCCESS
    })
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

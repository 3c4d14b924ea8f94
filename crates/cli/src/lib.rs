//! dps-cli: the `dps` command line (everything except `dps serve`, which the server binary
//! runs itself).
//!
//! Commands are shaped like `az iot dps`: instances, linked hubs, enrollments, enrollment
//! groups, registrations, hub devices, audit, CA certificates, a device registration tool and
//! a fleet load generator (`dps bench`). Output is an aligned table by default and the API's
//! JSON with `--output json`.
//!
//! Here are the command line ([`Cli`], [`Command`]) and [`run`]; each noun's arguments and code
//! are in a module of its own under `commands/` (enrollments and enrollment groups share theirs
//! in `commands/enrollment_common.rs`), the load generator is [`bench`](mod@bench), the HTTP client
//! [`service`], and the printing [`table`] and `output`.
//!
//! ```no_run
//! use clap::Parser;
//! let cli = dps_cli::Cli::parse();
//! std::process::exit(match cli.command {
//!     dps_cli::Command::Serve(_) => unimplemented!("the server binary handles serve"),
//!     _ => if dps_cli::run(cli) == std::process::ExitCode::SUCCESS { 0 } else { 1 },
//! });
//! ```

use clap::{Args, Parser, Subcommand, ValueEnum};
// The noun help texts of `enrollment` and `enrollment-group` (`kind_help` below).
use commands::enrollment_common::ApplyKindHelp;
use std::path::PathBuf;
use std::process::ExitCode;

pub mod bench;
mod commands;
mod output;
pub mod service;
pub mod table;

pub use commands::access_policy::AccessPolicyCommand;
pub use commands::audit::AuditCommand;
pub use commands::certificate::CertificateCommand;
pub use commands::device::{DeviceCommand, TransportArg};
pub use commands::enrollment::{DeviceIdArg, EnrollmentCommand};
pub use commands::enrollment_common::{
    AttestationArg, EnrollmentFields, KindCommand, ListFilters, ReprovisionArg, StatusArg,
};
pub use commands::enrollment_group::{GroupCommand, RootCaArg};
pub use commands::events::EventsCommand;
pub use commands::fault::FaultCommand;
pub use commands::hub::{HubCleanupCommand, HubCommand, HubDeviceCommand};
pub use commands::instance::InstanceCommand;
pub use commands::linked_hub::LinkedHubCommand;
pub use commands::registration::RegistrationCommand;
pub use service::{ApiError, ConnectionString};

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    /// Aligned columns, for people.
    #[default]
    Table,
    /// The API's JSON, pretty-printed, for scripts.
    Json,
}

/// Log format (used by `serve`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// The dps command line.
#[derive(Parser, Debug)]
#[command(
    name = "dps",
    version,
    about = "dps: an open, Azure-compatible Device Provisioning Service",
    propagate_version = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Service connection string (HostName=…;SharedAccessKeyName=…;SharedAccessKey=…).
    #[arg(
        long,
        global = true,
        env = "DPS_CONNECTION_STRING",
        hide_env_values = true
    )]
    pub connection_string: Option<String>,
    /// Base URL of the service (default https://{HostName} of the connection string).
    #[arg(long, global = true, env = "DPS_URL")]
    pub url: Option<String>,
    /// Extra CA certificate(s) to trust, PEM (default: ./dps-data/ca.pem if it exists, plus the
    /// system roots).
    #[arg(long, global = true, env = "DPS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Provisioning instances (admin API).
    #[command(subcommand)]
    Instance(InstanceCommand),
    /// Linked IoT hubs of an instance (admin API).
    #[command(subcommand)]
    LinkedHub(LinkedHubCommand),
    /// Shared access policies of an instance (admin API).
    #[command(subcommand)]
    AccessPolicy(AccessPolicyCommand),
    /// Individual enrollments.
    #[command(subcommand, kind_help = &commands::enrollment::HELP)]
    Enrollment(EnrollmentCommand),
    /// Enrollment groups.
    #[command(subcommand, kind_help = &commands::enrollment_group::HELP)]
    EnrollmentGroup(GroupCommand),
    /// Device registration records.
    #[command(subcommand)]
    Registration(RegistrationCommand),
    /// Devices on linked hubs, and old identities queued for removal from them (admin API).
    #[command(subcommand)]
    Hub(HubCommand),
    /// The audit log (admin API).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Lifecycle events: `dps events tail` follows them live (admin API).
    #[command(subcommand)]
    Events(EventsCommand),
    /// Act as a device.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Fleet load generator.
    Bench(bench::BenchArgs),
    /// Load on the endpoints a broker-auth hub's broker calls (checks/s, latency).
    BenchBrokerAuth(bench::broker_auth::BrokerAuthBenchArgs),
    /// CA certificates of an instance (admin API).
    #[command(subcommand)]
    Certificate(CertificateCommand),
    /// Fault injection rules of an instance (admin API; test instances only).
    #[command(subcommand)]
    Fault(FaultCommand),
    /// Write the man pages (`dps.1` and one per subcommand) into a folder.
    #[command(hide = true)]
    Man(ManArgs),
}

/// `dps man` flags.
#[derive(Args, Debug, Clone)]
pub struct ManArgs {
    /// Folder to write the pages into (created if missing).
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

/// Writes the man pages of the whole command line (`dps.1`, `dps-enrollment.1`,
/// `dps-enrollment-create.1`, ...) into `out`.
pub fn write_man_pages(out: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(out)?;
    clap_mangen::generate_to(Cli::command(), out)
}

/// `dps serve` flags (the server maps them onto its configuration).
#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// Configuration file (TOML).
    #[arg(long, env = "DPS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Store URL (sqlite path or postgres URL).
    #[arg(long)]
    pub store: Option<String>,
    /// HTTPS listen address.
    #[arg(long)]
    pub https: Option<String>,
    /// MQTT listen address.
    #[arg(long)]
    pub mqtt: Option<String>,
    /// AMQP listen address.
    #[arg(long)]
    pub amqp: Option<String>,
    /// Admin (metrics/health) listen address.
    #[arg(long)]
    pub admin: Option<String>,
    /// This node's location (for geoLatency).
    #[arg(long)]
    pub location: Option<String>,
}

/// Shared global settings passed to the command handlers.
#[derive(Debug, Clone)]
pub struct Globals {
    /// Output format.
    pub output: OutputFormat,
    /// Connection string (unparsed).
    pub connection_string: Option<String>,
    /// Base URL override.
    pub url: Option<String>,
    /// Extra CA file.
    pub ca_file: Option<PathBuf>,
}

impl Globals {
    /// The service client, or an error telling how to give a connection string.
    pub fn service(&self) -> anyhow::Result<service::Service> {
        let cs = self.connection_string.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "no connection string: pass --connection-string or set DPS_CONNECTION_STRING \
                 (dps serve prints one at start-up)"
            )
        })?;
        let conn = ConnectionString::parse(cs)?;
        service::Service::new(conn, self.url.as_deref(), self.ca_file.as_deref())
    }
}

/// Run a command (every command except `serve`). Errors are printed to stderr; the exit code
/// is non-zero on failure.
pub fn run(cli: Cli) -> ExitCode {
    let globals = Globals {
        output: cli.output,
        connection_string: cli.connection_string,
        url: cli.url,
        ca_file: cli.ca_file,
    };
    // The load generator runs on every core (or `--threads`); every other command on one thread.
    let rt = match &cli.command {
        Command::Bench(a) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(a.threads.unwrap_or_else(bench::default_threads))
            .enable_all()
            .build(),
        Command::BenchBrokerAuth(a) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(a.threads.unwrap_or_else(bench::default_threads))
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(_) => Err(anyhow::anyhow!(
                "'serve' is run by the dps server binary, not by dps-cli"
            )),
            Command::Device(DeviceCommand::Register(a)) => {
                commands::device::register(&globals, a).await
            }
            Command::Bench(a) => bench::run(&globals, a).await,
            Command::BenchBrokerAuth(a) => bench::broker_auth::run(&globals, a).await,
            Command::Man(a) => write_man_pages(&a.out)
                .map(|()| ExitCode::SUCCESS)
                .map_err(|e| {
                    anyhow::anyhow!("cannot write the man pages to {}: {e}", a.out.display())
                }),
            other => commands::dispatch(&globals, other).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(api) = e.downcast_ref::<ApiError>() {
                eprintln!("error: {api}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_valid() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("dps").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn parses_commands() {
        let c = parse(&[
            "enrollment",
            "create",
            "dev1",
            "--attestation",
            "symmetricKey",
            "--iot-hubs",
            "h1,h2",
            "--edge",
            "--reprovision-policy",
            "reprovisionandresetdata",
            "--output",
            "json",
        ]);
        assert_eq!(c.output, OutputFormat::Json);
        match c.command {
            Command::Enrollment(EnrollmentCommand::Create { id, fields, .. }) => {
                assert_eq!(id, "dev1");
                assert_eq!(fields.iot_hubs, Some(vec!["h1".into(), "h2".into()]));
                assert_eq!(fields.edge, Some(true));
                assert_eq!(fields.attestation, Some(AttestationArg::SymmetricKey));
            }
            other => panic!("{other:?}"),
        }
        let c = parse(&["serve", "--config", "x.toml", "--https", "127.0.0.1:0"]);
        assert!(matches!(
            c.command,
            Command::Serve(ServeArgs { https: Some(_), .. })
        ));
        let c = parse(&["hub", "device", "list", "--hub", "h1"]);
        assert!(matches!(
            c.command,
            Command::Hub(HubCommand::Device(HubDeviceCommand::List { .. }))
        ));
        let c = parse(&["hub", "cleanup", "list", "--top", "5"]);
        assert!(matches!(
            c.command,
            Command::Hub(HubCommand::Cleanup(HubCleanupCommand::List {
                top: Some(5),
                ..
            }))
        ));
        let c = parse(&[
            "device",
            "register",
            "--id-scope",
            "0ne1",
            "--registration-id",
            "d",
            "--key",
            "a2V5",
            "--transport",
            "mqtt",
        ]);
        assert!(matches!(c.command, Command::Device(_)));
        let c = parse(&[
            "bench",
            "--devices",
            "20",
            "--concurrency",
            "5",
            "--create-group",
        ]);
        assert!(matches!(c.command, Command::Bench(_)));
        match parse(&[
            "bench",
            "--create-group",
            "--threads",
            "2",
            "--baseline-handshakes",
            "10",
        ])
        .command
        {
            Command::Bench(b) => {
                assert_eq!(b.threads, Some(2));
                assert_eq!(b.baseline_handshakes, Some(10));
                assert!(!b.no_handshake_baseline);
            }
            _ => panic!("not bench"),
        }
        assert!(Cli::try_parse_from(["dps", "bench", "--threads", "0"]).is_err());
        assert!(Cli::try_parse_from([
            "dps",
            "bench",
            "--no-handshake-baseline",
            "--baseline-handshakes",
            "5"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "dps",
            "enrollment",
            "create",
            "x",
            "--webhook-url",
            "https://h"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "dps",
            "device",
            "register",
            "--id-scope",
            "s",
            "--registration-id",
            "d",
            "--key",
            "k",
            "--group-key",
            "g"
        ])
        .is_err());
    }
}

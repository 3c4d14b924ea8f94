//! dps-cli: the `dps` command line (everything except `dps serve`, which the server binary
//! runs itself).
//!
//! Commands are shaped like `az iot dps`: instances, linked hubs, enrollments, enrollment
//! groups, registrations, hub devices, audit, CA certificates, a device registration tool and
//! a fleet load generator (`dps bench`). Output is an aligned table by default and the API's
//! JSON with `--output json`.
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
use dps_core::instance::HubKind;
use std::path::PathBuf;
use std::process::ExitCode;

pub mod bench;
mod commands;
mod device;
pub mod service;
pub mod table;

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
    #[command(subcommand)]
    Enrollment(EnrollmentCommand),
    /// Enrollment groups.
    #[command(subcommand)]
    EnrollmentGroup(GroupCommand),
    /// Device registration records.
    #[command(subcommand)]
    Registration(RegistrationCommand),
    /// Devices on linked hubs (admin API).
    #[command(subcommand)]
    Hub(HubCommand),
    /// The audit log (admin API).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Act as a device.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Fleet load generator.
    Bench(bench::BenchArgs),
    /// CA certificates of an instance (admin API).
    #[command(subcommand)]
    Certificate(CertificateCommand),
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
    /// Admin (metrics/health) listen address.
    #[arg(long)]
    pub admin: Option<String>,
    /// This node's location (for geoLatency).
    #[arg(long)]
    pub location: Option<String>,
}

/// `dps instance …`
#[derive(Subcommand, Debug)]
pub enum InstanceCommand {
    /// List instances.
    List,
    /// Show one instance.
    Show {
        /// Instance name.
        name: String,
    },
    /// Create (or replace) an instance; keys are generated and shown once.
    Create {
        /// Instance name.
        name: String,
        /// ID scope (generated when omitted).
        #[arg(long)]
        id_scope: Option<String>,
        /// Service host name(s) (repeat or comma-separate).
        #[arg(long = "hostname", value_delimiter = ',')]
        hostnames: Vec<String>,
        /// Default allocation policy.
        #[arg(long)]
        allocation_policy: Option<String>,
    },
    /// Delete an instance and everything in it.
    Delete {
        /// Instance name.
        name: String,
    },
}

/// `dps linked-hub …`
#[derive(Subcommand, Debug)]
pub enum LinkedHubCommand {
    /// List linked hubs.
    List {
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Link a hub (or update it).
    Add {
        /// Hub host name.
        host: String,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
        /// Adapter kind: registry, mosquitto, azure-iothub, webhook.
        #[arg(long, default_value_t = HubKind::Registry)]
        kind: HubKind,
        /// Allocation weight (1..1000).
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Region, for geoLatency.
        #[arg(long)]
        location: Option<String>,
        /// Exclude the hub from allocation.
        #[arg(long)]
        no_apply_allocation_policy: bool,
        /// The hub's connection string (for azure-iothub, mosquitto, webhook).
        #[arg(long = "connection-string-hub")]
        connection_string_hub: Option<String>,
        /// At most this many devices.
        #[arg(long)]
        max_devices: Option<u64>,
        /// At most this many new assignments per second.
        #[arg(long)]
        max_registrations_per_second: Option<u32>,
    },
    /// Unlink a hub.
    Remove {
        /// Hub host name.
        host: String,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
}

/// `dps access-policy …`
#[derive(Subcommand, Debug)]
pub enum AccessPolicyCommand {
    /// List policies (keys hidden).
    List {
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Create or change a policy; new keys are generated (and printed once) unless given.
    Add {
        /// Policy name.
        name: String,
        /// Rights: ServiceConfig, EnrollmentRead, EnrollmentWrite, RegistrationStatusRead, RegistrationStatusWrite.
        #[arg(long, value_delimiter = ',', required = true)]
        rights: Vec<String>,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Remove a policy.
    Remove {
        /// Policy name.
        name: String,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
}

/// Attestation kinds the CLI can create.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttestationArg {
    /// Symmetric keys.
    #[value(name = "symmetricKey", alias = "symmetrickey")]
    SymmetricKey,
    /// X.509 certificates.
    #[value(name = "x509")]
    X509,
    /// TPM (listing filter only).
    #[value(name = "tpm")]
    Tpm,
}

impl AttestationArg {
    fn as_str(self) -> &'static str {
        match self {
            AttestationArg::SymmetricKey => "symmetricKey",
            AttestationArg::X509 => "x509",
            AttestationArg::Tpm => "tpm",
        }
    }
}

/// Enrollment status filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    /// Enabled.
    Enabled,
    /// Disabled.
    Disabled,
}

/// Reprovisioning policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReprovisionArg {
    /// Re-run allocation and migrate the twin.
    #[value(name = "reprovisionandmigratedata")]
    ReprovisionAndMigrateData,
    /// Re-run allocation and reset the twin.
    #[value(name = "reprovisionandresetdata")]
    ReprovisionAndResetData,
    /// Keep the current hub.
    #[value(name = "never")]
    Never,
}

/// Settings shared by enrollments and groups (create and update).
#[derive(Args, Debug, Clone, Default)]
pub struct EnrollmentFields {
    /// Attestation (default symmetricKey, or x509 when a certificate is given).
    #[arg(long, value_enum)]
    pub attestation: Option<AttestationArg>,
    /// Primary symmetric key (generated when omitted).
    #[arg(long)]
    pub primary_key: Option<String>,
    /// Secondary symmetric key (generated when omitted).
    #[arg(long)]
    pub secondary_key: Option<String>,
    /// Certificate, PEM (device certificate for an enrollment, signing certificate for a group).
    #[arg(long)]
    pub certificate_path: Option<PathBuf>,
    /// Secondary certificate, PEM.
    #[arg(long)]
    pub secondary_certificate_path: Option<PathBuf>,
    /// Linked hubs this enrollment may use (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub iot_hubs: Option<Vec<String>>,
    /// Allocation policy: hashed, geoLatency, static, custom.
    #[arg(long)]
    pub allocation_policy: Option<String>,
    /// Initial twin tags, JSON.
    #[arg(long)]
    pub initial_twin_tags: Option<String>,
    /// Initial twin desired properties, JSON.
    #[arg(long)]
    pub initial_twin_properties: Option<String>,
    /// IoT Edge device(s) (`--edge` or `--edge false`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub edge: Option<bool>,
    /// Create or set the enrollment disabled.
    #[arg(long, conflicts_with = "enabled")]
    pub disabled: bool,
    /// Set the enrollment enabled (update).
    #[arg(long)]
    pub enabled: bool,
    /// Reprovisioning policy.
    #[arg(long, value_enum)]
    pub reprovision_policy: Option<ReprovisionArg>,
    /// Custom allocation webhook URL.
    #[arg(long, requires = "api_version")]
    pub webhook_url: Option<String>,
    /// Custom allocation webhook API version.
    #[arg(long, requires = "webhook_url")]
    pub api_version: Option<String>,
}

/// List filters.
#[derive(Args, Debug, Clone, Default)]
pub struct ListFilters {
    /// Only enabled or disabled.
    #[arg(long, value_enum)]
    pub status: Option<StatusArg>,
    /// Only this attestation.
    #[arg(long, value_enum)]
    pub attestation: Option<AttestationArg>,
    /// Only ids starting with this.
    #[arg(long)]
    pub prefix: Option<String>,
    /// At most this many.
    #[arg(long)]
    pub top: Option<usize>,
}

/// `dps enrollment …`
#[derive(Subcommand, Debug)]
pub enum EnrollmentCommand {
    /// List individual enrollments.
    List(ListFilters),
    /// Show one enrollment.
    Show {
        /// Registration id.
        id: String,
        /// Also show the symmetric keys.
        #[arg(long)]
        show_keys: bool,
    },
    /// Create an enrollment (fails if it exists).
    Create {
        /// Registration id.
        id: String,
        /// Device id on the hub (default: the registration id).
        #[arg(long)]
        device_id: Option<String>,
        #[command(flatten)]
        fields: EnrollmentFields,
    },
    /// Update an enrollment (read, change, write with If-Match).
    Update {
        /// Registration id.
        id: String,
        /// Device id on the hub.
        #[arg(long)]
        device_id: Option<String>,
        #[command(flatten)]
        fields: EnrollmentFields,
    },
    /// Delete an enrollment.
    Delete {
        /// Registration id.
        id: String,
        /// Only if the etag still matches.
        #[arg(long)]
        etag: Option<String>,
    },
}

/// `dps enrollment-group …`
#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// List enrollment groups.
    List(ListFilters),
    /// Show one group.
    Show {
        /// Group id.
        id: String,
        /// Also show the symmetric keys.
        #[arg(long)]
        show_keys: bool,
    },
    /// Create a group (fails if it exists).
    Create {
        /// Group id.
        id: String,
        /// Name of a verified CA certificate of the instance (x509 caReferences).
        #[arg(long)]
        root_ca_name: Option<String>,
        #[command(flatten)]
        fields: EnrollmentFields,
    },
    /// Update a group (read, change, write with If-Match).
    Update {
        /// Group id.
        id: String,
        /// Name of a verified CA certificate of the instance.
        #[arg(long)]
        root_ca_name: Option<String>,
        #[command(flatten)]
        fields: EnrollmentFields,
    },
    /// Delete a group.
    Delete {
        /// Group id.
        id: String,
        /// Only if the etag still matches.
        #[arg(long)]
        etag: Option<String>,
    },
}

/// `dps registration …`
#[derive(Subcommand, Debug)]
pub enum RegistrationCommand {
    /// List the registrations of an enrollment group.
    List {
        /// Group id.
        #[arg(long)]
        group: String,
        /// Only this registration status (e.g. assigned, failed).
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long)]
        top: Option<usize>,
    },
    /// Show a registration.
    Show {
        /// Registration id.
        id: String,
    },
    /// Delete a registration record.
    Delete {
        /// Registration id.
        id: String,
        /// Only if the etag still matches.
        #[arg(long)]
        etag: Option<String>,
    },
}

/// `dps hub …`
#[derive(Subcommand, Debug)]
pub enum HubCommand {
    /// Devices on a linked hub.
    #[command(subcommand)]
    Device(HubDeviceCommand),
}

/// `dps hub device …`
#[derive(Subcommand, Debug)]
pub enum HubDeviceCommand {
    /// List devices on a hub.
    List {
        /// Hub host name.
        #[arg(long)]
        hub: String,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
        /// At most this many.
        #[arg(long)]
        top: Option<usize>,
    },
    /// Show one device on a hub.
    Show {
        /// Device id.
        device: String,
        /// Hub host name.
        #[arg(long)]
        hub: String,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
}

/// `dps audit …`
#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// List audit entries, oldest first.
    List {
        /// Entries at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only entries about this enrollment / registration / group id.
        #[arg(long)]
        enrollment: Option<String>,
        /// Only actions starting with this (e.g. `enrollment.`).
        #[arg(long)]
        action: Option<String>,
        /// Only this instance.
        #[arg(long)]
        instance: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// Device transports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum TransportArg {
    /// HTTPS.
    #[default]
    Https,
    /// MQTT over TLS.
    Mqtt,
}

impl From<TransportArg> for dps_device::Transport {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Https => dps_device::Transport::Https,
            TransportArg::Mqtt => dps_device::Transport::Mqtt,
        }
    }
}

/// `dps device …`
#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Register a device and print where it landed (exit 0 only when assigned).
    Register(device::RegisterArgs),
}

/// `dps certificate …`
#[derive(Subcommand, Debug)]
pub enum CertificateCommand {
    /// List CA certificates.
    List {
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Show one CA certificate.
    Show {
        /// Certificate name.
        name: String,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Upload a CA certificate.
    Create {
        /// Certificate name.
        name: String,
        /// PEM file.
        #[arg(long)]
        path: PathBuf,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Delete a CA certificate.
    Delete {
        /// Certificate name.
        name: String,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Get a proof-of-possession verification code.
    GenerateVerificationCode {
        /// Certificate name.
        name: String,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Revoke device certificates: add a SHA-1/SHA-256 thumbprint or a serial number to the
    /// instance deny list (checked on every X.509 registration).
    Deny {
        /// Thumbprint or serial number (hex).
        value: String,
        /// What the value is.
        #[arg(long, value_parser = ["thumbprint", "serial"], default_value = "thumbprint")]
        kind: String,
        /// Why (kept in the deny list and the audit log).
        #[arg(long)]
        reason: Option<String>,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Remove an entry from the deny list.
    Undeny {
        /// Thumbprint or serial number (hex), as added.
        value: String,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// List the deny list.
    DenyList {
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Prove possession with a certificate whose CN is the code, signed by the CA.
    Verify {
        /// Certificate name.
        name: String,
        /// PEM file of the verification certificate.
        #[arg(long)]
        path: PathBuf,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
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
            Command::Device(DeviceCommand::Register(a)) => device::register(&globals, a).await,
            Command::Bench(a) => bench::run(&globals, a).await,
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

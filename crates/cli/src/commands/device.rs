//! `dps device …`: act as a device (`dps device register`); the device transports, trust and
//! default endpoint, which `dps bench` shares.

use crate::service::{extra_ca_file, ConnectionString};
use crate::{Globals, OutputFormat};
use anyhow::{Context, Result};
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use dps_device::{Auth, Error as DevError, ProvisioningClient, Trust};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Device transports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum TransportArg {
    /// HTTPS.
    #[default]
    Https,
    /// MQTT over TLS.
    Mqtt,
    /// AMQP 1.0 over TLS.
    Amqp,
}

impl From<TransportArg> for dps_device::Transport {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Https => dps_device::Transport::Https,
            TransportArg::Mqtt => dps_device::Transport::Mqtt,
            TransportArg::Amqp => dps_device::Transport::Amqp,
        }
    }
}

/// `dps device …`
#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Register a device and print where it landed (exit 0 only when assigned).
    Register(RegisterArgs),
}

/// `dps device register` arguments.
#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("credential").required(true).args(["key", "group_key", "cert"])))]
pub struct RegisterArgs {
    /// The instance's ID scope.
    #[arg(long)]
    pub id_scope: String,
    /// The device's registration id.
    #[arg(long)]
    pub registration_id: String,
    /// The individual enrollment's symmetric key.
    #[arg(long)]
    pub key: Option<String>,
    /// The enrollment group's symmetric key (the device key is derived from it).
    #[arg(long)]
    pub group_key: Option<String>,
    /// Device certificate chain, PEM (leaf first; CN = registration id).
    #[arg(long, requires = "key_file")]
    pub cert: Option<PathBuf>,
    /// The device certificate's private key, PEM.
    #[arg(long, requires = "cert")]
    pub key_file: Option<PathBuf>,
    /// Device endpoint host[:port] (default: the --url / connection string host).
    #[arg(long)]
    pub global_endpoint: Option<String>,
    /// Transport.
    #[arg(long, value_enum, default_value_t = TransportArg::Https)]
    pub transport: TransportArg,
    /// Custom payload, JSON.
    #[arg(long)]
    pub payload: Option<String>,
    /// Device API version.
    #[arg(long, default_value = dps_device::wire::DEFAULT_API_VERSION)]
    pub api_version: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

/// The device trust: system roots plus `--ca-file` (or `./dps-data/ca.pem`).
pub(crate) fn device_trust(g: &Globals) -> Result<Trust> {
    Ok(match extra_ca_file(g.ca_file.as_deref()) {
        Some(p) => Trust::SystemAndPem(
            std::fs::read(&p).with_context(|| format!("cannot read CA file {}", p.display()))?,
        ),
        None => Trust::System,
    })
}

/// The default device endpoint: the host (and, for HTTPS, port) of `--url`, else the connection
/// string's HostName, else Azure's global endpoint.
pub(crate) fn default_endpoint(g: &Globals, transport: TransportArg) -> String {
    if let Some(u) = &g.url {
        let rest = u.split_once("://").map(|(_, r)| r).unwrap_or(u);
        let hostport = rest.split('/').next().unwrap_or(rest);
        return match transport {
            TransportArg::Https => hostport.to_string(),
            TransportArg::Mqtt | TransportArg::Amqp => dps_device::split_host_port(hostport)
                .map(|(h, _)| h)
                .unwrap_or_else(|_| hostport.to_string()),
        };
    }
    if let Some(cs) = g
        .connection_string
        .as_deref()
        .and_then(|c| ConnectionString::parse(c).ok())
    {
        return cs.host_name;
    }
    "global.azure-devices-provisioning.net".to_string()
}

pub(crate) async fn register(g: &Globals, a: RegisterArgs) -> Result<ExitCode> {
    let auth = if let Some(k) = &a.key {
        Auth::SymmetricKey(k.clone())
    } else if let Some(k) = &a.group_key {
        Auth::GroupKey(k.clone())
    } else {
        let cert = a.cert.as_ref().expect("clap requires a credential");
        let key = a.key_file.as_ref().expect("clap requires --key-file");
        Auth::X509 {
            cert_chain_pem: std::fs::read(cert)
                .with_context(|| format!("cannot read {}", cert.display()))?,
            key_pem: std::fs::read(key)
                .with_context(|| format!("cannot read {}", key.display()))?,
        }
    };
    let endpoint = a
        .global_endpoint
        .clone()
        .unwrap_or_else(|| default_endpoint(g, a.transport));
    let mut b = ProvisioningClient::builder()
        .global_endpoint(endpoint.as_str())
        .id_scope(a.id_scope.as_str())
        .registration_id(a.registration_id.as_str())
        .auth(auth)
        .transport(a.transport.into())
        .trust(device_trust(g)?)
        .api_version(a.api_version.as_str())
        .timeout(Duration::from_secs(a.timeout));
    if let Some(p) = &a.payload {
        let v: Value =
            serde_json::from_str(p).with_context(|| format!("--payload is not valid JSON: {p}"))?;
        b = b.payload(v);
    }
    let client = b.build()?;
    match client.register().await {
        Ok(r) => {
            let out = json!({
                "status": "assigned",
                "operationId": r.operation_id,
                "registrationState": r.state,
                "elapsedMs": r.timing.elapsed.as_millis() as u64,
            });
            match g.output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&out)?),
                OutputFormat::Table => {
                    let s = &r.state;
                    let mut rows = vec![
                        vec!["status".to_string(), "assigned".to_string()],
                        vec![
                            "assigned hub".into(),
                            s.assigned_hub.clone().unwrap_or_else(|| "-".into()),
                        ],
                        vec![
                            "device id".into(),
                            s.device_id.clone().unwrap_or_else(|| "-".into()),
                        ],
                        vec![
                            "substatus".into(),
                            s.substatus
                                .map(|x| crate::table::text(&json!(x)))
                                .unwrap_or_else(|| "-".into()),
                        ],
                    ];
                    if let Some(p) = &s.payload {
                        rows.push(vec!["payload".into(), p.to_string()]);
                    }
                    rows.push(vec![
                        "elapsed".into(),
                        format!("{} ms", r.timing.elapsed.as_millis()),
                    ]);
                    print!("{}", crate::table::render(&["FIELD", "VALUE"], &rows));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let (status, code, reason) = describe_failure(&e);
            match g.output {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "status": status, "errorCode": code, "reason": reason,
                        "error": e.reason(),
                    }))?
                ),
                OutputFormat::Table => {
                    let rows = vec![
                        vec!["status".to_string(), status.to_string()],
                        vec![
                            "error code".into(),
                            code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                        ],
                        vec!["reason".into(), reason],
                    ];
                    print!("{}", crate::table::render(&["FIELD", "VALUE"], &rows));
                }
            }
            eprintln!("error: the device was not assigned: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn describe_failure(e: &DevError) -> (&'static str, Option<u32>, String) {
    match e {
        DevError::Failed {
            error_code,
            message,
            ..
        } => (
            "failed",
            *error_code,
            message.clone().unwrap_or_else(|| "no reason given".into()),
        ),
        DevError::Disabled { .. } => (
            "disabled",
            None,
            "the enrollment (or its group) is disabled".into(),
        ),
        DevError::Unauthorized {
            error_code,
            message,
            ..
        } => (
            "unauthorized",
            *error_code,
            format!(
                "{message} (check the key or certificate, the ID scope and the registration id)"
            ),
        ),
        DevError::NotFound {
            error_code,
            message,
            ..
        } => ("not found", *error_code, message.clone()),
        DevError::Service {
            error_code,
            message,
            ..
        } => ("error", *error_code, message.clone()),
        other => ("error", None, other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_defaults() {
        let g = Globals {
            output: OutputFormat::Table,
            connection_string: Some(
                "HostName=dps.local;SharedAccessKeyName=p;SharedAccessKey=a2V5a2V5".into(),
            ),
            url: None,
            ca_file: None,
        };
        assert_eq!(default_endpoint(&g, TransportArg::Https), "dps.local");
        let g = Globals {
            url: Some("https://127.0.0.1:8443/".into()),
            ..g
        };
        assert_eq!(default_endpoint(&g, TransportArg::Https), "127.0.0.1:8443");
        assert_eq!(default_endpoint(&g, TransportArg::Mqtt), "127.0.0.1");
    }
}

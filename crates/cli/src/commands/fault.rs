//! `dps fault …`: fault injection rules of an instance (admin API; the instance must allow
//! fault injection in the server's configuration file). See `docs/testing-with-dps.md`.

use super::instance::resolve_instance;
use crate::output::{done, emit, emit_list};
use crate::service::{enc, Service};
use crate::Globals;
use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::{json, Map, Value};

/// What a rule does.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum FaultActionArg {
    /// 429 with a chosen retry-after, on the register request itself.
    Throttle,
    /// Stay `assigning` for some polls (--polls) and/or milliseconds (--delay-ms).
    Delay,
    /// Answer an error: --error-code (its status is the first three digits) and --message.
    Fail,
    /// The linked hub (--hub, or any) answers as unreachable: the registration ends retryable.
    HubDown,
    /// Close the connection at --stage: connect (MQTT CONNECT, AMQP ATTACH), subscribe (MQTT),
    /// register (the request arrives; not processed) or response (processed; the answer is
    /// lost, HTTPS gets part of it).
    Drop,
    /// Hold the TLS handshake --delay-ms milliseconds (matches transport and instance only).
    SlowTls,
}

impl FaultActionArg {
    fn wire(self) -> &'static str {
        match self {
            FaultActionArg::Throttle => "throttle",
            FaultActionArg::Delay => "delay",
            FaultActionArg::Fail => "fail",
            FaultActionArg::HubDown => "hubDown",
            FaultActionArg::Drop => "drop",
            FaultActionArg::SlowTls => "slowTls",
        }
    }
}

/// `dps fault …`
// Parsed once per process: the size of `Add` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum FaultCommand {
    /// List the rules in force on the node that answers (with their injection counts).
    List {
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Add a rule; it lives on the node that answers until removed, spent, expired or restarted.
    Add {
        /// What it does.
        #[arg(value_enum)]
        action: FaultActionArg,
        /// Rule id (default: given by dps).
        #[arg(long)]
        id: Option<String>,
        /// Registration ids it matches: a glob with * and ?, case-insensitive (default: all).
        #[arg(long)]
        registration_id: Option<String>,
        /// Only devices of this enrollment group.
        #[arg(long)]
        group: Option<String>,
        /// Only this transport: https, mqtt or amqp.
        #[arg(long)]
        transport: Option<String>,
        /// Only this attestation: symmetricKey, x509 or tpm.
        #[arg(long)]
        attestation: Option<String>,
        /// Chance, 0 to 1, that a matching attempt gets the fault.
        #[arg(long)]
        probability: Option<f64>,
        /// At most this many injections.
        #[arg(long)]
        count: Option<u64>,
        /// The rule ends at this time (RFC 3339).
        #[arg(long)]
        expires: Option<String>,
        /// throttle: retry-after seconds.
        #[arg(long)]
        retry_after: Option<u32>,
        /// delay: polls answered `assigning` before the result.
        #[arg(long)]
        polls: Option<u32>,
        /// delay: milliseconds before the assignment starts; slow-tls: milliseconds the TLS
        /// handshake is held.
        #[arg(long)]
        delay_ms: Option<u64>,
        /// drop: where the connection closes: connect, subscribe, register (or publish),
        /// response.
        #[arg(long)]
        stage: Option<String>,
        /// fail: the six-digit error code (e.g. 500001, 429001, 401002).
        #[arg(long)]
        error_code: Option<u32>,
        /// fail: the message.
        #[arg(long)]
        message: Option<String>,
        /// hub-down: the linked hub that is down (default: any).
        #[arg(long)]
        hub: Option<String>,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Remove a rule.
    Remove {
        /// Rule id.
        id: String,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
}

/// Run `dps fault …`.
pub(crate) async fn run(g: &Globals, svc: &Service, c: FaultCommand) -> Result<()> {
    match c {
        FaultCommand::List { instance } => {
            let i = resolve_instance(svc, instance).await?;
            let v = svc
                .get(&format!("/admin/instances/{}/faults", enc(&i)))
                .await?;
            let items = v["items"].as_array().cloned().unwrap_or_default();
            emit_list(
                g,
                &items,
                &[
                    "ID",
                    "ACTION",
                    "REGISTRATION ID",
                    "GROUP",
                    "TRANSPORT",
                    "STAGE",
                    "PROBABILITY",
                    "COUNT",
                    "INJECTED",
                    "EXPIRES",
                    "SOURCE",
                ],
                &[
                    &["/id"],
                    &["/action"],
                    &["/registrationId"],
                    &["/enrollmentGroup"],
                    &["/transport"],
                    &["/stage"],
                    &["/probability"],
                    &["/count"],
                    &["/injected"],
                    &["/expires"],
                    &["/source"],
                ],
            );
        }
        FaultCommand::Add {
            action,
            id,
            registration_id,
            group,
            transport,
            attestation,
            probability,
            count,
            expires,
            retry_after,
            polls,
            delay_ms,
            stage,
            error_code,
            message,
            hub,
            instance,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let mut rule = Map::new();
            rule.insert("action".into(), json!(action.wire()));
            let mut set = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    rule.insert(k.into(), v);
                }
            };
            set("id", id.map(Value::from));
            set("registrationId", registration_id.map(Value::from));
            set("enrollmentGroup", group.map(Value::from));
            set("transport", transport.map(Value::from));
            set("attestation", attestation.map(Value::from));
            set("probability", probability.map(Value::from));
            set("count", count.map(Value::from));
            set("expires", expires.map(Value::from));
            set("retryAfter", retry_after.map(Value::from));
            set("delayPolls", polls.map(Value::from));
            set("delayMs", delay_ms.map(Value::from));
            set("stage", stage.map(Value::from));
            set("errorCode", error_code.map(Value::from));
            set("message", message.map(Value::from));
            set("hub", hub.map(Value::from));
            let r = svc
                .call(
                    Method::POST,
                    &format!("/admin/instances/{}/faults", enc(&i)),
                    Some(&Value::Object(rule)),
                    &[],
                )
                .await?;
            emit(g, &r.body, |v| {
                format!(
                    "fault rule '{}' ({}) added on instance '{i}'\n",
                    v["id"].as_str().unwrap_or("?"),
                    v["action"].as_str().unwrap_or("?")
                )
            });
        }
        FaultCommand::Remove { id, instance } => {
            let i = resolve_instance(svc, instance).await?;
            svc.call(
                Method::DELETE,
                &format!("/admin/instances/{}/faults/{}", enc(&i), enc(&id)),
                None,
                &[],
            )
            .await?;
            done(g, format!("fault rule '{id}' removed"));
        }
    }
    Ok(())
}

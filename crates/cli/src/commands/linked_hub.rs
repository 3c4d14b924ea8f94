//! `dps linked-hub …`: the IoT hubs linked to an instance (admin API).

use super::instance::resolve_instance;
use crate::output::{done, emit, emit_list};
use crate::service::{enc, Service};
use crate::Globals;
use anyhow::Result;
use clap::Subcommand;
use dps_core::instance::HubKind;
use reqwest::Method;
use serde_json::json;

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
        /// Adapter kind: registry, mosquitto, azure-iothub, webhook, broker-auth.
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

/// Run `dps linked-hub …`.
pub(crate) async fn run(g: &Globals, svc: &Service, c: LinkedHubCommand) -> Result<()> {
    match c {
        LinkedHubCommand::List { instance } => {
            let i = resolve_instance(svc, instance).await?;
            let v = svc
                .get(&format!("/admin/instances/{}/linkedHubs", enc(&i)))
                .await?;
            let items = v.as_array().cloned().unwrap_or_default();
            emit_list(
                g,
                &items,
                &[
                    "HOST",
                    "KIND",
                    "WEIGHT",
                    "APPLY POLICY",
                    "LOCATION",
                    "MAX DEVICES",
                    "HEALTHY",
                ],
                &[
                    &["/host"],
                    &["/kind"],
                    &["/allocation_weight"],
                    &["/apply_allocation_policy"],
                    &["/location"],
                    &["/max_devices"],
                    &["/health/healthy"],
                ],
            );
        }
        LinkedHubCommand::Add {
            host,
            instance,
            kind,
            weight,
            location,
            no_apply_allocation_policy,
            connection_string_hub,
            max_devices,
            max_registrations_per_second,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let mut body = json!({
                "host": host,
                "kind": kind,
                "allocation_weight": weight,
                "apply_allocation_policy": !no_apply_allocation_policy,
            });
            if let Some(l) = location {
                body["location"] = json!(l);
            }
            if let Some(c) = connection_string_hub {
                body["connection_string"] = json!(c);
            }
            if let Some(m) = max_devices {
                body["max_devices"] = json!(m);
            }
            if let Some(r) = max_registrations_per_second {
                body["max_registrations_per_second"] = json!(r);
            }
            let r = svc
                .call(
                    Method::PUT,
                    &format!("/admin/instances/{}/linkedHubs/{}", enc(&i), enc(&host)),
                    Some(&body),
                    &[],
                )
                .await?;
            if r.body.is_null() {
                done(g, format!("hub '{host}' linked to instance '{i}'"));
            } else {
                emit(g, &r.body, |_| {
                    format!("hub '{host}' linked to instance '{i}'\n")
                });
            }
        }
        LinkedHubCommand::Remove { host, instance } => {
            let i = resolve_instance(svc, instance).await?;
            svc.call(
                Method::DELETE,
                &format!("/admin/instances/{}/linkedHubs/{}", enc(&i), enc(&host)),
                None,
                &[],
            )
            .await?;
            done(g, format!("hub '{host}' unlinked from instance '{i}'"));
        }
    }
    Ok(())
}

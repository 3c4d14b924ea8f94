//! `dps hub device …`: the devices on a linked hub (admin API).

use super::instance::resolve_instance;
use crate::output::{emit_config, emit_list};
use crate::service::{enc, Service};
use crate::table::render_object;
use crate::Globals;
use anyhow::Result;
use clap::Subcommand;
use serde_json::Value;

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

/// Run `dps hub device …`.
pub(crate) async fn run(g: &Globals, svc: &Service, c: HubDeviceCommand) -> Result<()> {
    match c {
        HubDeviceCommand::List { hub, instance, top } => {
            let i = resolve_instance(svc, instance).await?;
            let mut items = Vec::new();
            let mut cont: Option<String> = None;
            loop {
                let limit = top
                    .map(|t| t.saturating_sub(items.len()).min(500))
                    .unwrap_or(500);
                if limit == 0 {
                    break;
                }
                let mut path = format!(
                    "/admin/instances/{}/hubs/{}/devices?limit={limit}",
                    enc(&i),
                    enc(&hub)
                );
                if let Some(c) = &cont {
                    path.push_str(&format!("&continuation={}", enc(c)));
                }
                let v = svc.get(&path).await?;
                if let Some(a) = v.get("items").and_then(Value::as_array) {
                    items.extend(a.iter().cloned());
                } else if let Some(a) = v.as_array() {
                    items.extend(a.iter().cloned());
                }
                cont = v
                    .get("continuation")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string);
                if cont.is_none() {
                    break;
                }
            }
            if let Some(t) = top {
                items.truncate(t);
            }
            emit_list(
                g,
                &items,
                &["DEVICE ID", "HUB", "STATUS", "AUTH", "EDGE", "UPDATED"],
                &[
                    &["/deviceId"],
                    &["/hub"],
                    &["/status"],
                    &["/authentication/type"],
                    &["/capabilities/iotEdge"],
                    &["/lastUpdatedDateTimeUtc"],
                ],
            );
        }
        HubDeviceCommand::Show {
            device,
            hub,
            instance,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let v = svc
                .get(&format!(
                    "/admin/instances/{}/hubs/{}/devices/{}",
                    enc(&i),
                    enc(&hub),
                    enc(&device)
                ))
                .await?;
            emit_config(g, &v, render_object);
        }
    }
    Ok(())
}

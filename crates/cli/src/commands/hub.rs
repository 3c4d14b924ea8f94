//! `dps hub device …`: the devices on a linked hub (admin API); `dps hub cleanup list`: the
//! old identities queued for removal from their hubs.

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
    /// Old identities queued for removal from their hubs.
    #[command(subcommand)]
    Cleanup(HubCleanupCommand),
}

/// `dps hub cleanup …`
#[derive(Subcommand, Debug)]
pub enum HubCleanupCommand {
    /// List the old identities still to be removed (oldest first), with their failed attempts,
    /// next attempt and last error.
    List {
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
        /// At most this many (1 to 1000, default 100).
        #[arg(long)]
        top: Option<usize>,
    },
}

/// Run `dps hub cleanup …`.
pub(crate) async fn run_cleanup(g: &Globals, svc: &Service, c: HubCleanupCommand) -> Result<()> {
    match c {
        HubCleanupCommand::List { instance, top } => {
            let i = resolve_instance(svc, instance).await?;
            let limit = top.unwrap_or(100).clamp(1, 1000);
            let v = svc
                .get(&format!(
                    "/admin/instances/{}/hubCleanup?limit={limit}",
                    enc(&i)
                ))
                .await?;
            let items = v
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            emit_list(
                g,
                &items,
                &[
                    "HUB",
                    "DEVICE ID",
                    "ACTION",
                    "FAILED",
                    "NEXT ATTEMPT",
                    "LAST ERROR",
                ],
                &[
                    &["/hub"],
                    &["/deviceId"],
                    &["/action"],
                    &["/failedAttempts"],
                    &["/nextAttemptUtc"],
                    &["/lastError"],
                ],
            );
        }
    }
    Ok(())
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

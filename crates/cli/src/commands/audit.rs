//! `dps audit …`: the audit log (admin API).

use crate::output::emit_list;
use crate::service::{enc, Service};
use crate::Globals;
use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::Value;

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

/// Run `dps audit …`.
pub(crate) async fn run(g: &Globals, svc: &Service, c: AuditCommand) -> Result<()> {
    let AuditCommand::List {
        since,
        enrollment,
        action,
        instance,
        limit,
    } = c;
    if let Some(s) = &since {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .with_context(|| format!("--since '{s}' is not an RFC 3339 time"))?;
    }
    let mut q = vec![format!("limit={limit}")];
    for (k, v) in [
        ("instance", instance),
        ("since", since),
        ("target", enrollment),
        ("action", action),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", enc(&v)));
        }
    }
    let v = svc.get(&format!("/admin/audit?{}", q.join("&"))).await?;
    let items = v
        .as_array()
        .cloned()
        .or_else(|| v.get("items").and_then(Value::as_array).cloned())
        .unwrap_or_default();
    emit_list(
        g,
        &items,
        &["SEQ", "TIME", "INSTANCE", "ACTOR", "ACTION", "TARGET"],
        &[
            &["/seq"],
            &["/timestamp"],
            &["/instance"],
            &["/actor"],
            &["/action"],
            &["/target_id", "/targetId", "/target"],
        ],
    );
    Ok(())
}

//! `dps registration …`: device registration records (service API).

use super::delete_doc;
use crate::output::{done, emit, emit_list};
use crate::service::{enc, svc_path, Service};
use crate::table::render_object;
use crate::Globals;
use anyhow::Result;
use clap::Subcommand;
use serde_json::json;

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

const REG_HEADERS: &[&str] = &[
    "REGISTRATION ID",
    "STATUS",
    "SUBSTATUS",
    "ASSIGNED HUB",
    "DEVICE ID",
    "ERROR",
    "UPDATED",
];
const REG_COLS: &[&[&str]] = &[
    &["/registrationId"],
    &["/status"],
    &["/substatus"],
    &["/assignedHub"],
    &["/deviceId"],
    &["/errorMessage", "/errorCode"],
    &["/lastUpdatedDateTimeUtc"],
];

/// Run `dps registration …`.
pub(crate) async fn run(g: &Globals, svc: &Service, c: RegistrationCommand) -> Result<()> {
    match c {
        RegistrationCommand::List { group, status, top } => {
            let path = svc_path(
                &format!("/registrations/{}/query", enc(&group)),
                &[("status", status)],
            );
            let items = svc.query_all(&path, &json!({}), top).await?;
            emit_list(g, &items, REG_HEADERS, REG_COLS);
        }
        RegistrationCommand::Show { id } => {
            let rec = svc
                .get(&svc_path(&format!("/registrations/{}", enc(&id)), &[]))
                .await;
            // Refused attempts write no registration record (an unauthenticated request must
            // not change a device's record); their precise reason is in the audit log. Show the
            // latest one when the policy may read the audit log (ServiceConfig), so that an
            // installer sees why a device was refused.
            let refused = svc
                .get(&format!(
                    "/admin/audit?target={}&action=registration.refused&limit=10000",
                    enc(&id)
                ))
                .await
                .ok()
                .and_then(|v| v.as_array().and_then(|a| a.last().cloned()))
                .map(|r| {
                    json!({
                        "timestamp": r["timestamp"],
                        "reason": r["after"]["reason"],
                        "transport": r["after"]["transport"],
                    })
                });
            match (rec, refused) {
                (Ok(mut v), refused) => {
                    if let Some(r) = refused {
                        v["lastRefusedAttempt"] = r;
                    }
                    emit(g, &v, render_object);
                }
                (Err(e), Some(r)) => {
                    let v = json!({"registrationId": id, "status": "not registered", "lastRefusedAttempt": r});
                    emit(g, &v, render_object);
                    return Err(e);
                }
                (Err(e), None) => return Err(e),
            }
        }
        RegistrationCommand::Delete { id, etag } => {
            delete_doc(svc, &format!("/registrations/{}", enc(&id)), etag).await?;
            done(g, format!("registration '{id}' deleted"));
        }
    }
    Ok(())
}

//! `dps access-policy …`: the shared access policies of an instance (admin API).

use super::instance::resolve_instance;
use crate::output::{done, emit, emit_list};
use crate::service::{enc, Service};
use crate::Globals;
use anyhow::Result;
use clap::Subcommand;
use reqwest::Method;
use serde_json::json;

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

/// Run `dps access-policy …`.
pub(crate) async fn run(g: &Globals, svc: &Service, c: AccessPolicyCommand) -> Result<()> {
    match c {
        AccessPolicyCommand::List { instance } => {
            let i = resolve_instance(svc, instance).await?;
            let v = svc
                .get(&format!("/admin/instances/{}/accessPolicies", enc(&i)))
                .await?;
            let items = v.as_array().cloned().unwrap_or_default();
            emit_list(g, &items, &["NAME", "RIGHTS"], &[&["/name"], &["/rights"]]);
        }
        AccessPolicyCommand::Add {
            name,
            rights,
            instance,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let path = format!("/admin/instances/{}/accessPolicies/{}", enc(&i), enc(&name));
            let r = svc
                .call(Method::PUT, &path, Some(&json!({"rights": rights})), &[])
                .await?;
            emit(g, &r.body, |v| {
                format!(
                    "access policy '{name}' saved\nconnection string: HostName={};SharedAccessKeyName={name};SharedAccessKey={}",
                    svc.connection().host_name,
                    v["primary_key"].as_str().unwrap_or("?")
                )
            });
        }
        AccessPolicyCommand::Remove { name, instance } => {
            let i = resolve_instance(svc, instance).await?;
            svc.call(
                Method::DELETE,
                &format!("/admin/instances/{}/accessPolicies/{}", enc(&i), enc(&name)),
                None,
                &[],
            )
            .await?;
            done(g, format!("access policy '{name}' removed"));
        }
    }
    Ok(())
}

//! `dps instance …`: provisioning instances (admin API), and which instance a command acts on.

use crate::output::{done, emit, emit_config};
use crate::service::{enc, Service};
use crate::table::{cell, render, render_object};
use crate::Globals;
use anyhow::{anyhow, Result};
use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Value};

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

/// The admin instance name to act on: `--instance`, else the instance whose hostnames include the
/// connection string's HostName, else the only one visible.
pub(crate) async fn resolve_instance(svc: &Service, explicit: Option<String>) -> Result<String> {
    if let Some(i) = explicit {
        return Ok(i);
    }
    let list = svc.get("/admin/instances").await?;
    let list = list.as_array().cloned().unwrap_or_default();
    let host = svc.connection().host_name.to_ascii_lowercase();
    let by_host = list.iter().find(|i| {
        i.get("hostnames")
            .and_then(Value::as_array)
            .is_some_and(|h| {
                h.iter()
                    .any(|x| x.as_str().map(str::to_ascii_lowercase).as_deref() == Some(&host))
            })
    });
    let pick = by_host.or(if list.len() == 1 { list.first() } else { None });
    pick.and_then(|i| i.get("name").and_then(Value::as_str))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("cannot tell which instance to use: pass --instance NAME"))
}

fn instance_conn_strings(inst: &Value) -> Vec<String> {
    let host = inst
        .pointer("/hostnames/0")
        .and_then(Value::as_str)
        .unwrap_or("localhost");
    inst.get("access_policy")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| {
                    let name = p.get("name")?.as_str()?;
                    let key = p.get("primary_key")?.as_str()?;
                    (key != "<redacted>").then(|| {
                        format!("HostName={host};SharedAccessKeyName={name};SharedAccessKey={key}")
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Run `dps instance …`.
pub(crate) async fn run(g: &Globals, svc: &Service, c: InstanceCommand) -> Result<()> {
    let cols: &[&[&str]] = &[
        &["/name"],
        &["/id_scope"],
        &["/hostnames"],
        &["/allocation_policy"],
    ];
    match c {
        InstanceCommand::List => {
            let v = svc.get("/admin/instances").await?;
            let items = v.as_array().cloned().unwrap_or_default();
            emit_config(g, &v, |_| {
                let rows: Vec<Vec<String>> = items
                    .iter()
                    .map(|it| {
                        let mut r: Vec<String> = cols.iter().map(|p| cell(it, p)).collect();
                        r.push(count(it, "/linked_hub"));
                        r.push(count(it, "/access_policy"));
                        r
                    })
                    .collect();
                render(
                    &[
                        "NAME",
                        "ID SCOPE",
                        "HOSTNAMES",
                        "ALLOCATION",
                        "LINKED HUBS",
                        "POLICIES",
                    ],
                    &rows,
                )
            });
        }
        InstanceCommand::Show { name } => {
            let v = svc.get(&format!("/admin/instances/{}", enc(&name))).await?;
            emit_config(g, &v, render_object);
        }
        InstanceCommand::Create {
            name,
            id_scope,
            hostnames,
            allocation_policy,
        } => {
            let scope =
                id_scope.unwrap_or_else(|| dps_core::ids::IdScope::generate().as_str().to_string());
            let mut body = json!({"name": name, "id_scope": scope, "hostnames": hostnames});
            if let Some(p) = allocation_policy {
                body["allocation_policy"] = json!(p);
            }
            let r = svc
                .call(
                    Method::PUT,
                    &format!("/admin/instances/{}", enc(&name)),
                    Some(&body),
                    &[],
                )
                .await?;
            emit(g, &r.body, |v| {
                let mut out = format!(
                    "instance '{}' created: ID scope {}\n",
                    cell(v, &["/name"]),
                    cell(v, &["/id_scope"])
                );
                for cs in instance_conn_strings(v) {
                    out.push_str(&format!("connection string: {cs}\n"));
                }
                out
            });
        }
        InstanceCommand::Delete { name } => {
            svc.call(
                Method::DELETE,
                &format!("/admin/instances/{}", enc(&name)),
                None,
                &[],
            )
            .await?;
            done(g, format!("instance '{name}' deleted"));
        }
    }
    Ok(())
}

fn count(v: &Value, ptr: &str) -> String {
    v.pointer(ptr)
        .and_then(Value::as_array)
        .map(|a| a.len().to_string())
        .unwrap_or_else(|| "0".into())
}

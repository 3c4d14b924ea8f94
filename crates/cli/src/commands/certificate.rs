//! `dps certificate …`: the CA certificates and the device-certificate deny list of an
//! instance (admin API).

use super::instance::resolve_instance;
use crate::output::{done, emit, emit_list};
use crate::service::{enc, Service};
use crate::table::{cell, render_object};
use crate::Globals;
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

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

/// Run `dps certificate …`.
pub(crate) async fn run(g: &Globals, svc: &Service, c: CertificateCommand) -> Result<()> {
    let base = |i: &str| format!("/admin/instances/{}/certificates", enc(i));
    match c {
        CertificateCommand::Deny {
            value,
            kind,
            reason,
            instance,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let path = format!("/admin/instances/{}/denylist/{}", enc(&i), enc(&value));
            svc.call(
                Method::PUT,
                &path,
                Some(&json!({"kind": kind, "reason": reason})),
                &[],
            )
            .await?;
            done(g, format!("{kind} {value} is denied"));
        }
        CertificateCommand::Undeny { value, instance } => {
            let i = resolve_instance(svc, instance).await?;
            let path = format!("/admin/instances/{}/denylist/{}", enc(&i), enc(&value));
            svc.call(Method::DELETE, &path, None, &[]).await?;
            done(g, format!("{value} removed from the deny list"));
        }
        CertificateCommand::DenyList { instance } => {
            let i = resolve_instance(svc, instance).await?;
            let v = svc
                .get(&format!("/admin/instances/{}/denylist", enc(&i)))
                .await?;
            let items = v.as_array().cloned().unwrap_or_default();
            emit_list(
                g,
                &items,
                &["KIND", "VALUE", "REASON", "ADDED"],
                &[&["/kind"], &["/value"], &["/reason"], &["/created"]],
            );
        }
        CertificateCommand::List { instance } => {
            let i = resolve_instance(svc, instance).await?;
            let v = svc.get(&base(&i)).await?;
            let items = v
                .as_array()
                .cloned()
                .or_else(|| v.get("items").and_then(Value::as_array).cloned())
                .or_else(|| v.get("value").and_then(Value::as_array).cloned())
                .unwrap_or_default();
            emit_list(
                g,
                &items,
                &["NAME", "SUBJECT", "VERIFIED", "SHA-256", "EXPIRES"],
                &[
                    &["/name"],
                    &[
                        "/subject",
                        "/subjectName",
                        "/info/subjectName",
                        "/properties/subject",
                    ],
                    &["/verified", "/isVerified", "/properties/isVerified"],
                    &[
                        "/sha256Thumbprint",
                        "/thumbprint",
                        "/info/sha256Thumbprint",
                        "/properties/thumbprint",
                    ],
                    &[
                        "/notAfterUtc",
                        "/expiry",
                        "/info/notAfterUtc",
                        "/properties/expiry",
                    ],
                ],
            );
        }
        CertificateCommand::Show { name, instance } => {
            let i = resolve_instance(svc, instance).await?;
            let v = svc.get(&format!("{}/{}", base(&i), enc(&name))).await?;
            emit(g, &v, render_object);
        }
        CertificateCommand::Create {
            name,
            path,
            instance,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let url = format!("{}/{}", base(&i), enc(&name));
            send_pem(g, svc, Method::PUT, &url, &path, &name, "uploaded").await?;
        }
        CertificateCommand::Delete { name, instance } => {
            let i = resolve_instance(svc, instance).await?;
            svc.call(
                Method::DELETE,
                &format!("{}/{}", base(&i), enc(&name)),
                None,
                &[],
            )
            .await?;
            done(g, format!("certificate '{name}' deleted"));
        }
        CertificateCommand::GenerateVerificationCode { name, instance } => {
            let i = resolve_instance(svc, instance).await?;
            let r = svc
                .call(
                    Method::POST,
                    &format!("{}/{}/generateVerificationCode", base(&i), enc(&name)),
                    None,
                    &[],
                )
                .await?;
            emit(g, &r.body, |v| {
                format!(
                    "verification code: {}\nissue a certificate with this CN, signed by '{name}', \
                     and run: dps certificate verify {name} --path FILE\n",
                    cell(v, &["/verificationCode", "/properties/verificationCode"])
                )
            });
        }
        CertificateCommand::Verify {
            name,
            path,
            instance,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let url = format!("{}/{}/verify", base(&i), enc(&name));
            send_pem(g, svc, Method::POST, &url, &path, &name, "verified").await?;
        }
    }
    Ok(())
}

/// Send a PEM certificate file (`{"certificate": PEM}`) and say that certificate `name` was
/// `what` (uploaded, verified), with the service's answer when it gives one.
async fn send_pem(
    g: &Globals,
    svc: &Service,
    method: Method,
    url: &str,
    pem_file: &Path,
    name: &str,
    what: &str,
) -> Result<()> {
    let pem = read_pem(pem_file)?;
    let r = svc
        .call(method, url, Some(&json!({"certificate": pem})), &[])
        .await?;
    if r.body.is_null() {
        done(g, format!("certificate '{name}' {what}"));
    } else {
        emit(g, &r.body, |v| {
            format!("certificate '{name}' {what}\n{}", render_object(v))
        });
    }
    Ok(())
}

/// The text of a PEM certificate file (an error unless it holds a CERTIFICATE block).
pub(crate) fn read_pem(path: &Path) -> Result<String> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read certificate file {}", path.display()))?;
    if !s.contains("-----BEGIN CERTIFICATE-----") {
        bail!("{} holds no PEM CERTIFICATE block", path.display());
    }
    Ok(s)
}

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
    /// Certificate issuance: list the credential policies and their issuing CAs.
    Policies {
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Certificate issuance: the CA chain (PEM) hubs and brokers must trust for a policy.
    ExportCa {
        /// Credential policy.
        policy: String,
        /// Write it here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Certificate issuance: the certificates dps issued.
    Issued {
        /// Only this registration's.
        #[arg(long)]
        registration_id: Option<String>,
        /// Only `active` or `revoked` ones.
        #[arg(long, value_parser = ["active", "revoked"])]
        status: Option<String>,
        /// Only this policy's.
        #[arg(long)]
        policy: Option<String>,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Certificate issuance: revoke an issued certificate by serial number, or every active
    /// one of a device. dps refuses it at once; the policy's CRL lists it.
    Revoke {
        /// Serial number (hex).
        #[arg(
            required_unless_present = "registration_id",
            conflicts_with = "registration_id"
        )]
        serial: Option<String>,
        /// Revoke every active certificate of this registration.
        #[arg(long)]
        registration_id: Option<String>,
        /// Why (kept with the certificate, the deny list and the audit log).
        #[arg(long)]
        reason: Option<String>,
        /// Instance (default: the connection string's).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Certificate issuance: download a policy's CRL (DER), as brokers fetch it from
    /// `/crl/{instance}/{policy}`.
    Crl {
        /// Credential policy.
        policy: String,
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
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
        CertificateCommand::Policies { instance } => {
            let i = resolve_instance(svc, instance).await?;
            let v = svc
                .get(&format!("/admin/instances/{}/credentialPolicies", enc(&i)))
                .await?;
            let items = v.as_array().cloned().unwrap_or_default();
            emit_list(
                g,
                &items,
                &["NAME", "KEY TYPES", "DAYS", "CA", "CA SHA-256", "GENERATED"],
                &[
                    &["/policy/name"],
                    &["/policy/key_types"],
                    &["/policy/validity_days"],
                    &["/ca/subjectName"],
                    &["/ca/sha256Thumbprint"],
                    &["/generatedCa"],
                ],
            );
        }
        CertificateCommand::ExportCa {
            policy,
            out,
            instance,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let pem = svc
                .get_bytes(&format!(
                    "/admin/instances/{}/credentialPolicies/{}/ca",
                    enc(&i),
                    enc(&policy)
                ))
                .await?;
            match out {
                Some(p) => {
                    std::fs::write(&p, &pem)
                        .with_context(|| format!("cannot write {}", p.display()))?;
                    done(
                        g,
                        format!("CA chain of '{policy}' written to {}", p.display()),
                    );
                }
                None => print!("{}", String::from_utf8_lossy(&pem)),
            }
        }
        CertificateCommand::Issued {
            registration_id,
            status,
            policy,
            instance,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let path = crate::service::svc_path(
                &format!("/admin/instances/{}/issuedCertificates", enc(&i)),
                &[
                    ("registrationId", registration_id),
                    ("status", status),
                    ("policy", policy),
                ],
            );
            let v = svc.get(&path).await?;
            let items = v.as_array().cloned().unwrap_or_default();
            emit_list(
                g,
                &items,
                &["SERIAL", "REGISTRATION", "POLICY", "STATUS", "NOT AFTER"],
                &[
                    &["/serialNumber"],
                    &["/registrationId"],
                    &["/policy"],
                    &["/status"],
                    &["/notAfterUtc"],
                ],
            );
        }
        CertificateCommand::Revoke {
            serial,
            registration_id,
            reason,
            instance,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let body = json!({ "reason": reason });
            match (serial, registration_id) {
                (Some(serial), _) => {
                    let path = format!(
                        "/admin/instances/{}/issuedCertificates/{}/revoke",
                        enc(&i),
                        enc(&serial)
                    );
                    svc.call(Method::POST, &path, Some(&body), &[]).await?;
                    done(g, format!("certificate {serial} is revoked"));
                }
                (None, Some(rid)) => {
                    let path = format!(
                        "/admin/instances/{}/registrations/{}/revokeCertificates",
                        enc(&i),
                        enc(&rid)
                    );
                    let r = svc.call(Method::POST, &path, Some(&body), &[]).await?;
                    let n = r.body.as_array().map(Vec::len).unwrap_or(0);
                    done(g, format!("{n} certificate(s) of '{rid}' revoked"));
                }
                (None, None) => bail!("give a serial number or --registration-id"),
            }
        }
        CertificateCommand::Crl {
            policy,
            out,
            instance,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let der = svc
                .get_bytes(&format!("/crl/{}/{}", enc(&i), enc(&policy)))
                .await?;
            std::fs::write(&out, &der)
                .with_context(|| format!("cannot write {}", out.display()))?;
            done(g, format!("CRL of '{policy}' written to {}", out.display()));
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

//! Setup and cleanup of `dps bench`: the simulated devices' credentials, the enrollment group or
//! individual enrollments the bench creates for them, and their deletion (`--cleanup`).

use super::x509::{issue_leaf, load_or_make_ca};
use super::BenchArgs;
use crate::commands::enrollment_common::AttestationArg;
use crate::service::{enc, svc_path, Service};
use anyhow::{anyhow, bail, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};
use std::io::IsTerminal;

/// One device's credential.
pub(super) enum Cred {
    Key(String),
    Cert { chain: Vec<u8>, key: Vec<u8> },
}

/// One simulated device.
pub(super) struct Device {
    pub(super) id: String,
    pub(super) cred: Cred,
}

/// What was created during setup (for cleanup).
#[derive(Default)]
pub(super) struct Created {
    pub(super) group: Option<String>,
    pub(super) enrollments: Vec<String>,
}

/// The simulated devices' credentials, and the group or enrollments created for them: derived
/// from `--group-key`, or from a group created now (`--create-group`), or one individual
/// enrollment created per device (`--create-enrollments`); for X.509, certificates issued by
/// `--ca-cert` or by a CA made now for a group created now.
pub(super) async fn devices(
    a: &BenchArgs,
    svc: Option<&Service>,
    ids: &[String],
    stamp: &str,
    json_out: bool,
) -> Result<(Vec<Device>, Created)> {
    let mut created = Created::default();
    let devices = match a.attestation {
        AttestationArg::X509 => {
            let (issuer, ca_pem) = load_or_make_ca(a)?;
            if a.create_group {
                let svc = svc.expect("service");
                let gid = format!("bench-{stamp}");
                put_group(
                    svc,
                    &gid,
                    json!({"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": ca_pem}}}}),
                )
                .await?;
                created.group = Some(gid);
            } else if a.ca_cert.is_none() {
                bail!("x509 needs --create-group, or --ca-cert/--ca-key of a CA an enrollment group trusts");
            }
            let mut v = Vec::with_capacity(ids.len());
            for id in ids {
                let (chain, key) = issue_leaf(&issuer, id)?;
                v.push(Device {
                    id: id.clone(),
                    cred: Cred::Cert { chain, key },
                });
            }
            v
        }
        _ => {
            if let Some(gk) = &a.group_key {
                derive_all(ids, gk)?
            } else if a.create_group {
                let svc = svc.expect("service");
                let gid = format!("bench-{stamp}");
                let gk = dps_core::sas::generate_key();
                put_group(
                    svc,
                    &gid,
                    json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": gk, "secondaryKey": dps_core::sas::generate_key()}}),
                )
                .await?;
                created.group = Some(gid);
                derive_all(ids, &gk)?
            } else if a.create_enrollments {
                let svc = svc.expect("service");
                let devs: Vec<Device> = ids
                    .iter()
                    .map(|id| Device {
                        id: id.clone(),
                        cred: Cred::Key(dps_core::sas::generate_key()),
                    })
                    .collect();
                bulk_create(svc, &devs, json_out).await?;
                created.enrollments = ids.to_vec();
                devs
            } else {
                bail!("give --group-key, --create-group or --create-enrollments");
            }
        }
    };
    Ok((devices, created))
}

fn derive_all(ids: &[String], group_key: &str) -> Result<Vec<Device>> {
    ids.iter()
        .map(|id| {
            let k = dps_core::sas::derive_device_key(group_key, id)
                .ok_or_else(|| anyhow!("--group-key is not valid base64"))?;
            Ok(Device {
                id: id.clone(),
                cred: Cred::Key(k),
            })
        })
        .collect()
}

async fn put_group(svc: &Service, gid: &str, attestation: Value) -> Result<()> {
    let body = json!({
        "enrollmentGroupId": gid,
        "attestation": attestation,
        "provisioningStatus": "enabled",
    });
    svc.call(
        Method::PUT,
        &svc_path(&format!("/enrollmentGroups/{}", enc(gid)), &[]),
        Some(&body),
        &[],
    )
    .await
    .with_context(|| format!("creating enrollment group '{gid}'"))?;
    Ok(())
}

async fn bulk_create(svc: &Service, devs: &[Device], quiet: bool) -> Result<()> {
    let path = svc_path("/enrollments", &[]);
    for (n, chunk) in devs.chunks(10).enumerate() {
        let items: Vec<Value> = chunk
            .iter()
            .map(|d| {
                let Cred::Key(k) = &d.cred else {
                    unreachable!("symmetric keys only")
                };
                json!({
                    "registrationId": d.id,
                    "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": dps_core::sas::generate_key()}},
                    "provisioningStatus": "enabled",
                })
            })
            .collect();
        let r = svc
            .call(
                Method::POST,
                &path,
                Some(&json!({"mode": "create", "enrollments": items})),
                &[],
            )
            .await
            .context("creating enrollments (bulk)")?;
        if r.body.get("isSuccessful").and_then(Value::as_bool) == Some(false) {
            bail!("creating enrollments failed: {}", r.body["errors"]);
        }
        if !quiet && std::io::stderr().is_terminal() {
            eprint!(
                "\rcreating enrollments: {}/{}",
                (n * 10 + chunk.len()),
                devs.len()
            );
        }
    }
    if !quiet && std::io::stderr().is_terminal() {
        eprintln!();
    }
    Ok(())
}

pub(super) async fn cleanup(svc: &Service, c: &Created) {
    if let Some(gid) = &c.group {
        if let Err(e) = svc
            .call(
                Method::DELETE,
                &svc_path(&format!("/enrollmentGroups/{}", enc(gid)), &[]),
                None,
                &[],
            )
            .await
        {
            eprintln!("bench: could not delete group '{gid}': {e:#}");
        }
    }
    let path = svc_path("/enrollments", &[]);
    for chunk in c.enrollments.chunks(10) {
        let items: Vec<Value> = chunk
            .iter()
            .map(|id| json!({"registrationId": id, "attestation": {"type": "symmetricKey"}}))
            .collect();
        if let Err(e) = svc
            .call(
                Method::POST,
                &path,
                Some(&json!({"mode": "delete", "enrollments": items})),
                &[],
            )
            .await
        {
            eprintln!("bench: could not delete enrollments: {e:#}");
            break;
        }
    }
}

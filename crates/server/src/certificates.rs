//! CA certificates of an instance, with Azure's proof-of-possession flow (upload, generate a
//! verification code, upload a certificate whose CN is that code signed by the CA's key: the CA
//! becomes verified; only verified CAs admit devices through `caReferences`), and the
//! instance's revocation deny list (beyond Azure), checked on every X.509 registration.
//!
//! Routes under `/admin/instances/{name}/`:
//! - `GET certificates`, `GET|PUT|DELETE certificates/{ca}` (PUT body `{"certificate": PEM or base64 DER, "verified"?: bool}`)
//! - `POST certificates/{ca}/generateVerificationCode` → `{"verificationCode": "..."}`
//! - `POST certificates/{ca}/verify` body `{"certificate": PEM}`
//! - `GET denylist`, `PUT|DELETE denylist/{value}` (PUT body `{"kind": "thumbprint"|"serial", "reason"?: "..."}`)

use crate::app::App;
use crate::http::json_response;
use crate::repo::Repo;
use crate::service_api::Caller;
use axum::body::Body;
use axum::http::{Method, Response, StatusCode};
use base64::Engine as _;
use dps_core::clock::azure_timestamp;
use dps_core::model::X509CertificateInfo;
use dps_core::store::{Collection, DocIndex, Expect, Filter};
use dps_core::x509::verify::{CaCertificate, DenyList};
use dps_core::Error;
use serde::{Deserialize, Serialize};

/// A stored CA certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredCa {
    /// Name (what `caReferences` names).
    pub name: String,
    /// Base64 DER.
    pub certificate: String,
    /// Parsed info.
    pub info: X509CertificateInfo,
    /// Proof of possession done.
    pub is_verified: bool,
    /// The outstanding verification code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_code: Option<String>,
    /// Created.
    pub created: String,
    /// Updated.
    pub updated: String,
}

/// A deny-list entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DenyEntry {
    /// `thumbprint` or `serial`.
    pub kind: String,
    /// Hex value as given.
    pub value: String,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Added.
    pub created: String,
}

/// The instance's CA certificates, for attestation.
pub async fn load_cas(repo: &Repo, instance: &str) -> dps_core::Result<Vec<CaCertificate>> {
    let all = repo
        .all::<StoredCa>(Collection::Certificate, instance, &Filter::default())
        .await?;
    Ok(all
        .into_iter()
        .filter_map(|(c, _)| {
            let der = base64::engine::general_purpose::STANDARD
                .decode(&c.certificate)
                .ok()?;
            Some(CaCertificate {
                name: c.name,
                der,
                verified: c.is_verified,
            })
        })
        .collect())
}

/// The instance's deny list, for attestation.
pub async fn load_deny_list(repo: &Repo, instance: &str) -> dps_core::Result<DenyList> {
    let all = repo
        .all::<DenyEntry>(Collection::DenyList, instance, &Filter::default())
        .await?;
    let mut d = DenyList::new();
    for (e, _) in all {
        if e.kind == "serial" {
            d.add_serial(&e.value);
        } else {
            d.add_thumbprint(&e.value);
        }
    }
    Ok(d)
}

fn now() -> String {
    azure_timestamp(time::OffsetDateTime::now_utc())
}

fn public(c: &StoredCa) -> serde_json::Value {
    serde_json::json!({
        "name": c.name, "isVerified": c.is_verified, "info": c.info,
        "verificationCode": c.verification_code, "created": c.created, "updated": c.updated,
    })
}

fn cert_from_body(body: &[u8]) -> Result<(Vec<u8>, serde_json::Value), Error> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| Error::invalid(format!("invalid body: {e}")))?;
    let text = v
        .get("certificate")
        .and_then(|c| c.as_str())
        .ok_or_else(|| Error::invalid("'certificate' (PEM or base64 DER) is required"))?;
    let der = dps_core::x509::decode_certificate(text)
        .map_err(|e| Error::invalid(format!("certificate: {e}")))?;
    Ok((der, v))
}

async fn get_ca(app: &App, instance: &str, name: &str) -> Result<StoredCa, Error> {
    app.repo
        .get::<StoredCa>(Collection::Certificate, instance, name)
        .await?
        .map(|(c, _)| c)
        .ok_or_else(|| Error::not_found("CA certificate", name))
}

async fn put_ca(app: &App, instance: &str, c: &StoredCa) -> Result<(), Error> {
    let index = DocIndex {
        status: Some(
            if c.is_verified {
                "verified"
            } else {
                "unverified"
            }
            .into(),
        ),
        ..Default::default()
    };
    app.repo
        .put(
            Collection::Certificate,
            instance,
            &c.name,
            &dps_core::store::new_etag(),
            c,
            index,
            Expect::Any,
        )
        .await?;
    Ok(())
}

/// Handle certificate and deny-list routes.
pub async fn handle(
    app: &App,
    caller: &Caller,
    method: &Method,
    body: &[u8],
    segs: &[String],
    l: &[&str],
) -> Result<Response<Body>, Error> {
    let r = handle_inner(app, caller, method, body, segs, l).await;
    if method != Method::GET && segs.len() > 2 {
        // A CA verified or removed, a certificate denied or allowed: effective at once on this
        // node (other nodes sharing the store see it within the cache's lifetime).
        app.catalog.x509_changed(&segs[2]);
    }
    r
}

async fn handle_inner(
    app: &App,
    caller: &Caller,
    method: &Method,
    body: &[u8],
    segs: &[String],
    l: &[&str],
) -> Result<Response<Body>, Error> {
    let no_route = || {
        Error::Unsupported(format!(
            "no admin API route for {method} /{}",
            segs.join("/")
        ))
    };
    if l.len() < 4 || l[1] != "instances" {
        return Err(no_route());
    }
    let inst_name = segs[2].clone();
    if !(caller.instance.name.eq_ignore_ascii_case(&inst_name)
        || caller
            .instance
            .name
            .eq_ignore_ascii_case(&app.admin_instance))
    {
        return Err(dps_core::error::AuthFailure::MissingRight {
            policy: caller.policy.clone(),
            right: "ServiceConfig (on another instance)",
        }
        .into());
    }
    let inst = app
        .instances
        .by_name(&inst_name)
        .ok_or_else(|| Error::not_found("instance", &inst_name))?;
    let inst = inst.name.clone();
    let audit = |action: &'static str,
                 id: String,
                 before: Option<serde_json::Value>,
                 after: Option<serde_json::Value>| {
        let inst = inst.clone();
        let policy = caller.policy.clone();
        async move {
            app.engine
                .audit
                .record(
                    &inst,
                    &policy,
                    action,
                    "certificate",
                    &id,
                    before.as_ref(),
                    after.as_ref(),
                )
                .await
        }
    };
    match (&l[3..], method.clone()) {
        (["certificates"], Method::GET) => {
            let all = app
                .repo
                .all::<StoredCa>(Collection::Certificate, &inst, &Filter::default())
                .await?;
            Ok(json_response(
                StatusCode::OK,
                &all.iter().map(|(c, _)| public(c)).collect::<Vec<_>>(),
            ))
        }
        (["certificates", _], Method::GET) => Ok(json_response(
            StatusCode::OK,
            &public(&get_ca(app, &inst, &segs[4]).await?),
        )),
        (["certificates", _], Method::PUT) => {
            let (der, v) = cert_from_body(body)?;
            let info = dps_core::x509::certificate_info(&der)
                .map_err(|e| Error::invalid(e.to_string()))?;
            let before = app
                .repo
                .get::<StoredCa>(Collection::Certificate, &inst, &segs[4])
                .await?
                .map(|(c, _)| c);
            let c = StoredCa {
                name: segs[4].clone(),
                certificate: base64::engine::general_purpose::STANDARD.encode(&der),
                info,
                is_verified: v.get("verified").and_then(|b| b.as_bool()).unwrap_or(false),
                verification_code: None,
                created: before
                    .as_ref()
                    .map(|b| b.created.clone())
                    .unwrap_or_else(now),
                updated: now(),
            };
            put_ca(app, &inst, &c).await?;
            audit(
                "certificate.put",
                c.name.clone(),
                before.as_ref().map(public),
                Some(public(&c)),
            )
            .await;
            Ok(json_response(StatusCode::OK, &public(&c)))
        }
        (["certificates", _], Method::DELETE) => {
            let old = app
                .repo
                .store
                .delete(Collection::Certificate, &inst, &segs[4], Expect::Present)
                .await
                .map_err(|_| Error::not_found("CA certificate", &segs[4]))?;
            let before = old
                .and_then(|d| serde_json::from_str::<StoredCa>(&d.body).ok())
                .map(|c| public(&c));
            audit("certificate.delete", segs[4].clone(), before, None).await;
            Ok(Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Body::empty())
                .expect("valid"))
        }
        (["certificates", _, "generateverificationcode"], Method::POST) => {
            let mut c = get_ca(app, &inst, &segs[4]).await?;
            let code = hex::encode_upper(rand::random::<[u8; 16]>());
            c.verification_code = Some(code.clone());
            c.updated = now();
            put_ca(app, &inst, &c).await?;
            audit(
                "certificate.verification_code",
                c.name.clone(),
                None,
                Some(public(&c)),
            )
            .await;
            Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({"name": c.name, "verificationCode": code}),
            ))
        }
        (["certificates", _, "verify"], Method::POST) => {
            let mut c = get_ca(app, &inst, &segs[4]).await?;
            let code = c
                .verification_code
                .clone()
                .ok_or_else(|| Error::invalid("generate a verification code first"))?;
            let (vder, _) = cert_from_body(body)?;
            let ca_der = base64::engine::general_purpose::STANDARD
                .decode(&c.certificate)
                .map_err(|e| Error::Internal(e.to_string()))?;
            dps_core::x509::verify::verify_pop(
                &ca_der,
                &vder,
                &code,
                time::OffsetDateTime::now_utc(),
            )
            .map_err(|f| Error::invalid(format!("proof of possession failed: {f}")))?;
            c.is_verified = true;
            c.verification_code = None;
            c.updated = now();
            put_ca(app, &inst, &c).await?;
            audit(
                "certificate.verified",
                c.name.clone(),
                None,
                Some(public(&c)),
            )
            .await;
            Ok(json_response(StatusCode::OK, &public(&c)))
        }
        (["denylist"], Method::GET) => {
            let all = app
                .repo
                .all::<DenyEntry>(Collection::DenyList, &inst, &Filter::default())
                .await?;
            Ok(json_response(
                StatusCode::OK,
                &all.into_iter().map(|(e, _)| e).collect::<Vec<_>>(),
            ))
        }
        (["denylist", _], Method::PUT) => {
            let v: serde_json::Value = if body.is_empty() {
                serde_json::json!({})
            } else {
                serde_json::from_slice(body)
                    .map_err(|e| Error::invalid(format!("invalid body: {e}")))?
            };
            let kind = v
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or("thumbprint")
                .to_ascii_lowercase();
            if kind != "thumbprint" && kind != "serial" {
                return Err(Error::invalid("kind must be 'thumbprint' or 'serial'"));
            }
            let value = segs[4].clone();
            if value.is_empty() || !value.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
                return Err(Error::invalid(
                    "the deny-list value must be hex (a thumbprint or a serial number)",
                ));
            }
            let e = DenyEntry {
                kind,
                value: value.clone(),
                reason: v.get("reason").and_then(|r| r.as_str()).map(str::to_string),
                created: now(),
            };
            app.repo
                .put(
                    Collection::DenyList,
                    &inst,
                    &value,
                    &dps_core::store::new_etag(),
                    &e,
                    DocIndex::default(),
                    Expect::Any,
                )
                .await?;
            audit(
                "denylist.add",
                value,
                None,
                Some(serde_json::to_value(&e).expect("json")),
            )
            .await;
            Ok(json_response(StatusCode::OK, &e))
        }
        (["denylist", _], Method::DELETE) => {
            let old = app
                .repo
                .store
                .delete(Collection::DenyList, &inst, &segs[4], Expect::Any)
                .await?;
            if old.is_none() {
                return Err(Error::not_found("deny-list entry", &segs[4]));
            }
            audit(
                "denylist.remove",
                segs[4].clone(),
                old.and_then(|d| serde_json::from_str(&d.body).ok()),
                None,
            )
            .await;
            Ok(Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Body::empty())
                .expect("valid"))
        }
        _ => Err(no_route()),
    }
}

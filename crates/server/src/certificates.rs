//! The admin API's routes for an instance's CA certificates (Azure's proof-of-possession flow)
//! and its revocation deny list; the use case is [`crate::usecases::certificates`].
//!
//! Routes under `/admin/instances/{name}/`:
//! - `GET certificates`, `GET|PUT|DELETE certificates/{ca}` (PUT body `{"certificate": PEM or base64 DER, "verified"?: bool}`)
//! - `POST certificates/{ca}/generateVerificationCode` → `{"verificationCode": "..."}`
//! - `POST certificates/{ca}/verify` body `{"certificate": PEM}`
//! - `GET denylist`, `PUT|DELETE denylist/{value}` (PUT body `{"kind": "thumbprint"|"serial", "reason"?: "..."}`)
//! - certificate issuance: `GET credentialPolicies`, `GET credentialPolicies/{policy}`,
//!   `GET credentialPolicies/{policy}/ca` (PEM chain), `GET issuedCertificates?registrationId=&status=&policy=&limit=`,
//!   `GET issuedCertificates/{serial}`, `POST issuedCertificates/{serial}/revoke` (body `{"reason"?}`),
//!   `POST registrations/{registrationId}/revokeCertificates` (body `{"reason"?}`); and, public,
//!   `GET /crl/{instance}/{policy}` (DER CRL).

use crate::admin_api::ok;
use crate::app::App;
use crate::http::param;
use crate::http::{no_content, Incoming, Path};
use crate::routes::Op;
use crate::service_api::Caller;
use crate::usecases::issuance::MAX_LIST;
use axum::body::Body;
use axum::http::{header, Response};
use dps_core::Error;

pub use crate::usecases::certificates::{load_cas, load_deny_list, DenyEntry, StoredCa};

/// The certificate of a request body `{"certificate": PEM or base64 DER, ...}` (DER), and the
/// body.
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

/// Handle certificate and deny-list routes for a caller the dispatcher authorized with
/// ServiceConfig ([`crate::routes`]); the target instance is checked here.
pub async fn handle(
    app: &App,
    caller: &Caller,
    req: &Incoming,
    path: Path<'_>,
    op: Op,
) -> Result<Response<Body>, Error> {
    let segs = path.segs;
    let body = &req.body[..];
    let target = crate::admin_api::target(app, caller, &segs[2])?;
    let inst = target.name.as_str();
    let uc = &app.certificates;
    match op {
        Op::CertificateList => {
            let all = uc.list(inst).await?;
            ok(&all.iter().map(StoredCa::public).collect::<Vec<_>>())
        }
        Op::CertificateGet => ok(&uc.get(inst, &segs[4]).await?.public()),
        Op::CertificatePut => {
            let (der, v) = cert_from_body(body)?;
            let verified = v.get("verified").and_then(|b| b.as_bool()).unwrap_or(false);
            let c = uc.put(caller, inst, &segs[4], &der, verified).await?;
            ok(&c.public())
        }
        Op::CertificateDelete => {
            uc.delete(caller, inst, &segs[4]).await?;
            Ok(no_content())
        }
        Op::CertificateVerificationCode => {
            let (c, code) = uc
                .generate_verification_code(caller, inst, &segs[4])
                .await?;
            ok(&serde_json::json!({"name": c.name, "verificationCode": code}))
        }
        Op::CertificateVerify => {
            let proof = cert_from_body(body).map(|(der, _)| der);
            ok(&uc.verify(caller, inst, &segs[4], proof).await?.public())
        }
        Op::DenyList => ok(&uc.deny_list(inst).await?),
        Op::DenyListPut => {
            let v: serde_json::Value = if body.is_empty() {
                serde_json::json!({})
            } else {
                serde_json::from_slice(body)
                    .map_err(|e| Error::invalid(format!("invalid body: {e}")))?
            };
            let kind = v.get("kind").and_then(|k| k.as_str());
            let reason = v.get("reason").and_then(|r| r.as_str()).map(str::to_string);
            ok(&uc.deny(caller, inst, &segs[4], kind, reason).await?)
        }
        Op::DenyListDelete => {
            uc.allow(caller, inst, &segs[4]).await?;
            Ok(no_content())
        }
        Op::CredentialPolicyList => ok(&app.issuance.policies(&target).await?),
        Op::CredentialPolicyGet => ok(&app.issuance.policy_view(&target, &segs[4]).await?),
        Op::CredentialPolicyCa => {
            let pem = app.issuance.ca_pem(&target, &segs[4]).await?;
            Ok(Response::builder()
                .header(header::CONTENT_TYPE, "application/x-pem-file")
                .body(Body::from(pem))
                .expect("valid response"))
        }
        Op::IssuedCertificateList => {
            let limit = match param(&req.params, "limit") {
                Some(l) => l
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=MAX_LIST).contains(l))
                    .ok_or_else(|| Error::invalid(format!("limit must be 1 to {MAX_LIST}")))?,
                None => MAX_LIST,
            };
            ok(&app
                .issuance
                .list(
                    &target,
                    param(&req.params, "registrationId"),
                    param(&req.params, "status"),
                    param(&req.params, "policy"),
                    limit,
                )
                .await?)
        }
        Op::IssuedCertificateGet => ok(&app.issuance.get(&target, &segs[4]).await?),
        Op::IssuedCertificateRevoke => {
            let reason = reason(body)?;
            ok(&app
                .issuance
                .revoke(caller, &target, &segs[4], reason)
                .await?)
        }
        Op::RegistrationRevokeCertificates => {
            let reason = reason(body)?;
            ok(&app
                .issuance
                .revoke_device(caller, &target, &segs[4], reason)
                .await?)
        }
        other => Err(crate::service_api::misrouted(other)),
    }
}

/// The optional `{"reason": "..."}` of a revocation.
fn reason(body: &[u8]) -> Result<Option<String>, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| Error::invalid(format!("invalid body: {e}")))?;
    match v.get("reason") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(r)) if r.len() <= 1024 => Ok(Some(r.clone())),
        Some(_) => Err(Error::invalid(
            "'reason' must be a string of at most 1024 bytes",
        )),
    }
}

/// `GET /crl/{instance}/{policy}` (public): the DER CRL of the policy's issuing CA, for brokers
/// and hubs. Unknown instances and policies are 404.
pub async fn public_crl(app: &App, segs: &[String]) -> Response<Body> {
    let r = async {
        let inst = app
            .instances
            .by_name(&segs[1])
            .ok_or_else(|| Error::not_found("instance", &segs[1]))?;
        app.issuance.crl(&inst, &segs[2]).await
    }
    .await;
    match r {
        Ok(der) => Response::builder()
            .header(header::CONTENT_TYPE, "application/pkix-crl")
            .header(header::CACHE_CONTROL, "max-age=60")
            .body(Body::from(der))
            .expect("valid response"),
        Err(e) => crate::http::err(&e),
    }
}

//! The device API over HTTPS (protocol digest §3): register, operation status and the
//! registration status lookup, translated to [`DeviceService`] calls.

use crate::app::App;
use crate::connections::ConnKill;
use crate::http::{err, json_response, param, read_request, PeerAddr, PeerCerts};
use crate::routes::Op;
use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use dps_core::device::{DeviceCredential, DeviceRequest, DeviceResponse, DeviceService, Transport};
use dps_core::model::DeviceRegistration;
use dps_core::Error;
use futures::StreamExt;
use std::sync::Arc;

fn api_version_ok(v: &str) -> bool {
    let b = v.as_bytes();
    let date = b.len() >= 10
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b'-'
        && b[8..10].iter().all(u8::is_ascii_digit);
    date && (v.len() == 10 || &v[10..] == "-preview")
}

/// Check `api-version` (any `YYYY-MM-DD[-preview]`).
pub fn check_api_version(params: &[(String, String)]) -> Result<String, Response<Body>> {
    match param(params, "api-version") {
        Some(v) if api_version_ok(v) => Ok(v.to_string()),
        Some(v) => Err(err(&Error::invalid(format!(
            "unsupported api-version '{v}'; expected YYYY-MM-DD[-preview]"
        )))),
        None => Err(err(&Error::invalid(
            "the api-version query parameter is required",
        ))),
    }
}

fn render(resp: DeviceResponse) -> Response<Body> {
    let mut r = json_response(
        StatusCode::from_u16(resp.status).unwrap_or(StatusCode::OK),
        &resp.body,
    );
    if let Some(ra) = resp.retry_after {
        r.headers_mut().insert(
            "retry-after",
            HeaderValue::from_str(&ra.to_string()).expect("digits"),
        );
    }
    r
}

/// An injected `drop` (`docs/testing-with-dps.md`). Without `response` (stage `register`) the
/// connection closes before any answer. With it (stage `response`) the status line, the headers
/// (with the full `content-length`) and the first half of the body are sent, then the
/// connection closes.
async fn dropped(kill: ConnKill, response: Option<Response<Body>>) -> Response<Body> {
    // Bounds a request task the closed connection does not cancel (HTTP/2 streams run on
    // their own tasks): never answered in practice, the connection goes first.
    const LINGER: std::time::Duration = std::time::Duration::from_secs(30);
    let Some(resp) = response else {
        kill.kill();
        tokio::time::sleep(LINGER).await;
        return err(&Error::Dropped {
            rule: String::new(),
            response: None,
        });
    };
    let (mut parts, body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(_) => bytes::Bytes::new(),
    };
    parts.headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from_str(&bytes.len().to_string()).expect("digits"),
    );
    let first = bytes.slice(..bytes.len() / 2);
    let stream = futures::stream::iter([Ok::<_, std::io::Error>(first)]).chain(
        futures::stream::once(async move {
            // The first part is written and flushed before this runs; then the connection goes.
            kill.kill();
            tokio::time::sleep(LINGER).await;
            Err::<bytes::Bytes, _>(std::io::Error::other("connection dropped"))
        }),
    );
    Response::from_parts(parts, Body::from_stream(stream))
}

/// Handle `/{idScope}/registrations/...` (the route found in [`crate::routes`]; the device's
/// credential is checked by the registration engine).
pub async fn handle(app: &Arc<App>, req: Request<Body>, segs: &[String], op: Op) -> Response<Body> {
    let (req, api_version) = match read_request(req, app.max_body, check_api_version).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let credential = match req
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        Some(sas) => DeviceCredential::Sas(sas.to_string()),
        None => {
            let certs = req
                .extensions
                .get::<PeerCerts>()
                .map(|c| c.0.as_ref().clone())
                .unwrap_or_default();
            if certs.is_empty() {
                DeviceCredential::None
            } else {
                DeviceCredential::Certificates(certs)
            }
        }
    };
    let force =
        param(&req.params, "forceRegistration").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let body = req.body;
    let mk = |body: DeviceRegistration| DeviceRequest {
        id_scope: segs[0].clone(),
        registration_id: segs[2].clone(),
        credential: credential.clone(),
        body,
        transport: Transport::Https,
        api_version: Some(api_version.clone()),
        force_registration: force,
        peer: req.extensions.get::<PeerAddr>().map(|p| p.0.ip()),
    };
    let parse = |b: &[u8]| {
        DeviceRegistration::parse_lenient(b).map_err(|e| {
            err(&Error::invalid(format!(
                "the request body is not a valid DeviceRegistration: {e}"
            )))
        })
    };
    match op {
        Op::DeviceRegister => {
            let reg = match parse(&body) {
                Ok(r) => r,
                Err(r) => return r,
            };
            match app.engine.register(mk(reg)).await {
                Ok(resp) => render(resp),
                Err(Error::Dropped { response, .. }) => {
                    let Some(kill) = req.extensions.get::<ConnKill>().cloned() else {
                        return err(&Error::Internal("no connection to drop".into()));
                    };
                    dropped(kill, response.map(|r| render(*r))).await
                }
                Err(e) => err(&e),
            }
        }
        Op::DeviceOperationStatus => match app
            .engine
            .operation_status(mk(DeviceRegistration::default()), &segs[4])
            .await
        {
            Ok(resp) => render(resp),
            Err(e) => err(&e),
        },
        Op::DeviceRegistrationStatus => {
            let reg = match parse(&body) {
                Ok(r) => r,
                Err(r) => return r,
            };
            match app.engine.registration_status(mk(reg)).await {
                Ok(state) => json_response(StatusCode::OK, &state),
                Err(e) => err(&e),
            }
        }
        other => err(&Error::Internal(format!(
            "route operation {other:?} handed to the device API"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_versions() {
        for v in [
            "2019-03-31",
            "2021-06-01",
            "2025-07-01-preview",
            "2018-09-01-preview",
        ] {
            assert!(super::api_version_ok(v), "{v}");
        }
        for v in ["", "2019", "2019-03-31-beta", "abcd-ef-gh"] {
            assert!(!super::api_version_ok(v), "{v}");
        }
    }
}

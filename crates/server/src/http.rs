//! The HTTPS listener: our own TLS accept loop (handshake timeout, peer chain captured) feeding
//! hyper's HTTP/1.1 + HTTP/2 server, and one path router for the device API, the service API, the
//! admin API and MQTT over WebSocket. Paths are matched case-insensitively, segments are
//! percent-decoded, and a trailing slash is tolerated.

use crate::app::App;
use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use dps_core::clock::azure_timestamp;
use dps_core::wire::WireError;
use hyper_util::rt::{TokioExecutor, TokioIo};
use percent_encoding::percent_decode_str;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The TLS peer's certificate chain (DER, leaf first), empty when none was presented.
#[derive(Clone, Debug, Default)]
pub struct PeerCerts(pub Arc<Vec<Vec<u8>>>);

/// The peer's address.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// Serve HTTPS on `listener` until the task is dropped.
pub async fn serve_https(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Arc<App>,
    handshake_timeout: Duration,
    max_pending_handshakes: usize,
) {
    let tls = crate::tls::TlsListener {
        listener,
        acceptor,
        name: "https",
        handshake_timeout,
        max_pending_handshakes,
    };
    tls.serve(
        |_| Some(()),
        move |tls, certs, peer| {
            let app = app.clone();
            async move {
                let certs = PeerCerts(Arc::new(certs));
                let svc =
                    hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                        let app = app.clone();
                        req.extensions_mut().insert(certs.clone());
                        req.extensions_mut().insert(PeerAddr(peer));
                        async move {
                            Ok::<_, std::convert::Infallible>(route(app, req.map(Body::new)).await)
                        }
                    });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Err(e) = builder
                    .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
            }
        },
    )
    .await;
}

/// A JSON response with Azure's content type.
pub fn json_response<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("serializable");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(bytes))
        .expect("valid response")
}

/// The one rendering of a [`WireError`] over HTTP: status, JSON error body, `x-ms-request-id`,
/// `x-ms-error-code` and `retry-after`. Handlers call [`err`] with a domain error.
fn error_response(w: &WireError) -> Response<Body> {
    let tracking = uuid::Uuid::new_v4().to_string();
    let body = w.body(&tracking, &azure_timestamp(time::OffsetDateTime::now_utc()));
    let mut r = json_response(
        StatusCode::from_u16(w.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &body,
    );
    let h = r.headers_mut();
    h.insert(
        "x-ms-request-id",
        HeaderValue::from_str(&tracking).expect("uuid"),
    );
    h.insert(
        "x-ms-error-code",
        HeaderValue::from_str(&w.error_code.to_string()).expect("digits"),
    );
    if let Some(ra) = w.retry_after {
        h.insert(
            "retry-after",
            HeaderValue::from_str(&ra.to_string()).expect("digits"),
        );
    }
    r
}

/// Render a domain error: mapped by `dps_core::wire` (the one mapping), rendered by
/// [`error_response`].
pub fn err(e: &dps_core::Error) -> Response<Body> {
    error_response(&WireError::from(e))
}

/// Query parameters, decoded.
pub fn query_params(req_uri: &axum::http::Uri) -> Vec<(String, String)> {
    req_uri
        .query()
        .map(|q| {
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    let d = |s: &str| {
                        percent_decode_str(&s.replace('+', " "))
                            .decode_utf8_lossy()
                            .into_owned()
                    };
                    (d(k), d(v))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// First value of a query parameter (name case-insensitive).
pub fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Read the body up to the configured limit.
pub async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, Response<Body>> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| err(&dps_core::Error::PayloadTooLarge { limit }))
}

fn is_ws_upgrade(h: &HeaderMap) -> bool {
    h.get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Route one request.
pub async fn route(app: Arc<App>, req: Request<Body>) -> Response<Body> {
    let started = std::time::Instant::now();
    if is_ws_upgrade(req.headers()) {
        return websocket(app, req).await;
    }
    let path = req.uri().path().to_string();
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let lower: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    let method = req.method().clone();
    let (area, resp) = match l.first().copied() {
        Some("enrollments") | Some("enrollmentgroups") | Some("registrations") => (
            "service",
            crate::service_api::handle(&app, req, &segs, &l).await,
        ),
        Some("admin") => (
            "admin",
            crate::admin_api::handle(&app, req, &segs, &l).await,
        ),
        Some("openapi.json") if method == Method::GET => ("docs", openapi()),
        Some("healthz") if method == Method::GET => (
            "health",
            json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        ),
        Some(_) if l.get(1) == Some(&"registrations") => (
            "device",
            crate::device_api::handle(&app, req, &segs, &l).await,
        ),
        _ => (
            "unknown",
            err(&dps_core::Error::NoRoute(format!(
                "no route for {method} {path}"
            ))),
        ),
    };
    metrics::histogram!("dps_http_request_duration_seconds", "area" => area, "status" => status_class(resp.status())).record(started.elapsed().as_secs_f64());
    resp
}

fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        200..=299 => "2xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

fn openapi() -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(include_str!("../../../docs/openapi.json")))
        .expect("valid response")
}

async fn websocket(app: Arc<App>, req: Request<Body>) -> Response<Body> {
    let certs = req
        .extensions()
        .get::<PeerCerts>()
        .cloned()
        .unwrap_or_default();
    let (mut parts, _body) = req.into_parts();
    let mut ws =
        match axum::extract::ws::WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(ws) => ws,
            Err(rej) => return axum::response::IntoResponse::into_response(rej),
        };
    let offered: Option<HeaderValue> = ws
        .requested_protocols()
        .find(|p| p.to_str().is_ok_and(|s| s.eq_ignore_ascii_case("mqtt")))
        .cloned();
    let Some(proto) = offered else {
        return err(&dps_core::Error::invalid(
            "WebSocket subprotocol 'mqtt' is required",
        ));
    };
    ws.set_selected_protocol(proto);
    ws.on_upgrade(move |socket| async move {
        crate::mqtt_front::serve_ws(app, socket, certs.0.as_ref().clone()).await
    })
}

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

/// A request's path as the handlers match it.
#[derive(Clone, Copy)]
pub struct Path<'a> {
    /// The segments, percent-decoded.
    pub segs: &'a [String],
    /// The same, lowercased (what routes match on).
    pub l: &'a [&'a str],
}

/// A request as the device, service and admin handlers see it: method, headers, extensions,
/// the decoded query parameters and the body (read up to the handler's limit).
pub struct Incoming {
    /// Method.
    pub method: Method,
    /// Headers.
    pub headers: HeaderMap,
    /// Extensions ([`PeerCerts`], [`PeerAddr`]).
    pub extensions: axum::http::Extensions,
    /// Query parameters, decoded.
    pub params: Vec<(String, String)>,
    /// The body.
    pub body: bytes::Bytes,
}

/// The handlers' shared prologue: decode the query parameters, run `precheck` on them (what a
/// handler refuses before reading the body, e.g. the `api-version`), then read the body up to
/// `limit`. `Err` is the response to send.
pub async fn read_request<P>(
    req: Request<Body>,
    limit: usize,
    precheck: impl FnOnce(&[(String, String)]) -> Result<P, Response<Body>>,
) -> Result<(Incoming, P), Response<Body>> {
    let params = query_params(req.uri());
    let checked = precheck(&params)?;
    let (parts, body) = req.into_parts();
    let body = read_body(body, limit).await?;
    let incoming = Incoming {
        method: parts.method,
        headers: parts.headers,
        extensions: parts.extensions,
        params,
        body,
    };
    Ok((incoming, checked))
}

/// A handler around [`read_request`]: call `inner` with the request, answer its response or
/// render its error (logging store and internal failures as `"{area} API failed"`).
pub async fn respond<F, Fut>(
    req: Request<Body>,
    limit: usize,
    area: &str,
    precheck: impl FnOnce(&[(String, String)]) -> Result<(), Response<Body>>,
    inner: F,
) -> Response<Body>
where
    F: FnOnce(Incoming) -> Fut,
    Fut: std::future::Future<Output = Result<Response<Body>, dps_core::Error>>,
{
    let (incoming, ()) = match read_request(req, limit, precheck).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match inner(incoming).await {
        Ok(r) => r,
        Err(e) => {
            if matches!(e, dps_core::Error::Store(_) | dps_core::Error::Internal(_)) {
                tracing::error!(error = %e, "{area} API failed");
            }
            err(&e)
        }
    }
}

/// An empty `204 No Content`.
pub fn no_content() -> Response<Body> {
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Body::empty())
        .expect("valid response")
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
            api(&app, req, Path { segs: &segs, l: &l }, false).await,
        ),
        Some("admin") => (
            "admin",
            api(&app, req, Path { segs: &segs, l: &l }, true).await,
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

/// The service API (`api-version` checked before the body is read; bodies up to 11 ×
/// `max_body`, as bulk operations carry up to ten enrollments) or the admin API, behind
/// [`respond`].
async fn api(app: &App, req: Request<Body>, path: Path<'_>, admin: bool) -> Response<Body> {
    let area = if admin { "admin" } else { "service" };
    let limit = if admin {
        app.max_body
    } else {
        app.max_body * 11
    };
    let precheck = |params: &[(String, String)]| {
        if admin {
            Ok(())
        } else {
            crate::device_api::check_api_version(params).map(drop)
        }
    };
    respond(req, limit, area, precheck, |req| async move {
        if admin {
            crate::admin_api::handle(app, &req, path).await
        } else {
            crate::service_api::handle(app, &req, path).await
        }
    })
    .await
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
    let peer = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
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
        crate::mqtt_front::serve_ws(app, socket, peer, certs.0.as_ref().clone()).await
    })
}

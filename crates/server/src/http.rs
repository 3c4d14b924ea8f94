//! The HTTPS listener: our own TLS accept loop (handshake timeout, peer chain captured) feeding
//! hyper's HTTP/1.1 + HTTP/2 server, and one path router for the device API, the service API, the
//! admin API and MQTT over WebSocket. Paths are matched case-insensitively, segments are
//! percent-decoded, and a trailing slash is tolerated.

use crate::app::App;
use crate::routes::{self, Access, Family, Op, Route};
use crate::usecases::Caller;
use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use dps_core::clock::azure_timestamp;
use dps_core::instance::Right;
use dps_core::wire::WireError;
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

/// Serve HTTPS on `listener` until the task is dropped: at most `conn.slots.max()`
/// connections at once (beyond: closed before the handshake), each served by
/// [`crate::connections::serve_http`] under `conn.http`'s deadlines and header limits.
pub async fn serve_https(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Arc<App>,
    handshake_timeout: Duration,
    max_pending_handshakes: usize,
    conn: HttpsConnections,
) {
    let tls = crate::tls::TlsListener {
        listener,
        acceptor,
        name: "https",
        handshake_timeout,
        max_pending_handshakes,
        faults: Some(app.engine.clone()),
    };
    let HttpsConnections { slots, http, ws } = conn;
    let http = Arc::new(http);
    tls.serve(
        move |peer| {
            let slot = slots.try_acquire(crate::connections::listener::HTTPS);
            if slot.is_none() {
                tracing::debug!(%peer, "HTTPS connection refused: max_https_connections reached");
            }
            slot
        },
        move |tls, certs, peer| {
            let app = app.clone();
            let http = http.clone();
            let ws = ws.clone();
            async move {
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let certs = PeerCerts(Arc::new(certs));
                let handler = move |mut req: Request<Body>| {
                    let app = app.clone();
                    req.extensions_mut().insert(certs.clone());
                    req.extensions_mut().insert(PeerAddr(peer));
                    req.extensions_mut().insert(ws.clone());
                    route(app, req)
                };
                crate::connections::serve_http(
                    tls,
                    h2,
                    &http,
                    crate::connections::listener::HTTPS,
                    handler,
                )
                .await;
            }
        },
    )
    .await;
}

/// The connection limits of the HTTPS listener.
#[derive(Clone, Debug)]
pub struct HttpsConnections {
    /// Its connection cap (`max_https_connections`).
    pub slots: crate::connections::Slots,
    /// Deadlines and header limits per connection.
    pub http: crate::connections::HttpLimits,
    /// MQTT over WebSocket: the MQTT connection cap and the message size.
    pub ws: crate::connections::WsSettings,
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
    if let Some((status, body)) = dps_core::wire::tpm_challenge(e) {
        return json_response(
            StatusCode::from_u16(status).unwrap_or(StatusCode::UNAUTHORIZED),
            &body,
        );
    }
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

/// Route one request: find its [`Route`](crate::routes::Route) in the one table, authorize it
/// there (service and admin routes: the service SAS token and the route's right, before the
/// body is read), then hand it to its API's handler.
pub async fn route(app: Arc<App>, req: Request<Body>) -> Response<Body> {
    let started = std::time::Instant::now();
    if is_ws_upgrade(req.headers()) {
        return Box::pin(websocket(app, req)).await;
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
    let family = routes::family_of(&l);
    let found = family.and_then(|f| routes::find(f, &method, &l));
    let p = Path { segs: &segs, l: &l };
    let (area, resp) = match (family, found) {
        (_, Some(r)) => (area_of(r), dispatch(&app, req, r, p).await),
        (Some(Family::Service), None) => (
            "service",
            err(&dps_core::Error::Unsupported(format!(
                "no service API route for {method} /{}",
                segs.join("/")
            ))),
        ),
        // Unknown admin paths are only described to ServiceConfig callers.
        (Some(Family::Admin), None) => (
            "admin",
            match routes::authorize(&app, req.headers(), &l, Right::ServiceConfig) {
                Ok(_) => err(&dps_core::Error::Unsupported(format!(
                    "no admin API route for {method} /{}",
                    segs.join("/")
                ))),
                Err(e) => err(&e),
            },
        ),
        (Some(Family::Device), None) => (
            "device",
            err(&dps_core::Error::NoRoute(format!(
                "no device API route for {method} {}",
                segs.join("/")
            ))),
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

fn area_of(r: &Route) -> &'static str {
    match (r.family, r.op) {
        (Family::Device, _) => "device",
        (Family::Service, _) => "service",
        (Family::Admin | Family::Certificates, _) => "admin",
        (Family::Public, Op::OpenApi) => "docs",
        (Family::Public, Op::Crl) => "crl",
        (Family::Public, _) => "health",
        (Family::BrokerAuth, _) => "broker_auth",
    }
}

/// Authorize a matched route and run it.
async fn dispatch(
    app: &Arc<App>,
    req: Request<Body>,
    route: &'static Route,
    path: Path<'_>,
) -> Response<Body> {
    match route.access {
        Access::Public => match route.op {
            Op::OpenApi => openapi(),
            Op::Crl => Box::pin(crate::certificates::public_crl(app, path.segs)).await,
            _ => json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        },
        Access::Device => crate::device_api::handle(app, req, path.segs, route.op).await,
        Access::Broker => match route.op {
            Op::BrokerAuth(check) => {
                Box::pin(crate::broker_auth_api::handle(app, req, path.segs, check)).await
            }
            _ => err(&dps_core::Error::NoRoute(route.name())),
        },
        Access::Right(right) => {
            // Central authorization: the token and the right, before the body is read.
            let caller = match routes::authorize(app, req.headers(), path.l, right) {
                Ok(c) => c,
                Err(e) => return err(&e),
            };
            // Boxed (as the other families but the device API): the service and admin APIs'
            // futures are large, and this one is moved on every request.
            Box::pin(api(app, req, path, route, caller)).await
        }
    }
}

/// The service API (`api-version` checked before the body is read; bodies up to 11 ×
/// `max_body`, as bulk operations carry up to ten enrollments) or the admin API, behind
/// [`respond`], for an authorized caller.
async fn api(
    app: &App,
    req: Request<Body>,
    path: Path<'_>,
    route: &'static Route,
    caller: Caller,
) -> Response<Body> {
    let service = route.family == Family::Service;
    let (area, limit) = if service {
        ("service", app.max_body * 11)
    } else {
        ("admin", app.max_body)
    };
    let precheck = |params: &[(String, String)]| {
        if service {
            crate::device_api::check_api_version(params).map(drop)
        } else {
            Ok(())
        }
    };
    respond(req, limit, area, precheck, |req| async move {
        match route.family {
            Family::Service => crate::service_api::handle(app, &req, path, route.op, &caller).await,
            Family::Certificates => {
                crate::certificates::handle(app, &caller, &req, path, route.op).await
            }
            _ => crate::admin_api::handle(app, &req, path, route.op, &caller).await,
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

/// Whether `path` is one the Azure SDKs open MQTT over WebSocket on: `/$iothub/websocket` (C,
/// Node, Python; matched like every route: case-insensitively, percent-decoded, trailing slash
/// tolerated) or `/` (C#, and Java's Paho given no path).
fn is_websocket_path(path: &str) -> bool {
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_decode_str(s)
                .decode_utf8_lossy()
                .to_ascii_lowercase()
        })
        .collect();
    segs.is_empty() || segs == ["$iothub", "websocket"]
}

async fn websocket(app: Arc<App>, req: Request<Body>) -> Response<Body> {
    if !is_websocket_path(req.uri().path()) {
        return err(&dps_core::Error::NoRoute(format!(
            "no WebSocket endpoint at {}; MQTT and AMQP over WebSocket are served at /$iothub/websocket",
            req.uri().path()
        )));
    }
    let certs = req
        .extensions()
        .get::<PeerCerts>()
        .cloned()
        .unwrap_or_default();
    let settings = req
        .extensions()
        .get::<crate::connections::WsSettings>()
        .cloned();
    let peer = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
    let (mut parts, _body) = req.into_parts();
    let mut ws =
        match axum::extract::ws::WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(ws) => ws,
            Err(rej) => return axum::response::IntoResponse::into_response(rej),
        };
    // The subprotocol tells MQTT and AMQP apart on the same path.
    let offered: Option<(HeaderValue, bool)> = ws.requested_protocols().find_map(|p| {
        let s = p.to_str().ok()?;
        if s.eq_ignore_ascii_case("mqtt") {
            Some((p.clone(), false))
        } else if s.eq_ignore_ascii_case("AMQPWSB10") {
            Some((p.clone(), true))
        } else {
            None
        }
    });
    let Some((proto, amqp)) = offered else {
        return err(&dps_core::Error::invalid(
            "WebSocket subprotocol 'mqtt' or 'AMQPWSB10' is required",
        ));
    };
    // The MQTT (or AMQP) connection cap covers WebSocket connections too; the place is taken
    // before the upgrade and held by the upgraded connection.
    let (slot, max_message) = match &settings {
        Some(s) => {
            let (slots, listener, what) = if amqp {
                (
                    &s.amqp_slots,
                    crate::connections::listener::AMQP_WS,
                    "max_amqp_connections",
                )
            } else {
                (
                    &s.slots,
                    crate::connections::listener::MQTT_WS,
                    "max_mqtt_connections",
                )
            };
            match slots.try_acquire(listener) {
                Some(slot) => (Some(slot), s.max_message_bytes),
                None => {
                    tracing::debug!("WebSocket connection refused: {what} reached");
                    return err(&dps_core::Error::Throttled { retry_after: 10 });
                }
            }
        }
        None => (None, crate::config::Limits::default().ws_max_message_bytes),
    };
    ws.set_selected_protocol(proto);
    // Before authentication a client must not make us buffer more than one packet's or
    // frame's worth (the library's default is 64 MiB per message).
    ws.max_message_size(max_message)
        .max_frame_size(max_message)
        .on_upgrade(move |socket| async move {
            let certs = certs.0.as_ref().clone();
            if amqp {
                crate::amqp_front::serve_ws(app, socket, peer, certs, slot).await
            } else {
                crate::mqtt_front::serve_ws(app, socket, peer, certs, slot).await
            }
        })
}

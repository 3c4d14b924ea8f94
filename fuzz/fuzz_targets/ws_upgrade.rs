//! Raw bytes on an accepted HTTPS connection of the real server (after TLS, which is rustls's):
//! the HTTP/1.1 head limits and deadlines of `connections::serve_http`, the router, the
//! WebSocket upgrade rules and MQTT over WebSocket, and a signed device registration with a
//! fuzzed body. The first input byte selects the mode:
//!   0: the bytes as they come;
//!   1: a valid upgrade head for `/$iothub/websocket`, then the bytes (WebSocket frames);
//!   2: a device `register` request signed for an existing enrollment, the bytes as its body;
//!   3: the bytes as a request path, in an upgrade head.
//! Must never panic or hang (libFuzzer's -timeout catches a hang).
#![no_main]

use dps_server::config::Config;
use dps_server::connections::{HttpLimits, Slots, WsSettings};
use dps_server::http::{route, PeerAddr, PeerCerts};
use dps_server::server::Server;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct World {
    rt: tokio::runtime::Runtime,
    server: Server,
    limits: HttpLimits,
    ws: WsSettings,
    /// Authorization header of the registration of `fuzz-dev`.
    device_auth: String,
    scope: String,
}

const KEY: &str = "ZnV6ei1kZXZpY2Uta2V5LTMyLWJ5dGVzLWxvbmchIQ==";

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = std::env::temp_dir().join(format!("dps-fuzz-ws-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = Config::default();
        cfg.data_dir = dir;
        cfg.listen.https = "127.0.0.1:0".into();
        cfg.listen.mqtt = String::new();
        cfg.listen.admin = String::new();
        let server = rt.block_on(dps_server::server::start(cfg)).expect("server starts");
        let (_, scope, cs) = server.instances[0].clone();
        let cs = cs.expect("owner connection string");
        let owner_key = cs
            .split(';')
            .find_map(|kv| kv.strip_prefix("SharedAccessKey="))
            .expect("key in the connection string")
            .to_string();
        // One enrollment, created through the service API as a client would.
        let service =
            dps_core::sas::sign_token("localhost", &owner_key, Some("provisioningserviceowner"), 4_000_000_000)
                .expect("service token");
        let body = serde_json::json!({
            "registrationId": "fuzz-dev",
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}},
        });
        let req = http::Request::builder()
            .method("PUT")
            .uri("/enrollments/fuzz-dev?api-version=2021-10-01")
            .header("host", "localhost")
            .header("authorization", service)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_string()))
            .expect("request");
        let app = server.app.clone();
        let resp = rt.block_on(route(app, with_extensions(req, None)));
        assert!(resp.status().is_success(), "enrollment created: {}", resp.status());
        let device_auth = dps_core::sas::sign_token(
            &format!("{scope}/registrations/fuzz-dev"),
            KEY,
            Some("registration"),
            4_000_000_000,
        )
        .expect("device token");
        World {
            rt,
            server,
            limits: HttpLimits {
                header_timeout: Duration::from_millis(300),
                idle_timeout: Duration::from_millis(300),
                body_timeout: Duration::from_millis(300),
                max_headers: 100,
                max_header_bytes: 16384,
            },
            ws: WsSettings {
                slots: Slots::new(1000),
                amqp_slots: Slots::new(1000),
                max_message_bytes: 131072,
            },
            device_auth,
            scope,
        }
    })
}

fn with_extensions(
    mut req: http::Request<axum::body::Body>,
    ws: Option<&WsSettings>,
) -> http::Request<axum::body::Body> {
    req.extensions_mut().insert(PeerCerts::default());
    req.extensions_mut()
        .insert(PeerAddr("127.0.0.1:40000".parse().expect("address")));
    if let Some(ws) = ws {
        req.extensions_mut().insert(ws.clone());
    }
    req
}

const UPGRADE: &str = "Host: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: WWaQ1KjqpWF9Rqy5Gc49/Q==\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let w = world();
    let mut input = Vec::with_capacity(rest.len() + 512);
    match sel % 4 {
        0 => {}
        1 => input.extend_from_slice(format!("GET /$iothub/websocket HTTP/1.1\r\n{UPGRADE}").as_bytes()),
        2 => input.extend_from_slice(
            format!(
                "PUT /{}/registrations/fuzz-dev/register?api-version=2021-06-01 HTTP/1.1\r\n\
                 Host: localhost\r\nContent-Type: application/json\r\nAuthorization: {}\r\n\
                 Content-Length: {}\r\n\r\n",
                w.scope,
                w.device_auth,
                rest.len()
            )
            .as_bytes(),
        ),
        _ => {
            let Ok(path) = std::str::from_utf8(rest) else {
                return;
            };
            if path.contains(['\r', '\n', ' ']) {
                return;
            }
            input.extend_from_slice(format!("GET {path} HTTP/1.1\r\n{UPGRADE}").as_bytes());
        }
    }
    if sel % 4 != 3 {
        input.extend_from_slice(rest);
    }
    w.rt.block_on(async {
        let (mut client, server_io) = tokio::io::duplex(256 * 1024);
        let app = w.server.app.clone();
        let ws = w.ws.clone();
        let handler = move |req: http::Request<axum::body::Body>| {
            let app = app.clone();
            route(app, with_extensions(req, Some(&ws)))
        };
        let serve = tokio::spawn(dps_server::connections::serve_http(
            server_io,
            false,
            &w.limits,
            dps_server::connections::listener::HTTPS,
            handler,
        ));
        let exchange = async {
            client.write_all(&input).await?;
            client.shutdown().await?;
            let mut out = Vec::new();
            client.read_to_end(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        // The connection's own deadlines (300 ms) end every exchange well within this.
        let _ = tokio::time::timeout(Duration::from_secs(5), exchange).await;
        serve.abort();
        let _ = serve.await;
    });
    let _ = Arc::strong_count(&w.server.app);
});

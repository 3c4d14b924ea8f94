//! Connection limits on the open internet: the HTTPS listener's deadlines (request head, idle
//! keep-alive, request body), its connection cap and header limits, and MQTT over WebSocket's
//! path, message size and share of `max_mqtt_connections`. Real TLS sockets against the real
//! server on port 0; deadlines are configured short and every wait is bounded.

use crate::support::*;
use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The longest any test waits for the server to act.
const PATIENCE: Duration = Duration::from_secs(10);

type Tls = TlsStream<TcpStream>;

/// A TLS connection (no ALPN: HTTP/1.1) to `port`, trusting the server's development CA.
async fn tls_connect(ca_pem: &str, port: u16) -> std::io::Result<Tls> {
    tls_connect_alpn(ca_pem, port, &[]).await
}

async fn tls_connect_alpn(ca_pem: &str, port: u16, alpn: &[&[u8]]) -> std::io::Result<Tls> {
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(ca_pem.as_bytes()).expect("ca");
    roots.add(der).expect("root");
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut cfg = cfg;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
}

async fn https(s: &TestServer) -> Tls {
    tls_connect(&s.ca_pem, s.server.https.port())
        .await
        .expect("TLS connection")
}

/// Read until the server closes the connection (EOF or an error such as a reset); returns how
/// long that took. Panics if it is still open after [`PATIENCE`].
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(io: &mut S, what: &str) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "{what}: the connection is still open after {PATIENCE:?}"
    );
    start.elapsed()
}

/// One HTTP/1.1 response: status, head text, body (by Content-Length).
async fn read_response<S: tokio::io::AsyncRead + Unpin>(io: &mut S) -> (u16, String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                    let status = head
                        .split(' ')
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    return (status, head, body);
                }
            }
            let n = io.read(&mut chunk).await.expect("read response");
            assert!(
                n > 0,
                "connection closed before a full response: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("a response in time")
}

/// Poll the metrics until `metric{labels}` is above `before`.
async fn metric_rises(s: &TestServer, metric: &str, labels: &[(&str, &str)], before: f64) {
    eventually(PATIENCE, || async {
        let now = sample(&scrape(s).await, metric, labels);
        if now > before {
            Ok(())
        } else {
            Err(format!("{metric} {labels:?} = {now}, was {before}"))
        }
    })
    .await
}

// ------------------------------------------------------------------------------ HTTPS

#[tokio::test]
async fn a_half_sent_request_head_is_closed_at_the_head_deadline() {
    let s = TestServer::spawn_with(|c| {
        c.limits.http_header_timeout_ms = 400;
        c.limits.http_idle_timeout_ms = 60_000;
    })
    .await;
    let label = [("listener", "https"), ("reason", "head_timeout")];
    let before = sample(&scrape(&s).await, "dps_connections_closed_total", &label);

    // Half a header line, then nothing.
    let mut half = https(&s).await;
    half.write_all(
        b"PUT /0ne00000T01/registrations/x/register HTTP/1.1\r\nHost: localhost\r\nX-Half: ab",
    )
    .await
    .unwrap();
    let took = closed_within(&mut half, "half a head").await;
    assert!(
        took >= Duration::from_millis(300),
        "closed too early: {took:?}"
    );

    // A connection that completes the TLS handshake and sends nothing at all.
    let mut silent = https(&s).await;
    closed_within(&mut silent, "no request").await;

    // A head trickled one byte at a time: progress does not extend the deadline.
    let mut slow = https(&s).await;
    let trickle = async {
        // Pacing the client (a slowloris), not waiting for the server.
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        for b in b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
            .iter()
            .cycle()
        {
            tick.tick().await;
            if slow.write_all(&[*b]).await.is_err() {
                return;
            }
        }
    };
    assert!(
        tokio::time::timeout(PATIENCE, trickle).await.is_ok(),
        "a trickled head is still being accepted after {PATIENCE:?}"
    );

    metric_rises(&s, "dps_connections_closed_total", &label, before + 2.0).await;

    // A complete request in time is still answered.
    let r = s
        .call(reqwest::Method::GET, "/healthz", None, None, &[])
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn an_unfinished_tls_handshake_is_closed_at_the_handshake_deadline() {
    let s = TestServer::spawn_with(|c| c.limits.tls_handshake_timeout_ms = 300).await;
    let mut tcp = TcpStream::connect(s.server.https).await.unwrap();
    // The first bytes of a TLS record header, never completed.
    tcp.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    closed_within(&mut tcp, "an unfinished handshake").await;
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_at_the_idle_timeout() {
    let s = TestServer::spawn_with(|c| {
        c.limits.http_header_timeout_ms = 200;
        c.limits.http_idle_timeout_ms = 1500;
    })
    .await;
    let label = [("listener", "https"), ("reason", "idle_timeout")];
    let before = sample(&scrape(&s).await, "dps_connections_closed_total", &label);
    let mut c = https(&s).await;
    for _ in 0..2 {
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let (status, head, _) = read_response(&mut c).await;
        assert_eq!(status, 200, "{head}");
    }
    let took = closed_within(&mut c, "an idle kept-alive connection").await;
    // The idle timeout, not the (shorter) head deadline, applies between requests.
    assert!(
        took >= Duration::from_millis(1200),
        "closed after {took:?}: before the idle timeout"
    );
    metric_rises(&s, "dps_connections_closed_total", &label, before).await;
}

#[tokio::test]
async fn http2_is_served_and_an_idle_http2_connection_is_closed_at_the_idle_timeout() {
    let s = TestServer::spawn_with(|c| {
        c.limits.http_header_timeout_ms = 200;
        c.limits.http_idle_timeout_ms = 1500;
    })
    .await;
    let tls = tls_connect_alpn(&s.ca_pem, s.server.https.port(), &[b"h2"])
        .await
        .expect("TLS");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("HTTP/2 handshake");
    let conn = tokio::spawn(conn);
    for _ in 0..2 {
        let req = hyper::Request::get("https://localhost/healthz")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.expect("HTTP/2 response");
        assert_eq!(resp.status(), 200);
    }
    let start = Instant::now();
    let ended = tokio::time::timeout(PATIENCE, conn).await;
    let took = start.elapsed();
    assert!(
        ended.is_ok(),
        "the idle HTTP/2 connection is still open after {PATIENCE:?}"
    );
    assert!(
        took >= Duration::from_millis(1200),
        "closed after {took:?}: before the idle timeout"
    );
}

#[tokio::test]
async fn a_slow_request_body_is_answered_400_and_the_connection_closed() {
    let s = TestServer::spawn_with(|c| c.limits.http_body_timeout_ms = 300).await;
    let mut c = https(&s).await;
    c.write_all(
        format!(
            "PUT /{SCOPE}/registrations/slow-body/register?api-version=2019-03-31 HTTP/1.1\r\n\
             Host: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n\
             {{\"regist"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (status, head, body) = read_response(&mut c).await;
    assert_eq!(status, 400, "{head}\n{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
    assert_eq!(v["errorCode"], 400004, "{v}");
    assert!(
        v["trackingId"].is_string() && v["message"].is_string(),
        "{v}"
    );
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    closed_within(&mut c, "after a body timeout").await;
}

#[tokio::test]
async fn the_https_connection_cap_refuses_beyond_it_and_counts_the_refusal() {
    let s = TestServer::spawn_with(|c| c.limits.max_https_connections = 2).await;
    let label = [("listener", "https"), ("reason", "limit")];
    let before = sample(&scrape(&s).await, "dps_connections_refused_total", &label);
    let held = [https(&s).await, https(&s).await];
    // The third is closed before its handshake.
    assert!(
        tls_connect(&s.ca_pem, s.server.https.port()).await.is_err(),
        "a TLS handshake beyond max_https_connections succeeded"
    );
    metric_rises(&s, "dps_connections_refused_total", &label, before).await;

    // A place freed is a place available again.
    drop(held);
    eventually(PATIENCE, || async {
        let Ok(mut c) = tls_connect(&s.ca_pem, s.server.https.port()).await else {
            return Err("refused".to_string());
        };
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        if text.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(format!("answer: {text:?}"))
        }
    })
    .await;
}

#[tokio::test]
async fn too_many_or_too_large_request_headers_get_431() {
    let s = TestServer::spawn_with(|c| {
        c.limits.max_header_count = 20;
        c.limits.max_header_bytes = 8192;
    })
    .await;
    let label = [("listener", "https"), ("reason", "header_limit")];
    let before = sample(&scrape(&s).await, "dps_connections_closed_total", &label);
    let request = |extra: String| {
        format!("GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n")
    };
    let many: String = (0..30).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (head, _) = s.raw_exchange(&request(many)).await;
    assert!(head.starts_with("HTTP/1.1 431"), "30 headers: {head}");

    let large = format!("X-Big: {}\r\n", "a".repeat(10_000));
    let (head, _) = s.raw_exchange(&request(large)).await;
    assert!(head.starts_with("HTTP/1.1 431"), "10 kB header: {head}");

    // Within both limits: answered.
    let fine: String = (0..15)
        .map(|i| format!("X-H{i}: {}\r\n", "v".repeat(300)))
        .collect();
    let (head, _) = s.raw_exchange(&request(fine)).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "15 headers, 4.5 kB: {head}"
    );

    metric_rises(&s, "dps_connections_closed_total", &label, before + 1.0).await;
}

// ------------------------------------------------------------------ MQTT over WebSocket

/// The WebSocket upgrade on `path` with subprotocol `mqtt`, over TLS.
async fn ws_connect(
    s: &TestServer,
    path: &str,
) -> Result<tokio_tungstenite::WebSocketStream<Tls>, tokio_tungstenite::tungstenite::Error> {
    let tls = https(s).await;
    let mut req = format!("wss://localhost:{}{path}", s.server.https.port())
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    tokio_tungstenite::client_async(req, tls)
        .await
        .map(|(ws, _)| ws)
}

struct WsMqtt {
    ws: tokio_tungstenite::WebSocketStream<Tls>,
    buf: BytesMut,
}

impl WsMqtt {
    async fn send(&mut self, p: Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).expect("encode");
        self.ws
            .send(Message::Binary(b.freeze()))
            .await
            .expect("send");
    }

    async fn recv(&mut self) -> Packet {
        let read = async {
            loop {
                if let Ok(p) = Packet::read(&mut self.buf, usize::MAX) {
                    return p;
                }
                match self.ws.next().await {
                    Some(Ok(Message::Binary(b))) => self.buf.extend_from_slice(&b),
                    Some(Ok(_)) => {}
                    other => panic!("WebSocket ended: {other:?}"),
                }
            }
        };
        tokio::time::timeout(PATIENCE, read)
            .await
            .expect("a packet in time")
    }

    async fn recv_publish(&mut self) -> Publish {
        loop {
            if let Packet::Publish(p) = self.recv().await {
                return p;
            }
        }
    }
}

/// Register `rid` over MQTT over WebSocket on `path`; returns the final status topic and body.
async fn register_over_ws(
    s: &TestServer,
    path: &str,
    rid: &str,
    key: &str,
) -> (String, serde_json::Value) {
    let ws = ws_connect(s, path).await.expect("upgrade");
    let mut m = WsMqtt {
        ws,
        buf: BytesMut::new(),
    };
    let mut c = Connect::new(rid);
    c.keep_alive = 60;
    c.set_login(
        format!("{SCOPE}/registrations/{rid}/api-version=2019-03-31"),
        device_token(SCOPE, rid, key),
    );
    m.send(Packet::Connect(c)).await;
    match m.recv().await {
        Packet::ConnAck(a) => {
            assert_eq!(a.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success)
        }
        p => panic!("expected CONNACK, got {p:?}"),
    }
    let mut sub = Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce);
    sub.pkid = 1;
    m.send(Packet::Subscribe(sub)).await;
    assert!(matches!(m.recv().await, Packet::SubAck(_)));
    m.send(Packet::Publish(Publish::new(
        "$dps/registrations/PUT/iotdps-register/?$rid=1",
        QoS::AtMostOnce,
        json!({ "registrationId": rid }).to_string(),
    )))
    .await;
    let mut p = m.recv_publish().await;
    let deadline = Instant::now() + PATIENCE;
    let mut rid_n = 1;
    while p.topic.starts_with("$dps/registrations/res/202/") {
        assert!(
            Instant::now() < deadline,
            "still assigning after {PATIENCE:?}"
        );
        let body: serde_json::Value = serde_json::from_slice(&p.payload).expect("JSON");
        let op = body["operationId"]
            .as_str()
            .expect("operationId")
            .to_string();
        rid_n += 1;
        m.send(Packet::Publish(Publish::new(
            format!(
                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid_n}&operationId={op}"
            ),
            QoS::AtMostOnce,
            Vec::new(),
        )))
        .await;
        p = m.recv_publish().await;
    }
    (
        p.topic.clone(),
        serde_json::from_slice(&p.payload).expect("JSON"),
    )
}

#[tokio::test]
async fn mqtt_over_websocket_registers_on_the_sdk_paths_and_other_paths_get_404() {
    let s = TestServer::spawn().await;
    let key = s.enroll("ws-dev", json!({})).await;
    // C, Node and Python; C# (and Java's Paho given no path).
    for path in ["/$iothub/websocket", "/"] {
        let (topic, body) = register_over_ws(&s, path, "ws-dev", &key).await;
        assert!(
            topic.starts_with("$dps/registrations/res/200/"),
            "{path}: {topic} {body}"
        );
        assert_eq!(body["status"], "assigned", "{path}: {body}");
    }
    for path in ["/mqtt", "/$iothub/websocket/x", "/enrollments"] {
        match ws_connect(&s, path).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 404, "{path}");
                let body: serde_json::Value =
                    serde_json::from_slice(r.body().as_deref().unwrap_or_default())
                        .expect("Azure error body");
                assert_eq!(
                    body["errorCode"].as_u64().map(|c| c / 1000),
                    Some(404),
                    "{body}"
                );
            }
            Err(e) => panic!("{path}: {e}"),
            Ok(_) => panic!("{path}: the upgrade was accepted"),
        }
    }
    // And HTTPS registration still works.
    assert_eq!(s.register("ws-dev", &key, None).await.status, 200);
}

#[tokio::test]
async fn an_oversized_websocket_frame_before_connect_closes_the_connection() {
    let s = TestServer::spawn().await;
    let mut c = https(&s).await;
    c.write_all(
        b"GET /$iothub/websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .await
    .unwrap();
    let (status, head, _) = read_response(&mut c).await;
    assert_eq!(status, 101, "{head}");
    // A binary frame announcing 200,000 bytes (over ws_max_message_bytes, 131072), masked as
    // a client's must be, with only its first bytes sent: the server must not wait to buffer
    // it (it would otherwise wait until the MQTT connect timeout, 10 s).
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&200_000u64.to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend_from_slice(&[0u8; 1000]);
    c.write_all(&frame).await.unwrap();
    let took = closed_within(&mut c, "an oversized frame").await;
    assert!(took < Duration::from_secs(5), "closed only after {took:?}");
}

#[tokio::test]
async fn websocket_connections_count_against_max_mqtt_connections() {
    let s = TestServer::spawn_with(|c| c.limits.max_mqtt_connections = 1).await;
    let label = [("listener", "mqtt_ws"), ("reason", "limit")];
    let before = sample(&scrape(&s).await, "dps_connections_refused_total", &label);
    let held = ws_connect(&s, "/$iothub/websocket").await.expect("first");
    match ws_connect(&s, "/$iothub/websocket").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 429),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a second WebSocket was accepted beyond max_mqtt_connections = 1"),
    }
    metric_rises(&s, "dps_connections_refused_total", &label, before).await;
    // The MQTT-over-TLS listener shares the cap: closed before its handshake.
    let mqtt_port = s.server.mqtt.expect("mqtt").port();
    assert!(
        tls_connect(&s.ca_pem, mqtt_port).await.is_err(),
        "an MQTT-over-TLS handshake succeeded while a WebSocket held the only place"
    );
    drop(held);
    eventually(PATIENCE, || async {
        ws_connect(&s, "/$iothub/websocket")
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await;
}

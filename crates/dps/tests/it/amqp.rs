//! The device API over AMQP 1.0: the Node SDK's captured AMQP exchanges
//! (`device-node-amqp-*.json`) replayed with a real AMQP client (`fe2o3-amqp`, through
//! `dps_device::amqp`) against the real server over TLS and over WebSocket. Our answers must
//! carry what the SDK read in the capture: the answer message's `correlation-id`, its
//! application properties (`iotdps-operation-type`, `iotdps-status`, `retry-after`), a data
//! section with the JSON body of the same shape, and for errors the `rejected` outcome's
//! condition, description and `retry-after`. Plus the protocol edges: the plain AMQP header
//! without a certificate, frames too large before OPEN, link addresses, metrics.

use crate::support::*;
use dps_core::instance::{LinkedHub, RegisterResponse};
use dps_device::amqp::{AmqpAnswer, AmqpDeviceConnection, OP_REGISTER, OP_STATUS};
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const CAPTURE_HUB: &str = "capture-hub.azure-devices.net";
const PATIENCE: Duration = Duration::from_secs(15);

type Tls = TlsStream<TcpStream>;

fn vectors() -> Vec<(String, Value)> {
    let dir = std::env::var_os("DPS_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/vectors")
        });
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("wire vectors at {}: {e}", dir.display()))
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            (name.starts_with("device-node-amqp-") && name.ends_with(".json")).then_some(name)
        })
        .map(|name| {
            let v =
                serde_json::from_str(&std::fs::read_to_string(dir.join(&name)).unwrap()).unwrap();
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn events<'a>(v: &'a Value, kind: &str) -> Vec<&'a Value> {
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

/// The registration id the SDK used (its SASL identity, or the link address for X.509).
fn rid(v: &Value) -> String {
    if let Some(i) = events(v, "amqp_sasl_init").first() {
        return i["sasl_username"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_string();
    }
    events(v, "amqp_attach")[0]["performative"]["source"]["address"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string()
}

/// The register request's data section, as the SDK sent it.
fn register_body(v: &Value) -> Vec<u8> {
    let t = events(v, "amqp_transfer")[0];
    let data = t["message"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["$type"] == "data")
        .expect("data section");
    data["value"]["$binary_utf8"]
        .as_str()
        .unwrap()
        .as_bytes()
        .to_vec()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn same_shape(path: &str, captured: &Value, ours: &Value, problems: &mut Vec<String>) {
    let (Some(c), Some(o)) = (captured.as_object(), ours.as_object()) else {
        if kind(captured) != kind(ours) {
            problems.push(format!(
                "{path}: captured {} but ours is {}",
                kind(captured),
                kind(ours)
            ));
        }
        return;
    };
    for (k, cv) in c {
        let p = format!("{path}.{k}");
        match o.get(k) {
            None => problems.push(format!("{p}: missing (captured {cv})")),
            Some(ov) if cv.is_object() => same_shape(&p, cv, ov, problems),
            Some(ov) if kind(cv) != kind(ov) => problems.push(format!(
                "{p}: captured {} but ours is {}",
                kind(cv),
                kind(ov)
            )),
            Some(_) => {}
        }
    }
}

async fn server(scope: &str, mode: RegisterResponse, max_inflight: Option<usize>) -> TestServer {
    let scope = scope.to_string();
    TestServer::spawn_with(move |cfg| {
        cfg.instances[0].id_scope = Some(scope);
        cfg.instances[0].linked_hub = vec![LinkedHub::registry(CAPTURE_HUB)];
        cfg.instances[0].register_response = mode;
        if let Some(n) = max_inflight {
            cfg.limits.max_inflight_registrations = n;
        }
    })
    .await
}

/// Enroll the vector's device with the vector's keys; returns the key the device signs with.
async fn enroll(s: &TestServer, v: &Value, rid: &str, extra: Value) -> String {
    let keys = &v["test_keys"];
    if let Some(gk) = keys["groupKey"].as_str() {
        let mut g = json!({"enrollmentGroupId": format!("grp-for-{rid}"), "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": gk, "secondaryKey": gk}}});
        merge(&mut g, extra);
        let r = s
            .call(
                Method::PUT,
                &format!("/enrollmentGroups/grp-for-{rid}"),
                Some(&s.owner()),
                Some(g),
                &[],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        derive_key(gk, rid)
    } else {
        let k = keys["symmetricKey"].as_str().unwrap();
        let mut e = json!({"registrationId": rid, "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}});
        merge(&mut e, extra);
        let r = s
            .call(
                Method::PUT,
                &format!("/enrollments/{rid}"),
                Some(&s.owner()),
                Some(e),
                &[],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        k.to_string()
    }
}

fn tls_config(
    ca_pem: &str,
    identity: Option<(&rcgen::Certificate, &rcgen::KeyPair)>,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(ca_pem.as_bytes()).expect("ca");
    roots.add(der).expect("root");
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    match identity {
        None => b.with_no_client_auth(),
        Some((cert, kp)) => b
            .with_client_auth_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(kp.serialize_der().into()),
            )
            .expect("client cert"),
    }
}

async fn tls_to(port: u16, cfg: rustls::ClientConfig) -> Tls {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.expect("tcp");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("tls")
}

fn amqp_port(s: &TestServer) -> u16 {
    s.server.amqp.expect("amqp listener").port()
}

/// A device connection over TLS to the AMQP listener, authenticated with `key` (SASL PLAIN).
async fn open_sas(
    s: &TestServer,
    scope: &str,
    rid: &str,
    key: &str,
) -> Result<AmqpDeviceConnection, dps_device::Error> {
    let tls = tls_to(amqp_port(s), tls_config(&s.ca_pem, None)).await;
    AmqpDeviceConnection::open_on(
        tls,
        "localhost",
        "2019-03-31",
        &format!("{scope}/registrations/{rid}"),
        Some(device_token(scope, rid, key)),
    )
    .await
}

fn message_parts(a: &AmqpAnswer) -> (Value, &str, &str) {
    match a {
        AmqpAnswer::Message { body, .. } => (
            serde_json::from_slice(body).expect("JSON body"),
            a.property("iotdps-operation-type").unwrap_or(""),
            a.property("iotdps-status").unwrap_or(""),
        ),
        AmqpAnswer::Rejected { .. } => panic!("rejected: {a:?}"),
    }
}

fn check_assigned(name: &str, rid: &str, body: &Value, problems: &mut Vec<String>) {
    let st = &body["registrationState"];
    if body["status"] != "assigned"
        || st["assignedHub"] != CAPTURE_HUB
        || st["deviceId"] != rid
        || st["registrationId"] != rid
    {
        problems.push(format!("{name}: not assigned as expected: {body}"));
    }
}

fn captured_responses(v: &Value) -> Vec<&Value> {
    events(v, "amqp_sent_response")
}

async fn replay_assigned(name: &str, v: &Value, problems: &mut Vec<String>) {
    let scope = v["id_scope"].as_str().unwrap();
    let rid = rid(v);
    let s = server(scope, RegisterResponse::Immediate, None).await;
    let key = enroll(&s, v, &rid, json!({})).await;
    let mut c = open_sas(&s, scope, &rid, &key).await.expect("open");
    let a = c
        .request(OP_REGISTER, None, false, &register_body(v))
        .await
        .expect("answer");
    c.close().await;
    let (body, op, status) = message_parts(&a);
    let captured = captured_responses(v).last().copied().unwrap();
    same_shape(name, &captured["body"], &body, problems);
    if op != "iotdps-register" || status != "assigned" {
        problems.push(format!("{name}: properties {a:?}"));
    }
    check_assigned(name, &rid, &body, problems);
}

async fn replay_assigning(name: &str, v: &Value, problems: &mut Vec<String>) {
    let scope = v["id_scope"].as_str().unwrap();
    let rid = rid(v);
    let s = server(scope, RegisterResponse::Accepted, None).await;
    let key = enroll(&s, v, &rid, json!({})).await;
    let mut c = open_sas(&s, scope, &rid, &key).await.expect("open");
    let a = c
        .request(OP_REGISTER, None, false, &register_body(v))
        .await
        .expect("answer");
    let (body, op, status) = message_parts(&a);
    let captured = captured_responses(v);
    same_shape(name, &captured[0]["body"], &body, problems);
    if op != "iotdps-register" || status != "assigning" {
        problems.push(format!("{name}: register properties {a:?}"));
    }
    // retry-after and Retry-After (C#) on `assigning`, as whole seconds.
    for k in ["retry-after", "Retry-After"] {
        if a.property(k).and_then(|v| v.parse::<u32>().ok()).is_none() {
            problems.push(format!("{name}: no {k} on assigning: {a:?}"));
        }
    }
    let op_id = body["operationId"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let last = loop {
        let a = c
            .request(OP_STATUS, Some(&op_id), false, b"")
            .await
            .expect("poll answer");
        let (body, op, status) = message_parts(&a);
        if op != "iotdps-get-operationstatus" {
            problems.push(format!("{name}: poll operation type {op}"));
        }
        // Each poll is a round trip to the server: no sleep, a deadline.
        if status == "assigned" || tokio::time::Instant::now() > deadline {
            break body;
        }
    };
    c.close().await;
    same_shape(name, &captured.last().unwrap()["body"], &last, problems);
    check_assigned(name, &rid, &last, problems);
}

/// The service refuses the credential: SASL outcome `auth`, as in
/// device-node-amqp-sym-connect-refused.json (our answer for a wrong key and an unknown
/// device alike: the SAS token is checked before the outcome).
async fn replay_refused(name: &str, v: &Value, enrolled: bool, problems: &mut Vec<String>) {
    let scope = v["id_scope"].as_str().unwrap();
    let rid = rid(v);
    let s = server(scope, RegisterResponse::Immediate, None).await;
    if enrolled {
        enroll(&s, v, &rid, json!({})).await;
    }
    let wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXkhIQ==";
    match open_sas(&s, scope, &rid, wrong).await {
        Err(dps_device::Error::Unauthorized { .. }) => {}
        other => problems.push(format!("{name}: expected a SASL refusal, got {other:?}")),
    }
}

async fn replay_throttled(name: &str, v: &Value, problems: &mut Vec<String>) {
    let scope = v["id_scope"].as_str().unwrap();
    let rid = rid(v);
    let s = server(scope, RegisterResponse::Accepted, Some(0)).await;
    let key = enroll(&s, v, &rid, json!({})).await;
    let mut c = open_sas(&s, scope, &rid, &key).await.expect("open");
    let a = c
        .request(OP_REGISTER, None, false, &register_body(v))
        .await
        .expect("answer");
    c.close().await;
    let captured = events(v, "amqp_sent_disposition")
        .into_iter()
        .find(|d| d["outcome"]["$type"] == "rejected")
        .unwrap();
    let cond = captured["outcome"]["error"]["condition"]["$symbol"]
        .as_str()
        .unwrap();
    match &a {
        AmqpAnswer::Rejected {
            condition,
            description,
            ..
        } => {
            if condition != cond {
                problems.push(format!("{name}: condition {condition} (captured {cond})"));
            }
            let d: Value =
                serde_json::from_str(description.as_deref().unwrap_or("")).unwrap_or(Value::Null);
            if d["errorCode"] != 429001 || !d["trackingId"].is_string() || !d["message"].is_string()
            {
                problems.push(format!("{name}: description {description:?}"));
            }
            for k in ["retry-after", "Retry-After"] {
                if a.property(k).and_then(|v| v.parse::<u32>().ok()).is_none() {
                    problems.push(format!("{name}: no {k} in the rejection's info: {a:?}"));
                }
            }
        }
        other => problems.push(format!("{name}: expected a rejection, got {other:?}")),
    }
}

async fn replay_failed(name: &str, v: &Value, problems: &mut Vec<String>) {
    let scope = v["id_scope"].as_str().unwrap();
    let rid = rid(v);
    let s = server(scope, RegisterResponse::Immediate, None).await;
    let port = closed_port();
    let key = enroll(&s, v, &rid, json!({"allocationPolicy": "custom", "customAllocationDefinition": {"webhookUrl": format!("http://127.0.0.1:{port}/down"), "apiVersion": "2021-10-01"}})).await;
    let mut c = open_sas(&s, scope, &rid, &key).await.expect("open");
    let a = c
        .request(OP_REGISTER, None, false, &register_body(v))
        .await
        .expect("answer");
    c.close().await;
    // A failed registration is an ordinary answer, not an AMQP error (digest §5.5).
    let (body, _, status) = message_parts(&a);
    if status != "failed" || body["status"] != "failed" {
        problems.push(format!("{name}: {a:?}"));
    }
    same_shape(name, &captured_responses(v)[0]["body"], &body, problems);
}

fn device_cert(rid: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, rid);
    let kp = rcgen::KeyPair::generate().unwrap();
    (p.self_signed(&kp).unwrap(), kp)
}

async fn replay_x509(name: &str, v: &Value, problems: &mut Vec<String>) {
    let scope = v["id_scope"].as_str().unwrap();
    let rid = rid(v);
    // The Node SDK sent the plain AMQP header (no SASL) with its client certificate.
    let header = events(v, "amqp_protocol_header")[0]["header_hex"]
        .as_str()
        .unwrap();
    assert_eq!(header, "414d515000010000", "{name}");
    let (cert, kp) = device_cert(&rid);
    let s = server(scope, RegisterResponse::Immediate, None).await;
    let e = json!({"registrationId": rid, "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": cert.pem()}}}}});
    let r = s
        .call(
            Method::PUT,
            &format!("/enrollments/{rid}"),
            Some(&s.owner()),
            Some(e),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let tls = tls_to(amqp_port(&s), tls_config(&s.ca_pem, Some((&cert, &kp)))).await;
    let mut c = AmqpDeviceConnection::open_on(
        tls,
        "localhost",
        "2019-03-31",
        &format!("{scope}/registrations/{rid}"),
        None,
    )
    .await
    .expect("open without SASL");
    let a = c
        .request(OP_REGISTER, None, false, &register_body(v))
        .await
        .expect("answer");
    c.close().await;
    let (body, _, status) = message_parts(&a);
    if status != "assigned" {
        problems.push(format!("{name}: {a:?}"));
    }
    same_shape(name, &captured_responses(v)[0]["body"], &body, problems);
    check_assigned(name, &rid, &body, problems);
}

#[tokio::test]
async fn the_node_sdk_amqp_vectors_replay_with_what_the_sdk_read() {
    let all = vectors();
    assert!(all.len() >= 13, "AMQP vectors: {}", all.len());
    let mut problems = Vec::new();
    let mut replayed = 0;
    for (name, v) in &all {
        let scenario = v["scenario"]["name"].as_str().unwrap_or("");
        match (name.as_str(), scenario) {
            // Documents that the Node SDK crashes on a 401 sent as a message: not replayable.
            (n, _) if n.ends_with("401-as-message.json") => continue,
            (n, "assigned") if n.contains("x509") => replay_x509(name, v, &mut problems).await,
            // The 500 capture ends in a 200 after the SDK's retry: what it needs is the 200.
            (_, "assigned") | (_, "server_error") => replay_assigned(name, v, &mut problems).await,
            (_, "assigning") | (_, "assigning ra=1") => {
                replay_assigning(name, v, &mut problems).await
            }
            (_, "unauthorized") | (_, "connack_refused") => {
                replay_refused(name, v, true, &mut problems).await
            }
            (_, "notfound") => replay_refused(name, v, false, &mut problems).await,
            (_, s) if s.starts_with("throttle") => replay_throttled(name, v, &mut problems).await,
            (_, "failed") => replay_failed(name, v, &mut problems).await,
            (n, s) => panic!("{n}: scenario {s} has no replay"),
        }
        replayed += 1;
    }
    assert_eq!(replayed, all.len() - 1);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ------------------------------------------------------------------ AMQP over WebSocket

type ByteStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send>>;
type ByteSink = std::pin::Pin<Box<dyn futures::Sink<bytes::Bytes, Error = std::io::Error> + Send>>;

/// A byte stream over WebSocket binary messages, for the AMQP client.
struct WsIo(
    tokio::io::Join<
        tokio_util::io::StreamReader<ByteStream, bytes::Bytes>,
        tokio_util::io::SinkWriter<tokio_util::io::CopyToBytes<ByteSink>>,
    >,
);

impl std::fmt::Debug for WsIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WsIo")
    }
}

impl tokio::io::AsyncRead for WsIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WsIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

async fn ws_amqp(s: &TestServer, path: &str, protocol: &str) -> Result<WsIo, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let tls = tls_to(s.server.https.port(), tls_config(&s.ca_pem, None)).await;
    let mut req = format!("wss://localhost:{}{path}", s.server.https.port())
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("sec-websocket-protocol", protocol.parse().unwrap());
    let (ws, resp) = tokio_tungstenite::client_async(req, tls)
        .await
        .map_err(|e| e.to_string())?;
    let chosen = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if chosen != protocol {
        return Err(format!("subprotocol {chosen:?}"));
    }
    let (sink, stream) = ws.split();
    let stream = stream.filter_map(|m| async move {
        match m {
            Ok(Message::Binary(b)) => Some(Ok(b)),
            Ok(_) => None,
            Err(e) => Some(Err(std::io::Error::other(e))),
        }
    });
    let sink = sink
        .with(|b: bytes::Bytes| async move {
            Ok::<_, tokio_tungstenite::tungstenite::Error>(Message::Binary(b))
        })
        .sink_map_err(std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(Box::pin(stream) as ByteStream);
    let writer = tokio_util::io::SinkWriter::new(tokio_util::io::CopyToBytes::new(
        Box::pin(sink) as ByteSink
    ));
    Ok(WsIo(tokio::io::join(reader, writer)))
}

#[tokio::test]
async fn amqp_over_websocket_registers_beside_mqtt_on_the_same_path() {
    // The Node SDK's upgrade request (device-node-amqpws-handshake-only.json).
    let dir = std::env::var_os("DPS_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/vectors")
        });
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("device-node-amqpws-handshake-only.json")).unwrap(),
    )
    .unwrap();
    let upgrade = &v["events"][0];
    let path = upgrade["raw_path"].as_str().unwrap();
    let protocol = upgrade["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| {
            h[0].as_str()
                .unwrap()
                .eq_ignore_ascii_case("sec-websocket-protocol")
        })
        .unwrap()[1]
        .as_str()
        .unwrap();
    assert_eq!((path, protocol), ("/$iothub/websocket", "AMQPWSB10"));
    let s = server(SCOPE, RegisterResponse::Immediate, None).await;
    let key = s.enroll("amqp-ws-dev", json!({})).await;
    let io = ws_amqp(&s, path, protocol).await.expect("AMQP upgrade");
    let mut c = AmqpDeviceConnection::open_on(
        io,
        "localhost",
        "2019-03-31",
        &format!("{SCOPE}/registrations/amqp-ws-dev"),
        Some(device_token(SCOPE, "amqp-ws-dev", &key)),
    )
    .await
    .expect("open over WebSocket");
    let a = c
        .request(
            OP_REGISTER,
            None,
            false,
            br#"{"registrationId":"amqp-ws-dev"}"#,
        )
        .await
        .expect("answer");
    c.close().await;
    let (body, _, status) = message_parts(&a);
    assert_eq!(status, "assigned", "{a:?}");
    assert_eq!(body["registrationState"]["deviceId"], "amqp-ws-dev");
    // MQTT keeps its subprotocol on the same path; anything else is refused.
    assert!(ws_amqp(&s, path, "mqtt").await.is_ok());
    assert!(ws_amqp(&s, path, "xmpp").await.is_err());
    // C# opens AMQP over WebSocket on `/`.
    assert!(ws_amqp(&s, "/", "AMQPWSB10").await.is_ok());
    // Metrics carry the transport.
    let text = scrape(&s).await;
    assert!(
        sample(
            &text,
            "dps_register_duration_seconds_count",
            &[("protocol", "amqp-ws")]
        ) >= 1.0,
        "{text}"
    );
}

// ------------------------------------------------------------------ protocol edges

#[tokio::test]
async fn registration_over_amqp_is_the_engines_with_force_registration_and_metrics() {
    let s = server(SCOPE, RegisterResponse::Immediate, None).await;
    let key = s.enroll("amqp-dev", json!({})).await;
    // Java's leading slash and the C SDK's URL name the same registration.
    for address in [
        format!("/{SCOPE}/registrations/amqp-dev"),
        format!("amqps://localhost/{SCOPE}/registrations/amqp-dev"),
    ] {
        let tls = tls_to(amqp_port(&s), tls_config(&s.ca_pem, None)).await;
        let mut c = AmqpDeviceConnection::open_on(
            tls,
            "localhost",
            "2019-03-31",
            &address,
            Some(device_token(SCOPE, "amqp-dev", &key)),
        )
        .await
        .expect("open");
        let a = c
            .request(OP_REGISTER, None, true, br#"{"payload":{"a":1}}"#)
            .await
            .expect("answer");
        c.close().await;
        let (_, _, status) = message_parts(&a);
        assert_eq!(status, "assigned", "{address}: {a:?}");
    }
    let text = scrape(&s).await;
    assert!(
        sample(
            &text,
            "dps_register_duration_seconds_count",
            &[("protocol", "amqp")]
        ) >= 2.0,
        "{text}"
    );
    // A poll without an operation id is a client error (rejected, 400).
    let mut c = open_sas(&s, SCOPE, "amqp-dev", &key).await.expect("open");
    let a = c
        .request(OP_STATUS, None, false, b"")
        .await
        .expect("answer");
    let (status, _, _) = a.as_http();
    assert_eq!(status, 400, "{a:?}");
    // A link to another registration than the one SASL authenticated is refused.
    let other = format!("{SCOPE}/registrations/someone-else");
    let tls = tls_to(amqp_port(&s), tls_config(&s.ca_pem, None)).await;
    let r = AmqpDeviceConnection::open_on(
        tls,
        "localhost",
        "2019-03-31",
        &other,
        Some(device_token(SCOPE, "amqp-dev", &key)),
    )
    .await;
    assert!(r.is_err(), "a link on another registration was accepted");
    // A wrong key is refused in SASL, and counted as an AMQP attestation failure.
    assert!(matches!(
        open_sas(
            &s,
            SCOPE,
            "amqp-dev",
            "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXkhIQ=="
        )
        .await,
        Err(dps_device::Error::Unauthorized { .. })
    ));
    let text = scrape(&s).await;
    assert!(
        sample(
            &text,
            "AttestationAttempts",
            &[("protocol", "amqp"), ("result", "failure")]
        ) >= 1.0,
        "{text}"
    );
}

#[tokio::test]
async fn the_plain_header_without_a_certificate_and_oversized_frames_are_refused() {
    let s = server(SCOPE, RegisterResponse::Immediate, None).await;
    // No SASL and no client certificate: we answer with the SASL header and close.
    let mut tls = tls_to(amqp_port(&s), tls_config(&s.ca_pem, None)).await;
    tls.write_all(b"AMQP\x00\x01\x00\x00").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, tls.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .ok();
    assert_eq!(got, b"AMQP\x03\x01\x00\x00");
    // SASL header, then a frame announcing 1 MiB before authentication: closed without
    // reading it.
    let mut tls = tls_to(amqp_port(&s), tls_config(&s.ca_pem, None)).await;
    tls.write_all(b"AMQP\x03\x01\x00\x00").await.unwrap();
    tls.write_all(&[0, 0x10, 0, 0, 2, 1, 0, 0]).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, tls.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .ok();
    assert!(got.starts_with(b"AMQP\x03\x01\x00\x00"), "{got:?}");
    // Not AMQP at all.
    let mut tls = tls_to(amqp_port(&s), tls_config(&s.ca_pem, None)).await;
    tls.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, tls.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .ok();
    assert_eq!(got, b"AMQP\x03\x01\x00\x00");
}

#[tokio::test]
async fn a_silent_amqp_connection_is_closed_at_the_open_deadline() {
    let s = TestServer::spawn_with(|cfg| cfg.limits.amqp_open_timeout_ms = 300).await;
    let mut tls = tls_to(amqp_port(&s), tls_config(&s.ca_pem, None)).await;
    let started = tokio::time::Instant::now();
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, tls.read_to_end(&mut got))
        .await
        .expect("closed by the server")
        .ok();
    assert!(got.is_empty());
    assert!(started.elapsed() < PATIENCE);
}

//! TPM attestation over HTTPS (protocol digest §6.5) end to end, with a real TPM: `swtpm`
//! driven by `tpm2-tools` (`dps_device::tpm`). The device presents its EK and SRK, gets the
//! 401 challenge, opens the blob in its TPM (ActivateCredential, Import), signs SAS tokens
//! inside the TPM, is assigned, and imports the blob of its registration state; refusals
//! (unknown registration, unknown EK, wrong SRK, bad signature, replayed activation) are told
//! apart in the audit log.
//!
//! Over AMQP the same exchange runs inside the SASL `TPM` mechanism (§6.5.6): the EK in
//! `sasl-init`, the SRK in the first response, the blob in 400-byte segment challenges, the
//! TPM-signed SAS token in the last response, checked before the SASL outcome; then the
//! register request on the links ([`dps_device::amqp::sasl_tpm`] as the device side, and the
//! Rust client's `Transport::Amqp`).
//!
//! Skipped when swtpm or tpm2-tools are missing, except under `CI=true`, where that fails.

use crate::support::*;
use base64::Engine as _;
use dps_device::tpm::{tools_available, Swtpm, Tpm2Tools, TpmPublicKeys};
use reqwest::Method;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn tools_or_skip() -> bool {
    if tools_available() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "swtpm and tpm2-tools are required under CI=true"
    );
    eprintln!("skipped: swtpm or tpm2-tools not installed");
    false
}

/// A device with a software TPM.
struct Device {
    _tpm: Swtpm,
    tools: Arc<Tpm2Tools>,
    keys: TpmPublicKeys,
}

impl Device {
    async fn start(dir: &std::path::Path, name: &str) -> Device {
        let (tpm, tools, keys) = {
            let dir = dir.to_path_buf();
            let name = name.to_string();
            tokio::task::spawn_blocking(move || {
                let tpm = Swtpm::start(dir.join(format!("{name}-state"))).unwrap();
                let tools = Tpm2Tools::new(Some(tpm.tcti()), dir.join(format!("{name}-work")));
                let keys = tools.provision().unwrap();
                (tpm, tools, keys)
            })
            .await
            .unwrap()
        };
        Device {
            _tpm: tpm,
            tools: Arc::new(tools),
            keys,
        }
    }

    fn ek(&self) -> String {
        B64.encode(&self.keys.endorsement_key)
    }

    fn srk(&self) -> String {
        B64.encode(&self.keys.storage_root_key)
    }

    fn tpm_body(&self, rid: &str) -> Value {
        json!({"registrationId": rid, "tpm": {"endorsementKey": self.ek(), "storageRootKey": self.srk()}})
    }

    async fn import(&self, blob_b64: &str) {
        let blob = B64.decode(blob_b64).expect("authenticationKey is base64");
        let tools = self.tools.clone();
        tokio::task::spawn_blocking(move || tools.import_activation(&blob))
            .await
            .unwrap()
            .expect("the TPM opens dps's activation blob");
    }

    /// A device SAS token signed inside the TPM with the imported key (§6.1 format).
    async fn token(&self, rid: &str) -> String {
        let sr = percent_encoding::utf8_percent_encode(
            &format!("{SCOPE}/registrations/{rid}"),
            percent_encoding::NON_ALPHANUMERIC,
        )
        .to_string();
        let se = now() + 3600;
        let tools = self.tools.clone();
        let data = format!("{sr}\n{se}").into_bytes();
        let mac = tokio::task::spawn_blocking(move || tools.hmac(&data))
            .await
            .unwrap()
            .unwrap();
        let sig = percent_encoding::utf8_percent_encode(
            &B64.encode(mac),
            percent_encoding::NON_ALPHANUMERIC,
        )
        .to_string();
        format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn=registration")
    }
}

fn register_path(rid: &str) -> String {
    format!("/{SCOPE}/registrations/{rid}/register?api-version=2021-06-01")
}

async fn enroll_tpm(s: &TestServer, rid: &str, tpm: Value) -> Resp {
    s.call(
        Method::PUT,
        &format!("/enrollments/{rid}"),
        Some(&s.owner()),
        Some(json!({"registrationId": rid, "attestation": {"type": "tpm", "tpm": tpm}})),
        &[],
    )
    .await
}

/// The challenge: 401 with `authenticationKey` and `keyName`, no `status` or `errorCode`.
async fn challenge(s: &TestServer, rid: &str, body: Value) -> String {
    let r = s
        .call(Method::PUT, &register_path(rid), None, Some(body), &[])
        .await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.body["keyName"], "registration", "{}", r.body);
    assert!(r.body.get("status").is_none(), "{}", r.body);
    assert!(r.body.get("errorCode").is_none(), "{}", r.body);
    r.body["authenticationKey"]
        .as_str()
        .expect("authenticationKey")
        .to_string()
}

/// Register with a token and poll to the final answer.
async fn register_with(s: &TestServer, rid: &str, tok: &str, body: Value) -> Resp {
    let r = s
        .call(Method::PUT, &register_path(rid), Some(tok), Some(body), &[])
        .await;
    if r.status != 202 {
        return r;
    }
    let op = r.body["operationId"].as_str().unwrap().to_string();
    let path = format!("/{SCOPE}/registrations/{rid}/operations/{op}?api-version=2021-06-01");
    eventually(Duration::from_secs(10), || {
        let path = path.clone();
        async move {
            let r = s.call(Method::GET, &path, Some(tok), None, &[]).await;
            if r.status == 202 {
                Err(format!("still assigning: {}", r.body))
            } else {
                Ok(r)
            }
        }
    })
    .await
}

fn refusal_reasons(audit: &[Value]) -> String {
    audit
        .iter()
        .filter(|e| e["action"] == "registration.refused")
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_device_registers_over_https_and_gets_its_hub_key() {
    if !tools_or_skip() {
        return;
    }
    let s = TestServer::spawn().await;
    let dev = Device::start(s.dir.path(), "tpm-a").await;
    let rid = "tpm-dev-1";
    let r = enroll_tpm(&s, rid, json!({"endorsementKey": dev.ek()})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["attestation"]["type"], "tpm");

    // Step 1: the challenge, opened inside the TPM.
    let blob = challenge(&s, rid, dev.tpm_body(rid)).await;
    dev.import(&blob).await;
    let tok = dev.token(rid).await;

    // Step 2: the SAS token signed in the TPM registers the device.
    let r = register_with(&s, rid, &tok, dev.tpm_body(rid)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    let st = &r.body["registrationState"];
    assert_eq!(st["deviceId"], rid);
    let hub = st["assignedHub"].as_str().unwrap().to_string();
    // The registration state carries a blob for the hub key; it opens in the same TPM and
    // the key inside is the one the device registered with.
    let hub_blob = st["tpm"]["authenticationKey"]
        .as_str()
        .expect("registrationState.tpm.authenticationKey")
        .to_string();
    assert_ne!(hub_blob, blob, "fresh randomness, same key");
    dev.import(&hub_blob).await;
    let tok2 = dev.token(rid).await;
    let r = s
        .call(
            Method::POST,
            &format!("/{SCOPE}/registrations/{rid}?api-version=2021-06-01"),
            Some(&tok2),
            Some(json!({})),
            &[],
        )
        .await;
    assert_eq!(
        r.status, 200,
        "the imported hub key signs valid tokens: {}",
        r.body
    );

    // The hub identity exists with SAS authentication; the registration record says TPM.
    let d = s.hub_device(&hub, rid).await;
    assert_eq!(d.status, 200, "{}", d.body);
    assert_eq!(d.body["authentication"]["type"], "sas", "{}", d.body);
    let rec = s.registration_record(rid).await;
    assert_eq!(rec.status, 200, "{}", rec.body);
    assert!(
        rec.body["tpm"]["authenticationKey"].is_string(),
        "{}",
        rec.body
    );
    let m = scrape(&s).await;
    assert!(
        sample(
            &m,
            "AttestationAttempts",
            &[("attestation", "tpm"), ("result", "success")]
        ) >= 1.0,
        "{m}"
    );
    // No key in the audit log or the record.
    let audit = s.audit_for(rid).await;
    let all = format!("{audit:?}{}", rec.body);
    assert!(!all.contains("\"key\""), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_refusals_are_told_apart() {
    if !tools_or_skip() {
        return;
    }
    let s = TestServer::spawn().await;
    let a = Device::start(s.dir.path(), "tpm-a").await;
    let b = Device::start(s.dir.path(), "tpm-b").await;
    let rid = "tpm-dev-2";
    let r = enroll_tpm(
        &s,
        rid,
        json!({"endorsementKey": a.ek(), "storageRootKey": a.srk()}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // No TPM enrollment: 404201, as Azure answers.
    let r = s
        .call(
            Method::PUT,
            &register_path("tpm-nobody"),
            None,
            Some(a.tpm_body("tpm-nobody")),
            &[],
        )
        .await;
    assert_error(&r, 404, Some(404201));

    // Another TPM's EK: refused, nothing issued.
    let r = s
        .call(
            Method::PUT,
            &register_path(rid),
            None,
            Some(b.tpm_body(rid)),
            &[],
        )
        .await;
    assert_error(&r, 401, Some(401002));
    // The right EK with another SRK than the enrollment names.
    let body = json!({"registrationId": rid, "tpm": {"endorsementKey": a.ek(), "storageRootKey": b.srk()}});
    let r = s
        .call(Method::PUT, &register_path(rid), None, Some(body), &[])
        .await;
    assert_error(&r, 401, Some(401002));
    // A malformed EK is a bad request.
    let body = json!({"registrationId": rid, "tpm": {"endorsementKey": "AAEC", "storageRootKey": a.srk()}});
    let r = s
        .call(Method::PUT, &register_path(rid), None, Some(body), &[])
        .await;
    assert_error(&r, 400, Some(400004));

    // A token signed with a key dps never issued.
    let first = challenge(&s, rid, a.tpm_body(rid)).await;
    let forged = device_token(SCOPE, rid, &dps_core::sas::generate_key());
    let r = s
        .call(
            Method::PUT,
            &register_path(rid),
            Some(&forged),
            Some(a.tpm_body(rid)),
            &[],
        )
        .await;
    assert_error(&r, 401, Some(401002));

    // Replay: the device opened the first activation; a second one is issued since; a token
    // signed with the first key is refused as a replay.
    a.import(&first).await;
    let old = a.token(rid).await;
    let second = challenge(&s, rid, a.tpm_body(rid)).await;
    let r = s
        .call(
            Method::PUT,
            &register_path(rid),
            Some(&old),
            Some(a.tpm_body(rid)),
            &[],
        )
        .await;
    assert_error(&r, 401, Some(401002));
    // With the current activation it works.
    a.import(&second).await;
    let tok = a.token(rid).await;
    let r = register_with(&s, rid, &tok, a.tpm_body(rid)).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);

    let audit = s.audit_for(rid).await;
    let reasons = refusal_reasons(&audit);
    for expected in [
        "unknown endorsement key",
        "wrong storage root key",
        "bad signature",
        "replayed activation",
    ] {
        assert!(reasons.contains(expected), "{expected} in:\n{reasons}");
    }
    let nobody = refusal_reasons(&s.audit_for("tpm-nobody").await);
    assert!(nobody.contains("no individual enrollment"), "{nobody}");
}

#[tokio::test]
async fn tpm_enrollments_need_a_usable_endorsement_key() {
    let s = TestServer::spawn().await;
    let r = enroll_tpm(&s, "tpm-bad", json!({"endorsementKey": "AAEC"})).await;
    assert_error(&r, 400, Some(400004));
    assert!(
        r.body["message"].as_str().unwrap().contains("TPM2B_PUBLIC"),
        "{}",
        r.body
    );
}

// ----- AMQP: the SASL `TPM` mechanism ----------------------------------------------------

type AmqpTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn amqp_tls(s: &TestServer) -> AmqpTls {
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(s.ca_pem.as_bytes()).expect("ca");
    roots.add(der).expect("root");
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let port = s.server.amqp.expect("amqp listener").port();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("tcp");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("tls")
}

/// The CONNACK code of an MQTT CONNECT (over TLS) with `token` as the password.
async fn mqtt_connect_code(
    s: &TestServer,
    rid: &str,
    token: &str,
) -> rumqttc::mqttbytes::v4::ConnectReturnCode {
    use rumqttc::mqttbytes::v4::{Connect, Packet};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(s.ca_pem.as_bytes()).expect("ca");
    roots.add(der).expect("root");
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let port = s.server.mqtt.expect("mqtt listener").port();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("tcp");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut io = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("tls");
    let mut c = Connect::new(rid);
    c.keep_alive = 60;
    c.set_login(
        format!("{SCOPE}/registrations/{rid}/api-version=2019-03-31"),
        token,
    );
    let mut b = bytes::BytesMut::new();
    Packet::Connect(c)
        .write(&mut b, usize::MAX)
        .expect("encode");
    io.write_all(&b).await.expect("send");
    let mut buf = bytes::BytesMut::new();
    let read = async {
        loop {
            if let Ok(p) = Packet::read(&mut buf, usize::MAX) {
                return p;
            }
            let mut chunk = [0u8; 64];
            let n = io.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed before CONNACK");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("CONNACK in time")
    {
        Packet::ConnAck(a) => a.code,
        p => panic!("expected CONNACK, got {p:?}"),
    }
}

/// What the device's SASL `TPM` exchange did: the outcome code, and the blob it was sent.
struct SaslRun {
    code: u8,
    blob: Option<Vec<u8>>,
    io: AmqpTls,
}

/// SASL `TPM` as device `dev` presenting `ek`/`srk` for `rid`; the blob is opened in `dev`'s
/// TPM and the token signed there, unless `forge` gives a token signed with another key.
async fn sasl_tpm(
    s: &TestServer,
    dev: &Device,
    rid: &str,
    ek: &[u8],
    srk: &[u8],
    forge: Option<String>,
) -> SaslRun {
    let mut io = amqp_tls(s).await;
    let seen = std::sync::Mutex::new(None);
    let seen_ref = &seen;
    let code = dps_device::amqp::sasl_tpm(&mut io, SCOPE, rid, ek, srk, |blob| async move {
        *seen_ref.lock().unwrap() = Some(blob.clone());
        match forge {
            Some(t) => Ok(t),
            None => {
                dev.import(&B64.encode(&blob)).await;
                Ok(dev.token(rid).await)
            }
        }
    })
    .await
    .expect("the SASL exchange runs to an outcome");
    SaslRun {
        code: code.0,
        blob: seen.into_inner().unwrap(),
        io,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_device_registers_over_amqp_with_sasl_tpm() {
    if !tools_or_skip() {
        return;
    }
    let s = TestServer::spawn().await;
    let dev = Device::start(s.dir.path(), "tpm-amqp").await;
    let rid = "tpm-amqp-1";
    let r = enroll_tpm(&s, rid, json!({"endorsementKey": dev.ek()})).await;
    assert_eq!(r.status, 200, "{}", r.body);

    let run = sasl_tpm(
        &s,
        &dev,
        rid,
        &dev.keys.endorsement_key,
        &dev.keys.storage_root_key,
        None,
    )
    .await;
    assert_eq!(run.code, 0, "SASL outcome ok");
    // The blob came in more than one segment (a 2048-bit EK and SRK: ~ 870 bytes).
    let blob = run.blob.expect("activation blob");
    assert!(blob.len() > 400, "{}", blob.len());

    // The links, on the connection the TPM authenticated: register with the keys in the body.
    let address = format!("{SCOPE}/registrations/{rid}");
    let mut conn = dps_device::amqp::AmqpDeviceConnection::open_on(
        run.io,
        "localhost",
        "2019-03-31",
        &address,
        None,
    )
    .await
    .expect("AMQP open after SASL TPM");
    let body = serde_json::to_vec(&dev.tpm_body(rid)).unwrap();
    let mut answer = conn
        .request(dps_device::amqp::OP_REGISTER, None, false, &body)
        .await
        .expect("register");
    // Poll to the final answer (no sleeps: the server's retry-after is not waited for; the
    // deadline bounds the loop).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let final_body = loop {
        let (status, body, _) = answer.as_http();
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        match (status, v["operationId"].as_str()) {
            (200, _) => break v,
            (202, Some(op)) if std::time::Instant::now() < deadline => {
                answer = conn
                    .request(dps_device::amqp::OP_STATUS, Some(op), false, b"")
                    .await
                    .expect("poll");
            }
            _ => panic!("unexpected answer {status}: {v}"),
        }
    };
    conn.close().await;
    assert_eq!(final_body["status"], "assigned", "{final_body}");
    let st = &final_body["registrationState"];
    assert_eq!(st["deviceId"], rid);
    let hub_blob = st["tpm"]["authenticationKey"]
        .as_str()
        .expect("registrationState.tpm.authenticationKey");
    dev.import(hub_blob).await;
    let tok = dev.token(rid).await;
    let r = s
        .call(
            Method::POST,
            &format!("/{SCOPE}/registrations/{rid}?api-version=2021-06-01"),
            Some(&tok),
            Some(json!({})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "the imported hub key signs: {}", r.body);
    let m = scrape(&s).await;
    assert!(
        sample(
            &m,
            "AttestationAttempts",
            &[
                ("protocol", "amqp"),
                ("attestation", "tpm"),
                ("result", "success")
            ]
        ) >= 1.0,
        "{m}"
    );

    // The same TPM-signed token is refused on an MQTT CONNECT (TPM is HTTPS and AMQP only).
    assert_eq!(
        mqtt_connect_code(&s, rid, &tok).await,
        rumqttc::mqttbytes::v4::ConnectReturnCode::NotAuthorized
    );

    // The Rust client does the same with `--transport amqp` (a second device).
    let dev2 = Device::start(s.dir.path(), "tpm-amqp-2").await;
    let rid2 = "tpm-amqp-2";
    let r = enroll_tpm(&s, rid2, json!({"endorsementKey": dev2.ek()})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let client = dps_device::ProvisioningClient::builder()
        .global_endpoint("localhost")
        .port(s.server.amqp.expect("amqp listener").port())
        .id_scope(SCOPE)
        .registration_id(rid2)
        .auth(dps_device::Auth::Tpm((*dev2.tools).clone()))
        .transport(dps_device::Transport::Amqp)
        .trust(dps_device::Trust::Pem(s.ca_pem.clone().into_bytes()))
        .poll_interval_override(Duration::from_millis(50))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let r = client.register().await.expect("TPM over AMQP");
    assert_eq!(r.device_id(), Some(rid2));
    assert!(r.state.tpm.is_some(), "hub key blob in the state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_tpm_refusals_are_auth_outcomes_with_their_reasons() {
    if !tools_or_skip() {
        return;
    }
    let s = TestServer::spawn().await;
    let a = Device::start(s.dir.path(), "tpm-a").await;
    let b = Device::start(s.dir.path(), "tpm-b").await;
    let rid = "tpm-amqp-3";
    let r = enroll_tpm(
        &s,
        rid,
        json!({"endorsementKey": a.ek(), "storageRootKey": a.srk()}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Unknown EK: `auth` right after the SRK; no blob is sent.
    let run = sasl_tpm(
        &s,
        &b,
        rid,
        &b.keys.endorsement_key,
        &b.keys.storage_root_key,
        None,
    )
    .await;
    assert_eq!((run.code, run.blob.is_some()), (1, false));
    // The enrolled EK with another SRK than the enrollment names.
    let run = sasl_tpm(
        &s,
        &a,
        rid,
        &a.keys.endorsement_key,
        &b.keys.storage_root_key,
        None,
    )
    .await;
    assert_eq!((run.code, run.blob.is_some()), (1, false));
    // No enrollment at all.
    let run = sasl_tpm(
        &s,
        &a,
        "tpm-amqp-nobody",
        &a.keys.endorsement_key,
        &a.keys.storage_root_key,
        None,
    )
    .await;
    assert_eq!(run.code, 1);
    // A token signed with a key dps never issued: the blob was sent, the token is refused.
    let forged = device_token(SCOPE, rid, &dps_core::sas::generate_key());
    let run = sasl_tpm(
        &s,
        &a,
        rid,
        &a.keys.endorsement_key,
        &a.keys.storage_root_key,
        Some(forged),
    )
    .await;
    assert_eq!((run.code, run.blob.is_some()), (1, true));
    // A malformed EK: `auth`, not a dropped connection.
    let run = sasl_tpm(&s, &a, rid, &[0, 4, 1, 2], &a.keys.storage_root_key, None).await;
    assert_eq!(run.code, 1);
    // And the right TPM gets in.
    let run = sasl_tpm(
        &s,
        &a,
        rid,
        &a.keys.endorsement_key,
        &a.keys.storage_root_key,
        None,
    )
    .await;
    assert_eq!(run.code, 0);

    let reasons = refusal_reasons(&s.audit_for(rid).await);
    for expected in [
        "unknown endorsement key",
        "wrong storage root key",
        "bad signature",
    ] {
        assert!(reasons.contains(expected), "{expected} in:\n{reasons}");
    }
    assert!(reasons.contains("\"transport\":\"amqp\""), "{reasons}");
    let nobody = refusal_reasons(&s.audit_for("tpm-amqp-nobody").await);
    assert!(nobody.contains("no individual enrollment"), "{nobody}");
    let m = scrape(&s).await;
    assert!(
        sample(
            &m,
            "AttestationAttempts",
            &[
                ("protocol", "amqp"),
                ("attestation", "tpm"),
                ("result", "failure")
            ]
        ) >= 4.0,
        "{m}"
    );
}

// ----- SASL `TPM` at the frame level: malformed device payloads (no TPM needed) ------------

/// The SDK samples' EK (an RSA-2048 EK public area); used as EK and SRK.
const SAMPLE_EK: &str = "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAopqgkUBwtpr1sCgVJcEZxsJtpmtOAt9K7SjGFe4hsp6DJ/dd2E5UFzBC+Jp8Fzqf5ukRBkqrAgIuAvHRsruIedk1uarJSLhbDpFLHxFd7iDNcYfrvdgVNT2T9zrvkh2y04WuRQg2D5qf0tZF82jeTjR/YJK7uWhaRwWOwZ3b1XD9l6wFOrwK/Ic0PEsjneFXQzL0n9uKyuHmHNz+wHppmOiMAabvnXXEin9ou7/iowY/+YhFm3j7atsVvxMI5HEM3Mq+W4imUuzPxVX7fZH+oWPKP5ofpWBTf+MdttGby1AjGnv8JE69JriOYoZG2/4qbsfv9M7a7NFrBlaW7Rt36w==";

async fn write_sasl<T: serde::Serialize>(io: &mut AmqpTls, body: &T) {
    use tokio::io::AsyncWriteExt;
    let body = serde_amqp::to_vec(body).unwrap();
    let mut f = ((8 + body.len()) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&[2, 1, 0, 0]);
    f.extend_from_slice(&body);
    io.write_all(&f).await.unwrap();
}

/// The next SASL frame's body; `None` when the server closed the connection.
async fn read_sasl(io: &mut AmqpTls) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; 8];
    io.read_exact(&mut h).await.ok()?;
    let size = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    assert_eq!(h[5], 1, "a SASL frame");
    let mut rest = vec![0u8; size - 8];
    io.read_exact(&mut rest).await.ok()?;
    Some(rest.split_off(h[4] as usize * 4 - 8))
}

/// SASL header, `sasl-mechanisms` (returned), `sasl-init TPM` with `initial`.
async fn raw_tpm_init(s: &TestServer, initial: Vec<u8>) -> (AmqpTls, Vec<String>) {
    use fe2o3_amqp_types::sasl::{SaslInit, SaslMechanisms};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut io = amqp_tls(s).await;
    io.write_all(b"AMQP\x03\x01\x00\x00").await.unwrap();
    let mut h = [0u8; 8];
    io.read_exact(&mut h).await.unwrap();
    assert_eq!(&h, b"AMQP\x03\x01\x00\x00");
    let m: SaslMechanisms = serde_amqp::from_slice(&read_sasl(&mut io).await.unwrap()).unwrap();
    let mechs = m
        .sasl_server_mechanisms
        .0
        .iter()
        .map(|s| s.0.clone())
        .collect();
    write_sasl(
        &mut io,
        &SaslInit {
            mechanism: "TPM".into(),
            initial_response: Some(initial.into()),
            hostname: None,
        },
    )
    .await;
    (io, mechs)
}

/// Read frames until the outcome; answer each challenge with `answer(challenge)`.
async fn raw_outcome(io: &mut AmqpTls, mut answer: impl FnMut(&[u8]) -> Vec<u8>) -> u8 {
    use fe2o3_amqp_types::sasl::{SaslChallenge, SaslOutcome, SaslResponse};
    for _ in 0..32 {
        let body = read_sasl(io).await.expect("an outcome before the close");
        if let Ok(o) = serde_amqp::from_slice::<SaslOutcome>(&body) {
            return o.code as u8;
        }
        let c: SaslChallenge = serde_amqp::from_slice(&body).expect("sasl-challenge");
        let response = answer(&c.challenge);
        write_sasl(
            io,
            &SaslResponse {
                response: response.into(),
            },
        )
        .await;
    }
    panic!("no outcome after 32 frames");
}

#[tokio::test]
async fn sasl_tpm_is_advertised_and_malformed_payloads_get_auth() {
    use dps_amqp::sasl::tpm;
    let s = TestServer::spawn().await;
    let rid = "tpm-raw-1";
    let r = enroll_tpm(&s, rid, json!({"endorsementKey": SAMPLE_EK})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ek = B64.decode(SAMPLE_EK).unwrap();

    // Advertised, beside PLAIN (Java and C# pick from the list).
    let (mut io, mechs) = raw_tpm_init(&s, tpm::init_response(SCOPE, rid, &ek)).await;
    assert!(mechs.contains(&"TPM".to_string()), "{mechs:?}");
    assert!(mechs.contains(&"PLAIN".to_string()), "{mechs:?}");
    // A well-formed exchange up to the blob, then a bad acknowledgement of segment 0.
    let mut challenges = Vec::new();
    let code = raw_outcome(&mut io, |c| {
        challenges.push(c.to_vec());
        if c == tpm::EMPTY {
            tpm::srk_response(&ek)
        } else {
            vec![0, 1, 2]
        }
    })
    .await;
    assert_eq!(code, 1, "auth");
    assert_eq!(challenges[0], tpm::EMPTY.to_vec(), "first: send the SRK");
    assert_eq!(challenges[1][0], 0x80, "first segment, not last, seq 0");
    assert_eq!(challenges[1].len(), 1 + tpm::SEGMENT_SIZE);
    assert_eq!(challenges.len(), 2, "stops at the bad acknowledgement");

    // The whole blob acknowledged, then an empty token.
    let (mut io, _) = raw_tpm_init(&s, tpm::init_response(SCOPE, rid, &ek)).await;
    let mut r = tpm::Reassembler::new();
    let mut blob = None;
    let code = raw_outcome(&mut io, |c| {
        if c == tpm::EMPTY {
            return tpm::srk_response(&ek);
        }
        match r.push(c).expect("well-formed segments") {
            None => tpm::EMPTY.to_vec(),
            Some(b) => {
                blob = Some(b);
                vec![0]
            }
        }
    })
    .await;
    assert_eq!(code, 1);
    let blob = blob.expect("the whole blob came");
    dps_core::tpm::ActivationParts::parse(&blob).expect("an activation blob");

    // A segmented init (not supported), an empty one, one without an EK, a segmented SRK.
    for initial in [
        {
            let mut p = tpm::init_response(SCOPE, rid, &ek);
            p[0] = 0xc0;
            p
        },
        Vec::new(),
        tpm::init_response(SCOPE, rid, &[]),
    ] {
        let (mut io, _) = raw_tpm_init(&s, initial).await;
        assert_eq!(raw_outcome(&mut io, |_| vec![0]).await, 1);
    }
    let (mut io, _) = raw_tpm_init(&s, tpm::init_response(SCOPE, rid, &ek)).await;
    let code = raw_outcome(&mut io, |c| {
        assert_eq!(c, tpm::EMPTY, "no blob for a segmented SRK");
        let mut p = tpm::srk_response(&ek);
        p[0] = 0x80;
        p
    })
    .await;
    assert_eq!(code, 1);
}

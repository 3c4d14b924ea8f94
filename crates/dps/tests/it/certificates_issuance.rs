//! Certificate issuance end to end (api-version `2025-07-01-preview`): devices send a CSR with
//! their registration over HTTPS and MQTT, get their chain (checked with `openssl verify`
//! against the exported CA), renew with the issued certificate, are refused once revoked, and
//! connect to a real Mosquitto broker with it; the CRL lists what was revoked.

use crate::support::*;
use crate::support_mosquitto::Broker;
use dps_core::issuance::CredentialPolicy;
use dps_device::{Auth, Error as DevError, ProvisioningClient, Transport, Trust};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use reqwest::Method;
use serde_json::json;
use std::path::Path;
use std::time::Duration;
use x509_parser::prelude::FromDer;

const CSR_API: &str = "2025-07-01-preview";

fn policy(name: &str, min_interval: u64) -> CredentialPolicy {
    let mut p = CredentialPolicy::new(name);
    p.min_renewal_interval_secs = min_interval;
    p
}

/// A device key pair and its CSR (DER) with CN = `rid`.
fn key_and_csr(rid: &str) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, rid);
    p.distinguished_name = dn;
    let csr = p.serialize_request(&key).unwrap().der().to_vec();
    (key, csr)
}

fn ca(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn intermediate(
    cn: &str,
    by: &CertifiedIssuer<'static, KeyPair>,
) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::signed_by(p, KeyPair::generate().unwrap(), by).unwrap()
}

/// A leaf (client or server) signed by `by`: (certificate PEM, key PEM).
fn leaf(cn: &str, by: &CertifiedIssuer<'static, KeyPair>, server: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if server {
        p.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    let c = p.signed_by(&key, by).unwrap();
    (c.pem(), key.serialize_pem())
}

fn pem_of(chain_b64: &[String]) -> String {
    chain_b64
        .iter()
        .map(|c| {
            let lines: Vec<String> = c
                .as_bytes()
                .chunks(64)
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect();
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                lines.join("\n")
            )
        })
        .collect()
}

fn der_of(b64: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64 DER")
}

/// `openssl verify -CAfile ca -untrusted intermediates leaf`: its output, and whether it passed.
fn openssl_verify(dir: &Path, ca_pem: &str, chain: &[String]) -> (bool, String) {
    let ca = dir.join("trust.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let leaf = dir.join("leaf.pem");
    std::fs::write(&leaf, pem_of(&chain[..1])).unwrap();
    let untrusted = dir.join("untrusted.pem");
    std::fs::write(&untrusted, pem_of(&chain[1..])).unwrap();
    let out = std::process::Command::new("openssl")
        .arg("verify")
        .arg("-purpose")
        .arg("sslclient")
        .arg("-CAfile")
        .arg(&ca)
        .arg("-untrusted")
        .arg(&untrusted)
        .arg(&leaf)
        .output()
        .expect("openssl is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn client(s: &TestServer, rid: &str, auth: Auth, t: Transport, csr: &[u8]) -> ProvisioningClient {
    let port = match t {
        Transport::Https => s.server.https.port(),
        Transport::Mqtt => s.server.mqtt.expect("mqtt listener").port(),
        Transport::Amqp => s.server.amqp.expect("amqp listener").port(),
    };
    ProvisioningClient::builder()
        .global_endpoint("localhost")
        .port(port)
        .id_scope(SCOPE)
        .registration_id(rid)
        .auth(auth)
        .transport(t)
        .trust(Trust::Pem(s.ca_pem.clone().into_bytes()))
        .api_version(CSR_API)
        .csr(csr)
        .poll_interval_override(Duration::from_millis(50))
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

async fn admin(s: &TestServer, m: Method, path: &str, body: Option<serde_json::Value>) -> Resp {
    s.call(m, path, Some(&s.owner()), body, &[]).await
}

/// The exported CA chain (PEM) of a policy.
async fn exported_ca(s: &TestServer, policy: &str) -> String {
    let r = admin(
        s,
        Method::GET,
        &format!("/admin/instances/default/credentialPolicies/{policy}/ca"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body.as_str().expect("PEM text").to_string()
}

async fn hub_thumbprint(
    s: &TestServer,
    state: &dps_core::model::DeviceRegistrationState,
) -> String {
    let hub = state.assigned_hub.clone().expect("hub");
    let dev = state.device_id.clone().expect("device id");
    let r = s.hub_device(&hub, &dev).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["authentication"]["type"], "selfSigned", "{}", r.body);
    r.body["authentication"]["x509Thumbprint"]["primaryThumbprint"]
        .as_str()
        .expect("thumbprint")
        .to_string()
}

#[tokio::test]
async fn symmetric_key_and_factory_x509_devices_get_renew_and_lose_their_certificates() {
    let s = TestServer::spawn_with(|c| {
        c.instances[0].credential_policy = vec![policy("devices", 0)];
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let factory = ca("Factory CA");
    let r = admin(
        &s,
        Method::PUT,
        "/enrollmentGroups/factory",
        Some(json!({"enrollmentGroupId": "factory", "credentialPolicyName": "devices",
            "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": factory.pem()}}}}})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let trust = exported_ca(&s, "devices").await;
    assert_eq!(trust.matches("BEGIN CERTIFICATE").count(), 1, "{trust}");

    for t in [Transport::Https, Transport::Mqtt] {
        let tag = if t == Transport::Https { "h" } else { "m" };
        let sym = format!("cs-sym-{tag}");
        let key = s
            .enroll(&sym, json!({"credentialPolicyName": "devices"}))
            .await;
        let x509 = format!("cs-x509-{tag}");
        let (fcert, fkey) = leaf(&x509, &factory, false);
        let devices = [
            (sym.clone(), Auth::SymmetricKey(key)),
            (
                x509.clone(),
                Auth::X509 {
                    cert_chain_pem: fcert.into_bytes(),
                    key_pem: fkey.into_bytes(),
                },
            ),
        ];
        for (rid, auth) in devices {
            let what = format!("{rid} over {t:?}");
            // Onboarding with the factory credential and a CSR.
            let (k1, csr1) = key_and_csr(&rid);
            let r = client(&s, &rid, auth, t, &csr1)
                .register()
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let chain = r
                .state
                .issued_certificate_chain
                .clone()
                .unwrap_or_else(|| panic!("{what}: no issuedCertificateChain"));
            assert_eq!(chain.len(), 2, "{what}: leaf then the issuing CA");
            let (ok, out) = openssl_verify(tmp.path(), &trust, &chain);
            assert!(ok, "{what}: openssl verify: {out}");
            let leaf1 = der_of(&chain[0]);
            assert_eq!(
                dps_core::x509::common_name(&leaf1).unwrap().as_deref(),
                Some(rid.as_str())
            );
            let sha1 = dps_core::x509::sha256_thumbprint(&leaf1);
            assert_eq!(hub_thumbprint(&s, &r.state).await, sha1, "{what}");

            // Renewal: authenticated with the issued certificate, a new key.
            let (k2, csr2) = key_and_csr(&rid);
            let issued = Auth::X509 {
                cert_chain_pem: pem_of(&chain).into_bytes(),
                key_pem: k1.serialize_pem().into_bytes(),
            };
            let r = client(&s, &rid, issued, t, &csr2)
                .register()
                .await
                .unwrap_or_else(|e| panic!("{what}: renewal: {e}"));
            let chain2 = r
                .state
                .issued_certificate_chain
                .clone()
                .expect("renewed chain");
            assert_ne!(chain2[0], chain[0], "{what}: a new certificate");
            let (ok, out) = openssl_verify(tmp.path(), &trust, &chain2);
            assert!(ok, "{what}: renewed: {out}");
            let sha2 = dps_core::x509::sha256_thumbprint(&der_of(&chain2[0]));
            assert_eq!(hub_thumbprint(&s, &r.state).await, sha2, "{what}");

            // Never in the service API's registration record.
            let rec = s.registration_record(&rid).await;
            assert_eq!(rec.status, 200, "{}", rec.body);
            assert!(
                rec.body.get("issuedCertificateChain").is_none(),
                "{}",
                rec.body
            );

            // Revoked by device: both certificates; the renewed one is refused at once.
            let rv = admin(
                &s,
                Method::POST,
                &format!("/admin/instances/default/registrations/{rid}/revokeCertificates"),
                Some(json!({"reason": "test"})),
            )
            .await;
            assert_eq!(rv.status, 200, "{}", rv.body);
            assert_eq!(rv.body.as_array().map(Vec::len), Some(2), "{}", rv.body);
            let (_, csr3) = key_and_csr(&rid);
            let revoked = Auth::X509 {
                cert_chain_pem: pem_of(&chain2).into_bytes(),
                key_pem: k2.serialize_pem().into_bytes(),
            };
            let e = client(&s, &rid, revoked, t, &csr3)
                .register()
                .await
                .expect_err("a revoked certificate is refused");
            assert!(matches!(e, DevError::Unauthorized { .. }), "{what}: {e:?}");
        }
    }

    // The CRL lists the four devices' eight certificates, signed by the CA.
    let r = s
        .client
        .get(format!("{}/crl/default/devices", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let crl = r.bytes().await.unwrap().to_vec();
    let (_, parsed) =
        x509_parser::revocation_list::CertificateRevocationList::from_der(&crl).expect("CRL");
    assert_eq!(parsed.iter_revoked_certificates().count(), 8);
    let crl_path = tmp.path().join("crl.der");
    std::fs::write(&crl_path, &crl).unwrap();
    std::fs::write(tmp.path().join("trust.pem"), &trust).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["crl", "-inform", "DER", "-noout", "-CAfile"])
        .arg(tmp.path().join("trust.pem"))
        .arg("-in")
        .arg(&crl_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl crl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = s
        .client
        .get(format!("{}/crl/default/nope", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Audit and metrics.
    let issued = s.audit("action=certificate.issued").await;
    assert_eq!(issued.len(), 4, "{issued:?}");
    assert_eq!(s.audit("action=certificate.renewed").await.len(), 4);
    assert_eq!(s.audit("action=certificate.revoked").await.len(), 8);
    // The recorder is shared by every test of this binary: at least this test's four.
    let m = scrape(&s).await;
    let issued = sample(
        &m,
        "CertificatesIssued",
        &[("policy", "devices"), ("kind", "issued")],
    );
    assert!(issued >= 4.0, "{issued}");
}

/// Register over HTTPS with raw bodies (what the SDKs send): (status, body).
async fn raw_register(s: &TestServer, rid: &str, key: &str, api: &str, csr: &str) -> Resp {
    let tok = device_token(SCOPE, rid, key);
    s.call(
        Method::PUT,
        &format!("/{SCOPE}/registrations/{rid}/register?api-version={api}"),
        Some(&tok),
        Some(json!({"registrationId": rid, "csr": csr})),
        &[],
    )
    .await
}

fn b64(der: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(der)
}

#[tokio::test]
async fn bad_certificate_requests_get_a_clear_400_and_minting_in_a_loop_a_429() {
    let s = TestServer::spawn_with(|c| {
        c.instances[0].credential_policy = vec![policy("hourly", 3600)];
        c.instances[0].register_response = dps_core::instance::RegisterResponse::Immediate;
    })
    .await;
    let plain = s.enroll("cs-plain", json!({})).await;
    let (_, csr) = key_and_csr("cs-plain");
    let r = raw_register(&s, "cs-plain", &plain, CSR_API, &b64(&csr)).await;
    assert_error(&r, 400, None);
    assert!(
        r.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("credentialPolicyName")),
        "{}",
        r.body
    );

    let key = s
        .enroll("cs-rate", json!({"credentialPolicyName": "hourly"}))
        .await;
    // The service API keeps and returns `credentialPolicyName` (spec 2025-07-01-preview,
    // IndividualEnrollment_CreateOrUpdate example).
    let e = admin(&s, Method::GET, "/enrollments/cs-rate", None).await;
    assert_eq!(e.body["credentialPolicyName"], "hourly", "{}", e.body);
    // The CSR's CN must be the registration id.
    let (_, other) = key_and_csr("someone-else");
    let r = raw_register(&s, "cs-rate", &key, CSR_API, &b64(&other)).await;
    assert_error(&r, 400, None);
    assert!(
        r.body["message"].as_str().is_some_and(|m| m.contains("CN")),
        "{}",
        r.body
    );
    // PEM armour, garbage, an older api-version.
    let (_, csr) = key_and_csr("cs-rate");
    let pem = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----",
        b64(&csr)
    );
    for (api, field) in [
        (CSR_API, pem.as_str()),
        (CSR_API, "bm90IGEgY3Ny"),
        ("2019-03-31", &b64(&csr)),
    ] {
        let r = raw_register(&s, "cs-rate", &key, api, field).await;
        assert_error(&r, 400, None);
    }
    // Nothing was issued by the refused requests.
    let r = admin(
        &s,
        Method::GET,
        "/admin/instances/default/issuedCertificates?registrationId=cs-rate",
        None,
    )
    .await;
    assert_eq!(r.body, json!([]), "{}", r.body);

    let r = raw_register(&s, "cs-rate", &key, CSR_API, &b64(&csr)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "assigned");
    // Each element one base64 line of DER (the C SDK wraps each in PEM armour as is).
    for c in r.body["registrationState"]["issuedCertificateChain"]
        .as_array()
        .expect("issuedCertificateChain")
    {
        let c = c.as_str().expect("a string");
        assert!(!c.contains('\n') && !c.contains("-----"), "{c}");
        assert!(dps_core::x509::certificate_info(&der_of(c)).is_ok());
    }
    assert_eq!(
        r.body["registrationState"]["issuedCertificateChain"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "{}",
        r.body
    );
    // The status lookup never carries the chain, and refuses a csr.
    let tok = device_token(SCOPE, "cs-rate", &key);
    let look = s
        .call(
            Method::POST,
            &format!("/{SCOPE}/registrations/cs-rate?api-version={CSR_API}"),
            Some(&tok),
            Some(json!({"registrationId": "cs-rate"})),
            &[],
        )
        .await;
    assert_eq!(look.status, 200, "{}", look.body);
    assert_eq!(look.body["status"], "assigned");
    assert!(
        look.body.get("issuedCertificateChain").is_none(),
        "{}",
        look.body
    );
    let look = s
        .call(
            Method::POST,
            &format!("/{SCOPE}/registrations/cs-rate?api-version={CSR_API}"),
            Some(&tok),
            Some(json!({"registrationId": "cs-rate", "csr": b64(&csr)})),
            &[],
        )
        .await;
    assert_error(&look, 400, None);
    // A registration without a CSR gets no chain.
    let r = s.register("cs-rate", &key, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body["registrationState"]
        .get("issuedCertificateChain")
        .is_none());

    // A second certificate within the policy's interval: 429 with the wait.
    let (_, again) = key_and_csr("cs-rate");
    let r = raw_register(&s, "cs-rate", &key, CSR_API, &b64(&again)).await;
    assert_error(&r, 429, None);
    let wait: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("retry-after");
    assert!((3500..=3600).contains(&wait), "{wait}");

    // Revocation by serial (idempotent), listed, unknown serials 404.
    let list = admin(
        &s,
        Method::GET,
        "/admin/instances/default/issuedCertificates?registrationId=cs-rate&status=active",
        None,
    )
    .await;
    let serial = list.body[0]["serialNumber"]
        .as_str()
        .expect("serial")
        .to_string();
    for _ in 0..2 {
        let r = admin(
            &s,
            Method::POST,
            &format!("/admin/instances/default/issuedCertificates/{serial}/revoke"),
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["status"], "revoked");
    }
    let r = admin(
        &s,
        Method::POST,
        "/admin/instances/default/issuedCertificates/ABCDEF/revoke",
        None,
    )
    .await;
    assert_error(&r, 404, None);
    let deny = admin(&s, Method::GET, "/admin/instances/default/denylist", None).await;
    assert!(
        deny.body
            .as_array()
            .is_some_and(|d| d.iter().any(|e| e["value"] == serial.as_str())),
        "{}",
        deny.body
    );
    // Through the admin API a policy gets a generated CA: no CA files (they would let an
    // instance's administrator sign with any key file the server can read).
    let mut inst = admin(&s, Method::GET, "/admin/instances/default", None)
        .await
        .body;
    inst["credential_policy"] = json!([{"name": "hourly"}, {"name": "api", "ca_certificate_file": "/etc/dps/other.pem", "ca_key_file": "/etc/dps/other.key"}]);
    let r = admin(
        &s,
        Method::PUT,
        "/admin/instances/default",
        Some(inst.clone()),
    )
    .await;
    assert_error(&r, 400, None);
    assert!(
        r.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("configuration file")),
        "{}",
        r.body
    );
    inst["credential_policy"] =
        json!([{"name": "hourly", "min_renewal_interval_secs": 3600}, {"name": "api"}]);
    let r = admin(&s, Method::PUT, "/admin/instances/default", Some(inst)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let pol = admin(
        &s,
        Method::GET,
        "/admin/instances/default/credentialPolicies",
        None,
    )
    .await;
    assert_eq!(pol.status, 200, "{}", pol.body);
    assert_eq!(pol.body[0]["policy"]["name"], "hourly");
    assert_eq!(pol.body[0]["generatedCa"], true);
    assert_eq!(pol.body[1]["policy"]["name"], "api");
    assert_eq!(
        pol.body[1]["ca"]["sha256Thumbprint"].as_str().map(str::len),
        Some(64)
    );
}

/// The TLS listener of a Mosquitto broker for devices: client certificates required, the
/// identity is the certificate's CN.
fn cert_listener(dir: &Path, port: u16, trust_pem: &str, server: &(String, String)) -> String {
    let cafile = dir.join("issuing-chain.pem");
    std::fs::write(&cafile, trust_pem).unwrap();
    let certfile = dir.join("server.pem");
    std::fs::write(&certfile, &server.0).unwrap();
    let keyfile = dir.join("server.key");
    std::fs::write(&keyfile, &server.1).unwrap();
    format!(
        "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
        cafile.display(),
        certfile.display(),
        keyfile.display()
    )
}

async fn connect_with_cert(
    port: u16,
    client_id: &str,
    server_ca: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop), String> {
    let mut o = rumqttc::MqttOptions::new(client_id, "localhost", port);
    o.set_clean_session(true);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Simple {
            ca: server_ca.as_bytes().to_vec(),
            alpn: None,
            client_auth: Some((cert_pem.as_bytes().to_vec(), key_pem.as_bytes().to_vec())),
        },
    ));
    let (c, mut el) = rumqttc::AsyncClient::new(o, 16);
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "connect timed out".to_string())??;
    Ok((c, el))
}

#[tokio::test]
async fn issued_certificates_log_devices_into_mosquitto_through_an_operator_intermediate() {
    // The operator's root and the intermediate dps issues with (configured CA files).
    let root = ca("Operator Root");
    let inter = intermediate("Operator Devices Intermediate", &root);
    let files = tempfile::tempdir().unwrap();
    let w = |name: &str, text: String| {
        let p = files.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let mut p = policy("operator", 0);
    p.ca_certificate_file = Some(w("inter.pem", inter.pem()));
    p.ca_key_file = Some(w("inter.key", inter.key().serialize_pem()));
    p.ca_chain_file = Some(w("root.pem", root.pem()));
    p.key_types = vec![dps_core::issuance::KeyType::EcdsaP256];

    // The broker: its admin listener (dynamic security) and a TLS listener that logs devices
    // in by certificate, trusting the operator's chain.
    let tls_port = closed_port();
    let server_ca = ca("Broker TLS CA");
    let server_leaf = leaf("localhost", &server_ca, true);
    let mut trust = inter.pem();
    trust.push_str(&root.pem());
    let Some(broker) =
        Broker::start_with(&cert_listener(files.path(), tls_port, &trust, &server_leaf)).await
    else {
        return;
    };
    let s = TestServer::spawn_with(|c| {
        c.instances[0].linked_hub = vec![broker.linked_hub("mqtt-hub.example.net")];
        c.instances[0].credential_policy = vec![p];
    })
    .await;
    let exported = exported_ca(&s, "operator").await;
    assert_eq!(
        exported.matches("BEGIN CERTIFICATE").count(),
        2,
        "{exported}"
    );

    let factory = ca("Factory CA");
    let r = admin(
        &s,
        Method::PUT,
        "/enrollmentGroups/factory",
        Some(json!({"enrollmentGroupId": "factory", "credentialPolicyName": "operator",
            "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": factory.pem()}}}}})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let key = s
        .enroll("cs-mq-sym", json!({"credentialPolicyName": "operator"}))
        .await;
    let (fcert, fkey) = leaf("cs-mq-x509", &factory, false);
    let devices = [
        ("cs-mq-sym", Auth::SymmetricKey(key), Transport::Https),
        (
            "cs-mq-x509",
            Auth::X509 {
                cert_chain_pem: fcert.into_bytes(),
                key_pem: fkey.into_bytes(),
            },
            Transport::Mqtt,
        ),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (rid, auth, t) in devices {
        let (k, csr) = key_and_csr(rid);
        let r = client(&s, rid, auth, t, &csr)
            .register()
            .await
            .unwrap_or_else(|e| panic!("{rid}: {e}"));
        let chain = r.state.issued_certificate_chain.clone().expect("chain");
        assert_eq!(chain.len(), 3, "{rid}: leaf, intermediate, root");
        let (ok, out) = openssl_verify(tmp.path(), &root.pem(), &chain);
        assert!(ok, "{rid}: openssl verify against the operator root: {out}");
        // dps made the device a broker client without a password: it logs in by certificate.
        let dynsec = crate::support_mosquitto::dynsec_client(broker.port, rid).await;
        assert!(dynsec.is_some(), "{rid}: no dynamic-security client");
        login_and_echo(tls_port, rid, &server_ca.pem(), &chain, &k.serialize_pem()).await;

        // Renewal with the issued certificate, over the same transport; the new one logs in.
        let (k2, csr2) = key_and_csr(rid);
        let issued = Auth::X509 {
            cert_chain_pem: pem_of(&chain).into_bytes(),
            key_pem: k.serialize_pem().into_bytes(),
        };
        let r = client(&s, rid, issued, t, &csr2)
            .register()
            .await
            .unwrap_or_else(|e| panic!("{rid}: renewal: {e}"));
        let chain2 = r
            .state
            .issued_certificate_chain
            .clone()
            .expect("renewed chain");
        login_and_echo(
            tls_port,
            rid,
            &server_ca.pem(),
            &chain2,
            &k2.serialize_pem(),
        )
        .await;

        // Revoked: dps refuses the certificate at once.
        let rv = admin(
            &s,
            Method::POST,
            &format!("/admin/instances/default/registrations/{rid}/revokeCertificates"),
            None,
        )
        .await;
        assert_eq!(rv.status, 200, "{}", rv.body);
        let (_, csr3) = key_and_csr(rid);
        let revoked = Auth::X509 {
            cert_chain_pem: pem_of(&chain2).into_bytes(),
            key_pem: k2.serialize_pem().into_bytes(),
        };
        let e = client(&s, rid, revoked, t, &csr3)
            .register()
            .await
            .expect_err("a revoked certificate is refused");
        assert!(matches!(e, DevError::Unauthorized { .. }), "{rid}: {e:?}");
    }

    // A certificate from another CA is refused by the broker.
    let stranger_ca = ca("Stranger");
    let (sc, sk) = leaf("cs-mq-1", &stranger_ca, false);
    assert!(
        connect_with_cert(tls_port, "cs-mq-1b", &server_ca.pem(), &sc, &sk)
            .await
            .is_err()
    );
}

/// Log into the broker's certificate listener with an issued chain (leaf and intermediate) and
/// publish to, and receive from, the device's own topic.
async fn login_and_echo(port: u16, rid: &str, server_ca: &str, chain: &[String], key: &str) {
    let (c, el) = eventually(Duration::from_secs(10), || {
        let presented = pem_of(&chain[..chain.len() - 1]);
        async move { connect_with_cert(port, rid, server_ca, &presented, key).await }
    })
    .await;
    let mut rx = crate::support_mosquitto::drive(el);
    c.subscribe(format!("devices/{rid}/#"), rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let topic = format!("devices/{rid}/telemetry");
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            // Published until the subscription is in place (the SUBACK comes first).
            c.publish(&topic, rumqttc::QoS::AtLeastOnce, false, "hello")
                .await
                .unwrap();
            match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
                Ok(Some((t, body))) if t == topic => return body,
                Ok(Some(_)) | Err(_) => continue,
                Ok(None) => return String::new(),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{rid}: its own publish never came back"));
    assert_eq!(got, "hello");
    let _ = c.disconnect().await;
}

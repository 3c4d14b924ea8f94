//! X.509 attestation end to end over HTTPS with real TLS client certificates.

use crate::support::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
};
use reqwest::Method;
use serde_json::json;
use time::{Duration, OffsetDateTime};

struct Cert {
    der: Vec<u8>,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Cert {
    fn pem(&self) -> String {
        self.issuer.pem()
    }
    fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }
    fn sha256(&self) -> String {
        dps_core::x509::sha256_thumbprint(&self.der)
    }
}

fn params(
    cn: &str,
    ca: bool,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    serial: u8,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.not_before = not_before;
    p.not_after = not_after;
    p.serial_number = Some(SerialNumber::from_slice(&[serial, 7, 7]));
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
    } else {
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    p
}

fn valid() -> (OffsetDateTime, OffsetDateTime) {
    let n = OffsetDateTime::now_utc();
    (n - Duration::days(1), n + Duration::days(30))
}

fn root(cn: &str) -> Cert {
    let (a, b) = valid();
    let i = CertifiedIssuer::self_signed(params(cn, true, a, b, 1), KeyPair::generate().unwrap())
        .unwrap();
    Cert {
        der: i.der().to_vec(),
        issuer: i,
    }
}

fn signed(cn: &str, ca: bool, by: &Cert, serial: u8) -> Cert {
    let (a, b) = valid();
    signed_valid(cn, ca, by, a, b, serial)
}

fn signed_valid(
    cn: &str,
    ca: bool,
    by: &Cert,
    a: OffsetDateTime,
    b: OffsetDateTime,
    serial: u8,
) -> Cert {
    let i = CertifiedIssuer::signed_by(
        params(cn, ca, a, b, serial),
        KeyPair::generate().unwrap(),
        &by.issuer,
    )
    .unwrap();
    Cert {
        der: i.der().to_vec(),
        issuer: i,
    }
}

fn self_signed_leaf(cn: &str) -> Cert {
    let (a, b) = valid();
    let i = CertifiedIssuer::self_signed(params(cn, false, a, b, 9), KeyPair::generate().unwrap())
        .unwrap();
    Cert {
        der: i.der().to_vec(),
        issuer: i,
    }
}

/// Register with a client certificate chain (leaf first); returns the final response.
async fn register_x509(s: &TestServer, rid: &str, chain: &[&Cert]) -> Resp {
    let mut identity = String::new();
    for c in chain {
        identity.push_str(&c.pem());
    }
    identity.push_str(&chain[0].key_pem());
    let client = client_trusting(&s.ca_pem, Some(&identity));
    let url = |p: &str| format!("{}{}", s.base, p);
    let r = client
        .put(url(&format!(
            "/{SCOPE}/registrations/{rid}/register?api-version=2019-03-31"
        )))
        .json(&json!({"registrationId": rid}))
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    if status != 202 {
        return Resp {
            status,
            headers: Default::default(),
            body,
        };
    }
    let op = body["operationId"].as_str().unwrap().to_string();
    let r = client
        .get(url(&format!(
            "/{SCOPE}/registrations/{rid}/operations/{op}?api-version=2019-03-31"
        )))
        .send()
        .await
        .expect("poll");
    let status = r.status().as_u16();
    Resp {
        status,
        headers: r.headers().clone(),
        body: r.json().await.unwrap_or_default(),
    }
}

async fn put_group(s: &TestServer, gid: &str, x509: serde_json::Value) {
    let r = s
        .call(
            Method::PUT,
            &format!("/enrollmentGroups/{gid}"),
            Some(&s.owner()),
            Some(json!({"enrollmentGroupId": gid, "attestation": {"type": "x509", "x509": x509}})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn an_individual_certificate_registers_and_the_hub_gets_its_thumbprint() {
    let s = TestServer::spawn().await;
    let leaf = self_signed_leaf("x509-ind-1");
    let r = s
        .call(
            Method::PUT,
            "/enrollments/x509-ind-1",
            Some(&s.owner()),
            Some(json!({"registrationId": "x509-ind-1", "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": leaf.pem()}}}}})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = register_x509(&s, "x509-ind-1", &[&leaf]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "assigned");
    let hub = r.body["registrationState"]["assignedHub"]
        .as_str()
        .unwrap()
        .to_string();
    let dev = s
        .call(
            Method::GET,
            &format!("/admin/instances/default/hubs/{hub}/devices/x509-ind-1"),
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    assert_eq!(dev.status, 200, "{}", dev.body);
    assert_eq!(dev.body["authentication"]["type"], "selfSigned");
    assert_eq!(
        dev.body["authentication"]["x509Thumbprint"]["primaryThumbprint"],
        leaf.sha256()
    );
}

#[tokio::test]
async fn a_device_of_a_group_with_an_intermediate_signing_certificate_registers() {
    let s = TestServer::spawn().await;
    let ca = root("Batch Root");
    let int = signed("Batch Intermediate", true, &ca, 2);
    let leaf = signed("meter-0001", false, &int, 3);
    put_group(
        &s,
        "batch-int",
        json!({"signingCertificates": {"primary": {"certificate": int.pem()}}}),
    )
    .await;
    let r = register_x509(&s, "meter-0001", &[&leaf, &int]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "assigned");
    assert_eq!(
        r.body["registrationState"]["x509"]["enrollmentGroupId"],
        "batch-int"
    );
}

#[tokio::test]
async fn a_root_signing_certificate_needs_the_intermediate_from_the_device() {
    let s = TestServer::spawn().await;
    let ca = root("Root Two");
    let int = signed("Int Two", true, &ca, 2);
    let leaf = signed("meter-0002", false, &int, 3);
    put_group(
        &s,
        "batch-root",
        json!({"signingCertificates": {"primary": {"certificate": ca.pem()}}}),
    )
    .await;
    let ok = register_x509(&s, "meter-0002", &[&leaf, &int]).await;
    assert_eq!(ok.body["status"], "assigned", "{}", ok.body);
    // Without the intermediate the chain cannot be built: refused.
    let refused = register_x509(&s, "meter-0002", &[&leaf]).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(refused.body["errorCode"], 401002);
}

#[tokio::test]
async fn only_a_verified_ca_admits_devices_through_ca_references() {
    let s = TestServer::spawn().await;
    let owner = s.owner();
    let ca = root("Factory CA");
    let leaf = signed("sensor-77", false, &ca, 4);
    let r = s
        .call(
            Method::PUT,
            "/admin/instances/default/certificates/factory-ca",
            Some(&owner),
            Some(json!({"certificate": ca.pem()})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["isVerified"], false);
    put_group(
        &s,
        "factory",
        json!({"caReferences": {"primary": "factory-ca"}}),
    )
    .await;
    let refused = register_x509(&s, "sensor-77", &[&leaf]).await;
    assert_eq!(
        refused.status, 401,
        "unverified CA must not admit: {}",
        refused.body
    );

    // Proof of possession: a wrong code is refused, the right one verifies.
    let code = s
        .call(
            Method::POST,
            "/admin/instances/default/certificates/factory-ca/generateVerificationCode",
            Some(&owner),
            None,
            &[],
        )
        .await;
    let code = code.body["verificationCode"].as_str().unwrap().to_string();
    let wrong = signed("not-the-code", false, &ca, 5);
    let r = s
        .call(
            Method::POST,
            "/admin/instances/default/certificates/factory-ca/verify",
            Some(&owner),
            Some(json!({"certificate": wrong.pem()})),
            &[],
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let other_ca = root("Impostor");
    let forged = signed(&code, false, &other_ca, 6);
    let r = s
        .call(
            Method::POST,
            "/admin/instances/default/certificates/factory-ca/verify",
            Some(&owner),
            Some(json!({"certificate": forged.pem()})),
            &[],
        )
        .await;
    assert_eq!(
        r.status, 400,
        "a code signed by another key must fail: {}",
        r.body
    );
    let proof = signed(&code, false, &ca, 7);
    let r = s
        .call(
            Method::POST,
            "/admin/instances/default/certificates/factory-ca/verify",
            Some(&owner),
            Some(json!({"certificate": proof.pem()})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["isVerified"], true);

    let ok = register_x509(&s, "sensor-77", &[&leaf]).await;
    assert_eq!(ok.body["status"], "assigned", "{}", ok.body);
}

#[tokio::test]
async fn refused_certificates_get_401002() {
    let s = TestServer::spawn().await;
    let owner = s.owner();
    let ca = root("Neg Root");
    put_group(
        &s,
        "neg",
        json!({"signingCertificates": {"primary": {"certificate": ca.pem()}}}),
    )
    .await;

    // Unenrolled self-signed certificate.
    let stranger = self_signed_leaf("stranger-1");
    assert_eq!(
        register_x509(&s, "stranger-1", &[&stranger]).await.status,
        401
    );
    // CN not equal to the registration id.
    let leaf = signed("device-a", false, &ca, 2);
    assert_eq!(register_x509(&s, "device-b", &[&leaf]).await.status, 401);
    // Expired certificate.
    let n = OffsetDateTime::now_utc();
    let expired = signed_valid(
        "device-old",
        false,
        &ca,
        n - Duration::days(30),
        n - Duration::days(1),
        3,
    );
    assert_eq!(
        register_x509(&s, "device-old", &[&expired]).await.status,
        401
    );
    // Revoked by thumbprint on the instance deny list.
    let revoked = signed("device-rev", false, &ca, 4);
    assert_eq!(
        register_x509(&s, "device-rev", &[&revoked]).await.body["status"],
        "assigned"
    );
    let r = s
        .call(
            Method::PUT,
            &format!("/admin/instances/default/denylist/{}", revoked.sha256()),
            Some(&owner),
            Some(json!({"kind": "thumbprint", "reason": "stolen"})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = register_x509(&s, "device-rev", &[&revoked]).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.body["errorCode"], 401002);
    // The precise reason is in the audit log.
    let audit = s
        .call(
            Method::GET,
            "/admin/audit?target=device-rev&action=registration.refused",
            Some(&owner),
            None,
            &[],
        )
        .await;
    let reasons = audit.body.to_string();
    assert!(reasons.contains("revoked"), "{reasons}");
}

#[tokio::test]
async fn an_individual_enrollment_can_disable_one_device_of_a_group() {
    let s = TestServer::spawn().await;
    let ca = root("Batch Three");
    let leaf = signed("meter-0003", false, &ca, 8);
    put_group(
        &s,
        "batch3",
        json!({"signingCertificates": {"primary": {"certificate": ca.pem()}}}),
    )
    .await;
    let r = s
        .call(
            Method::PUT,
            "/enrollments/meter-0003",
            Some(&s.owner()),
            Some(json!({"registrationId": "meter-0003", "provisioningStatus": "disabled", "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": leaf.pem()}}}}})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = register_x509(&s, "meter-0003", &[&leaf]).await;
    assert_eq!(r.body["status"], "disabled", "{}", r.body);
}

/// A client that presents a certificate but signs the handshake with another key.
mod no_key {
    use rustls::client::ResolvesClientCert;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::sign::CertifiedKey;
    use std::sync::Arc;

    #[derive(Debug)]
    pub struct Wrong(pub Arc<CertifiedKey>);
    impl ResolvesClientCert for Wrong {
        fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
        fn has_certs(&self) -> bool {
            true
        }
    }

    pub fn config(ca_pem: &str, cert_der: Vec<u8>, other_key_der: Vec<u8>) -> rustls::ClientConfig {
        use rustls::pki_types::pem::PemObject;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let key = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                other_key_der,
            )))
            .unwrap();
        let ck = Arc::new(CertifiedKey::new(vec![CertificateDer::from(cert_der)], key));
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(Wrong(ck)))
    }
}

#[tokio::test]
async fn a_certificate_presented_without_its_private_key_is_refused_at_the_tls_layer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::spawn().await;
    let leaf = self_signed_leaf("thief-1");
    let other = KeyPair::generate().unwrap();
    let cfg = no_key::config(&s.ca_pem, leaf.der.clone(), other.serialize_der());
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(s.server.https)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let outcome = async {
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await?;
        let mut buf = vec![0u8; 1024];
        let n = tls.read(&mut buf).await?;
        Ok::<usize, std::io::Error>(n)
    }
    .await;
    match outcome {
        Err(_) | Ok(0) => {}
        Ok(n) => panic!("the server answered {n} bytes to a client without the certificate's key"),
    }
}

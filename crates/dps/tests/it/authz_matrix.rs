//! The authorization matrix: every route of the server's one route table
//! ([`dps_server::routes::routes`]) against every access right.
//!
//! The default instance gets one access policy per single right. For each route, the
//! resources the call needs are set up with the owner policy; then every token whose policy
//! lacks the route's right must get 401 with Azure's error body (errorCode 401002, message,
//! trackingId, timestampUtc), and the token with the right must get the route's *normal*
//! status (200, 202, 204). Device routes need the device's own credential: every service
//! token is refused there, and the device's SAS token succeeds. Public routes answer everyone.
//!
//! The rows are keyed by the route's name (`METHOD /pattern`); a route added to the table
//! without a row here fails [`every_route_of_the_table_has_a_matrix_row`] and the matrix.

use crate::support::*;
use dps_core::instance::Right;
use dps_server::config::PolicyConfig;
use dps_server::routes::{routes, Access, Route};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use reqwest::Method;
use serde_json::{json, Value};

fn policy_name(r: Right) -> String {
    format!("mx-{}", r.as_str().to_ascii_lowercase())
}

fn policy_key(r: Right) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .encode(format!("matrix-policy-key-{:<24}", r.as_str()))
}

fn token_for(r: Right) -> String {
    service_token("localhost", &policy_name(r), &policy_key(r))
}

/// The broker-auth hub of the matrix server (not used by allocation) and its broker secret.
const BROKER_HUB: &str = "mx-broker.example.net";
const BROKER_SECRET: &str = "matrix-broker-secret-0123456789";

async fn spawn_matrix_server() -> TestServer {
    TestServer::spawn_with(|cfg| {
        let mut hub =
            dps_core::instance::LinkedHub::new(BROKER_HUB, dps_core::instance::HubKind::BrokerAuth);
        hub.apply_allocation_policy = false;
        hub.options
            .insert("auth_secret".into(), BROKER_SECRET.into());
        cfg.instances[0].linked_hub.push(hub);
        cfg.instances[0].allow_fault_injection = true;
        let mut issuing = dps_core::issuance::CredentialPolicy::new("matrix");
        issuing.min_renewal_interval_secs = 0;
        cfg.instances[0].credential_policy = vec![issuing];
        for r in Right::ALL {
            cfg.instances[0].access_policy.push(PolicyConfig {
                name: policy_name(r),
                primary_key: Some(policy_key(r)),
                secondary_key: Some(policy_key(r)),
                rights: vec![r],
            });
        }
    })
    .await
}

/// One call of the matrix: what to send and the status the authorized caller gets.
struct Case {
    path: String,
    body: Option<Value>,
    /// The status of a successful call.
    expect: u16,
    /// For device routes: the device's own credential.
    device_token: Option<String>,
}

/// A broker-auth question about a username that is no device.
fn broker_case(check: &str, expect: u16) -> Case {
    Case {
        path: format!("/brokerAuth/default/{BROKER_HUB}/{check}"),
        body: Some(json!({"username": "mx-nobody", "password": "x", "topics": []})),
        expect,
        device_token: Some(format!("Bearer {BROKER_SECRET}")),
    }
}

fn case(path: impl Into<String>, body: Option<Value>, expect: u16) -> Case {
    Case {
        path: path.into(),
        body,
        expect,
        device_token: None,
    }
}

const GROUP: &str = "mx-grp";

fn enrollment(rid: &str) -> Value {
    json!({"registrationId": rid, "attestation": {"type": "symmetricKey"}})
}

fn group(gid: &str) -> Value {
    json!({"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}})
}

fn cert_params(cn: &str, ca: bool) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(30);
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

fn new_ca(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
    CertifiedIssuer::self_signed(cert_params(cn, true), KeyPair::generate().unwrap()).unwrap()
}

fn signed_leaf_pem(cn: &str, by: &CertifiedIssuer<'static, KeyPair>) -> String {
    CertifiedIssuer::signed_by(cert_params(cn, false), KeyPair::generate().unwrap(), by)
        .unwrap()
        .pem()
}

/// A call with the owner policy that must succeed (setup).
/// A device `mx-cs-{n}` of the matrix credential policy registers with a CSR; the serial
/// number of the certificate it was issued.
async fn issued_serial(s: &TestServer, n: usize) -> String {
    use base64::Engine as _;
    let rid = format!("mx-cs-{n}");
    let key = s
        .enroll(&rid, json!({"credentialPolicyName": "matrix"}))
        .await;
    let device_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, rid.as_str());
    p.distinguished_name = dn;
    let csr = p.serialize_request(&device_key).unwrap();
    let tok = device_token(SCOPE, &rid, &key);
    let r = s
        .call(
            Method::PUT,
            &format!("/{SCOPE}/registrations/{rid}/register?api-version=2025-07-01-preview"),
            Some(&tok),
            Some(json!({"registrationId": rid,
                "csr": base64::engine::general_purpose::STANDARD.encode(csr.der())})),
            &[],
        )
        .await;
    assert!(r.status == 200 || r.status == 202, "{}", r.body);
    let path = format!("/admin/instances/default/issuedCertificates?registrationId={rid}");
    eventually(std::time::Duration::from_secs(10), || {
        let path = path.clone();
        async move {
            let r = s
                .call(Method::GET, &path, Some(&s.owner()), None, &[])
                .await;
            r.body[0]["serialNumber"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("not issued yet: {}", r.body))
        }
    })
    .await
}

async fn owner_call(s: &TestServer, m: Method, path: &str, body: Option<Value>) -> Resp {
    let r = s.call(m.clone(), path, Some(&s.owner()), body, &[]).await;
    assert!(
        (200..300).contains(&r.status),
        "setup {m} {path}: {} {}",
        r.status,
        r.body
    );
    r
}

/// A registered device of the group: (registration id, its SAS token, the final response).
async fn registered_device(s: &TestServer, gkey: &str, n: usize) -> (String, String, Resp) {
    let rid = format!("mx-dev-{n}");
    let key = derive_key(gkey, &rid);
    let r = s.register(&rid, &key, None).await;
    assert_eq!(
        r.body["status"], "assigned",
        "setup register {rid}: {}",
        r.body
    );
    (rid.clone(), device_token(SCOPE, &rid, &key), r)
}

/// The matrix row of a route: set up what the call needs (with the owner policy) and return the
/// call. `None`: the route has no row.
async fn row(s: &TestServer, gkey: &str, route: &Route, n: usize) -> Option<Case> {
    let ca_name = format!("mx-ca-{n}");
    let certs = format!("/admin/instances/default/certificates/{ca_name}");
    let put_ca = || async {
        let ca = new_ca(&format!("Matrix CA {n}"));
        owner_call(
            s,
            Method::PUT,
            &certs,
            Some(json!({"certificate": ca.pem()})),
        )
        .await;
        ca
    };
    Some(match route.name().as_str() {
        // Device API.
        "PUT /{idScope}/registrations/{registrationId}/register" => {
            let rid = format!("mx-dev-{n}");
            let tok = device_token(SCOPE, &rid, &derive_key(gkey, &rid));
            Case {
                device_token: Some(tok),
                ..case(
                    format!("/{SCOPE}/registrations/{rid}/register"),
                    Some(json!({"registrationId": rid})),
                    202,
                )
            }
        }
        "GET /{idScope}/registrations/{registrationId}/operations/{operationId}" => {
            let (rid, tok, r) = registered_device(s, gkey, n).await;
            let op = r.body["operationId"].as_str().expect("operation id");
            Case {
                device_token: Some(tok),
                ..case(
                    format!("/{SCOPE}/registrations/{rid}/operations/{op}"),
                    None,
                    200,
                )
            }
        }
        "POST /{idScope}/registrations/{registrationId}" => {
            let (rid, tok, _) = registered_device(s, gkey, n).await;
            Case {
                device_token: Some(tok),
                ..case(
                    format!("/{SCOPE}/registrations/{rid}"),
                    Some(json!({"registrationId": rid})),
                    200,
                )
            }
        }
        // Service API: individual enrollments.
        "POST /enrollments" => case(
            "/enrollments",
            Some(json!({"mode": "create", "enrollments": [enrollment(&format!("mx-bulk-{n}"))]})),
            200,
        ),
        "POST /enrollments/query" => case(
            "/enrollments/query",
            Some(json!({"query": "SELECT * FROM enrollments"})),
            200,
        ),
        "GET /enrollments/{registrationId}" => {
            let rid = format!("mx-enr-{n}");
            s.enroll(&rid, json!({})).await;
            case(format!("/enrollments/{rid}"), None, 200)
        }
        "PUT /enrollments/{registrationId}" => {
            let rid = format!("mx-enr-{n}");
            case(format!("/enrollments/{rid}"), Some(enrollment(&rid)), 200)
        }
        "DELETE /enrollments/{registrationId}" => {
            let rid = format!("mx-enr-{n}");
            s.enroll(&rid, json!({})).await;
            case(format!("/enrollments/{rid}"), None, 204)
        }
        "POST /enrollments/{registrationId}/attestationMechanism" => {
            let rid = format!("mx-enr-{n}");
            s.enroll(&rid, json!({})).await;
            case(
                format!("/enrollments/{rid}/attestationMechanism"),
                None,
                200,
            )
        }
        // Service API: groups.
        "POST /enrollmentGroups" => case(
            "/enrollmentGroups",
            Some(json!({"mode": "create", "enrollmentGroups": [group(&format!("mx-bulkg-{n}"))]})),
            200,
        ),
        "POST /enrollmentGroups/query" => case(
            "/enrollmentGroups/query",
            Some(json!({"query": "SELECT * FROM enrollmentGroups"})),
            200,
        ),
        "GET /enrollmentGroups/{enrollmentGroupId}" => {
            let gid = format!("mx-g-{n}");
            s.enroll_group(&gid, json!({})).await;
            case(format!("/enrollmentGroups/{gid}"), None, 200)
        }
        "PUT /enrollmentGroups/{enrollmentGroupId}" => {
            let gid = format!("mx-g-{n}");
            case(format!("/enrollmentGroups/{gid}"), Some(group(&gid)), 200)
        }
        "DELETE /enrollmentGroups/{enrollmentGroupId}" => {
            let gid = format!("mx-g-{n}");
            s.enroll_group(&gid, json!({})).await;
            case(format!("/enrollmentGroups/{gid}"), None, 204)
        }
        "POST /enrollmentGroups/{enrollmentGroupId}/attestationMechanism" => {
            let gid = format!("mx-g-{n}");
            s.enroll_group(&gid, json!({})).await;
            case(
                format!("/enrollmentGroups/{gid}/attestationMechanism"),
                None,
                200,
            )
        }
        // Service API: registration records.
        "GET /registrations/{registrationId}" => {
            let (rid, _, _) = registered_device(s, gkey, n).await;
            case(format!("/registrations/{rid}"), None, 200)
        }
        "DELETE /registrations/{registrationId}" => {
            let (rid, _, _) = registered_device(s, gkey, n).await;
            case(format!("/registrations/{rid}"), None, 204)
        }
        "POST /registrations/{enrollmentGroupId}/query" => {
            case(format!("/registrations/{GROUP}/query"), None, 200)
        }
        // Admin API.
        "GET /admin/instances" => case("/admin/instances", None, 200),
        "GET /admin/instances/{instance}" => case("/admin/instances/default", None, 200),
        "PUT /admin/instances/{instance}" => case(
            format!("/admin/instances/mx-inst-{n}"),
            Some(json!({"hostnames": [format!("mx-inst-{n}.local")]})),
            200,
        ),
        "DELETE /admin/instances/{instance}" => {
            let path = format!("/admin/instances/mx-inst-{n}");
            let body = json!({"hostnames": [format!("mx-inst-{n}.local")]});
            owner_call(s, Method::PUT, &path, Some(body)).await;
            case(path, None, 204)
        }
        "GET /admin/instances/{instance}/stats" => {
            case("/admin/instances/default/stats", None, 200)
        }
        "GET /admin/instances/{instance}/linkedHubs" => {
            case("/admin/instances/default/linkedHubs", None, 200)
        }
        "PUT /admin/instances/{instance}/linkedHubs/{hub}" => case(
            format!("/admin/instances/default/linkedHubs/mx-hub-{n}.example.net"),
            Some(json!({"kind": "registry"})),
            200,
        ),
        "DELETE /admin/instances/{instance}/linkedHubs/{hub}" => {
            let path = format!("/admin/instances/default/linkedHubs/mx-hub-{n}.example.net");
            owner_call(s, Method::PUT, &path, Some(json!({"kind": "registry"}))).await;
            case(path, None, 204)
        }
        "GET /admin/instances/{instance}/accessPolicies" => {
            case("/admin/instances/default/accessPolicies", None, 200)
        }
        "PUT /admin/instances/{instance}/accessPolicies/{policy}" => case(
            format!("/admin/instances/default/accessPolicies/mx-pol-{n}"),
            Some(json!({"rights": ["EnrollmentRead"]})),
            200,
        ),
        "DELETE /admin/instances/{instance}/accessPolicies/{policy}" => {
            let path = format!("/admin/instances/default/accessPolicies/mx-pol-{n}");
            let body = json!({"rights": ["EnrollmentRead"]});
            owner_call(s, Method::PUT, &path, Some(body)).await;
            case(path, None, 204)
        }
        "GET /admin/instances/{instance}/hubs/{hub}/devices" => case(
            "/admin/instances/default/hubs/hub-a.example.net/devices",
            None,
            200,
        ),
        "GET /admin/instances/{instance}/hubs/{hub}/devices/{deviceId}" => {
            let (_, _, r) = registered_device(s, gkey, n).await;
            let hub = r.body["registrationState"]["assignedHub"]
                .as_str()
                .expect("assigned hub");
            let dev = r.body["registrationState"]["deviceId"]
                .as_str()
                .expect("device id");
            case(
                format!("/admin/instances/default/hubs/{hub}/devices/{dev}"),
                None,
                200,
            )
        }
        "GET /admin/instances/{instance}/hubCleanup" => {
            case("/admin/instances/default/hubCleanup", None, 200)
        }
        "GET /admin/instances/{instance}/faults" => {
            case("/admin/instances/default/faults", None, 200)
        }
        "POST /admin/instances/{instance}/faults" => case(
            "/admin/instances/default/faults",
            Some(json!({"action": "throttle", "registrationId": format!("mx-never-{n}")})),
            201,
        ),
        "DELETE /admin/instances/{instance}/faults/{fault}" => {
            let body = json!({"action": "throttle", "id": format!("mx-f-{n}"), "registrationId": "mx-never"});
            owner_call(
                s,
                Method::POST,
                "/admin/instances/default/faults",
                Some(body),
            )
            .await;
            case(
                format!("/admin/instances/default/faults/mx-f-{n}"),
                None,
                204,
            )
        }
        "GET /admin/audit" => case("/admin/audit", None, 200),
        "GET /admin/events" => case("/admin/events", None, 200),
        // Admin API: certificates and the deny list.
        "GET /admin/instances/{instance}/certificates" => {
            case("/admin/instances/default/certificates", None, 200)
        }
        "GET /admin/instances/{instance}/certificates/{ca}" => {
            put_ca().await;
            case(certs, None, 200)
        }
        "PUT /admin/instances/{instance}/certificates/{ca}" => {
            let ca = new_ca(&format!("Matrix CA {n}"));
            case(certs, Some(json!({"certificate": ca.pem()})), 200)
        }
        "DELETE /admin/instances/{instance}/certificates/{ca}" => {
            put_ca().await;
            case(certs, None, 204)
        }
        "POST /admin/instances/{instance}/certificates/{ca}/generateVerificationCode" => {
            put_ca().await;
            case(format!("{certs}/generateVerificationCode"), None, 200)
        }
        "POST /admin/instances/{instance}/certificates/{ca}/verify" => {
            let ca = put_ca().await;
            let r = owner_call(
                s,
                Method::POST,
                &format!("{certs}/generateVerificationCode"),
                None,
            )
            .await;
            let code = r.body["verificationCode"].as_str().expect("code");
            let proof = signed_leaf_pem(code, &ca);
            case(
                format!("{certs}/verify"),
                Some(json!({"certificate": proof})),
                200,
            )
        }
        "GET /admin/instances/{instance}/denylist" => {
            case("/admin/instances/default/denylist", None, 200)
        }
        "PUT /admin/instances/{instance}/denylist/{value}" => case(
            format!("/admin/instances/default/denylist/{:040x}", n + 1),
            Some(json!({"kind": "thumbprint", "reason": "matrix"})),
            200,
        ),
        "DELETE /admin/instances/{instance}/denylist/{value}" => {
            let path = format!("/admin/instances/default/denylist/{:040x}", n + 1);
            owner_call(s, Method::PUT, &path, Some(json!({"kind": "thumbprint"}))).await;
            case(path, None, 204)
        }
        // Admin API: certificate issuance.
        "GET /admin/instances/{instance}/credentialPolicies" => {
            case("/admin/instances/default/credentialPolicies", None, 200)
        }
        "GET /admin/instances/{instance}/credentialPolicies/{policy}" => case(
            "/admin/instances/default/credentialPolicies/matrix",
            None,
            200,
        ),
        "GET /admin/instances/{instance}/credentialPolicies/{policy}/ca" => case(
            "/admin/instances/default/credentialPolicies/matrix/ca",
            None,
            200,
        ),
        "GET /admin/instances/{instance}/issuedCertificates" => {
            case("/admin/instances/default/issuedCertificates", None, 200)
        }
        "GET /admin/instances/{instance}/issuedCertificates/{serial}" => {
            let serial = issued_serial(s, n).await;
            case(
                format!("/admin/instances/default/issuedCertificates/{serial}"),
                None,
                200,
            )
        }
        "POST /admin/instances/{instance}/issuedCertificates/{serial}/revoke" => {
            let serial = issued_serial(s, n).await;
            case(
                format!("/admin/instances/default/issuedCertificates/{serial}/revoke"),
                None,
                200,
            )
        }
        "POST /admin/instances/{instance}/registrations/{registrationId}/revokeCertificates" => {
            let serial = issued_serial(s, n).await;
            assert!(!serial.is_empty());
            case(
                format!("/admin/instances/default/registrations/mx-cs-{n}/revokeCertificates"),
                None,
                200,
            )
        }
        // Brokers that ask dps: the hub's broker secret, not a service token. An unknown
        // username gets the flavour's normal refusal (RabbitMQ `deny`, EMQX `ignore`, VerneMQ
        // `next`: 200; mosquitto-go-auth: 403).
        "GET /brokerAuth/{instance}/{hub}/rabbitmq/user" => broker_case("rabbitmq/user", 200),
        "POST /brokerAuth/{instance}/{hub}/rabbitmq/user" => broker_case("rabbitmq/user", 200),
        "GET /brokerAuth/{instance}/{hub}/rabbitmq/vhost" => broker_case("rabbitmq/vhost", 200),
        "POST /brokerAuth/{instance}/{hub}/rabbitmq/vhost" => broker_case("rabbitmq/vhost", 200),
        "GET /brokerAuth/{instance}/{hub}/rabbitmq/resource" => {
            broker_case("rabbitmq/resource", 200)
        }
        "POST /brokerAuth/{instance}/{hub}/rabbitmq/resource" => {
            broker_case("rabbitmq/resource", 200)
        }
        "GET /brokerAuth/{instance}/{hub}/rabbitmq/topic" => broker_case("rabbitmq/topic", 200),
        "POST /brokerAuth/{instance}/{hub}/rabbitmq/topic" => broker_case("rabbitmq/topic", 200),
        "GET /brokerAuth/{instance}/{hub}/emqx/authn" => broker_case("emqx/authn", 200),
        "POST /brokerAuth/{instance}/{hub}/emqx/authn" => broker_case("emqx/authn", 200),
        "GET /brokerAuth/{instance}/{hub}/emqx/authz" => broker_case("emqx/authz", 200),
        "POST /brokerAuth/{instance}/{hub}/emqx/authz" => broker_case("emqx/authz", 200),
        "POST /brokerAuth/{instance}/{hub}/vernemq/auth_on_register" => {
            broker_case("vernemq/auth_on_register", 200)
        }
        "POST /brokerAuth/{instance}/{hub}/vernemq/auth_on_publish" => {
            broker_case("vernemq/auth_on_publish", 200)
        }
        "POST /brokerAuth/{instance}/{hub}/vernemq/auth_on_subscribe" => {
            broker_case("vernemq/auth_on_subscribe", 200)
        }
        "GET /brokerAuth/{instance}/{hub}/goauth/user" => broker_case("goauth/user", 403),
        "POST /brokerAuth/{instance}/{hub}/goauth/user" => broker_case("goauth/user", 403),
        "GET /brokerAuth/{instance}/{hub}/goauth/superuser" => broker_case("goauth/superuser", 403),
        "POST /brokerAuth/{instance}/{hub}/goauth/superuser" => {
            broker_case("goauth/superuser", 403)
        }
        "GET /brokerAuth/{instance}/{hub}/goauth/acl" => broker_case("goauth/acl", 403),
        "POST /brokerAuth/{instance}/{hub}/goauth/acl" => broker_case("goauth/acl", 403),
        // Public.
        "GET /healthz" => case("/healthz", None, 200),
        "GET /openapi.json" => case("/openapi.json", None, 200),
        "GET /crl/{instance}/{policy}" => case("/crl/default/matrix", None, 200),
        _ => return None,
    })
}

/// The access each route must require, from the protocol's rules (§7.1 "Map operations"), not
/// from the table: GET, query and attestationMechanism need EnrollmentRead (registration
/// records: RegistrationStatusRead); PUT, bulk and DELETE need EnrollmentWrite (DELETE of a
/// registration record: RegistrationStatusWrite); the admin API needs ServiceConfig; device
/// routes need the device's credential; `/healthz` and `/openapi.json` nothing.
fn pinned_access(method: &Method, pattern: &str) -> Access {
    let (m, p) = (method.as_str(), pattern);
    if p == "/healthz" || p == "/openapi.json" || p.starts_with("/crl/") {
        Access::Public
    } else if p.starts_with("/brokerAuth/") {
        Access::Broker
    } else if p.starts_with("/{idScope}/") {
        Access::Device
    } else if p.starts_with("/admin/") {
        Access::Right(Right::ServiceConfig)
    } else if p.starts_with("/registrations/") {
        Access::Right(if m == "DELETE" {
            Right::RegistrationStatusWrite
        } else {
            Right::RegistrationStatusRead
        })
    } else {
        let read = m == "GET" || p.ends_with("/query") || p.ends_with("/attestationMechanism");
        Access::Right(if read {
            Right::EnrollmentRead
        } else {
            Right::EnrollmentWrite
        })
    }
}

#[test]
fn the_table_requires_the_rights_the_protocol_maps() {
    let wrong: Vec<String> = routes()
        .iter()
        .filter(|r| r.access != pinned_access(&r.method, r.pattern))
        .map(|r| {
            format!(
                "{}: table {:?}, protocol {:?}",
                r.name(),
                r.access,
                pinned_access(&r.method, r.pattern)
            )
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn every_route_of_the_table_has_a_matrix_row() {
    // The rows are the arms of `row`; this lists the table so that a missing row names the
    // route (the async matrix below fails on it too, after setting up a server).
    let names: Vec<String> = routes().iter().map(Route::name).collect();
    let src = include_str!("authz_matrix.rs");
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !src.contains(&format!("\"{n}\" =>")))
        .collect();
    assert!(
        missing.is_empty(),
        "routes without an authorization-matrix row: {missing:?}"
    );
    assert!(names.len() >= 40, "the route table lost routes: {names:?}");
}

#[tokio::test]
async fn every_route_answers_exactly_the_right_it_needs() {
    let s = spawn_matrix_server().await;
    let gkey = s.enroll_group(GROUP, json!({})).await;
    let mut failures = Vec::new();
    let mut missing = Vec::new();
    for (n, route) in routes().iter().enumerate() {
        // Expectations come from the protocol's mapping, not from the table under test.
        let access = pinned_access(&route.method, route.pattern);
        let Some(c) = row(&s, &gkey, route, n).await else {
            missing.push(route.name());
            continue;
        };
        let call = |token: Option<String>| {
            let (m, path, body) = (route.method.clone(), c.path.clone(), c.body.clone());
            let s = &s;
            async move { s.call(m, &path, token.as_deref(), body, &[]).await }
        };
        // Refused first (they must change nothing), then the allowed call.
        for r in Right::ALL {
            if access == Access::Right(r) {
                continue;
            }
            let resp = call(Some(token_for(r))).await;
            let what = format!("{} ({}) with {}", route.name(), c.path, r.as_str());
            if access == Access::Public {
                if resp.status != c.expect {
                    failures.push(format!("{what}: {} {}", resp.status, resp.body));
                }
                continue;
            }
            if access == Access::Broker {
                // A broker route knows no service token: 401 (plain text, the broker's
                // contract has no Azure error body).
                if resp.status != 401 {
                    failures.push(format!(
                        "{what}: expected 401, got {} {}",
                        resp.status, resp.body
                    ));
                }
                continue;
            }
            let ok = resp.status == 401
                && resp.body["errorCode"] == 401002
                && resp.body["message"].is_string()
                && resp.body["trackingId"].is_string()
                && resp.body["timestampUtc"].is_string()
                && resp.header("x-ms-request-id").is_some();
            if !ok {
                failures.push(format!(
                    "{what}: expected 401 with Azure's error body, got {} {}",
                    resp.status, resp.body
                ));
            }
        }
        let (token, who) = match access {
            Access::Right(r) => (Some(token_for(r)), r.as_str().to_string()),
            Access::Device => (c.device_token.clone(), "the device's token".into()),
            Access::Broker => (c.device_token.clone(), "the hub's broker secret".into()),
            Access::Public => (None, "no token".into()),
        };
        let resp = call(token).await;
        if resp.status != c.expect {
            failures.push(format!(
                "{} ({}) with {who}: expected {}, got {} {}",
                route.name(),
                c.path,
                c.expect,
                resp.status,
                resp.body
            ));
        } else if (route.name() == "POST /enrollments" || route.name() == "POST /enrollmentGroups")
            && resp.body["isSuccessful"] != true
        {
            failures.push(format!("{}: bulk failed: {}", route.name(), resp.body));
        }
    }
    assert!(
        missing.is_empty(),
        "routes without a matrix row: {missing:?}"
    );
    assert!(
        failures.is_empty(),
        "authorization matrix mismatches:\n{}",
        failures.join("\n")
    );
}

/// Authorization happens before the body is read: a refused caller gets 401 even with a body
/// over the limit, which an authorized caller gets 413 for.
#[tokio::test]
async fn a_refused_caller_is_answered_before_its_body_is_read() {
    let s = spawn_matrix_server().await;
    let big = json!({"hostnames": ["x.local"], "pad": "x".repeat(200 * 1024)});
    let path = "/admin/instances/mx-big";
    let refused = s
        .call(
            Method::PUT,
            path,
            Some(&token_for(Right::EnrollmentWrite)),
            Some(big.clone()),
            &[],
        )
        .await;
    assert_error(&refused, 401, Some(401002));
    let allowed = s
        .call(
            Method::PUT,
            path,
            Some(&token_for(Right::ServiceConfig)),
            Some(big),
            &[],
        )
        .await;
    assert_eq!(allowed.status, 413, "{}", allowed.body);
}

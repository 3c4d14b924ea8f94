//! Service SAS authentication and authorization (§7.1): signature over the raw `sr`, expiry with
//! bounded clock skew, the maximum token lifetime, the audience rule (host, then a segment
//! prefix of the path), primary and secondary keys, and instance isolation by the token's host.
//! Every route against every right is the authorization matrix (`authz_matrix.rs`).

use crate::support::*;
use dps_core::instance::{LinkedHub, Right};
use dps_server::config::PolicyConfig;
use reqwest::Method;
use serde_json::{json, Value};

const OTHER_SCOPE: &str = "0ne00000T02";
const OTHER_HOST: &str = "127.0.0.1";
const OTHER_KEY: &str = "b3RoZXItaW5zdGFuY2Utb3duZXIta2V5LTAxMjM0NTY3ODk=";

fn policy_name(r: Right) -> String {
    format!("only-{}", r.as_str().to_ascii_lowercase())
}

/// A deterministic, distinct key per right.
fn policy_key(r: Right) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("policy-key-for-{:<24}", r.as_str()))
}

fn token_for(r: Right) -> String {
    service_token("localhost", &policy_name(r), &policy_key(r))
}

/// The default instance gets one policy per right; a second instance `other` answers to
/// `127.0.0.1` with its own owner policy and hub.
async fn spawn_with_rights() -> TestServer {
    TestServer::spawn_with(|cfg| {
        for r in Right::ALL {
            cfg.instances[0].access_policy.push(PolicyConfig {
                name: policy_name(r),
                primary_key: Some(policy_key(r)),
                secondary_key: Some(policy_key(r)),
                rights: vec![r],
            });
        }
        let mut other = instance(
            "other",
            OTHER_SCOPE,
            OTHER_HOST,
            vec![LinkedHub::registry("hub-o.example.net")],
        );
        other.access_policy = vec![PolicyConfig {
            name: "provisioningserviceowner".into(),
            primary_key: Some(OTHER_KEY.into()),
            secondary_key: Some(OTHER_KEY.into()),
            rights: Right::ALL.to_vec(),
        }];
        cfg.instances.push(other);
    })
    .await
}

fn other_owner() -> String {
    service_token(OTHER_HOST, "provisioningserviceowner", OTHER_KEY)
}

#[tokio::test]
async fn a_refused_write_changes_nothing() {
    let s = spawn_with_rights().await;
    let body = json!({"registrationId": "refused-1", "attestation": {"type": "symmetricKey"}});
    for r in [
        Right::EnrollmentRead,
        Right::ServiceConfig,
        Right::RegistrationStatusWrite,
    ] {
        let resp = s
            .call(
                Method::PUT,
                "/enrollments/refused-1",
                Some(&token_for(r)),
                Some(body.clone()),
                &[],
            )
            .await;
        assert_error(&resp, 401, Some(401002));
    }
    assert_eq!(
        s.call(
            Method::GET,
            "/enrollments/refused-1",
            Some(&s.owner()),
            None,
            &[]
        )
        .await
        .status,
        404
    );
    s.enroll("keep-1", json!({})).await;
    let resp = s
        .call(
            Method::DELETE,
            "/enrollments/keep-1",
            Some(&token_for(Right::EnrollmentRead)),
            None,
            &[],
        )
        .await;
    assert_error(&resp, 401, Some(401002));
    assert_eq!(
        s.call(
            Method::GET,
            "/enrollments/keep-1",
            Some(&s.owner()),
            None,
            &[]
        )
        .await
        .status,
        200
    );
    // The built-in read-only policy can read but not write.
    let reader = service_token("localhost", "reader", READER_KEY);
    assert_eq!(
        s.call(Method::GET, "/enrollments/keep-1", Some(&reader), None, &[])
            .await
            .status,
        200
    );
    assert_error(
        &s.call(
            Method::DELETE,
            "/enrollments/keep-1",
            Some(&reader),
            None,
            &[],
        )
        .await,
        401,
        Some(401002),
    );
}

async fn get_with(s: &TestServer, token: &str) -> Resp {
    s.call(
        Method::POST,
        "/enrollments/query",
        Some(token),
        Some(json!({"query": "SELECT * FROM enrollments"})),
        &[],
    )
    .await
}

#[tokio::test]
async fn expiry_is_enforced_with_a_bounded_clock_skew() {
    let s = TestServer::spawn().await;
    let p = "provisioningserviceowner";
    let expired = raw_token(
        "localhost",
        "localhost",
        OWNER_KEY,
        Some(p),
        now() - 301 - 60,
    );
    assert_error(&get_with(&s, &expired).await, 401, Some(401002));
    let long_expired = raw_token("localhost", "localhost", OWNER_KEY, Some(p), now() - 86_400);
    assert_error(&get_with(&s, &long_expired).await, 401, Some(401002));
    let within_skew = raw_token("localhost", "localhost", OWNER_KEY, Some(p), now() - 120);
    assert_eq!(get_with(&s, &within_skew).await.status, 200);
    let fresh = raw_token("localhost", "localhost", OWNER_KEY, Some(p), now() + 60);
    assert_eq!(get_with(&s, &fresh).await.status, 200);
}

#[tokio::test]
async fn primary_and_secondary_keys_are_both_accepted_and_a_wrong_key_is_not() {
    let s = TestServer::spawn().await;
    let p = "provisioningserviceowner";
    assert_eq!(
        get_with(&s, &service_token("localhost", p, OWNER_KEY))
            .await
            .status,
        200
    );
    assert_eq!(
        get_with(&s, &service_token("localhost", p, READER_KEY))
            .await
            .status,
        200,
        "secondary key"
    );
    let wrong = dps_core::sas::generate_key();
    assert_error(
        &get_with(&s, &service_token("localhost", p, &wrong)).await,
        401,
        Some(401002),
    );
}

#[tokio::test]
async fn an_unknown_policy_a_missing_policy_name_or_a_malformed_header_is_401() {
    let s = TestServer::spawn().await;
    assert_error(
        &get_with(&s, &service_token("localhost", "nobody", OWNER_KEY)).await,
        401,
        Some(401002),
    );
    assert_error(
        &get_with(
            &s,
            &raw_token("localhost", "localhost", OWNER_KEY, None, now() + 600),
        )
        .await,
        401,
        Some(401002),
    );
    for bad in [
        "",
        "SharedAccessSignature",
        "SharedAccessSignature sr=localhost&se=99999999999&skn=provisioningserviceowner",
        "SharedAccessSignature sr=localhost&sig=abc&se=soon&skn=provisioningserviceowner",
        "Bearer eyJhbGciOiJIUzI1NiJ9.e30.x",
        "Basic dXNlcjpwYXNz",
    ] {
        assert_error(&get_with(&s, bad).await, 401, Some(401002));
    }
    let r = s
        .call(
            Method::POST,
            "/enrollments/query",
            None,
            Some(json!({"query": "SELECT * FROM enrollments"})),
            &[],
        )
        .await;
    assert_error(&r, 401, Some(401002));
    let r = s
        .call(Method::GET, "/admin/instances", None, None, &[])
        .await;
    assert_error(&r, 401, Some(401002));
}

#[tokio::test]
async fn the_signature_covers_sr_exactly_as_it_appears_in_the_token() {
    let s = TestServer::spawn().await;
    let p = "provisioningserviceowner";
    let se = now() + 600;
    // Encoded sr, signed as encoded: accepted (lowercase and uppercase escapes).
    for sr in ["localhost%2Fenrollments", "localhost%2fenrollments"] {
        assert_eq!(
            get_with(&s, &raw_token(sr, sr, OWNER_KEY, Some(p), se))
                .await
                .status,
            200,
            "{sr}"
        );
    }
    // Encoded sr, signed over the decoded form: refused.
    let t = raw_token(
        "localhost%2Fenrollments",
        "localhost/enrollments",
        OWNER_KEY,
        Some(p),
        se,
    );
    assert_error(&get_with(&s, &t).await, 401, Some(401002));
    // %2f signed as %2F: refused (escape casing is part of what is signed).
    let t = raw_token(
        "localhost%2fenrollments",
        "localhost%2Fenrollments",
        OWNER_KEY,
        Some(p),
        se,
    );
    assert_error(&get_with(&s, &t).await, 401, Some(401002));
    // Host case does not matter for routing, but the signature is over what was sent.
    assert_eq!(
        get_with(
            &s,
            &raw_token("LocalHost", "LocalHost", OWNER_KEY, Some(p), se)
        )
        .await
        .status,
        200
    );
    let t = raw_token("LocalHost", "localhost", OWNER_KEY, Some(p), se);
    assert_error(&get_with(&s, &t).await, 401, Some(401002));
    // A tampered expiry breaks the signature.
    let t = raw_token("localhost", "localhost", OWNER_KEY, Some(p), se)
        .replace(&format!("se={se}"), &format!("se={}", se + 1000));
    assert_error(&get_with(&s, &t).await, 401, Some(401002));
    // Field order does not matter.
    let t = raw_token("localhost", "localhost", OWNER_KEY, Some(p), se);
    let fields: Vec<&str> = t
        .trim_start_matches("SharedAccessSignature ")
        .split('&')
        .collect();
    let reordered = format!(
        "SharedAccessSignature {}&{}&{}&{}",
        fields[3], fields[1], fields[2], fields[0]
    );
    assert_eq!(get_with(&s, &reordered).await.status, 200, "{reordered}");
}

#[tokio::test]
async fn a_token_for_an_unknown_host_is_401() {
    let s = TestServer::spawn().await;
    let t = service_token("nowhere.example.net", "provisioningserviceowner", OWNER_KEY);
    assert_error(&get_with(&s, &t).await, 401, Some(401002));
}

#[tokio::test]
async fn a_token_acts_only_on_the_instance_of_its_host() {
    let s = spawn_with_rights().await;
    let other = other_owner();
    let body = json!({"registrationId": "iso-1", "attestation": {"type": "symmetricKey"}});
    let r = s
        .call(
            Method::PUT,
            "/enrollments/iso-1",
            Some(&other),
            Some(body),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let okey = r.body["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        s.call(Method::GET, "/enrollments/iso-1", Some(&other), None, &[])
            .await
            .status,
        200
    );
    assert_error(
        &s.call(
            Method::GET,
            "/enrollments/iso-1",
            Some(&s.owner()),
            None,
            &[],
        )
        .await,
        404,
        None,
    );
    assert_eq!(get_with(&s, &s.owner()).await.body, json!([]));
    s.enroll("iso-default", json!({})).await;
    let ids: Vec<Value> = get_with(&s, &other)
        .await
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["registrationId"].clone())
        .collect();
    assert_eq!(ids, vec![json!("iso-1")]);
    // A default-instance key does not sign for the other host.
    assert_error(
        &get_with(
            &s,
            &service_token(OTHER_HOST, "provisioningserviceowner", OWNER_KEY),
        )
        .await,
        401,
        Some(401002),
    );
    // Deleting through the default instance does not touch the other instance.
    assert_error(
        &s.call(
            Method::DELETE,
            "/enrollments/iso-1",
            Some(&s.owner()),
            None,
            &[],
        )
        .await,
        404,
        None,
    );
    assert_eq!(
        s.call(Method::GET, "/enrollments/iso-1", Some(&other), None, &[])
            .await
            .status,
        200
    );
    // Devices register with the other instance's scope only.
    let tok = device_token(OTHER_SCOPE, "iso-1", &okey);
    let path = format!("/{OTHER_SCOPE}/registrations/iso-1/register?api-version=2021-10-01");
    let r = s
        .call(
            Method::PUT,
            &path,
            Some(&tok),
            Some(json!({"registrationId": "iso-1"})),
            &[],
        )
        .await;
    assert!(
        r.status == 200 || r.status == 202,
        "{} {}",
        r.status,
        r.body
    );
    let r = s.register("iso-1", &okey, None).await;
    assert_error(&r, 401, Some(401002));
}

#[tokio::test]
async fn a_service_config_token_of_a_non_admin_instance_cannot_reach_another_instance() {
    let s = spawn_with_rights().await;
    let other = other_owner();
    // Its own instance: allowed.
    let r = s
        .call(
            Method::GET,
            "/admin/instances/other",
            Some(&other),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["name"], "other");
    let r = s
        .call(Method::GET, "/admin/instances", Some(&other), None, &[])
        .await;
    assert_eq!(r.status, 200);
    let names: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["other"],
        "a non-admin instance lists only itself"
    );
    // Another instance: refused, read or write.
    let attempts: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::GET, "/admin/instances/default", None),
        (Method::GET, "/admin/instances/default/stats", None),
        (Method::GET, "/admin/instances/default/linkedHubs", None),
        (
            Method::PUT,
            "/admin/instances/default/linkedHubs/evil.example.net",
            Some(json!({"kind": "registry"})),
        ),
        (
            Method::DELETE,
            "/admin/instances/default/linkedHubs/hub-a.example.net",
            None,
        ),
        (Method::GET, "/admin/instances/default/accessPolicies", None),
        (
            Method::PUT,
            "/admin/instances/default/accessPolicies/backdoor",
            Some(json!({"rights": ["ServiceConfig"]})),
        ),
        (
            Method::DELETE,
            "/admin/instances/default/accessPolicies/reader",
            None,
        ),
        (
            Method::GET,
            "/admin/instances/default/hubs/hub-a.example.net/devices",
            None,
        ),
        (
            Method::PUT,
            "/admin/instances/default",
            Some(json!({"hostnames": ["stolen.local"]})),
        ),
        (Method::DELETE, "/admin/instances/default", None),
        (
            Method::PUT,
            "/admin/instances/brand-new",
            Some(json!({"hostnames": ["new.local"]})),
        ),
        (Method::GET, "/admin/audit?instance=default", None),
    ];
    for (m, path, body) in attempts {
        let r = s.call(m.clone(), path, Some(&other), body, &[]).await;
        assert_error(&r, 401, Some(401002));
        let _ = (m, path);
    }
    // Nothing changed on the default instance.
    let hubs = s
        .call(
            Method::GET,
            "/admin/instances/default/linkedHubs",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    let hosts: Vec<&str> = hubs
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, vec!["hub-a.example.net", "hub-b.example.net"]);
    let pols = s
        .call(
            Method::GET,
            "/admin/instances/default/accessPolicies",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    assert!(pols
        .body
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["name"] != "backdoor"));
    assert!(pols
        .body
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "reader"));
    assert_eq!(
        s.call(
            Method::GET,
            "/admin/instances/brand-new",
            Some(&s.owner()),
            None,
            &[]
        )
        .await
        .status,
        404
    );
    // The audit log seen by the other instance holds only its own entries.
    let r = s
        .call(
            Method::GET,
            "/admin/audit?limit=1000",
            Some(&other),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(
        r.body
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["instance"] == "other"),
        "{}",
        r.body
    );
    // The admin instance may act on the other one.
    let r = s
        .call(
            Method::GET,
            "/admin/instances/other",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn admin_responses_never_show_policy_keys_or_hub_secrets() {
    let s = TestServer::spawn().await;
    for path in [
        "/admin/instances",
        "/admin/instances/default",
        "/admin/instances/default/accessPolicies",
    ] {
        let r = s.call(Method::GET, path, Some(&s.owner()), None, &[]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        let text = r.body.to_string();
        assert!(
            !text.contains(OWNER_KEY) && !text.contains(READER_KEY),
            "{path} leaks a key: {text}"
        );
    }
}

#[tokio::test]
async fn a_service_token_outliving_the_maximum_lifetime_is_401() {
    let s = TestServer::spawn_with(|c| c.auth.max_token_lifetime_secs = 3600).await;
    let p = "provisioningserviceowner";
    let within = raw_token("localhost", "localhost", OWNER_KEY, Some(p), now() + 3600);
    assert_eq!(get_with(&s, &within).await.status, 200);
    // Beyond max + the 5-minute skew (with a margin for the test's own clock).
    let beyond = raw_token(
        "localhost",
        "localhost",
        OWNER_KEY,
        Some(p),
        now() + 3600 + 300 + 60,
    );
    assert_error(&get_with(&s, &beyond).await, 401, Some(401002));
    // No limit by default.
    let d = TestServer::spawn().await;
    let decade = raw_token(
        "localhost",
        "localhost",
        OWNER_KEY,
        Some(p),
        now() + 10 * 365 * 86_400,
    );
    assert_eq!(get_with(&d, &decade).await.status, 200);
}

#[tokio::test]
async fn a_device_token_outliving_the_maximum_lifetime_is_401() {
    let s = TestServer::spawn_with(|c| c.auth.max_token_lifetime_secs = 3600).await;
    let key = s.enroll("life-1", json!({})).await;
    let sign = |se: i64| {
        dps_core::sas::sign_token(
            &format!("{SCOPE}/registrations/life-1"),
            &key,
            Some("registration"),
            se,
        )
        .unwrap()
    };
    let path = format!("/{SCOPE}/registrations/life-1/register?api-version=2021-10-01");
    let body = json!({"registrationId": "life-1"});
    let r = s
        .call(
            Method::PUT,
            &path,
            Some(&sign(now() + 3600 + 300 + 60)),
            Some(body.clone()),
            &[],
        )
        .await;
    assert_error(&r, 401, Some(401002));
    let r = s
        .call(
            Method::PUT,
            &path,
            Some(&sign(now() + 600)),
            Some(body),
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
}

#[tokio::test]
async fn sr_names_the_host_and_optionally_a_segment_prefix_of_the_path() {
    let s = TestServer::spawn().await;
    let p = "provisioningserviceowner";
    let se = now() + 600;
    let tok = |sr: &str| raw_token(sr, sr, OWNER_KEY, Some(p), se);
    let query = |path: &'static str, t: String| {
        let s = &s;
        async move {
            s.call(
                Method::POST,
                path,
                Some(&t),
                Some(json!({"query": "SELECT * FROM x"})),
                &[],
            )
            .await
        }
    };
    // Covered: the host (any case, a port, a trailing slash), or host + a prefix of the path.
    for sr in [
        "localhost",
        "LOCALHOST",
        "localhost:443",
        "localhost%2F",
        "localhost%2Fenrollments",
        "LocalHost%2FEnrollments%2Fquery",
        "localhost/enrollments",
    ] {
        assert_eq!(
            query("/enrollments/query", tok(sr)).await.status,
            200,
            "{sr}"
        );
    }
    // Not covered: a sibling path, a string (not segment) prefix, a longer path, another host.
    for (path, sr) in [
        ("/enrollmentGroups/query", "localhost%2Fenrollments"),
        ("/enrollments/query", "localhost%2Fenroll"),
        (
            "/enrollments/query",
            "localhost%2Fenrollments%2Fquery%2Fmore",
        ),
        ("/enrollments/query", "localhost%2F%2Fenrollments"),
        ("/enrollments/query", "localhost.example.net"),
        ("/enrollments/query", "localhos"),
    ] {
        assert_error(&query(path, tok(sr)).await, 401, Some(401002));
    }
}

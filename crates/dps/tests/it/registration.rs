//! Device registration over HTTPS (§2-3, §6.1-6.2, §8, §9): symmetric-key attestation
//! (individual and group), refusals, disabled enrollments, allocation policies (hashed, static,
//! geoLatency, custom webhook), reprovisioning, hub identities and twins, registration records,
//! concurrency and retries, audit.

use crate::support::*;
use dps_core::instance::{LinkedHub, RegisterResponse};
use reqwest::Method;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const HUB_A: &str = "hub-a.example.net";
const HUB_B: &str = "hub-b.example.net";

fn register_path(rid: &str) -> String {
    format!("/{SCOPE}/registrations/{rid}/register?api-version=2021-10-01")
}

/// One raw register PUT (no polling).
async fn register_once(s: &TestServer, rid: &str, token: &str, body: Value) -> Resp {
    s.call(
        Method::PUT,
        &register_path(rid),
        Some(token),
        Some(body),
        &[],
    )
    .await
}

fn state(r: &Resp) -> &Value {
    &r.body["registrationState"]
}

/// Assert an assigned final answer and return (hub, deviceId).
fn assigned(r: &Resp) -> (String, String) {
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    assert!(
        r.body["operationId"]
            .as_str()
            .is_some_and(|o| !o.is_empty()),
        "{}",
        r.body
    );
    let st = state(r);
    assert_eq!(st["status"], "assigned");
    (
        st["assignedHub"].as_str().expect("assignedHub").to_string(),
        st["deviceId"].as_str().expect("deviceId").to_string(),
    )
}

/// Assert a failed final answer with the given code.
fn failed(r: &Resp, code: u64) -> String {
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "failed", "{}", r.body);
    let st = state(r);
    assert_eq!(st["status"], "failed");
    assert_eq!(st["errorCode"], code, "{}", r.body);
    assert!(st["lastUpdatedDateTimeUtc"].is_string());
    assert!(st["assignedHub"].is_null());
    st["errorMessage"]
        .as_str()
        .expect("errorMessage")
        .to_string()
}

/// Every identity with this device id on the given hubs.
async fn identities(s: &TestServer, hubs: &[&str], device_id: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for h in hubs {
        for d in s.hub_devices(h).await {
            if d["deviceId"] == device_id {
                out.push((h.to_string(), d));
            }
        }
    }
    out
}

async fn set_enrollment(s: &TestServer, rid: &str, extra: Value) {
    let mut body = json!({"registrationId": rid, "attestation": {"type": "symmetricKey"}});
    merge(&mut body, extra);
    // Keep the keys: fetch them first when the enrollment exists.
    let m = s
        .call(
            Method::POST,
            &format!("/enrollments/{rid}/attestationmechanism"),
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    if m.status == 200 {
        body["attestation"] = m.body.clone();
    }
    let r = s
        .call(
            Method::PUT,
            &format!("/enrollments/{rid}"),
            Some(&s.owner()),
            Some(body),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

fn has_action(entries: &[Value], action: &str) -> bool {
    entries.iter().any(|e| e["action"] == action)
}

// ------------------------------------------------------------------------------ basics

#[tokio::test]
async fn register_answers_202_with_retry_after_and_the_poll_answers_200_assigned() {
    let s = TestServer::spawn().await;
    let key = s.enroll("basic-1", json!({})).await;
    let tok = device_token(SCOPE, "basic-1", &key);
    let r = register_once(&s, "basic-1", &tok, json!({"registrationId": "basic-1"})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let ra: u32 = r
        .header("retry-after")
        .expect("retry-after on 202")
        .parse()
        .expect("integer retry-after");
    assert!((1..=300).contains(&ra), "{ra}");
    assert_eq!(r.body["status"], "assigning");
    let op = r.body["operationId"]
        .as_str()
        .expect("operationId")
        .to_string();
    assert!(!op.is_empty());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json; charset=utf-8")
    );

    let poll = format!("/{SCOPE}/registrations/basic-1/operations/{op}?api-version=2021-10-01");
    let done = eventually(Duration::from_secs(10), || {
        let (poll, tok) = (poll.clone(), tok.clone());
        let s = &s;
        async move {
            let r = s.call(Method::GET, &poll, Some(&tok), None, &[]).await;
            match r.status {
                202 => {
                    assert_eq!(
                        r.body["registrationState"]["registrationId"], "basic-1",
                        "{}",
                        r.body
                    );
                    assert!(r.header("retry-after").is_some());
                    Err(r.body.to_string())
                }
                _ => Ok(r),
            }
        }
    })
    .await;
    let (hub, dev) = assigned(&done);
    assert_eq!(done.body["operationId"], op.as_str());
    assert!(hub == HUB_A || hub == HUB_B);
    assert_eq!(dev, "basic-1");
    let st = state(&done);
    assert_eq!(st["registrationId"], "basic-1");
    assert_eq!(st["substatus"], "initialAssignment");
    for k in ["createdDateTimeUtc", "lastUpdatedDateTimeUtc", "etag"] {
        assert!(st[k].is_string(), "{k}: {st}");
    }
    assert!(st["errorCode"].is_null());

    // The service API record agrees.
    let rec = s.registration_record("basic-1").await;
    assert_eq!(rec.status, 200);
    assert_eq!(rec.body["assignedHub"], hub.as_str());
    assert_eq!(rec.body["deviceId"], "basic-1");
    assert_eq!(rec.body["status"], "assigned");
    // And the identity exists on that hub with the device's keys' kind.
    let d = s.hub_device(&hub, "basic-1").await;
    assert_eq!(d.status, 200, "{}", d.body);
    assert_eq!(d.body["status"], "enabled");
    assert_eq!(d.body["authentication"]["type"], "sas");
    assert!(
        !d.body.to_string().contains(&key),
        "hub device view leaks the key"
    );
}

#[tokio::test]
async fn an_immediate_instance_answers_200_assigned_directly() {
    let s = TestServer::spawn_with(|cfg| {
        cfg.instances[0].register_response = RegisterResponse::Immediate
    })
    .await;
    let key = s.enroll("imm-1", json!({})).await;
    let r = register_once(
        &s,
        "imm-1",
        &device_token(SCOPE, "imm-1", &key),
        json!({"registrationId": "imm-1"}),
    )
    .await;
    let (_, dev) = assigned(&r);
    assert_eq!(dev, "imm-1");
    assert!(r.header("retry-after").is_none());
}

#[tokio::test]
async fn the_status_lookup_returns_the_bare_registration_state() {
    let s = TestServer::spawn().await;
    let key = s.enroll("lookup-1", json!({})).await;
    let tok = device_token(SCOPE, "lookup-1", &key);
    let path = format!("/{SCOPE}/registrations/lookup-1?api-version=2021-10-01");
    let r = s
        .call(
            Method::POST,
            &path,
            Some(&tok),
            Some(json!({"registrationId": "lookup-1"})),
            &[],
        )
        .await;
    assert_error(&r, 404, None);
    let (hub, _) = assigned(&s.register("lookup-1", &key, None).await);
    let r = s
        .call(
            Method::POST,
            &path,
            Some(&tok),
            Some(json!({"registrationId": "lookup-1"})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.get("operationId").is_none(),
        "not wrapped: {}",
        r.body
    );
    assert_eq!(r.body["registrationId"], "lookup-1");
    assert_eq!(r.body["status"], "assigned");
    assert_eq!(r.body["assignedHub"], hub.as_str());
    // Wrong key: 401 as everywhere.
    let bad = device_token(SCOPE, "lookup-1", &dps_core::sas::generate_key());
    assert_error(
        &s.call(Method::POST, &path, Some(&bad), Some(json!({})), &[])
            .await,
        401,
        Some(401002),
    );
}

#[tokio::test]
async fn an_unknown_operation_id_is_404() {
    let s = TestServer::spawn().await;
    let key = s.enroll("op-1", json!({})).await;
    let tok = device_token(SCOPE, "op-1", &key);
    let path = format!("/{SCOPE}/registrations/op-1/operations/4.0000000000000000.00000000-0000-0000-0000-000000000000?api-version=2021-10-01");
    assert_error(
        &s.call(Method::GET, &path, Some(&tok), None, &[]).await,
        404,
        None,
    );
    s.register("op-1", &key, None).await;
    assert_error(
        &s.call(Method::GET, &path, Some(&tok), None, &[]).await,
        404,
        None,
    );
}

#[tokio::test]
async fn the_device_api_requires_an_api_version_and_tolerates_body_variants() {
    let s = TestServer::spawn_with(|cfg| {
        cfg.instances[0].register_response = RegisterResponse::Immediate
    })
    .await;
    let key = s.enroll("bodies-1", json!({})).await;
    let tok = device_token(SCOPE, "bodies-1", &key);
    let r = s
        .call_text(
            Method::PUT,
            &format!("/{SCOPE}/registrations/bodies-1/register"),
            Some(&tok),
            Some("{}"),
            &[],
        )
        .await;
    assert_error(&r, 400, Some(400004));
    let path = register_path("bodies-1");
    for body in [
        "",
        "{}",
        r#"{"payload": null, "registrationId": "bodies-1"}"#,
        r#"{"payload": "a string"}"#,
        r#"{"registrationId":"bodies-1","payload":{"k":[1,2]}}"#,
    ] {
        let r = s
            .call_text(Method::PUT, &path, Some(&tok), Some(body), &[])
            .await;
        assigned(&r);
    }
    let r = s
        .call_text(Method::PUT, &path, Some(&tok), Some("{not json"), &[])
        .await;
    assert_error(&r, 400, Some(400004));
}

// ------------------------------------------------------------------------------ attestation

#[tokio::test]
async fn a_group_device_registers_with_the_key_derived_from_the_group_key() {
    let s = TestServer::spawn().await;
    let gkey = s
        .enroll_group("grp-sym", json!({"initialTwin": {"tags": {"fleet": "g1"}}}))
        .await;
    let dkey = derive_key(&gkey, "grp-dev-1");
    let r = s.register("grp-dev-1", &dkey, None).await;
    let (hub, dev) = assigned(&r);
    assert_eq!(dev, "grp-dev-1");
    assert_eq!(state(&r)["symmetricKey"]["enrollmentGroupId"], "grp-sym");
    let d = s.hub_device(&hub, "grp-dev-1").await;
    assert_eq!(d.status, 200);
    assert_eq!(d.body["twin"]["tags"]["fleet"], "g1");
    // The secondary group key works too.
    let m = s
        .call(
            Method::POST,
            "/enrollmentGroups/grp-sym/attestationmechanism",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    let secondary = m.body["symmetricKey"]["secondaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    assigned(
        &s.register("grp-dev-2", &derive_key(&secondary, "grp-dev-2"), None)
            .await,
    );
    // The record names the group.
    let q = s
        .call(
            Method::POST,
            "/registrations/grp-sym/query",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    assert_eq!(q.body.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn an_individual_enrollment_takes_precedence_over_a_group() {
    let s = TestServer::spawn().await;
    let gkey = s
        .enroll_group("prec-grp", json!({"iotHubs": [HUB_A]}))
        .await;
    let ikey = s.enroll("prec-dev", json!({"iotHubs": [HUB_B]})).await;
    // The group-derived key is not accepted: the enabled individual enrollment is authoritative.
    let r = s
        .register("prec-dev", &derive_key(&gkey, "prec-dev"), None)
        .await;
    assert_error(&r, 401, Some(401002));
    let r = s.register("prec-dev", &ikey, None).await;
    let (hub, _) = assigned(&r);
    assert_eq!(hub, HUB_B, "the individual enrollment's hubs are used");
    assert!(
        state(&r)["symmetricKey"]["enrollmentGroupId"].is_null(),
        "{}",
        r.body
    );
}

async fn assert_refused_and_nothing_written(s: &TestServer, rid: &str, r: &Resp) {
    assert_error(r, 401, Some(401002));
    assert_error(&s.registration_record(rid).await, 404, None);
    assert!(
        identities(s, &[HUB_A, HUB_B], rid).await.is_empty(),
        "no identity may be written for {rid}"
    );
    let audit = s.audit_for(rid).await;
    assert!(has_action(&audit, "registration.refused"), "{audit:?}");
    assert!(!has_action(&audit, "registration.assigned"));
}

#[tokio::test]
async fn a_wrong_key_is_refused_with_401_and_nothing_written() {
    let s = TestServer::spawn().await;
    s.enroll("wrong-1", json!({})).await;
    let r = s
        .register("wrong-1", &dps_core::sas::generate_key(), None)
        .await;
    assert_refused_and_nothing_written(&s, "wrong-1", &r).await;
}

#[tokio::test]
async fn an_unknown_registration_id_is_refused_with_401() {
    let s = TestServer::spawn().await;
    s.enroll_group("some-grp", json!({})).await;
    let r = s
        .register("nobody-1", &dps_core::sas::generate_key(), None)
        .await;
    assert_refused_and_nothing_written(&s, "nobody-1", &r).await;
}

#[tokio::test]
async fn an_expired_token_is_refused_and_one_within_the_skew_accepted() {
    let s = TestServer::spawn().await;
    let key = s.enroll("exp-1", json!({})).await;
    let sr = format!("{SCOPE}%2Fregistrations%2Fexp-1");
    let old = raw_token(&sr, &sr, &key, Some("registration"), now() - 400);
    let r = register_once(&s, "exp-1", &old, json!({"registrationId": "exp-1"})).await;
    assert_refused_and_nothing_written(&s, "exp-1", &r).await;
    let recent = raw_token(&sr, &sr, &key, Some("registration"), now() - 100);
    let r = register_once(&s, "exp-1", &recent, json!({"registrationId": "exp-1"})).await;
    assert!(
        r.status == 202 || r.status == 200,
        "{} {}",
        r.status,
        r.body
    );
}

#[tokio::test]
async fn a_group_key_used_without_derivation_is_refused() {
    let s = TestServer::spawn().await;
    let gkey = s.enroll_group("raw-grp", json!({})).await;
    let r = s.register("raw-dev", &gkey, None).await;
    assert_refused_and_nothing_written(&s, "raw-dev", &r).await;
}

#[tokio::test]
async fn a_token_for_another_registration_id_is_refused() {
    let s = TestServer::spawn().await;
    let key = s.enroll("aud-1", json!({})).await;
    s.enroll("aud-2", json!({})).await;
    let tok = device_token(SCOPE, "aud-1", &key);
    let r = register_once(&s, "aud-2", &tok, json!({"registrationId": "aud-2"})).await;
    assert_error(&r, 401, Some(401002));
}

#[tokio::test]
async fn sas_variants_of_the_sdks_are_accepted() {
    let s = TestServer::spawn_with(|cfg| {
        cfg.instances[0].register_response = RegisterResponse::Immediate
    })
    .await;
    let key = s.enroll("sdk-var", json!({})).await;
    let se = now() + 600;
    let upper = format!("{SCOPE}%2Fregistrations%2Fsdk-var");
    let lower = format!("{SCOPE}%2fregistrations%2fsdk-var");
    let java = format!("{SCOPE}/registrations/sdk-var");
    for tok in [
        raw_token(&upper, &upper, &key, Some("registration"), se),
        raw_token(&lower, &lower, &key, Some("registration"), se),
        raw_token(&upper, &upper, &key, None, se),
        raw_token(&java, &java, &key, Some(""), se),
    ] {
        let r = register_once(&s, "sdk-var", &tok, json!({"registrationId": "sdk-var"})).await;
        assigned(&r);
    }
    // Signed over a differently-escaped sr than the one sent: refused.
    let r = register_once(
        &s,
        "sdk-var",
        &raw_token(&lower, &upper, &key, Some("registration"), se),
        json!({}),
    )
    .await;
    assert_error(&r, 401, Some(401002));
}

// ------------------------------------------------------------------------------ disabled

#[tokio::test]
async fn a_disabled_individual_enrollment_yields_disabled() {
    let s = TestServer::spawn().await;
    let key = s
        .enroll("dis-1", json!({"provisioningStatus": "disabled"}))
        .await;
    let r = s.register("dis-1", &key, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "disabled", "{}", r.body);
    assert_eq!(state(&r)["status"], "disabled");
    assert!(state(&r)["assignedHub"].is_null());
    assert!(identities(&s, &[HUB_A, HUB_B], "dis-1").await.is_empty());
    assert_eq!(
        s.registration_record("dis-1").await.body["status"],
        "disabled"
    );
    assert!(has_action(
        &s.audit_for("dis-1").await,
        "registration.disabled"
    ));
}

#[tokio::test]
async fn a_disabled_group_yields_disabled_for_its_devices() {
    let s = TestServer::spawn().await;
    let gkey = s
        .enroll_group("dis-grp", json!({"provisioningStatus": "disabled"}))
        .await;
    let r = s
        .register("dis-grp-dev", &derive_key(&gkey, "dis-grp-dev"), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "disabled", "{}", r.body);
    assert!(identities(&s, &[HUB_A, HUB_B], "dis-grp-dev")
        .await
        .is_empty());
}

#[tokio::test]
async fn a_disabled_individual_enrollment_disables_one_device_of_a_group() {
    let s = TestServer::spawn().await;
    let gkey = s.enroll_group("ovr-grp", json!({})).await;
    s.enroll("ovr-dev-1", json!({"provisioningStatus": "disabled"}))
        .await;
    let r = s
        .register("ovr-dev-1", &derive_key(&gkey, "ovr-dev-1"), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "disabled", "{}", r.body);
    assert!(identities(&s, &[HUB_A, HUB_B], "ovr-dev-1")
        .await
        .is_empty());
    // Its siblings still register.
    assigned(
        &s.register("ovr-dev-2", &derive_key(&gkey, "ovr-dev-2"), None)
            .await,
    );
}

#[tokio::test]
async fn disabling_an_enrollment_after_assignment_disables_the_hub_identity() {
    let s = TestServer::spawn().await;
    let key = s.enroll("later-dis", json!({})).await;
    let (hub, _) = assigned(&s.register("later-dis", &key, None).await);
    set_enrollment(&s, "later-dis", json!({"provisioningStatus": "disabled"})).await;
    eventually(Duration::from_secs(5), || async {
        let d = s.hub_device(&hub, "later-dis").await;
        if d.body["status"] == "disabled" {
            Ok(())
        } else {
            Err(d.body.to_string())
        }
    })
    .await;
    let r = s.register("later-dis", &key, None).await;
    assert_eq!(r.body["status"], "disabled", "{}", r.body);
}

// ------------------------------------------------------------------------------ allocation

async fn register_many(s: &TestServer, ids: &[String], keys: &[String]) -> Vec<String> {
    let mut hubs = Vec::new();
    for (chunk_ids, chunk_keys) in ids.chunks(10).zip(keys.chunks(10)) {
        let futs = chunk_ids
            .iter()
            .zip(chunk_keys)
            .map(|(id, k)| s.register(id, k, None));
        for r in futures::future::join_all(futs).await {
            hubs.push(assigned(&r).0);
        }
    }
    hubs
}

#[tokio::test]
async fn hashed_allocation_is_deterministic_and_proportional_to_weight() {
    let s = TestServer::spawn_with(|cfg| {
        let mut a = LinkedHub::registry(HUB_A);
        a.allocation_weight = 1;
        let mut b = LinkedHub::registry(HUB_B);
        b.allocation_weight = 9;
        cfg.instances[0].linked_hub = vec![a, b];
    })
    .await;
    let gkey = s
        .enroll_group("hash-grp", json!({"allocationPolicy": "hashed"}))
        .await;
    let ids: Vec<String> = (0..80).map(|i| format!("hash-dev-{i:03}")).collect();
    let keys: Vec<String> = ids.iter().map(|id| derive_key(&gkey, id)).collect();
    let first = register_many(&s, &ids, &keys).await;
    let on_a = first.iter().filter(|h| *h == HUB_A).count();
    // Expected 8 of 80 on the weight-1 hub (an unweighted split would put ~40 there).
    assert!(
        (1..=20).contains(&on_a),
        "{on_a} of 80 devices on the weight-1 hub"
    );
    // Deterministic: register again after deleting the records -> same hubs.
    for id in &ids[..20] {
        let d = s
            .call(
                Method::DELETE,
                &format!("/registrations/{id}"),
                Some(&s.owner()),
                None,
                &[],
            )
            .await;
        assert_eq!(d.status, 204);
    }
    let again = register_many(&s, &ids[..20], &keys[..20]).await;
    assert_eq!(again, first[..20].to_vec());
}

#[tokio::test]
async fn static_allocation_uses_the_single_hub_of_the_enrollment() {
    let s = TestServer::spawn().await;
    let gkey = s
        .enroll_group(
            "static-grp",
            json!({"allocationPolicy": "static", "iotHubs": [HUB_B]}),
        )
        .await;
    let ids: Vec<String> = (0..8).map(|i| format!("static-dev-{i}")).collect();
    let keys: Vec<String> = ids.iter().map(|id| derive_key(&gkey, id)).collect();
    assert!(register_many(&s, &ids, &keys)
        .await
        .iter()
        .all(|h| h == HUB_B));
    // Legacy iotHubHostName alone behaves like static.
    let key = s
        .enroll("legacy-static", json!({"iotHubHostName": HUB_A}))
        .await;
    assert_eq!(
        assigned(&s.register("legacy-static", &key, None).await).0,
        HUB_A
    );
}

#[tokio::test]
async fn enrollment_hubs_restrict_hashed_allocation() {
    let s = TestServer::spawn().await;
    let gkey = s
        .enroll_group("restrict-grp", json!({"iotHubs": [HUB_A]}))
        .await;
    let ids: Vec<String> = (0..8).map(|i| format!("restrict-dev-{i}")).collect();
    let keys: Vec<String> = ids.iter().map(|id| derive_key(&gkey, id)).collect();
    assert!(register_many(&s, &ids, &keys)
        .await
        .iter()
        .all(|h| h == HUB_A));
}

fn geo_hubs(cfg: &mut dps_server::config::Config, node: &str) {
    cfg.location = Some(node.into());
    let mut a = LinkedHub::registry(HUB_A);
    a.location = Some("eastus".into());
    let mut b = LinkedHub::registry(HUB_B);
    b.location = Some("northeurope".into());
    cfg.instances[0].linked_hub = vec![a, b];
}

#[tokio::test]
async fn geo_latency_picks_the_hub_nearest_to_the_node_location() {
    for (node, want) in [("westeurope", HUB_B), ("eastus2", HUB_A)] {
        let s = TestServer::spawn_with(|cfg| geo_hubs(cfg, node)).await;
        let gkey = s
            .enroll_group("geo-grp", json!({"allocationPolicy": "geoLatency"}))
            .await;
        let ids: Vec<String> = (0..6).map(|i| format!("geo-dev-{i}")).collect();
        let keys: Vec<String> = ids.iter().map(|id| derive_key(&gkey, id)).collect();
        let hubs = register_many(&s, &ids, &keys).await;
        assert!(hubs.iter().all(|h| h == want), "node {node}: {hubs:?}");
    }
}

#[tokio::test]
async fn no_linked_hub_gives_failed_400208() {
    let s = TestServer::spawn_with(|cfg| cfg.instances[0].linked_hub.clear()).await;
    let key = s.enroll("nohub-1", json!({})).await;
    let r = s.register("nohub-1", &key, None).await;
    failed(&r, 400208);
    let rec = s.registration_record("nohub-1").await;
    assert_eq!(rec.body["status"], "failed");
    assert_eq!(rec.body["errorCode"], 400208);
    assert!(has_action(
        &s.audit_for("nohub-1").await,
        "registration.failed"
    ));
}

#[tokio::test]
async fn hubs_excluded_from_allocation_give_failed_400208() {
    let s = TestServer::spawn_with(|cfg| {
        for h in &mut cfg.instances[0].linked_hub {
            h.apply_allocation_policy = false;
        }
    })
    .await;
    let key = s.enroll("nohub-2", json!({})).await;
    failed(&s.register("nohub-2", &key, None).await, 400208);
    // Static may still name such a hub.
    let key = s
        .enroll(
            "nohub-static",
            json!({"allocationPolicy": "static", "iotHubs": [HUB_A]}),
        )
        .await;
    assert_eq!(
        assigned(&s.register("nohub-static", &key, None).await).0,
        HUB_A
    );
}

// ------------------------------------------------------------------------------ custom webhook

#[derive(Clone)]
enum Reply {
    Json(u16, Value),
    Text(u16, &'static str),
    Hang,
}

struct Webhook {
    url: String,
    seen: Arc<Mutex<Vec<Value>>>,
}

type Replier = Arc<dyn Fn(&Value) -> Reply + Send + Sync>;
type HookState = (Arc<Mutex<Vec<Value>>>, Replier);

/// A real HTTP webhook on 127.0.0.1:0 that records each request body and answers with `reply`.
async fn webhook(reply: impl Fn(&Value) -> Reply + Send + Sync + 'static) -> Webhook {
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let state: HookState = (seen.clone(), Arc::new(reply));
    let app = axum::Router::new()
        .route(
            "/alloc",
            axum::routing::post(
                |axum::extract::State((seen, reply)): axum::extract::State<HookState>,
                 body: axum::body::Bytes| async move {
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    seen.lock().unwrap().push(v.clone());
                    let (status, text) = match reply(&v) {
                        Reply::Json(st, b) => (st, b.to_string()),
                        Reply::Text(st, t) => (st, t.to_string()),
                        // Never answers: the server's webhook timeout must end the wait.
                        Reply::Hang => std::future::pending().await,
                    };
                    axum::response::Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(axum::body::Body::from(text))
                        .unwrap()
                },
            ),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Webhook {
        url: format!("http://{addr}/alloc?code=secret"),
        seen,
    }
}

fn custom(url: &str) -> Value {
    json!({"allocationPolicy": "custom", "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"}})
}

#[tokio::test]
async fn the_custom_webhook_gets_the_enrollment_context_and_hubs_and_its_answer_is_applied() {
    let s = TestServer::spawn().await;
    let hook = webhook(|_| {
        Reply::Json(200, json!({"iotHubHostName": HUB_B, "initialTwin": {"tags": {"from": "webhook"}, "properties": {"desired": {"rate": 5}}}, "payload": {"hello": "device", "n": [1, 2]}}))
    })
    .await;
    let mut extra = custom(&hook.url);
    merge(
        &mut extra,
        json!({"deviceId": "custom-device-id", "initialTwin": {"tags": {"from": "enrollment"}}}),
    );
    let key = s.enroll("cust-1", extra).await;
    let payload = json!({"model": "thermo", "values": [1, 2, 3]});
    let r = s.register("cust-1", &key, Some(payload.clone())).await;
    let (hub, dev) = assigned(&r);
    assert_eq!(hub, HUB_B);
    assert_eq!(dev, "custom-device-id");
    assert_eq!(
        state(&r)["payload"],
        json!({"hello": "device", "n": [1, 2]}),
        "the webhook payload reaches the device"
    );

    let seen = hook.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let req = &seen[0];
    assert_eq!(req["individualEnrollment"]["registrationId"], "cust-1");
    assert_eq!(req["individualEnrollment"]["deviceId"], "custom-device-id");
    assert_eq!(
        req["individualEnrollment"]["attestation"]["type"],
        "symmetricKey"
    );
    assert!(
        !req.to_string().contains(&key),
        "the webhook must not see keys: {req}"
    );
    assert!(req.get("enrollmentGroup").is_none());
    let ctx = &req["deviceRuntimeContext"];
    assert_eq!(ctx["registrationId"], "cust-1");
    assert_eq!(ctx["symmetricKey"], json!({}));
    assert_eq!(
        ctx["payload"], payload,
        "the device payload reaches the webhook unchanged"
    );
    assert!(ctx.get("currentIotHubHostName").is_none());
    let mut hubs: Vec<String> = req["linkedHubs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_string())
        .collect();
    hubs.sort();
    assert_eq!(hubs, vec![HUB_A, HUB_B]);

    // The webhook's twin lands on the hub identity.
    let d = s.hub_device(HUB_B, "custom-device-id").await;
    assert_eq!(d.status, 200, "{}", d.body);
    assert_eq!(d.body["twin"]["tags"]["from"], "webhook");
    assert_eq!(d.body["twin"]["properties"]["desired"]["rate"], 5);
    // The record keeps the payload.
    assert_eq!(
        s.registration_record("cust-1").await.body["payload"],
        json!({"hello": "device", "n": [1, 2]})
    );

    // Re-registration: the webhook sees the current assignment.
    assigned(&s.register("cust-1", &key, None).await);
    let seen = hook.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1]["deviceRuntimeContext"]["currentIotHubHostName"],
        HUB_B
    );
    assert_eq!(
        seen[1]["deviceRuntimeContext"]["currentDeviceId"],
        "custom-device-id"
    );
    assert!(seen[1]["deviceRuntimeContext"].get("payload").is_none());
}

#[tokio::test]
async fn a_group_webhook_request_carries_the_group_and_only_the_enrollment_hubs() {
    let s = TestServer::spawn().await;
    let hook = webhook(|v| Reply::Json(200, json!({"iotHubHostName": v["linkedHubs"][0]}))).await;
    let mut extra = custom(&hook.url);
    merge(&mut extra, json!({"iotHubs": [HUB_A]}));
    let gkey = s.enroll_group("cust-grp", extra).await;
    let r = s
        .register("cust-grp-dev", &derive_key(&gkey, "cust-grp-dev"), None)
        .await;
    assert_eq!(assigned(&r).0, HUB_A);
    assert!(state(&r)["payload"].is_null());
    let req = hook.seen.lock().unwrap()[0].clone();
    assert_eq!(req["enrollmentGroup"]["enrollmentGroupId"], "cust-grp");
    assert!(req.get("individualEnrollment").is_none());
    assert!(!req.to_string().contains(&gkey));
    assert_eq!(req["linkedHubs"], json!([HUB_A]));
    assert!(req["deviceRuntimeContext"].get("payload").is_none());
}

#[tokio::test]
async fn a_webhook_answering_500_fails_the_registration_with_400207() {
    let s = TestServer::spawn().await;
    let hook = webhook(|_| Reply::Text(500, "{\"error\":\"boom\"}")).await;
    let key = s.enroll("cust-500", custom(&hook.url)).await;
    let r = s.register("cust-500", &key, None).await;
    let msg = failed(&r, 400207);
    assert_eq!(msg, "Custom allocation failed with status code: 500");
    let rec = s.registration_record("cust-500").await;
    assert_eq!(rec.body["status"], "failed");
    assert_eq!(rec.body["errorCode"], 400207);
    assert!(identities(&s, &[HUB_A, HUB_B], "cust-500").await.is_empty());
    assert!(has_action(
        &s.audit_for("cust-500").await,
        "registration.failed"
    ));
}

#[tokio::test]
async fn a_webhook_choosing_a_hub_not_offered_fails_with_400207() {
    let s = TestServer::spawn().await;
    let hook = webhook(|_| Reply::Json(200, json!({"iotHubHostName": HUB_B}))).await;
    let mut extra = custom(&hook.url);
    merge(&mut extra, json!({"iotHubs": [HUB_A]}));
    let key = s.enroll("cust-off", extra).await;
    failed(&s.register("cust-off", &key, None).await, 400207);
    assert!(identities(&s, &[HUB_A, HUB_B], "cust-off").await.is_empty());
}

#[tokio::test]
async fn a_webhook_with_an_invalid_answer_fails_with_400207() {
    let s = TestServer::spawn().await;
    for (i, reply) in [
        Reply::Text(200, "this is not json"),
        Reply::Json(200, json!({"payload": {}})),
        Reply::Json(200, json!({"iotHubHostName": "unknown.example.net"})),
    ]
    .into_iter()
    .enumerate()
    {
        let hook = webhook(move |_| reply.clone()).await;
        let rid = format!("cust-bad-{i}");
        let key = s.enroll(&rid, custom(&hook.url)).await;
        failed(&s.register(&rid, &key, None).await, 400207);
    }
}

#[tokio::test]
async fn a_webhook_that_never_answers_times_out_and_fails_with_400207() {
    let s = TestServer::spawn_with(|cfg| cfg.limits.webhook_timeout_ms = 300).await;
    let hook = webhook(|_| Reply::Hang).await;
    let key = s.enroll("cust-hang", custom(&hook.url)).await;
    failed(&s.register("cust-hang", &key, None).await, 400207);
    assert_eq!(hook.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn an_unreachable_webhook_fails_with_400207() {
    let s = TestServer::spawn().await;
    // Bind then drop a listener: nothing listens on that port any more.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let key = s
        .enroll(
            "cust-down",
            custom(&format!("http://127.0.0.1:{port}/alloc")),
        )
        .await;
    failed(&s.register("cust-down", &key, None).await, 400207);
}

// ------------------------------------------------------------------------------ reprovisioning

const TWIN1: &str = r#"{"tags": {"gen": 1}, "properties": {"desired": {"v": 1}}}"#;
const TWIN2: &str = r#"{"tags": {"gen": 2}, "properties": {"desired": {"v": 2}}}"#;

fn twin(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

/// Register on hub A with TWIN1, then move the enrollment to hub B with TWIN2 and register again.
async fn move_a_to_b(s: &TestServer, rid: &str, reprovision: Value) -> (String, Resp) {
    let key = s.enroll(rid, json!({"iotHubs": [HUB_A], "initialTwin": twin(TWIN1), "reprovisionPolicy": reprovision})).await;
    let r = s.register(rid, &key, None).await;
    assert_eq!(assigned(&r).0, HUB_A);
    assert_eq!(state(&r)["substatus"], "initialAssignment");
    let d = s.hub_device(HUB_A, rid).await;
    assert_eq!(
        d.body["twin"]["tags"],
        json!({"gen": 1}),
        "initial twin on the hub: {}",
        d.body
    );
    assert_eq!(d.body["twin"]["properties"]["desired"]["v"], 1);
    set_enrollment(
        s,
        rid,
        json!({"iotHubs": [HUB_B], "initialTwin": twin(TWIN2), "reprovisionPolicy": reprovision}),
    )
    .await;
    let r = s.register(rid, &key, None).await;
    (key, r)
}

#[tokio::test]
async fn reprovisioning_with_migration_moves_the_identity_and_carries_the_twin() {
    let s = TestServer::spawn().await;
    let (_, r) = move_a_to_b(
        &s,
        "mig-1",
        json!({"updateHubAssignment": true, "migrateDeviceData": true}),
    )
    .await;
    assert_eq!(assigned(&r).0, HUB_B);
    assert_eq!(state(&r)["substatus"], "deviceDataMigrated");
    let d = s.hub_device(HUB_B, "mig-1").await;
    assert_eq!(d.status, 200);
    assert_eq!(
        d.body["twin"]["tags"],
        json!({"gen": 1}),
        "the twin is carried, not reset: {}",
        d.body
    );
    assert_error(&s.hub_device(HUB_A, "mig-1").await, 404, None);
    assert_eq!(identities(&s, &[HUB_A, HUB_B], "mig-1").await.len(), 1);
    let rec = s.registration_record("mig-1").await;
    assert_eq!(rec.body["assignedHub"], HUB_B);
    assert_eq!(rec.body["substatus"], "deviceDataMigrated");
}

#[tokio::test]
async fn reprovisioning_with_reset_moves_the_identity_with_the_initial_twin() {
    let s = TestServer::spawn().await;
    let (_, r) = move_a_to_b(
        &s,
        "reset-1",
        json!({"updateHubAssignment": true, "migrateDeviceData": false}),
    )
    .await;
    assert_eq!(assigned(&r).0, HUB_B);
    assert_eq!(state(&r)["substatus"], "deviceDataReset");
    let d = s.hub_device(HUB_B, "reset-1").await;
    assert_eq!(
        d.body["twin"]["tags"],
        json!({"gen": 2}),
        "the twin is reset to the current initial twin: {}",
        d.body
    );
    assert_error(&s.hub_device(HUB_A, "reset-1").await, 404, None);
    assert_eq!(
        s.registration_record("reset-1").await.body["substatus"],
        "deviceDataReset"
    );
}

#[tokio::test]
async fn moving_back_to_the_first_hub_reports_reprovisioned_to_initial_assignment() {
    let s = TestServer::spawn().await;
    let (key, r) = move_a_to_b(
        &s,
        "back-1",
        json!({"updateHubAssignment": true, "migrateDeviceData": true}),
    )
    .await;
    assert_eq!(assigned(&r).0, HUB_B);
    set_enrollment(&s, "back-1", json!({"iotHubs": [HUB_A]})).await;
    let r = s.register("back-1", &key, None).await;
    assert_eq!(assigned(&r).0, HUB_A);
    assert_eq!(state(&r)["substatus"], "reprovisionedToInitialAssignment");
    assert_error(&s.hub_device(HUB_B, "back-1").await, 404, None);
    assert_eq!(s.hub_device(HUB_A, "back-1").await.status, 200);
}

#[tokio::test]
async fn never_reprovision_keeps_the_current_hub() {
    let s = TestServer::spawn().await;
    let (_, r) = move_a_to_b(
        &s,
        "never-1",
        json!({"updateHubAssignment": false, "migrateDeviceData": false}),
    )
    .await;
    assert_eq!(assigned(&r).0, HUB_A);
    assert_eq!(state(&r)["substatus"], "initialAssignment");
    assert_eq!(s.hub_device(HUB_A, "never-1").await.status, 200);
    assert_error(&s.hub_device(HUB_B, "never-1").await, 404, None);
}

#[tokio::test]
async fn re_registering_on_the_same_hub_keeps_the_identity_and_substatus() {
    let s = TestServer::spawn().await;
    let key = s
        .enroll(
            "same-1",
            json!({"iotHubs": [HUB_A], "initialTwin": twin(TWIN1)}),
        )
        .await;
    assigned(&s.register("same-1", &key, None).await);
    let r = s.register("same-1", &key, None).await;
    assert_eq!(assigned(&r).0, HUB_A);
    assert_eq!(state(&r)["substatus"], "initialAssignment");
    assert_eq!(identities(&s, &[HUB_A, HUB_B], "same-1").await.len(), 1);
}

#[tokio::test]
async fn the_enrollment_device_id_and_capabilities_land_on_the_hub_identity() {
    let s = TestServer::spawn().await;
    let key = s.enroll("devid-1", json!({"deviceId": "my-edge-box", "capabilities": {"iotEdge": true}, "iotHubs": [HUB_A], "initialTwin": twin(TWIN2)})).await;
    let (hub, dev) = assigned(&s.register("devid-1", &key, None).await);
    assert_eq!((hub.as_str(), dev.as_str()), (HUB_A, "my-edge-box"));
    let d = s.hub_device(HUB_A, "my-edge-box").await;
    assert_eq!(d.status, 200, "{}", d.body);
    assert_eq!(d.body["deviceId"], "my-edge-box");
    assert_eq!(d.body["capabilities"]["iotEdge"], true);
    assert_eq!(d.body["twin"]["tags"], json!({"gen": 2}));
    assert_eq!(d.body["twin"]["properties"]["desired"]["v"], 2);
    assert_error(&s.hub_device(HUB_A, "devid-1").await, 404, None);
    // Changing the device id replaces the identity instead of leaving the old one behind.
    set_enrollment(
        &s,
        "devid-1",
        json!({"deviceId": "renamed-box", "iotHubs": [HUB_A]}),
    )
    .await;
    let (_, dev) = assigned(&s.register("devid-1", &key, None).await);
    assert_eq!(dev, "renamed-box");
    assert_eq!(s.hub_device(HUB_A, "renamed-box").await.status, 200);
    assert_error(&s.hub_device(HUB_A, "my-edge-box").await, 404, None);
}

// ------------------------------------------------------------------------------ concurrency

#[tokio::test]
async fn twenty_concurrent_register_requests_of_one_id_produce_one_identity_and_a_consistent_record(
) {
    let s = TestServer::spawn().await;
    let key = s.enroll("conc-0", json!({})).await;
    let tok = device_token(SCOPE, "conc-0", &key);
    let body = json!({"registrationId": "conc-0"});
    let puts =
        futures::future::join_all((0..20).map(|_| register_once(&s, "conc-0", &tok, body.clone())))
            .await;
    for r in &puts {
        assert_eq!(r.status, 202, "{}", r.body);
    }
    // Settle: a final registration after the burst.
    let (hub, dev) = assigned(&s.register("conc-0", &key, None).await);
    let ids = identities(&s, &[HUB_A, HUB_B], "conc-0").await;
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(ids[0].0, hub);
    let rec = s.registration_record("conc-0").await;
    assert_eq!(rec.body["status"], "assigned");
    assert_eq!(rec.body["assignedHub"], hub.as_str());
    assert_eq!(rec.body["deviceId"], dev.as_str());
    assert_eq!(rec.body["substatus"], "initialAssignment");
}

#[tokio::test]
async fn sixteen_concurrent_registrations_of_one_id_produce_one_identity_and_consistent_answers() {
    let s = TestServer::spawn().await;
    let key = s.enroll("conc-1", json!({})).await;
    // A record remembers its latest operation and the 16 before it: a device polls the
    // operation it was given after all of these have run (each waited for the one before), so
    // with more than 17 of them the first ones' operations could be forgotten by then (404203),
    // as documented in docs/device-api.md.
    let results =
        futures::future::join_all((0..16).map(|_| s.register("conc-1", &key, None))).await;
    let answers: Vec<(String, String)> = results.iter().map(assigned).collect();
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    let ids = identities(&s, &[HUB_A, HUB_B], "conc-1").await;
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(ids[0].0, answers[0].0);
    let rec = s.registration_record("conc-1").await;
    assert_eq!(rec.body["status"], "assigned");
    assert_eq!(rec.body["assignedHub"], answers[0].0.as_str());
    assert_eq!(rec.body["deviceId"], answers[0].1.as_str());
}

#[tokio::test]
async fn concurrent_group_devices_each_get_one_identity() {
    let s = TestServer::spawn().await;
    let gkey = s.enroll_group("conc-grp", json!({})).await;
    let ids: Vec<String> = (0..10).map(|i| format!("conc-grp-dev-{i}")).collect();
    let futs = ids.iter().map(|id| {
        let k = derive_key(&gkey, id);
        let s = &s;
        async move { s.register(id, &k, None).await }
    });
    for r in futures::future::join_all(futs).await {
        assigned(&r);
    }
    let all: Vec<Value> = [s.hub_devices(HUB_A).await, s.hub_devices(HUB_B).await].concat();
    for id in &ids {
        assert_eq!(
            all.iter().filter(|d| d["deviceId"] == id.as_str()).count(),
            1,
            "{id}"
        );
    }
}

#[tokio::test]
async fn a_device_retrying_after_a_timeout_gets_the_same_answer_not_a_second_identity() {
    let s = TestServer::spawn().await;
    let key = s.enroll("retry-1", json!({})).await;
    let tok = device_token(SCOPE, "retry-1", &key);
    // The first answer is "lost": the device never polls it and registers again.
    let first = register_once(&s, "retry-1", &tok, json!({"registrationId": "retry-1"})).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let r1 = s.register("retry-1", &key, None).await;
    let r2 = s.register("retry-1", &key, None).await;
    let (a1, a2) = (assigned(&r1), assigned(&r2));
    assert_eq!(a1, a2);
    assert_eq!(state(&r2)["substatus"], "initialAssignment");
    assert_eq!(identities(&s, &[HUB_A, HUB_B], "retry-1").await.len(), 1);
    assert_eq!(
        state(&r1)["createdDateTimeUtc"],
        state(&r2)["createdDateTimeUtc"],
        "the same record, not a new one"
    );
}

// ------------------------------------------------------------------------------ audit

#[tokio::test]
async fn assignments_and_refusals_are_audited() {
    let s = TestServer::spawn().await;
    let key = s.enroll("audit-1", json!({})).await;
    assigned(&s.register("audit-1", &key, None).await);
    let entries = s.audit_for("audit-1").await;
    assert!(has_action(&entries, "registration.assigned"), "{entries:?}");
    assert!(has_action(&entries, "enrollment.create"), "{entries:?}");
    let e = entries
        .iter()
        .find(|e| e["action"] == "registration.assigned")
        .unwrap();
    assert_eq!(e["instance"], "default");
    assert_eq!(e["targetId"], "audit-1");
    assert!(
        !e.to_string().contains(&key),
        "audit must not hold keys: {e}"
    );
    let r = s
        .register("audit-1", &dps_core::sas::generate_key(), None)
        .await;
    assert_error(&r, 401, Some(401002));
    let entries = s.audit_for("audit-1").await;
    assert!(has_action(&entries, "registration.refused"), "{entries:?}");
    let r = s
        .call(
            Method::GET,
            "/admin/audit?target=audit-1&action=registration.refused",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    assert!(r
        .body
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["action"] == "registration.refused"));
    assert!(!r.body.as_array().unwrap().is_empty());
}

/// `since` is an instant, whatever its precision or offset: an entry made at 10:42:13.507 is
/// found with `since=10:42:13Z` (as stored text it sorted before), later ones are not, and a
/// time that is no time is a 400 naming the parameter.
#[tokio::test]
async fn audit_since_compares_instants_not_text() {
    let s = TestServer::spawn().await;
    s.enroll("since-1", json!({})).await;
    let entries = s.audit_for("since-1").await;
    let ts = entries
        .iter()
        .find(|e| e["action"] == "enrollment.create")
        .and_then(|e| e["timestamp"].as_str())
        .expect("timestamp")
        .to_string();
    let whole_second = format!("{}Z", &ts[..19]);
    let found = s
        .audit(&format!("target=since-1&since={whole_second}"))
        .await;
    assert!(
        has_action(&found, "enrollment.create"),
        "{whole_second}: {found:?}"
    );
    // The same instant one hour east of UTC.
    let t = time::OffsetDateTime::parse(&ts, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .to_offset(time::macros::offset!(+1));
    let plus_one = t
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
        .replace('+', "%2B");
    let found = s.audit(&format!("target=since-1&since={plus_one}")).await;
    assert!(
        has_action(&found, "enrollment.create"),
        "{plus_one}: {found:?}"
    );
    let later = s.audit("target=since-1&since=2999-01-01").await;
    assert!(later.is_empty(), "{later:?}");
    let r = s
        .call(
            Method::GET,
            "/admin/audit?since=yesterday",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    assert_error(&r, 400, None);
    assert!(r.body.to_string().contains("since"), "{}", r.body);
}

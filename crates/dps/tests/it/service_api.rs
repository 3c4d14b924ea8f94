//! The Azure DPS service API (§7): enrollments, groups, ETags, attestation mechanisms, queries
//! with paging and filters, bulk operations, registration records, certificates, path and
//! api-version tolerance, and error bodies.

use crate::support::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashSet;

const HUB_A: &str = "hub-a.example.net";
const HUB_B: &str = "hub-b.example.net";

async fn put(s: &TestServer, path: &str, body: Value, headers: &[(&str, &str)]) -> Resp {
    s.call(Method::PUT, path, Some(&s.owner()), Some(body), headers)
        .await
}

async fn get(s: &TestServer, path: &str) -> Resp {
    s.call(Method::GET, path, Some(&s.owner()), None, &[]).await
}

async fn post(s: &TestServer, path: &str, body: Option<Value>, headers: &[(&str, &str)]) -> Resp {
    s.call(Method::POST, path, Some(&s.owner()), body, headers)
        .await
}

async fn delete(s: &TestServer, path: &str, headers: &[(&str, &str)]) -> Resp {
    s.call(Method::DELETE, path, Some(&s.owner()), None, headers)
        .await
}

fn full_individual(rid: &str) -> Value {
    json!({
        "registrationId": rid,
        "deviceId": format!("{rid}-device"),
        "attestation": {"type": "symmetricKey"},
        "iotHubs": [HUB_A, HUB_B],
        "allocationPolicy": "hashed",
        "initialTwin": {"tags": {"site": "lab", "n": 3}, "properties": {"desired": {"interval": 30, "nested": {"a": [1, 2]}}}},
        "capabilities": {"iotEdge": true},
        "provisioningStatus": "disabled",
        "reprovisionPolicy": {"updateHubAssignment": false, "migrateDeviceData": true},
        "optionalDeviceInformation": {"model": "x1", "firmware": {"v": "1.2.3"}}
    })
}

/// The fields the client sent must come back unchanged.
fn assert_fields_round_trip(sent: &Value, got: &Value) {
    for (k, v) in sent.as_object().unwrap() {
        if k == "attestation" {
            continue;
        }
        assert_eq!(&got[k], v, "field {k} did not round-trip: {got}");
    }
}

#[tokio::test]
async fn every_individual_enrollment_field_round_trips_through_put_and_get() {
    let s = TestServer::spawn().await;
    let sent = full_individual("rt-full-1");
    let r = put(&s, "/enrollments/rt-full-1", sent.clone(), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json; charset=utf-8")
    );
    assert_fields_round_trip(&sent, &r.body);
    for k in ["etag", "createdDateTimeUtc", "lastUpdatedDateTimeUtc"] {
        assert!(
            r.body[k].is_string(),
            "{k} missing in PUT response: {}",
            r.body
        );
    }
    let g = get(&s, "/enrollments/rt-full-1").await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_fields_round_trip(&sent, &g.body);
    assert_eq!(g.body["etag"], r.body["etag"]);
    assert_eq!(g.body["createdDateTimeUtc"], r.body["createdDateTimeUtc"]);
    assert_eq!(g.body["attestation"]["type"], "symmetricKey");
}

#[tokio::test]
async fn custom_allocation_and_legacy_single_hub_fields_round_trip() {
    let s = TestServer::spawn().await;
    let custom = json!({
        "registrationId": "rt-custom-1",
        "attestation": {"type": "symmetricKey"},
        "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": "https://example.com/alloc?code=abc", "apiVersion": "2021-10-01"},
        "iotHubs": [HUB_B]
    });
    let r = put(&s, "/enrollments/rt-custom-1", custom.clone(), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_fields_round_trip(&custom, &get(&s, "/enrollments/rt-custom-1").await.body);

    let legacy = json!({"registrationId": "rt-legacy-1", "attestation": {"type": "symmetricKey"}, "iotHubHostName": HUB_A});
    let r = put(&s, "/enrollments/rt-legacy-1", legacy.clone(), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_fields_round_trip(&legacy, &get(&s, "/enrollments/rt-legacy-1").await.body);
}

#[tokio::test]
async fn defaults_are_filled_in_when_fields_are_absent() {
    let s = TestServer::spawn().await;
    let r = put(
        &s,
        "/enrollments/defaults-1",
        json!({"registrationId": "defaults-1", "attestation": {"type": "symmetricKey"}}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["provisioningStatus"], "enabled");
    assert_eq!(
        r.body["reprovisionPolicy"],
        json!({"updateHubAssignment": true, "migrateDeviceData": true})
    );
    assert_eq!(r.body["capabilities"], json!({"iotEdge": false}));
}

#[tokio::test]
async fn every_enrollment_group_field_round_trips() {
    let s = TestServer::spawn().await;
    let sent = json!({
        "enrollmentGroupId": "grp-rt-1",
        "attestation": {"type": "symmetricKey"},
        "iotHubs": [HUB_A],
        "allocationPolicy": "geoLatency",
        "initialTwin": {"tags": {"fleet": "north"}, "properties": {"desired": {"mode": "eco"}}},
        "capabilities": {"iotEdge": true},
        "provisioningStatus": "disabled",
        "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": false}
    });
    let r = put(&s, "/enrollmentGroups/grp-rt-1", sent.clone(), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_fields_round_trip(&sent, &r.body);
    let g = get(&s, "/enrollmentGroups/grp-rt-1").await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_fields_round_trip(&sent, &g.body);
    assert_eq!(g.body["etag"], r.body["etag"]);
}

#[tokio::test]
async fn symmetric_keys_are_generated_returned_on_put_hidden_on_get_and_shown_by_attestationmechanism(
) {
    let s = TestServer::spawn().await;
    use base64::Engine as _;
    for (path, body) in [
        (
            "/enrollments/keys-1",
            json!({"registrationId": "keys-1", "attestation": {"type": "symmetricKey"}}),
        ),
        (
            "/enrollmentGroups/keys-grp-1",
            json!({"enrollmentGroupId": "keys-grp-1", "attestation": {"type": "symmetricKey"}}),
        ),
    ] {
        let r = put(&s, path, body, &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let sk = &r.body["attestation"]["symmetricKey"];
        let (p, sec) = (
            sk["primaryKey"].as_str().expect("primary"),
            sk["secondaryKey"].as_str().expect("secondary"),
        );
        assert_ne!(p, sec);
        for k in [p, sec] {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(k)
                .expect("base64 key");
            assert_eq!(raw.len(), 64, "generated keys are 64 bytes");
        }
        let g = get(&s, path).await;
        assert_eq!(g.status, 200);
        assert_eq!(g.body["attestation"]["type"], "symmetricKey");
        assert!(
            g.body["attestation"]["symmetricKey"]["primaryKey"].is_null(),
            "GET leaks keys: {}",
            g.body
        );
        assert!(
            g.body["attestation"]["symmetricKey"]["secondaryKey"].is_null(),
            "GET leaks keys: {}",
            g.body
        );
        let m = post(&s, &format!("{path}/attestationmechanism"), None, &[]).await;
        assert_eq!(m.status, 200, "{}", m.body);
        assert_eq!(m.body["type"], "symmetricKey");
        assert_eq!(m.body["symmetricKey"]["primaryKey"], p);
        assert_eq!(m.body["symmetricKey"]["secondaryKey"], sec);
    }
    // Keys given by the client are kept.
    let r = put(&s, "/enrollments/keys-2", json!({"registrationId": "keys-2", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": OWNER_KEY, "secondaryKey": READER_KEY}}}), &[]).await;
    assert_eq!(
        r.body["attestation"]["symmetricKey"]["primaryKey"],
        OWNER_KEY
    );
    assert_eq!(
        r.body["attestation"]["symmetricKey"]["secondaryKey"],
        READER_KEY
    );
    // Queries hide keys too.
    let q = post(
        &s,
        "/enrollments/query",
        Some(json!({"query": "SELECT * FROM enrollments"})),
        &[],
    )
    .await;
    assert_eq!(q.status, 200);
    for e in q.body.as_array().unwrap() {
        assert!(
            e["attestation"]["symmetricKey"]["primaryKey"].is_null(),
            "query leaks keys: {e}"
        );
    }
}

#[tokio::test]
async fn attestationmechanism_of_a_missing_enrollment_is_404() {
    let s = TestServer::spawn().await;
    let r = post(&s, "/enrollments/nope-1/attestationmechanism", None, &[]).await;
    assert_error(&r, 404, None);
    let r = post(
        &s,
        "/enrollmentGroups/nope-1/attestationmechanism",
        None,
        &[],
    )
    .await;
    assert_error(&r, 404, None);
}

#[tokio::test]
async fn put_with_a_wrong_if_match_is_412_and_a_matching_etag_quoted_or_not_succeeds() {
    let s = TestServer::spawn().await;
    let body = json!({"registrationId": "etag-1", "attestation": {"type": "symmetricKey"}});
    let r = put(&s, "/enrollments/etag-1", body.clone(), &[]).await;
    let etag1 = r.body["etag"].as_str().unwrap().to_string();
    let bare = etag1.trim_matches('"').to_string();
    let quoted = format!("\"{bare}\"");

    let r = put(
        &s,
        "/enrollments/etag-1",
        body.clone(),
        &[("if-match", "\"not-the-etag\"")],
    )
    .await;
    assert_error(&r, 412, Some(412002));
    // Nothing changed.
    assert_eq!(
        get(&s, "/enrollments/etag-1").await.body["etag"],
        etag1.as_str()
    );

    let r = put(
        &s,
        "/enrollments/etag-1",
        body.clone(),
        &[("if-match", &quoted)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let etag2 = r.body["etag"].as_str().unwrap().to_string();
    assert_ne!(etag2, etag1, "every successful write returns a new etag");

    let bare2 = etag2.trim_matches('"').to_string();
    let r = put(
        &s,
        "/enrollments/etag-1",
        body.clone(),
        &[("if-match", &bare2)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let etag3 = r.body["etag"].as_str().unwrap().to_string();
    assert_ne!(etag3, etag2);

    // The old etag is now stale.
    let r = put(
        &s,
        "/enrollments/etag-1",
        body.clone(),
        &[("if-match", &quoted)],
    )
    .await;
    assert_error(&r, 412, Some(412002));
    // `*` matches anything that exists.
    let r = put(&s, "/enrollments/etag-1", body, &[("if-match", "*")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn group_put_and_delete_honour_if_match() {
    let s = TestServer::spawn().await;
    let body = json!({"enrollmentGroupId": "etag-grp", "attestation": {"type": "symmetricKey"}});
    let r = put(&s, "/enrollmentGroups/etag-grp", body.clone(), &[]).await;
    let etag = r.body["etag"].as_str().unwrap().to_string();
    assert_error(
        &put(
            &s,
            "/enrollmentGroups/etag-grp",
            body.clone(),
            &[("if-match", "stale")],
        )
        .await,
        412,
        Some(412002),
    );
    assert_error(
        &delete(&s, "/enrollmentGroups/etag-grp", &[("if-match", "stale")]).await,
        412,
        Some(412002),
    );
    let r = delete(&s, "/enrollmentGroups/etag-grp", &[("if-match", &etag)]).await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_error(&get(&s, "/enrollmentGroups/etag-grp").await, 404, None);
}

#[tokio::test]
async fn delete_with_a_stale_etag_is_412_and_deleting_a_missing_enrollment_is_404() {
    let s = TestServer::spawn().await;
    let body = json!({"registrationId": "del-1", "attestation": {"type": "symmetricKey"}});
    let first = put(&s, "/enrollments/del-1", body.clone(), &[]).await.body["etag"]
        .as_str()
        .unwrap()
        .to_string();
    let second = put(&s, "/enrollments/del-1", body, &[]).await.body["etag"]
        .as_str()
        .unwrap()
        .to_string();
    let r = delete(
        &s,
        "/enrollments/del-1",
        &[("if-match", &format!("\"{first}\""))],
    )
    .await;
    assert_error(&r, 412, Some(412002));
    assert_eq!(
        get(&s, "/enrollments/del-1").await.status,
        200,
        "a refused delete must not delete"
    );
    let r = delete(&s, "/enrollments/del-1", &[("if-match", &second)]).await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(r.body.is_null(), "204 has no body");
    assert_error(&get(&s, "/enrollments/del-1").await, 404, Some(404201));
    assert_error(&delete(&s, "/enrollments/del-1", &[]).await, 404, None);
    assert_error(
        &delete(&s, "/enrollmentGroups/never-was", &[]).await,
        404,
        None,
    );
}

async fn bulk_create(s: &TestServer, ids: &[String]) {
    for chunk in ids.chunks(10) {
        let items: Vec<Value> = chunk
            .iter()
            .map(|id| json!({"registrationId": id, "attestation": {"type": "symmetricKey"}}))
            .collect();
        let r = post(
            s,
            "/enrollments",
            Some(json!({"mode": "create", "enrollments": items})),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["isSuccessful"], true, "{}", r.body);
    }
}

/// Page through a query; returns the pages (ids per page) and the response headers of each page.
async fn page_all(
    s: &TestServer,
    path: &str,
    page_size: &str,
    id_field: &str,
) -> Vec<(Vec<String>, Resp)> {
    let mut pages = Vec::new();
    let mut cont: Option<String> = None;
    loop {
        let mut headers: Vec<(&str, &str)> = vec![("x-ms-max-item-count", page_size)];
        if let Some(c) = cont.as_deref() {
            headers.push(("x-ms-continuation", c));
        }
        let r = post(
            s,
            path,
            Some(json!({"query": "SELECT * FROM enrollments"})),
            &headers,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let ids: Vec<String> = r
            .body
            .as_array()
            .expect("array body")
            .iter()
            .map(|e| e[id_field].as_str().unwrap().to_string())
            .collect();
        cont = r.header("x-ms-continuation");
        let done = cont.is_none();
        pages.push((ids, r));
        if done || pages.len() > 100 {
            return pages;
        }
    }
}

#[tokio::test]
async fn paging_250_enrollments_by_100_gives_three_pages_with_every_id_exactly_once() {
    let s = TestServer::spawn().await;
    let ids: Vec<String> = (0..250).map(|i| format!("page-{i:04}")).collect();
    bulk_create(&s, &ids).await;
    let pages = page_all(&s, "/enrollments/query", "100", "registrationId").await;
    assert_eq!(
        pages.len(),
        3,
        "page sizes: {:?}",
        pages.iter().map(|p| p.0.len()).collect::<Vec<_>>()
    );
    assert_eq!(
        pages.iter().map(|p| p.0.len()).collect::<Vec<_>>(),
        vec![100, 100, 50]
    );
    let mut seen = HashSet::new();
    for (page, r) in &pages {
        assert_eq!(r.header("x-ms-item-type").as_deref(), Some("enrollment"));
        for id in page {
            assert!(seen.insert(id.clone()), "{id} returned twice");
        }
    }
    assert_eq!(seen, ids.into_iter().collect::<HashSet<_>>());
    assert!(pages[0].1.header("x-ms-continuation").is_some());
    assert!(pages[1].1.header("x-ms-continuation").is_some());
    assert!(
        pages[2].1.header("x-ms-continuation").is_none(),
        "no continuation on the last page"
    );
}

#[tokio::test]
async fn a_page_size_beyond_the_total_returns_everything_in_one_page_and_an_empty_query_is_an_array(
) {
    let s = TestServer::spawn().await;
    let r = post(
        &s,
        "/enrollments/query",
        Some(json!({"query": "SELECT * FROM enrollments"})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, json!([]));
    assert_eq!(r.header("x-ms-item-type").as_deref(), Some("enrollment"));
    let r = post(
        &s,
        "/enrollmentGroups/query",
        Some(json!({"query": "SELECT * FROM enrollmentGroups"})),
        &[],
    )
    .await;
    assert_eq!(r.body, json!([]));
    assert_eq!(
        r.header("x-ms-item-type").as_deref(),
        Some("enrollmentGroup")
    );
    let ids: Vec<String> = (0..30).map(|i| format!("one-page-{i:02}")).collect();
    bulk_create(&s, &ids).await;
    let pages = page_all(&s, "/enrollments/query", "1000", "registrationId").await;
    assert_eq!(pages.len(), 1);
    assert_eq!(pages[0].0.len(), 30);
}

#[tokio::test]
async fn an_invalid_continuation_token_is_a_400_not_a_500() {
    let s = TestServer::spawn().await;
    let r = post(
        &s,
        "/enrollments/query",
        Some(json!({"query": "SELECT * FROM enrollments"})),
        &[("x-ms-continuation", "%%%not-base64%%%")],
    )
    .await;
    assert_error(&r, 400, None);
}

#[tokio::test]
async fn groups_page_too() {
    let s = TestServer::spawn().await;
    for i in 0..7 {
        s.enroll_group(&format!("gpage-{i}"), json!({})).await;
    }
    let pages = page_all(&s, "/enrollmentGroups/query", "3", "enrollmentGroupId").await;
    assert_eq!(
        pages.iter().map(|p| p.0.len()).collect::<Vec<_>>(),
        vec![3, 3, 1]
    );
    for (_, r) in &pages {
        assert_eq!(
            r.header("x-ms-item-type").as_deref(),
            Some("enrollmentGroup")
        );
    }
}

fn self_signed(cn: &str) -> rcgen::Certificate {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.not_before = rcgen::date_time_ymd(2024, 1, 2);
    p.not_after = rcgen::date_time_ymd(2034, 1, 2);
    p.serial_number = Some(rcgen::SerialNumber::from(vec![0x01, 0x02, 0x03]));
    let kp = rcgen::KeyPair::generate().expect("key");
    p.self_signed(&kp).expect("cert")
}

async fn seed_for_filters(s: &TestServer) {
    s.enroll("abc-1", json!({})).await;
    s.enroll("abc-2", json!({"provisioningStatus": "disabled"}))
        .await;
    s.enroll("xyz-1", json!({"provisioningStatus": "disabled"}))
        .await;
    let cert = self_signed("abx-x509-1");
    let r = put(s, "/enrollments/abx-x509-1", json!({"registrationId": "abx-x509-1", "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": cert.pem()}}}}}), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

async fn query_ids(s: &TestServer, path: &str, query: &str) -> Vec<String> {
    let r = post(s, path, Some(json!({ "query": query })), &[]).await;
    assert_eq!(r.status, 200, "{path} {query}: {}", r.body);
    let mut v: Vec<String> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["registrationId"]
                .as_str()
                .or(e["enrollmentGroupId"].as_str())
                .unwrap()
                .to_string()
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn queries_filter_server_side_by_status_attestation_and_prefix() {
    let s = TestServer::spawn().await;
    seed_for_filters(&s).await;
    let all = "SELECT * FROM enrollments";
    assert_eq!(
        query_ids(&s, "/enrollments/query", all).await,
        vec!["abc-1", "abc-2", "abx-x509-1", "xyz-1"]
    );
    assert_eq!(
        query_ids(&s, "/enrollments/query?status=disabled", all).await,
        vec!["abc-2", "xyz-1"]
    );
    assert_eq!(
        query_ids(&s, "/enrollments/query?status=enabled", all).await,
        vec!["abc-1", "abx-x509-1"]
    );
    assert_eq!(
        query_ids(&s, "/enrollments/query?attestation=x509", all).await,
        vec!["abx-x509-1"]
    );
    assert_eq!(
        query_ids(&s, "/enrollments/query?attestation=symmetricKey", all).await,
        vec!["abc-1", "abc-2", "xyz-1"]
    );
    assert_eq!(
        query_ids(&s, "/enrollments/query?prefix=abc", all).await,
        vec!["abc-1", "abc-2"]
    );
    assert_eq!(
        query_ids(&s, "/enrollments/query?prefix=ab&status=enabled", all).await,
        vec!["abc-1", "abx-x509-1"]
    );
    assert_eq!(
        query_ids(
            &s,
            "/enrollments/query",
            "SELECT * FROM enrollments WHERE provisioningStatus = 'disabled'"
        )
        .await,
        vec!["abc-2", "xyz-1"]
    );
    assert_eq!(
        query_ids(
            &s,
            "/enrollments/query",
            "SELECT * FROM enrollments WHERE attestation.type = 'x509'"
        )
        .await,
        vec!["abx-x509-1"]
    );
    assert_eq!(
        query_ids(&s, "/enrollments/query", "SELECT * FROM enrollments WHERE provisioningStatus = 'disabled' AND attestation.type = 'symmetricKey'").await,
        vec!["abc-2", "xyz-1"]
    );
}

#[tokio::test]
async fn group_queries_filter_too() {
    let s = TestServer::spawn().await;
    s.enroll_group("fleet-a", json!({})).await;
    s.enroll_group("fleet-b", json!({"provisioningStatus": "disabled"}))
        .await;
    s.enroll_group("other", json!({})).await;
    let q = "SELECT * FROM enrollmentGroups";
    assert_eq!(
        query_ids(&s, "/enrollmentGroups/query?prefix=fleet", q).await,
        vec!["fleet-a", "fleet-b"]
    );
    assert_eq!(
        query_ids(&s, "/enrollmentGroups/query?status=disabled", q).await,
        vec!["fleet-b"]
    );
    assert_eq!(
        query_ids(
            &s,
            "/enrollmentGroups/query",
            "SELECT * FROM enrollmentGroups WHERE provisioningStatus = 'enabled'"
        )
        .await,
        vec!["fleet-a", "other"]
    );
}

#[tokio::test]
async fn an_unsupported_query_is_a_400() {
    let s = TestServer::spawn().await;
    for q in [
        "DROP TABLE enrollments",
        "SELECT * FROM enrollments WHERE color = 'red'",
    ] {
        let r = post(&s, "/enrollments/query", Some(json!({ "query": q })), &[]).await;
        assert_error(&r, 400, Some(400004));
    }
}

#[tokio::test]
async fn bulk_create_reports_the_existing_item_and_creates_the_others() {
    let s = TestServer::spawn().await;
    s.enroll("bulk-exists", json!({})).await;
    let items = json!([
        {"registrationId": "bulk-new-1", "attestation": {"type": "symmetricKey"}},
        {"registrationId": "bulk-exists", "attestation": {"type": "symmetricKey"}},
        {"registrationId": "bulk-new-2", "attestation": {"type": "symmetricKey"}, "deviceId": "bd2"}
    ]);
    let r = post(
        &s,
        "/enrollments",
        Some(json!({"mode": "create", "enrollments": items})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["isSuccessful"], false);
    let errors = r.body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{}", r.body);
    assert_eq!(errors[0]["registrationId"], "bulk-exists");
    let code = errors[0]["errorCode"].as_u64().unwrap();
    assert_eq!(
        code / 1000,
        409,
        "an existing item is a conflict: {}",
        r.body
    );
    assert!(errors[0]["errorStatus"].is_string());
    assert_eq!(get(&s, "/enrollments/bulk-new-1").await.status, 200);
    assert_eq!(
        get(&s, "/enrollments/bulk-new-2").await.body["deviceId"],
        "bd2"
    );
}

#[tokio::test]
async fn bulk_with_more_than_ten_items_is_a_400_and_writes_nothing() {
    let s = TestServer::spawn().await;
    let items: Vec<Value> = (0..11).map(|i| json!({"registrationId": format!("big-{i}"), "attestation": {"type": "symmetricKey"}})).collect();
    let r = post(
        &s,
        "/enrollments",
        Some(json!({"mode": "create", "enrollments": items})),
        &[],
    )
    .await;
    assert_error(&r, 400, Some(400004));
    assert_error(&get(&s, "/enrollments/big-0").await, 404, None);
    let groups: Vec<Value> = (0..11).map(|i| json!({"enrollmentGroupId": format!("bigg-{i}"), "attestation": {"type": "symmetricKey"}})).collect();
    let r = post(
        &s,
        "/enrollmentGroups",
        Some(json!({"mode": "create", "enrollmentGroups": groups})),
        &[],
    )
    .await;
    assert_error(&r, 400, Some(400004));
}

#[tokio::test]
async fn bulk_update_if_match_etag_reports_a_wrong_etag_per_item() {
    let s = TestServer::spawn().await;
    s.enroll("bu-1", json!({})).await;
    s.enroll("bu-2", json!({})).await;
    let etag1 = get(&s, "/enrollments/bu-1").await.body["etag"]
        .as_str()
        .unwrap()
        .to_string();
    let items = json!([
        {"registrationId": "bu-1", "attestation": {"type": "symmetricKey"}, "etag": etag1, "deviceId": "updated-1"},
        {"registrationId": "bu-2", "attestation": {"type": "symmetricKey"}, "etag": "\"wrong\"", "deviceId": "updated-2"}
    ]);
    let r = post(
        &s,
        "/enrollments",
        Some(json!({"mode": "updateIfMatchETag", "enrollments": items})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["isSuccessful"], false);
    let errors = r.body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{}", r.body);
    assert_eq!(errors[0]["registrationId"], "bu-2");
    assert_eq!(errors[0]["errorCode"], 412002);
    assert_eq!(
        get(&s, "/enrollments/bu-1").await.body["deviceId"],
        "updated-1"
    );
    assert!(
        get(&s, "/enrollments/bu-2").await.body["deviceId"].is_null(),
        "the refused item must not change"
    );
}

#[tokio::test]
async fn bulk_update_upserts_and_bulk_delete_removes_with_per_item_not_found() {
    let s = TestServer::spawn().await;
    s.enroll("bd-1", json!({})).await;
    let items = json!([
        {"registrationId": "bd-1", "attestation": {"type": "symmetricKey"}, "provisioningStatus": "disabled"},
        {"registrationId": "bd-2", "attestation": {"type": "symmetricKey"}}
    ]);
    let r = post(
        &s,
        "/enrollments",
        Some(json!({"mode": "update", "enrollments": items})),
        &[],
    )
    .await;
    assert_eq!(r.body, json!({"isSuccessful": true, "errors": []}));
    assert_eq!(
        get(&s, "/enrollments/bd-1").await.body["provisioningStatus"],
        "disabled"
    );
    assert_eq!(get(&s, "/enrollments/bd-2").await.status, 200);

    let items = json!([
        {"registrationId": "bd-1", "attestation": {"type": "symmetricKey"}},
        {"registrationId": "bd-2", "attestation": {"type": "symmetricKey"}},
        {"registrationId": "bd-missing", "attestation": {"type": "symmetricKey"}}
    ]);
    let r = post(
        &s,
        "/enrollments",
        Some(json!({"mode": "delete", "enrollments": items})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["isSuccessful"], false);
    let errors = r.body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{}", r.body);
    assert_eq!(errors[0]["registrationId"], "bd-missing");
    assert_eq!(errors[0]["errorCode"].as_u64().unwrap() / 1000, 404);
    assert_eq!(get(&s, "/enrollments/bd-1").await.status, 404);
    assert_eq!(get(&s, "/enrollments/bd-2").await.status, 404);
}

#[tokio::test]
async fn bulk_groups_create_and_delete() {
    let s = TestServer::spawn().await;
    let groups = json!([
        {"enrollmentGroupId": "bg-1", "attestation": {"type": "symmetricKey"}},
        {"enrollmentGroupId": "bg-2", "attestation": {"type": "symmetricKey"}}
    ]);
    let r = post(
        &s,
        "/enrollmentGroups",
        Some(json!({"mode": "create", "enrollmentGroups": groups.clone()})),
        &[],
    )
    .await;
    assert_eq!(r.body["isSuccessful"], true, "{}", r.body);
    let r = post(
        &s,
        "/enrollmentGroups",
        Some(json!({"mode": "create", "enrollmentGroups": groups.clone()})),
        &[],
    )
    .await;
    assert_eq!(r.body["isSuccessful"], false);
    let errs = r.body["errors"].as_array().unwrap();
    assert_eq!(errs.len(), 2);
    assert_eq!(errs[0]["enrollmentGroupId"], "bg-1");
    let r = post(
        &s,
        "/enrollmentGroups",
        Some(json!({"mode": "delete", "enrollmentGroups": groups})),
        &[],
    )
    .await;
    assert_eq!(r.body["isSuccessful"], true, "{}", r.body);
    assert_eq!(get(&s, "/enrollmentGroups/bg-1").await.status, 404);
}

#[tokio::test]
async fn a_bulk_item_with_an_invalid_body_is_a_per_item_error() {
    let s = TestServer::spawn().await;
    let items = json!([
        {"registrationId": "bi-ok", "attestation": {"type": "symmetricKey"}},
        {"registrationId": "bi-bad", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "not base64 !!"}}}
    ]);
    let r = post(
        &s,
        "/enrollments",
        Some(json!({"mode": "create", "enrollments": items})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["isSuccessful"], false);
    assert_eq!(r.body["errors"][0]["registrationId"], "bi-bad");
    assert_eq!(r.body["errors"][0]["errorCode"], 400004);
    assert_eq!(get(&s, "/enrollments/bi-ok").await.status, 200);
}

fn check_info(info: &Value, der: &[u8], cn: &str) {
    assert_eq!(
        info["sha1Thumbprint"].as_str().map(str::to_ascii_uppercase),
        Some(sha1_hex(der)),
        "{info}"
    );
    assert_eq!(
        info["sha256Thumbprint"]
            .as_str()
            .map(str::to_ascii_uppercase),
        Some(sha256_hex(der)),
        "{info}"
    );
    assert!(
        info["subjectName"]
            .as_str()
            .unwrap()
            .contains(&format!("CN={cn}")),
        "{info}"
    );
    assert!(
        info["issuerName"]
            .as_str()
            .unwrap()
            .contains(&format!("CN={cn}")),
        "self-signed: {info}"
    );
    assert!(
        info["notBeforeUtc"]
            .as_str()
            .unwrap()
            .starts_with("2024-01-02T00:00:00"),
        "{info}"
    );
    assert!(
        info["notAfterUtc"]
            .as_str()
            .unwrap()
            .starts_with("2034-01-02T00:00:00"),
        "{info}"
    );
    assert_eq!(
        info["serialNumber"]
            .as_str()
            .map(str::to_ascii_uppercase)
            .as_deref(),
        Some("010203")
    );
    assert_eq!(info["version"], 3);
}

#[tokio::test]
async fn x509_certificates_are_accepted_as_pem_or_base64_der_and_returned_with_their_info() {
    use base64::Engine as _;
    let s = TestServer::spawn().await;
    let cert = self_signed("x509-pem-dev");
    let der = cert.der().to_vec();
    let r = put(&s, "/enrollments/x509-pem-dev", json!({"registrationId": "x509-pem-dev", "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": cert.pem()}}}}}), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let info = &r.body["attestation"]["x509"]["clientCertificates"]["primary"]["info"];
    check_info(info, &der, "x509-pem-dev");
    let g = get(&s, "/enrollments/x509-pem-dev").await;
    check_info(
        &g.body["attestation"]["x509"]["clientCertificates"]["primary"]["info"],
        &der,
        "x509-pem-dev",
    );
    let m = post(
        &s,
        "/enrollments/x509-pem-dev/attestationmechanism",
        None,
        &[],
    )
    .await;
    assert_eq!(m.body["type"], "x509");
    check_info(
        &m.body["x509"]["clientCertificates"]["primary"]["info"],
        &der,
        "x509-pem-dev",
    );

    let cert2 = self_signed("x509-der-dev");
    let der2 = cert2.der().to_vec();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der2);
    let r = put(&s, "/enrollments/x509-der-dev", json!({"registrationId": "x509-der-dev", "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": b64}}}}}), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    check_info(
        &r.body["attestation"]["x509"]["clientCertificates"]["primary"]["info"],
        &der2,
        "x509-der-dev",
    );

    // A group with a signing certificate.
    let ca = self_signed("x509-signing-ca");
    let r = put(&s, "/enrollmentGroups/x509-grp", json!({"enrollmentGroupId": "x509-grp", "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": ca.pem()}}}}}), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    check_info(
        &r.body["attestation"]["x509"]["signingCertificates"]["primary"]["info"],
        ca.der(),
        "x509-signing-ca",
    );
}

#[tokio::test]
async fn an_invalid_certificate_or_two_certificate_kinds_are_400() {
    let s = TestServer::spawn().await;
    let r = put(&s, "/enrollments/x509-bad", json!({"registrationId": "x509-bad", "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}}}}}), &[]).await;
    assert_error(&r, 400, Some(400004));
    let c = self_signed("two-kinds");
    let r = put(&s, "/enrollments/x509-two", json!({"registrationId": "x509-two", "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": c.pem()}}, "caReferences": {"primary": "ca1"}}}}), &[]).await;
    assert_error(&r, 400, Some(400004));
    let r = put(
        &s,
        "/enrollments/x509-none",
        json!({"registrationId": "x509-none", "attestation": {"type": "x509"}}),
        &[],
    )
    .await;
    assert_error(&r, 400, Some(400004));
}

#[tokio::test]
async fn an_invalid_base64_key_is_400004() {
    let s = TestServer::spawn().await;
    for key in ["not base64 at all!", "c2hvcnQ="] {
        let r = put(&s, "/enrollments/badkey-1", json!({"registrationId": "badkey-1", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key}}}), &[]).await;
        assert_error(&r, 400, Some(400004));
    }
    assert_error(&get(&s, "/enrollments/badkey-1").await, 404, None);
    let r = put(&s, "/enrollmentGroups/badkey-g", json!({"enrollmentGroupId": "badkey-g", "attestation": {"type": "symmetricKey", "symmetricKey": {"secondaryKey": "%%%"}}}), &[]).await;
    assert_error(&r, 400, Some(400004));
}

#[tokio::test]
async fn an_unknown_linked_hub_or_a_static_policy_without_exactly_one_hub_is_400() {
    let s = TestServer::spawn().await;
    let base = json!({"registrationId": "hubs-1", "attestation": {"type": "symmetricKey"}});
    let mut b = base.clone();
    merge(
        &mut b,
        json!({"iotHubs": [HUB_A, "not-linked.example.net"]}),
    );
    assert_error(
        &put(&s, "/enrollments/hubs-1", b, &[]).await,
        400,
        Some(400004),
    );
    let mut b = base.clone();
    merge(&mut b, json!({"iotHubHostName": "not-linked.example.net"}));
    assert_error(
        &put(&s, "/enrollments/hubs-1", b, &[]).await,
        400,
        Some(400004),
    );
    let mut b = base.clone();
    merge(&mut b, json!({"allocationPolicy": "static"}));
    assert_error(
        &put(&s, "/enrollments/hubs-1", b, &[]).await,
        400,
        Some(400004),
    );
    let mut b = base.clone();
    merge(
        &mut b,
        json!({"allocationPolicy": "static", "iotHubs": [HUB_A, HUB_B]}),
    );
    assert_error(
        &put(&s, "/enrollments/hubs-1", b, &[]).await,
        400,
        Some(400004),
    );
    let mut b = base.clone();
    merge(&mut b, json!({"allocationPolicy": "custom"}));
    assert_error(
        &put(&s, "/enrollments/hubs-1", b, &[]).await,
        400,
        Some(400004),
    );
    let mut b = base.clone();
    merge(
        &mut b,
        json!({"allocationPolicy": "static", "iotHubs": [HUB_B]}),
    );
    assert_eq!(put(&s, "/enrollments/hubs-1", b, &[]).await.status, 200);
    let g = json!({"enrollmentGroupId": "hubs-g", "attestation": {"type": "symmetricKey"}, "iotHubs": ["nope.example.net"]});
    assert_error(
        &put(&s, "/enrollmentGroups/hubs-g", g, &[]).await,
        400,
        Some(400004),
    );
}

#[tokio::test]
async fn a_body_id_that_differs_from_the_path_is_400() {
    let s = TestServer::spawn().await;
    let r = put(
        &s,
        "/enrollments/path-id",
        json!({"registrationId": "body-id", "attestation": {"type": "symmetricKey"}}),
        &[],
    )
    .await;
    assert_error(&r, 400, Some(400004));
    assert_eq!(get(&s, "/enrollments/body-id").await.status, 404);
}

#[tokio::test]
async fn paths_are_case_insensitive_and_a_trailing_slash_is_tolerated() {
    let s = TestServer::spawn().await;
    s.enroll_group("case-grp", json!({})).await;
    let r = post(
        &s,
        "/enrollmentgroups/case-grp/attestationmechanism",
        None,
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["type"], "symmetricKey");
    assert!(r.body["symmetricKey"]["primaryKey"].is_string());
    let r = post(
        &s,
        "/ENROLLMENTGROUPS/case-grp/AttestationMechanism",
        None,
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(&s, "/enrollments/", Some(json!({"mode": "create", "enrollments": [{"registrationId": "slash-1", "attestation": {"type": "symmetricKey"}}]})), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["isSuccessful"], true);
    assert_eq!(get(&s, "/Enrollments/slash-1/").await.status, 200);
    assert_eq!(get(&s, "/enrollmentGroups/case-grp/").await.status, 200);
}

#[tokio::test]
async fn ids_may_arrive_percent_encoded() {
    let s = TestServer::spawn().await;
    s.enroll("enc.dev:1", json!({})).await;
    let r = get(&s, "/enrollments/enc.dev%3A1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["registrationId"], "enc.dev:1");
}

#[tokio::test]
async fn api_version_is_required_and_any_dated_version_is_accepted() {
    let s = TestServer::spawn().await;
    s.enroll("apiv-1", json!({})).await;
    let tok = s.owner();
    let r = s
        .call_text(Method::GET, "/enrollments/apiv-1", Some(&tok), None, &[])
        .await;
    assert_error(&r, 400, Some(400004));
    for v in [
        "2025-07-01-preview",
        "2018-09-01-preview",
        "2019-03-31",
        "2030-12-31",
    ] {
        let r = s
            .call_text(
                Method::GET,
                &format!("/enrollments/apiv-1?api-version={v}"),
                Some(&tok),
                None,
                &[],
            )
            .await;
        assert_eq!(r.status, 200, "{v}: {}", r.body);
    }
    for v in ["2019-03", "latest", "2019-03-31-beta"] {
        let r = s
            .call_text(
                Method::GET,
                &format!("/enrollments/apiv-1?api-version={v}"),
                Some(&tok),
                None,
                &[],
            )
            .await;
        assert_error(&r, 400, Some(400004));
    }
}

#[tokio::test]
async fn malformed_json_is_a_400_never_a_500() {
    let s = TestServer::spawn().await;
    let tok = s.owner();
    let v = "?api-version=2021-10-01";
    let cases: Vec<(Method, String, &str)> = vec![
        (Method::PUT, format!("/enrollments/mal-1{v}"), "{not json"),
        (Method::PUT, format!("/enrollments/mal-1{v}"), ""),
        (Method::PUT, format!("/enrollments/mal-1{v}"), "[]"),
        (
            Method::PUT,
            format!("/enrollments/mal-1{v}"),
            r#"{"registrationId": 5, "attestation": {"type": "symmetricKey"}}"#,
        ),
        (
            Method::PUT,
            format!("/enrollments/mal-1{v}"),
            r#"{"registrationId": "mal-1"}"#,
        ),
        (
            Method::PUT,
            format!("/enrollments/mal-1{v}"),
            r#"{"registrationId": "mal-1", "attestation": {"type": "quantum"}}"#,
        ),
        (
            Method::PUT,
            format!("/enrollments/mal-1{v}"),
            r#"{"registrationId": "mal-1", "attestation": {"type": "symmetricKey"}, "provisioningStatus": "maybe"}"#,
        ),
        (
            Method::PUT,
            format!("/enrollmentGroups/mal-g{v}"),
            "{\"enrollmentGroupId\": ",
        ),
        (
            Method::POST,
            format!("/enrollments{v}"),
            "{\"mode\": \"create\", \"enrollments\": 7}",
        ),
        (
            Method::POST,
            format!("/enrollments{v}"),
            "{\"mode\": \"explode\", \"enrollments\": []}",
        ),
        (Method::POST, format!("/enrollmentGroups{v}"), "nope"),
        (
            Method::POST,
            format!("/enrollments/query{v}"),
            "{\"query\": ",
        ),
    ];
    for (m, path, body) in cases {
        let r = s
            .call_text(m.clone(), &path, Some(&tok), Some(body), &[])
            .await;
        assert_eq!(
            r.status, 400,
            "{m} {path} {body:?} -> {} {}",
            r.status, r.body
        );
        assert_error(&r, 400, None);
    }
    assert_eq!(get(&s, "/enrollments/mal-1").await.status, 404);
}

#[tokio::test]
async fn an_unknown_service_route_is_an_error_with_the_azure_body() {
    let s = TestServer::spawn().await;
    let r = s
        .call(Method::PATCH, "/enrollments/x", Some(&s.owner()), None, &[])
        .await;
    assert!(r.status >= 400 && r.status < 500, "{}", r.status);
    assert_error(&r, r.status, None);
}

#[tokio::test]
async fn registration_records_can_be_read_queried_by_group_and_deleted() {
    let s = TestServer::spawn().await;
    let gkey = s.enroll_group("rec-grp", json!({})).await;
    s.enroll_group("rec-other", json!({})).await;
    for rid in ["rec-dev-1", "rec-dev-2", "rec-dev-3"] {
        let r = s.register(rid, &derive_key(&gkey, rid), None).await;
        assert_eq!(r.body["status"], "assigned", "{}", r.body);
    }
    let ikey = s.enroll("rec-ind", json!({})).await;
    s.register("rec-ind", &ikey, None).await;

    let r = s.registration_record("rec-dev-1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["registrationId"], "rec-dev-1");
    assert_eq!(r.body["status"], "assigned");
    assert_eq!(r.body["deviceId"], "rec-dev-1");
    assert!(r.body["assignedHub"].is_string());
    assert!(r.body["etag"].is_string());
    assert!(r.body["createdDateTimeUtc"].is_string());
    assert_eq!(r.body["substatus"], "initialAssignment");

    let q = post(&s, "/registrations/rec-grp/query", None, &[]).await;
    assert_eq!(q.status, 200, "{}", q.body);
    assert_eq!(
        q.header("x-ms-item-type").as_deref(),
        Some("deviceRegistration")
    );
    let mut ids: Vec<String> = q
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["registrationId"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["rec-dev-1", "rec-dev-2", "rec-dev-3"]);
    // C# sends a query body; it is ignored.
    let q2 = post(
        &s,
        "/registrations/rec-grp/query",
        Some(json!({"query": "SELECT * FROM enrollmentGroups"})),
        &[("x-ms-max-item-count", "2")],
    )
    .await;
    assert_eq!(q2.status, 200, "{}", q2.body);
    assert_eq!(q2.body.as_array().unwrap().len(), 2);
    assert!(q2.header("x-ms-continuation").is_some());
    let q3 = post(
        &s,
        "/registrations/rec-grp/query?status=assigned",
        None,
        &[],
    )
    .await;
    assert_eq!(q3.body.as_array().unwrap().len(), 3);
    let q4 = post(&s, "/registrations/rec-grp/query?status=failed", None, &[]).await;
    assert_eq!(q4.body, json!([]));
    let q5 = post(&s, "/registrations/rec-other/query", None, &[]).await;
    assert_eq!(q5.body, json!([]));

    let etag = r.body["etag"].as_str().unwrap().to_string();
    assert_error(
        &delete(&s, "/registrations/rec-dev-1", &[("if-match", "\"stale\"")]).await,
        412,
        Some(412002),
    );
    let d = delete(&s, "/registrations/rec-dev-1", &[("if-match", &etag)]).await;
    assert_eq!(d.status, 204, "{}", d.body);
    assert_error(&s.registration_record("rec-dev-1").await, 404, Some(404201));
    assert_error(
        &delete(&s, "/registrations/rec-dev-1", &[]).await,
        404,
        None,
    );
    assert_error(&s.registration_record("never-registered").await, 404, None);

    // The next registration after deleting the record is an initial assignment again.
    let r = s
        .register("rec-dev-1", &derive_key(&gkey, "rec-dev-1"), None)
        .await;
    assert_eq!(
        r.body["registrationState"]["substatus"],
        "initialAssignment"
    );
}

#[tokio::test]
async fn the_service_api_error_headers_carry_the_request_id_and_error_code() {
    let s = TestServer::spawn().await;
    let r = get(&s, "/enrollments/missing-hdr").await;
    assert_error(&r, 404, None);
    assert_eq!(
        r.header("x-ms-request-id").as_deref(),
        r.body["trackingId"].as_str()
    );
    assert_eq!(
        r.header("x-ms-error-code"),
        r.body["errorCode"].as_u64().map(|c| c.to_string())
    );
}

#[tokio::test]
async fn the_star_query_the_node_and_python_sdks_send_lists_everything() {
    let s = TestServer::spawn().await;
    s.enroll("star-1", json!({})).await;
    s.enroll_group("star-grp", json!({})).await;
    let r = post(
        &s,
        "/enrollments/query",
        Some(json!({"query": "*"})),
        &[("x-ms-max-item-count", "10")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body[0]["registrationId"], "star-1");
    let r = post(
        &s,
        "/enrollmentGroups/query",
        Some(json!({"query": "*"})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body[0]["enrollmentGroupId"], "star-grp");
}

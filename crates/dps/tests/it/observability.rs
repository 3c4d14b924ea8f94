//! Metrics, health and the audit log, observed from outside after real requests.

use crate::support::*;
use reqwest::Method;
use serde_json::json;

async fn spawn_named(name: &str) -> TestServer {
    let name = name.to_string();
    TestServer::spawn_with(move |cfg| cfg.instances[0].name = name).await
}

#[tokio::test]
async fn metrics_count_registrations_assignments_and_attestations_by_result() {
    let s = spawn_named("obs-metrics").await;
    let inst = ("instance", "obs-metrics");
    let before = scrape(&s).await;
    let key = s.enroll("obs-m-1", json!({})).await;
    let key2 = s.enroll("obs-m-2", json!({})).await;
    for _ in 0..2 {
        assert_eq!(s.register("obs-m-1", &key, None).await.status, 200);
    }
    assert_eq!(s.register("obs-m-2", &key2, None).await.status, 200);
    // A wrong key: one failed attestation, no registration attempt.
    let bad = dps_core::sas::generate_key();
    assert_eq!(s.register("obs-m-1", &bad, None).await.status, 401);
    let after = scrape(&s).await;
    let delta = |m: &str, l: &[(&str, &str)]| sample(&after, m, l) - sample(&before, m, l);
    assert_eq!(
        delta("RegistrationAttempts", &[inst, ("result", "assigned")]),
        3.0
    );
    assert_eq!(
        delta(
            "DeviceAssignments",
            &[inst, ("protocol", "https"), ("attestation", "symmetricKey")]
        ),
        3.0
    );
    assert_eq!(
        delta("AttestationAttempts", &[inst, ("result", "success")]),
        3.0
    );
    assert_eq!(
        delta("AttestationAttempts", &[inst, ("result", "failure")]),
        1.0
    );
    // Latency histograms and TLS counters exist.
    assert!(
        after.contains("dps_register_duration_seconds_bucket"),
        "no register histogram"
    );
    assert!(
        sample(
            &after,
            "dps_tls_handshakes_total",
            &[("listener", "https"), ("result", "success")]
        ) >= 1.0
    );
    // Never a device id in a label.
    assert!(
        !after.contains("obs-m-1"),
        "a device id leaked into a metric label"
    );
}

#[tokio::test]
async fn health_and_readiness_answer_on_the_admin_listener() {
    let s = TestServer::spawn().await;
    let admin = s.server.admin.unwrap();
    let h = reqwest::get(format!("http://{admin}/healthz"))
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
    let r = reqwest::get(format!("http://{admin}/readyz"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"store": true, "migrations_current": true, "listeners_bound": true})
    );
}

fn actions(entries: &[serde_json::Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["action"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn every_kind_of_change_is_audited_with_secrets_redacted() {
    let s = TestServer::spawn().await;
    let owner = s.owner();
    // Enrollment create, update, delete.
    s.enroll("audit-e1", json!({})).await;
    let r = s.call(Method::PUT, "/enrollments/audit-e1", Some(&owner), Some(json!({"registrationId": "audit-e1", "attestation": {"type": "symmetricKey"}, "provisioningStatus": "disabled"})), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        s.call(
            Method::DELETE,
            "/enrollments/audit-e1",
            Some(&owner),
            None,
            &[]
        )
        .await
        .status,
        204
    );
    let e = s.audit("target=audit-e1").await;
    assert_eq!(
        actions(&e),
        [
            "enrollment.create",
            "enrollment.update",
            "enrollment.delete"
        ]
    );
    assert_eq!(e[0]["actor"], "provisioningserviceowner");
    assert_eq!(e[1]["before"]["provisioningStatus"], "enabled");
    assert_eq!(e[1]["after"]["provisioningStatus"], "disabled");
    assert_eq!(
        e[0]["after"]["attestation"]["symmetricKey"]["primaryKey"],
        "<redacted>"
    );
    assert!(e[2]["after"].is_null());

    // Group.
    s.enroll_group("audit-g1", json!({})).await;
    assert_eq!(
        s.call(
            Method::DELETE,
            "/enrollmentGroups/audit-g1",
            Some(&owner),
            None,
            &[]
        )
        .await
        .status,
        204
    );
    assert_eq!(
        actions(&s.audit("target=audit-g1").await),
        ["group.create", "group.delete"]
    );

    // Linked hub and access policy changes on the instance.
    let r = s
        .call(
            Method::PUT,
            "/admin/instances/default/linkedHubs/hub-c.example.net",
            Some(&owner),
            Some(json!({"kind": "registry", "allocation_weight": 3})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = s
        .call(
            Method::PUT,
            "/admin/instances/default/accessPolicies/ops",
            Some(&owner),
            Some(json!({"rights": ["EnrollmentRead"]})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let inst = s.audit("target=default&action=linked_hub").await;
    assert_eq!(actions(&inst), ["linked_hub.put"]);
    let pol = s.audit("target=default&action=access_policy").await;
    assert_eq!(actions(&pol), ["access_policy.put"]);
    let policies = pol[0]["after"]["access_policy"].as_array().unwrap();
    assert!(
        policies.iter().all(|p| p["primary_key"] == "<redacted>"),
        "{policies:?}"
    );

    // CA certificate.
    let ca = rcgen::generate_simple_self_signed(vec!["audit-ca".into()]).unwrap();
    let r = s
        .call(
            Method::PUT,
            "/admin/instances/default/certificates/audit-ca",
            Some(&owner),
            Some(json!({"certificate": ca.cert.pem()})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        actions(&s.audit("target=audit-ca").await),
        ["certificate.put"]
    );

    // Registration outcomes: refused, assigned, disabled; and the record's deletion.
    let key = s.enroll("audit-d1", json!({})).await;
    assert_eq!(
        s.register("audit-d1", &dps_core::sas::generate_key(), None)
            .await
            .status,
        401
    );
    assert_eq!(s.register("audit-d1", &key, None).await.status, 200);
    s.enroll("audit-d1", json!({"provisioningStatus": "disabled", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}})).await;
    assert_eq!(
        s.register("audit-d1", &key, None).await.body["status"],
        "disabled"
    );
    assert_eq!(
        s.call(
            Method::DELETE,
            "/registrations/audit-d1",
            Some(&owner),
            None,
            &[]
        )
        .await
        .status,
        204
    );
    let d = actions(&s.audit("target=audit-d1&action=registration").await);
    assert_eq!(
        d,
        [
            "registration.refused",
            "registration.assigned",
            "registration.disabled",
            "registration.delete"
        ]
    );

    // Paging with `after` and `since`.
    let all = s.audit("limit=3").await;
    assert_eq!(all.len(), 3);
    let next = s.audit(&format!("limit=3&after={}", all[2]["seq"])).await;
    assert!(next[0]["seq"].as_i64() > all[2]["seq"].as_i64());
    let future = s.audit("since=2999-01-01T00:00:00.0000000Z").await;
    assert!(future.is_empty());
}

#[tokio::test]
async fn instance_creation_through_the_admin_api_is_audited() {
    let s = TestServer::spawn().await;
    let r = s.call(Method::PUT, "/admin/instances/second", Some(&s.owner()), Some(json!({"hostnames": ["second.example.net"], "linked_hub": [{"host": "hub-x.example.net"}]})), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let e = s.audit("instance=second&action=instance").await;
    assert_eq!(actions(&e), ["instance.create"]);
    assert_eq!(e[0]["after"]["hostnames"], json!(["second.example.net"]));
}

#[tokio::test]
async fn refused_attempts_beyond_the_audit_rate_are_counted_not_stored() {
    // One entry per second, a burst of ten: a flood of bad keys writes about ten rows.
    let s = TestServer::spawn_with(|cfg| cfg.limits.refused_audit_per_second = 1).await;
    let _ = s.enroll("flood-1", json!({})).await;
    let before = sample(&scrape(&s).await, "dps_audit_refusals_dropped_total", &[]);
    for _ in 0..30 {
        let r = s
            .register("flood-1", &dps_core::sas::generate_key(), None)
            .await;
        assert_error(&r, 401, Some(401002));
    }
    let stored = s.audit("target=flood-1&action=registration.refused").await;
    assert!(
        (10..=13).contains(&stored.len()),
        "stored {} refusals",
        stored.len()
    );
    let dropped = sample(&scrape(&s).await, "dps_audit_refusals_dropped_total", &[]) - before;
    assert!(dropped >= 17.0, "dropped {dropped}");
}

//! The audit log cannot be filled by refusals: refused attempts are sampled per source, MQTT
//! CONNECT refusals are audited and counted like HTTPS ones, and the log is pruned to its
//! retention.

use crate::support::*;
use dps_device::{Auth, ProvisioningClient, Transport, Trust};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_flood_of_refusals_from_one_source_writes_at_most_its_burst() {
    // Defaults: one refusal per second per source, a burst of ten; the node-wide cap (100 per
    // second, burst 1000) is far away.
    let s = TestServer::spawn().await;
    let _ = s.enroll("src-flood-1", json!({})).await;
    let before = sample(
        &scrape(&s).await,
        "dps_audit_refusals_dropped_total",
        &[("limit", "source")],
    );
    let started = Instant::now();
    const N: usize = 40;
    for _ in 0..N {
        let r = s
            .register("src-flood-1", &dps_core::sas::generate_key(), None)
            .await;
        assert_error(&r, 401, Some(401002));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stored = s
        .audit("target=src-flood-1&action=registration.refused")
        .await;
    // The burst, plus what one token a second refilled while the flood ran.
    let allowed = 10 + elapsed.ceil() as usize;
    assert!(
        !stored.is_empty() && stored.len() <= allowed,
        "stored {} refusals (allowed {allowed})",
        stored.len()
    );
    let dropped = sample(
        &scrape(&s).await,
        "dps_audit_refusals_dropped_total",
        &[("limit", "source")],
    ) - before;
    assert!(
        dropped >= (N - stored.len()) as f64,
        "dropped {dropped}, stored {}",
        stored.len()
    );
    // Every refusal was still counted as a failed attestation.
    let failures = sample(
        &scrape(&s).await,
        "AttestationAttempts",
        &[("instance", "default"), ("result", "failure")],
    );
    assert!(failures >= N as f64, "{failures}");
}

#[tokio::test]
async fn an_mqtt_connect_with_a_bad_key_is_counted_and_audited() {
    let s = TestServer::spawn_with(|cfg| cfg.instances[0].name = "mqtt-refusals".into()).await;
    let _ = s.enroll("mqtt-bad-1", json!({})).await;
    let labels = [
        ("instance", "mqtt-refusals"),
        ("protocol", "mqtt"),
        ("result", "failure"),
    ];
    let before = sample(&scrape(&s).await, "AttestationAttempts", &labels);
    let r = ProvisioningClient::builder()
        .global_endpoint("localhost")
        .port(s.server.mqtt.expect("mqtt listener").port())
        .id_scope(SCOPE)
        .registration_id("mqtt-bad-1")
        .auth(Auth::SymmetricKey(dps_core::sas::generate_key()))
        .transport(Transport::Mqtt)
        .trust(Trust::Pem(s.ca_pem.clone().into_bytes()))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
        .register()
        .await;
    assert!(r.is_err(), "a bad key must be refused: {r:?}");
    let after = sample(&scrape(&s).await, "AttestationAttempts", &labels);
    assert_eq!(after - before, 1.0, "one refused CONNECT, one failure");
    let rows = s
        .audit("target=mqtt-bad-1&action=registration.refused")
        .await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["after"]["transport"], "mqtt", "{rows:?}");
    assert_eq!(rows[0]["instance"], "mqtt-refusals");
}

#[tokio::test]
async fn the_audit_log_is_pruned_to_max_rows() {
    let s = TestServer::spawn_with(|cfg| {
        cfg.audit.max_rows = 3;
        cfg.audit.prune_interval_ms = 1000;
    })
    .await;
    let before = sample(&scrape(&s).await, "dps_audit_pruned_total", &[]);
    for i in 0..6 {
        let _ = s.enroll(&format!("prune-{i}"), json!({})).await;
    }
    assert!(s.audit("limit=100").await.len() >= 3);
    let left = eventually(Duration::from_secs(15), || async {
        let all = s.audit("limit=100").await;
        if all.len() <= 3 {
            Ok(all)
        } else {
            Err(format!("{} entries", all.len()))
        }
    })
    .await;
    // The newest stay.
    assert_eq!(left.last().unwrap()["targetId"], "prune-5", "{left:?}");
    let pruned = sample(&scrape(&s).await, "dps_audit_pruned_total", &[]) - before;
    assert!(pruned >= 3.0, "pruned {pruned}");
}

//! The clean-up of old identities survives hub outages (issue #14): a device that moves away
//! from a broker that is down leaves a live login behind; the durable clean-up queue removes it
//! once the broker is back, within a bounded time, with real Mosquitto brokers.

use crate::support::*;
use crate::support_mosquitto::*;
use dps_server::hubs::mosquitto::derive_password;
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn an_old_broker_login_stops_working_once_the_broker_is_back() {
    let Some(mut a) = Broker::start().await else {
        return;
    };
    let Some(b) = Broker::start().await else {
        return;
    };
    let s = TestServer::spawn_with(|c| {
        c.instances[0].linked_hub = vec![
            a.linked_hub("broker-a.local"),
            b.linked_hub("broker-b.local"),
        ];
        // Fast retries, so that the test takes seconds: every 100 ms, backoff 200 ms to 1 s.
        c.hub_cleanup.interval_ms = 100;
        c.hub_cleanup.initial_backoff_ms = 200;
        c.hub_cleanup.max_backoff_ms = 1000;
    })
    .await;
    let keys = (dps_core::sas::generate_key(), dps_core::sas::generate_key());
    // A reset reprovisioning policy: the move reads no twin from the broker it leaves (with
    // migration, a move waits until the old hub can be read, and nothing is left behind).
    let key = s
        .enroll(
            "leaver",
            json!({"iotHubs": ["broker-a.local"],
                   "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": false},
                   "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": keys.0, "secondaryKey": keys.1}}}),
        )
        .await;
    let r = s.register("leaver", &key, None).await;
    assert_eq!(
        r.body["registrationState"]["assignedHub"], "broker-a.local",
        "{}",
        r.body
    );
    let pw = derive_password(&key, "leaver").unwrap();
    assert!(connect(a.port, "leaver", "leaver", &pw).await.is_ok());

    // Broker A goes down; the device moves to broker B meanwhile.
    a.stop();
    set_hubs(&s, "leaver", &keys, json!(["broker-b.local"])).await;
    let r = s.register("leaver", &key, None).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    assert_eq!(
        r.body["registrationState"]["assignedHub"], "broker-b.local",
        "{}",
        r.body
    );
    assert!(connect(b.port, "leaver", "leaver", &pw).await.is_ok());

    // The removal from A is queued, and retried while A is down.
    let engine = s.server.app.engine.clone();
    let task = eventually(Duration::from_secs(10), || {
        let engine = engine.clone();
        async move {
            let q = engine
                .cleanup_queue(None, 100)
                .await
                .map_err(|e| e.to_string())?;
            match q.as_slice() {
                [t] if t.attempts >= 3 => Ok(t.clone()),
                other => Err(format!("expected one task retried 3 times, got {other:?}")),
            }
        }
    })
    .await;
    assert_eq!(task.key.hub, "broker-a.local");
    assert_eq!(task.key.device_id, "leaver");
    assert!(task.last_error.is_some(), "{task:?}");
    // `dps hub cleanup list` (the admin API) shows it, with its last error.
    let listed = cli_json(&s, &["hub", "cleanup", "list"]).await;
    assert_eq!(listed[0]["hub"], "broker-a.local", "{listed}");
    assert_eq!(listed[0]["deviceId"], "leaver", "{listed}");
    assert_eq!(listed[0]["action"], "delete", "{listed}");
    assert!(listed[0]["failedAttempts"].as_u64() >= Some(3), "{listed}");
    assert!(listed[0]["lastError"].is_string(), "{listed}");
    let m = scrape(&s).await;
    assert!(
        sample(
            &m,
            "dps_hub_cleanup_attempts_total",
            &[("result", "failure")]
        ) >= 3.0
    );

    // A is back with its data, the old login included (it is in the broker's saved clients);
    // the retry removes it within the backoff's bound (1 s), the adapter's reconnect (up to
    // 5 s) and the hub call.
    assert!(
        a.saved_clients().iter().any(|c| c == "leaver"),
        "the old login is still on broker A: {:?}",
        a.saved_clients()
    );
    a.start_again().await;
    let back = Instant::now();
    eventually(Duration::from_secs(15), || async {
        match connect(a.port, "leaver", "leaver", &pw).await {
            Err(_) => Ok(()),
            Ok(_) => Err("broker A still accepts the old login".to_string()),
        }
    })
    .await;
    let took = back.elapsed();
    assert!(dynsec_client(a.port, "leaver").await.is_none());
    eprintln!("old login refused {took:?} after broker A was back");
    // The task is done; the device's login on B is untouched.
    eventually(Duration::from_secs(5), || {
        let engine = engine.clone();
        async move {
            let q = engine
                .cleanup_queue(None, 100)
                .await
                .map_err(|e| e.to_string())?;
            if q.is_empty() {
                Ok(())
            } else {
                Err(format!("still queued: {q:?}"))
            }
        }
    })
    .await;
    assert!(connect(b.port, "leaver", "leaver", &pw).await.is_ok());
    // The audit entry is written just after the task is completed: poll for it.
    eventually(Duration::from_secs(5), || async {
        let audit = s.audit_for("leaver").await;
        if audit.iter().any(|e| {
            e["action"] == "hub_identity.cleanup"
                && e["after"]["hub"] == "broker-a.local"
                && e["after"]["failedAttempts"].as_u64() >= Some(3)
        }) {
            Ok(())
        } else {
            Err(format!("no hub_identity.cleanup entry: {audit:#?}"))
        }
    })
    .await;
}

/// `dps --output json <args>` with the owner connection string, as JSON.
async fn cli_json(s: &TestServer, args: &[&str]) -> serde_json::Value {
    let cs = format!(
        "HostName=localhost;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={OWNER_KEY}"
    );
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dps"));
    cmd.args(["--output", "json"])
        .args(args)
        .env("DPS_CONNECTION_STRING", cs)
        .env("DPS_URL", &s.base)
        .env("DPS_CA_FILE", s.dir.path().join("ca.pem"))
        .current_dir(s.dir.path());
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run dps"))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "dps {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "dps {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

//! The `dps` CLI binary against the real server: exit codes, JSON output, and error messages.

use crate::support::*;
use std::process::Command;

struct Cli<'a> {
    s: &'a TestServer,
    ca: std::path::PathBuf,
}

impl<'a> Cli<'a> {
    fn new(s: &'a TestServer) -> Self {
        let ca = s.dir.path().join("ca.pem");
        Cli { s, ca }
    }

    /// Run `dps <args>` with the owner connection string; returns (success, stdout, stderr).
    async fn run(&self, args: &[&str]) -> (bool, String, String) {
        let cs = format!("HostName=localhost;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={OWNER_KEY}");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dps"));
        cmd.args(args)
            .env("DPS_CONNECTION_STRING", cs)
            .env("DPS_URL", &self.s.base)
            .env("DPS_CA_FILE", &self.ca)
            .current_dir(self.s.dir.path());
        let out = tokio::task::spawn_blocking(move || cmd.output().expect("run dps"))
            .await
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--output", "json"];
        a.extend_from_slice(args);
        let (ok, out, err) = self.run(&a).await;
        assert!(ok, "dps {args:?} failed: {err}");
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("dps {args:?} printed no JSON ({e}): {out}"))
    }
}

#[tokio::test]
async fn the_cli_manages_enrollments_and_registers_a_device() {
    let s = TestServer::spawn().await;
    let cli = Cli::new(&s);
    let created = cli
        .json(&[
            "enrollment",
            "create",
            "cli-dev-1",
            "--attestation",
            "symmetricKey",
        ])
        .await;
    let key = created["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("keys shown on create")
        .to_string();
    let list = cli.json(&["enrollment", "list"]).await;
    assert!(list.to_string().contains("cli-dev-1"), "{list}");
    let shown = cli.json(&["enrollment", "show", "cli-dev-1"]).await;
    assert!(
        shown["attestation"]["symmetricKey"]
            .get("primaryKey")
            .is_none(),
        "keys must not be shown without --show-keys: {shown}"
    );
    let hubs = cli.json(&["linked-hub", "list"]).await;
    assert!(hubs.to_string().contains("hub-a.example.net"), "{hubs}");

    // The field-install check: register, then read the registration record.
    let port = s.server.https.port().to_string();
    let endpoint = format!("localhost:{port}");
    let (ok, out, err) = cli
        .run(&[
            "device",
            "register",
            "--id-scope",
            SCOPE,
            "--registration-id",
            "cli-dev-1",
            "--key",
            &key,
            "--global-endpoint",
            &endpoint,
            "--ca-file",
            cli.ca.to_str().unwrap(),
        ])
        .await;
    assert!(ok, "register failed: {out} {err}");
    assert!(out.contains("assigned"), "{out}");
    let reg = cli.json(&["registration", "show", "cli-dev-1"]).await;
    assert_eq!(reg["status"], "assigned", "{reg}");

    // A wrong key: the error says why and the exit code is non-zero.
    let wrong = dps_core::sas::generate_key();
    let (ok, out, err) = cli
        .run(&[
            "device",
            "register",
            "--id-scope",
            SCOPE,
            "--registration-id",
            "cli-dev-1",
            "--key",
            &wrong,
            "--global-endpoint",
            &endpoint,
            "--ca-file",
            cli.ca.to_str().unwrap(),
        ])
        .await;
    assert!(!ok, "a wrong key must fail: {out}");
    assert!(format!("{out}{err}").contains("401002"), "{out} {err}");
    // The installer sees why: the latest refused attempt, from the audit log.
    let reg = cli.json(&["registration", "show", "cli-dev-1"]).await;
    assert_eq!(reg["status"], "assigned", "{reg}");
    let reason = reg["lastRefusedAttempt"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("signature"), "{reg}");
    // A device that never registered: non-zero exit, and the reason of its refusal.
    let (ok, _, _) = cli
        .run(&[
            "device",
            "register",
            "--id-scope",
            SCOPE,
            "--registration-id",
            "cli-nobody",
            "--key",
            &wrong,
            "--global-endpoint",
            &endpoint,
            "--ca-file",
            cli.ca.to_str().unwrap(),
        ])
        .await;
    assert!(!ok);
    let (ok, out, _) = cli
        .run(&["--output", "json", "registration", "show", "cli-nobody"])
        .await;
    assert!(!ok, "an unregistered device must not look fine");
    assert!(out.contains("no enrollment matches"), "{out}");

    let (ok, _, _) = cli.run(&["enrollment", "delete", "cli-dev-1"]).await;
    assert!(ok);
    let (ok, _, err) = cli.run(&["enrollment", "show", "cli-dev-1"]).await;
    assert!(!ok);
    assert!(err.contains("404201") || err.contains("not found"), "{err}");
}

#[tokio::test]
async fn the_cli_manages_the_certificate_deny_list_and_reads_the_audit_log() {
    let s = TestServer::spawn().await;
    let cli = Cli::new(&s);
    let (ok, _, err) = cli
        .run(&[
            "certificate",
            "deny",
            "AB:CD:EF:01",
            "--reason",
            "stolen device",
        ])
        .await;
    assert!(ok, "{err}");
    let list = cli.json(&["certificate", "deny-list"]).await;
    assert_eq!(list[0]["reason"], "stolen device", "{list}");
    let (ok, _, err) = cli.run(&["certificate", "undeny", "AB:CD:EF:01"]).await;
    assert!(ok, "{err}");
    assert_eq!(
        cli.json(&["certificate", "deny-list"]).await,
        serde_json::json!([])
    );
    let audit = cli.json(&["audit", "list", "--action", "denylist"]).await;
    assert_eq!(audit.as_array().map(Vec::len), Some(2), "{audit}");
}

#[tokio::test]
async fn the_cli_manages_access_policies_and_linked_hubs_at_run_time() {
    let s = TestServer::spawn().await;
    let cli = Cli::new(&s);
    let p = cli
        .json(&[
            "access-policy",
            "add",
            "ops-reader",
            "--rights",
            "EnrollmentRead,RegistrationStatusRead",
        ])
        .await;
    assert_eq!(
        p["rights"],
        serde_json::json!(["EnrollmentRead", "RegistrationStatusRead"]),
        "{p}"
    );
    let key = p["primary_key"]
        .as_str()
        .expect("new key shown once")
        .to_string();
    let list = cli.json(&["access-policy", "list"]).await;
    assert!(
        list.to_string().contains("ops-reader") && !list.to_string().contains(&key),
        "{list}"
    );
    // The new policy works for reads and is refused for writes.
    let tok = service_token("localhost", "ops-reader", &key);
    assert_eq!(
        s.call(
            reqwest::Method::POST,
            "/enrollments/query",
            Some(&tok),
            Some(serde_json::json!({"query": "*"})),
            &[]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        s.call(
            reqwest::Method::DELETE,
            "/enrollments/x",
            Some(&tok),
            None,
            &[]
        )
        .await
        .status,
        401
    );
    let (ok, _, err) = cli.run(&["access-policy", "remove", "ops-reader"]).await;
    assert!(ok, "{err}");

    let (ok, _, err) = cli
        .run(&[
            "linked-hub",
            "add",
            "hub-new.example.net",
            "--weight",
            "5",
            "--location",
            "westus",
            "--max-registrations-per-second",
            "50",
        ])
        .await;
    assert!(ok, "{err}");
    let hubs = cli.json(&["linked-hub", "list"]).await;
    let new = hubs
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "hub-new.example.net")
        .expect("hub listed")
        .clone();
    assert_eq!(new["allocation_weight"], 5);
    assert_eq!(new["max_registrations_per_second"], 50);
    assert_eq!(new["health"]["healthy"], true);
    let (ok, _, err) = cli
        .run(&["linked-hub", "remove", "hub-new.example.net"])
        .await;
    assert!(ok, "{err}");
}

#[tokio::test]
async fn the_cli_reports_a_bad_connection_string_clearly() {
    let s = TestServer::spawn().await;
    let cli = Cli::new(&s);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dps"));
    cmd.args(["enrollment", "list"])
        .env(
            "DPS_CONNECTION_STRING",
            "HostName=localhost;SharedAccessKeyName=x",
        )
        .env("DPS_URL", &s.base)
        .env("DPS_CA_FILE", &cli.ca);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SharedAccessKey"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `dps bench` in its storm and kept-alive modes against the real server: every simulated
/// device is assigned (storm devices connect from loopback addresses of their own, so a broken
/// source-address set-up fails them all), and the server's counters moved by the fleet's size.
#[tokio::test]
async fn the_load_generator_runs_a_storm_and_kept_alive_connections() {
    let s = TestServer::spawn_with(|cfg| cfg.instances[0].name = "bench-modes".into()).await;
    let cli = Cli::new(&s);
    let https = format!("localhost:{}", s.base.rsplit(':').next().unwrap());
    let mqtt = format!("localhost:{}", s.server.mqtt.expect("mqtt listener").port());
    let admin = format!("http://{}", s.server.admin.expect("admin listener"));
    let runs: [(&str, &str, &str, &str, &str); 3] = [
        ("--storm", "storm", "24", "https", &https),
        ("--storm", "storm", "16", "mqtt", &mqtt),
        ("--keep-alive", "keepAlive", "30", "https", &https),
    ];
    for (mode, field, devices, transport, endpoint) in runs {
        let (ok, out, err) = cli
            .run(&[
                "bench",
                "--devices",
                devices,
                "--concurrency",
                "4",
                "--create-group",
                "--json",
                "--timeout",
                "60",
                "--poll-interval-ms",
                "20",
                "--transport",
                transport,
                "--global-endpoint",
                endpoint,
                "--admin-url",
                &admin,
                mode,
            ])
            .await;
        assert!(ok, "dps bench {mode} failed: {err}\n{out}");
        let r: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
        let n: u64 = devices.parse().unwrap();
        assert_eq!(r["successes"], n, "{mode}: {out}");
        assert_eq!(r["failures"], 0, "{mode}: {out}");
        assert_eq!(r[field], true, "{mode}: {out}");
        let assigned: f64 = r["serverMetrics"]
            .as_object()
            .expect("server counters")
            .iter()
            .filter(|(k, _)| k.starts_with("DeviceAssignments{") && k.contains("bench-modes"))
            .filter_map(|(_, v)| v.as_f64())
            .sum();
        assert_eq!(assigned, n as f64, "{mode}: {out}");
        assert_eq!(r["transport"], transport, "{mode}: {out}");
    }
}

/// `dps serve` raises its open-file soft limit to the hard one (every connection is a file
/// descriptor): started with a soft limit of 256, the running server has the hard limit.
#[tokio::test]
async fn the_server_raises_its_open_file_limit() {
    fn soft_and_hard(limits: &str) -> (String, String) {
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("Max open files line");
        let mut f = line["Max open files".len()..].split_whitespace();
        (f.next().unwrap().into(), f.next().unwrap().into())
    }
    let (_, hard) = soft_and_hard(&std::fs::read_to_string("/proc/self/limits").unwrap());
    if hard.parse::<u64>().is_ok_and(|h| h <= 256) {
        eprintln!("SKIPPED: the hard open-file limit is {hard}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("dps.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[listen]\nhttps = \"127.0.0.1:0\"\nmqtt = \"127.0.0.1:0\"\namqp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [[instance]]\nname = \"default\"\nhostnames = [\"localhost\"]\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" serve --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_dps"))
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start dps serve");
    let run_json = data.join("run.json");
    eventually(std::time::Duration::from_secs(60), || {
        let ready = run_json.exists();
        async move {
            if ready {
                Ok(())
            } else {
                Err("dps serve has not written run.json".to_string())
            }
        }
    })
    .await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let (soft, child_hard) = soft_and_hard(&limits);
    assert_eq!(child_hard, hard);
    assert_eq!(soft, hard, "the server kept a soft limit of {soft}");
}

#[tokio::test]
async fn the_cli_issues_a_certificate_to_a_device_and_revokes_it() {
    let s = TestServer::spawn_with(|c| {
        let mut p = dps_core::issuance::CredentialPolicy::new("devices");
        p.min_renewal_interval_secs = 0;
        c.instances[0].credential_policy = vec![p];
    })
    .await;
    let cli = Cli::new(&s);
    let key = s
        .enroll(
            "cli-cert-1",
            serde_json::json!({"credentialPolicyName": "devices"}),
        )
        .await;
    let policies = cli.json(&["certificate", "policies"]).await;
    assert_eq!(policies[0]["policy"]["name"], "devices", "{policies}");
    let (ok, _, err) = cli
        .run(&[
            "certificate",
            "export-ca",
            "devices",
            "--out",
            "issuing-ca.pem",
        ])
        .await;
    assert!(ok, "{err}");
    let endpoint = format!("localhost:{}", s.server.https.port());
    let out = cli
        .json(&[
            "device",
            "register",
            "--id-scope",
            SCOPE,
            "--registration-id",
            "cli-cert-1",
            "--key",
            &key,
            "--global-endpoint",
            &endpoint,
            "--ca-file",
            cli.ca.to_str().unwrap(),
            "--issue-certificate",
            "--key-type",
            "ecdsa-p384",
        ])
        .await;
    assert_eq!(out["status"], "assigned", "{out}");
    let dir = s.dir.path();
    for f in ["cli-cert-1.pem", "cli-cert-1.key.pem"] {
        assert!(dir.join(f).exists(), "{f} written: {out}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("cli-cert-1.key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is private: {mode:o}");
    }
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile", "issuing-ca.pem", "cli-cert-1.pem"])
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    // Renewal with the issued certificate (the files just written are replaced).
    let out = cli
        .json(&[
            "device",
            "register",
            "--id-scope",
            SCOPE,
            "--registration-id",
            "cli-cert-1",
            "--cert",
            "cli-cert-1.pem",
            "--key-file",
            "cli-cert-1.key.pem",
            "--global-endpoint",
            &endpoint,
            "--ca-file",
            cli.ca.to_str().unwrap(),
            "--issue-certificate",
        ])
        .await;
    assert_eq!(out["status"], "assigned", "{out}");
    assert_eq!(
        out["registrationState"]["x509"]["certificateInfo"]["subjectName"], "CN=cli-cert-1",
        "{out}"
    );
    let issued = cli
        .json(&["certificate", "issued", "--registration-id", "cli-cert-1"])
        .await;
    assert_eq!(issued.as_array().map(Vec::len), Some(2), "{issued}");
    assert_eq!(issued[0]["status"], "active", "{issued}");
    let (ok, _, err) = cli
        .run(&["certificate", "revoke", "--registration-id", "cli-cert-1"])
        .await;
    assert!(ok, "{err}");
    let issued = cli
        .json(&["certificate", "issued", "--status", "revoked"])
        .await;
    assert_eq!(issued.as_array().map(Vec::len), Some(2), "{issued}");
    let (ok, _, err) = cli
        .run(&["certificate", "crl", "devices", "--out", "devices.crl"])
        .await;
    assert!(ok, "{err}");
    let crl = Command::new("openssl")
        .args([
            "crl",
            "-inform",
            "DER",
            "-in",
            "devices.crl",
            "-noout",
            "-text",
        ])
        .current_dir(dir)
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&crl.stdout);
    let serial = issued[0]["serialNumber"].as_str().unwrap();
    assert!(text.contains(serial), "{text}");
}

/// `dps enrollment create --attestation tpm --endorsement-key` and `dps device register
/// --attestation tpm` against a software TPM (swtpm + tpm2-tools; skipped without them outside
/// CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_enrolls_and_registers_a_tpm_device() {
    use dps_device::tpm::{tools_available, Swtpm, Tpm2Tools};
    if !tools_available() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "swtpm and tpm2-tools are required under CI=true"
        );
        eprintln!("skipped: swtpm or tpm2-tools not installed");
        return;
    }
    let s = TestServer::spawn().await;
    let cli = Cli::new(&s);
    let dir = s.dir.path().to_path_buf();
    let (tpm, keys) = tokio::task::spawn_blocking(move || {
        let tpm = Swtpm::start(dir.join("swtpm")).unwrap();
        let keys = Tpm2Tools::new(Some(tpm.tcti()), dir.join("ek-work"))
            .provision()
            .unwrap();
        (tpm, keys)
    })
    .await
    .unwrap();
    // The EK as tpm2_createek/tpm2_readpublic write it (raw TPM2B_PUBLIC file).
    let ek_file = s.dir.path().join("ek.pub");
    std::fs::write(&ek_file, &keys.endorsement_key).unwrap();
    let created = cli
        .json(&[
            "enrollment",
            "create",
            "cli-tpm-1",
            "--attestation",
            "tpm",
            "--endorsement-key",
            ek_file.to_str().unwrap(),
        ])
        .await;
    assert_eq!(created["attestation"]["type"], "tpm", "{created}");
    // Not for groups.
    let (ok, _, err) = cli
        .run(&[
            "enrollment-group",
            "create",
            "g-tpm",
            "--attestation",
            "tpm",
            "--endorsement-key",
            ek_file.to_str().unwrap(),
        ])
        .await;
    assert!(
        !ok && err.contains("not allowed for enrollment groups"),
        "{err}"
    );

    let endpoint = format!("localhost:{}", s.server.https.port());
    let tcti = tpm.tcti();
    let (ok, out, err) = cli
        .run(&[
            "--output",
            "json",
            "device",
            "register",
            "--id-scope",
            SCOPE,
            "--registration-id",
            "cli-tpm-1",
            "--attestation",
            "tpm",
            "--tpm-tcti",
            &tcti,
            "--global-endpoint",
            &endpoint,
            "--ca-file",
            cli.ca.to_str().unwrap(),
        ])
        .await;
    assert!(ok, "TPM register failed: {out} {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "assigned", "{v}");
    assert!(
        v["registrationState"]["tpm"]["authenticationKey"].is_string(),
        "{v}"
    );
    let reg = cli.json(&["registration", "show", "cli-tpm-1"]).await;
    assert_eq!(reg["status"], "assigned", "{reg}");
    drop(tpm);
}

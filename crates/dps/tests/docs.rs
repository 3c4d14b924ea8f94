//! Keeps the operator documentation honest: `docs/openapi.json` must be valid OpenAPI JSON with
//! the main paths, and every configuration key must be documented in `docs/configuration.md`.
//! No server is started.

use figment::providers::Format as _;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    let p = repo_root().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// Every route the server answers has its operation in `docs/openapi.json` (path parameters
/// compared by position, paths case-insensitively, as the router matches them).
#[test]
fn openapi_json_documents_every_route() {
    fn shape(p: &str) -> String {
        let mut out = String::new();
        let mut in_param = false;
        for c in p.chars() {
            match c {
                '{' => {
                    in_param = true;
                    out.push('{');
                }
                '}' => {
                    in_param = false;
                    out.push('}');
                }
                _ if in_param => {}
                _ => out.push(c.to_ascii_lowercase()),
            }
        }
        out
    }
    let v: serde_json::Value =
        serde_json::from_str(&read("docs/openapi.json")).expect("docs/openapi.json is JSON");
    let documented: BTreeSet<(String, String)> = v["paths"]
        .as_object()
        .expect("paths object")
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .into_iter()
                .flat_map(|o| o.keys())
                .map(move |m| (m.to_ascii_uppercase(), shape(path)))
        })
        .collect();
    let missing: Vec<String> = dps_server::routes::routes()
        .iter()
        .filter(|r| !documented.contains(&(r.method.as_str().to_string(), shape(r.pattern))))
        .map(|r| format!("{} {}", r.method, r.pattern))
        .collect();
    assert!(missing.is_empty(), "docs/openapi.json lacks: {missing:#?}");
}

#[test]
fn openapi_json_is_valid_and_has_the_main_paths() {
    let text = read("docs/openapi.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("docs/openapi.json is JSON");
    assert_eq!(v["openapi"], "3.0.3", "OpenAPI version");
    assert!(v["info"]["title"].is_string(), "info.title");
    let paths = v["paths"].as_object().expect("paths object");
    for p in [
        // device API
        "/{idScope}/registrations/{registrationId}/register",
        "/{idScope}/registrations/{registrationId}/operations/{operationId}",
        "/{idScope}/registrations/{registrationId}",
        // Azure service API
        "/enrollments",
        "/enrollments/query",
        "/enrollments/{registrationId}",
        "/enrollments/{registrationId}/attestationmechanism",
        "/enrollmentGroups",
        "/enrollmentGroups/query",
        "/enrollmentGroups/{enrollmentGroupId}",
        "/enrollmentGroups/{enrollmentGroupId}/attestationmechanism",
        "/registrations/{registrationId}",
        "/registrations/{enrollmentGroupId}/query",
        // admin API
        "/admin/instances",
        "/admin/instances/{name}",
        "/admin/instances/{name}/stats",
        "/admin/instances/{name}/linkedHubs",
        "/admin/instances/{name}/linkedHubs/{host}",
        "/admin/instances/{name}/accessPolicies",
        "/admin/instances/{name}/accessPolicies/{policy}",
        "/admin/instances/{name}/hubs/{host}/devices",
        "/admin/instances/{name}/hubs/{host}/devices/{deviceId}",
        "/admin/audit",
    ] {
        assert!(paths.contains_key(p), "docs/openapi.json lacks path {p}");
    }
    let schemas = v["components"]["schemas"]
        .as_object()
        .expect("components.schemas");
    for s in [
        "IndividualEnrollment",
        "EnrollmentGroup",
        "AttestationMechanism",
        "DeviceRegistrationState",
        "RegistrationOperationStatus",
        "ErrorBody",
        "BulkEnrollmentOperation",
        "BulkEnrollmentOperationResult",
        "Instance",
        "LinkedHub",
        "AccessPolicy",
    ] {
        assert!(
            schemas.contains_key(s),
            "docs/openapi.json lacks schema {s}"
        );
    }
    // Every $ref points at a schema that exists.
    fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    if k == "$ref" {
                        if let Some(s) = x.as_str() {
                            out.push(s.to_string());
                        }
                    } else {
                        refs(x, out);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&v, &mut all);
    for r in all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .or_else(|| r.strip_prefix("#/components/parameters/"))
            .or_else(|| r.strip_prefix("#/components/responses/"))
            .unwrap_or_else(|| panic!("unexpected $ref {r}"));
        let section = r.split('/').nth(2).expect("section");
        assert!(
            v["components"][section].get(name).is_some(),
            "dangling $ref {r}"
        );
    }
    let sec = &v["components"]["securitySchemes"];
    assert!(
        sec.as_object().is_some_and(|m| m
            .values()
            .any(|s| s["type"] == "apiKey" && s["in"] == "header" && s["name"] == "Authorization")),
        "an apiKey security scheme in the Authorization header"
    );
}

/// Every key of a JSON value tree, with the table it sits in (for nested objects).
fn collect_keys(v: &serde_json::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                out.insert(k.clone());
                collect_keys(x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_keys(x, out)),
        _ => {}
    }
}

#[test]
fn every_configuration_key_is_documented() {
    use dps_core::instance::LinkedHub;
    use dps_server::config::{Config, InstanceConfig, PolicyConfig, TlsFiles};

    let mut keys = BTreeSet::new();
    // The built-in defaults (every top-level key and every key of the nested tables).
    let mut cfg = Config {
        tls: Some(TlsFiles {
            cert: "server.pem".into(),
            key: "server.key".into(),
        }),
        location: Some("westeurope".into()),
        ..Config::default()
    };
    // One instance with every optional field set, so that skipped-when-empty keys show up.
    let mut hub = LinkedHub::registry("hub.example.net");
    hub.location = Some("eastus".into());
    hub.connection_string = Some("x".into());
    hub.max_devices = Some(1);
    hub.options
        .insert("x".into(), serde_json::Value::Bool(true));
    cfg.instances.push(InstanceConfig {
        name: "default".into(),
        id_scope: Some("0ne00000A0A".into()),
        hostnames: Some(vec!["localhost".into()]),
        access_policy: vec![PolicyConfig {
            name: "p".into(),
            primary_key: Some("a".into()),
            secondary_key: Some("b".into()),
            rights: vec![],
        }],
        linked_hub: vec![hub],
        allocation_policy: Default::default(),
        register_response: Default::default(),
        allow_fault_injection: true,
        fault: vec![serde_json::from_value(serde_json::json!({
            "id": "f", "action": "throttle", "registrationId": "x*", "enrollmentGroup": "g",
            "transport": "https", "attestation": "x509", "count": 1,
            "expires": "2030-01-01T00:00:00Z", "retryAfter": 1, "delayPolls": 1, "delayMs": 1,
            "errorCode": 500001, "message": "m", "hub": "h"
        }))
        .expect("fault rule")],
        credential_policy: vec![{
            let mut p = dps_core::issuance::CredentialPolicy::new("devices");
            p.san_device_id = false;
            p.ca_certificate_file = Some("ca.pem".into());
            p.ca_key_file = Some("ca.key".into());
            p.ca_chain_file = Some("root.pem".into());
            p
        }],
    });
    collect_keys(
        &serde_json::to_value(&cfg).expect("config serializes"),
        &mut keys,
    );

    // The complete example config (instance, access_policy and linked_hub tables as written).
    let example = repo_root().join("config/dps.example.toml");
    let raw: serde_json::Value =
        figment::Figment::from(figment::providers::Toml::file_exact(&example))
            .extract()
            .expect("the example config parses");
    collect_keys(&raw, &mut keys);

    let doc = read("docs/configuration.md");
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| {
            // Option keys under linked_hub.options are free-form; "x" above is ours.
            k.as_str() != "x" && !doc.contains(&format!("`{k}`"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document these configuration keys (write them as `key`): {missing:?}"
    );
    for table in [
        "[listen]",
        "[tls]",
        "[log]",
        "[limits]",
        "[outbound]",
        "[[instance]]",
        "[[instance.access_policy]]",
        "[[instance.linked_hub]]",
    ] {
        assert!(
            doc.contains(table),
            "docs/configuration.md does not mention the table {table}"
        );
    }
}

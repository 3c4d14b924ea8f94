//! The layering rules of `docs/CONTRACTS.md`, checked on the source text so that a change that
//! breaks one fails CI with the rule it broke:
//!
//! 1. Only `crates/core/src/wire.rs` builds wire errors (error codes, `WireError` values).
//! 2. Front ends (the HTTPS handlers, the MQTT endpoint) never reach the store: they call use
//!    cases (the engine, the enrollment, registration, certificate and administration services).
//! 3. The domain core does no I/O: no async runtime, network, database or file-system crates.
//! 4. The server library does not depend on the command line; the binary wires both.
//! 5. The use cases and the engine never import the front ends.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `.rs` file below `dir`, with its text, test modules (`#[cfg(test)]` to the end of the
/// file, where our unit tests live) cut off.
fn sources(dir: &str) -> Vec<(String, String)> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let base = root();
    let mut files = Vec::new();
    walk(&base.join(dir), &mut files);
    files.sort();
    files
        .into_iter()
        .filter(|p| p.file_name().is_none_or(|n| n != "tests.rs"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let text = match text.find("#[cfg(test)]") {
                Some(i) => text[..i].to_string(),
                None => text,
            };
            let rel = p.strip_prefix(&base).unwrap().display().to_string();
            (rel, text)
        })
        .collect()
}

/// `(file, line number, line)` of every line in `files` that contains one of `needles`.
fn offending(files: &[(String, String)], needles: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for (name, text) in files {
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if needles.iter().any(|n| code.contains(n)) {
                out.push(format!("{name}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    out
}

#[test]
fn only_the_wire_module_builds_wire_errors() {
    let mut files = Vec::new();
    for dir in [
        "crates/core/src",
        "crates/server/src",
        "crates/mqtt/src",
        "crates/amqp/src",
        "crates/store/src",
        "crates/dps/src",
    ] {
        files.extend(sources(dir));
    }
    files.retain(|(name, _)| name != "crates/core/src/wire.rs");
    let bad = offending(
        &files,
        &[
            "WireError::new",
            "WireError {",
            "codes::",
            "error_code: 4",
            "error_code: 5",
        ],
    );
    assert!(
        bad.is_empty(),
        "wire error codes are decided only in crates/core/src/wire.rs (return a domain error \
         and let the front end render it with WireError::from):\n{}",
        bad.join("\n")
    );
}

/// The front ends: HTTPS routing and handlers, and the MQTT endpoint.
const FRONT_ENDS: &[&str] = &[
    "crates/server/src/http.rs",
    "crates/server/src/device_api.rs",
    "crates/server/src/service_api.rs",
    "crates/server/src/admin_api.rs",
    "crates/server/src/certificates.rs",
    "crates/server/src/mqtt_front.rs",
    "crates/server/src/amqp_front.rs",
    "crates/server/src/broker_auth_api.rs",
];

#[test]
fn front_ends_reach_the_store_only_through_use_cases() {
    let mut files: Vec<_> = sources("crates/server/src")
        .into_iter()
        .filter(|(name, _)| FRONT_ENDS.contains(&name.as_str()))
        .collect();
    // Every front end listed must exist: a renamed file must be renamed here too.
    let present: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    for f in FRONT_ENDS {
        assert!(
            present.contains(f),
            "{f} is listed as a front end but does not exist"
        );
    }
    files.extend(sources("crates/mqtt/src"));
    files.extend(sources("crates/amqp/src"));
    let bad = offending(
        &files,
        // The store's value types that describe a request (`Expect` from If-Match, `Filter`,
        // `AuditQuery`) may be parsed by a handler; reaching the store may not.
        &[
            "dps_store",
            "crate::repo",
            "Repo",
            ".store.",
            ".store(",
            "store::Store",
            "Collection",
            "StoreError",
            "Write::",
            "DocIndex",
        ],
    );
    assert!(
        bad.is_empty(),
        "front ends call a use case (crate::usecases, the engine) instead of the store:\n{}",
        bad.join("\n")
    );
}

#[test]
fn use_cases_and_the_engine_do_not_import_front_ends() {
    let mut files = sources("crates/server/src/engine");
    if root().join("crates/server/src/usecases").is_dir() {
        files.extend(sources("crates/server/src/usecases"));
    }
    let bad = offending(
        &files,
        &[
            "crate::http",
            "crate::device_api",
            "crate::service_api",
            "crate::admin_api",
            "crate::mqtt_front",
            "crate::amqp_front",
            "axum::",
            "hyper::",
        ],
    );
    assert!(
        bad.is_empty(),
        "use cases know nothing of HTTP or MQTT:\n{}",
        bad.join("\n")
    );
}

fn dependencies(manifest: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(manifest)).unwrap();
    let Some(start) = text.find("[dependencies]") else {
        return Vec::new();
    };
    let section = &text[start + "[dependencies]".len()..];
    let end = section.find("\n[").unwrap_or(section.len());
    section[..end]
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            (!l.is_empty() && !l.starts_with('#'))
                .then(|| l.split(['=', '.', ' ']).next().unwrap_or("").to_string())
        })
        .collect()
}

#[test]
fn the_domain_core_does_no_io() {
    let deps = dependencies("crates/core/Cargo.toml");
    assert!(!deps.is_empty(), "dps-core has dependencies to check");
    for banned in [
        "tokio",
        "reqwest",
        "hyper",
        "axum",
        "rusqlite",
        "tokio-postgres",
        "deadpool-postgres",
        "rumqttc",
        "dps-store",
        "dps-server",
    ] {
        assert!(
            !deps.iter().any(|d| d == banned),
            "dps-core must not depend on {banned} (it does no I/O)"
        );
    }
}

#[test]
fn the_server_does_not_depend_on_the_command_line() {
    let deps = dependencies("crates/server/Cargo.toml");
    assert!(deps.iter().any(|d| d == "dps-core"));
    for banned in ["dps-cli", "clap"] {
        assert!(
            !deps.iter().any(|d| d == banned),
            "dps-server must not depend on {banned}: the dps binary wires server and CLI"
        );
    }
    let bin = dependencies("crates/dps/Cargo.toml");
    assert!(bin.iter().any(|d| d == "dps-server") && bin.iter().any(|d| d == "dps-cli"));
}

#[test]
fn every_wire_error_code_is_documented() {
    let wire = std::fs::read_to_string(root().join("crates/core/src/wire.rs")).unwrap();
    let docs = ["docs/device-api.md", "docs/service-api.md"]
        .map(|d| std::fs::read_to_string(root().join(d)).unwrap())
        .join("\n");
    let codes: Vec<String> = wire
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("pub const ")?;
            let value = rest.split("u32 = ").nth(1)?.trim_end_matches(';');
            Some(value.replace('_', ""))
        })
        .collect();
    assert!(codes.len() >= 15, "found the code table: {codes:?}");
    for c in &codes {
        assert!(
            docs.contains(&format!("`{c}`")),
            "error code {c} (crates/core/src/wire.rs) is not listed in docs/device-api.md or docs/service-api.md"
        );
    }
}

//! Service-API and admin-API commands.

use crate::service::{enc, svc_path, Service};
use crate::table::{cell, render, render_object};
use crate::{
    AccessPolicyCommand, AttestationArg, AuditCommand, CertificateCommand, Command,
    EnrollmentCommand, EnrollmentFields, Globals, GroupCommand, HubCommand, HubDeviceCommand,
    InstanceCommand, LinkedHubCommand, ListFilters, OutputFormat, RegistrationCommand,
    ReprovisionArg, StatusArg,
};
use anyhow::{anyhow, bail, Context, Result};
use reqwest::Method;
use serde_json::{json, Map, Value};
use std::process::ExitCode;

pub(crate) async fn dispatch(g: &Globals, cmd: Command) -> Result<ExitCode> {
    let svc = g.service()?;
    match cmd {
        Command::Instance(c) => instance(g, &svc, c).await,
        Command::LinkedHub(c) => linked_hub(g, &svc, c).await,
        Command::Enrollment(c) => enrollment(g, &svc, c).await,
        Command::EnrollmentGroup(c) => group(g, &svc, c).await,
        Command::Registration(c) => registration(g, &svc, c).await,
        Command::Hub(HubCommand::Device(c)) => hub_device(g, &svc, c).await,
        Command::Audit(c) => audit(g, &svc, c).await,
        Command::Certificate(c) => certificate(g, &svc, c).await,
        Command::AccessPolicy(c) => access_policy(g, &svc, c).await,
        _ => bail!("unsupported command"),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// Print JSON or a table.
fn emit(g: &Globals, v: &Value, table: impl FnOnce(&Value) -> String) {
    match g.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
        ),
        OutputFormat::Table => print!("{}", table(v)),
    }
}

fn emit_list(g: &Globals, items: &[Value], headers: &[&str], cols: &[&[&str]]) {
    let v = Value::Array(items.to_vec());
    emit(g, &v, |_| {
        let rows: Vec<Vec<String>> = items
            .iter()
            .map(|it| cols.iter().map(|ptrs| cell(it, ptrs)).collect())
            .collect();
        render(headers, &rows)
    });
}

fn done(g: &Globals, what: String) {
    match g.output {
        OutputFormat::Json => println!("{}", json!({"result": what})),
        OutputFormat::Table => println!("{what}"),
    }
}

// ---------- instances ----------

/// The admin instance name to act on: `--instance`, else the instance whose hostnames include the
/// connection string's HostName, else the only one visible.
pub(crate) async fn resolve_instance(svc: &Service, explicit: Option<String>) -> Result<String> {
    if let Some(i) = explicit {
        return Ok(i);
    }
    let list = svc.get("/admin/instances").await?;
    let list = list.as_array().cloned().unwrap_or_default();
    let host = svc.connection().host_name.to_ascii_lowercase();
    let by_host = list.iter().find(|i| {
        i.get("hostnames")
            .and_then(Value::as_array)
            .is_some_and(|h| {
                h.iter()
                    .any(|x| x.as_str().map(str::to_ascii_lowercase).as_deref() == Some(&host))
            })
    });
    let pick = by_host.or(if list.len() == 1 { list.first() } else { None });
    pick.and_then(|i| i.get("name").and_then(Value::as_str))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("cannot tell which instance to use: pass --instance NAME"))
}

fn instance_conn_strings(inst: &Value) -> Vec<String> {
    let host = inst
        .pointer("/hostnames/0")
        .and_then(Value::as_str)
        .unwrap_or("localhost");
    inst.get("access_policy")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| {
                    let name = p.get("name")?.as_str()?;
                    let key = p.get("primary_key")?.as_str()?;
                    (key != "<redacted>").then(|| {
                        format!("HostName={host};SharedAccessKeyName={name};SharedAccessKey={key}")
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn instance(g: &Globals, svc: &Service, c: InstanceCommand) -> Result<()> {
    let cols: &[&[&str]] = &[
        &["/name"],
        &["/id_scope"],
        &["/hostnames"],
        &["/allocation_policy"],
    ];
    match c {
        InstanceCommand::List => {
            let v = svc.get("/admin/instances").await?;
            let items = v.as_array().cloned().unwrap_or_default();
            emit(g, &v, |_| {
                let rows: Vec<Vec<String>> = items
                    .iter()
                    .map(|it| {
                        let mut r: Vec<String> = cols.iter().map(|p| cell(it, p)).collect();
                        r.push(count(it, "/linked_hub"));
                        r.push(count(it, "/access_policy"));
                        r
                    })
                    .collect();
                render(
                    &[
                        "NAME",
                        "ID SCOPE",
                        "HOSTNAMES",
                        "ALLOCATION",
                        "LINKED HUBS",
                        "POLICIES",
                    ],
                    &rows,
                )
            });
        }
        InstanceCommand::Show { name } => {
            let v = svc.get(&format!("/admin/instances/{}", enc(&name))).await?;
            emit(g, &v, render_object);
        }
        InstanceCommand::Create {
            name,
            id_scope,
            hostnames,
            allocation_policy,
        } => {
            let scope =
                id_scope.unwrap_or_else(|| dps_core::ids::IdScope::generate().as_str().to_string());
            let mut body = json!({"name": name, "id_scope": scope, "hostnames": hostnames});
            if let Some(p) = allocation_policy {
                body["allocation_policy"] = json!(p);
            }
            let r = svc
                .call(
                    Method::PUT,
                    &format!("/admin/instances/{}", enc(&name)),
                    Some(&body),
                    &[],
                )
                .await?;
            emit(g, &r.body, |v| {
                let mut out = format!(
                    "instance '{}' created: ID scope {}\n",
                    cell(v, &["/name"]),
                    cell(v, &["/id_scope"])
                );
                for cs in instance_conn_strings(v) {
                    out.push_str(&format!("connection string: {cs}\n"));
                }
                out
            });
        }
        InstanceCommand::Delete { name } => {
            svc.call(
                Method::DELETE,
                &format!("/admin/instances/{}", enc(&name)),
                None,
                &[],
            )
            .await?;
            done(g, format!("instance '{name}' deleted"));
        }
    }
    Ok(())
}

fn count(v: &Value, ptr: &str) -> String {
    v.pointer(ptr)
        .and_then(Value::as_array)
        .map(|a| a.len().to_string())
        .unwrap_or_else(|| "0".into())
}

// ---------- linked hubs ----------

async fn access_policy(g: &Globals, svc: &Service, c: AccessPolicyCommand) -> Result<()> {
    match c {
        AccessPolicyCommand::List { instance } => {
            let i = resolve_instance(svc, instance).await?;
            let v = svc
                .get(&format!("/admin/instances/{}/accessPolicies", enc(&i)))
                .await?;
            let items = v.as_array().cloned().unwrap_or_default();
            emit_list(g, &items, &["NAME", "RIGHTS"], &[&["/name"], &["/rights"]]);
        }
        AccessPolicyCommand::Add {
            name,
            rights,
            instance,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let path = format!("/admin/instances/{}/accessPolicies/{}", enc(&i), enc(&name));
            let r = svc
                .call(Method::PUT, &path, Some(&json!({"rights": rights})), &[])
                .await?;
            emit(g, &r.body, |v| {
                format!(
                    "access policy '{name}' saved\nconnection string: HostName={};SharedAccessKeyName={name};SharedAccessKey={}",
                    svc.connection().host_name,
                    v["primary_key"].as_str().unwrap_or("?")
                )
            });
        }
        AccessPolicyCommand::Remove { name, instance } => {
            let i = resolve_instance(svc, instance).await?;
            svc.call(
                Method::DELETE,
                &format!("/admin/instances/{}/accessPolicies/{}", enc(&i), enc(&name)),
                None,
                &[],
            )
            .await?;
            done(g, format!("access policy '{name}' removed"));
        }
    }
    Ok(())
}

async fn linked_hub(g: &Globals, svc: &Service, c: LinkedHubCommand) -> Result<()> {
    match c {
        LinkedHubCommand::List { instance } => {
            let i = resolve_instance(svc, instance).await?;
            let v = svc
                .get(&format!("/admin/instances/{}/linkedHubs", enc(&i)))
                .await?;
            let items = v.as_array().cloned().unwrap_or_default();
            emit_list(
                g,
                &items,
                &[
                    "HOST",
                    "KIND",
                    "WEIGHT",
                    "APPLY POLICY",
                    "LOCATION",
                    "MAX DEVICES",
                    "HEALTHY",
                ],
                &[
                    &["/host"],
                    &["/kind"],
                    &["/allocation_weight"],
                    &["/apply_allocation_policy"],
                    &["/location"],
                    &["/max_devices"],
                    &["/health/healthy"],
                ],
            );
        }
        LinkedHubCommand::Add {
            host,
            instance,
            kind,
            weight,
            location,
            no_apply_allocation_policy,
            connection_string_hub,
            max_devices,
            max_registrations_per_second,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let mut body = json!({
                "host": host,
                "kind": kind,
                "allocation_weight": weight,
                "apply_allocation_policy": !no_apply_allocation_policy,
            });
            if let Some(l) = location {
                body["location"] = json!(l);
            }
            if let Some(c) = connection_string_hub {
                body["connection_string"] = json!(c);
            }
            if let Some(m) = max_devices {
                body["max_devices"] = json!(m);
            }
            if let Some(r) = max_registrations_per_second {
                body["max_registrations_per_second"] = json!(r);
            }
            let r = svc
                .call(
                    Method::PUT,
                    &format!("/admin/instances/{}/linkedHubs/{}", enc(&i), enc(&host)),
                    Some(&body),
                    &[],
                )
                .await?;
            if r.body.is_null() {
                done(g, format!("hub '{host}' linked to instance '{i}'"));
            } else {
                emit(g, &r.body, |_| {
                    format!("hub '{host}' linked to instance '{i}'\n")
                });
            }
        }
        LinkedHubCommand::Remove { host, instance } => {
            let i = resolve_instance(svc, instance).await?;
            svc.call(
                Method::DELETE,
                &format!("/admin/instances/{}/linkedHubs/{}", enc(&i), enc(&host)),
                None,
                &[],
            )
            .await?;
            done(g, format!("hub '{host}' unlinked from instance '{i}'"));
        }
    }
    Ok(())
}

// ---------- enrollments and groups ----------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Enrollment,
    Group,
}

impl Kind {
    fn collection(self) -> &'static str {
        match self {
            Kind::Enrollment => "/enrollments",
            Kind::Group => "/enrollmentGroups",
        }
    }
    fn id_field(self) -> &'static str {
        match self {
            Kind::Enrollment => "registrationId",
            Kind::Group => "enrollmentGroupId",
        }
    }
    fn noun(self) -> &'static str {
        match self {
            Kind::Enrollment => "enrollment",
            Kind::Group => "enrollment group",
        }
    }
    fn query(self) -> Value {
        match self {
            Kind::Enrollment => json!({"query": "SELECT * FROM enrollments"}),
            Kind::Group => json!({"query": "SELECT * FROM enrollmentGroups"}),
        }
    }
}

fn read_pem(path: &std::path::Path) -> Result<String> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read certificate file {}", path.display()))?;
    if !s.contains("-----BEGIN CERTIFICATE-----") {
        bail!("{} holds no PEM CERTIFICATE block", path.display());
    }
    Ok(s)
}

fn parse_json_arg(flag: &str, s: &str) -> Result<Value> {
    let v: Value =
        serde_json::from_str(s).with_context(|| format!("{flag} is not valid JSON: {s}"))?;
    if !v.is_object() {
        bail!("{flag} must be a JSON object");
    }
    Ok(v)
}

/// Apply the flags to an enrollment or group document. `existing_attestation` (with secrets) is
/// kept unless the flags change it.
fn apply_fields(
    kind: Kind,
    doc: &mut Map<String, Value>,
    f: &EnrollmentFields,
    root_ca_name: Option<&str>,
    creating: bool,
) -> Result<()> {
    let wants_x509 = f.attestation == Some(AttestationArg::X509)
        || f.certificate_path.is_some()
        || root_ca_name.is_some();
    let wants_sym = f.attestation == Some(AttestationArg::SymmetricKey)
        || f.primary_key.is_some()
        || f.secondary_key.is_some();
    if f.attestation == Some(AttestationArg::Tpm) {
        bail!("TPM enrollments cannot be created with the CLI yet; use the service API");
    }
    if wants_x509 && wants_sym {
        bail!("choose either symmetric keys or an X.509 certificate, not both");
    }
    if wants_x509 {
        let mut x509 = Map::new();
        if let Some(ca) = root_ca_name {
            if kind == Kind::Enrollment {
                bail!("--root-ca-name applies to enrollment groups only");
            }
            x509.insert("caReferences".into(), json!({"primary": ca}));
        } else {
            let Some(p) = &f.certificate_path else {
                bail!(
                    "x509 attestation needs --certificate-path{}",
                    if kind == Kind::Group {
                        " or --root-ca-name"
                    } else {
                        ""
                    }
                );
            };
            let mut certs = json!({"primary": {"certificate": read_pem(p)?}});
            if let Some(s) = &f.secondary_certificate_path {
                certs["secondary"] = json!({"certificate": read_pem(s)?});
            }
            let field = match kind {
                Kind::Enrollment => "clientCertificates",
                Kind::Group => "signingCertificates",
            };
            x509.insert(field.into(), certs);
        }
        doc.insert("attestation".into(), json!({"type": "x509", "x509": x509}));
    } else if wants_sym || creating {
        let mut sk = match doc.get("attestation") {
            Some(a) if a.get("type").and_then(Value::as_str) == Some("symmetricKey") => {
                a.get("symmetricKey").cloned().unwrap_or_else(|| json!({}))
            }
            _ => json!({}),
        };
        if let Some(k) = &f.primary_key {
            check_key("--primary-key", k)?;
            sk["primaryKey"] = json!(k);
        }
        if let Some(k) = &f.secondary_key {
            check_key("--secondary-key", k)?;
            sk["secondaryKey"] = json!(k);
        }
        doc.insert(
            "attestation".into(),
            json!({"type": "symmetricKey", "symmetricKey": sk}),
        );
    }
    if let Some(h) = &f.iot_hubs {
        doc.insert("iotHubs".into(), json!(h));
    }
    if let Some(p) = &f.allocation_policy {
        let v: dps_core::model::AllocationPolicy =
            serde_json::from_value(json!(p)).map_err(|e| anyhow!("--allocation-policy: {e}"))?;
        doc.insert("allocationPolicy".into(), json!(v.as_str()));
    }
    if f.initial_twin_tags.is_some() || f.initial_twin_properties.is_some() {
        let mut twin = doc
            .get("initialTwin")
            .cloned()
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        if let Some(t) = &f.initial_twin_tags {
            twin["tags"] = parse_json_arg("--initial-twin-tags", t)?;
        }
        if let Some(p) = &f.initial_twin_properties {
            twin["properties"] =
                json!({"desired": parse_json_arg("--initial-twin-properties", p)?});
        }
        doc.insert("initialTwin".into(), twin);
    }
    if let Some(e) = f.edge {
        doc.insert("capabilities".into(), json!({"iotEdge": e}));
    }
    if f.disabled {
        doc.insert("provisioningStatus".into(), json!("disabled"));
    } else if f.enabled || creating {
        doc.insert("provisioningStatus".into(), json!("enabled"));
    }
    if let Some(r) = f.reprovision_policy {
        let (u, m) = match r {
            ReprovisionArg::ReprovisionAndMigrateData => (true, true),
            ReprovisionArg::ReprovisionAndResetData => (true, false),
            ReprovisionArg::Never => (false, false),
        };
        doc.insert(
            "reprovisionPolicy".into(),
            json!({"updateHubAssignment": u, "migrateDeviceData": m}),
        );
    }
    if let (Some(u), Some(v)) = (&f.webhook_url, &f.api_version) {
        doc.insert(
            "customAllocationDefinition".into(),
            json!({"webhookUrl": u, "apiVersion": v}),
        );
        if f.allocation_policy.is_none() {
            doc.insert("allocationPolicy".into(), json!("custom"));
        }
    }
    Ok(())
}

fn check_key(flag: &str, k: &str) -> Result<()> {
    if !dps_core::sas::valid_key(k) {
        bail!("{flag} must be base64 of 16 to 64 bytes");
    }
    Ok(())
}

fn list_cols(kind: Kind) -> (Vec<&'static str>, Vec<&'static [&'static str]>) {
    match kind {
        Kind::Enrollment => (
            vec![
                "REGISTRATION ID",
                "ATTESTATION",
                "STATUS",
                "ALLOCATION",
                "HUBS",
                "REGISTRATION",
                "ASSIGNED HUB",
                "UPDATED",
            ],
            vec![
                &["/registrationId"],
                &["/attestation/type"],
                &["/provisioningStatus"],
                &["/allocationPolicy"],
                &["/iotHubs"],
                &["/registrationState/status"],
                &["/registrationState/assignedHub"],
                &["/lastUpdatedDateTimeUtc"],
            ],
        ),
        Kind::Group => (
            vec![
                "GROUP ID",
                "ATTESTATION",
                "STATUS",
                "ALLOCATION",
                "HUBS",
                "EDGE",
                "UPDATED",
            ],
            vec![
                &["/enrollmentGroupId"],
                &["/attestation/type"],
                &["/provisioningStatus"],
                &["/allocationPolicy"],
                &["/iotHubs"],
                &["/capabilities/iotEdge"],
                &["/lastUpdatedDateTimeUtc"],
            ],
        ),
    }
}

async fn list_enrollments(g: &Globals, svc: &Service, kind: Kind, f: ListFilters) -> Result<()> {
    let path = svc_path(
        &format!("{}/query", kind.collection()),
        &[
            (
                "status",
                f.status.map(|s| match s {
                    StatusArg::Enabled => "enabled".to_string(),
                    StatusArg::Disabled => "disabled".to_string(),
                }),
            ),
            ("attestation", f.attestation.map(|a| a.as_str().to_string())),
            ("prefix", f.prefix),
        ],
    );
    let items = svc.query_all(&path, &kind.query(), f.top).await?;
    let (h, c) = list_cols(kind);
    emit_list(g, &items, &h, &c);
    Ok(())
}

async fn attestation_with_keys(svc: &Service, kind: Kind, id: &str) -> Result<Value> {
    Ok(svc
        .call(
            Method::POST,
            &svc_path(
                &format!("{}/{}/attestationmechanism", kind.collection(), enc(id)),
                &[],
            ),
            None,
            &[],
        )
        .await?
        .body)
}

async fn show_enrollment(
    g: &Globals,
    svc: &Service,
    kind: Kind,
    id: &str,
    show_keys: bool,
) -> Result<()> {
    let mut v = svc
        .get(&svc_path(
            &format!("{}/{}", kind.collection(), enc(id)),
            &[],
        ))
        .await?;
    if show_keys {
        let a = attestation_with_keys(svc, kind, id).await?;
        if a.is_object() {
            v["attestation"] = a;
        }
    }
    emit(g, &v, render_object);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn put_enrollment(
    g: &Globals,
    svc: &Service,
    kind: Kind,
    id: &str,
    fields: &EnrollmentFields,
    extra: Option<(&str, String)>,
    root_ca_name: Option<&str>,
    update: bool,
) -> Result<()> {
    let path = svc_path(&format!("{}/{}", kind.collection(), enc(id)), &[]);
    let mut headers = Vec::new();
    let mut doc = if update {
        let current = svc.get(&path).await?;
        let mut m = current
            .as_object()
            .cloned()
            .ok_or_else(|| anyhow!("the service returned no {} document", kind.noun()))?;
        if let Some(e) = m.get("etag").and_then(Value::as_str) {
            headers.push(("If-Match", e.to_string()));
        }
        // GET hides the keys: fetch them so that a PUT does not regenerate them.
        if m.get("attestation")
            .and_then(|a| a.get("type"))
            .and_then(Value::as_str)
            == Some("symmetricKey")
        {
            let a = attestation_with_keys(svc, kind, id).await?;
            if a.is_object() {
                m.insert("attestation".into(), a);
            }
        }
        for ro in [
            "registrationState",
            "createdDateTimeUtc",
            "lastUpdatedDateTimeUtc",
        ] {
            m.remove(ro);
        }
        m
    } else {
        let mut m = Map::new();
        m.insert(kind.id_field().into(), json!(id));
        m
    };
    if let Some((k, v)) = extra {
        doc.insert(k.into(), json!(v));
    }
    apply_fields(kind, &mut doc, fields, root_ca_name, !update)?;
    if !update {
        // Create must not replace: refuse when it already exists.
        match svc.get(&path).await {
            Ok(_) => bail!(
                "{} '{id}' already exists (use 'update' to change it)",
                kind.noun()
            ),
            Err(e) => match e.downcast_ref::<crate::ApiError>() {
                Some(a) if a.status == 404 => {}
                _ => return Err(e),
            },
        }
    }
    let r = svc
        .call(Method::PUT, &path, Some(&Value::Object(doc)), &headers)
        .await?;
    emit(g, &r.body, |v| {
        let mut out = format!(
            "{} '{id}' {}\n",
            kind.noun(),
            if update { "updated" } else { "created" }
        );
        if !update {
            for (label, ptr) in [
                ("primary key", "/attestation/symmetricKey/primaryKey"),
                ("secondary key", "/attestation/symmetricKey/secondaryKey"),
            ] {
                if let Some(k) = v.pointer(ptr).and_then(Value::as_str) {
                    out.push_str(&format!("{label}: {k}\n"));
                }
            }
        }
        out.push_str(&format!("etag: {}\n", cell(v, &["/etag"])));
        out
    });
    Ok(())
}

async fn delete_doc(svc: &Service, path: &str, etag: Option<String>) -> Result<()> {
    let headers: Vec<(&str, String)> = etag.map(|e| ("If-Match", e)).into_iter().collect();
    svc.call(Method::DELETE, &svc_path(path, &[]), None, &headers)
        .await?;
    Ok(())
}

async fn enrollment(g: &Globals, svc: &Service, c: EnrollmentCommand) -> Result<()> {
    let k = Kind::Enrollment;
    match c {
        EnrollmentCommand::List(f) => list_enrollments(g, svc, k, f).await,
        EnrollmentCommand::Show { id, show_keys } => {
            show_enrollment(g, svc, k, &id, show_keys).await
        }
        EnrollmentCommand::Create {
            id,
            device_id,
            fields,
        } => {
            let extra = device_id.map(|d| ("deviceId", d));
            put_enrollment(g, svc, k, &id, &fields, extra, None, false).await
        }
        EnrollmentCommand::Update {
            id,
            device_id,
            fields,
        } => {
            let extra = device_id.map(|d| ("deviceId", d));
            put_enrollment(g, svc, k, &id, &fields, extra, None, true).await
        }
        EnrollmentCommand::Delete { id, etag } => {
            delete_doc(svc, &format!("/enrollments/{}", enc(&id)), etag).await?;
            done(g, format!("enrollment '{id}' deleted"));
            Ok(())
        }
    }
}

async fn group(g: &Globals, svc: &Service, c: GroupCommand) -> Result<()> {
    let k = Kind::Group;
    match c {
        GroupCommand::List(f) => list_enrollments(g, svc, k, f).await,
        GroupCommand::Show { id, show_keys } => show_enrollment(g, svc, k, &id, show_keys).await,
        GroupCommand::Create {
            id,
            root_ca_name,
            fields,
        } => {
            put_enrollment(
                g,
                svc,
                k,
                &id,
                &fields,
                None,
                root_ca_name.as_deref(),
                false,
            )
            .await
        }
        GroupCommand::Update {
            id,
            root_ca_name,
            fields,
        } => put_enrollment(g, svc, k, &id, &fields, None, root_ca_name.as_deref(), true).await,
        GroupCommand::Delete { id, etag } => {
            delete_doc(svc, &format!("/enrollmentGroups/{}", enc(&id)), etag).await?;
            done(g, format!("enrollment group '{id}' deleted"));
            Ok(())
        }
    }
}

// ---------- registrations ----------

const REG_HEADERS: &[&str] = &[
    "REGISTRATION ID",
    "STATUS",
    "SUBSTATUS",
    "ASSIGNED HUB",
    "DEVICE ID",
    "ERROR",
    "UPDATED",
];
const REG_COLS: &[&[&str]] = &[
    &["/registrationId"],
    &["/status"],
    &["/substatus"],
    &["/assignedHub"],
    &["/deviceId"],
    &["/errorMessage", "/errorCode"],
    &["/lastUpdatedDateTimeUtc"],
];

async fn registration(g: &Globals, svc: &Service, c: RegistrationCommand) -> Result<()> {
    match c {
        RegistrationCommand::List { group, status, top } => {
            let path = svc_path(
                &format!("/registrations/{}/query", enc(&group)),
                &[("status", status)],
            );
            let items = svc.query_all(&path, &json!({}), top).await?;
            emit_list(g, &items, REG_HEADERS, REG_COLS);
        }
        RegistrationCommand::Show { id } => {
            let rec = svc
                .get(&svc_path(&format!("/registrations/{}", enc(&id)), &[]))
                .await;
            // Refused attempts write no registration record (an unauthenticated request must
            // not change a device's record); their precise reason is in the audit log. Show the
            // latest one when the policy may read the audit log (ServiceConfig), so that an
            // installer sees why a device was refused.
            let refused = svc
                .get(&format!(
                    "/admin/audit?target={}&action=registration.refused&limit=10000",
                    enc(&id)
                ))
                .await
                .ok()
                .and_then(|v| v.as_array().and_then(|a| a.last().cloned()))
                .map(|r| {
                    json!({
                        "timestamp": r["timestamp"],
                        "reason": r["after"]["reason"],
                        "transport": r["after"]["transport"],
                    })
                });
            match (rec, refused) {
                (Ok(mut v), refused) => {
                    if let Some(r) = refused {
                        v["lastRefusedAttempt"] = r;
                    }
                    emit(g, &v, render_object);
                }
                (Err(e), Some(r)) => {
                    let v = json!({"registrationId": id, "status": "not registered", "lastRefusedAttempt": r});
                    emit(g, &v, render_object);
                    return Err(e);
                }
                (Err(e), None) => return Err(e),
            }
        }
        RegistrationCommand::Delete { id, etag } => {
            delete_doc(svc, &format!("/registrations/{}", enc(&id)), etag).await?;
            done(g, format!("registration '{id}' deleted"));
        }
    }
    Ok(())
}

// ---------- hub devices ----------

async fn hub_device(g: &Globals, svc: &Service, c: HubDeviceCommand) -> Result<()> {
    match c {
        HubDeviceCommand::List { hub, instance, top } => {
            let i = resolve_instance(svc, instance).await?;
            let mut items = Vec::new();
            let mut cont: Option<String> = None;
            loop {
                let limit = top
                    .map(|t| t.saturating_sub(items.len()).min(500))
                    .unwrap_or(500);
                if limit == 0 {
                    break;
                }
                let mut path = format!(
                    "/admin/instances/{}/hubs/{}/devices?limit={limit}",
                    enc(&i),
                    enc(&hub)
                );
                if let Some(c) = &cont {
                    path.push_str(&format!("&continuation={}", enc(c)));
                }
                let v = svc.get(&path).await?;
                if let Some(a) = v.get("items").and_then(Value::as_array) {
                    items.extend(a.iter().cloned());
                } else if let Some(a) = v.as_array() {
                    items.extend(a.iter().cloned());
                }
                cont = v
                    .get("continuation")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string);
                if cont.is_none() {
                    break;
                }
            }
            if let Some(t) = top {
                items.truncate(t);
            }
            emit_list(
                g,
                &items,
                &["DEVICE ID", "HUB", "STATUS", "AUTH", "EDGE", "UPDATED"],
                &[
                    &["/deviceId"],
                    &["/hub"],
                    &["/status"],
                    &["/authentication/type"],
                    &["/capabilities/iotEdge"],
                    &["/lastUpdatedDateTimeUtc"],
                ],
            );
        }
        HubDeviceCommand::Show {
            device,
            hub,
            instance,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let v = svc
                .get(&format!(
                    "/admin/instances/{}/hubs/{}/devices/{}",
                    enc(&i),
                    enc(&hub),
                    enc(&device)
                ))
                .await?;
            emit(g, &v, render_object);
        }
    }
    Ok(())
}

// ---------- audit ----------

async fn audit(g: &Globals, svc: &Service, c: AuditCommand) -> Result<()> {
    let AuditCommand::List {
        since,
        enrollment,
        action,
        instance,
        limit,
    } = c;
    if let Some(s) = &since {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .with_context(|| format!("--since '{s}' is not an RFC 3339 time"))?;
    }
    let mut q = vec![format!("limit={limit}")];
    for (k, v) in [
        ("instance", instance),
        ("since", since),
        ("target", enrollment),
        ("action", action),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", enc(&v)));
        }
    }
    let v = svc.get(&format!("/admin/audit?{}", q.join("&"))).await?;
    let items = v
        .as_array()
        .cloned()
        .or_else(|| v.get("items").and_then(Value::as_array).cloned())
        .unwrap_or_default();
    emit_list(
        g,
        &items,
        &["SEQ", "TIME", "INSTANCE", "ACTOR", "ACTION", "TARGET"],
        &[
            &["/seq"],
            &["/timestamp"],
            &["/instance"],
            &["/actor"],
            &["/action"],
            &["/target_id", "/targetId", "/target"],
        ],
    );
    Ok(())
}

// ---------- certificates ----------

async fn certificate(g: &Globals, svc: &Service, c: CertificateCommand) -> Result<()> {
    let base = |i: &str| format!("/admin/instances/{}/certificates", enc(i));
    match c {
        CertificateCommand::Deny {
            value,
            kind,
            reason,
            instance,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let path = format!("/admin/instances/{}/denylist/{}", enc(&i), enc(&value));
            svc.call(
                Method::PUT,
                &path,
                Some(&json!({"kind": kind, "reason": reason})),
                &[],
            )
            .await?;
            done(g, format!("{kind} {value} is denied"));
        }
        CertificateCommand::Undeny { value, instance } => {
            let i = resolve_instance(svc, instance).await?;
            let path = format!("/admin/instances/{}/denylist/{}", enc(&i), enc(&value));
            svc.call(Method::DELETE, &path, None, &[]).await?;
            done(g, format!("{value} removed from the deny list"));
        }
        CertificateCommand::DenyList { instance } => {
            let i = resolve_instance(svc, instance).await?;
            let v = svc
                .get(&format!("/admin/instances/{}/denylist", enc(&i)))
                .await?;
            let items = v.as_array().cloned().unwrap_or_default();
            emit_list(
                g,
                &items,
                &["KIND", "VALUE", "REASON", "ADDED"],
                &[&["/kind"], &["/value"], &["/reason"], &["/created"]],
            );
        }
        CertificateCommand::List { instance } => {
            let i = resolve_instance(svc, instance).await?;
            let v = svc.get(&base(&i)).await?;
            let items = v
                .as_array()
                .cloned()
                .or_else(|| v.get("items").and_then(Value::as_array).cloned())
                .or_else(|| v.get("value").and_then(Value::as_array).cloned())
                .unwrap_or_default();
            emit_list(
                g,
                &items,
                &["NAME", "SUBJECT", "VERIFIED", "SHA-256", "EXPIRES"],
                &[
                    &["/name"],
                    &[
                        "/subject",
                        "/subjectName",
                        "/info/subjectName",
                        "/properties/subject",
                    ],
                    &["/verified", "/isVerified", "/properties/isVerified"],
                    &[
                        "/sha256Thumbprint",
                        "/thumbprint",
                        "/info/sha256Thumbprint",
                        "/properties/thumbprint",
                    ],
                    &[
                        "/notAfterUtc",
                        "/expiry",
                        "/info/notAfterUtc",
                        "/properties/expiry",
                    ],
                ],
            );
        }
        CertificateCommand::Show { name, instance } => {
            let i = resolve_instance(svc, instance).await?;
            let v = svc.get(&format!("{}/{}", base(&i), enc(&name))).await?;
            emit(g, &v, render_object);
        }
        CertificateCommand::Create {
            name,
            path,
            instance,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let pem = read_pem(&path)?;
            let r = svc
                .call(
                    Method::PUT,
                    &format!("{}/{}", base(&i), enc(&name)),
                    Some(&json!({"certificate": pem})),
                    &[],
                )
                .await?;
            if r.body.is_null() {
                done(g, format!("certificate '{name}' uploaded"));
            } else {
                emit(g, &r.body, |v| {
                    format!("certificate '{name}' uploaded\n{}", render_object(v))
                });
            }
        }
        CertificateCommand::Delete { name, instance } => {
            let i = resolve_instance(svc, instance).await?;
            svc.call(
                Method::DELETE,
                &format!("{}/{}", base(&i), enc(&name)),
                None,
                &[],
            )
            .await?;
            done(g, format!("certificate '{name}' deleted"));
        }
        CertificateCommand::GenerateVerificationCode { name, instance } => {
            let i = resolve_instance(svc, instance).await?;
            let r = svc
                .call(
                    Method::POST,
                    &format!("{}/{}/generateVerificationCode", base(&i), enc(&name)),
                    None,
                    &[],
                )
                .await?;
            emit(g, &r.body, |v| {
                format!(
                    "verification code: {}\nissue a certificate with this CN, signed by '{name}', \
                     and run: dps certificate verify {name} --path FILE\n",
                    cell(v, &["/verificationCode", "/properties/verificationCode"])
                )
            });
        }
        CertificateCommand::Verify {
            name,
            path,
            instance,
        } => {
            let i = resolve_instance(svc, instance).await?;
            let pem = read_pem(&path)?;
            let r = svc
                .call(
                    Method::POST,
                    &format!("{}/{}/verify", base(&i), enc(&name)),
                    Some(&json!({"certificate": pem})),
                    &[],
                )
                .await?;
            if r.body.is_null() {
                done(g, format!("certificate '{name}' verified"));
            } else {
                emit(g, &r.body, |v| {
                    format!("certificate '{name}' verified\n{}", render_object(v))
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_build_documents() {
        let f = EnrollmentFields {
            iot_hubs: Some(vec!["h1".into()]),
            allocation_policy: Some("geolatency".into()),
            initial_twin_tags: Some(r#"{"site":"a"}"#.into()),
            initial_twin_properties: Some(r#"{"fw":"1.0"}"#.into()),
            edge: Some(true),
            reprovision_policy: Some(ReprovisionArg::ReprovisionAndResetData),
            webhook_url: Some("https://w".into()),
            api_version: Some("2021-10-01".into()),
            ..Default::default()
        };
        let mut doc = Map::new();
        apply_fields(Kind::Enrollment, &mut doc, &f, None, true).unwrap();
        let v = Value::Object(doc);
        assert_eq!(v["attestation"]["type"], "symmetricKey");
        assert_eq!(v["allocationPolicy"], "geoLatency");
        assert_eq!(v["initialTwin"]["properties"]["desired"]["fw"], "1.0");
        assert_eq!(v["reprovisionPolicy"]["migrateDeviceData"], false);
        assert_eq!(v["provisioningStatus"], "enabled");
        assert_eq!(v["customAllocationDefinition"]["webhookUrl"], "https://w");

        // Update keeps existing keys unless new ones are given.
        let mut doc = serde_json::from_value::<Map<String, Value>>(json!({
            "registrationId": "d",
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "old1", "secondaryKey": "old2"}}
        }))
        .unwrap();
        let f = EnrollmentFields {
            disabled: true,
            ..Default::default()
        };
        apply_fields(Kind::Enrollment, &mut doc, &f, None, false).unwrap();
        assert_eq!(doc["attestation"]["symmetricKey"]["primaryKey"], "old1");
        assert_eq!(doc["provisioningStatus"], "disabled");

        let mut doc = Map::new();
        apply_fields(
            Kind::Group,
            &mut doc,
            &EnrollmentFields::default(),
            Some("myca"),
            true,
        )
        .unwrap();
        assert_eq!(
            doc["attestation"]["x509"]["caReferences"]["primary"],
            "myca"
        );
        let mut doc = Map::new();
        assert!(apply_fields(
            Kind::Enrollment,
            &mut doc,
            &EnrollmentFields {
                attestation: Some(AttestationArg::X509),
                ..Default::default()
            },
            None,
            true
        )
        .is_err());
        assert!(apply_fields(
            Kind::Enrollment,
            &mut Map::new(),
            &EnrollmentFields {
                primary_key: Some("short".into()),
                ..Default::default()
            },
            None,
            true
        )
        .is_err());
    }
}

//! The Azure DPS service API (protocol digest §7): individual enrollments, enrollment groups,
//! attestation mechanisms, queries with paging, bulk operations and registration records.
//! Authenticated with service SAS tokens; each route requires its right.

use crate::app::App;
use crate::device_api::check_api_version;
use crate::http::{err, json_response, param, query_params, read_body};
use crate::repo::{enrollment_index, group_index};
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use base64::Engine as _;
use dps_core::clock::azure_timestamp;
use dps_core::error::AuthFailure;
use dps_core::ids::{DeviceId, EnrollmentGroupId, RegistrationId};
use dps_core::instance::{Instance, Right};
use dps_core::model::*;
use dps_core::sas::SasToken;
use dps_core::store::{Collection, Expect, Filter, StoreError};
use dps_core::wire::WireError;
use dps_core::Error;
use std::sync::Arc;

/// Who is calling: the instance and the access policy name.
pub struct Caller {
    /// Instance.
    pub instance: Arc<Instance>,
    /// Policy name.
    pub policy: String,
}

/// Verify a service SAS token and the right it needs.
pub fn authorize(app: &App, headers: &HeaderMap, right: Right) -> Result<Caller, Error> {
    let raw = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthFailure::MissingCredential)?;
    let tok = SasToken::parse(raw).map_err(AuthFailure::from)?;
    let host = tok.sr.split('/').next().unwrap_or("");
    let instance = app
        .instances
        .by_host(host)
        .ok_or_else(|| AuthFailure::UnknownInstance(host.to_string()))?;
    let policy_name = tok.skn.clone().unwrap_or_default();
    let policy = instance
        .policy(&policy_name)
        .ok_or_else(|| AuthFailure::UnknownPolicy(policy_name.clone()))?;
    tok.check_expiry(time::OffsetDateTime::now_utc().unix_timestamp())
        .map_err(AuthFailure::from)?;
    tok.verify_signature([policy.primary_key.as_str(), policy.secondary_key.as_str()])
        .map_err(AuthFailure::from)?;
    if !policy.has(right) {
        return Err(AuthFailure::MissingRight {
            policy: policy.name.clone(),
            right: right.as_str(),
        }
        .into());
    }
    let policy = policy.name.clone();
    Ok(Caller { instance, policy })
}

fn if_match(headers: &HeaderMap) -> Expect {
    match headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
    {
        None | Some("") => Expect::Any,
        Some("*") => Expect::Present,
        Some(v) => Expect::Etag(strip_quotes(v).to_string()),
    }
}

/// Strip one layer of surrounding quotes (C# adds them).
pub fn strip_quotes(s: &str) -> &str {
    s.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s)
}

fn now() -> String {
    azure_timestamp(time::OffsetDateTime::now_utc())
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::invalid(format!("invalid {what}: {e}")))
}

/// Validate and normalize an enrollment's settings: keys generated when absent, certificates
/// decoded with their info, hubs linked, policy requirements met.
pub fn normalize_settings(
    s: &mut EnrollmentSettings,
    inst: &Instance,
    is_group: bool,
) -> Result<(), Error> {
    let att = &mut s.attestation;
    match att.kind {
        AttestationType::SymmetricKey => {
            let sk = att.symmetric_key.get_or_insert_with(Default::default);
            for (name, k) in [
                ("primaryKey", &mut sk.primary_key),
                ("secondaryKey", &mut sk.secondary_key),
            ] {
                match k {
                    Some(key) if !dps_core::sas::valid_key(key) => {
                        return Err(Error::invalid(format!(
                            "attestation.symmetricKey.{name} must be base64 of 16 to 64 bytes"
                        )))
                    }
                    Some(_) => {}
                    None => *k = Some(dps_core::sas::generate_key()),
                }
            }
            att.x509 = None;
            att.tpm = None;
        }
        AttestationType::X509 => {
            let x = att.x509.as_mut().ok_or_else(|| {
                Error::invalid("attestation.type is x509 but attestation.x509 is missing")
            })?;
            let count = [
                x.client_certificates.is_some(),
                x.signing_certificates.is_some(),
                x.ca_references.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if count != 1 {
                return Err(Error::invalid("attestation.x509 needs exactly one of clientCertificates, signingCertificates, caReferences"));
            }
            if is_group && x.client_certificates.is_some() {
                return Err(Error::invalid("enrollment groups use signingCertificates or caReferences, not clientCertificates"));
            }
            if !is_group && x.ca_references.is_some() {
                return Err(Error::invalid("individual enrollments use clientCertificates (or signingCertificates), not caReferences"));
            }
            for certs in [&mut x.client_certificates, &mut x.signing_certificates]
                .into_iter()
                .flatten()
            {
                if certs.primary.is_none() {
                    return Err(Error::invalid(
                        "attestation.x509: a primary certificate is required",
                    ));
                }
                for c in [&mut certs.primary, &mut certs.secondary]
                    .into_iter()
                    .flatten()
                {
                    if c.certificate.is_none() && c.info.is_none() {
                        return Err(Error::invalid(
                            "attestation.x509: a certificate entry needs 'certificate'",
                        ));
                    }
                    dps_core::x509::normalize(c)
                        .map_err(|e| Error::invalid(format!("attestation.x509: {e}")))?;
                }
            }
            if let Some(r) = &x.ca_references {
                if r.primary.as_deref().is_none_or(str::is_empty) {
                    return Err(Error::invalid(
                        "attestation.x509.caReferences.primary is required",
                    ));
                }
            }
            att.symmetric_key = None;
            att.tpm = None;
        }
        AttestationType::Tpm => {
            if is_group {
                return Err(Error::invalid(
                    "TPM attestation is not allowed for enrollment groups",
                ));
            }
            let t = att.tpm.as_ref().ok_or_else(|| {
                Error::invalid("attestation.type is tpm but attestation.tpm is missing")
            })?;
            if base64::engine::general_purpose::STANDARD
                .decode(&t.endorsement_key)
                .map(|k| k.is_empty())
                .unwrap_or(true)
            {
                return Err(Error::invalid(
                    "attestation.tpm.endorsementKey must be base64",
                ));
            }
            att.symmetric_key = None;
            att.x509 = None;
        }
        AttestationType::None => {
            return Err(Error::invalid(
                "attestation.type 'none' cannot be used by devices",
            ))
        }
    }
    if let Some(hubs) = &s.iot_hubs {
        for h in hubs {
            if inst.hub(h).is_none() {
                return Err(Error::invalid(format!(
                    "iotHubs: '{h}' is not a linked hub of this instance"
                )));
            }
        }
    }
    if let Some(h) = &s.iot_hub_host_name {
        if inst.hub(h).is_none() {
            return Err(Error::invalid(format!(
                "iotHubHostName: '{h}' is not a linked hub of this instance"
            )));
        }
    }
    match s.allocation_policy {
        Some(AllocationPolicy::Static) => {
            let n = s
                .iot_hubs
                .as_ref()
                .map(Vec::len)
                .unwrap_or(0)
                .max(usize::from(s.iot_hub_host_name.is_some()));
            if n != 1 {
                return Err(Error::invalid(
                    "the static allocation policy needs exactly one hub in iotHubs",
                ));
            }
        }
        Some(AllocationPolicy::Custom) => {
            let d = s.custom_allocation_definition.as_ref().ok_or_else(|| {
                Error::invalid("the custom allocation policy needs customAllocationDefinition")
            })?;
            if !(d.webhook_url.starts_with("https://") || d.webhook_url.starts_with("http://")) {
                return Err(Error::invalid(
                    "customAllocationDefinition.webhookUrl must be an http(s) URL",
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// The public view of an enrollment's attestation: secrets and certificate bodies removed.
fn public_settings(s: &mut EnrollmentSettings, with_keys: bool) {
    if with_keys {
        s.attestation.strip_certificate_bodies();
    } else {
        s.attestation = s.attestation.redacted();
    }
}

fn map_store(e: StoreError, kind: &'static str, id: &str, expect: &Expect) -> Error {
    match e {
        StoreError::Conflict { current } => match (expect, current) {
            (Expect::Absent, _) => Error::Conflict {
                kind,
                id: id.to_string(),
            },
            (Expect::Present, None) => Error::not_found(kind, id),
            _ => Error::PreconditionFailed {
                kind,
                id: id.to_string(),
            },
        },
        other => Error::Store(other),
    }
}

/// Create or replace an individual enrollment.
pub async fn put_enrollment(
    app: &App,
    caller: &Caller,
    id: &str,
    mut e: IndividualEnrollment,
    expect: Expect,
) -> Result<IndividualEnrollment, Error> {
    let inst = &caller.instance;
    let rid = RegistrationId::parse(id)?;
    if !e.registration_id.eq_ignore_ascii_case(rid.as_str()) {
        return Err(Error::invalid(format!(
            "registrationId '{}' in the body does not match '{}' in the path",
            e.registration_id, rid
        )));
    }
    if let Some(d) = &e.device_id {
        DeviceId::parse(d)?;
    }
    normalize_settings(&mut e.settings, inst, false)?;
    let existing = app.repo.enrollment(&inst.name, rid.as_str()).await?;
    let now = now();
    e.registration_state = None;
    e.settings.created_date_time_utc = Some(
        existing
            .as_ref()
            .and_then(|x| x.settings.created_date_time_utc.clone())
            .unwrap_or_else(|| now.clone()),
    );
    e.settings.last_updated_date_time_utc = Some(now);
    e.settings.provisioning_status = Some(e.settings.provisioning_status.unwrap_or_default());
    e.settings.reprovision_policy = Some(e.settings.reprovision());
    e.settings.capabilities = Some(e.settings.capabilities.clone().unwrap_or_default());
    let etag = dps_core::store::new_etag();
    e.settings.etag = None;
    app.repo
        .put(
            Collection::Enrollment,
            &inst.name,
            rid.as_str(),
            &etag,
            &e,
            enrollment_index(&e),
            expect.clone(),
        )
        .await
        .map_err(|s| map_store(s, "enrollment", rid.as_str(), &expect))?;
    e.settings.etag = Some(etag);
    if let Some(old) = &existing {
        if old.settings.enabled() != e.settings.enabled() {
            app.engine.enrollment_status_changed(
                &inst.name,
                Some(rid.as_str()),
                None,
                e.settings.enabled(),
            );
        }
    }
    let action = if existing.is_some() {
        "enrollment.update"
    } else {
        "enrollment.create"
    };
    app.engine
        .audit
        .record(
            &inst.name,
            &caller.policy,
            action,
            "enrollment",
            rid.as_str(),
            existing.as_ref(),
            Some(&e),
        )
        .await;
    Ok(e)
}

/// Create or replace a group.
pub async fn put_group(
    app: &App,
    caller: &Caller,
    id: &str,
    mut g: EnrollmentGroup,
    expect: Expect,
) -> Result<EnrollmentGroup, Error> {
    let inst = &caller.instance;
    let gid = EnrollmentGroupId::parse(id)?;
    if !g.enrollment_group_id.eq_ignore_ascii_case(gid.as_str()) {
        return Err(Error::invalid(format!(
            "enrollmentGroupId '{}' in the body does not match '{}' in the path",
            g.enrollment_group_id, gid
        )));
    }
    normalize_settings(&mut g.settings, inst, true)?;
    let existing = app.repo.group(&inst.name, gid.as_str()).await?;
    let now = now();
    g.settings.created_date_time_utc = Some(
        existing
            .as_ref()
            .and_then(|x| x.settings.created_date_time_utc.clone())
            .unwrap_or_else(|| now.clone()),
    );
    g.settings.last_updated_date_time_utc = Some(now);
    g.settings.provisioning_status = Some(g.settings.provisioning_status.unwrap_or_default());
    g.settings.reprovision_policy = Some(g.settings.reprovision());
    g.settings.capabilities = Some(g.settings.capabilities.clone().unwrap_or_default());
    let etag = dps_core::store::new_etag();
    g.settings.etag = None;
    app.repo
        .put(
            Collection::Group,
            &inst.name,
            gid.as_str(),
            &etag,
            &g,
            group_index(&g),
            expect.clone(),
        )
        .await
        .map_err(|s| map_store(s, "enrollment group", gid.as_str(), &expect))?;
    app.catalog.groups_changed(&inst.name);
    g.settings.etag = Some(etag);
    if let Some(old) = &existing {
        if old.settings.enabled() != g.settings.enabled() {
            app.engine.enrollment_status_changed(
                &inst.name,
                None,
                Some(gid.as_str()),
                g.settings.enabled(),
            );
        }
    }
    let action = if existing.is_some() {
        "group.update"
    } else {
        "group.create"
    };
    app.engine
        .audit
        .record(
            &inst.name,
            &caller.policy,
            action,
            "group",
            gid.as_str(),
            existing.as_ref(),
            Some(&g),
        )
        .await;
    Ok(g)
}

async fn delete_doc(
    app: &App,
    caller: &Caller,
    c: Collection,
    kind: &'static str,
    id: &str,
    expect: Expect,
) -> Result<(), Error> {
    let expect = if expect == Expect::Any {
        Expect::Present
    } else {
        expect
    };
    let old = app
        .repo
        .store
        .delete(c, &caller.instance.name, id, expect.clone())
        .await
        .map_err(|s| map_store(s, kind, id, &expect))?;
    let Some(old) = old else {
        return Err(Error::not_found(kind, id));
    };
    if c == Collection::Group {
        app.catalog.groups_changed(&caller.instance.name);
    }
    if c == Collection::Registration {
        if let Ok(rec) = serde_json::from_str::<RegistrationRecord>(&old.body) {
            app.engine
                .registration_deleted(&caller.instance.name, &rec)
                .await;
        }
    }
    let before: serde_json::Value = serde_json::from_str(&old.body).unwrap_or_default();
    let action = match c {
        Collection::Enrollment => "enrollment.delete",
        Collection::Group => "group.delete",
        _ => "registration.delete",
    };
    app.engine
        .audit
        .record(
            &caller.instance.name,
            &caller.policy,
            action,
            kind,
            id,
            Some(&before),
            None::<&()>,
        )
        .await;
    Ok(())
}

/// Parse the query: `SELECT * FROM x [WHERE a = 'b' [AND ...]]`, plus our query-parameter
/// extension (`status`, `attestation`, `prefix`).
pub fn parse_query(text: &str, params: &[(String, String)]) -> Result<Filter, Error> {
    let mut f = Filter::default();
    let t = text.trim();
    // The Node and Python service SDKs send `{"query": "*"}`.
    if !t.is_empty() && t != "*" {
        let lower = t.to_ascii_lowercase();
        if !lower.starts_with("select") {
            return Err(Error::invalid(format!("unsupported query '{t}': only SELECT * FROM ... [WHERE field = 'value' AND ...] is supported")));
        }
        if let Some(pos) = lower.find(" where ") {
            for cond in t[pos + 7..].split(" AND ").flat_map(|c| c.split(" and ")) {
                let (k, v) = cond
                    .split_once('=')
                    .ok_or_else(|| Error::invalid(format!("unsupported condition '{cond}'")))?;
                let k = k.trim().to_ascii_lowercase();
                let v = v.trim().trim_matches('\'').trim_matches('"').to_string();
                match k.as_str() {
                    "provisioningstatus" => f.status = Some(v.to_ascii_lowercase()),
                    "attestation.type" | "attestationtype" => f.kind = Some(normalize_kind(&v)),
                    "registrationid" | "enrollmentgroupid" => {
                        f.id_prefix = Some(v.to_ascii_lowercase())
                    }
                    "status" => f.status = Some(v.to_ascii_lowercase()),
                    _ => return Err(Error::invalid(format!("unsupported query field '{k}'"))),
                }
            }
        }
    }
    if let Some(s) = param(params, "status") {
        f.status = Some(s.to_ascii_lowercase());
    }
    if let Some(a) = param(params, "attestation") {
        f.kind = Some(normalize_kind(a));
    }
    if let Some(p) = param(params, "prefix") {
        f.id_prefix = Some(p.to_ascii_lowercase());
    }
    Ok(f)
}

fn normalize_kind(v: &str) -> String {
    match v.to_ascii_lowercase().as_str() {
        "symmetrickey" => "symmetricKey".into(),
        "x509" => "x509".into(),
        "tpm" => "tpm".into(),
        other => other.to_string(),
    }
}

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

fn page_size(headers: &HeaderMap) -> usize {
    headers
        .get("x-ms-max-item-count")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .map(|n| n.min(MAX_PAGE))
        .unwrap_or(DEFAULT_PAGE)
}

fn continuation(headers: &HeaderMap) -> Result<Option<String>, Error> {
    match headers
        .get("x-ms-continuation")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        None => Ok(None),
        Some(t) => {
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(t)
                .map_err(|_| Error::invalid("invalid x-ms-continuation token"))?;
            Ok(Some(String::from_utf8(raw).map_err(|_| {
                Error::invalid("invalid x-ms-continuation token")
            })?))
        }
    }
}

fn paged(
    items: Vec<serde_json::Value>,
    next: Option<String>,
    item_type: &str,
    size: usize,
) -> Response<Body> {
    let mut r = json_response(StatusCode::OK, &items);
    let h = r.headers_mut();
    h.insert(
        "x-ms-item-type",
        HeaderValue::from_str(item_type).expect("ascii"),
    );
    h.insert(
        "x-ms-max-item-count",
        HeaderValue::from_str(&size.to_string()).expect("digits"),
    );
    if let Some(n) = next {
        let tok = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(n.as_bytes());
        h.insert(
            "x-ms-continuation",
            HeaderValue::from_str(&tok).expect("base64"),
        );
    }
    r
}

fn item_error(id_field: &str, id: &str, e: &Error) -> BulkEnrollmentOperationError {
    let w = WireError::from(e);
    BulkEnrollmentOperationError {
        registration_id: (id_field == "registrationId").then(|| id.to_string()),
        enrollment_group_id: (id_field == "enrollmentGroupId").then(|| id.to_string()),
        error_code: w.error_code,
        error_status: w.message,
    }
}

async fn bulk(
    app: &App,
    caller: &Caller,
    body: &[u8],
    groups: bool,
) -> Result<BulkEnrollmentOperationResult, Error> {
    let (mode, items): (BulkMode, Vec<serde_json::Value>) = if groups {
        let op: BulkEnrollmentGroupOperation = parse_json(body, "bulk operation")?;
        (op.mode, op.enrollment_groups)
    } else {
        let op: BulkEnrollmentOperation = parse_json(body, "bulk operation")?;
        (op.mode, op.enrollments)
    };
    if items.len() > 10 {
        return Err(Error::invalid(format!(
            "a bulk operation takes at most 10 items, got {}",
            items.len()
        )));
    }
    let id_field = if groups {
        "enrollmentGroupId"
    } else {
        "registrationId"
    };
    let mut errors = Vec::new();
    for item in items {
        let id = item
            .get(id_field)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let etag = item
            .get("etag")
            .and_then(|v| v.as_str())
            .map(|s| strip_quotes(s).to_string());
        let r: Result<(), Error> = async {
            match mode {
                BulkMode::Delete => {
                    let expect = etag.map(Expect::Etag).unwrap_or(Expect::Any);
                    let c = if groups {
                        Collection::Group
                    } else {
                        Collection::Enrollment
                    };
                    delete_doc(
                        app,
                        caller,
                        c,
                        if groups {
                            "enrollment group"
                        } else {
                            "enrollment"
                        },
                        &id,
                        expect,
                    )
                    .await
                }
                _ => {
                    let expect = match mode {
                        BulkMode::Create => Expect::Absent,
                        BulkMode::UpdateIfMatchETag => {
                            Expect::Etag(etag.clone().unwrap_or_default())
                        }
                        _ => Expect::Any,
                    };
                    if groups {
                        let g: EnrollmentGroup = serde_json::from_value(item.clone())
                            .map_err(|e| Error::invalid(e.to_string()))?;
                        put_group(app, caller, &id, g, expect).await.map(|_| ())
                    } else {
                        let e: IndividualEnrollment = serde_json::from_value(item.clone())
                            .map_err(|e| Error::invalid(e.to_string()))?;
                        put_enrollment(app, caller, &id, e, expect)
                            .await
                            .map(|_| ())
                    }
                }
            }
        }
        .await;
        if let Err(e) = r {
            errors.push(item_error(id_field, &id, &e));
        }
    }
    Ok(BulkEnrollmentOperationResult {
        is_successful: errors.is_empty(),
        errors,
    })
}

/// Handle `/enrollments`, `/enrollmentGroups`, `/registrations`.
pub async fn handle(
    app: &Arc<App>,
    req: Request<Body>,
    segs: &[String],
    l: &[&str],
) -> Response<Body> {
    let params = query_params(req.uri());
    if let Err(r) = check_api_version(&params) {
        return r;
    }
    let method = req.method().clone();
    let headers = req.headers().clone();
    let body = match read_body(req.into_body(), app.max_body * 11).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match inner(app, &method, &headers, &params, &body, segs, l).await {
        Ok(r) => r,
        Err(e) => {
            if matches!(e, Error::Store(_) | Error::Internal(_)) {
                tracing::error!(error = %e, "service API failed");
            }
            err(&e)
        }
    }
}

async fn inner(
    app: &App,
    method: &Method,
    headers: &HeaderMap,
    params: &[(String, String)],
    body: &[u8],
    segs: &[String],
    l: &[&str],
) -> Result<Response<Body>, Error> {
    use Collection as C;
    match (l[0], l.len(), method.clone()) {
        // ---- individual enrollments
        ("enrollments", 1, Method::POST) => {
            let caller = authorize(app, headers, Right::EnrollmentWrite)?;
            Ok(json_response(
                StatusCode::OK,
                &bulk(app, &caller, body, false).await?,
            ))
        }
        ("enrollments", 2, Method::POST) if l[1] == "query" => {
            let caller = authorize(app, headers, Right::EnrollmentRead)?;
            query_docs(
                app,
                &caller,
                headers,
                params,
                body,
                C::Enrollment,
                "enrollment",
            )
            .await
        }
        ("enrollments", 2, Method::GET) => {
            let caller = authorize(app, headers, Right::EnrollmentRead)?;
            let mut e = app
                .repo
                .enrollment(&caller.instance.name, &segs[1])
                .await?
                .ok_or_else(|| Error::not_found("enrollment", &segs[1]))?;
            public_settings(&mut e.settings, false);
            Ok(json_response(StatusCode::OK, &e))
        }
        ("enrollments", 2, Method::PUT) => {
            let caller = authorize(app, headers, Right::EnrollmentWrite)?;
            let e: IndividualEnrollment = parse_json(body, "IndividualEnrollment")?;
            let mut e = put_enrollment(app, &caller, &segs[1], e, if_match(headers)).await?;
            public_settings(&mut e.settings, true);
            Ok(json_response(StatusCode::OK, &e))
        }
        ("enrollments", 2, Method::DELETE) => {
            let caller = authorize(app, headers, Right::EnrollmentWrite)?;
            delete_doc(
                app,
                &caller,
                C::Enrollment,
                "enrollment",
                &segs[1],
                if_match(headers),
            )
            .await?;
            Ok(no_content())
        }
        ("enrollments", 3, Method::POST) if l[2] == "attestationmechanism" => {
            let caller = authorize(app, headers, Right::EnrollmentRead)?;
            let e = app
                .repo
                .enrollment(&caller.instance.name, &segs[1])
                .await?
                .ok_or_else(|| Error::not_found("enrollment", &segs[1]))?;
            let mut m = e.settings.attestation;
            m.strip_certificate_bodies();
            Ok(json_response(StatusCode::OK, &m))
        }
        // ---- groups
        ("enrollmentgroups", 1, Method::POST) => {
            let caller = authorize(app, headers, Right::EnrollmentWrite)?;
            Ok(json_response(
                StatusCode::OK,
                &bulk(app, &caller, body, true).await?,
            ))
        }
        ("enrollmentgroups", 2, Method::POST) if l[1] == "query" => {
            let caller = authorize(app, headers, Right::EnrollmentRead)?;
            query_docs(
                app,
                &caller,
                headers,
                params,
                body,
                C::Group,
                "enrollmentGroup",
            )
            .await
        }
        ("enrollmentgroups", 2, Method::GET) => {
            let caller = authorize(app, headers, Right::EnrollmentRead)?;
            let mut g = app
                .repo
                .group(&caller.instance.name, &segs[1])
                .await?
                .ok_or_else(|| Error::not_found("enrollment group", &segs[1]))?;
            public_settings(&mut g.settings, false);
            Ok(json_response(StatusCode::OK, &g))
        }
        ("enrollmentgroups", 2, Method::PUT) => {
            let caller = authorize(app, headers, Right::EnrollmentWrite)?;
            let g: EnrollmentGroup = parse_json(body, "EnrollmentGroup")?;
            let mut g = put_group(app, &caller, &segs[1], g, if_match(headers)).await?;
            public_settings(&mut g.settings, true);
            Ok(json_response(StatusCode::OK, &g))
        }
        ("enrollmentgroups", 2, Method::DELETE) => {
            let caller = authorize(app, headers, Right::EnrollmentWrite)?;
            delete_doc(
                app,
                &caller,
                C::Group,
                "enrollment group",
                &segs[1],
                if_match(headers),
            )
            .await?;
            Ok(no_content())
        }
        ("enrollmentgroups", 3, Method::POST) if l[2] == "attestationmechanism" => {
            let caller = authorize(app, headers, Right::EnrollmentRead)?;
            let g = app
                .repo
                .group(&caller.instance.name, &segs[1])
                .await?
                .ok_or_else(|| Error::not_found("enrollment group", &segs[1]))?;
            let mut m = g.settings.attestation;
            m.strip_certificate_bodies();
            Ok(json_response(StatusCode::OK, &m))
        }
        // ---- registration records
        ("registrations", 2, Method::GET) => {
            let caller = authorize(app, headers, Right::RegistrationStatusRead)?;
            let (r, _) = app
                .repo
                .registration(&caller.instance.name, &segs[1])
                .await?
                .ok_or_else(|| Error::not_found("registration", &segs[1]))?;
            Ok(json_response(StatusCode::OK, &r.state))
        }
        ("registrations", 2, Method::DELETE) => {
            let caller = authorize(app, headers, Right::RegistrationStatusWrite)?;
            delete_doc(
                app,
                &caller,
                C::Registration,
                "registration",
                &segs[1],
                if_match(headers),
            )
            .await?;
            Ok(no_content())
        }
        ("registrations", 3, Method::POST) if l[2] == "query" => {
            let caller = authorize(app, headers, Right::RegistrationStatusRead)?;
            let mut filter = Filter {
                group: Some(segs[1].to_ascii_lowercase()),
                ..Default::default()
            };
            if let Some(s) = param(params, "status") {
                filter.status = Some(s.to_ascii_lowercase());
            }
            let size = page_size(headers);
            let cont = continuation(headers)?;
            let (items, next) = app
                .repo
                .query::<RegistrationRecord>(
                    C::Registration,
                    &caller.instance.name,
                    &filter,
                    cont.as_deref(),
                    size,
                )
                .await?;
            let items = items
                .into_iter()
                .map(|(r, _)| serde_json::to_value(r.state).expect("json"))
                .collect();
            Ok(paged(items, next, "deviceRegistration", size))
        }
        _ => Err(Error::Unsupported(format!(
            "no service API route for {method} /{}",
            segs.join("/")
        ))),
    }
}

fn no_content() -> Response<Body> {
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Body::empty())
        .expect("valid")
}

async fn query_docs(
    app: &App,
    caller: &Caller,
    headers: &HeaderMap,
    params: &[(String, String)],
    body: &[u8],
    c: Collection,
    item_type: &str,
) -> Result<Response<Body>, Error> {
    let text = if body.iter().all(u8::is_ascii_whitespace) {
        String::new()
    } else {
        let v: serde_json::Value = parse_json(body, "query specification")?;
        v.get("query")
            .and_then(|q| q.as_str())
            .unwrap_or("")
            .to_string()
    };
    let filter = parse_query(&text, params)?;
    let size = page_size(headers);
    let cont = continuation(headers)?;
    let mut items = Vec::new();
    let next = if c == Collection::Enrollment {
        let (list, next) = app
            .repo
            .query::<IndividualEnrollment>(c, &caller.instance.name, &filter, cont.as_deref(), size)
            .await?;
        for (mut e, etag) in list {
            e.settings.etag = Some(etag);
            public_settings(&mut e.settings, false);
            items.push(serde_json::to_value(e).expect("json"));
        }
        next
    } else {
        let (list, next) = app
            .repo
            .query::<EnrollmentGroup>(c, &caller.instance.name, &filter, cont.as_deref(), size)
            .await?;
        for (mut g, etag) in list {
            g.settings.etag = Some(etag);
            public_settings(&mut g.settings, false);
            items.push(serde_json::to_value(g).expect("json"));
        }
        next
    };
    Ok(paged(items, next, item_type, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let f = parse_query("SELECT * FROM enrollments", &[]).unwrap();
        assert_eq!(f, Filter::default());
        let f = parse_query("SELECT * FROM enrollments WHERE provisioningStatus = 'disabled' AND attestation.type = 'x509'", &[]).unwrap();
        assert_eq!(f.status.as_deref(), Some("disabled"));
        assert_eq!(f.kind.as_deref(), Some("x509"));
        assert!(parse_query("DROP TABLE x", &[]).is_err());
        assert!(parse_query("SELECT * FROM enrollments WHERE foo = 'x'", &[]).is_err());
        let f = parse_query(
            "",
            &[
                ("attestation".into(), "SymmetricKey".into()),
                ("prefix".into(), "Dev".into()),
            ],
        )
        .unwrap();
        assert_eq!(f.kind.as_deref(), Some("symmetricKey"));
        assert_eq!(f.id_prefix.as_deref(), Some("dev"));
    }

    #[test]
    fn quotes_are_stripped_once() {
        assert_eq!(strip_quotes("\"abc\""), "abc");
        assert_eq!(strip_quotes("abc"), "abc");
    }
}

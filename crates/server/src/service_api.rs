//! The Azure DPS service API (protocol digest §7): individual enrollments, enrollment groups,
//! attestation mechanisms, queries with paging, bulk operations and registration records.
//! Authenticated with service SAS tokens; each route requires its right, checked centrally by
//! the dispatcher from the route table ([`crate::routes`]).
//!
//! The handlers parse the request, call one use case ([`crate::usecases`]) and
//! write the answer. Enrollments and groups share one set of routes, generic over
//! [`Enrollment`].

use crate::app::App;
use crate::http::{json_response, no_content, param, Incoming, Path};
use crate::routes::{Kind, Op};
use crate::usecases::enrollments::Enrollment;
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use base64::Engine as _;
use dps_core::model::{
    BulkEnrollmentGroupOperation, BulkEnrollmentOperation, BulkEnrollmentOperationError,
    BulkEnrollmentOperationResult, BulkMode, EnrollmentGroup, IndividualEnrollment,
};
use dps_core::store::{Expect, Filter};
use dps_core::wire::WireError;
use dps_core::Error;

pub use crate::usecases::enrollments::strip_quotes;
pub use crate::usecases::Caller;

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

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::invalid(format!("invalid {what}: {e}")))
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

fn paged<T: serde::Serialize>(
    items: &[T],
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

/// The answer to a bulk operation: each failed item with its id and wire error.
fn bulk_result<T: Enrollment>(failed: Vec<(String, Error)>) -> BulkEnrollmentOperationResult {
    let errors: Vec<_> = failed
        .into_iter()
        .map(|(id, e)| {
            let w = WireError::from(&e);
            BulkEnrollmentOperationError {
                registration_id: (!T::IS_GROUP).then(|| id.clone()),
                enrollment_group_id: T::IS_GROUP.then_some(id),
                error_code: w.error_code,
                error_status: w.message,
            }
        })
        .collect();
    BulkEnrollmentOperationResult {
        is_successful: errors.is_empty(),
        errors,
    }
}

/// A bulk operation's mode and items, as the kind's request shape has them.
fn parse_bulk<T: Enrollment>(body: &[u8]) -> Result<(BulkMode, Vec<serde_json::Value>), Error> {
    Ok(if T::IS_GROUP {
        let op: BulkEnrollmentGroupOperation = parse_json(body, "bulk operation")?;
        (op.mode, op.enrollment_groups)
    } else {
        let op: BulkEnrollmentOperation = parse_json(body, "bulk operation")?;
        (op.mode, op.enrollments)
    })
}

/// The text of a query specification (`{"query": "..."}`; an empty body is no query).
fn query_text(body: &[u8]) -> Result<String, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(String::new());
    }
    let v: serde_json::Value = parse_json(body, "query specification")?;
    Ok(v.get("query")
        .and_then(|q| q.as_str())
        .unwrap_or("")
        .to_string())
}

/// Handle `/enrollments`, `/enrollmentGroups`, `/registrations` (behind
/// [`crate::http::respond`]) for a caller the dispatcher authorized for this route's right
/// ([`crate::routes`]).
pub async fn handle(
    app: &App,
    req: &Incoming,
    path: Path<'_>,
    op: Op,
    caller: &Caller,
) -> Result<Response<Body>, Error> {
    match op {
        Op::EnrollmentBulk(k)
        | Op::EnrollmentQuery(k)
        | Op::EnrollmentGet(k)
        | Op::EnrollmentPut(k)
        | Op::EnrollmentDelete(k)
        | Op::EnrollmentAttestation(k) => match k {
            Kind::Individual => {
                enrollment_route::<IndividualEnrollment>(app, req, path, op, caller).await
            }
            Kind::Group => enrollment_route::<EnrollmentGroup>(app, req, path, op, caller).await,
        },
        _ => registration_route(app, req, path, op, caller).await,
    }
}

/// `/enrollments/...` and `/enrollmentGroups/...`: the same routes for both kinds.
async fn enrollment_route<T: Enrollment>(
    app: &App,
    req: &Incoming,
    path: Path<'_>,
    op: Op,
    caller: &Caller,
) -> Result<Response<Body>, Error> {
    let segs = path.segs;
    let (headers, body) = (&req.headers, &req.body[..]);
    let uc = &app.enrollments;
    match op {
        Op::EnrollmentBulk(_) => {
            let (mode, items) = parse_bulk::<T>(body)?;
            let failed = uc.bulk::<T>(caller, mode, items).await?;
            Ok(json_response(StatusCode::OK, &bulk_result::<T>(failed)))
        }
        Op::EnrollmentQuery(_) => {
            let filter = parse_query(&query_text(body)?, &req.params)?;
            let size = page_size(headers);
            let cont = continuation(headers)?;
            let (items, next) = uc
                .query::<T>(&caller.instance.name, &filter, cont.as_deref(), size)
                .await?;
            let item_type = if T::IS_GROUP {
                "enrollmentGroup"
            } else {
                "enrollment"
            };
            Ok(paged(&items, next, item_type, size))
        }
        Op::EnrollmentGet(_) => {
            let e = uc.get::<T>(&caller.instance.name, &segs[1]).await?;
            Ok(json_response(StatusCode::OK, &e))
        }
        Op::EnrollmentPut(_) => {
            let e: T = parse_json(body, T::NAME)?;
            let e = uc.put(caller, &segs[1], e, if_match(headers)).await?;
            Ok(json_response(StatusCode::OK, &e))
        }
        Op::EnrollmentDelete(_) => {
            uc.delete::<T>(caller, &segs[1], if_match(headers)).await?;
            Ok(no_content())
        }
        Op::EnrollmentAttestation(_) => {
            let m = uc
                .attestation_mechanism::<T>(&caller.instance.name, &segs[1])
                .await?;
            Ok(json_response(StatusCode::OK, &m))
        }
        other => Err(misrouted(other)),
    }
}

/// `/registrations/...`.
async fn registration_route(
    app: &App,
    req: &Incoming,
    path: Path<'_>,
    op: Op,
    caller: &Caller,
) -> Result<Response<Body>, Error> {
    let segs = path.segs;
    let headers = &req.headers;
    let uc = &app.registrations;
    match op {
        Op::RegistrationGet => {
            let state = uc.get(&caller.instance.name, &segs[1]).await?;
            Ok(json_response(StatusCode::OK, &state))
        }
        Op::RegistrationDelete => {
            uc.delete(caller, &segs[1], if_match(headers)).await?;
            Ok(no_content())
        }
        Op::RegistrationQuery => {
            let status = param(&req.params, "status");
            let size = page_size(headers);
            let cont = continuation(headers)?;
            let (items, next) = uc
                .query_group(
                    &caller.instance.name,
                    &segs[1],
                    status,
                    cont.as_deref(),
                    size,
                )
                .await?;
            Ok(paged(&items, next, "deviceRegistration", size))
        }
        other => Err(misrouted(other)),
    }
}

/// A route operation handed to the wrong handler: a bug in the route table.
pub(crate) fn misrouted(op: Op) -> Error {
    Error::Internal(format!("route operation {op:?} reached the wrong handler"))
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

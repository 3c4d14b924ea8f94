//! Our admin API (Azure's control plane equivalent): instances, linked hubs, access policies,
//! the built-in registry's devices, stats and the audit log. SAS auth with `ServiceConfig`; a
//! token acts on its own instance, and a token of the admin instance may act on all of them.
//!
//! The dispatcher checks the right (ServiceConfig, from the route table in [`crate::routes`]);
//! the handlers check the target instance, parse the request, call one
//! use case ([`crate::usecases::admin`], [`crate::usecases::certificates`]) and write the
//! answer.

use crate::app::App;
use crate::http::{json_response, no_content, param, Incoming, Path};
use crate::routes::Op;
use crate::service_api::{misrouted, Caller};
use axum::body::Body;
use axum::http::{Response, StatusCode};
use dps_core::error::AuthFailure;
use dps_core::instance::{AccessPolicy, Instance};
use dps_core::store::AuditQuery;
use dps_core::Error;
use std::sync::Arc;

/// `200 OK` with `v` as JSON.
pub(crate) fn ok<T: serde::Serialize>(v: &T) -> Result<Response<Body>, Error> {
    Ok(json_response(StatusCode::OK, v))
}

/// May the caller act on the instance `target`: its own, or any from the admin instance.
pub(crate) fn may_manage(app: &App, caller: &Caller, target: &str) -> Result<(), Error> {
    if caller.instance.name.eq_ignore_ascii_case(target)
        || caller
            .instance
            .name
            .eq_ignore_ascii_case(&app.admin_instance)
    {
        Ok(())
    } else {
        Err(AuthFailure::MissingRight {
            policy: caller.policy.clone(),
            right: "ServiceConfig (on another instance)",
        }
        .into())
    }
}

/// The instance `name`, once the caller may act on it.
pub(crate) fn target(app: &App, caller: &Caller, name: &str) -> Result<Arc<Instance>, Error> {
    may_manage(app, caller, name)?;
    app.instances
        .by_name(name)
        .ok_or_else(|| Error::not_found("instance", name))
}

/// A JSON request body.
fn json_body(body: &[u8], what: &str) -> Result<serde_json::Value, Error> {
    serde_json::from_slice(body).map_err(|e| Error::invalid(format!("invalid {what}: {e}")))
}

/// Handle `/admin/...` (behind [`crate::http::respond`]) for a caller the dispatcher
/// authorized with ServiceConfig.
pub async fn handle(
    app: &App,
    req: &Incoming,
    path: Path<'_>,
    op: Op,
    caller: &Caller,
) -> Result<Response<Body>, Error> {
    let segs = path.segs;
    let (params, body) = (&req.params, &req.body[..]);
    let uc = &app.admin;
    match op {
        Op::InstanceList => ok(&uc.list_instances(|i| may_manage(app, caller, &i.name).is_ok())),
        Op::InstanceGet => ok(&target(app, caller, &segs[2])?.redacted()),
        Op::InstancePut => {
            if app.instances.by_name(&segs[2]).is_none()
                && !caller
                    .instance
                    .name
                    .eq_ignore_ascii_case(&app.admin_instance)
            {
                return Err(AuthFailure::MissingRight {
                    policy: caller.policy.clone(),
                    right: "ServiceConfig on the admin instance",
                }
                .into());
            }
            may_manage(app, caller, &segs[2]).or_else(|e| {
                if app.instances.by_name(&segs[2]).is_none() {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
            let v = json_body(body, "instance")?;
            ok(&uc.put_instance(caller, &segs[2], v).await?)
        }
        Op::InstanceDelete => {
            let inst = target(app, caller, &segs[2])?;
            uc.delete_instance(caller, &inst).await?;
            Ok(no_content())
        }
        Op::InstanceStats => {
            let inst = target(app, caller, &segs[2])?;
            ok(&uc.stats(&inst).await?)
        }
        Op::LinkedHubList => {
            let inst = target(app, caller, &segs[2])?;
            ok(&uc.linked_hubs(&inst))
        }
        Op::LinkedHubPut => {
            let inst = target(app, caller, &segs[2])?;
            let v = json_body(body, "linked hub")?;
            ok(&uc.put_linked_hub(caller, &inst, &segs[4], v).await?)
        }
        Op::LinkedHubDelete => {
            let inst = target(app, caller, &segs[2])?;
            uc.remove_linked_hub(caller, &inst, &segs[4]).await?;
            Ok(no_content())
        }
        Op::AccessPolicyList => {
            let inst = target(app, caller, &segs[2])?;
            ok(&inst
                .access_policy
                .iter()
                .map(AccessPolicy::redacted)
                .collect::<Vec<_>>())
        }
        Op::AccessPolicyPut => {
            let inst = target(app, caller, &segs[2])?;
            let v = json_body(body, "access policy")?;
            ok(&uc.put_access_policy(caller, &inst, &segs[4], v).await?)
        }
        Op::AccessPolicyDelete => {
            let inst = target(app, caller, &segs[2])?;
            uc.remove_access_policy(caller, &inst, &segs[4]).await?;
            Ok(no_content())
        }
        Op::HubDeviceList => {
            let inst = target(app, caller, &segs[2])?;
            let limit = param(params, "limit")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100usize)
                .clamp(1, 1000);
            let (items, next) = uc
                .hub_devices(&inst, &segs[4], param(params, "continuation"), limit)
                .await?;
            ok(&serde_json::json!({"items": items, "continuation": next}))
        }
        Op::HubDeviceGet => {
            let inst = target(app, caller, &segs[2])?;
            ok(&uc.hub_device(&inst, &segs[4], &segs[6]).await?)
        }
        Op::HubCleanupList => {
            let inst = target(app, caller, &segs[2])?;
            let limit = param(params, "limit")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100usize)
                .clamp(1, 1000);
            let ts = |ms: i64| {
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                    .ok()
                    .map(dps_core::clock::azure_timestamp)
            };
            let items: Vec<serde_json::Value> = app
                .engine
                .cleanup_queue(Some(&inst.name), limit)
                .await?
                .into_iter()
                .map(|t| {
                    serde_json::json!({
                        "hub": t.key.hub, "deviceId": t.key.device_id,
                        "registrationId": t.registration_id, "action": t.action.as_str(),
                        "failedAttempts": t.attempts, "nextAttemptUtc": ts(t.next_attempt_ms),
                        "lastError": t.last_error, "createdUtc": ts(t.created_ms),
                        "claimedUntilUtc": t.claimed_until_ms.and_then(ts),
                    })
                })
                .collect();
            ok(&serde_json::json!({ "items": items }))
        }
        Op::FaultList => {
            let inst = target(app, caller, &segs[2])?;
            ok(&serde_json::json!({
                "allowed": app.engine.faults().allowed(&inst.name),
                "items": app.engine.faults().list(Some(&inst.name)),
            }))
        }
        Op::FaultAdd => {
            let inst = target(app, caller, &segs[2])?;
            let rule: dps_core::fault::FaultRule = serde_json::from_slice(body)
                .map_err(|e| Error::invalid(format!("invalid fault rule: {e}")))?;
            let rule = app.engine.add_fault(&inst, &caller.policy, rule).await?;
            Ok(json_response(StatusCode::CREATED, &rule))
        }
        Op::FaultDelete => {
            let inst = target(app, caller, &segs[2])?;
            app.engine
                .remove_fault(&inst, &caller.policy, &segs[4])
                .await?;
            Ok(no_content())
        }
        Op::AuditLog => {
            let instance = match param(params, "instance") {
                Some(i) => {
                    may_manage(app, caller, i)?;
                    Some(i.to_string())
                }
                None if caller
                    .instance
                    .name
                    .eq_ignore_ascii_case(&app.admin_instance) =>
                {
                    None
                }
                None => Some(caller.instance.name.clone()),
            };
            let since = match param(params, "since") {
                None => None,
                Some(v) => Some(dps_core::clock::normalize_timestamp(v).ok_or_else(|| {
                    Error::invalid(format!(
                        "'since' must be an RFC 3339 time (2026-12-03T10:42:13Z) or a date (2026-12-03), not '{v}'"
                    ))
                })?),
            };
            let q = AuditQuery {
                instance,
                since,
                target_id: param(params, "target").map(str::to_string),
                action_prefix: param(params, "action").map(str::to_string),
                after_seq: param(params, "after").and_then(|v| v.parse().ok()),
                limit: param(params, "limit")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(100usize)
                    .clamp(1, 10_000),
            };
            let list: Vec<serde_json::Value> = uc
                .audit_log(&q)
                .await?
                .into_iter()
                .map(|e| {
                    serde_json::json!({
                        "seq": e.seq, "timestamp": e.timestamp, "instance": e.instance, "actor": e.actor,
                        "action": e.action, "targetKind": e.target_kind, "targetId": e.target_id,
                        "before": e.before.as_deref().map(crate::audit::redacted_json),
                        "after": e.after.as_deref().map(crate::audit::redacted_json),
                    })
                })
                .collect();
            ok(&list)
        }
        Op::EventsTail => {
            // Lifecycle events as CloudEvents, read from the audit log (the same ids the sinks
            // get): long-polls up to `wait` seconds for events after the cursor.
            let instance = match param(params, "instance") {
                Some(i) => {
                    may_manage(app, caller, i)?;
                    Some(i.to_string())
                }
                None if caller
                    .instance
                    .name
                    .eq_ignore_ascii_case(&app.admin_instance) =>
                {
                    None
                }
                None => Some(caller.instance.name.clone()),
            };
            let after = match param(params, "after") {
                None => None,
                Some(v) => Some(v.parse::<i64>().map_err(|_| {
                    Error::invalid(format!("'after' must be a sequence number, not '{v}'"))
                })?),
            };
            let since = match param(params, "since") {
                None => None,
                Some(v) => Some(dps_core::clock::normalize_timestamp(v).ok_or_else(|| {
                    Error::invalid(format!(
                        "'since' must be an RFC 3339 time (2026-12-03T10:42:13Z) or a date (2026-12-03), not '{v}'"
                    ))
                })?),
            };
            let wait = match param(params, "wait") {
                None => 0,
                Some(v) => v.parse::<u64>().ok().filter(|w| *w <= 60).ok_or_else(|| {
                    Error::invalid(format!("'wait' must be 0 to 60 seconds, not '{v}'"))
                })?,
            };
            let type_prefix = param(params, "type").map(str::to_string);
            let limit = param(params, "limit")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100usize)
                .clamp(1, 1000);
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait);
            let mut cursor = after;
            loop {
                let q = AuditQuery {
                    instance: instance.clone(),
                    since: if cursor.is_none() {
                        since.clone()
                    } else {
                        None
                    },
                    target_id: None,
                    action_prefix: None,
                    after_seq: cursor,
                    limit,
                };
                let entries = uc.audit_log(&q).await?;
                if let Some(last) = entries.last() {
                    cursor = Some(last.seq);
                }
                let events: Vec<serde_json::Value> = entries
                    .iter()
                    .filter_map(crate::events::event_of)
                    .filter(|e| {
                        type_prefix
                            .as_deref()
                            .is_none_or(|t| e["type"].as_str().is_some_and(|ty| ty.starts_with(t)))
                    })
                    .collect();
                if !events.is_empty()
                    || entries.len() == limit
                    || tokio::time::Instant::now() >= deadline
                {
                    return ok(&serde_json::json!({"events": events, "next": cursor}));
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }
        other => Err(misrouted(other)),
    }
}

//! Our admin API (Azure's control plane equivalent): instances, linked hubs, access policies,
//! the built-in registry's devices, stats and the audit log. SAS auth with `ServiceConfig`; a
//! token acts on its own instance, and a token of the admin instance may act on all of them.

use crate::app::App;
use crate::http::{err, json_response, param, query_params, read_body};
use crate::service_api::{authorize, Caller};
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, Response, StatusCode};
use dps_core::error::AuthFailure;
use dps_core::instance::{AccessPolicy, Instance, LinkedHub, Right};
use dps_core::store::{AuditQuery, Collection, Filter};
use dps_core::Error;
use std::sync::Arc;

fn to_json<T: serde::Serialize>(v: T) -> serde_json::Value {
    serde_json::to_value(v).expect("json")
}

fn may_manage(app: &App, caller: &Caller, target: &str) -> Result<(), Error> {
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

fn target(app: &App, caller: &Caller, name: &str) -> Result<Arc<Instance>, Error> {
    may_manage(app, caller, name)?;
    app.instances
        .by_name(name)
        .ok_or_else(|| Error::not_found("instance", name))
}

/// Handle `/admin/...`.
pub async fn handle(
    app: &Arc<App>,
    req: Request<Body>,
    segs: &[String],
    l: &[&str],
) -> Response<Body> {
    let params = query_params(req.uri());
    let method = req.method().clone();
    let headers = req.headers().clone();
    let body = match read_body(req.into_body(), app.max_body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match inner(app, &method, &headers, &params, &body, segs, l).await {
        Ok(r) => r,
        Err(e) => {
            if matches!(e, Error::Store(_) | Error::Internal(_)) {
                tracing::error!(error = %e, "admin API failed");
            }
            err(&e)
        }
    }
}

async fn save(app: &App, caller: &Caller, inst: &Instance, action: &str) -> Result<(), Error> {
    let before = app.instances.put(inst).await?;
    app.engine
        .audit
        .record(
            &inst.name,
            &caller.policy,
            action,
            "instance",
            &inst.name,
            before.as_ref().map(Instance::redacted).as_ref(),
            Some(&inst.redacted()),
        )
        .await;
    Ok(())
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
    let caller = authorize(app, headers, Right::ServiceConfig)?;
    let ok = |v: serde_json::Value| Ok(json_response(StatusCode::OK, &v));
    match (&l[1..], method.clone()) {
        (["instances"], Method::GET) => {
            let list: Vec<Instance> = app
                .instances
                .list()
                .iter()
                .filter(|i| may_manage(app, &caller, &i.name).is_ok())
                .map(|i| i.redacted())
                .collect();
            ok(to_json(list))
        }
        (["instances", _], Method::GET) => ok(to_json(target(app, &caller, &segs[2])?.redacted())),
        (["instances", _], Method::PUT) => {
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
            may_manage(app, &caller, &segs[2]).or_else(|e| {
                if app.instances.by_name(&segs[2]).is_none() {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
            let mut v: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| Error::invalid(format!("invalid instance: {e}")))?;
            v["name"] = segs[2].clone().into();
            let existing = app.instances.by_name(&segs[2]);
            if v.get("id_scope").is_none() {
                v["id_scope"] = existing
                    .as_ref()
                    .map(|i| i.id_scope.clone())
                    .unwrap_or_else(|| dps_core::ids::IdScope::generate().to_string())
                    .into();
            }
            let mut inst: Instance = serde_json::from_value(v)
                .map_err(|e| Error::invalid(format!("invalid instance: {e}")))?;
            if inst.access_policy.is_empty() {
                inst.access_policy = existing
                    .as_ref()
                    .map(|i| i.access_policy.clone())
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| vec![AccessPolicy::owner("provisioningserviceowner")]);
            }
            let action = if existing.is_some() {
                "instance.update"
            } else {
                "instance.create"
            };
            save(app, &caller, &inst, action).await?;
            ok(to_json(inst))
        }
        (["instances", _], Method::DELETE) => {
            let inst = target(app, &caller, &segs[2])?;
            if inst.name.eq_ignore_ascii_case(&app.admin_instance) {
                return Err(Error::invalid("the admin instance cannot be deleted"));
            }
            let old = app.instances.delete(&inst.name).await?;
            app.engine
                .audit
                .record(
                    &old.name,
                    &caller.policy,
                    "instance.delete",
                    "instance",
                    &old.name,
                    Some(&old.redacted()),
                    None::<&()>,
                )
                .await;
            Ok(Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Body::empty())
                .expect("valid"))
        }
        (["instances", _, "stats"], Method::GET) => {
            let inst = target(app, &caller, &segs[2])?;
            let store = &app.repo.store;
            let mut regs = serde_json::Map::new();
            for s in ["assigned", "assigning", "failed", "disabled"] {
                let n = store
                    .count(
                        Collection::Registration,
                        &inst.name,
                        &Filter {
                            status: Some(s.into()),
                            ..Default::default()
                        },
                    )
                    .await?;
                regs.insert(s.into(), n.into());
            }
            let mut hubs = serde_json::Map::new();
            for h in &inst.linked_hub {
                let n = store
                    .count(
                        Collection::Registration,
                        &inst.name,
                        &Filter {
                            hub: Some(h.host.to_ascii_lowercase()),
                            status: Some("assigned".into()),
                            ..Default::default()
                        },
                    )
                    .await?;
                hubs.insert(h.host.clone(), n.into());
            }
            ok(serde_json::json!({
                "enrollments": store.count(Collection::Enrollment, &inst.name, &Filter::default()).await?,
                "groups": store.count(Collection::Group, &inst.name, &Filter::default()).await?,
                "registrations": regs,
                "devicesPerHub": hubs,
            }))
        }
        (["instances", _, "linkedhubs"], Method::GET) => {
            let inst = target(app, &caller, &segs[2])?;
            let health: std::collections::HashMap<String, crate::hubs::Health> =
                app.engine.hubs.health_snapshot().into_iter().collect();
            let list: Vec<serde_json::Value> = inst
                .linked_hub
                .iter()
                .map(|h| {
                    let mut v = to_json(h.redacted());
                    let hh = health
                        .get(&h.host.to_ascii_lowercase())
                        .cloned()
                        .unwrap_or_default();
                    v["health"] = serde_json::json!({
                        "healthy": !hh.unhealthy(),
                        "consecutive_failures": hh.consecutive_failures,
                        "failures": hh.failures,
                        "successes": hh.successes,
                        "latency_ms": hh.latency_ms,
                        "last_error": hh.last_error,
                        "credentials_refused": hh.credentials_refused,
                    });
                    v
                })
                .collect();
            ok(to_json(list))
        }
        (["instances", _, "linkedhubs", _], Method::PUT) => {
            let inst = target(app, &caller, &segs[2])?;
            let mut v: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| Error::invalid(format!("invalid linked hub: {e}")))?;
            v["host"] = segs[4].clone().into();
            let hub: LinkedHub = serde_json::from_value(v)
                .map_err(|e| Error::invalid(format!("invalid linked hub: {e}")))?;
            let mut new = (*inst).clone();
            new.linked_hub
                .retain(|h| !h.host.eq_ignore_ascii_case(&hub.host));
            new.linked_hub.push(hub.clone());
            save(app, &caller, &new, "linked_hub.put").await?;
            ok(to_json(hub.redacted()))
        }
        (["instances", _, "linkedhubs", _], Method::DELETE) => {
            let inst = target(app, &caller, &segs[2])?;
            let mut new = (*inst).clone();
            let before = new.linked_hub.len();
            new.linked_hub
                .retain(|h| !h.host.eq_ignore_ascii_case(&segs[4]));
            if new.linked_hub.len() == before {
                return Err(Error::not_found("linked hub", &segs[4]));
            }
            save(app, &caller, &new, "linked_hub.remove").await?;
            Ok(Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Body::empty())
                .expect("valid"))
        }
        (["instances", _, "accesspolicies"], Method::GET) => {
            let inst = target(app, &caller, &segs[2])?;
            ok(to_json(
                inst.access_policy
                    .iter()
                    .map(AccessPolicy::redacted)
                    .collect::<Vec<_>>(),
            ))
        }
        (["instances", _, "accesspolicies", _], Method::PUT) => {
            let inst = target(app, &caller, &segs[2])?;
            let mut v: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| Error::invalid(format!("invalid access policy: {e}")))?;
            v["name"] = segs[4].clone().into();
            let old = inst.policy(&segs[4]).cloned();
            if v.get("primary_key").is_none() {
                v["primary_key"] = old
                    .as_ref()
                    .map(|o| o.primary_key.clone())
                    .unwrap_or_else(dps_core::sas::generate_key)
                    .into();
            }
            if v.get("secondary_key").is_none() {
                v["secondary_key"] = old
                    .as_ref()
                    .map(|o| o.secondary_key.clone())
                    .unwrap_or_else(dps_core::sas::generate_key)
                    .into();
            }
            let p: AccessPolicy = serde_json::from_value(v)
                .map_err(|e| Error::invalid(format!("invalid access policy: {e}")))?;
            let mut new = (*inst).clone();
            new.access_policy.retain(|x| x.name != p.name);
            new.access_policy.push(p.clone());
            save(app, &caller, &new, "access_policy.put").await?;
            ok(to_json(p))
        }
        (["instances", _, "accesspolicies", _], Method::DELETE) => {
            let inst = target(app, &caller, &segs[2])?;
            let mut new = (*inst).clone();
            new.access_policy.retain(|x| x.name != segs[4]);
            if new.access_policy.len() == inst.access_policy.len() {
                return Err(Error::not_found("access policy", &segs[4]));
            }
            if !new
                .access_policy
                .iter()
                .any(|p| p.has(Right::ServiceConfig))
            {
                return Err(Error::invalid(
                    "an instance must keep at least one policy with the ServiceConfig right",
                ));
            }
            save(app, &caller, &new, "access_policy.remove").await?;
            Ok(Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Body::empty())
                .expect("valid"))
        }
        (["instances", _, "hubs", _, "devices"], Method::GET) => {
            let inst = target(app, &caller, &segs[2])?;
            let hub = inst
                .hub(&segs[4])
                .ok_or_else(|| Error::not_found("linked hub", &segs[4]))?;
            let limit = param(params, "limit")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100usize)
                .clamp(1, 1000);
            let page = app
                .repo
                .store
                .query(
                    Collection::HubDevice,
                    &hub.host.to_ascii_lowercase(),
                    &Filter::default(),
                    param(params, "continuation"),
                    limit,
                )
                .await?;
            let items: Vec<serde_json::Value> = page
                .docs
                .iter()
                .filter_map(|d| {
                    serde_json::from_str::<crate::hubs::registry::StoredHubDevice>(&d.body)
                        .ok()
                        .map(|x| x.public(&d.etag))
                })
                .collect();
            ok(serde_json::json!({"items": items, "continuation": page.next}))
        }
        (["instances", _, "hubs", _, "devices", _], Method::GET) => {
            let inst = target(app, &caller, &segs[2])?;
            let hub = inst
                .hub(&segs[4])
                .ok_or_else(|| Error::not_found("linked hub", &segs[4]))?;
            let d = app
                .repo
                .store
                .get(
                    Collection::HubDevice,
                    &hub.host.to_ascii_lowercase(),
                    &segs[6],
                )
                .await?
                .ok_or_else(|| Error::not_found("hub device", &segs[6]))?;
            let dev: crate::hubs::registry::StoredHubDevice =
                serde_json::from_str(&d.body).map_err(|e| Error::Internal(e.to_string()))?;
            ok(dev.public(&d.etag))
        }
        (["audit"], Method::GET) => {
            let instance = match param(params, "instance") {
                Some(i) => {
                    may_manage(app, &caller, i)?;
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
            let q = AuditQuery {
                instance,
                since: param(params, "since").map(str::to_string),
                target_id: param(params, "target").map(str::to_string),
                action_prefix: param(params, "action").map(str::to_string),
                after_seq: param(params, "after").and_then(|v| v.parse().ok()),
                limit: param(params, "limit")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(100usize)
                    .clamp(1, 10_000),
            };
            let entries = app.repo.store.list_audit(&q).await?;
            let list: Vec<serde_json::Value> = entries
                .into_iter()
                .map(|e| {
                    serde_json::json!({
                        "seq": e.seq, "timestamp": e.timestamp, "instance": e.instance, "actor": e.actor,
                        "action": e.action, "targetKind": e.target_kind, "targetId": e.target_id,
                        "before": e.before.and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok()),
                        "after": e.after.and_then(|a| serde_json::from_str::<serde_json::Value>(&a).ok()),
                    })
                })
                .collect();
            ok(to_json(list))
        }
        _ => crate::certificates::handle(app, &caller, method, body, segs, l).await,
    }
}

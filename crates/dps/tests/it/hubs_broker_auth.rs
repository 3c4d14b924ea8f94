//! `broker-auth` linked hubs: brokers that ask dps. The HTTP contract of every flavour
//! (RabbitMQ's HTTP auth backend, EMQX HTTP authn/authz, VerneMQ webhooks, mosquitto-go-auth)
//! without a broker, and RabbitMQ's MQTT plugin end to end with a private node
//! (support_rabbitmq.rs).

use crate::support::*;
use crate::support_rabbitmq::*;
use base64::Engine as _;
use dps_core::instance::{HubKind, LinkedHub};
use dps_server::hubs::broker_auth::derive_password;
use reqwest::Method;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const HUB: &str = "broker.example.net";
const SECRET: &str = "b7a1c9d2e4f60819a3b5c7d9e1f20314";

fn broker_hub() -> LinkedHub {
    let mut h = LinkedHub::new(HUB, HubKind::BrokerAuth);
    h.options.insert("auth_secret".into(), SECRET.into());
    h.options
        .insert("delete_identity_on_deregister".into(), true.into());
    h
}

async fn server() -> TestServer {
    TestServer::spawn_with(|c| c.instances[0].linked_hub = vec![broker_hub()]).await
}

/// Enroll and register a symmetric-key device onto the broker hub; returns its MQTT password.
async fn device(s: &TestServer, rid: &str) -> (String, String) {
    let key = s.enroll(rid, json!({})).await;
    let r = s.register(rid, &key, None).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    assert_eq!(r.body["registrationState"]["assignedHub"], HUB);
    (key.clone(), derive_password(&key, rid).unwrap())
}

fn path(flavour_check: &str) -> String {
    format!("/brokerAuth/default/{HUB}/{flavour_check}")
}

/// One broker request: `auth` is the Authorization header, `form` a form body (RabbitMQ) or
/// `json` a JSON body. Returns (status, body text).
async fn ask(
    s: &TestServer,
    auth: Option<&str>,
    check: &str,
    form: Option<&[(&str, &str)]>,
    json_body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut rb = s.client.post(format!("{}{}", s.base, path(check)));
    if let Some(a) = auth {
        rb = rb.header("authorization", a);
    }
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    if let Some(f) = form {
        let body: String = f
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
                )
            })
            .collect::<Vec<_>>()
            .join("&");
        rb = rb
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
    }
    if let Some(j) = json_body {
        rb = rb.json(&j);
    }
    let r = rb.send().await.expect("request");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

fn bearer() -> String {
    format!("Bearer {SECRET}")
}

fn basic() -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("rabbit:{SECRET}"))
    )
}

#[tokio::test]
async fn an_unauthenticated_broker_is_refused_on_every_flavour() {
    let s = server().await;
    let (_, pw) = device(&s, "ba-unauth").await;
    let checks = [
        "rabbitmq/user",
        "rabbitmq/vhost",
        "rabbitmq/resource",
        "rabbitmq/topic",
        "emqx/authn",
        "emqx/authz",
        "vernemq/auth_on_register",
        "vernemq/auth_on_publish",
        "vernemq/auth_on_subscribe",
        "goauth/user",
        "goauth/superuser",
        "goauth/acl",
    ];
    let wrong = format!("Bearer {}x", &SECRET[..SECRET.len() - 1]);
    for check in checks {
        for auth in [None, Some(wrong.as_str()), Some("Basic cmFiYml0Og==")] {
            let (st, _) = ask(
                &s,
                auth,
                check,
                Some(&[("username", "ba-unauth"), ("password", &pw)]),
                None,
                &[],
            )
            .await;
            assert_eq!(st, 401, "{check} with {auth:?}");
        }
    }
    // An unknown hub, or a hub of another kind, has no broker endpoints.
    let r = s
        .client
        .post(format!(
            "{}/brokerAuth/default/nowhere.example.net/rabbitmq/user",
            s.base
        ))
        .header("authorization", bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let text = scrape(&s).await;
    assert!(
        sample(
            &text,
            "dps_broker_auth_checks_total",
            &[("result", "unauthorized")]
        ) >= 36.0,
        "{text}"
    );
}

#[tokio::test]
async fn rabbitmq_contract() {
    let s = server().await;
    let (_, pw) = device(&s, "ba-rmq").await;
    let _ = device(&s, "ba-rmq-other").await;
    let b = basic();
    let rq = |check: &'static str, form: Vec<(&'static str, String)>| {
        let s = &s;
        let b = b.clone();
        async move {
            let f: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
            ask(s, Some(&b), check, Some(&f), None, &[]).await
        }
    };
    let user = |u: &str, p: &str| {
        vec![
            ("username", u.to_string()),
            ("password", p.to_string()),
            ("vhost", "/".to_string()),
            ("client_id", u.to_string()),
        ]
    };
    assert_eq!(
        rq("rabbitmq/user", user("ba-rmq", &pw)).await,
        (200, "allow".into())
    );
    assert_eq!(rq("rabbitmq/user", user("ba-rmq", "wrong")).await.1, "deny");
    assert_eq!(
        rq("rabbitmq/user", user("ba-rmq-other", &pw)).await.1,
        "deny"
    );
    assert_eq!(rq("rabbitmq/user", user("nobody", &pw)).await.1, "deny");
    let no_password = vec![
        ("username", "ba-rmq".to_string()),
        ("vhost", "/".to_string()),
    ];
    assert_eq!(
        rq("rabbitmq/user", no_password).await.1,
        "deny",
        "a certificate login (no password) is for X.509 devices only"
    );
    let dotted = vec![("username", "ba.rmq".to_string()), ("password", pw.clone())];
    assert_eq!(
        rq("rabbitmq/user", dotted).await.1,
        "deny",
        "no `.` in ids on RabbitMQ"
    );
    let mut pinned = user("ba-rmq", &pw);
    pinned[3].1 = "another-client".into();
    assert_eq!(
        rq("rabbitmq/user", pinned).await.1,
        "deny",
        "client id = device id"
    );

    let vhost = |v: &str| {
        vec![
            ("username", "ba-rmq".to_string()),
            ("vhost", v.to_string()),
            ("ip", "127.0.0.1".to_string()),
        ]
    };
    assert_eq!(rq("rabbitmq/vhost", vhost("/")).await.1, "allow");
    assert_eq!(rq("rabbitmq/vhost", vhost("other")).await.1, "deny");

    let res = |kind: &str, name: &str, perm: &str| {
        vec![
            ("username", "ba-rmq".to_string()),
            ("vhost", "/".to_string()),
            ("resource", kind.to_string()),
            ("name", name.to_string()),
            ("permission", perm.to_string()),
        ]
    };
    assert_eq!(
        rq("rabbitmq/resource", res("exchange", "amq.topic", "write"))
            .await
            .1,
        "allow"
    );
    assert_eq!(
        rq("rabbitmq/resource", res("exchange", "amq.topic", "read"))
            .await
            .1,
        "allow"
    );
    assert_eq!(
        rq(
            "rabbitmq/resource",
            res("exchange", "amq.topic", "configure")
        )
        .await
        .1,
        "deny"
    );
    assert_eq!(
        rq("rabbitmq/resource", res("exchange", "amq.fanout", "write"))
            .await
            .1,
        "deny"
    );
    assert_eq!(
        rq(
            "rabbitmq/resource",
            res("queue", "mqtt-subscription-ba-rmqqos1", "configure")
        )
        .await
        .1,
        "allow"
    );
    assert_eq!(
        rq(
            "rabbitmq/resource",
            res("queue", "mqtt-subscription-ba-rmq-otherqos1", "read")
        )
        .await
        .1,
        "deny"
    );

    let topic = |rk: &str, perm: &str| {
        vec![
            ("username", "ba-rmq".to_string()),
            ("vhost", "/".to_string()),
            ("resource", "topic".to_string()),
            ("name", "amq.topic".to_string()),
            ("permission", perm.to_string()),
            ("routing_key", rk.to_string()),
            ("variable_map.client_id", "ba-rmq".to_string()),
        ]
    };
    assert_eq!(
        rq("rabbitmq/topic", topic("devices.ba-rmq.telemetry", "write"))
            .await
            .1,
        "allow"
    );
    assert_eq!(
        rq("rabbitmq/topic", topic("devices.ba-rmq.#", "read"))
            .await
            .1,
        "allow"
    );
    assert_eq!(
        rq(
            "rabbitmq/topic",
            topic("devices.ba-rmq.twin.desired", "write")
        )
        .await
        .1,
        "deny"
    );
    assert_eq!(
        rq("rabbitmq/topic", topic("devices.ba-rmq-other.x", "write"))
            .await
            .1,
        "deny"
    );
    assert_eq!(
        rq("rabbitmq/topic", topic("devices.*.x", "read")).await.1,
        "deny"
    );

    // GET with the query string works too (auth_http.http_method = get).
    let r = s
        .client
        .get(format!(
            "{}{}?username=ba-rmq&password={}",
            s.base,
            path("rabbitmq/user"),
            percent_encoding::utf8_percent_encode(&pw, percent_encoding::NON_ALPHANUMERIC)
        ))
        .header("authorization", bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "allow");
}

#[tokio::test]
async fn emqx_vernemq_and_go_auth_contracts() {
    let s = server().await;
    let (_, pw) = device(&s, "ba-js").await;
    let b = bearer();
    let j = |check: &'static str, body: Value, headers: &'static [(&'static str, &'static str)]| {
        let s = &s;
        let b = b.clone();
        async move {
            let (st, text) = ask(s, Some(&b), check, None, Some(body), headers).await;
            (
                st,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
            )
        }
    };
    // EMQX authentication.
    let r = j(
        "emqx/authn",
        json!({"username": "ba-js", "clientid": "ba-js", "password": pw}),
        &[],
    )
    .await;
    assert_eq!(r, (200, json!({"result": "allow", "is_superuser": false})));
    let r = j(
        "emqx/authn",
        json!({"username": "ba-js", "clientid": "ba-js", "password": "x"}),
        &[],
    )
    .await;
    assert_eq!(r.1["result"], "deny");
    let r = j(
        "emqx/authn",
        json!({"username": "admin", "clientid": "c", "password": "x"}),
        &[],
    )
    .await;
    assert_eq!(
        r.1["result"], "ignore",
        "not a device: the next authenticator decides"
    );
    // EMQX authorization.
    let authz = |action: &str, topic: &str| json!({"username": "ba-js", "clientid": "ba-js", "action": action, "topic": topic});
    assert_eq!(
        j("emqx/authz", authz("publish", "devices/ba-js/t"), &[])
            .await
            .1["result"],
        "allow"
    );
    assert_eq!(
        j("emqx/authz", authz("subscribe", "devices/ba-js/#"), &[])
            .await
            .1["result"],
        "allow"
    );
    assert_eq!(
        j(
            "emqx/authz",
            authz("publish", "devices/ba-js/twin/desired"),
            &[]
        )
        .await
        .1["result"],
        "deny"
    );
    assert_eq!(
        j("emqx/authz", authz("subscribe", "devices/#"), &[])
            .await
            .1["result"],
        "deny"
    );
    assert_eq!(
        j("emqx/authz", authz("publish", "devices/x/t"), &[])
            .await
            .1["result"],
        "deny"
    );

    // VerneMQ webhooks.
    let reg = |p: &str| json!({"peer_addr": "127.0.0.1", "peer_port": 1, "username": "ba-js", "password": p, "mountpoint": "", "client_id": "ba-js", "clean_session": true});
    let hook = &[("vernemq-hook", "auth_on_register")][..];
    assert_eq!(
        j("vernemq/auth_on_register", reg(&pw), hook).await.1,
        json!({"result": "ok"})
    );
    assert_eq!(
        j("vernemq/auth_on_register", reg("nope"), hook).await.1,
        json!({"result": {"error": "not_allowed"}})
    );
    let r = j(
        "vernemq/auth_on_register",
        json!({"username": "admin", "password": "p", "client_id": "admin", "mountpoint": ""}),
        hook,
    )
    .await;
    assert_eq!(r.1, json!({"result": "next"}));
    let publish = |t: &str| json!({"username": "ba-js", "client_id": "ba-js", "mountpoint": "", "qos": 1, "topic": t, "payload": "aGk=", "retain": false});
    assert_eq!(
        j("vernemq/auth_on_publish", publish("devices/ba-js/t"), &[])
            .await
            .1["result"],
        "ok"
    );
    assert_eq!(
        j("vernemq/auth_on_publish", publish("devices/x/t"), &[])
            .await
            .1["result"]["error"],
        "not_allowed"
    );
    let sub = json!({"username": "ba-js", "client_id": "ba-js", "mountpoint": "", "topics": [{"topic": "devices/ba-js/#", "qos": 1}, {"topic": "devices/#", "qos": 0}]});
    assert_eq!(
        j("vernemq/auth_on_subscribe", sub.clone(), &[]).await.1,
        json!({"result": "ok", "topics": [{"topic": "devices/ba-js/#", "qos": 1}, {"topic": "devices/#", "qos": 128}]}),
        "a refused topic gets QoS 128"
    );
    assert_eq!(
        j(
            "vernemq/auth_on_subscribe",
            sub,
            &[("vernemq-hook", "auth_on_subscribe_m5")]
        )
        .await
        .1["result"]["error"],
        "not_allowed",
        "MQTT 5: the whole request is refused"
    );
    let own = json!({"username": "ba-js", "client_id": "ba-js", "mountpoint": "", "topics": [{"topic": "devices/ba-js/#", "qos": 1}]});
    assert_eq!(
        j("vernemq/auth_on_subscribe", own, &[]).await.1,
        json!({"result": "ok"})
    );

    // mosquitto-go-auth (status mode, JSON params).
    let go = |check: &'static str, body: Value| {
        let s = &s;
        let b = b.clone();
        async move { ask(s, Some(&b), check, None, Some(body), &[]).await.0 }
    };
    assert_eq!(
        go(
            "goauth/user",
            json!({"username": "ba-js", "password": pw, "clientid": "ba-js"})
        )
        .await,
        200
    );
    assert_eq!(
        go(
            "goauth/user",
            json!({"username": "ba-js", "password": "x", "clientid": "ba-js"})
        )
        .await,
        403
    );
    assert_eq!(
        go("goauth/superuser", json!({"username": "ba-js"})).await,
        403
    );
    let acl = |t: &str, acc: u8| json!({"username": "ba-js", "clientid": "ba-js", "topic": t, "acc": acc});
    assert_eq!(go("goauth/acl", acl("devices/ba-js/#", 4)).await, 200);
    assert_eq!(go("goauth/acl", acl("devices/ba-js/t", 2)).await, 200);
    assert_eq!(
        go("goauth/acl", acl("devices/ba-js/twin/desired", 1)).await,
        200
    );
    assert_eq!(
        go("goauth/acl", acl("devices/ba-js/twin/desired", 2)).await,
        403
    );
    assert_eq!(
        go("goauth/acl", acl("devices/ba-js/twin/desired", 3)).await,
        403
    );
    assert_eq!(go("goauth/acl", acl("devices/other/t", 1)).await, 403);
    // Form parameters (`http_params_mode form`) too.
    let (st, _) = ask(
        &s,
        Some(&b),
        "goauth/user",
        Some(&[
            ("username", "ba-js"),
            ("password", &pw),
            ("clientid", "ba-js"),
        ]),
        None,
        &[],
    )
    .await;
    assert_eq!(st, 200);

    let text = scrape(&s).await;
    assert!(
        sample(
            &text,
            "dps_broker_auth_checks_total",
            &[("kind", "connect"), ("result", "allow")]
        ) >= 4.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "dps_broker_auth_checks_total",
            &[("kind", "topic"), ("result", "deny")]
        ) >= 3.0,
        "{text}"
    );
    assert!(
        text.contains("dps_broker_auth_check_duration_seconds"),
        "{text}"
    );
}

/// A RabbitMQ connect question for `rid`.
async fn rabbit_user(s: &TestServer, rid: &str, pw: &str) -> String {
    ask(
        s,
        Some(&bearer()),
        "rabbitmq/user",
        Some(&[("username", rid), ("password", pw), ("vhost", "/")]),
        None,
        &[],
    )
    .await
    .1
}

#[tokio::test]
async fn disabled_and_deleted_devices_are_refused_at_once() {
    let s = server().await;
    let (key, pw) = device(&s, "ba-life").await;
    // Cached as allowed.
    assert_eq!(rabbit_user(&s, "ba-life", &pw).await, "allow");
    assert_eq!(rabbit_user(&s, "ba-life", &pw).await, "allow");
    // Disabling the enrollment disables the identity (in the background): refused from then on.
    s.enroll(
        "ba-life",
        json!({"provisioningStatus": "disabled", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}}),
    )
    .await;
    eventually(Duration::from_secs(5), || async {
        let a = rabbit_user(&s, "ba-life", &pw).await;
        if a == "deny" {
            Ok(())
        } else {
            Err(a)
        }
    })
    .await;
    // Enabled again, then the registration deleted (the hub deletes identities on deregister).
    s.enroll(
        "ba-life",
        json!({"provisioningStatus": "enabled", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}}),
    )
    .await;
    eventually(Duration::from_secs(5), || async {
        let a = rabbit_user(&s, "ba-life", &pw).await;
        if a == "allow" {
            Ok(())
        } else {
            Err(a)
        }
    })
    .await;
    let r = s
        .call(
            Method::DELETE,
            "/registrations/ba-life",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    // Deleted through this node: refused on the very next question.
    assert_eq!(rabbit_user(&s, "ba-life", &pw).await, "deny");
    // A new registration (new identity write in the engine's transaction) is allowed at once.
    let r = s.register("ba-life", &key, None).await;
    assert_eq!(r.body["status"], "assigned", "{}", r.body);
    assert_eq!(rabbit_user(&s, "ba-life", &pw).await, "allow");
}

async fn mqtt_connect(port: u16, id: &str, pw: &str) -> Result<(AsyncClient, EventLoop), String> {
    mqtt_connect_as(port, id, id, pw).await
}

async fn mqtt_connect_as(
    port: u16,
    client_id: &str,
    user: &str,
    pw: &str,
) -> Result<(AsyncClient, EventLoop), String> {
    crate::support_mosquitto::connect_within(port, client_id, user, pw, Duration::from_secs(15))
        .await
}

/// Events of a connection, in the background: publishes as (topic, payload), SUBACK return
/// codes as ("$suback", codes), and the end as ("$closed", why).
fn drive(mut el: EventLoop) -> tokio::sync::mpsc::UnboundedReceiver<(String, String)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((
                        p.topic.clone(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    ));
                }
                Ok(Event::Incoming(Packet::SubAck(a))) => {
                    let _ = tx.send(("$suback".into(), format!("{:?}", a.return_codes)));
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(("$closed".into(), e.to_string()));
                    return;
                }
            }
        }
    });
    rx
}

async fn next_event(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) -> (String, String) {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("an event within 20 s")
        .expect("channel open")
}

#[tokio::test]
async fn rabbitmq_mqtt_devices_log_in_through_dps() {
    let s = server().await;
    let Some(rabbit) = Rabbit::start(AuthTarget {
        base: &s.base,
        instance: "default",
        hub: HUB,
        secret: SECRET,
        ca_pem: &s.ca_pem,
    })
    .await
    else {
        return;
    };
    let port = rabbit.mqtt_port;
    let (key, pw) = device(&s, "ba-e2e").await;
    let (_, other_pw) = device(&s, "ba-e2e-other").await;

    // Wrong password, another device's password: refused.
    assert!(mqtt_connect(port, "ba-e2e", "wrong").await.is_err());
    assert!(mqtt_connect(port, "ba-e2e", &other_pw).await.is_err());
    assert!(
        mqtt_connect_as(port, "someone-else", "ba-e2e", &pw)
            .await
            .is_err(),
        "the client id is pinned to the device id"
    );

    // The other device listens on its own tree.
    let (other, el) = mqtt_connect(port, "ba-e2e-other", &other_pw)
        .await
        .unwrap_or_else(|e| panic!("the other device connects: {e}\n{}", rabbit.log_tail()));
    let mut other_rx = drive(el);
    other
        .subscribe("devices/ba-e2e-other/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(next_event(&mut other_rx).await.0, "$suback");

    // The device connects, subscribes to its own tree and receives what it publishes there.
    let (dev, el) = mqtt_connect(port, "ba-e2e", &pw)
        .await
        .unwrap_or_else(|e| panic!("the device connects: {e}\n{}", rabbit.log_tail()));
    let mut rx = drive(el);
    dev.subscribe("devices/ba-e2e/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let ack = next_event(&mut rx).await;
    assert_eq!(ack.0, "$suback");
    assert!(!ack.1.contains("Failure"), "{ack:?}");
    dev.publish("devices/ba-e2e/telemetry", QoS::AtLeastOnce, false, "t1")
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut rx).await,
        ("devices/ba-e2e/telemetry".to_string(), "t1".to_string())
    );

    // Another device's tree: RabbitMQ refuses the subscription, and a publish there closes the
    // connection; the other device never sees it.
    let (dev2, el) = mqtt_connect(port, "ba-e2e", &pw).await.unwrap();
    drop(dev);
    let mut rx2 = drive(el);
    dev2.subscribe("devices/ba-e2e-other/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let ev = next_event(&mut rx2).await;
    assert!(
        (ev.0 == "$suback" && ev.1.contains("Failure")) || ev.0 == "$closed",
        "subscribing to another device's tree is refused: {ev:?}"
    );
    let (dev3, el) = mqtt_connect(port, "ba-e2e", &pw).await.unwrap();
    let mut rx3 = drive(el);
    dev3.publish(
        "devices/ba-e2e-other/telemetry",
        QoS::AtLeastOnce,
        false,
        "intrusion",
    )
    .await
    .unwrap();
    assert_eq!(
        next_event(&mut rx3).await.0,
        "$closed",
        "publishing there closes the connection"
    );
    // The other device's own publish arrives, the intrusion never did.
    other
        .publish("devices/ba-e2e-other/ping", QoS::AtLeastOnce, false, "p")
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut other_rx).await,
        ("devices/ba-e2e-other/ping".to_string(), "p".to_string())
    );

    // Disabled through the service API: refused at its next connect.
    s.enroll(
        "ba-e2e",
        json!({"provisioningStatus": "disabled", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}}),
    )
    .await;
    eventually(Duration::from_secs(20), || async {
        match mqtt_connect(port, "ba-e2e", &pw).await {
            Err(e) => Ok(e),
            Ok(_) => Err("still accepted".to_string()),
        }
    })
    .await;

    // Deleted (deregistered): the other device is refused at its next connect.
    let r = s
        .call(
            Method::DELETE,
            "/registrations/ba-e2e-other",
            Some(&s.owner()),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    // dps denies at once (the identity is removed before the 204)...
    let form = [
        ("username", "ba-e2e-other"),
        ("password", other_pw.as_str()),
        ("vhost", "/"),
        ("client_id", "ba-e2e-other"),
    ];
    let (st, text) = ask(&s, Some(&basic()), "rabbitmq/user", Some(&form), None, &[]).await;
    assert_eq!(
        (st, text.as_str()),
        (200, "deny"),
        "a deleted device is denied"
    );
    // ...and so the broker refuses its next connect (polled: the broker's own connection
    // handling is not ours to time).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match mqtt_connect(port, "ba-e2e-other", &other_pw).await {
            Err(_) => break,
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Ok(_) => panic!(
                "a deleted device is still accepted by the broker after 10 s\n{}",
                rabbit.log_tail()
            ),
        }
    }
    drop(rabbit);
}

/// `dps bench-broker-auth` at a tiny size: devices of a group registered onto the hub, then a
/// second of mixed connect and topic checks over keep-alive HTTPS; every answer must be an
/// allow. (The real figures are in docs/benchmarks.md.)
#[tokio::test]
async fn the_broker_auth_load_generator_runs() {
    use dps_cli::bench::broker_auth::{measure, BrokerAuthBenchArgs, CheckArg, FlavourArg};
    let s = server().await;
    let gkey = s.enroll_group("ba-bench", json!({})).await;
    for i in 0..3 {
        let rid = format!("ba-bench-{i:06}");
        let r = s.register(&rid, &derive_key(&gkey, &rid), None).await;
        assert_eq!(r.body["status"], "assigned", "{}", r.body);
    }
    for (check, flavour, rate) in [
        (CheckArg::Mixed, FlavourArg::Rabbitmq, None),
        (CheckArg::Mixed, FlavourArg::Emqx, None),
        (CheckArg::Topic, FlavourArg::Rabbitmq, Some(200.0)),
    ] {
        let args = BrokerAuthBenchArgs {
            hub: HUB.into(),
            instance: "default".into(),
            secret: SECRET.into(),
            group_key: gkey.clone(),
            prefix: "ba-bench-".into(),
            devices: 3,
            duration: 0.5,
            connections: 4,
            rate,
            check,
            flavour,
            password_mode: "derived".into(),
            topic_prefix: "devices".into(),
            threads: None,
        };
        let r = measure(&args, &s.base, Some(s.ca_pem.as_bytes()))
            .await
            .expect("bench runs");
        assert!(r.checks > 10, "{:?}", r.to_json());
        if let Some(rate) = rate {
            assert!(r.rate() < rate * 1.5, "paced: {:?}", r.to_json());
        }
        assert_eq!(r.failed, 0, "{:?}", r.to_json());
        assert!(r.p99 >= r.p50, "{:?}", r.to_json());
    }
}

/// A broker-auth hub added through the admin API: refused without a usable secret, its secret
/// shown `<redacted>`, its endpoints live at once, and its devices listed like the registry's.
#[tokio::test]
async fn a_broker_auth_hub_is_managed_through_the_admin_api() {
    let s = TestServer::spawn().await;
    let owner = s.owner();
    let path = "/admin/instances/default/linkedHubs/added.example.net";
    for bad in [
        json!({"kind": "broker-auth"}),
        json!({"kind": "broker-auth", "options": {"auth_secret": "short"}}),
        json!({"kind": "broker-auth", "options": {"auth_secret": SECRET, "password_mode": "plain"}}),
    ] {
        let r = s
            .call(Method::PUT, path, Some(&owner), Some(bad.clone()), &[])
            .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    let r = s
        .call(
            Method::PUT,
            path,
            Some(&owner),
            Some(json!({"kind": "broker-auth", "options": {"auth_secret": SECRET}})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.to_string().contains(SECRET), "{}", r.body);
    let r = s
        .call(
            Method::GET,
            "/admin/instances/default/linkedHubs",
            Some(&owner),
            None,
            &[],
        )
        .await;
    let hub = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "added.example.net")
        .expect("listed")
        .clone();
    assert_eq!(hub["kind"], "broker-auth");
    assert_eq!(hub["options"]["auth_secret"], "<redacted>", "{hub}");

    // A device placed there by a static enrollment; the broker's questions are answered.
    let key = s
        .enroll(
            "ba-admin",
            json!({"allocationPolicy": "static", "iotHubs": ["added.example.net"]}),
        )
        .await;
    let r = s.register("ba-admin", &key, None).await;
    assert_eq!(
        r.body["registrationState"]["assignedHub"], "added.example.net",
        "{}",
        r.body
    );
    let pw = derive_password(&key, "ba-admin").unwrap();
    let answer = s
        .client
        .post(format!(
            "{}/brokerAuth/default/added.example.net/emqx/authn",
            s.base
        ))
        .header("authorization", bearer())
        .json(&json!({"username": "ba-admin", "clientid": "ba-admin", "password": pw}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(answer["result"], "allow");
    let devices = s.hub_devices("added.example.net").await;
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0]["deviceId"], "ba-admin");
    assert!(
        !devices[0].to_string().contains(&key),
        "keys are not listed"
    );
}

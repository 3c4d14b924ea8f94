//! Session logic without sockets.

mod common;
use common::*;
use dps_core::device::{ConnectRefusal, DeviceCredential, Transport};
use dps_core::error::AuthFailure;
use dps_core::wire::WireError;
use dps_core::Error;
use dps_mqtt::session::{CloseReason, Session};
use dps_mqtt::topic::parse_response_topic;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, SubAck, SubscribeReasonCode, UnsubAck, Unsubscribe,
};
use rumqttc::mqttbytes::QoS;

const SCOPE: &str = "0ne00000A0A";
const REG: &str = "dev1";
const SAS: &str = "SharedAccessSignature sr=0ne00000A0A%2Fregistrations%2Fdev1&sig=x&se=1";
const REGISTER: &str = "$dps/registrations/PUT/iotdps-register/?$rid=";

fn connack(code: ConnectReturnCode) -> Out {
    Out::Packet(Packet::ConnAck(ConnAck::new(code, false)))
}

async fn connected(svc: &std::sync::Arc<Fake>) -> Session {
    let mut s = Session::new(Transport::Mqtt, vec![]);
    let out = feed(
        &mut s,
        svc,
        vec![connect(REG, Some(&username(SCOPE, REG)), Some(SAS))],
    )
    .await;
    assert_eq!(out, vec![connack(ConnectReturnCode::Success)]);
    s
}

fn refused(code: ConnectReturnCode) -> Vec<Out> {
    vec![connack(code), Out::Closed(CloseReason::Refused(code))]
}

#[tokio::test]
async fn connect_ok_passes_identity_and_sas() {
    let svc = Fake::new();
    let s = connected(&svc).await;
    assert_eq!(s.identity(), Some((SCOPE, REG)));
    match &svc.seen()[0] {
        Seen::Authorize {
            id_scope,
            registration_id,
            credential,
        } => {
            assert_eq!(id_scope, SCOPE);
            assert_eq!(registration_id, REG);
            assert_eq!(credential, &DeviceCredential::Sas(SAS.into()));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn connect_clean_session_zero_and_session_present_zero() {
    let svc = Fake::new();
    let mut s = Session::new(Transport::Mqtt, vec![]);
    let Packet::Connect(mut c) = connect(REG, Some(&username(SCOPE, REG)), Some(SAS)) else {
        unreachable!()
    };
    c.clean_session = false;
    let out = feed(&mut s, &svc, vec![Packet::Connect(c)]).await;
    assert_eq!(out, vec![connack(ConnectReturnCode::Success)]);
}

#[tokio::test]
async fn connect_x509_uses_peer_certs() {
    let svc = Fake::new();
    let mut s = Session::new(Transport::MqttWs, vec![b"leaf".to_vec(), b"ca".to_vec()]);
    let out = feed(
        &mut s,
        &svc,
        vec![connect(REG, Some(&username(SCOPE, REG)), None)],
    )
    .await;
    assert_eq!(out, vec![connack(ConnectReturnCode::Success)]);
    let Seen::Authorize { credential, .. } = &svc.seen()[0] else {
        panic!()
    };
    assert_eq!(
        credential,
        &DeviceCredential::Certificates(vec![b"leaf".to_vec(), b"ca".to_vec()])
    );
    // And register requests carry it too, with the transport.
    let out = feed(
        &mut s,
        &svc,
        vec![publish(1, &format!("{REGISTER}1"), QoS::AtLeastOnce, b"")],
    )
    .await;
    assert_eq!(out.len(), 2);
    let Seen::Register(req) = &svc.seen()[1] else {
        panic!()
    };
    assert_eq!(req.transport, Transport::MqttWs);
    assert!(matches!(req.credential, DeviceCredential::Certificates(ref c) if c.len() == 2));
}

#[tokio::test]
async fn connack_codes() {
    let svc = Fake::new();
    // Bad usernames.
    for u in [
        None,
        Some("garbage"),
        Some("0ne/devices/dev1/api-version=1"),
        Some("/registrations/dev1/"),
    ] {
        let mut s = Session::new(Transport::Mqtt, vec![]);
        let out = feed(&mut s, &svc, vec![connect(REG, u, Some(SAS))]).await;
        assert_eq!(
            out,
            refused(ConnectReturnCode::BadUserNamePassword),
            "{u:?}"
        );
    }
    // Client id differs from the username's registration id.
    let mut s = Session::new(Transport::Mqtt, vec![]);
    let out = feed(
        &mut s,
        &svc,
        vec![connect("other", Some(&username(SCOPE, REG)), Some(SAS))],
    )
    .await;
    assert_eq!(out, refused(ConnectReturnCode::BadUserNamePassword));
    assert!(
        svc.seen().is_empty(),
        "service not asked for malformed connects"
    );
    // Service refusals.
    for (r, code) in [
        (
            ConnectRefusal::NotAuthorized,
            ConnectReturnCode::NotAuthorized,
        ),
        (
            ConnectRefusal::BadUsernameOrPassword,
            ConnectReturnCode::BadUserNamePassword,
        ),
        (
            ConnectRefusal::ServerUnavailable,
            ConnectReturnCode::ServiceUnavailable,
        ),
    ] {
        let svc = Fake::refusing(r);
        let mut s = Session::new(Transport::Mqtt, vec![]);
        let out = feed(
            &mut s,
            &svc,
            vec![connect(REG, Some(&username(SCOPE, REG)), Some(SAS))],
        )
        .await;
        assert_eq!(out, refused(code));
    }
}

#[tokio::test]
async fn packets_before_connect_close() {
    let svc = Fake::new();
    let mut s = Session::new(Transport::Mqtt, vec![]);
    let out = feed(&mut s, &svc, vec![Packet::PingReq]).await;
    assert!(matches!(
        out[..],
        [Out::Closed(CloseReason::ProtocolViolation(_))]
    ));
}

#[tokio::test]
async fn second_connect_closes() {
    let svc = Fake::new();
    let mut s = connected(&svc).await;
    let out = feed(
        &mut s,
        &svc,
        vec![connect(REG, Some(&username(SCOPE, REG)), Some(SAS))],
    )
    .await;
    assert!(matches!(
        out[..],
        [Out::Closed(CloseReason::ProtocolViolation(_))]
    ));
}

#[tokio::test]
async fn subscribe_grants() {
    let svc = Fake::new();
    let mut s = connected(&svc).await;
    let out = feed(
        &mut s,
        &svc,
        vec![
            subscribe(12222, "$dps/registrations/res/#", QoS::AtLeastOnce),
            subscribe(7, "$dps/registrations/res/#", QoS::ExactlyOnce),
            subscribe(8, "devices/dev1/messages/#", QoS::AtLeastOnce),
        ],
    )
    .await;
    assert_eq!(
        out,
        vec![
            Out::Packet(Packet::SubAck(SubAck::new(
                12222,
                vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
            ))),
            Out::Packet(Packet::SubAck(SubAck::new(
                7,
                vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
            ))),
            Out::Packet(Packet::SubAck(SubAck::new(
                8,
                vec![SubscribeReasonCode::Failure]
            ))),
        ]
    );
    // QoS 0 subscription -> QoS 0 responses.
    let out = feed(
        &mut s,
        &svc,
        vec![
            subscribe(9, "$dps/registrations/res/#", QoS::AtMostOnce),
            publish(0, &format!("{REGISTER}x"), QoS::AtMostOnce, b"{}"),
        ],
    )
    .await;
    assert_eq!(
        out[0],
        Out::Packet(Packet::SubAck(SubAck::new(
            9,
            vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
        )))
    );
    let Out::Packet(Packet::Publish(p)) = &out[1] else {
        panic!("{out:?}")
    };
    assert_eq!(p.qos, QoS::AtMostOnce);
    // Unsubscribe is acknowledged (Node does it before DISCONNECT).
    let mut u = Unsubscribe::new("$dps/registrations/res/#");
    u.pkid = 12226;
    let out = feed(
        &mut s,
        &svc,
        vec![Packet::Unsubscribe(u), Packet::Disconnect],
    )
    .await;
    assert_eq!(
        out,
        vec![
            Out::Packet(Packet::UnsubAck(UnsubAck::new(12226))),
            Out::Closed(CloseReason::ClientDisconnect)
        ]
    );
}

#[tokio::test]
async fn puback_before_response_and_rid_echo_and_retry_after() {
    let svc = Fake::with(vec![assigning("4.abc.op", Some(3))]);
    let mut s = connected(&svc).await;
    let rid = "c3324c89-6f08-49f6-98ca-635a8ee0e983";
    let out = feed(
        &mut s,
        &svc,
        vec![
            subscribe(1, "$dps/registrations/res/#", QoS::AtLeastOnce),
            publish(
                12223,
                &format!("{REGISTER}{rid}"),
                QoS::AtLeastOnce,
                br#"{"registrationId":"dev1","payload":{"a":1}}"#,
            ),
        ],
    )
    .await;
    assert_eq!(out.len(), 3);
    assert_eq!(
        out[1],
        Out::Packet(Packet::PubAck(PubAck::new(12223))),
        "PUBACK first"
    );
    let Out::Packet(Packet::Publish(p)) = &out[2] else {
        panic!()
    };
    assert_eq!(
        p.topic,
        format!("$dps/registrations/res/202/?$rid={rid}&retry-after=3")
    );
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert_ne!(p.pkid, 0);
    assert_eq!(
        json(p),
        serde_json::json!({"operationId":"4.abc.op","status":"assigning"})
    );
    let Seen::Register(req) = &svc.seen()[1] else {
        panic!()
    };
    assert_eq!(req.registration_id, REG);
    assert_eq!(req.id_scope, SCOPE);
    assert_eq!(req.api_version.as_deref(), Some("2019-03-31"));
    assert_eq!(req.body.payload, Some(serde_json::json!({"a":1})));
}

#[tokio::test]
async fn retry_after_defaults_on_202_and_absent_on_200() {
    let svc = Fake::with(vec![assigning("op", None), assigned("op", REG)]);
    let mut s = connected(&svc).await;
    let out = feed(
        &mut s,
        &svc,
        vec![
            publish(0, &format!("{REGISTER}1"), QoS::AtMostOnce, b""),
            publish(
                0,
                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=op",
                QoS::AtMostOnce,
                b" ",
            ),
        ],
    )
    .await;
    let topics: Vec<_> = out
        .iter()
        .map(|o| match o {
            Out::Packet(Packet::Publish(p)) => p.topic.clone(),
            o => panic!("{o:?}"),
        })
        .collect();
    assert_eq!(
        topics,
        vec![
            "$dps/registrations/res/202/?$rid=1&retry-after=3".to_string(),
            "$dps/registrations/res/200/?$rid=2".to_string(),
        ]
    );
    let Seen::Status(_, op) = &svc.seen()[2] else {
        panic!()
    };
    assert_eq!(op, "op");
    let Out::Packet(Packet::Publish(p)) = &out[1] else {
        panic!()
    };
    assert_eq!(
        json(p)["registrationState"]["assignedHub"],
        "hub1.azure-devices.net"
    );
}

#[tokio::test]
async fn error_responses() {
    // The service returns domain errors; the session renders them through the one mapping.
    let cases = vec![
        (
            Error::Unauthorized(AuthFailure::MissingCredential),
            401,
            None,
        ),
        (Error::not_found("registration", "x"), 404, None),
        (Error::Throttled { retry_after: 7 }, 429, Some(7)),
        (Error::Internal("x".into()), 500, Some(3)),
    ];
    for (err, status, ra) in cases {
        let err = WireError::from(&err);
        let code = err.error_code;
        let svc = Fake::with(vec![Err(err)]);
        let mut s = connected(&svc).await;
        let out = feed(
            &mut s,
            &svc,
            vec![publish(
                5,
                &format!("{REGISTER}r{status}"),
                QoS::AtLeastOnce,
                b"{}",
            )],
        )
        .await;
        assert_eq!(out[0], Out::Packet(Packet::PubAck(PubAck::new(5))));
        let Out::Packet(Packet::Publish(p)) = &out[1] else {
            panic!()
        };
        let t = parse_response_topic(&p.topic).unwrap();
        assert_eq!(
            (t.status, t.rid.as_str(), t.retry_after),
            (status, format!("r{status}").as_str(), ra)
        );
        let body = json(p);
        assert_eq!(body["errorCode"], code);
        assert_eq!(body["errorCode"].as_u64().unwrap() / 1000, status as u64);
        assert!(uuid::Uuid::parse_str(body["trackingId"].as_str().unwrap()).is_ok());
        let ts = body["timestampUtc"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.len() == 28, "{ts}");
        assert!(body["message"].is_string());
    }
}

#[tokio::test]
async fn bad_json_body_is_400_not_disconnect() {
    let svc = Fake::new();
    let mut s = connected(&svc).await;
    let out = feed(
        &mut s,
        &svc,
        vec![
            publish(3, &format!("{REGISTER}9"), QoS::AtLeastOnce, b"not json"),
            Packet::PingReq,
        ],
    )
    .await;
    assert_eq!(out[0], Out::Packet(Packet::PubAck(PubAck::new(3))));
    let Out::Packet(Packet::Publish(p)) = &out[1] else {
        panic!()
    };
    assert_eq!(p.topic, "$dps/registrations/res/400/?$rid=9");
    assert_eq!(json(p)["errorCode"], 400004);
    assert_eq!(out[2], Out::Packet(Packet::PingResp));
    assert_eq!(svc.seen().len(), 1, "service not called");
    // Poll bodies are ignored, even if not JSON (C SDK re-sends the registration; others " ").
    let out = feed(
        &mut s,
        &svc,
        vec![publish(
            0,
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=3&operationId=o",
            QoS::AtMostOnce,
            b"junk",
        )],
    )
    .await;
    let Out::Packet(Packet::Publish(p)) = &out[0] else {
        panic!()
    };
    assert!(p.topic.starts_with("$dps/registrations/res/202/?$rid=3"));
}

#[tokio::test]
async fn unknown_topics_and_missing_parameters() {
    let svc = Fake::new();
    let mut s = connected(&svc).await;
    let out = feed(
        &mut s,
        &svc,
        vec![
            publish(
                1,
                "$dps/registrations/POST/whatever/?$rid=u1",
                QoS::AtLeastOnce,
                b"",
            ),
            publish(2, "devices/dev1/messages/events/", QoS::AtLeastOnce, b""),
            publish(
                3,
                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=u3",
                QoS::AtLeastOnce,
                b"",
            ),
            publish(
                4,
                "$dps/registrations/PUT/iotdps-register/",
                QoS::AtLeastOnce,
                b"",
            ),
        ],
    )
    .await;
    let topics: Vec<String> = out
        .iter()
        .map(|o| match o {
            Out::Packet(Packet::Publish(p)) => p.topic.clone(),
            Out::Packet(Packet::PubAck(a)) => format!("puback {}", a.pkid),
            o => panic!("{o:?}"),
        })
        .collect();
    assert_eq!(
        topics,
        vec![
            "puback 1",
            "$dps/registrations/res/404/?$rid=u1",
            "puback 2",
            "puback 3",
            "$dps/registrations/res/400/?$rid=u3",
            "puback 4",
        ]
    );
    assert_eq!(svc.seen().len(), 1);
}

#[tokio::test]
async fn publish_before_subscribe_is_answered_at_qos1() {
    let svc = Fake::new();
    let mut s = connected(&svc).await;
    let out = feed(
        &mut s,
        &svc,
        vec![publish(0, &format!("{REGISTER}1"), QoS::AtMostOnce, b"")],
    )
    .await;
    let Out::Packet(Packet::Publish(p)) = &out[0] else {
        panic!()
    };
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert_eq!(p.pkid, 1);
}

#[tokio::test]
async fn qos2_publish_closes() {
    let svc = Fake::new();
    let mut s = connected(&svc).await;
    let out = feed(
        &mut s,
        &svc,
        vec![publish(1, &format!("{REGISTER}1"), QoS::ExactlyOnce, b"")],
    )
    .await;
    assert!(matches!(
        out[..],
        [Out::Closed(CloseReason::ProtocolViolation(_))]
    ));
}

#[tokio::test]
async fn unsupported_protocol_gets_connack_1() {
    let mut s = Session::new(Transport::Mqtt, vec![]);
    let a = s.unsupported_protocol();
    assert!(
        matches!(&a[0], dps_mqtt::Action::Send(Packet::ConnAck(c)) if c.code == ConnectReturnCode::RefusedProtocolVersion)
    );
}

//! One real TCP connection, with rumqttc as the device.

mod common;
use common::*;
use dps_core::device::{ConnectRefusal, DeviceService, Transport};
use dps_mqtt::{serve_connection, MqttLimits};
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, Incoming, MqttOptions, QoS};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

async fn listen(svc: Arc<Fake>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let svc: Arc<dyn DeviceService> = svc.clone();
            tokio::spawn(serve_connection(
                s,
                None,
                vec![],
                Transport::Mqtt,
                svc,
                MqttLimits::default(),
            ));
        }
    });
    port
}

fn options(port: u16, reg: &str) -> MqttOptions {
    let mut o = MqttOptions::new(reg, "127.0.0.1", port);
    o.set_credentials(
        username("0ne00000A0A", reg),
        "SharedAccessSignature sr=x&sig=y&se=1",
    );
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(false); // as Python and Java do
    o
}

#[tokio::test]
async fn rumqttc_register_and_poll() {
    let svc = Fake::with(vec![
        assigning("4.abc.op", Some(1)),
        assigned("4.abc.op", "tcp-dev"),
    ]);
    let port = listen(svc.clone()).await;
    let (client, mut el) = AsyncClient::new(options(port, "tcp-dev"), 10);
    client
        .subscribe("$dps/registrations/res/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .publish(
            "$dps/registrations/PUT/iotdps-register/?$rid=42",
            QoS::AtLeastOnce,
            false,
            r#"{"registrationId":"tcp-dev"}"#,
        )
        .await
        .unwrap();
    let mut responses = Vec::new();
    let run = async {
        loop {
            match el.poll().await.unwrap() {
                Event::Incoming(Incoming::ConnAck(a)) => {
                    assert_eq!(a.code, ConnectReturnCode::Success);
                    assert!(!a.session_present);
                }
                Event::Incoming(Incoming::SubAck(s)) => {
                    assert_eq!(
                        s.return_codes,
                        vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
                    );
                }
                Event::Incoming(Incoming::Publish(p)) => {
                    responses.push(p.topic.clone());
                    let body: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                    if responses.len() == 1 {
                        assert_eq!(body["status"], "assigning");
                        client
                            .publish(
                                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=43&operationId=4.abc.op",
                                QoS::AtLeastOnce,
                                false,
                                " ",
                            )
                            .await
                            .unwrap();
                    } else {
                        assert_eq!(body["status"], "assigned");
                        client.disconnect().await.unwrap();
                    }
                }
                Event::Outgoing(rumqttc::Outgoing::Disconnect) => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap();
    assert_eq!(
        responses,
        vec![
            "$dps/registrations/res/202/?$rid=42&retry-after=1".to_string(),
            "$dps/registrations/res/200/?$rid=43".to_string(),
        ]
    );
    assert!(matches!(&svc.seen()[2], Seen::Status(_, op) if op == "4.abc.op"));
}

#[tokio::test]
async fn rumqttc_refused() {
    let port = listen(Fake::refusing(ConnectRefusal::NotAuthorized)).await;
    let (_client, mut el) = AsyncClient::new(options(port, "nope"), 10);
    let err = tokio::time::timeout(Duration::from_secs(10), el.poll())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
        ),
        "{err:?}"
    );
}

//! The async driver over in-memory streams (tokio duplex and a WebSocket-message channel).

mod common;
use bytes::{Bytes, BytesMut};
use common::*;
use dps_core::device::{DeviceService, Transport};
use dps_mqtt::{serve_connection, serve_ws_messages, MqttError, MqttLimits};
use futures::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet, PubAck};
use rumqttc::mqttbytes::QoS;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

const SAS: &str = "SharedAccessSignature sr=x&sig=y&se=1";

fn start(svc: Arc<Fake>, limits: MqttLimits) -> (DuplexStream, JoinHandle<Result<(), MqttError>>) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let svc: Arc<dyn DeviceService> = svc;
    let h = tokio::spawn(serve_connection(
        server,
        None,
        vec![],
        Transport::Mqtt,
        svc,
        limits,
    ));
    (client, h)
}

async fn read_packets(c: &mut DuplexStream, buf: &mut BytesMut, n: usize) -> Vec<Packet> {
    let mut out = Vec::new();
    while out.len() < n {
        out.extend(decode_all(buf));
        if out.len() >= n {
            break;
        }
        let r = c.read_buf(buf).await.unwrap();
        assert!(r > 0, "server closed early; got {out:?}");
    }
    out
}

fn hello(reg: &str) -> Vec<Packet> {
    vec![
        connect(reg, Some(&username("0ne1", reg)), Some(SAS)),
        subscribe(1, "$dps/registrations/res/#", QoS::AtLeastOnce),
    ]
}

#[tokio::test]
async fn full_exchange_byte_by_byte() {
    let svc = Fake::with(vec![assigning("op1", Some(2)), assigned("op1", "dev1")]);
    let (mut c, h) = start(svc.clone(), MqttLimits::default());
    let mut pk = hello("dev1");
    pk.push(publish(
        2,
        "$dps/registrations/PUT/iotdps-register/?$rid=a",
        QoS::AtLeastOnce,
        b"{\"registrationId\":\"dev1\"}",
    ));
    pk.push(publish(
        3,
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=b&operationId=op1",
        QoS::AtLeastOnce,
        b" ",
    ));
    pk.push(Packet::PingReq);
    // One byte at a time: packets split across arbitrary boundaries.
    for b in encode(&pk).iter() {
        c.write_all(&[*b]).await.unwrap();
    }
    let mut buf = BytesMut::new();
    let got = read_packets(&mut c, &mut buf, 7).await;
    assert_eq!(
        got[0],
        Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))
    );
    assert!(matches!(got[1], Packet::SubAck(ref s) if s.pkid == 1));
    let pos = |f: &dyn Fn(&Packet) -> bool| got.iter().position(f).unwrap();
    let ack2 = pos(&|p| *p == Packet::PubAck(PubAck::new(2)));
    let res_a = pos(
        &|p| matches!(p, Packet::Publish(x) if x.topic == "$dps/registrations/res/202/?$rid=a&retry-after=2"),
    );
    let ack3 = pos(&|p| *p == Packet::PubAck(PubAck::new(3)));
    let res_b = pos(
        &|p| matches!(p, Packet::Publish(x) if x.topic == "$dps/registrations/res/200/?$rid=b"),
    );
    assert!(ack2 < res_a && ack3 < res_b, "{got:?}");
    assert!(got.contains(&Packet::PingResp));
    c.write_all(&encode(&[Packet::Disconnect])).await.unwrap();
    h.await.unwrap().unwrap();
}

#[tokio::test]
async fn malformed_packet_closes_only_that_connection() {
    let svc = Fake::new();
    let (mut good, hg) = start(svc.clone(), MqttLimits::default());
    let (mut bad, hb) = start(svc.clone(), MqttLimits::default());
    good.write_all(&encode(&hello("good"))).await.unwrap();
    bad.write_all(&encode(&hello("bad"))).await.unwrap();
    let mut buf = BytesMut::new();
    read_packets(&mut bad, &mut buf, 2).await;
    // Packet type 15 (reserved) / garbage.
    bad.write_all(&[0xF0, 0x00]).await.unwrap();
    let r = hb.await.unwrap();
    assert!(matches!(r, Err(MqttError::Decode(_))), "{r:?}");
    // The other connection still works.
    good.write_all(&encode(&[publish(
        0,
        "$dps/registrations/PUT/iotdps-register/?$rid=g",
        QoS::AtMostOnce,
        b"",
    )]))
    .await
    .unwrap();
    let mut buf = BytesMut::new();
    let got = read_packets(&mut good, &mut buf, 3).await;
    assert!(matches!(&got[2], Packet::Publish(p) if p.topic.contains("$rid=g")));
    drop(good);
    hg.await.unwrap().unwrap();
}

#[tokio::test]
async fn truncated_and_invalid_streams_error_without_panic() {
    for bytes in [
        vec![0x10u8, 0x05, 0x00, 0x04, b'M'], // truncated CONNECT then EOF
        vec![0x82, 0x02, 0x00, 0x01],         // SUBSCRIBE before CONNECT
        vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x7f], // malformed remaining length
    ] {
        let (mut c, h) = start(Fake::new(), MqttLimits::default());
        c.write_all(&bytes).await.unwrap();
        c.shutdown().await.unwrap();
        assert!(h.await.unwrap().is_err());
    }
}

#[tokio::test]
async fn oversized_packet_closes() {
    let limits = MqttLimits {
        max_packet_size: 1024,
        ..Default::default()
    };
    let (mut c, h) = start(Fake::new(), limits);
    c.write_all(&encode(&hello("dev1"))).await.unwrap();
    // Only the header of a 200 KB publish: rejected before the body arrives.
    c.write_all(&[0x30, 0xc0, 0x9a, 0x0c]).await.unwrap();
    assert!(matches!(
        h.await.unwrap(),
        Err(MqttError::PacketTooLarge(_))
    ));
}

#[tokio::test]
async fn mqtt31_and_mqtt5_get_connack_1() {
    for level in [3u8, 5] {
        let (mut c, h) = start(Fake::new(), MqttLimits::default());
        let mut b = encode(&[connect("dev1", Some(&username("s", "dev1")), Some(SAS))]);
        let at = b.windows(4).position(|w| w == b"MQTT").unwrap() + 4;
        b[at] = level;
        c.write_all(&b).await.unwrap();
        let mut buf = BytesMut::new();
        let got = read_packets(&mut c, &mut buf, 1).await;
        assert_eq!(
            got[0],
            Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::RefusedProtocolVersion,
                false
            ))
        );
        assert!(matches!(
            h.await.unwrap(),
            Err(MqttError::Refused(
                ConnectReturnCode::RefusedProtocolVersion
            ))
        ));
    }
}

#[tokio::test(start_paused = true)]
async fn keep_alive_timeout() {
    let (mut c, h) = start(Fake::new(), MqttLimits::default());
    // keep_alive = 60 in connect(): pings every 50 s keep it up.
    c.write_all(&encode(&hello("dev1"))).await.unwrap();
    let mut buf = BytesMut::new();
    read_packets(&mut c, &mut buf, 2).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(50)).await;
        c.write_all(&encode(&[Packet::PingReq])).await.unwrap();
        assert_eq!(
            read_packets(&mut c, &mut buf, 1).await,
            vec![Packet::PingResp]
        );
    }
    assert!(!h.is_finished());
    let t0 = tokio::time::Instant::now();
    let r = h.await.unwrap();
    assert!(matches!(r, Err(MqttError::KeepAliveTimeout)), "{r:?}");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(89) && waited <= Duration::from_secs(91),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_with_only_pings() {
    let limits = MqttLimits {
        idle_timeout: Duration::from_secs(120),
        ..Default::default()
    };
    let (mut c, h) = start(Fake::new(), limits);
    c.write_all(&encode(&hello("dev1"))).await.unwrap();
    let mut buf = BytesMut::new();
    read_packets(&mut c, &mut buf, 2).await;
    let t0 = tokio::time::Instant::now();
    let pinger = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            if c.write_all(&encode(&[Packet::PingReq])).await.is_err() {
                break;
            }
            let mut b = [0u8; 16];
            if c.read(&mut b).await.unwrap_or(0) == 0 {
                break;
            }
        }
    });
    let r = h.await.unwrap();
    assert!(matches!(r, Err(MqttError::IdleTimeout)), "{r:?}");
    assert!(t0.elapsed() <= Duration::from_secs(121));
    pinger.abort();
}

#[tokio::test(start_paused = true)]
async fn connect_timeout() {
    let (_c, h) = start(Fake::new(), MqttLimits::default());
    assert!(matches!(h.await.unwrap(), Err(MqttError::ConnectTimeout)));
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_bounded_and_acked_first() {
    let svc = Arc::new(Fake {
        delay: Some(Duration::from_secs(1)),
        ..Default::default()
    });
    let limits = MqttLimits {
        max_inflight: 2,
        ..Default::default()
    };
    let (mut c, h) = start(svc.clone(), limits);
    let mut pk = hello("dev1");
    for i in 0..5u16 {
        pk.push(publish(
            10 + i,
            &format!("$dps/registrations/PUT/iotdps-register/?$rid={i}"),
            QoS::AtLeastOnce,
            b"",
        ));
    }
    let t0 = tokio::time::Instant::now();
    c.write_all(&encode(&pk)).await.unwrap();
    let mut buf = BytesMut::new();
    let got = read_packets(&mut c, &mut buf, 2 + 10).await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(4),
        "{took:?}"
    );
    for i in 0..5u16 {
        let ack = got
            .iter()
            .position(|p| *p == Packet::PubAck(PubAck::new(10 + i)))
            .unwrap();
        let res = got
            .iter()
            .position(
                |p| matches!(p, Packet::Publish(x) if x.topic.contains(&format!("$rid={i}&"))),
            )
            .unwrap();
        assert!(ack < res);
    }
    // 5 requests, 2 at a time, 1 s each: 3 s.
    drop(c);
    let _ = h.await;
}

#[tokio::test]
async fn websocket_messages_split_and_combined() {
    let svc = Fake::new();
    let (mut to_server, from_client) =
        futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let (to_client, mut from_server) = futures::channel::mpsc::channel::<Bytes>(64);
    let svc2: Arc<dyn DeviceService> = svc.clone();
    let h = tokio::spawn(serve_ws_messages(
        from_client,
        to_client,
        None,
        vec![],
        Transport::MqttWs,
        svc2,
        MqttLimits::default(),
    ));
    let mut pk = hello("dev1");
    pk.push(publish(
        2,
        "$dps/registrations/PUT/iotdps-register/?$rid=w",
        QoS::AtLeastOnce,
        b"{}",
    ));
    let all = encode(&pk).freeze();
    // Frames of 1, 2, 3, ... bytes: packets split across frames and sharing frames.
    let mut off = 0;
    let mut size = 1;
    while off < all.len() {
        let end = (off + size).min(all.len());
        to_server.send(Ok(all.slice(off..end))).await.unwrap();
        off = end;
        size += 1;
    }
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    while got.len() < 4 {
        buf.extend_from_slice(&from_server.next().await.unwrap());
        got.extend(decode_all(&mut buf));
    }
    assert_eq!(got[2], Packet::PubAck(PubAck::new(2)));
    assert!(
        matches!(&got[3], Packet::Publish(p) if p.topic == "$dps/registrations/res/202/?$rid=w&retry-after=3")
    );
    let Seen::Register(req) = &svc.seen()[1] else {
        panic!()
    };
    assert_eq!(req.transport, Transport::MqttWs);
    drop(to_server); // stream ends = socket closed
    h.await.unwrap().unwrap();
}

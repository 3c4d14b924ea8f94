//! Deterministic, synchronous entry point for fuzzing the packet path and the session.

use crate::codec::{self, Decoded, Frame};
use crate::session::{Action, CallOutcome, Session};
use bytes::BytesMut;
use dps_core::device::{ConnectRefusal, DeviceResponse, Transport};
use dps_core::model::{RegistrationOperationStatus, RegistrationStatus};
use dps_core::wire::WireError;
use rumqttc::mqttbytes::v4::Packet;

/// Feed `data` (first byte: chunking and outcome selector; rest: the client byte stream)
/// through the decoder and the [`Session`], with canned service answers, and check that every
/// packet we would send re-decodes. Must never panic.
pub fn fuzz_entry(data: &[u8]) {
    let Some((&ctl, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(ctl % 16) + 1;
    let mut session = Session::new(
        Transport::Mqtt,
        if ctl & 0x80 != 0 {
            vec![vec![1, 2, 3]]
        } else {
            Vec::new()
        },
    );
    let mut buf = BytesMut::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let frame = match codec::decode(&mut buf, 4096, session.awaiting_connect()) {
                Ok(Decoded::NeedMore(_)) => break,
                Ok(Decoded::Frame(f)) => f,
                Err(_) => return,
            };
            let actions = match frame {
                Frame::UnsupportedProtocol => session.unsupported_protocol(),
                Frame::Packet(p) => session.handle(p),
            };
            if !run_actions(&mut session, actions, ctl) {
                return;
            }
        }
    }
}

fn run_actions(session: &mut Session, actions: Vec<Action>, ctl: u8) -> bool {
    let mut queue: std::collections::VecDeque<Action> = actions.into();
    let mut out = BytesMut::new();
    while let Some(a) = queue.pop_front() {
        match a {
            Action::Send(p) => {
                out.clear();
                codec::encode(&p, &mut out).expect("encode");
                let back = Packet::read(&mut out, usize::MAX).expect("re-decode");
                assert_eq!(back, p, "encode/decode round trip");
            }
            Action::Authorize(_) => {
                let r = if ctl & 0x40 != 0 {
                    Err(ConnectRefusal::NotAuthorized)
                } else {
                    Ok(())
                };
                queue.extend(session.connect_result(r));
            }
            Action::Call(c) => {
                let result = if ctl & 0x20 != 0 {
                    Err(WireError::from(&dps_core::Error::Throttled {
                        retry_after: 1,
                    }))
                } else {
                    Ok(DeviceResponse {
                        status: 202,
                        body: RegistrationOperationStatus {
                            operation_id: "4.0123456789abcdef.op".into(),
                            status: RegistrationStatus::Assigning,
                            registration_state: None,
                        },
                        retry_after: None,
                    })
                };
                queue.extend(session.call_result(CallOutcome {
                    rid: c.rid,
                    result,
                    dropped: false,
                }));
            }
            Action::Close(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::fuzz_entry;
    use rand::{Rng, SeedableRng};

    #[test]
    fn random_inputs_do_not_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let n = rng.random_range(0..256);
            let data: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            fuzz_entry(&data);
        }
    }

    /// A valid device conversation, then random byte flips, truncations and insertions.
    #[test]
    fn mutated_sessions_do_not_panic() {
        use bytes::BytesMut;
        use rumqttc::mqttbytes::v4::{Connect, Packet, Publish, Subscribe};
        use rumqttc::mqttbytes::QoS;
        let mut c = Connect::new("dev1");
        c.set_login(
            "0ne1/registrations/dev1/api-version=2019-03-31",
            "SharedAccessSignature x",
        );
        let mut sub = Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce);
        sub.pkid = 1;
        let mut reg = Publish::new(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            QoS::AtLeastOnce,
            br#"{"registrationId":"dev1","payload":{"a":[1,2]}}"#.to_vec(),
        );
        reg.pkid = 2;
        let poll = Publish::new(
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=4.a.b",
            QoS::AtMostOnce,
            b" ".to_vec(),
        );
        let mut base = BytesMut::new();
        for p in [
            Packet::Connect(c),
            Packet::Subscribe(sub),
            Packet::Publish(reg),
            Packet::PingReq,
            Packet::Publish(poll),
            Packet::Disconnect,
        ] {
            p.write(&mut base, usize::MAX).unwrap();
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for ctl in 0..=255u8 {
            let mut data = vec![ctl];
            data.extend_from_slice(&base);
            fuzz_entry(&data); // unmutated: full conversation
        }
        for _ in 0..50_000 {
            let mut data = vec![rng.random::<u8>()];
            data.extend_from_slice(&base);
            for _ in 0..rng.random_range(1..4) {
                if data.len() < 2 {
                    break;
                }
                let i = rng.random_range(1..data.len());
                match rng.random_range(0..4) {
                    0 => data[i] = rng.random(),
                    1 => data[i] ^= 1 << rng.random_range(0..8),
                    2 => data.truncate(i),
                    _ => data.insert(i, rng.random()),
                }
            }
            fuzz_entry(&data);
        }
    }
}

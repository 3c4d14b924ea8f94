//! Shared test helpers: a fake DeviceService and a synchronous session driver.
#![allow(dead_code)]

use async_trait::async_trait;
use bytes::BytesMut;
use dps_core::device::{
    ConnectRefusal, DeviceCredential, DeviceRequest, DeviceResponse, DeviceService,
};
use dps_core::model::{DeviceRegistrationState, RegistrationOperationStatus, RegistrationStatus};
use dps_core::wire::WireError;
use dps_core::Error;
use dps_mqtt::session::{Action, CloseReason, Session};
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// What the fake saw.
#[derive(Debug, Clone)]
pub enum Seen {
    Authorize {
        id_scope: String,
        registration_id: String,
        credential: DeviceCredential,
    },
    Register(DeviceRequest),
    Status(DeviceRequest, String),
}

/// A fake DeviceService: canned answers, recorded requests.
#[derive(Default)]
pub struct Fake {
    pub connect: Mutex<Option<ConnectRefusal>>,
    pub answers: Mutex<VecDeque<Result<DeviceResponse, WireError>>>,
    pub seen: Mutex<Vec<Seen>>,
    /// The canned wire error of the call in progress: the service port returns domain errors,
    /// so the fake returns a placeholder and [`run`] puts the canned wire error (captured from
    /// Azure) in the call's outcome, which is what the session renders.
    pub wire_error: Mutex<Option<WireError>>,
    /// Delay each service call (tests of ordering/concurrency).
    pub delay: Option<std::time::Duration>,
}

pub fn assigning(op: &str, retry_after: Option<u32>) -> Result<DeviceResponse, WireError> {
    Ok(DeviceResponse {
        status: 202,
        body: RegistrationOperationStatus {
            operation_id: op.into(),
            status: RegistrationStatus::Assigning,
            registration_state: None,
        },
        retry_after,
    })
}

pub fn assigned(op: &str, reg: &str) -> Result<DeviceResponse, WireError> {
    let state: DeviceRegistrationState = serde_json::from_value(serde_json::json!({
        "registrationId": reg, "assignedHub": "hub1.azure-devices.net", "deviceId": reg,
        "status": "assigned", "substatus": "initialAssignment"
    }))
    .unwrap();
    Ok(DeviceResponse {
        status: 200,
        body: RegistrationOperationStatus {
            operation_id: op.into(),
            status: RegistrationStatus::Assigned,
            registration_state: Some(state),
        },
        retry_after: None,
    })
}

impl Fake {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub fn with(answers: Vec<Result<DeviceResponse, WireError>>) -> Arc<Self> {
        Arc::new(Fake {
            answers: Mutex::new(answers.into()),
            ..Default::default()
        })
    }
    pub fn refusing(r: ConnectRefusal) -> Arc<Self> {
        Arc::new(Fake {
            connect: Mutex::new(Some(r)),
            ..Default::default()
        })
    }
    fn next(&self) -> Result<DeviceResponse, Error> {
        let answer = self
            .answers
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| assigning("4.0000000000000000.op", Some(3)));
        answer.map_err(|w| {
            *self.wire_error.lock().unwrap() = Some(w);
            Error::Internal("canned wire error".into())
        })
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

#[async_trait]
impl DeviceService for Fake {
    async fn register(&self, req: DeviceRequest) -> Result<DeviceResponse, Error> {
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        self.seen.lock().unwrap().push(Seen::Register(req));
        self.next()
    }
    async fn operation_status(
        &self,
        req: DeviceRequest,
        operation_id: &str,
    ) -> Result<DeviceResponse, Error> {
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        self.seen
            .lock()
            .unwrap()
            .push(Seen::Status(req, operation_id.to_string()));
        self.next()
    }
    async fn registration_status(
        &self,
        _req: DeviceRequest,
    ) -> Result<DeviceRegistrationState, Error> {
        Err(Error::Unsupported("not over MQTT".into()))
    }
    async fn authorize_connect(
        &self,
        _transport: dps_core::device::Transport,
        id_scope: &str,
        registration_id: &str,
        credential: &DeviceCredential,
        _peer: Option<std::net::IpAddr>,
    ) -> Result<(), ConnectRefusal> {
        self.seen.lock().unwrap().push(Seen::Authorize {
            id_scope: id_scope.into(),
            registration_id: registration_id.into(),
            credential: credential.clone(),
        });
        match *self.connect.lock().unwrap() {
            Some(r) => Err(r),
            None => Ok(()),
        }
    }
}

/// What the session emitted, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Packet(Packet),
    Closed(CloseReason),
}

/// Run the session's actions sequentially against `svc` (no sockets).
pub async fn run(session: &mut Session, svc: &Arc<Fake>, actions: Vec<Action>, out: &mut Vec<Out>) {
    let mut q: VecDeque<Action> = actions.into();
    while let Some(a) = q.pop_front() {
        match a {
            Action::Send(p) => out.push(Out::Packet(p)),
            Action::Authorize(auth) => {
                let r = auth.run(&**svc).await;
                for a in session.connect_result(r).into_iter().rev() {
                    q.push_front(a);
                }
            }
            Action::Call(call) => {
                let mut o = call.run(svc.clone() as Arc<dyn DeviceService>).await;
                if let Some(w) = svc.wire_error.lock().unwrap().take() {
                    o.result = Err(w);
                }
                for a in session.call_result(o).into_iter().rev() {
                    q.push_front(a);
                }
            }
            Action::Close(r) => {
                out.push(Out::Closed(r));
                return;
            }
        }
    }
}

/// Feed packets and collect the outputs.
pub async fn feed(session: &mut Session, svc: &Arc<Fake>, packets: Vec<Packet>) -> Vec<Out> {
    let mut out = Vec::new();
    for p in packets {
        let actions = session.handle(p);
        run(session, svc, actions, &mut out).await;
        if matches!(out.last(), Some(Out::Closed(_))) {
            break;
        }
    }
    out
}

pub fn connect(client_id: &str, username: Option<&str>, password: Option<&str>) -> Packet {
    let mut c = Connect::new(client_id);
    c.keep_alive = 60;
    if let Some(u) = username {
        c.set_login(u, password.unwrap_or(""));
    }
    Packet::Connect(c)
}

pub fn username(scope: &str, reg: &str) -> String {
    format!("{scope}/registrations/{reg}/api-version=2019-03-31&ClientVersion=azure-iot-provisioning-device%2F1.9.1")
}

pub fn subscribe(pkid: u16, filter: &str, qos: QoS) -> Packet {
    let mut s = Subscribe::new(filter, qos);
    s.pkid = pkid;
    Packet::Subscribe(s)
}

pub fn publish(pkid: u16, topic: &str, qos: QoS, body: &[u8]) -> Packet {
    let mut p = Publish::new(topic, qos, body.to_vec());
    p.pkid = pkid;
    Packet::Publish(p)
}

pub fn encode(packets: &[Packet]) -> BytesMut {
    let mut b = BytesMut::new();
    for p in packets {
        p.write(&mut b, usize::MAX).unwrap();
    }
    b
}

/// Decode every complete packet from `buf`.
pub fn decode_all(buf: &mut BytesMut) -> Vec<Packet> {
    let mut v = Vec::new();
    while let Ok(p) = Packet::read(buf, usize::MAX) {
        v.push(p);
    }
    v
}

pub fn json(p: &Publish) -> serde_json::Value {
    serde_json::from_slice(&p.payload).unwrap()
}

//! Arbitrary client bytes through dps-amqp (the AMQP 1.0 device endpoint). The first input byte
//! selects the mode, the rest is the client's byte stream:
//!   even: the framing and decoders alone: `frame::decode` (with the pre-OPEN limit when bit 1
//!         is set), `frame::performative`, `sasl-init` and SASL PLAIN, link addresses, and
//!         `message::parse_request` on every transfer payload;
//!   odd:  the whole connection driver, `serve_connection`, over an in-memory stream: the
//!         protocol headers, SASL (bit 2: the canned service refuses the credential), OPEN,
//!         sessions, links, flow, transfers (bit 3: the service answers with a throttling
//!         error) and the pre-auth limits; bit 4: the peer presents a client certificate
//!         (the X.509 path without SASL). Bits 5-7: the size of the chunks the bytes arrive in.
//! Must never panic or hang: the client side is shut down after the bytes and the server's
//! output is drained, so the driver ends at the end of the stream; a driver that waits for
//! anything else (its open or idle deadline) is a hang libFuzzer's -timeout reports.
#![no_main]

use async_trait::async_trait;
use bytes::BytesMut;
use dps_amqp::frame::{self, Decoded};
use dps_amqp::{AmqpLimits, Transport};
use dps_core::device::{
    ConnectRefusal, DeviceCredential, DeviceRequest, DeviceResponse, DeviceService,
};
use dps_core::model::{DeviceRegistrationState, RegistrationOperationStatus, RegistrationStatus};
use dps_core::Error;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Canned {
    refuse: bool,
    throttle: bool,
}

#[async_trait]
impl DeviceService for Canned {
    async fn register(&self, _req: DeviceRequest) -> Result<DeviceResponse, Error> {
        if self.throttle {
            return Err(Error::Throttled { retry_after: 1 });
        }
        Ok(DeviceResponse {
            status: 202,
            body: RegistrationOperationStatus {
                operation_id: "4.0123456789abcdef.op".into(),
                status: RegistrationStatus::Assigning,
                registration_state: None,
            },
            retry_after: None,
        })
    }
    async fn operation_status(
        &self,
        req: DeviceRequest,
        _operation_id: &str,
    ) -> Result<DeviceResponse, Error> {
        self.register(req).await
    }
    async fn registration_status(
        &self,
        _req: DeviceRequest,
    ) -> Result<DeviceRegistrationState, Error> {
        Err(Error::invalid("not over AMQP"))
    }
    async fn authorize_connect(
        &self,
        _transport: Transport,
        _id_scope: &str,
        _registration_id: &str,
        _credential: &DeviceCredential,
        _peer: Option<std::net::IpAddr>,
    ) -> Result<(), ConnectRefusal> {
        if self.refuse {
            Err(ConnectRefusal::NotAuthorized)
        } else {
            Ok(())
        }
    }
}

fn decoders(ctl: u8, data: &[u8]) {
    let max = if ctl & 2 != 0 {
        dps_amqp::PRE_OPEN_MAX_FRAME
    } else {
        AmqpLimits::default().max_frame_size as usize
    };
    let mut buf = BytesMut::from(data);
    while let Ok(Decoded::Frame(f)) = frame::decode(&mut buf, max) {
        // As the server does: the encoding is checked before serde_amqp decodes it.
        if f.frame_type == frame::TYPE_SASL && frame::check_encoding(&f.body).is_ok() {
            if let Ok(init) = serde_amqp::from_slice::<fe2o3_amqp_types::sasl::SaslInit>(&f.body) {
                if let Some(c) = init
                    .initial_response
                    .as_ref()
                    .and_then(|r| dps_amqp::address::parse_plain(r))
                {
                    let _ = dps_amqp::address::parse(&c.authcid);
                }
            }
            continue;
        }
        if let Ok((p, payload)) = frame::performative(&f.body) {
            if let fe2o3_amqp_types::performatives::Performative::Attach(a) = &p {
                if let Some(addr) = a.source.as_ref().and_then(|s| s.address.as_deref()) {
                    let _ = dps_amqp::address::parse(addr);
                }
            }
            if !payload.is_empty() {
                let _ = dps_amqp::message::parse_request(&payload);
            }
        }
    }
}

fn driver(ctl: u8, data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let chunk = 1usize << (ctl >> 5); // 1 to 128 bytes
    let certs = if ctl & 16 != 0 {
        vec![vec![0x30, 0x03, 0x02, 0x01, 0x01]]
    } else {
        Vec::new()
    };
    let svc: Arc<dyn DeviceService> = Arc::new(Canned {
        refuse: ctl & 4 != 0,
        throttle: ctl & 8 != 0,
    });
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(16 * 1024);
        let serve = tokio::spawn(dps_amqp::serve_connection(
            server,
            None,
            certs,
            Transport::Amqp,
            svc,
            AmqpLimits::default(),
        ));
        let (mut rd, mut wr) = tokio::io::split(client);
        // Read what the server answers (so that it never blocks on a full pipe).
        let drain = tokio::spawn(async move {
            let mut sink = vec![0u8; 4096];
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        for piece in data.chunks(chunk) {
            if wr.write_all(piece).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
        let _ = serve.await.expect("the driver does not panic");
        drop(wr);
        let _ = drain.await;
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    if ctl & 1 == 0 {
        decoders(ctl, rest);
    } else {
        driver(ctl, rest);
    }
});

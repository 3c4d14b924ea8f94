//! The device API over MQTT 3.1.1 + TLS (protocol digest §4), with rumqttc.

use crate::client::{interpret, Endpoint, RegistrationResult, Step, Timing};
use crate::wire::{
    device_sas, mqtt_username, parse_response_topic, poll_topic, register_topic, RESPONSE_FILTER,
};
use crate::Error;
use dps_core::model::{DeviceRegistration, RegistrationStatus};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls::ClientConfig;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

enum Next {
    Register,
    Poll(String),
}

fn map_connection_error(e: ConnectionError) -> Error {
    match e {
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword => {
                Error::Unauthorized {
                    error_code: None,
                    message: format!("the server refused the MQTT connection ({code:?})"),
                    tracking_id: None,
                }
            }
            other => Error::Service {
                status: 503,
                error_code: None,
                message: format!("the server refused the MQTT connection ({other:?})"),
                tracking_id: None,
            },
        },
        ConnectionError::Tls(e) => Error::Tls(e.to_string()),
        ConnectionError::Io(e) => crate::tls::describe_tls_error(&e),
        ConnectionError::NetworkTimeout => Error::Timeout,
        other => Error::Transport(other.to_string()),
    }
}

/// Register one device over a fresh MQTT connection.
pub(crate) async fn register(
    ep: &Endpoint,
    tls: Arc<ClientConfig>,
    registration_id: &str,
    key: Option<&str>,
    payload: Option<&Value>,
) -> Result<RegistrationResult, Error> {
    let started = Instant::now();
    let mut timing = Timing {
        new_connection: true,
        ..Default::default()
    };
    let mut opts = MqttOptions::new(registration_id, ep.host.as_str(), ep.port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_clean_session(true);
    let password = match key {
        Some(k) => device_sas(&ep.id_scope, registration_id, k, ep.sas_ttl)
            .ok_or_else(|| Error::Config("the device key is not valid base64".into()))?,
        None => String::new(),
    };
    opts.set_credentials(
        mqtt_username(&ep.id_scope, registration_id, &ep.api_version),
        password,
    );
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let (client, mut eventloop) = AsyncClient::new(opts, 8);
    eventloop
        .network_options
        .set_connection_timeout(ep.connect_timeout.as_secs().max(1));
    // As over HTTPS: small request/response packets must not wait for Nagle.
    eventloop.network_options.set_tcp_nodelay(true);
    client
        .try_subscribe(RESPONSE_FILTER, QoS::AtLeastOnce)
        .map_err(|e| Error::Transport(e.to_string()))?;
    let body = serde_json::to_vec(&DeviceRegistration {
        registration_id: Some(registration_id.to_string()),
        payload: payload.cloned(),
        ..Default::default()
    })
    .map_err(|e| Error::Config(e.to_string()))?;

    let mut rid: u64 = 0;
    let mut waiting_rid: Option<String> = None;
    let mut last = Next::Register;
    let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let mut retries = 0u32;
    let mut request_deadline: Option<Instant> = None;

    let send = |next: &Next, rid: &mut u64, timing: &mut Timing| -> Result<String, Error> {
        *rid += 1;
        let r = match next {
            Next::Register => {
                timing.attempts += 1;
                client.try_publish(register_topic(*rid), QoS::AtLeastOnce, false, body.clone())
            }
            Next::Poll(op) => {
                timing.polls += 1;
                client.try_publish(poll_topic(*rid, op), QoS::AtLeastOnce, false, Vec::new())
            }
        };
        r.map_err(|e| Error::Transport(e.to_string()))?;
        Ok(rid.to_string())
    };

    let result = loop {
        if let Some(d) = request_deadline {
            if Instant::now() > d {
                break Err(Error::Timeout);
            }
        }
        let event = tokio::select! {
            ev = eventloop.poll() => ev,
            _ = async { timer.as_mut().expect("guarded").await }, if timer.is_some() => {
                timer = None;
                match send(&last, &mut rid, &mut timing) {
                    Ok(r) => {
                        waiting_rid = Some(r);
                        request_deadline = Some(Instant::now() + ep.request_timeout);
                    }
                    Err(e) => break Err(e),
                }
                continue;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    break Err(Error::Protocol(
                        "the server refused the response subscription".into(),
                    ));
                }
                match send(&Next::Register, &mut rid, &mut timing) {
                    Ok(r) => {
                        waiting_rid = Some(r);
                        request_deadline = Some(Instant::now() + ep.request_timeout);
                    }
                    Err(e) => break Err(e),
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some(t) = parse_response_topic(&p.topic) else {
                    continue;
                };
                if waiting_rid.as_deref() != Some(t.rid.as_str()) {
                    continue;
                }
                waiting_rid = None;
                request_deadline = None;
                match interpret(t.status, &p.payload, t.retry_after, &ep.policy) {
                    Ok(Step::Done(operation_id, state)) => {
                        timing.elapsed = started.elapsed();
                        break Ok(RegistrationResult {
                            operation_id,
                            status: RegistrationStatus::Assigned,
                            state: *state,
                            timing,
                        });
                    }
                    Ok(Step::Poll(op, wait)) => {
                        retries = 0;
                        last = Next::Poll(op);
                        timer = Some(Box::pin(tokio::time::sleep(wait)));
                    }
                    Ok(Step::Retry(wait, err)) => {
                        retries += 1;
                        if retries > ep.policy.max_retries {
                            break Err(err);
                        }
                        timer = Some(Box::pin(tokio::time::sleep(wait)));
                    }
                    Err(e) => break Err(e),
                }
            }
            Ok(_) => {}
            Err(e) => break Err(map_connection_error(e)),
        }
    };

    // Say goodbye politely, without letting it delay the caller for long.
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    result
}

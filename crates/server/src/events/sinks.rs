//! The event sinks: an HTTPS webhook (one signed POST per event), an MQTT broker topic (QoS 1,
//! delivered once the broker acknowledged it) and a NATS subject (`PUB` in verbose mode,
//! delivered once the server answered `+OK`). A sink delivers a batch and answers per event.

use crate::config::{EventSinkConfig, EventSinkKind};
use dps_core::store::OutboxEvent;
use hmac::{KeyInit, Mac};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// The header carrying the webhook signature: `sha256=` and the hex HMAC-SHA256 of the body
/// with the sink's secret.
pub const SIGNATURE_HEADER: &str = "x-dps-signature";

/// The signature header's value for `body`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// One configured sink.
pub enum Sink {
    /// HTTPS webhook.
    Webhook {
        /// Client (its own trusted CA, no redirects, the timeout).
        client: reqwest::Client,
        /// Target.
        url: reqwest::Url,
        /// HMAC key.
        secret: Vec<u8>,
    },
    /// MQTT topic.
    Mqtt {
        /// Broker host.
        host: String,
        /// Broker port.
        port: u16,
        /// TLS (mqtts://).
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
        /// Credentials.
        credentials: Option<(String, String)>,
        /// Topic.
        topic: String,
        /// Per batch.
        timeout: Duration,
    },
    /// NATS subject.
    Nats {
        /// `host:port`.
        addr: String,
        /// Credentials.
        credentials: Option<(String, String)>,
        /// Subject.
        subject: String,
        /// Per operation.
        timeout: Duration,
        /// The open connection, reused between batches.
        conn: Mutex<Option<NatsConn>>,
    },
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind().as_str())
    }
}

impl Sink {
    /// Build a sink from its configuration.
    pub fn from_config(c: &EventSinkConfig) -> Result<Sink, String> {
        let timeout = Duration::from_millis(c.timeout_ms);
        let credentials = c
            .username
            .clone()
            .map(|u| (u, c.password.clone().unwrap_or_default()));
        match c.kind {
            EventSinkKind::Webhook => {
                let url = reqwest::Url::parse(&c.url).map_err(|e| format!("url: {e}"))?;
                let mut b = reqwest::Client::builder()
                    .no_proxy()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(timeout);
                if let Some(p) = &c.ca_file {
                    let pem =
                        std::fs::read(p).map_err(|e| format!("ca_file {}: {e}", p.display()))?;
                    let certs = reqwest::Certificate::from_pem_bundle(&pem)
                        .map_err(|e| format!("ca_file {}: {e}", p.display()))?;
                    b = b.tls_certs_merge(certs);
                }
                Ok(Sink::Webhook {
                    client: b.build().map_err(|e| format!("HTTP client: {e}"))?,
                    url,
                    secret: c.secret.clone().unwrap_or_default().into_bytes(),
                })
            }
            EventSinkKind::Mqtt => {
                let url = reqwest::Url::parse(&c.url).map_err(|e| format!("url: {e}"))?;
                let secure = url.scheme() == "mqtts";
                let host = url
                    .host_str()
                    .ok_or("the url has no host")?
                    .trim_matches(['[', ']'])
                    .to_string();
                let port = url.port().unwrap_or(if secure { 8883 } else { 1883 });
                let tls = if secure {
                    let trust = match &c.ca_file {
                        Some(p) => dps_device::tls::Trust::pem_file(p.display().to_string())
                            .map_err(|e| e.to_string())?,
                        None => dps_device::tls::Trust::System,
                    };
                    let roots = trust.root_store().map_err(|e| e.to_string())?;
                    Some(
                        dps_device::tls::client_config(roots, None, &[])
                            .map_err(|e| e.to_string())?,
                    )
                } else {
                    None
                };
                Ok(Sink::Mqtt {
                    host,
                    port,
                    tls,
                    credentials,
                    topic: c.topic.clone().unwrap_or_default(),
                    timeout,
                })
            }
            EventSinkKind::Nats => {
                let rest = c.url.strip_prefix("nats://").ok_or("url must be nats://")?;
                let addr = rest.trim_end_matches('/');
                let addr = if addr.contains(':') {
                    addr.to_string()
                } else {
                    format!("{addr}:4222")
                };
                Ok(Sink::Nats {
                    addr,
                    credentials,
                    subject: c.subject.clone().unwrap_or_default(),
                    timeout,
                    conn: Mutex::new(None),
                })
            }
        }
    }

    /// The sink's kind (the metrics label).
    pub fn kind(&self) -> EventSinkKind {
        match self {
            Sink::Webhook { .. } => EventSinkKind::Webhook,
            Sink::Mqtt { .. } => EventSinkKind::Mqtt,
            Sink::Nats { .. } => EventSinkKind::Nats,
        }
    }

    /// Deliver `events`; one result per event, in order.
    pub async fn deliver(&self, events: &[&OutboxEvent]) -> Vec<Result<(), String>> {
        match self {
            Sink::Webhook {
                client,
                url,
                secret,
            } => {
                let mut out = Vec::with_capacity(events.len());
                for e in events {
                    out.push(webhook_post(client, url, secret, e).await);
                }
                out
            }
            Sink::Mqtt { timeout, .. } => match tokio::time::timeout(
                *timeout + Duration::from_millis(100 * events.len() as u64),
                self.mqtt_batch(events),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => vec![Err("MQTT delivery timed out".to_string()); events.len()],
            },
            Sink::Nats { .. } => {
                let mut out = Vec::with_capacity(events.len());
                for e in events {
                    out.push(self.nats_publish(e).await);
                }
                out
            }
        }
    }

    /// One connection per batch: CONNECT, every PUBLISH at QoS 1, then wait for the
    /// acknowledgements. An event is delivered when its PUBACK arrived.
    async fn mqtt_batch(&self, events: &[&OutboxEvent]) -> Vec<Result<(), String>> {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
        let Sink::Mqtt {
            host,
            port,
            tls,
            credentials,
            topic,
            ..
        } = self
        else {
            unreachable!("called on the MQTT sink")
        };
        let id = format!(
            "dps-events-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut opts = MqttOptions::new(id, host.clone(), *port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_inflight(u16::try_from(events.len().clamp(1, 1000)).unwrap_or(1000));
        if let Some((u, p)) = credentials {
            opts.set_credentials(u.clone(), p.clone());
        }
        if let Some(t) = tls {
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                t.clone(),
            )));
        }
        let (client, mut eventloop) = AsyncClient::new(opts, events.len().max(1) + 8);
        let mut results: Vec<Result<(), String>> =
            vec![Err("not acknowledged".to_string()); events.len()];
        // Packet ids are given in publish order, starting at 1: ids map to events.
        for e in events {
            if let Err(err) = client
                .publish(
                    topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    e.body.clone().into_bytes(),
                )
                .await
            {
                let msg = format!("MQTT publish: {err}");
                return vec![Err(msg); events.len()];
            }
        }
        let mut acked = 0usize;
        let mut sent: Vec<u16> = Vec::with_capacity(events.len());
        while acked < events.len() {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => sent.push(pkid),
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(i) = sent.iter().position(|p| *p == ack.pkid) {
                        if results[i].is_err() {
                            results[i] = Ok(());
                            acked += 1;
                        }
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(c)))
                    if c.code != rumqttc::ConnectReturnCode::Success =>
                {
                    let msg = format!("MQTT connect refused: {:?}", c.code);
                    return vec![Err(msg); events.len()];
                }
                Ok(_) => {}
                Err(e) => {
                    let msg = format!("MQTT: {e}");
                    for r in results.iter_mut().filter(|r| r.is_err()) {
                        *r = Err(msg.clone());
                    }
                    return results;
                }
            }
        }
        let _ = client.try_disconnect();
        // Let the DISCONNECT leave (bounded: the broker may already be gone).
        let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
        results
    }

    async fn nats_publish(&self, e: &OutboxEvent) -> Result<(), String> {
        let Sink::Nats {
            addr,
            credentials,
            subject,
            timeout,
            conn,
        } = self
        else {
            unreachable!("called on the NATS sink")
        };
        let mut guard = conn.lock().await;
        if guard.is_none() {
            let c = tokio::time::timeout(*timeout, NatsConn::connect(addr, credentials.as_ref()))
                .await
                .map_err(|_| "NATS connect timed out".to_string())??;
            *guard = Some(c);
        }
        let c = guard.as_mut().expect("connected above");
        match tokio::time::timeout(*timeout, c.publish(subject, e.body.as_bytes())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => {
                *guard = None;
                Err(err)
            }
            Err(_) => {
                *guard = None;
                Err("NATS publish timed out".to_string())
            }
        }
    }
}

async fn webhook_post(
    client: &reqwest::Client,
    url: &reqwest::Url,
    secret: &[u8],
    e: &OutboxEvent,
) -> Result<(), String> {
    let body = e.body.clone().into_bytes();
    let sig = sign(secret, &body);
    let resp = client
        .post(url.clone())
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/cloudevents+json; charset=utf-8",
        )
        .header(SIGNATURE_HEADER, sig)
        .header("x-dps-event-id", e.id.as_str())
        .body(body)
        .send()
        .await
        .map_err(|err| format!("webhook: {}", crate::outbound::describe(err)))?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("webhook answered {}", status.as_u16()))
    }
}

/// A NATS connection (the text protocol: `INFO`, `CONNECT`, `PUB`, `+OK`/`-ERR`, `PING`/`PONG`).
pub struct NatsConn {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    max_payload: usize,
}

/// The longest protocol line read from the server.
const NATS_MAX_LINE: usize = 64 * 1024;

impl NatsConn {
    async fn connect(addr: &str, credentials: Option<&(String, String)>) -> Result<Self, String> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("NATS connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (r, w) = tcp.into_split();
        let mut c = NatsConn {
            reader: BufReader::new(r),
            writer: w,
            max_payload: 1 << 20,
        };
        let info = c.line().await?;
        let Some(json) = info.strip_prefix("INFO ") else {
            return Err(format!("NATS: expected INFO, got '{}'", truncate(&info)));
        };
        let info: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("NATS INFO: {e}"))?;
        if info["tls_required"].as_bool() == Some(true) {
            return Err("NATS server requires TLS, which this sink does not speak".into());
        }
        if let Some(m) = info["max_payload"].as_u64() {
            c.max_payload = usize::try_from(m).unwrap_or(usize::MAX);
        }
        let mut connect = serde_json::json!({
            "verbose": true, "pedantic": false, "name": "dps-events", "lang": "rust",
            "version": env!("CARGO_PKG_VERSION"), "protocol": 1,
        });
        if let Some((u, p)) = credentials {
            connect["user"] = u.clone().into();
            connect["pass"] = p.clone().into();
        }
        c.send(format!("CONNECT {connect}\r\n").as_bytes()).await?;
        c.expect_ok().await?;
        Ok(c)
    }

    async fn publish(&mut self, subject: &str, payload: &[u8]) -> Result<(), String> {
        if payload.len() > self.max_payload {
            return Err(format!(
                "NATS: event of {} bytes is over the server's max_payload {}",
                payload.len(),
                self.max_payload
            ));
        }
        let mut msg = format!("PUB {subject} {}\r\n", payload.len()).into_bytes();
        msg.extend_from_slice(payload);
        msg.extend_from_slice(b"\r\n");
        self.send(&msg).await?;
        self.expect_ok().await
    }

    async fn send(&mut self, b: &[u8]) -> Result<(), String> {
        self.writer
            .write_all(b)
            .await
            .map_err(|e| format!("NATS write: {e}"))
    }

    /// Wait for `+OK` (answering `PING`s, skipping `INFO` updates).
    async fn expect_ok(&mut self) -> Result<(), String> {
        loop {
            let l = self.line().await?;
            match l.as_str() {
                "+OK" => return Ok(()),
                "PING" => self.send(b"PONG\r\n").await?,
                "PONG" => {}
                _ if l.starts_with("INFO ") => {}
                _ if l.starts_with("-ERR") => return Err(format!("NATS: {}", truncate(&l))),
                _ => return Err(format!("NATS: unexpected '{}'", truncate(&l))),
            }
        }
    }

    async fn line(&mut self) -> Result<String, String> {
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(NATS_MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| format!("NATS read: {e}"))?;
        if n == 0 {
            return Err("NATS: connection closed".into());
        }
        if buf.last() != Some(&b'\n') {
            return Err("NATS: protocol line too long".into());
        }
        Ok(String::from_utf8_lossy(&buf).trim_end().to_string())
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

//! The device API over HTTPS (protocol digest §3), on one kept-alive HTTP/1.1 connection.

use crate::client::{interpret, Endpoint, RegistrationResult, Step, Timing};
use crate::wire::{device_sas, operation_path, parse_retry_after, register_path, CLIENT_VERSION};
use crate::Error;
use bytes::Bytes;
use dps_core::model::{DeviceRegistration, RegistrationStatus};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

/// One HTTPS connection to the device endpoint, reused for any number of registrations
/// ("kept-alive connections"). Connects on first use and reconnects when the server closes it.
///
/// Get one from [`crate::ProvisioningClient::https_session`].
pub struct HttpsSession {
    ep: Arc<Endpoint>,
    tls: Arc<ClientConfig>,
    conn: Option<(SendRequest<Full<Bytes>>, JoinHandle<()>)>,
    connections: u32,
}

struct Response {
    status: u16,
    retry_after: Option<Duration>,
    body: Bytes,
}

impl HttpsSession {
    pub(crate) fn new(ep: Arc<Endpoint>, tls: Arc<ClientConfig>) -> Self {
        HttpsSession {
            ep,
            tls,
            conn: None,
            connections: 0,
        }
    }

    /// How many connections (TCP + TLS handshakes) this session has opened so far.
    pub fn connections(&self) -> u32 {
        self.connections
    }

    /// Close the connection (the next registration opens a new one).
    pub fn close(&mut self) {
        if let Some((_, task)) = self.conn.take() {
            task.abort();
        }
    }

    async fn connect(&mut self) -> Result<(), Error> {
        let ep = &self.ep;
        let work = async {
            let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
                .await
                .map_err(|e| {
                    Error::Transport(format!("cannot connect to {}:{}: {e}", ep.host, ep.port))
                })?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(ep.host.clone())
                .map_err(|e| Error::Config(format!("bad host name '{}': {e}", ep.host)))?;
            let tls = TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| crate::tls::describe_tls_error(&e))?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| Error::Transport(e.to_string()))?;
            Ok::<_, Error>((sender, conn))
        };
        let (sender, conn) = match tokio::time::timeout(ep.connect_timeout, work).await {
            Ok(r) => r?,
            Err(_) => return Err(Error::Timeout),
        };
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        self.connections += 1;
        self.conn = Some((sender, task));
        Ok(())
    }

    /// Send one request; reconnect once if a kept-alive connection turned out to be closed.
    async fn send(
        &mut self,
        method: Method,
        path: &str,
        auth: Option<&str>,
        body: Bytes,
        fresh: &mut bool,
    ) -> Result<Response, Error> {
        for attempt in 0..2 {
            let reused = match &self.conn {
                Some((s, _)) if !s.is_closed() => true,
                _ => {
                    self.close();
                    self.connect().await?;
                    *fresh = true;
                    false
                }
            };
            let Some((sender, _)) = self.conn.as_mut() else {
                return Err(Error::Transport("no connection".into()));
            };
            if sender.ready().await.is_err() {
                self.close();
                if attempt == 0 {
                    continue;
                }
                return Err(Error::Transport("connection closed".into()));
            }
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(HOST, self.ep.host_header())
                .header(USER_AGENT, CLIENT_VERSION)
                .header(ACCEPT, "application/json");
            if !body.is_empty() {
                req = req.header(CONTENT_TYPE, "application/json; charset=utf-8");
            }
            if let Some(a) = auth {
                req = req.header(AUTHORIZATION, a);
            }
            let req = req
                .body(Full::new(body.clone()))
                .map_err(|e| Error::Config(format!("bad request: {e}")))?;
            let exchange = async {
                let resp = sender.send_request(req).await?;
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after);
                let body = resp.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>(Response {
                    status,
                    retry_after,
                    body,
                })
            };
            match tokio::time::timeout(self.ep.request_timeout, exchange).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) => {
                    self.close();
                    // A kept-alive connection the server had already closed: try once more.
                    if reused && attempt == 0 && (e.is_canceled() || e.is_incomplete_message()) {
                        continue;
                    }
                    return Err(Error::Transport(e.to_string()));
                }
                Err(_) => {
                    self.close();
                    return Err(Error::Timeout);
                }
            }
        }
        Err(Error::Transport("connection closed".into()))
    }

    /// Register one device over this session's connection: PUT register, then poll the
    /// operation until it finishes. `key` is the device's symmetric key (already derived for
    /// group enrollments); `None` for X.509, where the TLS client certificate is the credential.
    pub async fn register_once(
        &mut self,
        registration_id: &str,
        key: Option<&str>,
        payload: Option<&Value>,
    ) -> Result<RegistrationResult, Error> {
        let ep = self.ep.clone();
        let started = Instant::now();
        let mut timing = Timing::default();
        let auth = match key {
            Some(k) => Some(
                device_sas(&ep.id_scope, registration_id, k, ep.sas_ttl)
                    .ok_or_else(|| Error::Config("the device key is not valid base64".into()))?,
            ),
            None => None,
        };
        let body = serde_json::to_vec(&DeviceRegistration {
            registration_id: Some(registration_id.to_string()),
            payload: payload.cloned(),
            ..Default::default()
        })
        .map_err(|e| Error::Config(e.to_string()))?;
        let body = Bytes::from(body);
        let register = register_path(&ep.id_scope, registration_id, &ep.api_version);
        let mut operation: Option<String> = None;
        let mut retries = 0u32;
        let mut fresh = false;
        loop {
            let resp = match &operation {
                None => {
                    timing.attempts += 1;
                    self.send(
                        Method::PUT,
                        &register,
                        auth.as_deref(),
                        body.clone(),
                        &mut fresh,
                    )
                    .await?
                }
                Some(op) => {
                    timing.polls += 1;
                    let path = operation_path(&ep.id_scope, registration_id, op, &ep.api_version);
                    self.send(
                        Method::GET,
                        &path,
                        auth.as_deref(),
                        Bytes::new(),
                        &mut fresh,
                    )
                    .await?
                }
            };
            match interpret(resp.status, &resp.body, resp.retry_after, &ep.policy)? {
                Step::Done(operation_id, state) => {
                    timing.elapsed = started.elapsed();
                    timing.new_connection = fresh;
                    return Ok(RegistrationResult {
                        operation_id,
                        status: RegistrationStatus::Assigned,
                        state: *state,
                        timing,
                    });
                }
                Step::Poll(op, wait) => {
                    retries = 0;
                    operation = Some(op);
                    tokio::time::sleep(wait).await;
                }
                Step::Retry(wait, err) => {
                    retries += 1;
                    if retries > ep.policy.max_retries {
                        return Err(err);
                    }
                    tracing::debug!(status = resp.status, ?wait, "transient answer, retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

impl Drop for HttpsSession {
    fn drop(&mut self) {
        self.close();
    }
}

//! The device API over HTTPS (protocol digest §3), on one kept-alive HTTP/1.1 connection.

use crate::client::{interpret, Endpoint, RegistrationResult, Step, Timing};
use crate::wire::{device_sas, operation_path, parse_retry_after, register_path, CLIENT_VERSION};
use crate::Error;
use bytes::Bytes;
use dps_core::model::{DeviceRegistration, RegistrationStatus};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{
    HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, RETRY_AFTER, USER_AGENT,
};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

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
        let tls = crate::tls::connect_tls(&self.ep, &self.tls).await?;
        // The HTTP/1 client handshake does no I/O: it only sets the connection up.
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| Error::Transport(e.to_string()))?;
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
        method: &Method,
        uri: &Uri,
        auth: Option<&HeaderValue>,
        body: &Bytes,
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
            let mut req = Request::new(Full::new(body.clone()));
            *req.method_mut() = method.clone();
            *req.uri_mut() = uri.clone();
            let h = req.headers_mut();
            h.insert(HOST, self.ep.host_header.clone());
            h.insert(USER_AGENT, HeaderValue::from_static(CLIENT_VERSION));
            h.insert(ACCEPT, HeaderValue::from_static("application/json"));
            if !body.is_empty() {
                h.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/json; charset=utf-8"),
                );
            }
            if let Some(a) = auth {
                h.insert(AUTHORIZATION, a.clone());
            }
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
        self.register_with(registration_id, key, payload, None)
            .await
    }

    /// [`Self::register_once`] with a certificate signing request (`csr`: base64 DER PKCS#10,
    /// api-version `2025-07-01-preview` or later): the result's
    /// `state.issued_certificate_chain` holds the certificate dps issued.
    pub async fn register_with(
        &mut self,
        registration_id: &str,
        key: Option<&str>,
        payload: Option<&Value>,
        csr: Option<&str>,
    ) -> Result<RegistrationResult, Error> {
        let started = Instant::now();
        let auth = match key {
            Some(k) => {
                let sas = device_sas(&self.ep.id_scope, registration_id, k, self.ep.sas_ttl)
                    .ok_or_else(|| Error::Config("the device key is not valid base64".into()))?;
                Some(
                    HeaderValue::try_from(sas)
                        .map_err(|e| Error::Config(format!("bad SAS token: {e}")))?,
                )
            }
            None => None,
        };
        let body = serde_json::to_vec(&DeviceRegistration {
            registration_id: Some(registration_id.to_string()),
            payload: payload.cloned(),
            csr: csr.map(str::to_string),
            ..Default::default()
        })
        .map_err(|e| Error::Config(e.to_string()))?;
        self.exchange(
            registration_id,
            auth,
            Bytes::from(body),
            started,
            Timing::default(),
        )
        .await
    }

    /// Register a TPM device (protocol digest §6.5.2): send the EK and SRK without a
    /// credential, open the 401 challenge's activation blob in the TPM, sign the SAS token
    /// inside the TPM, register with it, and import the blob of the assigned registration
    /// state (the hub key) into the TPM. The TPM steps run on the blocking pool.
    pub async fn register_tpm(
        &mut self,
        registration_id: &str,
        tpm: &crate::tpm::Tpm2Tools,
        payload: Option<&Value>,
    ) -> Result<RegistrationResult, Error> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let started = Instant::now();
        let mut timing = Timing::default();
        let tools = tpm.clone();
        let keys = blocking(move || tools.provision()).await?;
        let body = serde_json::to_vec(&DeviceRegistration {
            registration_id: Some(registration_id.to_string()),
            tpm: Some(dps_core::model::TpmAttestation {
                endorsement_key: b64.encode(&keys.endorsement_key),
                storage_root_key: Some(b64.encode(&keys.storage_root_key)),
            }),
            payload: payload.cloned(),
            ..Default::default()
        })
        .map_err(|e| Error::Config(e.to_string()))?;
        let body = Bytes::from(body);
        let register = path_uri(register_path(
            &self.ep.id_scope,
            registration_id,
            &self.ep.api_version,
        ))?;
        let mut fresh = false;
        timing.attempts += 1;
        let resp = self
            .send(&Method::PUT, &register, None, &body, &mut fresh)
            .await?;
        let challenge = (resp.status == 401)
            .then(|| serde_json::from_slice::<Value>(&resp.body).ok())
            .flatten()
            .and_then(|v| v["authenticationKey"].as_str().map(str::to_string));
        let Some(blob) = challenge else {
            return Err(if (200..300).contains(&resp.status) {
                Error::Protocol(
                    "the service answered a TPM registration without a challenge".into(),
                )
            } else {
                Error::from_status(resp.status, &resp.body, resp.retry_after)
            });
        };
        let blob = b64
            .decode(blob)
            .map_err(|_| Error::Protocol("authenticationKey is not base64".into()))?;
        let sas = tpm_activate_and_sign(
            tpm,
            blob,
            &self.ep.id_scope,
            registration_id,
            self.ep.sas_ttl,
        )
        .await?;
        let auth =
            HeaderValue::try_from(sas).map_err(|e| Error::Config(format!("bad SAS token: {e}")))?;
        let result = self
            .exchange(registration_id, Some(auth), body, started, timing)
            .await?;
        tpm_import_hub_key(tpm, &result).await?;
        Ok(result)
    }

    /// PUT register with `auth` and `body`, then poll the operation until it finishes.
    async fn exchange(
        &mut self,
        registration_id: &str,
        auth: Option<HeaderValue>,
        body: Bytes,
        started: Instant,
        mut timing: Timing,
    ) -> Result<RegistrationResult, Error> {
        let ep = self.ep.clone();
        let register = path_uri(register_path(
            &ep.id_scope,
            registration_id,
            &ep.api_version,
        ))?;
        let no_body = Bytes::new();
        // The operation being polled and its status URI.
        let mut operation: Option<(String, Uri)> = None;
        let mut retries = 0u32;
        let mut fresh = false;
        loop {
            let resp = match &operation {
                None => {
                    timing.attempts += 1;
                    self.send(&Method::PUT, &register, auth.as_ref(), &body, &mut fresh)
                        .await?
                }
                Some((_, uri)) => {
                    timing.polls += 1;
                    self.send(&Method::GET, uri, auth.as_ref(), &no_body, &mut fresh)
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
                    if operation.as_ref().is_none_or(|(o, _)| *o != op) {
                        let uri = path_uri(operation_path(
                            &ep.id_scope,
                            registration_id,
                            &op,
                            &ep.api_version,
                        ))?;
                        operation = Some((op, uri));
                    }
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

/// Open an activation blob in the TPM (ActivateCredential, Import) and sign the registration
/// SAS token (`skn=registration`, valid for `ttl`) with the imported key inside the TPM.
pub(crate) async fn tpm_activate_and_sign(
    tpm: &crate::tpm::Tpm2Tools,
    blob: Vec<u8>,
    id_scope: &str,
    registration_id: &str,
    ttl: std::time::Duration,
) -> Result<String, Error> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let tools = tpm.clone();
    blocking(move || tools.import_activation(&blob)).await?;
    let sr = percent_encoding::utf8_percent_encode(
        &format!("{id_scope}/registrations/{registration_id}"),
        percent_encoding::NON_ALPHANUMERIC,
    )
    .to_string();
    let se = crate::wire::now_secs() + ttl.as_secs() as i64;
    let tools = tpm.clone();
    let to_sign = format!("{sr}\n{se}").into_bytes();
    let mac = blocking(move || tools.hmac(&to_sign)).await?;
    let sig =
        percent_encoding::utf8_percent_encode(&b64.encode(mac), percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    Ok(format!(
        "SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn=registration"
    ))
}

/// The hub key: the SDKs import the assigned state's `tpm.authenticationKey` into the TPM
/// before connecting to the hub; so does this client.
pub(crate) async fn tpm_import_hub_key(
    tpm: &crate::tpm::Tpm2Tools,
    result: &RegistrationResult,
) -> Result<(), Error> {
    use base64::Engine as _;
    if let Some(k) = result
        .state
        .tpm
        .as_ref()
        .and_then(|t| t["authenticationKey"].as_str())
    {
        let blob = base64::engine::general_purpose::STANDARD
            .decode(k)
            .map_err(|_| Error::Protocol("tpm.authenticationKey is not base64".into()))?;
        let tools = tpm.clone();
        blocking(move || tools.import_activation(&blob)).await?;
    }
    Ok(())
}

/// Run a TPM step on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::tpm::TpmError> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Transport(format!("TPM task failed: {e}")))?
        .map_err(|e| Error::Tpm(e.to_string()))
}

/// A request path as a URI (parsed once, cloned cheaply for retries).
fn path_uri(path: String) -> Result<Uri, Error> {
    Uri::try_from(path).map_err(|e| Error::Config(format!("bad request path: {e}")))
}

impl Drop for HttpsSession {
    fn drop(&mut self) {
        self.close();
    }
}

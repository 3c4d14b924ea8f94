//! The simulated fleet of `dps bench`: the devices and the client settings they all share (one
//! TLS configuration, the endpoint resolved once), and each device's provisioning client.

use super::addresses::loopback_source;
use super::setup::{Cred, Device};
use crate::commands::device::TransportArg;
use dps_device::{Auth, ClientTls, PollPolicy, ProvisioningClient};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// The simulated fleet and the client settings every device shares.
pub(super) struct Fleet {
    pub(super) devices: Vec<Device>,
    pub(super) endpoint: String,
    pub(super) id_scope: String,
    pub(super) transport: TransportArg,
    /// Built once; symmetric-key devices use it as is, X.509 devices add their certificate.
    pub(super) tls: ClientTls,
    /// The endpoint's addresses, resolved once.
    pub(super) connect_addrs: Option<Vec<SocketAddr>>,
    pub(super) policy: PollPolicy,
    pub(super) timeout: Duration,
    /// Storm: connections this process may hold at once (see
    /// [`socket_budget`](super::storm::socket_budget)); a device waits for a place (first come,
    /// first served) before it connects.
    pub(super) sockets: Option<Arc<tokio::sync::Semaphore>>,
    /// AMQP: await each frame of the setup, like the Azure SDKs.
    pub(super) await_each_frame: bool,
}

impl Fleet {
    /// Device `i`'s provisioning client (indices wrap around: the handshake baseline may open
    /// more connections than there are devices).
    pub(super) fn client(&self, i: usize) -> Result<ProvisioningClient, dps_device::Error> {
        let d = &self.devices[i % self.devices.len()];
        let auth = match &d.cred {
            Cred::Key(k) => Auth::SymmetricKey(k.clone()),
            Cred::Cert { chain, key } => Auth::X509 {
                cert_chain_pem: chain.clone(),
                key_pem: key.clone(),
            },
        };
        let mut b = ProvisioningClient::builder()
            .global_endpoint(self.endpoint.as_str())
            .id_scope(self.id_scope.as_str())
            .registration_id(d.id.as_str())
            .auth(auth)
            .transport(self.transport.into())
            .tls(self.tls.clone())
            .poll_policy(self.policy.clone())
            .timeout(self.timeout)
            .await_each_frame(self.await_each_frame);
        if let Some(addrs) = &self.connect_addrs {
            b = b.connect_addrs(addrs.clone());
            let ip = addrs[0].ip();
            if ip.is_loopback() && ip.is_ipv4() {
                b = b.local_address(IpAddr::V4(loopback_source(i)));
            }
        }
        b.build()
    }

    /// Resolve the endpoint once, so that the simulated devices neither resolve the name nor
    /// try an unreachable address on every connection. With several addresses, the first one a
    /// TLS handshake succeeds with goes first. Left unpinned when the name does not resolve (the
    /// devices then report the error).
    pub(super) async fn pin_addresses(&mut self) {
        let Ok((host, port)) = dps_device::split_host_port(&self.endpoint) else {
            return;
        };
        let port = port.unwrap_or(dps_device::Transport::from(self.transport).default_port());
        let Ok(found) = tokio::net::lookup_host((host.as_str(), port)).await else {
            return;
        };
        let mut addrs: Vec<SocketAddr> = found.collect();
        if addrs.len() > 1 {
            for i in 0..addrs.len() {
                self.connect_addrs = Some(vec![addrs[i]]);
                let reachable = match (!self.devices.is_empty()).then(|| self.client(0)) {
                    Some(Ok(c)) => c.tls_handshake().await.is_ok(),
                    _ => false,
                };
                if reachable {
                    addrs[..=i].rotate_right(1);
                    break;
                }
            }
        }
        self.connect_addrs = (!addrs.is_empty()).then_some(addrs);
    }
}

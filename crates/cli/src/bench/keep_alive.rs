//! Kept-alive mode of `dps bench` (`--keep-alive`): each worker registers its devices one after
//! the other over one HTTPS session instead of a fresh TLS connection per device.

use super::fleet::Fleet;
use super::setup::{Cred, Device};

/// Register device `i` over the worker's session (opened on first use), within the per-device
/// timeout.
pub(super) async fn register(
    fleet: &Fleet,
    i: usize,
    d: &Device,
    session: &mut Option<dps_device::HttpsSession>,
) -> Result<dps_device::RegistrationResult, dps_device::Error> {
    let s = match session {
        Some(s) => Ok(s),
        None => fleet.client(i).map(|c| session.insert(c.https_session())),
    };
    match s {
        Ok(s) => {
            let key = match &d.cred {
                Cred::Key(k) => Some(k.as_str()),
                Cred::Cert { .. } => None,
            };
            let once = Box::pin(s.register_once(&d.id, key, None));
            match tokio::time::timeout(fleet.timeout, once).await {
                Ok(r) => r,
                Err(_) => Err(dps_device::Error::Timeout),
            }
        }
        Err(e) => Err(e),
    }
}

//! A test double for linked hubs: [`FakeHub`] keeps identities and twins in memory, records
//! every call, and fails or hangs on demand, so that engine tests can drive hub failures without
//! a network. It follows the same [`HubAdapter`] contract as the real adapters (the integration
//! test `hub_contract` runs one suite against all of them, this one included).
//!
//! It is small and always compiled (not behind `cfg(test)`), so that tests in other crates can
//! use it; the server never builds one for a configured hub.
//!
//! ```
//! use dps_core::hub::{HubAdapter, HubError};
//! use dps_server::hubs::fake::{Call, FakeHub};
//! # async fn demo() {
//! let hub = FakeHub::new("fake.example.net");
//! hub.fail_next(HubError::Throttled { hub: "fake.example.net".into(), retry_after: 3 });
//! assert!(hub.delete_device("d1").await.is_err());
//! assert!(hub.delete_device("d1").await.is_ok());
//! assert_eq!(hub.calls(), [Call::Delete { device_id: "d1".into() }, Call::Delete { device_id: "d1".into() }]);
//! # }
//! ```

use dps_core::hub::{HubAdapter, HubError, HubIdentity};
use dps_core::model::TwinState;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

/// How long a hanging call waits by default before it gives up, like the real adapters'
/// default `timeout_ms`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// An identity as the fake hub keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeDevice {
    /// The identity as last upserted (`enabled` follows `set_enabled`).
    pub identity: HubIdentity,
    /// Tags and desired properties.
    pub twin: TwinState,
}

/// A call the fake hub received (failed and hanging ones included), in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// `upsert_device`.
    Upsert {
        /// Device id.
        device_id: String,
        /// `identity.enabled`.
        enabled: bool,
        /// The twin given (`None`: keep the existing one).
        twin: Option<TwinState>,
    },
    /// `get_twin`.
    GetTwin {
        /// Device id.
        device_id: String,
    },
    /// `set_enabled`.
    SetEnabled {
        /// Device id.
        device_id: String,
        /// The flag given.
        enabled: bool,
    },
    /// `delete_device`.
    Delete {
        /// Device id.
        device_id: String,
    },
}

impl Call {
    /// The device the call was about.
    pub fn device_id(&self) -> &str {
        match self {
            Call::Upsert { device_id, .. }
            | Call::GetTwin { device_id }
            | Call::SetEnabled { device_id, .. }
            | Call::Delete { device_id } => device_id,
        }
    }
}

/// An injected fault, taken by the next call.
enum Fault {
    Fail(HubError),
    Hang,
    Delay(Duration),
}

#[derive(Default)]
struct State {
    devices: BTreeMap<String, FakeDevice>,
    calls: Vec<Call>,
    faults: VecDeque<Fault>,
    refuse_credentials: bool,
    hanging: bool,
}

/// An in-memory linked hub (a test double; see the module docs).
pub struct FakeHub {
    host: String,
    timeout: Duration,
    state: Mutex<State>,
}

impl FakeHub {
    /// An empty hub for `host` (lowercased, as the real adapters name their hub in errors).
    pub fn new(host: &str) -> Self {
        FakeHub {
            host: host.to_ascii_lowercase(),
            timeout: DEFAULT_TIMEOUT,
            state: Mutex::new(State::default()),
        }
    }

    /// How long a hanging call waits before it fails with `Unreachable` (default
    /// [`DEFAULT_TIMEOUT`]; with tokio's paused clock the wait passes at once).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The hub host.
    pub fn host(&self) -> &str {
        &self.host
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; keep the state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next call fails with `error` (after the faults queued before it: each call takes one).
    pub fn fail_next(&self, error: HubError) {
        self.fail_next_n(1, error);
    }

    /// The next `n` calls fail with `error`.
    pub fn fail_next_n(&self, n: usize, error: HubError) {
        let mut st = self.state();
        st.faults
            .extend(std::iter::repeat_n(error, n).map(Fault::Fail));
    }

    /// The next `n` calls hang: each waits the hub's timeout (see [`with_timeout`](Self::with_timeout))
    /// and then fails with `Unreachable`, as a real adapter does when the hub never answers.
    pub fn hang_next(&self, n: usize) {
        let mut st = self.state();
        st.faults
            .extend(std::iter::repeat_with(|| Fault::Hang).take(n));
    }

    /// The next `n` calls take `by` longer and then succeed (a slow hub).
    pub fn delay_next(&self, n: usize, by: Duration) {
        let mut st = self.state();
        st.faults
            .extend(std::iter::repeat_with(|| Fault::Delay(by)).take(n));
    }

    /// While on, every call hangs as with [`hang_next`](Self::hang_next) (the hub is down but
    /// still accepts connections), before any queued fault.
    pub fn hang(&self, on: bool) {
        self.state().hanging = on;
    }

    /// While on, every call fails with `Unauthorized` (the hub refuses dps's credentials, as
    /// after a key rotation), before any queued fault.
    pub fn refuse_credentials(&self, on: bool) {
        self.state().refuse_credentials = on;
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// Forget the calls so far.
    pub fn clear_calls(&self) {
        self.state().calls.clear();
    }

    /// The identity and twin of a device, if it exists.
    pub fn device(&self, device_id: &str) -> Option<FakeDevice> {
        self.state().devices.get(device_id).cloned()
    }

    /// Every device, by id.
    pub fn devices(&self) -> Vec<FakeDevice> {
        self.state().devices.values().cloned().collect()
    }

    /// Change a device's twin on the hub side (as an operator or a back end would); `false` when
    /// the device does not exist.
    pub fn set_twin(&self, device_id: &str, twin: TwinState) -> bool {
        match self.state().devices.get_mut(device_id) {
            Some(d) => {
                d.twin = twin.for_hub();
                true
            }
            None => false,
        }
    }

    /// Record the call and apply the injected faults; `Ok` when the call may proceed.
    async fn enter(&self, call: Call) -> Result<(), HubError> {
        let fault = {
            let mut st = self.state();
            st.calls.push(call);
            if st.refuse_credentials {
                return Err(HubError::Unauthorized {
                    hub: self.host.clone(),
                    message: "credentials refused (fake hub)".into(),
                });
            }
            if st.hanging {
                Some(Fault::Hang)
            } else {
                st.faults.pop_front()
            }
        };
        match fault {
            None => Ok(()),
            Some(Fault::Fail(e)) => Err(e),
            Some(Fault::Delay(by)) => {
                tokio::time::sleep(by).await;
                Ok(())
            }
            Some(Fault::Hang) => {
                tokio::time::sleep(self.timeout).await;
                Err(HubError::Unreachable {
                    hub: self.host.clone(),
                    message: "request timed out (fake hub hang)".into(),
                })
            }
        }
    }
}

#[async_trait::async_trait]
impl HubAdapter for FakeHub {
    async fn upsert_device(
        &self,
        identity: &HubIdentity,
        twin: Option<&TwinState>,
    ) -> Result<(), HubError> {
        self.enter(Call::Upsert {
            device_id: identity.device_id.clone(),
            enabled: identity.enabled,
            twin: twin.cloned(),
        })
        .await?;
        let mut st = self.state();
        let twin = match twin {
            Some(t) => t.for_hub(),
            None => st
                .devices
                .get(&identity.device_id)
                .map(|d| d.twin.clone())
                .unwrap_or_default(),
        };
        st.devices.insert(
            identity.device_id.clone(),
            FakeDevice {
                identity: identity.clone(),
                twin,
            },
        );
        Ok(())
    }

    async fn get_twin(&self, device_id: &str) -> Result<Option<TwinState>, HubError> {
        self.enter(Call::GetTwin {
            device_id: device_id.to_string(),
        })
        .await?;
        Ok(self.state().devices.get(device_id).map(|d| d.twin.clone()))
    }

    async fn set_enabled(&self, device_id: &str, enabled: bool) -> Result<(), HubError> {
        self.enter(Call::SetEnabled {
            device_id: device_id.to_string(),
            enabled,
        })
        .await?;
        if let Some(d) = self.state().devices.get_mut(device_id) {
            d.identity.enabled = enabled;
        }
        Ok(())
    }

    async fn delete_device(&self, device_id: &str) -> Result<(), HubError> {
        self.enter(Call::Delete {
            device_id: device_id.to_string(),
        })
        .await?;
        self.state().devices.remove(device_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dps_core::hub::HubAuth;

    fn identity(id: &str) -> HubIdentity {
        HubIdentity {
            device_id: id.into(),
            auth: HubAuth::X509Thumbprint {
                primary: "AB".repeat(32),
                secondary: None,
            },
            capabilities: Default::default(),
            enabled: true,
        }
    }

    #[tokio::test]
    async fn faults_are_taken_in_order_one_per_call_and_calls_are_recorded() {
        let hub = FakeHub::new("Fake.Example").with_timeout(Duration::from_millis(10));
        let throttled = HubError::Throttled {
            hub: "fake.example".into(),
            retry_after: 2,
        };
        hub.fail_next_n(2, throttled.clone());
        hub.hang_next(1);
        assert_eq!(hub.get_twin("d").await, Err(throttled.clone()));
        assert_eq!(hub.get_twin("d").await, Err(throttled));
        assert!(matches!(
            hub.upsert_device(&identity("d"), None).await,
            Err(HubError::Unreachable { hub, .. }) if hub == "fake.example"
        ));
        assert!(hub.device("d").is_none(), "a failed upsert changes nothing");
        hub.upsert_device(&identity("d"), None).await.unwrap();
        assert_eq!(hub.device("d").unwrap().twin, TwinState::default());
        assert_eq!(hub.calls().len(), 4);
        assert_eq!(hub.calls()[3].device_id(), "d");

        hub.refuse_credentials(true);
        assert!(matches!(
            hub.delete_device("d").await,
            Err(HubError::Unauthorized { .. })
        ));
        hub.refuse_credentials(false);
        hub.hang(true);
        assert!(matches!(
            hub.get_twin("d").await,
            Err(HubError::Unreachable { .. })
        ));
        hub.hang(false);
        hub.clear_calls();
        hub.delete_device("d").await.unwrap();
        assert_eq!(
            hub.calls(),
            [Call::Delete {
                device_id: "d".into()
            }]
        );
        assert!(hub.devices().is_empty());
    }
}

//! One contract suite for every linked-hub adapter: the same behaviours of the `HubAdapter`
//! port (crates/core/src/hub.rs) run against the built-in registry (a real SQLite store), a real
//! Mosquitto broker with dynamic security, the Azure IoT Hub stand-in (support_iothub.rs), the
//! webhook receiver (support_webhook.rs) and `FakeHub`, the in-memory double engine tests use.
//!
//! [`hub_contract!`] generates, per adapter, one test per behaviour, named
//! `hub_contract::<adapter>::<behaviour>`. Each adapter brings a fixture: the adapter plus a way
//! to read back, from the hub's side, what the adapter did ([`Fixture`]); adapters that talk to
//! a hub over the network also build a twin of themselves pointed at a hub that never answers
//! ([`TimesOut`]) and one with credentials the hub refuses ([`RefusesCredentials`]). A behaviour
//! that does not apply to an adapter is left out of its invocation, with the reason beside it;
//! listing it anyway does not compile (the fixture lacks the trait).

use crate::support::*;
use crate::support_iothub::*;
use crate::support_mosquitto::*;
use crate::support_webhook::*;
use dps_core::hub::{HubAdapter, HubAuth, HubError, HubIdentity};
use dps_core::model::{TwinProperties, TwinState};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// An adapter under test and the hub-side read-back of what it did.
trait Fixture {
    /// The adapter.
    fn adapter(&self) -> &dyn HubAdapter;
    /// The identity's enabled flag as the hub keeps it; `None` when it does not exist.
    async fn enabled(&self, device_id: &str) -> Option<bool>;
    /// Does the hub hold `primary` as the identity's primary symmetric key? (Mosquitto, which
    /// keeps only a password hash: can the device log in with the password derived from it.)
    async fn has_key(&self, device_id: &str, primary: &str) -> bool;
}

/// An adapter that reaches its hub over the network, so that the hub may never answer.
trait TimesOut: Fixture {
    /// Does the adapter open a connection to `silent` (checked: the timeout is then real)?
    const CONNECTS: bool = true;
    /// An adapter of the same kind pointed at `silent` (accepts, never answers), with a short
    /// timeout.
    fn hung(&self, silent: SocketAddr) -> Box<dyn HubAdapter>;
}

/// An adapter that authenticates to its hub.
trait RefusesCredentials: Fixture {
    /// An adapter of the same kind whose credentials the hub refuses.
    fn refused(&self) -> Box<dyn HubAdapter>;
}

/// `hub_contract!(adapter, setup)` runs every behaviour; `hub_contract!(adapter, setup,
/// [behaviour, ...])` only those listed. `setup` is an `async fn() -> Option<impl Fixture>`;
/// `None` skips the test (a service that is not installed, outside CI).
macro_rules! hub_contract {
    ($adapter:ident, $setup:ident) => {
        hub_contract!(
            $adapter,
            $setup,
            [
                upsert_creates_then_updates,
                get_twin_round_trip,
                set_enabled_is_visible,
                delete_is_idempotent,
                timeouts_become_unreachable,
                refused_credentials_become_unauthorized,
            ]
        );
    };
    ($adapter:ident, $setup:ident, [$($behaviour:ident),+ $(,)?]) => {
        mod $adapter {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    let Some(fixture) = super::$setup().await else {
                        return;
                    };
                    super::$behaviour(&fixture).await;
                }
            )+
        }
    };
}

hub_contract!(
    registry,
    registry_fixture,
    [
        upsert_creates_then_updates,
        get_twin_round_trip,
        set_enabled_is_visible,
        delete_is_idempotent,
        // No timeouts_become_unreachable: the registry lives in dps's own store; there is no
        // hub on the network that could hang (a store error is reported as Unreachable, but
        // the store's time bounds belong to the store, not to this adapter).
        // No refused_credentials_become_unauthorized: dps holds no credentials for its own
        // registry; there is nothing a hub could refuse.
    ]
);
hub_contract!(
    broker_auth,
    broker_auth_fixture,
    [
        upsert_creates_then_updates,
        get_twin_round_trip,
        set_enabled_is_visible,
        delete_is_idempotent,
        // Neither timeouts nor refused credentials: like the registry, the identities live in
        // dps's own store; the broker asks dps, dps never calls the broker.
    ]
);
hub_contract!(mosquitto, mosquitto_fixture);
hub_contract!(azure_iothub, azure_fixture);
hub_contract!(webhook, webhook_fixture);
hub_contract!(fake, fake_fixture);

// ------------------------------------------------------------------------------- behaviours

const DEVICE: &str = "contract-dev-1";
/// Every call of a hung or refused adapter must end within this (their timeouts are 200 ms;
/// Mosquitto waits up to 1 s for a reconnect before it reports refused credentials).
const CALL_BOUND: Duration = Duration::from_secs(5);

fn identity(device_id: &str, primary: &str, enabled: bool) -> HubIdentity {
    HubIdentity {
        device_id: device_id.into(),
        auth: HubAuth::SymmetricKey {
            primary: primary.into(),
            secondary: dps_core::sas::generate_key(),
        },
        capabilities: Default::default(),
        enabled,
    }
}

fn twin(tags: Value, desired: Value) -> TwinState {
    TwinState {
        tags: Some(tags),
        properties: Some(TwinProperties {
            desired: Some(desired),
        }),
    }
}

async fn upsert_creates_then_updates(f: &impl Fixture) {
    let a = f.adapter();
    let (k1, k2) = (dps_core::sas::generate_key(), dps_core::sas::generate_key());
    assert_eq!(f.enabled(DEVICE).await, None, "no identity before the test");

    let t1 = twin(json!({"site": "s1"}), json!({"interval": 5}));
    a.upsert_device(&identity(DEVICE, &k1, true), Some(&t1))
        .await
        .expect("create");
    assert_eq!(f.enabled(DEVICE).await, Some(true), "created enabled");
    assert!(f.has_key(DEVICE, &k1).await, "created with its key");
    assert_eq!(a.get_twin(DEVICE).await.expect("get_twin"), Some(t1));

    // The same device again: the identity and the twin are replaced, not duplicated or refused.
    let t2 = twin(json!({"site": "s2"}), json!({"interval": 60}));
    a.upsert_device(&identity(DEVICE, &k2, true), Some(&t2))
        .await
        .expect("update");
    assert!(f.has_key(DEVICE, &k2).await, "the new key is held");
    assert!(
        !f.has_key(DEVICE, &k1).await,
        "the old key is no longer held"
    );
    assert_eq!(
        a.get_twin(DEVICE).await.expect("get_twin"),
        Some(t2.clone())
    );

    // No twin given: the twin is kept; the enabled flag follows the identity.
    a.upsert_device(&identity(DEVICE, &k2, false), None)
        .await
        .expect("update keeping the twin");
    assert_eq!(f.enabled(DEVICE).await, Some(false), "updated to disabled");
    assert_eq!(
        a.get_twin(DEVICE).await.expect("get_twin"),
        Some(t2),
        "upsert without a twin keeps the twin"
    );
}

async fn get_twin_round_trip(f: &impl Fixture) {
    let a = f.adapter();
    assert_eq!(
        a.get_twin("nobody")
            .await
            .expect("get_twin of a missing device"),
        None
    );
    // Nested values, arrays, numbers and strings come back as written; `$`-prefixed keys
    // (Azure's `$metadata`, `$version`) are not part of the twin dps keeps.
    let written = twin(
        json!({"facility": "north", "zones": [1, 2], "$version": 3}),
        json!({"fw": {"version": "1.2", "channel": "beta"}, "interval": 5, "$metadata": {"x": 1}}),
    );
    a.upsert_device(
        &identity(DEVICE, &dps_core::sas::generate_key(), true),
        Some(&written),
    )
    .await
    .expect("upsert");
    assert_eq!(
        a.get_twin(DEVICE).await.expect("get_twin"),
        Some(twin(
            json!({"facility": "north", "zones": [1, 2]}),
            json!({"fw": {"version": "1.2", "channel": "beta"}, "interval": 5}),
        ))
    );
}

async fn set_enabled_is_visible(f: &impl Fixture) {
    let a = f.adapter();
    let key = dps_core::sas::generate_key();
    a.upsert_device(&identity(DEVICE, &key, true), None)
        .await
        .expect("upsert");
    a.set_enabled(DEVICE, false).await.expect("disable");
    assert_eq!(f.enabled(DEVICE).await, Some(false), "disabled");
    a.set_enabled(DEVICE, false).await.expect("disable again");
    assert_eq!(f.enabled(DEVICE).await, Some(false), "still disabled");
    a.set_enabled(DEVICE, true).await.expect("enable");
    assert_eq!(f.enabled(DEVICE).await, Some(true), "enabled again");
    assert!(f.has_key(DEVICE, &key).await, "the key is kept");

    a.set_enabled("nobody", false)
        .await
        .expect("a missing device is not an error");
    assert_eq!(f.enabled("nobody").await, None, "and is not created");
}

async fn delete_is_idempotent(f: &impl Fixture) {
    let a = f.adapter();
    let key = dps_core::sas::generate_key();
    a.upsert_device(
        &identity(DEVICE, &key, true),
        Some(&twin(json!({"t": 1}), json!({"d": 2}))),
    )
    .await
    .expect("upsert");
    a.delete_device(DEVICE).await.expect("delete");
    a.delete_device(DEVICE).await.expect("delete again");
    assert_eq!(f.enabled(DEVICE).await, None, "the identity is gone");
    assert!(!f.has_key(DEVICE, &key).await, "its key is gone");
    assert_eq!(a.get_twin(DEVICE).await.expect("get_twin"), None);
    a.delete_device("never-existed")
        .await
        .expect("deleting a device that never existed");
}

/// Every call of `a`, each checked by `expect` and bounded by [`CALL_BOUND`].
async fn every_call(a: &dyn HubAdapter, expect: impl Fn(&HubError) -> bool) {
    let id = identity(DEVICE, &dps_core::sas::generate_key(), true);
    let t = twin(json!({}), json!({}));
    macro_rules! check {
        ($what:literal, $call:expr) => {{
            let t0 = Instant::now();
            let r = $call.await;
            assert!(
                t0.elapsed() < CALL_BOUND,
                "{}: took {:?}",
                $what,
                t0.elapsed()
            );
            match &r {
                Err(e) if expect(e) => {}
                other => panic!("{}: {other:?}", $what),
            }
        }};
    }
    check!("upsert_device", a.upsert_device(&id, Some(&t)));
    check!("get_twin", a.get_twin(DEVICE));
    check!("set_enabled", a.set_enabled(DEVICE, false));
    check!("delete_device", a.delete_device(DEVICE));
}

async fn timeouts_become_unreachable<F: TimesOut>(f: &F) {
    let silent = SilentListener::start().await;
    let a = f.hung(silent.addr);
    every_call(a.as_ref(), |e| matches!(e, HubError::Unreachable { .. })).await;
    if F::CONNECTS {
        assert!(
            silent.accepted() >= 1,
            "the adapter never connected: this tested a refused connection, not a timeout"
        );
    }
}

async fn refused_credentials_become_unauthorized(f: &impl RefusesCredentials) {
    let a = f.refused();
    every_call(a.as_ref(), |e| matches!(e, HubError::Unauthorized { .. })).await;
}

// ------------------------------------------------------------------------------- fixtures

/// A short timeout for the hung adapters (the smallest the adapters accept is 100 ms).
const SHORT_TIMEOUT_MS: u64 = 200;

struct RegistryFixture {
    store: std::sync::Arc<dyn dps_core::store::Store>,
    hub: dps_server::hubs::registry::RegistryHub,
    _dir: tempfile::TempDir,
}

const REGISTRY_HOST: &str = "registry.contract.test";

async fn registry_fixture() -> Option<RegistryFixture> {
    let dir = tempfile::tempdir().expect("tempdir");
    // The store the server opens by default: SQLite in the data dir.
    let store = dps_store::open("", dir.path()).await.expect("store");
    let hub = dps_server::hubs::registry::RegistryHub::new(store.clone(), REGISTRY_HOST);
    Some(RegistryFixture {
        store,
        hub,
        _dir: dir,
    })
}

impl RegistryFixture {
    async fn stored(&self, device_id: &str) -> Option<dps_server::hubs::registry::StoredHubDevice> {
        let doc = self
            .store
            .get(
                dps_core::store::Collection::HubDevice,
                REGISTRY_HOST,
                device_id,
            )
            .await
            .expect("store get")?;
        Some(serde_json::from_str(&doc.body).expect("stored hub device"))
    }
}

impl Fixture for RegistryFixture {
    fn adapter(&self) -> &dyn HubAdapter {
        &self.hub
    }
    async fn enabled(&self, device_id: &str) -> Option<bool> {
        self.stored(device_id).await.map(|d| d.status == "enabled")
    }
    async fn has_key(&self, device_id: &str, primary: &str) -> bool {
        self.stored(device_id).await.is_some_and(|d| {
            d.authentication["symmetricKey"]["primaryKey"].as_str() == Some(primary)
        })
    }
}

/// A `broker-auth` hub, read back the way its broker sees it: through the auth cache the
/// broker's questions are answered from (so that every adapter call must invalidate it).
struct BrokerAuthFixture {
    hub: dps_server::hubs::broker_auth::BrokerAuthHub,
    linked: dps_core::instance::LinkedHub,
    cache: std::sync::Arc<dps_server::hubs::broker_auth::AuthCache>,
    _dir: tempfile::TempDir,
}

async fn broker_auth_fixture() -> Option<BrokerAuthFixture> {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dps_store::open("", dir.path()).await.expect("store");
    let mut linked = dps_core::instance::LinkedHub::new(
        "broker-auth.contract.test",
        dps_core::instance::HubKind::BrokerAuth,
    );
    linked
        .options
        .insert("auth_secret".into(), "contract-secret-0123456789".into());
    let cache = std::sync::Arc::new(dps_server::hubs::broker_auth::AuthCache::new(
        store.clone(),
        &linked.host,
    ));
    let hub = dps_server::hubs::broker_auth::BrokerAuthHub::new(store, &linked, cache.clone());
    Some(BrokerAuthFixture {
        hub,
        linked,
        cache,
        _dir: dir,
    })
}

impl BrokerAuthFixture {
    async fn facts(&self, device_id: &str) -> Option<dps_server::hubs::broker_auth::Facts> {
        let s = self.cache.settings(&self.linked).expect("settings");
        self.cache.facts(&s, device_id).await.expect("facts")
    }
}

impl Fixture for BrokerAuthFixture {
    fn adapter(&self) -> &dyn HubAdapter {
        &self.hub
    }
    async fn enabled(&self, device_id: &str) -> Option<bool> {
        self.facts(device_id).await.map(|f| f.enabled)
    }
    async fn has_key(&self, device_id: &str, primary: &str) -> bool {
        let pw = dps_server::hubs::broker_auth::derive_password(primary, device_id).unwrap();
        self.facts(device_id)
            .await
            .is_some_and(|f| f.password_matches(pw.as_bytes()))
    }
}

struct MosquittoFixture {
    hub: dps_server::hubs::mosquitto::MosquittoHub,
    broker: Broker,
}

async fn mosquitto_fixture() -> Option<MosquittoFixture> {
    let broker = Broker::start().await?;
    let hub = dps_server::hubs::mosquitto::MosquittoHub::new(&broker.linked_hub("broker.contract"));
    Some(MosquittoFixture { hub, broker })
}

impl Fixture for MosquittoFixture {
    fn adapter(&self) -> &dyn HubAdapter {
        &self.hub
    }
    /// The broker's own record (dynamic security `getClient`), not the adapter's view.
    async fn enabled(&self, device_id: &str) -> Option<bool> {
        dynsec_client(self.broker.port, device_id)
            .await
            .map(|c| !c["disabled"].as_bool().unwrap_or(false))
    }
    async fn has_key(&self, device_id: &str, primary: &str) -> bool {
        let pw =
            dps_server::hubs::mosquitto::derive_password(primary, device_id).expect("base64 key");
        connect(self.broker.port, device_id, device_id, &pw)
            .await
            .is_ok()
    }
}

impl TimesOut for MosquittoFixture {
    fn hung(&self, silent: SocketAddr) -> Box<dyn HubAdapter> {
        let mut h = self.broker.linked_hub("hung.contract");
        h.connection_string = Some(format!("mqtt://admin:{ADMIN_PW}@{silent}"));
        h.options
            .insert("timeout_ms".into(), SHORT_TIMEOUT_MS.into());
        Box::new(dps_server::hubs::mosquitto::MosquittoHub::new(&h))
    }
}

impl RefusesCredentials for MosquittoFixture {
    fn refused(&self) -> Box<dyn HubAdapter> {
        let mut h = self.broker.linked_hub("refused.contract");
        h.connection_string = Some(format!(
            "mqtt://admin:wrong-password@127.0.0.1:{}",
            self.broker.port
        ));
        Box::new(dps_server::hubs::mosquitto::MosquittoHub::new(&h))
    }
}

struct AzureFixture {
    hub: dps_server::hubs::azure::AzureIotHub,
    iothub: FakeIotHub,
    http: std::sync::Arc<dps_server::outbound::Outbound>,
}

async fn azure_fixture() -> Option<AzureFixture> {
    let iothub = FakeIotHub::start("contract.azure-devices.net").await;
    let http = dps_server::outbound::Outbound::permissive();
    let hub = dps_server::hubs::azure::AzureIotHub::new(&iothub.linked_hub(HUB_KEY), &http);
    Some(AzureFixture { hub, iothub, http })
}

impl Fixture for AzureFixture {
    fn adapter(&self) -> &dyn HubAdapter {
        &self.hub
    }
    async fn enabled(&self, device_id: &str) -> Option<bool> {
        self.iothub
            .device(device_id)
            .map(|d| d["status"] == "enabled")
    }
    async fn has_key(&self, device_id: &str, primary: &str) -> bool {
        self.iothub.device(device_id).is_some_and(|d| {
            d["authentication"]["symmetricKey"]["primaryKey"].as_str() == Some(primary)
        })
    }
}

impl TimesOut for AzureFixture {
    fn hung(&self, silent: SocketAddr) -> Box<dyn HubAdapter> {
        let mut h = self.iothub.linked_hub(HUB_KEY);
        h.options
            .insert("endpoint".into(), format!("http://{silent}").into());
        h.options
            .insert("timeout_ms".into(), SHORT_TIMEOUT_MS.into());
        Box::new(dps_server::hubs::azure::AzureIotHub::new(&h, &self.http))
    }
}

impl RefusesCredentials for AzureFixture {
    /// A policy key the hub does not have (rotated).
    fn refused(&self) -> Box<dyn HubAdapter> {
        Box::new(dps_server::hubs::azure::AzureIotHub::new(
            &self.iothub.linked_hub(OWNER_KEY),
            &self.http,
        ))
    }
}

struct WebhookFixture {
    hub: dps_server::hubs::webhook::WebhookHub,
    hook: FakeWebhook,
    http: std::sync::Arc<dps_server::outbound::Outbound>,
}

async fn webhook_fixture() -> Option<WebhookFixture> {
    let hook = FakeWebhook::start().await;
    let http = dps_server::outbound::Outbound::permissive();
    let hub = dps_server::hubs::webhook::WebhookHub::new(&hook.linked_hub("hook.contract"), &http);
    Some(WebhookFixture { hub, hook, http })
}

impl WebhookFixture {
    fn device(&self, device_id: &str) -> Option<Value> {
        self.hook
            .state
            .devices
            .lock()
            .expect("devices")
            .get(device_id)
            .cloned()
    }
}

impl Fixture for WebhookFixture {
    fn adapter(&self) -> &dyn HubAdapter {
        &self.hub
    }
    async fn enabled(&self, device_id: &str) -> Option<bool> {
        self.device(device_id).map(|d| d["enabled"] == true)
    }
    async fn has_key(&self, device_id: &str, primary: &str) -> bool {
        self.device(device_id).is_some_and(|d| {
            d["authentication"]["symmetricKey"]["primaryKey"].as_str() == Some(primary)
        })
    }
}

impl TimesOut for WebhookFixture {
    fn hung(&self, silent: SocketAddr) -> Box<dyn HubAdapter> {
        let mut h = webhook_hub("hung.contract", &format!("http://{silent}/hook"));
        h.options
            .insert("timeout_ms".into(), SHORT_TIMEOUT_MS.into());
        // One try: retries of timeouts are the webhook's own test (hubs_webhook.rs).
        h.options.insert("retries".into(), 1.into());
        Box::new(dps_server::hubs::webhook::WebhookHub::new(&h, &self.http))
    }
}

impl RefusesCredentials for WebhookFixture {
    /// A signing secret the receiver does not share: it answers 401.
    fn refused(&self) -> Box<dyn HubAdapter> {
        let mut h = self.hook.linked_hub("refused.contract");
        h.options.insert("secret".into(), "not-the-secret".into());
        Box::new(dps_server::hubs::webhook::WebhookHub::new(&h, &self.http))
    }
}

struct FakeFixture {
    hub: dps_server::hubs::fake::FakeHub,
}

async fn fake_fixture() -> Option<FakeFixture> {
    Some(FakeFixture {
        hub: dps_server::hubs::fake::FakeHub::new("fake.contract"),
    })
}

impl Fixture for FakeFixture {
    fn adapter(&self) -> &dyn HubAdapter {
        &self.hub
    }
    async fn enabled(&self, device_id: &str) -> Option<bool> {
        self.hub.device(device_id).map(|d| d.identity.enabled)
    }
    async fn has_key(&self, device_id: &str, primary: &str) -> bool {
        self.hub.device(device_id).is_some_and(|d| {
            matches!(&d.identity.auth, HubAuth::SymmetricKey { primary: p, .. } if p == primary)
        })
    }
}

impl TimesOut for FakeFixture {
    /// The fake has no network: it hangs in memory for its timeout.
    const CONNECTS: bool = false;
    fn hung(&self, _silent: SocketAddr) -> Box<dyn HubAdapter> {
        let hub = dps_server::hubs::fake::FakeHub::new("hung.contract")
            .with_timeout(Duration::from_millis(SHORT_TIMEOUT_MS));
        hub.hang(true);
        Box::new(hub)
    }
}

impl RefusesCredentials for FakeFixture {
    fn refused(&self) -> Box<dyn HubAdapter> {
        let hub = dps_server::hubs::fake::FakeHub::new("refused.contract");
        hub.refuse_credentials(true);
        Box::new(hub)
    }
}

//! Attestation and allocation, tested directly on an engine over a real SQLite store (in a
//! temporary directory), with a fixed clock, a seeded source of randomness and a fake custom
//! allocation webhook. No network.

use super::custom_allocation::{
    CustomAllocationAnswer, CustomAllocationError, CustomAllocationRequest,
};
use super::*;
use crate::hubs::fake::FakeHub;
use crate::repo::settings_index;
use dps_core::error::CustomAllocationFailure;
use dps_core::hub::{HubAuth, HubError};
use dps_core::instance::{Instance, LinkedHub};
use dps_core::random::SeededRandom;
use dps_core::sas::{derive_device_key, sign_token};
use dps_core::store::{Collection, Expect};
use std::sync::Mutex as StdMutex;

const SCOPE: &str = "0ne00000042";
const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const OTHER_KEY: &str = "HxwdHBsaGRgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=";

struct FixedClock(time::OffsetDateTime);
impl Clock for FixedClock {
    fn now(&self) -> time::OffsetDateTime {
        self.0
    }
}

/// A custom allocation webhook that answers what it is told and records what it was asked.
#[derive(Default)]
struct FakeWebhook {
    answer: StdMutex<Option<Result<CustomAllocationAnswer, CustomAllocationError>>>,
    asked: StdMutex<Vec<CustomAllocationRequest>>,
}

#[async_trait::async_trait]
impl CustomAllocator for FakeWebhook {
    async fn allocate(
        &self,
        req: CustomAllocationRequest,
    ) -> std::result::Result<CustomAllocationAnswer, CustomAllocationError> {
        self.asked.lock().unwrap().push(req);
        self.answer
            .lock()
            .unwrap()
            .clone()
            .expect("the test sets an answer")
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    engine: Arc<Engine>,
    instance: Arc<Instance>,
    instances: Arc<Instances>,
    repo: Repo,
    webhook: Arc<FakeWebhook>,
}

fn hub(host: &str) -> LinkedHub {
    LinkedHub::registry(host)
}

async fn fixture(hubs: Vec<LinkedHub>) -> Fixture {
    fixture_with(hubs, EngineSettings::default()).await
}

async fn fixture_with(hubs: Vec<LinkedHub>, settings: EngineSettings) -> Fixture {
    let clock = Arc::new(FixedClock(time::macros::datetime!(2026-06-01 12:00 UTC)));
    fixture_clocked(hubs, settings, clock).await
}

async fn fixture_clocked(
    hubs: Vec<LinkedHub>,
    settings: EngineSettings,
    clock: Arc<dyn Clock>,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = dps_store::open("", dir.path()).await.unwrap();
    let repo = Repo::new(store.clone());
    let instances = Arc::new(Instances::load(repo.clone()).await.unwrap());
    let instance = Instance {
        name: "t".into(),
        id_scope: SCOPE.into(),
        hostnames: vec![],
        access_policy: vec![],
        linked_hub: hubs,
        allocation_policy: AllocationPolicy::Hashed,
        register_response: RegisterResponse::Immediate,
        credential_policy: Vec::new(),
    };
    instances.put(&instance).await.unwrap();
    let webhook = Arc::new(FakeWebhook::default());
    let engine = Engine::new(
        EnginePorts {
            repo: repo.clone(),
            instances: instances.clone(),
            hubs: Arc::new(HubSet::new(store, crate::outbound::Outbound::permissive())),
            catalog: Catalog::new(repo.clone()),
            clock,
            random: Arc::new(SeededRandom::new(1)),
            custom_allocator: webhook.clone(),
        },
        settings,
    );
    Fixture {
        _dir: dir,
        instance: instances.by_name("t").unwrap(),
        instances,
        engine,
        repo,
        webhook,
    }
}

fn now() -> i64 {
    time::macros::datetime!(2026-06-01 12:00 UTC).unix_timestamp()
}

fn token(rid: &str, key: &str) -> DeviceCredential {
    let t = sign_token(
        &format!("{SCOPE}/registrations/{rid}"),
        key,
        Some("registration"),
        now() + 3600,
    )
    .unwrap();
    DeviceCredential::Sas(t)
}

impl Fixture {
    async fn enroll(&self, rid: &str, enabled: bool, extra: serde_json::Value) {
        let mut v = serde_json::json!({
            "registrationId": rid,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}},
            "provisioningStatus": if enabled { "enabled" } else { "disabled" },
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let e: IndividualEnrollment = serde_json::from_value(v).unwrap();
        self.repo
            .put(
                Collection::Enrollment,
                "t",
                rid,
                "e1",
                &e,
                settings_index(&e.settings),
                Expect::Any,
            )
            .await
            .unwrap();
        // Written behind the use cases' back: tell the catalog, as they do.
        self.engine.catalog.individuals_changed("t");
    }

    async fn group(&self, gid: &str, extra: serde_json::Value) {
        let mut v = serde_json::json!({
            "enrollmentGroupId": gid,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}},
            "provisioningStatus": "enabled",
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let g: EnrollmentGroup = serde_json::from_value(v).unwrap();
        self.repo
            .put(
                Collection::Group,
                "t",
                gid,
                "g1",
                &g,
                settings_index(&g.settings),
                Expect::Any,
            )
            .await
            .unwrap();
        self.engine.catalog.groups_changed("t");
    }

    async fn attest(&self, rid: &str, cred: DeviceCredential) -> Result<attest::Admitted> {
        let rid = RegistrationId::parse(rid).unwrap();
        self.engine.attest(&self.instance, &rid, &cred).await
    }

    async fn allocate(&self, rid: &str) -> std::result::Result<String, AssignmentFailure> {
        let adm = self
            .attest(rid, token(rid, &device_key(rid)))
            .await
            .unwrap();
        let settings = adm.settings().clone();
        self.engine
            .allocate(&adm, &settings, None, None, None)
            .await
            .map(|(h, _, _)| h.host)
            .map_err(|f| f.failure)
    }
}

/// The key a device of the group `g` derives.
fn device_key(rid: &str) -> String {
    derive_device_key(KEY, rid).unwrap()
}

fn unauthorized(r: Result<attest::Admitted>) -> AuthFailure {
    match r {
        Err(Error::Unauthorized(f)) => f,
        Err(e) => panic!("expected Unauthorized, got {e}"),
        Ok(_) => panic!("expected Unauthorized, got admitted"),
    }
}

#[tokio::test]
async fn an_individual_enrollment_admits_its_own_key_and_refuses_another() {
    let f = fixture(vec![hub("h1")]).await;
    f.enroll("dev-1", true, serde_json::json!({})).await;
    let adm = f.attest("dev-1", token("dev-1", KEY)).await.unwrap();
    assert!(matches!(adm.source, attest::Source::Individual(_)));
    assert!(adm.enabled());
    assert_eq!(adm.device_id(), "dev-1");
    let refused = unauthorized(f.attest("dev-1", token("dev-1", OTHER_KEY)).await);
    assert!(matches!(refused, AuthFailure::Sas(_)), "{refused:?}");
}

#[tokio::test]
async fn a_group_admits_derived_keys_only() {
    let f = fixture(vec![hub("h1")]).await;
    f.group("g", serde_json::json!({})).await;
    let adm = f
        .attest("meter-7", token("meter-7", &device_key("meter-7")))
        .await
        .unwrap();
    assert_eq!(adm.group_id().as_deref(), Some("g"));
    // The group key itself is not a device key.
    assert!(matches!(
        unauthorized(f.attest("meter-7", token("meter-7", KEY)).await),
        AuthFailure::UnknownRegistration(_)
    ));
    // Nor is another device's derived key.
    assert!(matches!(
        unauthorized(
            f.attest("meter-7", token("meter-7", &device_key("meter-8")))
                .await
        ),
        AuthFailure::UnknownRegistration(_)
    ));
}

/// A base64 key of 32 bytes, all `b`.
fn key_of(b: u8) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode([b; 32])
}

/// A group's position in the order attestation tries the instance's symmetric-key groups.
async fn group_positions(f: &Fixture) -> impl Fn(&str) -> usize {
    let groups = f.engine.catalog.groups("t", "symmetricKey").await.unwrap();
    move |gid: &str| {
        groups
            .iter()
            .position(|g| g.enrollment_group_id == gid)
            .unwrap()
    }
}

#[tokio::test]
async fn among_many_groups_the_one_whose_key_signed_admits_and_is_tried_first_next_time() {
    let f = fixture(vec![hub("h1")]).await;
    // Forty groups, each with keys of its own; g-07 has a secondary key only.
    for i in 0..40u8 {
        let sk = if i == 7 {
            serde_json::json!({"secondaryKey": key_of(i)})
        } else {
            serde_json::json!({"primaryKey": key_of(i), "secondaryKey": key_of(100 + i)})
        };
        f.group(
            &format!("g-{i:02}"),
            serde_json::json!({"attestation": {"type": "symmetricKey", "symmetricKey": sk}}),
        )
        .await;
    }
    let pos = group_positions(&f).await;
    let derived = |group_key: &str, rid: &str| derive_device_key(group_key, rid).unwrap();
    let hint = |instance: &str, rid: &str| {
        let c = &f.engine.catalog;
        c.group_hint(c.hint_slot(instance, rid))
    };
    assert_eq!(hint("t", "meter-1"), None);

    // Signed with g-31's secondary key: admitted by g-31, its keys handed to the hub.
    let adm = f
        .attest(
            "meter-1",
            token("meter-1", &derived(&key_of(131), "meter-1")),
        )
        .await
        .unwrap();
    assert_eq!(adm.group_id().as_deref(), Some("g-31"));
    assert_eq!(
        adm.hub_auth,
        HubAuth::SymmetricKey {
            primary: derived(&key_of(31), "meter-1"),
            secondary: derived(&key_of(131), "meter-1"),
        }
    );
    // Remembered for this id (in any case), and for no other.
    assert_eq!(hint("t", "meter-1"), Some(pos("g-31")));
    assert_eq!(hint("T", "METER-1"), Some(pos("g-31")));
    assert_eq!(hint("t", "meter-2"), None);

    // A group with a secondary key only: that key is both.
    let adm = f
        .attest("meter-2", token("meter-2", &derived(&key_of(7), "meter-2")))
        .await
        .unwrap();
    assert_eq!(adm.group_id().as_deref(), Some("g-07"));
    assert_eq!(
        adm.hub_auth,
        HubAuth::SymmetricKey {
            primary: derived(&key_of(7), "meter-2"),
            secondary: derived(&key_of(7), "meter-2"),
        }
    );

    // The hint is an order, never an admission: meter-1 signing with g-02's key now is
    // admitted by g-02 (and remembered), and a key of no group is refused as before.
    let adm = f
        .attest("meter-1", token("meter-1", &derived(&key_of(2), "meter-1")))
        .await
        .unwrap();
    assert_eq!(adm.group_id().as_deref(), Some("g-02"));
    assert_eq!(hint("t", "meter-1"), Some(pos("g-02")));
    assert!(matches!(
        unauthorized(
            f.attest(
                "meter-1",
                token("meter-1", &derived(&key_of(99), "meter-1"))
            )
            .await
        ),
        AuthFailure::UnknownRegistration(_)
    ));
    // A stale hint (the groups changed under it) still finds the right group.
    f.engine
        .catalog
        .remember_group(f.engine.catalog.hint_slot("t", "meter-3"), 39);
    f.engine
        .catalog
        .remember_group(f.engine.catalog.hint_slot("t", "meter-4"), 10_000);
    for rid in ["meter-3", "meter-4"] {
        let adm = f
            .attest(rid, token(rid, &derived(&key_of(20), rid)))
            .await
            .unwrap();
        assert_eq!(adm.group_id().as_deref(), Some("g-20"), "{rid}");
    }
    // A signature that is not base64 matches no group; a wrong key name is said precisely.
    let bad = DeviceCredential::Sas(format!(
        "SharedAccessSignature sr={SCOPE}%2Fregistrations%2Fmeter-1&sig=%25%25&se={}",
        now() + 60
    ));
    assert!(matches!(
        unauthorized(f.attest("meter-1", bad).await),
        AuthFailure::UnknownRegistration(_)
    ));
    let other_skn = sign_token(
        &format!("{SCOPE}/registrations/meter-1"),
        &derived(&key_of(2), "meter-1"),
        Some("iothubowner"),
        now() + 60,
    )
    .unwrap();
    assert!(matches!(
        unauthorized(f.attest("meter-1", DeviceCredential::Sas(other_skn)).await),
        AuthFailure::Sas(dps_core::sas::SasError::WrongKeyName(_))
    ));
}

#[tokio::test]
async fn a_device_whose_group_this_node_forgot_is_found_through_its_registration_record() {
    let f = fixture(vec![hub("h1")]).await;
    // At least RECORD_HINT_AT groups, each with keys of its own.
    for i in 0..20u8 {
        f.group(
            &format!("g-{i:02}"),
            serde_json::json!({"attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": key_of(i), "secondaryKey": key_of(100 + i)}}}),
        )
        .await;
    }
    let pos = group_positions(&f).await;
    let derived = |i: u8, rid: &str| derive_device_key(&key_of(i), rid).unwrap();
    let forget = |rid: &str| {
        // As on another node, or after a restart: no hint (a stale position is none).
        let c = &f.engine.catalog;
        c.remember_group(c.hint_slot("t", rid), 10_000);
    };
    let tried = || f.engine.group_keys_tried();

    // A device the store has never seen: the groups one by one, up to its own.
    let before = tried();
    let mut req = register_request("meter-1");
    req.credential = token("meter-1", &derived(17, "meter-1"));
    let r = f.engine.register(req).await.unwrap();
    assert_eq!(r.body.status, RegistrationStatus::Assigned, "{r:?}");
    assert_eq!(tried() - before, pos("g-17") as u64 + 1);

    // Forgotten by the node: its record names g-17, which is tried first and admits.
    forget("meter-1");
    let before = tried();
    let adm = f
        .attest("meter-1", token("meter-1", &derived(17, "meter-1")))
        .await
        .unwrap();
    assert_eq!(adm.group_id().as_deref(), Some("g-17"));
    assert_eq!(tried() - before, 1);

    // The record's group is an order, not an admission: signed by g-03 now, g-17 is tried
    // first, then the search finds g-03.
    forget("meter-1");
    let before = tried();
    let adm = f
        .attest("meter-1", token("meter-1", &derived(3, "meter-1")))
        .await
        .unwrap();
    assert_eq!(adm.group_id().as_deref(), Some("g-03"));
    assert_eq!(tried() - before, 1 + pos("g-03") as u64 + 1);

    // A key of no group: every group tried once, and refused as before.
    forget("meter-1");
    let before = tried();
    assert!(matches!(
        unauthorized(
            f.attest("meter-1", token("meter-1", &derived(99, "meter-1")))
                .await
        ),
        AuthFailure::UnknownRegistration(_)
    ));
    assert_eq!(tried() - before, 20);
}

#[tokio::test]
async fn a_disabled_individual_enrollment_overrides_its_group() {
    let f = fixture(vec![hub("h1")]).await;
    f.group("g", serde_json::json!({})).await;
    f.enroll("meter-9", false, serde_json::json!({})).await;
    let adm = f
        .attest("meter-9", token("meter-9", &device_key("meter-9")))
        .await
        .unwrap();
    assert!(adm.disabled_override);
    assert!(!adm.enabled());
}

#[tokio::test]
async fn no_credential_and_unknown_devices_are_refused_with_their_reason() {
    let f = fixture(vec![hub("h1")]).await;
    assert_eq!(
        unauthorized(f.attest("nobody", DeviceCredential::None).await),
        AuthFailure::MissingCredential
    );
    assert!(matches!(
        unauthorized(f.attest("nobody", token("nobody", KEY)).await),
        AuthFailure::UnknownRegistration(_)
    ));
}

#[tokio::test]
async fn hashed_allocation_is_stable_and_skips_full_hubs() {
    let mut full = hub("h-full");
    full.max_devices = Some(0);
    let f = fixture(vec![hub("h1"), hub("h2"), full]).await;
    f.group("g", serde_json::json!({})).await;
    for i in 0..20 {
        let rid = format!("d-{i}");
        let first = f.allocate(&rid).await.unwrap();
        assert_ne!(first, "h-full", "a hub at max_devices is never chosen");
        assert_eq!(
            f.allocate(&rid).await.unwrap(),
            first,
            "same device, same hub"
        );
    }
}

#[tokio::test]
async fn static_allocation_uses_the_enrollments_hub_and_no_hub_is_a_failure() {
    let mut full = hub("h-full");
    full.max_devices = Some(0);
    let f = fixture(vec![hub("h1"), hub("h2"), full]).await;
    f.group(
        "g",
        serde_json::json!({"allocationPolicy": "static", "iotHubs": ["h2"]}),
    )
    .await;
    assert_eq!(f.allocate("d-1").await.unwrap(), "h2");
    f.group(
        "g",
        serde_json::json!({"allocationPolicy": "static", "iotHubs": ["h-full"]}),
    )
    .await;
    assert_eq!(f.allocate("d-1").await, Err(AssignmentFailure::NoHub));
}

#[tokio::test]
async fn custom_allocation_offers_the_eligible_hubs_and_checks_the_answer() {
    let f = fixture(vec![hub("h1"), hub("h2")]).await;
    f.group(
        "g",
        serde_json::json!({"allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": "https://alloc.example/x", "apiVersion": "2021-10-01"}}),
    )
    .await;
    *f.webhook.answer.lock().unwrap() = Some(Ok(CustomAllocationAnswer {
        hub: Some("H2".into()),
        ..Default::default()
    }));
    assert_eq!(f.allocate("d-1").await.unwrap(), "h2");
    let asked = f.webhook.asked.lock().unwrap()[0].clone();
    assert_eq!(asked.url, "https://alloc.example/x");
    assert_eq!(asked.body["linkedHubs"], serde_json::json!(["h1", "h2"]));
    assert_eq!(asked.body["deviceRuntimeContext"]["registrationId"], "d-1");
    // The group goes to the webhook without its keys.
    assert!(!asked.body["enrollmentGroup"].to_string().contains(KEY));

    *f.webhook.answer.lock().unwrap() = Some(Ok(CustomAllocationAnswer {
        hub: Some("elsewhere".into()),
        ..Default::default()
    }));
    assert_eq!(
        f.allocate("d-1").await,
        Err(AssignmentFailure::CustomAllocation {
            failure: CustomAllocationFailure::HubNotLinked
        })
    );
    *f.webhook.answer.lock().unwrap() = Some(Ok(CustomAllocationAnswer::default()));
    assert_eq!(
        f.allocate("d-1").await,
        Err(AssignmentFailure::CustomAllocation {
            failure: CustomAllocationFailure::NoHub
        })
    );
    *f.webhook.answer.lock().unwrap() = Some(Err(CustomAllocationError {
        failure: CustomAllocationFailure::Status { status: 502 },
        reason: "answered 502".into(),
    }));
    assert_eq!(
        f.allocate("d-1").await,
        Err(AssignmentFailure::CustomAllocation {
            failure: CustomAllocationFailure::Status { status: 502 }
        })
    );
}

#[tokio::test]
async fn an_exhausted_hub_rate_sends_devices_to_another_hub_then_throttles() {
    let mut h1 = hub("h1");
    h1.max_registrations_per_second = Some(1);
    let mut h2 = hub("h2");
    h2.max_registrations_per_second = Some(1);
    let f = fixture(vec![h1, h2]).await;
    f.group("g", serde_json::json!({})).await;
    // The buckets start with one token each (burst 1): two devices get a hub, a third waits.
    let mut got = vec![
        f.allocate("d-1").await.unwrap(),
        f.allocate("d-2").await.unwrap(),
    ];
    got.sort();
    assert_eq!(got, ["h1", "h2"]);
    assert_eq!(
        f.allocate("d-3").await,
        Err(AssignmentFailure::HubRateExhausted)
    );
}

#[tokio::test]
async fn a_registration_gets_its_operation_id_from_the_injected_random_source() {
    let f = fixture(vec![hub("h1")]).await;
    f.group("g", serde_json::json!({})).await;
    let req = DeviceRequest {
        id_scope: SCOPE.into(),
        registration_id: "d-1".into(),
        credential: token("d-1", &device_key("d-1")),
        body: DeviceRegistration::default(),
        transport: dps_core::device::Transport::Https,
        api_version: Some("2021-06-01".into()),
        force_registration: false,
        peer: None,
    };
    let resp = f.engine.register(req).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.status, RegistrationStatus::Assigned);
    let seeded = SeededRandom::new(1);
    let expected = dps_core::random::operation_id(&seeded);
    assert_eq!(resp.body.operation_id, expected.as_str());
    // The record's ETag is the next draw.
    let (rec, etag) = f.repo.registration("t", "d-1").await.unwrap().unwrap();
    assert_eq!(etag, dps_core::random::etag(&seeded));
    assert_eq!(rec.state.etag.as_deref(), Some(etag.as_str()));
    let state = resp.body.registration_state.unwrap();
    assert_eq!(state.assigned_hub.as_deref(), Some("h1"));
    // The record's timestamps come from the injected clock.
    assert_eq!(
        state.last_updated_date_time_utc.as_deref(),
        Some("2026-06-01T12:00:00.0000000Z")
    );
}

fn register_request(rid: &str) -> DeviceRequest {
    DeviceRequest {
        id_scope: SCOPE.into(),
        registration_id: rid.into(),
        credential: token(rid, &device_key(rid)),
        body: DeviceRegistration::default(),
        transport: dps_core::device::Transport::Https,
        api_version: Some("2021-06-01".into()),
        force_registration: false,
        peer: None,
    }
}

/// An engine whose only hub is a [`FakeHub`].
async fn with_fake_hub() -> (Fixture, Arc<FakeHub>) {
    let f = fixture(vec![hub("fake-hub")]).await;
    f.group("g", serde_json::json!({})).await;
    let fake = Arc::new(FakeHub::new("fake-hub"));
    f.engine
        .hubs
        .install(f.instance.hub("fake-hub").unwrap(), fake.clone());
    (f, fake)
}

#[tokio::test]
async fn an_assigned_device_has_its_identity_and_initial_twin_on_the_hub() {
    let (f, fake) = with_fake_hub().await;
    let resp = f.engine.register(register_request("d-1")).await.unwrap();
    assert_eq!(resp.body.status, RegistrationStatus::Assigned);
    let dev = fake.device("d-1").expect("identity written to the hub");
    assert!(dev.identity.enabled);
    assert_eq!(
        dev.identity.auth,
        dps_core::hub::HubAuth::SymmetricKey {
            primary: device_key("d-1"),
            secondary: device_key("d-1"),
        }
    );
}

#[tokio::test]
async fn hub_errors_become_domain_failures_with_the_right_retryability() {
    let cases = [
        (
            HubError::Unauthorized {
                hub: "fake-hub".into(),
                message: "no".into(),
            },
            Some(AssignmentFailure::HubUnauthorized),
        ),
        (
            HubError::Rejected {
                hub: "fake-hub".into(),
                message: "no".into(),
            },
            Some(AssignmentFailure::HubRejected),
        ),
        (
            HubError::Throttled {
                hub: "fake-hub".into(),
                retry_after: 9,
            },
            None,
        ),
        (
            HubError::Unreachable {
                hub: "fake-hub".into(),
                message: "down".into(),
            },
            None,
        ),
    ];
    for (i, (hub_error, failed_with)) in cases.into_iter().enumerate() {
        let (f, fake) = with_fake_hub().await;
        let retry = matches!(
            hub_error,
            HubError::Throttled { .. } | HubError::Unreachable { .. }
        );
        fake.fail_next(hub_error);
        let rid = format!("d-{i}");
        let r = f.engine.register(register_request(&rid)).await;
        let (rec, _) = f.repo.registration("t", &rid).await.unwrap().unwrap();
        assert_eq!(rec.state.status, Some(RegistrationStatus::Failed));
        if retry {
            // The device is told to retry (429 or 503 on the wire), not that it failed.
            let Err(Error::AssignmentRetry {
                failure,
                retry_after,
            }) = r
            else {
                panic!("{rid}: expected a retry, got {r:?}");
            };
            assert!(failure.is_retryable());
            assert_eq!(rec.failure, Some(failure.clone()));
            if failure == AssignmentFailure::HubThrottled {
                assert_eq!(retry_after, 9, "the hub's own retry-after");
            } else {
                assert_eq!(failure, AssignmentFailure::HubUnreachable);
                assert_eq!(retry_after, 5);
            }
        } else {
            let resp = r.unwrap();
            assert_eq!(resp.body.status, RegistrationStatus::Failed);
            assert_eq!(rec.failure, failed_with);
            let state = resp.body.registration_state.unwrap();
            assert_eq!(state.error_code, Some(400_209));
        }
        assert!(fake.device(&rid).is_none(), "no identity after a failure");
        // The next attempt, with the hub healthy again, assigns the device.
        let resp = f.engine.register(register_request(&rid)).await.unwrap();
        assert_eq!(resp.body.status, RegistrationStatus::Assigned, "{rid}");
        let (rec, _) = f.repo.registration("t", &rid).await.unwrap().unwrap();
        assert_eq!(rec.failure, None);
    }
}

/// Regression: several registrations of one device queue on its lock; a poll of one that has
/// not started yet was answered 404 (`OperationNotFound`) because only the newest operation of
/// a device counted as running (seen as a rare failure of
/// `registration::sixteen_concurrent_registrations_of_one_id_…` under load).
#[tokio::test]
async fn every_queued_registration_of_a_device_answers_its_polls_until_it_ends() {
    let settings = EngineSettings {
        inline_wait: Duration::from_millis(20),
        ..EngineSettings::default()
    };
    let f = fixture_with(vec![hub("fake-hub")], settings).await;
    f.group("g", serde_json::json!({})).await;
    // The first registration holds the device's lock while its hub write hangs (3 s).
    let fake = Arc::new(FakeHub::new("fake-hub").with_timeout(Duration::from_secs(3)));
    fake.hang_next(1);
    f.engine
        .hubs
        .install(f.instance.hub("fake-hub").unwrap(), fake.clone());
    let mut ops = Vec::new();
    for _ in 0..3 {
        let r = f.engine.register(register_request("q-1")).await.unwrap();
        assert_eq!(r.status, 202);
        ops.push(r.body.operation_id);
    }
    // The second and third wait for the lock; each of their polls says "assigning".
    for op in &ops {
        let r = f
            .engine
            .operation_status(register_request("q-1"), op)
            .await
            .unwrap_or_else(|e| panic!("poll of {op} while queued: {e}"));
        assert_eq!(r.status, 202, "{op}");
        assert_eq!(r.body.status, RegistrationStatus::Assigning);
    }
    // Once the hub answers again, every operation ends with a final answer.
    let deadline = Instant::now() + Duration::from_secs(30);
    for op in &ops[1..] {
        loop {
            let r = f
                .engine
                .operation_status(register_request("q-1"), op)
                .await
                .unwrap();
            if r.status == 200 {
                assert_eq!(r.body.status, RegistrationStatus::Assigned, "{op}");
                break;
            }
            assert!(Instant::now() < deadline, "{op} still {:?}", r.body.status);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Fixture {
    /// Put the group `g` as given, with the ETag given (the same ETag: an edit the fingerprint
    /// does not see through the enrollment's version, so that only the identity can tell).
    async fn put_group(&self, etag: &str, v: serde_json::Value) {
        let mut base = serde_json::json!({
            "enrollmentGroupId": "g",
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}},
            "provisioningStatus": "enabled",
        });
        base.as_object_mut()
            .unwrap()
            .extend(v.as_object().unwrap().clone());
        let g: EnrollmentGroup = serde_json::from_value(base).unwrap();
        self.repo
            .put(
                Collection::Group,
                "t",
                "g",
                etag,
                &g,
                settings_index(&g.settings),
                Expect::Any,
            )
            .await
            .unwrap();
        self.engine.catalog.groups_changed("t");
    }
}

fn upserts(fake: &FakeHub) -> usize {
    fake.calls()
        .iter()
        .filter(|c| matches!(c, crate::hubs::fake::Call::Upsert { .. }))
        .count()
}

#[tokio::test]
async fn a_registration_that_would_write_the_same_again_makes_no_hub_call() {
    let (f, fake) = with_fake_hub().await;
    let register = |req: DeviceRequest| {
        let e = f.engine.clone();
        async move {
            let r = e.register(req).await.unwrap();
            assert_eq!(r.body.status, RegistrationStatus::Assigned);
        }
    };
    register(register_request("d-1")).await;
    assert_eq!(upserts(&fake), 1, "the first registration writes");
    let (rec, _) = f.repo.registration("t", "d-1").await.unwrap().unwrap();
    let first = rec
        .hub_write
        .clone()
        .expect("the write's fingerprint is kept");
    assert_eq!(first.hub, "fake-hub");

    // Nothing changed: no hub call at all, however often.
    fake.clear_calls();
    for _ in 0..3 {
        register(register_request("d-1")).await;
    }
    assert_eq!(
        fake.calls(),
        vec![],
        "an unchanged re-registration calls the hub"
    );
    let (rec, _) = f.repo.registration("t", "d-1").await.unwrap().unwrap();
    assert_eq!(rec.hub_write, Some(first.clone()));
    assert!(fake.device("d-1").is_some());

    // forceRegistration writes.
    let mut forced = register_request("d-1");
    forced.force_registration = true;
    register(forced).await;
    assert_eq!(upserts(&fake), 1, "forceRegistration writes");
    register(register_request("d-1")).await;
    assert_eq!(upserts(&fake), 1, "and the next one is skipped again");

    // Changed keys (same enrollment version): written.
    const NEW_KEY: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
    f.put_group(
        "g1",
        serde_json::json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": NEW_KEY, "secondaryKey": NEW_KEY}}}),
    )
    .await;
    let mut req = register_request("d-1");
    req.credential = token("d-1", &derive_device_key(NEW_KEY, "d-1").unwrap());
    fake.clear_calls();
    register(req.clone()).await;
    assert_eq!(upserts(&fake), 1, "new keys are written");
    assert_eq!(
        fake.device("d-1").unwrap().identity.auth,
        dps_core::hub::HubAuth::SymmetricKey {
            primary: derive_device_key(NEW_KEY, "d-1").unwrap(),
            secondary: derive_device_key(NEW_KEY, "d-1").unwrap(),
        }
    );
    register(req.clone()).await;
    assert_eq!(upserts(&fake), 1, "and not again");

    // Disabled, then enabled again (same enrollment version): the enabled identity is written.
    f.put_group(
        "g1",
        serde_json::json!({"provisioningStatus": "disabled", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": NEW_KEY, "secondaryKey": NEW_KEY}}}),
    )
    .await;
    let r = f.engine.register(req.clone()).await.unwrap();
    assert_eq!(r.body.status, RegistrationStatus::Disabled);
    f.put_group(
        "g1",
        serde_json::json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": NEW_KEY, "secondaryKey": NEW_KEY}}}),
    )
    .await;
    fake.clear_calls();
    register(req.clone()).await;
    assert_eq!(upserts(&fake), 1, "enabled again after disabled: written");
    assert!(fake.device("d-1").unwrap().identity.enabled);

    // A changed enrollment (a new initial twin, a new ETag): the identity is written again.
    f.put_group(
        "g2",
        serde_json::json!({"initialTwin": {"tags": {"t": 2}}, "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": NEW_KEY, "secondaryKey": NEW_KEY}}}),
    )
    .await;
    fake.clear_calls();
    register(req.clone()).await;
    register(req.clone()).await;
    assert_eq!(upserts(&fake), 1, "a changed enrollment writes once");

    // A twin to write (reset policy: the initial twin on every reprovisioning) is always written.
    f.put_group(
        "g3",
        serde_json::json!({"initialTwin": {"tags": {"t": 3}}, "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": false},
                           "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": NEW_KEY, "secondaryKey": NEW_KEY}}}),
    )
    .await;
    fake.clear_calls();
    register(req.clone()).await;
    register(req.clone()).await;
    assert_eq!(upserts(&fake), 2, "a twin write is never skipped");
    assert_eq!(
        fake.device("d-1").unwrap().twin.tags,
        Some(serde_json::json!({"t": 3}))
    );

    // A failed write forgets the fingerprint: the next registration writes.
    f.put_group(
        "g4",
        serde_json::json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": NEW_KEY, "secondaryKey": NEW_KEY}}}),
    )
    .await;
    register(req.clone()).await;
    fake.clear_calls();
    register(req.clone()).await;
    assert_eq!(upserts(&fake), 0);
    let mut forced = req.clone();
    forced.force_registration = true;
    fake.fail_next(HubError::Rejected {
        hub: "fake-hub".into(),
        message: "no".into(),
    });
    let r = f.engine.register(forced).await.unwrap();
    assert_eq!(r.body.status, RegistrationStatus::Failed);
    let (rec, _) = f.repo.registration("t", "d-1").await.unwrap().unwrap();
    assert_eq!(rec.hub_write, None);
    fake.clear_calls();
    register(req.clone()).await;
    assert_eq!(upserts(&fake), 1, "written after a failure");
}

#[tokio::test]
async fn the_hub_options_can_turn_the_skip_off_or_invalidate_every_fingerprint() {
    let (f, fake) = with_fake_hub().await;
    f.engine.register(register_request("d-1")).await.unwrap();
    fake.clear_calls();
    f.engine.register(register_request("d-1")).await.unwrap();
    assert_eq!(upserts(&fake), 0);
    let relink = |options: serde_json::Value| {
        let mut inst = (*f.instance).clone();
        let mut h = hub("fake-hub");
        h.options = options.as_object().unwrap().clone();
        inst.linked_hub = vec![h.clone()];
        let engine = f.engine.clone();
        let fake = fake.clone();
        async move {
            engine.instances.put(&inst).await.unwrap();
            engine.hubs.install(&h, fake);
        }
    };
    // A new write epoch (after a hub was reset): every device is written once more.
    relink(serde_json::json!({"write_epoch": 2})).await;
    for _ in 0..2 {
        let r = f.engine.register(register_request("d-1")).await.unwrap();
        assert_eq!(r.body.status, RegistrationStatus::Assigned);
    }
    assert_eq!(upserts(&fake), 1);
    // skip_unchanged = false: every registration writes.
    relink(serde_json::json!({"write_epoch": 2, "skip_unchanged": false})).await;
    fake.clear_calls();
    for _ in 0..2 {
        f.engine.register(register_request("d-1")).await.unwrap();
    }
    assert_eq!(upserts(&fake), 2);
}

// ------------------------------------------------------------------------------------------------
// The clean-up of old identities

/// A clock the test moves forward.
struct StepClock(StdMutex<time::OffsetDateTime>);
impl Clock for StepClock {
    fn now(&self) -> time::OffsetDateTime {
        *self.0.lock().unwrap()
    }
}
impl StepClock {
    fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }
}

/// An engine with two fake hubs, `hub-a` and `hub-b`, on a clock the test moves, and the
/// individual enrollment `d-1` statically on `hub` (moves reset the twin: no twin is read from
/// the hub the device leaves).
async fn two_fake_hubs() -> (Fixture, Arc<StepClock>, Arc<FakeHub>, Arc<FakeHub>) {
    let clock = Arc::new(StepClock(StdMutex::new(
        time::macros::datetime!(2026-06-01 12:00 UTC),
    )));
    let f = fixture_clocked(
        vec![hub("hub-a"), hub("hub-b")],
        EngineSettings::default(),
        clock.clone(),
    )
    .await;
    let (a, b) = (
        Arc::new(FakeHub::new("hub-a")),
        Arc::new(FakeHub::new("hub-b")),
    );
    f.engine
        .hubs
        .install(f.instance.hub("hub-a").unwrap(), a.clone());
    f.engine
        .hubs
        .install(f.instance.hub("hub-b").unwrap(), b.clone());
    (f, clock, a, b)
}

impl Fixture {
    /// Put `d-1` statically on `hub` and register it there.
    async fn move_to(&self, hub: &str) -> RegistrationRecord {
        self.enroll(
            "d-1",
            true,
            serde_json::json!({"allocationPolicy": "static", "iotHubs": [hub],
                "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": false}}),
        )
        .await;
        let mut req = register_request("d-1");
        req.credential = token("d-1", KEY);
        let r = self.engine.register(req).await.unwrap();
        assert_eq!(r.body.status, RegistrationStatus::Assigned);
        let (rec, _) = self.repo.registration("t", "d-1").await.unwrap().unwrap();
        assert_eq!(rec.state.assigned_hub.as_deref(), Some(hub));
        rec
    }

    async fn cleanup_tasks(&self) -> Vec<dps_core::store::CleanupTask> {
        self.repo.store.list_cleanup(None, 100).await.unwrap()
    }
}

fn deletes(fake: &FakeHub) -> usize {
    fake.calls()
        .iter()
        .filter(|c| matches!(c, crate::hubs::fake::Call::Delete { .. }))
        .count()
}

fn down(host: &str) -> HubError {
    HubError::Unreachable {
        hub: host.into(),
        message: "connection refused".into(),
    }
}

#[tokio::test]
async fn an_identity_left_on_a_hub_that_is_down_is_removed_once_it_is_back() {
    let (f, clock, a, b) = two_fake_hubs().await;
    f.move_to("hub-a").await;
    assert!(a.device("d-1").is_some());
    assert!(f.cleanup_tasks().await.is_empty(), "nothing to clean up");

    // hub-a is down when the device moves to hub-b: the move succeeds, the old identity (a live
    // credential) stays on hub-a, and its removal is queued.
    a.fail_next_n(2, down("hub-a"));
    f.move_to("hub-b").await;
    assert!(b.device("d-1").is_some());
    assert!(a.device("d-1").is_some());
    assert_eq!(deletes(&a), 1, "the removal was tried at once");
    let tasks = f.cleanup_tasks().await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let t = &tasks[0];
    assert_eq!(
        (t.key.hub.as_str(), t.key.device_id.as_str()),
        ("hub-a", "d-1")
    );
    assert_eq!(t.attempts, 1);
    assert!(t.claim.is_none(), "released for the worker");
    assert!(
        t.last_error
            .as_deref()
            .unwrap()
            .contains("connection refused"),
        "{t:?}"
    );

    // Not due before its backoff (1 s after the failure).
    assert_eq!(f.engine.cleanup_pass().await.unwrap().claimed, 0);
    clock.advance(Duration::from_secs(1));
    // Still down: rescheduled with a doubled delay.
    let pass = f.engine.cleanup_pass().await.unwrap();
    assert_eq!((pass.claimed, pass.failed), (1, 1), "{pass:?}");
    assert_eq!(f.cleanup_tasks().await[0].attempts, 2);
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        f.engine.cleanup_pass().await.unwrap().claimed,
        0,
        "2 s backoff"
    );
    clock.advance(Duration::from_secs(1));
    // Back: the identity is removed and the task is done.
    let pass = f.engine.cleanup_pass().await.unwrap();
    assert_eq!((pass.claimed, pass.deleted), (1, 1), "{pass:?}");
    assert!(a.device("d-1").is_none(), "the old login is gone");
    assert!(b.device("d-1").is_some(), "the new one stays");
    assert!(f.cleanup_tasks().await.is_empty());
    assert_eq!(deletes(&a), 3);
    // It is audited, with the failed attempts.
    let audit = f
        .repo
        .store
        .list_audit(&dps_core::store::AuditQuery {
            action_prefix: Some("hub_identity.cleanup".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    let after: serde_json::Value =
        serde_json::from_str(audit[0].after.as_deref().unwrap()).unwrap();
    assert_eq!(after["hub"], "hub-a");
    assert_eq!(after["failedAttempts"], 2);
    // Nothing more to do.
    clock.advance(Duration::from_secs(600));
    assert_eq!(f.engine.cleanup_pass().await.unwrap().claimed, 0);
}

/// The clean-up worker of one node removes an old identity while the device registers back to
/// that hub through another node: the registration waits for the removal's fence on the record,
/// so the removal never lands after the identity was written again (a slow delete here; before
/// the fence, the device ended `assigned` to hub-a with no identity there).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removal_on_one_node_never_undoes_the_identity_written_again_on_another() {
    let (f, clock, a, b) = two_fake_hubs().await;
    f.move_to("hub-a").await;
    a.fail_next(down("hub-a"));
    f.move_to("hub-b").await;
    assert_eq!(
        f.cleanup_tasks().await.len(),
        1,
        "the removal from hub-a is queued"
    );
    clock.advance(Duration::from_secs(1));
    let other = f.other_node(
        EngineSettings::default(),
        clock.clone() as Arc<dyn Clock>,
        7,
        "hub-a",
        a.clone(),
    );
    other
        .hubs
        .install(f.instance.hub("hub-b").unwrap(), b.clone());
    f.engine.heartbeat().await.unwrap();
    other.heartbeat().await.unwrap();

    // This node's worker deletes d-1 from hub-a, slowly.
    a.delay_next(1, Duration::from_millis(400));
    let worker = {
        let e = f.engine.clone();
        tokio::spawn(async move { e.cleanup_pass().await.unwrap() })
    };
    let fenced = wait_for_record(&f, "d-1", "the removal's fence", |r| r.removing.is_some()).await;
    let fence = fenced.removing.unwrap();
    assert_eq!(
        (fence.hub.as_str(), fence.device_id.as_str()),
        ("hub-a", "d-1")
    );

    // Meanwhile the device is sent back to hub-a, and registers through the other node.
    f.enroll(
        "d-1",
        true,
        serde_json::json!({"allocationPolicy": "static", "iotHubs": ["hub-a"],
            "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": false}}),
    )
    .await;
    let mut req = register_request("d-1");
    req.credential = token("d-1", KEY);
    let r = other.register(req).await.unwrap();
    assert_eq!(r.body.status, RegistrationStatus::Assigned);
    let pass = worker.await.unwrap();
    assert_eq!(pass.deleted, 1, "{pass:?}");

    let (rec, _) = f.repo.registration("t", "d-1").await.unwrap().unwrap();
    assert_eq!(rec.state.assigned_hub.as_deref(), Some("hub-a"));
    assert!(rec.removing.is_none(), "the fence is down: {rec:?}");
    assert!(
        a.device("d-1").is_some(),
        "the identity written again is still on hub-a: {:?}",
        a.calls()
    );
    let calls = a.calls();
    let delete = calls
        .iter()
        .rposition(|c| matches!(c, crate::hubs::fake::Call::Delete { .. }))
        .unwrap();
    assert!(
        calls[delete..]
            .iter()
            .any(|c| !matches!(c, crate::hubs::fake::Call::Delete { .. })),
        "the identity was written after the delete: {calls:?}"
    );
}

/// A node whose own heartbeat has lapsed (its database stalled for a whole lease) starts no hub
/// write: the other nodes may be ending its intents; the device is told to retry.
#[tokio::test]
async fn a_node_whose_lease_lapsed_writes_no_identity() {
    let (f, clock, a, _b) = two_fake_hubs().await;
    f.engine.heartbeat().await.unwrap();
    f.enroll(
        "d-1",
        true,
        serde_json::json!({"allocationPolicy": "static", "iotHubs": ["hub-a"]}),
    )
    .await;
    clock.advance(Duration::from_secs(6));
    let req = || {
        let mut req = register_request("d-1");
        req.credential = token("d-1", KEY);
        req
    };
    let r = f.engine.register(req()).await;
    assert!(
        matches!(
            r,
            Err(dps_core::Error::Store(
                dps_core::store::StoreError::Unavailable(_)
            ))
        ),
        "{r:?}"
    );
    assert!(a.calls().is_empty(), "{:?}", a.calls());
    f.engine.heartbeat().await.unwrap();
    let r = f.engine.register(req()).await.unwrap();
    assert_eq!(r.body.status, RegistrationStatus::Assigned);
    assert!(a.device("d-1").is_some());
}

/// An intent ended because its node died may have left the identity on its hub: the identity is
/// queued for removal with the ending (unless it is the identity the device is assigned to).
#[tokio::test]
async fn an_interrupted_intent_queues_the_removal_of_its_identity() {
    let (f, clock, a, _b) = two_fake_hubs().await;
    let dead = f.other_node(
        EngineSettings::default(),
        clock.clone() as Arc<dyn Clock>,
        9,
        "hub-a",
        a.clone(),
    );
    dead.heartbeat().await.unwrap();
    f.engine.heartbeat().await.unwrap();
    let mut rec = RegistrationRecord {
        state: DeviceRegistrationState {
            registration_id: "d-9".into(),
            status: Some(RegistrationStatus::Assigning),
            ..Default::default()
        },
        operation_id: Some("op".into()),
        recent_operations: vec![],
        retry_after: None,
        enrollment_group_id: None,
        attestation: None,
        hub_history: vec!["hub-a".into()],
        failure: None,
        reason: None,
        pending: Some(PendingAssignment {
            hub: "hub-a".into(),
            device_id: "d-9".into(),
            started: ts(clock.as_ref()),
            owner: Some(dead.node_id().to_string()),
        }),
        transport: None,
        hub_write: None,
        issued: None,
        removing: None,
    };
    f.repo
        .put_registration("t", &mut rec, "e1".into(), Expect::Any)
        .await
        .unwrap();
    assert_eq!(
        f.engine.recover(Duration::from_secs(60)).await.unwrap(),
        0,
        "its node is alive"
    );
    clock.advance(Duration::from_secs(6));
    f.engine.heartbeat().await.unwrap();
    assert_eq!(f.engine.recover(Duration::from_secs(60)).await.unwrap(), 1);
    let tasks = f.cleanup_tasks().await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(
        (tasks[0].key.hub.as_str(), tasks[0].key.device_id.as_str()),
        ("hub-a", "d-9")
    );
}

#[tokio::test]
async fn a_queued_removal_never_deletes_a_device_that_came_back_to_that_hub() {
    let (f, clock, a, b) = two_fake_hubs().await;
    f.move_to("hub-a").await;
    a.fail_next(down("hub-a"));
    f.move_to("hub-b").await;
    assert_eq!(f.cleanup_tasks().await.len(), 1);
    // The device comes back to hub-a before the retry: the assignment cancels the removal in
    // its own transaction (and queues, then completes, the removal from hub-b).
    f.move_to("hub-a").await;
    assert!(f.cleanup_tasks().await.is_empty());
    assert!(b.device("d-1").is_none());
    clock.advance(Duration::from_secs(600));
    assert_eq!(f.engine.cleanup_pass().await.unwrap().claimed, 0);
    assert!(
        a.device("d-1").is_some(),
        "the device's login on hub-a stays"
    );

    // A task that is there anyway (queued by another node just before the device came back) is
    // checked against the registration before the delete, and dropped.
    let mut stale = f.engine.new_cleanup("t", "HUB-A", "d-1", "d-1", false);
    stale.next_attempt_ms = 0;
    f.repo
        .store
        .write_all(vec![dps_core::store::Write::EnqueueCleanup(stale)])
        .await
        .unwrap();
    a.clear_calls();
    let pass = f.engine.cleanup_pass().await.unwrap();
    assert_eq!(
        (pass.claimed, pass.cancelled, pass.deleted),
        (1, 1, 0),
        "{pass:?}"
    );
    assert_eq!(deletes(&a), 0);
    assert!(a.device("d-1").is_some());
    assert!(f.cleanup_tasks().await.is_empty());
}

#[tokio::test]
async fn a_hub_that_fails_in_a_pass_gets_no_more_calls_in_it_and_a_task_of_an_unlinked_hub_is_dropped(
) {
    let (f, clock, a, _b) = two_fake_hubs().await;
    let writes = (0..5)
        .map(|i| {
            let mut t = f
                .engine
                .new_cleanup("t", "hub-a", &format!("x-{i}"), "nobody", false);
            t.next_attempt_ms = i;
            dps_core::store::Write::EnqueueCleanup(t)
        })
        .chain(std::iter::once(dps_core::store::Write::EnqueueCleanup(
            f.engine.new_cleanup("t", "hub-gone", "y", "nobody", false),
        )))
        .collect();
    f.repo.store.write_all(writes).await.unwrap();
    a.fail_next_n(1000, down("hub-a"));
    let pass = f.engine.cleanup_pass().await.unwrap();
    assert_eq!(pass.claimed, 6, "{pass:?}");
    assert_eq!(
        (pass.failed, pass.deferred, pass.cancelled),
        (1, 4, 1),
        "{pass:?}"
    );
    assert_eq!(deletes(&a), 1, "one call to the failing hub");
    let tasks = f.cleanup_tasks().await;
    assert_eq!(
        tasks.len(),
        5,
        "the hub-a tasks stay; the unlinked hub's is dropped"
    );
    assert!(tasks
        .iter()
        .all(|t| t.key.hub == "hub-a" && t.claim.is_none()));
    // A task is never dropped for failing: many attempts later it is still there.
    for _ in 0..40 {
        clock.advance(Duration::from_secs(301));
        f.engine.cleanup_pass().await.unwrap();
    }
    assert_eq!(f.cleanup_tasks().await.len(), 5);
}

#[tokio::test]
async fn a_deleted_registrations_identity_is_removed_through_the_queue_when_its_hub_was_down() {
    let (f, clock, a, _b) = two_fake_hubs().await;
    // hub-a deletes identities of deleted registrations.
    let mut inst = (*f.instance).clone();
    let mut ha = hub("hub-a");
    ha.options
        .insert("delete_identity_on_deregister".into(), true.into());
    inst.linked_hub = vec![ha.clone(), hub("hub-b")];
    f.engine.instances.put(&inst).await.unwrap();
    f.engine.hubs.install(&ha, a.clone());
    let rec = f.move_to("hub-a").await;
    f.repo
        .store
        .delete(Collection::Registration, "t", "d-1", Expect::Any)
        .await
        .unwrap();
    a.fail_next(down("hub-a"));
    f.engine.registration_deleted("t", &rec).await;
    assert!(a.device("d-1").is_some(), "hub-a was down");
    let tasks = f.cleanup_tasks().await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0].attempts, 1);
    clock.advance(Duration::from_secs(1));
    let pass = f.engine.cleanup_pass().await.unwrap();
    assert_eq!(pass.deleted, 1, "{pass:?}");
    assert!(a.device("d-1").is_none());
    assert!(f.cleanup_tasks().await.is_empty());
}

#[tokio::test]
async fn a_removal_interrupted_by_a_crash_is_taken_over_once_its_claim_runs_out() {
    use dps_core::hub::HubAdapter;
    let (f, clock, a, _b) = two_fake_hubs().await;
    a.upsert_device(
        &dps_core::hub::HubIdentity {
            device_id: "orphan".into(),
            auth: dps_core::hub::HubAuth::SymmetricKey {
                primary: KEY.into(),
                secondary: KEY.into(),
            },
            capabilities: Default::default(),
            enabled: true,
        },
        None,
    )
    .await
    .unwrap();
    // Queued with the registration commit, claimed for the first attempt, which never came
    // (the node crashed right after the commit).
    let task = f.engine.new_cleanup("t", "hub-a", "orphan", "orphan", true);
    f.repo
        .store
        .write_all(vec![dps_core::store::Write::EnqueueCleanup(task)])
        .await
        .unwrap();
    clock.advance(Duration::from_secs(60));
    assert_eq!(
        f.engine.cleanup_pass().await.unwrap().claimed,
        0,
        "still claimed"
    );
    clock.advance(EngineSettings::default().cleanup.lease);
    let pass = f.engine.cleanup_pass().await.unwrap();
    assert_eq!((pass.claimed, pass.deleted), (1, 1), "{pass:?}");
    assert!(a.device("orphan").is_none());
    assert!(f.cleanup_tasks().await.is_empty());
}

/// The EK of the Azure SDK samples (a standard RSA-2048 EK); it serves as the SRK too here.
const SAMPLE_EK: &str = "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAopqgkUBwtpr1sCgVJcEZxsJtpmtOAt9K7SjGFe4hsp6DJ/dd2E5UFzBC+Jp8Fzqf5ukRBkqrAgIuAvHRsruIedk1uarJSLhbDpFLHxFd7iDNcYfrvdgVNT2T9zrvkh2y04WuRQg2D5qf0tZF82jeTjR/YJK7uWhaRwWOwZ3b1XD9l6wFOrwK/Ic0PEsjneFXQzL0n9uKyuHmHNz+wHppmOiMAabvnXXEin9ou7/iowY/+YhFm3j7atsVvxMI5HEM3Mq+W4imUuzPxVX7fZH+oWPKP5ofpWBTf+MdttGby1AjGnv8JE69JriOYoZG2/4qbsfv9M7a7NFrBlaW7Rt36w==";

fn sample_tpm() -> TpmAttestation {
    TpmAttestation {
        endorsement_key: SAMPLE_EK.into(),
        storage_root_key: Some(SAMPLE_EK.into()),
    }
}

#[tokio::test]
async fn tpm_is_refused_over_mqtt_and_challenged_over_other_transports() {
    let f = fixture(vec![hub("h1")]).await;
    f.enroll(
        "tpm-1",
        true,
        serde_json::json!({"attestation": {"type": "tpm", "tpm": {"endorsementKey": SAMPLE_EK}}}),
    )
    .await;
    // A register publish with `tpm` over MQTT: refused with a 400, as TPM is HTTPS/AMQP only.
    let mut req = register_request("tpm-1");
    req.credential = DeviceCredential::None;
    req.body.tpm = Some(sample_tpm());
    req.transport = Transport::Mqtt;
    let e = f.engine.register(req.clone()).await.unwrap_err();
    assert!(
        matches!(e, Error::Unauthorized(AuthFailure::TpmOverMqtt)),
        "{e:?}"
    );
    let w = dps_core::wire::WireError::from(&e);
    assert_eq!((w.status, w.error_code), (400, 400_004));
    assert!(
        w.message.contains("not supported over MQTT"),
        "{}",
        w.message
    );
    // Over HTTPS the same request is the challenge.
    req.transport = Transport::Https;
    let e = f.engine.register(req).await.unwrap_err();
    let Error::TpmChallenge { authentication_key } = &e else {
        panic!("{e:?}")
    };
    let (status, body) = dps_core::wire::tpm_challenge(&e).unwrap();
    assert_eq!(status, 401);
    assert_eq!(body["keyName"], "registration");
    let blob = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        authentication_key,
    )
    .unwrap();
    dps_core::tpm::ActivationParts::parse(&blob).unwrap();
    // The transport-independent entry point (the AMQP SASL TPM mechanism's): a blob over
    // AMQP, a refusal over MQTT, and the activation it issued replaces the previous one.
    let raw = f
        .engine
        .tpm_challenge(SCOPE, "tpm-1", &sample_tpm(), Transport::Amqp, None)
        .await
        .unwrap();
    dps_core::tpm::ActivationParts::parse(&raw).unwrap();
    assert_ne!(raw, blob);
    assert!(matches!(
        f.engine
            .tpm_challenge(SCOPE, "tpm-1", &sample_tpm(), Transport::MqttWs, None)
            .await,
        Err(Error::Unauthorized(AuthFailure::TpmOverMqtt))
    ));
    assert!(matches!(
        f.engine
            .tpm_challenge(SCOPE, "nobody", &sample_tpm(), Transport::Amqp, None)
            .await,
        Err(Error::Unauthorized(AuthFailure::TpmNotEnrolled(_)))
    ));
    // A SAS CONNECT for a TPM enrollment is refused (TPM devices have no MQTT path).
    let connect = f
        .engine
        .authorize_connect(Transport::Mqtt, SCOPE, "tpm-1", &token("tpm-1", KEY), None)
        .await;
    assert_eq!(connect, Err(ConnectRefusal::NotAuthorized));
}

// ------------------------------------------------------------------------------------------------
// Several nodes on one store: leases and the per-device compare-and-set

/// A clock the test moves.
struct MovableClock(StdMutex<time::OffsetDateTime>);
impl Clock for MovableClock {
    fn now(&self) -> time::OffsetDateTime {
        *self.0.lock().unwrap()
    }
}
impl MovableClock {
    fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }
}

impl Fixture {
    /// Another node (its own engine, hub set and id) on the same store and instances, with the
    /// given fake hub installed for `host`.
    fn other_node(
        &self,
        settings: EngineSettings,
        clock: Arc<dyn Clock>,
        seed: u64,
        host: &str,
        fake: Arc<FakeHub>,
    ) -> Arc<Engine> {
        let mut settings = settings;
        settings.node.id = format!("node-{seed}");
        let store = self.repo.store.clone();
        let hubs = Arc::new(HubSet::new(store, crate::outbound::Outbound::permissive()));
        hubs.install(self.instance.hub(host).unwrap(), fake);
        Engine::new(
            EnginePorts {
                repo: self.repo.clone(),
                instances: self.instances.clone(),
                hubs,
                catalog: Catalog::new(self.repo.clone()),
                clock,
                random: Arc::new(SeededRandom::new(seed)),
                custom_allocator: self.webhook.clone(),
            },
            settings,
        )
    }
}

async fn wait_for_record(
    f: &Fixture,
    rid: &str,
    what: &str,
    ok: impl Fn(&RegistrationRecord) -> bool,
) -> RegistrationRecord {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((rec, _)) = f.repo.registration("t", rid).await.unwrap() {
            if ok(&rec) {
                return rec;
            }
        }
        assert!(Instant::now() < deadline, "{rid}: never {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An intent belongs to the node that wrote it: another node never takes it over while the
/// owner's heartbeat holds, however old the intent; once the heartbeat lapses it is ended at
/// once, and the old owner's late write is refused by the record's compare-and-set (its
/// attempt starts again and ends with one consistent record).
#[tokio::test]
async fn intents_follow_their_nodes_heartbeat_not_their_age() {
    let clock = Arc::new(MovableClock(StdMutex::new(
        time::macros::datetime!(2026-06-01 12:00 UTC),
    )));
    let settings = EngineSettings {
        inline_wait: Duration::from_millis(20),
        ..EngineSettings::default()
    };
    let lease = settings.node.lease;
    let f = fixture_clocked(vec![hub("fake-hub")], settings.clone(), clock.clone()).await;
    f.group("g", serde_json::json!({})).await;
    let fake = Arc::new(FakeHub::new("fake-hub").with_timeout(Duration::from_secs(2)));
    f.engine
        .hubs
        .install(f.instance.hub("fake-hub").unwrap(), fake.clone());
    let a = f.engine.clone();
    let b = f.other_node(settings, clock.clone(), 2, "fake-hub", fake.clone());
    assert_ne!(a.node_id(), b.node_id());
    a.heartbeat().await.unwrap();
    b.heartbeat().await.unwrap();

    // Node A's hub write hangs (2 s): its intent is in the store, owned by A.
    fake.hang_next(1);
    let r = a.register(register_request("slow-1")).await.unwrap();
    assert_eq!(r.status, 202);
    let op = r.body.operation_id;
    let owner = a.node_id().to_string();
    wait_for_record(&f, "slow-1", "an intent of node A", |r| {
        r.state.status == Some(RegistrationStatus::Assigning)
            && r.pending.as_ref().and_then(|p| p.owner.as_deref()) == Some(owner.as_str())
    })
    .await;

    // An hour later, with A alive (heartbeat fresh), B's recovery leaves it alone.
    clock.advance(Duration::from_secs(3600));
    a.heartbeat().await.unwrap();
    b.heartbeat().await.unwrap();
    assert_eq!(b.recover(Duration::from_secs(60)).await.unwrap(), 0);
    let (rec, _) = f.repo.registration("t", "slow-1").await.unwrap().unwrap();
    assert_eq!(rec.state.status, Some(RegistrationStatus::Assigning));
    // A's own sweep leaves it too: its assignment is running.
    assert_eq!(a.recover(Duration::from_secs(60)).await.unwrap(), 0);

    // A stops beating: once its lease has passed, B ends the intent at once.
    clock.advance(lease + Duration::from_millis(1));
    b.heartbeat().await.unwrap();
    assert_eq!(b.recover(Duration::from_secs(60)).await.unwrap(), 1);
    let (rec, _) = f.repo.registration("t", "slow-1").await.unwrap().unwrap();
    assert_eq!(rec.state.status, Some(RegistrationStatus::Failed));
    assert_eq!(rec.failure, Some(AssignmentFailure::Interrupted));
    assert!(rec.pending.is_none());
    assert!(
        rec.reason.as_deref().unwrap().contains(&owner),
        "{:?}",
        rec.reason
    );

    // A's stall ends (its heartbeat holds again). Its hub write times out; its failure write
    // is refused (the record changed), so its attempt starts again from the recovered record
    // and assigns the device. (While its lease had lapsed it would start no hub write: see
    // `a_node_whose_lease_lapsed_writes_no_identity`.)
    a.heartbeat().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = a
            .operation_status(register_request("slow-1"), &op)
            .await
            .unwrap();
        if r.status == 200 {
            assert_eq!(r.body.status, RegistrationStatus::Assigned);
            break;
        }
        assert!(Instant::now() < deadline, "still {:?}", r.body.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (rec, _) = f.repo.registration("t", "slow-1").await.unwrap().unwrap();
    assert_eq!(rec.state.status, Some(RegistrationStatus::Assigned));
    assert_eq!(rec.state.assigned_hub.as_deref(), Some("fake-hub"));
    assert_eq!(fake.devices().len(), 1);
}

/// A node's own intent that no running assignment holds (a store failure ended the attempt
/// half-way) is ended by that node's own sweep; an intent without an owner (written before
/// nodes had ids) only once older than `unowned_after`.
#[tokio::test]
async fn own_abandoned_and_unowned_intents_are_recovered() {
    let clock = Arc::new(MovableClock(StdMutex::new(
        time::macros::datetime!(2026-06-01 12:00 UTC),
    )));
    let f = fixture_clocked(
        vec![hub("fake-hub")],
        EngineSettings::default(),
        clock.clone(),
    )
    .await;
    f.engine.heartbeat().await.unwrap();
    let intent = |rid: &str, owner: Option<String>| RegistrationRecord {
        state: DeviceRegistrationState {
            registration_id: rid.into(),
            status: Some(RegistrationStatus::Assigning),
            last_updated_date_time_utc: Some(ts(clock.as_ref())),
            ..Default::default()
        },
        operation_id: Some("op".into()),
        recent_operations: vec![],
        retry_after: None,
        enrollment_group_id: None,
        attestation: None,
        hub_history: vec!["fake-hub".into()],
        failure: None,
        reason: None,
        pending: Some(PendingAssignment {
            hub: "fake-hub".into(),
            device_id: rid.into(),
            started: ts(clock.as_ref()),
            owner,
        }),
        transport: None,
        hub_write: None,
        issued: None,
        removing: None,
    };
    let mut mine = intent("mine", Some(f.engine.node_id().to_string()));
    f.repo
        .put_registration("t", &mut mine, "e1".into(), Expect::Any)
        .await
        .unwrap();
    let mut old = intent("old", None);
    f.repo
        .put_registration("t", &mut old, "e2".into(), Expect::Any)
        .await
        .unwrap();
    assert_eq!(f.engine.recover(Duration::from_secs(60)).await.unwrap(), 1);
    let status = |rid: &'static str| {
        let repo = f.repo.clone();
        async move {
            repo.registration("t", rid)
                .await
                .unwrap()
                .unwrap()
                .0
                .state
                .status
        }
    };
    assert_eq!(status("mine").await, Some(RegistrationStatus::Failed));
    assert_eq!(status("old").await, Some(RegistrationStatus::Assigning));
    clock.advance(Duration::from_secs(61));
    f.engine.heartbeat().await.unwrap();
    assert_eq!(f.engine.recover(Duration::from_secs(60)).await.unwrap(), 1);
    assert_eq!(status("old").await, Some(RegistrationStatus::Failed));
}

/// Two registrations of one device arriving at two nodes at once end with one record, one
/// identity on one hub, and the same answer to both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_registering_one_device_at_once_agree() {
    let settings = EngineSettings::default();
    let f = fixture_with(vec![hub("hub-a"), hub("hub-b")], settings.clone()).await;
    f.group("g", serde_json::json!({})).await;
    let fa = Arc::new(FakeHub::new("hub-a"));
    let fb = Arc::new(FakeHub::new("hub-b"));
    f.engine
        .hubs
        .install(f.instance.hub("hub-a").unwrap(), fa.clone());
    f.engine
        .hubs
        .install(f.instance.hub("hub-b").unwrap(), fb.clone());
    let clock: Arc<dyn Clock> = Arc::new(FixedClock(time::macros::datetime!(2026-06-01 12:00 UTC)));
    let other = f.other_node(settings, clock, 7, "hub-a", fa.clone());
    other
        .hubs
        .install(f.instance.hub("hub-b").unwrap(), fb.clone());
    f.engine.heartbeat().await.unwrap();
    other.heartbeat().await.unwrap();
    for i in 0..20 {
        let rid = format!("twin-{i}");
        let mut tasks = Vec::new();
        for node in [
            f.engine.clone(),
            other.clone(),
            f.engine.clone(),
            other.clone(),
        ] {
            let req = register_request(&rid);
            tasks.push(tokio::spawn(async move { node.register(req).await }));
        }
        let mut answers = Vec::new();
        for t in tasks {
            let r = t.await.unwrap().unwrap_or_else(|e| panic!("{rid}: {e}"));
            assert_eq!(r.status, 200, "{rid}");
            assert_eq!(r.body.status, RegistrationStatus::Assigned, "{rid}");
            let st = r.body.registration_state.unwrap();
            answers.push((st.assigned_hub, st.device_id));
        }
        answers.dedup();
        assert_eq!(answers.len(), 1, "{rid}: {answers:?}");
        let (rec, _) = f.repo.registration("t", &rid).await.unwrap().unwrap();
        assert_eq!(
            (rec.state.assigned_hub.clone(), rec.state.device_id.clone()),
            answers[0]
        );
        let on_a = fa.device(&rid).is_some();
        let on_b = fb.device(&rid).is_some();
        assert!(
            on_a ^ on_b,
            "{rid}: one identity on one hub (a: {on_a}, b: {on_b})"
        );
    }
}

/// `max_devices` is counted in the store with a reservation: two nodes registering 16 devices
/// at once on a hub with room for 5 assign exactly 5; the others are told no hub is available.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_never_overshoot_a_hubs_max_devices() {
    let mut capped = hub("cap-hub");
    capped.max_devices = Some(5);
    let settings = EngineSettings::default();
    let f = fixture_with(vec![capped], settings.clone()).await;
    f.group("g", serde_json::json!({})).await;
    let fake = Arc::new(FakeHub::new("cap-hub"));
    f.engine
        .hubs
        .install(f.instance.hub("cap-hub").unwrap(), fake.clone());
    let clock: Arc<dyn Clock> = Arc::new(FixedClock(time::macros::datetime!(2026-06-01 12:00 UTC)));
    let other = f.other_node(settings, clock, 9, "cap-hub", fake.clone());
    f.engine.heartbeat().await.unwrap();
    other.heartbeat().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let node = if i % 2 == 0 {
            f.engine.clone()
        } else {
            other.clone()
        };
        let req = register_request(&format!("cap-{i}"));
        tasks.push(tokio::spawn(async move { node.register(req).await }));
    }
    let mut assigned = 0;
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.status, 200);
        match r.body.status {
            RegistrationStatus::Assigned => assigned += 1,
            RegistrationStatus::Failed => {
                let st = r.body.registration_state.unwrap();
                assert_eq!(
                    st.error_code,
                    Some(dps_core::wire::assignment_failure(&AssignmentFailure::NoHub).error_code)
                );
            }
            s => panic!("unexpected {s:?}"),
        }
    }
    assert_eq!(assigned, 5);
    assert_eq!(fake.devices().len(), 5);
}

/// A write that timed out may have reached the hub: the identity a new device may have there is
/// queued for removal, and the queued removal is dropped once the device is assigned to that
/// hub after all.
#[tokio::test]
async fn a_timed_out_write_to_a_new_hub_queues_the_removal_of_what_it_may_have_left() {
    let settings = EngineSettings {
        inline_wait: Duration::from_secs(20),
        ..EngineSettings::default()
    };
    let f = fixture_with(vec![hub("fake-hub")], settings).await;
    f.group("g", serde_json::json!({})).await;
    let fake = Arc::new(FakeHub::new("fake-hub").with_timeout(Duration::from_millis(100)));
    f.engine
        .hubs
        .install(f.instance.hub("fake-hub").unwrap(), fake.clone());
    fake.hang_next(1);
    let r = f.engine.register(register_request("tmo-1")).await;
    assert!(r.is_err(), "the device is told to retry: {r:?}");
    let q = f.engine.cleanup_queue(None, 100).await.unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].key.hub, "fake-hub");
    assert_eq!(q[0].key.device_id, "tmo-1");
    let r = f.engine.register(register_request("tmo-1")).await.unwrap();
    assert_eq!(r.body.status, RegistrationStatus::Assigned);
    assert!(f.engine.cleanup_queue(None, 100).await.unwrap().is_empty());
    assert!(fake.device("tmo-1").is_some());
}

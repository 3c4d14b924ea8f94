//! What attestation reads on every registration and the use cases change: an instance's
//! enrollment groups (per attestation kind), its X.509 material (CA certificates and deny
//! list), and whether it has any individual enrollment at all (a fleet enrolled through groups
//! only then skips the per-device lookup of an individual enrollment). Each is read from the
//! store at most once per [`TTL`] and dropped at once by a change made on this node; other
//! nodes sharing a PostgreSQL store drop it when the database announces the change
//! (`LISTEN/NOTIFY`, in `server.rs`), and within the TTL if notifications are down.
//!
//! The registration engine reads through the catalog; the enrollment and certificate use cases
//! tell it what changed. Nothing else holds these caches.

use crate::repo::Repo;
use dps_core::model::EnrollmentGroup;
use dps_core::sas::GroupKey;
use dps_core::x509::verify::{CaCertificate, DenyList};
use dps_core::Result;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a value read from the store is used before it is read again.
pub const TTL: Duration = Duration::from_secs(2);

/// An instance's CA certificates and deny list, as X.509 attestation uses them.
pub struct X509Material {
    /// The instance's CA certificates (verified or not).
    pub cas: Vec<CaCertificate>,
    /// The instance's deny list.
    pub deny: DenyList,
}

/// An instance's enrollment groups of one attestation kind, in the store's order, with the
/// symmetric-key groups' keys prepared for attestation (see [`GroupKey`]).
pub struct GroupSet {
    groups: Vec<EnrollmentGroup>,
    /// Per group, its primary and secondary keys prepared (`None`: absent or not base64; always
    /// `None` for other kinds).
    keys: Vec<[Option<GroupKey>; 2]>,
}

impl GroupSet {
    fn new(groups: Vec<EnrollmentGroup>) -> Self {
        let keys = groups
            .iter()
            .map(|g| match &g.settings.attestation.symmetric_key {
                Some(sk) => [
                    sk.primary_key.as_deref().and_then(GroupKey::new),
                    sk.secondary_key.as_deref().and_then(GroupKey::new),
                ],
                None => [None, None],
            })
            .collect();
        GroupSet { groups, keys }
    }

    /// The prepared primary and secondary keys of the group at `index`.
    pub fn keys(&self, index: usize) -> &[Option<GroupKey>; 2] {
        &self.keys[index]
    }
}

impl std::ops::Deref for GroupSet {
    type Target = [EnrollmentGroup];
    fn deref(&self) -> &[EnrollmentGroup] {
        &self.groups
    }
}

/// Slots of [`Catalog::group_hint`]: 2^18 (2 MiB).
const HINT_SLOTS: usize = 1 << 18;

/// A registration id's place in [`Catalog`]'s table of group hints.
#[derive(Debug, Clone, Copy)]
pub struct HintSlot {
    slot: usize,
    /// The hash's upper half, to tell ids sharing a slot apart.
    tag: u64,
}

/// Values read from the store per (instance, kind), kept for [`TTL`].
struct InstanceCache<V>(Mutex<HashMap<(String, String), (Instant, Arc<V>)>>);

impl<V> Default for InstanceCache<V> {
    fn default() -> Self {
        InstanceCache(Mutex::new(HashMap::new()))
    }
}

impl<V> InstanceCache<V> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), (Instant, Arc<V>)>> {
        // A poisoned lock means a thread panicked while holding it; the map is still usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, key: &(String, String)) -> Option<Arc<V>> {
        self.lock()
            .get(key)
            .filter(|(at, _)| at.elapsed() < TTL)
            .map(|(_, v)| v.clone())
    }

    fn put(&self, key: (String, String), v: Arc<V>) {
        self.lock().insert(key, (Instant::now(), v));
    }

    fn clear(&self) {
        self.lock().clear();
    }

    fn invalidate(&self, instance: &str) {
        self.lock()
            .retain(|k, _| !k.0.eq_ignore_ascii_case(instance));
    }
}

/// The cached enrollment groups and X.509 material of every instance.
pub struct Catalog {
    repo: Repo,
    groups: InstanceCache<GroupSet>,
    /// Which symmetric-key group last admitted a registration id, so that its next
    /// registration tries that group first (an instance with many groups otherwise spends two
    /// key derivations and up to two signature checks per group on every registration). A
    /// direct-mapped table: slot = hash of (instance, registration id); the value is the hash's
    /// upper half (to tell ids sharing a slot apart) and the group's position + 1. A lost or
    /// stale hint costs only the ordinary search; nothing is admitted on a hint alone.
    hints: Box<[AtomicU64]>,
    hint_hasher: std::collections::hash_map::RandomState,
    /// Symmetric-key group keys tried by device attestation so far (each a key derivation and
    /// up to two signature checks): `dps_sas_group_keys_tried_total`.
    group_keys_tried: AtomicU64,
    x509: InstanceCache<X509Material>,
    /// Whether the instance has any individual enrollment.
    individuals: InstanceCache<bool>,
    /// Bumped by every change of individual enrollments: a read that started before it is not
    /// cached (it may have missed the change).
    individuals_generation: AtomicU64,
}

impl Catalog {
    /// A catalog over the store.
    pub fn new(repo: Repo) -> Arc<Self> {
        Arc::new(Catalog {
            repo,
            groups: InstanceCache::default(),
            hints: (0..HINT_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hint_hasher: std::collections::hash_map::RandomState::new(),
            group_keys_tried: AtomicU64::new(0),
            x509: InstanceCache::default(),
            individuals: InstanceCache::default(),
            individuals_generation: AtomicU64::new(0),
        })
    }

    /// Whether the instance has any individual enrollment. When it has none, the device's
    /// individual enrollment need not be looked up: attestation goes straight to the groups.
    pub async fn has_individual_enrollments(&self, instance: &str) -> Result<bool> {
        let key = (instance.to_ascii_lowercase(), String::new());
        if let Some(v) = self.individuals.get(&key) {
            return Ok(*v);
        }
        let generation = self.individuals_generation.load(Ordering::Acquire);
        // Cache misses are boxed: the hit (the hot path) keeps a small future.
        let any = Box::pin(self.repo.any_individual_enrollment(instance)).await?;
        // A change seen meanwhile: answer, but do not cache what may predate it.
        if self.individuals_generation.load(Ordering::Acquire) == generation {
            self.individuals.put(key, Arc::new(any));
        }
        Ok(any)
    }

    /// An individual enrollment of the instance was written or deleted (on this node, or
    /// announced by the database).
    pub fn individuals_changed(&self, instance: &str) {
        self.individuals_generation.fetch_add(1, Ordering::AcqRel);
        self.individuals.invalidate(instance);
    }

    /// The instance's enrollment groups of one attestation kind (`symmetricKey`, `x509`).
    pub async fn groups(&self, instance: &str, kind: &str) -> Result<Arc<GroupSet>> {
        let key = (instance.to_ascii_lowercase(), kind.to_string());
        if let Some(g) = self.groups.get(&key) {
            return Ok(g);
        }
        let g = Arc::new(GroupSet::new(
            Box::pin(self.repo.groups_of_kind(instance, kind)).await?,
        ));
        self.groups.put(key, g.clone());
        Ok(g)
    }

    /// Where a registration id's hint lives ([`Catalog::group_hint`]): compute it once per
    /// attestation, for the lookup and for remembering the group that admitted.
    pub fn hint_slot(&self, instance: &str, registration_id: &str) -> HintSlot {
        use std::hash::Hasher;
        let mut h = self.hint_hasher.build_hasher();
        // Both compared ASCII-case-insensitively, as instances and registration ids are.
        let mut feed = |s: &str| dps_core::ids::hash_ascii_lowercase(&mut h, s);
        feed(instance);
        // A separator no id contains: ("ab", "c") and ("a", "bc") hash apart.
        feed("\u{7f}");
        feed(registration_id);
        let h = h.finish();
        HintSlot {
            slot: (h as usize) & (HINT_SLOTS - 1),
            tag: h & 0xFFFF_FFFF_0000_0000,
        }
    }

    /// The position of the symmetric-key group that last admitted this registration id on
    /// this node, if remembered (the groups may have changed since: a hint, to try first).
    pub fn group_hint(&self, at: HintSlot) -> Option<usize> {
        let v = self.hints[at.slot].load(Ordering::Relaxed);
        (v != 0 && v & 0xFFFF_FFFF_0000_0000 == at.tag)
            .then_some((v & 0xFFFF_FFFF) as usize)
            .and_then(|i| i.checked_sub(1))
    }

    /// Remember that the group at `index` admitted this registration id.
    pub fn remember_group(&self, at: HintSlot, index: usize) {
        let Ok(i) = u32::try_from(index + 1) else {
            return;
        };
        self.hints[at.slot].store(at.tag | u64::from(i), Ordering::Relaxed);
    }

    /// Count `n` group keys tried by one attestation.
    pub fn count_group_keys_tried(&self, n: u64) {
        if n > 0 {
            self.group_keys_tried.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Group keys tried by device attestation since the node started.
    pub fn group_keys_tried(&self) -> u64 {
        self.group_keys_tried.load(Ordering::Relaxed)
    }

    /// The instance's CA certificates and deny list.
    pub async fn x509(&self, instance: &str) -> Result<Arc<X509Material>> {
        let key = (instance.to_ascii_lowercase(), String::new());
        if let Some(m) = self.x509.get(&key) {
            return Ok(m);
        }
        let m = Arc::new(X509Material {
            cas: Box::pin(crate::certificates::load_cas(&self.repo, instance)).await?,
            deny: Box::pin(crate::certificates::load_deny_list(&self.repo, instance)).await?,
        });
        self.x509.put(key, m.clone());
        Ok(m)
    }

    /// An enrollment group of the instance was written or deleted on this node.
    pub fn groups_changed(&self, instance: &str) {
        self.groups.invalidate(instance);
    }

    /// Everything may have changed (the change notifications were interrupted).
    pub fn invalidate_all(&self) {
        self.individuals_generation.fetch_add(1, Ordering::AcqRel);
        self.groups.clear();
        self.x509.clear();
        self.individuals.clear();
    }

    /// A CA certificate or deny-list entry of the instance was written or deleted on this node.
    pub fn x509_changed(&self, instance: &str) {
        self.x509.invalidate(instance);
    }
}

//! The storage port: a small document store with compare-and-swap on ETags, indexed filters and
//! cursor paging, plus an append-only audit log.
//!
//! Contract for implementers:
//! - Every collection is partitioned by `scope` (the instance name; "" for global collections).
//! - Ids are case-insensitive: the store keys documents by `id.to_lowercase()` and keeps `id` as
//!   given.
//! - `put` and `delete` are atomic with their [`Expect`] check. A write that returned `Ok` is
//!   durable (survives a process crash). Implementations may batch concurrent writes into one
//!   commit (group commit) but must not acknowledge before the commit.
//! - `query` returns documents in key order strictly after the cursor, at most `limit`, and a
//!   `next` cursor only when more may follow. Filters use indexes (designed for 1,000,000
//!   documents per scope).

use async_trait::async_trait;

/// The collections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Collection {
    /// Provisioning instances (scope "").
    Instance,
    /// Individual enrollments.
    Enrollment,
    /// Enrollment groups.
    Group,
    /// Registration records.
    Registration,
    /// Device identities of the built-in registry hub (scope = hub host).
    HubDevice,
    /// CA certificates of an instance.
    Certificate,
    /// Revoked certificate thumbprints / serials of an instance.
    DenyList,
    /// The generated issuing CAs of an instance's credential policies (id = policy name).
    IssuingCa,
    /// Certificates dps issued to devices (id = serial number; status `active`/`revoked`,
    /// kind = policy, group = registration id).
    IssuedCertificate,
    /// TPM activations: the HMAC key dps last gave each TPM device (and a few earlier ones, to
    /// recognise replays). Secret; never returned by an API.
    TpmActivation,
}

impl Collection {
    /// All collections.
    pub const ALL: [Collection; 10] = [
        Collection::Instance,
        Collection::Enrollment,
        Collection::Group,
        Collection::Registration,
        Collection::HubDevice,
        Collection::Certificate,
        Collection::DenyList,
        Collection::IssuingCa,
        Collection::IssuedCertificate,
        Collection::TpmActivation,
    ];
    /// Stable name used in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Collection::Instance => "instance",
            Collection::Enrollment => "enrollment",
            Collection::Group => "group",
            Collection::Registration => "registration",
            Collection::HubDevice => "hubdevice",
            Collection::Certificate => "certificate",
            Collection::DenyList => "denylist",
            Collection::IssuingCa => "issuingca",
            Collection::IssuedCertificate => "issuedcert",
            Collection::TpmActivation => "tpmactivation",
        }
    }
}

/// Indexed attributes of a document, used by filters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DocIndex {
    /// Provisioning status or registration status.
    pub status: Option<String>,
    /// Attestation type.
    pub kind: Option<String>,
    /// Enrollment group id (registrations), or hub (registrations' assigned hub is in `hub`).
    pub group: Option<String>,
    /// Assigned hub (registrations).
    pub hub: Option<String>,
}

/// A stored document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    /// The id as given (the key is its lowercase form).
    pub id: String,
    /// The document's ETag (opaque).
    pub etag: String,
    /// JSON text.
    pub body: String,
    /// Indexed attributes.
    pub index: DocIndex,
}

/// Condition for a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// No condition.
    Any,
    /// The document must not exist.
    Absent,
    /// The document must exist with this ETag.
    Etag(String),
    /// The document must exist.
    Present,
}

/// A filter on indexed attributes; `None` matches anything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    /// Status equals.
    pub status: Option<String>,
    /// Attestation type equals.
    pub kind: Option<String>,
    /// Group equals (case-insensitive).
    pub group: Option<String>,
    /// Hub equals.
    pub hub: Option<String>,
    /// Key starts with (lowercased by the store).
    pub id_prefix: Option<String>,
}

/// One page of a query.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    /// Documents in key order.
    pub docs: Vec<Doc>,
    /// Cursor for the next page, when more may follow.
    pub next: Option<String>,
}

/// An audit log entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditEntry {
    /// Sequence number assigned by the store (ignored on append).
    pub seq: i64,
    /// Azure-format timestamp.
    pub timestamp: String,
    /// Instance name ("" for global).
    pub instance: String,
    /// Who: the access policy, "config", "device" or "system".
    pub actor: String,
    /// What: e.g. `enrollment.create`, `registration.assigned`.
    pub action: String,
    /// Kind of the target (enrollment, group, registration, ...).
    pub target_kind: String,
    /// Target id.
    pub target_id: String,
    /// JSON before (secrets redacted).
    pub before: Option<String>,
    /// JSON after (secrets redacted).
    pub after: Option<String>,
}

/// An audit query.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditQuery {
    /// Instance.
    pub instance: Option<String>,
    /// Entries at or after this timestamp (Azure format compares lexically).
    pub since: Option<String>,
    /// Target id equals (case-insensitive).
    pub target_id: Option<String>,
    /// Action starts with.
    pub action_prefix: Option<String>,
    /// Entries with seq greater than this.
    pub after_seq: Option<i64>,
    /// At most this many (oldest first).
    pub limit: usize,
}

/// Store failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The [`Expect`] condition did not hold. `current` is the current ETag, if the document
    /// exists.
    #[error("condition failed (current etag: {current:?})")]
    Conflict {
        /// Current ETag.
        current: Option<String>,
    },
    /// The backend is unreachable or failed; retryable.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be decoded.
    #[error("corrupt data: {0}")]
    Corrupt(String),
}

/// One write of an atomic [`Store::write_all`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Create or replace a document under a condition (as [`Store::put`]).
    Put {
        /// Collection.
        c: Collection,
        /// Scope.
        scope: String,
        /// The document.
        doc: Doc,
        /// Condition.
        expect: Expect,
    },
    /// Delete a document under a condition (as [`Store::delete`]): the whole write fails with
    /// a `Conflict` when the condition does not hold (`Present`: the document must exist).
    Delete {
        /// Collection.
        c: Collection,
        /// Scope.
        scope: String,
        /// Document id.
        id: String,
        /// Condition.
        expect: Expect,
    },
    /// Append an audit entry (as [`Store::append_audit`]).
    Audit(AuditEntry),
    /// Queue a hub identity clean-up (see [`CleanupTask`]). One task per [`CleanupKey`]: when
    /// one is queued already, it takes the new task's registration id, action, next attempt
    /// and claim, and keeps its attempts, last error and creation time.
    EnqueueCleanup(CleanupTask),
    /// Drop the clean-up task of a key, if any (the device id was assigned to that hub again).
    CancelCleanup(CleanupKey),
    /// A capacity reservation: the whole write fails with a `Conflict { current: None }` when
    /// `scope` already holds `max` or more registration records on `hub` (the index `hub`,
    /// compared lowercased, with status `assigned` or `assigning`), not counting the record
    /// `except` (the one being written). Writes nothing. Evaluated so that concurrent writers,
    /// on any node, see each other's records: PostgreSQL takes an advisory transaction lock per
    /// scope and hub before counting; SQLite's single writer applies one batch at a time.
    HubCapacity {
        /// Scope (instance).
        scope: String,
        /// The hub host.
        hub: String,
        /// Most records on the hub.
        max: u64,
        /// The id of the record being written (not counted).
        except: String,
    },
    /// Append a lifecycle event to the outbox (see [`OutboxEvent`]); its `seq` is assigned by
    /// the store.
    Event(OutboxEvent),
}

/// A lifecycle event waiting in the outbox for delivery to the configured sinks. Written in the
/// same transaction as the change it describes; claimed in batches with a lease (like
/// [`CleanupTask`]), removed once delivered (or dead-lettered, or dropped by the outbox bounds).
/// Times are Unix milliseconds, given by the caller.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutboxEvent {
    /// Sequence number assigned by the store (ignored on append); delivery order.
    pub seq: i64,
    /// The event's unique id (the CloudEvents `id`, the consumers' de-duplication key).
    pub id: String,
    /// Instance name.
    pub instance: String,
    /// The event type (CloudEvents `type`).
    pub kind: String,
    /// The whole event, CloudEvents JSON (secrets already redacted).
    pub body: String,
    /// Failed delivery attempts so far.
    pub attempts: u32,
    /// Not delivered before this time.
    pub next_attempt_ms: i64,
    /// When the event was written.
    pub created_ms: i64,
    /// The last failure (secrets scrubbed by the caller).
    pub last_error: Option<String>,
    /// The current claim's token.
    pub claim: Option<String>,
    /// The current claim holds until this time.
    pub claimed_until_ms: Option<i64>,
}

/// What a clean-up task does to a hub identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CleanupAction {
    /// Delete the identity.
    #[default]
    Delete,
}

impl CleanupAction {
    /// Stable name used in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            CleanupAction::Delete => "delete",
        }
    }

    /// The action of a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "delete" => Some(CleanupAction::Delete),
            _ => None,
        }
    }
}

/// Which identity a clean-up task is about: one task per key. The hub host compares
/// case-insensitively; the device id exactly (hubs treat device ids as case-sensitive).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct CleanupKey {
    /// Instance name.
    pub instance: String,
    /// Linked hub host.
    pub hub: String,
    /// Device id on that hub.
    pub device_id: String,
}

/// A durable hub identity clean-up: an identity a device left behind on a hub (it moved to
/// another hub, changed device id, or its registration was deleted) that must be removed even
/// when the hub is down at the time. Times are Unix milliseconds, given by the caller.
///
/// A task is *claimed* by whoever works on it (`claim`, a random token, until
/// `claimed_until_ms`); only the holder of the claim completes or reschedules it, and an
/// expired claim (a crashed node) lets another worker take it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CleanupTask {
    /// Which identity.
    pub key: CleanupKey,
    /// The registration that left the identity behind (its record is checked before the
    /// delete: a device that came back to the hub keeps its identity).
    pub registration_id: String,
    /// What to do.
    pub action: CleanupAction,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not worked on before this time.
    pub next_attempt_ms: i64,
    /// The last failure (secrets scrubbed by the caller).
    pub last_error: Option<String>,
    /// When the task was first queued.
    pub created_ms: i64,
    /// The current claim's token.
    pub claim: Option<String>,
    /// The current claim holds until this time.
    pub claimed_until_ms: Option<i64>,
}

/// A dps node's heartbeat row: nodes sharing a store each keep one fresh, and an intent (a
/// registration `assigning` on a hub outside the store) belongs to the node that wrote it, so
/// that recovery takes over only the intents of nodes whose heartbeat has lapsed. Times are Unix
/// milliseconds of the writing node's clock (nodes keep their clocks in step with NTP; the lease
/// is many times any skew).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeBeat {
    /// The node's id for this run of the process (a name plus a random part: a restarted
    /// process is a new node, and its previous run's intents are taken over).
    pub id: String,
    /// The configured node name (for operators; not unique).
    pub name: String,
    /// When this run started.
    pub started_ms: i64,
    /// The last heartbeat.
    pub heartbeat_ms: i64,
    /// The heartbeat holds until this time; after it the node counts as dead.
    pub expires_ms: i64,
}

/// The storage port.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Engine name (`sqlite`, `postgres`), for logs and metrics.
    fn engine(&self) -> &'static str;
    /// Is the store reachable?
    async fn ping(&self) -> Result<(), StoreError>;
    /// Get one document.
    async fn get(&self, c: Collection, scope: &str, id: &str) -> Result<Option<Doc>, StoreError>;
    /// Create or replace a document under a condition.
    async fn put(
        &self,
        c: Collection,
        scope: &str,
        doc: Doc,
        expect: Expect,
    ) -> Result<(), StoreError>;
    /// Delete a document under a condition; returns the deleted document, `None` if absent
    /// (absent with `Expect::Etag`/`Present` is a `Conflict { current: None }`).
    async fn delete(
        &self,
        c: Collection,
        scope: &str,
        id: &str,
        expect: Expect,
    ) -> Result<Option<Doc>, StoreError>;
    /// Query a page.
    async fn query(
        &self,
        c: Collection,
        scope: &str,
        filter: &Filter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError>;
    /// Count matching documents.
    async fn count(&self, c: Collection, scope: &str, filter: &Filter) -> Result<u64, StoreError>;
    /// Delete every document of a scope in a collection (instance deletion).
    async fn delete_scope(&self, c: Collection, scope: &str) -> Result<u64, StoreError>;
    /// Append to the audit log.
    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError>;
    /// Read the audit log.
    async fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError>;
    /// Prune the audit log: delete the entries stamped before `older_than` (an Azure-format
    /// timestamp; they compare lexically), then the oldest entries beyond the newest
    /// `max_rows`. `None` skips that rule. Returns how many entries were deleted. Deletes in
    /// bounded batches so that other writes are not held up behind one large delete.
    async fn prune_audit(
        &self,
        older_than: Option<&str>,
        max_rows: Option<u64>,
    ) -> Result<u64, StoreError>;
    /// Apply several writes atomically, in order: all of them or none (a failed condition is
    /// a `Conflict` and nothing is written). One commit, so one fsync, for all of them: the
    /// registration path writes the device's record, its identity on the built-in hub and the
    /// audit entry this way.
    async fn write_all(&self, writes: Vec<Write>) -> Result<(), StoreError>;
    /// Claim up to `limit` clean-up tasks that are due (`next_attempt_ms <= now_ms`) and not
    /// claimed (or whose claim expired before `now_ms`), oldest due first: they get `claim` until
    /// `claimed_until_ms`. Two callers never claim one task at once (PostgreSQL: `FOR UPDATE
    /// SKIP LOCKED`).
    async fn claim_cleanup(
        &self,
        now_ms: i64,
        claim: &str,
        claimed_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<CleanupTask>, StoreError>;
    /// Remove a task that its claim holder finished; `false` when the task is gone or claimed
    /// by someone else (nothing is removed then).
    async fn complete_cleanup(&self, key: &CleanupKey, claim: &str) -> Result<bool, StoreError>;
    /// Release a claimed task for a later attempt: its attempts, next attempt and last error
    /// are set and its claim cleared. `false` when the task is gone or claimed by someone else.
    async fn reschedule_cleanup(
        &self,
        key: &CleanupKey,
        claim: &str,
        attempts: u32,
        next_attempt_ms: i64,
        last_error: Option<&str>,
    ) -> Result<bool, StoreError>;
    /// Queued clean-up tasks, of one instance or all, oldest first, at most `limit`.
    async fn list_cleanup(
        &self,
        instance: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CleanupTask>, StoreError>;
    /// How many clean-up tasks are queued.
    async fn count_cleanup(&self) -> Result<u64, StoreError>;
    /// Claim up to `limit` outbox events that are due and not claimed (or whose claim expired
    /// before `now_ms`), lowest `seq` first: they get `claim` until `claimed_until_ms`. Two
    /// callers never claim one event at once (PostgreSQL: `FOR UPDATE SKIP LOCKED`).
    async fn claim_events(
        &self,
        now_ms: i64,
        claim: &str,
        claimed_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<OutboxEvent>, StoreError>;
    /// Remove delivered (or dead-lettered) events held under `claim`; how many were removed.
    async fn complete_events(&self, seqs: &[i64], claim: &str) -> Result<u64, StoreError>;
    /// Release a claimed event for a later attempt (attempts, next attempt and last error set,
    /// claim cleared); `false` when it is gone or claimed by someone else.
    async fn reschedule_event(
        &self,
        seq: i64,
        claim: &str,
        attempts: u32,
        next_attempt_ms: i64,
        last_error: Option<&str>,
    ) -> Result<bool, StoreError>;
    /// Bound the outbox: delete the events created before `older_than_ms`, then the oldest
    /// beyond the newest `max_rows` (`None` skips a rule). Returns how many were dropped.
    async fn prune_events(
        &self,
        older_than_ms: Option<i64>,
        max_rows: Option<u64>,
    ) -> Result<u64, StoreError>;
    /// How many events wait in the outbox.
    async fn count_events(&self) -> Result<u64, StoreError>;
    /// Create or refresh a node's heartbeat row (keyed by [`NodeBeat::id`]).
    async fn heartbeat(&self, node: &NodeBeat) -> Result<(), StoreError>;
    /// Every node's heartbeat row, live or lapsed, ordered by id.
    async fn nodes(&self) -> Result<Vec<NodeBeat>, StoreError>;
    /// Remove heartbeat rows: the node `id` if given (a node stopping cleanly), and every row
    /// whose heartbeat expired before `expired_before_ms` (long-dead nodes). Returns how many.
    async fn remove_nodes(
        &self,
        id: Option<&str>,
        expired_before_ms: i64,
    ) -> Result<u64, StoreError>;
}

/// A fresh opaque ETag.
pub fn new_etag() -> String {
    uuid::Uuid::new_v4().to_string()
}

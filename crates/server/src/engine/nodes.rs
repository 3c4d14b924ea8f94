//! This node among the nodes sharing the store: its id for this run, its heartbeat row, and
//! whose intents are whose.
//!
//! An intent (a registration `assigning` on a hub outside the store) names the node that wrote
//! it ([`PendingAssignment::owner`]). The node keeps a heartbeat row fresh (every
//! `cluster.heartbeat_ms`, valid for `cluster.lease_ms`); as long as it does, nobody else
//! touches its intents, however long its hub write takes. Once its row has expired (the process
//! died, or lost the database for a whole lease), any node ends its intents
//! (`lifecycle.rs`, `recover`), and every record write of the old owner is refused by the
//! record's compare-and-set (`assign.rs`). A restarted process is a new node: its previous
//! run's intents are taken over once that run's row expires.

use super::Engine;
use dps_core::model::{PendingAssignment, RegistrationRecord, RegistrationStatus};
use dps_core::store::NodeBeat;
use dps_core::Result;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Heartbeat rows expired longer than this are removed.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

/// This node's identity and lease.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The node's id for this run of the process: the name and a random part (drawn at start,
    /// `config::ClusterConfig::settings`), so that a restarted process is a new node.
    pub id: String,
    /// The configured name (`cluster.node_name`).
    pub name: String,
    /// How long a heartbeat holds (`cluster.lease_ms`).
    pub lease: Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            id: "dps-1".into(),
            name: "dps".into(),
            lease: Duration::from_secs(5),
        }
    }
}

pub(super) fn unix_ms(t: time::OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

impl Engine {
    /// This node's id for this run of the process (`<name>-<random>`).
    pub fn node_id(&self) -> &str {
        &self.settings.node.id
    }

    /// Write this node's heartbeat (at start, before serving, and then periodically), and
    /// forget nodes dead for a day.
    pub async fn heartbeat(&self) -> Result<()> {
        let now = self.now_ms();
        let lease = i64::try_from(self.settings.node.lease.as_millis()).unwrap_or(i64::MAX);
        let expires_ms = now.saturating_add(lease);
        let written = self
            .repo
            .store
            .heartbeat(&NodeBeat {
                id: self.settings.node.id.clone(),
                name: self.settings.node.name.clone(),
                started_ms: self.started_ms,
                heartbeat_ms: now,
                expires_ms,
            })
            .await;
        match written {
            // The row holds until `expires_ms`, counted from before the write was sent.
            Ok(()) => self.lease_until_ms.store(expires_ms, Ordering::Relaxed),
            Err(e) => {
                // A failed first heartbeat still ends the grace of "no heartbeat yet".
                let _ = self.lease_until_ms.compare_exchange(
                    i64::MAX,
                    now,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                return Err(e.into());
            }
        }
        let forget = i64::try_from(FORGET_AFTER.as_millis()).unwrap_or(i64::MAX);
        self.repo
            .store
            .remove_nodes(None, now.saturating_sub(forget))
            .await?;
        Ok(())
    }

    /// Does this node's own lease hold now? Checked before the node writes an intent and an
    /// identity on a hub outside the store: once its heartbeat has lapsed (its database
    /// connection stalled or failed for a whole lease) the other nodes may end its intents and
    /// assign the same devices, so it starts no new hub writes until a heartbeat holds again
    /// (self-fencing; the record's compare-and-set refuses its late record writes in any case).
    pub(super) fn lease_holds(&self) -> bool {
        self.now_ms() < self.lease_until_ms.load(Ordering::Relaxed)
    }

    /// Remove this node's heartbeat row (a clean stop): its intents, if any are left, are taken
    /// over at once instead of after the lease.
    pub async fn leave(&self) -> Result<()> {
        self.repo
            .store
            .remove_nodes(Some(&self.settings.node.id), i64::MIN)
            .await?;
        Ok(())
    }

    /// The ids of the nodes whose heartbeat holds now.
    pub(super) async fn live_nodes(&self) -> Result<std::collections::HashSet<String>> {
        let now = self.now_ms();
        Ok(self
            .repo
            .store
            .nodes()
            .await?
            .into_iter()
            .filter(|n| n.expires_ms >= now)
            .map(|n| n.id)
            .collect())
    }

    /// Does `node`'s heartbeat hold now?
    pub(super) async fn node_is_live(&self, node: &str) -> Result<bool> {
        Ok(self.live_nodes().await?.contains(node))
    }

    /// The owner of `rec`'s intent when it is another node's (a record `assigning` with a
    /// pending assignment of another node).
    pub(super) fn foreign_intent<'r>(&self, rec: &'r RegistrationRecord) -> Option<&'r str> {
        intent_owner(rec).filter(|o| *o != self.settings.node.id)
    }

    /// How long a registration waits for another live node's assignment of the same device.
    pub(super) fn foreign_intent_wait(&self) -> Duration {
        (self.settings.node.lease * 3).max(Duration::from_secs(30))
    }
}

/// The node whose intent `rec` is, if it is an intent with a known owner.
pub(super) fn intent_owner(rec: &RegistrationRecord) -> Option<&str> {
    if rec.state.status != Some(RegistrationStatus::Assigning) {
        return None;
    }
    rec.pending
        .as_ref()
        .and_then(|p: &PendingAssignment| p.owner.as_deref())
}

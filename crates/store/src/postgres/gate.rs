//! How many of the grouped statements ([`super::batch`], [`super::reads`]) run at once.
//!
//! Grouping pays only while calls queue: a worker that takes the queue while another group is
//! still in flight takes a small group, and two small groups cost PostgreSQL (and dps) nearly
//! twice what one group of both costs. So while the queue is short one group is in flight at a
//! time, and the next worker waits for it, holding the queue, so that the calls arriving
//! meanwhile join its group. Only a long queue ([`Gate::parallel_at`] calls or more: a load one
//! group at a time cannot keep up with) starts more groups at once, up to the number of workers.
//!
//! Measured on the 2-core test host (`docs/benchmarks.md`, 2026-12-04): four committers and four
//! readers without the gate took 0.17 CPU-seconds of PostgreSQL per 1,000 registrations; one of
//! each, 0.10.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

/// How often a waiting worker looks at the queue's length again (a group that ends wakes it
/// at once).
const RECHECK: Duration = Duration::from_millis(1);

/// Groups in flight, and the wake-up for the worker waiting for one to end.
pub(super) struct Gate {
    busy: AtomicUsize,
    ended: Notify,
    parallel_at: usize,
}

/// A group in flight; dropping it ends the group.
pub(super) struct InFlight<'a>(&'a Gate);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
        self.0.ended.notify_waiters();
    }
}

impl Gate {
    /// A gate that runs a second group at once only when `parallel_at` calls or more wait.
    pub(super) fn new(parallel_at: usize) -> Self {
        Gate {
            busy: AtomicUsize::new(0),
            ended: Notify::new(),
            parallel_at,
        }
    }

    /// Wait until a group may start: none is in flight, or the queue behind `rx` (which the
    /// caller holds, with its first call already taken) is long. `rx` is `None` for a worker
    /// that does not hold the queue (a carried call): it starts at once.
    pub(super) async fn enter<T>(&self, rx: Option<&mpsc::Receiver<T>>) -> InFlight<'_> {
        if let Some(rx) = rx {
            loop {
                // Created before the check, so that a group ending in between still wakes us.
                let ended = self.ended.notified();
                if self.busy.load(Ordering::Acquire) == 0 || rx.len() + 1 >= self.parallel_at {
                    break;
                }
                tokio::select! {
                    _ = ended => {}
                    _ = tokio::time::sleep(RECHECK) => {}
                }
            }
        }
        self.busy.fetch_add(1, Ordering::AcqRel);
        InFlight(self)
    }

    /// Groups in flight now.
    #[cfg(test)]
    pub(super) fn in_flight(&self) -> usize {
        self.busy.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn one_group_at_a_time_while_the_queue_is_short() {
        let gate = Arc::new(Gate::new(4));
        let (tx, rx) = mpsc::channel::<u32>(16);
        let first = gate.enter(Some(&rx)).await;
        assert_eq!(gate.in_flight(), 1);
        // A second worker waits while the queue is short ...
        let g = gate.clone();
        let (started_tx, mut started) = mpsc::channel::<()>(1);
        let waiter = tokio::spawn(async move {
            let rx = rx;
            let f = g.enter(Some(&rx)).await;
            started_tx.send(()).await.unwrap();
            drop(f);
            rx
        });
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(
            started.try_recv().is_err(),
            "started while a group was in flight"
        );
        // ... and starts when the group in flight ends.
        drop(first);
        started.recv().await.unwrap();
        let rx = waiter.await.unwrap();
        assert_eq!(gate.in_flight(), 0);

        // A long queue starts a second group at once.
        let first = gate.enter(Some(&rx)).await;
        for i in 0..3 {
            tx.send(i).await.unwrap();
        }
        let second = tokio::time::timeout(Duration::from_secs(5), gate.enter(Some(&rx)))
            .await
            .expect("a long queue does not wait");
        assert_eq!(gate.in_flight(), 2);
        drop((first, second));
        assert_eq!(gate.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_worker_without_the_queue_starts_at_once() {
        let gate = Gate::new(4);
        let _first = gate.enter::<u32>(None).await;
        let _second = tokio::time::timeout(Duration::from_secs(5), gate.enter::<u32>(None))
            .await
            .expect("no wait");
        assert_eq!(gate.in_flight(), 2);
    }
}

//! Releases messages that wait in the store's schedule (a future `send_at`, a quiet-hours
//! deferral) back onto `herald.requests` when they are due.
//!
//! Each dispatch process runs one. Every tick it leases the entries due within the next tick
//! from the store (so several schedulers never release the same entry twice under a live
//! lease), keeps them in a small timing wheel in memory, and publishes each one at its second.
//! An entry is deleted only after the bus acknowledged it; a crash in between publishes it
//! again after the lease, and the send ledger absorbs the copy. Entries survive any crash: a
//! scheduled message is never lost, and at worst released one lease late.

use herald_core::MessageRecord;
use herald_core::bus::Bus;
use herald_core::store::{ScheduledMessage, Store};
use herald_core::wire::REQUESTS_TOPIC;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often the store is asked for due entries, and how far ahead.
const TICK: Duration = Duration::from_millis(500);

/// Most entries leased per tick.
const BATCH: i64 = 5000;

/// How often expired dedup and frequency counters are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The release loop of one dispatch process.
pub struct Scheduler {
    store: Store,
    bus: Arc<dyn Bus>,
    lease: Duration,
}

impl Scheduler {
    /// A scheduler over `store`, publishing to `bus`; entries it takes are leased for `lease`.
    pub fn new(store: Store, bus: Arc<dyn Bus>, lease: Duration) -> Self {
        Scheduler { store, bus, lease }
    }

    /// Releases due messages until `shutdown` turns true. Store and bus failures are logged
    /// and retried on the next tick.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut wheel: BTreeMap<chrono::DateTime<chrono::Utc>, Vec<ScheduledMessage>> =
            BTreeMap::new();
        let mut last_prune = std::time::Instant::now();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !*shutdown.borrow() {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            let now = chrono::Utc::now();
            let lease_until = now + chrono::Duration::from_std(self.lease).unwrap_or_default();
            let horizon = now + chrono::Duration::from_std(TICK).unwrap_or_default();
            match self.store.claim_due(horizon, lease_until, BATCH).await {
                Ok(entries) => {
                    for e in entries {
                        wheel.entry(e.due_at).or_default().push(e);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not read the schedule"),
            }
            // Entries due before now go; none goes early.
            let later = wheel.split_off(&chrono::Utc::now());
            let due: Vec<ScheduledMessage> = std::mem::replace(&mut wheel, later)
                .into_values()
                .flatten()
                .collect();
            if !due.is_empty() && !self.release(&due).await {
                // Leased to us still: try again next tick.
                for e in due {
                    wheel.entry(e.due_at).or_default().push(e);
                }
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = std::time::Instant::now();
                if let Err(e) = self.store.prune_limits().await {
                    tracing::warn!(error = %e, "could not prune dedup counters");
                }
                let now_us = chrono::Utc::now().timestamp_micros();
                if let Err(e) = self.store.prune_receiver_rates(now_us).await {
                    tracing::warn!(error = %e, "could not prune receiver rate limits");
                }
            }
        }
    }

    /// Publishes `due` and deletes their entries; false when the bus refused them.
    async fn release(&self, due: &[ScheduledMessage]) -> bool {
        let signer = match self.store.record_signer().await {
            Ok(signer) => signer,
            Err(e) => {
                tracing::warn!(error = %e, "could not load the record signing key");
                return false;
            }
        };
        let mut records = Vec::with_capacity(due.len());
        let mut released = Vec::with_capacity(due.len());
        for e in due {
            match serde_json::from_str::<MessageRecord>(&e.record) {
                Ok(r) => records
                    .push(signer.signed(r.receiver.into_bytes(), e.record.clone().into_bytes())),
                Err(err) => {
                    // Written by dispatch itself, so this is a bug; keep the entry for a human.
                    tracing::error!(message_id = %e.message_id, error = %err, "schedule entry is not a message record");
                    continue;
                }
            }
            released.push(e.clone());
        }
        if let Err(e) = self.bus.publish(REQUESTS_TOPIC, records).await {
            tracing::warn!(error = %e, "could not release scheduled messages");
            return false;
        }
        if let Err(e) = self.store.release_scheduled(&released).await {
            // Published, so the lease will run out and they go again: the ledger absorbs it.
            tracing::warn!(error = %e, "released messages stay in the schedule until their lease ends");
        }
        tracing::debug!(count = released.len(), "released scheduled messages");
        true
    }
}

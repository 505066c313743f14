//! The receipt poller: asks vendors that keep receipts for collection (Tencent Cloud SMS,
//! Alibaba Cloud SMS, DingTalk work notices) for the receipts of sent messages, and publishes
//! each as a `delivered` or `delivery_failed` event. Vendors that push receipts send them to
//! `POST /v1/receipts/{vendor}` instead (see ingest).
//!
//! Every dispatch worker polls; for Tencent, whose pull hands each receipt out once, workers get
//! disjoint receipts, and for the others a receipt polled twice yields the same event id, which
//! the warehouse keeps once. Messages are asked for during [`LOOKBACK`] after their send.

use crate::channels::Senders;
use herald_core::bus::Bus;
use herald_core::store::{Account, Store};
use herald_core::telemetry::Metrics;
use herald_core::wire::DELIVERY_TOPIC;
use herald_core::{Channel, DeliveryEvent};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long after a send its receipt is still asked for.
pub const LOOKBACK: Duration = Duration::from_secs(3 * 24 * 3600);

/// Most pending messages handed to a vendor in one poll of one account.
const POLL_LIMIT: i64 = 500;

/// Channels whose vendors are polled for receipts.
const POLLED: [Channel; 2] = [Channel::Sms, Channel::DingtalkWork];

/// The receipt poller of one dispatch worker.
pub struct ReceiptPoller {
    pub store: Store,
    pub bus: Arc<dyn Bus>,
    pub senders: Arc<Senders>,
    pub metrics: Arc<Metrics>,
    pub interval: Duration,
}

impl ReceiptPoller {
    /// Polls every `interval` until `shutdown` turns true. Failures are logged and retried at the
    /// next poll.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            if let Err(e) = self.poll_once().await {
                tracing::warn!(error = %e, "receipt poll failed");
            }
        }
    }

    /// One poll of every polled account; returns the events published.
    pub async fn poll_once(&self) -> anyhow::Result<usize> {
        let mut published = 0;
        for channel in POLLED {
            for account in self.store.accounts_of_channel(channel).await? {
                match self.poll_account(&account).await {
                    Ok(n) => published += n,
                    Err(e) => {
                        tracing::warn!(account = account.id, error = %e, "receipt poll of an account failed")
                    }
                }
            }
        }
        Ok(published)
    }

    async fn poll_account(&self, account: &Account) -> anyhow::Result<usize> {
        let Some(sender) = self.senders.for_channel(account.channel) else {
            return Ok(0);
        };
        let since = chrono::Utc::now().timestamp_millis() - LOOKBACK.as_millis() as i64;
        let pending = self
            .store
            .pending_receipts(account.id, since, POLL_LIMIT)
            .await?;
        if pending.is_empty() {
            return Ok(0);
        }
        let receipts = sender
            .pull_receipts(account.id, &account.config, &pending)
            .await?;
        if receipts.is_empty() {
            return Ok(0);
        }
        let (events, unmatched) = self.store.receipt_events(&receipts).await?;
        let records = events.iter().map(DeliveryEvent::to_record).collect();
        self.bus.publish(DELIVERY_TOPIC, records).await?;
        self.store.mark_receipts(&events).await?;
        if let Some(first) = receipts.first() {
            self.metrics.receipts(
                &first.vendor,
                receipts.len() - unmatched.len(),
                unmatched.len(),
            );
        }
        Ok(events.len())
    }
}

//! Telemetry: the `tracing` subscriber and every Prometheus metric, declared in one place with
//! bounded labels (channel, state, vendor, topic — never a receiver or a message id).

use crate::domain::Channel;
use crate::wire::State;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Labels of per-channel, per-state counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelState {
    pub channel: &'static str,
    pub state: &'static str,
}

/// Labels of bus gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicGroup {
    pub topic: &'static str,
    pub group: &'static str,
}

/// Every metric herald exports.
pub struct Metrics {
    registry: Registry,
    /// Send requests answered `202`.
    pub requests_accepted: Counter,
    /// Send requests refused, by error code.
    pub requests_rejected: Family<ErrorCode, Counter>,
    /// Messages accepted (one per receiver).
    pub messages_accepted: Counter,
    /// Delivery events emitted, by channel and state.
    pub messages: Family<ChannelState, Counter>,
    /// Records a consumer group has not committed yet.
    pub queue_lag: Family<TopicGroup, Gauge>,
    /// Redelivered messages the send ledger kept from being sent again.
    pub redelivery_absorbed: Counter,
    /// Messages sent again because a crash hit during the vendor call (possible duplicates).
    pub possible_duplicates: Counter,
    /// Messages whose vendor calls outlived their batch and finished in the background.
    pub calls_handed_off: Counter,
    /// Delivery events written to the warehouse.
    pub warehouse_events: Counter,
    /// Re-emitted delivery events the warehouse sink dropped as copies.
    pub warehouse_duplicates_dropped: Counter,
    /// Vendor receipts, pushed or pulled, by vendor and whether they matched a sent message.
    pub receipts: Family<VendorOutcome, Counter>,
    /// Request records moved to `herald.requests.dlq`, by reason code.
    pub dead_lettered: Family<ErrorCode, Counter>,
    /// Each vendor account's circuit breaker in this process: 0 closed, 1 open, 2 half-open.
    pub breaker_state: Family<AccountLabel, Gauge>,
    /// Retries sent to another account of the route than the call that failed, by channel.
    pub failovers: Family<ChannelLabel, Counter>,
    /// Messages a rate limit held (in the worker or in the schedule), by account.
    pub rate_limited: Family<AccountLabel, Counter>,
    /// Delivery events written too late for their window, by the stats table that leaves them
    /// out (`delivery_stats_minute` counts those too late for the hour as well).
    pub stats_late_events: Family<TableLabel, Counter>,
    /// Vendor calls, by channel, vendor account and outcome (`sent`, `retryable`, `permanent`).
    pub vendor_calls: Family<VendorCall, Counter>,
    /// How long vendor calls took, by channel and vendor account.
    pub vendor_latency: Family<VendorAccount, Histogram, fn() -> Histogram>,
    /// Small `delivery_events` files merged (and deleted) by compaction.
    pub compaction_files_merged: Counter,
    /// Messages whose tracing index rows retention removed.
    pub index_pruned: Counter,
    /// Failed passes of the analytics role's upkeep, by task (`compaction`, `index_pruning`).
    pub upkeep_failures: Family<TaskLabel, Counter>,
}

/// Labels of a vendor call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VendorCall {
    pub channel: &'static str,
    pub account_id: i64,
    pub outcome: &'static str,
}

/// Labels of a vendor account's latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VendorAccount {
    pub channel: &'static str,
    pub account_id: i64,
}

/// Buckets of vendor-call latency, in seconds: 10 ms to 30 s (a vendor's slowest answers).
fn latency_histogram() -> Histogram {
    Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
}

/// Label of a warehouse table.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: &'static str,
}

/// Label of an upkeep task of the analytics role.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabel {
    pub task: &'static str,
}

/// Label of a vendor account.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountLabel {
    pub account_id: i64,
}

/// Label of a channel.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabel {
    pub channel: &'static str,
}

/// Labels of a vendor receipt.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VendorOutcome {
    pub vendor: String,
    /// `matched` or `unmatched`.
    pub outcome: &'static str,
}

/// Label of an error code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorCode {
    pub code: &'static str,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("herald");
        let m = Metrics {
            requests_accepted: Counter::default(),
            requests_rejected: Family::default(),
            messages_accepted: Counter::default(),
            messages: Family::default(),
            queue_lag: Family::default(),
            redelivery_absorbed: Counter::default(),
            possible_duplicates: Counter::default(),
            calls_handed_off: Counter::default(),
            warehouse_events: Counter::default(),
            warehouse_duplicates_dropped: Counter::default(),
            receipts: Family::default(),
            dead_lettered: Family::default(),
            breaker_state: Family::default(),
            failovers: Family::default(),
            rate_limited: Family::default(),
            stats_late_events: Family::default(),
            vendor_calls: Family::default(),
            vendor_latency: Family::new_with_constructor(latency_histogram),
            compaction_files_merged: Counter::default(),
            index_pruned: Counter::default(),
            upkeep_failures: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "compaction_files_merged",
            "Small delivery_events files merged into larger ones by compaction",
            m.compaction_files_merged.clone(),
        );
        registry.register(
            "index_pruned",
            "Messages whose tracing index rows were removed after analytics.index_retention",
            m.index_pruned.clone(),
        );
        registry.register(
            "upkeep_failures",
            "Failed passes of the analytics role's upkeep, by task (compaction, index_pruning)",
            m.upkeep_failures.clone(),
        );
        registry.register(
            "dead_lettered",
            "Request records moved to herald.requests.dlq, by reason code",
            m.dead_lettered.clone(),
        );
        registry.register(
            "requests_accepted",
            "Send requests answered 202",
            m.requests_accepted.clone(),
        );
        registry.register(
            "requests_rejected",
            "Send requests refused, by error code",
            m.requests_rejected.clone(),
        );
        registry.register(
            "messages_accepted",
            "Messages accepted (one per receiver)",
            m.messages_accepted.clone(),
        );
        registry.register(
            "messages",
            "Delivery events by channel and state",
            m.messages.clone(),
        );
        registry.register(
            "queue_lag",
            "Records not yet committed by a consumer group",
            m.queue_lag.clone(),
        );
        registry.register(
            "redelivery_absorbed",
            "Redelivered messages the send ledger kept from being sent twice",
            m.redelivery_absorbed.clone(),
        );
        registry.register(
            "possible_duplicates",
            "Messages sent again after a crash during the vendor call",
            m.possible_duplicates.clone(),
        );
        registry.register(
            "calls_handed_off",
            "Messages whose vendor calls outlived their batch and finished in the background",
            m.calls_handed_off.clone(),
        );
        registry.register(
            "warehouse_events",
            "Delivery events written to Parquet",
            m.warehouse_events.clone(),
        );
        registry.register(
            "warehouse_duplicates_dropped",
            "Re-emitted delivery events dropped by the warehouse sink",
            m.warehouse_duplicates_dropped.clone(),
        );
        registry.register(
            "receipts",
            "Vendor receipts by vendor and whether they matched a sent message",
            m.receipts.clone(),
        );
        registry.register(
            "breaker_state",
            "Circuit breaker of a vendor account in this process: 0 closed, 1 open, 2 half-open",
            m.breaker_state.clone(),
        );
        registry.register(
            "failovers",
            "Retries sent to another account of the route, by channel",
            m.failovers.clone(),
        );
        registry.register(
            "rate_limited",
            "Messages a vendor account's rate limit held, in the worker or in the schedule",
            m.rate_limited.clone(),
        );
        registry.register(
            "stats_late_events",
            "Delivery events kept in delivery_events but left out of a stats table because they \
             arrived after their window closed (analytics.allowed_lateness), by table",
            m.stats_late_events.clone(),
        );
        registry.register(
            "vendor_calls",
            "Vendor calls by channel, vendor account and outcome (sent, retryable, permanent)",
            m.vendor_calls.clone(),
        );
        registry.register(
            "vendor_latency_seconds",
            "Time vendor calls took, by channel and vendor account",
            m.vendor_latency.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// Counts one delivery event.
    pub fn event(&self, channel: Channel, state: State) {
        self.messages
            .get_or_create(&ChannelState {
                channel: channel.as_str(),
                state: state.as_str(),
            })
            .inc();
    }

    /// Counts one vendor call of `account_id` on `channel` that took `latency`, by `outcome`.
    pub fn vendor_call(
        &self,
        channel: Channel,
        account_id: i64,
        outcome: &'static str,
        latency: std::time::Duration,
    ) {
        let channel = channel.as_str();
        self.vendor_calls
            .get_or_create(&VendorCall {
                channel,
                account_id,
                outcome,
            })
            .inc();
        self.vendor_latency
            .get_or_create(&VendorAccount {
                channel,
                account_id,
            })
            .observe(latency.as_secs_f64());
    }

    /// Counts receipts of `vendor`: `matched` ones joined to a sent message, `unmatched` ones not.
    pub fn receipts(&self, vendor: &str, matched: usize, unmatched: usize) {
        for (outcome, n) in [("matched", matched), ("unmatched", unmatched)] {
            if n > 0 {
                self.receipts
                    .get_or_create(&VendorOutcome {
                        vendor: vendor.to_string(),
                        outcome,
                    })
                    .inc_by(n as u64);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Starts the `tracing` subscriber with `filter` (env-filter syntax; `RUST_LOG` wins when set).
pub fn init_tracing(filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_counters() {
        let m = Metrics::new();
        m.event(Channel::Inbox, State::Sent);
        m.requests_accepted.inc();
        let text = m.render();
        assert!(
            text.contains("herald_messages_total{channel=\"inbox\",state=\"sent\"} 1"),
            "{text}"
        );
        assert!(text.contains("herald_requests_accepted_total 1"), "{text}");
    }
}

//! The dispatch worker: reads `herald.requests`, sends each message through its channel and
//! publishes every state change to `herald.delivery`.
//!
//! # Delivery guarantee
//!
//! At-least-once from the bus, at-most-once to the receiver per message id:
//! 1. a batch is polled; nothing is committed yet;
//! 2. messages bound for a vendor are marked `sending` in the send ledger (one transaction);
//! 3. vendors are called (concurrently across receivers, in order for one receiver), and each
//!    outcome is written to the ledger as soon as the vendor answers;
//! 4. all outcomes go to the ledger again in one transaction — inbox messages are stored in that same
//!    transaction, so the inbox is exactly-once;
//! 5. the batch's delivery events are published (durable);
//! 6. only then are the bus offsets committed.
//!
//! A crash anywhere before 6 redelivers the batch. The ledger absorbs it: a message marked
//! `sent`/`send_failed` is not sent again, its events are re-emitted flagged `redelivered` with
//! the same deterministic ids, and the warehouse sink drops the copies it already has. A message
//! still marked `sending` crashed during the vendor call: it is sent again and counted in
//! `herald_possible_duplicates_total` — the one window where a receiver can get a message twice.

use crate::channels::{SendError, SendOutcome, Sender, Senders};
use futures::stream::{self, StreamExt};
use herald_core::bus::{Bus, BusError, Delivered, Record, next_positions};
use herald_core::config::DispatchConfig;
use herald_core::store::{Account, LedgerState, SentInbox, Store, StoreError};
use herald_core::telemetry::Metrics;
use herald_core::wire::{DELIVERY_TOPIC, REQUESTS_DLQ_TOPIC, REQUESTS_TOPIC};
use herald_core::{Channel, DeliveryEvent, MessageId, MessageRecord, State};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::Instrument;

/// The consumer group of dispatch workers.
pub const GROUP: &str = "herald-dispatch";

/// How long a cached channel account is used before it is read again.
const ACCOUNT_TTL: Duration = Duration::from_secs(5);

/// Errors that stop a batch (it is then redelivered); vendor failures are not among them.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one batch did, for tests and logs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    pub sent: usize,
    pub failed: usize,
    /// Redelivered messages the ledger kept from being sent again.
    pub absorbed: usize,
    /// Malformed records moved to the DLQ.
    pub dead_lettered: usize,
}

/// A dispatch worker.
pub struct Dispatcher {
    store: Store,
    bus: Arc<dyn Bus>,
    senders: Senders,
    metrics: Arc<Metrics>,
    config: DispatchConfig,
    accounts: Mutex<HashMap<i64, (Option<Account>, Instant)>>,
}

/// One message of a batch and what became of it.
struct Work {
    record: MessageRecord,
    /// The ledger said this message was seen before.
    redelivered: bool,
    /// The ledger's final state, when the message must not be sent again.
    done: Option<(LedgerState, u32)>,
    attempt: u32,
    result: Option<Result<SendOutcome, SendError>>,
    sending_at: chrono::DateTime<chrono::Utc>,
    done_at: chrono::DateTime<chrono::Utc>,
    latency_ms: u64,
}

impl Dispatcher {
    /// A worker over `store` and `bus`.
    pub fn new(
        store: Store,
        bus: Arc<dyn Bus>,
        senders: Senders,
        metrics: Arc<Metrics>,
        config: DispatchConfig,
    ) -> Self {
        Dispatcher {
            store,
            bus,
            senders,
            metrics,
            config,
            accounts: Mutex::default(),
        }
    }

    /// Consumes `herald.requests` until `shutdown` turns true; the batch in hand is finished first.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), DispatchError> {
        let mut consumer = self.bus.subscribe(REQUESTS_TOPIC, GROUP).await?;
        while !*shutdown.borrow() {
            let records = tokio::select! {
                r = consumer.poll(self.config.batch_size, Duration::from_millis(200)) => r?,
                _ = shutdown.changed() => break,
            };
            if records.is_empty() {
                continue;
            }
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.process_batch(&records).await {
                    Ok(_) => break,
                    Err(e) => {
                        // The batch is retried as a whole; the ledger makes that harmless.
                        tracing::error!(error = %e, "batch failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            consumer.commit(&next_positions(&records)).await?;
        }
        Ok(())
    }

    /// Processes one polled batch up to and including publishing its events; the caller commits.
    pub async fn process_batch(
        &self,
        records: &[Delivered],
    ) -> Result<BatchOutcome, DispatchError> {
        let mut outcome = BatchOutcome::default();
        let received_at = chrono::Utc::now();
        let mut work = Vec::with_capacity(records.len());
        let mut dead = Vec::new();
        for d in records {
            match serde_json::from_slice::<MessageRecord>(&d.record.payload) {
                Ok(record) => work.push(Work {
                    record,
                    redelivered: false,
                    done: None,
                    attempt: 1,
                    result: None,
                    sending_at: received_at,
                    done_at: received_at,
                    latency_ms: 0,
                }),
                Err(e) => {
                    let mut r = d.record.clone();
                    r.headers
                        .push(("reason".into(), format!("malformed record: {e}")));
                    r.headers.push((
                        "source".into(),
                        format!("{}/{}/{}", d.topic, d.partition, d.offset),
                    ));
                    dead.push(r);
                }
            }
        }
        if !dead.is_empty() {
            outcome.dead_lettered = dead.len();
            tracing::warn!(
                count = dead.len(),
                "malformed request records moved to the DLQ"
            );
            self.bus.publish(REQUESTS_DLQ_TOPIC, dead).await?;
        }

        let ids: Vec<MessageId> = work.iter().map(|w| w.record.message_id).collect();
        let ledger = self.store.ledger_states(&ids).await?;
        let mut sending_rows = Vec::new();
        for w in &mut work {
            if let Some(&(state, attempt)) = ledger.get(&w.record.message_id) {
                w.redelivered = true;
                w.attempt = attempt;
                if state.is_final() {
                    w.done = Some((state, attempt));
                    outcome.absorbed += 1;
                    self.metrics.redelivery_absorbed.inc();
                    continue;
                }
                self.metrics.possible_duplicates.inc();
                tracing::warn!(message_id = %w.record.message_id, "crash during a vendor call: sending again");
            }
            if w.record.channel != Channel::Inbox {
                sending_rows.push((w.record.message_id, LedgerState::Sending, w.attempt));
            }
        }
        self.store.record_ledger(&sending_rows, &[]).await?;

        self.send_all(&mut work).await;

        let mut final_rows = Vec::new();
        let mut inbox = Vec::new();
        for w in &work {
            if w.done.is_some() {
                continue;
            }
            match &w.result {
                Some(Ok(_)) => {
                    outcome.sent += 1;
                    final_rows.push((w.record.message_id, LedgerState::Sent, w.attempt));
                    if w.record.channel == Channel::Inbox {
                        inbox.push(SentInbox {
                            message_id: w.record.message_id,
                            app: w.record.app.clone(),
                            receiver: w.record.receiver.clone(),
                            template_id: w.record.template_id,
                            content: w.record.content.clone(),
                        });
                    }
                }
                Some(Err(_)) | None => {
                    outcome.failed += 1;
                    final_rows.push((w.record.message_id, LedgerState::SendFailed, w.attempt));
                }
            }
        }
        self.store.record_ledger(&final_rows, &inbox).await?;

        let events: Vec<Record> = work
            .iter()
            .flat_map(|w| self.events_of(w, received_at))
            .map(|e| {
                Record::new(
                    e.receiver.as_bytes().to_vec(),
                    serde_json::to_vec(&e).unwrap_or_default(),
                )
            })
            .collect();
        self.bus.publish(DELIVERY_TOPIC, events).await?;
        Ok(outcome)
    }

    /// Sends every message that needs it: receivers in parallel, one receiver's messages in order.
    async fn send_all(&self, work: &mut [Work]) {
        let mut by_receiver: HashMap<String, Vec<&mut Work>> = HashMap::new();
        for w in work.iter_mut().filter(|w| w.done.is_none()) {
            by_receiver
                .entry(w.record.receiver.clone())
                .or_default()
                .push(w);
        }
        stream::iter(by_receiver.into_values())
            .for_each_concurrent(self.config.concurrency.max(1), |group| async move {
                for w in group {
                    let span = tracing::info_span!("send", message_id = %w.record.message_id, channel = %w.record.channel);
                    w.sending_at = chrono::Utc::now();
                    let started = Instant::now();
                    w.result = Some(self.send_one(&w.record).instrument(span).await);
                    w.latency_ms = started.elapsed().as_millis() as u64;
                    w.done_at = chrono::Utc::now();
                    if w.record.channel != Channel::Inbox {
                        self.record_vendor_outcome(w).await;
                    }
                }
            })
            .await;
    }

    /// Records one vendor outcome in the ledger as soon as the vendor answered, so a crash later
    /// in the batch cannot make this message look in-flight. The batch's final ledger write
    /// repeats it; a failure here is only logged.
    async fn record_vendor_outcome(&self, w: &Work) {
        let state = match &w.result {
            Some(Ok(_)) => LedgerState::Sent,
            _ => LedgerState::SendFailed,
        };
        let row = [(w.record.message_id, state, w.attempt)];
        if let Err(e) = self.store.record_ledger(&row, &[]).await {
            tracing::warn!(error = %e, message_id = %w.record.message_id, "ledger write after a send failed; the batch write retries it");
        }
    }

    async fn send_one(&self, record: &MessageRecord) -> Result<SendOutcome, SendError> {
        if record.channel == Channel::Inbox {
            // Stored with the ledger row; nothing to call.
            return Ok(SendOutcome {
                vendor: "herald".into(),
                vendor_message_id: Some(record.message_id.to_string()),
                billing_units: None,
            });
        }
        let account = match record.account_id {
            Some(id) => self.account(id).await,
            None => None,
        };
        let Some(account) = account.filter(|a| a.channel == record.channel) else {
            return Err(SendError::Permanent {
                code: "unknown_account".into(),
                detail: "the template's channel account no longer exists".into(),
            });
        };
        let sender: &dyn Sender = match record.channel {
            Channel::Email => &self.senders.email,
            Channel::Webhook => &self.senders.webhook,
            Channel::Inbox => unreachable!("handled above"),
        };
        sender.send(record, account.id, &account.config).await
    }

    async fn account(&self, id: i64) -> Option<Account> {
        if let Some((a, at)) = self
            .accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            && at.elapsed() < ACCOUNT_TTL
        {
            return a.clone();
        }
        let found = match self.store.account_by_id(id).await {
            Ok(a) => Some(a),
            Err(StoreError::NotFound) => None,
            Err(e) => {
                tracing::warn!(error = %e, "could not read account");
                return None;
            }
        };
        self.accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (found.clone(), Instant::now()));
        found
    }

    /// The delivery events of one message, in order: accepted, received, sending, sent/send_failed.
    fn events_of(
        &self,
        w: &Work,
        received_at: chrono::DateTime<chrono::Utc>,
    ) -> Vec<DeliveryEvent> {
        let r = &w.record;
        let ev = |state: State, ts| {
            let mut e = DeliveryEvent::for_record(r, state, w.attempt);
            e.ts = ts;
            e.redelivered = w.redelivered;
            e
        };
        let mut out = vec![
            ev(State::Accepted, r.accepted_at),
            ev(State::Received, received_at),
        ];
        match (&w.done, &w.result) {
            (Some((LedgerState::Sent, _)), _) => {
                out.push(ev(State::Sending, received_at));
                out.push(ev(State::Sent, received_at));
            }
            (Some(_), _) => {
                out.push(ev(State::Sending, received_at));
                let mut e = ev(State::SendFailed, received_at);
                e.error_code = Some("unknown".into());
                out.push(e);
            }
            (None, Some(result)) => {
                out.push(ev(State::Sending, w.sending_at));
                let mut e = match result {
                    Ok(o) => {
                        let mut e = ev(State::Sent, w.done_at);
                        e.vendor = Some(o.vendor.clone());
                        e.vendor_message_id = o.vendor_message_id.clone();
                        e.billing_units = o.billing_units;
                        e
                    }
                    Err(err) => {
                        let mut e = ev(State::SendFailed, w.done_at);
                        e.error_code = Some(err.code().to_string());
                        e.error_detail = Some(err.detail().to_string());
                        e
                    }
                };
                e.latency_ms = Some(w.latency_ms);
                out.push(e);
            }
            (None, None) => {}
        }
        for e in &out {
            self.metrics.event(r.channel, e.state);
        }
        out
    }
}

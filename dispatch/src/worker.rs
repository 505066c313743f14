//! The dispatch worker: reads `herald.requests`, sends each message through its channel and
//! publishes every state change to `herald.delivery`.
//!
//! # Delivery guarantee
//!
//! At-least-once from the bus, at-most-once to the receiver per message id:
//! 1. a batch is polled; nothing is committed yet;
//! 2. the policies decide each new message's fate (see `policy`), and one transaction claims
//!    them in the send ledger: `sending` (after passing dedup and frequency caps), `scheduled`
//!    (with its schedule entry: a future `send_at` or quiet hours), or the state that stopped
//!    it; a message another worker claimed first is left alone;
//! 3. vendors are called (concurrently across receivers, in order for one receiver; messages of
//!    one account together through the vendor's batch API), retryable failures retried with
//!    jittered backoff, and each outcome is queued for the ledger as soon as the vendor answers
//!    (group-committed with the other answers of the moment, see `outcomes`);
//! 4. all outcomes go to the ledger again in one transaction — inbox messages are stored in that same
//!    transaction, so the inbox is exactly-once;
//! 5. the batch's delivery events are published (durable);
//! 6. only then are the bus offsets committed.
//!
//! A failure of the store or the bus in 4 or 5 (an outage) is retried in place until it
//! passes, never by redelivering the batch, which would call the vendors again for messages
//! whose outcome the ledger did not take. A failure before 3 retries the whole batch.
//!
//! A crash anywhere before 6 redelivers the batch. The ledger absorbs it: a message marked
//! `sent`/`send_failed` is not sent again, its events are re-emitted flagged `redelivered` with
//! the same deterministic ids, and the warehouse sink drops the copies it already has. A message
//! still marked `sending` crashed during the vendor call: it is sent again and counted in
//! `herald_possible_duplicates_total` — the one window where a receiver can get a message twice.

use crate::breaker::{Admission, Breakers};
use crate::channels::{SendError, SendOutcome, Sender, Senders};
use crate::outcomes::OutcomeWriter;
use crate::policy::{Policies, Stop, Verdict, expire};
use crate::ratelimit::{Acquired, RateLimiter};
use crate::requests::{ExpandError, Refusal, RequestExpander, dead_letter};
use crate::stragglers::CallTimes;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use herald_core::bus::{Bus, BusError, Consumer, Delivered, Position, Record, next_positions};
use herald_core::config::DispatchConfig;
use herald_core::policy::rate_limits::most_urgent;
use herald_core::prices::PriceTable;
use herald_core::store::{
    Account, ClaimOutcome, LedgerState, MessageClaim, ReceiverSlot, Reservation, ScheduleKind,
    ScheduledMessage, SentInbox, Store, StoreError,
};
use herald_core::telemetry::{AccountLabel, ChannelLabel, ErrorCode, Metrics};
use herald_core::wire::{DELIVERY_TOPIC, REQUESTS_DLQ_TOPIC, REQUESTS_TOPIC};
use herald_core::{Channel, DeliveryEvent, MessageId, MessageRecord, State};
use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::Instrument;

/// The consumer group of dispatch workers.
pub const GROUP: &str = herald_core::wire::DISPATCH_GROUP;

/// How long a cached channel account is used before it is read again.
const ACCOUNT_TTL: Duration = Duration::from_secs(5);

/// How far ahead a handed-off message's guard is due: the longest a call outlives a dead
/// worker before its message is released again.
const IN_FLIGHT_GUARD: chrono::Duration = chrono::Duration::seconds(30);

/// How often the guards of running handed-off calls are moved on.
const IN_FLIGHT_RENEW: Duration = Duration::from_secs(10);

/// A wait for a rate limit's slot at least this long is a `rate_limited` event.
const REPORTED_RATE_WAIT: Duration = Duration::from_millis(50);

/// Errors that stop a batch (it is then redelivered); vendor failures are not among them.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot check a producer's record: {0}")]
    Expand(String),
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
    /// Messages a policy stopped (discarded, blocked, deduplicated, filtered).
    pub stopped: usize,
    /// Messages put in the schedule (a future `send_at`, quiet hours).
    pub waiting: usize,
}

/// Channel accounts by id: the account (or that it does not exist) and when it was read.
type AccountCache = Mutex<HashMap<i64, (Option<Arc<Account>>, Instant)>>;

/// A dispatch worker.
pub struct Dispatcher {
    store: Store,
    bus: Arc<dyn Bus>,
    senders: Arc<Senders>,
    metrics: Arc<Metrics>,
    config: DispatchConfig,
    accounts: AccountCache,
    outcomes: OutcomeWriter,
    /// Checks records that Kafka producers wrote; `None` refuses them all.
    requests: Option<Arc<dyn RequestExpander>>,
    policies: Policies,
    breakers: Breakers,
    rates: RateLimiter,
    /// Prices `sent` events (`cost_micros`, `currency`).
    prices: PriceTable,
    /// Messages whose calls were handed off and are not recorded yet.
    in_flight: Mutex<HashSet<MessageId>>,
    /// How long this worker's chunks of calls take: what a straggler is slower than.
    call_times: CallTimes,
    /// Per receiver timeline (`Policies::receiver_limits`): the latest time (unix µs) this
    /// worker sent one of its messages to the schedule for, so that the next comes back one
    /// interval later, not with it.
    receiver_turns: Mutex<HashMap<i64, i64>>,
}

/// One message of a batch and what became of it.
#[derive(Clone)]
struct Work {
    /// Shared with its vendor calls, which may outlive the batch (a hand-off).
    record: Arc<MessageRecord>,
    /// The ledger said this message was seen before.
    redelivered: bool,
    /// The ledger's final state, when the message must not be sent again.
    done: Option<(LedgerState, u32)>,
    /// When it was sent or failed for good, for a message done before (its events' time).
    done_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The attempt number of the first vendor call in this batch.
    attempt: u32,
    /// Every vendor call made for this message in this batch, in order.
    tries: Vec<Try>,
    /// A policy stopped it.
    stop: Option<Stop>,
    /// It waits in the schedule until then.
    wait: Option<(ScheduleKind, chrono::DateTime<chrono::Utc>)>,
    /// Sensitive words masked in its content.
    masked: Option<Vec<String>>,
    /// Another worker (or an earlier delivery) claimed it: no sending, no events.
    skip: bool,
    /// Its vendor call outlived the batch: a straggler records it, and the batch does not.
    handed_off: bool,
    /// The accounts it may be sent through, in the order it tries them (its route's, else its
    /// template's); empty for the inbox.
    plan: Arc<[i64]>,
}

/// One vendor call for one message.
#[derive(Clone)]
struct Try {
    attempt: u32,
    sending_at: chrono::DateTime<chrono::Utc>,
    done_at: chrono::DateTime<chrono::Utc>,
    latency_ms: u64,
    result: Result<SendOutcome, SendError>,
    /// Another call follows this failed one.
    retried: bool,
    /// The next call waits in the schedule until then (a vendor's long `Retry-After`).
    deferred_until: Option<chrono::DateTime<chrono::Utc>>,
    /// The account called.
    account_id: Option<i64>,
    /// Why no call was made, when none was.
    no_call: Option<NoCall>,
    /// How long it waited for its account's rate limit, when that is worth an event.
    rate_waited: Option<Duration>,
}

/// Why a message's vendor call was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoCall {
    /// Every account of its route had its circuit breaker open.
    CircuitOpen,
    /// The store could not be read for the call (its account, its rate limit).
    StoreUnavailable,
    /// Its account's rate limit would have held it too long: it waits in the schedule until then.
    RateLimited {
        until: chrono::DateTime<chrono::Utc>,
    },
}

impl Work {
    /// A message not yet looked up in the ledger.
    fn new(record: MessageRecord) -> Self {
        Work {
            record: Arc::new(record),
            redelivered: false,
            done: None,
            done_at: None,
            attempt: 1,
            tries: Vec::new(),
            stop: None,
            wait: None,
            masked: None,
            skip: false,
            handed_off: false,
            plan: Arc::from([]),
        }
    }

    /// Whether this batch sends the message.
    fn to_send(&self) -> bool {
        self.done.is_none()
            && self.stop.is_none()
            && self.wait.is_none()
            && !self.skip
            && !self.handed_off
    }

    /// The last call's result, once the message was tried.
    fn last(&self) -> Option<&Try> {
        self.tries.last()
    }
}

/// Messages for one account, sent together.
struct Group {
    channel: Channel,
    items: Vec<Item>,
}

/// A message handed to `deliver`; it shares its batch's record and plan, so that its calls
/// can outlive the batch.
struct Item {
    /// Its index in the batch.
    index: usize,
    record: Arc<MessageRecord>,
    /// The attempt number of its first call.
    first_attempt: u32,
    /// The accounts it may use, in order.
    plan: Arc<[i64]>,
}

/// The vendor calls of one chunk of a round: each message's index in the batch and its calls.
type Delivery<'s> = BoxFuture<'s, Vec<(usize, Vec<Try>)>>;

/// A chunk's delivery and the batch indexes of its messages, so that an unfinished one can be
/// handed off.
struct Chunk<'s> {
    indexes: Vec<usize>,
    delivery: Delivery<'s>,
    /// When it was first polled.
    started: Option<Instant>,
}

/// A chunk run until it finished or outran its limit.
enum Ran<'s> {
    Finished(Vec<(usize, Vec<Try>)>),
    Unfinished(Chunk<'s>),
}

/// How long a round waits for its chunks before handing them off.
#[derive(Clone, Copy)]
struct HandOffLimits {
    /// For each chunk, from its start: a straggler's limit (see `stragglers`).
    per_chunk: Duration,
    /// For the whole round: chunks not started by then are not started.
    round: Duration,
}

impl Future for Chunk<'_> {
    type Output = Vec<(usize, Vec<Try>)>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.delivery.as_mut().poll(cx)
    }
}

/// Handed-off vendor calls of an earlier batch, recording their outcomes when they end.
type Straggler<'s> = BoxFuture<'s, ()>;

/// Messages of a delivery (indexes into its items) to send through one account (`None`: the
/// message has none).
type Calls = Vec<(Option<i64>, Vec<usize>)>;

/// Messages whose every account's breaker refused a call: the first account of each, and the
/// shortest wait until one admits calls again.
type Refused = Vec<(Option<i64>, Vec<usize>, Duration)>;

/// One call to a vendor (or the refusal to make one) for some messages.
struct Answer {
    results: Vec<Result<SendOutcome, SendError>>,
    sending_at: chrono::DateTime<chrono::Utc>,
    done_at: chrono::DateTime<chrono::Utc>,
    latency: Duration,
    /// The account was read and its vendor called.
    called: bool,
    /// Why no call was made, when that was herald's choice.
    no_call: Option<NoCall>,
    /// How long the call waited for its rate limit, when that is worth an event.
    rate_waited: Option<Duration>,
}

impl NoCall {
    /// Whether the message waits without using an attempt: nothing was tried at the vendor,
    /// so only its age bounds the wait.
    fn waits_free(self) -> bool {
        matches!(self, NoCall::CircuitOpen | NoCall::StoreUnavailable)
    }
}

impl Answer {
    /// No call made, for `n` messages: each fails with `code`, retryable after `retry_after`.
    fn none(
        n: usize,
        no_call: Option<NoCall>,
        code: &str,
        detail: &str,
        retry_after: Option<Duration>,
    ) -> Answer {
        let now = chrono::Utc::now();
        Answer {
            results: (0..n)
                .map(|_| {
                    Err(SendError::Retryable {
                        code: code.into(),
                        detail: detail.into(),
                        retry_after,
                    })
                })
                .collect(),
            sending_at: now,
            done_at: now,
            latency: Duration::ZERO,
            called: false,
            no_call,
            rate_waited: None,
        }
    }
}

impl Dispatcher {
    /// A worker over `store` and `bus`.
    pub fn new(
        store: Store,
        bus: Arc<dyn Bus>,
        senders: Arc<Senders>,
        metrics: Arc<Metrics>,
        config: DispatchConfig,
    ) -> Self {
        let store_for_outcomes = store.clone();
        let policies = Policies::new(store.clone(), &config);
        let breakers = Breakers::new(config.breaker.clone(), Arc::clone(&metrics));
        Dispatcher {
            policies,
            breakers,
            rates: RateLimiter::new(store.clone()),
            store,
            bus,
            senders,
            metrics,
            config,
            accounts: Mutex::default(),
            outcomes: OutcomeWriter::start(store_for_outcomes),
            requests: None,
            prices: PriceTable::default(),
            in_flight: Mutex::default(),
            call_times: CallTimes::default(),
            receiver_turns: Mutex::default(),
        }
    }

    /// Puts each `sent` event's cost on it from `prices` (without, costs stay null).
    pub fn with_prices(mut self, prices: PriceTable) -> Self {
        self.prices = prices;
        self
    }

    /// Accepts records that Kafka producers write to `herald.requests`, checked by `expander`.
    pub fn with_requests(mut self, expander: Arc<dyn RequestExpander>) -> Self {
        self.requests = Some(expander);
        self
    }

    /// Consumes `herald.requests` until `shutdown` turns true; the batch in hand, and the calls
    /// handed off by earlier batches, are finished first.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), DispatchError> {
        let mut consumer = self.bus.subscribe(REQUESTS_TOPIC, GROUP).await?;
        let mut stragglers = FuturesUnordered::new();
        while !*shutdown.borrow() {
            let polled = beside(
                consumer.poll(self.config.batch_size, Duration::from_millis(200)),
                &mut stragglers,
            );
            let records = tokio::select! {
                r = polled => r?,
                _ = shutdown.changed() => break,
            };
            if records.is_empty() {
                continue;
            }
            let mut backoff = Duration::from_millis(100);
            loop {
                match beside(self.process_batch(&records), &mut stragglers).await {
                    Ok((_, handed_off)) => {
                        stragglers.extend(handed_off);
                        break;
                    }
                    Err(e) => {
                        // The batch is retried as a whole; the ledger makes that harmless.
                        tracing::error!(error = %e, "batch failed; retrying");
                        beside(tokio::time::sleep(backoff), &mut stragglers).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            let positions = next_positions(&records);
            beside(commit(consumer.as_mut(), &positions), &mut stragglers).await;
        }
        if !stragglers.is_empty() {
            tracing::info!(
                chunks = stragglers.len(),
                "finishing handed-off vendor calls before stopping"
            );
            while stragglers.next().await.is_some() {}
        }
        Ok(())
    }

    /// A record that is not a message record: a producer's request when an expander is set,
    /// else refused as malformed.
    async fn expand(
        &self,
        d: &Delivered,
        not_a_message: serde_json::Error,
    ) -> Result<Vec<MessageRecord>, ExpandError> {
        match &self.requests {
            Some(expander) => expander.expand(d).await,
            None => Err(ExpandError::Refused(Refusal {
                code: "malformed_record",
                message: format!("not a message record: {not_a_message}"),
            })),
        }
    }

    /// Processes one polled batch up to and including publishing its events; the caller commits.
    /// Vendor calls that outlived the batch's wait come back as stragglers, to be driven to
    /// their end beside the next batches.
    async fn process_batch(
        &self,
        records: &[Delivered],
    ) -> Result<(BatchOutcome, Vec<Straggler<'_>>), DispatchError> {
        let mut outcome = BatchOutcome::default();
        let received_at = chrono::Utc::now();
        let mut work = Vec::with_capacity(records.len());
        let mut dead = Vec::new();
        let signer = self.store.record_signer().await?;
        for d in records {
            let expanded = match serde_json::from_slice::<MessageRecord>(&d.record.payload) {
                Ok(record) if signer.verify(&d.record) => Ok(vec![record]),
                Ok(_) => Err(ExpandError::Refused(Refusal {
                    code: "unsigned_record",
                    message: "a message record without herald's signature: producers write \
                              send requests (docs/schemas/kafka-request.v1.json)"
                        .into(),
                })),
                Err(e) => self.expand(d, e).await,
            };
            match expanded {
                Ok(records) => work.extend(records.into_iter().map(Work::new)),
                Err(ExpandError::Unavailable(why)) => return Err(DispatchError::Expand(why)),
                Err(ExpandError::Refused(refusal)) => {
                    self.metrics
                        .dead_lettered
                        .get_or_create(&ErrorCode { code: refusal.code })
                        .inc();
                    dead.push(dead_letter(d, &refusal));
                }
            }
        }
        if !dead.is_empty() {
            outcome.dead_lettered = dead.len();
            tracing::warn!(
                count = dead.len(),
                "refused request records moved to the DLQ"
            );
            self.bus.publish(REQUESTS_DLQ_TOPIC, dead).await?;
        }

        let ids: Vec<MessageId> = work.iter().map(|w| w.record.message_id).collect();
        // Taken before the ledger is read: a call that lands meanwhile leaves a row read as
        // `sending` that must not be sent again.
        let in_flight = self.in_flight_among(&ids);
        let ledger = self.store.ledger_states(&ids).await?;
        // Messages left `sending` whose call another worker handed off and is still finishing
        // (a batch read again after a rebalance, its offsets not committed yet).
        let mid_call: Vec<MessageId> = ids
            .iter()
            .filter(|&id| !in_flight.contains(id))
            .filter(|&id| matches!(ledger.get(id), Some(&(LedgerState::Sending, _, _))))
            .copied()
            .collect();
        let guarded_elsewhere = if mid_call.is_empty() {
            HashSet::new()
        } else {
            self.store.guarded_in_flight(&mid_call).await?
        };
        let mut candidates = Vec::new();
        for (i, w) in work.iter_mut().enumerate() {
            match ledger.get(&w.record.message_id) {
                None => candidates.push((i, None)),
                Some(&(state @ (LedgerState::Scheduled | LedgerState::Retrying), attempt, _)) => {
                    // Its first events are out already: copies are flagged, so that the
                    // warehouse drops them.
                    w.attempt = attempt;
                    w.redelivered = true;
                    candidates.push((i, Some(state)));
                }
                Some(&(state, attempt, done_at)) if state.is_final() => {
                    w.redelivered = true;
                    w.done = Some((state, attempt));
                    w.done_at = done_at.and_then(chrono::DateTime::from_timestamp_micros);
                    outcome.absorbed += 1;
                    self.metrics.redelivery_absorbed.inc();
                }
                Some(_)
                    if in_flight.contains(&w.record.message_id)
                        || guarded_elsewhere.contains(&w.record.message_id) =>
                {
                    // A copy of a message whose handed-off call is still running, here or in
                    // another worker; its guard releases it should that worker die.
                    w.redelivered = true;
                    w.skip = true;
                    outcome.absorbed += 1;
                    self.metrics.redelivery_absorbed.inc();
                }
                Some(&(_, attempt, _)) => {
                    // Claimed and past the policies before: the crash came during the vendor
                    // call (the inbox is written with its ledger row, so it cannot repeat).
                    w.redelivered = true;
                    w.attempt = attempt;
                    if w.record.channel != Channel::Inbox {
                        self.metrics.possible_duplicates.inc();
                        tracing::warn!(message_id = %w.record.message_id, "crash during a vendor call: sending again");
                    }
                }
            }
        }
        self.claim(&mut work, &candidates, &mut outcome).await?;
        for w in work.iter_mut() {
            if w.to_send() && w.record.channel != Channel::Inbox {
                w.plan = self.policies.accounts_for(&w.record).await?.into();
            }
        }
        self.pace_receivers(&mut work).await?;

        let stragglers = self.send_all(&mut work, received_at).await;
        // The final write below must not be overtaken by a queued earlier state.
        self.outcomes.flush().await;
        self.record_outcomes(&work, received_at, &mut outcome).await;
        Ok((outcome, stragglers))
    }

    /// Records what became of `work` once its vendor calls are made: the ledger's final states
    /// (and the inbox), the retry schedule, vendor message ids, then the delivery events. A
    /// failure is retried step by step, not by redelivering the batch: a message whose outcome
    /// the ledger did not take (the store went down after the call) would be sent again.
    async fn record_outcomes(
        &self,
        work: &[Work],
        received_at: chrono::DateTime<chrono::Utc>,
        outcome: &mut BatchOutcome,
    ) {
        let mut final_rows = Vec::new();
        let mut done_at = HashMap::new();
        let mut inbox = Vec::new();
        let mut failed = Vec::new();
        let mut retries = Vec::new();
        for w in work {
            if !w.to_send() {
                continue;
            }
            if let Some(t) = w.last()
                && let Some(until) = t.deferred_until
            {
                // A message a rate limit held or open breakers refused made no call: the next
                // one is the same attempt.
                let (kind, next) = match t.no_call {
                    Some(NoCall::RateLimited { .. }) => (ScheduleKind::RateLimited, t.attempt),
                    Some(NoCall::CircuitOpen | NoCall::StoreUnavailable) => {
                        (ScheduleKind::Retry, t.attempt)
                    }
                    None => (ScheduleKind::Retry, t.attempt + 1),
                };
                retries.push((ScheduledMessage::of(&w.record, kind, until), next));
                outcome.waiting += 1;
                continue;
            }
            match w.last() {
                Some(t @ Try { result: Ok(_), .. }) => {
                    outcome.sent += 1;
                    final_rows.push((w.record.message_id, LedgerState::Sent, t.attempt));
                    done_at.insert(w.record.message_id, t.done_at.timestamp_micros());
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
                last => {
                    outcome.failed += 1;
                    let attempt = last.map_or(w.attempt, |t| t.attempt);
                    final_rows.push((w.record.message_id, LedgerState::SendFailed, attempt));
                    if let Some(t) = last {
                        done_at.insert(w.record.message_id, t.done_at.timestamp_micros());
                    }
                    failed.push(&*w.record);
                }
            }
        }
        let events: Vec<DeliveryEvent> = work
            .iter()
            .flat_map(|w| self.events_of(w, received_at))
            .collect();
        let with_receipts: Vec<DeliveryEvent> = events
            .iter()
            .filter(|e| {
                e.state == State::Sent
                    && e.channel != Channel::Inbox
                    && e.vendor_message_id.is_some()
            })
            .cloned()
            .collect();
        let events: Vec<Record> = events.iter().map(DeliveryEvent::to_record).collect();
        let (rows, at, inbox, failed) = (&final_rows, &done_at, &inbox, &failed);
        let (retries, with_receipts, events) = (&retries, &with_receipts, &events);
        until_done("the send ledger", || async move {
            Ok(self.store.record_ledger(rows, at, inbox, failed).await?)
        })
        .await;
        until_done("the retry schedule", || async move {
            Ok(self.store.defer_retries(retries).await?)
        })
        .await;
        until_done("vendor message ids", || async move {
            Ok(self.store.record_vendor_messages(with_receipts).await?)
        })
        .await;
        until_done("delivery events", || async move {
            Ok(self.bus.publish(DELIVERY_TOPIC, events.clone()).await?)
        })
        .await;
    }

    /// Runs the policies over `candidates` (index into `work`, the waiting state its ledger row
    /// has) — messages released for a retry passed them before — and claims them in one store
    /// transaction; records on each message what became of it.
    async fn claim(
        &self,
        work: &mut [Work],
        candidates: &[(usize, Option<LedgerState>)],
        outcome: &mut BatchOutcome,
    ) -> Result<(), DispatchError> {
        if candidates.is_empty() {
            return Ok(());
        }
        let now = chrono::Utc::now();
        let retry = |from: &Option<LedgerState>| *from == Some(LedgerState::Retrying);
        let records: Vec<&MessageRecord> = candidates
            .iter()
            .filter(|(_, from)| !retry(from))
            .map(|&(i, _)| &*work[i].record)
            .collect();
        let mut evaluated = self.policies.evaluate(&records, now).await?.into_iter();
        let verdicts: Vec<Verdict> = candidates
            .iter()
            .map(|(i, from)| {
                let r = &work[*i].record;
                let v = if retry(from) {
                    Verdict::Send {
                        limits: Vec::new(),
                        masked: None,
                    }
                } else {
                    evaluated.next().expect("one verdict per evaluated record")
                };
                expire(v, r, self.config.max_age.of(r.msg_type), now)
            })
            .collect();
        let claims: Vec<MessageClaim> = candidates
            .iter()
            .zip(&verdicts)
            .map(|(&(i, from), verdict)| {
                let w = &work[i];
                let (state, schedule, limits) = match verdict {
                    Verdict::Send { limits, .. } => (LedgerState::Sending, None, limits.clone()),
                    Verdict::Stop(stop) => (stop.ledger, None, Vec::new()),
                    Verdict::Wait { kind, until } => {
                        // The record as it came: its age still counts from its acceptance (or
                        // its own `send_at`).
                        let entry = ScheduledMessage::of(&w.record, *kind, *until);
                        (LedgerState::Scheduled, Some(entry), Vec::new())
                    }
                };
                MessageClaim {
                    message_id: w.record.message_id,
                    from,
                    state,
                    attempt: w.attempt,
                    schedule,
                    limits,
                }
            })
            .collect();
        let claimed = self.store.claim_messages(&claims).await?;
        for ((&(i, _), verdict), result) in candidates.iter().zip(verdicts).zip(claimed) {
            let w = &mut work[i];
            match (result, verdict) {
                (ClaimOutcome::Lost, _) => w.skip = true,
                (ClaimOutcome::Claimed(LedgerState::Sending), Verdict::Send { masked, .. }) => {
                    if let Some((content, words)) = masked {
                        Arc::make_mut(&mut w.record).content = content;
                        w.masked = Some(words);
                    }
                }
                (ClaimOutcome::Claimed(LedgerState::Scheduled), Verdict::Wait { kind, until }) => {
                    outcome.waiting += 1;
                    w.wait = Some((kind, until));
                }
                (ClaimOutcome::Claimed(_), Verdict::Stop(stop)) => {
                    outcome.stopped += 1;
                    w.stop = Some(stop);
                }
                (ClaimOutcome::Claimed(state), _) => {
                    // A limit stopped a message the policies let through.
                    outcome.stopped += 1;
                    w.stop = Some(Stop::of_limit(state));
                }
            }
        }
        Ok(())
    }

    /// Takes each message's slot on its receiver's timelines (the app's `receiver_rate_limits`).
    /// A message whose receiver has no free slot makes no call: it waits in the schedule until
    /// its turn (`rate_limited`), or fails if that is past its age limit. The turn is the next
    /// free slot, or one interval after the last turn this worker gave on that timeline: k
    /// messages held together come back one by one, not together (which would hold all but
    /// one again, about k²/2 round trips). The batch's slots are taken in one store transaction;
    /// a message held by one of its limits has taken its slots on the others.
    async fn pace_receivers(&self, work: &mut [Work]) -> Result<(), DispatchError> {
        let now = chrono::Utc::now();
        self.receiver_turns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, turn| *turn > now.timestamp_micros());
        // Every slot the batch needs, in one store transaction, and the message of each.
        let (mut slots, mut owners) = (Vec::new(), Vec::new());
        for (i, w) in work.iter().enumerate().filter(|(_, w)| w.to_send()) {
            for (key, interval_us, burst_us) in self.policies.receiver_limits(&w.record).await? {
                slots.push(ReceiverSlot {
                    key,
                    interval_us,
                    burst_us,
                });
                owners.push(i);
            }
        }
        if slots.is_empty() {
            return Ok(());
        }
        let reserved = self
            .store
            .reserve_receiver_slots(&slots, now.timestamp_micros())
            .await?;
        // Each held message's turn: the latest of its busy timelines' next turns.
        let mut turns: HashMap<usize, i64> = HashMap::new();
        for ((i, slot), reservation) in owners.iter().zip(&slots).zip(reserved) {
            let Reservation::Busy { next_us } = reservation else {
                continue;
            };
            let turn_us = {
                let mut given = self
                    .receiver_turns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let turn = given.entry(slot.key).or_insert(i64::MIN);
                *turn = next_us.max(turn.saturating_add(slot.interval_us));
                *turn
            };
            let latest = turns.entry(*i).or_insert(turn_us);
            *latest = (*latest).max(turn_us);
        }
        for (i, turn_us) in turns {
            let w = &mut work[i];
            let until = chrono::DateTime::from_timestamp_micros(turn_us).unwrap_or(now);
            let deferred_until = Some(until).filter(|u| young_enough(&self.config, &w.record, u));
            w.tries.push(Try {
                attempt: w.attempt,
                sending_at: now,
                done_at: now,
                latency_ms: 0,
                result: Err(SendError::Retryable {
                    code: "receiver_rate_limited".into(),
                    detail: "the receiver's rate limit has no free slot".into(),
                    retry_after: None,
                }),
                retried: deferred_until.is_some(),
                deferred_until,
                account_id: None,
                no_call: Some(NoCall::RateLimited { until }),
                rate_waited: None,
            });
        }
        Ok(())
    }

    /// Sends every message that needs it, one receiver's messages in order: the k-th message of
    /// each receiver goes in round k. Within a round, messages for one account are handed to
    /// their channel's batch API together, and different accounts' groups run concurrently.
    /// A round's calls that outrun their straggler limit (see `stragglers`), or are still
    /// running after `handoff_after`, are handed off (see [`Self::hand_off`]); the next round
    /// does not wait for them.
    async fn send_all(
        &self,
        work: &mut [Work],
        received_at: chrono::DateTime<chrono::Utc>,
    ) -> Vec<Straggler<'_>> {
        let now = chrono::Utc::now();
        // The k-th inbox message of a receiver in this batch is stamped k microseconds later,
        // so its events order one receiver's messages as the bus did.
        let mut inbox_seen: HashMap<String, i64> = HashMap::new();
        for w in work.iter_mut() {
            if w.to_send() && w.record.channel == Channel::Inbox && w.tries.is_empty() {
                let k = inbox_seen.entry(w.record.receiver.clone()).or_default();
                let at = now + chrono::Duration::microseconds(*k);
                *k += 1;
                // Stored with the ledger row; nothing to call.
                w.tries.push(Try {
                    attempt: w.attempt,
                    sending_at: at,
                    done_at: at,
                    latency_ms: 0,
                    result: Ok(SendOutcome {
                        vendor: "herald".into(),
                        vendor_message_id: Some(w.record.message_id.to_string()),
                        billing_units: None,
                    }),
                    retried: false,
                    deferred_until: None,
                    account_id: None,
                    no_call: None,
                    rate_waited: None,
                });
            }
        }
        // One queue per receiver, in the order receivers first appear on the bus.
        let mut queue_of: HashMap<&str, usize> = HashMap::new();
        let mut queues: Vec<Vec<usize>> = Vec::new();
        for (i, w) in work.iter().enumerate() {
            if w.to_send() && w.tries.is_empty() {
                let q = *queue_of.entry(&w.record.receiver).or_insert_with(|| {
                    queues.push(Vec::new());
                    queues.len() - 1
                });
                queues[q].push(i);
            }
        }
        let rounds = queues.iter().map(Vec::len).max().unwrap_or(0);
        let mut stragglers = Vec::new();
        for round in 0..rounds {
            let picked: Vec<usize> = queues
                .iter()
                .filter_map(|q| q.get(round))
                .copied()
                .collect();
            let (finished, unfinished) = self.send_round(work, &picked).await;
            for (i, t) in finished {
                work[i].tries = t;
            }
            if !unfinished.is_empty() {
                stragglers.extend(self.hand_off(work, unfinished, received_at).await);
            }
        }
        stragglers
    }

    /// Sends one round's messages, at most `concurrency` chunks at once. Returns each finished
    /// message's vendor calls, and the chunks unfinished: stragglers, and those running or not
    /// started once `handoff_after` has passed.
    async fn send_round(
        &self,
        work: &[Work],
        picked: &[usize],
    ) -> (Vec<(usize, Vec<Try>)>, Vec<Chunk<'_>>) {
        let mut group_of: HashMap<(Channel, Option<i64>), usize> = HashMap::new();
        let mut groups: Vec<Group> = Vec::new();
        for &i in picked {
            let w = &work[i];
            let first = w.plan.first().copied();
            let g = *group_of
                .entry((w.record.channel, first))
                .or_insert_with(|| {
                    groups.push(Group {
                        channel: w.record.channel,
                        items: Vec::new(),
                    });
                    groups.len() - 1
                });
            groups[g].items.push(Item {
                index: i,
                record: Arc::clone(&w.record),
                first_attempt: w.attempt,
                plan: Arc::clone(&w.plan),
            });
        }
        let mut chunks = Vec::new();
        for group in groups {
            let Some(sender) = self.senders.for_channel(group.channel) else {
                continue;
            };
            let size = sender.max_batch().max(1);
            let mut items = group.items;
            while !items.is_empty() {
                let rest = items.split_off(items.len().min(size));
                chunks.push((group.channel, sender, items));
                items = rest;
            }
        }
        let chunks = chunks
            .into_iter()
            .map(|(channel, sender, items)| {
                let span = tracing::info_span!("send", %channel, count = items.len());
                Chunk {
                    indexes: items.iter().map(|item| item.index).collect(),
                    delivery: Box::pin(self.deliver(channel, sender, items).instrument(span)),
                    started: None,
                }
            })
            .collect();
        let limits = (self.config.max_handed_off > 0).then(|| HandOffLimits {
            per_chunk: self
                .call_times
                .straggler_limit(self.config.handoff_min, self.config.handoff_after),
            round: self.config.handoff_after,
        });
        self.run_chunks(chunks, limits).await
    }

    /// Runs `chunks` in order, at most `concurrency` at once. With `limits`, a chunk still
    /// running after its `per_chunk` limit, or once the `round` limit has passed, is no longer
    /// waited for, and chunks not started by the end of the round are not started. Returns
    /// the finished messages' vendor calls and the chunks unfinished (the started ones first).
    async fn run_chunks<'s>(
        &self,
        chunks: Vec<Chunk<'s>>,
        limits: Option<HandOffLimits>,
    ) -> (Vec<(usize, Vec<Try>)>, Vec<Chunk<'s>>) {
        // The round's end, and the limit of one chunk within it.
        let deadlines = limits.map(|l| (tokio::time::Instant::now() + l.round, l.per_chunk));
        let mut queued = VecDeque::from(chunks);
        let mut running = FuturesUnordered::new();
        let mut done = Vec::new();
        let mut unfinished = Vec::new();
        loop {
            let now = tokio::time::Instant::now();
            while deadlines.is_none_or(|(round_end, _)| now < round_end)
                && running.len() < self.config.concurrency.max(1)
                && let Some(chunk) = queued.pop_front()
            {
                let until = deadlines.map(|(round_end, per_chunk)| round_end.min(now + per_chunk));
                running.push(self.run_chunk(chunk, until));
            }
            match running.next().await {
                Some(Ran::Finished(results)) => done.extend(results),
                Some(Ran::Unfinished(chunk)) => unfinished.push(chunk),
                None => break,
            }
        }
        unfinished.extend(queued);
        (done, unfinished)
    }

    /// Runs `chunk` until it finishes, or gives it back unfinished at `until`; a finished
    /// chunk's duration counts in [`CallTimes`].
    async fn run_chunk<'s>(
        &self,
        mut chunk: Chunk<'s>,
        until: Option<tokio::time::Instant>,
    ) -> Ran<'s> {
        let started = *chunk.started.get_or_insert_with(Instant::now);
        let results = match until {
            None => (&mut chunk).await,
            Some(until) => match tokio::time::timeout_at(until, &mut chunk).await {
                Ok(results) => results,
                Err(_) => return Ran::Unfinished(chunk),
            },
        };
        self.call_times.record(started.elapsed());
        Ran::Finished(results)
    }

    /// Hands off `unfinished` chunks so that the batch can end without them: their messages
    /// are guarded in the schedule (`in_flight`, see [`Store::guard_in_flight`]) and marked
    /// handed off, and the returned stragglers finish and record them. When the worker already
    /// holds `max_handed_off` messages, or the guards cannot be written, the batch waits for
    /// the chunks instead.
    async fn hand_off<'s>(
        &'s self,
        work: &mut [Work],
        unfinished: Vec<Chunk<'s>>,
        received_at: chrono::DateTime<chrono::Utc>,
    ) -> Vec<Straggler<'s>> {
        let indexes: Vec<usize> = unfinished
            .iter()
            .flat_map(|c| &c.indexes)
            .copied()
            .collect();
        let ids: Vec<MessageId> = indexes.iter().map(|&i| work[i].record.message_id).collect();
        let taken = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            let room = in_flight.len() + ids.len() <= self.config.max_handed_off;
            if room {
                in_flight.extend(ids.iter().copied());
            }
            room
        };
        let guarded = taken
            && {
                let due_at = chrono::Utc::now() + IN_FLIGHT_GUARD;
                let entries: Vec<ScheduledMessage> = indexes
                    .iter()
                    .map(|&i| ScheduledMessage::of(&work[i].record, ScheduleKind::InFlight, due_at))
                    .collect();
                match self.store.guard_in_flight(&entries).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot guard calls in flight; the batch waits for them");
                        self.landed(&ids);
                        false
                    }
                }
            };
        if !guarded {
            let (finished, _) = self.run_chunks(unfinished, None).await;
            for (i, tries) in finished {
                work[i].tries = tries;
            }
            return Vec::new();
        }
        self.metrics.calls_handed_off.inc_by(ids.len() as u64);
        tracing::info!(
            messages = ids.len(),
            "vendor calls outlived their batch; finishing them in the background"
        );
        unfinished
            .into_iter()
            .map(|chunk| {
                let works = chunk
                    .indexes
                    .iter()
                    .map(|&i| {
                        let w = work[i].clone();
                        work[i].handed_off = true;
                        w
                    })
                    .collect();
                Box::pin(self.finish_straggler(chunk, works, received_at)) as Straggler<'s>
            })
            .collect()
    }

    /// Drives a handed-off chunk to its end, renewing its messages' guards meanwhile; then
    /// records its outcomes as its batch would have, and removes the guards.
    async fn finish_straggler(
        &self,
        mut chunk: Chunk<'_>,
        mut works: Vec<Work>,
        received_at: chrono::DateTime<chrono::Utc>,
    ) {
        let ids: Vec<MessageId> = works.iter().map(|w| w.record.message_id).collect();
        let started = *chunk.started.get_or_insert_with(Instant::now);
        let results = loop {
            tokio::select! {
                results = &mut chunk => {
                    self.call_times.record(started.elapsed());
                    break results;
                }
                _ = tokio::time::sleep(IN_FLIGHT_RENEW) => {
                    let due_at = chrono::Utc::now() + IN_FLIGHT_GUARD;
                    if let Err(e) = self.store.renew_in_flight(&ids, due_at).await {
                        tracing::warn!(error = %e, "could not renew the guards of calls in flight");
                    }
                }
            }
        };
        for (i, tries) in results {
            if let Some(k) = chunk.indexes.iter().position(|&j| j == i) {
                works[k].tries = tries;
            }
        }
        self.outcomes.flush().await;
        self.record_outcomes(&works, received_at, &mut BatchOutcome::default())
            .await;
        let ids = &ids;
        until_done("the guards of calls in flight", || async move {
            Ok(self.store.end_in_flight(ids).await?)
        })
        .await;
        self.landed(ids);
    }

    /// Those of `ids` whose vendor calls were handed off here and are not recorded yet.
    fn in_flight_among(&self, ids: &[MessageId]) -> HashSet<MessageId> {
        let in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if in_flight.is_empty() {
            return HashSet::new();
        }
        ids.iter()
            .filter(|id| in_flight.contains(id))
            .copied()
            .collect()
    }

    /// Forgets handed-off messages once recorded (or taken back by their batch).
    fn landed(&self, ids: &[MessageId]) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            in_flight.remove(id);
        }
    }

    /// Sends `items`, each through the first account of its plan whose circuit breaker admits
    /// the call. A retryable failure is retried while attempts and the inline wait allow: at once
    /// through the plan's next account while it has untried ones, else after exponential
    /// backoff with full jitter. Each call's outcome goes to the ledger as soon as the vendor
    /// answered.
    async fn deliver(
        &self,
        channel: Channel,
        sender: &dyn Sender,
        items: Vec<Item>,
    ) -> Vec<(usize, Vec<Try>)> {
        let mut tries: Vec<Vec<Try>> = items.iter().map(|_| Vec::new()).collect();
        // Per item: the position in its plan of the account to call next, and how many of its
        // accounts failed since its last backoff.
        let mut at = vec![0usize; items.len()];
        let mut failed_over = vec![0usize; items.len()];
        let mut pending: Vec<usize> = (0..items.len()).collect();
        // Per item: its attempt now. A breaker's refusal made no call, so it uses none.
        let mut attempts: Vec<u32> = items.iter().map(|item| item.first_attempt).collect();
        while !pending.is_empty() {
            let (calls, refused) = self.assign(&items, &pending, &mut at);
            let answers = futures::future::join_all(calls.iter().map(|(account_id, ks)| {
                let records: Vec<&MessageRecord> = ks.iter().map(|&k| &*items[k].record).collect();
                self.limited_call(channel, *account_id, sender, records)
            }))
            .await;
            let mut answered: Vec<(Option<i64>, Vec<usize>, Answer)> = calls
                .into_iter()
                .zip(answers)
                .map(|((account_id, ks), answer)| (account_id, ks, answer))
                .collect();
            for (account_id, ks, wait) in refused {
                let answer = Answer::none(
                    ks.len(),
                    Some(NoCall::CircuitOpen),
                    "circuit_open",
                    "every account of the message's route has its circuit breaker open",
                    Some(wait),
                );
                answered.push((account_id, ks, answer));
            }

            let mut again = Vec::new();
            let mut wait = Duration::ZERO;
            let mut ledger_rows = Vec::with_capacity(pending.len());
            for (account_id, ks, answer) in answered {
                if let (Some(id), true) = (account_id, answer.called) {
                    let healthy = answer
                        .results
                        .iter()
                        .any(|r| !matches!(r, Err(SendError::Retryable { .. })));
                    self.breakers.record(id, healthy, answer.latency);
                }
                let latency_ms = answer.latency.as_millis() as u64;
                for (k, result) in ks.into_iter().zip(answer.results) {
                    let Item {
                        record,
                        first_attempt,
                        plan,
                        ..
                    } = &items[k];
                    let first_attempt = *first_attempt;
                    let attempt = attempts[k];
                    let young_enough = |until: &_| young_enough(&self.config, record, until);
                    let wanted = match &result {
                        // Held by a rate limit: to the schedule, however long.
                        _ if matches!(answer.no_call, Some(NoCall::RateLimited { .. })) => None,
                        // Refused by open breakers, or the store could not be read for the
                        // call: no attempt used, so only its age bounds the wait.
                        Err(SendError::Retryable { retry_after, .. })
                            if answer.no_call.is_some_and(NoCall::waits_free) =>
                        {
                            let d = retry_after.unwrap_or(self.config.retry_base);
                            young_enough(
                                &(answer.done_at
                                    + chrono::Duration::from_std(d).unwrap_or_default()),
                            )
                            .then_some(d)
                        }
                        Err(SendError::Retryable { retry_after, .. })
                            if attempt < self.config.max_attempts =>
                        {
                            if answer.called && failed_over[k] + 1 < plan.len() {
                                // Another account of the route has not failed yet: at once.
                                failed_over[k] += 1;
                                at[k] = (at[k] + 1) % plan.len();
                                self.metrics
                                    .failovers
                                    .get_or_create(&ChannelLabel {
                                        channel: channel.as_str(),
                                    })
                                    .inc();
                                Some(Duration::ZERO)
                            } else {
                                if answer.called && plan.len() > 1 {
                                    failed_over[k] = 0;
                                    at[k] = (at[k] + 1) % plan.len();
                                }
                                let retry = attempt - first_attempt;
                                Some(retry_delay(&self.config, retry, *retry_after))
                            }
                        }
                        _ => None,
                    };
                    // A short wait is spent here; a long one in the schedule, if the message
                    // is still young enough then.
                    let delay = wanted.filter(|d| *d <= self.config.max_retry_wait);
                    let deferred_until = match answer.no_call {
                        Some(NoCall::RateLimited { until }) => Some(until),
                        _ => wanted.filter(|d| *d > self.config.max_retry_wait).map(|d| {
                            answer.done_at + chrono::Duration::from_std(d).unwrap_or_default()
                        }),
                    }
                    .filter(young_enough);
                    let next_attempt = match answer.no_call {
                        Some(no_call) if no_call.waits_free() => attempt,
                        _ => attempt + 1,
                    };
                    match (&result, delay) {
                        (_, Some(_)) => {
                            attempts[k] = next_attempt;
                            ledger_rows.push((
                                record.message_id,
                                LedgerState::Sending,
                                next_attempt,
                            ))
                        }
                        // Written with its schedule entry at the end of the batch.
                        _ if deferred_until.is_some() => {}
                        (Ok(_), None) => {
                            ledger_rows.push((record.message_id, LedgerState::Sent, attempt))
                        }
                        (Err(_), None) => {
                            ledger_rows.push((record.message_id, LedgerState::SendFailed, attempt))
                        }
                    }
                    if let Some(d) = delay {
                        wait = wait.max(d);
                        again.push(k);
                    }
                    tries[k].push(Try {
                        attempt,
                        sending_at: answer.sending_at,
                        done_at: answer.done_at,
                        latency_ms,
                        result,
                        retried: delay.is_some() || deferred_until.is_some(),
                        deferred_until,
                        account_id,
                        no_call: answer.no_call,
                        rate_waited: answer.rate_waited,
                    });
                }
            }
            self.outcomes.record(ledger_rows);
            if !again.is_empty() {
                tokio::time::sleep(wait).await;
            }
            again.sort_unstable();
            pending = again;
        }
        items.iter().map(|item| item.index).zip(tries).collect()
    }

    /// Groups the `pending` items by the account each calls now: from its position `at` in its
    /// plan, the first account whose breaker admits a call (`at` moves there). Items whose every
    /// account is refused come back apart, with the shortest wait until one admits again.
    fn assign(&self, items: &[Item], pending: &[usize], at: &mut [usize]) -> (Calls, Refused) {
        let mut admitted: HashMap<i64, Admission> = HashMap::new();
        let mut calls = Calls::new();
        let mut refused = Refused::new();
        for &k in pending {
            let plan = &items[k].plan;
            let mut chosen = None;
            let mut wait = Duration::MAX;
            for step in 0..plan.len() {
                let j = (at[k] + step) % plan.len();
                let admission = *admitted
                    .entry(plan[j])
                    .or_insert_with(|| self.breakers.admit(plan[j]));
                match admission {
                    Admission::Call => {
                        chosen = Some(j);
                        break;
                    }
                    Admission::Refused { retry_in } => wait = wait.min(retry_in),
                }
            }
            let account_id = match chosen {
                Some(j) => {
                    at[k] = j;
                    Some(plan[j])
                }
                None if plan.is_empty() => None,
                None => {
                    let first = Some(plan[at[k] % plan.len()]);
                    match refused
                        .iter_mut()
                        .find(|(a, _, w)| *a == first && *w == wait)
                    {
                        Some((_, ks, _)) => ks.push(k),
                        None => refused.push((first, vec![k], wait)),
                    }
                    continue;
                }
            };
            match calls.iter_mut().find(|(a, _)| *a == account_id) {
                Some((_, ks)) => ks.push(k),
                None => calls.push((account_id, vec![k])),
            }
        }
        (calls, refused)
    }

    /// [`Self::call`] once the account's rate limit (set in the app's policy) gives a slot to
    /// every one of `records`; when that would take too long, no call and the time to come back.
    async fn limited_call(
        &self,
        channel: Channel,
        account_id: Option<i64>,
        sender: &dyn Sender,
        records: Vec<&MessageRecord>,
    ) -> Answer {
        let (Some(account), Some(first)) = (account_id, records.first()) else {
            return self.call(channel, account_id, sender, records).await;
        };
        let unavailable = |e: StoreError| {
            Answer::none(
                records.len(),
                Some(NoCall::StoreUnavailable),
                "rate_limit_unavailable",
                &format!("could not read the account's rate limit: {e}"),
                None,
            )
        };
        let per_second = match self.policies.rate_limit(&first.app, account).await {
            Ok(Some(limit)) => limit,
            Ok(None) => return self.call(channel, account_id, sender, records).await,
            Err(e) => return unavailable(e),
        };
        let lane = records
            .iter()
            .map(|r| r.msg_type)
            .reduce(most_urgent)
            .unwrap_or(first.msg_type);
        let n = records.len() as u32;
        let acquired = self
            .rates
            .acquire(account, per_second, n, lane, self.config.rate_wait)
            .await;
        let held = || {
            self.metrics
                .rate_limited
                .get_or_create(&AccountLabel {
                    account_id: account,
                })
                .inc_by(u64::from(n));
        };
        match acquired {
            Ok(Acquired::Now { waited }) => {
                let mut answer = self.call(channel, account_id, sender, records).await;
                if waited >= REPORTED_RATE_WAIT {
                    held();
                    answer.rate_waited = Some(waited);
                }
                answer
            }
            Ok(Acquired::Later { at }) => {
                held();
                Answer::none(
                    records.len(),
                    Some(NoCall::RateLimited { until: at }),
                    "rate_limited",
                    &format!("account {account} is limited to {per_second} messages a second"),
                    None,
                )
            }
            Err(e) => unavailable(e),
        }
    }

    /// One call through `account_id` (read through the cache on every call: a store failure
    /// is retryable, a missing account — or one of another channel — is not).
    async fn call(
        &self,
        channel: Channel,
        account_id: Option<i64>,
        sender: &dyn Sender,
        records: Vec<&MessageRecord>,
    ) -> Answer {
        let account = match account_id {
            Some(id) => self
                .account(id)
                .await
                .map(|a| a.filter(|a| a.channel == channel)),
            None => Ok(None),
        };
        let sending_at = chrono::Utc::now();
        let started = Instant::now();
        let results = match &account {
            Err(e) => records
                .iter()
                .map(|_| {
                    Err(SendError::Retryable {
                        code: "account_unavailable".into(),
                        detail: format!("could not read the channel account: {e}"),
                        retry_after: None,
                    })
                })
                .collect(),
            Ok(None) => records
                .iter()
                .map(|_| {
                    Err(SendError::Permanent {
                        code: "unknown_account".into(),
                        detail: "the message's channel account no longer exists".into(),
                    })
                })
                .collect(),
            Ok(Some(a)) if records.len() == 1 => {
                vec![sender.send(records[0], a.id, &a.config).await]
            }
            Ok(Some(a)) => sender.send_batch(&records, a.id, &a.config).await,
        };
        Answer {
            results,
            sending_at,
            done_at: chrono::Utc::now(),
            latency: started.elapsed(),
            called: matches!(account, Ok(Some(_))),
            no_call: account.is_err().then_some(NoCall::StoreUnavailable),
            rate_waited: None,
        }
    }

    /// The live account `id` (cached for [`ACCOUNT_TTL`]); `None` when it does not exist.
    async fn account(&self, id: i64) -> Result<Option<Arc<Account>>, StoreError> {
        if let Some((a, at)) = self
            .accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            && at.elapsed() < ACCOUNT_TTL
        {
            return Ok(a.clone());
        }
        let found = match self.store.account_by_id(id).await {
            Ok(a) => Some(Arc::new(a)),
            Err(StoreError::NotFound) => None,
            Err(e) => return Err(e),
        };
        self.accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (found.clone(), Instant::now()));
        Ok(found)
    }

    /// The delivery events of one message, in order: accepted, received, then per vendor call
    /// sending and retrying / sent / send_failed.
    fn events_of(
        &self,
        w: &Work,
        received_at: chrono::DateTime<chrono::Utc>,
    ) -> Vec<DeliveryEvent> {
        let r = &w.record;
        if w.skip || w.handed_off {
            return Vec::new();
        }
        let ev = |state: State, attempt: u32, ts| {
            let mut e = DeliveryEvent::for_record(r, state, attempt);
            e.ts = ts;
            e.redelivered = w.redelivered;
            e
        };
        // Accepted and received once per message, whatever the attempt: copies re-emitted after
        // a crash, a schedule or a retry keep the ids of the first, which the warehouse drops.
        let mut out = vec![
            ev(State::Accepted, 1, r.accepted_at),
            ev(State::Received, 1, received_at),
        ];
        if let Some(stop) = &w.stop {
            let mut e = ev(stop.state, w.attempt, received_at);
            e.error_code = Some(stop.code.into());
            e.error_detail = Some(stop.detail.clone());
            out.push(e);
        }
        if let Some((kind, until)) = &w.wait {
            let state = match kind {
                ScheduleKind::Scheduled => State::Scheduled,
                ScheduleKind::Deferred => State::Deferred,
                ScheduleKind::Retry => State::Retrying,
                ScheduleKind::RateLimited => State::RateLimited,
                // Never a policy's wait: only handed-off calls are guarded so.
                ScheduleKind::InFlight => State::Sending,
            };
            let mut e = ev(state, w.attempt, received_at);
            e.error_detail = Some(format!("until {}", until.to_rfc3339()));
            out.push(e);
        }
        if let Some(words) = &w.masked {
            let mut e = ev(State::Filtered, w.attempt, received_at);
            e.error_code = Some("masked".into());
            e.error_detail = Some(format!("sensitive words masked: {}", words.join(", ")));
            out.push(e);
        }
        match &w.done {
            // Sent or failed before: copies carry the original time (the ledger keeps it), so
            // that one receiver's events stay in order even where some of the first ones are lost.
            Some((LedgerState::Sent, attempt)) => {
                let at = w.done_at.unwrap_or(received_at);
                out.push(ev(State::Sending, *attempt, at));
                out.push(ev(State::Sent, *attempt, at));
            }
            Some((LedgerState::SendFailed, attempt)) => {
                let at = w.done_at.unwrap_or(received_at);
                out.push(ev(State::Sending, *attempt, at));
                let mut e = ev(State::SendFailed, *attempt, at);
                e.error_code = Some("unknown".into());
                out.push(e);
            }
            Some((state, attempt)) => {
                // Stopped by a policy or cancelled before: the same state again.
                let mut e = ev(stopped_state(*state), *attempt, received_at);
                e.error_code = Some(state_code(*state).into());
                out.push(e);
            }
            None if !w.to_send() => {}
            None => {
                for t in &w.tries {
                    if let Some(waited) = t.rate_waited {
                        let mut e = ev(State::RateLimited, t.attempt, t.sending_at);
                        e.account_id = t.account_id.or(e.account_id);
                        e.error_code = Some("rate_limited".into());
                        e.error_detail = Some(format!(
                            "waited {} ms for the account's rate limit",
                            waited.as_millis()
                        ));
                        out.push(e);
                    }
                    if t.no_call.is_none() {
                        let mut e = ev(State::Sending, t.attempt, t.sending_at);
                        e.account_id = t.account_id.or(e.account_id);
                        out.push(e);
                        if let Some(account) = t.account_id {
                            let outcome = match &t.result {
                                Ok(_) => "sent",
                                Err(err) if err.is_retryable() => "retryable",
                                Err(_) => "permanent",
                            };
                            let latency = Duration::from_millis(t.latency_ms);
                            self.metrics
                                .vendor_call(r.channel, account, outcome, latency);
                        }
                    }
                    let mut e = match &t.result {
                        Ok(o) => {
                            let mut e = ev(State::Sent, t.attempt, t.done_at);
                            e.vendor = Some(o.vendor.clone());
                            e.vendor_message_id = o.vendor_message_id.clone();
                            e.billing_units = o.billing_units;
                            e
                        }
                        Err(err) => {
                            let state = match (t.retried, t.no_call) {
                                (true, Some(NoCall::RateLimited { .. })) => State::RateLimited,
                                // Waits for a breaker to admit a call; no attempt was used.
                                (true, Some(NoCall::CircuitOpen | NoCall::StoreUnavailable)) => {
                                    State::Deferred
                                }
                                (true, None) => State::Retrying,
                                (false, _) => State::SendFailed,
                            };
                            let mut e = ev(state, t.attempt, t.done_at);
                            e.error_code = Some(err.code().to_string());
                            e.error_detail = Some(match t.deferred_until {
                                Some(until) => {
                                    format!("{}; next try at {}", err.detail(), until.to_rfc3339())
                                }
                                None => err.detail().to_string(),
                            });
                            e
                        }
                    };
                    e.latency_ms = Some(t.latency_ms);
                    e.account_id = t.account_id.or(e.account_id);
                    self.prices.put_cost(&mut e);
                    out.push(e);
                }
            }
        }
        for e in &out {
            self.metrics.event(r.channel, e.state);
        }
        out
    }
}

/// Awaits `fut` while driving `stragglers` (vendor calls handed off by earlier batches), so
/// that neither waits for the other and `fut` is never dropped half-done.
async fn beside<F: Future>(fut: F, stragglers: &mut FuturesUnordered<Straggler<'_>>) -> F::Output {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            biased;
            out = &mut fut => return out,
            Some(()) = stragglers.next(), if !stragglers.is_empty() => {}
        }
    }
}

/// Runs `op` until it succeeds, logging each failure and backing off (100 ms, doubling, at most
/// 5 s): for the writes that record a batch once its vendor calls are made.
async fn until_done<F, Fut>(what: &str, mut op: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), DispatchError>>,
{
    let mut backoff = Duration::from_millis(100);
    while let Err(e) = op().await {
        tracing::error!(error = %e, "recording {what} failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The event state of a final ledger state other than `sent` and `send_failed`.
fn stopped_state(state: LedgerState) -> State {
    match state {
        LedgerState::Blocked => State::Blocked,
        LedgerState::DedupContent => State::DedupContent,
        LedgerState::DedupFrequency => State::DedupFrequency,
        LedgerState::Filtered => State::Filtered,
        LedgerState::Expired => State::Expired,
        _ => State::Discarded,
    }
}

/// The error code of a redelivered message a policy stopped before (the first code is on its
/// first events).
fn state_code(state: LedgerState) -> &'static str {
    match state {
        LedgerState::Cancelled => "cancelled",
        _ => "policy",
    }
}

/// Whether `record` is still within its type's age limit at `until` (counted from its
/// acceptance, or from a later `send_at`).
fn young_enough(
    config: &DispatchConfig,
    record: &MessageRecord,
    until: &chrono::DateTime<chrono::Utc>,
) -> bool {
    let born = record
        .send_at
        .map_or(record.accepted_at, |s| s.max(record.accepted_at));
    (*until - born).to_std().unwrap_or_default() <= config.max_age.of(record.msg_type)
}

/// Commits `positions`, trying a failed commit three times more. A commit that still fails is
/// left to the next batch's (offsets are per partition, so a later commit covers this batch);
/// should the worker stop before that, the batch is read again and the send ledger absorbs it.
async fn commit(consumer: &mut dyn Consumer, positions: &[Position]) {
    let mut backoff = Duration::from_millis(200);
    for tries_left in (0..4).rev() {
        match consumer.commit(positions).await {
            Ok(()) => return,
            Err(e) if tries_left == 0 => {
                tracing::warn!(error = %e, "offsets not committed; the next batch's commit covers them");
            }
            Err(e) => {
                tracing::warn!(error = %e, "offset commit failed; trying again");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
    }
}

/// The longest backoff between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// The wait before retry number `retry + 1`: the vendor's `Retry-After` when it gave one, else
/// full jitter over `retry_base * 2^retry`, at most [`MAX_BACKOFF`]. Waits up to
/// `max_retry_wait` are spent in the worker, longer ones in the schedule.
fn retry_delay(config: &DispatchConfig, retry: u32, retry_after: Option<Duration>) -> Duration {
    if let Some(d) = retry_after {
        return d;
    }
    let ceiling = config
        .retry_base
        .saturating_mul(1 << retry.min(20))
        .min(MAX_BACKOFF);
    ceiling.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn backoff_is_full_jitter_under_a_doubling_ceiling(
            retry in 0u32..40,
            base_ms in 1u64..5_000,
            after in proptest::option::of(0u64..100_000),
        ) {
            let config = DispatchConfig {
                retry_base: Duration::from_millis(base_ms),
                ..DispatchConfig::default()
            };
            let d = retry_delay(&config, retry, after.map(Duration::from_millis));
            match after {
                Some(ms) => proptest::prop_assert_eq!(d, Duration::from_millis(ms)),
                None => {
                    let ceiling = Duration::from_millis(base_ms)
                        .saturating_mul(1 << retry.min(20))
                        .min(MAX_BACKOFF);
                    proptest::prop_assert!(d <= ceiling);
                }
            }
        }
    }

    /// A consumer whose first `failures` commits fail as a broker would; it records each try.
    struct FlakyCommits {
        failures: usize,
        tries: Vec<Vec<Position>>,
    }

    #[async_trait::async_trait]
    impl Consumer for FlakyCommits {
        async fn poll(&mut self, _: usize, _: Duration) -> Result<Vec<Delivered>, BusError> {
            Ok(Vec::new())
        }

        async fn commit(&mut self, positions: &[Position]) -> Result<(), BusError> {
            self.tries.push(positions.to_vec());
            if self.tries.len() <= self.failures {
                return Err(BusError::Broker("coordinator not available".into()));
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_failed_commit_is_tried_again_and_then_left_to_the_next_batch() {
        let positions = [Position {
            partition: 3,
            next_offset: 42,
        }];
        // Two failures, then the third try commits the same positions.
        let mut flaky = FlakyCommits {
            failures: 2,
            tries: Vec::new(),
        };
        commit(&mut flaky, &positions).await;
        assert_eq!(flaky.tries, vec![positions.to_vec(); 3]);
        // Failing every time: four tries, then the worker goes on (no error, no panic).
        let mut broken = FlakyCommits {
            failures: usize::MAX,
            tries: Vec::new(),
        };
        let started = std::time::Instant::now();
        commit(&mut broken, &positions).await;
        assert_eq!(broken.tries.len(), 4);
        // Backoff 200 + 400 + 800 ms between the tries.
        assert!(started.elapsed() >= Duration::from_millis(1400));
    }
}

//! Runs due campaigns: every ingest process leases one at a time from the store, reads its file
//! piece by piece and publishes its rows in batches to `herald.requests`.
//!
//! # Delivery guarantee
//!
//! At least once, with duplicates absorbed: each batch of [`BATCH_ROWS`] rows is published
//! first, then counted — progress, checkpoint (`processed_rows`) and bad rows in one store
//! transaction that also renews the lease and fails if the lease was lost or the campaign
//! cancelled. A crash between the two publishes the batch again when the campaign resumes, under
//! the same message ids: an id is a UUIDv7 whose time is the run's start and whose other bits
//! are a hash of (campaign, run, line), and dispatch's send ledger sends one id once.

use super::campaign_timezone;
use super::cron::Schedule;
use super::csvfile::{RECEIVER, Row, rows};
use crate::send::{Group, Timing, build_records};
use crate::{ApiError, ApiState, Detail};
use herald_core::config::HttpConfig;
use herald_core::store::{App, BadRow, Campaign, CampaignBatch, StoreError, Template};
use herald_core::wire::REQUESTS_TOPIC;
use herald_core::{MessageId, MessageRecord};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Rows published and counted together.
pub(crate) const BATCH_ROWS: usize = 1000;

/// Most bad rows kept per run (all are counted).
const BAD_ROWS_KEPT: i64 = 10_000;

/// How long a runner holds a campaign without writing progress; renewed by every batch.
const LEASE: Duration = Duration::from_secs(30);

/// How often the runner looks for a due campaign when none was.
const POLL: Duration = Duration::from_secs(1);

/// An upload idle this long is taken for dead and deleted.
const STALE_UPLOAD: Duration = Duration::from_secs(600);

/// Runs due campaigns until `shutdown` turns true; a run in progress stops after its current
/// batch and leaves the campaign to be resumed.
pub async fn run_campaigns(state: ApiState, mut shutdown: watch::Receiver<bool>) {
    let store = &state.inner.store;
    let mut cleaned = Instant::now();
    loop {
        if *shutdown.borrow() {
            return;
        }
        if cleaned.elapsed() >= STALE_UPLOAD / 10 {
            cleaned = Instant::now();
            let idle_since = now_ms() - STALE_UPLOAD.as_millis() as i64;
            match store.delete_stale_uploads(idle_since).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(uploads = n, "deleted stale campaign uploads"),
                Err(e) => tracing::warn!(error = %e, "could not delete stale campaign uploads"),
            }
        }
        let claimed = store
            .claim_campaign(now_ms() + LEASE.as_millis() as i64)
            .await;
        match claimed {
            Ok(Some(c)) => {
                let id = c.id;
                let mut run = Run::new(&state, c);
                if let Err(e) = run.run(&shutdown).await {
                    // The lease runs out and the campaign resumes from its checkpoint.
                    tracing::warn!(campaign = id, error = %e, "campaign run interrupted");
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "could not look for due campaigns"),
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Why a run stopped before its end (it resumes later).
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("publishing: {0}")]
    Bus(#[from] herald_core::bus::BusError),
}

/// One run of one campaign, under a lease.
struct Run<'a> {
    state: &'a ApiState,
    c: Campaign,
    lease: i64,
    /// Bad rows of this run so far (counted, kept or not).
    bad_so_far: i64,
    batch: CampaignBatch,
    records: Vec<MessageRecord>,
}

/// How a run ended, when it did not fail.
enum Ended {
    /// The rows ran out.
    Finished,
    /// Cancelled, taken over, or shutting down: leave the campaign as it is.
    Stopped,
}

impl<'a> Run<'a> {
    fn new(state: &'a ApiState, c: Campaign) -> Self {
        Run {
            state,
            lease: c.lease,
            bad_so_far: c.bad_rows,
            c,
            batch: CampaignBatch::default(),
            records: Vec::with_capacity(BATCH_ROWS),
        }
    }

    async fn run(&mut self, shutdown: &watch::Receiver<bool>) -> Result<(), RunError> {
        let store = &self.state.inner.store;
        let c = &self.c;
        tracing::info!(
            campaign = c.id,
            run = c.runs,
            from_row = c.processed_rows,
            "campaign run"
        );
        let template = match store.template(c.app_id, c.template_id).await {
            Ok(t) => t,
            Err(StoreError::NotFound) => {
                let why = format!("template {} no longer exists", c.template_id);
                store.fail_campaign(c.id, self.lease, &why).await?;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        match self.rows(&template, shutdown).await? {
            Ended::Stopped => Ok(()),
            Ended::Finished => self.finish().await,
        }
    }

    /// Publishes every row from the checkpoint on, batch by batch.
    async fn rows(
        &mut self,
        template: &Template,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Ended, RunError> {
        let store = &self.state.inner.store;
        let (id, columns) = (self.c.id, self.c.columns.clone());
        let receiver = columns.iter().position(|c| c == RECEIVER).unwrap_or(0);
        let app = App {
            id: self.c.app_id,
            name: self.c.app.clone(),
        };
        let timing = Timing {
            send_at: None,
            timezone: self.c.timezone.clone(),
        };
        let started = self.c.run_started_at.unwrap_or_else(now_ms);
        let request_id = message_id(id, self.c.runs, 0, started).to_string();
        let ctx = RowContext {
            config: &self.state.inner.config,
            columns: &columns,
            receiver,
            app: &app,
            template,
            timing: &timing,
            request_id: &request_id,
            started,
        };
        let mut next_row = self.c.processed_rows;
        let mut chunk = store.campaign_chunk_with_row(id, next_row).await?;
        let mut skip = chunk.as_ref().map_or(0, |k| next_row - k.first_row);
        while let Some(piece) = chunk {
            for row in rows(&piece) {
                if skip > 0 {
                    skip -= 1;
                    continue;
                }
                next_row += 1;
                self.take(&ctx, row);
                if self.batch.rows as usize >= BATCH_ROWS {
                    if !self.flush().await? {
                        return Ok(Ended::Stopped);
                    }
                    if *shutdown.borrow() {
                        store.release_campaign(id, self.lease).await?;
                        return Ok(Ended::Stopped);
                    }
                }
            }
            chunk = store.campaign_chunk(id, piece.seq + 1).await?;
        }
        if self.batch.rows > 0 && !self.flush().await? {
            return Ok(Ended::Stopped);
        }
        if next_row < self.c.total_rows {
            // Cancelled meanwhile (its file deleted), or a file cut short.
            let why = format!(
                "the stored file ends at row {next_row} of {}",
                self.c.total_rows
            );
            store.fail_campaign(id, self.lease, &why).await?;
            return Ok(Ended::Stopped);
        }
        Ok(Ended::Finished)
    }

    /// Adds one row to the batch: a record, or a bad row.
    fn take(&mut self, ctx: &RowContext<'_>, row: Result<Row, String>) {
        self.batch.rows += 1;
        let (line, receiver, reason) = match row {
            Err(reason) => (0, String::new(), reason),
            Ok(row) => match ctx.record(self.c.id, self.c.runs, &row) {
                Ok(record) => {
                    self.batch.accepted += 1;
                    self.records.push(record);
                    return;
                }
                Err((receiver, reason)) => (row.line, receiver, reason),
            },
        };
        self.batch.bad_rows += 1;
        self.bad_so_far += 1;
        if self.bad_so_far <= BAD_ROWS_KEPT {
            self.batch.bad.push(BadRow {
                line,
                receiver,
                reason,
            });
        }
    }

    /// Publishes the batch's records, then counts the batch; `false` when the campaign was
    /// cancelled or taken over (nothing counted).
    async fn flush(&mut self) -> Result<bool, RunError> {
        let inner = &self.state.inner;
        if !self.records.is_empty() {
            let signer = inner.store.record_signer().await?;
            let records = self.records.iter().map(|r| signer.record(r)).collect();
            inner.bus.publish(REQUESTS_TOPIC, records).await?;
        }
        let new_lease = now_ms() + LEASE.as_millis() as i64;
        let held = inner
            .store
            .campaign_progress(self.c.id, self.c.runs, self.lease, new_lease, &self.batch)
            .await?;
        if held {
            inner
                .metrics
                .messages_accepted
                .inc_by(self.records.len() as u64);
            self.lease = new_lease;
        }
        self.records.clear();
        self.batch = CampaignBatch::default();
        Ok(held)
    }

    /// Ends the run: the campaign waits for its next cron time, or is done.
    async fn finish(&mut self) -> Result<(), RunError> {
        let store = &self.state.inner.store;
        let c = &self.c;
        let next = match &c.cron {
            None => None,
            Some(expr) => {
                let tz = campaign_timezone(store, c.app_id, c.timezone.as_deref()).await?;
                match Schedule::parse(expr, tz) {
                    Ok(s) => s.next_after(chrono::Utc::now()),
                    Err(why) => {
                        store.fail_campaign(c.id, self.lease, &why).await?;
                        return Ok(());
                    }
                }
                .map(|t| t.timestamp_millis())
            }
        };
        let held = store
            .finish_campaign_run(c.id, c.runs, self.lease, next)
            .await?;
        if held {
            tracing::info!(campaign = c.id, run = c.runs, "campaign run finished");
        }
        Ok(())
    }
}

/// What every row of a run shares.
struct RowContext<'a> {
    config: &'a HttpConfig,
    columns: &'a [String],
    receiver: usize,
    app: &'a App,
    template: &'a Template,
    timing: &'a Timing,
    request_id: &'a str,
    started: i64,
}

impl RowContext<'_> {
    /// The message of `row`, rendered and checked as `/v1/send` does; or its receiver (as far as
    /// it can be read) and why it was not sent.
    fn record(
        &self,
        campaign: i64,
        run: i64,
        row: &Row,
    ) -> Result<MessageRecord, (String, String)> {
        let field = |i: usize| {
            row.fields
                .get(i)
                .map(|f| String::from_utf8_lossy(f).into_owned())
        };
        let receiver = field(self.receiver).unwrap_or_default();
        if row.fields.len() != self.columns.len() {
            return Err((
                receiver,
                format!(
                    "bad_row: the row has {} fields, the header {}",
                    row.fields.len(),
                    self.columns.len()
                ),
            ));
        }
        let mut variables = Map::with_capacity(self.columns.len());
        for (name, value) in self.columns.iter().zip(row.fields.iter()) {
            let Ok(value) = std::str::from_utf8(value) else {
                return Err((receiver, format!("bad_row: column `{name}` is not UTF-8")));
            };
            variables.insert(name.clone(), Value::String(value.to_string()));
        }
        let receivers = [receiver];
        let group = Group {
            path: String::new(),
            receivers: &receivers,
            variables: &variables,
            biz_id: None,
        };
        let id = message_id(campaign, run, row.line, self.started);
        let built = build_records(
            self.config,
            self.app,
            self.template,
            self.timing,
            &[group],
            false,
            self.request_id,
            &mut |_| id,
        );
        let [receiver] = receivers;
        match built {
            Ok(mut records) if records.len() == 1 => Ok(records.remove(0)),
            Ok(records) => Err((receiver, format!("internal: {} records", records.len()))),
            Err(ApiError::Invalid {
                details, message, ..
            }) if details.is_empty() => Err((receiver, message)),
            Err(ApiError::Invalid { details, .. }) => Err((receiver, reasons(&details))),
            Err(other) => Err((receiver, other.code().to_string())),
        }
    }
}

/// `code: message; code: message` of every bad item of a row.
fn reasons(details: &[Detail]) -> String {
    details
        .iter()
        .map(|d| format!("{}: {}", d.code, d.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The id of the message of `line` in run `run` of `campaign`, which started at `started` (unix
/// ms): the same every time the row is published, so the send ledger sends it once.
pub(crate) fn message_id(campaign: i64, run: i64, line: i64, started: i64) -> MessageId {
    let hash = Sha256::new()
        .chain_update(b"herald campaign message\0")
        .chain_update(campaign.to_be_bytes())
        .chain_update(run.to_be_bytes())
        .chain_update(line.to_be_bytes())
        .finalize();
    let mut bits = [0u8; 10];
    bits.copy_from_slice(&hash[..10]);
    let millis = u64::try_from(started).unwrap_or(0);
    MessageId(uuid::Builder::from_unix_timestamp_millis(millis, &bits).into_uuid())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_stable_per_row_and_time_ordered_by_run() {
        let started = 1_700_000_000_123;
        let a = message_id(1, 1, 2, started);
        assert_eq!(a, message_id(1, 1, 2, started));
        let others = [
            message_id(1, 1, 3, started),
            message_id(1, 2, 2, started),
            message_id(2, 1, 2, started),
        ];
        assert!(others.iter().all(|o| *o != a));
        assert_eq!(a.0.get_version_num(), 7);
        let (secs, nanos) = a.0.get_timestamp().unwrap().to_unix();
        assert_eq!(
            secs * 1000 + u64::from(nanos) / 1_000_000,
            1_700_000_000_123
        );
    }
}

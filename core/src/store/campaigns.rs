//! Scheduled campaigns: a template sent to every row of an uploaded CSV file, once or on a cron
//! schedule.
//!
//! The file is kept in the store, not on a disk, so every ingest process can run any campaign:
//! `campaign_chunks` holds it (without its header) in pieces of about 1 MiB, each ending on a row
//! boundary and knowing its first row and line, so a run reads one piece at a time and resumes
//! from any row without reading what came before.
//!
//! # Runs, leases and checkpoints
//!
//! An ingest process runs a due campaign under a lease (`claimed_until`), like the schedule's:
//! [`Store::claim_campaign`] takes one whose lease ran out, so two processes never run one
//! campaign at once, and a process that died leaves it to another after the lease. The lease's
//! value is also the runner's token: every write of a run ([`Store::campaign_progress`],
//! [`Store::finish_campaign_run`]) names it and renews it, and does nothing once the campaign was
//! cancelled or taken over. `processed_rows` is the checkpoint: a batch's rows are counted (with
//! its bad rows) in one transaction after they were published, so a crash in between publishes
//! the batch again on resume — under the same message ids, which the send ledger absorbs.

use super::{Store, StoreError, now_ms, value_rows};
use sqlx::Row;
use sqlx::any::AnyRow;

/// Where a campaign is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CampaignState {
    /// Its file is still arriving; never run.
    Uploading,
    /// Waiting for `next_run_at`.
    Waiting,
    /// A run is in progress.
    Running,
    /// Ran once (no cron) to the end.
    Done,
    /// Cancelled: no further runs.
    Cancelled,
    /// Stopped by an error (`error`), such as its template being deleted.
    Failed,
}

impl CampaignState {
    const ALL: [CampaignState; 6] = [
        CampaignState::Uploading,
        CampaignState::Waiting,
        CampaignState::Running,
        CampaignState::Done,
        CampaignState::Cancelled,
        CampaignState::Failed,
    ];

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            CampaignState::Uploading => "uploading",
            CampaignState::Waiting => "waiting",
            CampaignState::Running => "running",
            CampaignState::Done => "done",
            CampaignState::Cancelled => "cancelled",
            CampaignState::Failed => "failed",
        }
    }
}

/// A campaign to create (in state `uploading`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCampaign {
    pub app_id: i64,
    /// The app's name, which the messages carry.
    pub app: String,
    pub template_id: i64,
    pub name: String,
    pub cron: Option<String>,
    pub timezone: Option<String>,
    /// The CSV header.
    pub columns: Vec<String>,
    /// When the first run starts (unix ms).
    pub first_run_at: i64,
}

/// A campaign and the counts of its current (or last) run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Campaign {
    pub id: i64,
    pub app_id: i64,
    pub app: String,
    pub template_id: i64,
    pub name: String,
    pub cron: Option<String>,
    pub timezone: Option<String>,
    pub columns: Vec<String>,
    pub state: CampaignState,
    pub error: Option<String>,
    pub total_rows: i64,
    /// Runs started; the current or last one is run number `runs`.
    pub runs: i64,
    /// Rows of the current run done so far: its checkpoint.
    pub processed_rows: i64,
    pub accepted: i64,
    pub bad_rows: i64,
    /// When the current run started (unix ms).
    pub run_started_at: Option<i64>,
    /// When the next run starts (unix ms); `None` when none will.
    pub next_run_at: Option<i64>,
    /// The lease of the process running it (unix ms; 0 when none holds it).
    pub lease: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A piece of a campaign's file: whole rows, starting at data row `first_row` (from 0), which
/// is on line `first_line` of the file (from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignChunk {
    pub seq: i64,
    pub first_row: i64,
    pub first_line: i64,
    pub data: Vec<u8>,
}

/// A row that was not sent, by its line in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    pub line: i64,
    pub receiver: String,
    pub reason: String,
}

/// A finished run and its counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignRun {
    pub run: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub processed_rows: i64,
    pub accepted: i64,
    pub bad_rows: i64,
}

/// One batch of a run: `rows` rows done, `accepted` of them published, the bad ones (those to
/// keep) listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CampaignBatch {
    pub rows: i64,
    pub accepted: i64,
    pub bad_rows: i64,
    pub bad: Vec<BadRow>,
}

/// How many runs keep their bad rows and counts.
const RUNS_KEPT: i64 = 10;

const COLUMNS: &str = "id, app_id, app, template_id, name, cron, timezone, columns, state, error, \
     total_rows, runs, processed_rows, accepted, bad_rows, run_started_at, next_run_at, \
     claimed_until, created_at, updated_at";

impl Store {
    /// Creates a campaign in state `uploading`, to which the file's chunks are then added.
    pub async fn create_campaign(&self, c: &NewCampaign) -> Result<Campaign, StoreError> {
        let now = now_ms();
        let columns =
            serde_json::to_string(&c.columns).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let sql = format!(
            "INSERT INTO campaigns (app_id, app, template_id, name, cron, timezone, columns, \
             state, next_run_at, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'uploading', $8, $9, $9) RETURNING {COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(c.app_id)
            .bind(&c.app)
            .bind(c.template_id)
            .bind(&c.name)
            .bind(c.cron.as_deref())
            .bind(c.timezone.as_deref())
            .bind(columns)
            .bind(c.first_run_at)
            .bind(now)
            .fetch_one(&self.writer)
            .await?;
        campaign_of(&row)
    }

    /// Stores the next piece of an uploading campaign's file.
    pub async fn add_campaign_chunk(
        &self,
        campaign: i64,
        chunk: &CampaignChunk,
    ) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        let uploading = sqlx::query(
            "UPDATE campaigns SET updated_at = $1 WHERE id = $2 AND state = 'uploading'",
        )
        .bind(now_ms())
        .bind(campaign)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if uploading == 0 {
            return Err(StoreError::NotFound);
        }
        sqlx::query(
            "INSERT INTO campaign_chunks (campaign_id, seq, first_row, first_line, data) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(campaign)
        .bind(chunk.seq)
        .bind(chunk.first_row)
        .bind(chunk.first_line)
        .bind(chunk.data.as_slice())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Ends an upload: the campaign, with `total_rows` rows, waits for its first run.
    pub async fn finish_campaign_upload(
        &self,
        campaign: i64,
        total_rows: i64,
    ) -> Result<Campaign, StoreError> {
        let sql = format!(
            "UPDATE campaigns SET state = 'waiting', total_rows = $1, updated_at = $2 \
             WHERE id = $3 AND state = 'uploading' RETURNING {COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(total_rows)
            .bind(now_ms())
            .bind(campaign)
            .fetch_optional(&self.writer)
            .await?
            .ok_or(StoreError::NotFound)?;
        campaign_of(&row)
    }

    /// Deletes campaigns still `uploading` that were last written before `idle_since` (unix ms):
    /// uploads that failed or whose process died. Returns how many went.
    pub async fn delete_stale_uploads(&self, idle_since: i64) -> Result<u64, StoreError> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM campaigns WHERE state = 'uploading' AND updated_at < $1",
        )
        .bind(idle_since)
        .fetch_all(&self.pool)
        .await?;
        for &id in &ids {
            self.delete_upload(id).await?;
        }
        Ok(ids.len() as u64)
    }

    /// Deletes a campaign still `uploading` and its chunks (an upload that failed).
    pub async fn delete_upload(&self, campaign: i64) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        // Marking it first locks the row: an upload finishing meanwhile finds it gone.
        let marked = sqlx::query(
            "UPDATE campaigns SET state = 'failed' WHERE id = $1 AND state = 'uploading'",
        )
        .bind(campaign)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if marked > 0 {
            delete_chunks(&mut tx, campaign).await?;
            sqlx::query("DELETE FROM campaigns WHERE id = $1")
                .bind(campaign)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Campaign `id` of app `app_id`.
    pub async fn campaign(&self, app_id: i64, id: i64) -> Result<Campaign, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM campaigns WHERE app_id = $1 AND id = $2");
        let row = sqlx::query(&sql)
            .bind(app_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        campaign_of(&row)
    }

    /// App `app_id`'s campaigns, newest first, at most `limit`.
    pub async fn campaigns(&self, app_id: i64, limit: i64) -> Result<Vec<Campaign>, StoreError> {
        let sql =
            format!("SELECT {COLUMNS} FROM campaigns WHERE app_id = $1 ORDER BY id DESC LIMIT $2");
        let rows = sqlx::query(&sql)
            .bind(app_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(campaign_of).collect()
    }

    /// The first `limit` bad rows kept of run `run`, by line.
    pub async fn campaign_bad_rows(
        &self,
        campaign: i64,
        run: i64,
        limit: i64,
    ) -> Result<Vec<BadRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT line, receiver, reason FROM campaign_bad_rows \
             WHERE campaign_id = $1 AND run = $2 ORDER BY line LIMIT $3",
        )
        .bind(campaign)
        .bind(run)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| BadRow {
                line: r.get(0),
                receiver: r.get(1),
                reason: r.get(2),
            })
            .collect())
    }

    /// The campaign's finished runs (the last ten), newest first.
    pub async fn campaign_runs(&self, campaign: i64) -> Result<Vec<CampaignRun>, StoreError> {
        let rows = sqlx::query(
            "SELECT run, started_at, finished_at, processed_rows, accepted, bad_rows \
             FROM campaign_runs WHERE campaign_id = $1 ORDER BY run DESC",
        )
        .bind(campaign)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| CampaignRun {
                run: r.get(0),
                started_at: r.get(1),
                finished_at: r.get(2),
                processed_rows: r.get(3),
                accepted: r.get(4),
                bad_rows: r.get(5),
            })
            .collect())
    }

    /// Cancels a waiting or running campaign of app `app_id`: no further runs, and a run in
    /// progress stops at its next batch; its file is deleted. Cancelling a cancelled campaign
    /// changes nothing; a finished or failed one is a `Conflict`.
    pub async fn cancel_campaign(&self, app_id: i64, id: i64) -> Result<Campaign, StoreError> {
        let mut tx = self.writer.begin().await?;
        let sql = format!(
            "UPDATE campaigns SET state = 'cancelled', next_run_at = NULL, claimed_until = 0, \
             updated_at = $1 WHERE app_id = $2 AND id = $3 AND state IN ('waiting', 'running') \
             RETURNING {COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(now_ms())
            .bind(app_id)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            drop(tx);
            let c = self.campaign(app_id, id).await?;
            return match c.state {
                CampaignState::Cancelled => Ok(c),
                s => Err(StoreError::Conflict(format!(
                    "the campaign is {}",
                    s.as_str()
                ))),
            };
        };
        delete_chunks(&mut tx, id).await?;
        tx.commit().await?;
        campaign_of(&row)
    }

    /// Leases one due campaign until `lease_until` (unix ms): a waiting one whose `next_run_at`
    /// has come (its next run starts: `runs` goes up, the counts start from 0), or a running one
    /// whose runner's lease ran out (its run resumes from `processed_rows`).
    pub async fn claim_campaign(&self, lease_until: i64) -> Result<Option<Campaign>, StoreError> {
        let now = now_ms();
        let sql = format!(
            "UPDATE campaigns SET claimed_until = $1, \
             runs = CASE WHEN state = 'waiting' THEN runs + 1 ELSE runs END, \
             processed_rows = CASE WHEN state = 'waiting' THEN 0 ELSE processed_rows END, \
             accepted = CASE WHEN state = 'waiting' THEN 0 ELSE accepted END, \
             bad_rows = CASE WHEN state = 'waiting' THEN 0 ELSE bad_rows END, \
             run_started_at = CASE WHEN state = 'waiting' THEN $2 ELSE run_started_at END, \
             state = 'running', updated_at = $2 \
             WHERE claimed_until < $2 AND id IN \
             (SELECT id FROM campaigns WHERE next_run_at <= $2 AND claimed_until < $2 \
              AND state IN ('waiting', 'running') ORDER BY next_run_at LIMIT 1) \
             RETURNING {COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(lease_until)
            .bind(now)
            .fetch_optional(&self.writer)
            .await?;
        let Some(c) = row.as_ref().map(campaign_of).transpose()? else {
            return Ok(None);
        };
        // Runs older than the last RUNS_KEPT leave their bad rows and counts behind.
        for table in ["campaign_bad_rows", "campaign_runs"] {
            sqlx::query(&format!(
                "DELETE FROM {table} WHERE campaign_id = $1 AND run <= $2"
            ))
            .bind(c.id)
            .bind(c.runs - RUNS_KEPT)
            .execute(&self.writer)
            .await?;
        }
        Ok(Some(c))
    }

    /// The piece of the campaign's file that holds data row `row` (from 0); `None` past the end.
    pub async fn campaign_chunk_with_row(
        &self,
        campaign: i64,
        row: i64,
    ) -> Result<Option<CampaignChunk>, StoreError> {
        let found = sqlx::query(
            "SELECT seq, first_row, first_line, data FROM campaign_chunks \
             WHERE campaign_id = $1 AND first_row <= $2 ORDER BY seq DESC LIMIT 1",
        )
        .bind(campaign)
        .bind(row)
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.as_ref().map(chunk_of))
    }

    /// Piece `seq` of the campaign's file; `None` past the end.
    pub async fn campaign_chunk(
        &self,
        campaign: i64,
        seq: i64,
    ) -> Result<Option<CampaignChunk>, StoreError> {
        let found = sqlx::query(
            "SELECT seq, first_row, first_line, data FROM campaign_chunks \
             WHERE campaign_id = $1 AND seq = $2",
        )
        .bind(campaign)
        .bind(seq)
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.as_ref().map(chunk_of))
    }

    /// Counts a batch of run `run`, keeps its bad rows and renews the lease from `lease` to
    /// `new_lease`, in one transaction. `false` (and nothing written) when the runner no longer
    /// holds the campaign: it was cancelled, or its lease ran out and another took it.
    pub async fn campaign_progress(
        &self,
        campaign: i64,
        run: i64,
        lease: i64,
        new_lease: i64,
        batch: &CampaignBatch,
    ) -> Result<bool, StoreError> {
        let mut tx = self.writer.begin().await?;
        let held = sqlx::query(
            "UPDATE campaigns SET processed_rows = processed_rows + $1, accepted = accepted + $2, \
             bad_rows = bad_rows + $3, claimed_until = $4, updated_at = $5 \
             WHERE id = $6 AND claimed_until = $7 AND state = 'running' AND runs = $8",
        )
        .bind(batch.rows)
        .bind(batch.accepted)
        .bind(batch.bad_rows)
        .bind(new_lease)
        .bind(now_ms())
        .bind(campaign)
        .bind(lease)
        .bind(run)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if held == 0 {
            return Ok(false);
        }
        for rows in batch.bad.chunks(self.rows_per_statement(5)) {
            let sql = self.bindable(format!(
                "INSERT INTO campaign_bad_rows (campaign_id, run, line, receiver, reason) \
                 VALUES {} ON CONFLICT DO NOTHING",
                value_rows(rows.len(), 5)
            ));
            let mut q = sqlx::query(&sql);
            for b in rows {
                q = q
                    .bind(campaign)
                    .bind(run)
                    .bind(b.line)
                    .bind(&b.receiver)
                    .bind(&b.reason);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Ends run `run` under `lease`: the campaign waits for `next_run_at` (unix ms), or with
    /// `None` is done and its file deleted; the run's counts are kept. `false` when the runner
    /// no longer holds the campaign.
    pub async fn finish_campaign_run(
        &self,
        campaign: i64,
        run: i64,
        lease: i64,
        next_run_at: Option<i64>,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        let state = if next_run_at.is_some() {
            CampaignState::Waiting
        } else {
            CampaignState::Done
        };
        let held = sqlx::query(
            "UPDATE campaigns SET state = $1, next_run_at = $2, claimed_until = 0, updated_at = $3 \
             WHERE id = $4 AND claimed_until = $5 AND state = 'running' AND runs = $6 \
             RETURNING run_started_at, processed_rows, accepted, bad_rows",
        )
        .bind(state.as_str())
        .bind(next_run_at)
        .bind(now)
        .bind(campaign)
        .bind(lease)
        .bind(run)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(r) = held else {
            return Ok(false);
        };
        sqlx::query(
            "INSERT INTO campaign_runs (campaign_id, run, started_at, finished_at, \
             processed_rows, accepted, bad_rows) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT DO NOTHING",
        )
        .bind(campaign)
        .bind(run)
        .bind(r.get::<Option<i64>, _>(0).unwrap_or(now))
        .bind(now)
        .bind(r.get::<i64, _>(1))
        .bind(r.get::<i64, _>(2))
        .bind(r.get::<i64, _>(3))
        .execute(&mut *tx)
        .await?;
        if next_run_at.is_none() {
            delete_chunks(&mut tx, campaign).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Stops the campaign held under `lease` for good with `error`, and deletes its file.
    /// `false` when the runner no longer holds it.
    pub async fn fail_campaign(
        &self,
        campaign: i64,
        lease: i64,
        error: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.writer.begin().await?;
        let held = sqlx::query(
            "UPDATE campaigns SET state = 'failed', error = $1, next_run_at = NULL, \
             claimed_until = 0, updated_at = $2 \
             WHERE id = $3 AND claimed_until = $4 AND state = 'running'",
        )
        .bind(error)
        .bind(now_ms())
        .bind(campaign)
        .bind(lease)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if held == 0 {
            return Ok(false);
        }
        delete_chunks(&mut tx, campaign).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Gives up the lease on a running campaign (at shutdown), so another process resumes it at
    /// once instead of after the lease.
    pub async fn release_campaign(&self, campaign: i64, lease: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE campaigns SET claimed_until = 0 WHERE id = $1 AND claimed_until = $2 \
             AND state = 'running'",
        )
        .bind(campaign)
        .bind(lease)
        .execute(&self.writer)
        .await?;
        Ok(())
    }
}

async fn delete_chunks(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    campaign: i64,
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM campaign_chunks WHERE campaign_id = $1")
        .bind(campaign)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn chunk_of(r: &AnyRow) -> CampaignChunk {
    CampaignChunk {
        seq: r.get(0),
        first_row: r.get(1),
        first_line: r.get(2),
        data: r.get(3),
    }
}

fn campaign_of(r: &AnyRow) -> Result<Campaign, StoreError> {
    let columns: Vec<String> = serde_json::from_str(r.get(7))
        .map_err(|e| StoreError::Corrupt(format!("campaign columns: {e}")))?;
    let state: &str = r.get(8);
    Ok(Campaign {
        id: r.get(0),
        app_id: r.get(1),
        app: r.get(2),
        template_id: r.get(3),
        name: r.get(4),
        cron: r.get(5),
        timezone: r.get(6),
        columns,
        state: CampaignState::ALL
            .into_iter()
            .find(|s| s.as_str() == state)
            .ok_or_else(|| StoreError::Corrupt(format!("campaign state {state:?}")))?,
        error: r.get(9),
        total_rows: r.get(10),
        runs: r.get(11),
        processed_rows: r.get(12),
        accepted: r.get(13),
        bad_rows: r.get(14),
        run_started_at: r.get(15),
        next_run_at: r.get(16),
        lease: r.get(17),
        created_at: r.get(18),
        updated_at: r.get(19),
    })
}

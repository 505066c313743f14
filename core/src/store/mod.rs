//! The store (sqlx): apps, API keys and the audit log, channel accounts, templates, idempotency
//! keys, the send ledger, the per-message event index behind the trace API (with each message's
//! current state behind the tracing endpoints), the inbox, and vendor state (access tokens,
//! vendor message ids for receipts), and the state behind pipeline policies (policy documents,
//! receiver lists, the schedule, dedup and frequency counters).
//!
//! One implementation serves SQLite (the embedded deployment) and PostgreSQL (the distributed
//! one) through sqlx's `Any` driver: every statement is written once in the SQL both accept
//! (`$n` placeholders, `ON CONFLICT`, `RETURNING`), and each backend has its own migrations in
//! `sql/migrations/{sqlite,postgres}/`. The suite in `tests.rs` runs against both.

mod announce;
mod audit;
mod campaigns;
mod catalog;
mod events;
mod idempotency;
mod inbox;
mod keys;
mod ledger;
mod policy;
mod rates;
mod retention;
mod signing;
mod traces;
mod vendors;

#[cfg(test)]
mod tests;

pub use announce::{Change, Changes};
pub use audit::{Audit, AuditEntry};
pub use campaigns::{
    BadRow, Campaign, CampaignBatch, CampaignChunk, CampaignRun, CampaignState, NewCampaign,
};
pub use catalog::{Account, App, NewTemplate, Template};
pub use idempotency::Claim;
pub use inbox::InboxEntry;
pub use keys::{ApiKey, NewKey, Scope, Scopes, hash_key};
pub use ledger::{LedgerState, SentInbox};
pub use policy::{
    ClaimOutcome, Limit, ListName, MessageClaim, Redrive, ScheduleKind, ScheduledMessage,
};
pub use rates::{ReceiverSlot, Reservation};
pub use traces::{MessageSummary, TemplateStates};
pub use vendors::PendingReceipt;

use crate::secrets::{SecretBox, SecretError};
use crate::wire::RecordSigner;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Connection, Executor};
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Secret(String),
    #[error("unsupported store URL `{0}` (expected sqlite://PATH or postgres://...)")]
    UnsupportedUrl(String),
}

impl StoreError {
    /// Whether the database is out of reach or out of room for now (so the caller should answer
    /// `503` and be retried), not refusing this request: the pool timed out, the connection
    /// broke, PostgreSQL is shutting down, starting, out of resources or connections (SQLSTATE
    /// classes `08`, `53`, `57P`), SQLite is busy, locked, full or failing I/O.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Db(
                sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::WorkerCrashed,
            ) => true,
            StoreError::Db(sqlx::Error::Database(d)) => {
                let code = d.code().unwrap_or_default();
                // SQLite's primary result codes: 5 busy, 6 locked, 10 I/O error, 13 full,
                // 14 cannot open (extended codes keep the primary one in the low byte).
                let sqlite = code
                    .parse::<i64>()
                    .is_ok_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 13 | 14));
                sqlite
                    || code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("57P")
            }
            _ => false,
        }
    }
}

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a store URL names.
    pub fn of_url(url: &str) -> Result<Backend, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::UnsupportedUrl(redact(url)))
        }
    }
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// Reads (and, on PostgreSQL, writes too).
    pool: AnyPool,
    /// Writes: on SQLite a pool of one connection, so that the process's writers queue here
    /// instead of in SQLite's busy handler (which sleeps up to 100 ms at a time and leaves the
    /// one write lock idle meanwhile); on PostgreSQL the same pool as `pool`.
    writer: AnyPool,
    backend: Backend,
    /// Seals account configs and vendor tokens; without it they are written in clear.
    secrets: Option<Arc<SecretBox>>,
    /// The URL it was opened with (for a listening connection of its own).
    url: Arc<str>,
    /// The record signer, once loaded (see [`Store::record_signer`]).
    signer: Arc<tokio::sync::OnceCell<RecordSigner>>,
    /// Held by every clone; SQLite's checkpointer stops once the last is dropped.
    _alive: Arc<()>,
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Bound values per SQLite statement (see [`Store::rows_per_statement`]).
const SQLITE_PARAMS_PER_STATEMENT: usize = 2048;

/// Settings of every SQLite connection: WAL with `synchronous = NORMAL` (a committed transaction
/// survives a killed process; only a power cut can lose the last commits), a busy timeout so
/// writers of other processes queue instead of failing, and enforced foreign keys. Commits do
/// not checkpoint the WAL themselves (`wal_autocheckpoint = 0`): a checkpoint copies every page
/// written since the last one back into the database file, and run by the committing writer it
/// held the one write lock for it (a third of the end-to-end run's write time); the store's
/// checkpointer does most of it beside the writer instead (see [`checkpoint_in_background`]).
const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
     PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; \
     PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 67108864;";

/// How often the checkpointer copies the WAL back into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);

/// WAL frames (pages) beyond which the checkpointer also restarts the WAL (64 MiB of 4 KiB
/// pages).
const WAL_RESTART_FRAMES: i64 = 16_384;

/// Copies the WAL of the database into the database file every [`CHECKPOINT_INTERVAL`] until
/// `alive` has no strong reference left (every clone of the store is gone). The copies are
/// passive checkpoints on a reading connection: they copy what no reader still needs without
/// waiting for readers or the writer, which goes on meanwhile. A WAL only starts again from its
/// beginning when a write begins after a complete checkpoint, which a steady writer never lets
/// happen; so once the WAL holds [`WAL_RESTART_FRAMES`], the checkpointer takes the `writer`
/// connection and restarts it there (copying what the last pass left, after the readers of
/// older pages finish; `journal_size_limit` trims the file). A failed checkpoint (a full disk)
/// is tried again at the next tick.
fn checkpoint_in_background(pool: AnyPool, writer: AnyPool, alive: std::sync::Weak<()>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if alive.strong_count() == 0 {
                break;
            }
            if let Err(e) = checkpoint(&pool, &writer).await {
                tracing::debug!(error = %e, "WAL checkpoint failed; trying again");
            }
        }
    });
}

/// One pass of the checkpointer (see [`checkpoint_in_background`]).
async fn checkpoint(pool: &AnyPool, writer: &AnyPool) -> Result<(), sqlx::Error> {
    // (busy, frames in the WAL, frames copied)
    let (_, frames, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(pool)
        .await?;
    if frames >= WAL_RESTART_FRAMES {
        let mut conn = writer.acquire().await?;
        sqlx::query("PRAGMA wal_checkpoint(RESTART)")
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The options of a SQLite pool of at most `connections` connections, each caching up to
/// `cache_kib` of the database's pages.
fn sqlite_pool(connections: u32, cache_kib: u32) -> AnyPoolOptions {
    AnyPoolOptions::new()
        .max_connections(connections)
        // As long as SQLite's own busy timeout: a writer waits this long for its turn.
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                conn.execute(SQLITE_PRAGMAS).await?;
                conn.execute(format!("PRAGMA cache_size = -{cache_kib}").as_str())
                    .await?;
                Ok(())
            })
        })
        // SQLite rolls a transaction back by itself when the disk is full or I/O
        // fails; sqlx (0.8) then still counts it open, as the ROLLBACK it sends on
        // drop fails. The connection's next transactions would be savepoints in one
        // that never commits: writes that look committed, seen by no other
        // connection, lost at exit. Such a connection is closed instead of reused
        // (the ping first lets a queued rollback run). A connection that counts no
        // transaction goes back to the pool without the ping's round trip to its
        // worker thread: a queued rollback can only lower the count.
        .after_release(|conn, _| {
            Box::pin(async move {
                if !conn.is_in_transaction() {
                    return Ok(true);
                }
                conn.ping().await?;
                Ok(!conn.is_in_transaction())
            })
        })
}

impl Store {
    /// Opens the database at `url` and runs its migrations: `sqlite://PATH` (created if
    /// missing) or `postgres://USER@HOST:PORT/DB`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        install_default_drivers();
        let backend = Backend::of_url(url)?;
        let (pool, writer) = match backend {
            Backend::Sqlite => {
                let url = if url.contains('?') {
                    url.to_string()
                } else {
                    format!("{url}?mode=rwc")
                };
                // The writer's cache holds the pages that random-key upserts (dedup keys, cap
                // counters) touch; readers mostly read recent rows.
                let writer = sqlite_pool(1, 32_768).connect(&url).await?;
                (sqlite_pool(4, 4_000).connect(&url).await?, writer)
            }
            Backend::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await?;
                (pool.clone(), pool)
            }
        };
        match backend {
            Backend::Sqlite => {
                sqlx::migrate!("../sql/migrations/sqlite")
                    .run(&writer)
                    .await?
            }
            Backend::Postgres => {
                sqlx::migrate!("../sql/migrations/postgres")
                    .run(&writer)
                    .await?
            }
        }
        let alive = Arc::new(());
        if backend == Backend::Sqlite {
            checkpoint_in_background(pool.clone(), writer.clone(), Arc::downgrade(&alive));
        }
        Ok(Store {
            pool,
            writer,
            backend,
            secrets: None,
            url: url.into(),
            signer: Arc::default(),
            _alive: alive,
        })
    }

    /// This store, sealing account configs and vendor tokens with `secrets` from now on.
    pub fn with_secrets(mut self, secrets: Arc<SecretBox>) -> Store {
        self.secrets = Some(secrets);
        self
    }

    /// Seals a secret value of use `kind` for storing (in clear without a key ring).
    pub(crate) fn seal(&self, kind: &str, plain: &str) -> String {
        match &self.secrets {
            Some(s) => s.seal(kind, plain),
            None => plain.to_string(),
        }
    }

    /// Opens a stored secret value of use `kind`.
    pub(crate) fn unseal(&self, kind: &str, stored: &str) -> Result<String, StoreError> {
        match &self.secrets {
            Some(s) => s
                .open(kind, stored)
                .map_err(|e| StoreError::Secret(e.to_string())),
            None if crate::secrets::is_sealed(stored) => {
                Err(StoreError::Secret(SecretError::NoKey.to_string()))
            }
            None => Ok(stored.to_string()),
        }
    }

    /// Which database this store runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// How many rows of `params` bound values each to put in one multi-row statement. SQLite
    /// (through sqlx) resolves each `$n` by a linear search of the statement's parameter names,
    /// so binding costs grow with the square of a statement's parameters (1,000 rows of six
    /// values made dispatch three times slower than ~250 values per statement) unless the
    /// statement went through [`bindable`], as every multi-row statement of the store does; the
    /// cap stays for any that does not. PostgreSQL binds by position.
    pub(crate) fn rows_per_statement(&self, params: usize) -> usize {
        match self.backend {
            Backend::Sqlite => (SQLITE_PARAMS_PER_STATEMENT / params.max(1)).max(1),
            Backend::Postgres => 1000,
        }
    }

    /// `sql` (a multi-row statement) as this backend binds it fastest; see [`bindable`].
    pub(crate) fn bindable(&self, sql: String) -> String {
        bindable(self.backend, sql)
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// `$first, $first+1, ...`: `n` numbered placeholders, the syntax SQLite and PostgreSQL share.
pub(crate) fn placeholders(first: usize, n: usize) -> String {
    let mut out = String::with_capacity(n * 5);
    for i in 0..n {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "${}", first + i);
    }
    out
}

/// `($1, $2), ($3, $4), ...`: the VALUES rows of a multi-row statement of `rows` rows of `cols`
/// columns.
pub(crate) fn value_rows(rows: usize, cols: usize) -> String {
    let mut out = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        out.push_str(&placeholders(r * cols + 1, cols));
        out.push(')');
    }
    out
}

/// `sql` as `backend` binds it fastest. On SQLite, sqlx looks up every `$n` by name, and SQLite
/// finds a parameter's name by a linear search of the statement's names: binding a statement of
/// P parameters costs P²/2 steps (at 256 parameters this was a third of the SQLite thread's
/// time in the policies benchmark). Anonymous `?` parameters have no name to search, so a
/// statement whose parameters are `$1, $2, …` in order, each used once, gets `?` for them; any
/// other statement (and every PostgreSQL one) is left as it is.
pub(crate) fn bindable(backend: Backend, sql: String) -> String {
    if backend != Backend::Sqlite {
        return sql;
    }
    let mut out = String::with_capacity(sql.len());
    let mut expected = 1u64;
    let mut rest = sql.as_str();
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let digits = rest[at + 1..]
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        match rest[at + 1..at + 1 + digits].parse::<u64>() {
            Ok(n) if n == expected => {
                out.push('?');
                expected += 1;
            }
            _ => return sql,
        }
        rest = &rest[at + 1 + digits..];
    }
    out.push_str(rest);
    out
}

/// A store URL without its password, for error messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

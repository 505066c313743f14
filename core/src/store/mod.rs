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
pub use rates::Reservation;
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
    pool: AnyPool,
    backend: Backend,
    /// Seals account configs and vendor tokens; without it they are written in clear.
    secrets: Option<Arc<SecretBox>>,
    /// The URL it was opened with (for a listening connection of its own).
    url: Arc<str>,
    /// The record signer, once loaded (see [`Store::record_signer`]).
    signer: Arc<tokio::sync::OnceCell<RecordSigner>>,
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Bound values per SQLite statement (see [`Store::rows_per_statement`]).
const SQLITE_PARAMS_PER_STATEMENT: usize = 2048;

/// Settings of every SQLite connection: WAL with `synchronous = NORMAL` (a committed transaction
/// survives a killed process; only a power cut can lose the last commits), a busy timeout so
/// writers queue instead of failing, and enforced foreign keys.
const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
     PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; PRAGMA cache_size = -4000;";

impl Store {
    /// Opens the database at `url` and runs its migrations: `sqlite://PATH` (created if
    /// missing) or `postgres://USER@HOST:PORT/DB`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        install_default_drivers();
        let backend = Backend::of_url(url)?;
        let pool = match backend {
            Backend::Sqlite => {
                let url = if url.contains('?') {
                    url.to_string()
                } else {
                    format!("{url}?mode=rwc")
                };
                AnyPoolOptions::new()
                    .max_connections(4)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute(SQLITE_PRAGMAS).await?;
                            Ok(())
                        })
                    })
                    // SQLite rolls a transaction back by itself when the disk is full or I/O
                    // fails; sqlx (0.8) then still counts it open, as the ROLLBACK it sends on
                    // drop fails. The connection's next transactions would be savepoints in one
                    // that never commits: writes that look committed, seen by no other
                    // connection, lost at exit. Such a connection is closed instead of reused
                    // (the ping first lets a queued rollback run).
                    .after_release(|conn, _| {
                        Box::pin(async move {
                            conn.ping().await?;
                            Ok(!conn.is_in_transaction())
                        })
                    })
                    .connect(&url)
                    .await?
            }
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await?
            }
        };
        match backend {
            Backend::Sqlite => {
                sqlx::migrate!("../sql/migrations/sqlite")
                    .run(&pool)
                    .await?
            }
            Backend::Postgres => {
                sqlx::migrate!("../sql/migrations/postgres")
                    .run(&pool)
                    .await?
            }
        }
        Ok(Store {
            pool,
            backend,
            secrets: None,
            url: url.into(),
            signer: Arc::default(),
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

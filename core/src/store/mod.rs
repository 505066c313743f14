//! The store (sqlx over SQLite): apps and API keys, channel accounts, templates, idempotency
//! keys, the send ledger, the per-message event index behind the trace API, the inbox, and
//! vendor state (access tokens, vendor message ids for receipts).
//! Migrations live in `sql/migrations/sqlite/`.

mod catalog;
mod events;
mod idempotency;
mod inbox;
mod ledger;
mod vendors;

pub use catalog::{Account, App, NewTemplate, Template, hash_key};
pub use idempotency::Claim;
pub use inbox::InboxEntry;
pub use ledger::{LedgerState, SentInbox};
pub use vendors::PendingReceipt;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::str::FromStr;
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
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Store {
    /// Opens (creating if needed) the database at `url` (`sqlite://path`) and runs migrations.
    ///
    /// WAL mode with `synchronous = NORMAL`: a committed transaction survives a killed process;
    /// only a power cut can lose the last commits (see the README's durability notes).
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            .pragma("cache_size", "-4000");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("../sql/migrations/sqlite")
            .run(&pool)
            .await?;
        Ok(Store { pool })
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

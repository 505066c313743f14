//! Rate limits of vendor accounts across every dispatch worker, by the generic cell rate
//! algorithm: an account's timeline is reserved up to `next_at`, and a worker takes `count`
//! slots by moving it `count × interval` forward in one statement, which PostgreSQL and SQLite
//! serialise. Time left unused longer than the burst allowance is not given back.

use super::{Backend, Store, StoreError};
use sqlx::Row;

/// What a reservation got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// The slots, one every interval, the first at this time (unix µs).
    Granted { first_us: i64 },
    /// The timeline is reserved up to this time (unix µs), further ahead than allowed.
    Busy { next_us: i64 },
}

/// Which timelines a reservation is on.
#[derive(Clone, Copy)]
enum Timeline {
    Account,
    Receiver,
}

impl Timeline {
    /// Its table and key column.
    fn table(self) -> (&'static str, &'static str) {
        match self {
            Timeline::Account => ("rate_limits", "account_id"),
            Timeline::Receiver => ("receiver_rates", "receiver_key"),
        }
    }
}

/// What a reservation asks for.
#[derive(Clone, Copy)]
struct Slots {
    count: u32,
    interval_us: i64,
    now_us: i64,
    horizon_us: i64,
    burst_us: i64,
}

impl Store {
    /// How far `account`'s timeline is reserved (unix µs), once it was ever used.
    pub async fn rate_reserved_until(&self, account: i64) -> Result<Option<i64>, StoreError> {
        self.reserved_until(Timeline::Account, account).await
    }

    /// How far the timeline `key` is reserved (unix µs), once it was ever used.
    async fn reserved_until(
        &self,
        timeline: Timeline,
        key: i64,
    ) -> Result<Option<i64>, StoreError> {
        let (table, column) = timeline.table();
        let row = sqlx::query(&format!("SELECT next_at FROM {table} WHERE {column} = $1"))
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Reserves `count` slots `interval_us` apart on `account`'s timeline, unless it is
    /// reserved beyond `now_us + horizon_us`; the slots start no earlier than
    /// `now_us - burst_us`.
    pub async fn reserve_rate(
        &self,
        account: i64,
        count: u32,
        interval_us: i64,
        now_us: i64,
        horizon_us: i64,
        burst_us: i64,
    ) -> Result<Reservation, StoreError> {
        let slots = Slots {
            count,
            interval_us,
            now_us,
            horizon_us,
            burst_us,
        };
        self.reserve(Timeline::Account, account, slots).await
    }

    /// Reserves one slot on a receiver's timeline (`key`: a digest naming app, limit, channel
    /// and receiver) if it is free now: at most one message per `interval_us`, after a burst
    /// of `burst_us` worth.
    pub async fn reserve_receiver_slot(
        &self,
        key: i64,
        interval_us: i64,
        now_us: i64,
        burst_us: i64,
    ) -> Result<Reservation, StoreError> {
        let slots = Slots {
            count: 1,
            interval_us,
            now_us,
            horizon_us: 0,
            burst_us,
        };
        self.reserve(Timeline::Receiver, key, slots).await
    }

    /// Forgets receiver timelines that ended more than a day ago (as good as absent for every
    /// limit, whose periods are at most a day).
    pub async fn prune_receiver_rates(&self, now_us: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM receiver_rates WHERE next_at < $1")
            .bind(now_us - 86_400_000_000)
            .execute(&self.writer)
            .await?
            .rows_affected())
    }

    async fn reserve(
        &self,
        timeline: Timeline,
        key: i64,
        slots: Slots,
    ) -> Result<Reservation, StoreError> {
        let Slots {
            count,
            interval_us,
            now_us,
            horizon_us,
            burst_us,
        } = slots;
        let (table, column) = timeline.table();
        let greatest = match self.backend {
            Backend::Sqlite => "MAX",
            Backend::Postgres => "GREATEST",
        };
        let span = i64::from(count) * interval_us;
        let sql = format!(
            "UPDATE {table} SET next_at = {greatest}(next_at, $2) + $3 \
             WHERE {column} = $1 AND next_at <= $4 RETURNING next_at"
        );
        // A few rounds: a row created or moved by another worker between the UPDATE and the
        // SELECT sends this one round again; `next_at` only grows, so it ends.
        let mut next_us = 0;
        for _ in 0..5 {
            let granted = sqlx::query(&sql)
                .bind(key)
                .bind(now_us - burst_us)
                .bind(span)
                .bind(now_us + horizon_us)
                .fetch_optional(&self.writer)
                .await?;
            if let Some(row) = granted {
                let next: i64 = row.get(0);
                return Ok(Reservation::Granted {
                    first_us: next - span,
                });
            }
            match self.reserved_until(timeline, key).await? {
                Some(next) if next > now_us + horizon_us => {
                    return Ok(Reservation::Busy { next_us: next });
                }
                Some(next) => next_us = next,
                None => {
                    sqlx::query(&format!(
                        "INSERT INTO {table} ({column}, next_at) VALUES ($1, 0) \
                         ON CONFLICT ({column}) DO NOTHING"
                    ))
                    .bind(key)
                    .execute(&self.writer)
                    .await?;
                }
            }
        }
        Ok(Reservation::Busy { next_us })
    }
}

//! Rate limits across every dispatch worker, by the generic cell rate algorithm: a timeline (a
//! vendor account's, or a receiver's under one of an app's receiver limits) is reserved up to
//! `next_at`, and a worker takes `count` slots by moving it `count × interval` forward in one
//! statement, which PostgreSQL and SQLite serialise. Time left unused longer than the burst
//! allowance is not given back.

use super::{Backend, Store, StoreError, placeholders, value_rows};
use sqlx::Row;
use std::collections::{BTreeMap, HashMap};

/// What a reservation got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// The slots, one every interval, the first at this time (unix µs).
    Granted { first_us: i64 },
    /// The timeline is reserved up to this time (unix µs), further ahead than allowed.
    Busy { next_us: i64 },
}

/// One slot on a receiver's timeline, as [`Store::reserve_receiver_slots`] asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverSlot {
    /// The timeline: a digest naming app, limit, channel and receiver.
    pub key: i64,
    /// At most one message per this much time (µs)…
    pub interval_us: i64,
    /// …after a burst of this much (µs).
    pub burst_us: i64,
}

impl Store {
    /// How far `account`'s timeline is reserved (unix µs), once it was ever used.
    pub async fn rate_reserved_until(&self, account: i64) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query("SELECT next_at FROM rate_limits WHERE account_id = $1")
            .bind(account)
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
        let span = i64::from(count) * interval_us;
        let sql = format!(
            "UPDATE rate_limits SET next_at = {}(next_at, $2) + $3 \
             WHERE account_id = $1 AND next_at <= $4 RETURNING next_at",
            self.greatest()
        );
        // A few rounds: a row created or moved by another worker between the UPDATE and the
        // SELECT sends this one round again; `next_at` only grows, so it ends.
        let mut next_us = 0;
        for _ in 0..5 {
            let granted = sqlx::query(&sql)
                .bind(account)
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
            match self.rate_reserved_until(account).await? {
                Some(next) if next > now_us + horizon_us => {
                    return Ok(Reservation::Busy { next_us: next });
                }
                Some(next) => next_us = next,
                None => {
                    sqlx::query(
                        "INSERT INTO rate_limits (account_id, next_at) VALUES ($1, 0) \
                         ON CONFLICT (account_id) DO NOTHING",
                    )
                    .bind(account)
                    .execute(&self.writer)
                    .await?;
                }
            }
        }
        Ok(Reservation::Busy { next_us })
    }

    /// Takes one slot on each receiver timeline of `slots` that is free at `now_us`, in one
    /// transaction, and answers in the order of `slots`; slots on one timeline are taken in
    /// their order there. A timeline never used starts with its burst. Slots go to the store in
    /// multi-row upserts, one per limit (interval and burst) and per repeat of a timeline, each
    /// in key order, so that two workers reserving at once do not deadlock (PostgreSQL).
    pub async fn reserve_receiver_slots(
        &self,
        slots: &[ReceiverSlot],
        now_us: i64,
    ) -> Result<Vec<Reservation>, StoreError> {
        // (repeat, interval, burst) → the slots of one statement; a timeline's n-th slot is in
        // the n-th repeat, so that its slots go in order and a statement moves a row once.
        let mut statements: BTreeMap<(usize, i64, i64), Vec<usize>> = BTreeMap::new();
        let mut repeats: HashMap<i64, usize> = HashMap::new();
        for (i, slot) in slots.iter().enumerate() {
            let repeat = repeats.entry(slot.key).or_default();
            statements
                .entry((*repeat, slot.interval_us, slot.burst_us))
                .or_default()
                .push(i);
            *repeat += 1;
        }
        let mut answers = vec![Reservation::Busy { next_us: 0 }; slots.len()];
        let mut tx = self.writer.begin().await?;
        for ((_, interval_us, burst_us), mut members) in statements {
            members.sort_by_key(|&i| slots[i].key);
            for chunk in members.chunks(self.rows_per_statement(2)) {
                let n = chunk.len();
                // next_at = max(next_at, now - burst) + interval, for a new row and an old one.
                let sql = self.bindable(format!(
                    "INSERT INTO receiver_rates (receiver_key, next_at) VALUES {} \
                     ON CONFLICT (receiver_key) DO UPDATE \
                     SET next_at = {}(receiver_rates.next_at + ${}, excluded.next_at) \
                     WHERE receiver_rates.next_at <= ${} RETURNING receiver_key, next_at",
                    value_rows(n, 2),
                    self.greatest(),
                    2 * n + 1,
                    2 * n + 2
                ));
                let mut upsert = sqlx::query(&sql);
                for &i in chunk {
                    upsert = upsert
                        .bind(slots[i].key)
                        .bind(now_us - burst_us + interval_us);
                }
                let granted: HashMap<i64, i64> = upsert
                    .bind(interval_us)
                    .bind(now_us)
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map(|row| (row.get(0), row.get(1)))
                    .collect();
                let busy: Vec<i64> = chunk
                    .iter()
                    .map(|&i| slots[i].key)
                    .filter(|key| !granted.contains_key(key))
                    .collect();
                let mut reserved_until = HashMap::new();
                if !busy.is_empty() {
                    let sql = self.bindable(format!(
                        "SELECT receiver_key, next_at FROM receiver_rates \
                         WHERE receiver_key IN ({})",
                        placeholders(1, busy.len())
                    ));
                    let mut select = sqlx::query(&sql);
                    for key in &busy {
                        select = select.bind(key);
                    }
                    for row in select.fetch_all(&mut *tx).await? {
                        reserved_until.insert(row.get::<i64, _>(0), row.get::<i64, _>(1));
                    }
                }
                for &i in chunk {
                    let key = slots[i].key;
                    answers[i] = match granted.get(&key) {
                        Some(next) => Reservation::Granted {
                            first_us: next - interval_us,
                        },
                        None => Reservation::Busy {
                            next_us: reserved_until.get(&key).copied().unwrap_or(now_us),
                        },
                    };
                }
            }
        }
        tx.commit().await?;
        Ok(answers)
    }

    /// The backend's two-argument maximum.
    fn greatest(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "MAX",
            Backend::Postgres => "GREATEST",
        }
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
}

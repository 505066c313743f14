//! Changes that other processes' caches must not outlive — a revoked or shortened API key, an
//! edited or deleted template — announced to every process on the store. On PostgreSQL this is
//! `NOTIFY` on the channel [`CHANNEL`] (delivered after the change committed, to every
//! listening connection); on SQLite, which one process serves, there is nothing to announce.

use super::{Backend, Store, StoreError};
use sqlx::postgres::PgListener;

/// The PostgreSQL notification channel.
pub const CHANNEL: &str = "herald_cache";

/// A change to forget cached copies of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Some API key was revoked or its expiry moved: forget every cached key.
    Keys,
    /// Template `id` of app `app` changed or was deleted.
    Template { app: i64, id: i64 },
}

impl Change {
    fn payload(self) -> String {
        match self {
            Change::Keys => "keys".into(),
            Change::Template { app, id } => format!("template:{app}:{id}"),
        }
    }

    /// The change a payload names; `None` for one this version does not know.
    fn parse(payload: &str) -> Option<Change> {
        if payload == "keys" {
            return Some(Change::Keys);
        }
        let (app, id) = payload.strip_prefix("template:")?.split_once(':')?;
        Some(Change::Template {
            app: app.parse().ok()?,
            id: id.parse().ok()?,
        })
    }
}

/// Announced changes as they arrive, on a connection of its own.
pub struct Changes {
    listener: PgListener,
}

impl Changes {
    /// The next announced change, or `None` when the connection broke: changes may have been
    /// missed, so the caller forgets everything (the next call reconnects and listens again).
    pub async fn next(&mut self) -> Option<Change> {
        loop {
            match self.listener.try_recv().await {
                Ok(Some(n)) => match Change::parse(n.payload()) {
                    Some(change) => return Some(change),
                    None => continue, // from a newer version: not ours to act on
                },
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(error = %e, "cache change listener lost");
                    return None;
                }
            }
        }
    }
}

impl Store {
    /// Tells every process on this store that `change` happened (after it committed).
    pub async fn announce(&self, change: Change) -> Result<(), StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        // Through a counted SELECT: the Any driver cannot decode pg_notify's `void`.
        sqlx::query("SELECT count(*) FROM (SELECT pg_notify($1, $2)) AS sent")
            .bind(CHANNEL)
            .bind(change.payload())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Listens for announced changes; `None` on SQLite.
    pub async fn changes(&self) -> Result<Option<Changes>, StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(None);
        }
        let mut listener = PgListener::connect(&self.url).await?;
        listener.listen(CHANNEL).await?;
        Ok(Some(Changes { listener }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_unknown_ones_are_ignored() {
        for c in [Change::Keys, Change::Template { app: 3, id: 42 }] {
            assert_eq!(Change::parse(&c.payload()), Some(c));
        }
        for p in ["", "key", "template:1", "template:x:1", "policy:1"] {
            assert_eq!(Change::parse(p), None, "{p}");
        }
    }
}

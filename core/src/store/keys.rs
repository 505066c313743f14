//! API keys: stored as SHA-256 hashes (the key itself is shown once), each with a public id, a
//! name, scopes and an optional expiry. An app may hold any number of live keys, so a key is
//! rotated without downtime: make the new one, move clients over, revoke (or let expire) the old.

use super::audit::{Audit, insert_audit};
use super::{App, Store, StoreError, now_ms};
use rand::RngCore;
use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;

/// The SHA-256 of an API key, as stored.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// One right a key can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Send, schedule, cancel, recall and redrive messages; run campaigns.
    Send,
    /// Read traces, the inbox, stats, campaigns, templates, policies and lists.
    Read,
    /// Create, change and delete templates; list accounts (masked); upload media.
    Templates,
    /// Everything: accounts, policies, lists, keys, the audit log, SQL.
    Admin,
}

impl Scope {
    /// Every scope, in the order they are written.
    pub const ALL: [Scope; 4] = [Scope::Send, Scope::Read, Scope::Templates, Scope::Admin];

    /// The scope's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Send => "send",
            Scope::Read => "read",
            Scope::Templates => "templates",
            Scope::Admin => "admin",
        }
    }

    fn bit(self) -> u8 {
        1 << Scope::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("unknown scope `{s}` (send, read, templates or admin)"))
    }
}

/// A set of scopes; `admin` grants every other scope too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    /// Every right.
    pub const ADMIN: Scopes = Scopes(8);

    /// The set holding `scopes`.
    pub fn of(scopes: &[Scope]) -> Scopes {
        Scopes(scopes.iter().fold(0, |acc, s| acc | s.bit()))
    }

    /// Whether a key with these scopes may do what `needed` allows.
    pub fn allows(self, needed: Scope) -> bool {
        self.0 & (needed.bit() | Scope::Admin.bit()) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The scopes, in [`Scope::ALL`] order.
    pub fn list(self) -> Vec<Scope> {
        Scope::ALL
            .into_iter()
            .filter(|s| self.0 & s.bit() != 0)
            .collect()
    }

    /// The stored form: names joined by commas.
    pub fn to_stored(self) -> String {
        self.list()
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Parses the stored form.
    pub fn parse_stored(s: &str) -> Result<Scopes, String> {
        let scopes = s
            .split(',')
            .filter(|p| !p.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<Scope>, _>>()?;
        Ok(Scopes::of(&scopes))
    }
}

impl Serialize for Scopes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.list().iter().map(|x| x.as_str()))
    }
}

/// An API key as stored (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKey {
    /// The public id, used to list, rotate and revoke it.
    pub key_id: String,
    pub name: String,
    /// The key's first characters, to recognise it.
    pub prefix: String,
    pub scopes: Scopes,
    pub created_at: i64,
    /// When it stops working (unix ms), if ever.
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl ApiKey {
    /// Whether the key works at `now` (unix ms).
    pub fn live_at(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| now < at)
    }
}

/// What a new key gets.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: String,
    pub scopes: Scopes,
    pub expires_at: Option<i64>,
}

const KEY_COLUMNS: &str = "api_keys.key_id, api_keys.name, api_keys.prefix, api_keys.scopes, \
     api_keys.created_at, api_keys.expires_at, api_keys.revoked_at";

fn key_from_row(r: &AnyRow, first: usize) -> Result<ApiKey, StoreError> {
    Ok(ApiKey {
        key_id: r.get(first),
        name: r.get(first + 1),
        prefix: r.get(first + 2),
        scopes: Scopes::parse_stored(r.get::<&str, _>(first + 3)).map_err(StoreError::Corrupt)?,
        created_at: r.get(first + 4),
        expires_at: r.get(first + 5),
        revoked_at: r.get(first + 6),
    })
}

/// Stores a new key of `app` on `conn`; returns it and the key itself.
pub(crate) async fn insert_key(
    conn: &mut sqlx::AnyConnection,
    app: i64,
    new: &NewKey,
) -> Result<(ApiKey, String), StoreError> {
    let mut raw = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut raw);
    let key_id = hex::encode(&raw[..8]);
    let key = format!("hk_{}", hex::encode(&raw[8..]));
    let stored = ApiKey {
        key_id,
        name: new.name.clone(),
        prefix: key[..8].to_string(),
        scopes: new.scopes,
        created_at: now_ms(),
        expires_at: new.expires_at,
        revoked_at: None,
    };
    sqlx::query(
        "INSERT INTO api_keys (key_hash, app_id, key_id, name, prefix, scopes, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(hash_key(&key))
    .bind(app)
    .bind(&stored.key_id)
    .bind(&stored.name)
    .bind(&stored.prefix)
    .bind(stored.scopes.to_stored())
    .bind(stored.created_at)
    .bind(stored.expires_at)
    .execute(conn)
    .await?;
    Ok((stored, key))
}

/// One key of `app`, read on `conn`.
async fn select_key(
    conn: &mut sqlx::AnyConnection,
    app: i64,
    key_id: &str,
) -> Result<ApiKey, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE app_id = $1 AND key_id = $2"
    ))
    .bind(app)
    .bind(key_id)
    .fetch_optional(conn)
    .await?
    .ok_or(StoreError::NotFound)?;
    key_from_row(&row, 0)
}

impl Store {
    /// Makes a new key for `app`, with the audit entry `audit` makes of it; returns it and the
    /// key itself, which is not stored and cannot be shown again.
    pub async fn create_key(
        &self,
        app: i64,
        new: &NewKey,
        audit: impl FnOnce(&ApiKey) -> Audit,
    ) -> Result<(ApiKey, String), StoreError> {
        let mut tx = self.writer.begin().await?;
        let (key, secret) = insert_key(&mut tx, app, new).await?;
        insert_audit(&mut tx, app, &audit(&key)).await?;
        tx.commit().await?;
        Ok((key, secret))
    }

    /// The app and the key behind an unrevoked key, by the key's hash; the caller checks its
    /// expiry (so that a cached answer still expires on time).
    pub async fn key_by_hash(&self, key_hash: &str) -> Result<Option<(App, ApiKey)>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT apps.id, apps.name, {KEY_COLUMNS} FROM api_keys
             JOIN apps ON apps.id = api_keys.app_id
             WHERE key_hash = $1 AND revoked_at IS NULL"
        ))
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let app = App {
                id: r.get(0),
                name: r.get(1),
            };
            Ok((app, key_from_row(&r, 2)?))
        })
        .transpose()
    }

    /// Every key of `app`, revoked ones included, oldest first.
    pub async fn keys(&self, app: i64) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE app_id = $1 ORDER BY created_at, key_id"
        ))
        .bind(app)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| key_from_row(r, 0)).collect()
    }

    /// One key of `app`.
    pub async fn key(&self, app: i64, key_id: &str) -> Result<ApiKey, StoreError> {
        select_key(&mut *self.pool.acquire().await?, app, key_id).await
    }

    /// Revokes a key of `app` now (a revoked key stays revoked), with the audit entry `audit`
    /// makes of it; returns it.
    pub async fn revoke_key(
        &self,
        app: i64,
        key_id: &str,
        audit: impl FnOnce(&ApiKey) -> Audit,
    ) -> Result<ApiKey, StoreError> {
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "UPDATE api_keys SET revoked_at = $1
             WHERE app_id = $2 AND key_id = $3 AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(app)
        .bind(key_id)
        .execute(&mut *tx)
        .await?;
        let key = select_key(&mut tx, app, key_id).await?;
        insert_audit(&mut tx, app, &audit(&key)).await?;
        tx.commit().await?;
        Ok(key)
    }

    /// Rotates a key of `app`: a new key with its name, scopes and expiry, while the old one
    /// expires at `old_until` (unix ms) unless it expires sooner; with the audit entry `audit`
    /// makes of the new key and the old. Returns the new key, the key itself (not stored, cannot
    /// be shown again), and the old key.
    pub async fn rotate_key(
        &self,
        app: i64,
        key_id: &str,
        old_until: i64,
        audit: impl FnOnce(&ApiKey, &ApiKey) -> Audit,
    ) -> Result<(ApiKey, String, ApiKey), StoreError> {
        let mut tx = self.writer.begin().await?;
        let old = select_key(&mut tx, app, key_id).await?;
        let new = NewKey {
            name: old.name,
            scopes: old.scopes,
            expires_at: old.expires_at,
        };
        let (key, secret) = insert_key(&mut tx, app, &new).await?;
        sqlx::query(
            "UPDATE api_keys SET expires_at = $1
             WHERE app_id = $2 AND key_id = $3 AND revoked_at IS NULL
               AND (expires_at IS NULL OR expires_at > $1)",
        )
        .bind(old_until)
        .bind(app)
        .bind(key_id)
        .execute(&mut *tx)
        .await?;
        let old = select_key(&mut tx, app, key_id).await?;
        insert_audit(&mut tx, app, &audit(&key, &old)).await?;
        tx.commit().await?;
        Ok((key, secret, old))
    }
}

//! Apps, API keys, channel accounts and templates.

use super::audit::{Audit, insert_audit};
use super::keys::{NewKey, Scopes, insert_key};
use super::{Store, StoreError, now_ms};
use crate::domain::{Channel, MsgType};
use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

/// A tenant: one business system with its own keys, accounts and templates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct App {
    pub id: i64,
    pub name: String,
}

/// A channel account: credentials and endpoint of one vendor account.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Account {
    pub id: i64,
    pub name: String,
    pub channel: Channel,
    pub config: serde_json::Value,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A template as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Template {
    pub id: i64,
    pub name: String,
    pub channel: Channel,
    pub msg_type: MsgType,
    pub account_id: Option<i64>,
    pub content: serde_json::Value,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The fields of a template that a client sets.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTemplate {
    pub name: String,
    pub channel: Channel,
    pub msg_type: MsgType,
    pub account_id: Option<i64>,
    pub content: serde_json::Value,
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl Store {
    /// Creates an app and its first API key (scope `admin`, no expiry); returns the key,
    /// which is not stored and cannot be shown again. The app's audit log starts with an
    /// `app.create` entry by `cli` (apps are made from the command line only).
    pub async fn create_app(&self, name: &str) -> Result<(App, String), StoreError> {
        let mut tx = self.writer.begin().await?;
        let id: i64 =
            sqlx::query_scalar("INSERT INTO apps (name, created_at) VALUES ($1, $2) RETURNING id")
                .bind(name)
                .bind(now_ms())
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| match e {
                    sqlx::Error::Database(d) if d.is_unique_violation() => {
                        StoreError::Conflict(format!("an app named `{name}` exists"))
                    }
                    e => e.into(),
                })?;
        let first = NewKey {
            name: "initial".into(),
            scopes: Scopes::ADMIN,
            expires_at: None,
        };
        let (stored, key) = insert_key(&mut tx, id, &first).await?;
        let audit = Audit::new(
            "cli",
            "app.create",
            format!("app:{id}"),
            serde_json::json!({"name": name, "key": stored.key_id}),
        );
        insert_audit(&mut tx, id, &audit).await?;
        tx.commit().await?;
        let app = App {
            id,
            name: name.to_string(),
        };
        Ok((app, key))
    }

    /// The app named `name`, if any (trusted Kafka producers name their app).
    pub async fn app_by_name(&self, name: &str) -> Result<Option<App>, StoreError> {
        let row = sqlx::query("SELECT id, name FROM apps WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| App {
            id: r.get(0),
            name: r.get(1),
        }))
    }

    /// Creates a channel account for `app`, with the audit entry `audit` makes of it.
    pub async fn create_account(
        &self,
        app: i64,
        name: &str,
        channel: Channel,
        config: &serde_json::Value,
        audit: impl FnOnce(&Account) -> Audit,
    ) -> Result<Account, StoreError> {
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO accounts (app_id, name, channel, config, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(app)
        .bind(name)
        .bind(channel.as_str())
        .bind(self.seal(ACCOUNT, &config.to_string()))
        .bind(now)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let account = self.select_account(&mut tx, app, id).await?;
        insert_audit(&mut tx, app, &audit(&account)).await?;
        tx.commit().await?;
        Ok(account)
    }

    /// One live account of `app`.
    pub async fn account(&self, app: i64, id: i64) -> Result<Account, StoreError> {
        self.select_account(&mut *self.pool.acquire().await?, app, id)
            .await
    }

    /// One live account of `app`, read on `conn`.
    async fn select_account(
        &self,
        conn: &mut sqlx::AnyConnection,
        app: i64,
        id: i64,
    ) -> Result<Account, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, channel, config, created_at, updated_at FROM accounts
             WHERE app_id = $1 AND id = $2 AND deleted_at IS NULL",
        )
        .bind(app)
        .bind(id)
        .fetch_optional(conn)
        .await?
        .ok_or(StoreError::NotFound)?;
        self.account_from_row(&row)
    }

    /// Any live account by id, whichever app owns it (dispatch resolves a record's account).
    pub async fn account_by_id(&self, id: i64) -> Result<Account, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, channel, config, created_at, updated_at FROM accounts
             WHERE id = $1 AND deleted_at IS NULL",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound)?;
        self.account_from_row(&row)
    }

    /// Every live account of `app`.
    pub async fn accounts(&self, app: i64) -> Result<Vec<Account>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, channel, config, created_at, updated_at FROM accounts
             WHERE app_id = $1 AND deleted_at IS NULL ORDER BY id",
        )
        .bind(app)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| self.account_from_row(r)).collect()
    }

    /// Every live account of `channel`, whichever app owns it (receipt pollers).
    pub async fn accounts_of_channel(&self, channel: Channel) -> Result<Vec<Account>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, channel, config, created_at, updated_at FROM accounts
             WHERE channel = $1 AND deleted_at IS NULL ORDER BY id",
        )
        .bind(channel.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| self.account_from_row(r)).collect()
    }

    /// Creates a template, with the audit entry `audit` makes of it.
    pub async fn create_template(
        &self,
        app: i64,
        t: &NewTemplate,
        audit: impl FnOnce(&Template) -> Audit,
    ) -> Result<Template, StoreError> {
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO templates (app_id, name, channel, msg_type, account_id, content, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        )
        .bind(app)
        .bind(&t.name)
        .bind(t.channel.as_str())
        .bind(t.msg_type.as_str())
        .bind(t.account_id)
        .bind(t.content.to_string())
        .bind(now)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let template = select_template(&mut tx, app, id).await?;
        insert_audit(&mut tx, app, &audit(&template)).await?;
        tx.commit().await?;
        Ok(template)
    }

    /// Replaces a live template's fields, with the audit entry `audit` makes of the result; its
    /// version goes up by one.
    pub async fn update_template(
        &self,
        app: i64,
        id: i64,
        t: &NewTemplate,
        audit: impl FnOnce(&Template) -> Audit,
    ) -> Result<Template, StoreError> {
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query(
            "UPDATE templates SET name = $1, channel = $2, msg_type = $3, account_id = $4, content = $5,
             version = version + 1, updated_at = $6 WHERE app_id = $7 AND id = $8 AND deleted_at IS NULL",
        )
        .bind(&t.name)
        .bind(t.channel.as_str())
        .bind(t.msg_type.as_str())
        .bind(t.account_id)
        .bind(t.content.to_string())
        .bind(now_ms())
        .bind(app)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        let template = select_template(&mut tx, app, id).await?;
        insert_audit(&mut tx, app, &audit(&template)).await?;
        tx.commit().await?;
        Ok(template)
    }

    /// Soft-deletes a template, with the audit entry `audit`: it disappears from the API and can
    /// no longer be sent.
    pub async fn delete_template(&self, app: i64, id: i64, audit: Audit) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query(
            "UPDATE templates SET deleted_at = $1 WHERE app_id = $2 AND id = $3 AND deleted_at IS NULL",
        )
        .bind(now_ms())
        .bind(app)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        insert_audit(&mut tx, app, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// One live template of `app`.
    pub async fn template(&self, app: i64, id: i64) -> Result<Template, StoreError> {
        select_template(&mut *self.pool.acquire().await?, app, id).await
    }

    /// Live templates of `app`, by id, `limit` from after id `after`.
    pub async fn templates(
        &self,
        app: i64,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Template>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, channel, msg_type, account_id, content, version, created_at, updated_at
             FROM templates WHERE app_id = $1 AND id > $2 AND deleted_at IS NULL ORDER BY id LIMIT $3",
        )
        .bind(app)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(template_from_row).collect()
    }
}

impl Store {
    fn account_from_row(&self, r: &AnyRow) -> Result<Account, StoreError> {
        let config = self.unseal(ACCOUNT, r.get::<&str, _>(3))?;
        Ok(Account {
            id: r.get(0),
            name: r.get(1),
            channel: r.get::<String, _>(2).parse().map_err(corrupt)?,
            config: serde_json::from_str(&config).map_err(corrupt)?,
            created_at: r.get(4),
            updated_at: r.get(5),
        })
    }

    /// Seals again every account config and vendor token that is in clear or sealed with an
    /// older key; returns how many were. Run after putting a new key first in the ring.
    pub async fn reseal_secrets(&self) -> Result<u64, StoreError> {
        let Some(secrets) = self.secrets.clone() else {
            return Err(StoreError::Secret(
                crate::secrets::SecretError::NoKey.to_string(),
            ));
        };
        let mut resealed = 0;
        for (table, key, column, kind) in [
            ("accounts", "id", "config", ACCOUNT),
            ("vendor_tokens", "key", "token", "token"),
            ("internal_keys", "name", "secret", super::signing::KIND),
        ] {
            let rows = sqlx::query(&format!(
                "SELECT CAST({key} AS TEXT), {column} FROM {table}"
            ))
            .fetch_all(&self.pool)
            .await?;
            for row in rows {
                let (id, stored): (String, String) = (row.get(0), row.get(1));
                if !secrets.needs_resealing(&stored) {
                    continue;
                }
                let plain = self.unseal(kind, &stored)?;
                // Only if unchanged since read: a concurrent write already sealed it anew.
                let done = sqlx::query(&format!(
                    "UPDATE {table} SET {column} = $1 WHERE CAST({key} AS TEXT) = $2 AND {column} = $3"
                ))
                .bind(secrets.seal(kind, &plain))
                .bind(&id)
                .bind(&stored)
                .execute(&self.writer)
                .await?;
                resealed += done.rows_affected();
            }
        }
        Ok(resealed)
    }
}

/// The use account configs are sealed for.
const ACCOUNT: &str = "account";

/// One live template of `app`, read on `conn`.
async fn select_template(
    conn: &mut sqlx::AnyConnection,
    app: i64,
    id: i64,
) -> Result<Template, StoreError> {
    let row = sqlx::query(
        "SELECT id, name, channel, msg_type, account_id, content, version, created_at, updated_at
         FROM templates WHERE app_id = $1 AND id = $2 AND deleted_at IS NULL",
    )
    .bind(app)
    .bind(id)
    .fetch_optional(conn)
    .await?
    .ok_or(StoreError::NotFound)?;
    template_from_row(&row)
}

fn template_from_row(r: &AnyRow) -> Result<Template, StoreError> {
    Ok(Template {
        id: r.get(0),
        name: r.get(1),
        channel: r.get::<String, _>(2).parse().map_err(corrupt)?,
        msg_type: r.get::<String, _>(3).parse().map_err(corrupt)?,
        account_id: r.get(4),
        content: serde_json::from_str(r.get::<&str, _>(5)).map_err(corrupt)?,
        version: r.get(6),
        created_at: r.get(7),
        updated_at: r.get(8),
    })
}

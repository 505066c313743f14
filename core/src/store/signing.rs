//! The key that signs message records on `herald.requests` (see [`RecordSigner`]): made by the
//! first process that asks, kept in `internal_keys`, the same for every process on one store.

use super::{Store, StoreError, now_ms};
use crate::wire::RecordSigner;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;
use sqlx::Row;

/// The use the signing key is sealed for.
pub(crate) const KIND: &str = "record_signing";

impl Store {
    /// The signer of message records, loaded once per store handle; the key is created (32
    /// random bytes) when the store has none. Two processes racing to create it agree: the
    /// first insert wins and both read it back.
    pub async fn record_signer(&self) -> Result<RecordSigner, StoreError> {
        self.signer
            .get_or_try_init(|| async {
                let mut key = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut key);
                sqlx::query(
                    "INSERT INTO internal_keys (name, secret, created_at) VALUES ($1, $2, $3)
                     ON CONFLICT (name) DO NOTHING",
                )
                .bind(KIND)
                .bind(self.seal(KIND, &STANDARD.encode(key)))
                .bind(now_ms())
                .execute(&self.writer)
                .await?;
                let row = sqlx::query("SELECT secret FROM internal_keys WHERE name = $1")
                    .bind(KIND)
                    .fetch_one(&self.pool)
                    .await?;
                let stored = self.unseal(KIND, row.get::<&str, _>(0))?;
                let key = STANDARD
                    .decode(stored)
                    .map_err(|e| StoreError::Secret(format!("record signing key: {e}")))?;
                Ok(RecordSigner::new(&key))
            })
            .await
            .cloned()
    }
}

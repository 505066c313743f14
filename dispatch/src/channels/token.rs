//! Vendor access tokens (WeChat, WeCom, DingTalk, Feishu, GeTui), cached in memory and shared by
//! every dispatch worker through the store, so that one refresh serves them all.
//!
//! A token is refreshed ahead of its expiry ([`REFRESH_AHEAD`]), never used past it, and
//! dropped at once when the vendor says it is invalid ([`TokenCache::invalidate`]); the sender
//! then fetches a new one and tries once more.

use super::SendError;
use herald_core::store::Store;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// A token is refreshed when less than this is left of its life.
pub const REFRESH_AHEAD: Duration = Duration::from_secs(300);

/// A fetched token and how long the vendor says it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreshToken {
    pub token: String,
    pub expires_in: Duration,
}

/// The token cache: memory first, then the store, then the vendor.
pub struct TokenCache {
    store: Store,
    memory: Mutex<HashMap<String, (String, i64)>>,
}

impl TokenCache {
    /// A cache over `store`'s `vendor_tokens` table.
    pub fn new(store: Store) -> Self {
        TokenCache {
            store,
            memory: Mutex::default(),
        }
    }

    /// The token under `key` (for example `wechat:<appid>`), fetching a fresh one with `fetch`
    /// when none is stored or the stored one is within [`REFRESH_AHEAD`] of expiry.
    ///
    /// A store failure is retryable (`token_store`); `fetch`'s own error is returned as it is.
    pub async fn get<F, Fut>(&self, key: &str, fetch: F) -> Result<String, SendError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<FreshToken, SendError>>,
    {
        let now = chrono::Utc::now().timestamp_millis();
        let fresh_enough = |expires_at: i64| expires_at - now > REFRESH_AHEAD.as_millis() as i64;
        if let Some((token, expires_at)) = self.lock().get(key)
            && fresh_enough(*expires_at)
        {
            return Ok(token.clone());
        }
        if let Some((token, expires_at)) =
            self.store.vendor_token(key).await.map_err(store_error)?
            && fresh_enough(expires_at)
        {
            self.lock()
                .insert(key.to_string(), (token.clone(), expires_at));
            return Ok(token);
        }
        let fresh = fetch().await?;
        let expires_at = now + fresh.expires_in.as_millis() as i64;
        self.store
            .put_vendor_token(key, &fresh.token, expires_at)
            .await
            .map_err(store_error)?;
        self.lock()
            .insert(key.to_string(), (fresh.token.clone(), expires_at));
        Ok(fresh.token)
    }

    /// Runs `call` with the token under `key` (fetched with `fetch` when needed); when `refused`
    /// says the vendor rejected that token, forgets it and runs `call` once more with a fresh one.
    /// A second rejection is returned as it is.
    pub async fn with_token<T, F, FFut, C, CFut>(
        &self,
        key: &str,
        fetch: F,
        call: C,
        refused: fn(&SendError) -> bool,
    ) -> Result<T, SendError>
    where
        F: Fn() -> FFut,
        FFut: Future<Output = Result<FreshToken, SendError>>,
        C: Fn(&str) -> CFut,
        CFut: Future<Output = Result<T, SendError>>,
    {
        let token = self.get(key, &fetch).await?;
        match call(&token).await {
            Err(e) if refused(&e) => {
                self.invalidate(key, &token).await?;
                let token = self.get(key, &fetch).await?;
                call(&token).await
            }
            other => other,
        }
    }

    /// Forgets `token` under `key` (here and in the store) because the vendor rejected it; the
    /// next [`get`](Self::get) fetches a new one. A token another worker already replaced is
    /// left alone.
    pub async fn invalidate(&self, key: &str, token: &str) -> Result<(), SendError> {
        {
            let mut memory = self.lock();
            if memory.get(key).is_some_and(|(t, _)| t == token) {
                memory.remove(key);
            }
        }
        self.store
            .drop_vendor_token(key, token)
            .await
            .map_err(store_error)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, i64)>> {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn store_error(e: herald_core::store::StoreError) -> SendError {
    SendError::Retryable {
        code: "token_store".into(),
        detail: e.to_string(),
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        (dir, Store::open(&url).await.unwrap())
    }

    #[tokio::test]
    async fn tokens_are_shared_refreshed_ahead_and_invalidated() {
        let (_dir, store) = store().await;
        let fetches = AtomicU32::new(0);
        let fetch = |ttl: u64| {
            let n = fetches.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                Ok(FreshToken {
                    token: format!("t{n}"),
                    expires_in: Duration::from_secs(ttl),
                })
            }
        };
        let a = TokenCache::new(store.clone());
        assert_eq!(a.get("k", || fetch(7200)).await.unwrap(), "t1");
        assert_eq!(a.get("k", || fetch(7200)).await.unwrap(), "t1");
        // A second worker finds the first one's token in the store.
        let b = TokenCache::new(store.clone());
        assert_eq!(b.get("k", || fetch(7200)).await.unwrap(), "t1");
        assert_eq!(fetches.load(Ordering::SeqCst), 1);

        // Rejected by the vendor: both workers fetch anew.
        b.invalidate("k", "t1").await.unwrap();
        assert_eq!(b.get("k", || fetch(7200)).await.unwrap(), "t2");
        a.invalidate("k", "t1").await.unwrap();
        assert_eq!(a.get("k", || fetch(7200)).await.unwrap(), "t2");

        // A token about to expire is refreshed before it is used.
        assert_eq!(a.get("short", || fetch(60)).await.unwrap(), "t3");
        assert_eq!(a.get("short", || fetch(7200)).await.unwrap(), "t4");
        assert_eq!(fetches.load(Ordering::SeqCst), 4);
    }
}

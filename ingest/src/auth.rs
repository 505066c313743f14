//! API-key authentication and scopes, with short-lived caches of keys and templates so the hot
//! send path does not ask the store on every request.
//!
//! Each route needs one scope ([`required_scope`]); a key holding `admin` may do everything. A
//! key that expired stops working at its expiry, cached or not; a revoked key stops at once in
//! the process that revoked it, and in every other ingest process when the store's announcement
//! reaches it ([`follow_changes`]: milliseconds on PostgreSQL), at the latest after
//! `http.cache_ttl` while that announcement cannot arrive.

use crate::{ApiError, ApiState};
use axum::extract::FromRequestParts;
use axum::extract::MatchedPath;
use axum::http::Method;
use axum::http::request::Parts;
use herald_core::store::{ApiKey, App, Change, Scope, StoreError, Template, hash_key};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// A template with its placeholders worked out once.
pub struct CachedTemplate {
    pub template: Template,
    pub placeholders: BTreeSet<String>,
}

/// A map whose entries remember when they were stored.
type Timed<K, V> = RwLock<HashMap<K, (V, Instant)>>;

/// Caches of API keys and templates; entries live `ttl`, so revocations, edits and deletes take
/// effect within it.
pub struct Caches {
    ttl: Duration,
    keys: Timed<String, Option<(App, ApiKey)>>,
    templates: Timed<(i64, i64), Option<Arc<CachedTemplate>>>,
}

impl Caches {
    pub fn new(ttl: Duration) -> Self {
        Caches {
            ttl,
            keys: RwLock::default(),
            templates: RwLock::default(),
        }
    }

    fn fresh<K: std::hash::Hash + Eq, V: Clone>(&self, map: &Timed<K, V>, k: &K) -> Option<V> {
        let guard = map.read().unwrap_or_else(|p| p.into_inner());
        guard
            .get(k)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(v, _)| v.clone())
    }

    fn put<K: std::hash::Hash + Eq, V>(map: &Timed<K, V>, k: K, v: V) {
        let mut guard = map.write().unwrap_or_else(|p| p.into_inner());
        if guard.len() > 100_000 {
            guard.clear();
        }
        guard.insert(k, (v, Instant::now()));
    }

    /// Forgets the cached copies `change` makes stale.
    fn forget(&self, change: Change) {
        match change {
            Change::Keys => self.keys.write().unwrap_or_else(|p| p.into_inner()).clear(),
            Change::Template { app, id } => {
                self.templates
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(app, id));
            }
        }
    }

    /// Forgets everything (the announcements may have missed changes).
    fn forget_all(&self) {
        self.keys.write().unwrap_or_else(|p| p.into_inner()).clear();
        self.templates
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl ApiState {
    /// After `change` committed: forgets this process's stale copies and tells the others.
    pub(crate) async fn changed(&self, change: Change) {
        self.inner.caches.forget(change);
        if let Err(e) = self.inner.store.announce(change).await {
            tracing::warn!(error = %e, ?change, "could not announce a change; other processes see it within http.cache_ttl");
        }
    }
}

/// Applies the changes other processes announce to this process's caches until `shutdown`
/// turns true; without announcements (SQLite) it returns at once. Whenever changes may have
/// been missed (before listening, after the connection broke) it forgets every cached entry.
pub async fn follow_changes(state: ApiState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let caches = &state.inner.caches;
    let mut changes = loop {
        match state.inner.store.changes().await {
            Ok(Some(changes)) => break changes,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for cache changes; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    };
    caches.forget_all();
    loop {
        tokio::select! {
            next = changes.next() => match next {
                Some(change) => caches.forget(change),
                None => {
                    caches.forget_all();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

impl ApiState {
    /// A live template of `app`, from the cache or the store.
    pub async fn cached_template(
        &self,
        app: i64,
        id: i64,
    ) -> Result<Option<Arc<CachedTemplate>>, ApiError> {
        let caches = &self.inner.caches;
        if let Some(t) = caches.fresh(&caches.templates, &(app, id)) {
            return Ok(t);
        }
        let found = match self.inner.store.template(app, id).await {
            Ok(template) => Some(Arc::new(CachedTemplate {
                placeholders: herald_core::template::placeholders(&template.content),
                template,
            })),
            Err(StoreError::NotFound) => None,
            Err(e) => return Err(e.into()),
        };
        Caches::put(&caches.templates, (app, id), found.clone());
        Ok(found)
    }
}

impl ApiState {
    /// The app and the stored key behind an unrevoked API key `key`, from the cache or the store
    /// (expiry is the caller's to check).
    pub async fn key_for(&self, key: &str) -> Result<Option<(App, ApiKey)>, StoreError> {
        let hash = hash_key(key);
        let caches = &self.inner.caches;
        if let Some(found) = caches.fresh(&caches.keys, &hash) {
            return Ok(found);
        }
        let found = self.inner.store.key_by_hash(&hash).await?;
        Caches::put(&caches.keys, hash, found.clone());
        Ok(found)
    }
}

/// The scope a route needs, by its path pattern and method. Routes not named here need `admin`.
pub fn required_scope(method: &Method, route: &str) -> Scope {
    let reading = method == Method::GET;
    match route {
        "/v1/send" | "/v1/send/batch" => Scope::Send,
        "/v1/messages/{id}/recall" | "/v1/templates/{id}/recall" | "/v1/messages/redrive" => {
            Scope::Send
        }
        "/v1/messages/{id}" | "/v1/campaigns" | "/v1/campaigns/{id}" => {
            if reading {
                Scope::Read
            } else {
                Scope::Send
            }
        }
        "/v1/inbox/{receiver}"
        | "/v1/inbox/{receiver}/read"
        | "/v1/receivers/{receiver}/messages"
        | "/v1/templates/{id}/stats"
        | "/v1/apps/{app}/stats"
        | "/v1/sql" => Scope::Read,
        "/v1/templates" | "/v1/templates/{id}" => {
            if reading {
                Scope::Read
            } else {
                Scope::Templates
            }
        }
        "/v1/accounts/{id}/media" => Scope::Templates,
        "/v1/accounts" | "/v1/accounts/{id}" if reading => Scope::Templates,
        "/v1/policy" | "/v1/lists/{list}/{channel}" if reading => Scope::Read,
        _ => Scope::Admin,
    }
}

/// Checks that `key` is live now and holds `needed`.
pub fn check_key(key: &ApiKey, needed: Scope) -> Result<(), ApiError> {
    if !key.live_at(chrono::Utc::now().timestamp_millis()) {
        return Err(ApiError::KeyExpired);
    }
    if !key.scopes.allows(needed) {
        return Err(ApiError::MissingScope(needed.as_str()));
    }
    Ok(())
}

/// The authenticated caller: its app and the key it used (`Authorization: Bearer <key>`),
/// checked to be live and to hold the route's scope.
pub struct Caller {
    pub app: App,
    pub key: ApiKey,
}

impl Caller {
    /// The audit log's name for the caller.
    pub fn actor(&self) -> &str {
        &self.key.key_id
    }
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        let key = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(ApiError::Unauthorized)?;
        let (app, key) = state.key_for(key).await?.ok_or(ApiError::Unauthorized)?;
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map(|p| p.as_str())
            .unwrap_or_default();
        check_key(&key, required_scope(&parts.method, route))?;
        Ok(Caller { app, key })
    }
}

/// The app a request is authenticated as: a [`Caller`] when only the app matters.
pub struct AuthApp(pub App);

impl FromRequestParts<ApiState> for AuthApp {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        Caller::from_request_parts(parts, state)
            .await
            .map(|c| AuthApp(c.app))
    }
}

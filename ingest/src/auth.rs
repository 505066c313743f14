//! API-key authentication, with short-lived caches of keys and templates so the hot send path
//! does not ask the store on every request.

use crate::{ApiError, ApiState};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use herald_core::store::{App, StoreError, Template, hash_key};
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
    keys: Timed<String, Option<App>>,
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

    /// Forgets a template, after it was changed through this process.
    pub fn forget_template(&self, app: i64, id: i64) {
        self.templates
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(app, id));
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
    /// The app owning the live API key `key`, from the cache or the store.
    pub async fn app_for_key(&self, key: &str) -> Result<Option<App>, StoreError> {
        let hash = hash_key(key);
        let caches = &self.inner.caches;
        if let Some(app) = caches.fresh(&caches.keys, &hash) {
            return Ok(app);
        }
        let app = self.inner.store.app_by_key_hash(&hash).await?;
        Caches::put(&caches.keys, hash, app.clone());
        Ok(app)
    }
}

/// The app a request is authenticated as (`Authorization: Bearer <key>`).
pub struct AuthApp(pub App);

impl FromRequestParts<ApiState> for AuthApp {
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
        state
            .app_for_key(key)
            .await?
            .map(AuthApp)
            .ok_or(ApiError::Unauthorized)
    }
}

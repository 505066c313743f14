//! herald-ingest: the HTTP API. Authenticates apps, validates and renders send requests, and
//! publishes one record per receiver to `herald.requests`; also serves templates, accounts,
//! traces, the inbox, `/health` and `/metrics`.

mod auth;
mod body;
mod catalog;
mod error;
mod read;
mod send;

pub use error::{ApiError, Detail};

use auth::Caches;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::{get, post};
use herald_core::Channel;
use herald_core::bus::Bus;
use herald_core::config::HttpConfig;
use herald_core::store::Store;
use herald_core::telemetry::Metrics;
use std::sync::Arc;

/// Checks a channel's account config or template content; supplied by the dispatch crate, which
/// owns the channel clients.
pub type ChannelCheck = fn(Channel, &serde_json::Value) -> Result<(), String>;

/// Channel-specific validation used when accounts and templates are created.
#[derive(Clone, Copy)]
pub struct ChannelChecks {
    pub account: ChannelCheck,
    pub content: ChannelCheck,
}

/// Everything a handler needs.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    config: HttpConfig,
    checks: ChannelChecks,
    caches: Caches,
}

impl ApiState {
    /// Builds the shared state.
    pub fn new(
        store: Store,
        bus: Arc<dyn Bus>,
        metrics: Arc<Metrics>,
        config: HttpConfig,
        checks: ChannelChecks,
    ) -> Self {
        let caches = Caches::new(config.cache_ttl);
        ApiState {
            inner: Arc::new(Inner {
                store,
                bus,
                metrics,
                config,
                checks,
                caches,
            }),
        }
    }
}

/// The whole API.
pub fn router(state: ApiState) -> Router {
    let limit = state.inner.config.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/send", post(send::send))
        .route("/v1/send/batch", post(send::send_batch))
        .route("/v1/messages/{id}", get(read::trace))
        .route(
            "/v1/accounts",
            post(catalog::create_account).get(catalog::list_accounts),
        )
        .route("/v1/accounts/{id}", get(catalog::get_account))
        .route(
            "/v1/templates",
            post(catalog::create_template).get(catalog::list_templates),
        )
        .route(
            "/v1/templates/{id}",
            get(catalog::get_template)
                .put(catalog::update_template)
                .delete(catalog::delete_template),
        )
        .route("/v1/inbox/{receiver}", get(read::inbox))
        .route("/v1/inbox/{receiver}/read", post(read::mark_read))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn health(State(state): State<ApiState>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    state.inner.store.ping().await?;
    Ok(axum::Json(serde_json::json!({"status": "ok"})))
}

async fn metrics(State(state): State<ApiState>) -> ([(&'static str, &'static str); 1], String) {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.inner.metrics.render(),
    )
}

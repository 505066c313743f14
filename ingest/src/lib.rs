//! herald-ingest: the HTTP API. Authenticates apps, validates and renders send requests, and
//! publishes one record per receiver to `herald.requests`; also serves templates, accounts,
//! media upload, vendor receipt pushes, traces (per message, per receiver, per template), the
//! inbox, policies and receiver lists, API keys and the audit log, read-only SQL over the
//! warehouse, `/health` and `/metrics`.

mod auth;
mod body;
mod campaign;
mod catalog;
mod error;
pub mod fuzzing;
mod keys;
mod policy;
pub mod producer;
mod read;
mod recall;
mod send;
mod sql;
mod traces;
mod unsubscribe;
mod vendors;

pub use auth::follow_changes;
pub use campaign::run_campaigns;
pub use error::{ApiError, Detail};
pub use sql::{SqlFailure, SqlFormat, SqlQuery, WarehouseSql};

use auth::Caches;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::{get, post};
use herald_core::bus::Bus;
use herald_core::config::HttpConfig;
use herald_core::store::Account;
use herald_core::store::Store;
use herald_core::telemetry::Metrics;
use herald_core::{Channel, DeliveryEvent, Receipt};
use std::sync::Arc;

/// What ingest needs from the channel clients, which the dispatch crate owns: validation of
/// account configs and template contents, parsing of vendors' receipt pushes, media upload and
/// recall.
#[async_trait::async_trait]
pub trait Channels: Send + Sync {
    /// Checks a channel account's config.
    fn check_account(&self, channel: Channel, config: &serde_json::Value) -> Result<(), String>;

    /// Checks a template's content for its channel.
    fn check_content(&self, channel: Channel, content: &serde_json::Value) -> Result<(), String>;

    /// Parses a vendor's receipt push into receipts and the answer the vendor expects
    /// (content type, body).
    fn parse_receipt_push(
        &self,
        vendor: &str,
        body: &[u8],
    ) -> Result<(Vec<Receipt>, &'static str, &'static str), String>;

    /// Uploads a file through `account` and returns the vendor's media id.
    async fn upload_media(
        &self,
        account: &Account,
        upload: MediaUpload,
    ) -> Result<String, VendorFailure>;

    /// Whether messages of `channel` can be recalled at all (some of its vendors can).
    fn can_recall(&self, channel: Channel) -> bool;

    /// Recalls a sent message through `account`, the one that sent it; `sent` is its `sent`
    /// event. `not_supported` (code) where the channel or vendor cannot recall.
    async fn recall(&self, account: &Account, sent: &DeliveryEvent) -> Result<(), VendorFailure>;
}

/// A file for `POST /v1/accounts/{id}/media`.
#[derive(Debug, Clone)]
pub struct MediaUpload {
    /// The vendor's media type: `image`, `voice`, `video` or `file`.
    pub kind: String,
    pub filename: String,
    pub content_type: String,
    pub bytes: bytes::Bytes,
}

/// A vendor's refusal or failure, as answered to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VendorFailure {
    pub code: String,
    pub detail: String,
    /// Whether trying again later may succeed.
    pub retryable: bool,
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
    channels: Arc<dyn Channels>,
    sql: Arc<dyn WarehouseSql>,
    caches: Caches,
}

impl ApiState {
    /// Builds the shared state.
    pub fn new(
        store: Store,
        bus: Arc<dyn Bus>,
        metrics: Arc<Metrics>,
        config: HttpConfig,
        channels: Arc<dyn Channels>,
        sql: Arc<dyn WarehouseSql>,
    ) -> Self {
        let caches = Caches::new(config.cache_ttl);
        ApiState {
            inner: Arc::new(Inner {
                store,
                bus,
                metrics,
                config,
                channels,
                sql,
                caches,
            }),
        }
    }
}

/// Only `/health` and `/metrics`: what a process without the ingest role serves.
pub fn ops_router(state: ApiState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// The whole API.
pub fn router(state: ApiState) -> Router {
    let limit = state.inner.config.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route(
            "/u/{token}",
            get(unsubscribe::confirm_page).post(unsubscribe::unsubscribe),
        )
        .route("/v1/send", post(send::send))
        .route("/v1/send/batch", post(send::send_batch))
        .route("/v1/messages/{id}", get(read::trace).delete(policy::cancel))
        .route("/v1/messages/{id}/recall", post(recall::recall_message))
        .route("/v1/messages/redrive", post(policy::redrive))
        .route(
            "/v1/policy",
            get(policy::get_policy).put(policy::put_policy),
        )
        .route(
            "/v1/lists/{list}/{channel}",
            get(policy::get_list)
                .post(policy::add_to_list)
                .delete(policy::remove_from_list),
        )
        .route(
            "/v1/accounts",
            post(catalog::create_account).get(catalog::list_accounts),
        )
        .route("/v1/accounts/{id}", get(catalog::get_account))
        .route("/v1/apps/{app}/stats", get(policy::app_stats))
        .route("/v1/accounts/{id}/media", post(vendors::upload_media))
        .route("/v1/receipts/{vendor}", post(vendors::receipts))
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
        .route("/v1/templates/{id}/recall", post(recall::recall_template))
        .route("/v1/templates/{id}/stats", get(traces::template_stats))
        .route(
            "/v1/receivers/{receiver}/messages",
            get(traces::receiver_messages),
        )
        .route("/v1/campaigns", post(campaign::create).get(campaign::list))
        .route(
            "/v1/campaigns/{id}",
            get(campaign::show).delete(campaign::cancel),
        )
        .route("/v1/keys", post(keys::create).get(keys::list))
        .route("/v1/keys/{key_id}", axum::routing::delete(keys::revoke))
        .route("/v1/keys/{key_id}/rotate", post(keys::rotate))
        .route("/v1/audit", get(keys::audit_log))
        .route("/v1/sql", post(sql::run))
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

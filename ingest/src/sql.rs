//! `POST /v1/sql`: one read-only SQL statement over the warehouse. A key sees only its own app's
//! rows (tables without an `app` column do not exist for it); an `admin` key of an operator app
//! (`http.operator_apps`) sees every row of every table.

use crate::auth::Caller;
use crate::{ApiError, ApiState};
use axum::body::Body;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::Response;
use chrono::{DateTime, Utc};
use herald_core::store::{MessageSummary, Scope, TemplateStates};
use herald_core::{DeliveryEvent, MessageId};
use serde::Deserialize;
use std::time::Instant;

/// Read-only SQL over the warehouse, which the analytics crate owns.
#[async_trait::async_trait]
pub trait WarehouseSql: Send + Sync {
    /// Runs one read-only statement. `app` limits every table to that app's rows (`None`: every
    /// row); a result of more than `max_rows` rows fails.
    async fn query(&self, query: SqlQuery<'_>) -> Result<Vec<u8>, SqlFailure>;

    /// The events of message `id` of `app` in the warehouse, in any order (the trace of a
    /// message the store's index no longer holds).
    async fn message_events(
        &self,
        app: &str,
        id: &MessageId,
    ) -> Result<Vec<DeliveryEvent>, SqlFailure>;

    /// The time before which the store's tracing index may have forgotten messages
    /// (`analytics.index_retention` ago); `None` when it keeps every message.
    fn index_horizon(&self) -> Option<DateTime<Utc>>;

    /// What `Store::receiver_messages` answers, read from the warehouse: `app`'s messages to
    /// `receiver` accepted in `range`, newest first, after `before`, at most `limit`.
    async fn receiver_messages(
        &self,
        app: &str,
        receiver: &str,
        range: (DateTime<Utc>, DateTime<Utc>),
        before: Option<(DateTime<Utc>, MessageId)>,
        limit: usize,
    ) -> Result<Vec<MessageSummary>, SqlFailure>;

    /// What `Store::template_states` answers, read from the warehouse.
    async fn template_states(
        &self,
        app: &str,
        template_id: i64,
        range: (DateTime<Utc>, DateTime<Utc>),
    ) -> Result<TemplateStates, SqlFailure>;
}

/// One statement to run.
#[derive(Debug, Clone, Copy)]
pub struct SqlQuery<'a> {
    pub sql: &'a str,
    pub app: Option<&'a str>,
    pub format: SqlFormat,
    pub max_rows: usize,
}

/// The answer's encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqlFormat {
    /// Newline-delimited JSON, one object per row.
    #[default]
    Json,
    Csv,
    /// An aligned text table.
    Table,
    Parquet,
}

impl SqlFormat {
    fn content_type(self) -> &'static str {
        match self {
            SqlFormat::Json => "application/x-ndjson",
            SqlFormat::Csv => "text/csv; charset=utf-8",
            SqlFormat::Table => "text/plain; charset=utf-8",
            SqlFormat::Parquet => "application/vnd.apache.parquet",
        }
    }
}

/// Why a statement gave no answer.
#[derive(Debug)]
pub enum SqlFailure {
    /// The statement writes (DDL, DML, `SET`).
    NotReadOnly(String),
    /// The statement's own fault: syntax, an unknown table or column, a type error.
    Invalid(String),
    /// The result has more rows than allowed.
    TooManyRows(String),
    /// The warehouse cannot be read now.
    Unavailable(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlRequest {
    sql: String,
    #[serde(default)]
    format: SqlFormat,
}

/// `POST /v1/sql`.
pub async fn run(
    State(state): State<ApiState>,
    caller: Caller,
    body: crate::body::JsonBody<SqlRequest>,
) -> Result<Response, ApiError> {
    let request = body.value;
    let config = &state.inner.config;
    let operator =
        caller.key.scopes.allows(Scope::Admin) && config.operator_apps.contains(&caller.app.name);
    let query = SqlQuery {
        sql: &request.sql,
        app: (!operator).then_some(caller.app.name.as_str()),
        format: request.format,
        max_rows: config.sql_max_rows,
    };
    let started = Instant::now();
    let body = tokio::time::timeout(config.sql_timeout, state.inner.sql.query(query))
        .await
        .map_err(|_| {
            ApiError::invalid(
                "sql_timeout",
                format!(
                    "the statement ran longer than {} s: narrow it (a dt range, fewer columns)",
                    config.sql_timeout.as_secs_f64()
                ),
            )
        })?
        .map_err(|failure| match failure {
            SqlFailure::NotReadOnly(m) => ApiError::invalid("sql_not_read_only", m),
            SqlFailure::Invalid(m) => ApiError::invalid("bad_sql", m),
            SqlFailure::TooManyRows(m) => ApiError::invalid("sql_result_too_large", m),
            SqlFailure::Unavailable(m) => ApiError::Unavailable(m),
        })?;
    tracing::info!(
        actor = caller.actor(),
        operator,
        ms = started.elapsed().as_millis() as u64,
        bytes = body.len(),
        "SQL statement answered"
    );
    Response::builder()
        .header(CONTENT_TYPE, request.format.content_type())
        .body(Body::from(body))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// The answer of a read of the warehouse, within `http.sql_timeout`; a failure answers `503`.
pub(crate) async fn from_warehouse<T>(
    state: &ApiState,
    read: impl Future<Output = Result<T, SqlFailure>>,
) -> Result<T, ApiError> {
    let limit = state.inner.config.sql_timeout;
    match tokio::time::timeout(limit, read).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(ApiError::Unavailable(format!(
            "reading the warehouse failed: {e:?}"
        ))),
        Err(_) => Err(ApiError::Unavailable(format!(
            "reading the warehouse took longer than {} s",
            limit.as_secs_f64()
        ))),
    }
}

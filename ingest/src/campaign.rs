//! Scheduled campaigns: a template sent to every row of a CSV file (a `receiver` column and one
//! column per template variable), once or on a cron schedule.
//!
//! `POST /v1/campaigns` streams the file into the store as it arrives, in pieces of whole rows
//! (never the whole file in memory, and not subject to `http.max_body_bytes` but to
//! `http.max_campaign_bytes`); `GET /v1/campaigns/{id}` shows a run's progress and its bad rows
//! by line; `DELETE` cancels. Every ingest process runs due campaigns in the background
//! ([`run_campaigns`]): see `runner` for the delivery guarantee.

mod cron;
pub(crate) mod csvfile;
mod runner;

pub use runner::run_campaigns;

use crate::auth::AuthApp;
use crate::{ApiError, ApiState, Detail};
use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use cron::Schedule;
use csvfile::{BadCsv, Splitter};
use futures::StreamExt;
use herald_core::policy::quiet_hours::parse_timezone;
use herald_core::store::{Campaign, NewCampaign, Store, StoreError};
use serde::Deserialize;
use serde_json::{Value, json};

/// How many bad rows `GET /v1/campaigns/{id}` lists unless asked, and at most.
const BAD_ROWS_SHOWN: i64 = 100;
const MAX_BAD_ROWS_SHOWN: i64 = 10_000;

/// Longest campaign name, in bytes.
const MAX_NAME: usize = 200;

/// How far ahead `start_at` may be.
const MAX_START_AHEAD: chrono::Duration = chrono::Duration::days(366);

/// Query of `POST /v1/campaigns`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateQuery {
    template_id: i64,
    name: Option<String>,
    /// 5 or 6 fields; none: the campaign runs once.
    cron: Option<String>,
    /// The cron schedule's IANA time zone; none: the app policy's, else UTC.
    timezone: Option<String>,
    /// The first run, not before this time (RFC 3339); none: now.
    start_at: Option<DateTime<Utc>>,
}

/// Query of `GET /v1/campaigns/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShowQuery {
    /// Whose bad rows to list (default: the current or last run).
    run: Option<i64>,
    /// How many bad rows to list: 100 unless given, at most 10,000.
    bad_limit: Option<i64>,
}

/// `POST /v1/campaigns?template_id=&name=&cron=&timezone=&start_at=` with the CSV file as the
/// body (`Content-Type: text/csv`): `201` with the campaign, waiting for its first run.
pub async fn create(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    query: Result<Query<CreateQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let csv = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/csv"));
    if !csv {
        return Err(ApiError::Invalid {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            message: "send the receiver file with Content-Type: text/csv".into(),
            details: vec![],
        });
    }
    let Query(q) = query.map_err(|e| ApiError::Invalid {
        status: StatusCode::BAD_REQUEST,
        code: "bad_query",
        message: e.body_text(),
        details: vec![],
    })?;
    let template = state
        .cached_template(app.id, q.template_id)
        .await?
        .ok_or_else(|| {
            ApiError::from_details(vec![Detail {
                path: "template_id".into(),
                code: "unknown_template",
                message: format!("no template {} in this app", q.template_id),
            }])
        })?;
    let name = q.name.unwrap_or_default().trim().to_string();
    if name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "bad_name",
            format!("a campaign name is at most {MAX_NAME} bytes without control characters"),
        ));
    }
    if let Some(tz) = &q.timezone {
        parse_timezone(tz).map_err(|m| ApiError::invalid("bad_timezone", m))?;
    }
    let now = Utc::now();
    let start = q.start_at.unwrap_or(now).max(now);
    if start > now + MAX_START_AHEAD {
        return Err(ApiError::invalid(
            "bad_start_at",
            format!(
                "start_at is at most {} days ahead",
                MAX_START_AHEAD.num_days()
            ),
        ));
    }
    let first_run_at = match &q.cron {
        None => start,
        Some(expr) => {
            let tz = campaign_timezone(&state.inner.store, app.id, q.timezone.as_deref()).await?;
            let schedule =
                Schedule::parse(expr, tz).map_err(|m| ApiError::invalid("bad_cron", m))?;
            // The first occurrence at or after `start`.
            schedule
                .next_after(start - chrono::Duration::milliseconds(1))
                .ok_or_else(|| ApiError::invalid("bad_cron", format!("{expr:?} never fires")))?
        }
    };
    let new = NewCampaign {
        app_id: app.id,
        app: app.name.clone(),
        template_id: q.template_id,
        name,
        cron: q.cron,
        timezone: q.timezone,
        columns: Vec::new(),
        first_run_at: first_run_at.timestamp_millis(),
    };
    let upload = Upload {
        store: &state.inner.store,
        placeholders: &template.placeholders,
        limit: state.inner.config.max_campaign_bytes,
    };
    let campaign = upload.run(new, body).await?;
    Ok((
        StatusCode::CREATED,
        Json(view(&state.inner.store, &campaign, None, BAD_ROWS_SHOWN).await?),
    ))
}

/// `GET /v1/campaigns/{id}?run=&bad_limit=`: the campaign, its progress, the first bad rows of
/// a run and the counts of its last finished runs.
pub async fn show(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    Path(id): Path<i64>,
    Query(q): Query<ShowQuery>,
) -> Result<Json<Value>, ApiError> {
    let c = state
        .inner
        .store
        .campaign(app.id, id)
        .await
        .map_err(not_found)?;
    let limit = q
        .bad_limit
        .unwrap_or(BAD_ROWS_SHOWN)
        .clamp(0, MAX_BAD_ROWS_SHOWN);
    Ok(Json(view(&state.inner.store, &c, q.run, limit).await?))
}

/// `GET /v1/campaigns`: the app's last 1,000 campaigns, newest first, without their bad rows.
pub async fn list(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
) -> Result<Json<Value>, ApiError> {
    let campaigns = state.inner.store.campaigns(app.id, 1000).await?;
    let list: Vec<Value> = campaigns.iter().map(summary).collect();
    Ok(Json(json!({ "campaigns": list })))
}

/// `DELETE /v1/campaigns/{id}`: no further runs; a run in progress stops at its next batch.
pub async fn cancel(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    let c = match state.inner.store.cancel_campaign(app.id, id).await {
        Ok(c) => c,
        Err(StoreError::Conflict(message)) => {
            return Err(ApiError::Conflict {
                code: "campaign_finished",
                message,
            });
        }
        Err(e) => return Err(not_found(e)),
    };
    Ok(Json(
        view(&state.inner.store, &c, None, BAD_ROWS_SHOWN).await?,
    ))
}

fn not_found(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound => ApiError::NotFound("no campaign of this app has that id"),
        e => e.into(),
    }
}

/// The time zone of a campaign's schedule: its own, else the app policy's, else UTC.
pub(crate) async fn campaign_timezone(
    store: &Store,
    app_id: i64,
    own: Option<&str>,
) -> Result<Tz, StoreError> {
    let (policy, _) = store.app_policy(app_id).await?;
    let name = own.or(policy.timezone.as_deref());
    Ok(name.and_then(|n| parse_timezone(n).ok()).unwrap_or(Tz::UTC))
}

/// A file arriving for a new campaign.
struct Upload<'a> {
    store: &'a Store,
    placeholders: &'a std::collections::BTreeSet<String>,
    limit: u64,
}

impl Upload<'_> {
    /// Streams `body` into the store as the campaign `new`; on any failure, what was stored
    /// goes again.
    async fn run(&self, mut new: NewCampaign, body: Body) -> Result<Campaign, ApiError> {
        let mut created: Option<Campaign> = None;
        let result = self.stream(&mut new, body, &mut created).await;
        match (result, created) {
            (Ok(c), _) => Ok(c),
            (Err(e), Some(c)) => {
                if let Err(d) = self.store.delete_upload(c.id).await {
                    // The runner deletes stale uploads later.
                    tracing::warn!(campaign = c.id, error = %d, "could not delete a failed upload");
                }
                Err(e)
            }
            (Err(e), None) => Err(e),
        }
    }

    async fn stream(
        &self,
        new: &mut NewCampaign,
        body: Body,
        created: &mut Option<Campaign>,
    ) -> Result<Campaign, ApiError> {
        let mut splitter = Splitter::new();
        let mut frames = body.into_data_stream();
        let mut size: u64 = 0;
        let mut done = false;
        while !done {
            let pieces = match frames.next().await {
                Some(frame) => {
                    let frame = frame.map_err(|_| {
                        ApiError::invalid("bad_body", "the request body could not be read")
                    })?;
                    size += frame.len() as u64;
                    if size > self.limit {
                        return Err(ApiError::Invalid {
                            status: StatusCode::PAYLOAD_TOO_LARGE,
                            code: "body_too_large",
                            message: format!(
                                "the file is larger than {} bytes (http.max_campaign_bytes)",
                                self.limit
                            ),
                            details: vec![],
                        });
                    }
                    splitter.push(&frame).map_err(bad_csv)?
                }
                None => {
                    done = true;
                    splitter.finish().map_err(bad_csv)?
                }
            };
            if created.is_none()
                && let Some(columns) = splitter.header()
            {
                self.check_variables(columns)?;
                new.columns = columns.to_vec();
                *created = Some(self.store.create_campaign(new).await?);
            }
            if let Some(c) = created.as_ref() {
                for piece in pieces {
                    self.store.add_campaign_chunk(c.id, &piece).await?;
                }
            }
        }
        let Some(c) = created.as_ref() else {
            return Err(bad_csv(BadCsv("the file has no header row".into())));
        };
        if splitter.rows() == 0 {
            return Err(bad_csv(BadCsv(
                "the file has no rows after its header".into(),
            )));
        }
        Ok(self
            .store
            .finish_campaign_upload(c.id, splitter.rows())
            .await?)
    }

    /// Every variable of the template must be a column (every column is a variable).
    fn check_variables(&self, columns: &[String]) -> Result<(), ApiError> {
        let missing: Vec<Detail> = self
            .placeholders
            .iter()
            .filter(|p| !columns.contains(p))
            .map(|p| Detail {
                path: format!("columns.{p}"),
                code: "missing_variable",
                message: format!("the template needs variable `{p}`: the file has no such column"),
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ApiError::from_details(missing))
        }
    }
}

fn bad_csv(e: BadCsv) -> ApiError {
    ApiError::invalid("bad_csv", e.0)
}

fn rfc3339(ms: Option<i64>) -> Value {
    ms.and_then(DateTime::from_timestamp_millis)
        .map_or(Value::Null, |t| json!(t.to_rfc3339()))
}

/// A campaign as listed.
fn summary(c: &Campaign) -> Value {
    let mut v = json!({
        "id": c.id,
        "name": c.name,
        "template_id": c.template_id,
        "state": c.state.as_str(),
        "cron": c.cron,
        "timezone": c.timezone,
        "columns": c.columns,
        "next_run_at": rfc3339(c.next_run_at),
        "runs": c.runs,
        "total_rows": c.total_rows,
        "processed_rows": c.processed_rows,
        "accepted": c.accepted,
        "bad_rows": c.bad_rows,
        "run_started_at": rfc3339(c.run_started_at),
        "created_at": rfc3339(Some(c.created_at)),
        "updated_at": rfc3339(Some(c.updated_at)),
    });
    if let Some(e) = &c.error {
        v["error"] = json!(e);
    }
    v
}

/// A campaign with the first `limit` bad rows of `run` (default: the current or last) and its
/// last finished runs.
async fn view(
    store: &Store,
    c: &Campaign,
    run: Option<i64>,
    limit: i64,
) -> Result<Value, ApiError> {
    let run = run.unwrap_or(c.runs);
    let bad: Vec<Value> = store
        .campaign_bad_rows(c.id, run, limit)
        .await?
        .into_iter()
        .map(|b| json!({"line": b.line, "receiver": b.receiver, "reason": b.reason}))
        .collect();
    let history: Vec<Value> = store
        .campaign_runs(c.id)
        .await?
        .into_iter()
        .map(|r| {
            json!({
                "run": r.run,
                "started_at": rfc3339(Some(r.started_at)),
                "finished_at": rfc3339(Some(r.finished_at)),
                "processed_rows": r.processed_rows,
                "accepted": r.accepted,
                "bad_rows": r.bad_rows,
            })
        })
        .collect();
    let mut v = summary(c);
    v["bad_of_run"] = json!(run);
    v["bad"] = json!(bad);
    v["history"] = json!(history);
    Ok(v)
}

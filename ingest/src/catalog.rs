//! Channel accounts and templates: `/v1/accounts` and `/v1/templates`.

use crate::auth::{AuthApp, Caller};
use crate::body::JsonBody;
use crate::{ApiError, ApiState, Detail};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use herald_core::store::{Account, Audit, Change, NewTemplate, StoreError, Template};
use herald_core::{Channel, MsgType};
use serde::Deserialize;
use serde_json::Value;

/// Body of `POST /v1/accounts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountBody {
    name: String,
    channel: String,
    #[serde(default)]
    config: Value,
}

/// Body of `POST /v1/templates` and `PUT /v1/templates/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateBody {
    name: String,
    channel: String,
    msg_type: String,
    account_id: Option<i64>,
    content: Value,
}

/// Paging of lists.
#[derive(Debug, Deserialize)]
pub struct Page {
    #[serde(default)]
    after: i64,
    limit: Option<i64>,
}

/// Keys of account config whose values are secrets: answered as `***`.
const SECRET_KEYS: [&str; 5] = ["password", "secret", "token", "key", "credential"];

/// An account as answered: secret-looking fields masked.
fn public_account(mut a: Account) -> Value {
    if let Value::Object(map) = &mut a.config {
        for (k, v) in map.iter_mut() {
            let k = k.to_ascii_lowercase();
            if SECRET_KEYS.iter().any(|s| k.contains(s)) && !v.is_null() {
                *v = Value::String("***".into());
            }
        }
    }
    serde_json::to_value(a).unwrap_or_default()
}

fn channel(path: &str, s: &str, details: &mut Vec<Detail>) -> Option<Channel> {
    s.parse()
        .map_err(|m| {
            details.push(Detail {
                path: path.into(),
                code: "unknown_channel",
                message: m,
            })
        })
        .ok()
}

fn name_ok(path: &str, name: &str, details: &mut Vec<Detail>) {
    if name.trim().is_empty() || name.len() > 200 {
        details.push(Detail {
            path: path.into(),
            code: "bad_name",
            message: "a name of 1 to 200 bytes is required".into(),
        });
    }
}

pub async fn create_account(
    State(state): State<ApiState>,
    caller: Caller,
    body: JsonBody<AccountBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let app = &caller.app;
    let b = body.value;
    let mut details = Vec::new();
    name_ok("name", &b.name, &mut details);
    if let Some(c) = channel("channel", &b.channel, &mut details) {
        if let Err(message) = state.inner.channels.check_account(c, &b.config) {
            details.push(Detail {
                path: "config".into(),
                code: "bad_account_config",
                message,
            });
        }
        if details.is_empty() {
            // The config's field names only: its values may be secrets.
            let fields: Vec<&String> = b
                .config
                .as_object()
                .map(|o| o.keys().collect())
                .unwrap_or_default();
            let a = state
                .inner
                .store
                .create_account(app.id, &b.name, c, &b.config, |account| {
                    let detail =
                        serde_json::json!({"name": account.name, "channel": c, "fields": fields});
                    Audit::new(
                        caller.actor(),
                        "account.create",
                        format!("account:{}", account.id),
                        detail,
                    )
                })
                .await?;
            return Ok((StatusCode::CREATED, Json(public_account(a))));
        }
    }
    Err(ApiError::from_details(details))
}

pub async fn list_accounts(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
) -> Result<Json<Value>, ApiError> {
    let accounts = state.inner.store.accounts(app.id).await?;
    Ok(Json(
        serde_json::json!({"accounts": accounts.into_iter().map(public_account).collect::<Vec<_>>()}),
    ))
}

pub async fn get_account(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    match state.inner.store.account(app.id, id).await {
        Ok(a) => Ok(Json(public_account(a))),
        Err(StoreError::NotFound) => Err(ApiError::NotFound("no such account")),
        Err(e) => Err(e.into()),
    }
}

/// Checks a template body against the channel and the app's accounts.
async fn check_template(
    state: &ApiState,
    app: i64,
    b: TemplateBody,
) -> Result<NewTemplate, ApiError> {
    let mut details = Vec::new();
    name_ok("name", &b.name, &mut details);
    let channel = channel("channel", &b.channel, &mut details);
    let msg_type: Option<MsgType> = b
        .msg_type
        .parse()
        .map_err(|m| {
            details.push(Detail {
                path: "msg_type".into(),
                code: "unknown_msg_type",
                message: m,
            })
        })
        .ok();
    let max = state.inner.config.max_template_bytes;
    let size = b.content.to_string().len();
    if size > max {
        details.push(Detail {
            path: "content".into(),
            code: "template_too_large",
            message: format!("the content is {size} bytes of JSON, more than the {max} allowed"),
        });
    }
    if let Some(c) = channel {
        if let Err(message) = state.inner.channels.check_content(c, &b.content) {
            details.push(Detail {
                path: "content".into(),
                code: "bad_content",
                message,
            });
        }
        match b.account_id {
            Some(id) => match state.inner.store.account(app, id).await {
                Ok(a) if a.channel == c => {}
                Ok(a) => details.push(Detail {
                    path: "account_id".into(),
                    code: "account_channel_mismatch",
                    message: format!(
                        "account {id} is a {} account, the template is {c}",
                        a.channel
                    ),
                }),
                Err(StoreError::NotFound) => details.push(Detail {
                    path: "account_id".into(),
                    code: "unknown_account",
                    message: format!("no account {id} in this app"),
                }),
                Err(e) => return Err(e.into()),
            },
            None if c != Channel::Inbox => {
                details.push(Detail {
                    path: "account_id".into(),
                    code: "account_required",
                    message: format!("a {c} template needs an account"),
                });
            }
            None => {}
        }
    }
    match (channel, msg_type) {
        (Some(channel), Some(msg_type)) if details.is_empty() => Ok(NewTemplate {
            name: b.name,
            channel,
            msg_type,
            account_id: b.account_id,
            content: b.content,
        }),
        _ => Err(ApiError::from_details(details)),
    }
}

pub async fn create_template(
    State(state): State<ApiState>,
    caller: Caller,
    body: JsonBody<TemplateBody>,
) -> Result<(StatusCode, Json<Template>), ApiError> {
    let t = check_template(&state, caller.app.id, body.value).await?;
    let created = state
        .inner
        .store
        .create_template(caller.app.id, &t, |created| {
            Audit::new(
                caller.actor(),
                "template.create",
                format!("template:{}", created.id),
                template_detail(created),
            )
        })
        .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// What the audit log keeps of a template change.
fn template_detail(t: &Template) -> Value {
    serde_json::json!({"name": t.name, "channel": t.channel, "msg_type": t.msg_type, "version": t.version})
}

pub async fn update_template(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<i64>,
    body: JsonBody<TemplateBody>,
) -> Result<Json<Template>, ApiError> {
    let app = &caller.app;
    let t = check_template(&state, app.id, body.value).await?;
    let updated = state
        .inner
        .store
        .update_template(app.id, id, &t, |updated| {
            Audit::new(
                caller.actor(),
                "template.update",
                format!("template:{id}"),
                template_detail(updated),
            )
        })
        .await
        .map_err(not_found("no such template"))?;
    state.changed(Change::Template { app: app.id, id }).await;
    Ok(Json(updated))
}

pub async fn delete_template(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    let app = &caller.app;
    let audit = Audit::new(
        caller.actor(),
        "template.delete",
        format!("template:{id}"),
        serde_json::json!({}),
    );
    state
        .inner
        .store
        .delete_template(app.id, id, audit)
        .await
        .map_err(not_found("no such template"))?;
    state.changed(Change::Template { app: app.id, id }).await;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn get_template(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    Path(id): Path<i64>,
) -> Result<Json<Template>, ApiError> {
    Ok(Json(
        state
            .inner
            .store
            .template(app.id, id)
            .await
            .map_err(not_found("no such template"))?,
    ))
}

pub async fn list_templates(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    Query(page): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let limit = page.limit.unwrap_or(100).clamp(1, 1000);
    let templates = state
        .inner
        .store
        .templates(app.id, page.after, limit)
        .await?;
    let next = (templates.len() as i64 == limit)
        .then(|| templates.last().map(|t| t.id))
        .flatten();
    Ok(Json(
        serde_json::json!({"templates": templates, "next_after": next}),
    ))
}

fn not_found(what: &'static str) -> impl Fn(StoreError) -> ApiError {
    move |e| match e {
        StoreError::NotFound => ApiError::NotFound(what),
        e => e.into(),
    }
}

//! `POST /v1/send` and `POST /v1/send/batch`: validate the whole request, render each message,
//! publish one record per receiver, answer `202` with the message ids. A request with any bad
//! item publishes nothing.

use crate::auth::AuthApp;
use crate::body::JsonBody;
use crate::unsubscribe;
use crate::{ApiError, ApiState, Detail};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use herald_core::config::HttpConfig;
use herald_core::domain::parse_receiver;
use herald_core::policy::quiet_hours::parse_timezone;
use herald_core::store::{Claim, Template};
use herald_core::template::{RenderError, json_len, render};
use herald_core::wire::REQUESTS_TOPIC;
use herald_core::{Channel, MessageId, MessageRecord, MsgType};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::borrow::Cow;

/// Body of `POST /v1/send`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    pub(crate) template_id: i64,
    receivers: Vec<String>,
    #[serde(default)]
    variables: Map<String, Value>,
    biz_id: Option<String>,
    send_at: Option<DateTime<Utc>>,
    timezone: Option<String>,
}

/// Body of `POST /v1/send/batch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    pub(crate) template_id: i64,
    messages: Vec<BatchMessage>,
    send_at: Option<DateTime<Utc>>,
    timezone: Option<String>,
}

/// One message of a batch: its receivers share its variables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchMessage {
    pub(crate) receivers: Vec<String>,
    #[serde(default)]
    pub(crate) variables: Map<String, Value>,
    pub(crate) biz_id: Option<String>,
}

/// One accepted message in a `202` answer.
#[derive(Debug, Serialize)]
struct Accepted {
    message_id: MessageId,
    receiver: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
}

/// Longest `biz_id`, in bytes.
const MAX_BIZ_ID: usize = 128;

/// How far ahead `send_at` may be.
const MAX_SCHEDULE_AHEAD: chrono::Duration = chrono::Duration::days(366);

/// When, and in which time zone (for quiet hours), a request's messages are to be sent.
#[derive(Debug, Clone, Default)]
pub(crate) struct Timing {
    pub(crate) send_at: Option<DateTime<Utc>>,
    pub(crate) timezone: Option<String>,
}

impl SendBody {
    /// Its one group of receivers.
    pub(crate) fn groups(&self) -> Vec<Group<'_>> {
        vec![Group {
            path: String::new(),
            receivers: &self.receivers,
            variables: &self.variables,
            biz_id: self.biz_id.as_deref(),
        }]
    }

    pub(crate) fn timing(&self) -> Timing {
        Timing {
            send_at: self.send_at,
            timezone: self.timezone.clone(),
        }
    }
}

impl BatchBody {
    /// A group per message, when there are at most `max` messages.
    pub(crate) fn groups(&self, max: usize) -> Result<Vec<Group<'_>>, ApiError> {
        Group::of_batch(&self.messages, max)
    }

    pub(crate) fn timing(&self) -> Timing {
        Timing {
            send_at: self.send_at,
            timezone: self.timezone.clone(),
        }
    }
}

pub async fn send(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    headers: HeaderMap,
    body: JsonBody<SendBody>,
) -> Result<Response, ApiError> {
    let b = &body.value;
    accept(
        &state,
        &app,
        &headers,
        &body.raw,
        b.template_id,
        b.timing(),
        b.groups(),
        false,
    )
    .await
}

pub async fn send_batch(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    headers: HeaderMap,
    body: JsonBody<BatchBody>,
) -> Result<Response, ApiError> {
    let b = &body.value;
    let groups = b
        .groups(state.inner.config.max_batch_messages)
        .map_err(|e| rejected(&state, e))?;
    accept(
        &state,
        &app,
        &headers,
        &body.raw,
        b.template_id,
        b.timing(),
        groups,
        true,
    )
    .await
}

/// Receivers sharing variables: the whole of `/v1/send`, or one message of a batch.
pub(crate) struct Group<'a> {
    pub(crate) path: String,
    pub(crate) receivers: &'a [String],
    pub(crate) variables: &'a Map<String, Value>,
    pub(crate) biz_id: Option<&'a str>,
}

impl<'a> Group<'a> {
    /// The groups of a batch's messages, with paths naming each message; `too_many_messages`
    /// when there are more than `max`.
    pub(crate) fn of_batch(
        messages: &'a [BatchMessage],
        max: usize,
    ) -> Result<Vec<Group<'a>>, ApiError> {
        if messages.len() > max {
            return Err(ApiError::invalid(
                "too_many_messages",
                format!(
                    "a batch holds at most {max} messages, got {}",
                    messages.len()
                ),
            ));
        }
        Ok(messages
            .iter()
            .enumerate()
            .map(|(i, m)| Group {
                path: format!("messages[{i}]."),
                receivers: &m.receivers,
                variables: &m.variables,
                biz_id: m.biz_id.as_deref(),
            })
            .collect())
    }
}

fn rejected(state: &ApiState, e: ApiError) -> ApiError {
    state
        .inner
        .metrics
        .requests_rejected
        .get_or_create(&herald_core::telemetry::ErrorCode { code: e.code() })
        .inc();
    e
}

#[allow(clippy::too_many_arguments)]
async fn accept(
    state: &ApiState,
    app: &herald_core::store::App,
    headers: &HeaderMap,
    raw: &[u8],
    template_id: i64,
    timing: Timing,
    groups: Vec<Group<'_>>,
    batch: bool,
) -> Result<Response, ApiError> {
    let template = state.cached_template(app.id, template_id).await?;
    let records = match template {
        None => Err(ApiError::from_details(vec![Detail {
            path: "template_id".into(),
            code: "unknown_template",
            message: format!("no template {template_id} in this app"),
        }])),
        Some(t) => {
            let request_id = uuid::Uuid::now_v7().to_string();
            build_records(
                &state.inner.config,
                app,
                &t.template,
                &timing,
                &groups,
                batch,
                &request_id,
                &mut |_| MessageId::new(),
            )
        }
    }
    .map_err(|e| rejected(state, e))?;
    let signer = state
        .inner
        .store
        .record_signer()
        .await
        .map_err(|e| rejected(state, e.into()))?;

    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(key) = &idempotency_key {
        let hash = hex::encode(Sha256::digest(raw));
        match state
            .inner
            .store
            .claim_idempotency(app.id, key, &hash)
            .await?
        {
            Claim::Claimed => {}
            Claim::Done { status, response } => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::ACCEPTED);
                return Ok((
                    status,
                    [
                        ("content-type", "application/json"),
                        ("idempotent-replayed", "true"),
                    ],
                    response,
                )
                    .into_response());
            }
            Claim::Mismatch => {
                return Err(ApiError::invalid(
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with a different request body",
                ));
            }
            Claim::InProgress => {
                return Err(ApiError::Conflict {
                    code: "idempotency_in_progress",
                    message: "a request with this Idempotency-Key is in progress; retry".into(),
                });
            }
        }
    }

    let request_id = records
        .first()
        .map(|r| r.request_id.clone())
        .unwrap_or_default();
    let accepted: Vec<Accepted> = records
        .iter()
        .zip(
            groups
                .iter()
                .enumerate()
                .flat_map(|(i, g)| g.receivers.iter().map(move |_| i)),
        )
        .map(|(r, i)| Accepted {
            message_id: r.message_id,
            receiver: r.receiver.clone(),
            index: batch.then_some(i),
        })
        .collect();
    let bus_records = records.iter().map(|r| signer.record(r)).collect();
    if let Err(e) = state.inner.bus.publish(REQUESTS_TOPIC, bus_records).await {
        if let Some(key) = &idempotency_key {
            let _ = state.inner.store.release_idempotency(app.id, key).await;
        }
        return Err(rejected(state, e.into()));
    }
    let body = serde_json::json!({"request_id": request_id, "messages": accepted}).to_string();
    if let Some(key) = &idempotency_key {
        // The messages are published: a failure to store the answer must not turn into an error
        // that makes the client send them again.
        if let Err(e) = state
            .inner
            .store
            .finish_idempotency(app.id, key, 202, &body)
            .await
        {
            tracing::error!(error = %e, "could not store the idempotent answer");
        }
    }
    let m = &state.inner.metrics;
    m.requests_accepted.inc();
    m.messages_accepted.inc_by(records.len() as u64);
    Ok((
        StatusCode::ACCEPTED,
        [("content-type", "application/json")],
        body,
    )
        .into_response())
}

/// Validates every group and renders one record per receiver, or names every bad item. The
/// n-th record (counting from 0) gets the message id `id_of(n)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build_records(
    config: &HttpConfig,
    app: &herald_core::store::App,
    template: &Template,
    timing: &Timing,
    groups: &[Group<'_>],
    batch: bool,
    request_id: &str,
    id_of: &mut dyn FnMut(usize) -> MessageId,
) -> Result<Vec<MessageRecord>, ApiError> {
    let mut details = Vec::new();
    let now = Utc::now();
    if let Some(at) = timing.send_at
        && at > now + MAX_SCHEDULE_AHEAD
    {
        details.push(Detail {
            path: "send_at".into(),
            code: "send_at_too_far",
            message: format!(
                "send_at is at most {} days ahead",
                MAX_SCHEDULE_AHEAD.num_days()
            ),
        });
    }
    if let Some(tz) = &timing.timezone
        && let Err(message) = parse_timezone(tz)
    {
        details.push(Detail {
            path: "timezone".into(),
            code: "bad_timezone",
            message,
        });
    }
    let total: usize = groups.iter().map(|g| g.receivers.len()).sum();
    let max_total = if batch {
        config.max_batch_receivers
    } else {
        config.max_receivers
    };
    if total > max_total {
        details.push(Detail {
            path: "receivers".into(),
            code: "too_many_receivers",
            message: format!("at most {max_total} receivers per request, got {total}"),
        });
    }
    let mut records = Vec::with_capacity(total.min(max_total));
    // Rendered content of the request so far, as JSON bytes.
    let mut rendered = 0usize;
    // Unsubscribe links, when configured: in `{$unsubscribe_url}` (unless the request gives
    // the variable) and on marketing email as `list_unsubscribe` (the email headers).
    let links = config.public_url.is_some() && config.unsubscribe_secret.is_some();
    let uses_link = links
        && herald_core::template::placeholders(&template.content).contains(unsubscribe::VARIABLE);
    let email_marketing =
        links && template.channel == Channel::Email && template.msg_type == MsgType::Marketing;
    for g in groups {
        if g.receivers.is_empty() {
            details.push(Detail {
                path: format!("{}receivers", g.path),
                code: "no_receivers",
                message: "at least one receiver is required".into(),
            });
        }
        if g.receivers.len() > config.max_receivers {
            details.push(Detail {
                path: format!("{}receivers", g.path),
                code: "too_many_receivers",
                message: format!(
                    "at most {} receivers, got {}",
                    config.max_receivers,
                    g.receivers.len()
                ),
            });
        }
        if g.biz_id.is_some_and(|b| b.len() > MAX_BIZ_ID) {
            details.push(Detail {
                path: format!("{}biz_id", g.path),
                code: "bad_biz_id",
                message: format!("biz_id is longer than {MAX_BIZ_ID} bytes"),
            });
        }
        let per_receiver = uses_link && !g.variables.contains_key(unsubscribe::VARIABLE);
        let with_link = |url: &str| {
            let mut vars = g.variables.clone();
            vars.insert(unsubscribe::VARIABLE.into(), Value::String(url.into()));
            vars
        };
        let group_vars = if per_receiver {
            Cow::Owned(with_link("https://"))
        } else {
            Cow::Borrowed(g.variables)
        };
        let size = serde_json::to_string(g.variables).map_or(0, |v| v.len());
        if size > config.max_variables_bytes {
            details.push(Detail {
                path: format!("{}variables", g.path),
                code: "variables_too_large",
                message: format!(
                    "the variables are {size} bytes of JSON, more than the {} allowed",
                    config.max_variables_bytes
                ),
            });
            continue;
        }
        let content = match render(&template.content, &group_vars) {
            Ok(c) => Some(c),
            Err(RenderError::MissingVariables(names)) => {
                for name in names {
                    details.push(Detail {
                        path: format!("{}variables.{name}", g.path),
                        code: "missing_variable",
                        message: format!("the template needs variable `{name}`"),
                    });
                }
                None
            }
            Err(e @ RenderError::TooLarge { .. }) => {
                details.push(Detail {
                    path: format!("{}variables", g.path),
                    code: "content_too_large",
                    message: e.to_string(),
                });
                None
            }
        };
        if let Some(c) = &content {
            let before = rendered;
            rendered = rendered.saturating_add(json_len(c).saturating_mul(g.receivers.len()));
            if rendered > config.max_request_content_bytes {
                if before <= config.max_request_content_bytes {
                    details.push(Detail {
                        path: format!("{}receivers", g.path),
                        code: "request_content_too_large",
                        message: format!(
                            "the request's rendered messages pass {} bytes here; send fewer \
                             receivers or smaller variables per request",
                            config.max_request_content_bytes
                        ),
                    });
                }
                continue;
            }
        }
        for (i, raw) in g.receivers.iter().enumerate() {
            match parse_receiver(template.channel, raw) {
                Ok(receiver) => {
                    if let Some(content) = &content
                        && details.is_empty()
                    {
                        let url = (per_receiver || email_marketing)
                            .then(|| unsubscribe::link(config, app.id, template.channel, &receiver))
                            .flatten();
                        let content = match &url {
                            Some(url) if per_receiver => {
                                match render(&template.content, &with_link(url)) {
                                    Ok(c) => c,
                                    Err(e) => {
                                        details.push(Detail {
                                            path: format!("{}variables", g.path),
                                            code: "content_too_large",
                                            message: e.to_string(),
                                        });
                                        continue;
                                    }
                                }
                            }
                            _ => content.clone(),
                        };
                        let content = match (&url, content) {
                            (Some(url), Value::Object(mut fields)) if email_marketing => {
                                fields
                                    .insert("list_unsubscribe".into(), Value::String(url.clone()));
                                Value::Object(fields)
                            }
                            (_, content) => content,
                        };
                        records.push(MessageRecord {
                            v: 1,
                            message_id: id_of(records.len()),
                            request_id: request_id.to_string(),
                            biz_id: g.biz_id.map(str::to_owned),
                            app: app.name.clone(),
                            template_id: template.id,
                            channel: template.channel,
                            msg_type: template.msg_type,
                            account_id: template.account_id,
                            receiver,
                            content,
                            accepted_at: now,
                            send_at: timing.send_at.filter(|at| *at > now),
                            timezone: timing.timezone.clone(),
                        });
                    }
                }
                Err(message) => details.push(Detail {
                    path: format!("{}receivers[{i}]", g.path),
                    code: "bad_receiver",
                    message,
                }),
            }
        }
    }
    if details.is_empty() {
        Ok(records)
    } else {
        Err(ApiError::from_details(details))
    }
}

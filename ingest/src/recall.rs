//! Recall through the API: `POST /v1/messages/{id}/recall` takes back one sent message, and
//! `POST /v1/templates/{id}/recall` every sent message of a template in a time range.
//!
//! A message is found by its `sent` event in the store's `vendor_messages` rows (written with
//! each `sent` event), recalled through the vendor of the account that sent it (WeCom app,
//! DingTalk work notice, Feishu app), marked recalled (`recalled_at`, set once), and gets a
//! `recalled` event on `herald.delivery` built from its `sent` event.
//!
//! Vendors recall whole vendor messages: WeCom every receiver of one request (messages of a batch
//! with the same content share one `msgid`), DingTalk a whole task (one request's receivers). So
//! one call per vendor message id, and every message under that id is marked and gets its
//! `recalled` event — recalling one message also recalls those that shared its vendor message.

use crate::auth::AuthApp;
use crate::body::JsonBody;
use crate::{ApiError, ApiState, VendorFailure};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use herald_core::store::{Account, App, StoreError};
use herald_core::wire::DELIVERY_TOPIC;
use herald_core::{Channel, DeliveryEvent, MessageId};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

/// Most messages one template recall takes back.
const MAX_TEMPLATE_RECALL: usize = 10_000;

/// Vendor calls in flight at once during a template recall.
const CONCURRENCY: usize = 8;

/// What a template recall covers when the body names no `since`: a day before `until`.
const DEFAULT_RANGE: chrono::Duration = chrono::Duration::hours(24);

/// The failure code of a message whose account is gone (deleted, or never had one).
const GONE_ACCOUNT: &str = "unknown_account";

/// `POST /v1/messages/{id}/recall`: recalls one sent message through its vendor and answers
/// `{"message_id", "state": "recalled"}`. `404 not_found` when this app has no sent message with
/// that id, `409 already_recalled` when it was recalled before, `422 not_supported` when its
/// channel cannot recall, `422 vendor_rejected` / `502 vendor_unavailable` when the vendor
/// refused or failed (its code in the message).
pub async fn recall_message(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = ApiError::message_id(&id)?;
    let inner = &state.inner;
    // The app is checked on the event: rows from before the recall migration have it only there.
    let rows: Vec<(DeliveryEvent, Option<i64>)> = inner
        .store
        .sent_events_of_message(&id)
        .await?
        .into_iter()
        .filter(|(sent, _)| sent.app == app.name)
        .collect();
    let Some((first, _)) = rows.first() else {
        // No vendor id: an inbox message (herald is its own vendor), or one not sent (yet).
        let trace = inner.store.message_events(&app.name, &id).await?;
        if let Some(last) = trace.last()
            && !inner.channels.can_recall(last.channel)
        {
            return Err(not_supported(last.channel));
        }
        return Err(ApiError::NotFound(
            "no sent message of this app has that id",
        ));
    };
    if !inner.channels.can_recall(first.channel) {
        return Err(not_supported(first.channel));
    }
    // Usually one row; two when a crash during the vendor call sent the message twice.
    let mut called = HashSet::new();
    let mut marked = 0;
    for (sent, _) in rows.iter().filter(|(_, recalled_at)| recalled_at.is_none()) {
        if !called.insert((&sent.vendor, &sent.vendor_message_id, sent.account_id)) {
            continue;
        }
        let account = account_of(&state, &app, sent.account_id).await?;
        match recall_vendor_message(&state, account.as_ref(), sent).await? {
            Recall::Done(events) => marked += events.len(),
            Recall::Failed(f) => {
                let (status, code, message) = failure_answer(sent.channel, &f);
                return Err(ApiError::Invalid {
                    status,
                    code,
                    message,
                    details: vec![],
                });
            }
        }
    }
    if marked == 0 {
        return Err(ApiError::Conflict {
            code: "already_recalled",
            message: "the message was recalled already".into(),
        });
    }
    Ok(Json(json!({"message_id": id, "state": "recalled"})))
}

/// Body of `POST /v1/templates/{id}/recall`: the range of `sent` times, `since` inclusive,
/// `until` exclusive (RFC 3339); by default the 24 hours before `until`, which is now by default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecallRange {
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
}

/// `POST /v1/templates/{id}/recall`: recalls up to 10,000 messages of the template sent in the
/// range and not recalled yet, oldest first, and answers `{"recalled", "not_supported",
/// "failed": [{"message_id", "code", "message"}], "already_recalled", "since", "until",
/// "more"}` (`more`: messages beyond the 10,000 are left for another call). `404 not_found` for
/// no such live template of this app; `422 not_supported`, before anything is tried, when the
/// template's channel cannot recall.
pub async fn recall_template(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    Path(id): Path<i64>,
    body: JsonBody<RecallRange>,
) -> Result<Json<Value>, ApiError> {
    let inner = &state.inner;
    let template = match inner.store.template(app.id, id).await {
        Ok(t) => t,
        Err(StoreError::NotFound) => return Err(ApiError::NotFound("no such template")),
        Err(e) => return Err(e.into()),
    };
    if !inner.channels.can_recall(template.channel) {
        return Err(not_supported(template.channel));
    }
    let until = body.value.until.unwrap_or_else(Utc::now);
    let since = body.value.since.unwrap_or(until - DEFAULT_RANGE);
    if since >= until {
        return Err(ApiError::invalid(
            "bad_range",
            "`since` must be before `until`",
        ));
    }
    let (since_ms, until_ms) = (since.timestamp_millis(), until.timestamp_millis());
    let already = inner
        .store
        .recalled_of_template(&app.name, id, since_ms, until_ms)
        .await?;
    let mut pending = inner
        .store
        .sent_events_of_template(
            &app.name,
            id,
            since_ms,
            until_ms,
            MAX_TEMPLATE_RECALL as i64 + 1,
        )
        .await?;
    let more = pending.len() > MAX_TEMPLATE_RECALL;
    pending.truncate(MAX_TEMPLATE_RECALL);

    // One vendor call per vendor message, in the order of their first message.
    let mut groups: Vec<Vec<DeliveryEvent>> = Vec::new();
    let mut group_of: HashMap<VendorKey, usize> = HashMap::new();
    for sent in pending {
        let key = (
            sent.vendor.clone(),
            sent.vendor_message_id.clone(),
            sent.account_id,
        );
        match group_of.get(&key) {
            Some(&g) => groups[g].push(sent),
            None => {
                group_of.insert(key, groups.len());
                groups.push(vec![sent]);
            }
        }
    }
    let mut accounts = HashMap::new();
    for account_id in groups.iter().filter_map(|g| g[0].account_id) {
        if let Entry::Vacant(slot) = accounts.entry(account_id) {
            slot.insert(account_of(&state, &app, Some(account_id)).await?);
        }
    }
    let outcomes: Vec<(Vec<DeliveryEvent>, Result<Recall, ApiError>)> =
        futures::stream::iter(groups)
            .map(|group| {
                let (state, accounts) = (&state, &accounts);
                async move {
                    let sent = &group[0];
                    let outcome = if inner.channels.can_recall(sent.channel) {
                        let account = sent
                            .account_id
                            .and_then(|a| accounts.get(&a))
                            .and_then(Option::as_ref);
                        recall_vendor_message(state, account, sent).await
                    } else {
                        Ok(Recall::Failed(VendorFailure {
                            code: "not_supported".into(),
                            detail: "recall is not supported by this channel".into(),
                            retryable: false,
                        }))
                    };
                    (group, outcome)
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;

    let mut tally = Tally::default();
    let mut first_error = None;
    for (group, outcome) in outcomes {
        match outcome {
            Ok(recall) => tally.add(&group, recall),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    // A store failure midway: what was recalled is marked, so a retry counts it as
    // already recalled.
    if let Some(e) = first_error {
        return Err(e);
    }
    tracing::info!(
        template_id = id,
        app = %app.name,
        recalled = tally.recalled.len(),
        failed = tally.failed.len(),
        "template recall"
    );
    Ok(Json(json!({
        "recalled": tally.recalled.len(),
        "not_supported": tally.not_supported.len(),
        "failed": tally.failed,
        "already_recalled": already as usize + tally.already.len(),
        "since": since,
        "until": until,
        "more": more,
    })))
}

/// A vendor message: vendor, vendor message id, and the account that sent it.
type VendorKey = (Option<String>, Option<String>, Option<i64>);

/// What became of one vendor message's recall.
enum Recall {
    /// Recalled: the `recalled` events of the messages this call marked (none when a concurrent
    /// recall marked them first).
    Done(Vec<DeliveryEvent>),
    /// Not recalled, for this reason.
    Failed(VendorFailure),
}

/// The messages of a template recall, by what became of them.
#[derive(Default)]
struct Tally {
    recalled: HashSet<MessageId>,
    already: HashSet<MessageId>,
    not_supported: HashSet<MessageId>,
    failed: Vec<Value>,
}

impl Tally {
    /// Counts the messages of `group` (the `sent` events under one vendor message id).
    fn add(&mut self, group: &[DeliveryEvent], recall: Recall) {
        match recall {
            Recall::Done(events) => {
                let marked: HashSet<MessageId> = events.iter().map(|e| e.message_id).collect();
                for sent in group {
                    if marked.contains(&sent.message_id) {
                        self.recalled.insert(sent.message_id);
                    } else {
                        self.already.insert(sent.message_id);
                    }
                }
            }
            Recall::Failed(f) if f.code == "not_supported" => {
                self.not_supported
                    .extend(group.iter().map(|sent| sent.message_id));
            }
            Recall::Failed(f) => {
                for sent in group {
                    let (_, code, message) = failure_answer(sent.channel, &f);
                    self.failed.push(
                        json!({"message_id": sent.message_id, "code": code, "message": message}),
                    );
                }
            }
        }
    }
}

/// Recalls the vendor message of `sent` through `account` (the one that sent it), marks every
/// message under its vendor id recalled and publishes their `recalled` events.
async fn recall_vendor_message(
    state: &ApiState,
    account: Option<&Account>,
    sent: &DeliveryEvent,
) -> Result<Recall, ApiError> {
    let inner = &state.inner;
    let (Some(account), Some(vendor), Some(vendor_message_id)) = (
        account,
        sent.vendor.as_deref(),
        sent.vendor_message_id.as_deref(),
    ) else {
        return Ok(Recall::Failed(VendorFailure {
            code: GONE_ACCOUNT.into(),
            detail: "the account that sent the message no longer exists".into(),
            retryable: false,
        }));
    };
    if let Err(f) = inner.channels.recall(account, sent).await {
        tracing::warn!(message_id = %sent.message_id, channel = %sent.channel, vendor, code = %f.code, "recall failed");
        return Ok(Recall::Failed(f));
    }
    let events = inner
        .store
        .mark_recalled(vendor, vendor_message_id, account.id, Utc::now())
        .await?;
    // The recall is done and marked; should publishing fail, the messages stay recalled and
    // their traces lack the event (as with a cancellation).
    if !events.is_empty() {
        let records = events.iter().map(DeliveryEvent::to_record).collect();
        if let Err(e) = inner.bus.publish(DELIVERY_TOPIC, records).await {
            tracing::error!(message_id = %sent.message_id, error = %e, "recalled, but the events were not published");
        }
    }
    Ok(Recall::Done(events))
}

/// The live account `id` of `app`; `None` when there is none (any more).
async fn account_of(
    state: &ApiState,
    app: &App,
    id: Option<i64>,
) -> Result<Option<Account>, ApiError> {
    let Some(id) = id else {
        return Ok(None);
    };
    match state.inner.store.account(app.id, id).await {
        Ok(account) => Ok(Some(account)),
        Err(StoreError::NotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `422 not_supported` for a channel that cannot recall.
fn not_supported(channel: Channel) -> ApiError {
    ApiError::invalid(
        "not_supported",
        format!("messages of the {channel} channel cannot be recalled"),
    )
}

/// The status, code and message a recall failure is answered with: the vendor's refusal is
/// `422 vendor_rejected`, its failure that may pass `502 vendor_unavailable`, both with the
/// vendor's code.
fn failure_answer(channel: Channel, f: &VendorFailure) -> (StatusCode, &'static str, String) {
    match f.code.as_str() {
        "not_supported" => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_supported",
            format!("{channel}: {}", f.detail),
        ),
        GONE_ACCOUNT => (
            StatusCode::UNPROCESSABLE_ENTITY,
            GONE_ACCOUNT,
            f.detail.clone(),
        ),
        _ if f.retryable => (
            StatusCode::BAD_GATEWAY,
            "vendor_unavailable",
            format!("{}: {}", f.code, f.detail),
        ),
        _ => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "vendor_rejected",
            format!("{}: {}", f.code, f.detail),
        ),
    }
}

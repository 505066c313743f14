//! Send requests written straight to `herald.requests` by a business system's own Kafka
//! producer. The record is the body of `POST /v1/send/batch` plus the app and its API key
//! (or only the app, when the producers are trusted by config); its JSON schema is
//! `docs/schemas/kafka-request.v1.json`. It is checked exactly as the HTTP request would be, and
//! its message ids are derived from its place on the bus, so a redelivered record yields the
//! same messages (which the send ledger then absorbs).

use crate::ApiError;
use crate::ApiState;
use crate::auth::check_key;
use crate::send::{BatchMessage, Group, Timing, build_records};
use chrono::{DateTime, Utc};
use herald_core::config::HttpConfig;
use herald_core::store::{App, Scope, Template};
use herald_core::wire::hashed_uuid;
use herald_core::{MessageId, MessageRecord};
use serde::Deserialize;

/// Version 1 of a producer's record.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProducerRequest {
    v: u32,
    app: String,
    #[serde(default)]
    api_key: Option<String>,
    pub(crate) template_id: i64,
    messages: Vec<BatchMessage>,
    #[serde(default)]
    send_at: Option<DateTime<Utc>>,
    #[serde(default)]
    timezone: Option<String>,
}

/// Where a record lives on the bus.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: u32,
    pub offset: u64,
}

/// Why a producer's record yields no messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProducerError {
    /// The record is bad (its DLQ reason: a code and a message).
    Refused { code: &'static str, message: String },
    /// The store failed; try again later.
    Unavailable(String),
}

fn refused(code: &'static str, message: impl Into<String>) -> ProducerError {
    ProducerError::Refused {
        code,
        message: message.into(),
    }
}

impl From<ApiError> for ProducerError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Invalid { code, message, .. } | ApiError::Conflict { code, message } => {
                ProducerError::Refused { code, message }
            }
            ApiError::Unauthorized => refused("unauthorized", "unknown or revoked api_key"),
            ApiError::KeyExpired => refused("key_expired", "the api_key has expired"),
            ApiError::MissingScope(scope) => refused(
                "missing_scope",
                format!("the api_key lacks the `{scope}` scope"),
            ),
            ApiError::NotFound(what) => refused("not_found", what),
            ApiError::Unavailable(m) | ApiError::Internal(m) => ProducerError::Unavailable(m),
        }
    }
}

impl ProducerRequest {
    /// Parses a producer's record and checks what needs no store: its size, JSON and version.
    pub(crate) fn decode(payload: &[u8], config: &HttpConfig) -> Result<Self, ProducerError> {
        if payload.len() > config.max_body_bytes {
            return Err(refused(
                "record_too_large",
                format!(
                    "the record has {} bytes; at most {} are accepted",
                    payload.len(),
                    config.max_body_bytes
                ),
            ));
        }
        let request: ProducerRequest = serde_json::from_slice(payload)
            .map_err(|e| refused("malformed_record", format!("not a send request: {e}")))?;
        if request.v != 1 {
            return Err(refused(
                "unsupported_version",
                format!("record version {} is not supported (expected 1)", request.v),
            ));
        }
        Ok(request)
    }

    /// The message records of the request at `source`, for `app`, rendered with `template`.
    pub(crate) fn records(
        &self,
        config: &HttpConfig,
        app: &App,
        template: &Template,
        source: Source<'_>,
    ) -> Result<Vec<MessageRecord>, ProducerError> {
        let groups = Group::of_batch(&self.messages, config.max_batch_messages)?;
        let request_id = format!("{}/{}/{}", source.topic, source.partition, source.offset);
        Ok(build_records(
            config,
            app,
            template,
            &Timing {
                send_at: self.send_at,
                timezone: self.timezone.clone(),
            },
            &groups,
            true,
            &request_id,
            &mut |n| message_id_at(source, n),
        )?)
    }
}

impl ApiState {
    /// The message records of a producer's record at `source`, or why there are none.
    /// `trusted`: the record names its app without an API key.
    pub async fn expand_producer_record(
        &self,
        payload: &[u8],
        source: Source<'_>,
        trusted: bool,
    ) -> Result<Vec<MessageRecord>, ProducerError> {
        let config = &self.inner.config;
        let request = ProducerRequest::decode(payload, config)?;
        let app = self.producer_app(&request, trusted).await?;
        let Some(template) = self.cached_template(app.id, request.template_id).await? else {
            return Err(refused(
                "unknown_template",
                format!("no template {} in app `{}`", request.template_id, app.name),
            ));
        };
        let records = request.records(config, &app, &template.template, source)?;
        let m = &self.inner.metrics;
        m.messages_accepted.inc_by(records.len() as u64);
        Ok(records)
    }

    /// The app a record speaks for: the owner of its API key, which must be the app it names.
    async fn producer_app(
        &self,
        request: &ProducerRequest,
        trusted: bool,
    ) -> Result<App, ProducerError> {
        let unavailable =
            |e: herald_core::store::StoreError| ProducerError::from(ApiError::from(e));
        if trusted {
            return self
                .inner
                .store
                .app_by_name(&request.app)
                .await
                .map_err(unavailable)?
                .ok_or_else(|| refused("unknown_app", format!("no app `{}`", request.app)));
        }
        let Some(key) = request.api_key.as_deref() else {
            return Err(refused(
                "unauthorized",
                "api_key is required (producers are not trusted by config)",
            ));
        };
        let Some((app, key)) = self.key_for(key).await.map_err(unavailable)? else {
            return Err(refused("unauthorized", "unknown or revoked api_key"));
        };
        check_key(&key, Scope::Send)?;
        if app.name != request.app {
            return Err(refused(
                "unauthorized",
                format!("the api_key does not belong to app `{}`", request.app),
            ));
        }
        Ok(app)
    }
}

/// The id of the `n`-th message of the record at `source`: a hash of the record's place and `n`.
fn message_id_at(source: Source<'_>, n: usize) -> MessageId {
    MessageId(hashed_uuid(&[
        source.topic.as_bytes(),
        &source.partition.to_be_bytes(),
        &source.offset.to_be_bytes(),
        &(n as u64).to_be_bytes(),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_follow_the_place_on_the_bus() {
        let at = |offset| Source {
            topic: "herald.requests",
            partition: 3,
            offset,
        };
        assert_eq!(message_id_at(at(7), 0), message_id_at(at(7), 0));
        assert_ne!(message_id_at(at(7), 0), message_id_at(at(7), 1));
        assert_ne!(message_id_at(at(7), 0), message_id_at(at(8), 0));
        assert_eq!(message_id_at(at(7), 0).0.get_version_num(), 8);
    }
}

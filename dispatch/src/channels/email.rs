//! Email over SMTP, with lettre's async (Tokio, rustls) transport.
//!
//! An email channel account is an [`EmailAccount`] (JSON); an email template's rendered content
//! is `{"subject", "html"?, "text"?}` with at least one of `html` and `text`:
//! - both: a `multipart/alternative` message with the text and the HTML part;
//! - only `html`: the same, with a text part derived by [`html_to_text`], because mail clients
//!   and spam filters treat HTML-only mail worse;
//! - only `text`: a single `text/plain` part.
//!
//! # Attachments
//!
//! The content may also hold `"attachments"`, at most [`MAX_ATTACHMENTS`] files that herald
//! fetches when it sends the message:
//!
//! ```json
//! {"subject": "Your invoice", "text": "Attached.",
//!  "attachments": [{"url": "https://files.example.com/inv/{$order}.pdf"},
//!                  {"url": "https://files.example.com/terms", "filename": "terms.pdf",
//!                   "content_type": "application/pdf"}]}
//! ```
//!
//! - `url` (required): an `http` or `https` URL without credentials, fetched with [`fetch`]:
//!   hosts that resolve to private, loopback or link-local addresses are refused unless
//!   `dispatch.allow_private_urls` is set, redirects are not followed, and a file larger than
//!   `dispatch.attachment_max_bytes` is refused.
//! - `filename` (optional): the attachment's name; by default the URL's last path segment
//!   (percent-decoded), or `attachment-<n>` (n from 1) if it has none.
//! - `content_type` (optional): the attachment's MIME type; by default the `Content-Type` the
//!   server answered, or `application/octet-stream` if it sent none (or an invalid one).
//!
//! A message with attachments is `multipart/mixed`: the body above (the `multipart/alternative`
//! part, or the single `text/plain` part) first, then one base64 part per attachment, in order,
//! with `Content-Disposition: attachment; filename=...`. All attachments of a message are fetched
//! (concurrently) before the SMTP server is contacted; if one fails, the message fails with that
//! fetch's error (`attachment_url_refused`, `attachment_redirect`, `attachment_not_found`,
//! `attachment_refused` and `attachment_too_large` are permanent, `attachment_unavailable`
//! retryable; see [`fetch`]), its detail prefixed with `attachments[<index>]: `. Templates are
//! checked when saved ([`check_attachments`]); values holding `{$placeholders}` are checked once
//! rendered, at send time (a bad file name or content type is then `bad_content`).
//!
//! [`EmailSender`] keeps one pooled transport per account, so messages reuse open SMTP
//! connections instead of paying a TCP (and TLS) handshake each. The `Message-ID` header is
//! `<{message_id}@herald>`, deterministic so that a resend after a crash carries the same id and
//! the vendor id on delivery events can be matched against bounces.
//!
//! How the security modes are tested: the tests run against a real SMTP server
//! (`tests/support/smtp_sink.py`, aiosmtpd) without TLS, i.e. `security: "plain"`. The TLS modes
//! are built with lettre's own `relay` (`tls`, implicit TLS) and `starttls_relay` (`starttls`,
//! STARTTLS required, never a fallback to plaintext); the tests point both at the plaintext sink
//! and check that each refuses to deliver in the clear, which shows the mode that was chosen.

use super::fetch::{self, UrlPolicy};
use super::{SendError, SendOutcome, Sender};
use async_trait::async_trait;
use herald_core::MessageRecord;
use lettre::message::header::{
    ContentTransferEncoding, ContentType, Header, HeaderName, HeaderValue,
};
use lettre::message::{Attachment, Body, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::{AsyncSmtpTransport, PoolConfig};
use lettre::{Address, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The vendor name on delivery events.
const VENDOR: &str = "smtp";

/// Most connections kept open to one account's server.
const POOL_MAX_CONNECTIONS: u32 = 8;

pub use herald_core::config::Secret;

/// How the connection to the SMTP server is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// Implicit TLS from the first byte (SMTPS, port 465). The default.
    #[default]
    Tls,
    /// Plaintext, then a required `STARTTLS` upgrade (port 587); refuses servers without it.
    Starttls,
    /// No TLS at all (port 25): for local relays and tests only. Credentials are refused.
    Plain,
}

impl Security {
    /// The port used when the account does not give one.
    pub fn default_port(self) -> u16 {
        match self {
            Security::Tls => 465,
            Security::Starttls => 587,
            Security::Plain => 25,
        }
    }
}

/// An email channel account: the JSON stored as the account's config.
///
/// ```json
/// {"host": "smtp.example.com", "security": "starttls", "username": "apikey",
///  "password": "…", "from": "Herald <noreply@example.com>"}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailAccount {
    /// The SMTP server's host name; with TLS, the name its certificate must carry.
    pub host: String,
    /// The server's port; by default 465 for `tls`, 587 for `starttls`, 25 for `plain`.
    #[serde(default)]
    pub port: Option<u16>,
    /// `"tls"` (the default), `"starttls"` or `"plain"`.
    #[serde(default)]
    pub security: Security,
    /// The SMTP AUTH user; given together with `password`, or not at all.
    #[serde(default)]
    pub username: Option<String>,
    /// The SMTP AUTH password.
    #[serde(default)]
    pub password: Option<Secret>,
    /// The sender's mailbox, `"Name <addr@example.com>"` or `"addr@example.com"`.
    pub from: String,
    /// Limit on one whole send (connect, handshake and SMTP dialogue), in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl EmailAccount {
    /// Parses and checks an account's stored config; the error says what is wrong (and never
    /// quotes a secret). Senders report it as a `Permanent` `bad_account`.
    pub fn parse(config: &serde_json::Value) -> Result<Self, String> {
        // serde quotes an ill-typed value in its error ("invalid type: integer `1234`"); check
        // the password's type first so that no error can ever carry it.
        if config.get("password").is_some_and(|p| !p.is_string()) {
            return Err("`password` must be a string".into());
        }
        let account: EmailAccount =
            serde_json::from_value(config.clone()).map_err(|e| e.to_string())?;
        if !is_host(&account.host) {
            // Caught here, when the account is saved, rather than as a connection error later.
            return Err(format!(
                "`host` {:?} is not a host name or IP address (the port goes in `port`)",
                account.host
            ));
        }
        if account.timeout_ms == 0 {
            return Err("`timeout_ms` must be positive".into());
        }
        match (&account.username, &account.password) {
            (Some(_), None) | (None, Some(_)) => {
                return Err("`username` and `password` go together".into());
            }
            (Some(_), Some(_)) if account.security == Security::Plain => {
                return Err(
                    "credentials are not sent over `plain` (unencrypted) connections".into(),
                );
            }
            _ => {}
        }
        account.sender_mailbox()?;
        Ok(account)
    }

    /// The port to connect to.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(self.security.default_port())
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    fn sender_mailbox(&self) -> Result<Mailbox, String> {
        self.from
            .parse()
            .map_err(|e| format!("`from` {:?} is not a mailbox: {e}", self.from))
    }

    /// A pooled transport for this account. It connects lazily, on the first send.
    fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, SendError> {
        type Transport = AsyncSmtpTransport<Tokio1Executor>;
        let builder = match self.security {
            Security::Tls => Transport::relay(&self.host),
            Security::Starttls => Transport::starttls_relay(&self.host),
            Security::Plain => Ok(Transport::builder_dangerous(&self.host)),
        }
        .map_err(|e| bad_account(format!("TLS setup for host {:?}: {e}", self.host)))?;
        // lettre applies this to connecting only; `EmailSender::send` bounds the whole send.
        let mut builder = builder
            .port(self.port())
            .timeout(Some(self.timeout()))
            .pool_config(PoolConfig::new().max_size(POOL_MAX_CONNECTIONS));
        if let (Some(user), Some(password)) = (&self.username, &self.password) {
            builder =
                builder.credentials(Credentials::new(user.clone(), password.expose().to_owned()));
        }
        Ok(builder.build())
    }
}

/// Whether `host` is an IP address or a DNS name (letters, digits, `-`, dot-separated labels).
fn is_host(host: &str) -> bool {
    host.parse::<std::net::IpAddr>().is_ok()
        || (!host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }))
}

/// The rendered content of an email template (`attachments` is read by [`attachment_specs`]).
#[derive(Deserialize)]
struct EmailContent {
    subject: String,
    #[serde(default)]
    html: Option<String>,
    #[serde(default)]
    text: Option<String>,
    /// The receiver's one-click unsubscribe URL, which ingest adds to marketing email when
    /// unsubscribe links are configured: sent as `List-Unsubscribe` with
    /// `List-Unsubscribe-Post` (RFC 8058).
    #[serde(default)]
    list_unsubscribe: Option<String>,
}

/// The `List-Unsubscribe` header (RFC 2369): `<url>`.
#[derive(Clone)]
struct ListUnsubscribe(String);

impl Header for ListUnsubscribe {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("List-Unsubscribe")
    }
    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(ListUnsubscribe(s.to_string()))
    }
    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), format!("<{}>", self.0))
    }
}

/// The `List-Unsubscribe-Post: List-Unsubscribe=One-Click` header (RFC 8058).
#[derive(Clone)]
struct ListUnsubscribePost;

impl Header for ListUnsubscribePost {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("List-Unsubscribe-Post")
    }
    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(ListUnsubscribePost)
    }
    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "List-Unsubscribe=One-Click".into())
    }
}

/// Most attachments on one email.
pub const MAX_ATTACHMENTS: usize = 10;

/// One entry of the content's `attachments`, as written.
struct AttachmentSpec {
    url: String,
    filename: Option<String>,
    content_type: Option<String>,
}

/// Reads the content's `attachments` (none when absent): an array of at most
/// [`MAX_ATTACHMENTS`] objects with a string `url` and optional string `filename` and
/// `content_type`. Errors name the field, never quote its value (a URL may carry a token).
fn attachment_specs(value: Option<&Value>) -> Result<Vec<AttachmentSpec>, String> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let items = value
        .as_array()
        .ok_or("`attachments` must be an array of objects")?;
    if items.len() > MAX_ATTACHMENTS {
        return Err(format!(
            "`attachments` has {} entries; an email takes at most {MAX_ATTACHMENTS}",
            items.len()
        ));
    }
    let spec = |(i, item): (usize, &Value)| {
        let obj = item
            .as_object()
            .ok_or_else(|| format!("`attachments[{i}]` must be an object"))?;
        if let Some(k) = obj
            .keys()
            .find(|k| !["url", "filename", "content_type"].contains(&k.as_str()))
        {
            return Err(format!(
                "unknown field `{k}` in `attachments[{i}]` (expected `url`, `filename`, \
                 `content_type`)"
            ));
        }
        let string = |k: &str| {
            obj.get(k)
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .ok_or_else(|| format!("`attachments[{i}].{k}` must be a string"))
                })
                .transpose()
        };
        Ok(AttachmentSpec {
            url: string("url")?.ok_or_else(|| format!("`attachments[{i}]` needs a `url`"))?,
            filename: string("filename")?,
            content_type: string("content_type")?,
        })
    };
    items.iter().enumerate().map(spec).collect()
}

/// Checks an attachment's file name: not blank, no control characters, no path separators.
fn check_filename(name: &str) -> Result<(), &'static str> {
    if name.trim().is_empty() {
        Err("is empty")
    } else if name
        .chars()
        .any(|c| c.is_control() || c == '/' || c == '\\')
    {
        Err("must be a file name: no control characters, `/` or `\\`")
    } else {
        Ok(())
    }
}

/// Parses an attachment's MIME type (`type/subtype`, parameters allowed).
fn parse_content_type(value: &str) -> Result<ContentType, String> {
    ContentType::parse(value).map_err(|e| format!("{value:?} is not a MIME type: {e}"))
}

/// Checks an email template's `attachments` when the template is saved (`check_content`): its
/// shape (see the [module docs](self)), and the `url` (scheme, no credentials), `filename` and
/// `content_type` of entries that hold no `{$placeholder}`; the others are checked once
/// rendered, when the message is sent.
pub fn check_attachments(value: &Value) -> Result<(), String> {
    let fixed = |s: &str| herald_core::template::placeholders(&Value::from(s)).is_empty();
    for (i, spec) in attachment_specs(Some(value))?.into_iter().enumerate() {
        if fixed(&spec.url) {
            fetch::check_url(&spec.url).map_err(|why| format!("`attachments[{i}].url`: {why}"))?;
        }
        if let Some(name) = spec.filename.filter(|s| fixed(s)) {
            check_filename(&name).map_err(|why| format!("`attachments[{i}].filename` {why}"))?;
        }
        if let Some(content_type) = spec.content_type.filter(|s| fixed(s)) {
            parse_content_type(&content_type)
                .map_err(|why| format!("`attachments[{i}].content_type`: {why}"))?;
        }
    }
    Ok(())
}

/// An attachment to fetch, with the name and type the template gave (checked).
struct PlannedAttachment {
    url: String,
    filename: Option<String>,
    content_type: Option<ContentType>,
}

/// The body of a message: the alternative text and HTML parts, or a single text part.
enum MainPart {
    Alternative(MultiPart),
    Plain(SinglePart),
}

/// A message checked and ready to build once its attachments are fetched.
struct Draft {
    to: Address,
    subject: String,
    main: MainPart,
    attachments: Vec<PlannedAttachment>,
    list_unsubscribe: Option<String>,
}

/// Checks `record`'s content and receiver, without any network access.
fn draft(record: &MessageRecord) -> Result<Draft, SendError> {
    let content: EmailContent = serde_json::from_value(record.content.clone())
        .map_err(|e| bad_content(format!("email content: {e}")))?;
    if content.subject.trim().is_empty() {
        return Err(bad_content("email content: `subject` is empty"));
    }
    let attachments = attachment_specs(record.content.get("attachments"))
        .map_err(|e| bad_content(format!("email content: {e}")))?
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            if let Some(name) = &spec.filename {
                check_filename(name).map_err(|why| {
                    bad_content(format!("email content: `attachments[{i}].filename` {why}"))
                })?;
            }
            let content_type = spec
                .content_type
                .as_deref()
                .map(parse_content_type)
                .transpose()
                .map_err(|why| {
                    bad_content(format!(
                        "email content: `attachments[{i}].content_type`: {why}"
                    ))
                })?;
            Ok(PlannedAttachment {
                url: spec.url,
                filename: spec.filename,
                content_type,
            })
        })
        .collect::<Result<Vec<_>, SendError>>()?;
    let to: Address = record.receiver.parse().map_err(|e| SendError::Permanent {
        code: "bad_receiver".into(),
        detail: format!("{:?} is not an email address: {e}", record.receiver),
    })?;
    // An empty body field is a template that left it out, not a part to send.
    let non_empty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
    let main = match (non_empty(content.html), non_empty(content.text)) {
        (Some(html), Some(text)) => {
            MainPart::Alternative(MultiPart::alternative_plain_html(text, html))
        }
        (Some(html), None) => {
            let text = html_to_text(&html);
            MainPart::Alternative(MultiPart::alternative_plain_html(text, html))
        }
        (None, Some(text)) => MainPart::Plain(SinglePart::plain(text)),
        (None, None) => {
            return Err(bad_content(
                "email content needs a non-empty `html` or `text`",
            ));
        }
    };
    if let Some(url) = &content.list_unsubscribe
        && !(url.starts_with("https://") || url.starts_with("http://"))
    {
        return Err(bad_content(
            "email content: `list_unsubscribe` is not an http(s) URL",
        ));
    }
    Ok(Draft {
        to,
        subject: content.subject,
        main,
        attachments,
        list_unsubscribe: content.list_unsubscribe,
    })
}

/// Fetches `planned` attachments (concurrently) under `policy` and makes their parts, in order.
async fn fetch_attachments(
    policy: &UrlPolicy,
    planned: Vec<PlannedAttachment>,
) -> Result<Vec<SinglePart>, SendError> {
    let part = |(i, planned): (usize, PlannedAttachment)| async move {
        let fetched = fetch::fetch(policy, &planned.url)
            .await
            .map_err(|e| in_attachment(i, e))?;
        let filename = planned
            .filename
            .or(fetched.filename_from_url)
            .unwrap_or_else(|| format!("attachment-{}", i + 1));
        let content_type = match planned.content_type {
            Some(given) => given,
            None => fetched
                .content_type
                .as_deref()
                .and_then(|c| ContentType::parse(c).ok())
                .map_or_else(|| parse_content_type("application/octet-stream"), Ok)
                .map_err(bad_content)?,
        };
        // Always base64: the file arrives byte for byte, whatever its line endings.
        let body = Body::new_with_encoding(fetched.bytes.to_vec(), ContentTransferEncoding::Base64)
            .map_err(|_| bad_content(format!("attachments[{i}]: cannot encode as base64")))?;
        Ok(Attachment::new(filename).body(body, content_type))
    };
    futures::future::try_join_all(planned.into_iter().enumerate().map(part)).await
}

/// `e` with its detail prefixed by the attachment's place in the content.
fn in_attachment(i: usize, e: SendError) -> SendError {
    match e {
        SendError::Retryable {
            code,
            detail,
            retry_after,
        } => SendError::Retryable {
            code,
            detail: format!("attachments[{i}]: {detail}"),
            retry_after,
        },
        SendError::Permanent { code, detail } => SendError::Permanent {
            code,
            detail: format!("attachments[{i}]: {detail}"),
        },
    }
}

/// Builds the message of `draft` with its fetched `attachments`, from `from`, with the given
/// `Message-ID`.
fn build_message(
    draft: Draft,
    attachments: Vec<SinglePart>,
    from: Mailbox,
    message_id: String,
) -> Result<Message, SendError> {
    let mut builder = Message::builder()
        .from(from)
        .to(Mailbox::new(None, draft.to))
        .subject(draft.subject)
        .message_id(Some(message_id));
    if let Some(url) = draft.list_unsubscribe {
        builder = builder
            .header(ListUnsubscribe(url))
            .header(ListUnsubscribePost);
    }
    let built = if attachments.is_empty() {
        match draft.main {
            MainPart::Alternative(alternative) => builder.multipart(alternative),
            MainPart::Plain(text) => builder.singlepart(text),
        }
    } else {
        let mixed = match draft.main {
            MainPart::Alternative(alternative) => MultiPart::mixed().multipart(alternative),
            MainPart::Plain(text) => MultiPart::mixed().singlepart(text),
        };
        builder.multipart(attachments.into_iter().fold(mixed, MultiPart::singlepart))
    };
    built.map_err(|e| bad_content(format!("email message: {e}")))
}

/// A plain-text rendering of an HTML body, used as the text part of HTML-only emails.
///
/// Deliberately simple, not an HTML parser: it drops `<script>`/`<style>` blocks, comments and
/// every tag; turns `<br>`, `<hr>` and the edges of block elements (`p`, `div`, `li`, `tr`,
/// headings, ...) into line breaks; decodes `&amp; &lt; &gt; &quot; &apos; &nbsp;` and numeric
/// entities; and collapses white space, leaving one line per block and no blank lines.
/// Templates that need a crafted text version should give `text` themselves.
pub fn html_to_text(html: &str) -> String {
    const BLOCKS: &[&str] = &[
        "br",
        "hr",
        "p",
        "div",
        "li",
        "tr",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "ul",
        "ol",
        "table",
        "blockquote",
        "pre",
        "section",
        "article",
        "header",
        "footer",
    ];
    // ASCII lowercasing keeps byte offsets, so indices found in `lower` are valid in `html`.
    let lower = html.to_ascii_lowercase();
    let mut out = String::with_capacity(html.len());
    let mut i = 0;
    while let Some(lt) = html[i..].find('<').map(|p| i + p) {
        out.push_str(&decode_entities(&html[i..lt]));
        if lower[lt..].starts_with("<!--") {
            i = lower[lt..].find("-->").map_or(html.len(), |p| lt + p + 3);
            continue;
        }
        let Some(gt) = html[lt..].find('>').map(|p| lt + p) else {
            // A lone `<` is text.
            out.push_str(&decode_entities(&html[lt..]));
            i = html.len();
            break;
        };
        let tag = lower[lt + 1..gt].trim_start_matches('/');
        let name_end = tag
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(tag.len());
        let name = &tag[..name_end];
        i = gt + 1;
        if (name == "script" || name == "style") && !lower[lt + 1..].starts_with('/') {
            let close = format!("</{name}");
            i = lower[i..]
                .find(&close)
                .and_then(|p| lower[i + p..].find('>').map(|q| i + p + q + 1))
                .unwrap_or(html.len());
        } else if BLOCKS.contains(&name) {
            out.push('\n');
        }
    }
    out.push_str(&decode_entities(&html[i..]));

    out.lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Decodes the few HTML entities that [`html_to_text`] handles; others stay as written.
fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let decoded = rest.find(';').filter(|&semi| semi <= 10).and_then(|semi| {
            let entity = &rest[1..semi];
            let c = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some(' '),
                _ => entity.strip_prefix('#').and_then(|num| {
                    match num.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok(),
                        None => num.parse().ok(),
                    }
                    .and_then(char::from_u32)
                }),
            };
            c.map(|c| (c, semi))
        });
        match decoded {
            Some((c, semi)) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// One account's transport, with the config it was built from.
struct Pooled {
    account: EmailAccount,
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

/// The email channel client. Keeps one connection pool per account.
///
/// Build and use it inside a Tokio runtime, and drop it there: lettre's pools spawn their
/// cleanup onto the current runtime.
pub struct EmailSender {
    /// By account id. An entry whose config no longer matches the account's is replaced (and
    /// its pool closed), so an edited account takes effect on its next message.
    pools: Mutex<HashMap<i64, Arc<Pooled>>>,
    /// What attachment URLs may be fetched ([`UrlPolicy::from_config`]).
    policy: UrlPolicy,
}

impl EmailSender {
    /// A client with no connections yet; they are opened on first use. Attachments are fetched
    /// under `policy`.
    pub fn new(policy: UrlPolicy) -> Self {
        EmailSender {
            pools: Mutex::new(HashMap::new()),
            policy,
        }
    }

    /// The pool for this account and config, built on first use; before that, unless
    /// `dispatch.allow_private_urls`, the host must resolve to public addresses only.
    async fn pooled(
        &self,
        account_id: i64,
        account: EmailAccount,
    ) -> Result<Arc<Pooled>, SendError> {
        if let Some(pooled) = self.current(account_id, &account) {
            return Ok(pooled);
        }
        if !self.policy.allow_private {
            check_public_host(&account.host, account.port()).await?;
        }
        // The map stays consistent even if a holder panicked: every change is one insert/remove.
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        let pooled = Arc::new(Pooled {
            transport: account.transport()?,
            account,
        });
        pools.insert(account_id, Arc::clone(&pooled));
        Ok(pooled)
    }

    /// The account's pool, if it was built for this config.
    fn current(&self, account_id: i64, account: &EmailAccount) -> Option<Arc<Pooled>> {
        let pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        pools
            .get(&account_id)
            .filter(|pooled| pooled.account == *account)
            .map(Arc::clone)
    }

    /// Forgets `pooled` if it is still the account's current pool.
    fn evict(&self, account_id: i64, pooled: &Arc<Pooled>) {
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        if pools
            .get(&account_id)
            .is_some_and(|p| Arc::ptr_eq(p, pooled))
        {
            pools.remove(&account_id);
        }
    }
}

#[async_trait]
impl Sender for EmailSender {
    async fn send(
        &self,
        record: &MessageRecord,
        account_id: i64,
        account: &serde_json::Value,
    ) -> Result<SendOutcome, SendError> {
        let account = EmailAccount::parse(account).map_err(bad_account)?;
        let from = account.sender_mailbox().map_err(bad_account)?;
        let message_id = format!("<{}@herald>", record.message_id);
        let mut draft = draft(record)?;
        let attachments =
            fetch_attachments(&self.policy, std::mem::take(&mut draft.attachments)).await?;
        let message = build_message(draft, attachments, from, message_id.clone())?;
        let pooled = self.pooled(account_id, account).await?;
        match tokio::time::timeout(pooled.account.timeout(), pooled.transport.send(message)).await {
            Ok(Ok(_)) => Ok(SendOutcome {
                vendor: VENDOR.into(),
                vendor_message_id: Some(message_id),
                billing_units: None,
            }),
            Ok(Err(e)) => Err(smtp_error(&e)),
            Err(_) => {
                // The cancelled send leaves its connection mid-dialogue, and lettre's pool would
                // take it back and reuse it out of step with the server. Dropping the whole pool
                // closes it (and the idle ones, which is a small price after a timeout).
                self.evict(account_id, &pooled);
                Err(SendError::Retryable {
                    code: "smtp_timeout".into(),
                    detail: format!(
                        "no answer from {}:{} within {} ms",
                        pooled.account.host,
                        pooled.account.port(),
                        pooled.account.timeout_ms
                    ),
                    retry_after: None,
                })
            }
        }
    }
}

/// Maps a lettre SMTP error. Its text holds the server's reply or the I/O error, never the
/// credentials.
fn smtp_error(e: &lettre::transport::smtp::Error) -> SendError {
    let detail = e.to_string();
    let retryable = |code: &str| SendError::Retryable {
        code: code.into(),
        detail: detail.clone(),
        retry_after: None,
    };
    if e.is_transient() {
        retryable("smtp_4xx")
    } else if e.is_permanent() {
        SendError::Permanent {
            code: "smtp_5xx".into(),
            detail,
        }
    } else if e.is_timeout() {
        retryable("smtp_timeout")
    } else if e.is_client() {
        // lettre refused before sending: no STARTTLS on a `starttls` account, or an address or
        // body the server cannot take (no SMTPUTF8 / 8BITMIME). Sending again changes nothing.
        SendError::Permanent {
            code: "smtp_client".into(),
            detail,
        }
    } else if e.is_tls() {
        retryable("smtp_tls")
    } else {
        retryable("smtp_connect")
    }
}

/// Refuses an SMTP `host` that is, or resolves to, an address that is not public (`url_refused`,
/// permanent); a name that does not resolve is `smtp_connect` (retryable).
async fn check_public_host(host: &str, port: u16) -> Result<(), SendError> {
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| SendError::Retryable {
            code: "smtp_connect".into(),
            detail: format!("cannot resolve {host}: {e}"),
            retry_after: None,
        })?;
    for addr in addrs {
        if let Some(why) = fetch::non_public(addr.ip()) {
            return Err(SendError::Permanent {
                code: "url_refused".into(),
                detail: format!(
                    "SMTP host {host} is {}, which is {why}: not a public address, and \
                     `dispatch.allow_private_urls` is off",
                    addr.ip()
                ),
            });
        }
    }
    Ok(())
}

fn bad_account(detail: impl Into<String>) -> SendError {
    SendError::Permanent {
        code: "bad_account".into(),
        detail: detail.into(),
    }
}

fn bad_content(detail: impl Into<String>) -> SendError {
    SendError::Permanent {
        code: "bad_content".into(),
        detail: detail.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender that may reach the test servers on 127.0.0.1.
    fn local_sender() -> EmailSender {
        EmailSender::new(UrlPolicy {
            allow_private: true,
            ..UrlPolicy::default()
        })
    }
    use herald_core::{Channel, MessageId, MsgType};
    use serde_json::{Value, json};
    use std::io::{BufRead, BufReader};
    use std::path::{Path, PathBuf};
    use std::process::{Child, ChildStdin, Command, Stdio};

    /// `tests/support/smtp_sink.py` running as a child process, with its mail directory.
    struct SmtpSink {
        child: Child,
        // Held open: the sink runs with --exit-on-eof, so it dies with the test process.
        _stdin: ChildStdin,
        port: u16,
        dir: tempfile::TempDir,
    }

    impl SmtpSink {
        fn start(extra_args: &[&str]) -> SmtpSink {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/support/smtp_sink.py");
            let dir = tempfile::tempdir().unwrap();
            let log = dir.path().join("sink.log");
            let mut child = Command::new("python3")
                .arg(&script)
                .arg("--dir")
                .arg(dir.path().join("mail"))
                .arg("--exit-on-eof")
                .args(extra_args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run python3 ({e}): the email tests need python3 with aiosmtpd \
                         (pip install aiosmtpd)"
                    )
                });
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let Some(port) = line.trim().strip_prefix("READY ") else {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not start; the email tests need python3 with aiosmtpd \
                     (pip install aiosmtpd). Its stderr:\n{}",
                    script.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            };
            SmtpSink {
                _stdin: child.stdin.take().unwrap(),
                port: port.parse().unwrap(),
                child,
                dir,
            }
        }

        fn mail_dir(&self) -> PathBuf {
            self.dir.path().join("mail")
        }

        /// Every message received so far: (decoded sidecar, raw message), in arrival order.
        fn messages(&self) -> Vec<(Value, String)> {
            let mut sidecars: Vec<PathBuf> = std::fs::read_dir(self.mail_dir())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect();
            sidecars.sort();
            sidecars
                .into_iter()
                .map(|p| {
                    let meta = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                    let raw = std::fs::read_to_string(p.with_extension("eml")).unwrap();
                    (meta, raw)
                })
                .collect()
        }

        fn account(&self) -> Value {
            json!({
                "host": "127.0.0.1",
                "port": self.port,
                "security": "plain",
                "from": "Herald <noreply@herald.test>",
                "timeout_ms": 5000,
            })
        }
    }

    impl Drop for SmtpSink {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn record(receiver: &str, content: Value) -> MessageRecord {
        MessageRecord {
            v: 1,
            message_id: MessageId::new(),
            request_id: "req-1".into(),
            biz_id: None,
            app: "shop".into(),
            template_id: 7,
            channel: Channel::Email,
            msg_type: MsgType::Notice,
            account_id: Some(1),
            receiver: receiver.into(),
            content,
            accepted_at: chrono::Utc::now(),
            send_at: None,
            timezone: None,
        }
    }

    fn part<'a>(meta: &'a Value, content_type: &str) -> &'a str {
        meta["parts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["content_type"] == content_type)
            .unwrap_or_else(|| panic!("no {content_type} part in {meta:#}"))["content"]
            .as_str()
            .unwrap()
    }

    #[tokio::test]
    async fn sends_text_and_html_as_alternatives_over_one_connection() {
        let sink = SmtpSink::start(&[]);
        let sender = local_sender();
        let text = "Hello Ann — your code is 1234.\nSee you.";
        let html = "<p>Hello <b>Ann</b> — your code is <code>1234</code>.</p>";
        let first = record(
            "ann@example.com",
            json!({"subject": "Grüße, Ann: your code", "text": text, "html": html}),
        );
        let outcome = sender.send(&first, 1, &sink.account()).await.unwrap();
        let message_id = format!("<{}@herald>", first.message_id);
        assert_eq!(outcome.vendor, "smtp");
        assert_eq!(
            outcome.vendor_message_id.as_deref(),
            Some(message_id.as_str())
        );

        // lettre hands a connection back to the pool on a spawned task: let that task run, as
        // it would between messages in production, before the next send looks for one.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = record(
            "bob@example.com",
            json!({"subject": "Hi Bob", "text": "Hi."}),
        );
        sender.send(&second, 1, &sink.account()).await.unwrap();

        let messages = sink.messages();
        assert_eq!(messages.len(), 2);
        let (meta, raw) = &messages[0];
        assert_eq!(meta["mail_from"], "noreply@herald.test");
        assert_eq!(meta["rcpt_tos"], json!(["ann@example.com"]));
        assert_eq!(meta["from"], "Herald <noreply@herald.test>");
        assert_eq!(meta["to"], "ann@example.com");
        assert_eq!(meta["subject"], "Grüße, Ann: your code");
        assert_eq!(meta["message_id"], message_id);
        assert!(raw.contains(&format!("Message-ID: {message_id}")), "{raw}");
        assert_eq!(meta["content_type"], "multipart/alternative");
        assert_eq!(meta["parts"].as_array().unwrap().len(), 2);
        // Line endings on the wire are CRLF; the sink decodes but keeps them.
        assert_eq!(
            part(meta, "text/plain").replace("\r\n", "\n").trim_end(),
            text
        );
        assert_eq!(part(meta, "text/html").trim_end(), html);

        let (meta2, _) = &messages[1];
        assert_eq!(meta2["rcpt_tos"], json!(["bob@example.com"]));
        // The pooled transport kept the first connection open and sent on it again.
        assert_eq!(
            meta2["peer"], meta["peer"],
            "a second TCP connection was opened"
        );
    }

    #[tokio::test]
    async fn html_only_gets_a_derived_text_part_and_text_only_is_plain() {
        let sink = SmtpSink::start(&[]);
        let sender = local_sender();
        let html = "<h1>Order&nbsp;shipped</h1><p>Hi Ann,<br>your order <b>#42</b> is on its \
                    way &amp; arrives Monday.</p><style>p {color: red}</style>";
        let r = record(
            "ann@example.com",
            json!({"subject": "Shipped", "html": html}),
        );
        sender.send(&r, 1, &sink.account()).await.unwrap();
        let r = record(
            "ann@example.com",
            json!({"subject": "Plain", "text": "Just text.", "html": ""}),
        );
        sender.send(&r, 1, &sink.account()).await.unwrap();

        let messages = sink.messages();
        let (meta, _) = &messages[0];
        assert_eq!(meta["content_type"], "multipart/alternative");
        assert_eq!(
            part(meta, "text/plain").replace("\r\n", "\n").trim_end(),
            "Order shipped\nHi Ann,\nyour order #42 is on its way & arrives Monday."
        );
        assert_eq!(part(meta, "text/html").trim_end(), html);

        let (meta, _) = &messages[1];
        assert_eq!(meta["content_type"], "text/plain");
        assert_eq!(meta["parts"].as_array().unwrap().len(), 1);
        assert_eq!(part(meta, "text/plain").trim_end(), "Just text.");
    }

    #[tokio::test]
    async fn smtp_4xx_is_retryable_and_5xx_permanent() {
        let sink = SmtpSink::start(&["--transient", "^busy@", "--permanent", "^nobody@"]);
        let sender = local_sender();
        let content = json!({"subject": "s", "text": "t"});

        let err = sender
            .send(
                &record("busy@example.com", content.clone()),
                1,
                &sink.account(),
            )
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        assert_eq!(err.code(), "smtp_4xx");
        assert!(err.detail().contains("451"), "{err:?}");

        let err = sender
            .send(
                &record("nobody@example.com", content.clone()),
                1,
                &sink.account(),
            )
            .await
            .unwrap_err();
        assert!(!err.is_retryable(), "{err:?}");
        assert_eq!(err.code(), "smtp_5xx");
        assert!(err.detail().contains("550"), "{err:?}");

        // The pool drops the connection the failure broke, and the next message goes through.
        sender
            .send(&record("ann@example.com", content), 1, &sink.account())
            .await
            .unwrap();
        let messages = sink.messages();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].0["rcpt_tos"], json!(["ann@example.com"]));
    }

    #[tokio::test]
    async fn tls_modes_refuse_a_plaintext_server() {
        let sink = SmtpSink::start(&[]);
        let sender = local_sender();
        let content = json!({"subject": "s", "text": "t"});
        let mut account = sink.account();

        // `starttls`: the sink offers no STARTTLS, and lettre will not fall back to plaintext.
        account["security"] = json!("starttls");
        let err = sender
            .send(&record("ann@example.com", content.clone()), 2, &account)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "smtp_client", "{err:?}");
        assert!(err.detail().contains("STARTTLS"), "{err:?}");

        // `tls`: a TLS handshake against a plaintext greeting fails.
        account["security"] = json!("tls");
        let err = sender
            .send(&record("ann@example.com", content), 3, &account)
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        assert!(sink.messages().is_empty());
    }

    #[tokio::test]
    async fn private_smtp_hosts_are_refused_unless_allowed() {
        let sender = EmailSender::new(UrlPolicy::default());
        let content = json!({"subject": "s", "text": "t"});
        for host in ["127.0.0.1", "localhost"] {
            let account = json!({"host": host, "port": 9, "security": "plain",
                                 "from": "noreply@herald.test"});
            let err = sender
                .send(&record("ann@example.com", content.clone()), 1, &account)
                .await
                .unwrap_err();
            assert!(!err.is_retryable(), "{err:?}");
            assert_eq!(err.code(), "url_refused", "{err:?}");
        }
    }

    #[tokio::test]
    async fn refused_and_silent_servers_are_retryable() {
        let sender = local_sender();
        let content = json!({"subject": "s", "text": "t"});

        // Nothing listens on a port just freed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let account = json!({"host": "127.0.0.1", "port": port, "security": "plain",
                             "from": "noreply@herald.test", "timeout_ms": 2000});
        let err = sender
            .send(&record("ann@example.com", content.clone()), 1, &account)
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        assert_eq!(err.code(), "smtp_connect");

        // A server that accepts the connection and never greets.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let account = json!({"host": "127.0.0.1", "port": port, "security": "plain",
                             "from": "noreply@herald.test", "timeout_ms": 300});
        let started = std::time::Instant::now();
        let err = sender
            .send(&record("ann@example.com", content), 2, &account)
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        assert_eq!(err.code(), "smtp_timeout");
        assert!(started.elapsed() < Duration::from_secs(3));
        silent.abort();
    }

    #[tokio::test]
    async fn bad_content_and_receivers_are_permanent_without_connecting() {
        let sender = local_sender();
        // Port 9 (discard) on a loopback address nothing listens on: reaching it would fail
        // as `smtp_connect`, so the codes below show the checks ran before any connection.
        let account = json!({"host": "127.0.0.1", "port": 9, "security": "plain",
                             "from": "noreply@herald.test"});
        let cases = [
            (
                "ann@example.com",
                json!({"text": "no subject"}),
                "bad_content",
            ),
            (
                "ann@example.com",
                json!({"subject": " ", "text": "t"}),
                "bad_content",
            ),
            ("ann@example.com", json!({"subject": "s"}), "bad_content"),
            (
                "ann@example.com",
                json!({"subject": "s", "html": "", "text": " "}),
                "bad_content",
            ),
            ("ann@example.com", json!("just a string"), "bad_content"),
            (
                "not an address",
                json!({"subject": "s", "text": "t"}),
                "bad_receiver",
            ),
        ];
        for (receiver, content, code) in cases {
            let err = sender
                .send(&record(receiver, content.clone()), 1, &account)
                .await
                .unwrap_err();
            assert!(!err.is_retryable(), "{content}: {err:?}");
            assert_eq!(err.code(), code, "{content}: {err:?}");
        }
        let content = json!({"subject": "s", "text": "t"});
        let err = sender
            .send(
                &record("ann@example.com", content),
                1,
                &json!({"host": "127.0.0.1"}),
            )
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(err.code(), "bad_account", "{err:?}");
    }

    #[test]
    fn a_one_click_unsubscribe_url_becomes_the_rfc_8058_headers() {
        let url = "https://push.example.com/u/7.email.YQ.c2ln";
        let d = draft(&record(
            "ann@example.com",
            json!({"subject": "Sale", "text": "50% off", "list_unsubscribe": url}),
        ))
        .unwrap();
        let from: Mailbox = "Shop <shop@example.com>".parse().unwrap();
        let message = build_message(d, Vec::new(), from, "<m@herald>".into()).unwrap();
        let text = String::from_utf8(message.formatted()).unwrap();
        assert!(
            text.contains(&format!("List-Unsubscribe: <{url}>\r\n")),
            "{text}"
        );
        assert!(
            text.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"),
            "{text}"
        );
        // Without one, no header; a URL that is not http(s) is refused.
        let d = draft(&record(
            "ann@example.com",
            json!({"subject": "Hi", "text": "x"}),
        ))
        .unwrap();
        let from: Mailbox = "shop@example.com".parse().unwrap();
        let text = String::from_utf8(
            build_message(d, Vec::new(), from, "<m@herald>".into())
                .unwrap()
                .formatted(),
        )
        .unwrap();
        assert!(!text.contains("List-Unsubscribe"), "{text}");
        let bad = draft(&record(
            "ann@example.com",
            json!({"subject": "Hi", "text": "x", "list_unsubscribe": "javascript:alert(1)"}),
        ));
        assert!(bad.is_err());
    }

    #[test]
    fn accounts_parse_with_defaults_by_security() {
        let a = EmailAccount::parse(&json!({"host": "smtp.example.com",
                                                "from": "Herald <noreply@example.com>"}))
        .unwrap();
        assert_eq!(a.security, Security::Tls);
        assert_eq!(a.port(), 465);
        assert_eq!(a.timeout_ms, 10_000);
        for (security, port) in [("tls", 465), ("starttls", 587), ("plain", 25)] {
            let a = EmailAccount::parse(&json!({"host": "h.example.com", "security": security,
                                                    "from": "a@example.com"}))
            .unwrap();
            assert_eq!(a.port(), port, "{security}");
        }
        let a = EmailAccount::parse(&json!({"host": "h.example.com", "port": 2525,
                                                "security": "starttls", "from": "a@example.com"}))
        .unwrap();
        assert_eq!(a.port(), 2525);
    }

    #[test]
    fn bad_accounts_are_refused_without_revealing_the_password() {
        let cases = [
            json!({"host": "h.example.com"}),
            json!({"host": "", "from": "a@example.com"}),
            json!({"host": "h.example.com", "from": "not a mailbox"}),
            json!({"host": "h.example.com", "from": "a@example.com", "security": "ssl"}),
            json!({"host": "h.example.com", "from": "a@example.com", "pasword": "hunter2"}),
            json!({"host": "h.example.com", "from": "a@example.com", "username": "u"}),
            json!({"host": "h.example.com", "from": "a@example.com", "password": "hunter2"}),
            json!({"host": "h.example.com", "from": "a@example.com", "username": "u",
                   "password": "hunter2", "security": "plain"}),
            json!({"host": "h.example.com", "from": "a@example.com", "username": "u",
                   "password": 4242}),
            json!({"host": "h.example.com", "from": "a@example.com", "timeout_ms": 0}),
            json!({"host": "not a host!", "from": "a@example.com"}),
            json!({"host": "smtp.example.com:587", "from": "a@example.com"}),
            json!({"host": "smtp..example.com", "from": "a@example.com"}),
        ];
        for config in cases {
            let err = EmailAccount::parse(&config).unwrap_err();
            assert!(
                !err.contains("hunter2") && !err.contains("4242"),
                "{config}: {err}"
            );
        }
        let a = EmailAccount::parse(&json!({"host": "h.example.com", "from": "a@example.com",
                                                "username": "u", "password": "hunter2"}))
        .unwrap();
        assert_eq!(a.password.as_ref().unwrap().expose(), "hunter2");
        let debug = format!("{a:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("***"),
            "{debug}"
        );
    }

    /// The attachment parts the sink decoded: (content type, file name, exact bytes).
    fn attachment_parts(meta: &Value) -> Vec<(String, String, Vec<u8>)> {
        use base64::Engine;
        meta["parts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| !p["filename"].is_null())
            .map(|p| {
                (
                    p["content_type"].as_str().unwrap().to_string(),
                    p["filename"].as_str().unwrap().to_string(),
                    base64::engine::general_purpose::STANDARD
                        .decode(p["content_base64"].as_str().unwrap())
                        .unwrap(),
                )
            })
            .collect()
    }

    /// Serves `router` on 127.0.0.1; returns `http://127.0.0.1:<port>`.
    async fn file_server(router: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        url
    }

    const LOCAL_FILES: UrlPolicy = UrlPolicy {
        max_bytes: 1 << 20,
        allow_private: true,
    };

    #[tokio::test]
    async fn attachments_are_fetched_and_arrive_byte_exact() {
        use axum::http::{HeaderMap, Uri, header};
        // Every byte value, in a pseudo-random order, and text with bare LFs and non-ASCII.
        let pdf: Vec<u8> = (0u32..70_000)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let notes = "Zeile 1\nGrüße\n\nno CRLF here\n".as_bytes().to_vec();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (seen2, pdf2, notes2) = (Arc::clone(&seen), pdf.clone(), notes.clone());
        let router = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| async move {
            seen2
                .lock()
                .unwrap()
                .push((uri.to_string(), headers[header::HOST].clone()));
            match uri.path() {
                "/files/Q3%20report.pdf" => ([(header::CONTENT_TYPE, "application/pdf")], pdf2),
                "/notes" => ([(header::CONTENT_TYPE, "application/octet-stream")], notes2),
                _ => (
                    [(header::CONTENT_TYPE, "text/plain")],
                    b"wrong path".to_vec(),
                ),
            }
        });
        let base = file_server(router).await;
        let sink = SmtpSink::start(&[]);
        let sender = EmailSender::new(LOCAL_FILES);

        let r = record(
            "ann@example.com",
            json!({"subject": "Your report", "text": "Attached.", "html": "<p>Attached.</p>",
            "attachments": [
                {"url": format!("{base}/files/Q3%20report.pdf?token=abc")},
                {"url": format!("{base}/notes"), "filename": "Notizen-ü.txt",
                 "content_type": "text/plain; charset=utf-8"},
            ]}),
        );
        sender.send(&r, 1, &sink.account()).await.unwrap();
        // Text only, with an attachment whose server sends no usable type and whose URL has no
        // file name.
        let r = record(
            "bob@example.com",
            json!({"subject": "Plain", "text": "Just text.",
                   "attachments": [{"url": format!("{base}/notes")}]}),
        );
        sender.send(&r, 1, &sink.account()).await.unwrap();

        let messages = sink.messages();
        assert_eq!(messages.len(), 2);
        let (meta, raw) = &messages[0];
        assert_eq!(meta["content_type"], "multipart/mixed");
        // The body keeps its alternative part, nested first in the mixed message.
        assert!(raw.contains("multipart/alternative"), "{raw}");
        let parts: Vec<&str> = meta["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["content_type"].as_str().unwrap())
            .collect();
        assert_eq!(
            parts,
            ["text/plain", "text/html", "application/pdf", "text/plain"]
        );
        assert_eq!(
            part(meta, "text/plain").replace("\r\n", "\n").trim_end(),
            "Attached."
        );
        assert_eq!(part(meta, "text/html").trim_end(), "<p>Attached.</p>");
        let attachments = attachment_parts(meta);
        assert_eq!(attachments.len(), 2);
        assert_eq!(
            attachments[0],
            ("application/pdf".into(), "Q3 report.pdf".into(), pdf)
        );
        assert_eq!(
            attachments[1],
            ("text/plain".into(), "Notizen-ü.txt".into(), notes.clone())
        );
        assert!(raw.contains("Content-Disposition: attachment;"), "{raw}");

        let (meta, _) = &messages[1];
        assert_eq!(meta["content_type"], "multipart/mixed");
        assert_eq!(meta["parts"].as_array().unwrap().len(), 2);
        assert_eq!(part(meta, "text/plain").trim_end(), "Just text.");
        assert_eq!(
            attachment_parts(meta),
            [("application/octet-stream".into(), "notes".into(), notes)]
        );

        let seen = seen.lock().unwrap();
        let mut paths: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
        paths.sort();
        assert_eq!(
            paths,
            ["/files/Q3%20report.pdf?token=abc", "/notes", "/notes"]
        );
        let host = base.trim_start_matches("http://");
        assert!(seen.iter().all(|(_, h)| h == host), "{seen:?}");
    }

    #[tokio::test]
    async fn a_failed_attachment_fails_the_message_before_smtp() {
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        let router = axum::Router::new().fallback(|uri: axum::http::Uri| async move {
            match uri.path() {
                "/ok.txt" => "fine".into_response(),
                "/busy" => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [("retry-after", "3")],
                    "later",
                )
                    .into_response(),
                _ => (StatusCode::NOT_FOUND, "no such file").into_response(),
            }
        });
        let base = file_server(router).await;
        let sink = SmtpSink::start(&[]);
        let with = |urls: &[String]| {
            let attachments: Vec<Value> = urls.iter().map(|u| json!({"url": u})).collect();
            record(
                "ann@example.com",
                json!({"subject": "s", "text": "t", "attachments": attachments}),
            )
        };
        let local = EmailSender::new(LOCAL_FILES);

        let err = local
            .send(
                &with(&[format!("{base}/ok.txt"), format!("{base}/gone.pdf")]),
                1,
                &sink.account(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "attachment_not_found", "{err:?}");
        assert!(!err.is_retryable());
        assert!(
            err.detail().starts_with("attachments[1]: 127.0.0.1:"),
            "{err:?}"
        );

        let err = local
            .send(&with(&[format!("{base}/busy")]), 1, &sink.account())
            .await
            .unwrap_err();
        assert_eq!(
            err,
            SendError::Retryable {
                code: "attachment_unavailable".into(),
                detail: format!(
                    "attachments[0]: {} answered HTTP 503 Service Unavailable: later",
                    base.trim_start_matches("http://")
                ),
                retry_after: Some(Duration::from_secs(3)),
            }
        );

        let limited = EmailSender::new(UrlPolicy {
            max_bytes: 3,
            allow_private: true,
        });
        let err = limited
            .send(&with(&[format!("{base}/ok.txt")]), 1, &sink.account())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "attachment_too_large", "{err:?}");

        // The production default: the same local server is out of reach.
        let public_only = EmailSender::new(UrlPolicy::default());
        for url in [
            format!("{base}/ok.txt"),
            "ftp://files.example.com/a.pdf".into(),
            "https://u:hunter2@files.example.com/a.pdf".into(),
        ] {
            let err = public_only
                .send(&with(&[url]), 1, &sink.account())
                .await
                .unwrap_err();
            assert_eq!(err.code(), "attachment_url_refused", "{err:?}");
            assert!(!err.is_retryable());
            assert!(err.detail().starts_with("attachments[0]: "), "{err:?}");
            assert!(!err.detail().contains("hunter2"), "{err:?}");
        }
        assert!(sink.messages().is_empty(), "a message was sent");
    }

    #[tokio::test]
    async fn bad_attachment_entries_are_bad_content_without_fetching() {
        let sender = EmailSender::new(LOCAL_FILES);
        // Nothing listens at port 9: a fetch or an SMTP connection would fail differently.
        let account = json!({"host": "127.0.0.1", "port": 9, "security": "plain",
                             "from": "noreply@herald.test"});
        let url = "http://127.0.0.1:9/a.pdf";
        let cases = [
            json!("http://127.0.0.1:9/a.pdf"),
            json!([url]),
            json!([{"filename": "a.pdf"}]),
            json!([{"url": 7}]),
            json!([{"url": url, "name": "a.pdf"}]),
            json!([{"url": url, "filename": "../a.pdf"}]),
            json!([{"url": url, "filename": " "}]),
            json!([{"url": url, "content_type": "pdf"}]),
            json!(vec![json!({"url": url}); MAX_ATTACHMENTS + 1]),
        ];
        for attachments in cases {
            let content = json!({"subject": "s", "text": "t", "attachments": attachments});
            let err = sender
                .send(&record("ann@example.com", content), 1, &account)
                .await
                .unwrap_err();
            assert_eq!(err.code(), "bad_content", "{attachments}: {err:?}");
            assert!(!err.detail().contains("127.0.0.1"), "{err:?}");
        }
    }

    #[test]
    fn templates_attachments_are_checked_when_saved() {
        let check = |attachments: Value| {
            crate::channels::check_content(
                Channel::Email,
                &json!({"subject": "s", "text": "t", "attachments": attachments}),
            )
        };
        check(json!([])).unwrap();
        check(
            json!([{"url": "https://files.example.com/a.pdf", "filename": "a.pdf",
                      "content_type": "application/pdf"}]),
        )
        .unwrap();
        // Placeholders are checked once rendered.
        check(json!([{"url": "{$invoice_url}", "filename": "{$name}",
                      "content_type": "{$type}"}]))
        .unwrap();
        check(json!(vec![
            json!({"url": "https://x.example.com/a"});
            MAX_ATTACHMENTS
        ]))
        .unwrap();

        let cases = [
            (
                json!({"url": "https://x.example.com/a"}),
                "must be an array",
            ),
            (json!([{"url": "ftp://x.example.com/a"}]), "scheme `ftp`"),
            (
                json!([{"url": "https://me:hunter2@x.example.com/a"}]),
                "`attachments[0].url`: the URL carries credentials",
            ),
            (json!([{"url": "x.example.com/a"}]), "not a valid URL"),
            (
                json!([{"url": "https://x.example.com/a", "filename": "a\r\nb"}]),
                "`attachments[0].filename` must be a file name",
            ),
            (
                json!([{"url": "https://x.example.com/a", "content_type": "pdf"}]),
                "`attachments[0].content_type`",
            ),
            (
                json!([{"url": "https://x.example.com/a", "size": 3}]),
                "unknown field `size` in `attachments[0]`",
            ),
            (
                json!([{"filename": "a.pdf"}]),
                "`attachments[0]` needs a `url`",
            ),
            (
                json!([{"url": "https://x.example.com/a"}, {"url": ["x"]}]),
                "`attachments[1].url` must be a string",
            ),
            (
                json!(vec![
                    json!({"url": "https://x.example.com/a"});
                    MAX_ATTACHMENTS + 1
                ]),
                "at most 10",
            ),
        ];
        for (attachments, needle) in cases {
            let err = check(attachments.clone()).unwrap_err();
            assert!(err.contains(needle), "{attachments}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn html_to_text_keeps_the_words_and_the_lines() {
        let html = "<html><head><title>T</title><STYLE>.x{}</STYLE><script>var a = '<p>';</script>\
                    </head><body><!-- hidden <p> --><div>Hello&nbsp;<i>Ann</i>,</div>\
                    <p>Total: 5 &lt; 7 &amp;&#32;&#x41;</p><ul><li>one</li><li>two</li></ul>\
                    <p>a &bogus; b &amp c</p></body></html>";
        assert_eq!(
            html_to_text(html),
            "T\nHello Ann,\nTotal: 5 < 7 & A\none\ntwo\na &bogus; b &amp c"
        );
        assert_eq!(html_to_text("x < y"), "x < y");
        assert_eq!(html_to_text("<p>a</p>\n\n\n<p>b</p>"), "a\nb");
    }
}

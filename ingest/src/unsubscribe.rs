//! One-click unsubscribe links: `{public_url}/u/{token}`, where the token names the app, the
//! channel and the receiver and is signed with `http.unsubscribe_secret` (HMAC-SHA256), so a
//! receiver can unsubscribe themselves without an API key and nobody can forge a link for
//! someone else.
//!
//! `GET /u/{token}` shows a confirmation page (mail scanners follow links; RFC 8058 forbids
//! unsubscribing on GET); `POST /u/{token}` — the page's button, or the mail client's one-click
//! `List-Unsubscribe=One-Click` — puts the receiver on the app's `unsubscribed` list for that
//! channel, which stops the app's marketing messages to them (see the policies).

use crate::{ApiError, ApiState};
use axum::extract::{Path, State};
use axum::response::Html;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_core::Channel;
use herald_core::config::HttpConfig;
use herald_core::store::StoreError;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The bytes of the signature kept in a token (128 bits).
const SIGNATURE_BYTES: usize = 16;

/// The variable templates use for the link.
pub(crate) const VARIABLE: &str = "unsubscribe_url";

/// What a valid token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Subscription {
    pub app_id: i64,
    pub channel: Channel,
    pub receiver: String,
}

/// The signature of `app.channel.receiver`.
fn sign(secret: &str, app_id: i64, channel: Channel, receiver: &str) -> Vec<u8> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("{app_id}.{channel}.{receiver}").as_bytes());
    mac.finalize().into_bytes()[..SIGNATURE_BYTES].to_vec()
}

/// The receiver's unsubscribe link, when links are configured.
pub(crate) fn link(
    config: &HttpConfig,
    app_id: i64,
    channel: Channel,
    receiver: &str,
) -> Option<String> {
    let (Some(base), Some(secret)) = (&config.public_url, &config.unsubscribe_secret) else {
        return None;
    };
    let signature = sign(secret.expose(), app_id, channel, receiver);
    Some(format!(
        "{}/u/{app_id}.{channel}.{}.{}",
        base.trim_end_matches('/'),
        URL_SAFE_NO_PAD.encode(receiver),
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

/// What `token` names, if its signature is right.
pub(crate) fn verify(config: &HttpConfig, token: &str) -> Option<Subscription> {
    let secret = config.unsubscribe_secret.as_ref()?;
    let mut parts = token.split('.');
    let (Some(app), Some(channel), Some(receiver), Some(signature), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let app_id: i64 = app.parse().ok()?;
    let channel: Channel = channel.parse().ok()?;
    let receiver = String::from_utf8(URL_SAFE_NO_PAD.decode(receiver).ok()?).ok()?;
    let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).expect("any key length");
    mac.update(format!("{app_id}.{channel}.{receiver}").as_bytes());
    // Constant-time comparison of the kept prefix.
    mac.verify_truncated_left(&signature).ok()?;
    (signature.len() == SIGNATURE_BYTES).then_some(Subscription {
        app_id,
        channel,
        receiver,
    })
}

fn bad_token() -> ApiError {
    ApiError::invalid(
        "bad_unsubscribe_token",
        "this unsubscribe link is not valid (or links are not configured)",
    )
}

/// `GET /u/{token}`: a page that asks to confirm, with a button that POSTs.
pub async fn confirm_page(
    State(state): State<ApiState>,
    Path(token): Path<String>,
) -> Result<Html<String>, ApiError> {
    verify(&state.inner.config, &token).ok_or_else(bad_token)?;
    Ok(Html(format!(
        "<!doctype html><meta charset=utf-8><title>Unsubscribe</title>\
         <form method=post action=\"/u/{token}\">\
         <p>Stop receiving marketing messages?</p>\
         <button type=submit name=List-Unsubscribe value=One-Click>Unsubscribe</button></form>"
    )))
}

/// `POST /u/{token}`: unsubscribes the receiver the token names (RFC 8058 one-click, or the
/// confirmation page's button). Doing it twice is harmless.
pub async fn unsubscribe(
    State(state): State<ApiState>,
    Path(token): Path<String>,
) -> Result<Html<&'static str>, ApiError> {
    let s = verify(&state.inner.config, &token).ok_or_else(bad_token)?;
    match state
        .inner
        .store
        .unsubscribe(s.app_id, s.channel, &s.receiver)
        .await
    {
        Ok(_) => Ok(Html(
            "<!doctype html><meta charset=utf-8><title>Unsubscribed</title>\
             <p>You are unsubscribed.</p>",
        )),
        Err(StoreError::NotFound) => Err(bad_token()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::config::Secret;

    fn config() -> HttpConfig {
        HttpConfig {
            public_url: Some("https://push.example.com/".into()),
            unsubscribe_secret: Some(Secret::new("s3cret")),
            ..HttpConfig::default()
        }
    }

    #[test]
    fn links_round_trip_and_cannot_be_forged() {
        let c = config();
        let url = link(&c, 7, Channel::Email, "ann.lee@example.com").unwrap();
        let token = url
            .strip_prefix("https://push.example.com/u/")
            .expect("under the public URL");
        assert_eq!(
            verify(&c, token),
            Some(Subscription {
                app_id: 7,
                channel: Channel::Email,
                receiver: "ann.lee@example.com".into()
            })
        );
        // Someone else's receiver, app or channel with this signature: refused.
        let parts: Vec<&str> = token.split('.').collect();
        let other = URL_SAFE_NO_PAD.encode("bob@example.com");
        for forged in [
            format!("{}.{}.{other}.{}", parts[0], parts[1], parts[3]),
            format!("8.{}.{}.{}", parts[1], parts[2], parts[3]),
            format!("{}.sms.{}.{}", parts[0], parts[2], parts[3]),
            format!("{}.{}.{}.{}", parts[0], parts[1], parts[2], &parts[3][..10]),
            format!("{}.{}.{}", parts[0], parts[1], parts[2]),
            "garbage".to_string(),
        ] {
            assert_eq!(verify(&c, &forged), None, "{forged}");
        }
        // Another secret does not accept it, and without links nothing is made or accepted.
        let other_secret = HttpConfig {
            unsubscribe_secret: Some(Secret::new("other")),
            ..config()
        };
        assert_eq!(verify(&other_secret, token), None);
        assert_eq!(link(&HttpConfig::default(), 7, Channel::Email, "a"), None);
        assert_eq!(verify(&HttpConfig::default(), token), None);
    }
}

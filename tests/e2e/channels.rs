//! Email and webhook end to end: herald sends to a real SMTP server and to an HTTP receiver that
//! verifies the signature independently.

use crate::support::{SmtpSink, TestApp, message_ids, webhook_receiver};
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[tokio::test]
async fn email_arrives_with_subject_and_both_bodies() {
    let smtp = SmtpSink::start_with(&["--permanent", "^refused@"]);
    let app = TestApp::spawn().await;
    let (s, account) = app
        .post("/v1/accounts", json!({"name": "smtp", "channel": "email",
            "config": {"host": "127.0.0.1", "port": smtp.port, "security": "plain", "from": "Herald <noreply@example.com>"}}))
        .await;
    assert_eq!(s, 201, "{account}");
    let (s, t) = app
        .post("/v1/templates", json!({"name": "receipt", "channel": "email", "msg_type": "notice", "account_id": account["id"],
            "content": {"subject": "Order {$order} shipped", "html": "<p>Hi <b>{$name}</b></p>", "text": "Hi {$name}"}}))
        .await;
    assert_eq!(s, 201, "{t}");
    let (s, a) = app
        .post("/v1/send", json!({"template_id": t["id"], "receivers": ["ann@example.com", "refused@example.com"], "variables": {"order": "A-1", "name": "Ann"}}))
        .await;
    assert_eq!(s, 202, "{a}");
    let ids = message_ids(&a);
    let trace = app.wait_for_state(&ids[0], "sent").await;
    assert_eq!(trace["events"][3]["vendor"], "smtp");
    let failed = app.wait_for_state(&ids[1], "send_failed").await;
    assert_eq!(failed["events"][3]["error_code"], "smtp_5xx", "{failed}");

    let got = smtp.messages();
    assert_eq!(got.len(), 1, "{got:?}");
    let m = &got[0];
    assert_eq!(m["rcpt_tos"], json!(["ann@example.com"]));
    assert_eq!(m["subject"], "Order A-1 shipped");
    assert_eq!(m["message_id"], format!("<{}@herald>", ids[0]));
    let parts: Vec<(&str, &str)> = m["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["content_type"].as_str().unwrap(),
                p["content"].as_str().unwrap().trim(),
            )
        })
        .collect();
    assert!(parts.contains(&("text/plain", "Hi Ann")), "{parts:?}");
    assert!(
        parts.contains(&("text/html", "<p>Hi <b>Ann</b></p>")),
        "{parts:?}"
    );
    app.stop().await;
}

/// What the test receiver saw.
#[derive(Default)]
struct Seen {
    verified: Vec<Value>,
    rejected: usize,
}

/// An HTTP receiver that checks `X-Herald-Signature` as the README tells receivers to.
async fn receiver(secret: &'static str) -> (String, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let handler = move |headers: HeaderMap, body: Bytes| {
        let seen = s.clone();
        async move {
            let ts = headers
                .get("x-herald-timestamp")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let sig = headers
                .get("x-herald-signature")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
            mac.update(ts.as_bytes());
            mac.update(b".");
            mac.update(&body);
            let expected = format!("v1={}", hex::encode(mac.finalize().into_bytes()));
            let fresh = ts
                .parse::<i64>()
                .is_ok_and(|t| (chrono_now() - t).abs() < 300);
            if sig != expected || !fresh {
                seen.lock().unwrap().rejected += 1;
                return StatusCode::UNAUTHORIZED;
            }
            seen.lock()
                .unwrap()
                .verified
                .push(serde_json::from_slice(&body).unwrap());
            StatusCode::OK
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let router = axum::Router::new().route("/hook", axum::routing::post(handler));
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, seen)
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn webhook_is_signed_and_a_wrong_secret_fails_permanently() {
    let (url, seen) = receiver("right-secret").await;
    let app = TestApp::spawn().await;
    let mut templates = Vec::new();
    for secret in ["right-secret", "wrong-secret"] {
        let (s, account) = app.post("/v1/accounts", json!({"name": secret, "channel": "webhook", "config": {"url": url, "secret": secret}})).await;
        assert_eq!(s, 201, "{account}");
        let (s, t) = app
            .post("/v1/templates", json!({"name": "hook", "channel": "webhook", "msg_type": "notice", "account_id": account["id"],
                "content": {"event": "order.paid", "order": "{$order}"}}))
            .await;
        assert_eq!(s, 201, "{t}");
        templates.push(t["id"].clone());
    }
    let (_, good) = app.post("/v1/send", json!({"template_id": templates[0], "receivers": ["shop-1"], "variables": {"order": "A-9"}, "biz_id": "b1"})).await;
    let (_, bad) = app.post("/v1/send", json!({"template_id": templates[1], "receivers": ["shop-1"], "variables": {"order": "A-9"}})).await;
    let good_id = &message_ids(&good)[0];
    let sent = app.wait_for_state(good_id, "sent").await;
    assert_eq!(sent["events"][3]["vendor"], "webhook");
    let failed = app
        .wait_for_state(&message_ids(&bad)[0], "send_failed")
        .await;
    assert_eq!(failed["events"][3]["error_code"], "webhook_4xx", "{failed}");

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.rejected, 1);
    assert_eq!(seen.verified.len(), 1);
    let body = &seen.verified[0];
    assert_eq!(body["message_id"], good_id.as_str());
    assert_eq!(body["receiver"], "shop-1");
    assert_eq!(body["biz_id"], "b1");
    assert_eq!(
        body["content"],
        json!({"event": "order.paid", "order": "A-9"})
    );
    app.stop().await;
}

/// A receiver that fails each message's first `failures` calls with `503 Retry-After: 0`.
async fn flaky_receiver(failures: usize) -> (String, Arc<Mutex<Vec<(String, Instant)>>>) {
    webhook_receiver(move |n| {
        let status = if n <= failures {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        (status, "0")
    })
    .await
}

#[tokio::test]
async fn retryable_failures_are_retried_up_to_max_attempts() {
    let (twice_url, twice_calls) = flaky_receiver(2).await;
    let (always_url, always_calls) = flaky_receiver(usize::MAX).await;
    let app = TestApp::spawn_with(|c| c.dispatch.max_attempts = 3).await;
    let mut ids = Vec::new();
    for url in [&twice_url, &always_url] {
        let (_, account) = app
            .post("/v1/accounts", json!({"name": "hook", "channel": "webhook", "config": {"url": url, "secret": "s"}}))
            .await;
        let (_, t) = app
            .post("/v1/templates", json!({"name": "hook", "channel": "webhook", "msg_type": "notice", "account_id": account["id"], "content": {"n": "1"}}))
            .await;
        let (s, a) = app
            .post(
                "/v1/send",
                json!({"template_id": t["id"], "receivers": ["r1"]}),
            )
            .await;
        assert_eq!(s, 202, "{a}");
        ids.push(message_ids(&a)[0].clone());
    }

    let sent = app.wait_for_state(&ids[0], "sent").await;
    let states: Vec<(&str, u64)> = sent["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["state"].as_str().unwrap(), e["attempt"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        &states[2..],
        [
            ("sending", 1),
            ("retrying", 1),
            ("sending", 2),
            ("retrying", 2),
            ("sending", 3),
            ("sent", 3)
        ],
        "{sent}"
    );
    assert_eq!(sent["events"][3]["error_code"], "webhook_5xx");
    assert_eq!(twice_calls.lock().unwrap().len(), 3);

    let failed = app.wait_for_state(&ids[1], "send_failed").await;
    let last = failed["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["attempt"], 3, "{failed}");
    assert_eq!(last["error_code"], "webhook_5xx");
    assert_eq!(always_calls.lock().unwrap().len(), 3);
    app.stop().await;
}

//! Retries beyond the worker's inline wait, expiry and redrive, end to end through a webhook
//! receiver whose answers the test controls.

use crate::support::{TestApp, message_ids, webhook_receiver};
use axum::http::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// A webhook template of `msg_type` on a new account for `url`; returns the template id.
async fn webhook_template(app: &TestApp, url: &str, msg_type: &str) -> Value {
    let account = app.webhook_account("hook", url).await;
    app.webhook_template(account, msg_type).await.into()
}

fn states(trace: &Value) -> Vec<(String, u64)> {
    trace["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["state"].as_str().unwrap().to_string(),
                e["attempt"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_long_retry_after_waits_in_the_schedule_not_in_the_worker() {
    // The first call answers 503 with Retry-After: 2 s, four times the inline limit.
    let (url, calls) = webhook_receiver(|n| {
        if n == 1 {
            (StatusCode::SERVICE_UNAVAILABLE, "2")
        } else {
            (StatusCode::OK, "0")
        }
    })
    .await;
    let app = TestApp::spawn_with(|c| c.dispatch.max_retry_wait = Duration::from_millis(500)).await;
    let template = webhook_template(&app, &url, "notice").await;
    let (s, a) = app
        .post(
            "/v1/send",
            json!({"template_id": template, "receivers": ["r1"]}),
        )
        .await;
    assert_eq!(s, 202, "{a}");
    let id = message_ids(&a).remove(0);
    let waiting = app.wait_for_state(&id, "retrying").await;
    let detail = waiting["events"].as_array().unwrap().last().unwrap()["error_detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(detail.contains("next try at"), "{detail}");
    let sent = app.wait_for_state(&id, "sent").await;
    let got = states(&sent);
    let want = [("sending", 1), ("retrying", 1), ("sending", 2), ("sent", 2)]
        .map(|(s, a)| (s.to_string(), a));
    assert_eq!(&got[2..], want, "{sent}");
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    let waited = calls[1].1 - calls[0].1;
    // The schedule runs on the wall clock, this measure on the monotonic one: allow their drift.
    assert!(
        waited >= Duration::from_millis(1990),
        "retried after {waited:?}"
    );
    assert!(waited < Duration::from_secs(4), "retried after {waited:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_retry_past_the_message_types_age_fails_and_a_deferred_message_expires() {
    // Auth codes may be 1 s old: a 3 s Retry-After would send one late, so it fails instead.
    let (url, calls) = webhook_receiver(|_| (StatusCode::SERVICE_UNAVAILABLE, "3")).await;
    let app = TestApp::spawn_with(|c| {
        c.dispatch.max_retry_wait = Duration::from_millis(500);
        c.dispatch.max_age.auth_code = Duration::from_secs(1);
        c.dispatch.max_age.notice = Duration::from_secs(1);
        c.dispatch.policy_cache_ttl = Duration::from_millis(100);
    })
    .await;
    let code = webhook_template(&app, &url, "auth_code").await;
    let (_, a) = app
        .post(
            "/v1/send",
            json!({"template_id": code, "receivers": ["r1"]}),
        )
        .await;
    let id = message_ids(&a).remove(0);
    let failed = app.wait_for_state(&id, "send_failed").await;
    assert_eq!(
        failed["events"].as_array().unwrap().last().unwrap()["error_code"],
        "webhook_5xx"
    );
    assert_eq!(calls.lock().unwrap().len(), 1);

    // A notice deferred by quiet hours for 3 s is older than its 1 s when the window ends.
    let inbox = app.inbox_template().await;
    let now = chrono::Utc::now();
    let hms = |d: chrono::Duration| (now + d).format("%H:%M:%S").to_string();
    let (s, p) = app
        .call(
            reqwest::Method::PUT,
            "/v1/policy",
            Some(json!({"quiet_hours": {"start": hms(chrono::Duration::minutes(-1)), "end": hms(chrono::Duration::seconds(3))}})),
        )
        .await;
    assert_eq!(s, 200, "{p}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, a) = app
        .post(
            "/v1/send",
            json!({"template_id": inbox, "receivers": ["u1"], "variables": {"name": "x"}}),
        )
        .await;
    let id = message_ids(&a).remove(0);
    app.wait_for_state(&id, "deferred").await;
    let expired = app.wait_for_state(&id, "expired").await;
    assert_eq!(
        expired["events"].as_array().unwrap().last().unwrap()["error_code"],
        "expired"
    );
    app.stop().await;
}

#[tokio::test]
async fn redrive_sends_failed_messages_again_once() {
    // Refused until the receiver is fixed.
    let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = fixed.clone();
    let (url, calls) = webhook_receiver(move |_| {
        if f.load(std::sync::atomic::Ordering::SeqCst) {
            (StatusCode::OK, "0")
        } else {
            (StatusCode::BAD_REQUEST, "0")
        }
    })
    .await;
    let app = TestApp::spawn().await;
    let template = webhook_template(&app, &url, "notice").await;
    let (_, a) = app
        .post(
            "/v1/send",
            json!({"template_id": template, "receivers": ["r1", "r2", "r3"]}),
        )
        .await;
    let ids = message_ids(&a);
    for id in &ids {
        app.wait_for_state(id, "send_failed").await;
    }
    fixed.store(true, std::sync::atomic::Ordering::SeqCst);

    // One by id, then the rest by template; a second redrive finds nothing left.
    let (s, r) = app
        .post("/v1/messages/redrive", json!({"message_ids": [ids[0]]}))
        .await;
    assert_eq!((s, &r["redriven"]), (200, &json!(1)), "{r}");
    let (s, r) = app
        .post("/v1/messages/redrive", json!({"template_id": template}))
        .await;
    assert_eq!((s, &r["redriven"]), (200, &json!(2)), "{r}");
    let (_, r) = app
        .post("/v1/messages/redrive", json!({"message_ids": ids}))
        .await;
    assert_eq!(r["redriven"], 0, "{r}");
    for id in &ids {
        app.wait_for_state(id, "sent").await;
    }
    assert_eq!(calls.lock().unwrap().len(), 6, "three refused, three sent");
    let (s, e) = app
        .post(
            "/v1/messages/redrive",
            json!({"message_ids": [ids[0]], "template_id": template}),
        )
        .await;
    assert_eq!((s, &e["error"]["code"]), (422, &json!("bad_redrive")));
    app.stop().await;
}

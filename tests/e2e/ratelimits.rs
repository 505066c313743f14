//! Rate limits of vendor accounts end to end: pacing, messages held in the schedule, priority
//! lanes and the app's stats, through a webhook receiver that records when each call came.

use crate::support::{TestApp, message_ids, webhook_receiver};
use axum::http::StatusCode;
use reqwest::Method;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// A webhook account limited to `per_second`, and a template of `msg_type` on it for each type
/// in `types`; returns the account id and the template ids.
async fn limited(app: &TestApp, url: &str, per_second: u32, types: &[&str]) -> (i64, Vec<i64>) {
    let account = app.webhook_account("hook", url).await;
    let mut templates = Vec::new();
    for t in types {
        templates.push(app.webhook_template(account, t).await);
    }
    let (s, p) = app
        .call(
            Method::PUT,
            "/v1/policy",
            Some(json!({"rate_limits": [{"account_id": account, "per_second": per_second}]})),
        )
        .await;
    assert_eq!(s, 200, "{p}");
    (account, templates)
}

/// The most calls in any window of `width` starting at a call.
fn busiest(times: &[Instant], width: Duration) -> usize {
    times
        .iter()
        .map(|t| {
            times
                .iter()
                .filter(|u| **u >= *t && **u - *t < width)
                .count()
        })
        .max()
        .unwrap_or(0)
}

fn states(trace: &Value) -> Vec<String> {
    trace["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_rate_limit_paces_sends_and_holds_the_rest_in_the_schedule() {
    let (url, calls) = webhook_receiver(|_| (StatusCode::OK, "0")).await;
    let app = TestApp::spawn_with(|c| c.dispatch.rate_wait = Duration::from_millis(500)).await;
    let (account, templates) = limited(&app, &url, 20, &["notice"]).await;
    let ids = app.send_to_numbered(templates[0], "r", 60).await;

    // While they wait, the app sees them: held in the schedule, and the account booked ahead.
    let deadline = Instant::now() + Duration::from_secs(5);
    let stats = loop {
        let (s, stats) = app.get("/v1/apps/test-app/stats").await;
        assert_eq!(s, 200, "{stats}");
        if stats["waiting"]["rate_limited"].as_i64().unwrap() > 0 {
            break stats;
        }
        assert!(Instant::now() < deadline, "nothing held: {stats}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(stats["rate_limits"][0]["account_id"], account, "{stats}");
    assert_eq!(stats["rate_limits"][0]["per_second"], 20, "{stats}");

    let mut held = 0;
    for id in &ids {
        let trace = app.wait_for_state(id, "sent").await;
        if states(&trace).iter().any(|s| s == "rate_limited") {
            held += 1;
        }
    }
    assert!(
        held >= 30,
        "only {held} of 60 messages were held by the limit"
    );
    let times: Vec<Instant> = calls.lock().unwrap().iter().map(|(_, t)| *t).collect();
    assert_eq!(times.len(), 60, "each message called once");
    // 20 a second, plus the 250 ms burst allowance (5), plus slack for late timers on a loaded
    // machine (calls whose slots passed while a worker was descheduled go together).
    let most = busiest(&times, Duration::from_secs(1));
    assert!(
        most <= 28,
        "{most} calls within one second at a limit of 20/s"
    );
    let span = *times.iter().max().unwrap() - *times.iter().min().unwrap();
    assert!(span >= Duration::from_millis(2_700), "60 calls in {span:?}");
    assert!(
        app.metric(&format!(
            "herald_rate_limited_total{{account_id=\"{account}\"}}"
        ))
        .await
            >= 30.0
    );
    let (s, _) = app.get("/v1/apps/someone-else/stats").await;
    assert_eq!(s, 404);
    app.stop().await;
}

/// A limit far above the traffic holds nothing. At a million a second a reservation's slots
/// span microseconds; the worker used to judge them stale by its clock after the store's round
/// trip, so every caller reserved again and again (a benchmark sent 83 messages a second, half
/// of them `rate_limited`).
#[tokio::test]
async fn a_limit_far_above_the_traffic_holds_nothing() {
    let (url, calls) = webhook_receiver(|_| (StatusCode::OK, "0")).await;
    let app = TestApp::spawn().await;
    let (account, templates) = limited(&app, &url, 1_000_000, &["notice"]).await;
    let mut ids = Vec::new();
    for batch in 0..4 {
        ids.extend(
            app.send_to_numbered(templates[0], &format!("r{batch}"), 500)
                .await,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let called = calls.lock().unwrap().len();
        if called >= ids.len() {
            break;
        }
        assert!(Instant::now() < deadline, "{called} of 2000 calls in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = app
        .metric(&format!(
            "herald_rate_limited_total{{account_id=\"{account}\"}}"
        ))
        .await;
    assert!(held < 20.0, "{held} of 2000 messages waited for the limit");
    app.stop().await;
}

#[tokio::test]
async fn an_auth_code_overtakes_a_marketing_blast_on_a_shared_limit() {
    let (url, calls) = webhook_receiver(|_| (StatusCode::OK, "0")).await;
    let app = TestApp::spawn_with(|c| c.dispatch.rate_wait = Duration::from_millis(500)).await;
    let (_, templates) = limited(&app, &url, 10, &["marketing", "auth_code"]).await;
    let blast = app.send_to_numbered(templates[0], "m", 40).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent_at = Instant::now();
    let code = app
        .send_to_numbered(templates[1], "login", 1)
        .await
        .remove(0);
    app.wait_for_state(&code, "sent").await;
    let took = sent_at.elapsed();
    // The blast needs 4 s at 10/s; the code goes within a few slots.
    assert!(
        took < Duration::from_millis(1_000),
        "the auth code took {took:?}"
    );
    let before_code = calls
        .lock()
        .unwrap()
        .iter()
        .position(|(id, _)| *id == code)
        .unwrap();
    assert!(before_code < 20, "{before_code} marketing calls went first");
    for id in &blast {
        app.wait_for_state(id, "sent").await;
    }
    app.stop().await;
}

#[tokio::test]
async fn a_receiver_limit_spaces_one_receivers_messages_and_drops_none() {
    let app = TestApp::spawn().await;
    let inbox = app.inbox_template().await;
    // Two per two seconds: a burst of two, then one a second.
    let (s, p) = app
        .call(
            Method::PUT,
            "/v1/policy",
            Some(
                json!({"receiver_rate_limits": [{"channel": "inbox", "max": 2, "period_secs": 2}]}),
            ),
        )
        .await;
    assert_eq!(s, 200, "{p}");
    let mut ids = Vec::new();
    for k in 0..5 {
        let (s, a) = app
            .post(
                "/v1/send",
                json!({"template_id": inbox, "receivers": ["u1"], "variables": {"name": format!("m{k}")}}),
            )
            .await;
        assert_eq!(s, 202, "{a}");
        ids.extend(message_ids(&a));
    }
    let (_, a) = app
        .post(
            "/v1/send",
            json!({"template_id": inbox, "receivers": ["u2"], "variables": {"name": "x"}}),
        )
        .await;
    let other = message_ids(&a);
    let sent_at = |trace: &Value| {
        let e = trace["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["state"] == "sent")
            .unwrap();
        chrono::DateTime::parse_from_rfc3339(e["ts"].as_str().unwrap()).unwrap()
    };
    let mut times = Vec::new();
    for id in &ids {
        let trace = app.wait_for_state(id, "sent").await;
        times.push(sent_at(&trace));
    }
    let first = app.wait_for_state(&ids[0], "sent").await;
    assert!(!states(&first).contains(&"rate_limited".to_string()));
    let last = app.wait_for_state(&ids[4], "sent").await;
    assert!(
        states(&last).contains(&"rate_limited".to_string()),
        "{last}"
    );
    // The three held messages were each given their own turn, a second apart, so that they
    // come back one by one rather than together (when all but one would be held again).
    let mut turns = Vec::new();
    for id in &ids[2..] {
        let trace = app.wait_for_state(id, "sent").await;
        let held = trace["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["state"] == "rate_limited")
            .unwrap_or_else(|| panic!("{trace}"));
        let detail = held["error_detail"].as_str().unwrap();
        let (_, at) = detail.rsplit_once("next try at ").expect(detail);
        turns.push(chrono::DateTime::parse_from_rfc3339(at).unwrap());
    }
    assert!(
        turns
            .windows(2)
            .all(|w| w[1] - w[0] >= chrono::Duration::milliseconds(900)),
        "turns {turns:?}"
    );
    // In order, and the fifth at least ~3 s after the first (burst of two, then 1/s).
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let spread = times[4] - times[0];
    assert!(
        spread >= chrono::Duration::milliseconds(2_900),
        "five messages within {spread}"
    );
    // Another receiver is not held.
    let t = app.wait_for_state(&other[0], "sent").await;
    assert!(!states(&t).contains(&"rate_limited".to_string()), "{t}");
    let (s, e) = app
        .call(
            Method::PUT,
            "/v1/policy",
            Some(json!({"receiver_rate_limits": [{"max": 0, "period_secs": 2}]})),
        )
        .await;
    assert_eq!(s, 422, "{e}");
    app.stop().await;
}

//! Pipeline policies through the API on the embedded deployment: the kill switch, receiver
//! lists, quiet hours, content dedup, frequency caps, sensitive words, scheduled sends and
//! cancelling them, and a scheduled message that survives a restart.

use crate::support::{TestApp, message_ids};
use reqwest::Method;
use serde_json::{Value, json};

/// The states of a trace's events, in order.
fn states(trace: &Value) -> Vec<String> {
    trace["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap().to_string())
        .collect()
}

/// The last event of a trace.
fn last_event(trace: &Value) -> &Value {
    trace["events"].as_array().unwrap().last().unwrap()
}

async fn put_policy(app: &TestApp, policy: Value) {
    let (s, a) = app.call(Method::PUT, "/v1/policy", Some(policy)).await;
    assert_eq!(s, 200, "{a}");
}

async fn send_one(app: &TestApp, body: Value) -> String {
    let (s, a) = app.post("/v1/send", body).await;
    assert_eq!(s, 202, "{a}");
    message_ids(&a).remove(0)
}

/// Waits out the policy cache (100 ms in these tests, 5 s by default).
async fn policy_applies() {
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
}

fn fast_policies(c: &mut herald_core::config::Config) {
    c.dispatch.policy_cache_ttl = std::time::Duration::from_millis(100);
}

#[tokio::test]
async fn the_policy_document_is_checked_versioned_and_read_back() {
    let app = TestApp::spawn().await;
    let (s, p) = app.get("/v1/policy").await;
    assert_eq!((s, &p["version"]), (200, &json!(0)));
    let (s, e) = app
        .call(
            Method::PUT,
            "/v1/policy",
            Some(json!({"quiet_hours": {"start": "22:00", "end": "22:00"}})),
        )
        .await;
    assert_eq!((s, &e["error"]["code"]), (422, &json!("bad_policy")), "{e}");
    let (s, e) = app
        .call(Method::PUT, "/v1/policy", Some(json!({"quiet": true})))
        .await;
    assert_eq!((s, &e["error"]["code"]), (400, &json!("bad_json")), "{e}");
    put_policy(&app, json!({"content_dedup_secs": 60})).await;
    put_policy(
        &app,
        json!({"content_dedup_secs": 120, "timezone": "Asia/Shanghai"}),
    )
    .await;
    let (_, p) = app.get("/v1/policy").await;
    assert_eq!(p["version"], 2);
    assert_eq!(p["policy"]["content_dedup_secs"], 120);
    app.stop().await;
}

/// `dispatch.sensitive_words_file` is read again when it changes, with no restart; a file
/// that cannot be read keeps the last good words.
#[tokio::test]
async fn the_shared_sensitive_word_file_reloads_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let words = dir.path().join("words.txt");
    std::fs::write(&words, "# shared by every app\n赌博\n").unwrap();
    let file = words.clone();
    let app = TestApp::spawn_with(move |c| {
        fast_policies(c);
        c.dispatch.sensitive_words_file = Some(file);
    })
    .await;
    let template = app.inbox_template().await;
    put_policy(
        &app,
        json!({"templates": {template.to_string(): {"sensitive_words": "mask"}}}),
    )
    .await;
    policy_applies().await;
    let title_for = |receiver: &'static str| {
        let app = &app;
        async move {
            let id = send_one(
                app,
                json!({"template_id": template, "receivers": [receiver],
                       "variables": {"name": "赌博 lottery"}}),
            )
            .await;
            app.wait_for_state(&id, "sent").await;
            let (_, inbox) = app.get(&format!("/v1/inbox/{receiver}")).await;
            inbox["messages"][0]["content"]["title"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    assert_eq!(title_for("u1").await, "Hi ** lottery");
    std::fs::write(&words, "lottery\n").unwrap();
    policy_applies().await;
    assert_eq!(title_for("u2").await, "Hi 赌博 *******");
    std::fs::write(&words, b"\xff\xfe not UTF-8").unwrap();
    policy_applies().await;
    assert_eq!(title_for("u3").await, "Hi 赌博 *******");
    app.stop().await;
}

#[tokio::test]
async fn kill_switch_lists_dedup_caps_and_sensitive_words_stop_messages_with_their_state() {
    let app = TestApp::spawn_with(fast_policies).await;
    let template = app.inbox_template().await;
    let t = template.to_string();

    // Receiver lists.
    let (s, a) = app
        .post(
            "/v1/lists/block/inbox",
            json!({"receivers": ["mallory", "eve"]}),
        )
        .await;
    assert_eq!((s, &a["added"]), (200, &json!(2)), "{a}");
    let (_, l) = app.get("/v1/lists/block/inbox?limit=1").await;
    assert_eq!(l["receivers"], json!(["eve"]));
    assert_eq!(l["next_after"], "eve");
    let (s, e) = app
        .post("/v1/lists/nope/inbox", json!({"receivers": ["x"]}))
        .await;
    assert_eq!((s, &e["error"]["code"]), (422, &json!("unknown_list")));
    let id = send_one(
        &app,
        json!({"template_id": template, "receivers": ["mallory"], "variables": {"name": "M"}}),
    )
    .await;
    let trace = app.wait_for_state(&id, "blocked").await;
    assert_eq!(last_event(&trace)["error_code"], "blocklisted");
    let (s, a) = app
        .call(
            Method::DELETE,
            "/v1/lists/block/inbox",
            Some(json!({"receivers": ["mallory"]})),
        )
        .await;
    assert_eq!((s, &a["removed"]), (200, &json!(1)));

    // Content dedup and a cap of 2 per hour: of four messages to one receiver, the repeat of
    // the first is a duplicate, the fourth distinct one is over the cap.
    put_policy(
        &app,
        json!({"content_dedup_secs": 600,
               "frequency_caps": [{"channel": "inbox", "max": 2, "period_secs": 3600}]}),
    )
    .await;
    policy_applies().await;
    let mut ids = Vec::new();
    for name in ["A", "A", "B", "C"] {
        ids.push(
            send_one(
                &app,
                json!({"template_id": template, "receivers": ["u1"], "variables": {"name": name}}),
            )
            .await,
        );
    }
    app.wait_for_state(&ids[0], "sent").await;
    app.wait_for_state(&ids[1], "dedup_content").await;
    app.wait_for_state(&ids[2], "sent").await;
    let capped = app.wait_for_state(&ids[3], "dedup_frequency").await;
    assert_eq!(last_event(&capped)["error_code"], "frequency_cap");
    // Another receiver has its own count.
    let other = send_one(
        &app,
        json!({"template_id": template, "receivers": ["u2"], "variables": {"name": "C"}}),
    )
    .await;
    app.wait_for_state(&other, "sent").await;

    // Sensitive words: masked, then rejected; the template kill switch beats both.
    put_policy(
        &app,
        json!({"sensitive_words": ["赌博"], "templates": {t.clone(): {"sensitive_words": "mask"}}}),
    )
    .await;
    policy_applies().await;
    let masked = send_one(
        &app,
        json!({"template_id": template, "receivers": ["u3"], "variables": {"name": "来赌博"}}),
    )
    .await;
    let trace = app.wait_for_state(&masked, "sent").await;
    assert_eq!(
        states(&trace),
        ["accepted", "received", "filtered", "sending", "sent"]
    );
    let (_, inbox) = app.get("/v1/inbox/u3").await;
    assert_eq!(inbox["messages"][0]["content"]["title"], "Hi 来**");
    put_policy(
        &app,
        json!({"sensitive_words": ["赌博"], "templates": {t.clone(): {"sensitive_words": "reject"}}}),
    )
    .await;
    policy_applies().await;
    let rejected = send_one(
        &app,
        json!({"template_id": template, "receivers": ["u3"], "variables": {"name": "赌博"}}),
    )
    .await;
    app.wait_for_state(&rejected, "filtered").await;
    put_policy(&app, json!({"templates": {t: {"discarded": true}}})).await;
    policy_applies().await;
    let off = send_one(
        &app,
        json!({"template_id": template, "receivers": ["u4"], "variables": {"name": "D"}}),
    )
    .await;
    let trace = app.wait_for_state(&off, "discarded").await;
    assert_eq!(last_event(&trace)["error_code"], "template_discarded");
    app.stop().await;
}

#[tokio::test]
async fn allowlists_and_unsubscribes() {
    let app = TestApp::spawn_with(fast_policies).await;
    let notice = app.inbox_template().await;
    let (s, m) = app
        .post(
            "/v1/templates",
            json!({"name": "sale", "channel": "inbox", "msg_type": "marketing",
                   "content": {"title": "Sale", "content": "for {$name}"}}),
        )
        .await;
    assert_eq!(s, 201, "{m}");
    let marketing = m["id"].as_i64().unwrap();
    app.post("/v1/lists/unsubscribed/inbox", json!({"receivers": ["u1"]}))
        .await;
    policy_applies().await;
    let sale = send_one(
        &app,
        json!({"template_id": marketing, "receivers": ["u1"], "variables": {"name": "x"}}),
    )
    .await;
    let trace = app.wait_for_state(&sale, "blocked").await;
    assert_eq!(last_event(&trace)["error_code"], "unsubscribed");
    // Unsubscribing stops marketing only.
    let bill = send_one(
        &app,
        json!({"template_id": notice, "receivers": ["u1"], "variables": {"name": "x"}}),
    )
    .await;
    app.wait_for_state(&bill, "sent").await;

    app.post("/v1/lists/allow/inbox", json!({"receivers": ["tester"]}))
        .await;
    policy_applies().await;
    let ok = send_one(
        &app,
        json!({"template_id": notice, "receivers": ["tester"], "variables": {"name": "x"}}),
    )
    .await;
    let no = send_one(
        &app,
        json!({"template_id": notice, "receivers": ["u9"], "variables": {"name": "x"}}),
    )
    .await;
    app.wait_for_state(&ok, "sent").await;
    let trace = app.wait_for_state(&no, "blocked").await;
    assert_eq!(last_event(&trace)["error_code"], "not_allowlisted");
    app.stop().await;
}

#[tokio::test]
async fn quiet_hours_defer_a_notice_until_the_window_ends() {
    let app = TestApp::spawn_with(fast_policies).await;
    let template = app.inbox_template().await;
    // A window (UTC, to the second) that began a minute ago and ends in five seconds.
    let now = chrono::Utc::now();
    let hms = |d: chrono::Duration| (now + d).format("%H:%M:%S").to_string();
    put_policy(
        &app,
        json!({"quiet_hours": {"start": hms(chrono::Duration::minutes(-1)),
                               "end": hms(chrono::Duration::seconds(5)),
                               "notice": "defer", "marketing": "drop"}}),
    )
    .await;
    policy_applies().await;
    let id = send_one(
        &app,
        json!({"template_id": template, "receivers": ["u1"], "variables": {"name": "x"}}),
    )
    .await;
    let trace = app.wait_for_state(&id, "deferred").await;
    let detail = last_event(&trace)["error_detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(detail.starts_with("until "), "{detail}");
    // Not sent before the window's end, sent after it.
    let until = chrono::DateTime::parse_from_rfc3339(&detail["until ".len()..]).unwrap();
    let wait = (until.to_utc() - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    assert!(wait <= std::time::Duration::from_secs(5), "{detail}");
    tokio::time::sleep(wait).await;
    let trace = app.wait_for_state(&id, "sent").await;
    let sent_at =
        chrono::DateTime::parse_from_rfc3339(last_event(&trace)["ts"].as_str().unwrap()).unwrap();
    assert!(sent_at >= until, "sent at {sent_at}, window ended {until}");
    app.stop().await;
}

#[tokio::test]
async fn scheduled_sends_wait_for_send_at_and_can_be_cancelled() {
    let app = TestApp::spawn().await;
    let template = app.inbox_template().await;
    let at = chrono::Utc::now() + chrono::Duration::seconds(3);
    let later = send_one(&app, json!({"template_id": template, "receivers": ["u1"], "variables": {"name": "x"}, "send_at": at})).await;
    let cancelled = send_one(&app, json!({"template_id": template, "receivers": ["u2"], "variables": {"name": "y"}, "send_at": at + chrono::Duration::seconds(60)})).await;
    app.wait_for_state(&later, "scheduled").await;
    app.wait_for_state(&cancelled, "scheduled").await;

    let (s, c) = app
        .call(Method::DELETE, &format!("/v1/messages/{cancelled}"), None)
        .await;
    assert_eq!((s, &c["state"]), (200, &json!("cancelled")), "{c}");
    let trace = app.wait_for_state(&cancelled, "discarded").await;
    assert_eq!(last_event(&trace)["error_code"], "cancelled");
    let (s, _) = app
        .call(Method::DELETE, &format!("/v1/messages/{cancelled}"), None)
        .await;
    assert_eq!(s, 404);

    let trace = app.wait_for_state(&later, "sent").await;
    let sent_at =
        chrono::DateTime::parse_from_rfc3339(last_event(&trace)["ts"].as_str().unwrap()).unwrap();
    assert!(sent_at >= at, "sent at {sent_at}, due {at}");
    assert!(
        sent_at < at + chrono::Duration::seconds(3),
        "sent at {sent_at}, due {at}"
    );
    // Once sent, there is nothing left to cancel.
    let (s, _) = app
        .call(Method::DELETE, &format!("/v1/messages/{later}"), None)
        .await;
    assert_eq!(s, 404);

    let (s, e) = app
        .post(
            "/v1/send",
            json!({"template_id": template, "receivers": ["u1"], "variables": {"name": "x"},
                                  "send_at": chrono::Utc::now() + chrono::Duration::days(400)}),
        )
        .await;
    assert_eq!((s, &e["error"]["code"]), (422, &json!("send_at_too_far")));
    let (s, e) = app
        .post(
            "/v1/send",
            json!({"template_id": template, "receivers": ["u1"], "variables": {"name": "x"},
                                  "timezone": "Mars/Olympus"}),
        )
        .await;
    assert_eq!((s, &e["error"]["code"]), (422, &json!("bad_timezone")));
    app.stop().await;
}

//! Tracing for business teams: an app's messages to one receiver, page by page, and the states
//! of a template's messages of one day; another app sees none of them.

use crate::support::{TestApp, message_ids};
use herald_core::store::Store;
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

/// A key of a second app in `app`'s store.
async fn other_app_key(app: &TestApp) -> String {
    let url = format!("sqlite://{}", app.dir.path().join("herald.db").display());
    let store = Store::open(&url).await.unwrap();
    store.create_app("other-app").await.unwrap().1
}

/// Message ids of a page of `GET /v1/receivers/{receiver}/messages`.
fn ids(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn receivers_messages_and_template_stats() {
    check_receivers_messages_and_template_stats(TestApp::spawn().await, None).await;
}

/// The same answers when the store's index retains messages for 3 s only: messages accepted
/// before that horizon are read from the warehouse, and a page can hold both kinds.
#[tokio::test]
async fn receivers_messages_and_template_stats_past_the_index_retention() {
    let retention = Duration::from_secs(3);
    let app = TestApp::spawn_with(|c| c.analytics.index_retention = retention).await;
    check_receivers_messages_and_template_stats(app, Some(retention)).await;
}

/// Sends four messages and checks both endpoints' answers. With `retention`, the first two are
/// older than the index's horizon when the answers are read (the last two are too, if reading
/// takes longer than `retention`), and every receiver query gives `from`.
async fn check_receivers_messages_and_template_stats(app: TestApp, retention: Option<Duration>) {
    let template = app.inbox_template().await;
    let mut sent: Vec<(&str, String)> = Vec::new();
    for (n, receiver) in ["alice", "alice", "bob", "alice"].into_iter().enumerate() {
        if let (2, Some(retention)) = (n, retention) {
            for (_, id) in &sent {
                app.wait_for_state(id, "sent").await;
            }
            tokio::time::sleep(retention + Duration::from_millis(500)).await;
        }
        let (s, a) = app
            .post(
                "/v1/send",
                json!({"template_id": template, "receivers": [receiver], "variables": {"name": "A"}}),
            )
            .await;
        assert_eq!(s, 202, "{a}");
        sent.extend(message_ids(&a).into_iter().map(|id| (receiver, id)));
    }
    let (mut day, mut shanghai_day) = (String::new(), String::new());
    for (_, id) in &sent {
        let trace = app.wait_for_state(id, "sent").await;
        let accepted = trace["events"][0]["ts"].as_str().unwrap();
        day = accepted[..10].to_string();
        let in_shanghai =
            chrono::DateTime::parse_from_rfc3339(accepted).unwrap() + chrono::Duration::hours(8);
        shanghai_day = in_shanghai.format("%Y-%m-%d").to_string();
    }
    let alice: Vec<String> = sent
        .iter()
        .rev()
        .filter(|(r, _)| *r == "alice")
        .map(|(_, id)| id.clone())
        .collect();

    // Without `from`, the list starts at the index's horizon.
    let since = if retention.is_some() {
        let (s, recent) = app.get("/v1/receivers/alice/messages").await;
        assert_eq!(s, 200, "{recent}");
        assert!(!ids(&recent).contains(&alice[1]), "{recent}");
        assert!(!ids(&recent).contains(&alice[2]), "{recent}");
        "from=2001-01-01T00:00:00Z&"
    } else {
        ""
    };
    let list = |query: String| {
        let app = &app;
        async move {
            app.get(&format!("/v1/receivers/alice/messages?{since}{query}"))
                .await
        }
    };
    // Newest first, each with its current state.
    let (s, page) = list(String::new()).await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(ids(&page), alice);
    let first = &page["messages"][0];
    assert_eq!(
        (&first["state"], &first["channel"], &first["template_id"]),
        (&json!("sent"), &json!("inbox"), &json!(template))
    );
    assert!(first["accepted_at"].is_string() && first["updated_at"].is_string());
    assert_eq!(page["next_cursor"], Value::Null);
    // Pages of two.
    let (_, one) = list("limit=2".into()).await;
    assert_eq!(ids(&one), alice[..2]);
    let cursor = one["next_cursor"].as_str().unwrap();
    let (_, two) = list(format!("limit=2&cursor={cursor}")).await;
    assert_eq!(ids(&two), alice[2..]);
    assert_eq!(two["next_cursor"], Value::Null);
    // A range of acceptance times, [from, to): the middle message's time splits them.
    let middle = page["messages"][1]["accepted_at"].as_str().unwrap();
    let (_, from) = app
        .get(&format!("/v1/receivers/alice/messages?from={middle}"))
        .await;
    assert_eq!(ids(&from), alice[..2]);
    let (_, to) = list(format!("to={middle}")).await;
    assert_eq!(ids(&to), alice[2..]);
    let (_, none) = app
        .get(&format!(
            "/v1/receivers/alice/messages?from={middle}&to={middle}"
        ))
        .await;
    assert_eq!(ids(&none), Vec::<String>::new());
    for (query, code) in [
        ("from=yesterday", "bad_time"),
        ("limit=0", "bad_limit"),
        ("cursor=nonsense", "bad_cursor"),
        (
            "from=2026-11-27T00:00:00Z&to=2026-11-26T00:00:00Z",
            "bad_range",
        ),
    ] {
        let (s, e) = app
            .get(&format!("/v1/receivers/alice/messages?{query}"))
            .await;
        assert_eq!((s, &e["error"]["code"]), (422, &json!(code)), "{query}");
    }

    // The day's messages of the template by state: each once in `states`, in every state it
    // reached in `reached`.
    let (s, stats) = app
        .get(&format!("/v1/templates/{template}/stats?date={day}"))
        .await;
    assert_eq!(s, 200, "{stats}");
    assert_eq!(
        (&stats["messages"], &stats["date"], &stats["time_zone"]),
        (&json!(4), &json!(day), &json!("UTC"))
    );
    assert_eq!(stats["states"]["sent"], 4, "{stats}");
    assert_eq!(stats["states"]["accepted"], 0, "{stats}");
    for state in ["accepted", "received", "sending", "sent"] {
        assert_eq!(stats["reached"][state], 4, "{state}: {stats}");
    }
    assert_eq!(stats["reached"]["send_failed"], 0);
    let (_, empty) = app
        .get(&format!("/v1/templates/{template}/stats?date=2001-01-01"))
        .await;
    assert_eq!(empty["messages"], 0);
    let (s, e) = app
        .get(&format!("/v1/templates/{template}/stats?date=27-11-2026"))
        .await;
    assert_eq!((s, &e["error"]["code"]), (422, &json!("bad_date")));
    // A calendar day of another time zone (Shanghai is UTC+8 all year).
    let (s, local) = app
        .get(&format!(
            "/v1/templates/{template}/stats?date={shanghai_day}&timezone=Asia/Shanghai"
        ))
        .await;
    assert_eq!(s, 200, "{local}");
    assert_eq!(
        (
            &local["messages"],
            &local["time_zone"],
            &local["states"]["sent"]
        ),
        (&json!(4), &json!("Asia/Shanghai"), &json!(4)),
        "{local}"
    );
    let (s, e) = app
        .get(&format!(
            "/v1/templates/{template}/stats?timezone=Mars/Olympus"
        ))
        .await;
    assert_eq!((s, &e["error"]["code"]), (422, &json!("bad_timezone")));
    let (s, _) = app.get("/v1/templates/999999/stats").await;
    assert_eq!(s, 404);

    // Another app sees no message and not the template.
    let other = other_app_key(&app).await;
    let (s, page) = app
        .call_as(
            &other,
            Method::GET,
            &format!("/v1/receivers/alice/messages?{since}"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(ids(&page), Vec::<String>::new());
    let (s, e) = app
        .call_as(
            &other,
            Method::GET,
            &format!("/v1/templates/{template}/stats?date={day}"),
            None,
        )
        .await;
    assert_eq!((s, &e["error"]["code"]), (404, &json!("not_found")));
    app.stop().await;
}

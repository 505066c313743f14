//! The HTTP API: the README's walkthrough, templates, idempotency and every bad-input code.

use crate::support::{TestApp, message_ids, sql_csv};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn inbox_walkthrough_send_trace_list_read_and_sql() {
    let app = TestApp::spawn().await;
    let (s, h) = app.get("/health").await;
    assert_eq!((s, &h["status"]), (200, &json!("ok")));
    let template = app.inbox_template().await;

    let mut ids = Vec::new();
    for name in ["Ann", "Bob", "Cy"] {
        let (s, a) = app.post("/v1/send", json!({"template_id": template, "receivers": ["u1"], "variables": {"name": name}, "biz_id": "order-7"})).await;
        assert_eq!(s, 202, "{a}");
        ids.extend(message_ids(&a));
    }
    let trace = app.wait_for_state(&ids[2], "sent").await;
    let states: Vec<&str> = trace["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["accepted", "received", "sending", "sent"]);
    assert_eq!(trace["events"][0]["biz_id"], "order-7");
    for id in &ids {
        app.wait_for_state(id, "sent").await;
    }

    // Newest first, two per page, then the rest through the cursor.
    let (s, page1) = app.get("/v1/inbox/u1?limit=2").await;
    assert_eq!(s, 200);
    let titles: Vec<&str> = page1["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"]["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["Hi Cy", "Hi Bob"]);
    let cursor = page1["next_cursor"].as_str().unwrap();
    let (_, page2) = app
        .get(&format!("/v1/inbox/u1?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(page2["messages"][0]["content"]["content"], "Welcome, Ann!");
    assert_eq!(page2["messages"].as_array().unwrap().len(), 1);

    let (s, r) = app
        .post("/v1/inbox/u1/read", json!({"message_ids": [ids[0]]}))
        .await;
    assert_eq!((s, &r["marked_read"]), (200, &json!(1)));
    let (_, unread) = app.get("/v1/inbox/u1?unread=true").await;
    assert_eq!(unread["messages"].as_array().unwrap().len(), 2);

    let csv = sql_csv(
        &app.warehouse(),
        "SELECT state, count(*) AS n FROM delivery_events GROUP BY state ORDER BY state",
    )
    .await;
    assert_eq!(
        csv.trim(),
        "state,n\naccepted,3\nreceived,3\nsending,3\nsent,3"
    );

    // The analytics role keeps the windowed stats up to date (a pass every 100 ms here).
    let stats = "SELECT state, sum(events) AS n FROM delivery_stats_minute GROUP BY state \
                 UNION ALL SELECT 'hour ' || state, sum(events) FROM delivery_stats_hour \
                 GROUP BY state ORDER BY 1";
    let want = "state,n\naccepted,3\nhour accepted,3\nhour received,3\nhour sending,3\n\
                hour sent,3\nreceived,3\nsending,3\nsent,3";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sql_csv(&app.warehouse(), stats).await.trim() != want {
        assert!(
            std::time::Instant::now() < deadline,
            "stats never caught up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let metrics = app.metrics_text().await;
    for table in ["delivery_stats_minute", "delivery_stats_hour"] {
        let line = format!("herald_stats_late_events_total{{table=\"{table}\"}} 0");
        assert!(metrics.contains(&line), "{line} missing: {metrics}");
    }

    // A reader herald did not write (pyarrow) sees the same table and the contract's columns.
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/read_parquet.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(app.warehouse())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pyarrow failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        read["states"],
        json!({"accepted": 3, "received": 3, "sending": 3, "sent": 3})
    );
    assert_eq!(read["distinct_sent"], 3);
    for column in [
        "event_id",
        "ts",
        "message_id",
        "request_id",
        "biz_id",
        "app",
        "template_id",
        "channel",
        "msg_type",
        "receiver",
        "state",
        "vendor",
        "account_id",
        "vendor_message_id",
        "attempt",
        "error_code",
        "error_detail",
        "latency_ms",
        "billing_units",
        "cost_micros",
        "currency",
    ] {
        assert!(
            read["columns"].as_array().unwrap().contains(&json!(column)),
            "column {column} missing"
        );
    }
    assert_eq!(app.metric("herald_messages_accepted_total").await, 3.0);
    app.stop().await;
}

#[tokio::test]
async fn batch_send_answers_one_id_per_receiver() {
    let app = TestApp::spawn().await;
    let template = app.inbox_template().await;
    let (s, a) = app
        .post(
            "/v1/send/batch",
            json!({"template_id": template, "messages": [
            {"receivers": ["a", "b"], "variables": {"name": "A"}},
            {"receivers": ["c"], "variables": {"name": "C"}, "biz_id": "x"}]}),
        )
        .await;
    assert_eq!(s, 202, "{a}");
    let msgs = a["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 3);
    assert_eq!(
        (msgs[2]["receiver"].as_str(), msgs[2]["index"].as_u64()),
        (Some("c"), Some(1))
    );
    let t = app
        .wait_for_state(msgs[2]["message_id"].as_str().unwrap(), "sent")
        .await;
    assert_eq!(t["events"][0]["biz_id"], "x");
    let (_, inbox) = app.get("/v1/inbox/c").await;
    assert_eq!(inbox["messages"][0]["content"]["title"], "Hi C");
    app.stop().await;
}

#[tokio::test]
async fn templates_are_created_listed_updated_and_soft_deleted() {
    let app = TestApp::spawn().await;
    let id = app.inbox_template().await;
    let (s, t) = app.get(&format!("/v1/templates/{id}")).await;
    assert_eq!((s, t["version"].as_i64()), (200, Some(1)));
    let (s, t) = app
        .call(Method::PUT, &format!("/v1/templates/{id}"), Some(json!({"name": "welcome2", "channel": "inbox", "msg_type": "marketing", "content": {"content": "{$x}"}})))
        .await;
    assert_eq!(
        (s, t["version"].as_i64(), t["msg_type"].as_str()),
        (200, Some(2), Some("marketing"))
    );
    let (_, list) = app.get("/v1/templates").await;
    assert_eq!(list["templates"].as_array().unwrap().len(), 1);
    let (s, _) = app
        .call(Method::DELETE, &format!("/v1/templates/{id}"), None)
        .await;
    assert_eq!(s, 204);
    let (s, _) = app.get(&format!("/v1/templates/{id}")).await;
    assert_eq!(s, 404);
    let (s, e) = app
        .post(
            "/v1/send",
            json!({"template_id": id, "receivers": ["u"], "variables": {"x": 1}}),
        )
        .await;
    assert_eq!((s, &e["error"]["code"]), (404, &json!("unknown_template")));
    // Another app's key sees nothing of this app.
    let (s, _) = app
        .call_as("hk_not_a_key", Method::GET, "/v1/templates", None)
        .await;
    assert_eq!(s, 401);
    app.stop().await;
}

#[tokio::test]
async fn accounts_are_validated_and_their_secrets_masked() {
    let app = TestApp::spawn().await;
    let (s, a) = app
        .post("/v1/accounts", json!({"name": "hooks", "channel": "webhook", "config": {"url": "http://127.0.0.1:9/x", "secret": "s3cret"}}))
        .await;
    assert_eq!(s, 201, "{a}");
    assert_eq!(a["config"]["secret"], "***");
    let (_, got) = app.get(&format!("/v1/accounts/{}", a["id"])).await;
    assert!(!got.to_string().contains("s3cret"));
    let (s, e) = app
        .post(
            "/v1/accounts",
            json!({"name": "bad", "channel": "webhook", "config": {"url": "ftp://x"}}),
        )
        .await;
    assert_eq!(
        (s, &e["error"]["code"]),
        (422, &json!("bad_account_config")),
        "{e}"
    );
    let (s, e) = app
        .post(
            "/v1/accounts",
            json!({"name": "bad", "channel": "pager", "config": {}}),
        )
        .await;
    assert_eq!((s, &e["error"]["code"]), (422, &json!("unknown_channel")));
    // An email template must name an email account of this app.
    let (s, e) = app
        .post("/v1/templates", json!({"name": "t", "channel": "email", "msg_type": "notice", "account_id": a["id"], "content": {"subject": "s", "text": "t"}}))
        .await;
    assert_eq!(
        (s, &e["error"]["code"]),
        (422, &json!("account_channel_mismatch"))
    );
    app.stop().await;
}

#[tokio::test]
async fn idempotency_key_repeats_the_first_answer_and_sends_once() {
    let app = TestApp::spawn().await;
    let template = app.inbox_template().await;
    let body = json!({"template_id": template, "receivers": ["idem"], "variables": {"name": "I"}});
    let send = |b: serde_json::Value| {
        app.http
            .post(app.url("/v1/send"))
            .bearer_auth(&app.key)
            .header("Idempotency-Key", "k-1")
            .json(&b)
            .send()
    };
    let first = send(body.clone()).await.unwrap();
    assert_eq!(first.status(), 202);
    let first: serde_json::Value = first.json().await.unwrap();
    let again = send(body.clone()).await.unwrap();
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<serde_json::Value>().await.unwrap(), first);
    let other =
        send(json!({"template_id": template, "receivers": ["idem2"], "variables": {"name": "I"}}))
            .await
            .unwrap();
    assert_eq!(other.status(), 422);
    app.wait_for_state(&message_ids(&first)[0], "sent").await;
    let (_, inbox) = app.get("/v1/inbox/idem").await;
    assert_eq!(inbox["messages"].as_array().unwrap().len(), 1);
    assert_eq!(app.metric("herald_messages_accepted_total").await, 1.0);
    app.stop().await;
}

#[tokio::test]
async fn every_bad_input_has_its_code_and_publishes_nothing() {
    let app = TestApp::spawn_with(|c| {
        c.http.max_receivers = 3;
        c.http.max_body_bytes = 2048;
        c.http.max_batch_messages = 2;
    })
    .await;
    let inbox = app.inbox_template().await;
    let (_, email) = app
        .post("/v1/accounts", json!({"name": "smtp", "channel": "email", "config": {"host": "127.0.0.1", "port": 2525, "security": "plain", "from": "h@example.com"}}))
        .await;
    let (s, et) = app
        .post("/v1/templates", json!({"name": "e", "channel": "email", "msg_type": "notice", "account_id": email["id"], "content": {"subject": "Hi {$name}", "text": "t"}}))
        .await;
    assert_eq!(s, 201, "{et}");
    let email_template = et["id"].as_i64().unwrap();

    let cases = [
        (
            json!({"template_id": 999, "receivers": ["u"], "variables": {}}),
            404,
            "unknown_template",
        ),
        (
            json!({"template_id": inbox, "receivers": ["u"], "variables": {}}),
            422,
            "missing_variable",
        ),
        (
            json!({"template_id": email_template, "receivers": ["ok@example.com", "not-an-address"], "variables": {"name": "n"}}),
            422,
            "bad_receiver",
        ),
        (
            json!({"template_id": inbox, "receivers": ["a", "b", "c", "d"], "variables": {"name": "n"}}),
            422,
            "too_many_receivers",
        ),
        (
            json!({"template_id": inbox, "receivers": [], "variables": {"name": "n"}}),
            422,
            "no_receivers",
        ),
        (
            json!({"template_id": inbox, "receivers": ["u"], "variables": {"name": "n"}, "colour": 1}),
            400,
            "bad_json",
        ),
        (
            json!({"template_id": inbox, "receivers": ["u"], "variables": {"name": "x".repeat(3000)}}),
            413,
            "body_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let (s, e) = app.post("/v1/send", body.clone()).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (status, Some(code)),
            "{body} -> {e}"
        );
        assert!(
            e["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Every bad item is named, and one bad receiver among good ones publishes nothing.
    let (s, e) = app
        .post(
            "/v1/send/batch",
            json!({"template_id": email_template, "messages": [
            {"receivers": ["good@example.com", "bad"], "variables": {"name": "n"}},
            {"receivers": ["also-bad"], "variables": {}}]}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (422, Some("invalid_request"))
    );
    let paths: Vec<&str> = e["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "messages[0].receivers[1]",
            "messages[1].variables.name",
            "messages[1].receivers[0]"
        ]
    );
    let (s, e) = app
        .post("/v1/send/batch", json!({"template_id": inbox, "messages": [{"receivers": ["a"]}, {"receivers": ["b"]}, {"receivers": ["c"]}]}))
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (422, Some("too_many_messages"))
    );
    let (s, e) = app
        .call_as("wrong", Method::POST, "/v1/send", Some(json!({})))
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let resp = app
        .http
        .post(app.url("/v1/send"))
        .bearer_auth(&app.key)
        .body("{")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    assert_eq!(app.metric("herald_messages_accepted_total").await, 0.0);
    assert_eq!(app.metric("herald_requests_accepted_total").await, 0.0);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let csv = sql_csv(
        &app.warehouse(),
        "SELECT count(*) AS n FROM delivery_events",
    )
    .await;
    assert_eq!(csv.trim(), "n\n0", "nothing may reach the bus");
    app.stop().await;
}

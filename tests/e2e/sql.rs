//! `POST /v1/sql`: read-only SQL over the warehouse. Each app's keys see only that app's rows
//! (and no table without an `app` column); an operator app's `admin` key sees everything.
//! Answers come as JSON lines, CSV, a text table or a Parquet file.

use crate::support::{TestApp, message_ids, test_config};
use herald_core::store::Store;
use reqwest::Method;
use serde_json::{Value, json};

const SENT_PER_APP: &str = "SELECT app, count(*) AS n FROM delivery_events \
    WHERE state = 'sent' GROUP BY app ORDER BY app";

/// Sends `n` inbox messages as `key` with its own new template, and waits until each is sent.
async fn send_inbox(app: &TestApp, key: &str, n: usize) {
    let (s, t) = app
        .call_as(
            key,
            Method::POST,
            "/v1/templates",
            Some(
                json!({"name": "w", "channel": "inbox", "msg_type": "notice",
                        "content": {"title": "Hi", "content": "Hello"}}),
            ),
        )
        .await;
    assert_eq!(s, 201, "{t}");
    let receivers: Vec<String> = (0..n).map(|i| format!("u{i}")).collect();
    let body = json!({"template_id": t["id"], "receivers": receivers});
    let (s, a) = app.call_as(key, Method::POST, "/v1/send", Some(body)).await;
    assert_eq!(s, 202, "{a}");
    for id in message_ids(&a) {
        let (s, trace) = wait_sent(app, key, &id).await;
        assert_eq!(s, 200, "{trace}");
    }
}

async fn wait_sent(app: &TestApp, key: &str, id: &str) -> (u16, Value) {
    for _ in 0..400 {
        let (s, t) = app
            .call_as(key, Method::GET, &format!("/v1/messages/{id}"), None)
            .await;
        if s == 200 && t["state"] == "sent" {
            return (s, t);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("message {id} was never sent");
}

/// `POST /v1/sql` as `key`: the status and the body as text.
async fn sql(app: &TestApp, key: &str, query: &str, format: &str) -> (u16, String) {
    let resp = app
        .http
        .post(app.url("/v1/sql"))
        .bearer_auth(key)
        .json(&json!({"sql": query, "format": format}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// The error code of a failed `POST /v1/sql`.
async fn sql_error(app: &TestApp, key: &str, query: &str) -> (u16, String) {
    let (s, body) = sql(app, key, query, "csv").await;
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    (s, v["error"]["code"].as_str().unwrap_or(&body).to_string())
}

#[tokio::test]
async fn each_app_reads_only_its_own_rows_and_operators_read_everything() {
    let app = TestApp::spawn_with(|c| {
        c.http.operator_apps = vec!["ops".into()];
        c.http.sql_max_rows = 5;
    })
    .await;
    let store = Store::open(&test_config(app.dir.path()).store_url())
        .await
        .unwrap();
    let other = store.create_app("intruder").await.unwrap().1;
    let ops = store.create_app("ops").await.unwrap().1;
    send_inbox(&app, &app.key, 3).await;
    send_inbox(&app, &other, 2).await;
    // A table without an `app` column, as reconciliation writes (vendor bills).
    let bills = herald_analytics::sql::query(
        std::path::Path::new("/nonexistent"),
        "SELECT 'b-1' AS bill_id, CAST(7 AS BIGINT) AS units",
    )
    .await
    .unwrap();
    herald_analytics::Warehouse::local(app.warehouse())
        .write_parquet("vendor_bills/part-0.parquet", &bills[0])
        .unwrap();

    // Each app counts its own messages only, whatever it names.
    assert_eq!(
        sql(&app, &app.key, SENT_PER_APP, "csv").await,
        (200, "app,n\ntest-app,3\n".to_string())
    );
    assert_eq!(
        sql(&app, &other, SENT_PER_APP, "csv").await,
        (200, "app,n\nintruder,2\n".to_string())
    );
    for sneaky in [
        "SELECT count(*) AS n FROM delivery_events WHERE app = 'intruder'",
        "SELECT count(*) AS n FROM delivery_stats_minute WHERE app <> 'test-app'",
        "SELECT count(*) AS n FROM (SELECT app FROM delivery_events UNION ALL \
         SELECT app FROM delivery_stats_hour) WHERE app = 'intruder'",
    ] {
        assert_eq!(
            sql(&app, &app.key, sneaky, "csv").await,
            (200, "n\n0\n".to_string()),
            "{sneaky}"
        );
    }
    assert_eq!(
        sql_error(&app, &app.key, "SELECT count(*) FROM vendor_bills").await,
        (422, "bad_sql".to_string())
    );
    // Its stats are there too.
    let (s, stats) = sql(
        &app,
        &app.key,
        "SELECT DISTINCT app FROM delivery_stats_hour",
        "csv",
    )
    .await;
    assert_eq!(s, 200, "{stats}");
    assert!(!stats.contains("intruder"), "{stats}");

    // The operator app's admin key sees every app and every table; its read key does not.
    assert_eq!(
        sql(&app, &ops, SENT_PER_APP, "csv").await,
        (200, "app,n\nintruder,2\ntest-app,3\n".to_string())
    );
    assert_eq!(
        sql(
            &app,
            &ops,
            "SELECT sum(units) AS u FROM vendor_bills",
            "csv"
        )
        .await,
        (200, "u\n7\n".to_string())
    );
    let (s, k) = app
        .call_as(
            &ops,
            Method::POST,
            "/v1/keys",
            Some(json!({"name": "r", "scopes": ["read"]})),
        )
        .await;
    assert_eq!(s, 201, "{k}");
    let ops_reader = k["key"].as_str().unwrap().to_string();
    assert_eq!(
        sql(&app, &ops_reader, SENT_PER_APP, "csv").await,
        (200, "app,n\n".to_string())
    );

    // Formats: JSON lines, a table, Parquet (read back through the warehouse's own SQL).
    let (s, lines) = sql(&app, &app.key, SENT_PER_APP, "json").await;
    assert_eq!(s, 200);
    let rows: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows, vec![json!({"app": "test-app", "n": 3})]);
    let (s, table) = sql(&app, &app.key, SENT_PER_APP, "table").await;
    assert_eq!(s, 200);
    assert!(table.contains("| test-app | 3 |"), "{table}");
    let resp = app
        .http
        .post(app.url("/v1/sql"))
        .bearer_auth(&other)
        .json(&json!({"sql": SENT_PER_APP, "format": "parquet"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"],
        "application/vnd.apache.parquet"
    );
    let bytes = resp.bytes().await.unwrap();
    let copy = tempfile::tempdir().unwrap();
    std::fs::create_dir(copy.path().join("answer")).unwrap();
    std::fs::write(copy.path().join("answer/a.parquet"), &bytes).unwrap();
    assert_eq!(
        crate::support::sql_csv(copy.path(), "SELECT app, n FROM answer").await,
        "app,n\nintruder,2\n"
    );

    // Bad statements, writes and too large results get their own codes; send-only keys none.
    for (query, code) in [
        ("SELEC 1", "bad_sql"),
        ("SELECT nope FROM delivery_events", "bad_sql"),
        ("DROP TABLE delivery_events", "sql_not_read_only"),
        (
            "INSERT INTO delivery_events SELECT * FROM delivery_events",
            "sql_not_read_only",
        ),
        ("SELECT * FROM delivery_events", "sql_result_too_large"),
    ] {
        assert_eq!(
            sql_error(&app, &app.key, query).await,
            (422, code.to_string()),
            "{query}"
        );
    }
    let (s, k) = app
        .post("/v1/keys", json!({"name": "s", "scopes": ["send"]}))
        .await;
    assert_eq!(s, 201);
    assert_eq!(
        sql_error(&app, k["key"].as_str().unwrap(), SENT_PER_APP).await,
        (403, "missing_scope".to_string())
    );
    let (s, _) = sql(&app, &app.key, SENT_PER_APP, "xml").await;
    assert_eq!(s, 400);
    app.stop().await;
}

#[tokio::test]
async fn hashed_receivers_reach_the_warehouse_and_tracing_still_finds_them() {
    let app = TestApp::spawn_with(|c| {
        c.analytics.receivers = herald_core::config::ReceiverMode::Hashed;
        c.analytics.receiver_hash_key = Some(herald_core::config::Secret::new(
            "a stable secret of 16+ characters",
        ));
    })
    .await;
    send_inbox(&app, &app.key, 2).await;
    let (s, rows) = sql(
        &app,
        &app.key,
        "SELECT DISTINCT receiver FROM delivery_events ORDER BY receiver",
        "csv",
    )
    .await;
    assert_eq!(s, 200, "{rows}");
    let stored: Vec<&str> = rows.lines().skip(1).collect();
    assert_eq!(stored.len(), 2, "{rows}");
    assert!(
        stored.iter().all(|r| r.starts_with('~') && r.len() == 33),
        "{rows}"
    );
    // The store keeps receivers in clear for the business teams' tracing.
    let (s, found) = app.get("/v1/receivers/u1/messages").await;
    assert_eq!(s, 200, "{found}");
    assert_eq!(
        found["messages"].as_array().map(Vec::len),
        Some(1),
        "{found}"
    );
    app.stop().await;
}

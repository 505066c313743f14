//! Scheduled campaigns on the embedded deployment: a file of 2,500 rows sent with its bad rows
//! reported by line, a cron campaign that runs again until cancelled, refused uploads, and the
//! `herald campaign run` command.

use crate::support::TestApp;
use reqwest::Method;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Uploads `csv` as a campaign with `query` (after `template_id`); returns status and answer.
async fn upload(app: &TestApp, template: i64, query: &str, csv: String) -> (u16, Value) {
    upload_as(app, &app.key, template, query, csv).await
}

/// [`upload`] with `key`.
pub(crate) async fn upload_as(
    app: &TestApp,
    key: &str,
    template: i64,
    query: &str,
    csv: String,
) -> (u16, Value) {
    let resp = app
        .http
        .post(app.url(&format!("/v1/campaigns?template_id={template}{query}")))
        .bearer_auth(key)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

/// Polls the campaign until `done` holds for it; returns it.
async fn wait_for(app: &TestApp, id: i64, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, c) = app.get(&format!("/v1/campaigns/{id}")).await;
        assert_eq!(s, 200, "{c}");
        if done(&c) {
            return c;
        }
        assert!(Instant::now() < deadline, "campaign never {what}: {c}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The inbox of `receiver` once it holds at least `n` messages.
async fn inbox_with(app: &TestApp, receiver: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, inbox) = app.get(&format!("/v1/inbox/{receiver}")).await;
        let messages = inbox["messages"].as_array().cloned().unwrap_or_default();
        if messages.len() >= n {
            return messages;
        }
        assert!(
            Instant::now() < deadline,
            "the inbox of {receiver} never held {n} messages: {inbox}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A file of `rows` rows `user{i},Name {i}`, with the receivers of `bad` rows replaced and a
/// name spanning two lines in row 5; returns it and the line of each bad row.
fn receiver_file(rows: usize, bad: &[(usize, &str)]) -> (String, Vec<i64>) {
    let mut csv = String::from("receiver,name\r\n");
    let mut lines = Vec::new();
    let mut line = 2;
    for i in 0..rows {
        let receiver = match bad.iter().find(|(row, _)| *row == i) {
            Some((_, r)) => {
                lines.push(line);
                r.to_string()
            }
            None => format!("user{i}"),
        };
        if i == 5 {
            csv.push_str(&format!("{receiver},\"Name\n{i}\"\r\n"));
            line += 2;
        } else {
            csv.push_str(&format!("{receiver},Name {i}\r\n"));
            line += 1;
        }
    }
    (csv, lines)
}

#[tokio::test]
async fn a_campaign_sends_every_row_and_reports_bad_rows_by_line() {
    // The file (40 KB) is far over the limit of other bodies, which does not apply to it.
    let app = TestApp::spawn_with(|c| c.http.max_body_bytes = 1024).await;
    let template = app.inbox_template().await;
    let (csv, bad_lines) =
        receiver_file(2500, &[(3, ""), (1200, "bell\u{7}user"), (2499, "\"  \"")]);
    assert_eq!(bad_lines, [5, 1203, 2502]);
    let (s, c) = upload(&app, template, "&name=spring", csv).await;
    assert_eq!(s, 201, "{c}");
    assert_eq!(
        (&c["state"], &c["total_rows"], &c["name"], &c["runs"]),
        (&"waiting".into(), &2500.into(), &"spring".into(), &0.into())
    );
    let id = c["id"].as_i64().unwrap();

    let c = wait_for(&app, id, "done", |c| c["state"] == "done").await;
    assert_eq!(
        (
            &c["runs"],
            &c["processed_rows"],
            &c["accepted"],
            &c["bad_rows"]
        ),
        (&1.into(), &2500.into(), &2497.into(), &3.into()),
        "{c}"
    );
    let lines: Vec<i64> = c["bad"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["line"].as_i64().unwrap())
        .collect();
    assert_eq!(lines, bad_lines, "{c}");
    assert_eq!(c["bad"][1]["receiver"], "bell\u{7}user");
    let reason = c["bad"][1]["reason"].as_str().unwrap();
    assert!(reason.contains("control characters"), "{reason}");
    assert_eq!(c["history"][0]["accepted"], 2497);
    assert_eq!(c["next_run_at"], Value::Null);

    // Rendered per row, the two-line name included.
    let inbox = inbox_with(&app, "user7", 1).await;
    assert_eq!(inbox[0]["content"]["title"], "Hi Name 7", "{inbox:?}");
    let inbox = inbox_with(&app, "user5", 1).await;
    assert_eq!(inbox[0]["content"]["content"], "Welcome, Name\n5!");
    inbox_with(&app, "user2498", 1).await;

    let (s, list) = app.get("/v1/campaigns").await;
    assert_eq!(s, 200);
    assert_eq!(list["campaigns"][0]["id"], id);
    let (s, e) = app
        .call(Method::DELETE, &format!("/v1/campaigns/{id}"), None)
        .await;
    assert_eq!((s, &e["error"]["code"]), (409, &"campaign_finished".into()));
    app.stop().await;
}

#[tokio::test]
async fn a_cron_campaign_runs_again_until_cancelled() {
    let app = TestApp::spawn().await;
    let template = app.inbox_template().await;
    let csv = "receiver,name\ncron-a,A\n,empty\ncron-b,B\n".to_string();
    let (s, c) = upload(
        &app,
        template,
        "&cron=*/2%20*%20*%20*%20*%20*&timezone=Asia/Shanghai",
        csv,
    )
    .await;
    assert_eq!(s, 201, "{c}");
    assert_eq!(c["cron"], "*/2 * * * * *");
    assert!(c["next_run_at"].is_string(), "{c}");
    let id = c["id"].as_i64().unwrap();

    let c = wait_for(&app, id, "ran twice", |c| {
        c["history"].as_array().is_some_and(|h| h.len() >= 2)
    })
    .await;
    assert!(c["runs"].as_i64().unwrap() >= 2, "{c}");
    for run in c["history"].as_array().unwrap() {
        assert_eq!((&run["accepted"], &run["bad_rows"]), (&2.into(), &1.into()));
    }
    // Each run sends its own message (ids differ per run).
    let inbox = inbox_with(&app, "cron-a", 2).await;
    assert_ne!(inbox[0]["message_id"], inbox[1]["message_id"]);
    let (s, first) = app.get(&format!("/v1/campaigns/{id}?run=1")).await;
    assert_eq!(s, 200);
    assert_eq!(first["bad"][0]["line"], 3, "{first}");

    let (s, cancelled) = app
        .call(Method::DELETE, &format!("/v1/campaigns/{id}"), None)
        .await;
    assert_eq!(s, 200, "{cancelled}");
    assert_eq!(
        (&cancelled["state"], &cancelled["next_run_at"]),
        (&"cancelled".into(), &Value::Null)
    );
    let runs = cancelled["runs"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, after) = app.get(&format!("/v1/campaigns/{id}")).await;
    assert_eq!(
        (&after["state"], after["runs"].as_i64().unwrap()),
        (&"cancelled".into(), runs),
        "{after}"
    );
    app.stop().await;
}

#[tokio::test]
async fn bad_campaign_uploads_are_refused_and_leave_nothing() {
    let app = TestApp::spawn_with(|c| c.http.max_campaign_bytes = 4096).await;
    let template = app.inbox_template().await;
    let good = || "receiver,name\nu1,A\n".to_string();
    for (query, csv, status, code) in [
        ("&cron=61%20*%20*%20*%20*", good(), 422, "bad_cron"),
        ("&cron=*%20*%20*", good(), 422, "bad_cron"),
        ("&timezone=Mars/Base", good(), 422, "bad_timezone"),
        ("", "phone,name\n1,A\n".to_string(), 422, "bad_csv"),
        ("", "receiver,name\n".to_string(), 422, "bad_csv"),
        ("", "receiver\nu1\n".to_string(), 422, "missing_variable"),
        (
            "",
            "receiver,name\nu,n\n".repeat(300),
            413,
            "body_too_large",
        ),
    ] {
        let (s, e) = upload(&app, template, query, csv).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (status, Some(code)),
            "{query}: {e}"
        );
    }
    let (s, e) = upload(&app, template + 100, "", good()).await;
    assert_eq!((s, &e["error"]["code"]), (404, &"unknown_template".into()));
    let resp = app
        .http
        .post(app.url(&format!("/v1/campaigns?template_id={template}")))
        .bearer_auth(&app.key)
        .header("content-type", "application/json")
        .body(good())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    let (s, list) = app.get("/v1/campaigns").await;
    assert_eq!(s, 200);
    assert_eq!(list["campaigns"], serde_json::json!([]), "{list}");
    let (s, _) = app.get("/v1/campaigns/1").await;
    assert_eq!(s, 404);
    app.stop().await;
}

#[tokio::test]
async fn the_cli_uploads_a_file_and_prints_the_bad_lines() {
    let app = TestApp::spawn().await;
    let template = app.inbox_template().await;
    let (csv, bad_lines) = receiver_file(300, &[(10, ""), (250, "tab\tuser")]);
    let file = app.dir.path().join("receivers.csv");
    std::fs::write(&file, csv).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["campaign", "run"])
        .arg(&file)
        .args(["--template", &template.to_string(), "--key", &app.key])
        .args(["--url", &app.url("")])
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("298 of 300 rows accepted, 2 bad"),
        "{stdout}"
    );
    for line in bad_lines {
        assert!(stdout.contains(&format!("line {line}: ")), "{stdout}");
    }
    assert!(stderr.contains("100%  300/300 rows  2 bad"), "{stderr}");
    inbox_with(&app, "user299", 1).await;

    // A refused file: a clear message and a failing exit.
    let bad = app.dir.path().join("bad.csv");
    std::fs::write(&bad, "phone\n1\n").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["campaign", "run"])
        .arg(&bad)
        .args(["--template", &template.to_string(), "--key", &app.key])
        .args(["--url", &app.url("")])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad_csv"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    app.stop().await;
}

//! The crash tests: 10,000 messages accepted under load (inbox and email), the process killed
//! with SIGKILL midway, started again; every accepted message is sent exactly once and the
//! warehouse holds exactly one `sent` event for each. And scheduled messages pending across a
//! kill: each sent once, on time.

use crate::support::{SmtpSink, create_app, post, serve};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOTAL: usize = 10_000;
const PER_REQUEST: usize = 50;
/// Every fifth request goes to email, the rest to the inbox.
const EMAIL_EVERY: usize = 5;

/// Sends batches from `start` until `stop_at` messages are accepted (or the server dies);
/// records accepted ids by channel.
async fn load(
    base: String,
    key: String,
    templates: (i64, i64),
    accepted: Arc<Mutex<(Vec<String>, Vec<String>)>>,
    stop_at: usize,
    start: usize,
) {
    let http = reqwest::Client::new();
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(start));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (http, base, key, accepted, counter) = (
            http.clone(),
            base.clone(),
            key.clone(),
            accepted.clone(),
            counter.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let done = { let a = accepted.lock().unwrap(); a.0.len() + a.1.len() };
                if done >= stop_at {
                    return;
                }
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let email = n % EMAIL_EVERY == 0;
                let receivers: Vec<String> = (0..PER_REQUEST)
                    .map(|i| if email { format!("r{n}-{i}@example.com") } else { format!("user-{}", (n * PER_REQUEST + i) % 500) })
                    .collect();
                let template = if email { templates.1 } else { templates.0 };
                let body = json!({"template_id": template, "messages": [{"receivers": receivers, "variables": {"name": format!("n{n}")}}]});
                match post(&http, &base, &key, "/v1/send/batch", body).await {
                    Ok((202, a)) => {
                        let ids = a["messages"].as_array().unwrap().iter().map(|m| m["message_id"].as_str().unwrap().to_string());
                        let mut acc = accepted.lock().unwrap();
                        if email { acc.1.extend(ids) } else { acc.0.extend(ids) }
                    }
                    Ok((status, a)) => panic!("unexpected answer {status}: {a}"),
                    Err(_) => return, // the server was killed: this request was not accepted
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_midway_loses_nothing_and_sends_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = SmtpSink::start();
    let key = create_app(dir.path(), &[]);

    let mut first = serve(dir.path());
    let http = reqwest::Client::new();
    let (s, account) = post(&http, &first.base, &key, "/v1/accounts",
        json!({"name": "smtp", "channel": "email", "config": {"host": "127.0.0.1", "port": smtp.port, "security": "plain", "from": "Herald <noreply@example.com>"}})).await.unwrap();
    assert_eq!(s, 201, "{account}");
    let (_, inbox_t) = post(&http, &first.base, &key, "/v1/templates",
        json!({"name": "i", "channel": "inbox", "msg_type": "notice", "content": {"title": "t {$name}", "content": "c"}})).await.unwrap();
    let (_, email_t) = post(&http, &first.base, &key, "/v1/templates",
        json!({"name": "e", "channel": "email", "msg_type": "notice", "account_id": account["id"], "content": {"subject": "Hello {$name}", "text": "plain {$name}", "html": "<p>html {$name}</p>"}})).await.unwrap();
    let templates = (
        inbox_t["id"].as_i64().unwrap(),
        email_t["id"].as_i64().unwrap(),
    );

    let accepted = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    // Load until half is accepted, then SIGKILL while requests and sends are in flight.
    let loader = tokio::spawn(load(
        first.base.clone(),
        key.clone(),
        templates,
        accepted.clone(),
        usize::MAX,
        0,
    ));
    while {
        let a = accepted.lock().unwrap();
        a.0.len() + a.1.len()
    } < TOTAL / 2
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    loader.await.unwrap();
    let at_kill = {
        let a = accepted.lock().unwrap();
        a.0.len() + a.1.len()
    };

    let second = serve(dir.path());
    load(
        second.base.clone(),
        key.clone(),
        templates,
        accepted.clone(),
        TOTAL,
        1_000_000,
    )
    .await;
    let (inbox_ids, email_ids) = accepted.lock().unwrap().clone();
    assert!(inbox_ids.len() + email_ids.len() >= TOTAL);
    assert!(
        at_kill < TOTAL,
        "the kill came after everything was accepted"
    );

    // Wait until the warehouse has a `sent` event for every accepted message.
    let warehouse = dir.path().join("warehouse");
    let all: HashSet<String> = inbox_ids.iter().chain(&email_ids).cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let sent: HashMap<String, u64> = loop {
        let csv = crate::support::sql_csv(&warehouse, "SELECT CAST(message_id AS VARCHAR) AS m, count(*) AS n FROM delivery_events WHERE state = 'sent' GROUP BY message_id").await;
        let sent: HashMap<String, u64> = csv
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(','))
            .map(|(m, n)| (m.to_string(), n.trim().parse().unwrap()))
            .collect();
        if all.iter().all(|id| sent.contains_key(id)) {
            break sent;
        }
        assert!(
            Instant::now() < deadline,
            "{} accepted messages never reached sent",
            all.iter().filter(|id| !sent.contains_key(*id)).count()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let twice: Vec<_> = sent.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "messages with more than one sent event: {twice:?}"
    );

    // The inbox holds each accepted inbox message exactly once (its key is the message id).
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        dir.path().join("herald.db").display()
    ))
    .await
    .unwrap();
    let stored: Vec<String> = sqlx::query_scalar("SELECT message_id FROM inbox")
        .fetch_all(&pool)
        .await
        .unwrap();
    let stored: HashSet<String> = stored.into_iter().collect();
    assert!(
        inbox_ids.iter().all(|id| stored.contains(id)),
        "an accepted inbox message is missing"
    );

    // The SMTP server got every accepted email; copies only for crashes inside the SMTP call.
    let received = smtp.message_ids();
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for id in &received {
        *per_id.entry(id.clone()).or_default() += 1;
    }
    let missing = email_ids
        .iter()
        .filter(|id| !per_id.contains_key(&format!("<{id}@herald>")))
        .count();
    assert_eq!(missing, 0, "accepted emails the SMTP server never received");
    let copies: usize = per_id.values().map(|n| n - 1).sum();
    let metrics = reqwest::get(format!("{}/metrics", second.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted: f64 = metrics
        .lines()
        .find(|l| l.starts_with("herald_possible_duplicates_total "))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        copies as f64 <= counted,
        "{copies} duplicate emails but only {counted} reported"
    );
    eprintln!(
        "crash test: {} accepted ({} before the kill), {} inbox, {} email, {} emails received, {copies} duplicate emails (reported: {counted})",
        all.len(),
        at_kill,
        inbox_ids.len(),
        email_ids.len(),
        received.len()
    );
    let mut second = second;
    second.child.kill().unwrap();
    second.child.wait().unwrap();
}

/// Messages scheduled a few seconds ahead, `herald serve` SIGKILLed before they are due and
/// started again: each is sent exactly once, within a second of its `send_at`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_messages_survive_a_kill_and_go_on_time() {
    const BATCHES: usize = 5;
    const PER_BATCH: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let key = create_app(dir.path(), &[]);
    let mut first = serve(dir.path());
    let http = reqwest::Client::new();
    let (_, t) = post(&http, &first.base, &key, "/v1/templates",
        json!({"name": "i", "channel": "inbox", "msg_type": "notice", "content": {"title": "t {$name}", "content": "c"}})).await.unwrap();
    let template = t["id"].as_i64().unwrap();

    // Batch k is due 8 + k seconds from now, to the millisecond.
    let start = chrono::Utc::now();
    let mut due: HashMap<String, chrono::DateTime<chrono::Utc>> = HashMap::new();
    for k in 0..BATCHES {
        let at = start + chrono::Duration::milliseconds(8_000 + 1_000 * k as i64 + 137);
        let receivers: Vec<String> = (0..PER_BATCH).map(|i| format!("user-{k}-{i}")).collect();
        let body = json!({"template_id": template, "send_at": at, "messages": [{"receivers": receivers, "variables": {"name": "x"}}]});
        let (s, a) = post(&http, &first.base, &key, "/v1/send/batch", body)
            .await
            .unwrap();
        assert_eq!(s, 202, "{a}");
        for m in a["messages"].as_array().unwrap() {
            due.insert(m["message_id"].as_str().unwrap().to_string(), at);
        }
    }
    // Dispatch puts them in the schedule at once; kill well before the first is due.
    tokio::time::sleep(Duration::from_secs(3)).await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let mut second = serve(dir.path());

    let warehouse = dir.path().join("warehouse");
    let deadline = Instant::now() + Duration::from_secs(60);
    let sent: HashMap<String, (u64, f64)> = loop {
        let csv = crate::support::sql_csv(&warehouse, "SELECT CAST(message_id AS VARCHAR) AS m, count(*) AS n, date_part('epoch', min(ts)) AS at FROM delivery_events WHERE state = 'sent' GROUP BY message_id").await;
        let sent: HashMap<String, (u64, f64)> = csv
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (
                    f[0].to_string(),
                    (f[1].parse().unwrap(), f[2].parse().unwrap()),
                )
            })
            .collect();
        if due.keys().all(|id| sent.contains_key(id)) {
            break sent;
        }
        assert!(
            Instant::now() < deadline,
            "{} scheduled messages never reached sent",
            due.keys().filter(|id| !sent.contains_key(*id)).count()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut latest = 0f64;
    for (id, at) in &due {
        let (n, sent_at) = sent[id];
        assert_eq!(n, 1, "{id} was sent {n} times");
        let late = sent_at - at.timestamp_micros() as f64 / 1e6;
        assert!(late >= 0.0, "{id} was sent {late:.3} s early");
        assert!(late <= 1.0, "{id} was sent {late:.3} s late");
        latest = latest.max(late);
    }
    eprintln!(
        "scheduled crash test: {} messages sent once each, the latest {latest:.3} s after its send_at",
        due.len()
    );
    second.child.kill().unwrap();
    second.child.wait().unwrap();
}

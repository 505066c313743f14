//! The crash tests: 10,000 messages accepted under load (inbox and email), the process killed
//! with SIGKILL midway, started again; every accepted message is sent exactly once and the
//! warehouse holds exactly one `sent` event for each. And scheduled messages pending across a
//! kill: each sent once, on time. And a campaign killed midway: resumed from its checkpoint,
//! every row's message sent once. And records delivered twice in a row: each message sent once.

use crate::support::{
    Running, SmtpSink, counter_of, create_app, message_ids, post, serve, test_config,
    webhook_receiver,
};
use axum::http::StatusCode;
use herald::Roles;
use herald_core::bus::Bus;
use herald_core::bus::embedded::EmbeddedBus;
use herald_core::store::Store;
use herald_core::wire::REQUESTS_TOPIC;
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
        let sent = sent_counts(&warehouse).await;
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

/// How many `sent` events the warehouse holds per message id.
async fn sent_counts(warehouse: &std::path::Path) -> HashMap<String, u64> {
    let sql = "SELECT CAST(message_id AS VARCHAR) AS m, count(*) AS n FROM delivery_events \
               WHERE state = 'sent' GROUP BY message_id";
    crate::support::sql_csv(warehouse, sql)
        .await
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(','))
        .map(|(m, n)| (m.to_string(), n.trim().parse().unwrap()))
        .collect()
}

/// GETs `base` + `path` with `key`; the JSON answer of a `200`.
async fn get(http: &reqwest::Client, base: &str, key: &str, path: &str) -> serde_json::Value {
    let resp = http
        .get(format!("{base}{path}"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "GET {path}");
    resp.json().await.unwrap()
}

/// Rows of the campaign of [`a_campaign_killed_midway_resumes_and_sends_every_row_once`].
const CAMPAIGN_ROWS: usize = 100_000;

/// A campaign of [`CAMPAIGN_ROWS`] inbox rows, `herald serve` SIGKILLed once 40% of them are
/// counted, its checkpoint moved back a batch (as if the kill had come between the batch's
/// publishing and its counting) and started again on the same data: the run resumes from the
/// checkpoint once the dead process's lease (30 s) runs out, publishes that batch again, and
/// every row's receiver gets its message exactly once — one inbox entry and one `sent` event
/// each, none missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_killed_midway_resumes_and_sends_every_row_once() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let key = create_app(dir.path(), &[]);
    let mut herald = serve(dir.path());
    let http = reqwest::Client::new();
    let body = json!({"name": "i", "channel": "inbox", "msg_type": "notice",
                      "content": {"title": "Hi {$name}", "content": "c"}});
    let (s, t) = post(&http, &herald.base, &key, "/v1/templates", body)
        .await
        .unwrap();
    assert_eq!(s, 201, "{t}");
    let template = t["id"].as_i64().unwrap();

    let mut csv = String::from("receiver,name\n");
    for i in 0..CAMPAIGN_ROWS {
        csv.push_str(&format!("c{i},Name {i}\n"));
    }
    let resp = http
        .post(format!(
            "{}/v1/campaigns?template_id={template}",
            herald.base
        ))
        .bearer_auth(&key)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let c: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{c}");
    let id = c["id"].as_i64().unwrap();

    // SIGKILL once 40% of the rows are published and counted. The run takes a second or two, so
    // the checkpoint is read from the store itself: through the API, behind the runner and
    // dispatch, it once came too late to catch the middle of the run (at row 87,000).
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        dir.path().join("herald.db").display()
    ))
    .await
    .unwrap();
    let progress = || {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT state, processed_rows FROM campaigns WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&pool)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let (state, processed) = progress().await.unwrap();
        if seen.last() != Some(&(state.clone(), processed)) {
            seen.push((state.clone(), processed));
        }
        assert!(
            state == "waiting" || (state == "running" && processed < CAMPAIGN_ROWS as i64),
            "the run ended before the kill: {state}, {processed} rows"
        );
        if processed >= CAMPAIGN_ROWS as i64 * 2 / 5 {
            break;
        }
        assert!(Instant::now() < deadline, "the run never got far: {seen:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    herald.child.kill().unwrap();
    herald.child.wait().unwrap();
    let killed_after = started.elapsed();

    // The checkpoint the restarted process resumes from.
    let (state, checkpoint) = progress().await.unwrap();
    let checkpoint = checkpoint as usize;
    assert_eq!(state, "running");
    assert!(
        CAMPAIGN_ROWS / 5 < checkpoint && checkpoint < CAMPAIGN_ROWS * 4 / 5,
        "killed at row {checkpoint} of {CAMPAIGN_ROWS}, not midway; seen before: {seen:?}"
    );
    // The kill may or may not have come between a batch's publishing and its counting; move the
    // checkpoint back one batch (1,000 rows, all published) so that the restart always publishes
    // rows again, as after a kill in that window.
    sqlx::query(
        "UPDATE campaigns SET processed_rows = processed_rows - 1000, accepted = accepted - 1000 \
         WHERE id = $1",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    let sent_at_kill: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
        .fetch_one(&pool)
        .await
        .unwrap();

    herald.restart();
    // A new client: the old one's pooled connections died with the process.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let c = loop {
        let c = get(&http, &herald.base, &key, &format!("/v1/campaigns/{id}")).await;
        if c["state"] == "done" {
            break c;
        }
        assert_eq!(c["state"], "running", "{c}");
        assert!(
            Instant::now() < deadline,
            "the run never resumed to its end: {c}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let rows = CAMPAIGN_ROWS as u64;
    assert_eq!(
        (
            &c["runs"],
            &c["processed_rows"],
            &c["accepted"],
            &c["bad_rows"]
        ),
        (&1.into(), &rows.into(), &rows.into(), &0.into()),
        "{c}"
    );
    assert_eq!(
        (&c["history"][0]["accepted"], &c["history"][0]["bad_rows"]),
        (&rows.into(), &0.into()),
        "{c}"
    );
    let resumed_after = started.elapsed();

    // Every receiver's inbox holds its row's message once. The inbox is keyed by message id, so
    // a row published again under another id would show here as a second entry.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        if n as usize >= CAMPAIGN_ROWS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of {CAMPAIGN_ROWS} inbox entries"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let inbox: Vec<(String, String, String)> =
        sqlx::query_as("SELECT receiver, message_id, content FROM inbox")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut per_receiver: HashMap<String, usize> = HashMap::new();
    for (receiver, _, content) in &inbox {
        *per_receiver.entry(receiver.clone()).or_default() += 1;
        let title = serde_json::from_str::<serde_json::Value>(content).unwrap()["title"].clone();
        let row = receiver.strip_prefix('c').unwrap();
        assert_eq!(title, format!("Hi Name {row}"), "{receiver}: {content}");
    }
    let twice: Vec<_> = per_receiver.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} receivers with more than one message, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    let missing: Vec<_> = (0..CAMPAIGN_ROWS)
        .map(|i| format!("c{i}"))
        .filter(|r| !per_receiver.contains_key(r))
        .collect();
    assert!(
        missing.is_empty(),
        "{} receivers without their message, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(inbox.len(), CAMPAIGN_ROWS);

    // The warehouse holds one `sent` event per message: the send ledger sent a message published
    // twice once (the inbox would hide a second send under the same id).
    let ids: HashSet<String> = inbox.into_iter().map(|(_, id, _)| id).collect();
    let warehouse = dir.path().join("warehouse");
    let deadline = Instant::now() + Duration::from_secs(60);
    let sent: HashMap<String, u64> = loop {
        let sent = sent_counts(&warehouse).await;
        if sent.len() >= CAMPAIGN_ROWS {
            break sent;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {CAMPAIGN_ROWS} messages have a sent event",
            sent.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let twice: Vec<_> = sent.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "{} messages with more than one sent event, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    assert!(
        sent.keys().all(|id| ids.contains(id)),
        "sent messages that are not in the inbox"
    );

    let metrics = reqwest::get(format!("{}/metrics", herald.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let absorbed = crate::support::counter(&metrics, "herald_redelivery_absorbed_total");
    eprintln!(
        "campaign crash test: {CAMPAIGN_ROWS} rows, killed after {:.1} s at row {checkpoint} \
         ({sent_at_kill} in inboxes), rows {} to {checkpoint} published again, done after \
         {:.1} s, each row's message stored and sent once after {:.1} s; {absorbed} \
         redelivered messages absorbed by the ledger after the restart",
        killed_after.as_secs_f64(),
        checkpoint - 1000,
        resumed_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    pool.close().await;
    herald.child.kill().unwrap();
    herald.child.wait().unwrap();
}

/// Each request record delivered twice in a row (a producer's retry, offsets lost before a
/// rebalance), to a worker reading batches of one from one partition, so that every copy
/// comes in the batch right after its first: the ledger absorbs each copy, none is sent again
/// or counted as a possible duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_delivered_twice_in_a_row_is_sent_once() {
    const N: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.dispatch.batch_size = 1;
    config.bus.partitions = 1;
    let store = Store::open(&config.store_url()).await.unwrap();
    let (_, key) = store.create_app("twice").await.unwrap();
    drop(store);
    let (url, calls) = webhook_receiver(|_| (StatusCode::OK, "0")).await;

    // Ingest alone accepts the messages: their records wait in the bus.
    let ingest = Running::start(config.clone(), Roles::INGEST).await;
    let http = reqwest::Client::new();
    let (s, account) = post(
        &http,
        &ingest.base(),
        &key,
        "/v1/accounts",
        json!({"name": "hook", "channel": "webhook", "config": {"url": url, "secret": "s"}}),
    )
    .await
    .unwrap();
    assert_eq!(s, 201, "{account}");
    let (s, template) = post(&http, &ingest.base(), &key, "/v1/templates",
        json!({"name": "t", "channel": "webhook", "msg_type": "notice", "account_id": account["id"], "content": {"n": "1"}})).await.unwrap();
    assert_eq!(s, 201, "{template}");
    let receivers: Vec<String> = (0..N).map(|k| format!("r-{k}")).collect();
    let (s, answer) = post(
        &http,
        &ingest.base(),
        &key,
        "/v1/send",
        json!({"template_id": template["id"], "receivers": receivers}),
    )
    .await
    .unwrap();
    assert_eq!(s, 202, "{answer}");
    let ids: HashSet<String> = message_ids(&answer).into_iter().collect();
    ingest.stop().await;

    // The bus laid out again with each record twice in a row.
    let bus_dir = config.bus_dir();
    let records = {
        let bus = EmbeddedBus::open(&bus_dir, config.bus.clone())
            .await
            .unwrap();
        let mut consumer = bus.subscribe(REQUESTS_TOPIC, "e2e-copier").await.unwrap();
        let mut records = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while records.len() < N {
            assert!(
                Instant::now() < deadline,
                "{} records in the bus",
                records.len()
            );
            records.extend(consumer.poll(N, Duration::from_millis(200)).await.unwrap());
        }
        records
    };
    std::fs::remove_dir_all(&bus_dir).unwrap();
    {
        let bus = EmbeddedBus::open(&bus_dir, config.bus.clone())
            .await
            .unwrap();
        for d in &records {
            bus.publish(REQUESTS_TOPIC, vec![d.record.clone(), d.record.clone()])
                .await
                .unwrap();
        }
    }

    let dispatch = Running::start(config, Roles::DISPATCH).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let absorbed = counter_of(&dispatch.base(), "herald_redelivery_absorbed_total").await;
        if absorbed >= N as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "{absorbed} copies absorbed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for (id, _) in calls.lock().unwrap().iter() {
        *per_id.entry(id.clone()).or_default() += 1;
    }
    assert_eq!(per_id.keys().cloned().collect::<HashSet<_>>(), ids);
    let twice: Vec<_> = per_id.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    assert_eq!(
        counter_of(&dispatch.base(), "herald_possible_duplicates_total").await,
        0.0
    );
    assert_eq!(
        counter_of(&dispatch.base(), "herald_redelivery_absorbed_total").await,
        N as f64
    );
    dispatch.stop().await;
}

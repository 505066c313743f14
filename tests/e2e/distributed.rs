//! The distributed deployment end to end: herald's roles as separate OS processes against a
//! Kafka-protocol broker (tansu, started here from `HERALD_TANSU`) and PostgreSQL (a fresh
//! database on the server `HERALD_TEST_POSTGRES` names). The test script sets both.

use herald_core::bus::Bus;
use herald_core::bus::kafka::{KafkaBus, KafkaConfig};
use herald_core::wire::REQUESTS_DLQ_TOPIC;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A tansu broker on its own port; killed when dropped.
pub(crate) struct Broker {
    child: Child,
    port: u16,
    storage: String,
    /// The directory of an on-disk broker's database.
    _dir: Option<tempfile::TempDir>,
}

impl Broker {
    fn start(storage: &str) -> Broker {
        let port = free_port();
        Broker {
            child: spawn_tansu(port, storage),
            port,
            storage: storage.to_string(),
            _dir: None,
        }
    }

    /// A broker on tansu's SQLite engine in a temporary directory. (Its memory engine loses
    /// records read from the middle of a produced batch.)
    pub(crate) fn on_disk() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let storage = format!("sqlite://{}", dir.path().join("tansu.db").display());
        let mut broker = Broker::start(&storage);
        broker._dir = Some(dir);
        broker
    }

    pub(crate) fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (SIGKILL) and starts it again on the same port and storage.
    pub(crate) fn restart(&mut self, down_for: Duration) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        std::thread::sleep(down_for);
        self.child = spawn_tansu(self.port, &self.storage);
    }
}

/// Starts tansu on `port` with `storage` and waits until it listens. A `sqlite://` storage
/// path is taken relative to the working directory, so a file is given as its directory and
/// name.
fn spawn_tansu(port: u16, storage: &str) -> Child {
    let tansu = std::env::var("HERALD_TANSU").expect(
        "HERALD_TANSU is not set: run the suite with scripts/test.sh, which installs the tansu \
         broker and sets it to the binary's path",
    );
    let url = format!("tcp://127.0.0.1:{port}");
    let mut command = Command::new(tansu);
    let storage = match storage.strip_prefix("sqlite://").map(Path::new) {
        Some(file) => {
            command.current_dir(file.parent().unwrap());
            format!("sqlite://{}", file.file_name().unwrap().to_str().unwrap())
        }
        None => storage.to_string(),
    };
    let child = command
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", &storage])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port, "the broker");
    child
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh, empty database on the test PostgreSQL server; returns its URL.
async fn fresh_database() -> String {
    let server = std::env::var("HERALD_TEST_POSTGRES").expect(
        "HERALD_TEST_POSTGRES is not set: run the suite with scripts/test.sh, or set it to a \
         PostgreSQL URL such as postgres://postgres@127.0.0.1:5432/test",
    );
    let admin = sqlx::PgPool::connect(&server).await.unwrap();
    let name = format!("herald_e2e_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    let mut url = url::Url::parse(&server).unwrap();
    url.set_path(&name);
    url.to_string()
}

/// Config and data directory shared by every process of one deployment.
pub(crate) struct Deployment {
    dir: tempfile::TempDir,
    config: PathBuf,
    pub(crate) store_url: String,
}

impl Deployment {
    /// `http` is extra lines for the `[http]` section.
    pub(crate) async fn new(broker: &Broker, http: &str) -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        let store_url = fresh_database().await;
        let config = dir.path().join("herald.toml");
        let mut f = std::fs::File::create(&config).unwrap();
        write!(
            f,
            "bus_kind = \"kafka\"\nstore_url = \"{store_url}\"\nlog = \"info\"\n\
             [kafka]\nbrokers = \"{}\"\nrequests_partitions = 6\ndelivery_partitions = 6\n\
             [kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n\
             [analytics]\nflush_interval = \"200ms\"\n\
             [dispatch]\nallow_private_urls = true\n\
             [security]\nsecret_keys = \"{}\"\n\
             [http]\n{}{http}",
            broker.address(),
            herald_core::secrets::SecretBox::generate_entry("e2e"),
            if http.contains("cache_ttl") {
                ""
            } else {
                "cache_ttl = \"100ms\"\n"
            },
        )
        .unwrap();
        Deployment {
            dir,
            config,
            store_url,
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_herald"));
        c.arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(self.dir.path())
            .stdout(Stdio::null());
        c
    }

    /// Creates an app; returns its API key.
    pub(crate) fn create_app(&self, name: &str) -> String {
        let out = self
            .command()
            .args(["apps", "create", name])
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("api key: "))
            .unwrap()
            .to_string()
    }

    /// Starts one role as its own process, logging to `<dir>/<role>-<port>.log`.
    pub(crate) fn spawn(&self, role: &str) -> Role {
        let port = free_port();
        let log =
            std::fs::File::create(self.dir.path().join(format!("{role}-{port}.log"))).unwrap();
        let child = self
            .command()
            .args([role, "--listen", &format!("127.0.0.1:{port}")])
            .stderr(log)
            .spawn()
            .unwrap();
        wait_for_port(port, role);
        Role { child, port }
    }

    fn warehouse(&self) -> PathBuf {
        self.dir.path().join("warehouse")
    }
}

/// A running herald process; killed when dropped.
pub(crate) struct Role {
    child: Child,
    port: u16,
}

impl Role {
    pub(crate) fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn post(http: &reqwest::Client, url: String, key: &str, body: Value) -> (u16, Value) {
    let resp = http
        .post(url)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn inbox_template(ingest: &Role, key: &str) -> i64 {
    let http = reqwest::Client::new();
    let (status, t) = post(
        &http,
        format!("{}/v1/templates", ingest.base()),
        key,
        json!({"name": "note", "channel": "inbox", "msg_type": "notice",
               "content": {"title": "note {$seq}", "content": "seq {$seq}"}}),
    )
    .await;
    assert_eq!(status, 201, "{t}");
    t["id"].as_i64().unwrap()
}

/// Sends `per_receiver` messages to each of `receivers` (named `{prefix}{i}`) in order, one
/// batch request per sequence number, retrying a request (same Idempotency-Key) until it is
/// accepted. Returns the accepted message ids.
async fn load_http(
    base: String,
    key: String,
    template: i64,
    prefix: String,
    receivers: usize,
    per_receiver: usize,
) -> Vec<String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let mut ids = Vec::new();
    for seq in 0..per_receiver {
        let messages: Vec<Value> = (0..receivers)
            .map(|i| {
                let r = format!("{prefix}{i}");
                json!({"receivers": [r], "variables": {"seq": seq}, "biz_id": format!("{r}/{seq}")})
            })
            .collect();
        let body = json!({"template_id": template, "messages": messages});
        let idempotency_key = format!("{prefix}{seq}");
        loop {
            let resp = http
                .post(format!("{base}/v1/send/batch"))
                .bearer_auth(&key)
                .header("idempotency-key", &idempotency_key)
                .json(&body)
                .send()
                .await;
            match resp {
                Ok(r) if r.status().as_u16() == 202 => {
                    let answer: Value = r.json().await.unwrap();
                    ids.extend(crate::support::message_ids(&answer));
                    break;
                }
                Ok(r) if r.status().is_client_error() && r.status().as_u16() != 409 => {
                    panic!("refused: {} {}", r.status(), r.text().await.unwrap())
                }
                // 409 (in progress), 5xx or a transport error: a client retries.
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    ids
}

/// Produces `receivers × per_receiver` requests with the Python client (not herald).
fn produce_with_python(
    broker: &Broker,
    key: &str,
    template: i64,
    receivers: usize,
    per_receiver: usize,
) -> std::process::Child {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/kafka_produce.py");
    Command::new("python3")
        .arg(script)
        .args([
            "requests",
            "--brokers",
            &broker.address(),
            "--app",
            "e2e",
            "--api-key",
            key,
        ])
        .args(["--template", &template.to_string()])
        .args([
            "--receivers",
            &receivers.to_string(),
            "--per-receiver",
            &per_receiver.to_string(),
        ])
        .args(["--prefix", "kuser-"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the warehouse holds `expected` distinct sent messages; returns every `sent`
/// event as (receiver, biz_id, ts, message_id).
async fn wait_for_sent(warehouse: &Path, expected: usize) -> Vec<(String, String, String, String)> {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if warehouse.join("delivery_events").exists() {
            let csv = crate::support::sql_csv(
                warehouse,
                // Ordered by the timestamp, not by its text: the text drops trailing zeros
                // (`…00.120Z` sorts after `…00.120001Z`), which once passed for a broken order.
                "SELECT receiver, biz_id, CAST(ts AS VARCHAR) AS ts_text, \
                 CAST(message_id AS VARCHAR) AS m \
                 FROM delivery_events WHERE state = 'sent' ORDER BY receiver, delivery_events.ts",
            )
            .await;
            let rows: Vec<(String, String, String, String)> = csv
                .lines()
                .skip(1)
                .map(|l| {
                    let f: Vec<&str> = l.split(',').collect();
                    (f[0].into(), f[1].into(), f[2].into(), f[3].into())
                })
                .collect();
            let distinct: HashSet<&str> = rows.iter().map(|r| r.3.as_str()).collect();
            if distinct.len() >= expected {
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {expected} messages reached sent",
                distinct.len()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the warehouse got no event in 240 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every expected biz id has exactly one `sent` event, and each receiver's messages were sent in
/// sequence order.
fn check_exactly_once_in_order(
    rows: &[(String, String, String, String)],
    expected: &HashSet<String>,
) {
    let mut per_biz: HashMap<&str, usize> = HashMap::new();
    for r in rows {
        *per_biz.entry(r.1.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = per_biz.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "messages sent more than once: {twice:?}");
    let missing: Vec<_> = expected
        .iter()
        .filter(|b| !per_biz.contains_key(b.as_str()))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "accepted messages never sent: {missing:?}"
    );
    assert_eq!(
        per_biz.len(),
        expected.len(),
        "unexpected messages were sent"
    );
    // Rows come ordered by receiver, then ts.
    let mut last: HashMap<&str, u64> = HashMap::new();
    let mut out_of_order = Vec::new();
    for (receiver, biz, ts, _) in rows {
        let seq: u64 = biz.rsplit('/').next().unwrap().parse().unwrap();
        if let Some(prev) = last.insert(receiver, seq)
            && prev >= seq
        {
            out_of_order.push(format!(
                "{receiver}: message {seq} was sent after {prev} (at {ts})"
            ));
        }
    }
    assert!(out_of_order.is_empty(), "{out_of_order:?}");
}

async fn inbox_rows(store_url: &str) -> i64 {
    let pool = sqlx::PgPool::connect(store_url).await.unwrap();
    sqlx::query_scalar("SELECT count(*) FROM inbox")
        .fetch_one(&pool)
        .await
        .unwrap()
}

async fn sent_in_ledger(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM send_ledger WHERE state = 'sent'")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

fn expected_biz_ids(
    prefix: &str,
    receivers: usize,
    per_receiver: usize,
) -> impl Iterator<Item = String> + '_ {
    (0..receivers).flat_map(move |i| (0..per_receiver).map(move |s| format!("{prefix}{i}/{s}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_roles_survive_a_killed_dispatch_worker() {
    const HTTP_GROUPS: usize = 4;
    const HTTP_RECEIVERS: usize = 50; // per group
    const HTTP_PER_RECEIVER: usize = 100; // 4 × 50 × 100 = 20,000 over HTTP
    const KAFKA_RECEIVERS: usize = 50;
    const KAFKA_PER_RECEIVER: usize = 100; // 5,000 from the Python producer
    const TOTAL: usize = 25_000;

    let broker = Broker::on_disk();
    let d = Deployment::new(&broker, "").await;
    let key = d.create_app("e2e");
    let ingest = d.spawn("ingest");
    let mut dispatch_a = d.spawn("dispatch");
    let _dispatch_b = d.spawn("dispatch");
    let _analytics = d.spawn("analytics");
    let template = inbox_template(&ingest, &key).await;

    let producer =
        produce_with_python(&broker, &key, template, KAFKA_RECEIVERS, KAFKA_PER_RECEIVER);
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let mut loaders = Vec::new();
    for g in 0..HTTP_GROUPS {
        let (base, key, accepted) = (ingest.base(), key.clone(), accepted.clone());
        loaders.push(tokio::spawn(async move {
            let ids = load_http(
                base,
                key,
                template,
                format!("user{g}-"),
                HTTP_RECEIVERS,
                HTTP_PER_RECEIVER,
            )
            .await;
            accepted.lock().unwrap().extend(ids);
        }));
    }

    // Kill one worker with SIGKILL once a third of the messages are sent.
    let pool = sqlx::PgPool::connect(&d.store_url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while sent_in_ledger(&pool).await < (TOTAL / 3) as i64 {
        assert!(Instant::now() < deadline, "dispatch made no progress");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    dispatch_a.child.kill().unwrap();
    dispatch_a.child.wait().unwrap();
    let sent_at_kill = sent_in_ledger(&pool).await;
    // Restart it, as an orchestrator would, once its session has expired (6 s). tansu 0.6 hands
    // a dead member's partitions to the others only when a member joins; Apache Kafka also does
    // it when the session times out.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let _dispatch_c = d.spawn("dispatch");

    for l in loaders {
        l.await.unwrap();
    }
    let out = tokio::task::spawn_blocking(move || producer.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "the Python producer failed");
    let produced: usize = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(produced, KAFKA_RECEIVERS * KAFKA_PER_RECEIVER);
    assert_eq!(
        accepted.lock().unwrap().len(),
        HTTP_GROUPS * HTTP_RECEIVERS * HTTP_PER_RECEIVER
    );
    assert!(
        (sent_at_kill as usize) < TOTAL,
        "the kill came after everything was sent"
    );

    let rows = wait_for_sent(&d.warehouse(), TOTAL).await;
    let mut expected: HashSet<String> =
        expected_biz_ids("kuser-", KAFKA_RECEIVERS, KAFKA_PER_RECEIVER).collect();
    for g in 0..HTTP_GROUPS {
        expected.extend(
            expected_biz_ids(&format!("user{g}-"), HTTP_RECEIVERS, HTTP_PER_RECEIVER)
                .map(|s| s.to_string()),
        );
    }
    check_exactly_once_in_order(&rows, &expected);
    let http_ids: HashSet<String> = accepted.lock().unwrap().iter().cloned().collect();
    let sent_ids: HashSet<&str> = rows.iter().map(|r| r.3.as_str()).collect();
    assert!(http_ids.iter().all(|id| sent_ids.contains(id.as_str())));
    assert_eq!(inbox_rows(&d.store_url).await, TOTAL as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_nothing_accepted() {
    const RECEIVERS: usize = 50;
    const PER_RECEIVER: usize = 60; // 3,000 messages
    let mut broker = Broker::on_disk();
    let d = Deployment::new(&broker, "").await;
    let key = d.create_app("e2e");
    let ingest = d.spawn("ingest");
    let _dispatch = d.spawn("dispatch");
    let _analytics = d.spawn("analytics");
    let template = inbox_template(&ingest, &key).await;

    let loader = tokio::spawn(load_http(
        ingest.base(),
        key.clone(),
        template,
        "r-".into(),
        RECEIVERS,
        PER_RECEIVER,
    ));
    let pool = sqlx::PgPool::connect(&d.store_url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while sent_in_ledger(&pool).await < 1_000 {
        assert!(Instant::now() < deadline, "dispatch made no progress");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every role is past joining its consumer group: the warehouse has events. (Restarting
    // tansu while a group is forming left the analytics group without members for good in one
    // run: tansu keeps the group's state in its database and does not recover it.)
    wait_for_sent(&d.warehouse(), 1).await;
    tokio::task::block_in_place(|| broker.restart(Duration::from_secs(3)));
    let accepted = loader.await.unwrap();
    assert_eq!(accepted.len(), RECEIVERS * PER_RECEIVER);

    let rows = wait_for_sent(&d.warehouse(), RECEIVERS * PER_RECEIVER).await;
    let expected: HashSet<String> = expected_biz_ids("r-", RECEIVERS, PER_RECEIVER).collect();
    check_exactly_once_in_order(&rows, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_producer_records_land_in_the_dlq_with_their_reason() {
    let broker = Broker::start("memory://tansu/");
    let d = Deployment::new(&broker, "max_body_bytes = 20000\n").await;
    let key = d.create_app("e2e");
    let serve = d.spawn("serve");
    let template = inbox_template(&serve, &key).await;

    let good = json!({"v": 1, "app": "e2e", "api_key": key, "template_id": template,
                      "messages": [{"receivers": ["ok-1"], "variables": {"seq": 1}, "biz_id": "ok-1/1"}]});
    let stranger = json!({"v": 1, "app": "e2e", "api_key": "hk_not_a_key", "template_id": template,
                          "messages": [{"receivers": ["x"], "variables": {"seq": 1}}]});
    let big = json!({"v": 1, "app": "e2e", "api_key": key, "template_id": template,
                     "messages": [{"receivers": ["big"], "variables": {"seq": "x".repeat(30_000)}}]});
    // A record shaped like herald's own message record, written by a producer: no signature.
    let forged = herald_core::MessageRecord {
        v: 1,
        message_id: herald_core::MessageId::new(),
        request_id: "forged".into(),
        biz_id: Some("forged/1".into()),
        app: "e2e".into(),
        template_id: template,
        channel: herald_core::Channel::Inbox,
        msg_type: herald_core::MsgType::Notice,
        account_id: None,
        receiver: "forged".into(),
        content: json!({"title": "not from herald", "content": "x"}),
        accepted_at: chrono::Utc::now(),
        send_at: None,
        timezone: None,
    };
    let lines = [
        json!({"key": "forged", "value": serde_json::to_string(&forged).unwrap()}),
        json!({"key": "m", "value": "{this is not json"}),
        json!({"key": "x", "value": stranger.to_string()}),
        json!({"key": "big", "value": big.to_string()}),
        json!({"key": "ok-1", "value": good.to_string()}),
    ];
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/kafka_produce.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args(["raw", "--brokers", &broker.address()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for l in &lines {
            writeln!(stdin, "{l}").unwrap();
        }
    }
    assert!(child.wait_with_output().unwrap().status.success());

    let config = KafkaConfig {
        brokers: broker.address(),
        ..KafkaConfig::default()
    };
    let bus = KafkaBus::new(&config).unwrap();
    let mut consumer = bus
        .subscribe(REQUESTS_DLQ_TOPIC, "e2e-dlq-reader")
        .await
        .unwrap();
    let mut reasons = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while reasons.len() < 4 {
        assert!(Instant::now() < deadline, "DLQ records so far: {reasons:?}");
        for d in consumer.poll(10, Duration::from_millis(500)).await.unwrap() {
            let header = |name: &str| {
                d.record
                    .headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            assert!(header("source").starts_with("herald.requests/"));
            assert!(!header("reason_detail").is_empty());
            reasons.insert(
                String::from_utf8(d.record.key.clone()).unwrap(),
                header("reason"),
            );
        }
    }
    assert_eq!(reasons["m"], "malformed_record");
    assert_eq!(reasons["x"], "unauthorized");
    assert_eq!(reasons["big"], "record_too_large");
    assert_eq!(reasons["forged"], "unsigned_record");
    // The good record was sent, and the refusals are counted.
    let rows = wait_for_sent(&d.warehouse(), 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, "ok-1/1");
    // Its trace, once the store's index has forgotten it (retention), comes from the warehouse.
    let trace_url = format!("{}/v1/messages/{}", serve.base(), rows[0].3);
    let trace = || async {
        let r = reqwest::Client::new()
            .get(&trace_url)
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let indexed = loop {
        let (status, t) = trace().await;
        if status == 200 && t["state"] == "sent" {
            break t;
        }
        assert!(Instant::now() < deadline, "{status} {t}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let store = herald_core::store::Store::open(&d.store_url).await.unwrap();
    let far_ahead = (chrono::Utc::now() + chrono::Duration::days(1)).timestamp_micros();
    assert_eq!(store.prune_index(far_ahead, 100).await.unwrap(), 1);
    let (status, from_warehouse) = trace().await;
    assert_eq!(status, 200, "{from_warehouse}");
    // The same events (the warehouse keeps times to the microsecond).
    let ids = |t: &Value| -> Vec<(String, String)> {
        t["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["event_id"].to_string(), e["state"].to_string()))
            .collect()
    };
    assert_eq!(ids(&from_warehouse), ids(&indexed));
    assert_eq!(from_warehouse["state"], "sent");
    let metrics = reqwest::get(format!("{}/metrics", serve.base()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for code in [
        "malformed_record",
        "unauthorized",
        "record_too_large",
        "unsigned_record",
    ] {
        let line = format!("herald_dead_lettered_total{{code=\"{code}\"}} 1");
        assert!(metrics.contains(&line), "missing `{line}` in metrics");
    }
    let _ = bus;
}

/// A key revoked and a template changed through one ingest process take effect in another at
/// once (PostgreSQL's NOTIFY), not when its ten-minute cache entries expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_and_template_edits_reach_every_ingest_process_at_once() {
    let broker = Broker::start("memory://tansu/");
    let d = Deployment::new(&broker, "cache_ttl = \"10m\"\n").await;
    let admin = d.create_app("e2e");
    let (a, b) = (d.spawn("ingest"), d.spawn("ingest"));
    let http = reqwest::Client::new();
    let (s, k) = post(
        &http,
        format!("{}/v1/keys", a.base()),
        &admin,
        json!({"name": "reader", "scopes": ["read"]}),
    )
    .await;
    assert_eq!(s, 201, "{k}");
    let (key_id, reader) = (k["key_id"].as_str().unwrap(), k["key"].as_str().unwrap());
    let template = inbox_template(&a, &admin).await;
    let read = |key: &str| {
        http.get(format!("{}/v1/templates/{template}", b.base()))
            .bearer_auth(key)
            .send()
    };
    // Both are cached in b now.
    let t = read(reader).await.unwrap();
    assert_eq!(t.status(), 200);
    assert_eq!(
        t.json::<Value>().await.unwrap()["content"]["title"],
        "note {$seq}"
    );

    let s = http
        .put(format!("{}/v1/templates/{template}", a.base()))
        .bearer_auth(&admin)
        .json(
            &json!({"name": "note", "channel": "inbox", "msg_type": "notice",
                      "content": {"title": "edited {$seq}", "content": "seq {$seq}"}}),
        )
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(s, 200);
    let s = http
        .delete(format!("{}/v1/keys/{key_id}", a.base()))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(s, 200);

    let started = Instant::now();
    loop {
        let status = read(reader).await.unwrap().status();
        if status == 401 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the revoked key still works in the other process ({status})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t: Value = read(&admin).await.unwrap().json().await.unwrap();
    assert_eq!(t["content"]["title"], "edited {$seq}", "{t}");
    eprintln!(
        "revocation reached the other ingest process in {:?}",
        started.elapsed()
    );
}

/// A frequency cap holds in total with two dispatch processes on Kafka and PostgreSQL: of 12
/// messages to each of 20 receivers, exactly 5 per receiver are sent (the first 5, in order) and
/// the rest end `dedup_frequency`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatch_processes_hold_a_frequency_cap_in_total() {
    const RECEIVERS: usize = 20;
    const PER_RECEIVER: usize = 12;
    const CAP: i64 = 5;
    let broker = Broker::on_disk();
    let d = Deployment::new(&broker, "").await;
    let key = d.create_app("e2e");
    let ingest = d.spawn("ingest");
    let _a = d.spawn("dispatch");
    let _b = d.spawn("dispatch");
    let _analytics = d.spawn("analytics");
    let template = inbox_template(&ingest, &key).await;
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/policy", ingest.base()))
        .bearer_auth(&key)
        .json(&json!({"frequency_caps": [{"channel": "inbox", "max": CAP, "period_secs": 86400}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    let accepted = load_http(
        ingest.base(),
        key.clone(),
        template,
        "c-".into(),
        RECEIVERS,
        PER_RECEIVER,
    )
    .await;
    assert_eq!(accepted.len(), RECEIVERS * PER_RECEIVER);

    let pool = sqlx::PgPool::connect(&d.store_url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let states: HashMap<String, i64> = loop {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM send_ledger GROUP BY state")
                .fetch_all(&pool)
                .await
                .unwrap();
        let states: HashMap<String, i64> = rows.into_iter().collect();
        if states.values().sum::<i64>() == (RECEIVERS * PER_RECEIVER) as i64
            && !states.contains_key("sending")
        {
            break states;
        }
        assert!(Instant::now() < deadline, "not all claimed: {states:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        states.get("sent"),
        Some(&(RECEIVERS as i64 * CAP)),
        "{states:?}"
    );
    assert_eq!(
        states.get("dedup_frequency"),
        Some(&((RECEIVERS * PER_RECEIVER) as i64 - RECEIVERS as i64 * CAP)),
        "{states:?}"
    );
    // Per receiver: exactly the first CAP messages (sequence numbers 0..CAP) reached the inbox.
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT receiver, content FROM inbox")
        .fetch_all(&pool)
        .await
        .unwrap();
    let mut seqs: HashMap<String, Vec<i64>> = HashMap::new();
    for (receiver, content) in rows {
        let content: Value = serde_json::from_str(&content).unwrap();
        let seq = content["title"]
            .as_str()
            .unwrap()
            .trim_start_matches("note ");
        seqs.entry(receiver).or_default().push(seq.parse().unwrap());
    }
    assert_eq!(seqs.len(), RECEIVERS);
    for (receiver, mut got) in seqs {
        got.sort_unstable();
        assert_eq!(got, (0..CAP).collect::<Vec<_>>(), "{receiver}");
    }
}

/// The `sent` count of a process's `herald_messages_total{channel="webhook"}`.
async fn webhook_sent(role: &Role) -> f64 {
    let text = reqwest::get(format!("{}/metrics", role.base()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("herald_messages_total{channel=\"webhook\",state=\"sent\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatch_processes_share_an_account_rate_limit() {
    const LIMIT: usize = 40;
    const MESSAGES: usize = 240;
    let (url, calls) =
        crate::support::webhook_receiver(|_| (axum::http::StatusCode::OK, "0")).await;
    let broker = Broker::on_disk();
    let d = Deployment::new(&broker, "").await;
    let key = d.create_app("e2e");
    let ingest = d.spawn("ingest");
    let a = d.spawn("dispatch");
    let b = d.spawn("dispatch");
    let http = reqwest::Client::new();
    let (s, account) = post(
        &http,
        format!("{}/v1/accounts", ingest.base()),
        &key,
        json!({"name": "hook", "channel": "webhook", "config": {"url": url, "secret": "s"}}),
    )
    .await;
    assert_eq!(s, 201, "{account}");
    let (s, template) = post(
        &http,
        format!("{}/v1/templates", ingest.base()),
        &key,
        json!({"name": "hook", "channel": "webhook", "msg_type": "notice",
               "account_id": account["id"], "content": {"n": "1"}}),
    )
    .await;
    assert_eq!(s, 201, "{template}");
    let resp = http
        .put(format!("{}/v1/policy", ingest.base()))
        .bearer_auth(&key)
        .json(&json!({"rate_limits": [{"account_id": account["id"], "per_second": LIMIT}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let receivers: Vec<String> = (0..MESSAGES).map(|i| format!("r{i}")).collect();
    let (s, sent) = post(
        &http,
        format!("{}/v1/send", ingest.base()),
        &key,
        json!({"template_id": template["id"], "receivers": receivers}),
    )
    .await;
    assert_eq!(s, 202, "{sent}");

    let deadline = Instant::now() + Duration::from_secs(90);
    while calls.lock().unwrap().len() < MESSAGES {
        assert!(
            Instant::now() < deadline,
            "{} of {MESSAGES} arrived",
            calls.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = calls.lock().unwrap().clone();
    let ids: HashSet<&String> = calls.iter().map(|(id, _)| id).collect();
    assert_eq!(
        (calls.len(), ids.len()),
        (MESSAGES, MESSAGES),
        "each exactly once"
    );
    // Both processes sent, and together they kept the limit: at most 40 in any second, plus the
    // 250 ms burst allowance (10) and slack for timers (4).
    let (sent_a, sent_b) = (webhook_sent(&a).await, webhook_sent(&b).await);
    assert_eq!(sent_a + sent_b, MESSAGES as f64);
    assert!(sent_a > 0.0 && sent_b > 0.0, "{sent_a} + {sent_b}");
    let times: Vec<Instant> = calls.iter().map(|(_, t)| *t).collect();
    let busiest = times
        .iter()
        .map(|t| {
            times
                .iter()
                .filter(|u| **u >= *t && **u - *t < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    assert!(busiest <= LIMIT + 14, "{busiest} calls within one second");
    let span = *times.iter().max().unwrap() - *times.iter().min().unwrap();
    assert!(
        span >= Duration::from_millis(4_500),
        "{MESSAGES} calls in {span:?}"
    );
}

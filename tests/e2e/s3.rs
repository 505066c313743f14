//! `herald` itself with its warehouse on S3: the binary serves with `HERALD_WAREHOUSE=s3://…`
//! against the local S3-compatible server (moto, `$HERALD_TEST_S3`), sends, and `herald sql`
//! reads the figures back from the bucket.

use serde_json::{Value, json};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MESSAGES: usize = 300;

/// The S3 server and a new bucket on it.
async fn bucket() -> (String, String) {
    let endpoint = std::env::var("HERALD_TEST_S3").expect(
        "HERALD_TEST_S3 is not set: run the suite with scripts/test.sh (it starts moto), or set \
         it to an S3-compatible server such as http://127.0.0.1:5000 with AWS_ACCESS_KEY_ID, \
         AWS_SECRET_ACCESS_KEY and AWS_REGION",
    );
    let endpoint = endpoint.trim_end_matches('/').to_string();
    let bucket = format!("herald-e2e-{}", uuid::Uuid::new_v4().simple());
    let created = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{}", created.status());
    (endpoint, bucket)
}

/// `herald` with the data dir `dir`, the warehouse in the bucket and the endpoint set.
fn herald(dir: &Path, endpoint: &str, warehouse: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_herald"));
    c.arg("--data-dir")
        .arg(dir)
        .env("HERALD_WAREHOUSE", warehouse)
        .env("HERALD_ANALYTICS__FLUSH_INTERVAL", "200ms")
        .env("HERALD_LOG", "warn")
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ALLOW_HTTP", "true");
    c
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn herald_serves_with_its_warehouse_on_s3_and_herald_sql_reads_it_back() {
    let (endpoint, bucket) = bucket().await;
    let warehouse = format!("s3://{bucket}/herald");
    let dir = tempfile::tempdir().unwrap();
    let out = herald(dir.path(), &endpoint, &warehouse)
        .args(["apps", "create", "s3"])
        .output()
        .unwrap();
    let key = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("api key: ").map(str::to_string))
        .expect("an api key");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = Killed(
        herald(dir.path(), &endpoint, &warehouse)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/health")).send().await.is_err() {
        assert!(Instant::now() < deadline, "herald did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let post = |path: &str, body: Value| {
        http.post(format!("{base}{path}"))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    let t: Value = post(
        "/v1/templates",
        json!({"name": "hi", "channel": "inbox", "msg_type": "notice",
               "content": {"title": "Hi {$name}", "content": "Welcome"}}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let receivers: Vec<String> = (0..MESSAGES).map(|i| format!("user-{i}")).collect();
    let sent = post(
        "/v1/send",
        json!({"template_id": t["id"], "receivers": receivers, "variables": {"name": "Ann"}}),
    )
    .await
    .unwrap();
    assert_eq!(sent.status(), 202);

    // `herald sql`, a separate process, reads the bucket.
    let query = "SELECT count(DISTINCT message_id) AS n FROM delivery_events WHERE state = 'sent'";
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = herald(dir.path(), &endpoint, &warehouse)
            .args(["sql", query, "--format", "csv"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && text.lines().nth(1) == Some(&MESSAGES.to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the warehouse on S3 never held {MESSAGES} sent messages: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The Parquet files are objects in the bucket, under the prefix.
    let listing = http
        .get(format!(
            "{endpoint}/{bucket}?list-type=2&prefix=herald/delivery_events/"
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(listing.contains(".parquet</Key>"), "{listing}");
    // Nothing was written to the local data dir's default warehouse.
    assert!(
        !dir.path()
            .join("warehouse")
            .join("delivery_events")
            .exists()
    );
}

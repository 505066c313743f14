//! Starting herald for a test and talking to it.

use axum::http::{HeaderMap, StatusCode};
use herald::{Application, Roles};
use herald_core::config::Config;
use herald_core::store::Store;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A running herald with one app.
pub struct TestApp {
    pub key: String,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    running: Running,
}

/// An in-process herald with some of its roles, on a given config; stopped by `stop`.
pub struct Running {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn start(config: Config, roles: Roles) -> Running {
        let app = Application::build(config, roles).await.unwrap();
        let addr = app.address();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(app.run(rx));
        Running { addr, stop, task }
    }

    /// `http://ADDR`, the base of its URLs.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.unwrap().unwrap();
    }
}

/// The config every test starts from: a temp data dir, a free port, fast warehouse flushes
/// and stats passes.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.http.listen = "127.0.0.1:0".into();
    c.http.cache_ttl = Duration::from_millis(100);
    c.analytics.flush_interval = Duration::from_millis(100);
    c.analytics.stats_interval = Duration::from_millis(100);
    c.bus.fsync = false;
    // Vendor stand-ins and webhook receivers listen on 127.0.0.1.
    c.dispatch.allow_private_urls = true;
    c
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let store = Store::open(&config.store_url()).await.unwrap();
        let (_, key) = store.create_app("test-app").await.unwrap();
        let running = Running::start(config, Roles::ALL).await;
        TestApp {
            key,
            dir,
            http: reqwest::Client::new(),
            running,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.running.base(), path)
    }

    pub fn warehouse(&self) -> PathBuf {
        self.dir.path().join("warehouse")
    }

    /// A request with this app's key.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call_as(&self.key, method, path, body).await
    }

    pub async fn call_as(
        &self,
        key: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// Creates an inbox template with `{$name}` and returns its id.
    pub async fn inbox_template(&self) -> i64 {
        let (s, t) = self
            .post(
                "/v1/templates",
                json!({"name": "welcome", "channel": "inbox", "msg_type": "notice",
                       "content": {"title": "Hi {$name}", "content": "Welcome, {$name}!"}}),
            )
            .await;
        assert_eq!(s, 201, "{t}");
        t["id"].as_i64().unwrap()
    }

    /// A webhook account named `name` posting to `url`; returns its id.
    pub async fn webhook_account(&self, name: &str, url: &str) -> i64 {
        let (s, a) = self
            .post(
                "/v1/accounts",
                json!({"name": name, "channel": "webhook", "config": {"url": url, "secret": "s"}}),
            )
            .await;
        assert_eq!(s, 201, "{a}");
        a["id"].as_i64().unwrap()
    }

    /// A webhook template of `msg_type` (no variables) on `account`; returns its id.
    pub async fn webhook_template(&self, account: i64, msg_type: &str) -> i64 {
        let (s, t) = self
            .post(
                "/v1/templates",
                json!({"name": msg_type, "channel": "webhook", "msg_type": msg_type,
                "account_id": account, "content": {"n": "1"}}),
            )
            .await;
        assert_eq!(s, 201, "{t}");
        t["id"].as_i64().unwrap()
    }

    /// Sends `template` (no variables) to `{prefix}-0` … `{prefix}-{n-1}`; returns the message
    /// ids.
    pub async fn send_to_numbered(&self, template: i64, prefix: &str, n: usize) -> Vec<String> {
        let receivers: Vec<String> = (0..n).map(|k| format!("{prefix}-{k}")).collect();
        let (s, a) = self
            .post(
                "/v1/send",
                json!({"template_id": template, "receivers": receivers}),
            )
            .await;
        assert_eq!(s, 202, "{a}");
        message_ids(&a)
    }

    /// Waits until the trace of `id` reaches `state`; returns the trace.
    pub async fn wait_for_state(&self, id: &str, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (s, t) = self.get(&format!("/v1/messages/{id}")).await;
            if s == 200 && t["state"] == state {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "message {id} never reached {state}: {s} {t}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The counter `name` (with labels, as printed) from `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        counter(&self.metrics_text().await, name)
    }

    pub async fn stop(self) {
        self.running.stop().await;
    }
}

/// The counter `name` (with labels, as printed) in the Prometheus text `metrics`; 0 if absent.
pub fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Runs SQL over a warehouse and returns the CSV text.
pub async fn sql_csv(warehouse: &Path, sql: &str) -> String {
    let batches = herald_analytics::sql::query(warehouse, sql).await.unwrap();
    herald_analytics::sql::format(&batches, herald_analytics::sql::OutputFormat::Csv).unwrap()
}

/// Message ids of a `202` answer.
pub fn message_ids(answer: &Value) -> Vec<String> {
    answer["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_string())
        .collect()
}

/// The test SMTP server (`tests/support/smtp_sink.py`, aiosmtpd): writes each message it
/// accepts as JSON into a directory. It exits when this handle (its stdin) is dropped.
pub struct SmtpSink {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: std::process::Child,
}

impl SmtpSink {
    pub fn start() -> SmtpSink {
        Self::start_with(&[])
    }

    /// Starts the sink with extra flags (`--transient REGEX`, `--permanent REGEX`).
    pub fn start_with(args: &[&str]) -> SmtpSink {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/smtp_sink.py");
        let mut child = std::process::Command::new("python3")
            .arg(script)
            .arg("--dir")
            .arg(dir.path())
            .arg("--exit-on-eof")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 is needed for the SMTP test server");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .strip_prefix("READY ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!("the SMTP sink did not start (is aiosmtpd installed?): {line:?}")
            });
        SmtpSink { port, dir, child }
    }

    /// Every message received so far, as the sink decoded it.
    pub fn messages(&self) -> Vec<Value> {
        let mut files: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
            .collect()
    }

    /// The Message-ID header of every message received so far.
    pub fn message_ids(&self) -> Vec<String> {
        self.messages()
            .iter()
            .map(|m| m["message_id"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The counter `name` (as printed, labels included) of the herald at `base`.
pub async fn counter_of(base: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    counter(&text, name)
}

/// What the receiver answers: a status and a `Retry-After` in seconds.
pub type Answer = (StatusCode, &'static str);

/// A webhook receiver answering `answer(n)` to the n-th call (from 1) for a message (by its
/// `X-Herald-Message-Id`); returns its URL and the calls (message id, when).
pub async fn webhook_receiver(
    answer: impl Fn(usize) -> Answer + Send + Sync + 'static,
) -> (String, Arc<Mutex<Vec<(String, Instant)>>>) {
    let calls = Arc::new(Mutex::new(Vec::<(String, Instant)>::new()));
    let (c, answer) = (calls.clone(), Arc::new(answer));
    let handler = move |headers: HeaderMap| {
        let (calls, answer) = (c.clone(), answer.clone());
        async move {
            let id = headers
                .get("x-herald-message-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let mut calls = calls.lock().unwrap();
            calls.push((id.clone(), Instant::now()));
            let n = calls.iter().filter(|(c, _)| *c == id).count();
            let (status, retry_after) = answer(n);
            (status, [("retry-after", retry_after)])
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let router = axum::Router::new().route("/hook", axum::routing::post(handler));
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, calls)
}

/// `herald serve` as an OS process on a free port, with `HERALD_LOG=warn` (its log appended to
/// `<data dir>/herald.log`) and 200 ms warehouse flushes. Killed when dropped.
pub struct Serve {
    pub child: std::process::Child,
    pub base: String,
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// `herald serve` on the data directory `dir`.
pub fn serve(dir: &Path) -> Serve {
    Serve::start(dir, &[], &[])
}

impl Serve {
    /// `herald serve` on `dir` with extra global `args` (e.g. `--store URL`) and `env`.
    pub fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Serve {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Self::spawn(dir, args, env, port);
        Serve {
            child,
            base: format!("http://127.0.0.1:{port}"),
            port,
            dir: dir.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn spawn(
        dir: &Path,
        args: &[impl AsRef<std::ffi::OsStr>],
        env: &[(impl AsRef<std::ffi::OsStr>, impl AsRef<std::ffi::OsStr>)],
        port: u16,
    ) -> std::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("herald.log"))
            .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("--data-dir")
            .arg(dir)
            .args(args)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("HERALD_ANALYTICS__FLUSH_INTERVAL", "200ms")
            // Vendor stand-ins and the SMTP sink listen on 127.0.0.1.
            .env("HERALD_DISPATCH__ALLOW_PRIVATE_URLS", "true")
            .env("HERALD_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "herald did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    /// Sends SIGTERM and waits for the process to exit; returns how long that took and its
    /// exit status.
    pub fn terminate(&mut self) -> (Duration, std::process::ExitStatus) {
        let started = Instant::now();
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success(), "kill -TERM failed");
        let status = self.child.wait().unwrap();
        (started.elapsed(), status)
    }

    /// Starts the exited process again on the same port, data and settings.
    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.dir, &self.args, &self.env, self.port);
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates an app with `herald apps create` on data directory `dir` (and global `args`, e.g.
/// `--store URL`); returns its API key.
pub fn create_app(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .args(["apps", "create", "e2e"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("api key: "))
        .unwrap()
        .to_string()
}

/// POSTs `body` to `base` + `path` with `key`; returns the status and the JSON answer (`Null`
/// when it is not JSON).
pub async fn post(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    path: &str,
    body: Value,
) -> Result<(u16, Value), reqwest::Error> {
    let resp = http
        .post(format!("{base}{path}"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

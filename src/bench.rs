//! The benchmark harness (`herald bench`). Every figure is printed beside a baseline measured in
//! the same run by the same load generator, as a ratio. Servers run as child processes (this
//! binary), so their memory is measured alone; the load generator is a closed loop of HTTP/1.1
//! keep-alive connections, like `wrk -t1 -cN`.

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `herald bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Seconds each throughput measurement runs.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Messages sent through the end-to-end measurement.
    #[arg(long, default_value_t = 200_000)]
    pub e2e_messages: usize,
    /// Messages sent through each vendor measurement (webhook, SMS batched and unbatched).
    #[arg(long, default_value_t = 50_000)]
    pub vendor_messages: usize,
    /// Records the raw Kafka producer writes (the baseline of the ingest-into-Kafka figure).
    #[arg(long, default_value_t = 200_000)]
    pub kafka_records: usize,
    /// PostgreSQL server for the distributed figures; each measurement creates its own database.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub postgres: String,
    /// The limit of the rate-limit figure, messages a second (below the deployment's capacity,
    /// which the figure measures first).
    #[arg(long, default_value_t = 500)]
    pub rate_limit: u32,
    /// Delivery events published to the embedded bus and drained by the warehouse sink.
    #[arg(long, default_value_t = 2_000_000)]
    pub sink_events: usize,
    /// Delivery events on disk for the hourly aggregate (herald's SQL beside DuckDB's).
    #[arg(long, default_value_t = 10_000_000)]
    pub aggregate_events: usize,
    /// Delivery events in the hour of the statistics figure.
    #[arg(long, default_value_t = 3_600_000)]
    pub stats_events: usize,
    /// Files that hour's events are in (the sink writes about one a second).
    #[arg(long, default_value_t = 3_600)]
    pub stats_files: usize,
    /// Sends in the month of the reconciliation figure, and lines of its bill.
    #[arg(long, default_value_t = 10_000_000)]
    pub reconcile_sends: usize,
    /// Pairs of runs of the policies figure (every policy off, then on), run alternately; the
    /// figure is the ratio of the two means.
    #[arg(long, default_value_t = 3)]
    pub policy_pairs: usize,
    /// Runs of the aggregate query in each engine; the fastest counts.
    #[arg(long, default_value_t = 3)]
    pub query_runs: usize,
    /// Only run these figures (comma-separated: accept, batch, e2e, policies,
    /// policies_webhook, vendor, kafka, ratelimit, sink, aggregate, stats, reconcile).
    #[arg(long, default_value = FIGURES)]
    pub only: String,
    /// Internal: serve the bare baseline handler on this address and nothing else.
    #[arg(long, hide = true)]
    pub baseline_server: Option<String>,
    /// Internal: serve the local vendor (webhook receiver, Tencent `SendSms`) on this address.
    #[arg(long, hide = true)]
    pub vendor_server: Option<String>,
}

/// Every figure `--only` can name, in the order they run.
const FIGURES: &str = concat!(
    "accept,batch,e2e,policies,policies_webhook,vendor,kafka,ratelimit,",
    "sink,aggregate,stats,reconcile"
);

/// Runs the harness.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(addr) = &args.baseline_server {
        return baseline_server(addr).await;
    }
    if let Some(addr) = &args.vendor_server {
        return vendor::serve(addr).await;
    }
    let only: Vec<&str> = args.only.split(',').map(str::trim).collect();
    if let Some(unknown) = only.iter().find(|f| !FIGURES.split(',').any(|k| k == **f)) {
        bail!("--only: unknown figure `{unknown}` (expected some of {FIGURES})");
    }
    if only.contains(&"aggregate") || only.contains(&"reconcile") {
        warehouse::require_duckdb()?; // before anything runs, not minutes into the run
    }
    let load_at_start = warehouse::load_average();
    let mut rows = Vec::new();
    // The bare handler is the baseline of the HTTP acceptance figures only.
    let http = ["accept", "batch", "e2e"].iter().any(|f| only.contains(f));
    let baseline = if http {
        let server = Server::baseline()?;
        let r = load(
            server.addr,
            "/v1/send",
            b"{}".to_vec(),
            "",
            args.connections,
            args.seconds,
        )
        .await?;
        drop(server);
        rows.push(Row::new(
            "bare axum handler answering 202 (baseline)",
            r.rps,
            "req/s",
            1.0,
            Some(r.p99_ms),
        ));
        r.rps
    } else {
        0.0
    };

    if only.contains(&"accept") {
        for (label, roles) in [
            ("POST /v1/send, 1 receiver, ingest role only", "ingest"),
            ("POST /v1/send, 1 receiver, all roles running", "all"),
        ] {
            let herald = Herald::start(roles).await?;
            let body = herald.send_body(1);
            let r = load(
                herald.server.addr,
                "/v1/send",
                body,
                &herald.key,
                args.connections,
                args.seconds,
            )
            .await?;
            rows.push(Row::new(
                label,
                r.rps,
                "req/s",
                r.rps / baseline,
                Some(r.p99_ms),
            ));
        }
    }
    let mut batch_rate = None;
    if only.contains(&"batch") {
        let herald = Herald::start("ingest").await?;
        let body = herald.batch_body(1000, 0);
        let r = load(
            herald.server.addr,
            "/v1/send/batch",
            body,
            &herald.key,
            4,
            args.seconds,
        )
        .await?;
        let rate = r.rps * 1000.0;
        batch_rate = Some(rate);
        rows.push(Row::new(
            "POST /v1/send/batch, 1,000 receivers (receivers/s)",
            rate,
            "receivers/s",
            rate / baseline,
            Some(r.p99_ms),
        ));
    }
    if only.contains(&"e2e") {
        let herald = Herald::start("all").await?;
        let (rate, peak_rss_mb) = herald.end_to_end(args.e2e_messages).await?;
        let base = batch_rate.unwrap_or(baseline);
        rows.push(Row::new(
            "end to end to the inbox, into Parquet (messages/s)",
            rate,
            "msg/s",
            rate / base,
            None,
        ));
        rows.push(Row::new(
            "peak resident memory of herald serve during e2e",
            peak_rss_mb,
            "MB",
            0.0,
            None,
        ));
    }
    if only.contains(&"policies") {
        rows.extend(policy_figures(&args, PolicyChannel::Inbox).await?);
    }
    if only.contains(&"policies_webhook") {
        let vendor = Server::internal("--vendor-server")?;
        rows.extend(policy_figures(&args, PolicyChannel::Webhook(vendor.addr)).await?);
    }
    if only.contains(&"vendor") {
        rows.extend(vendor::figures(&args).await?);
    }
    if only.contains(&"kafka") {
        rows.extend(kafka::figures(&args).await?);
    }
    if only.contains(&"ratelimit") {
        rows.extend(ratelimit::figures(&args).await?);
    }
    if only.contains(&"sink") {
        rows.extend(sink::figures(&args).await?);
    }
    if only.contains(&"aggregate") {
        rows.extend(aggregate::figures(&args).await?);
    }
    if only.contains(&"stats") {
        rows.extend(stats::figures(&args).await?);
    }
    if only.contains(&"reconcile") {
        rows.extend(reconcile::figures(&args).await?);
    }
    println!("\n| figure | value | unit | ratio to baseline | p99 ms |\n|---|---:|---|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.label,
            if r.value < 100.0 {
                format!("{:.2}", r.value)
            } else {
                format!("{:.0}", r.value)
            },
            r.unit,
            if r.ratio > 0.0 {
                format!("{:.2}", r.ratio)
            } else {
                "-".into()
            },
            r.p99_ms
                .map(|p| format!("{p:.1}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    println!(
        "\nbaseline for the e2e ratio: the batch accept rate in this run (or the bare handler's req/s)"
    );
    println!(
        "load average (1 min): {load_at_start} at the start, {} at the end",
        warehouse::load_average()
    );
    Ok(())
}

struct Row {
    label: String,
    value: f64,
    unit: &'static str,
    ratio: f64,
    p99_ms: Option<f64>,
}

impl Row {
    fn new(
        label: impl Into<String>,
        value: f64,
        unit: &'static str,
        ratio: f64,
        p99_ms: Option<f64>,
    ) -> Self {
        Row {
            label: label.into(),
            value,
            unit,
            ratio,
            p99_ms,
        }
    }
}

/// A child process serving HTTP, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl Server {
    fn baseline() -> anyhow::Result<Server> {
        Self::internal("--baseline-server")
    }

    /// This binary serving one of the harness's internal servers (`flag`) on a free port.
    fn internal(flag: &str) -> anyhow::Result<Server> {
        let addr = free_addr()?;
        let child = Command::new(std::env::current_exe()?)
            .args(["bench", flag, &addr.to_string()])
            .stdout(Stdio::null())
            .spawn()?;
        let s = Server { child, addr };
        wait_listening(addr)?;
        Ok(s)
    }

    /// Resident memory (VmRSS) in MB.
    fn rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    }
}

fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("server on {addr} did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

async fn baseline_server(addr: &str) -> anyhow::Result<()> {
    let app = axum::Router::new().route(
        "/v1/send",
        axum::routing::post(|| async { axum::http::StatusCode::ACCEPTED }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// A `herald serve` child with an app, and an inbox template to send.
struct Herald {
    server: Server,
    key: String,
    template_id: i64,
    dir: PathBuf,
    /// Processes of other roles sharing the data dir, bus and store.
    others: Vec<Server>,
}

impl Herald {
    async fn start(roles: &str) -> anyhow::Result<Herald> {
        Self::start_with(roles, &[]).await
    }

    /// Starts `herald serve` with extra `HERALD_*` environment settings.
    async fn start_with(roles: &str, env: &[(&str, &str)]) -> anyhow::Result<Herald> {
        let dir = std::env::temp_dir().join(format!("herald-bench-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir)?;
        let exe = std::env::current_exe()?;
        let out = Command::new(&exe)
            .args(["--data-dir"])
            .arg(&dir)
            .args(["apps", "create", "bench"])
            .envs(env.iter().copied())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let key = text
            .lines()
            .find_map(|l| l.strip_prefix("api key: "))
            .context("`herald apps create` printed no key")?
            .to_string();
        let addr = free_addr()?;
        let child = Command::new(&exe)
            .args(["--data-dir"])
            .arg(&dir)
            .args(["serve", "--listen", &addr.to_string(), "--roles", roles])
            .env("HERALD_LOG", "warn")
            // The bench's webhook receiver listens on 127.0.0.1.
            .env("HERALD_DISPATCH__ALLOW_PRIVATE_URLS", "true")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()?;
        let server = Server { child, addr };
        wait_listening(addr)?;
        let client = setup_client::Client::new(addr);
        let (status, body) = client
            .post(
                "/v1/templates",
                &key,
                serde_json::json!({"name": "bench", "channel": "inbox", "msg_type": "notice",
                    "content": {"title": "Hello {$name}", "content": "Your code is {$code}"}})
                .to_string()
                .into_bytes(),
            )
            .await?;
        if status != 201 {
            bail!("creating the bench template failed: {status} {body}");
        }
        let template_id = serde_json::from_str::<serde_json::Value>(&body)?["id"]
            .as_i64()
            .context("template id")?;
        Ok(Herald {
            server,
            key,
            template_id,
            dir,
            others: Vec::new(),
        })
    }

    /// Starts `herald ROLE` as another process of this deployment.
    fn spawn_role(&mut self, role: &str, env: &[(&str, &str)]) -> anyhow::Result<()> {
        let addr = free_addr()?;
        let child = Command::new(std::env::current_exe()?)
            .args(["--data-dir"])
            .arg(&self.dir)
            .args([role, "--listen", &addr.to_string()])
            .env("HERALD_LOG", "warn")
            // The bench's webhook receiver listens on 127.0.0.1.
            .env("HERALD_DISPATCH__ALLOW_PRIVATE_URLS", "true")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()?;
        self.others.push(Server { child, addr });
        wait_listening(addr)
    }

    /// POSTs JSON to the API with the bench app's key and returns the answer, which must have
    /// status `want`.
    async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
        want: u16,
    ) -> anyhow::Result<serde_json::Value> {
        let client = setup_client::Client::new(self.server.addr);
        let (status, text) = client
            .post(path, &self.key, body.to_string().into_bytes())
            .await?;
        if status != want {
            bail!("POST {path}: {status} {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    /// A webhook account posting to the local vendor at `vendor` and a notice template with
    /// `content` on it; returns both as the API answered them.
    async fn webhook_template(
        &self,
        vendor: SocketAddr,
        content: serde_json::Value,
    ) -> anyhow::Result<(serde_json::Value, serde_json::Value)> {
        let account = self.webhook_account("hook", vendor).await?;
        let template = self
            .post(
                "/v1/templates",
                serde_json::json!({"name": "hook", "channel": "webhook", "msg_type": "notice",
                    "account_id": account["id"], "content": content}),
                201,
            )
            .await?;
        Ok((account, template))
    }

    /// A webhook account named `name` posting to the local vendor at `vendor`, as the API
    /// answered it.
    async fn webhook_account(
        &self,
        name: &str,
        vendor: SocketAddr,
    ) -> anyhow::Result<serde_json::Value> {
        self.post(
            "/v1/accounts",
            serde_json::json!({"name": name, "channel": "webhook",
                "config": {"url": format!("http://{vendor}/hook"), "secret": "bench-secret"}}),
            201,
        )
        .await
    }

    fn send_body(&self, receivers: usize) -> Vec<u8> {
        let receivers: Vec<String> = (0..receivers).map(|i| format!("user-{i}")).collect();
        serde_json::json!({"template_id": self.template_id, "receivers": receivers,
            "variables": {"name": "Ann", "code": "123456"}})
        .to_string()
        .into_bytes()
    }

    fn batch_body(&self, receivers: usize, offset: usize) -> Vec<u8> {
        let receivers: Vec<String> = (offset..offset + receivers)
            .map(|i| format!("user-{i}"))
            .collect();
        serde_json::json!({"template_id": self.template_id,
            "messages": [{"receivers": receivers, "variables": {"name": "Ann", "code": "123456"}}]})
        .to_string()
        .into_bytes()
    }

    /// Sends the bench's messages through webhooks to the local vendor at `vendor`: two
    /// webhook accounts, and a notice template with the inbox template's content on the first;
    /// returns both accounts' ids.
    async fn send_through_webhooks(&mut self, vendor: SocketAddr) -> anyhow::Result<[i64; 2]> {
        let content =
            serde_json::json!({"title": "Hello {$name}", "content": "Your code is {$code}"});
        let (first, template) = self.webhook_template(vendor, content).await?;
        let second = self.webhook_account("hook-2", vendor).await?;
        self.template_id = template["id"].as_i64().context("template id")?;
        let id = |account: &serde_json::Value| account["id"].as_i64().context("account id");
        Ok([id(&first)?, id(&second)?])
    }

    /// Sets a policy with every stage on and nothing binding: quiet hours elsewhere in the day,
    /// content dedup (every message differs by receiver), a cap of a million a day, 1,000
    /// sensitive words to mask (none occurs), and a blocklist of 10,000 other receivers, all
    /// on `channel`. With `accounts` (the webhook's), also a route weighing them equally (a
    /// draw and a failover order per message), a rate limit of a million a second on each, and
    /// a limit of 100 a minute per receiver.
    async fn switch_on_every_policy(&self, channel: &str, accounts: &[i64]) -> anyhow::Result<()> {
        let now = chrono::Utc::now();
        let hm = |h| {
            (now + chrono::Duration::hours(h))
                .format("%H:%M")
                .to_string()
        };
        let words: Vec<String> = (0..1000).map(|i| format!("forbidden{i}")).collect();
        let mut policy = serde_json::json!({
            "quiet_hours": {"start": hm(6), "end": hm(7), "notice": "defer"},
            "content_dedup_secs": 3600,
            "frequency_caps": [{"channel": channel, "max": 1_000_000, "period_secs": 86_400}],
            "sensitive_words": words,
            "templates": {self.template_id.to_string(): {"sensitive_words": "mask"}},
        });
        if !accounts.is_empty() {
            let weighted: Vec<_> = accounts
                .iter()
                .map(|id| serde_json::json!({"account_id": id, "weight": 1}))
                .collect();
            let limits: Vec<_> = accounts
                .iter()
                .map(|id| serde_json::json!({"account_id": id, "per_second": 1_000_000}))
                .collect();
            policy["routes"] = serde_json::json!([{"channel": channel, "accounts": weighted}]);
            policy["rate_limits"] = serde_json::json!(limits);
            policy["receiver_rate_limits"] =
                serde_json::json!([{"channel": channel, "max": 100, "period_secs": 60}]);
        }
        let client = setup_client::Client::new(self.server.addr);
        let (status, text) = client
            .send(
                hyper::Method::PUT,
                "/v1/policy",
                &self.key,
                policy.to_string().into_bytes(),
            )
            .await?;
        if status != 200 {
            bail!("PUT /v1/policy: {status} {text}");
        }
        let blocked: Vec<String> = (0..10_000).map(|i| format!("blocked-{i}")).collect();
        self.post(
            &format!("/v1/lists/block/{channel}"),
            serde_json::json!({"receivers": blocked}),
            200,
        )
        .await?;
        Ok(())
    }

    /// Sends `n` messages of the bench's template in batches of 1,000 and waits until every
    /// `sent` event is in Parquet; returns messages/s and the server's peak RSS in MB.
    async fn end_to_end(&self, n: usize) -> anyhow::Result<(f64, f64)> {
        let started = Instant::now();
        let client = setup_client::Client::new(self.server.addr);
        let mut peak: f64 = 0.0;
        let batches = n.div_ceil(1000);
        for b in 0..batches {
            let (status, body) = client
                .post("/v1/send/batch", &self.key, self.batch_body(1000, b * 1000))
                .await?;
            if status != 202 {
                bail!("batch send failed: {status} {body}");
            }
            if b % 20 == 0 {
                peak = peak.max(self.server.rss_mb());
            }
        }
        let total = batches * 1000;
        let warehouse = self.dir.join("warehouse");
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            peak = peak.max(self.server.rss_mb());
            if sent_count(&warehouse).await? >= total as u64 {
                break;
            }
            if Instant::now() > deadline {
                bail!("end-to-end did not finish in 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok((total as f64 / started.elapsed().as_secs_f64(), peak))
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        self.others.clear();
        let _ = self.server.child.kill();
        let _ = self.server.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the policies figures send through.
#[derive(Debug, Clone, Copy)]
enum PolicyChannel {
    /// The inbox: no vendor call, so no route, breaker or rate limit is on the path.
    Inbox,
    /// Webhooks to the local vendor at this address, through two accounts: with every policy
    /// on, also a route over both, a rate limit on each and a per-receiver limit.
    Webhook(SocketAddr),
}

impl PolicyChannel {
    fn name(self) -> &'static str {
        match self {
            PolicyChannel::Inbox => "inbox",
            PolicyChannel::Webhook(_) => "webhook",
        }
    }

    /// A fresh herald sending through this channel; the accounts it sends through.
    async fn herald(self) -> anyhow::Result<(Herald, Vec<i64>)> {
        let mut herald = Herald::start("all").await?;
        let accounts = match self {
            PolicyChannel::Inbox => Vec::new(),
            PolicyChannel::Webhook(vendor) => herald.send_through_webhooks(vendor).await?.to_vec(),
        };
        Ok((herald, accounts))
    }
}

/// End to end through `channel` with every policy off, then with every policy on (limits too
/// high to bind), `--policy-pairs` times alternately in the same run, each run on a fresh
/// herald; the ratio is the mean rate on over the mean rate off, and the labels list every
/// pair's rates.
async fn policy_figures(args: &BenchArgs, channel: PolicyChannel) -> anyhow::Result<Vec<Row>> {
    let name = channel.name();
    let (mut off_rates, mut on_rates) = (Vec::new(), Vec::new());
    for pair in 1..=args.policy_pairs.max(1) {
        let (off, _) = channel.herald().await?;
        off_rates.push(off.end_to_end(args.e2e_messages).await?.0);
        drop(off);
        let (on, accounts) = channel.herald().await?;
        on.switch_on_every_policy(name, &accounts).await?;
        on_rates.push(on.end_to_end(args.e2e_messages).await?.0);
        println!(
            "policies ({name}): pair {pair}: off {:.0} msg/s, on {:.0} msg/s (ratio {:.2})",
            off_rates[pair - 1],
            on_rates[pair - 1],
            on_rates[pair - 1] / off_rates[pair - 1]
        );
    }
    let mean = |rates: &[f64]| rates.iter().sum::<f64>() / rates.len() as f64;
    let list = |rates: &[f64]| {
        rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let on_label = match channel {
        PolicyChannel::Inbox => "every policy on, none binding",
        PolicyChannel::Webhook(_) => {
            "every policy on (with a route over two accounts, their rate limits and a \
             per-receiver limit), none binding"
        }
    };
    let (off_mean, on_mean) = (mean(&off_rates), mean(&on_rates));
    Ok(vec![
        Row::new(
            format!(
                "end to end to the {name}, every policy off (baseline for policies; mean of {} \
                 runs: {} msg/s)",
                off_rates.len(),
                list(&off_rates)
            ),
            off_mean,
            "msg/s",
            1.0,
            None,
        ),
        Row::new(
            format!(
                "end to end to the {name}, {on_label} (mean of {} runs alternating with the \
                 above: {} msg/s)",
                on_rates.len(),
                list(&on_rates)
            ),
            on_mean,
            "msg/s",
            on_mean / off_mean,
            None,
        ),
    ])
}

/// How many `sent` events the warehouse holds.
async fn sent_count(warehouse: &Path) -> anyhow::Result<u64> {
    let sql = "SELECT count(*) AS n FROM delivery_events WHERE state = 'sent'";
    let batches = herald_analytics::sql::query(warehouse, sql).await?;
    let csv = herald_analytics::sql::format(&batches, herald_analytics::sql::OutputFormat::Csv)?;
    Ok(csv
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0))
}

/// What a load run measured.
pub struct LoadResult {
    pub rps: f64,
    pub p99_ms: f64,
}

/// A closed loop of `connections` keep-alive connections POSTing `body` to `path` for `seconds`;
/// every answer must be `202`.
async fn load(
    addr: SocketAddr,
    path: &str,
    body: Vec<u8>,
    key: &str,
    connections: usize,
    seconds: u64,
) -> anyhow::Result<LoadResult> {
    let body = bytes::Bytes::from(body);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let auth = Arc::new(format!("Bearer {key}"));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (body, auth, path) = (body.clone(), auth.clone(), path.to_string());
        tasks.spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let req = Request::post(path.as_str())
                    .header("host", "bench")
                    .header("content-type", "application/json")
                    .header("authorization", auth.as_str())
                    .body(Full::new(body.clone()))?;
                let t = Instant::now();
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                resp.into_body().collect().await?;
                if status.as_u16() != 202 {
                    bail!("unexpected status {status}");
                }
                latencies.push(t.elapsed().as_micros() as u32);
            }
            anyhow::Ok(latencies)
        });
    }
    let started = Instant::now();
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let p99 = all.get(all.len() * 99 / 100).copied().unwrap_or(0) as f64 / 1000.0;
    Ok(LoadResult {
        rps: all.len() as f64 / elapsed,
        p99_ms: p99,
    })
}

mod aggregate;
mod kafka;
mod ratelimit;
mod reconcile;
mod sink;
mod stats;
mod vendor;
mod warehouse;

/// A minimal HTTP/1.1 client for the harness's few setup calls.
mod setup_client {
    use http_body_util::{BodyExt, Full};
    use std::net::SocketAddr;

    pub struct Client {
        addr: SocketAddr,
    }

    impl Client {
        pub fn new(addr: SocketAddr) -> Self {
            Client { addr }
        }

        /// GETs `path`; returns the status and the body text.
        pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
            let stream = tokio::net::TcpStream::connect(self.addr).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let req = hyper::Request::get(path)
                .header("host", "bench")
                .body(Full::new(bytes::Bytes::new()))?;
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let text =
                String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
            Ok((status, text))
        }

        /// POSTs JSON with `key`; returns the status and the body text.
        pub async fn post(
            &self,
            path: &str,
            key: &str,
            body: Vec<u8>,
        ) -> anyhow::Result<(u16, String)> {
            self.send(hyper::Method::POST, path, key, body).await
        }

        /// Sends JSON with `key` by `method`; returns the status and the body text.
        pub async fn send(
            &self,
            method: hyper::Method,
            path: &str,
            key: &str,
            body: Vec<u8>,
        ) -> anyhow::Result<(u16, String)> {
            let stream = tokio::net::TcpStream::connect(self.addr).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("host", "bench")
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {key}"))
                .body(Full::new(bytes::Bytes::from(body)))?;
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let text =
                String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
            Ok((status, text))
        }
    }
}

//! The rate-limit figure: a webhook account limited to R messages a second, two dispatch
//! processes on Kafka and PostgreSQL sharing the limit, and far more than R a second offered.
//! The local vendor counts what arrives; the figure is the rate over 10 seconds of the steady
//! state (after 2 seconds of warm-up), as a ratio to R. The bound is within 5%.

use super::kafka::{Broker, distributed_env, fresh_database, pairs};
use super::{Herald, Row, Server, setup_client};
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// How long the rate is measured over, after the warm-up.
const WINDOW: Duration = Duration::from_secs(10);
const WARM_UP: Duration = Duration::from_secs(2);

/// The figure, as a row of the harness's table.
pub async fn figures(args: &super::BenchArgs) -> anyhow::Result<Vec<Row>> {
    let limit = args.rate_limit;
    let vendor = Server::internal("--vendor-server")?;
    let broker = Broker::start()?;
    let store = fresh_database(&args.postgres).await?;
    let env = distributed_env(&broker, &store);
    let mut herald = Herald::start_with("ingest", &pairs(&env)).await?;
    for _ in 0..2 {
        herald.spawn_role("dispatch", &pairs(&env))?;
    }
    let account = herald
        .post(
            "/v1/accounts",
            json!({"name": "hook", "channel": "webhook",
                "config": {"url": format!("http://{}/hook", vendor.addr), "secret": "bench-secret"}}),
            201,
        )
        .await?;
    let template = herald
        .post(
            "/v1/templates",
            json!({"name": "hook", "channel": "webhook", "msg_type": "notice", "account_id": account["id"],
                "content": {"title": "Hello {$name}"}}),
            201,
        )
        .await?;
    let client = setup_client::Client::new(herald.server.addr);
    let policy = json!({"rate_limits": [{"account_id": account["id"], "per_second": limit}]});
    let (status, text) = client
        .send(
            hyper::Method::PUT,
            "/v1/policy",
            &herald.key,
            policy.to_string().into_bytes(),
        )
        .await?;
    if status != 200 {
        bail!("PUT /v1/policy: {status} {text}");
    }

    // Offer 16 seconds' worth at once, then watch the vendor's count.
    let n = (limit as usize * 16).div_ceil(1000) * 1000;
    for b in 0..n / 1000 {
        let receivers: Vec<String> = (b * 1000..(b + 1) * 1000)
            .map(|i| format!("user-{i}"))
            .collect();
        herald
            .post(
                "/v1/send/batch",
                json!({"template_id": template["id"], "messages": [{"receivers": receivers, "variables": {"name": "Ann"}}]}),
                202,
            )
            .await?;
    }
    let vendor_client = setup_client::Client::new(vendor.addr);
    let hooks = || async {
        let (_, text) = vendor_client.get("/count").await?;
        let v: Value = serde_json::from_str(&text)?;
        v["hooks"].as_u64().context("vendor count")
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while hooks().await? == 0 {
        if Instant::now() > deadline {
            bail!("nothing reached the vendor in 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(WARM_UP).await;
    let (start, started) = (hooks().await?, Instant::now());
    tokio::time::sleep(WINDOW).await;
    let (end, took) = (hooks().await?, started.elapsed());
    let rate = (end - start) as f64 / took.as_secs_f64();
    if end >= n as u64 {
        bail!("every message arrived before the window closed: offer more than {n}");
    }
    drop(herald);
    drop(broker);
    Ok(vec![Row::new(
        format!(
            "webhook account limited to {limit}/s, 2 dispatch processes (Kafka + PostgreSQL), \
             rate at the vendor over 10 s (ratio to the limit)"
        ),
        rate,
        "msg/s",
        rate / f64::from(limit),
        None,
    )])
}

//! The rate-limit figure: a webhook account limited to R messages a second, two dispatch
//! processes on Kafka and PostgreSQL sharing the limit, and far more than R a second offered.
//! The local vendor counts what arrives; the figure is the rate over 10 seconds of the steady
//! state (after 2 seconds of warm-up), as a ratio to R. The bound is within 5%. The same
//! deployment without the limit is measured first: R means something only below that capacity.

use super::kafka::{Broker, distributed_env, fresh_database, pairs};
use super::{Herald, Row, Server, setup_client};
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// How long the rate is measured over, after the warm-up.
const WINDOW: Duration = Duration::from_secs(10);
const WARM_UP: Duration = Duration::from_secs(2);

/// The figures, as rows of the harness's table: the same deployment without a limit (its
/// capacity, so that the limit is known to bind), then with the limit.
pub async fn figures(args: &super::BenchArgs) -> anyhow::Result<Vec<Row>> {
    let limit = args.rate_limit;
    let capacity = measure(args, None).await?;
    let limited = measure(args, Some(limit)).await?;
    Ok(vec![
        Row::new(
            "webhook account without a limit, 2 dispatch processes (Kafka + PostgreSQL): capacity",
            capacity,
            "msg/s",
            0.0,
            None,
        ),
        Row::new(
            format!(
                "the same account limited to {limit}/s: rate at the vendor over 10 s (ratio to \
                 the limit)"
            ),
            limited,
            "msg/s",
            limited / f64::from(limit),
            None,
        ),
    ])
}

/// Offers 16 seconds' worth of the limit (or 20,000 messages without one) at once to a fresh
/// deployment and returns the rate at the vendor over 10 s after a 2 s warm-up (or up to the
/// last message, when all arrive sooner).
async fn measure(args: &super::BenchArgs, limit: Option<u32>) -> anyhow::Result<f64> {
    let vendor = Server::internal("--vendor-server")?;
    let broker = Broker::start()?;
    let store = fresh_database(&args.postgres).await?;
    let env = distributed_env(&broker, &store);
    let mut herald = Herald::start_with("ingest", &pairs(&env)).await?;
    for _ in 0..2 {
        herald.spawn_role("dispatch", &pairs(&env))?;
    }
    let (account, template) = herald
        .webhook_template(vendor.addr, json!({"title": "Hello {$name}"}))
        .await?;
    if let Some(limit) = limit {
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
    }

    let n = limit.map_or(20_000, |l| (l as usize * 16).div_ceil(1000) * 1000);
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
    let mut end = start;
    while started.elapsed() < WINDOW && end < n as u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        end = hooks().await?;
    }
    let rate = (end - start) as f64 / started.elapsed().as_secs_f64();
    if limit.is_some() && end >= n as u64 {
        bail!("every message arrived before the window closed: offer more than {n}");
    }
    drop(herald);
    drop(broker);
    Ok(rate)
}

//! Vendor figures: dispatch end to end to a local vendor server that answers at once, beside the
//! same server's throughput under the harness's own load generator; and SMS batching (many
//! numbers in one Tencent `SendSms` request) against one request per number.
//!
//! The local vendor is this binary (`herald bench --vendor-server ADDR`) in a child process. It
//! answers webhooks `202` and Tencent `SendSms` with a success per number, without checking
//! signatures (the vendor tests do that); `GET /count` says what it has received.

use super::{Herald, Row, Server, load, setup_client};
use anyhow::{Context, bail};
use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the local vendor has received.
#[derive(Default)]
struct Counts {
    hooks: AtomicU64,
    sms_requests: AtomicU64,
    sms_numbers: AtomicU64,
}

/// Serves the local vendor on `addr` until killed.
pub async fn serve(addr: &str) -> anyhow::Result<()> {
    let counts = Arc::new(Counts::default());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .route("/", axum::routing::post(send_sms))
        .route("/count", axum::routing::get(count))
        .with_state(counts);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn hook(State(c): State<Arc<Counts>>) -> axum::http::StatusCode {
    c.hooks.fetch_add(1, Ordering::Relaxed);
    axum::http::StatusCode::ACCEPTED
}

/// Tencent Cloud `SendSms`: `Ok` for every number of `PhoneNumberSet`.
async fn send_sms(State(c): State<Arc<Counts>>, Json(body): Json<Value>) -> Json<Value> {
    let numbers: Vec<&str> = body["PhoneNumberSet"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    c.sms_requests.fetch_add(1, Ordering::Relaxed);
    c.sms_numbers
        .fetch_add(numbers.len() as u64, Ordering::Relaxed);
    let set: Vec<Value> = numbers
        .iter()
        .enumerate()
        .map(|(i, n)| {
            json!({"SerialNo": format!("bench:{}:{i}", uuid::Uuid::now_v7()), "PhoneNumber": n,
                "Fee": 1, "SessionContext": "", "Code": "Ok", "Message": "send success", "IsoCode": "CN"})
        })
        .collect();
    Json(json!({"Response": {"SendStatusSet": set, "RequestId": uuid::Uuid::now_v7().to_string()}}))
}

async fn count(State(c): State<Arc<Counts>>) -> Json<Value> {
    Json(json!({
        "hooks": c.hooks.load(Ordering::Relaxed),
        "sms_requests": c.sms_requests.load(Ordering::Relaxed),
        "sms_numbers": c.sms_numbers.load(Ordering::Relaxed),
    }))
}

/// The vendor figures, as rows of the harness's table.
pub async fn figures(args: &super::BenchArgs) -> anyhow::Result<Vec<Row>> {
    let vendor = Server::internal("--vendor-server")?;
    let n = args.vendor_messages;
    let mut rows = Vec::new();

    // The vendor alone: the same load generator POSTing a webhook-sized body.
    let body = json!({"message_id": uuid::Uuid::now_v7(), "request_id": "r", "biz_id": null,
        "app": "bench", "template_id": 1, "receiver": "user-1",
        "content": {"title": "Hello Ann", "content": "Your code is 123456"},
        "ts": "2026-11-26T00:00:00.000Z"});
    let alone = load(
        vendor.addr,
        "/hook",
        body.to_string().into_bytes(),
        "",
        64,
        args.seconds,
    )
    .await?;
    rows.push(Row::new(
        "local vendor server alone, same load generator (baseline for dispatch)",
        alone.rps,
        "req/s",
        1.0,
        Some(alone.p99_ms),
    ));

    let herald = Herald::start("ingest,dispatch").await?;
    let (_, template) = herald
        .webhook_template(
            vendor.addr,
            json!({"title": "Hello {$name}", "content": "Your code is {$code}"}),
        )
        .await?;
    let rate = drive(
        &herald,
        &vendor,
        template["id"].as_i64().context("id")?,
        n,
        "hooks",
        |i| {
            (
                format!("user-{i}"),
                json!({"name": "Ann", "code": "123456"}),
            )
        },
    )
    .await?;
    rows.push(Row::new(
        "dispatch end to end to the local vendor (webhook, ingest+dispatch roles)",
        rate,
        "msg/s",
        rate / alone.rps,
        None,
    ));

    let account = herald
        .post(
            "/v1/accounts",
            json!({"name": "sms", "channel": "sms",
                "config": {"vendor": "tencent", "secret_id": "AKIDbench", "secret_key": "bench-key",
                    "sdk_app_id": "1400000000", "sign_name": "Herald", "base_url": format!("http://{}", vendor.addr)}}),
            201,
        )
        .await?;
    let template = herald
        .post(
            "/v1/templates",
            json!({"name": "code", "channel": "sms", "msg_type": "notice", "account_id": account["id"],
                "content": {"text": "Your code is {$code}.", "tencent": {"template_id": "1110", "params": ["{$code}"]}}}),
            201,
        )
        .await?;
    let id = template["id"].as_i64().context("id")?;
    let phone = |i: usize| format!("+86138{:08}", i % 100_000_000);
    // One request per number: every receiver has its own code, so no two messages share content.
    let single = drive(&herald, &vendor, id, n, "sms_numbers", |i| {
        (phone(i), json!({"code": format!("{:06}", i % 1_000_000)}))
    })
    .await?;
    // Batched: the same content for every receiver, up to 200 numbers per request.
    let batched = drive(&herald, &vendor, id, n, "sms_numbers", |i| {
        (phone(i), json!({"code": "123456"}))
    })
    .await?;
    rows.push(Row::new(
        "SMS (Tencent) one request per number (baseline for batching)",
        single,
        "receivers/s",
        1.0,
        None,
    ));
    rows.push(Row::new(
        "SMS (Tencent) batched, up to 200 numbers per request",
        batched,
        "receivers/s",
        batched / single,
        None,
    ));
    Ok(rows)
}

/// Sends `n` messages of `template` (receiver and variables from `message(i)`) through the batch
/// API, 1,000 per request, and waits until the vendor's `counter` grew by `n`; returns
/// messages/s from the first request to the last arrival.
async fn drive(
    herald: &Herald,
    vendor: &Server,
    template: i64,
    n: usize,
    counter: &str,
    message: impl Fn(usize) -> (String, Value),
) -> anyhow::Result<f64> {
    let vendor_client = setup_client::Client::new(vendor.addr);
    let counted = || async {
        let (_, text) = vendor_client.get("/count").await?;
        let v: Value = serde_json::from_str(&text)?;
        v[counter].as_u64().context("vendor count")
    };
    let before = counted().await?;
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let messages: Vec<Value> = chunk
            .iter()
            .map(|&i| {
                let (receiver, variables) = message(i);
                json!({"receivers": [receiver], "variables": variables})
            })
            .collect();
        // Messages with the same variables are one batch entry with many receivers, as a
        // business system would send them.
        let messages = merge_same_variables(messages);
        herald
            .post(
                "/v1/send/batch",
                json!({"template_id": template, "messages": messages}),
                202,
            )
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while counted().await? < before + n as u64 {
        if Instant::now() > deadline {
            bail!("the vendor did not receive {n} messages in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Folds batch entries with equal variables into one entry with all their receivers.
fn merge_same_variables(messages: Vec<Value>) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for m in messages {
        match out.iter_mut().find(|o| o["variables"] == m["variables"]) {
            Some(o) => {
                let r = m["receivers"][0].clone();
                if let Some(a) = o["receivers"].as_array_mut() {
                    a.push(r);
                }
            }
            None => out.push(m),
        }
    }
    out
}

//! Routing between vendor accounts, failover and circuit breakers, end to end: two webhook
//! accounts whose receivers the test controls, one of which fails for a while.

use crate::support::{TestApp, message_ids, webhook_receiver};
use axum::http::StatusCode;
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

async fn put_policy(app: &TestApp, policy: Value) {
    let (s, p) = app.call(Method::PUT, "/v1/policy", Some(policy)).await;
    assert_eq!(s, 200, "{p}");
}

fn route(a: i64, wa: u32, b: i64, wb: u32) -> Value {
    json!({"routes": [{"channel": "webhook", "accounts": [
        {"account_id": a, "weight": wa}, {"account_id": b, "weight": wb}]}]})
}

/// Sends one message to each of `n` fresh receivers and waits until all are sent; returns
/// their ids.
async fn send_wave(app: &TestApp, template: i64, wave: &str, n: usize) -> Vec<String> {
    let ids = app.send_to_numbered(template, wave, n).await;
    for id in &ids {
        app.wait_for_state(id, "sent").await;
    }
    ids
}

/// The message ids each receiver answered 200 to.
fn successes(calls: &[(String, std::time::Instant)], failing: &[String]) -> Vec<String> {
    let failing: HashSet<&String> = failing.iter().collect();
    calls
        .iter()
        .map(|(id, _)| id)
        .filter(|id| !failing.contains(id))
        .cloned()
        .collect()
}

#[tokio::test]
async fn weights_split_traffic_and_a_failing_vendor_is_failed_over_broken_and_probed_back() {
    let a_down = Arc::new(AtomicBool::new(false));
    // Every call that account A answered 503, by message id.
    let a_failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let down = a_down.clone();
    let (url_a, calls_a) = webhook_receiver(move |_| {
        if down.load(Ordering::SeqCst) {
            (StatusCode::SERVICE_UNAVAILABLE, "0")
        } else {
            (StatusCode::OK, "0")
        }
    })
    .await;
    let (url_b, calls_b) = webhook_receiver(|_| (StatusCode::OK, "0")).await;
    let app = TestApp::spawn_with(|c| {
        // Few calls in flight, so that the breaker's effect is visible in few calls.
        c.dispatch.concurrency = 4;
        c.dispatch.policy_cache_ttl = Duration::from_millis(100);
        c.dispatch.breaker.min_calls = 5;
        // A short window, so that phase 1's successes are out of it when phase 2 starts.
        c.dispatch.breaker.window = Duration::from_secs(1);
        c.dispatch.breaker.open_for = Duration::from_secs(1);
        c.dispatch.breaker.probes = 2;
    })
    .await;
    let a = app.webhook_account("a", &url_a).await;
    let b = app.webhook_account("b", &url_b).await;
    let template = app.webhook_template(a, "notice").await;
    let mut all = Vec::new();

    // 1. Weights 3:1 split first tries about 3:1.
    put_policy(&app, route(a, 3, b, 1)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    all.extend(send_wave(&app, template, "split", 400).await);
    let (n_a, n_b) = (calls_a.lock().unwrap().len(), calls_b.lock().unwrap().len());
    assert_eq!(n_a + n_b, 400);
    assert!((260..=340).contains(&n_a), "A took {n_a} of 400, B {n_b}");

    // 2. Live weights: B becomes a standby (weight 0). A fails: each message goes to B at once,
    //    and after 5 failures the breaker stops calling A at all.
    put_policy(&app, route(a, 1, b, 0)).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    a_down.store(true, Ordering::SeqCst);
    let before_a = calls_a.lock().unwrap().len();
    let outage = send_wave(&app, template, "outage", 100).await;
    all.extend(outage.clone());
    let during_a: Vec<String> = calls_a.lock().unwrap()[before_a..]
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    a_failed.lock().unwrap().extend(during_a.iter().cloned());
    assert!(
        (5..50).contains(&during_a.len()),
        "A was called {} times during the outage; the breaker should stop it after 5 failures \
         (and the 4 calls in flight)",
        during_a.len()
    );
    assert_eq!(
        app.metric(&format!("herald_breaker_state{{account_id=\"{a}\"}}"))
            .await,
        1.0
    );
    assert!(
        app.metric("herald_failovers_total{channel=\"webhook\"}")
            .await
            >= 5.0
    );
    // A message that failed at A shows it: retrying through A, then sent through B.
    let failed_over = &during_a[0];
    let trace = app.wait_for_state(failed_over, "sent").await;
    let steps: Vec<(String, i64, u64)> = trace["events"]
        .as_array()
        .unwrap()
        .iter()
        .skip(2)
        .map(|e| {
            (
                e["state"].as_str().unwrap().to_string(),
                e["account_id"].as_i64().unwrap(),
                e["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        vec![
            ("sending".into(), a, 1),
            ("retrying".into(), a, 1),
            ("sending".into(), b, 2),
            ("sent".into(), b, 2),
        ],
        "{trace}"
    );

    // 3. A recovers. After `open_for` the breaker lets probes through, they succeed, it closes,
    //    and traffic returns to A (B, the standby, gets nothing more).
    a_down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut back = false;
    for wave in 0..10 {
        let before = (calls_a.lock().unwrap().len(), calls_b.lock().unwrap().len());
        all.extend(send_wave(&app, template, &format!("back{wave}"), 10).await);
        let after = (calls_a.lock().unwrap().len(), calls_b.lock().unwrap().len());
        if after.0 - before.0 == 10 && after.1 == before.1 {
            back = true;
            break;
        }
    }
    assert!(back, "traffic never returned to the recovered account");
    assert_eq!(
        app.metric(&format!("herald_breaker_state{{account_id=\"{a}\"}}"))
            .await,
        0.0
    );

    // Nothing lost, nothing twice: every message got exactly one 200, from A or B.
    let a_failed = a_failed.lock().unwrap().clone();
    let mut ok: HashMap<String, usize> = HashMap::new();
    for id in successes(&calls_a.lock().unwrap(), &a_failed)
        .into_iter()
        .chain(successes(&calls_b.lock().unwrap(), &[]))
    {
        *ok.entry(id).or_default() += 1;
    }
    assert_eq!(ok.len(), all.len());
    assert!(all.iter().all(|id| ok.get(id) == Some(&1)));

    // The per-account call metrics agree with what the two stand-ins saw.
    let calls = |account: i64, outcome: &str| {
        format!(
            "herald_vendor_calls_total{{channel=\"webhook\",account_id=\"{account}\",outcome=\"{outcome}\"}}"
        )
    };
    let sent_a = app.metric(&calls(a, "sent")).await;
    let sent_b = app.metric(&calls(b, "sent")).await;
    assert_eq!(sent_a + sent_b, all.len() as f64);
    assert_eq!(sent_b, calls_b.lock().unwrap().len() as f64);
    let refused_a = app.metric(&calls(a, "retryable")).await;
    assert_eq!(refused_a, a_failed.len() as f64);
    let timed =
        format!("herald_vendor_latency_seconds_count{{channel=\"webhook\",account_id=\"{a}\"}}");
    assert_eq!(app.metric(&timed).await, sent_a + refused_a);
    app.stop().await;
}

#[tokio::test]
async fn with_every_account_open_messages_wait_and_are_sent_when_the_vendor_recovers() {
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let (url, calls) = webhook_receiver(move |_| {
        if d.load(Ordering::SeqCst) {
            (StatusCode::SERVICE_UNAVAILABLE, "0")
        } else {
            (StatusCode::OK, "0")
        }
    })
    .await;
    let app = TestApp::spawn_with(|c| {
        c.dispatch.breaker.min_calls = 3;
        c.dispatch.breaker.open_for = Duration::from_secs(1);
        c.dispatch.breaker.probes = 1;
        c.dispatch.max_attempts = 10;
        c.dispatch.retry_base = Duration::from_millis(50);
        c.dispatch.max_retry_wait = Duration::from_millis(300);
    })
    .await;
    let a = app.webhook_account("only", &url).await;
    let template = app.webhook_template(a, "notice").await;
    let (s, sent) = app
        .post(
            "/v1/send",
            json!({"template_id": template, "receivers": ["r1", "r2", "r3", "r4", "r5", "r6"]}),
        )
        .await;
    assert_eq!(s, 202, "{sent}");
    let ids = message_ids(&sent);
    // The breaker opens; the messages wait in the schedule (`deferred` with `circuit_open`,
    // which uses no attempt) instead of failing.
    let waiting = app.wait_for_state(&ids[5], "deferred").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls_while_open = calls.lock().unwrap().len();
    assert!(calls_while_open < 10, "{calls_while_open} calls: {waiting}");
    down.store(false, Ordering::SeqCst);
    for id in &ids {
        let trace = app.wait_for_state(id, "sent").await;
        let codes: Vec<&str> = trace["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["error_code"].as_str())
            .collect();
        assert!(
            codes
                .iter()
                .all(|c| *c == "webhook_5xx" || *c == "circuit_open"),
            "{trace}"
        );
    }
    let waited = app
        .metric("herald_messages_total{channel=\"webhook\",state=\"retrying\"}")
        .await
        + app
            .metric("herald_messages_total{channel=\"webhook\",state=\"deferred\"}")
            .await;
    assert!(waited >= 6.0, "{waited}");
    app.stop().await;
}

#[tokio::test]
async fn a_route_must_name_existing_accounts_of_its_channel() {
    let app = TestApp::spawn().await;
    let (url, _) = webhook_receiver(|_| (StatusCode::OK, "0")).await;
    let hook = app.webhook_account("hook", &url).await;
    for (policy, field) in [
        (
            route(hook, 1, hook + 100, 1),
            "routes[0].accounts[1]: the app has no account",
        ),
        (
            json!({"routes": [{"channel": "email", "accounts": [{"account_id": hook, "weight": 1}]}]}),
            "routes[0].accounts[0]: account",
        ),
        (route(hook, 0, hook, 0), "routes[0].accounts"),
    ] {
        let (s, e) = app.call(Method::PUT, "/v1/policy", Some(policy)).await;
        assert_eq!(s, 422, "{e}");
        assert_eq!(e["error"]["code"], "bad_policy", "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().starts_with(field),
            "{e}"
        );
    }
    app.stop().await;
}

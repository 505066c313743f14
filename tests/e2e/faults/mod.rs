//! Fault injection under a steady load (issue #7). Each test runs herald as OS processes, sends
//! it a steady HTTP load ([`Load`]) for the whole time, injects one fault for [`window`], and
//! then checks, by what the receiving end got (a webhook stand-in, [`Vendor`]), that every
//! accepted message was sent exactly once, that nothing was sent that was not accepted, and that
//! herald recovered without a restart. Each prints one `faults:` line with its figures.

mod broker;
mod handoff;
mod load;
mod shutdown;
mod store;
mod vendor;

use crate::support::{counter_of, post};
use load::{Accepted, Answers};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use vendor::Vendor;

/// No environment beyond what [`crate::support::Serve`] sets (which lets vendor stand-ins on
/// 127.0.0.1 be called).
const NO_ENV: [(&str, &str); 0] = [];

/// Messages per second of the steady load.
const RATE: usize = 100;

/// Normal load before a fault and after it, before the load stops.
const CALM: Duration = Duration::from_secs(5);

/// How long a fault lasts: 30 s (the figure), or `HERALD_TEST_FAULT_SECS` seconds.
pub fn window() -> Duration {
    let secs = std::env::var("HERALD_TEST_FAULT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// Longest wait, after the load stopped, for every accepted message to reach a final state.
const SETTLE: Duration = Duration::from_secs(150);

/// An app's webhook account on `vendor` (calls time out after `timeout_ms`) and a template on
/// it; returns the template id.
async fn webhook_template(base: &str, key: &str, vendor: &Vendor, timeout_ms: u64) -> i64 {
    // Names are unique per app: number them.
    static MADE: AtomicUsize = AtomicUsize::new(0);
    let n = MADE.fetch_add(1, Ordering::Relaxed);
    let http = reqwest::Client::new();
    let (s, account) = post(
        &http,
        base,
        key,
        "/v1/accounts",
        serde_json::json!({"name": format!("vendor-{n}"), "channel": "webhook",
                           "config": {"url": vendor.url, "secret": "s", "timeout_ms": timeout_ms}}),
    )
    .await
    .unwrap();
    assert_eq!(s, 201, "{account}");
    let (s, template) = post(
        &http,
        base,
        key,
        "/v1/templates",
        serde_json::json!({"name": format!("n-{n}"), "channel": "webhook", "msg_type": "notice",
                           "account_id": account["id"], "content": {"n": "1"}}),
    )
    .await
    .unwrap();
    assert_eq!(s, 201, "{template}");
    template["id"].as_i64().unwrap()
}

/// The send ledger's state of every message in the store at `store_url`.
async fn ledger(store_url: &str) -> HashMap<String, String> {
    sqlx::any::install_default_drivers();
    let Ok(pool) = sqlx::AnyPool::connect(store_url).await else {
        return HashMap::new();
    };
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT message_id, state FROM send_ledger")
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
    pool.close().await;
    rows.into_iter().collect()
}

/// Whether a ledger state is final: no further vendor call will be made for the message.
fn is_final(state: &str) -> bool {
    !matches!(state, "sending" | "scheduled" | "retrying")
}

/// What became of the accepted messages, by the receiving end's count.
#[derive(Debug, Default)]
struct Tally {
    accepted: usize,
    /// Received exactly once, with the accepted message id.
    once: usize,
    /// Accepted and never received.
    lost: usize,
    /// Received more than once.
    duplicated: usize,
    /// Received but never accepted (a refused request that was half-written), or received with
    /// another message id than the one accepted for its receiver.
    ghosts: usize,
    /// Accepted messages whose final ledger state is not `sent`.
    not_sent: usize,
    /// From the end of the fault until every accepted message had a final state.
    drained_in: Duration,
}

/// Waits until every accepted message has a final ledger state, then counts what `vendor`
/// received against `accepted`.
async fn settle(
    store_url: &str,
    accepted: &Accepted,
    vendor: &Vendor,
    fault_end: Instant,
) -> Tally {
    let deadline = Instant::now() + SETTLE;
    let states = loop {
        let states = ledger(store_url).await;
        let open = accepted
            .values()
            .filter(|id| !states.get(*id).is_some_and(|s| is_final(s)))
            .count();
        if open == 0 {
            break states;
        }
        if Instant::now() > deadline {
            eprintln!("{open} accepted messages never reached a final state");
            break states;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let drained_in = fault_end.elapsed();
    let received = vendor.received();
    let mut t = Tally {
        accepted: accepted.len(),
        drained_in,
        ..Tally::default()
    };
    for (receiver, id) in accepted {
        if states.get(id).map(String::as_str) != Some("sent") {
            t.not_sent += 1;
        }
        match received.get(receiver).map(Vec::as_slice) {
            None | Some([]) => t.lost += 1,
            Some([got]) if got == id => t.once += 1,
            Some([_]) => t.ghosts += 1,
            Some(_) => t.duplicated += 1,
        }
    }
    t.ghosts += received
        .keys()
        .filter(|r| !accepted.contains_key(*r))
        .count();
    t
}

/// The `faults:` line of a test's figures, under `load` messages/s; `fault` names how long the
/// fault lasted, if it did.
fn summary(
    name: &str,
    load: usize,
    fault: Option<Duration>,
    answers: &Answers,
    t: &Tally,
    extra: &str,
) -> String {
    let fault = fault.map_or(String::new(), |d| format!(" window={}s", d.as_secs()));
    format!(
        "faults: {name} load={load}/s{fault} requests={} accepted={} sent_once={} lost={} \
         dup={} ghosts={} not_sent={} answers={:?} conn_errors={} drained_in={:.1}s{extra}",
        answers.tries,
        t.accepted,
        t.once,
        t.lost,
        t.duplicated,
        t.ghosts,
        t.not_sent,
        answers.statuses,
        answers.transport_errors,
        t.drained_in.as_secs_f64(),
    )
}

/// The checks every fault test makes: something was accepted, every request was eventually
/// answered `202` or `503`, and each accepted message was received exactly once.
fn assert_exactly_once(name: &str, answers: &Answers, t: &Tally) {
    assert!(t.accepted > 0, "{name}: nothing was accepted");
    assert_eq!(answers.gave_up, 0, "{name}: requests never accepted");
    let unexpected: Vec<_> = answers
        .statuses
        .keys()
        .filter(|s| !matches!(**s, 202 | 409 | 503))
        .collect();
    assert!(
        unexpected.is_empty(),
        "{name}: unexpected answers {:?}",
        answers.statuses
    );
    assert_eq!(
        answers.without_retry_after, 0,
        "{name}: 503 answers without Retry-After"
    );
    assert_eq!(
        (t.lost, t.duplicated, t.ghosts, t.not_sent),
        (0, 0, 0, 0),
        "{name}: lost, duplicated, ghost and not-sent messages ({t:?})"
    );
}

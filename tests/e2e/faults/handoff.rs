//! Vendor calls that outlive their batch (`dispatch.handoff_after`, 5 s by default) are handed
//! off: they finish in the background, guarded by an `in_flight` schedule entry, while the
//! worker goes on with the next batches. These tests show that a slow vendor no longer holds
//! up another account's messages, that a crash with calls handed off loses nothing (each
//! guard releases its message again), and that SIGTERM waits for handed-off calls.

use super::load::{Answers, Load};
use super::vendor::{Behaviour, SLOW_ANSWER, Vendor};
use super::{NO_ENV, RATE, assert_exactly_once, counter_of, settle, summary, webhook_template};
use crate::support::{Serve, create_app};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long the loads run.
const LOAD: Duration = Duration::from_secs(8);

/// The longest the healthy account's last message may take to arrive after the loads stop:
/// its batch may wait `handoff_after` for the slow calls, and so may the batch before.
const HEALTHY_WITHIN: Duration = Duration::from_secs(12);

/// The longest a healthy message sent after the slow load started may take to arrive: the
/// worker knows by then how long its calls usually take, so a batch waits about
/// `dispatch.handoff_min` (1 s) for slow calls, not `handoff_after` (5 s).
const HEALTHY_LATENCY: Duration = Duration::from_secs(4);

/// Messages a second to the slow account.
const SLOW_RATE: usize = 20;

/// The healthy load runs alone this long first, so that the worker knows its usual calls.
const WARM_UP: Duration = Duration::from_secs(1);

/// The longest time a healthy message sent after `since` took to arrive at `vendor`. Receivers
/// are named `h<n>-<i>` by the n-th request of a load started at `started`, 100 ms apart.
fn worst_latency(vendor: &Vendor, started: Instant, since: Instant) -> Duration {
    vendor
        .first_arrivals()
        .into_iter()
        .filter_map(|(receiver, arrived)| {
            let n: u32 = receiver
                .strip_prefix('h')?
                .split('-')
                .next()?
                .parse()
                .ok()?;
            let sent = started + Duration::from_millis(100) * n;
            (sent >= since).then(|| arrived.saturating_duration_since(sent))
        })
        .max()
        .unwrap_or_default()
}

/// How many of `accepted` (receiver → message id) `vendor` has received.
fn arrived(vendor: &Vendor, accepted: &HashMap<String, String>) -> usize {
    let received = vendor.received();
    accepted
        .iter()
        .filter(|(r, id)| received.get(*r).is_some_and(|ids| ids.contains(id)))
        .count()
}

/// One account's vendor answers only after 30 s, the other at once; both get a steady load.
/// Every message of the healthy account arrives well before the slow vendor's first answer,
/// none later than [`HEALTHY_LATENCY`] after it was sent, and in the end each message of both
/// is received exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_vendor_does_not_hold_up_another_accounts_messages() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Vendor::start(Duration::ZERO).await;
    slow.set(Behaviour::Slow);
    let healthy = Vendor::start(Duration::ZERO).await;
    let (key, herald) = tokio::task::block_in_place(|| {
        let key = create_app(dir.path(), &[]);
        (key, Serve::start(dir.path(), &[], &NO_ENV))
    });
    // The slow account waits out its vendor's 30 s.
    let slow_template = webhook_template(&herald.base, &key, &slow, 40_000).await;
    let healthy_template = webhook_template(&herald.base, &key, &healthy, 5_000).await;
    let started = Instant::now();
    let healthy_load = Load::start(&herald.base, &key, healthy_template, RATE, "h");
    tokio::time::sleep(WARM_UP).await;
    let slow_started = Instant::now();
    let slow_load = Load::start(&herald.base, &key, slow_template, SLOW_RATE, "s");
    tokio::time::sleep(LOAD).await;
    let (slow_accepted, slow_answers) = slow_load.finish().await;
    let (healthy_accepted, healthy_answers) = healthy_load.finish().await;
    let stopped = Instant::now();
    loop {
        let got = arrived(&healthy, &healthy_accepted);
        if got == healthy_accepted.len() {
            break;
        }
        assert!(
            stopped.elapsed() < HEALTHY_WITHIN,
            "{} of {} healthy messages had not arrived {:?} after the loads stopped",
            healthy_accepted.len() - got,
            healthy_accepted.len(),
            stopped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let healthy_in = stopped.elapsed();
    let worst = worst_latency(&healthy, started, slow_started);
    assert!(
        worst < HEALTHY_LATENCY,
        "a healthy message took {worst:?} to arrive beside the slow vendor"
    );
    // No slow call has been answered yet: the healthy messages did not wait for one.
    assert!(started.elapsed() < SLOW_ANSWER, "{:?}", started.elapsed());
    assert_eq!(arrived(&slow, &slow_accepted), 0);
    let handed_off = counter_of(&herald.base, "herald_calls_handed_off_total").await;
    assert!(handed_off > 0.0, "no call was handed off");

    let store = format!("sqlite://{}", dir.path().join("herald.db").display());
    let healthy_tally = settle(&store, &healthy_accepted, &healthy, stopped).await;
    let slow_tally = settle(&store, &slow_accepted, &slow, stopped).await;
    let extra = format!(
        " healthy_done_in={:.1}s healthy_worst_latency={:.1}s handed_off={handed_off}",
        healthy_in.as_secs_f64(),
        worst.as_secs_f64()
    );
    eprintln!(
        "{}",
        summary(
            "slow-beside-healthy:healthy",
            RATE,
            None,
            &healthy_answers,
            &healthy_tally,
            &extra
        )
    );
    eprintln!(
        "{}",
        summary(
            "slow-beside-healthy:slow",
            SLOW_RATE,
            None,
            &slow_answers,
            &slow_tally,
            ""
        )
    );
    assert_exactly_once(
        "slow-beside-healthy:healthy",
        &healthy_answers,
        &healthy_tally,
    );
    assert_exactly_once("slow-beside-healthy:slow", &slow_answers, &slow_tally);
}

/// Calls are handed off to a slow vendor, and herald is SIGKILLed before any answers; the
/// restarted herald finds the messages' guards due 30 s after the hand-off and sends each
/// message again. The killed calls' answers never reach herald, so the stand-in does not count
/// them: each message arrives exactly once, and every one is counted a possible duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_with_calls_handed_off_sends_each_of_them_again() {
    let dir = tempfile::tempdir().unwrap();
    let (vendor, mut herald, accepted, answers) = calls_handed_off(dir.path(), "c").await;
    tokio::task::block_in_place(|| {
        herald.child.kill().unwrap();
        herald.child.wait().unwrap();
    });
    let killed = Instant::now();
    vendor.set(Behaviour::Normal);
    tokio::task::block_in_place(|| herald.restart());
    let store = format!("sqlite://{}", dir.path().join("herald.db").display());
    let tally = settle(&store, &accepted, &vendor, killed).await;
    let again = counter_of(&herald.base, "herald_possible_duplicates_total").await;
    eprintln!(
        "{}",
        summary(
            "crash-with-calls-handed-off",
            SLOW_RATE,
            None,
            &answers,
            &tally,
            &format!(" possible_duplicates={again}")
        )
    );
    assert_exactly_once("crash-with-calls-handed-off", &answers, &tally);
    assert_eq!(again as usize, accepted.len());
    // Released by their guards (due 30 s after the hand-off), not redelivered by the bus.
    assert!(
        tally.drained_in > Duration::from_secs(10),
        "sent again {:?} after the crash: not by the guards",
        tally.drained_in
    );
}

/// SIGTERM while calls to a hanging vendor are handed off: herald waits for them (the vendor
/// answers 30 s after each call began) and records them before it exits, so the restarted
/// process finds nothing left mid-call: each message arrives once, and none is a possible
/// duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_calls_handed_off_finishes_them_before_exiting() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (vendor, mut herald, accepted, answers) = calls_handed_off(dir.path(), "t").await;
    assert_eq!(
        arrived(&vendor, &accepted),
        0,
        "answered before the SIGTERM"
    );
    let (took, status) = tokio::task::block_in_place(|| herald.terminate());
    assert!(
        status.success(),
        "herald exited with {status} after SIGTERM"
    );
    // It waited for the vendor's answers, and not much longer.
    assert!(
        started.elapsed() > SLOW_ANSWER,
        "herald exited {took:?} after SIGTERM, before the vendor answered"
    );
    assert!(took < SLOW_ANSWER, "herald took {took:?} to exit");
    assert_eq!(arrived(&vendor, &accepted), accepted.len());
    let stopped = Instant::now();
    tokio::task::block_in_place(|| herald.restart());
    let store = format!("sqlite://{}", dir.path().join("herald.db").display());
    let tally = settle(&store, &accepted, &vendor, stopped).await;
    let again = counter_of(&herald.base, "herald_possible_duplicates_total").await;
    eprintln!(
        "{}",
        summary(
            "sigterm-with-calls-handed-off",
            SLOW_RATE,
            None,
            &answers,
            &tally,
            &format!(
                " exit_after_sigterm={:.1}s possible_duplicates={again}",
                took.as_secs_f64()
            )
        )
    );
    assert_exactly_once("sigterm-with-calls-handed-off", &answers, &tally);
    assert_eq!(
        again, 0.0,
        "the restarted process found calls left mid-call"
    );
}

/// A herald on `dir` whose only account's vendor answers after 30 s, after 2 s of load (message
/// ids tagged `tag`) and once every accepted message's call is handed off (after 5 s).
async fn calls_handed_off(
    dir: &Path,
    tag: &str,
) -> (Vendor, Serve, HashMap<String, String>, Answers) {
    let vendor = Vendor::start(Duration::ZERO).await;
    vendor.set(Behaviour::Slow);
    let (key, herald) = tokio::task::block_in_place(|| {
        let key = create_app(dir, &[]);
        (key, Serve::start(dir, &[], &NO_ENV))
    });
    let template = webhook_template(&herald.base, &key, &vendor, 40_000).await;
    let load = Load::start(&herald.base, &key, template, SLOW_RATE, tag);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (accepted, answers) = load.finish().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let handed_off = counter_of(&herald.base, "herald_calls_handed_off_total").await;
        if handed_off as usize >= accepted.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {handed_off} calls handed off"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (vendor, herald, accepted, answers)
}

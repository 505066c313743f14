//! Graceful shutdown under load: `herald serve` gets SIGTERM while requests and vendor calls are
//! in flight, exits within [`EXIT_BOUND`], and is started again on the same data directory;
//! every accepted message is received exactly once, and none was left mid-call (the restarted
//! process reports no possible duplicate).

use super::load::Load;
use super::vendor::Vendor;
use super::{
    CALM, NO_ENV, RATE, assert_exactly_once, counter_of, settle, summary, webhook_template,
};
use crate::support::{Serve, create_app};
use std::time::{Duration, Instant};

/// The longest a SIGTERMed herald may take to exit.
const EXIT_BOUND: Duration = Duration::from_secs(15);

/// SIGTERMs per run.
const SIGTERMS: usize = 3;

/// Each vendor call takes this long, so that calls are in flight at every SIGTERM.
const VENDOR_LATENCY: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_and_sends_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let vendor = Vendor::start(VENDOR_LATENCY).await;
    let key = create_app(dir.path(), &[]);
    let mut herald = Serve::start(dir.path(), &[], &NO_ENV);
    let template = webhook_template(&herald.base, &key, &vendor, 5_000).await;
    let load = Load::start(&herald.base, &key, template, RATE, "r");
    let mut exits = Vec::new();
    // Each process counts the messages it found left mid-call by the one before.
    let mut possible_duplicates = 0.0;
    for _ in 0..SIGTERMS {
        tokio::time::sleep(CALM).await;
        possible_duplicates += possible_duplicates_of(&herald.base).await;
        let (took, status) = tokio::task::block_in_place(|| herald.terminate());
        assert!(
            status.success(),
            "herald exited with {status} after SIGTERM"
        );
        assert!(
            took < EXIT_BOUND,
            "herald took {took:?} to exit after SIGTERM"
        );
        exits.push(took);
        tokio::task::block_in_place(|| herald.restart());
    }
    let fault_end = Instant::now();
    tokio::time::sleep(CALM).await;
    let (accepted, answers) = load.finish().await;
    let store = format!("sqlite://{}", dir.path().join("herald.db").display());
    let tally = settle(&store, &accepted, &vendor, fault_end).await;
    possible_duplicates += possible_duplicates_of(&herald.base).await;
    let exits: Vec<String> = exits
        .iter()
        .map(|d| format!("{:.1}s", d.as_secs_f64()))
        .collect();
    eprintln!(
        "{}",
        summary(
            "sigterm",
            RATE,
            None,
            &answers,
            &tally,
            &format!(
                " sigterms={SIGTERMS} exits_in={exits:?} possible_duplicates={possible_duplicates}"
            ),
        )
    );
    assert_exactly_once("sigterm", &answers, &tally);
    assert_eq!(
        possible_duplicates, 0.0,
        "a message was left mid-call by a graceful shutdown"
    );
}

/// `herald_possible_duplicates_total` of the herald at `base`.
async fn possible_duplicates_of(base: &str) -> f64 {
    counter_of(base, "herald_possible_duplicates_total").await
}

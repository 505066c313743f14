//! Group commit of vendor outcomes to the send ledger.
//!
//! Each vendor answer is recorded as soon as it arrives, so that a crash later in the batch does
//! not make the message look in flight (and send it again). One transaction per answer would
//! make SQLite's single writer the limit of every channel without a batch API; instead the
//! answers of concurrent calls are queued and written together, one transaction per drain of
//! the queue. Rows of one message are queued in order, so the last row written is its latest
//! state; [`OutcomeWriter::flush`] waits until everything queued before it is written.

use herald_core::MessageId;
use herald_core::store::{LedgerState, Store};
use std::collections::HashMap;
use tokio::sync::{mpsc, oneshot};

/// A ledger row: message, state, attempt.
pub type LedgerRow = (MessageId, LedgerState, u32);

enum Queued {
    Rows(Vec<LedgerRow>),
    Flush(oneshot::Sender<()>),
}

/// The handle to the writer task; the task ends when the handle is dropped.
pub struct OutcomeWriter {
    queue: mpsc::UnboundedSender<Queued>,
}

impl OutcomeWriter {
    /// Starts the writer task over `store`.
    pub fn start(store: Store) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(store, rx));
        OutcomeWriter { queue }
    }

    /// Queues `rows` for the next group commit.
    pub fn record(&self, rows: Vec<LedgerRow>) {
        if !rows.is_empty() {
            // Only fails once the task is gone, i.e. at shutdown; the batch's final write
            // records these rows too.
            let _ = self.queue.send(Queued::Rows(rows));
        }
    }

    /// Waits until every row queued before this call is written (or its write failed and was
    /// logged).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.queue.send(Queued::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

async fn write_loop(store: Store, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let mut rows = Vec::new();
    let mut flushes = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(q) = next {
            match q {
                Queued::Rows(r) => rows.extend(r),
                Queued::Flush(done) => flushes.push(done),
            }
            next = rx.try_recv().ok();
        }
        if !rows.is_empty() {
            if let Err(e) = store.record_ledger(&rows, &HashMap::new(), &[], &[]).await {
                tracing::warn!(error = %e, count = rows.len(), "ledger write after sends failed; the batch write retries it");
            }
            rows.clear();
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

//! The steady load: a request every 100 ms, each to its own new receivers, retried with the same
//! `Idempotency-Key` until it is accepted (on `503`, `409` and connection errors), as a careful
//! client would.

use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Accepted messages: receiver → message id (every receiver gets one message).
pub type Accepted = HashMap<String, String>;

/// Requests per second; each carries `rate / REQUESTS_PER_SECOND` receivers.
const REQUESTS_PER_SECOND: usize = 10;

/// A request not accepted after this long is given up (and fails the test).
const GIVE_UP: Duration = Duration::from_secs(120);

/// How the server answered.
#[derive(Debug, Default, Clone)]
pub struct Answers {
    /// Requests made, retries included.
    pub tries: u64,
    /// Answers by status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer (refused or broken connections, client timeouts).
    pub transport_errors: u64,
    /// `503` answers without a `Retry-After` header.
    pub without_retry_after: u64,
    /// Requests never accepted.
    pub gave_up: u64,
}

#[derive(Default)]
struct Shared {
    accepted: Mutex<Accepted>,
    answers: Mutex<Answers>,
}

/// A running load.
pub struct Load {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
}

impl Load {
    /// Sends `rate` messages a second of `template` to `base` until [`Load::finish`]; receivers
    /// are named `<prefix><request>-<i>`.
    pub fn start(base: &str, key: &str, template: i64, rate: usize, prefix: &str) -> Load {
        let shared = Arc::new(Shared::default());
        let (stop, mut stopped) = watch::channel(false);
        let per_request = (rate / REQUESTS_PER_SECOND).max(1);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(90))
            .build()
            .unwrap();
        let (base, key, prefix, s) = (
            base.to_string(),
            key.to_string(),
            prefix.to_string(),
            shared.clone(),
        );
        let task = tokio::spawn(async move {
            let mut requests = JoinSet::new();
            let mut tick =
                tokio::time::interval(Duration::from_secs(1) / REQUESTS_PER_SECOND as u32);
            for n in 0.. {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.wait_for(|s| *s) => break,
                }
                let receivers: Vec<String> = (0..per_request)
                    .map(|i| format!("{prefix}{n}-{i}"))
                    .collect();
                let body = json!({"template_id": template, "receivers": receivers});
                let idempotency_key = format!("{prefix}{n}");
                requests.spawn(request(
                    http.clone(),
                    format!("{base}/v1/send"),
                    key.clone(),
                    idempotency_key,
                    body,
                    s.clone(),
                ));
            }
            while requests.join_next().await.is_some() {}
        });
        Load { stop, task, shared }
    }

    /// Messages accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.lock().unwrap().len()
    }

    /// Stops sending, waits for the requests in flight to be accepted (or given up); returns the
    /// accepted messages and the answers.
    pub async fn finish(self) -> (Accepted, Answers) {
        let _ = self.stop.send(true);
        self.task.await.unwrap();
        let accepted = std::mem::take(&mut *self.shared.accepted.lock().unwrap());
        let answers = self.shared.answers.lock().unwrap().clone();
        (accepted, answers)
    }
}

/// One request, retried until it is accepted or [`GIVE_UP`] passes.
async fn request(
    http: reqwest::Client,
    url: String,
    key: String,
    idempotency_key: String,
    body: Value,
    shared: Arc<Shared>,
) {
    let count = |f: &dyn Fn(&mut Answers)| f(&mut shared.answers.lock().unwrap());
    let deadline = Instant::now() + GIVE_UP;
    while Instant::now() < deadline {
        count(&|a| a.tries += 1);
        let sent = http
            .post(&url)
            .bearer_auth(&key)
            .header("idempotency-key", &idempotency_key)
            .json(&body)
            .send()
            .await;
        let wait = match sent {
            Err(_) => {
                count(&|a| a.transport_errors += 1);
                Duration::from_millis(200)
            }
            Ok(r) => {
                let status = r.status().as_u16();
                count(&|a| *a.statuses.entry(status).or_default() += 1);
                let retry_after: Option<u64> = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                match status {
                    202 => match r.json::<Value>().await {
                        Ok(answer) => {
                            let mut accepted = shared.accepted.lock().unwrap();
                            for m in answer["messages"].as_array().unwrap() {
                                accepted.insert(
                                    m["receiver"].as_str().unwrap().to_string(),
                                    m["message_id"].as_str().unwrap().to_string(),
                                );
                            }
                            return;
                        }
                        // The answer broke off: asked again, the key replays it.
                        Err(_) => {
                            count(&|a| a.transport_errors += 1);
                            Duration::from_millis(200)
                        }
                    },
                    503 => {
                        if retry_after.is_none() {
                            count(&|a| a.without_retry_after += 1);
                        }
                        Duration::from_secs(retry_after.unwrap_or(1))
                    }
                    // The first request with this key is still running.
                    409 => Duration::from_millis(200),
                    // Anything else fails the test (its status is counted); no retry.
                    _ => return,
                }
            }
        };
        tokio::time::sleep(wait).await;
    }
    count(&|a| a.gave_up += 1);
}

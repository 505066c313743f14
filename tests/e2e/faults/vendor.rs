//! A webhook vendor that hangs, resets connections, answers after 30 s or answers garbage for
//! the fault window, under a steady load; and the stand-in that plays it.
//!
//! The stand-in is a bare HTTP/1.1 server on a `TcpListener`, so that it can misbehave below
//! HTTP. It counts a delivery when it answers `2xx` to a client still waiting for the answer;
//! a request it hangs on, resets, answers with an error or answers after the client left is
//! not a delivery (the webhook contract: receivers deduplicate on the message id, and herald
//! retries what it did not see acknowledged).

use super::load::{Answers, Load};
use super::{CALM, RATE, Tally, assert_exactly_once, settle, summary, webhook_template, window};
use crate::support::{Serve, create_app};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How the stand-in answers a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// `200` after the stand-in's latency.
    Normal,
    /// Reads the request and never answers (herald's client times out).
    Hang,
    /// Closes the connection with a TCP reset as soon as the request is read.
    Reset,
    /// `200` after [`SLOW_ANSWER`].
    Slow,
    /// In turn: bytes that are not HTTP, an HTML `502`, a `200` whose body is not JSON (the
    /// webhook channel takes any `2xx` as delivered).
    Garbage,
}

/// How long a [`Behaviour::Slow`] answer takes.
pub const SLOW_ANSWER: Duration = Duration::from_secs(30);

/// A running stand-in.
pub struct Vendor {
    /// Where herald posts.
    pub url: String,
    shared: Arc<Shared>,
}

struct Shared {
    behaviour: Mutex<Behaviour>,
    latency: Duration,
    /// Receiver → message ids delivered to it, in order.
    received: Mutex<HashMap<String, Vec<String>>>,
    /// Receiver → when its first message arrived.
    first_arrivals: Mutex<HashMap<String, Instant>>,
    /// Requests answered with a fault.
    faulted: AtomicU64,
    /// Garbage answers given, to take turns.
    garbage: AtomicU64,
}

impl Vendor {
    /// Starts a stand-in that answers normally after `latency`.
    pub async fn start(latency: Duration) -> Vendor {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(Behaviour::Normal),
            latency,
            received: Mutex::default(),
            first_arrivals: Mutex::default(),
            faulted: AtomicU64::new(0),
            garbage: AtomicU64::new(0),
        });
        let s = shared.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(connection(stream, s.clone()));
            }
        });
        Vendor { url, shared }
    }

    /// Answers from now on as `b`.
    pub fn set(&self, b: Behaviour) {
        *self.shared.behaviour.lock().unwrap() = b;
    }

    /// Receiver → the message ids delivered to it.
    pub fn received(&self) -> HashMap<String, Vec<String>> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Receiver → when its first message arrived.
    pub fn first_arrivals(&self) -> HashMap<String, Instant> {
        self.shared.first_arrivals.lock().unwrap().clone()
    }

    /// Requests answered with a fault so far.
    pub fn faulted(&self) -> u64 {
        self.shared.faulted.load(Ordering::Relaxed)
    }
}

/// Serves one connection's requests in turn (herald keeps connections alive).
async fn connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    while let Some(len) = read_request(&mut stream, &mut buf).await {
        let request: Vec<u8> = buf.drain(..len).collect();
        let behaviour = *shared.behaviour.lock().unwrap();
        if behaviour != Behaviour::Normal {
            shared.faulted.fetch_add(1, Ordering::Relaxed);
        }
        let answer = match behaviour {
            Behaviour::Normal => {
                tokio::time::sleep(shared.latency).await;
                http("200 OK", "text/plain", "ok")
            }
            Behaviour::Hang => {
                // Until herald gives up and closes.
                while matches!(stream.read(&mut [0; 512]).await, Ok(n) if n > 0) {}
                return;
            }
            Behaviour::Reset => {
                let _ = stream.set_zero_linger();
                return;
            }
            Behaviour::Slow => {
                tokio::time::sleep(SLOW_ANSWER).await;
                if client_left(&stream).await {
                    return;
                }
                http("200 OK", "text/plain", "late")
            }
            Behaviour::Garbage => match shared.garbage.fetch_add(1, Ordering::Relaxed) % 3 {
                0 => {
                    let _ = stream
                        .write_all(b"\x16\x03\x01 not http at all\r\n\r\n")
                        .await;
                    return;
                }
                1 => http(
                    "502 Bad Gateway",
                    "text/html",
                    "<html><body><h1>502 Bad Gateway</h1></body></html>",
                ),
                _ => http("200 OK", "application/json", "{\"ok\": tr"),
            },
        };
        if answer.starts_with(b"HTTP/1.1 200") {
            let body_at = request
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(0, |p| p + 4);
            let body: serde_json::Value =
                serde_json::from_slice(&request[body_at..]).unwrap_or_default();
            let (receiver, id) = (body["receiver"].as_str(), body["message_id"].as_str());
            shared
                .first_arrivals
                .lock()
                .unwrap()
                .entry(receiver.unwrap_or_default().to_string())
                .or_insert_with(Instant::now);
            shared
                .received
                .lock()
                .unwrap()
                .entry(receiver.unwrap_or_default().to_string())
                .or_default()
                .push(id.unwrap_or_default().to_string());
        }
        if stream.write_all(&answer).await.is_err() {
            return;
        }
    }
}

/// An HTTP/1.1 answer.
fn http(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Whether the client closed the connection (it stopped waiting for the answer).
async fn client_left(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_millis(20), stream.peek(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Reads one request (head and `Content-Length` body) into `buf`; returns its length, or
/// `None` when the connection closed.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body_len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let len = end + 4 + body_len;
            while buf.len() < len {
                let n = stream.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(len);
        }
        let n = stream.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One vendor fault: its name, the stand-in's behaviour, the webhook account's timeout, and
/// whether herald runs with a retry budget longer than the fault ([`TOLERANT`]).
struct Fault {
    name: &'static str,
    behaviour: Behaviour,
    timeout_ms: u64,
    tolerant: bool,
}

/// Vendor calls per message for most fault tests: more attempts than the default 3 (one run
/// keeps the default, to show it is enough too).
const TOLERANT: [(&str, &str); 1] = [("HERALD_DISPATCH__MAX_ATTEMPTS", "20")];

/// Runs one vendor fault in its own herald under its own load, prints its figures and
/// returns what its checks found.
async fn run(fault: Fault) -> (Fault, Answers, Tally) {
    let dir = tempfile::tempdir().unwrap();
    let vendor = Vendor::start(Duration::ZERO).await;
    let mut env = Vec::new();
    if fault.tolerant {
        env.extend(TOLERANT);
    }
    let (key, herald) = tokio::task::block_in_place(|| {
        let key = create_app(dir.path(), &[]);
        (key, Serve::start(dir.path(), &[], &env))
    });
    let template = webhook_template(&herald.base, &key, &vendor, fault.timeout_ms).await;
    let load = Load::start(&herald.base, &key, template, RATE, "r");
    tokio::time::sleep(CALM).await;
    vendor.set(fault.behaviour);
    tokio::time::sleep(window()).await;
    vendor.set(Behaviour::Normal);
    let fault_end = Instant::now();
    tokio::time::sleep(CALM).await;
    let (accepted, answers) = load.finish().await;
    let store = format!("sqlite://{}", dir.path().join("herald.db").display());
    let tally = settle(&store, &accepted, &vendor, fault_end).await;
    let faulted = format!(" faulted_calls={}", vendor.faulted());
    eprintln!(
        "{}",
        summary(fault.name, RATE, Some(window()), &answers, &tally, &faulted)
    );
    (fault, answers, tally)
}

/// Each vendor fault in its own herald, all at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_vendor_loses_nothing_and_sends_nothing_twice() {
    let faults = [
        Fault {
            name: "vendor-hang",
            behaviour: Behaviour::Hang,
            timeout_ms: 5_000,
            tolerant: true,
        },
        Fault {
            name: "vendor-reset",
            behaviour: Behaviour::Reset,
            timeout_ms: 5_000,
            tolerant: true,
        },
        // Answers within herald's timeout for this account: herald waits them out.
        Fault {
            name: "vendor-slow-30s",
            behaviour: Behaviour::Slow,
            timeout_ms: 40_000,
            tolerant: true,
        },
        Fault {
            name: "vendor-garbage",
            behaviour: Behaviour::Garbage,
            timeout_ms: 5_000,
            tolerant: true,
        },
        Fault {
            name: "vendor-hang-default-retries",
            behaviour: Behaviour::Hang,
            timeout_ms: 5_000,
            tolerant: false,
        },
    ];
    let runs: Vec<_> = faults.into_iter().map(|f| tokio::spawn(run(f))).collect();
    let mut done = Vec::new();
    for r in runs {
        done.push(r.await.unwrap());
    }
    // With the default retry budget too: the breaker opens after ten failed calls in a row and
    // its refusals use no attempt, so the messages wait out the fault.
    for (fault, answers, tally) in done {
        assert_exactly_once(fault.name, &answers, &tally);
    }
}

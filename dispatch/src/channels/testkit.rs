//! Test support for vendor clients: a local HTTP server standing in for a vendor, which records
//! every request and answers through the test's own handler, and builders for test records.
//!
//! The handler plays the vendor: it checks what the vendor checks (path, headers, body shape,
//! signature — computed in the test, independently of the client's signing code) and answers
//! with the vendor's documented bodies.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use herald_core::store::Store;
use herald_core::{Channel, MessageId, MessageRecord, MsgType};
use std::sync::{Arc, Mutex};

/// One request the vendor server received.
#[derive(Debug, Clone)]
pub struct Captured {
    pub method: Method,
    pub path: String,
    /// The raw query string (empty when there is none).
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Captured {
    /// A header's value as text (empty when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The body parsed as JSON.
    ///
    /// # Panics
    /// If the body is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    /// The query string's `name` parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_pairs(self.query.as_bytes())
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// Decodes an `application/x-www-form-urlencoded` body or query into its pairs.
pub fn form_pairs(raw: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw).into_owned().collect()
}

/// The vendor's answer: status, headers and body.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    /// `200` with a JSON body.
    pub fn json(body: serde_json::Value) -> Self {
        Answer {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string(),
        }
    }

    /// Any status with a plain body.
    pub fn status(status: u16, body: &str) -> Self {
        Answer {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

type Handler = Arc<dyn Fn(&Captured) -> Answer + Send + Sync>;

#[derive(Clone)]
struct ServerState {
    handler: Handler,
    seen: Arc<Mutex<Vec<Captured>>>,
}

/// A local stand-in for a vendor's HTTP API.
pub struct VendorServer {
    /// `http://127.0.0.1:<port>`, without a trailing slash: the account's `base_url`.
    pub url: String,
    seen: Arc<Mutex<Vec<Captured>>>,
}

impl VendorServer {
    /// Starts a server answering every request with `handler`.
    pub async fn start(handler: impl Fn(&Captured) -> Answer + Send + Sync + 'static) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = ServerState {
            handler: Arc::new(handler),
            seen: Arc::clone(&seen),
        };
        let app = Router::new().fallback(serve).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        VendorServer { url, seen }
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Captured> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(
    State(state): State<ServerState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let captured = Captured {
        method,
        path: uri.path().to_string(),
        query: uri.query().unwrap_or("").to_string(),
        headers,
        body,
    };
    let answer = (state.handler)(&captured);
    state.seen.lock().unwrap().push(captured);
    let mut response = (StatusCode::from_u16(answer.status).unwrap(), answer.body).into_response();
    for (name, value) in answer.headers {
        response.headers_mut().insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    response
}

/// A record of `channel` to `receiver` with rendered `content`.
pub fn record(channel: Channel, receiver: &str, content: serde_json::Value) -> MessageRecord {
    MessageRecord {
        v: 1,
        message_id: MessageId::new(),
        request_id: "req-1".into(),
        biz_id: None,
        app: "shop".into(),
        template_id: 1,
        channel,
        msg_type: MsgType::Notice,
        account_id: Some(1),
        receiver: receiver.into(),
        content,
        accepted_at: chrono::Utc::now(),
        send_at: None,
        timezone: None,
    }
}

/// A fresh store in a temporary directory (keep the directory alive as long as the store).
pub async fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    (dir, Store::open(&url).await.unwrap())
}

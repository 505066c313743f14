//! Recall end to end: `POST /v1/messages/{id}/recall` and `POST /v1/templates/{id}/recall`
//! through a WeCom stand-in that checks the token and the shape of `message/send` and
//! `message/recall` as WeCom documents them, and refuses anything else.

use crate::support::{TestApp, message_ids, test_config};
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use herald_core::store::Store;
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const CORP_ID: &str = "ww-recall";
const CORP_SECRET: &str = "recall-secret";
const AGENT_ID: i64 = 1000002;
const TOKEN: &str = "recall-token";

/// What the stand-in saw: the receivers of each `msgid` it gave out, and every recall body.
#[derive(Default)]
struct Wecom {
    sent: HashMap<String, Vec<String>>,
    recalled: Vec<String>,
    recall_bodies: Vec<Value>,
}

type Shared = Arc<Mutex<Wecom>>;

/// WeCom's answer to a refused call.
fn refused(errcode: i64, errmsg: &str) -> Response {
    axum::Json(json!({"errcode": errcode, "errmsg": errmsg})).into_response()
}

/// Checks what every WeCom API call shares: the token in the query and a JSON body.
fn checked_body(
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Value, Box<Response>> {
    if q.get("access_token").map(String::as_str) != Some(TOKEN) {
        return Err(Box::new(refused(40014, "invalid access_token")));
    }
    let json = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err(Box::new(
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "json only").into_response(),
        ));
    }
    serde_json::from_slice(body).map_err(|_| Box::new(refused(47001, "data format error")))
}

async fn gettoken(Query(q): Query<HashMap<String, String>>) -> Response {
    if q.get("corpid").map(String::as_str) != Some(CORP_ID)
        || q.get("corpsecret").map(String::as_str) != Some(CORP_SECRET)
    {
        return refused(40001, "invalid credential");
    }
    axum::Json(json!({"errcode": 0, "errmsg": "ok", "access_token": TOKEN, "expires_in": 7200}))
        .into_response()
}

/// `POST /cgi-bin/message/send`: `{"touser", "msgtype": "text", "agentid", "text": {"content"}}`.
async fn send(
    State(w): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = match checked_body(&q, &headers, &body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let touser = body["touser"].as_str().unwrap_or_default();
    if touser.is_empty()
        || body["agentid"] != AGENT_ID
        || body["msgtype"] != "text"
        || !body["text"]["content"].is_string()
    {
        return refused(40058, "invalid parameter");
    }
    let mut w = w.lock().unwrap();
    let msgid = format!("msg-{}", w.sent.len() + 1);
    w.sent.insert(
        msgid.clone(),
        touser.split('|').map(str::to_string).collect(),
    );
    axum::Json(json!({"errcode": 0, "errmsg": "ok", "invaliduser": "", "msgid": msgid}))
        .into_response()
}

/// `POST /cgi-bin/message/recall`: exactly `{"msgid"}` of a message it sent and did not recall;
/// messages to `too-old` are past WeCom's 24 hours.
async fn recall(
    State(w): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = match checked_body(&q, &headers, &body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let mut w = w.lock().unwrap();
    w.recall_bodies.push(body.clone());
    let msgid = match body.as_object() {
        Some(o) if o.len() == 1 => o.get("msgid").and_then(Value::as_str).unwrap_or_default(),
        _ => return refused(40058, "invalid parameter"),
    };
    let Some(receivers) = w.sent.get(msgid) else {
        return refused(40058, "invalid msgid");
    };
    if receivers.iter().any(|r| r == "too-old") {
        return refused(40058, "the message was sent more than 24 hours ago");
    }
    if w.recalled.iter().any(|m| m == msgid) {
        return refused(40058, "the message was recalled already");
    }
    w.recalled.push(msgid.to_string());
    axum::Json(json!({"errcode": 0, "errmsg": "ok"})).into_response()
}

/// Starts the stand-in; returns its base URL.
async fn wecom() -> (String, Shared) {
    let shared = Shared::default();
    let router = axum::Router::new()
        .route("/cgi-bin/gettoken", axum::routing::get(gettoken))
        .route("/cgi-bin/message/send", axum::routing::post(send))
        .route("/cgi-bin/message/recall", axum::routing::post(recall))
        .with_state(Arc::clone(&shared));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, shared)
}

/// A WeCom app account pointing at the stand-in, and a text template through it.
async fn wecom_template(app: &TestApp, url: &str) -> i64 {
    let (s, account) = app
        .post(
            "/v1/accounts",
            json!({"name": "wecom", "channel": "wecom_app", "config": {
                "corp_id": CORP_ID, "corp_secret": CORP_SECRET, "agent_id": AGENT_ID, "base_url": url}}),
        )
        .await;
    assert_eq!(s, 201, "{account}");
    let (s, t) = app
        .post(
            "/v1/templates",
            json!({"name": "shipped", "channel": "wecom_app", "msg_type": "notice",
                   "account_id": account["id"],
                   "content": {"msgtype": "text", "text": {"content": "Order {$order} shipped"}}}),
        )
        .await;
    assert_eq!(s, 201, "{t}");
    t["id"].as_i64().unwrap()
}

/// Sends `template` to `receivers`; returns the message ids once all are sent.
async fn send_and_wait(
    app: &TestApp,
    template: i64,
    receivers: &[&str],
    order: &str,
) -> Vec<String> {
    let (s, a) = app
        .post(
            "/v1/send",
            json!({"template_id": template, "receivers": receivers, "variables": {"order": order}}),
        )
        .await;
    assert_eq!(s, 202, "{a}");
    let ids = message_ids(&a);
    for id in &ids {
        app.wait_for_state(id, "sent").await;
    }
    ids
}

/// The `sent` event of a message's trace.
fn sent_event(trace: &Value) -> Value {
    trace["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["state"] == "sent")
        .cloned()
        .unwrap()
}

/// A second app in the same store; returns its key.
async fn other_app(app: &TestApp) -> String {
    let store = Store::open(&test_config(app.dir.path()).store_url())
        .await
        .unwrap();
    store.create_app("other-app").await.unwrap().1
}

#[tokio::test]
async fn a_wecom_message_is_recalled_once_and_only_by_its_app() {
    let (url, wecom) = wecom().await;
    let app = TestApp::spawn().await;
    let template = wecom_template(&app, &url).await;
    let id = send_and_wait(&app, template, &["zhangsan"], "A-1")
        .await
        .remove(0);
    let sent = sent_event(&app.wait_for_state(&id, "sent").await);
    let msgid = sent["vendor_message_id"].as_str().unwrap().to_string();
    assert_eq!(wecom.lock().unwrap().sent[&msgid], ["zhangsan"]);

    // Another app's key, an unknown id and a malformed one find nothing to recall.
    let other = other_app(&app).await;
    let path = format!("/v1/messages/{id}/recall");
    let (s, e) = app.call_as(&other, Method::POST, &path, None).await;
    assert_eq!((s, &e["error"]["code"]), (404, &json!("not_found")), "{e}");
    let (s, e) = app
        .post(
            &format!("/v1/messages/{}/recall", uuid::Uuid::now_v7()),
            json!({}),
        )
        .await;
    assert_eq!((s, &e["error"]["code"]), (404, &json!("not_found")), "{e}");
    let (s, e) = app.post("/v1/messages/not-a-uuid/recall", json!({})).await;
    assert_eq!(
        (s, &e["error"]["code"]),
        (422, &json!("bad_message_id")),
        "{e}"
    );
    assert!(wecom.lock().unwrap().recall_bodies.is_empty());

    let (s, answer) = app.call(Method::POST, &path, None).await;
    assert_eq!(s, 200, "{answer}");
    assert_eq!(answer, json!({"message_id": id, "state": "recalled"}));
    assert_eq!(
        wecom.lock().unwrap().recall_bodies,
        [json!({"msgid": msgid})]
    );
    let trace = app.wait_for_state(&id, "recalled").await;
    let last = trace["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["state"], "recalled");
    for field in [
        "vendor",
        "vendor_message_id",
        "account_id",
        "attempt",
        "receiver",
        "template_id",
    ] {
        assert_eq!(last[field], sent[field], "{field}: {trace}");
    }
    assert_ne!(last["event_id"], sent["event_id"]);

    // A second recall is refused by herald without asking WeCom.
    let (s, e) = app.call(Method::POST, &path, None).await;
    assert_eq!(
        (s, &e["error"]["code"]),
        (409, &json!("already_recalled")),
        "{e}"
    );
    assert_eq!(wecom.lock().unwrap().recall_bodies.len(), 1);

    // WeCom's refusal is the vendor's, with its code.
    let old = send_and_wait(&app, template, &["too-old"], "A-2")
        .await
        .remove(0);
    let (s, e) = app
        .call(Method::POST, &format!("/v1/messages/{old}/recall"), None)
        .await;
    assert_eq!(
        (s, &e["error"]["code"]),
        (422, &json!("vendor_rejected")),
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("wecom_40058"),
        "{e}"
    );
    assert_eq!(app.wait_for_state(&old, "sent").await["state"], "sent");

    // The inbox has no vendor to recall through.
    let inbox = app.inbox_template().await;
    let (s, a) = app
        .post(
            "/v1/send",
            json!({"template_id": inbox, "receivers": ["user-1"], "variables": {"name": "Ann"}}),
        )
        .await;
    assert_eq!(s, 202, "{a}");
    let inbox_id = message_ids(&a).remove(0);
    app.wait_for_state(&inbox_id, "sent").await;
    let (s, e) = app
        .call(
            Method::POST,
            &format!("/v1/messages/{inbox_id}/recall"),
            None,
        )
        .await;
    assert_eq!(
        (s, &e["error"]["code"]),
        (422, &json!("not_supported")),
        "{e}"
    );
    assert!(
        e["error"]["message"].as_str().unwrap().contains("inbox"),
        "{e}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_template_recall_takes_back_its_sent_messages() {
    let (url, wecom) = wecom().await;
    let app = TestApp::spawn().await;
    let template = wecom_template(&app, &url).await;
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let ids = send_and_wait(&app, template, &["u1", "u2", "u3"], "B-1").await;
    let mut msgids = Vec::new();
    for id in &ids {
        let sent = sent_event(&app.wait_for_state(id, "sent").await);
        msgids.push(sent["vendor_message_id"].as_str().unwrap().to_string());
    }
    msgids.sort();
    msgids.dedup();
    let path = format!("/v1/templates/{template}/recall");

    // Ranges that hold none of them, and one that is not a range.
    let (s, r) = app.post(&path, json!({"until": before})).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["recalled"], 0, "{r}");
    let (s, e) = app
        .post(
            &path,
            json!({"since": chrono::Utc::now() + chrono::Duration::hours(1)}),
        )
        .await;
    assert_eq!((s, &e["error"]["code"]), (422, &json!("bad_range")), "{e}");
    // Another app's key, an unknown template and an inbox template.
    let other = other_app(&app).await;
    let (s, e) = app
        .call_as(&other, Method::POST, &path, Some(json!({})))
        .await;
    assert_eq!((s, &e["error"]["code"]), (404, &json!("not_found")), "{e}");
    let (s, e) = app.post("/v1/templates/9999/recall", json!({})).await;
    assert_eq!((s, &e["error"]["code"]), (404, &json!("not_found")), "{e}");
    let inbox = app.inbox_template().await;
    let (s, e) = app
        .post(&format!("/v1/templates/{inbox}/recall"), json!({}))
        .await;
    assert_eq!(
        (s, &e["error"]["code"]),
        (422, &json!("not_supported")),
        "{e}"
    );
    assert!(wecom.lock().unwrap().recall_bodies.is_empty());

    let (s, r) = app.post(&path, json!({})).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["recalled"], 3, "{r}");
    assert_eq!(r["not_supported"], 0, "{r}");
    assert_eq!(r["failed"], json!([]), "{r}");
    assert_eq!(r["already_recalled"], 0, "{r}");
    assert_eq!(r["more"], false, "{r}");
    // One recall per WeCom message: receivers that shared a request share its msgid.
    let mut recalled = wecom.lock().unwrap().recalled.clone();
    recalled.sort();
    assert_eq!(recalled, msgids);
    for id in &ids {
        app.wait_for_state(id, "recalled").await;
    }

    let (s, r) = app.post(&path, json!({})).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["recalled"], 0, "{r}");
    assert_eq!(r["already_recalled"], 3, "{r}");
    let (s, e) = app
        .call(
            Method::POST,
            &format!("/v1/messages/{}/recall", ids[0]),
            None,
        )
        .await;
    assert_eq!(
        (s, &e["error"]["code"]),
        (409, &json!("already_recalled")),
        "{e}"
    );
    assert_eq!(wecom.lock().unwrap().recall_bodies.len(), msgids.len());
    app.stop().await;
}

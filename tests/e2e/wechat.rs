//! A token vendor through the whole pipeline: WeChat template messages against a stand-in whose
//! first token expires at once and which is busy once — the events show the token refresh (no
//! extra attempt), the retry, and the final `sent` with WeChat's msgid.

use crate::support::{TestApp, message_ids};
use axum::extract::Query;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What the stand-in saw: tokens handed out, and (token, body) of every template send.
#[derive(Default)]
struct Seen {
    tokens: usize,
    sends: Vec<(String, Value)>,
}

async fn wechat() -> (String, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s1 = seen.clone();
    let token = move |axum::Json(body): axum::Json<Value>| {
        let seen = s1.clone();
        async move {
            if body["grant_type"] != "client_credential" || body["secret"] != "wx-secret" {
                return axum::Json(json!({"errcode": 40125, "errmsg": "invalid appsecret"}));
            }
            let mut seen = seen.lock().unwrap();
            seen.tokens += 1;
            axum::Json(
                json!({"access_token": format!("token-{}", seen.tokens), "expires_in": 7200}),
            )
        }
    };
    let s2 = seen.clone();
    let send = move |Query(q): Query<HashMap<String, String>>,
                     axum::Json(body): axum::Json<Value>| {
        let seen = s2.clone();
        async move {
            let token = q.get("access_token").cloned().unwrap_or_default();
            let mut seen = seen.lock().unwrap();
            seen.sends.push((token.clone(), body.clone()));
            let answer = if token == "token-1" {
                json!({"errcode": 42001, "errmsg": "access_token expired"})
            } else if seen.sends.len() == 2 {
                json!({"errcode": -1, "errmsg": "system error"})
            } else {
                json!({"errcode": 0, "errmsg": "ok", "msgid": 200228332})
            };
            axum::Json(answer)
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = axum::Router::new()
        .route("/cgi-bin/stable_token", axum::routing::post(token))
        .route("/cgi-bin/message/template/send", axum::routing::post(send));
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, seen)
}

#[tokio::test]
async fn token_refresh_and_a_busy_answer_show_in_the_events() {
    let (url, seen) = wechat().await;
    let app = TestApp::spawn().await;
    let (s, account) = app
        .post("/v1/accounts", json!({"name": "oa", "channel": "wechat_official",
            "config": {"app_id": "wx1234567890abcdef", "app_secret": "wx-secret", "base_url": url}}))
        .await;
    assert_eq!(s, 201, "{account}");
    let (s, t) = app
        .post("/v1/templates", json!({"name": "shipped", "channel": "wechat_official", "msg_type": "notice", "account_id": account["id"],
            "content": {"template_id": "ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY",
                        "url": "https://shop.example.com/o/{$order}",
                        "data": {"thing1": "{$item}", "character_string2": "{$order}"}}}))
        .await;
    assert_eq!(s, 201, "{t}");
    let (s, a) = app
        .post(
            "/v1/send",
            json!({"template_id": t["id"], "receivers": ["oKXUC5Rwd9jAbr1OYWNd4nSN3bDY"],
            "variables": {"item": "Blue mug", "order": "A-42"}}),
        )
        .await;
    assert_eq!(s, 202, "{a}");
    let id = &message_ids(&a)[0];
    let trace = app.wait_for_state(id, "sent").await;
    let states: Vec<(&str, u64, Option<&str>)> = trace["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["state"].as_str().unwrap(),
                e["attempt"].as_u64().unwrap(),
                e["error_code"].as_str(),
            )
        })
        .collect();
    // The expired token was refreshed inside attempt 1; WeChat's busy answer was retried.
    assert_eq!(
        &states[2..],
        [
            ("sending", 1, None),
            ("retrying", 1, Some("wechat_busy")),
            ("sending", 2, None),
            ("sent", 2, None)
        ],
        "{trace}"
    );
    let sent = trace["events"].as_array().unwrap().last().unwrap();
    assert_eq!(sent["vendor"], "wechat");
    assert_eq!(sent["vendor_message_id"], "200228332");

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.tokens, 2);
    let tokens: Vec<&str> = seen.sends.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(tokens, ["token-1", "token-2", "token-2"]);
    assert_eq!(
        seen.sends[2].1,
        json!({"touser": "oKXUC5Rwd9jAbr1OYWNd4nSN3bDY",
            "template_id": "ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY",
            "url": "https://shop.example.com/o/A-42",
            "client_msg_id": id,
            "data": {"thing1": {"value": "Blue mug"}, "character_string2": {"value": "A-42"}}})
    );
    app.stop().await;
}

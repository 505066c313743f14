//! `POST /v1/accounts/{id}/media` through a WeCom stand-in that checks the token and reads the
//! multipart body.

use crate::support::TestApp;
use axum::body::Bytes;
use axum::extract::Query;
use axum::http::HeaderMap;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A WeCom stand-in for `gettoken` and `media/upload`; records each upload's type, content type
/// and body.
async fn wecom() -> (String, Arc<Mutex<Vec<(String, String, Vec<u8>)>>>) {
    let uploads = Arc::new(Mutex::new(Vec::new()));
    let u = uploads.clone();
    let upload = move |Query(q): Query<HashMap<String, String>>,
                       headers: HeaderMap,
                       body: Bytes| {
        let uploads = u.clone();
        async move {
            if q.get("access_token").map(String::as_str) != Some("tok") {
                return axum::Json(json!({"errcode": 40014, "errmsg": "invalid access_token"}));
            }
            let content_type = headers["content-type"].to_str().unwrap().to_string();
            uploads
                .lock()
                .unwrap()
                .push((q["type"].clone(), content_type, body.to_vec()));
            axum::Json(
                json!({"errcode": 0, "errmsg": "", "type": q["type"], "media_id": "3a8asd892asd8asd", "created_at": "1380000000"}),
            )
        }
    };
    let token = |Query(q): Query<HashMap<String, String>>| async move {
        if q.get("corpsecret").map(String::as_str) != Some("app-secret") {
            return axum::Json(json!({"errcode": 40001, "errmsg": "invalid credential"}));
        }
        axum::Json(json!({"errcode": 0, "errmsg": "ok", "access_token": "tok", "expires_in": 7200}))
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = axum::Router::new()
        .route("/cgi-bin/gettoken", axum::routing::get(token))
        .route("/cgi-bin/media/upload", axum::routing::post(upload));
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, uploads)
}

#[tokio::test]
async fn media_is_uploaded_through_the_account_and_refused_where_unsupported() {
    let (url, uploads) = wecom().await;
    let app = TestApp::spawn().await;
    let (s, account) = app
        .post(
            "/v1/accounts",
            json!({"name": "wecom", "channel": "wecom_app", "config": {
            "corp_id": "ww1", "corp_secret": "app-secret", "agent_id": 1000002, "base_url": url}}),
        )
        .await;
    assert_eq!(s, 201, "{account}");
    let file = b"\x89PNG\r\n\x1a\n fake image bytes".to_vec();
    let upload = |id: &Value, query: &str, body: Vec<u8>| {
        app.http
            .post(app.url(&format!("/v1/accounts/{id}/media?{query}")))
            .bearer_auth(&app.key)
            .header("content-type", "image/png")
            .body(body)
            .send()
    };
    let resp = upload(&account["id"], "type=image&filename=logo.png", file.clone())
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["media_id"], "3a8asd892asd8asd");
    let (kind, content_type, body) = uploads.lock().unwrap()[0].clone();
    assert_eq!(kind, "image");
    let boundary = content_type
        .strip_prefix("multipart/form-data; boundary=")
        .unwrap();
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"media\"; filename=\"logo.png\"\r\nContent-Type: image/png\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    assert_eq!(body, [head.as_bytes(), &file, tail.as_bytes()].concat());

    let resp = upload(&account["id"], "type=gif&filename=a.gif", file.clone())
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "bad_media_type");

    let (_, mail) = app
        .post(
            "/v1/accounts",
            json!({"name": "mail", "channel": "email", "config": {
            "host": "127.0.0.1", "security": "plain", "from": "a@example.com"}}),
        )
        .await;
    let resp = upload(&mail["id"], "type=image&filename=a.png", file.clone())
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "not_supported");

    let resp = upload(&json!(999), "type=image&filename=a.png", file)
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    app.stop().await;
}

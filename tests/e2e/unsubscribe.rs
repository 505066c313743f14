//! One-click unsubscribe links end to end: a marketing email carries the receiver's signed link
//! in its text and as `List-Unsubscribe` (RFC 8058); posting to the link unsubscribes exactly
//! that receiver, whose next marketing message is `blocked`, while notices still go.

use crate::support::{SmtpSink, TestApp, message_ids};
use herald_core::config::Secret;
use serde_json::json;

const PUBLIC: &str = "https://push.example.com";

#[tokio::test]
async fn a_receiver_unsubscribes_with_the_link_of_their_email() {
    let smtp = SmtpSink::start();
    let app = TestApp::spawn_with(|c| {
        c.http.public_url = Some(PUBLIC.into());
        c.http.unsubscribe_secret = Some(Secret::new("test-secret"));
    })
    .await;
    let (_, account) = app
        .post("/v1/accounts", json!({"name": "smtp", "channel": "email",
            "config": {"host": "127.0.0.1", "port": smtp.port, "security": "plain", "from": "Shop <shop@example.com>"}}))
        .await;
    let template = |msg_type: &str| {
        json!({"name": msg_type, "channel": "email", "msg_type": msg_type, "account_id": account["id"],
            "content": {"subject": "News", "text": "Sale! Unsubscribe: {$unsubscribe_url}"}})
    };
    let (s, marketing) = app.post("/v1/templates", template("marketing")).await;
    assert_eq!(s, 201, "{marketing}");
    let (_, notice) = app.post("/v1/templates", template("notice")).await;
    let (s, a) = app
        .post("/v1/send", json!({"template_id": marketing["id"], "receivers": ["ann@example.com", "bob@example.com"]}))
        .await;
    assert_eq!(s, 202, "{a}");
    for id in message_ids(&a) {
        app.wait_for_state(&id, "sent").await;
    }
    let got = smtp.messages();
    let ann = got
        .iter()
        .find(|m| m["rcpt_tos"] == json!(["ann@example.com"]))
        .unwrap();
    let header = ann["list_unsubscribe"].as_str().unwrap();
    let url = header
        .strip_prefix('<')
        .and_then(|h| h.strip_suffix('>'))
        .unwrap();
    assert!(url.starts_with(&format!("{PUBLIC}/u/")), "{url}");
    assert_eq!(ann["list_unsubscribe_post"], "List-Unsubscribe=One-Click");
    let text = ann["parts"][0]["content"].as_str().unwrap();
    assert!(text.contains(url), "the body carries the same link: {text}");
    let bob = got
        .iter()
        .find(|m| m["rcpt_tos"] == json!(["bob@example.com"]))
        .unwrap();
    assert_ne!(
        bob["list_unsubscribe"], ann["list_unsubscribe"],
        "one link per receiver"
    );

    // The link works without an API key: GET only asks, POST (one-click) unsubscribes.
    let local = app.url(url.strip_prefix(PUBLIC).unwrap());
    let http = reqwest::Client::new();
    let page = http.get(&local).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("method=post"));
    let (_, list) = app.get("/v1/lists/unsubscribed/email").await;
    assert_eq!(
        list["receivers"],
        json!([]),
        "GET must not unsubscribe: {list}"
    );
    let done = http
        .post(&local)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    let (_, list) = app.get("/v1/lists/unsubscribed/email").await;
    assert_eq!(list["receivers"], json!(["ann@example.com"]), "{list}");
    // A forged link (Bob's address with Ann's signature) is refused.
    let (base, token) = local.split_once("/u/").unwrap();
    let mut parts: Vec<&str> = token.split('.').collect();
    parts[2] = "Ym9iQGV4YW1wbGUuY29t"; // base64url("bob@example.com")
    let forged = format!("{base}/u/{}", parts.join("."));
    let refused = http.post(&forged).send().await.unwrap();
    assert_eq!(refused.status(), 422);
    let (_, list) = app.get("/v1/lists/unsubscribed/email").await;
    assert_eq!(list["receivers"], json!(["ann@example.com"]), "{list}");

    // Ann's next marketing message is blocked; a notice still reaches her; Bob still gets both.
    let (_, m) = app
        .post("/v1/send", json!({"template_id": marketing["id"], "receivers": ["ann@example.com", "bob@example.com"]}))
        .await;
    let ids = message_ids(&m);
    let blocked = app.wait_for_state(&ids[0], "blocked").await;
    assert_eq!(
        blocked["events"].as_array().unwrap().last().unwrap()["error_code"],
        "unsubscribed"
    );
    app.wait_for_state(&ids[1], "sent").await;
    let (_, n) = app
        .post(
            "/v1/send",
            json!({"template_id": notice["id"], "receivers": ["ann@example.com"]}),
        )
        .await;
    app.wait_for_state(&message_ids(&n)[0], "sent").await;
    app.stop().await;
}

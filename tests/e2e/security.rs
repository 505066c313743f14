//! Security: API keys with scopes, expiry, rotation and revocation; the audit log; tenant
//! isolation on every endpoint; secrets sealed at rest; outbound URLs that may not reach
//! private addresses.

use crate::support::{TestApp, message_ids, test_config, webhook_receiver};
use axum::http::StatusCode;
use herald_core::store::Store;
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

/// Makes a key with `scopes` (and `extra` fields) through the API; returns (key id, key).
async fn make_key(app: &TestApp, scopes: &[&str], extra: Value) -> (String, String) {
    let mut body = json!({"name": format!("{scopes:?}"), "scopes": scopes});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let (s, k) = app.post("/v1/keys", body).await;
    assert_eq!(s, 201, "{k}");
    (
        k["key_id"].as_str().unwrap().to_string(),
        k["key"].as_str().unwrap().to_string(),
    )
}

/// The status and error code of a call with `key`.
async fn code(
    app: &TestApp,
    key: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, String) {
    let (s, v) = app.call_as(key, method, path, body).await;
    (
        s,
        v["error"]["code"].as_str().unwrap_or_default().to_string(),
    )
}

/// Uploads a one-row campaign of `template` that runs once a year, with `key`; returns the
/// status and the answer.
async fn upload_yearly_campaign(app: &TestApp, key: &str, template: i64) -> (u16, Value) {
    let yearly = "&cron=0%200%200%201%201%20*";
    crate::campaigns::upload_as(app, key, template, yearly, "receiver,name\nbob,B\n".into()).await
}

#[tokio::test]
async fn keys_carry_scopes_expire_rotate_and_revoke_and_every_change_is_audited() {
    let app = TestApp::spawn().await;
    let template = app.inbox_template().await;
    let send = json!({"template_id": template, "receivers": ["u1"], "variables": {"name": "A"}});

    // A send-only key sends, and may not read templates, manage them or make keys.
    let (sender_id, sender) = make_key(&app, &["send"], json!({})).await;
    let (s, a) = app
        .call_as(&sender, Method::POST, "/v1/send", Some(send.clone()))
        .await;
    assert_eq!(s, 202, "{a}");
    let id = message_ids(&a)[0].clone();
    for (method, path, body) in [
        (Method::GET, "/v1/templates".to_string(), None),
        (Method::DELETE, format!("/v1/templates/{template}"), None),
        (
            Method::POST,
            "/v1/keys".to_string(),
            Some(json!({"name": "x", "scopes": ["admin"]})),
        ),
        (Method::GET, "/v1/audit".to_string(), None),
        (Method::GET, format!("/v1/messages/{id}"), None),
    ] {
        assert_eq!(
            code(&app, &sender, method.clone(), &path, body).await,
            (403, "missing_scope".to_string()),
            "{method} {path}"
        );
    }
    // A read key reads and may not send; a templates key edits templates.
    let (_, reader) = make_key(&app, &["read"], json!({})).await;
    app.wait_for_state(&id, "sent").await;
    let (s, _) = app
        .call_as(&reader, Method::GET, &format!("/v1/messages/{id}"), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        code(&app, &reader, Method::POST, "/v1/send", Some(send.clone())).await,
        (403, "missing_scope".to_string())
    );
    let (_, editor) = make_key(&app, &["templates"], json!({})).await;
    let (s, t) = app
        .call_as(
            &editor,
            Method::PUT,
            &format!("/v1/templates/{template}"),
            Some(
                json!({"name": "welcome2", "channel": "inbox", "msg_type": "notice",
                        "content": {"title": "Hi", "content": "Hello {$name}"}}),
            ),
        )
        .await;
    assert_eq!(s, 200, "{t}");

    // Bad requests for keys.
    for (body, expected) in [
        (json!({"name": "x", "scopes": ["root"]}), "bad_scope"),
        (json!({"name": "x", "scopes": []}), "bad_scope"),
        (
            json!({"name": "x", "scopes": ["send"], "expires_at": "2001-01-01T00:00:00Z"}),
            "bad_expiry",
        ),
    ] {
        assert_eq!(
            code(&app, &app.key, Method::POST, "/v1/keys", Some(body)).await,
            (422, expected.to_string())
        );
    }

    // Expiry: a key stops working at its expiry, although it is cached.
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let (_, brief) = make_key(&app, &["send"], json!({"expires_at": at.to_rfc3339()})).await;
    let (s, _) = app
        .call_as(&brief, Method::POST, "/v1/send", Some(send.clone()))
        .await;
    assert_eq!(s, 202);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        code(&app, &brief, Method::POST, "/v1/send", Some(send.clone())).await,
        (401, "key_expired".to_string())
    );

    // Rotation: a new key with the same scopes; the old one works during the grace period.
    let (s, r) = app
        .post(
            &format!("/v1/keys/{sender_id}/rotate"),
            json!({"grace_seconds": 3600}),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    let rotated = r["key"]["key"].as_str().unwrap().to_string();
    assert_eq!(r["key"]["scopes"], json!(["send"]));
    assert!(r["old_key"]["expires_at"].as_i64().is_some());
    for key in [&sender, &rotated] {
        let (s, _) = app
            .call_as(key, Method::POST, "/v1/send", Some(send.clone()))
            .await;
        assert_eq!(s, 202);
    }
    // Revocation takes effect at once (the key was cached a moment ago).
    let (s, k) = app
        .call(Method::DELETE, &format!("/v1/keys/{sender_id}"), None)
        .await;
    assert_eq!(s, 200, "{k}");
    assert!(k["revoked_at"].as_i64().is_some());
    assert_eq!(
        code(&app, &sender, Method::POST, "/v1/send", Some(send.clone())).await,
        (401, "unauthorized".to_string())
    );
    let (s, _) = app
        .call_as(&rotated, Method::POST, "/v1/send", Some(send.clone()))
        .await;
    assert_eq!(s, 202);
    let (s, e) = app
        .post(&format!("/v1/keys/{sender_id}/rotate"), json!({}))
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("key_not_live")),
        "{e}"
    );

    // Listing never shows a key or its hash.
    let (s, list) = app.get("/v1/keys").await;
    assert_eq!(s, 200);
    let text = list.to_string();
    assert!(
        !text.contains(&sender[3..]) && !text.contains(&rotated[3..]) && !text.contains("hash")
    );
    assert_eq!(list["keys"].as_array().unwrap().len(), 6, "{list}");

    // The audit log: who did what, newest first.
    let (s, log) = app.get("/v1/audit").await;
    assert_eq!(s, 200);
    let actions: Vec<&str> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "key.revoke",
            "key.rotate",
            "key.create",
            "template.update",
            "key.create",
            "key.create",
            "key.create",
            "template.create",
            "app.create"
        ],
        "{log}"
    );
    let created = &log["entries"][8];
    assert_eq!(created["actor"], "cli");
    assert_eq!(
        created["detail"]["key"], list["keys"][0]["key_id"],
        "{created}"
    );
    let update = &log["entries"][3];
    assert_eq!(update["target"], format!("template:{template}"));
    assert_eq!(update["detail"]["version"], 2);
    let admin_id = list["keys"][0]["key_id"].as_str().unwrap();
    assert_eq!(log["entries"][0]["actor"], admin_id);
    assert_ne!(
        update["actor"], admin_id,
        "the templates key made the update"
    );
    app.stop().await;
}

#[tokio::test]
async fn an_app_reaches_nothing_of_another_app() {
    let app = TestApp::spawn().await;
    let (hook, calls) = webhook_receiver(|_| (StatusCode::OK, "0")).await;
    let account = app.webhook_account("hook", &hook).await;
    let template = app.webhook_template(account, "notice").await;
    let id = app.send_to_numbered(template, "r", 1).await.remove(0);
    app.wait_for_state(&id, "sent").await;
    let inbox = app.inbox_template().await;
    let (s, a) = app
        .post(
            "/v1/send",
            json!({"template_id": inbox, "receivers": ["alice"], "variables": {"name": "A"}}),
        )
        .await;
    assert_eq!(s, 202);
    let alice = message_ids(&a).remove(0);
    app.wait_for_state(&alice, "sent").await;
    let (s, c) = upload_yearly_campaign(&app, &app.key, inbox).await;
    assert_eq!(s, 201, "{c}");
    let campaign = c["id"].as_i64().unwrap();
    let (s, _) = app
        .post("/v1/lists/block/webhook", json!({"receivers": ["r-0"]}))
        .await;
    assert_eq!(s, 200);
    let (s, keys) = app.get("/v1/keys").await;
    assert_eq!(s, 200);
    let key_id = keys["keys"][0]["key_id"].as_str().unwrap().to_string();

    let store = Store::open(&test_config(app.dir.path()).store_url())
        .await
        .unwrap();
    let other = store.create_app("intruder").await.unwrap().1;
    let tpl = json!({"name": "t", "channel": "webhook", "msg_type": "notice",
                     "account_id": account, "content": {"n": "1"}});
    let policy = json!({"routes": [{"channel": "webhook", "accounts": [{"account_id": account, "weight": 1}]}]});
    let not_found = [
        (Method::GET, format!("/v1/templates/{template}"), None),
        (
            Method::PUT,
            format!("/v1/templates/{template}"),
            Some(json!({"name": "t",
            "channel": "inbox", "msg_type": "notice", "content": {"title": "x", "content": "y"}})),
        ),
        (Method::DELETE, format!("/v1/templates/{template}"), None),
        (
            Method::POST,
            format!("/v1/templates/{template}/recall"),
            Some(json!({})),
        ),
        (
            Method::POST,
            "/v1/send".into(),
            Some(json!({"template_id": template, "receivers": ["x"]})),
        ),
        (Method::GET, format!("/v1/messages/{id}"), None),
        (Method::DELETE, format!("/v1/messages/{id}"), None),
        (
            Method::POST,
            format!("/v1/messages/{id}/recall"),
            Some(json!({})),
        ),
        (Method::GET, format!("/v1/accounts/{account}"), None),
        (Method::GET, "/v1/apps/test-app/stats".into(), None),
        (Method::DELETE, format!("/v1/keys/{key_id}"), None),
        (
            Method::POST,
            format!("/v1/keys/{key_id}/rotate"),
            Some(json!({})),
        ),
        (
            Method::GET,
            format!("/v1/templates/{template}/stats?date=2026-11-28"),
            None,
        ),
        (Method::GET, format!("/v1/campaigns/{campaign}"), None),
        (Method::DELETE, format!("/v1/campaigns/{campaign}"), None),
    ];
    for (method, path, body) in not_found {
        let (s, v) = app.call_as(&other, method.clone(), &path, body).await;
        assert_eq!(s, 404, "{method} {path}: {v}");
    }
    let refused = [
        (Method::POST, "/v1/templates".to_string(), Some(tpl.clone())),
        (Method::PUT, "/v1/policy".into(), Some(policy)),
    ];
    for (method, path, body) in refused {
        let (s, v) = app.call_as(&other, method.clone(), &path, body).await;
        assert_eq!(s, 422, "{method} {path}: {v}");
    }
    // Lists come back empty; a redrive by id finds nothing of the other app.
    let (s, v) = upload_yearly_campaign(&app, &other, inbox).await;
    assert_eq!((s, &v["error"]["code"]), (404, &json!("unknown_template")));
    let media = app
        .http
        .post(app.url(&format!(
            "/v1/accounts/{account}/media?type=image&filename=a.png"
        )))
        .bearer_auth(&other)
        .header("content-type", "image/png")
        .body(b"\x89PNG".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(media.status().as_u16(), 404, "media upload to its account");
    for path in [
        "/v1/templates",
        "/v1/accounts",
        "/v1/inbox/alice",
        "/v1/campaigns",
        "/v1/receivers/r-0/messages",
        "/v1/lists/block/webhook",
        "/v1/audit",
    ] {
        let (s, v) = app.call_as(&other, Method::GET, path, None).await;
        assert_eq!(s, 200, "{path}: {v}");
        let items = v
            .as_object()
            .unwrap()
            .values()
            .find_map(|x| x.as_array())
            .unwrap();
        if path == "/v1/audit" {
            // The other app's audit log holds its own creation only.
            assert_eq!(items.len(), 1, "{path}: {v}");
            assert_eq!(items[0]["action"], "app.create", "{v}");
        } else {
            assert!(items.is_empty(), "{path}: {v}");
        }
    }
    let (s, keys) = app.call_as(&other, Method::GET, "/v1/keys", None).await;
    assert_eq!(s, 200);
    assert_eq!(
        keys["keys"].as_array().unwrap().len(),
        1,
        "only its own key: {keys}"
    );
    let (s, v) = app
        .call_as(
            &other,
            Method::POST,
            "/v1/messages/redrive",
            Some(json!({"message_ids": [id]})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["redriven"], 0, "{v}");
    let (s, v) = app
        .call_as(
            &other,
            Method::POST,
            "/v1/inbox/alice/read",
            Some(json!({"message_ids": [alice]})),
        )
        .await;
    assert_eq!((s, &v["marked_read"]), (200, &json!(0)), "{v}");
    // The first app's things are untouched.
    let (s, _) = app.get(&format!("/v1/templates/{template}")).await;
    assert_eq!(s, 200);
    let (_, unread) = app.get("/v1/inbox/alice?unread=true").await;
    assert_eq!(
        unread["messages"][0]["message_id"],
        alice.as_str(),
        "{unread}"
    );
    let (_, c) = app.get(&format!("/v1/campaigns/{campaign}")).await;
    assert_eq!(c["state"], "waiting", "{c}");
    let (_, l) = app.get("/v1/lists/block/webhook").await;
    assert_eq!(l["receivers"], json!(["r-0"]), "{l}");
    assert_eq!(calls.lock().unwrap().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn account_secrets_are_sealed_in_the_store_and_masked_in_answers() {
    let app = TestApp::spawn().await;
    let (s, a) = app
        .post(
            "/v1/accounts",
            json!({"name": "hook", "channel": "webhook",
            "config": {"url": "https://hooks.example.com/x", "secret": "hunter2-very-secret"}}),
        )
        .await;
    assert_eq!(s, 201, "{a}");
    assert!(!a.to_string().contains("hunter2-very-secret"), "{a}");
    let (_, listed) = app.get("/v1/accounts").await;
    assert!(!listed.to_string().contains("hunter2-very-secret"));
    // Nothing on disk holds it: the store (and its WAL), the key file aside.
    let mut found = Vec::new();
    for entry in std::fs::read_dir(app.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            if bytes.windows(19).any(|w| w == b"hunter2-very-secret") {
                found.push(path);
            }
        }
    }
    assert!(found.is_empty(), "the secret is in clear in {found:?}");
    let key_file = app.dir.path().join("secret.key");
    assert!(key_file.exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key file is private");
    }
    app.stop().await;
}

#[tokio::test]
async fn outbound_calls_never_reach_private_addresses_unless_allowed() {
    let app = TestApp::spawn_with(|c| c.dispatch.allow_private_urls = false).await;
    let (hook, calls) = webhook_receiver(|_| (StatusCode::OK, "0")).await;
    // An IP literal that is not public is refused when the account is made...
    for url in [
        hook.clone(),
        "http://169.254.169.254/latest/meta-data".into(),
        "http://[::1]:9/x".into(),
    ] {
        let (s, e) = app
            .post(
                "/v1/accounts",
                json!({"name": "h", "channel": "webhook", "config": {"url": url, "secret": "s"}}),
            )
            .await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (422, Some("bad_account_config")),
            "{url}: {e}"
        );
        assert!(e.to_string().contains("not a public address"), "{e}");
    }
    // ...and a name that resolves to one is refused at the call, which never happens.
    let by_name = hook.replace("127.0.0.1", "localhost");
    let account = app.webhook_account("named", &by_name).await;
    let template = app.webhook_template(account, "notice").await;
    let id = app.send_to_numbered(template, "r", 1).await.remove(0);
    let trace = app.wait_for_state(&id, "send_failed").await;
    let failed = trace["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(failed["error_code"], "url_refused", "{trace}");
    assert!(
        failed["error_detail"]
            .as_str()
            .unwrap()
            .contains("localhost resolves to"),
        "{failed}"
    );
    assert_eq!(failed["attempt"], 1, "refusal is permanent: {trace}");
    assert!(calls.lock().unwrap().is_empty());

    // SMTP hosts too: an address when the account is made, a name when herald would connect.
    let smtp = |host: &str| {
        json!({"name": "m", "channel": "email", "config": {"host": host, "port": 2525,
               "security": "plain", "from": "h@example.com"}})
    };
    for host in ["127.0.0.1", "10.1.2.3", "::1"] {
        let (s, e) = app.post("/v1/accounts", smtp(host)).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (422, Some("bad_account_config")),
            "{host}: {e}"
        );
    }
    let (s, a) = app.post("/v1/accounts", smtp("localhost")).await;
    assert_eq!(s, 201, "{a}");
    let (s, t) = app
        .post(
            "/v1/templates",
            json!({"name": "m", "channel": "email", "msg_type": "notice", "account_id": a["id"],
                   "content": {"subject": "s", "text": "t"}}),
        )
        .await;
    assert_eq!(s, 201, "{t}");
    let (s, sent) = app
        .post(
            "/v1/send",
            json!({"template_id": t["id"], "receivers": ["x@example.com"]}),
        )
        .await;
    assert_eq!(s, 202, "{sent}");
    let id = message_ids(&sent).remove(0);
    let trace = app.wait_for_state(&id, "send_failed").await;
    let failed = trace["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(failed["error_code"], "url_refused", "{trace}");
    app.stop().await;
}

#[tokio::test]
async fn oversized_input_gets_its_own_code_and_errors_echo_no_values() {
    let app = TestApp::spawn_with(|c| {
        c.http.max_variables_bytes = 1024;
        c.http.max_template_bytes = 2048;
        c.http.max_request_content_bytes = 50_000;
    })
    .await;
    let template = app.inbox_template().await;
    // Each message renders to about 1 KB: 100 receivers pass the request's 50 KB.
    let receivers: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
    let (s, e) = app
        .post(
            "/v1/send",
            json!({"template_id": template, "receivers": receivers,
                   "variables": {"name": "y".repeat(900)}}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (422, Some("request_content_too_large")),
        "{e}"
    );
    let big = "x".repeat(1100);
    let (s, e) = app
        .post(
            "/v1/send",
            json!({"template_id": template, "receivers": ["u"], "variables": {"name": big}}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (422, Some("variables_too_large")),
        "{e}"
    );
    let (s, e) = app
        .post(
            "/v1/templates",
            json!({"name": "t", "channel": "inbox", "msg_type": "notice",
            "content": {"title": "t", "content": "y".repeat(2100)}}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (422, Some("template_too_large")),
        "{e}"
    );
    // serde would quote the offending value; herald's answer does not.
    let (s, e) = app
        .post(
            "/v1/keys",
            json!({"name": "k", "scopes": "hunter2-in-the-wrong-place"}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("bad_json")),
        "{e}"
    );
    assert!(!e.to_string().contains("hunter2"), "{e}");
    // Nothing was written by the refused requests.
    let (_, list) = app.get("/v1/templates").await;
    assert_eq!(list["templates"].as_array().unwrap().len(), 1);
    app.stop().await;
}

//! WeCom against a local stand-in that checks tokens, paths, queries and bodies as WeCom does.

use super::*;
use crate::channels::testkit::{self, Answer, Captured, VendorServer};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

const CORP_ID: &str = "ww1234567890abcdef";
const CORP_SECRET: &str = "corp-secret-xyz";
const ROBOT_KEY: &str = "693a91f6-7xxx-4bc4-97a0-0ec2sifa5aaa";

fn app_account(url: &str) -> Value {
    json!({"corp_id": CORP_ID, "corp_secret": CORP_SECRET, "agent_id": 1000002, "base_url": url})
}

fn robot_account(url: &str) -> Value {
    json!({"webhook_key": ROBOT_KEY, "base_url": url})
}

/// A WeCom stand-in: tokens `tok-1`, `tok-2`, ... from `gettoken`; `rejected` tokens get
/// `42001`; `message/send` answers with `answer(body)`.
struct Wecom {
    server: VendorServer,
    token_fetches: Arc<AtomicUsize>,
}

async fn wecom(
    rejected: &'static [&'static str],
    answer: impl Fn(&Value) -> Value + Send + Sync + 'static,
) -> Wecom {
    let fetches = Arc::new(AtomicUsize::new(0));
    let f = Arc::clone(&fetches);
    let server = VendorServer::start(move |c: &Captured| {
        match (c.method.as_str(), c.path.as_str()) {
            ("GET", "/cgi-bin/gettoken") => {
                if c.query_param("corpid").as_deref() != Some(CORP_ID)
                    || c.query_param("corpsecret").as_deref() != Some(CORP_SECRET)
                {
                    return Answer::json(json!({"errcode": 40001, "errmsg": "invalid credential"}));
                }
                let n = f.fetch_add(1, Ordering::SeqCst) + 1;
                Answer::json(
                    json!({"errcode": 0, "errmsg": "ok", "access_token": format!("tok-{n}"), "expires_in": 7200}),
                )
            }
            (_, path) => {
                let token = c.query_param("access_token").unwrap_or_default();
                if !token.starts_with("tok-") {
                    return Answer::json(json!({"errcode": 40014, "errmsg": "invalid access_token"}));
                }
                if rejected.contains(&token.as_str()) {
                    return Answer::json(json!({"errcode": 42001, "errmsg": "access_token expired"}));
                }
                match path {
                    "/cgi-bin/message/send" | "/cgi-bin/message/recall" => {
                        if c.header("content-type") != "application/json" {
                            return Answer::status(415, "json only");
                        }
                        Answer::json(answer(&c.json()))
                    }
                    "/cgi-bin/media/upload" => Answer::json(
                        json!({"errcode": 0, "errmsg": "", "type": c.query_param("type"), "media_id": "1G6nrLmr5EC3MMb", "created_at": "1380000000"}),
                    ),
                    _ => Answer::status(404, "no such API"),
                }
            }
        }
    })
    .await;
    Wecom {
        server,
        token_fetches: fetches,
    }
}

async fn sender() -> (tempfile::TempDir, WecomSender) {
    let (dir, store) = testkit::store().await;
    (
        dir,
        WecomSender::new(http::client(), Arc::new(TokenCache::new(store))),
    )
}

fn text(content: &str) -> Value {
    json!({"msgtype": "text", "text": {"content": content}})
}

#[tokio::test]
async fn app_messages_share_a_request_per_content_and_map_invalid_users() {
    let w = wecom(&[], |body| {
        let invalid: Vec<&str> = body["touser"]
            .as_str()
            .unwrap()
            .split('|')
            .filter(|u| u.starts_with("gone"))
            .collect();
        json!({"errcode": 0, "errmsg": "ok", "invaliduser": invalid.join("|"), "msgid": format!("msg-{}", body["text"]["content"].as_str().unwrap())})
    })
    .await;
    let (_dir, s) = sender().await;
    let records = [
        testkit::record(Channel::WecomApp, "zhangsan", text("hello")),
        testkit::record(Channel::WecomApp, "gone-user", text("hello")),
        testkit::record(Channel::WecomApp, "lisi", text("bye")),
        testkit::record(Channel::WecomApp, "wangwu", text("hello")),
    ];
    let refs: Vec<&MessageRecord> = records.iter().collect();
    let results = s.send_batch(&refs, 1, &app_account(&w.server.url)).await;
    assert_eq!(
        results[0].as_ref().unwrap().vendor_message_id.as_deref(),
        Some("msg-hello")
    );
    assert_eq!(results[0].as_ref().unwrap().vendor, "wecom");
    assert_eq!(
        results[1].as_ref().unwrap_err().code(),
        "wecom_invalid_user"
    );
    assert!(!results[1].as_ref().unwrap_err().is_retryable());
    assert_eq!(
        results[2].as_ref().unwrap().vendor_message_id.as_deref(),
        Some("msg-bye")
    );
    assert!(results[3].is_ok());

    let requests = w.server.requests();
    let sends: Vec<&Captured> = requests
        .iter()
        .filter(|c| c.path == "/cgi-bin/message/send")
        .collect();
    assert_eq!(sends.len(), 2);
    assert_eq!(
        sends[0].query_param("access_token").as_deref(),
        Some("tok-1")
    );
    assert_eq!(
        sends[0].json(),
        json!({"msgtype": "text", "text": {"content": "hello"}, "touser": "zhangsan|gone-user|wangwu", "agentid": 1000002})
    );
    assert_eq!(sends[1].json()["touser"], "lisi");
    assert_eq!(w.token_fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_expired_token_is_replaced_once() {
    let w = wecom(
        &["tok-1"],
        |_| json!({"errcode": 0, "errmsg": "ok", "msgid": "m1"}),
    )
    .await;
    let (_dir, s) = sender().await;
    let r = testkit::record(Channel::WecomApp, "zhangsan", text("hi"));
    let out = s.send(&r, 1, &app_account(&w.server.url)).await.unwrap();
    assert_eq!(out.vendor_message_id.as_deref(), Some("m1"));
    assert_eq!(w.token_fetches.load(Ordering::SeqCst), 2);
    let tokens: Vec<String> = w
        .server
        .requests()
        .iter()
        .filter(|c| c.path == "/cgi-bin/message/send")
        .map(|c| c.query_param("access_token").unwrap())
        .collect();
    assert_eq!(tokens, ["tok-1", "tok-2"]);
}

#[tokio::test]
async fn a_token_refused_twice_is_retryable_and_not_looped() {
    let w = wecom(&["tok-1", "tok-2", "tok-3"], |_| json!({"errcode": 0})).await;
    let (_dir, s) = sender().await;
    let r = testkit::record(Channel::WecomApp, "zhangsan", text("hi"));
    let err = s
        .send(&r, 1, &app_account(&w.server.url))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "wecom_42001");
    assert!(err.is_retryable());
    assert_eq!(w.token_fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn app_errors_are_retryable_or_permanent_by_code() {
    for (errcode, retryable) in [
        (-1, true),
        (45009, true),
        (45033, true),
        (81013, false),
        (60020, false),
        (40058, false),
    ] {
        let w = wecom(
            &[],
            move |_| json!({"errcode": errcode, "errmsg": "refused"}),
        )
        .await;
        let (_dir, s) = sender().await;
        let r = testkit::record(Channel::WecomApp, "zhangsan", text("hi"));
        let err = s
            .send(&r, 1, &app_account(&w.server.url))
            .await
            .unwrap_err();
        assert_eq!(err.code(), format!("wecom_{errcode}"));
        assert_eq!(err.is_retryable(), retryable, "{errcode}");
        assert!(err.detail().contains("refused"));
    }
    // Wrong credentials at gettoken are permanent and send nothing.
    let w = wecom(&[], |_| json!({"errcode": 0})).await;
    let (_dir, s) = sender().await;
    let mut account = app_account(&w.server.url);
    account["corp_secret"] = json!("wrong");
    let r = testkit::record(Channel::WecomApp, "zhangsan", text("hi"));
    let err = s.send(&r, 1, &account).await.unwrap_err();
    assert_eq!(err.code(), "wecom_40001");
    assert!(!err.is_retryable());
    assert!(!err.detail().contains("wrong"));
    assert!(
        w.server
            .requests()
            .iter()
            .all(|c| c.path == "/cgi-bin/gettoken")
    );
}

#[tokio::test]
async fn recall_and_media_upload_go_through_the_app_token() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = Arc::clone(&seen);
    let w = wecom(&[], move |body| {
        s2.lock().unwrap().push(body.clone());
        json!({"errcode": 0, "errmsg": "ok"})
    })
    .await;
    let (_dir, s) = sender().await;
    let record = testkit::record(Channel::WecomApp, "zhangsan", text("hi"));
    let mut sent = DeliveryEvent::for_record(&record, herald_core::State::Sent, 1);
    sent.vendor_message_id = Some("msg-42".into());
    s.recall(&sent, 1, &app_account(&w.server.url))
        .await
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), [json!({"msgid": "msg-42"})]);

    let media = Media {
        kind: "image".into(),
        filename: "logo \"v2\".png".into(),
        content_type: "image/png".into(),
        bytes: bytes::Bytes::from_static(b"\x89PNG\r\n\x1a\nbinary--data"),
    };
    let id = s
        .upload_media(Channel::WecomApp, 1, &app_account(&w.server.url), &media)
        .await
        .unwrap();
    assert_eq!(id, "1G6nrLmr5EC3MMb");
    let upload = w
        .server
        .requests()
        .into_iter()
        .find(|c| c.path == "/cgi-bin/media/upload")
        .unwrap();
    assert_eq!(upload.query_param("type").as_deref(), Some("image"));
    // The server's own multipart reading: one part named `media` with the file's bytes.
    let boundary = upload
        .header("content-type")
        .strip_prefix("multipart/form-data; boundary=")
        .unwrap()
        .to_string();
    let body = upload.body.to_vec();
    let text = String::from_utf8_lossy(&body).to_string();
    assert!(text.starts_with(&format!("--{boundary}\r\n")));
    assert!(text.contains("Content-Disposition: form-data; name=\"media\"; filename=\"logo %22v2%22.png\"\r\nContent-Type: image/png\r\n\r\n"));
    let start = body.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let end = body.len() - format!("\r\n--{boundary}--\r\n").len();
    assert_eq!(&body[start..end], &media.bytes[..]);

    // Robots have neither.
    assert_eq!(
        s.upload_media(
            Channel::WecomRobot,
            1,
            &robot_account(&w.server.url),
            &media
        )
        .await
        .unwrap_err()
        .code(),
        "not_supported"
    );
}

/// A robot stand-in: checks the key and records bodies; answers `errcode`.
async fn robot(errcode: i64) -> (VendorServer, Arc<Mutex<Vec<Value>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let server = VendorServer::start(move |c: &Captured| {
        if c.query_param("key").as_deref() != Some(ROBOT_KEY) {
            return Answer::json(json!({"errcode": 93000, "errmsg": "invalid webhook url"}));
        }
        if c.path == "/cgi-bin/webhook/upload_media" {
            let ok = c.query_param("type").as_deref() == Some("file")
                && c.header("content-type").starts_with("multipart/form-data; boundary=")
                && String::from_utf8_lossy(&c.body)
                    .contains("name=\"media\"; filename=\"run.log\"\r\nContent-Type: text/plain\r\n\r\nline 1\n");
            return Answer::json(if ok {
                json!({"errcode": 0, "errmsg": "ok", "type": "file", "media_id": "3a8asd892asd8asd", "created_at": "1380000000"})
            } else {
                json!({"errcode": 40058, "errmsg": "bad upload"})
            });
        }
        if c.path != "/cgi-bin/webhook/send" {
            return Answer::status(404, "no such API");
        }
        s.lock().unwrap().push(c.json());
        Answer::json(
            json!({"errcode": errcode, "errmsg": if errcode == 0 { "ok" } else { "refused" }}),
        )
    })
    .await;
    (server, seen)
}

#[tokio::test]
async fn robot_posts_once_per_content_with_mentions() {
    let (server, seen) = robot(0).await;
    let (_dir, s) = sender().await;
    let md = json!({"msgtype": "markdown", "markdown": {"content": "### build 7\n> failed"}});
    let records = [
        testkit::record(Channel::WecomRobot, "zhangsan", text("build failed")),
        testkit::record(Channel::WecomRobot, "+8613800001111", text("build failed")),
        testkit::record(Channel::WecomRobot, "@all", text("build failed")),
        testkit::record(Channel::WecomRobot, "lisi", md.clone()),
    ];
    let refs: Vec<&MessageRecord> = records.iter().collect();
    let results = s.send_batch(&refs, 1, &robot_account(&server.url)).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().unwrap().vendor_message_id.is_none())
    );
    let bodies = seen.lock().unwrap().clone();
    assert_eq!(
        bodies,
        [
            json!({"msgtype": "text", "text": {"content": "build failed", "mentioned_list": ["zhangsan"], "mentioned_mobile_list": ["13800001111"]}}),
            json!({"msgtype": "text", "text": {"content": "build failed", "mentioned_list": ["@all"]}}),
            json!({"msgtype": "markdown", "markdown": {"content": "### build 7\n> failed\n<@lisi>"}}),
        ]
    );
}

#[tokio::test]
async fn robot_limits_wait_a_minute_and_bad_keys_are_permanent() {
    let (server, _) = robot(45009).await;
    let (_dir, s) = sender().await;
    let r = testkit::record(Channel::WecomRobot, "zhangsan", text("hi"));
    let err = s
        .send(&r, 1, &robot_account(&server.url))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        SendError::Retryable {
            code: "wecom_45009".into(),
            detail: "errcode 45009: refused".into(),
            retry_after: Some(Duration::from_secs(60)),
        }
    );
    let mut wrong = robot_account(&server.url);
    wrong["webhook_key"] = json!("other-key");
    let err = s.send(&r, 1, &wrong).await.unwrap_err();
    assert_eq!(err.code(), "wecom_93000");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn robots_upload_files_through_their_key() {
    let (server, _) = robot(0).await;
    let (_dir, s) = sender().await;
    let log = Media {
        kind: "file".into(),
        filename: "run.log".into(),
        content_type: "text/plain".into(),
        bytes: bytes::Bytes::from_static(b"line 1\n"),
    };
    let id = s
        .upload_media(Channel::WecomRobot, 1, &robot_account(&server.url), &log)
        .await
        .unwrap();
    assert_eq!(id, "3a8asd892asd8asd");
    let image = Media {
        kind: "image".into(),
        ..log
    };
    let err = s
        .upload_media(Channel::WecomRobot, 1, &robot_account(&server.url), &image)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "not_supported");
}

#[test]
fn accounts_and_contents_are_checked_without_quoting_secrets() {
    assert!(
        check_account(
            Channel::WecomApp,
            &app_account("https://qyapi.weixin.qq.com")
        )
        .is_ok()
    );
    assert!(
        check_account(
            Channel::WecomRobot,
            &robot_account("https://qyapi.weixin.qq.com")
        )
        .is_ok()
    );
    for bad in [
        json!({"corp_id": CORP_ID, "corp_secret": "s3cr3t"}),
        json!({"corp_id": CORP_ID, "corp_secret": 12345, "agent_id": 1}),
        json!({"corp_id": CORP_ID, "corp_secret": "s3cr3t", "agent_id": 1, "extra": 1}),
        json!({"corp_id": "", "corp_secret": "s3cr3t", "agent_id": 1}),
    ] {
        let err = check_account(Channel::WecomApp, &bad).unwrap_err();
        assert!(!err.contains("s3cr3t") && !err.contains("12345"), "{err}");
    }
    let url_key =
        json!({"webhook_key": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=s3cr3t"});
    assert!(
        !check_account(Channel::WecomRobot, &url_key)
            .unwrap_err()
            .contains("s3cr3t")
    );

    assert!(check_content(Channel::WecomApp, &text("hi")).is_ok());
    assert!(check_content(Channel::WecomApp, &json!({"msgtype": "textcard", "textcard": {"title": "t", "description": "d", "url": "https://x"}, "safe": 0})).is_ok());
    assert!(
        check_content(
            Channel::WecomApp,
            &json!({"msgtype": "textcard", "textcard": {"title": "t"}})
        )
        .is_err()
    );
    assert!(
        check_content(
            Channel::WecomApp,
            &json!({"msgtype": "voice", "voice": {"media_id": "m"}})
        )
        .is_err()
    );
    assert!(check_content(Channel::WecomApp, &json!({"msgtype": "text"})).is_err());
    assert!(
        check_content(
            Channel::WecomApp,
            &json!({"msgtype": "text", "text": {"content": "x"}, "touser": "a"})
        )
        .is_err()
    );
    assert!(check_content(Channel::WecomRobot, &json!({"msgtype": "image", "image": {"base64": "aGk=", "md5": "49f68a5c8493ec2c0bf489821c21fc3b"}})).is_ok());
    assert!(
        check_content(
            Channel::WecomRobot,
            &json!({"msgtype": "textcard", "textcard": {}})
        )
        .is_err()
    );
    assert!(
        check_content(
            Channel::WecomRobot,
            &json!({"msgtype": "text", "text": {"content": "x", "mentioned_list": ["a"]}})
        )
        .is_err()
    );
}

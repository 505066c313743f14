//! SMS end to end through a Tencent Cloud stand-in that verifies TC3-HMAC-SHA256 signatures with
//! its own code (written from Tencent's signature v3 documentation, not herald's): a batch with
//! one failing number, billing units on `sent`, and a pushed receipt becoming `delivered`; the
//! price table's cost on `sent` events, in the warehouse.

use crate::support::{TestApp, message_ids, sql_csv};
use axum::body::Bytes;
use axum::http::HeaderMap;
use herald_core::prices::{PriceRule, PriceTable};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};

const SECRET_ID: &str = "AKIDe2eTest";
const SECRET_KEY: &str = "e2e-secret-key";

fn hmac(key: &[u8], msg: &str) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    m.update(msg.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// Tencent's check of a request's `Authorization`, from the documented algorithm.
fn verify_tc3(headers: &HeaderMap, body: &[u8]) -> Result<(), String> {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let auth = h("authorization");
    let rest = auth
        .strip_prefix("TC3-HMAC-SHA256 ")
        .ok_or("not TC3-HMAC-SHA256")?;
    let field = |name: &str| {
        rest.split(", ")
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .map(str::to_string)
            .ok_or(format!("no {name}"))
    };
    let (credential, signed, signature) = (
        field("Credential")?,
        field("SignedHeaders")?,
        field("Signature")?,
    );
    let timestamp: i64 = h("x-tc-timestamp").parse().map_err(|_| "bad timestamp")?;
    let date = chrono::DateTime::from_timestamp(timestamp, 0)
        .unwrap()
        .format("%Y-%m-%d")
        .to_string();
    if credential != format!("{SECRET_ID}/{date}/sms/tc3_request") {
        return Err(format!("credential {credential}"));
    }
    if !matches!(h("x-tc-action").as_str(), "SendSms" | "PullSmsSendStatus")
        || h("x-tc-version") != "2021-01-11"
    {
        return Err("action/version".into());
    }
    let canonical_headers: String = signed
        .split(';')
        .map(|n| format!("{n}:{}\n", h(n).trim().to_lowercase()))
        .collect();
    let canonical = format!(
        "POST\n/\n\n{canonical_headers}\n{signed}\n{}",
        hex::encode(Sha256::digest(body))
    );
    let to_sign = format!(
        "TC3-HMAC-SHA256\n{timestamp}\n{date}/sms/tc3_request\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let k_date = hmac(format!("TC3{SECRET_KEY}").as_bytes(), &date);
    let k_service = hmac(&k_date, "sms");
    let k_signing = hmac(&k_service, "tc3_request");
    if hex::encode(hmac(&k_signing, &to_sign)) != signature {
        return Err("signature mismatch".into());
    }
    Ok(())
}

/// Statuses a `PullSmsSendStatus` call hands out (once each).
type Pulls = Arc<Mutex<Vec<Value>>>;

/// A `SendSms` and `PullSmsSendStatus` stand-in: numbers ending in 9 fail with a per-number
/// error; pulls hand out what the test queued.
async fn tencent() -> (String, Arc<Mutex<Vec<Value>>>, Pulls) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let pulls: Pulls = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let p = pulls.clone();
    let handler = move |headers: HeaderMap, body: Bytes| {
        let seen = s.clone();
        let pulls = p.clone();
        async move {
            if let Err(why) = verify_tc3(&headers, &body) {
                return axum::Json(
                    json!({"Response": {"Error": {"Code": "AuthFailure.SignatureFailure", "Message": why}, "RequestId": "r"}}),
                );
            }
            let req: Value = serde_json::from_slice(&body).unwrap();
            if headers.get("x-tc-action").unwrap() == "PullSmsSendStatus" {
                // Each queued status is handed out once, as Tencent does.
                let set: Vec<Value> = std::mem::take(&mut *pulls.lock().unwrap());
                return axum::Json(
                    json!({"Response": {"PullSmsSendStatusSet": set, "RequestId": "p"}}),
                );
            }
            seen.lock().unwrap().push(req.clone());
            let set: Vec<Value> = req["PhoneNumberSet"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| {
                    let n = n.as_str().unwrap();
                    if n.ends_with('9') {
                        json!({"SerialNo": "", "PhoneNumber": n, "Fee": 0, "SessionContext": "", "Code": "InvalidParameterValue.IncorrectPhoneNumber", "Message": "incorrect number", "IsoCode": "CN"})
                    } else {
                        json!({"SerialNo": format!("2640:{}", &n[n.len() - 4..]), "PhoneNumber": n, "Fee": 1, "SessionContext": "", "Code": "Ok", "Message": "send success", "IsoCode": "CN"})
                    }
                })
                .collect();
            axum::Json(
                json!({"Response": {"SendStatusSet": set, "RequestId": "a0aabda6-cf91-4f3e-a81f-9198114a2279"}}),
            )
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = axum::Router::new().route("/", axum::routing::post(handler));
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, seen, pulls)
}

#[tokio::test]
async fn sms_batch_partial_failure_billing_units_and_pushed_receipts() {
    let (url, seen, _) = tencent().await;
    let app = TestApp::spawn().await;
    let (s, account) = app
        .post(
            "/v1/accounts",
            json!({"name": "tencent", "channel": "sms", "config": {
            "vendor": "tencent", "secret_id": SECRET_ID, "secret_key": SECRET_KEY,
            "sdk_app_id": "1400006666", "sign_name": "Herald", "base_url": url}}),
        )
        .await;
    assert_eq!(s, 201, "{account}");
    assert_eq!(account["config"]["secret_key"], "***");
    let (s, t) = app
        .post("/v1/templates", json!({"name": "code", "channel": "sms", "msg_type": "auth_code", "account_id": account["id"],
            "content": {"text": "您的验证码是{$code}，5分钟内有效。", "tencent": {"template_id": "449739", "params": ["{$code}", "5"]}}}))
        .await;
    assert_eq!(s, 201, "{t}");

    // A bad number is refused before anything is published.
    let (s, bad) = app
        .post("/v1/send", json!({"template_id": t["id"], "receivers": ["12012345678"], "variables": {"code": "1"}}))
        .await;
    assert_eq!(s, 422, "{bad}");
    assert_eq!(bad["error"]["code"], "bad_receiver");

    let (s, a) = app
        .post("/v1/send", json!({"template_id": t["id"],
            "receivers": ["13800000001", "+86 138 0000 0002", "13800000009"], "variables": {"code": "824731"}}))
        .await;
    assert_eq!(s, 202, "{a}");
    let ids = message_ids(&a);
    let sent = app.wait_for_state(&ids[0], "sent").await;
    app.wait_for_state(&ids[1], "sent").await;
    let failed = app.wait_for_state(&ids[2], "send_failed").await;

    // One request carried all three numbers, in E.164.
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let r = &requests[0];
    let mut numbers: Vec<&str> = r["PhoneNumberSet"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        ["+8613800000001", "+8613800000002", "+8613800000009"]
    );
    assert_eq!(r["SmsSdkAppId"], "1400006666");
    assert_eq!(r["SignName"], "Herald");
    assert_eq!(r["TemplateId"], "449739");
    assert_eq!(r["TemplateParamSet"], json!(["824731", "5"]));

    let sent_event = sent["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["state"] == "sent")
        .unwrap()
        .clone();
    assert_eq!(sent_event["vendor"], "tencent");
    assert_eq!(sent_event["vendor_message_id"], "2640:0001");
    // 【Herald】 + 17 Chinese characters: 25 UCS-2 units, one segment.
    assert_eq!(sent_event["billing_units"], 1);
    let last = failed["events"].as_array().unwrap().last().unwrap().clone();
    assert!(
        last["error_code"].as_str().unwrap().starts_with("tencent"),
        "{last}"
    );
    // Not retried: one request only.
    assert_eq!(seen.lock().unwrap().len(), 1);

    // Tencent pushes receipts (times in Beijing time) for two numbers and one herald never sent.
    let beijing = |secs: i64| {
        (chrono::Utc::now() + chrono::Duration::hours(8) + chrono::Duration::seconds(secs))
            .format("%Y-%m-%d %H:%M:%S")
            .to_string()
    };
    let push = json!([
        {"user_receive_time": beijing(5), "nationcode": "86", "mobile": "13800000001",
         "report_status": "SUCCESS", "errmsg": "DELIVRD", "description": "用户短信送达成功", "sid": "2640:0001"},
        {"user_receive_time": beijing(6), "nationcode": "86", "mobile": "13800000002",
         "report_status": "FAIL", "errmsg": "MK:0005", "description": "用户短信送达失败", "sid": "2640:0002"},
        {"user_receive_time": beijing(7), "nationcode": "86", "mobile": "13899999999",
         "report_status": "SUCCESS", "errmsg": "DELIVRD", "description": "", "sid": "unknown-sid"}
    ]);
    let resp = app
        .http
        .post(app.url("/v1/receipts/tencent"))
        .json(&push)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ack: Value = resp.json().await.unwrap();
    assert_eq!(ack["result"], 0, "{ack}");
    let delivered = app.wait_for_state(&ids[0], "delivered").await;
    let d = delivered["events"].as_array().unwrap().last().unwrap();
    assert_eq!(d["vendor_message_id"], "2640:0001");
    let undelivered = app.wait_for_state(&ids[1], "delivery_failed").await;
    let u = undelivered["events"].as_array().unwrap().last().unwrap();
    assert_eq!(u["error_code"], "MK:0005", "{u}");
    assert_eq!(
        app.metric("herald_receipts_total{vendor=\"tencent\",outcome=\"unmatched\"}")
            .await,
        1.0
    );
    // A malformed push is refused with a code.
    let resp = app
        .http
        .post(app.url("/v1/receipts/tencent"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    app.stop().await;
}

#[tokio::test]
async fn pulled_receipts_become_delivery_events() {
    let (url, _, pulls) = tencent().await;
    let app = TestApp::spawn_with(|c| {
        c.dispatch.receipt_poll_interval = std::time::Duration::from_millis(100)
    })
    .await;
    let (_, account) = app
        .post(
            "/v1/accounts",
            json!({"name": "tencent", "channel": "sms", "config": {
            "vendor": "tencent", "secret_id": SECRET_ID, "secret_key": SECRET_KEY,
            "sdk_app_id": "1400006666", "sign_name": "Herald", "base_url": url}}),
        )
        .await;
    let (_, t) = app
        .post("/v1/templates", json!({"name": "code", "channel": "sms", "msg_type": "notice", "account_id": account["id"],
            "content": {"text": "Your parcel {$id} arrives today.", "tencent": {"template_id": "1", "params": ["{$id}"]}}}))
        .await;
    let (s, a) = app
        .post("/v1/send", json!({"template_id": t["id"], "receivers": ["+14155550123"], "variables": {"id": "P-1"}}))
        .await;
    assert_eq!(s, 202, "{a}");
    let id = &message_ids(&a)[0];
    let sent = app.wait_for_state(id, "sent").await;
    let sent_event = sent["events"].as_array().unwrap().last().unwrap().clone();
    // 【Herald】 is not GSM-7, so the whole text is UCS-2: 38 units, one part.
    assert_eq!(sent_event["billing_units"], 1);
    // Pulled statuses carry unix seconds (the pushed callback a Beijing-time string).
    let received = chrono::Utc::now().timestamp() + 3;
    pulls
        .lock()
        .unwrap()
        .push(json!({"UserReceiveTime": received, "CountryCode": "1",
        "SubscriberNumber": "4155550123", "PhoneNumber": "+14155550123",
        "SerialNo": sent_event["vendor_message_id"], "ReportStatus": "SUCCESS",
        "Description": "DELIVRD", "SessionContext": ""}));
    let delivered = app.wait_for_state(id, "delivered").await;
    let d = delivered["events"].as_array().unwrap().last().unwrap();
    assert_eq!(d["vendor"], "tencent");
    assert!(d["latency_ms"].as_u64().is_some(), "{d}");
    assert_eq!(
        app.metric("herald_receipts_total{vendor=\"tencent\",outcome=\"matched\"}")
            .await,
        1.0
    );
    app.stop().await;
}

#[tokio::test]
async fn sms_sent_events_carry_their_cost_into_the_warehouse() {
    let (url, _, _) = tencent().await;
    let app = TestApp::spawn_with(|c| {
        let rule = |prefix: Option<&str>, micros| PriceRule {
            vendor: "tencent".into(),
            account_id: None,
            country_prefix: prefix.map(str::to_string),
            msg_type: None,
            unit_price_micros: micros,
            currency: "CNY".into(),
        };
        // Mainland numbers at 0.045 a unit, Hong Kong at 0.3; nothing else is priced.
        c.prices =
            PriceTable::new(vec![rule(Some("+86"), 45_000), rule(Some("+852"), 300_000)]).unwrap();
    })
    .await;
    let (_, account) = app
        .post(
            "/v1/accounts",
            json!({"name": "tencent", "channel": "sms", "config": {
            "vendor": "tencent", "secret_id": SECRET_ID, "secret_key": SECRET_KEY,
            "sdk_app_id": "1400006666", "sign_name": "Herald", "base_url": url}}),
        )
        .await;
    let (s, t) = app
        .post("/v1/templates", json!({"name": "notice", "channel": "sms", "msg_type": "notice", "account_id": account["id"],
            "content": {"text": "{$body}", "tencent": {"template_id": "1", "params": ["{$body}"]}}}))
        .await;
    assert_eq!(s, 201, "{t}");
    // 【Herald】 and 80 Chinese characters: 88 UCS-2 units, two parts of 67.
    let long = "您".repeat(80);
    let (s, a) = app
        .post("/v1/send", json!({"template_id": t["id"],
            "receivers": ["+8613800000001", "+85291234567", "+14155550123"], "variables": {"body": long}}))
        .await;
    assert_eq!(s, 202, "{a}");
    let ids = message_ids(&a);
    for id in &ids {
        app.wait_for_state(id, "sent").await;
    }
    let trace = app.wait_for_state(&ids[0], "sent").await;
    let sent = trace["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (
            &sent["billing_units"],
            &sent["cost_micros"],
            &sent["currency"]
        ),
        (&json!(2), &json!(90_000), &json!("CNY")),
        "{sent}"
    );
    // The trace answers once the warehouse has the events.
    let csv = sql_csv(
        &app.warehouse(),
        "SELECT receiver, billing_units, cost_micros, currency FROM delivery_events \
         WHERE state = 'sent' ORDER BY receiver",
    )
    .await;
    assert_eq!(
        csv,
        "receiver,billing_units,cost_micros,currency\n\
         +14155550123,2,,\n\
         +85291234567,2,600000,CNY\n\
         +8613800000001,2,90000,CNY\n"
    );
    // Only `sent` events carry a cost.
    let csv = sql_csv(
        &app.warehouse(),
        "SELECT count(*) AS n FROM delivery_events WHERE cost_micros IS NOT NULL AND state <> 'sent'",
    )
    .await;
    assert_eq!(csv, "n\n0\n");
    app.stop().await;
}

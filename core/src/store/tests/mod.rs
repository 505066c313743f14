//! One suite for the store, run against SQLite (a temporary file) and PostgreSQL (a fresh
//! database per test on the server named by `HERALD_TEST_POSTGRES`, which the test script sets).

use super::*;
use crate::domain::{Channel, MessageId, MsgType};
use crate::wire::{DeliveryEvent, MessageRecord, Receipt, State};
use chrono::{TimeZone, Utc};
use serde_json::json;
use std::collections::HashMap;

/// A store on a fresh database, and what keeps it alive.
struct Fresh {
    store: Store,
    _dir: Option<tempfile::TempDir>,
}

async fn sqlite() -> Fresh {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("herald.db").display());
    Fresh {
        store: Store::open(&url).await.unwrap(),
        _dir: Some(dir),
    }
}

/// Creates an empty database on the test server and opens a store on it.
async fn postgres() -> Fresh {
    let server = std::env::var("HERALD_TEST_POSTGRES").expect(
        "HERALD_TEST_POSTGRES is not set: run the suite with scripts/test.sh, or set it to a \
         PostgreSQL URL such as postgres://postgres@127.0.0.1:5432/test",
    );
    install_default_drivers();
    let admin = AnyPoolOptions::new()
        .max_connections(1)
        .connect(&server)
        .await
        .unwrap();
    let name = format!("herald_test_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    let mut url = url::Url::parse(&server).unwrap();
    url.set_path(&name);
    Fresh {
        store: Store::open(url.as_str()).await.unwrap(),
        _dir: None,
    }
}

/// An audit entry for a change a check makes when the entry itself is not checked.
fn noted() -> Audit {
    Audit::new("test", "test", "test", json!({}))
}

/// Runs each check once on SQLite and once on PostgreSQL.
macro_rules! on_both {
    ($($check:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $check() {
                super::$check(super::sqlite().await.store).await;
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $check() {
                super::$check(super::postgres().await.store).await;
            })*
        }
    };
}

on_both!(
    apps_and_keys,
    accounts_and_templates,
    idempotency_claims,
    concurrent_claims_admit_one,
    ledger_and_inbox,
    event_index,
    vendor_tokens,
    vendor_messages_and_receipts,
    policy_documents_and_lists,
    claims_pass_limits_once,
    concurrent_claims_respect_a_cap,
    schedule_lease_release_and_cancel,
    in_flight_guards_renew_and_end,
    the_apps_schedule_count_reads_its_index,
    recall_finds_sent_messages_and_marks_them_once,
    rate_reservations_tile_the_timeline,
    receiver_slots_are_taken_together_in_order,
    campaign_upload_and_reads,
    campaign_runs_checkpoints_and_cancel,
    campaign_resumes_after_a_lost_lease,
    concurrent_campaign_claims_admit_one,
    secrets_are_sealed_at_rest,
    message_states_for_tracing,
    processes_share_one_record_signing_key,
    retention_forgets_old_messages_only,
    changes_and_their_audit_entries_commit_together,
);

mod audit;
use audit::changes_and_their_audit_entries_commit_together;

mod campaigns;
use campaigns::{
    campaign_resumes_after_a_lost_lease, campaign_runs_checkpoints_and_cancel,
    campaign_upload_and_reads, concurrent_campaign_claims_admit_one,
};
mod traces;
use traces::{message_states_for_tracing, retention_forgets_old_messages_only};
mod policy;
use policy::{
    claims_pass_limits_once, concurrent_claims_respect_a_cap, in_flight_guards_renew_and_end,
    policy_documents_and_lists, rate_reservations_tile_the_timeline,
    receiver_slots_are_taken_together_in_order, schedule_lease_release_and_cancel,
    the_apps_schedule_count_reads_its_index,
};

async fn processes_share_one_record_signing_key(store: Store) {
    // Two processes on one store (handles with their own cache) racing to create the key.
    let other = Store {
        signer: Arc::default(),
        ..store.clone()
    };
    let (a, b) = tokio::join!(store.record_signer(), other.record_signer());
    let (a, b) = (a.unwrap(), b.unwrap());
    let record = a.signed(b"k".to_vec(), br#"{"a":1}"#.to_vec());
    assert!(b.verify(&record));
    // A third, later handle reads the same key; it is sealed at rest when a ring is set.
    let third = Store {
        signer: Arc::default(),
        ..store.clone()
    };
    assert!(third.record_signer().await.unwrap().verify(&record));
    let ring = SecretBox::generate_entry("k1");
    let sealing = store
        .clone()
        .with_secrets(Arc::new(SecretBox::parse(&ring).unwrap()));
    assert_eq!(sealing.reseal_secrets().await.unwrap(), 1);
    let stored: String = sqlx::query_scalar("SELECT secret FROM internal_keys")
        .fetch_one(&store.pool)
        .await
        .unwrap();
    assert!(crate::secrets::is_sealed(&stored), "{stored}");
    let fourth = Store {
        signer: Arc::default(),
        ..sealing.clone()
    };
    assert!(fourth.record_signer().await.unwrap().verify(&record));
}

async fn apps_and_keys(store: Store) {
    let (app, key) = store.create_app("shop").await.unwrap();
    let app_id = app.id;
    assert!(key.starts_with("hk_"));
    assert!(matches!(
        store.create_app("shop").await,
        Err(StoreError::Conflict(_))
    ));
    let (found, first) = store.key_by_hash(&hash_key(&key)).await.unwrap().unwrap();
    assert_eq!(found, app);
    assert_eq!(first.scopes, Scopes::ADMIN);
    assert!(first.live_at(now_ms()));
    assert_eq!(store.key_by_hash(&hash_key("hk_nope")).await.unwrap(), None);

    // A second key with fewer rights, expiring; then revoking the first.
    let (second, key2) = store
        .create_key(
            app_id,
            &NewKey {
                name: "sender".into(),
                scopes: Scopes::of(&[Scope::Send, Scope::Read]),
                expires_at: Some(now_ms() + 60_000),
            },
            |k| {
                Audit::new(
                    &first.key_id,
                    "key.create",
                    format!("key:{}", k.key_id),
                    json!({}),
                )
            },
        )
        .await
        .unwrap();
    assert_ne!(key2, key);
    assert!(second.scopes.allows(Scope::Send) && !second.scopes.allows(Scope::Templates));
    assert_eq!(
        store
            .key_by_hash(&hash_key(&key2))
            .await
            .unwrap()
            .unwrap()
            .1,
        second
    );
    let listed = store.keys(app_id).await.unwrap();
    assert_eq!(listed.len(), 2);
    let revoked = store
        .revoke_key(app_id, &first.key_id, |k| {
            Audit::new(
                &first.key_id,
                "key.revoke",
                format!("key:{}", k.key_id),
                json!({}),
            )
        })
        .await
        .unwrap();
    assert!(revoked.revoked_at.is_some() && !revoked.live_at(now_ms()));
    assert_eq!(store.key_by_hash(&hash_key(&key)).await.unwrap(), None);
    // A rotation makes a key like the old one; the old one's expiry only moves earlier.
    let rotate = |until: i64| {
        store.rotate_key(app_id, &second.key_id, until, |new, old| {
            let detail = json!({"new_key": new.key_id, "old_key_expires_at": old.expires_at});
            Audit::new(
                &first.key_id,
                "key.rotate",
                format!("key:{}", old.key_id),
                detail,
            )
        })
    };
    let (third, key3, expired) = rotate(1).await.unwrap();
    assert_eq!(expired.expires_at, Some(1));
    assert!(!expired.live_at(now_ms()));
    assert_eq!(
        (&third.name, third.scopes, third.expires_at),
        (&second.name, second.scopes, second.expires_at)
    );
    assert_eq!(
        store
            .key_by_hash(&hash_key(&key3))
            .await
            .unwrap()
            .unwrap()
            .1,
        third
    );
    let (_, _, later) = rotate(i64::MAX).await.unwrap();
    assert_eq!(later.expires_at, Some(1));
    // A key of another app is not found, and the failed change makes no entry.
    let (other, _) = store.create_app("other").await.unwrap();
    assert!(matches!(
        store
            .revoke_key(other.id, &second.key_id, |_| noted())
            .await,
        Err(StoreError::NotFound)
    ));
    // Its log holds its own creation only.
    let log = store.audit_log(other.id, None, 10).await.unwrap();
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["app.create"]);

    // The audit log: newest first, per app, paged by id.
    let log = store.audit_log(app_id, None, 2).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["key.rotate", "key.rotate"]
    );
    assert_eq!(log[0].target, format!("key:{}", second.key_id));
    assert_eq!(log[0].detail["old_key_expires_at"], 1);
    let rest = store.audit_log(app_id, Some(log[1].id), 10).await.unwrap();
    assert_eq!(
        rest.iter()
            .map(|e| (e.action.as_str(), e.target.clone()))
            .collect::<Vec<_>>(),
        [
            ("key.revoke", format!("key:{}", first.key_id)),
            ("key.create", format!("key:{}", second.key_id)),
            ("app.create", format!("app:{app_id}"))
        ]
    );
    assert!(rest[..2].iter().all(|e| e.actor == first.key_id));
    assert_eq!(rest[2].actor, "cli");
    assert_eq!(
        store.app_by_name("shop").await.unwrap().map(|a| a.id),
        Some(app_id)
    );
    assert_eq!(store.app_by_name("nope").await.unwrap(), None);
    store.ping().await.unwrap();
}

async fn secrets_are_sealed_at_rest(store: Store) {
    use crate::secrets::SecretBox;
    let (app, _) = store.create_app("shop").await.unwrap();
    // An account and a token written before encryption was configured stay readable.
    let clear = store
        .create_account(
            app.id,
            "old",
            Channel::Webhook,
            &json!({"secret": "clear-secret"}),
            |_| noted(),
        )
        .await
        .unwrap();
    store.put_vendor_token("t", "clear-token", 1).await.unwrap();
    let old_key = SecretBox::generate_entry("old");
    let sealing = store
        .clone()
        .with_secrets(Arc::new(SecretBox::parse(&old_key).unwrap()));
    assert_eq!(sealing.account(app.id, clear.id).await.unwrap(), clear);
    let sealed = sealing
        .create_account(
            app.id,
            "new",
            Channel::Webhook,
            &json!({"secret": "hunter2"}),
            |_| noted(),
        )
        .await
        .unwrap();
    sealing.put_vendor_token("u", "tok-123", 2).await.unwrap();
    let raw = |table: &'static str| {
        let pool = store.pool.clone();
        async move {
            let column = if table == "accounts" {
                "config"
            } else {
                "token"
            };
            sqlx::query_scalar::<_, String>(&format!("SELECT {column} FROM {table}"))
                .fetch_all(&pool)
                .await
                .unwrap()
                .join(" ")
        }
    };
    let on_disk = format!("{} {}", raw("accounts").await, raw("vendor_tokens").await);
    assert!(
        !on_disk.contains("hunter2") && !on_disk.contains("tok-123"),
        "{on_disk}"
    );
    assert_eq!(
        sealing.account(app.id, sealed.id).await.unwrap().config,
        json!({"secret": "hunter2"})
    );
    assert_eq!(
        sealing.vendor_token("u").await.unwrap(),
        Some(("tok-123".to_string(), 2))
    );
    // Without the key, a sealed value is an error that names no secret.
    let e = store
        .account(app.id, sealed.id)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no secret key is configured"), "{e}");
    // Dropping a token compares the opened value.
    sealing.drop_vendor_token("u", "other").await.unwrap();
    assert!(sealing.vendor_token("u").await.unwrap().is_some());
    sealing.drop_vendor_token("u", "tok-123").await.unwrap();
    assert_eq!(sealing.vendor_token("u").await.unwrap(), None);
    // Rotation: a new key first; resealing moves everything (the clear rows too) to it.
    let ring = format!("{},{old_key}", SecretBox::generate_entry("new"));
    let rotated = store
        .clone()
        .with_secrets(Arc::new(SecretBox::parse(&ring).unwrap()));
    assert_eq!(rotated.reseal_secrets().await.unwrap(), 3);
    assert_eq!(rotated.reseal_secrets().await.unwrap(), 0);
    let on_disk = format!("{} {}", raw("accounts").await, raw("vendor_tokens").await);
    assert!(
        !on_disk.contains("clear-secret") && !on_disk.contains(":old:"),
        "{on_disk}"
    );
    let only_new = store.clone().with_secrets(Arc::new(
        SecretBox::parse(ring.split(',').next().unwrap()).unwrap(),
    ));
    assert_eq!(only_new.account(app.id, clear.id).await.unwrap(), clear);
    assert_eq!(only_new.account(app.id, sealed.id).await.unwrap(), sealed);
    assert_eq!(
        only_new.vendor_token("t").await.unwrap(),
        Some(("clear-token".to_string(), 1))
    );
}

async fn accounts_and_templates(store: Store) {
    let (shop, _) = store.create_app("shop").await.unwrap();
    let (bank, _) = store.create_app("bank").await.unwrap();
    let config = json!({"url": "https://example.com/hook"});
    let acc = store
        .create_account(shop.id, "hook", Channel::Webhook, &config, |_| noted())
        .await
        .unwrap();
    assert_eq!((acc.channel, &acc.config), (Channel::Webhook, &config));
    assert_eq!(store.account(shop.id, acc.id).await.unwrap(), acc);
    assert!(matches!(
        store.account(bank.id, acc.id).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.account_by_id(acc.id).await.unwrap(), acc);
    assert_eq!(store.accounts(shop.id).await.unwrap(), vec![acc.clone()]);
    assert!(store.accounts(bank.id).await.unwrap().is_empty());
    assert_eq!(
        store.accounts_of_channel(Channel::Webhook).await.unwrap(),
        vec![acc.clone()]
    );

    let mut t = NewTemplate {
        name: "welcome".into(),
        channel: Channel::Webhook,
        msg_type: MsgType::Notice,
        account_id: Some(acc.id),
        content: json!({"body": "hi {$name}"}),
    };
    let first = store
        .create_template(shop.id, &t, |_| noted())
        .await
        .unwrap();
    assert_eq!((first.version, first.account_id), (1, Some(acc.id)));
    t.name = "welcome-2".into();
    t.account_id = None;
    let second = store
        .update_template(shop.id, first.id, &t, |_| noted())
        .await
        .unwrap();
    assert_eq!((second.version, second.account_id), (2, None));
    assert_eq!(second.name, "welcome-2");
    assert!(matches!(
        store
            .update_template(bank.id, first.id, &t, |_| noted())
            .await,
        Err(StoreError::NotFound)
    ));
    let other = store
        .create_template(shop.id, &t, |_| noted())
        .await
        .unwrap();
    let page = store.templates(shop.id, 0, 1).await.unwrap();
    assert_eq!(page, vec![second.clone()]);
    let page = store.templates(shop.id, first.id, 10).await.unwrap();
    assert_eq!(page, vec![other.clone()]);
    store
        .delete_template(shop.id, first.id, noted())
        .await
        .unwrap();
    assert!(matches!(
        store.template(shop.id, first.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.delete_template(shop.id, first.id, noted()).await,
        Err(StoreError::NotFound)
    ));
}

async fn idempotency_claims(store: Store) {
    assert_eq!(
        store.claim_idempotency(1, "k", "h1").await.unwrap(),
        Claim::Claimed
    );
    assert_eq!(
        store.claim_idempotency(1, "k", "h1").await.unwrap(),
        Claim::InProgress
    );
    assert_eq!(
        store.claim_idempotency(1, "k", "h2").await.unwrap(),
        Claim::Mismatch
    );
    store.finish_idempotency(1, "k", 202, "{}").await.unwrap();
    assert_eq!(
        store.claim_idempotency(1, "k", "h1").await.unwrap(),
        Claim::Done {
            status: 202,
            response: "{}".into()
        }
    );
    // Another app's key of the same name is its own.
    assert_eq!(
        store.claim_idempotency(2, "k", "h1").await.unwrap(),
        Claim::Claimed
    );
    store.release_idempotency(2, "k").await.unwrap();
    assert_eq!(
        store.claim_idempotency(2, "k", "h3").await.unwrap(),
        Claim::Claimed
    );
}

async fn concurrent_claims_admit_one(store: Store) {
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.claim_idempotency(7, "race", "h").await.unwrap() })
        })
        .collect();
    let mut claimed = 0;
    for t in tasks {
        if t.await.unwrap() == Claim::Claimed {
            claimed += 1;
        }
    }
    assert_eq!(claimed, 1);
}

async fn ledger_and_inbox(store: Store) {
    let (a, b, c) = (MessageId::new(), MessageId::new(), MessageId::new());
    store
        .record_ledger(
            &[
                (a, LedgerState::Sending, 1),
                (b, LedgerState::Sending, 1),
                // The last row for a message wins.
                (a, LedgerState::Sent, 2),
            ],
            &HashMap::new(),
            &[],
            &[],
        )
        .await
        .unwrap();
    let states = store.ledger_states(&[a, b, c]).await.unwrap();
    assert_eq!(states.len(), 2);
    assert_eq!(states[&a], (LedgerState::Sent, 2, None));
    assert_eq!(states[&b], (LedgerState::Sending, 1, None));

    let inbox = |id: MessageId, receiver: &str| SentInbox {
        message_id: id,
        app: "shop".into(),
        receiver: receiver.into(),
        template_id: 3,
        content: json!({"title": format!("for {receiver}")}),
    };
    let entries = [
        inbox(b, "u1"),
        inbox(c, "u1"),
        inbox(MessageId::new(), "u2"),
    ];
    store
        .record_ledger(
            &[(b, LedgerState::Sent, 1)],
            &HashMap::from([(b, 7)]),
            &entries,
            &[],
        )
        .await
        .unwrap();
    // Written again (a redelivered batch): still once.
    store
        .record_ledger(
            &[(b, LedgerState::Sent, 1)],
            &HashMap::new(),
            &entries[..1],
            &[],
        )
        .await
        .unwrap();
    // The time of the final event is kept when a later write brings none.
    assert_eq!(
        store
            .ledger_states(&[a, b, c])
            .await
            .unwrap()
            .into_iter()
            .filter_map(|(id, (_, _, done_at))| done_at.map(|t| (id, t)))
            .collect::<HashMap<_, _>>(),
        HashMap::from([(b, 7)])
    );
    let page = store.inbox("shop", "u1", None, 10, false).await.unwrap();
    assert_eq!(page.len(), 2);
    assert!(page.iter().all(|e| e.read_at.is_none()));
    let first = store.inbox("shop", "u1", None, 1, false).await.unwrap();
    let cursor = (first[0].created_at, first[0].message_id.clone());
    let rest = store
        .inbox("shop", "u1", Some(cursor), 10, false)
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_ne!(rest[0].message_id, first[0].message_id);
    assert!(
        store
            .inbox("bank", "u1", None, 10, false)
            .await
            .unwrap()
            .is_empty()
    );

    let one = vec![first[0].message_id.clone()];
    assert_eq!(store.mark_read("shop", "u1", &one).await.unwrap(), 1);
    assert_eq!(store.mark_read("shop", "u1", &one).await.unwrap(), 0);
    let unread = store.inbox("shop", "u1", None, 10, true).await.unwrap();
    assert_eq!(unread.len(), 1);
    assert_eq!(store.mark_read("shop", "u1", &[]).await.unwrap(), 1);
    assert!(
        store
            .inbox("shop", "u1", None, 10, true)
            .await
            .unwrap()
            .is_empty()
    );
}

fn record(app: &str, receiver: &str) -> MessageRecord {
    MessageRecord {
        v: 1,
        message_id: MessageId::new(),
        request_id: "req".into(),
        biz_id: None,
        app: app.into(),
        template_id: 1,
        channel: Channel::Sms,
        msg_type: MsgType::Notice,
        account_id: Some(5),
        receiver: receiver.into(),
        content: json!({}),
        accepted_at: Utc::now(),
        send_at: None,
        timezone: None,
    }
}

fn event(r: &MessageRecord, state: State, attempt: u32, second: u32) -> DeliveryEvent {
    let mut e = DeliveryEvent::for_record(r, state, attempt);
    e.ts = Utc.with_ymd_and_hms(2026, 11, 26, 10, 0, second).unwrap();
    e
}

async fn event_index(store: Store) {
    let r = record("shop", "+8613800000000");
    let events = vec![
        event(&r, State::Sent, 1, 2),
        event(&r, State::Accepted, 0, 0),
        event(&r, State::Sending, 1, 1),
    ];
    store.index_events(&events).await.unwrap();
    store.index_events(&events[..1]).await.unwrap();
    let trace = store.message_events("shop", &r.message_id).await.unwrap();
    let states: Vec<State> = trace.iter().map(|e| e.state).collect();
    assert_eq!(states, [State::Accepted, State::Sending, State::Sent]);
    assert!(
        store
            .message_events("bank", &r.message_id)
            .await
            .unwrap()
            .is_empty()
    );
    let known = store
        .known_events(&[
            (r.message_id, events[0].event_id.clone()),
            (r.message_id, "not-an-event".into()),
            (MessageId::new(), events[1].event_id.clone()),
        ])
        .await
        .unwrap();
    assert_eq!(known.len(), 1);
    assert!(known.contains(&events[0].event_id));
}

async fn vendor_tokens(store: Store) {
    assert_eq!(store.vendor_token("wechat:a").await.unwrap(), None);
    store.put_vendor_token("wechat:a", "t1", 100).await.unwrap();
    store.put_vendor_token("wechat:a", "t2", 200).await.unwrap();
    assert_eq!(
        store.vendor_token("wechat:a").await.unwrap(),
        Some(("t2".into(), 200))
    );
    // Dropping a token that was already replaced leaves the new one.
    store.drop_vendor_token("wechat:a", "t1").await.unwrap();
    assert!(store.vendor_token("wechat:a").await.unwrap().is_some());
    store.drop_vendor_token("wechat:a", "t2").await.unwrap();
    assert_eq!(store.vendor_token("wechat:a").await.unwrap(), None);
}

async fn vendor_messages_and_receipts(store: Store) {
    let (r1, r2) = (
        record("shop", "+8613800000001"),
        record("shop", "+8613800000002"),
    );
    let sent = |r: &MessageRecord| {
        let mut e = event(r, State::Sent, 1, 5);
        e.vendor = Some("aliyun".into());
        e.vendor_message_id = Some("biz-1".into());
        e
    };
    let mut unsent = event(&r1, State::SendFailed, 1, 5);
    unsent.vendor = Some("aliyun".into());
    let events = [sent(&r1), sent(&r2), unsent];
    store.record_vendor_messages(&events).await.unwrap();
    store.record_vendor_messages(&events).await.unwrap();

    let both = store
        .sent_by_vendor_id("aliyun", "biz-1", None)
        .await
        .unwrap();
    assert_eq!(both.len(), 2);
    let one = store
        .sent_by_vendor_id("aliyun", "biz-1", Some(&r2.receiver))
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].message_id, r2.message_id);

    let since = events[0].ts.timestamp_millis() - 1;
    assert_eq!(store.pending_receipts(5, since, 10).await.unwrap().len(), 2);
    assert_eq!(store.pending_receipts(6, since, 10).await.unwrap().len(), 0);

    let at = Utc.with_ymd_and_hms(2026, 11, 26, 10, 0, 9).unwrap();
    let receipt = |id: &str, receiver: Option<&str>| Receipt {
        vendor: "aliyun".into(),
        vendor_message_id: id.into(),
        receiver: receiver.map(str::to_string),
        delivered: true,
        error_code: None,
        error_detail: None,
        at,
    };
    let (delivered, unmatched) = store
        .receipt_events(&[receipt("biz-1", Some(&r1.receiver)), receipt("biz-9", None)])
        .await
        .unwrap();
    assert_eq!(unmatched.len(), 1);
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].state, State::Delivered);
    assert_eq!(delivered[0].latency_ms, Some(4000));
    store.mark_receipts(&delivered).await.unwrap();
    let pending = store.pending_receipts(5, since, 10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].receiver, r2.receiver);
}

async fn recall_finds_sent_messages_and_marks_them_once(store: Store) {
    // r1 and r2 shared one WeCom message; r3 is another template's; r4 another app's.
    let (r1, r2, mut r3, r4) = (
        record("shop", "zhangsan"),
        record("shop", "lisi"),
        record("shop", "wangwu"),
        record("bank", "zhaoliu"),
    );
    r3.template_id = 2;
    let sent = |r: &MessageRecord, id: &str, second: u32| {
        let mut e = event(r, State::Sent, 2, second);
        e.channel = Channel::WecomApp;
        e.vendor = Some("wecom".into());
        e.vendor_message_id = Some(id.into());
        e
    };
    let events = [
        sent(&r1, "msg-1", 5),
        sent(&r2, "msg-1", 5),
        sent(&r3, "msg-3", 6),
        sent(&r4, "msg-4", 7),
    ];
    store.record_vendor_messages(&events).await.unwrap();
    // A row written before the recall migration: no app, no template.
    let old = record("shop", "old-user");
    let old_sent = sent(&old, "msg-0", 1);
    sqlx::query(
        "INSERT INTO vendor_messages \
         (vendor, vendor_message_id, receiver, message_id, account_id, sent_at, event) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind("wecom")
    .bind("msg-0")
    .bind(&old.receiver)
    .bind(old.message_id.to_string())
    .bind(5_i64)
    .bind(old_sent.ts.timestamp_millis())
    .bind(serde_json::to_string(&old_sent).unwrap())
    .execute(&store.pool)
    .await
    .unwrap();

    let of_message = store.sent_events_of_message(&r1.message_id).await.unwrap();
    assert_eq!(of_message, [(events[0].clone(), None)]);
    let of_old = store.sent_events_of_message(&old.message_id).await.unwrap();
    assert_eq!(of_old, [(old_sent, None)]);
    assert!(
        store
            .sent_events_of_message(&MessageId::new())
            .await
            .unwrap()
            .is_empty()
    );

    let (since, until) = (
        events[0].ts.timestamp_millis() - 10_000,
        events[0].ts.timestamp_millis() + 10_000,
    );
    let of_template = store
        .sent_events_of_template("shop", 1, since, until, 10)
        .await
        .unwrap();
    let ids: Vec<MessageId> = of_template.iter().map(|e| e.message_id).collect();
    let mut expected = vec![r1.message_id, r2.message_id];
    expected.sort_by_key(|m| m.to_string());
    assert_eq!(
        ids, expected,
        "the old row has no template; r3 and r4 are not of it"
    );
    let one = store
        .sent_events_of_template("shop", 1, since, until, 1)
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    // `until` is exclusive, `since` inclusive.
    let at_sent = events[0].ts.timestamp_millis();
    for (s, u, n) in [(since, at_sent, 0), (at_sent, at_sent + 1, 2)] {
        let found = store
            .sent_events_of_template("shop", 1, s, u, 10)
            .await
            .unwrap();
        assert_eq!(found.len(), n);
    }
    assert_eq!(
        store
            .sent_events_of_template("bank", 1, since, until, 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // The wrong account marks nothing; the right one marks both receivers of msg-1, once.
    let at = Utc.with_ymd_and_hms(2026, 11, 26, 10, 5, 0).unwrap();
    assert!(
        store
            .mark_recalled("wecom", "msg-1", 6, at)
            .await
            .unwrap()
            .is_empty()
    );
    let mut recalled = store.mark_recalled("wecom", "msg-1", 5, at).await.unwrap();
    recalled.sort_by_key(|e| e.message_id.to_string());
    assert_eq!(recalled.len(), 2);
    for (e, m) in recalled.iter().zip(&expected) {
        assert_eq!(e.message_id, *m);
        assert_eq!(e.state, State::Recalled);
        assert_eq!(e.ts, at);
        assert_eq!(e.attempt, 2);
        assert_eq!(e.event_id, crate::wire::event_id(m, State::Recalled, 2));
        assert_eq!(e.vendor_message_id.as_deref(), Some("msg-1"));
        assert_eq!(e.app, "shop");
        assert_eq!(e.channel, Channel::WecomApp);
    }
    assert!(
        store
            .mark_recalled("wecom", "msg-1", 5, at)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.sent_events_of_message(&r2.message_id).await.unwrap()[0].1,
        Some(at.timestamp_millis())
    );
    assert!(
        store
            .sent_events_of_template("shop", 1, since, until, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .recalled_of_template("shop", 1, since, until)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        store
            .recalled_of_template("shop", 2, since, until)
            .await
            .unwrap(),
        0
    );
    // Rows from before the migration are still recalled by their vendor id.
    assert_eq!(
        store
            .mark_recalled("wecom", "msg-0", 5, at)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A full SQLite database (its page limit reached, as on a full disk) and a pool that cannot
/// connect are "unavailable" (answered `503`, retried), unlike a request the store refuses.
#[tokio::test]
async fn a_full_or_unreachable_store_is_unavailable() {
    let fresh = sqlite().await;
    let mut conn = fresh.store.pool.acquire().await.unwrap();
    let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    sqlx::query(&format!("PRAGMA max_page_count = {pages}"))
        .execute(&mut *conn)
        .await
        .unwrap();
    let full: StoreError = sqlx::query("INSERT INTO apps (name, created_at) VALUES ($1, 0)")
        .bind("x".repeat(64 * 1024))
        .execute(&mut *conn)
        .await
        .unwrap_err()
        .into();
    assert!(full.is_unavailable(), "{full}");
    let conflict: StoreError = fresh
        .store
        .create_app("a")
        .await
        .map(|_| ())
        .and(fresh.store.create_app("a").await.map(|_| ()))
        .unwrap_err();
    assert!(!conflict.is_unavailable(), "{conflict}");
    drop(conn);

    let unreachable = AnyPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_millis(500))
        .connect("postgres://postgres@127.0.0.1:1/none")
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(StoreError::from(unreachable).is_unavailable());
}

/// Commits do not checkpoint the WAL, and a steady writer never lets it start again from its
/// beginning by itself (it does only when a write begins after a complete checkpoint): the
/// store's checkpointer must. 256 MB written in 100-row transactions, with a read after each as
/// in a running herald, leave the WAL near its 64 MiB restart mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_bounded_under_a_steady_writer() {
    let fresh = sqlite().await;
    let store = &fresh.store;
    let wal = fresh._dir.as_ref().unwrap().path().join("herald.db-wal");
    sqlx::query("CREATE TABLE filler (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        .execute(&store.writer)
        .await
        .unwrap();
    let page = vec![7u8; 4000];
    let mut largest = 0;
    for round in 0..640_i64 {
        let mut tx = store.writer.begin().await.unwrap();
        for i in 0..100 {
            sqlx::query("INSERT INTO filler (id, data) VALUES ($1, $2)")
                .bind(round * 100 + i)
                .bind(&page)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        let _: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM apps")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    }
    assert!(largest > 0, "no WAL file at {}", wal.display());
    assert!(largest < 160 << 20, "the WAL grew to {largest} bytes");
}

#[test]
fn sqlite_statements_with_ordered_parameters_bind_anonymously() {
    let sql = |s: &str| bindable(Backend::Sqlite, s.to_string());
    assert_eq!(
        sql("INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4) ON CONFLICT DO NOTHING"),
        "INSERT INTO t (a, b) VALUES (?, ?), (?, ?) ON CONFLICT DO NOTHING"
    );
    assert_eq!(
        sql("DELETE FROM t WHERE id IN ($1, $2, $3)"),
        "DELETE FROM t WHERE id IN (?, ?, ?)"
    );
    // Out of order, used twice, or not numbered: left for sqlx to bind by name.
    for kept in [
        "UPDATE t SET a = $2 WHERE b = $1",
        "UPDATE t SET a = $1 WHERE a < $1",
        "SELECT $ FROM t",
        "SELECT $1, $3",
    ] {
        assert_eq!(sql(kept), kept);
    }
    assert_eq!(
        bindable(Backend::Postgres, "SELECT $1, $2".into()),
        "SELECT $1, $2"
    );
}

//! Checks that a change of an app and its audit entry are stored together or not at all. Run on
//! both backends by the parent module.

use super::*;
use crate::policy::AppPolicy;

/// Everything the audited changes of `app` touch.
#[derive(Debug, PartialEq)]
struct Snapshot {
    accounts: Vec<Account>,
    templates: Vec<Template>,
    keys: Vec<ApiKey>,
    policy_version: i64,
    blocked: Vec<String>,
}

async fn snapshot(store: &Store, app: i64) -> Snapshot {
    Snapshot {
        accounts: store.accounts(app).await.unwrap(),
        templates: store.templates(app, 0, 100).await.unwrap(),
        keys: store.keys(app).await.unwrap(),
        policy_version: store.app_policy(app).await.unwrap().1,
        blocked: store
            .list_page(app, Channel::Sms, ListName::Block, "", 100)
            .await
            .unwrap(),
    }
}

fn entry(action: &'static str, target: String) -> Audit {
    Audit::new("k1", action, target, json!({"n": 1}))
}

pub(super) async fn changes_and_their_audit_entries_commit_together(store: Store) {
    let (app, _) = store.create_app("shop").await.unwrap();
    let a = app.id;
    let config = json!({"url": "https://example.com/hook"});
    let t = NewTemplate {
        name: "welcome".into(),
        channel: Channel::Webhook,
        msg_type: MsgType::Notice,
        account_id: None,
        content: json!({"body": "hi"}),
    };
    let new_key = NewKey {
        name: "sender".into(),
        scopes: Scopes::of(&[Scope::Send]),
        expires_at: None,
    };
    let receivers = ["a", "b"].map(String::from);

    // Each change makes exactly its entry, built from what it stored.
    let account = store
        .create_account(a, "hook", Channel::Webhook, &config, |x| {
            entry("account.create", format!("account:{}", x.id))
        })
        .await
        .unwrap();
    let template = store
        .create_template(a, &t, |x| {
            entry("template.create", format!("template:{}", x.id))
        })
        .await
        .unwrap();
    let doomed = store
        .create_template(a, &t, |x| {
            entry("template.create", format!("template:{}", x.id))
        })
        .await
        .unwrap();
    store
        .update_template(a, template.id, &t, |x| {
            entry(
                "template.update",
                format!("template:{}/{}", x.id, x.version),
            )
        })
        .await
        .unwrap();
    let target = format!("template:{}", doomed.id);
    store
        .delete_template(a, doomed.id, entry("template.delete", target))
        .await
        .unwrap();
    let (key, _) = store
        .create_key(a, &new_key, |x| {
            entry("key.create", format!("key:{}", x.key_id))
        })
        .await
        .unwrap();
    let (rotated, _, _) = store
        .rotate_key(a, &key.key_id, i64::MAX, |new, old| {
            entry("key.rotate", format!("key:{}>{}", old.key_id, new.key_id))
        })
        .await
        .unwrap();
    store
        .revoke_key(a, &key.key_id, |x| {
            entry("key.revoke", format!("key:{}", x.key_id))
        })
        .await
        .unwrap();
    store
        .put_app_policy(a, &AppPolicy::default(), |v| {
            entry("policy.put", format!("policy/{v}"))
        })
        .await
        .unwrap();
    store
        .add_to_list(a, Channel::Sms, ListName::Block, &receivers, |n| {
            entry("list.add", format!("added {n}"))
        })
        .await
        .unwrap();
    store
        .remove_from_list(a, Channel::Sms, ListName::Block, &receivers[..1], |n| {
            entry("list.remove", format!("removed {n}"))
        })
        .await
        .unwrap();
    let log = store.audit_log(a, None, 100).await.unwrap();
    let mut written: Vec<(String, String)> = log
        .iter()
        .map(|e| (e.action.clone(), e.target.clone()))
        .collect();
    written.reverse();
    let want = [
        ("app.create", format!("app:{a}")),
        ("account.create", format!("account:{}", account.id)),
        ("template.create", format!("template:{}", template.id)),
        ("template.create", format!("template:{}", doomed.id)),
        ("template.update", format!("template:{}/2", template.id)),
        ("template.delete", format!("template:{}", doomed.id)),
        ("key.create", format!("key:{}", key.key_id)),
        (
            "key.rotate",
            format!("key:{}>{}", key.key_id, rotated.key_id),
        ),
        ("key.revoke", format!("key:{}", key.key_id)),
        ("policy.put", "policy/1".to_string()),
        ("list.add", "added 2".to_string()),
        ("list.remove", "removed 1".to_string()),
    ]
    .map(|(action, target)| (action.to_string(), target));
    assert_eq!(written, want);
    // The app's own creation comes first, by the command line, naming its first key.
    let (created, changes) = log.split_last().unwrap();
    assert_eq!(created.actor, "cli");
    assert_eq!(created.detail["name"], "shop");
    let keys = store.keys(a).await.unwrap();
    let initial = keys.iter().find(|k| k.name == "initial").unwrap();
    assert_eq!(created.detail["key"], json!(initial.key_id));
    assert!(
        changes
            .iter()
            .all(|e| e.actor == "k1" && e.detail == json!({"n": 1}))
    );

    // With the audit log out of reach, every change fails and leaves nothing behind.
    let before = snapshot(&store, a).await;
    sqlx::query("ALTER TABLE audit_log RENAME TO audit_log_away")
        .execute(&store.pool)
        .await
        .unwrap();
    let t2 = NewTemplate {
        name: "changed".into(),
        ..t.clone()
    };
    let refused = [
        store
            .create_account(a, "hook-2", Channel::Webhook, &config, |_| noted())
            .await
            .map(drop),
        store.create_template(a, &t, |_| noted()).await.map(drop),
        store
            .update_template(a, template.id, &t2, |_| noted())
            .await
            .map(drop),
        store.delete_template(a, template.id, noted()).await,
        store.create_key(a, &new_key, |_| noted()).await.map(drop),
        store
            .rotate_key(a, &rotated.key_id, 1, |_, _| noted())
            .await
            .map(drop),
        store
            .revoke_key(a, &rotated.key_id, |_| noted())
            .await
            .map(drop),
        store
            .put_app_policy(a, &AppPolicy::default(), |_| noted())
            .await
            .map(drop),
        store
            .add_to_list(a, Channel::Sms, ListName::Block, &receivers, |_| noted())
            .await
            .map(drop),
        store
            .remove_from_list(a, Channel::Sms, ListName::Block, &receivers, |_| noted())
            .await
            .map(drop),
    ];
    for (i, outcome) in refused.iter().enumerate() {
        assert!(
            matches!(outcome, Err(StoreError::Db(_))),
            "change {i}: {outcome:?}"
        );
    }
    // A receiver's own unsubscribe is not an app's change: it needs no entry.
    store.unsubscribe(a, Channel::Sms, "c").await.unwrap();
    sqlx::query("ALTER TABLE audit_log_away RENAME TO audit_log")
        .execute(&store.pool)
        .await
        .unwrap();
    assert_eq!(snapshot(&store, a).await, before);
    assert_eq!(store.audit_log(a, None, 100).await.unwrap(), log);
    let unsubscribed = store
        .list_page(a, Channel::Sms, ListName::Unsubscribed, "", 10)
        .await
        .unwrap();
    assert_eq!(unsubscribed, ["c"]);
}

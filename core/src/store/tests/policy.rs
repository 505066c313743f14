//! Checks of the policy state: documents, receiver lists, claims with dedup and caps, and the
//! schedule. Run on both backends by the parent module.

use super::*;
use crate::policy::AppPolicy;
use sqlx::Row;
use std::collections::HashSet;

fn claim(id: MessageId, state: LedgerState, limits: Vec<Limit>) -> MessageClaim {
    MessageClaim {
        message_id: id,
        from: None,
        state,
        attempt: 1,
        schedule: None,
        limits,
    }
}

fn cap(scope: i64, max: u32) -> Limit {
    Limit::Frequency {
        scope,
        window_start: 1_000,
        max,
        expires_at: now_ms() + 60_000,
    }
}

fn content(key: i64, expires_at: i64) -> Limit {
    Limit::Content { key, expires_at }
}

pub(super) async fn policy_documents_and_lists(store: Store) {
    let (app, _) = store.create_app("shop").await.unwrap();
    assert_eq!(
        store.app_policy(app.id).await.unwrap(),
        (AppPolicy::default(), 0)
    );
    let doc: AppPolicy = serde_json::from_value(json!({"content_dedup_secs": 60})).unwrap();
    for version in [1, 2] {
        let put = store.put_app_policy(app.id, &doc, |_| noted());
        assert_eq!(put.await.unwrap(), version);
    }
    assert_eq!(store.app_policy(app.id).await.unwrap(), (doc.clone(), 2));

    let receivers: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    for (list, rs, added) in [
        (ListName::Block, &receivers[..], 3),
        (ListName::Block, &receivers[..1], 0),
        (ListName::Allow, &receivers[2..], 1),
    ] {
        let n = store
            .add_to_list(app.id, Channel::Sms, list, rs, |_| noted())
            .await
            .unwrap();
        assert_eq!(n, added, "{list:?}");
    }
    let page = store
        .list_page(app.id, Channel::Sms, ListName::Block, "a", 10)
        .await
        .unwrap();
    assert_eq!(page, ["b", "c"]);
    assert_eq!(
        store
            .remove_from_list(
                app.id,
                Channel::Sms,
                ListName::Block,
                &receivers[1..2],
                |_| noted()
            )
            .await
            .unwrap(),
        1
    );
    let seen = store
        .list_memberships("shop", &["a", "b", "c", "z"])
        .await
        .unwrap();
    let want: HashSet<(Channel, ListName, String)> = [
        (Channel::Sms, ListName::Block, "a".to_string()),
        (Channel::Sms, ListName::Block, "c".to_string()),
        (Channel::Sms, ListName::Allow, "c".to_string()),
    ]
    .into();
    assert_eq!(seen, want);
    assert!(
        store
            .list_memberships("bank", &["a"])
            .await
            .unwrap()
            .is_empty()
    );
    let (policy, allowlisted) = store.app_policy_by_name("shop").await.unwrap();
    assert_eq!(policy, doc);
    assert_eq!(allowlisted, [Channel::Sms].into());
}

pub(super) async fn claims_pass_limits_once(store: Store) {
    let ids: Vec<MessageId> = (0..6).map(|_| MessageId::new()).collect();
    let far = now_ms() + 60_000;
    let outcome = store
        .claim_messages(&[
            claim(
                ids[0],
                LedgerState::Sending,
                vec![content(1, far), cap(11, 2)],
            ),
            // Same content in the same batch: a duplicate.
            claim(
                ids[1],
                LedgerState::Sending,
                vec![content(1, far), cap(11, 2)],
            ),
            claim(
                ids[2],
                LedgerState::Sending,
                vec![content(2, far), cap(11, 2)],
            ),
            // Over the cap; its content key is given back.
            claim(
                ids[3],
                LedgerState::Sending,
                vec![content(3, far), cap(11, 2)],
            ),
            claim(ids[4], LedgerState::Blocked, vec![]),
        ])
        .await
        .unwrap();
    assert_eq!(
        outcome,
        [
            ClaimOutcome::Claimed(LedgerState::Sending),
            ClaimOutcome::Claimed(LedgerState::DedupContent),
            ClaimOutcome::Claimed(LedgerState::Sending),
            ClaimOutcome::Claimed(LedgerState::DedupFrequency),
            ClaimOutcome::Claimed(LedgerState::Blocked),
        ]
    );
    let states = store.ledger_states(&ids).await.unwrap();
    assert_eq!(states[&ids[1]], (LedgerState::DedupContent, 1, None));
    assert_eq!(states[&ids[3]], (LedgerState::DedupFrequency, 1, None));
    assert_eq!(states[&ids[4]], (LedgerState::Blocked, 1, None));

    // Claiming again (a redelivered batch) loses, and counts nothing.
    let again = store
        .claim_messages(&[claim(ids[0], LedgerState::Sending, vec![cap(11, 3)])])
        .await
        .unwrap();
    assert_eq!(again, [ClaimOutcome::Lost]);
    // The cap holds 2, the failed claim's key k3 is free, and the count of the cap is 2: a
    // cap of 3 admits exactly one more.
    let more = store
        .claim_messages(&[
            claim(
                ids[5],
                LedgerState::Sending,
                vec![content(3, far), cap(11, 3)],
            ),
            claim(MessageId::new(), LedgerState::Sending, vec![cap(11, 3)]),
        ])
        .await
        .unwrap();
    assert_eq!(
        more,
        [
            ClaimOutcome::Claimed(LedgerState::Sending),
            ClaimOutcome::Claimed(LedgerState::DedupFrequency),
        ]
    );
    // An expired content key is taken over; pruning removes what has expired.
    let past = now_ms() - 1;
    let expired = [claim(
        MessageId::new(),
        LedgerState::Sending,
        vec![content(21, past)],
    )];
    store.claim_messages(&expired).await.unwrap();
    let later = [claim(
        MessageId::new(),
        LedgerState::Sending,
        vec![content(21, far)],
    )];
    assert_eq!(
        store.claim_messages(&later).await.unwrap(),
        [ClaimOutcome::Claimed(LedgerState::Sending)]
    );
    let gone = [claim(
        MessageId::new(),
        LedgerState::Sending,
        vec![content(22, past)],
    )];
    store.claim_messages(&gone).await.unwrap();
    assert_eq!(store.prune_limits().await.unwrap(), 1);
}

pub(super) async fn concurrent_claims_respect_a_cap(store: Store) {
    // 16 workers race to send one message each to one receiver with a cap of 5.
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let c = claim(MessageId::new(), LedgerState::Sending, vec![cap(31, 5)]);
                store.claim_messages(&[c]).await.unwrap()[0]
            })
        })
        .collect();
    let mut sent = 0;
    for t in tasks {
        if t.await.unwrap() == ClaimOutcome::Claimed(LedgerState::Sending) {
            sent += 1;
        }
    }
    assert_eq!(sent, 5);
}

pub(super) async fn schedule_lease_release_and_cancel(store: Store) {
    let r = record("shop", "+8613800000000");
    let due = Utc::now() + chrono::Duration::seconds(30);
    let entry = ScheduledMessage {
        message_id: r.message_id,
        app: "shop".into(),
        due_at: due,
        kind: ScheduleKind::Scheduled,
        record: serde_json::to_string(&r).unwrap(),
        lease: 0,
    };
    let mut c = claim(r.message_id, LedgerState::Scheduled, vec![]);
    c.schedule = Some(entry.clone());
    assert_eq!(
        store.claim_messages(&[c.clone()]).await.unwrap(),
        [ClaimOutcome::Claimed(LedgerState::Scheduled)]
    );
    let lease = Utc::now() + chrono::Duration::seconds(60);
    assert!(
        store
            .claim_due(Utc::now(), lease, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let taken = store.claim_due(due, lease, 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].record, entry.record);
    assert_eq!(taken[0].lease, lease.timestamp_millis());
    // Leased: nobody else takes it.
    assert!(store.claim_due(due, lease, 10).await.unwrap().is_empty());

    // Scheduled again while leased (a redelivery): the release must not delete it.
    let mut again = c.clone();
    again.from = Some(LedgerState::Scheduled);
    store.claim_messages(&[again]).await.unwrap();
    store.release_scheduled(&taken).await.unwrap();
    let retaken = store.claim_due(due, lease, 10).await.unwrap();
    assert_eq!(retaken.len(), 1);
    store.release_scheduled(&retaken).await.unwrap();
    assert!(
        store
            .claim_due(due, lease + chrono::Duration::hours(1), 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Cancel: only the app's own waiting message, once.
    let w = record("shop", "+8613800000001");
    let mut c = claim(w.message_id, LedgerState::Scheduled, vec![]);
    c.schedule = Some(ScheduledMessage {
        message_id: w.message_id,
        record: serde_json::to_string(&w).unwrap(),
        ..entry.clone()
    });
    store.claim_messages(&[c]).await.unwrap();
    assert!(matches!(
        store.cancel_scheduled("bank", w.message_id).await,
        Err(StoreError::NotFound)
    ));
    let gone = store.cancel_scheduled("shop", w.message_id).await.unwrap();
    assert_eq!(gone.message_id, w.message_id);
    assert_eq!(
        store.ledger_states(&[w.message_id]).await.unwrap()[&w.message_id].0,
        LedgerState::Cancelled
    );
    assert!(matches!(
        store.cancel_scheduled("shop", w.message_id).await,
        Err(StoreError::NotFound)
    ));
    // Released and moved on by a worker before its entry went: too late to cancel, and the
    // refused cancel changes nothing.
    let x = record("shop", "+8613800000002");
    let mut c = claim(x.message_id, LedgerState::Scheduled, vec![]);
    c.schedule = Some(ScheduledMessage {
        message_id: x.message_id,
        record: serde_json::to_string(&x).unwrap(),
        ..entry.clone()
    });
    store.claim_messages(&[c]).await.unwrap();
    let moved = MessageClaim {
        from: Some(LedgerState::Scheduled),
        ..claim(x.message_id, LedgerState::Sending, vec![])
    };
    assert_eq!(
        store
            .claim_messages(std::slice::from_ref(&moved))
            .await
            .unwrap(),
        [ClaimOutcome::Claimed(LedgerState::Sending)]
    );
    assert!(matches!(
        store.cancel_scheduled("shop", x.message_id).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.ledger_states(&[x.message_id]).await.unwrap()[&x.message_id].0,
        LedgerState::Sending
    );
    // A second worker moving it too loses.
    assert_eq!(
        store.claim_messages(&[moved]).await.unwrap(),
        [ClaimOutcome::Lost]
    );
}

/// Sixteen concurrent reservations on one account's timeline get disjoint slots that tile it
/// exactly; a lane that may not wait that far is refused without taking anything.
pub async fn rate_reservations_tile_the_timeline(store: Store) {
    let now = 1_000_000_000i64;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.reserve_rate(7, 5, 1_000, now, 1_000_000, 0).await })
        })
        .collect();
    let mut starts = Vec::new();
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Reservation::Granted { first_us } => starts.push(first_us),
            busy => panic!("{busy:?}"),
        }
    }
    starts.sort_unstable();
    let want: Vec<i64> = (0..16).map(|k| now + k * 5_000).collect();
    assert_eq!(starts, want, "each reservation starts where the last ended");
    // Reserved up to now + 80 ms: a lane allowing 50 ms is refused and sees the end.
    assert_eq!(
        store
            .reserve_rate(7, 1, 1_000, now, 50_000, 0)
            .await
            .unwrap(),
        Reservation::Busy {
            next_us: now + 80_000
        }
    );
    // Much later, idle time is not given back beyond the burst allowance.
    let later = now + 10_000_000;
    assert_eq!(
        store
            .reserve_rate(7, 2, 1_000, later, 0, 100_000)
            .await
            .unwrap(),
        Reservation::Granted {
            first_us: later - 100_000
        }
    );
    // Accounts are independent.
    assert_eq!(
        store.reserve_rate(8, 1, 1_000, now, 0, 0).await.unwrap(),
        Reservation::Granted { first_us: now }
    );
}

/// A batch's receiver slots, taken in one transaction: each timeline starts with its burst,
/// one timeline's slots go in the order asked, a timeline without a free slot answers when it
/// has one, and the answers come in the order asked.
pub(super) async fn receiver_slots_are_taken_together_in_order(store: Store) {
    let now = 1_000_000_000i64;
    // One message per millisecond after a burst of one more.
    let slot = |key| ReceiverSlot {
        key,
        interval_us: 1_000,
        burst_us: 1_000,
    };
    let answers = store
        .reserve_receiver_slots(&[slot(9), slot(4), slot(9), slot(9)], now)
        .await
        .unwrap();
    assert_eq!(
        answers,
        [
            Reservation::Granted {
                first_us: now - 1_000
            },
            Reservation::Granted {
                first_us: now - 1_000
            },
            Reservation::Granted { first_us: now },
            Reservation::Busy {
                next_us: now + 1_000
            },
        ]
    );
    // A millisecond later the busy timeline has its next slot, the other its burst back.
    let later = now + 1_000;
    assert_eq!(
        store
            .reserve_receiver_slots(&[slot(9), slot(4), slot(4)], later)
            .await
            .unwrap(),
        [
            Reservation::Granted { first_us: later },
            Reservation::Granted { first_us: now },
            Reservation::Granted { first_us: later },
        ]
    );
    assert!(
        store
            .reserve_receiver_slots(&[], now)
            .await
            .unwrap()
            .is_empty()
    );
}

pub(super) async fn in_flight_guards_renew_and_end(store: Store) {
    let now = Utc::now();
    let entry = |r: &MessageRecord, kind| {
        ScheduledMessage::of(r, kind, now + chrono::Duration::seconds(30))
    };
    let (a, b) = (
        record("shop", "+8613800000001"),
        record("shop", "+8613800000002"),
    );
    let guards = [
        entry(&a, ScheduleKind::InFlight),
        entry(&b, ScheduleKind::InFlight),
    ];
    store.guard_in_flight(&guards).await.unwrap();
    let c = record("shop", "+8613800000003");
    let ids = [a.message_id, b.message_id, c.message_id];
    let live = store.guarded_in_flight(&ids).await.unwrap();
    assert_eq!(live, [a.message_id, b.message_id].into_iter().collect());
    let lease = now + chrono::Duration::seconds(60);
    assert!(store.claim_due(now, lease, 10).await.unwrap().is_empty());
    let waiting = store.waiting("shop").await.unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!((waiting[0].0, waiting[0].1), (ScheduleKind::InFlight, 2));

    // Renewed into the past: a scheduler releases them (their worker is gone).
    let past = now - chrono::Duration::seconds(1);
    store
        .renew_in_flight(&[a.message_id, b.message_id], past)
        .await
        .unwrap();
    // Due guards no longer hold back a copy of their message.
    assert!(store.guarded_in_flight(&ids).await.unwrap().is_empty());
    let due = store.claim_due(now, lease, 10).await.unwrap();
    assert_eq!(due.len(), 2);
    assert!(due.iter().all(|e| e.kind == ScheduleKind::InFlight));
    store.release_scheduled(&due).await.unwrap();

    // Guarded again; `b`'s call asks for a long retry, which replaces its guard and outlives
    // the end of the guards.
    store.guard_in_flight(&guards).await.unwrap();
    store
        .defer_retries(&[(entry(&b, ScheduleKind::Retry), 2)])
        .await
        .unwrap();
    store
        .end_in_flight(&[a.message_id, b.message_id])
        .await
        .unwrap();
    let waiting = store.waiting("shop").await.unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!((waiting[0].0, waiting[0].1), (ScheduleKind::Retry, 1));
}

/// `waiting` (the app stats' schedule counts) reads the app's entries from `schedule_by_app`,
/// not a scan of every app's schedule. PostgreSQL plans a scan of a table this small anyway, so
/// there sequential scans are switched off for the question.
pub(super) async fn the_apps_schedule_count_reads_its_index(store: Store) {
    let mut tx = store.pool.begin().await.unwrap();
    let explain = match store.backend {
        Backend::Sqlite => "EXPLAIN QUERY PLAN",
        Backend::Postgres => {
            sqlx::query("SET LOCAL enable_seqscan = off")
                .execute(&mut *tx)
                .await
                .unwrap();
            "EXPLAIN"
        }
    };
    let query = format!("{explain} {}", crate::store::policy::WAITING_QUERY);
    let plan: Vec<String> = sqlx::query(&query)
        .bind("shop")
        .fetch_all(&mut *tx)
        .await
        .unwrap()
        .iter()
        .map(|row| row.get::<String, _>(row.len() - 1))
        .collect();
    assert!(
        plan.iter().any(|line| line.contains("schedule_by_app")),
        "{plan:?}"
    );
}

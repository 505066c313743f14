//! `message_states`: written with the event index, read by the tracing endpoints.

use super::*;

/// `hours` after the start of 2026-11-26 (UTC).
fn hour(hours: i64) -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 26, 0, 0, 0).unwrap() + chrono::Duration::hours(hours)
}

/// The event of `r` in `state` at `minutes` past 10:00 on 2026-11-26.
fn at(r: &MessageRecord, state: State, attempt: u32, minutes: i64) -> DeliveryEvent {
    let mut e = DeliveryEvent::for_record(r, state, attempt);
    e.ts = hour(10) + chrono::Duration::minutes(minutes);
    e
}

pub(super) async fn message_states_for_tracing(store: Store) {
    let mut sent = record("shop", "+8613800000001");
    sent.biz_id = Some("order-1".into());
    let failed = record("shop", "+8613800000001");
    let mut other_template = record("shop", "+8613800000001");
    other_template.template_id = 2;
    let bank = record("bank", "+8613800000001");
    let tomorrow = record("shop", "+8613800000001");
    // Out of order and in pieces, as the sink may see them after a crash: the latest event in
    // the trace's order sets the state, the earliest the acceptance time.
    store
        .index_events(&[
            at(&sent, State::Sent, 1, 2),
            at(&sent, State::Sending, 1, 2),
        ])
        .await
        .unwrap();
    store
        .index_events(&[
            at(&sent, State::Accepted, 1, 0),
            at(&sent, State::Sending, 1, 2),
            at(&failed, State::Accepted, 1, 5),
            at(&failed, State::Sending, 1, 5),
            at(&failed, State::Retrying, 1, 6),
            at(&failed, State::Sending, 2, 7),
            at(&failed, State::SendFailed, 2, 7),
            at(&other_template, State::Accepted, 1, 1),
            at(&bank, State::Accepted, 1, 1),
            at(&tomorrow, State::Accepted, 1, 24 * 60),
        ])
        .await
        .unwrap();

    let page = |from, to, before, limit| {
        let store = store.clone();
        async move {
            store
                .receiver_messages("shop", "+8613800000001", from, to, before, limit)
                .await
                .unwrap()
        }
    };
    let day = page(hour(0), hour(24), None, 10).await;
    let ids: Vec<MessageId> = day.iter().map(|m| m.message_id).collect();
    assert_eq!(
        ids,
        [
            failed.message_id,
            other_template.message_id,
            sent.message_id
        ]
    );
    let first = &day[2];
    assert_eq!(first.state, State::Sent);
    assert_eq!(first.accepted_at, hour(10));
    assert_eq!(first.updated_at, hour(10) + chrono::Duration::minutes(2));
    assert_eq!(first.biz_id.as_deref(), Some("order-1"));
    assert_eq!((first.channel, first.template_id), (Channel::Sms, 1));
    assert_eq!(day[0].state, State::SendFailed);
    // Pages of one, each after the previous page's last.
    let one = page(hour(0), hour(24), None, 1).await;
    assert_eq!(one[0].message_id, failed.message_id);
    let next = page(
        hour(0),
        hour(24),
        Some((one[0].accepted_at, one[0].message_id)),
        2,
    )
    .await;
    assert_eq!(next, day[1..]);
    // The range is [from, to) of acceptance times; another app's messages never show.
    assert!(page(hour(0), hour(10), None, 10).await.is_empty());
    assert_eq!(page(hour(10), hour(48), None, 10).await.len(), 4);
    let banks = store
        .receiver_messages("bank", "+8613800000001", hour(0), hour(24), None, 10)
        .await
        .unwrap();
    assert_eq!(banks.len(), 1);
    assert_eq!(banks[0].message_id, bank.message_id);

    let stats = store
        .template_states("shop", 1, hour(0), hour(24))
        .await
        .unwrap();
    assert_eq!(stats.messages, 2);
    assert_eq!(stats.current, [(State::Sent, 1), (State::SendFailed, 1)]);
    assert_eq!(
        stats.reached,
        [
            (State::Accepted, 2),
            (State::Sending, 2),
            (State::Sent, 1),
            (State::SendFailed, 1),
            (State::Retrying, 1),
        ]
    );
    let banks = store
        .template_states("bank", 1, hour(0), hour(24))
        .await
        .unwrap();
    assert_eq!(banks.current, [(State::Accepted, 1)]);
    assert_eq!(
        store
            .template_states("shop", 1, hour(24), hour(48))
            .await
            .unwrap()
            .current,
        [(State::Accepted, 1)]
    );
}

pub(super) async fn retention_forgets_old_messages_only(store: Store) {
    let old = record("shop", "+8613800000001");
    let also_old = record("shop", "+8613800000002");
    let new = record("shop", "+8613800000001");
    let mut sent = at(&old, State::Sent, 1, 2);
    sent.vendor = Some("tencent".into());
    sent.vendor_message_id = Some("v-1".into());
    store
        .index_events(&[
            at(&old, State::Accepted, 1, 0),
            sent.clone(),
            at(&also_old, State::Accepted, 1, 5),
            // Accepted the same day but delivered the next: its latest state is recent.
            at(&new, State::Accepted, 1, 0),
            at(&new, State::Delivered, 1, 24 * 60),
        ])
        .await
        .unwrap();
    store.record_vendor_messages(&[sent]).await.unwrap();
    let count = |table: &'static str, id: MessageId| {
        let store = store.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!(
                "SELECT count(*) FROM {table} WHERE message_id = $1"
            ))
            .bind(id.to_string())
            .fetch_one(&store.pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(count("vendor_messages", old.message_id).await, 1);

    let cutoff = hour(24).timestamp_micros();
    // In batches: one, then the rest, then nothing.
    assert_eq!(store.prune_index(cutoff, 1).await.unwrap(), 1);
    assert_eq!(store.prune_index(cutoff, 100).await.unwrap(), 1);
    assert_eq!(store.prune_index(cutoff, 100).await.unwrap(), 0);
    for id in [old.message_id, also_old.message_id] {
        for table in ["message_events", "message_states", "vendor_messages"] {
            assert_eq!(count(table, id).await, 0, "{table}");
        }
    }
    assert_eq!(count("message_events", new.message_id).await, 2);
    assert_eq!(
        store
            .message_events("shop", &new.message_id)
            .await
            .unwrap()
            .len(),
        2
    );
}

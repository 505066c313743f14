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

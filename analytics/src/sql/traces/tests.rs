use super::*;
use crate::privacy::ReceiverPrivacy;
use crate::testing::{TestWarehouse, blocking, sample_events, t0, write_events};
use chrono::Duration as Span;
use herald_core::wire::event_id;

/// A time-ordered message id made at `t`, as ingest makes them.
fn id_at(t: DateTime<Utc>, n: u16) -> MessageId {
    let stamp = uuid::Timestamp::from_unix(uuid::NoContext, t.timestamp() as u64, n.into());
    MessageId(uuid::Uuid::new_v7(stamp))
}

/// One message of `app` to `receiver` of template 5: an event per `(state, attempt, seconds
/// after acceptance)`, the first being its acceptance at `accepted`.
fn message(
    app: &str,
    receiver: &str,
    id: MessageId,
    accepted: DateTime<Utc>,
    events: &[(State, u32, i64)],
) -> Vec<DeliveryEvent> {
    let template = sample_events(1, 0).remove(0);
    events
        .iter()
        .map(|&(state, attempt, after)| DeliveryEvent {
            event_id: event_id(&id, state, attempt),
            ts: accepted + Span::seconds(after),
            message_id: id,
            app: app.into(),
            receiver: receiver.into(),
            template_id: 5,
            state,
            attempt,
            ..template.clone()
        })
        .collect()
}

use State::{Accepted, Delivered, Received, Retrying, SendFailed, Sending, Sent};

/// Alice's messages of app `shop` (newest first as the endpoint lists them, with the state and
/// update time it shows), and others' that must not appear.
struct Fixture {
    alice: Vec<(MessageId, State, DateTime<Utc>, DateTime<Utc>)>,
    events: Vec<DeliveryEvent>,
}

fn fixture() -> Fixture {
    let day = t0();
    let (a, b, b2, c) = (
        id_at(day, 1),
        id_at(day + Span::hours(1), 2),
        id_at(day + Span::hours(1), 3),
        id_at(day + Span::days(1), 4),
    );
    let mut events = Vec::new();
    // Sent, and delivered two days later (a receipt in a later partition).
    events.extend(message(
        "shop",
        "alice",
        a,
        day,
        &[
            (Accepted, 1, 0),
            (Received, 1, 1),
            (Sending, 1, 2),
            (Sent, 1, 3),
            (Delivered, 1, 172_800),
        ],
    ));
    // Two accepted at the same microsecond: the id orders them. The first is retried and sent;
    // the second's `sending` and `sent` share a time and attempt, and the pipeline order
    // makes `sent` the later.
    let at = day + Span::hours(1);
    events.extend(message(
        "shop",
        "alice",
        b,
        at,
        &[
            (Accepted, 1, 0),
            (Sending, 1, 1),
            (Retrying, 1, 2),
            (Sending, 2, 60),
            (Sent, 2, 61),
        ],
    ));
    events.extend(message(
        "shop",
        "alice",
        b2,
        at,
        &[(Accepted, 1, 0), (Sent, 1, 5), (Sending, 1, 5)],
    ));
    events.extend(message(
        "shop",
        "alice",
        c,
        day + Span::days(1),
        &[(Accepted, 1, 0), (SendFailed, 3, 9)],
    ));
    // Not alice's, or not this app's.
    events.extend(message(
        "shop",
        "bob",
        id_at(day, 5),
        day,
        &[(Accepted, 1, 0)],
    ));
    events.extend(message(
        "bank",
        "alice",
        id_at(day, 6),
        day,
        &[(Accepted, 1, 0)],
    ));
    let (b_first, b_second) = if b > b2 { (b, b2) } else { (b2, b) };
    let state_of = |id| {
        if id == b {
            (Sent, at + Span::seconds(61))
        } else {
            (Sent, at + Span::seconds(5))
        }
    };
    let alice = vec![
        (
            c,
            SendFailed,
            day + Span::days(1),
            day + Span::days(1) + Span::seconds(9),
        ),
        (b_first, state_of(b_first).0, at, state_of(b_first).1),
        (b_second, state_of(b_second).0, at, state_of(b_second).1),
        (a, Delivered, day, day + Span::seconds(172_800)),
    ];
    Fixture { alice, events }
}

/// The (id, state, accepted, updated) of each listed message.
fn listed(messages: &[MessageSummary]) -> Vec<(MessageId, State, DateTime<Utc>, DateTime<Utc>)> {
    messages
        .iter()
        .map(|m| (m.message_id, m.state, m.accepted_at, m.updated_at))
        .collect()
}

async fn written(wh: &Warehouse, events: Vec<DeliveryEvent>) {
    blocking(wh, move |w| write_events(w, &events)).await;
}

#[tokio::test]
async fn a_receivers_messages_are_listed_newest_first_with_their_latest_state() {
    let wh = TestWarehouse::local();
    let f = fixture();
    written(&wh.wh, f.events).await;
    let all = (DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC);
    let list =
        |range, before, limit| receiver_messages(&wh.wh, "shop", "alice", range, before, limit);

    let found = list(all, None, 20).await.unwrap();
    assert_eq!(listed(&found), f.alice);
    let first = &found[0];
    assert_eq!((first.template_id, first.receiver.as_str()), (5, "alice"));
    // Pages of two, continued after the last message of the page before.
    let one = list(all, None, 2).await.unwrap();
    assert_eq!(listed(&one), f.alice[..2]);
    let after = Some((one[1].accepted_at, one[1].message_id));
    assert_eq!(listed(&list(all, after, 2).await.unwrap()), f.alice[2..]);
    // `[from, to)` by acceptance time.
    let (a_at, c_at) = (f.alice[3].2, f.alice[0].2);
    assert_eq!(
        listed(&list((a_at, c_at), None, 20).await.unwrap()),
        f.alice[1..]
    );
    assert_eq!(
        listed(&list((c_at, all.1), None, 20).await.unwrap()),
        f.alice[..1]
    );
    assert!(list((c_at, c_at), None, 20).await.unwrap().is_empty());
    // Another app sees none of them; a receiver with none has none.
    assert!(
        receiver_messages(&wh.wh, "bank", "bob", all, None, 20)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        receiver_messages(&wh.wh, "shop", "carol", all, None, 20)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn hashed_receivers_are_found_by_the_receiver_herald_recorded() {
    let tw = TestWarehouse::local();
    let wh = tw
        .wh
        .clone()
        .with_receivers(ReceiverPrivacy::hashed(b"sixteen byte key"));
    let f = fixture();
    written(&wh, f.events).await;
    let all = (DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC);
    let found = receiver_messages(&wh, "shop", "alice", all, None, 20)
        .await
        .unwrap();
    assert_eq!(listed(&found), f.alice);
    assert_eq!(found[0].receiver, wh.receivers().apply("alice"));
    assert_ne!(found[0].receiver, "alice");
}

#[tokio::test]
async fn a_templates_day_is_counted_by_current_and_reached_states() {
    let wh = TestWarehouse::local();
    let f = fixture();
    written(&wh.wh, f.events).await;
    let day = t0().date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let stats = template_states(&wh.wh, "shop", 5, (day, day + Days::new(1)))
        .await
        .unwrap();
    // The first day's messages of shop: alice's a, b, b2 and bob's (accepted only).
    assert_eq!(stats.messages, 4);
    assert_eq!(
        stats.current,
        vec![(Accepted, 1), (Sent, 2), (Delivered, 1)]
    );
    assert_eq!(
        stats.reached,
        vec![
            (Accepted, 4),
            (Received, 1),
            (Sending, 3),
            (Sent, 3),
            (Retrying, 1),
            (Delivered, 1)
        ]
    );
    let next = template_states(&wh.wh, "shop", 5, (day + Days::new(1), day + Days::new(2)))
        .await
        .unwrap();
    assert_eq!(
        (next.messages, next.current.clone()),
        (1, vec![(SendFailed, 1)])
    );
    assert_eq!(
        template_states(&wh.wh, "shop", 6, (day, day + Days::new(2)))
            .await
            .unwrap(),
        TemplateStates::default()
    );
    let bank = template_states(&wh.wh, "bank", 5, (day, day + Days::new(1)))
        .await
        .unwrap();
    assert_eq!(bank.current, vec![(Accepted, 1)]);
}
#[tokio::test]
async fn a_message_trace_is_read_back_from_the_warehouse_for_its_app_only() {
    let wh = TestWarehouse::local();
    let accepted = crate::testing::t0();
    // A time-ordered id made at `accepted`, as ingest makes them.
    let stamp = uuid::Timestamp::from_unix(uuid::NoContext, accepted.timestamp() as u64, 0);
    let id = MessageId(uuid::Uuid::new_v7(stamp));
    let mut events = sample_events(4, 0);
    for (i, e) in events.iter_mut().enumerate() {
        e.message_id = id;
        e.app = "shop".into();
        e.ts = accepted + chrono::Duration::minutes(i as i64);
    }
    // A receipt two days later is in the trace; another app's event with the id is not, nor is
    // one past the days a trace is looked for in.
    events[3].ts = accepted + chrono::Duration::days(2);
    let mut other_app = events[0].clone();
    other_app.app = "bank".into();
    other_app.event_id = "other".into();
    let mut too_late = events[0].clone();
    too_late.event_id = "late".into();
    too_late.ts = accepted + chrono::Duration::days(TRACE_DAYS as i64 + 2);
    let mut all = events.clone();
    all.extend([other_app, too_late]);
    blocking(&wh.wh, move |w| write_events(w, &all)).await;

    let mut found = message_events(&wh.wh, "shop", &id).await.unwrap();
    found.sort_by_key(DeliveryEvent::trace_order);
    assert_eq!(found, events);
    assert_eq!(message_events(&wh.wh, "bank", &id).await.unwrap().len(), 1);
    let unknown = MessageId::new();
    assert!(
        message_events(&wh.wh, "shop", &unknown)
            .await
            .unwrap()
            .is_empty()
    );
}

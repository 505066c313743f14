//! The sink against the real embedded bus: events published on `herald.delivery` come out of
//! SQL exactly once, across a restart of both the bus and the sink.

use chrono::{Duration as Span, TimeZone, Utc};
use herald_analytics::sql::{OutputFormat, format, query};
use herald_analytics::{CONSUMER_GROUP, NoIndex, Sink, SinkConfig, Warehouse};
use herald_core::bus::embedded::{EmbeddedBus, EmbeddedBusConfig};
use herald_core::bus::{Bus, Record};
use herald_core::wire::{DELIVERY_TOPIC, event_id};
use herald_core::{Channel, DeliveryEvent, MessageId, MsgType, State};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn events(range: std::ops::Range<u32>) -> Vec<Record> {
    let t0 = Utc.with_ymd_and_hms(2026, 11, 26, 22, 0, 0).unwrap();
    range
        .map(|i| {
            let message_id = MessageId(uuid::Uuid::from_u128(u128::from(i) + 1));
            let state = [State::Accepted, State::Sent, State::Delivered][i as usize % 3];
            let e = DeliveryEvent {
                event_id: event_id(&message_id, state, 1),
                ts: t0 + Span::seconds(60 * i64::from(i)),
                message_id,
                request_id: format!("req-{i}"),
                biz_id: None,
                app: "shop".into(),
                template_id: 1,
                channel: Channel::Email,
                msg_type: MsgType::Notice,
                receiver: format!("u{i}@example.com"),
                state,
                vendor: (state != State::Accepted).then(|| "smtp".into()),
                account_id: None,
                vendor_message_id: None,
                attempt: 1,
                error_code: None,
                error_detail: None,
                latency_ms: None,
                billing_units: None,
                cost_micros: None,
                currency: None,
                redelivered: false,
            };
            e.to_record()
        })
        .collect()
}

async fn open_bus(dir: &Path) -> EmbeddedBus {
    let config = EmbeddedBusConfig {
        fsync: false,
        ..EmbeddedBusConfig::default()
    };
    EmbeddedBus::open(dir, config).await.unwrap()
}

async fn drain(bus: &EmbeddedBus, warehouse: &Path) {
    let config = SinkConfig {
        poll_timeout: Duration::from_millis(5),
        ..SinkConfig::default()
    };
    let bus: Arc<dyn Bus> = Arc::new(bus.clone());
    let mut sink = Sink::recover(bus, Warehouse::local(warehouse), Arc::new(NoIndex), config)
        .await
        .unwrap();
    sink.process_available().await.unwrap();
}

#[tokio::test]
async fn events_published_on_the_embedded_bus_are_queryable_exactly_once() {
    let (bus_dir, warehouse) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let bus = open_bus(bus_dir.path()).await;
    bus.publish(DELIVERY_TOPIC, events(0..150)).await.unwrap();
    drain(&bus, warehouse.path()).await;
    drop(bus);

    // Restart everything; only the new events are added.
    let bus = open_bus(bus_dir.path()).await;
    bus.publish(DELIVERY_TOPIC, events(150..180)).await.unwrap();
    drain(&bus, warehouse.path()).await;
    assert_eq!(bus.lag(DELIVERY_TOPIC, CONSUMER_GROUP).await.unwrap(), 0);

    let sql = "SELECT dt, hour, state, count(*) AS n, count(DISTINCT event_id) AS ids \
               FROM delivery_events GROUP BY dt, hour, state ORDER BY dt, hour, state";
    let csv = format(
        &query(warehouse.path(), sql).await.unwrap(),
        OutputFormat::Csv,
    )
    .unwrap();
    let expected = "dt,hour,state,n,ids\n\
        2026-11-26,22,accepted,20,20\n2026-11-26,22,delivered,20,20\n2026-11-26,22,sent,20,20\n\
        2026-11-26,23,accepted,20,20\n2026-11-26,23,delivered,20,20\n2026-11-26,23,sent,20,20\n\
        2026-11-27,00,accepted,20,20\n2026-11-27,00,delivered,20,20\n2026-11-27,00,sent,20,20\n";
    assert_eq!(csv, expected);
    assert!(
        warehouse
            .path()
            .join("delivery_events/dt=2026-11-27/hour=00")
            .is_dir()
    );
}

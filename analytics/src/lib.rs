//! herald-analytics: the delivery-log sink that streams `herald.delivery` into the Parquet
//! warehouse exactly once ([`Sink`]), the warehouse layout ([`Warehouse`]), the
//! `delivery_events` schema ([`schema()`]), the windowed statistics computed from it
//! ([`stats`], kept up to date by an [`Aggregator`]), the compaction of small event files
//! ([`Compactor`]) and read-only SQL over the warehouse ([`sql`]).

mod compact;
mod error;
mod faults;
mod index;
mod manifest;
mod parts;
pub mod privacy;
pub mod reconcile;
mod schema;
mod sink;
pub mod sql;
pub mod stats;
mod view;
mod warehouse;

#[cfg(test)]
mod testing;

pub use compact::{CompactConfig, Compacted, Compactor};
pub use error::AnalyticsError;
pub use index::{EventIndex, NoIndex};
pub use schema::{TABLE, events_to_batch, schema};
pub use sink::{CONSUMER_GROUP, Sink, SinkConfig, SinkStats};
pub use stats::Aggregator;
pub use warehouse::Warehouse;

//! herald-core: the domain types, wire formats, configuration, the [`bus::Bus`] trait with its
//! embedded implementation, the sqlx store and the metrics registry shared by every role.

pub mod bus;
pub mod config;
pub mod domain;
pub mod fuzzing;
pub mod policy;
pub mod prices;
pub mod secrets;
pub mod store;
pub mod telemetry;
pub mod template;
pub mod wire;

pub use domain::{Channel, MessageId, MsgType};
pub use wire::{DeliveryEvent, MessageRecord, Receipt, State};

//! herald-dispatch: the consumer loop, the send pipeline and the channels.

pub mod channels;
pub mod worker;

pub use worker::{BatchOutcome, DispatchError, Dispatcher};

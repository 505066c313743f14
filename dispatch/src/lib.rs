//! herald-dispatch: the consumer loop, the send pipeline, the channels and the receipt poller.

pub mod channels;
mod outcomes;
pub mod receipts;
pub mod requests;
pub mod worker;

pub use receipts::ReceiptPoller;
pub use requests::{ExpandError, Refusal, RequestExpander};
pub use worker::{BatchOutcome, DispatchError, Dispatcher};

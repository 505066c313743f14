//! herald-dispatch: the consumer loop, the send pipeline and its policies, the scheduler, the
//! channels and the receipt poller.

pub mod breaker;
pub mod channels;
mod outcomes;
pub mod policy;
pub mod ratelimit;
pub mod receipts;
pub mod requests;
pub mod scheduler;
mod stragglers;
pub mod worker;

pub use receipts::ReceiptPoller;
pub use requests::{ExpandError, Refusal, RequestExpander};
pub use scheduler::Scheduler;
pub use worker::{BatchOutcome, DispatchError, Dispatcher};

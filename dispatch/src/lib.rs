//! herald-dispatch: the consumer loop, the send pipeline and the channels.

pub mod channels;

//! End-to-end tests: the embedded deployment (the real application on a free port with a
//! temporary data directory, real SMTP and HTTP peers, a crash test that kills the binary) and
//! the distributed one (separate role processes over a Kafka-protocol broker and PostgreSQL), and
//! faults injected under a steady load (`faults`).

mod api;
mod campaigns;
mod channels;
mod crash;
mod distributed;
mod faults;
mod fuzz;
mod media;
mod monitoring;
mod policies;
mod ratelimits;
mod recall;
mod retries;
mod routing;
mod s3;
mod security;
mod sms;
mod sql;
mod support;
mod traces;
mod unsubscribe;
mod wechat;

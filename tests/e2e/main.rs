//! End-to-end tests of the embedded deployment: the real application on a free port with a
//! temporary data directory, real SMTP and HTTP peers, and a crash test that kills the binary.

mod api;
mod channels;
mod crash;
mod media;
mod sms;
mod support;
mod wechat;

//! The librdkafka client context shared by every client: routes librdkafka's logs, errors and
//! rebalances to `tracing`.

use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// Logs through `tracing` under the target `librdkafka`.
pub(super) struct TracingContext;

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::error!(target: "librdkafka", facility, "{message}")
            }
            // librdkafka reports failed connections at error level and retries them itself.
            RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            tracing::error!(target: "librdkafka", %error, "fatal client error: {reason}");
        } else {
            tracing::warn!(target: "librdkafka", %error, "{reason}");
        }
    }
}

impl ConsumerContext for TracingContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(target: "librdkafka", partitions = %describe(tpl), "partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(target: "librdkafka", partitions = %describe(tpl), "partitions revoked")
            }
            Rebalance::Error(error) => {
                tracing::warn!(target: "librdkafka", %error, "rebalance failed")
            }
        }
    }
}

/// `topic[0,1,2] other[0]` for logs.
fn describe(tpl: &TopicPartitionList) -> String {
    let mut out = String::new();
    let mut current: Option<String> = None;
    for element in tpl.elements() {
        if current.as_deref() != Some(element.topic()) {
            if current.is_some() {
                out.push_str("] ");
            }
            out.push_str(element.topic());
            out.push('[');
            current = Some(element.topic().to_owned());
        } else {
            out.push(',');
        }
        out.push_str(&element.partition().to_string());
    }
    if current.is_some() {
        out.push(']');
    }
    out
}

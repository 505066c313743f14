//! Settings of the Kafka bus.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

/// Settings of the Kafka bus (`[kafka]` in the configuration file).
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma-separated `host:port` (librdkafka's `bootstrap.servers`).
    pub brokers: String,
    /// Client id reported to the brokers, visible in their logs and metrics.
    pub client_id: String,
    /// Partitions of `herald.requests` when herald creates it: the most dispatch workers that
    /// can share the load. Default 12.
    pub requests_partitions: u32,
    /// Partitions of `herald.delivery` when herald creates it. Default 12.
    pub delivery_partitions: u32,
    /// Partitions of `herald.requests.dlq` when herald creates it. Default 3.
    pub dlq_partitions: u32,
    /// Partitions of any other topic created on first use. Default 3.
    pub default_partitions: u32,
    /// Replication factor of the topics herald creates. Default 1 (a single broker); use 3 in
    /// production.
    pub replication: u16,
    /// Use librdkafka's idempotent producer, so that its retries never duplicate or reorder
    /// records. Default true. Turn it off only for brokers whose support of idempotent producers
    /// is broken (tansu 0.6 fails every produce after a restart interrupts one); herald then
    /// sends one request at a time per broker to keep order, and a retry may duplicate a record.
    pub idempotence: bool,
    /// Create a topic that does not exist on its first publish or subscribe. Default true;
    /// with false such a call fails with `UnknownTopic` (create topics with `herald kafka init`).
    pub create_topics: bool,
    /// Extra librdkafka settings applied to every producer, consumer and admin client, for
    /// example `security.protocol`, `sasl.mechanism`, `sasl.username`, `sasl.password`. They
    /// override herald's tuning (`linger.ms`, `compression.type`, ...) but not the settings its
    /// guarantees rest on (`acks`, `enable.idempotence`, the consumer's offset handling).
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            client_id: "herald".into(),
            requests_partitions: 12,
            delivery_partitions: 12,
            dlq_partitions: 3,
            default_partitions: 3,
            replication: 1,
            idempotence: true,
            create_topics: true,
            properties: BTreeMap::new(),
        }
    }
}

/// Hides the values of properties that look like secrets (passwords, tokens, private keys).
impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let value = if is_secret(k) { "***" } else { v.as_str() };
                (k.as_str(), value)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("requests_partitions", &self.requests_partitions)
            .field("delivery_partitions", &self.delivery_partitions)
            .field("dlq_partitions", &self.dlq_partitions)
            .field("default_partitions", &self.default_partitions)
            .field("replication", &self.replication)
            .field("idempotence", &self.idempotence)
            .field("create_topics", &self.create_topics)
            .field("properties", &properties)
            .finish()
    }
}

/// Whether a librdkafka property holds a secret.
fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token", "jaas", ".pem"]
        .iter()
        .any(|word| key.contains(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let config: KafkaConfig = toml::from_str(
            "brokers = \"kafka-1:9092,kafka-2:9092\"\nrequests_partitions = 24\n\
             [properties]\n\"security.protocol\" = \"SASL_SSL\"\n",
        )
        .expect("parse");
        assert_eq!(config.brokers, "kafka-1:9092,kafka-2:9092");
        assert_eq!(config.requests_partitions, 24);
        assert_eq!(config.delivery_partitions, 12);
        assert_eq!(config.replication, 1);
        assert!(config.create_topics);
        assert_eq!(config.properties["security.protocol"], "SASL_SSL");
        assert!(toml::from_str::<KafkaConfig>("partitons = 3").is_err());
    }

    #[test]
    fn debug_hides_secrets() {
        let mut config = KafkaConfig::default();
        config
            .properties
            .insert("sasl.password".into(), "hunter2".into());
        config
            .properties
            .insert("sasl.username".into(), "herald".into());
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("herald"), "{printed}");
    }
}

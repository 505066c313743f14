//! Configuration: one serde struct, loaded from defaults, then a TOML file, then `HERALD_*`
//! environment variables (`HERALD_HTTP__LISTEN=0.0.0.0:8080` sets `http.listen`; a double
//! underscore separates levels). Unknown keys are errors, so a typo never goes unnoticed.

use crate::bus::embedded::EmbeddedBusConfig;
use crate::bus::kafka::KafkaConfig;
use crate::prices::PriceTable;
use serde::{Deserialize, Deserializer, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole configuration of a herald process.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory for the SQLite store, the embedded bus and (by default) the warehouse.
    pub data_dir: PathBuf,
    /// Where the warehouse lives: a local directory or `s3://bucket/prefix` (credentials,
    /// region and endpoint from the standard `AWS_*` variables); defaults to
    /// `<data_dir>/warehouse`.
    pub warehouse: Option<String>,
    /// Store URL: `sqlite://PATH` or `postgres://USER@HOST:PORT/DB`; defaults to
    /// `sqlite://<data_dir>/herald.db`.
    pub store_url: Option<String>,
    /// Which bus carries requests and delivery events: `embedded` (a log under `data_dir`, one
    /// process) or `kafka` (see `[kafka]`).
    pub bus_kind: BusKind,
    /// Log filter in `tracing` env-filter syntax.
    pub log: String,
    pub http: HttpConfig,
    pub bus: EmbeddedBusConfig,
    pub kafka: KafkaConfig,
    pub producers: ProducersConfig,
    pub dispatch: DispatchConfig,
    pub analytics: AnalyticsConfig,
    pub reconcile: ReconcileConfig,
    pub security: SecurityConfig,
    /// What herald expects to pay vendors (`[[prices]]`, see [`crate::prices`]): dispatch puts
    /// each `sent` event's cost on it and `herald reconcile` prices bills with it. Its old
    /// place, `[[reconcile.prices]]`, is still read (as if written here); setting both is an
    /// error.
    pub prices: PriceTable,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./data"),
            warehouse: None,
            store_url: None,
            bus_kind: BusKind::Embedded,
            log: "info".into(),
            http: HttpConfig::default(),
            bus: EmbeddedBusConfig::default(),
            kafka: KafkaConfig::default(),
            producers: ProducersConfig::default(),
            dispatch: DispatchConfig::default(),
            analytics: AnalyticsConfig::default(),
            reconcile: ReconcileConfig::default(),
            security: SecurityConfig::default(),
            prices: PriceTable::default(),
        }
    }
}

/// Encryption of account secrets and vendor tokens in the store (see `herald_core::secrets`).
/// With neither key setting, the embedded deployment (a SQLite store) makes and uses
/// `<data_dir>/secret.key`; a PostgreSQL store uses that file when it exists, and otherwise
/// refuses to start unless `allow_clear_secrets` is set.
#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// The key ring, `id:base64-of-32-bytes` entries separated by commas; the first seals, all
    /// open (`HERALD_SECURITY__SECRET_KEYS`). Make one with `herald secrets new-key`.
    pub secret_keys: Option<String>,
    /// A file holding the key ring, one entry per line.
    pub secret_key_file: Option<PathBuf>,
    /// Lets a PostgreSQL store without a key keep account secrets in clear (with a warning).
    pub allow_clear_secrets: bool,
}

impl std::fmt::Debug for SecurityConfig {
    /// Never shows the keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecurityConfig")
            .field("secret_keys", &self.secret_keys.as_ref().map(|_| "***"))
            .field("secret_key_file", &self.secret_key_file)
            .field("allow_clear_secrets", &self.allow_clear_secrets)
            .finish()
    }
}

/// The bus implementation a process uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    Embedded,
    Kafka,
}

/// Records that business systems' own Kafka producers write to `herald.requests`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProducersConfig {
    /// Trust every producer that can write the topic: a record names its app and needs no
    /// `api_key`. Off by default; turn it on only when Kafka ACLs already restrict who writes.
    pub trusted: bool,
}

/// The HTTP API and its input limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: String,
    /// Largest request body accepted, in bytes (`body_too_large` above it).
    pub max_body_bytes: usize,
    /// Largest CSV file accepted by `POST /v1/campaigns`, in bytes (`body_too_large` above it);
    /// it is streamed into the store, never held in memory whole.
    pub max_campaign_bytes: u64,
    /// Most receivers in one `/v1/send` request or one batch message (`too_many_receivers`).
    pub max_receivers: usize,
    /// Most messages in one `/v1/send/batch` request (`too_many_messages`).
    pub max_batch_messages: usize,
    /// Largest `variables` of one message, as JSON bytes (`variables_too_large`).
    pub max_variables_bytes: usize,
    /// Largest template `content`, as JSON bytes (`template_too_large`).
    pub max_template_bytes: usize,
    /// Most receivers in a whole batch request (`too_many_receivers`).
    pub max_batch_receivers: usize,
    /// Most rendered content of one request, summed over its messages, as JSON bytes
    /// (`request_content_too_large`): what ingest holds for one request at once.
    pub max_request_content_bytes: usize,
    /// How long API keys and templates are cached before the store is asked again.
    #[serde(deserialize_with = "duration")]
    pub cache_ttl: Duration,
    /// When set, vendors' receipt pushes (`POST /v1/receipts/{vendor}`) must carry it as
    /// `?token=`; configure the callback URL at the vendor with it.
    pub receipt_token: Option<Secret>,
    /// The address receivers reach herald's public pages at (`https://push.example.com`);
    /// with `unsubscribe_secret`, messages get one-click unsubscribe links under it.
    pub public_url: Option<String>,
    /// Signs unsubscribe links (`/u/{token}`): with `public_url` set, templates may use
    /// `{$unsubscribe_url}` and marketing email carries `List-Unsubscribe` (RFC 8058).
    pub unsubscribe_secret: Option<Secret>,
    /// Apps whose `admin` keys are operators: `POST /v1/sql` shows them every app's rows and
    /// every table. Every other key sees only its own app's rows.
    pub operator_apps: Vec<String>,
    /// Most rows one `POST /v1/sql` answer may hold (`sql_result_too_large` above it).
    pub sql_max_rows: usize,
    /// Longest a `POST /v1/sql` statement may run (`sql_timeout` after it).
    #[serde(deserialize_with = "duration")]
    pub sql_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 4 * 1024 * 1024,
            max_campaign_bytes: 1024 * 1024 * 1024,
            max_receivers: 1000,
            max_batch_messages: 1000,
            max_variables_bytes: 64 * 1024,
            max_template_bytes: 64 * 1024,
            max_batch_receivers: 10_000,
            max_request_content_bytes: 64 * 1024 * 1024,
            cache_ttl: Duration::from_secs(5),
            receipt_token: None,
            public_url: None,
            unsubscribe_secret: None,
            operator_apps: Vec::new(),
            sql_max_rows: 100_000,
            sql_timeout: Duration::from_secs(30),
        }
    }
}

/// The dispatch workers.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatchConfig {
    /// Most records taken from the bus and processed as one batch.
    pub batch_size: usize,
    /// Most vendor calls in flight at once per worker.
    pub concurrency: usize,
    /// Most vendor calls per message: the first and its retries of retryable errors.
    pub max_attempts: u32,
    /// Backoff before the first retry; it doubles per retry, with full jitter.
    #[serde(deserialize_with = "duration")]
    pub retry_base: Duration,
    /// Longest wait a worker spends before a retry (a vendor's `Retry-After` included); a longer
    /// one puts the message in the schedule (`retrying`) and the batch goes on.
    #[serde(deserialize_with = "duration")]
    pub max_retry_wait: Duration,
    /// How often sent messages without a receipt are asked for at vendors that are polled.
    #[serde(deserialize_with = "duration")]
    pub receipt_poll_interval: Duration,
    /// Largest email attachment fetched, in bytes.
    pub attachment_max_bytes: usize,
    /// Whether URLs herald calls or fetches on a user's behalf — webhook and vendor endpoints
    /// (an account's `url` or `base_url`) and email attachments — may reach private, loopback
    /// or link-local addresses. Off by default: such URLs reach into herald's own network.
    pub allow_private_urls: bool,
    /// How long an app's policy document is used before it is read again: the longest a
    /// policy change takes to apply.
    #[serde(deserialize_with = "duration")]
    pub policy_cache_ttl: Duration,
    /// How long a worker holds the scheduled messages it took to release (those due within the
    /// next half second); if it dies, another worker releases them after this. Publishing takes
    /// milliseconds; a lease that runs out early only publishes a copy, which the ledger absorbs.
    #[serde(deserialize_with = "duration")]
    pub schedule_lease: Duration,
    /// Oldest a message may be (from its acceptance) when it is sent, per message type; an
    /// older one is `expired`, not sent late.
    pub max_age: MaxAge,
    /// The circuit breaker each worker keeps per vendor account.
    pub breaker: BreakerConfig,
    /// A file of sensitive words shared by every app (one per line, `#` comments), added to
    /// each app's own words; re-read within `policy_cache_ttl` when it changes.
    pub sensitive_words_file: Option<PathBuf>,
    /// Longest a message waits in the worker for a rate-limited account's slot (counting the
    /// messages before it); a longer wait puts it in the schedule (`rate_limited`) and the batch
    /// goes on.
    #[serde(deserialize_with = "duration")]
    pub rate_wait: Duration,
    /// How long a batch waits for its vendor calls; calls still running then (a slow or
    /// hanging vendor) are handed off: they finish in the background, guarded in the schedule
    /// against a crash, while the worker commits the batch and takes the next one.
    #[serde(deserialize_with = "duration")]
    pub handoff_after: Duration,
    /// A chunk of calls running eight times longer than this worker's calls usually take, and
    /// at least this long, is handed off before `handoff_after`: a slow account's calls do
    /// not hold up its round's other accounts that long.
    #[serde(deserialize_with = "duration")]
    pub handoff_min: Duration,
    /// Most messages whose calls a worker finishes in the background at once; beyond it, a
    /// batch waits for its calls (0: never hand off).
    pub max_handed_off: usize,
}

/// When a vendor account's circuit breaker opens, and how it closes again. A call counts as
/// failed when the vendor could not be reached or answered with a retryable error (a refused
/// receiver or template is the vendor working); a call slower than `slow_call` counts as slow.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Off: every account is always called.
    pub enabled: bool,
    /// The sliding window the rates are taken over.
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
    /// Fewest calls in the window before the rates count.
    pub min_calls: u32,
    /// Opens at this share of failed calls (0–1).
    pub failure_rate: f64,
    /// Opens after this many failed calls in a row, whatever the window holds (0: never). A
    /// vendor that stops answering is taken out at once, not only when the successes before
    /// it have left the window.
    pub consecutive_failures: u32,
    /// A call at least this slow is slow.
    #[serde(deserialize_with = "duration")]
    pub slow_call: Duration,
    /// Opens at this share of slow calls (0–1).
    pub slow_rate: f64,
    /// How long an open breaker refuses calls before letting probes through (half-open).
    #[serde(deserialize_with = "duration")]
    pub open_for: Duration,
    /// Calls let through when half-open; all must succeed to close it, one failure reopens it.
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            window: Duration::from_secs(30),
            min_calls: 20,
            failure_rate: 0.5,
            consecutive_failures: 10,
            slow_call: Duration::from_secs(10),
            slow_rate: 0.8,
            open_for: Duration::from_secs(30),
            probes: 3,
        }
    }
}

/// The oldest a message of each type may be when it is sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaxAge {
    #[serde(deserialize_with = "duration")]
    pub notice: Duration,
    #[serde(deserialize_with = "duration")]
    pub marketing: Duration,
    /// Auth codes are worthless once their validity is over.
    #[serde(deserialize_with = "duration")]
    pub auth_code: Duration,
}

impl Default for MaxAge {
    fn default() -> Self {
        MaxAge {
            notice: Duration::from_secs(72 * 3600),
            marketing: Duration::from_secs(24 * 3600),
            auth_code: Duration::from_secs(10 * 60),
        }
    }
}

impl MaxAge {
    /// The bound for `msg_type`.
    pub fn of(&self, msg_type: crate::MsgType) -> Duration {
        match msg_type {
            crate::MsgType::Notice => self.notice,
            crate::MsgType::Marketing => self.marketing,
            crate::MsgType::AuthCode => self.auth_code,
        }
    }
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            batch_size: 1024,
            concurrency: 64,
            max_attempts: 3,
            retry_base: Duration::from_millis(200),
            max_retry_wait: Duration::from_secs(10),
            receipt_poll_interval: Duration::from_secs(30),
            attachment_max_bytes: 10 * 1024 * 1024,
            allow_private_urls: false,
            policy_cache_ttl: Duration::from_secs(5),
            schedule_lease: Duration::from_secs(2),
            max_age: MaxAge::default(),
            breaker: BreakerConfig::default(),
            sensitive_words_file: None,
            rate_wait: Duration::from_secs(1),
            handoff_after: Duration::from_secs(5),
            handoff_min: Duration::from_secs(1),
            max_handed_off: 4096,
        }
    }
}

/// The warehouse sink and the delivery statistics.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalyticsConfig {
    /// A Parquet file is written when this many events are buffered...
    pub flush_rows: usize,
    /// ...or when the oldest buffered event is this old.
    #[serde(deserialize_with = "duration")]
    pub flush_interval: Duration,
    /// How far (in event time) behind the newest event written an event may arrive and still
    /// count in `delivery_stats_minute` and `delivery_stats_hour`: a window closes when the
    /// newest event time minus this passes its end. Later events are kept in
    /// `delivery_events` but left out of the stats, and counted in
    /// `herald_stats_late_events_total`.
    #[serde(deserialize_with = "duration")]
    pub allowed_lateness: Duration,
    /// How often the stats of hours whose events changed are recomputed.
    #[serde(deserialize_with = "duration")]
    pub stats_interval: Duration,
    /// How often the analytics role merges small `delivery_events` files (`0s`: never).
    #[serde(deserialize_with = "duration")]
    pub compact_interval: Duration,
    /// An hour's files are merged once the newest event written is this far past its end.
    #[serde(deserialize_with = "duration")]
    pub compact_after: Duration,
    /// The fewest small files of one hour (and lateness) worth merging.
    pub compact_min_files: usize,
    /// Merged files grow to about this many bytes (of compressed input); larger files stay.
    pub compact_target_bytes: u64,
    /// Reconciliations the analytics role runs on a cron schedule.
    pub reconcile_schedules: Vec<ReconcileSchedule>,
    /// How receivers are written to the warehouse (`delivery_events`, `vendor_bills`): in
    /// `clear`, `masked` or `hashed` (see `herald_analytics::privacy`). The store keeps them in
    /// clear for the tracing endpoints either way.
    pub receivers: ReceiverMode,
    /// The HMAC key of `receivers = "hashed"` (required then): keep it stable, or old and new
    /// rows stop matching; keep it secret, or phone numbers can be found by trying them all.
    pub receiver_hash_key: Option<Secret>,
    /// How long the store keeps a message's index for the tracing endpoints after its latest
    /// state (`0s`: for ever); older traces are read from the warehouse.
    #[serde(deserialize_with = "duration")]
    pub index_retention: Duration,
}

/// How receivers are written to the warehouse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiverMode {
    /// As sent.
    #[default]
    Clear,
    /// The middle hidden: `+86138****5678`, `a***@example.com`.
    Masked,
    /// A keyed hash (HMAC-SHA256), a phone number's country code kept for pricing.
    Hashed,
}

/// A reconciliation run on a schedule (`[[analytics.reconcile_schedules]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileSchedule {
    /// When to run: 5 cron fields (minute hour day month weekday) or 6 (seconds first), read
    /// at `reconcile.utc_offset`.
    pub cron: String,
    /// The vendor as on delivery events.
    pub vendor: String,
    /// Where finance drops the vendor's exports: a file or a glob such as
    /// `/srv/bills/tencent/*.csv`; the newest file that matches is reconciled.
    pub bills: String,
    /// Which month a run reconciles.
    #[serde(default)]
    pub period: PeriodRule,
    /// The bill's layout (`tencent`, `aliyun`, `generic`); default: the vendor's own, else
    /// `generic`.
    #[serde(default)]
    pub format: Option<String>,
}

/// Which month a scheduled reconciliation covers, in the calendar of `reconcile.utc_offset`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeriodRule {
    /// The month before the run (a bill arrives after its month ends).
    #[default]
    PreviousMonth,
    /// The month of the run (a running check against daily exports).
    CurrentMonth,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        AnalyticsConfig {
            flush_rows: 20_000,
            flush_interval: Duration::from_secs(1),
            allowed_lateness: Duration::from_secs(3600),
            stats_interval: Duration::from_secs(10),
            compact_interval: Duration::from_secs(300),
            compact_after: Duration::from_secs(3600),
            compact_min_files: 10,
            compact_target_bytes: 128 << 20,
            reconcile_schedules: Vec::new(),
            receivers: ReceiverMode::Clear,
            receiver_hash_key: None,
            index_retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Vendor billing reconciliation (`herald reconcile`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileConfig {
    /// The UTC offset of the vendors' bills (`+08:00` for mainland China vendors): bill times
    /// without a zone are read in it, and report days and periods are its calendar days.
    pub utc_offset: String,
    /// How far apart herald's send and a bill row without a vendor message id may be in time
    /// and still be matched by receiver.
    #[serde(deserialize_with = "duration")]
    pub match_window: Duration,
    /// The header names of the `generic` bill format.
    pub generic_columns: GenericBillColumns,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            utc_offset: "+08:00".into(),
            match_window: Duration::from_secs(600),
            generic_columns: GenericBillColumns::default(),
        }
    }
}

/// Header names of a generic bill CSV (one row per message and receiver).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenericBillColumns {
    /// The vendor's message id (optional column: rows without one match by receiver and time).
    pub message_id: String,
    /// The receiver's phone number (required column).
    pub receiver: String,
    /// When the vendor sent it (required column).
    pub time: String,
    /// Billing units charged (required column).
    pub units: String,
    /// The amount charged in the vendor's currency, e.g. `0.045` (optional column).
    pub amount: String,
    /// The vendor's delivery status (optional column).
    pub status: String,
}

impl Default for GenericBillColumns {
    fn default() -> Self {
        GenericBillColumns {
            message_id: "message_id".into(),
            receiver: "receiver".into(),
            time: "time".into(),
            units: "units".into(),
            amount: "amount".into(),
            status: "status".into(),
        }
    }
}

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// `HERALD_*` variables that are not config keys: the config file's path, and the settings of
/// the test script and `scripts/broker.sh` (which herald processes started by tests inherit).
const NOT_CONFIG: [&str; 5] = ["CONFIG", "TEST_", "TANSU", "BROKER_", "S3_"];

impl Config {
    /// Defaults, then `file` (when given), then `HERALD_*` variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut merged = toml::Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            merged = text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?;
        }
        for (key, value) in env {
            let Some(rest) = key.strip_prefix("HERALD_") else {
                continue;
            };
            if NOT_CONFIG.iter().any(|p| rest.starts_with(p)) {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            set_path(&mut merged, &path, scalar(&value))
                .map_err(|e| ConfigError::Invalid(format!("{key}: {e}")))?;
        }
        move_old_prices(&mut merged)?;
        Config::deserialize(toml::Value::Table(merged))
            .map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    /// The warehouse location: a directory or an `s3://` URL.
    pub fn warehouse_location(&self) -> String {
        self.warehouse
            .clone()
            .unwrap_or_else(|| self.data_dir.join("warehouse").display().to_string())
    }

    /// The store URL.
    pub fn store_url(&self) -> String {
        self.store_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("herald.db").display()))
    }

    /// The embedded bus directory.
    pub fn bus_dir(&self) -> PathBuf {
        self.data_dir.join("bus")
    }
}

/// Reads `[[reconcile.prices]]`, where the price table was before dispatch used it too, as the
/// top-level `[[prices]]`.
fn move_old_prices(merged: &mut toml::Table) -> Result<(), ConfigError> {
    let old = match merged.get_mut("reconcile") {
        Some(toml::Value::Table(reconcile)) => reconcile.remove("prices"),
        _ => None,
    };
    if let Some(old) = old {
        if merged.contains_key("prices") {
            return Err(ConfigError::Invalid(
                "both `prices` and `reconcile.prices` are set; keep one price table, `[[prices]]`"
                    .into(),
            ));
        }
        merged.insert("prices".into(), old);
    }
    Ok(())
}

/// An environment value as TOML: integers, floats and booleans keep their type; the rest are strings.
fn scalar(v: &str) -> toml::Value {
    if let Ok(i) = v.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Ok(b) = v.parse::<bool>() {
        toml::Value::Boolean(b)
    } else if let Ok(f) = v.parse::<f64>() {
        toml::Value::Float(f)
    } else {
        toml::Value::String(v.to_string())
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Err("empty key".into()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => set_path(t, rest, value),
                _ => Err(format!("`{first}` is not a section")),
            }
        }
    }
}

/// Parses a human duration: `250ms`, `5s`, `10m`, `2h`, `1d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{s}` has no unit (use ms, s, m, h or d)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration"))?;
    let ms = match unit {
        "ms" => n,
        "s" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use ms, s, m, h or d)"
            ));
        }
    };
    Ok(Duration::from_millis(ms))
}

/// Serde helper for human duration strings.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// A secret string: never printed by `Debug` or `Display`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_defaults_file_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("herald.toml");
        std::fs::write(
            &file,
            "data_dir = \"/srv/h\"\n[http]\nmax_receivers = 5\ncache_ttl = \"2s\"\n",
        )
        .unwrap();
        let env = vec![
            (
                "HERALD_HTTP__LISTEN".to_string(),
                "0.0.0.0:9000".to_string(),
            ),
            ("HERALD_HTTP__MAX_RECEIVERS".to_string(), "7".to_string()),
            ("HERALD_BUS_KIND".to_string(), "kafka".to_string()),
            ("HERALD_CONFIG".to_string(), "/etc/herald.toml".to_string()),
            (
                "HERALD_TEST_POSTGRES".to_string(),
                "postgres://x".to_string(),
            ),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let c = Config::load(Some(&file), env).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/srv/h"));
        assert_eq!(c.http.listen, "0.0.0.0:9000");
        assert_eq!(c.http.max_receivers, 7);
        assert_eq!(c.http.cache_ttl, Duration::from_secs(2));
        assert_eq!(c.dispatch.batch_size, DispatchConfig::default().batch_size);
        assert_eq!(c.store_url(), "sqlite:///srv/h/herald.db");
        assert_eq!(c.bus_kind, BusKind::Kafka);
        assert!(!c.producers.trusted);
    }

    #[test]
    fn prices_are_read_at_the_top_or_in_their_old_place_but_not_both() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("herald.toml");
        let rule = "vendor = \"tencent\"\nunit_price_micros = 45000\ncurrency = \"CNY\"\n";
        let load = |text: String| {
            std::fs::write(&file, text).unwrap();
            Config::load(Some(&file), Vec::<(String, String)>::new())
        };
        for text in [
            format!("[[prices]]\n{rule}"),
            format!("[reconcile]\nutc_offset = \"+08:00\"\n[[reconcile.prices]]\n{rule}"),
        ] {
            let c = load(text).unwrap();
            let rule = c
                .prices
                .rule("tencent", None, "+8613800000000", crate::MsgType::Notice)
                .unwrap();
            assert_eq!(rule.unit_price_micros, 45_000);
        }
        let both = load(format!("[[prices]]\n{rule}[[reconcile.prices]]\n{rule}"));
        assert!(
            both.unwrap_err()
                .to_string()
                .contains("keep one price table")
        );
        let bad = load(format!("[[prices]]\n{rule}country_prefix = \"86\"\n"));
        assert!(bad.unwrap_err().to_string().contains("country_prefix"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let env = vec![("HERALD_HTTP__LISTN".to_string(), "x".to_string())];
        let err = Config::load(None, env).unwrap_err().to_string();
        assert!(err.contains("listn"), "{err}");
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "***");
    }
}

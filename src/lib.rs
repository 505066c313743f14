//! herald: the one binary's library side. [`Application::build`] wires every role of the embedded
//! deployment — HTTP API, dispatch worker, warehouse sink — over one store and one bus, so tests
//! and benchmarks start the real thing on port 0.

pub mod bench;

use anyhow::Context;
use chrono::{DateTime, Utc};
use herald_analytics::privacy::ReceiverPrivacy;
use herald_analytics::reconcile::Schedules;
use herald_analytics::sql::traces;
use herald_analytics::stats::{HOUR_TABLE, MINUTE_TABLE};
use herald_analytics::{
    Aggregator, AnalyticsError, Compacted, Compactor, EventIndex, Sink, SinkConfig, SinkStats,
    Warehouse,
};
use herald_core::bus::embedded::EmbeddedBus;
use herald_core::bus::kafka::{KafkaBus, herald_topics};
use herald_core::bus::{Bus, Delivered};
use herald_core::config::{BusKind, Config};
use herald_core::secrets::SecretBox;
use herald_core::store::{Account, MessageSummary, Store, TemplateStates};
use herald_core::telemetry::{Metrics, TableLabel, TaskLabel, TopicGroup};
use herald_core::wire::{DELIVERY_TOPIC, DeliveryEvent, REQUESTS_TOPIC};
use herald_core::{Channel, MessageId, MessageRecord, Receipt};
use herald_dispatch::channels::{self, Media, SendError, Senders};
use herald_dispatch::{
    Dispatcher, ExpandError, ReceiptPoller, Refusal, RequestExpander, Scheduler,
};
use herald_ingest::producer::{ProducerError, Source};
use herald_ingest::{
    ApiState, Channels, MediaUpload, SqlFailure, SqlFormat, SqlQuery, VendorFailure, WarehouseSql,
};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Which roles a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub ingest: bool,
    pub dispatch: bool,
    pub analytics: bool,
}

impl Roles {
    /// Every role: the embedded deployment.
    pub const ALL: Roles = Roles {
        ingest: true,
        dispatch: true,
        analytics: true,
    };

    /// The HTTP API alone.
    pub const INGEST: Roles = Roles {
        ingest: true,
        dispatch: false,
        analytics: false,
    };

    /// A dispatch worker alone.
    pub const DISPATCH: Roles = Roles {
        ingest: false,
        dispatch: true,
        analytics: false,
    };

    /// The warehouse sink alone.
    pub const ANALYTICS: Roles = Roles {
        ingest: false,
        dispatch: false,
        analytics: true,
    };

    /// Parses `all` or a comma-separated list of `ingest`, `dispatch`, `analytics`.
    pub fn parse(s: &str) -> anyhow::Result<Roles> {
        if s == "all" {
            return Ok(Roles::ALL);
        }
        let mut roles = Roles {
            ingest: false,
            dispatch: false,
            analytics: false,
        };
        for role in s.split(',').map(str::trim) {
            match role {
                "ingest" => roles.ingest = true,
                "dispatch" => roles.dispatch = true,
                "analytics" => roles.analytics = true,
                other => {
                    anyhow::bail!("unknown role `{other}` (expected ingest, dispatch or analytics)")
                }
            }
        }
        Ok(roles)
    }
}

/// A built, not yet running, herald.
pub struct Application {
    config: Config,
    roles: Roles,
    listener: TcpListener,
    store: Store,
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
}

/// Opens the store with the configured secret keys: `security.secret_keys` or
/// `security.secret_key_file`; else `<data_dir>/secret.key` (for a SQLite store made on first
/// use; a PostgreSQL store, shared by processes that must agree on the key, only uses one that
/// exists). A PostgreSQL store without any key is refused unless `security.allow_clear_secrets`.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let store = Store::open(&config.store_url())
        .await
        .context("cannot open the store")?;
    let file = config.data_dir.join("secret.key");
    let default_file =
        (store.backend() == herald_core::store::Backend::Sqlite || file.exists()).then_some(file);
    match SecretBox::from_config(&config.security, default_file.as_deref())
        .context("cannot load the secret keys")?
    {
        Some(secrets) => Ok(store.with_secrets(Arc::new(secrets))),
        None if config.security.allow_clear_secrets => {
            tracing::warn!(
                "no secret key configured (security.secret_keys): account secrets and vendor \
                 tokens are stored in clear"
            );
            Ok(store)
        }
        None => anyhow::bail!(
            "a PostgreSQL store needs a secret key to seal account secrets: set \
             security.secret_keys (HERALD_SECURITY__SECRET_KEYS; make one with `herald secrets \
             new-key`), security.secret_key_file, or put it in <data_dir>/secret.key; or set \
             security.allow_clear_secrets = true to keep them in clear"
        ),
    }
}

/// Opens the warehouse at `location` (else the configured one), with receivers written as
/// `analytics.receivers` says.
pub fn open_warehouse(config: &Config, location: Option<String>) -> anyhow::Result<Warehouse> {
    let location = location.unwrap_or_else(|| config.warehouse_location());
    let receivers = ReceiverPrivacy::from_config(&config.analytics).map_err(anyhow::Error::msg)?;
    Ok(Warehouse::open(&location)
        .with_context(|| format!("cannot open the warehouse {location}"))?
        .with_receivers(receivers))
}

impl Application {
    /// Opens the store and the bus and binds the HTTP listener (`http.listen`; port 0 picks a free one).
    pub async fn build(config: Config, roles: Roles) -> anyhow::Result<Application> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
        let store = open_store(&config).await?;
        let bus = open_bus(&config).await?;
        let listener = TcpListener::bind(&config.http.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.http.listen))?;
        Ok(Application {
            config,
            roles,
            listener,
            store,
            bus,
            metrics: Metrics::new(),
        })
    }

    /// The address the API listens on.
    pub fn address(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Runs every enabled role until `shutdown` turns true, then stops them in order: HTTP first,
    /// then dispatch finishes its batch, then the sink flushes.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        let mut sink_stats = None;
        // One warehouse for the roles of this process, so that `POST /v1/sql` and compaction
        // share its layout lock.
        let warehouse = open_warehouse(&self.config, None)?;
        if self.roles.analytics {
            let warehouse = warehouse.clone();
            let analytics = &self.config.analytics;
            let sink_config = SinkConfig {
                max_rows: analytics.flush_rows,
                max_age: analytics.flush_interval,
                allowed_lateness: analytics.allowed_lateness,
                ..SinkConfig::default()
            };
            let index: Arc<dyn EventIndex> = Arc::new(StoreIndex(self.store.clone()));
            let sink =
                Sink::recover(self.bus.clone(), warehouse.clone(), index, sink_config).await?;
            sink_stats = Some(sink.stats());
            if !analytics.compact_interval.is_zero() {
                let compactor = Compactor::new(warehouse.clone(), analytics.into());
                let (rx, interval) = (shutdown.clone(), analytics.compact_interval);
                let metrics = self.metrics.clone();
                tasks.spawn(async move {
                    let count = |pass: Result<&Compacted, &AnalyticsError>| match pass {
                        Ok(done) => {
                            metrics
                                .compaction_files_merged
                                .inc_by(done.files_merged as u64);
                        }
                        Err(_) => {
                            metrics.upkeep_failures.get_or_create(&COMPACTION).inc();
                        }
                    };
                    compactor.run(interval, rx, count).await;
                    Ok(())
                });
            }
            if !analytics.reconcile_schedules.is_empty() {
                let schedules = Schedules::new(
                    warehouse.clone(),
                    &self.config.reconcile,
                    &self.config.prices,
                    &analytics.reconcile_schedules,
                )?;
                let rx = shutdown.clone();
                tasks.spawn(async move {
                    schedules.run(rx).await;
                    Ok(())
                });
            }
            if !analytics.index_retention.is_zero() {
                let (store, retention) = (self.store.clone(), analytics.index_retention);
                let (rx, metrics) = (shutdown.clone(), self.metrics.clone());
                tasks.spawn(async move {
                    prune_index(store, retention, &metrics, rx).await;
                    Ok(())
                });
            }
            let aggregator =
                Aggregator::open(warehouse, sink.stats(), analytics.allowed_lateness).await?;
            let (rx, interval) = (shutdown.clone(), analytics.stats_interval);
            tasks.spawn(async move {
                aggregator.run(interval, rx).await;
                Ok(())
            });
            let rx = shutdown.clone();
            tasks.spawn(async move { sink.run(rx).await.context("warehouse sink") });
        }
        let senders = Arc::new(Senders::new(self.store.clone(), &self.config.dispatch));
        // One API state (and so one set of key and template caches) for the process.
        let api = self.api_state(&senders, &warehouse);
        if self.roles.dispatch {
            let d = Dispatcher::new(
                self.store.clone(),
                self.bus.clone(),
                Arc::clone(&senders),
                self.metrics.clone(),
                self.config.dispatch.clone(),
            )
            .with_prices(self.config.prices.clone())
            .with_requests(Arc::new(ProducerRequests {
                api: api.clone(),
                trusted: self.config.producers.trusted,
            }));
            let rx = shutdown.clone();
            tasks.spawn(async move { d.run(rx).await.context("dispatch worker") });
            let poller = ReceiptPoller {
                store: self.store.clone(),
                bus: self.bus.clone(),
                senders: Arc::clone(&senders),
                metrics: self.metrics.clone(),
                interval: self.config.dispatch.receipt_poll_interval,
            };
            let rx = shutdown.clone();
            tasks.spawn(async move {
                poller.run(rx).await;
                Ok(())
            });
            let scheduler = Scheduler::new(
                self.store.clone(),
                self.bus.clone(),
                self.config.dispatch.schedule_lease,
            );
            let rx = shutdown.clone();
            tasks.spawn(async move {
                scheduler.run(rx).await;
                Ok(())
            });
        }
        if self.roles.ingest || self.roles.dispatch {
            // Revocations and template edits made through other processes reach the caches
            // (ingest's, and dispatch's for producers' records).
            let follow = herald_ingest::follow_changes(api.clone(), shutdown.clone());
            tasks.spawn(async move {
                follow.await;
                Ok(())
            });
        }
        if self.roles.ingest {
            // Scheduled campaigns run in every ingest process, one campaign at a time each.
            let campaigns = herald_ingest::run_campaigns(api.clone(), shutdown.clone());
            tasks.spawn(async move {
                campaigns.await;
                Ok(())
            });
        }
        tasks.spawn(watch(
            self.bus.clone(),
            self.metrics.clone(),
            sink_stats,
            shutdown.clone(),
        ));
        {
            // Every process answers /health and /metrics; only ingest serves the API.
            let app = if self.roles.ingest {
                herald_ingest::router(api)
            } else {
                herald_ingest::ops_router(api)
            };
            let mut rx = shutdown.clone();
            let listener = self.listener;
            tasks.spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.wait_for(|s| *s).await;
                    })
                    .await
                    .context("HTTP server")
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.context("a role panicked")??;
        }
        Ok(())
    }
}

/// The bus `config` names: the embedded log, or Kafka with herald's topics created if missing.
pub async fn open_bus(config: &Config) -> anyhow::Result<Arc<dyn Bus>> {
    Ok(match config.bus_kind {
        BusKind::Embedded => Arc::new(
            EmbeddedBus::open(&config.bus_dir(), config.bus.clone())
                .await
                .context("cannot open the embedded bus")?,
        ),
        BusKind::Kafka => {
            let bus = KafkaBus::new(&config.kafka).context("cannot create the Kafka clients")?;
            bus.ensure_topics(&herald_topics(&config.kafka))
                .await
                .context("cannot create herald's Kafka topics")?;
            Arc::new(bus)
        }
    })
}

impl Application {
    /// The API's state over this application's store, bus, channels and warehouse.
    fn api_state(&self, senders: &Arc<Senders>, warehouse: &Warehouse) -> ApiState {
        ApiState::new(
            self.store.clone(),
            self.bus.clone(),
            self.metrics.clone(),
            self.config.http.clone(),
            Arc::new(ChannelServices(Arc::clone(senders))),
            Arc::new(WarehouseQueries {
                warehouse: warehouse.clone(),
                running: tokio::sync::Semaphore::new(SQL_AT_ONCE),
                index_retention: self.config.analytics.index_retention,
            }),
        )
    }
}

/// Most `POST /v1/sql` statements one process runs at once; more wait their turn (within
/// `http.sql_timeout`), so queries cannot take every core from the send path.
const SQL_AT_ONCE: usize = 1;

/// The warehouse as `POST /v1/sql` and the tracing endpoints read it.
struct WarehouseQueries {
    warehouse: Warehouse,
    running: tokio::sync::Semaphore,
    /// How long the store's tracing index keeps a message (`0`: for ever).
    index_retention: Duration,
}

impl WarehouseQueries {
    /// Waits for this process's turn to read the warehouse.
    async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, SqlFailure> {
        self.running
            .acquire()
            .await
            .map_err(|e| SqlFailure::Unavailable(e.to_string()))
    }
}

#[async_trait::async_trait]
impl WarehouseSql for WarehouseQueries {
    async fn query(&self, query: SqlQuery<'_>) -> Result<Vec<u8>, SqlFailure> {
        use herald_analytics::sql::{OutputFormat, Rows, encode, query_limited};
        let _turn = self.turn().await?;
        let rows = match query.app {
            Some(app) => Rows::App(app.to_string()),
            None => Rows::All,
        };
        let format = match query.format {
            SqlFormat::Json => OutputFormat::Json,
            SqlFormat::Csv => OutputFormat::Csv,
            SqlFormat::Table => OutputFormat::Table,
            SqlFormat::Parquet => OutputFormat::Parquet,
        };
        let failure = |e: AnalyticsError| match e {
            AnalyticsError::NotReadOnly(_) => SqlFailure::NotReadOnly(e.to_string()),
            AnalyticsError::TooManyRows(_) => SqlFailure::TooManyRows(e.to_string()),
            e if e.is_query_fault() => SqlFailure::Invalid(e.to_string()),
            e => SqlFailure::Unavailable(e.to_string()),
        };
        // A statement whose read of the warehouse failed has run again (`query_limited`).
        let batches = query_limited(&self.warehouse, query.sql, &rows, query.max_rows)
            .await
            .map_err(failure)?;
        encode(&batches, format).map_err(failure)
    }

    async fn message_events(
        &self,
        app: &str,
        id: &MessageId,
    ) -> Result<Vec<DeliveryEvent>, SqlFailure> {
        let _turn = self.turn().await?;
        traces::message_events(&self.warehouse, app, id)
            .await
            .map_err(unavailable)
    }

    fn index_horizon(&self) -> Option<DateTime<Utc>> {
        index_horizon(self.index_retention)
    }

    async fn receiver_messages(
        &self,
        app: &str,
        receiver: &str,
        range: (DateTime<Utc>, DateTime<Utc>),
        before: Option<(DateTime<Utc>, MessageId)>,
        limit: usize,
    ) -> Result<Vec<MessageSummary>, SqlFailure> {
        let _turn = self.turn().await?;
        traces::receiver_messages(&self.warehouse, app, receiver, range, before, limit)
            .await
            .map_err(unavailable)
    }

    async fn template_states(
        &self,
        app: &str,
        template_id: i64,
        range: (DateTime<Utc>, DateTime<Utc>),
    ) -> Result<TemplateStates, SqlFailure> {
        let _turn = self.turn().await?;
        traces::template_states(&self.warehouse, app, template_id, range)
            .await
            .map_err(unavailable)
    }
}

/// A warehouse read that failed for the warehouse's sake.
fn unavailable(e: AnalyticsError) -> SqlFailure {
    SqlFailure::Unavailable(e.to_string())
}

/// The time before which the tracing index forgets messages kept for `retention` (`0`: never):
/// what pruning removes and what the tracing endpoints read from the warehouse instead.
fn index_horizon(retention: Duration) -> Option<DateTime<Utc>> {
    let retention = chrono::Duration::from_std(retention).ok()?;
    (!retention.is_zero()).then(|| Utc::now() - retention)
}

/// The `task` labels of `herald_upkeep_failures_total`.
const COMPACTION: TaskLabel = TaskLabel { task: "compaction" };
const INDEX_PRUNING: TaskLabel = TaskLabel {
    task: "index_pruning",
};

/// Every ten minutes, forgets the tracing index of messages whose latest state is older than
/// `retention`, a few thousand per transaction so that the sink's index writes are not held up.
async fn prune_index(
    store: Store,
    retention: Duration,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    const BATCH: i64 = 2_000;
    let mut every = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        let Some(cutoff) = index_horizon(retention) else {
            return;
        };
        let mut forgotten = 0;
        loop {
            match store.prune_index(cutoff.timestamp_micros(), BATCH).await {
                Ok(n) => {
                    forgotten += n;
                    metrics.index_pruned.inc_by(n);
                    if n < BATCH as u64 || *shutdown.borrow() {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    metrics.upkeep_failures.get_or_create(&INDEX_PRUNING).inc();
                    tracing::warn!(error = %e, "pruning the tracing index failed; next pass in ten minutes");
                    break;
                }
            }
        }
        if forgotten > 0 {
            tracing::info!(messages = forgotten, %cutoff, "tracing index pruned");
        }
    }
}

/// Every second: updates the queue-lag gauges and copies the sink's counters into the metrics.
async fn watch(
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    sink: Option<Arc<SinkStats>>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let watched = [
        (REQUESTS_TOPIC, herald_dispatch::worker::GROUP),
        (DELIVERY_TOPIC, herald_analytics::CONSUMER_GROUP),
    ];
    let (mut written, mut dropped, mut late_minute, mut late_hour) = (0, 0, 0, 0);
    loop {
        for (topic, group) in watched {
            if let Ok(lag) = bus.lag(topic, group).await {
                metrics
                    .queue_lag
                    .get_or_create(&TopicGroup { topic, group })
                    .set(lag as i64);
            }
        }
        if let Some(stats) = &sink {
            let (w, d) = (
                stats.events_written.load(Relaxed),
                stats.duplicates_dropped.load(Relaxed),
            );
            metrics.warehouse_events.inc_by(w - written);
            metrics.warehouse_duplicates_dropped.inc_by(d - dropped);
            (written, dropped) = (w, d);
            for (table, seen, now) in [
                (MINUTE_TABLE, &mut late_minute, &stats.late_for_minute),
                (HOUR_TABLE, &mut late_hour, &stats.late_for_hour),
            ] {
                let now = now.load(Relaxed);
                metrics
                    .stats_late_events
                    .get_or_create(&TableLabel { table })
                    .inc_by(now - *seen);
                *seen = now;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
    }
}

/// The store's per-message event index, fed by the warehouse sink.
struct StoreIndex(Store);

#[async_trait::async_trait]
impl EventIndex for StoreIndex {
    async fn index(&self, events: &[DeliveryEvent]) -> anyhow::Result<()> {
        Ok(self.0.index_events(events).await?)
    }

    async fn known(&self, ids: &[(MessageId, String)]) -> anyhow::Result<HashSet<String>> {
        Ok(self.0.known_events(ids).await?)
    }
}

/// Records that Kafka producers write to `herald.requests`, checked as ingest checks HTTP requests.
struct ProducerRequests {
    api: ApiState,
    trusted: bool,
}

#[async_trait::async_trait]
impl RequestExpander for ProducerRequests {
    async fn expand(&self, d: &Delivered) -> Result<Vec<MessageRecord>, ExpandError> {
        let source = Source {
            topic: &d.topic,
            partition: d.partition,
            offset: d.offset,
        };
        self.api
            .expand_producer_record(&d.record.payload, source, self.trusted)
            .await
            .map_err(|e| match e {
                ProducerError::Refused { code, message } => {
                    ExpandError::Refused(Refusal { code, message })
                }
                ProducerError::Unavailable(why) => ExpandError::Unavailable(why),
            })
    }
}

/// The channel clients as ingest sees them.
struct ChannelServices(Arc<Senders>);

#[async_trait::async_trait]
impl Channels for ChannelServices {
    fn check_account(&self, channel: Channel, config: &serde_json::Value) -> Result<(), String> {
        self.0.check_account(channel, config)
    }

    fn check_content(&self, channel: Channel, content: &serde_json::Value) -> Result<(), String> {
        channels::check_content(channel, content)
    }

    fn parse_receipt_push(
        &self,
        vendor: &str,
        body: &[u8],
    ) -> Result<(Vec<Receipt>, &'static str, &'static str), String> {
        let push = channels::parse_receipt_push(vendor, body)?;
        Ok((push.receipts, push.ack.0, push.ack.1))
    }

    async fn upload_media(
        &self,
        account: &Account,
        upload: MediaUpload,
    ) -> Result<String, VendorFailure> {
        let Some(sender) = self.0.for_channel(account.channel) else {
            return Err(failure(SendError::not_supported("media upload")));
        };
        let media = Media {
            kind: upload.kind,
            filename: upload.filename,
            content_type: upload.content_type,
            bytes: upload.bytes,
        };
        sender
            .upload_media(account.channel, account.id, &account.config, &media)
            .await
            .map_err(failure)
    }

    fn can_recall(&self, channel: Channel) -> bool {
        // The channels whose vendor client implements `Sender::recall`.
        matches!(
            channel,
            Channel::WecomApp | Channel::DingtalkWork | Channel::FeishuApp
        )
    }

    async fn recall(&self, account: &Account, sent: &DeliveryEvent) -> Result<(), VendorFailure> {
        let Some(sender) = self.0.for_channel(sent.channel) else {
            return Err(failure(SendError::not_supported("recall")));
        };
        sender
            .recall(sent, account.id, &account.config)
            .await
            .map_err(failure)
    }
}

fn failure(e: SendError) -> VendorFailure {
    VendorFailure {
        code: e.code().to_string(),
        detail: e.detail().to_string(),
        retryable: e.is_retryable(),
    }
}

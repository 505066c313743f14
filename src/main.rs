//! The `herald` command: loads config, starts telemetry, and runs what the subcommand asks.

mod campaign;
mod reconcile;
mod warehouse;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use herald::{Application, Roles};
use herald_core::bus::kafka::{KafkaBus, herald_topics};
use herald_core::config::{BusKind, Config};
use herald_core::store::Store;
use std::path::PathBuf;

/// jemalloc, not glibc's malloc: on the end-to-end benchmark it runs faster in less memory
/// (its settings are in `.cargo/config.toml`; README, "Memory and the allocator").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "herald", version, about = "Unified message-push platform")]
struct Cli {
    /// TOML config file (then `HERALD_*` variables override it).
    #[arg(long, short, global = true, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (store, embedded bus, default warehouse).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// The bus: `embedded` (one process) or `kafka` (brokers from `kafka.brokers`).
    #[arg(long, global = true, value_enum)]
    bus: Option<BusArg>,
    /// Store URL: `sqlite://PATH` or `postgres://USER@HOST:PORT/DB` (overrides `store_url`).
    #[arg(long, global = true)]
    store: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs every role in one process: HTTP API, dispatch, warehouse sink.
    Serve {
        /// Address to listen on (overrides `http.listen`).
        #[arg(long)]
        listen: Option<String>,
        /// Roles to run: `all`, or a comma-separated list of ingest, dispatch, analytics.
        #[arg(long, default_value = "all")]
        roles: String,
    },
    /// Runs the ingest role alone: the HTTP API, publishing to the bus.
    Ingest {
        #[arg(long)]
        listen: Option<String>,
    },
    /// Runs the dispatch role alone: a member of the dispatch consumer group.
    Dispatch {
        /// Address of `/health` and `/metrics` for this process.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Runs the analytics role alone: the warehouse sink.
    Analytics {
        /// Address of `/health` and `/metrics` for this process.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Manages herald's Kafka topics.
    Kafka {
        #[command(subcommand)]
        command: KafkaCommand,
    },
    /// Manages apps (tenants) and their API keys.
    Apps {
        #[command(subcommand)]
        command: AppsCommand,
    },
    /// Manages the keys that seal account secrets and vendor tokens in the store.
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
    /// Runs read-only SQL over the warehouse and prints the result.
    Sql {
        /// The query, e.g. "SELECT state, count(*) FROM delivery_events GROUP BY state".
        #[arg(required_unless_present = "file")]
        query: Option<String>,
        /// Read the query from a file instead (the reports under `sql/reports/`).
        #[arg(long, conflicts_with = "query")]
        file: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Warehouse directory or `s3://bucket/prefix` (overrides the configured one).
        #[arg(long)]
        warehouse: Option<String>,
    },
    /// Runs the benchmark harness and prints figures beside their baselines.
    Bench(herald::bench::BenchArgs),
    /// Imports a vendor's bill and reconciles it with the delivery events; prints the summary.
    Reconcile(reconcile::ReconcileArgs),
    /// Maintains the warehouse (compaction of small files).
    Warehouse {
        #[command(subcommand)]
        command: warehouse::WarehouseCommand,
    },
    /// Scheduled campaigns: a template sent to every row of a CSV file.
    Campaign {
        #[command(subcommand)]
        command: campaign::CampaignCommand,
    },
}

#[derive(Subcommand)]
enum AppsCommand {
    /// Creates an app and prints its API key (shown once; only its hash is stored).
    Create { name: String },
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Prints a new random key entry (`id:base64`) for `security.secret_keys`.
    NewKey {
        /// The key's id (letters, digits, `-`).
        #[arg(default_value = "k1")]
        id: String,
    },
    /// Seals every account secret and vendor token with the first configured key: those in
    /// clear and those sealed with an older key.
    Rotate,
}

#[derive(Subcommand)]
enum KafkaCommand {
    /// Creates herald.requests, herald.delivery and herald.requests.dlq with the configured
    /// partitions and replication; topics that exist are left as they are.
    Init,
}

#[derive(Clone, Copy, ValueEnum)]
enum BusArg {
    Embedded,
    Kafka,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Csv,
    Json,
    /// A Parquet file on standard output (redirect it: `> result.parquet`).
    Parquet,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = Config::load(cli.config.as_deref(), std::env::vars())?;
    if let Some(dir) = cli.data_dir {
        config.data_dir = dir;
    }
    if let Some(bus) = cli.bus {
        config.bus_kind = match bus {
            BusArg::Embedded => BusKind::Embedded,
            BusArg::Kafka => BusKind::Kafka,
        };
    }
    if let Some(store) = cli.store {
        config.store_url = Some(store);
    }
    herald_core::telemetry::init_tracing(&config.log);
    match cli.command {
        Command::Serve { listen, roles } => serve(config, Roles::parse(&roles)?, listen).await,
        Command::Ingest { listen } => serve(config, Roles::INGEST, listen).await,
        Command::Dispatch { listen } => serve(config, Roles::DISPATCH, listen).await,
        Command::Analytics { listen } => serve(config, Roles::ANALYTICS, listen).await,
        Command::Kafka {
            command: KafkaCommand::Init,
        } => {
            let bus = KafkaBus::new(&config.kafka).context("cannot create the Kafka clients")?;
            for outcome in bus.ensure_topics(&herald_topics(&config.kafka)).await? {
                println!("{outcome}");
            }
            Ok(())
        }
        Command::Apps {
            command: AppsCommand::Create { name },
        } => {
            std::fs::create_dir_all(&config.data_dir)?;
            let store = Store::open(&config.store_url()).await?;
            let (app, key) = store
                .create_app(&name)
                .await
                .context("cannot create the app")?;
            println!("app:     {} (id {})", app.name, app.id);
            println!("api key: {key}");
            println!("Keep the key now: herald stores only its hash and cannot show it again.");
            Ok(())
        }
        Command::Secrets {
            command: SecretsCommand::NewKey { id },
        } => {
            let entry = herald_core::secrets::SecretBox::generate_entry(&id);
            herald_core::secrets::SecretBox::parse(&entry)?;
            println!("{entry}");
            Ok(())
        }
        Command::Secrets {
            command: SecretsCommand::Rotate,
        } => {
            let store = herald::open_store(&config).await?;
            let resealed = store.reseal_secrets().await?;
            println!("sealed {resealed} stored secrets with the first configured key");
            Ok(())
        }
        Command::Sql {
            query,
            file,
            format,
            warehouse,
        } => {
            let query = match (query, file) {
                (Some(query), _) => query,
                (None, Some(file)) => std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?,
                (None, None) => anyhow::bail!("give a query or --file"),
            };
            let location = warehouse.unwrap_or_else(|| config.warehouse_location());
            let warehouse = herald_analytics::Warehouse::open(&location)?;
            let batches = herald_analytics::sql::query_warehouse(&warehouse, &query).await?;
            let format = match format {
                Format::Table => herald_analytics::sql::OutputFormat::Table,
                Format::Csv => herald_analytics::sql::OutputFormat::Csv,
                Format::Json => herald_analytics::sql::OutputFormat::Json,
                Format::Parquet => herald_analytics::sql::OutputFormat::Parquet,
            };
            let bytes = herald_analytics::sql::encode(&batches, format)?;
            std::io::Write::write_all(&mut std::io::stdout().lock(), &bytes)?;
            Ok(())
        }
        Command::Bench(args) => herald::bench::run(args).await,
        Command::Campaign { command } => campaign::run(command).await,
        Command::Reconcile(args) => reconcile::run(&config, args).await,
        Command::Warehouse { command } => warehouse::run(&config, command).await,
    }
}

/// Runs `roles` until SIGINT or SIGTERM.
async fn serve(mut config: Config, roles: Roles, listen: Option<String>) -> anyhow::Result<()> {
    if let Some(listen) = listen {
        config.http.listen = listen;
    }
    let app = Application::build(config, roles).await?;
    tracing::info!(address = %app.address(), "herald is serving");
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    app.run(rx).await
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

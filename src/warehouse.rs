//! `herald warehouse compact`: merges the small files of `delivery_events` now, as the
//! analytics role does every `analytics.compact_interval` (the work is
//! `herald_analytics::Compactor`).

use anyhow::Context;
use herald_analytics::{Compactor, Warehouse};
use herald_core::config::Config;

/// The `herald warehouse` subcommands.
#[derive(clap::Subcommand)]
pub enum WarehouseCommand {
    /// Merges the small delivery_events files of hours older than `analytics.compact_after`
    /// and deletes what an interrupted compaction left. On a local warehouse, stop the
    /// analytics role first (it compacts by itself).
    Compact {
        /// Warehouse directory or `s3://bucket/prefix` (overrides the configured one).
        #[arg(long)]
        warehouse: Option<String>,
    },
}

/// Runs a `herald warehouse` subcommand.
pub async fn run(config: &Config, command: WarehouseCommand) -> anyhow::Result<()> {
    let WarehouseCommand::Compact { warehouse } = command;
    let location = warehouse.unwrap_or_else(|| config.warehouse_location());
    let wh = Warehouse::open(&location)?;
    let done = Compactor::new(wh, (&config.analytics).into())
        .pass_alone()
        .await
        .with_context(|| format!("cannot compact the warehouse {location}"))?;
    println!("{done}");
    Ok(())
}

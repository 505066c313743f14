//! `herald reconcile --vendor V --bill FILE --period YYYY-MM`: imports a vendor's bill into the
//! warehouse, reconciles it with herald's delivery events and prints the Markdown summary
//! (`--html FILE` also writes the HTML one; the work is `herald_analytics::reconcile`).

use anyhow::Context;
use herald_analytics::reconcile::{BillFormat, Period, reconcile};
use herald_core::config::Config;
use std::path::PathBuf;

/// Arguments of `herald reconcile`.
#[derive(clap::Args)]
pub struct ReconcileArgs {
    /// The vendor as on delivery events: `tencent`, `aliyun`, `yunpian`, ...
    #[arg(long)]
    vendor: String,
    /// The vendor's bill or delivery-detail export (CSV, UTF-8).
    #[arg(long)]
    bill: PathBuf,
    /// The month to reconcile, e.g. 2026-11 (calendar of `reconcile.utc_offset`).
    #[arg(long)]
    period: String,
    /// The bill's layout: `tencent`, `aliyun` or `generic` (`[reconcile.generic_columns]`);
    /// default: the vendor's own format, else `generic`.
    #[arg(long)]
    format: Option<String>,
    /// Warehouse directory or `s3://bucket/prefix` (overrides the configured one).
    #[arg(long)]
    warehouse: Option<String>,
    /// Also write the HTML summary to this file (the warehouse gets it beside `summary.md`).
    #[arg(long)]
    html: Option<PathBuf>,
}

/// Runs `herald reconcile`.
pub async fn run(config: &Config, args: ReconcileArgs) -> anyhow::Result<()> {
    let period: Period = args.period.parse()?;
    let format = match &args.format {
        Some(f) => f.parse()?,
        None => BillFormat::for_vendor(&args.vendor),
    };
    let warehouse = herald::open_warehouse(config, args.warehouse)?;
    let report = reconcile(
        &warehouse,
        &config.reconcile,
        &config.prices,
        &args.vendor,
        &args.bill,
        format,
        period,
    )
    .await
    .with_context(|| {
        format!(
            "cannot reconcile {} for {} {period}",
            args.bill.display(),
            args.vendor
        )
    })?;
    if let Some(path) = &args.html {
        std::fs::write(path, &report.html)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    print!("{}", report.summary);
    Ok(())
}

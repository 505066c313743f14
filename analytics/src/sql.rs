//! Read-only SQL over the warehouse with DataFusion, and formatting of the results.

use crate::error::AnalyticsError;
use crate::schema::{TABLE, schema};
use crate::stats::{Width, stats_schema};
use crate::warehouse::Warehouse;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::arrow::{csv, json};
use datafusion::catalog::view::ViewTable;
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTableUrl};
use datafusion::datasource::provider_as_source;
use datafusion::error::DataFusionError;
use datafusion::execution::context::{SQLOptions, SessionConfig, SessionContext};
use datafusion::logical_expr::{LogicalPlanBuilder, col, lit};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::scalar::ScalarValue;
use futures::StreamExt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub mod traces;

/// Runs one read-only SQL statement over the local warehouse at `warehouse_root`; see
/// [`query_warehouse`].
pub async fn query(warehouse_root: &Path, sql: &str) -> Result<Vec<RecordBatch>, AnalyticsError> {
    query_warehouse(&Warehouse::local(warehouse_root), sql).await
}

/// Runs one read-only SQL statement over `warehouse`, local or on an object store, over every
/// row of every table.
///
/// Every directory directly under the root whose name is a plain identifier (lowercase letters,
/// digits, `_`; not starting with `_`) is a table of Parquet files. `delivery_events` has the
/// columns of [`schema()`] plus the hive partition columns `dt` and `hour` (strings, so
/// `WHERE dt = '2026-11-26'` skips other days' files) and exists even when nothing was written
/// yet; so do `delivery_stats_minute` (partitions `dt`, `hour`) and `delivery_stats_hour`
/// (partition `dt`), with the columns of `sql/delivery_stats.sql` (see [`crate::stats`]);
/// other tables get their schema and `key=value` partition columns from their files. Every
/// string column, partition columns included, is a string view (`Utf8View`).
/// DDL, DML (`INSERT`, `COPY`) and other statements (`SET`) are rejected. A statement whose
/// read of the warehouse fails (a file another process deleted or replaced meanwhile) runs up
/// to three times.
pub async fn query_warehouse(
    warehouse: &Warehouse,
    sql: &str,
) -> Result<Vec<RecordBatch>, AnalyticsError> {
    collect(warehouse, sql, &Rows::All, Vec::new()).await
}

/// How many times a statement runs whose read of the warehouse failed: a file another process
/// deleted (compaction) or replaced (the stats aggregator) between the statement's listing and
/// its read.
const ATTEMPTS: u32 = 3;
/// The pause before a statement runs again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Runs `statement` until it succeeds, fails by a fault of the query itself
/// ([`AnalyticsError::is_query_fault`]), or has run [`ATTEMPTS`] times.
async fn again_after_read_faults<T, F>(
    mut statement: impl FnMut() -> F,
) -> Result<T, AnalyticsError>
where
    F: Future<Output = Result<T, AnalyticsError>>,
{
    let mut attempt = 1;
    loop {
        match statement().await {
            Err(error) if !error.is_query_fault() && attempt < ATTEMPTS => {
                tracing::debug!(%error, attempt, "reading the warehouse failed; again");
                attempt += 1;
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            answer => return answer,
        }
    }
}

/// Runs one read-only statement over `warehouse` as `rows` lets it see it, with `params` bound
/// to `$1`, `$2`, ..., and collects the result (again after a failed read).
async fn collect(
    warehouse: &Warehouse,
    sql: &str,
    rows: &Rows,
    params: Vec<ScalarValue>,
) -> Result<Vec<RecordBatch>, AnalyticsError> {
    again_after_read_faults(|| collect_once(warehouse, sql, rows, params.clone())).await
}

/// [`collect`], once.
async fn collect_once(
    warehouse: &Warehouse,
    sql: &str,
    rows: &Rows,
    params: Vec<ScalarValue>,
) -> Result<Vec<RecordBatch>, AnalyticsError> {
    let _reading = warehouse.reading().await;
    let mut frame = plan(warehouse, sql, rows).await?;
    if !params.is_empty() {
        frame = frame.with_param_values(params)?;
    }
    let schema = Arc::clone(frame.schema().inner());
    Ok(with_schema(frame.collect().await?, schema))
}

/// `batches`, or one empty batch when there are none, so an empty result keeps its columns.
fn with_schema(mut batches: Vec<RecordBatch>, schema: SchemaRef) -> Vec<RecordBatch> {
    if batches.is_empty() {
        batches.push(RecordBatch::new_empty(schema));
    }
    batches
}

/// Whose rows a query may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rows {
    /// Every row of every table: operators.
    All,
    /// Only the rows whose `app` column is this app's name; tables without an `app` column
    /// (vendor bills, reconciliation reports) do not exist for the query.
    App(String),
}

/// Runs one read-only SQL statement over `warehouse` as [`query_warehouse`] does, limited to
/// `rows`, and fails with [`AnalyticsError::TooManyRows`] as soon as the result passes
/// `max_rows` rows (the rest is never computed).
pub async fn query_limited(
    warehouse: &Warehouse,
    sql: &str,
    rows: &Rows,
    max_rows: usize,
) -> Result<Vec<RecordBatch>, AnalyticsError> {
    again_after_read_faults(|| query_limited_once(warehouse, sql, rows, max_rows)).await
}

/// [`query_limited`], once.
async fn query_limited_once(
    warehouse: &Warehouse,
    sql: &str,
    rows: &Rows,
    max_rows: usize,
) -> Result<Vec<RecordBatch>, AnalyticsError> {
    let _reading = warehouse.reading().await;
    let mut stream = plan(warehouse, sql, rows).await?.execute_stream().await?;
    let (mut batches, mut count) = (Vec::new(), 0);
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        count += batch.num_rows();
        if count > max_rows {
            return Err(AnalyticsError::TooManyRows(max_rows));
        }
        batches.push(batch);
    }
    Ok(with_schema(batches, stream.schema()))
}

/// Plans `sql` over the warehouse's tables as `rows` lets it see them (the caller holds
/// [`Warehouse::reading`] until the results are read).
async fn plan(
    warehouse: &Warehouse,
    sql: &str,
    rows: &Rows,
) -> Result<datafusion::dataframe::DataFrame, AnalyticsError> {
    let ctx = session()?;
    warehouse.register_store(&ctx)?;
    register_tables(&ctx, warehouse).await?;
    let ctx = match rows {
        Rows::All => ctx,
        Rows::App(app) => app_views(&ctx, app).await?,
    };
    let read_only = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    ctx.sql_with_options(sql, read_only)
        .await
        .map_err(|e| match e.find_root() {
            DataFusionError::Plan(m)
                if ["DDL", "DML", "Statement"]
                    .iter()
                    .any(|kind| m.starts_with(&format!("{kind} not supported"))) =>
            {
                AnalyticsError::NotReadOnly(m.clone())
            }
            _ => e.into(),
        })
}

/// A context holding, for each table of `all` with an `app` column, a view of the same name
/// over `app`'s rows only. The views hold the tables themselves, not their names, so no name a
/// query can write reaches another app's rows.
async fn app_views(all: &SessionContext, app: &str) -> Result<SessionContext, AnalyticsError> {
    let scoped = session()?;
    for name in all.catalog_names() {
        let Some(catalog) = all.catalog(&name) else {
            continue;
        };
        for schema_name in catalog.schema_names() {
            let Some(schema) = catalog.schema(&schema_name) else {
                continue;
            };
            for table in schema.table_names() {
                let Some(provider) = schema.table(&table).await? else {
                    continue;
                };
                if provider.schema().field_with_name("app").is_err() {
                    continue;
                }
                let plan =
                    LogicalPlanBuilder::scan(table.as_str(), provider_as_source(provider), None)?
                        .filter(col("app").eq(lit(app)))?
                        .build()?;
                scoped.register_table(table.as_str(), Arc::new(ViewTable::new(plan, None)))?;
            }
        }
    }
    Ok(scoped)
}

/// A DataFusion context with DataFusion's defaults and herald's [hive-aware
/// settings](hive_aware), each overridden by its `DATAFUSION_*` environment variable
/// (`DATAFUSION_EXECUTION_TARGET_PARTITIONS=4` sets `datafusion.execution.target_partitions`),
/// so that operators can tune queries without `SET`.
fn session() -> Result<SessionContext, AnalyticsError> {
    let mut config = SessionConfig::from_env()?;
    let options = config.options_mut();
    for (key, value) in hive_aware(options.execution.target_partitions) {
        let variable = key.to_uppercase().replace('.', "_");
        if std::env::var_os(variable).is_none() {
            options.set(key, &value.to_string())?;
        }
    }
    Ok(SessionContext::new_with_config(config))
}

/// herald's settings over DataFusion's defaults, for `partitions` target partitions: when a
/// table's files fall into at least as many `key=value` partitions as there are target
/// partitions, each scan partition reads whole hive partitions (dealt out round-robin in
/// partition order) and says so (hash-partitioned on the partition columns), and an aggregate
/// whose `GROUP BY` includes those columns then runs in one phase per scan partition, without
/// exchanging rows. DataFusion accepts that at four partitions and more; herald lowers the
/// threshold to the number of target partitions below four. The hourly aggregate (`GROUP BY
/// dt, hour, …`) skips its repartition and its partial states, which for `percentile_cont`
/// are every value. The price: such a scan does not split a large file, and a few partitions
/// of unequal size load the scan partitions unequally.
fn hive_aware(partitions: usize) -> [(&'static str, usize); 2] {
    [
        ("datafusion.optimizer.preserve_file_partitions", partitions),
        (
            "datafusion.optimizer.subset_repartition_threshold",
            partitions.min(4),
        ),
    ]
}

async fn register_tables(ctx: &SessionContext, wh: &Warehouse) -> Result<(), AnalyticsError> {
    let mut tables = wh.root_dirs().await?;
    tables.retain(|name| is_table_name(name));
    let parquet =
        || ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let mut fixed = vec![(TABLE, schema(), partition_columns())];
    for width in [Width::Minute, Width::Hour] {
        fixed.push((
            width.table(),
            stats_schema(width).await?,
            width.partition_columns(),
        ));
    }
    for (name, table_schema, partitions) in fixed {
        let table_schema = with_string_views(&table_schema);
        let partitions: Vec<(String, DataType)> = partitions
            .into_iter()
            .map(|(n, t)| (n, as_string_view(t)))
            .collect();
        if tables.iter().any(|t| t == name) {
            let url = ListingTableUrl::parse(wh.table_url(name))?;
            let options = parquet().with_table_partition_cols(partitions);
            ctx.register_listing_table(name, url.as_str(), options, Some(table_schema), None)
                .await?;
            continue;
        }
        let mut fields = table_schema.fields().to_vec();
        fields.extend(
            partitions
                .into_iter()
                .map(|(n, t)| Arc::new(Field::new(n, t, false))),
        );
        let empty = MemTable::try_new(Arc::new(Schema::new(fields)), vec![vec![]])?;
        ctx.register_table(name, Arc::new(empty))?;
    }
    for name in tables {
        if ctx.table_exist(name.as_str())? {
            continue;
        }
        let url = ListingTableUrl::parse(wh.table_url(&name))?;
        let state = ctx.state();
        let partitions = parquet().infer_partitions(&state, &url).await?;
        let options = parquet().with_table_partition_cols(
            partitions
                .into_iter()
                .map(|p| (p, DataType::Utf8))
                .collect(),
        );
        match options.infer_schema(&state, &url).await {
            Ok(table_schema) => {
                ctx.register_listing_table(
                    name.as_str(),
                    url.as_str(),
                    options,
                    Some(table_schema),
                    None,
                )
                .await?
            }
            // A table directory without files yet has no schema to offer: leave it out.
            Err(e) => tracing::debug!(table = %name, error = %e, "not registering table"),
        }
    }
    Ok(())
}

/// `schema` with every string column read as a string view (`Utf8View`), as DataFusion reads
/// the tables whose schema it infers: the Parquet reader then keeps a column's strings in its
/// decoded pages instead of copying each into a new buffer, and grouping and comparing short
/// strings (at most 12 bytes, kept inside their view) is cheaper. The hourly aggregate of the
/// benchmark took about a third longer with plain strings.
fn with_string_views(schema: &Schema) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| {
            f.as_ref()
                .clone()
                .with_data_type(as_string_view(f.data_type().clone()))
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// `Utf8View` for `Utf8`, else `data_type`.
fn as_string_view(data_type: DataType) -> DataType {
    match data_type {
        DataType::Utf8 => DataType::Utf8View,
        other => other,
    }
}

fn partition_columns() -> Vec<(String, DataType)> {
    vec![
        ("dt".into(), DataType::Utf8),
        ("hour".into(), DataType::Utf8),
    ]
}

fn is_table_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// How [`format`] renders query results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// An aligned text table with a header.
    Table,
    /// CSV with a header line.
    Csv,
    /// Newline-delimited JSON: one object per row, nulls written as `null`.
    Json,
    /// A Parquet file (binary: see [`encode`]).
    Parquet,
}

impl FromStr for OutputFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "table" => Ok(OutputFormat::Table),
            "csv" => Ok(OutputFormat::Csv),
            "json" => Ok(OutputFormat::Json),
            "parquet" => Ok(OutputFormat::Parquet),
            _ => Err(format!(
                "unknown output format `{s}` (expected table, csv, json or parquet)"
            )),
        }
    }
}

/// Renders `batches` as text in `format`; Parquet is not text (use [`encode`]).
pub fn format(batches: &[RecordBatch], format: OutputFormat) -> Result<String, AnalyticsError> {
    if format == OutputFormat::Parquet {
        return Err(AnalyticsError::Corrupt(
            "Parquet output is binary, not text".into(),
        ));
    }
    // Every text writer emits UTF-8 only.
    String::from_utf8(encode(batches, format)?).map_err(|e| AnalyticsError::Corrupt(e.to_string()))
}

/// Encodes `batches` in `format`.
pub fn encode(batches: &[RecordBatch], format: OutputFormat) -> Result<Vec<u8>, AnalyticsError> {
    Ok(match format {
        OutputFormat::Table => format!("{}\n", pretty_format_batches(batches)?).into_bytes(),
        OutputFormat::Csv => {
            let mut w = csv::WriterBuilder::new()
                .with_header(true)
                .build(Vec::new());
            for b in batches {
                w.write(b)?;
            }
            w.into_inner()
        }
        OutputFormat::Json => {
            let mut w = json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, json::writer::LineDelimited>(Vec::new());
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
            w.into_inner()
        }
        OutputFormat::Parquet => {
            let Some(first) = batches.first() else {
                return Err(AnalyticsError::Corrupt(
                    "a result without columns cannot be written as Parquet".into(),
                ));
            };
            let mut w = ArrowWriter::try_new(Vec::new(), first.schema(), None)?;
            for b in batches {
                w.write(b)?;
            }
            w.into_inner()?
        }
    })
}

#[cfg(test)]
mod tests;

//! The crate's error type.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in the sink, the warehouse and the SQL layer.
#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    #[error("warehouse I/O failed on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("arrow: {0}")]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] datafusion::parquet::errors::ParquetError),
    #[error("query: {0}")]
    DataFusion(Box<datafusion::error::DataFusionError>),
    #[error("bus: {0}")]
    Bus(#[from] herald_core::bus::BusError),
    #[error("event index: {0}")]
    Index(#[source] anyhow::Error),
    #[error("object store I/O failed on {location}: {source}")]
    ObjectStore {
        location: String,
        #[source]
        source: object_store::Error,
    },
    #[error("warehouse location `{location}`: {reason}")]
    Location { location: String, reason: String },
    #[error("manifest {location}: {reason}")]
    Manifest { location: String, reason: String },
    #[error("warehouse data: {0}")]
    Corrupt(String),
    #[error("the result has more than {0} rows: narrow the query or add LIMIT")]
    TooManyRows(usize),
    #[error("only statements that read are allowed ({0})")]
    NotReadOnly(String),
    #[error("background task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

impl AnalyticsError {
    /// Whether the same operation may succeed later (I/O, a bus hiccup, the index's store, an
    /// object store request other than a refused precondition or an unsupported operation).
    pub fn is_retryable(&self) -> bool {
        match self {
            AnalyticsError::Io { .. } | AnalyticsError::Parquet(_) | AnalyticsError::Index(_) => {
                true
            }
            AnalyticsError::Bus(e) => e.is_retryable(),
            AnalyticsError::ObjectStore { source, .. } => !matches!(
                source,
                object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::UnknownConfigurationKey { .. }
            ),
            _ => false,
        }
    }
}

impl AnalyticsError {
    /// Whether a query failed through its own fault — its syntax, an unknown table or column, a
    /// type error, a statement that writes, too large a result — rather than the warehouse's
    /// (I/O, an unreadable file), so its message is for the query's author.
    pub fn is_query_fault(&self) -> bool {
        use datafusion::arrow::error::ArrowError as A;
        use datafusion::error::DataFusionError as E;
        match self {
            AnalyticsError::NotReadOnly(_) | AnalyticsError::TooManyRows(_) => true,
            AnalyticsError::DataFusion(e) => match e.find_root() {
                E::SQL(..) | E::Plan(_) | E::SchemaError(..) | E::NotImplemented(_) => true,
                E::Execution(_) => true,
                E::ArrowError(a, _) => !matches!(**a, A::IoError(..) | A::ExternalError(_)),
                _ => false,
            },
            _ => false,
        }
    }
}

impl From<datafusion::error::DataFusionError> for AnalyticsError {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        AnalyticsError::DataFusion(Box::new(e))
    }
}

/// Attaches the path an I/O error happened on.
pub(crate) trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T, AnalyticsError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &Path) -> Result<T, AnalyticsError> {
        self.map_err(|source| AnalyticsError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

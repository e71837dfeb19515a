//! The export's one error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The episode is incomplete or fails validation and `--allow-incomplete` was not
    /// given.
    #[error("{dir}: {verdict} ({problems} problem(s){first}); export refuses it without --allow-incomplete")]
    NotValid {
        dir: PathBuf,
        verdict: &'static str,
        problems: usize,
        first: String,
    },
    #[error("{dir}: meta.json: {message}")]
    Meta { dir: PathBuf, message: String },
    #[error("{file}:{line}: {message}")]
    Row {
        file: PathBuf,
        line: u64,
        message: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("{context}: {source}")]
    Arrow {
        context: String,
        #[source]
        source: arrow_schema::ArrowError,
    },
    #[error("{0}")]
    Output(String),
    /// The read-back check found a value that differs from the episode's.
    #[error("{0}")]
    Mismatch(String),
}

impl ExportError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| ExportError::Io { path, source }
    }
}

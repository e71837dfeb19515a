//! The crate's one error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("json: {0}")]
    Json(#[source] serde_json::Error),
    /// Bad input from the user (exit code 2): a pid that does not exist, a used episode id…
    #[error("{0}")]
    Usage(String),
    #[error("malformed {what}: {detail}")]
    Parse { what: &'static str, detail: String },
    #[error("episode {0} already exists; episode ids are never reused")]
    EpisodeExists(PathBuf),
    #[error("BPF backend unavailable: {0}")]
    BpfUnavailable(#[source] crate::bpf::error::BpfError),
    #[error("export: {0}")]
    Export(#[from] crate::export::ExportError),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn parse(what: &'static str, detail: impl Into<String>) -> Self {
        Error::Parse {
            what,
            detail: detail.into(),
        }
    }

    /// Process exit code for this error: 2 for bad input, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) | Error::EpisodeExists(_) => 2,
            _ => 1,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

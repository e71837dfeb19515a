//! The shipper's one error type. Store failures are classified once ([`StoreFault`]) so
//! the command can say what to fix (the endpoint, the bucket, the credentials) and
//! `--watch` knows which ones are worth waiting out.

use std::path::PathBuf;

/// What kind of store failure an error is, from the first request that saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFault {
    /// No answer: connection refused, reset, timed out, DNS (worth retrying).
    Unreachable,
    /// The bucket does not exist (S3 `NoSuchBucket`).
    NoBucket,
    /// The store refused the credentials or the signature (401/403).
    Credentials,
    /// Anything else the store answered (5xx after retries, a malformed reply).
    Other,
}

impl StoreFault {
    /// Classify an object_store error by its variant and, for the variants object_store
    /// leaves generic, by the S3 error code or the transport's message in its chain.
    pub fn of(e: &object_store::Error) -> StoreFault {
        use object_store::Error as E;
        if matches!(e, E::PermissionDenied { .. } | E::Unauthenticated { .. }) {
            return StoreFault::Credentials;
        }
        let text = chain_text(e);
        classify_text(&text)
    }
}

/// The error and every source below it, one string (object_store wraps reqwest wraps
/// hyper wraps the io error: the useful words are at the bottom).
pub fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        // object_store's messages already carry their source's text; add only what is new.
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The pure part of [`StoreFault::of`], unit-tested on the texts real failures print.
pub fn classify_text(text: &str) -> StoreFault {
    let has = |w: &str| text.contains(w);
    if has("NoSuchBucket") || has("The specified bucket does not exist") {
        StoreFault::NoBucket
    } else if has("InvalidAccessKeyId")
        || has("SignatureDoesNotMatch")
        || has("AccessDenied")
        || has("403 Forbidden")
        || has("401 Unauthorized")
    {
        StoreFault::Credentials
    } else if has("Connection refused")
        || has("connection refused")
        || has("error sending request")
        || has("error trying to connect")
        || has("connection closed before message completed")
        || has("Connection reset")
        || has("timed out")
        || has("dns error")
    {
        StoreFault::Unreachable
    } else {
        StoreFault::Other
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {hint}: {detail}")]
    Store {
        fault: StoreFault,
        what: String,
        hint: &'static str,
        detail: String,
    },
    /// An uploaded object read back differs from what was sent: nothing is recorded as
    /// shipped.
    #[error("{key}: verification failed after upload: {message}")]
    Verify { key: String, message: String },
    /// The episode's own files disagree with its manifest, or cannot be read safely.
    #[error("{dir}: {message}")]
    Episode { dir: PathBuf, message: String },
    #[error(transparent)]
    Export(#[from] crate::export::ExportError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ShipError {
    /// A store error for `what` (an operation and key), classified, with the hint a user
    /// needs.
    pub fn store(what: impl Into<String>, e: &object_store::Error) -> ShipError {
        let fault = StoreFault::of(e);
        let hint = match fault {
            StoreFault::Unreachable => {
                "the store is unreachable (check --endpoint / AWS_ENDPOINT and that it is up)"
            }
            StoreFault::NoBucket => "the bucket does not exist (create it first)",
            StoreFault::Credentials => {
                "the store refused the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            }
            StoreFault::Other => "the store failed the request",
        };
        ShipError::Store {
            fault,
            what: what.into(),
            hint,
            detail: chain_text(e),
        }
    }

    /// Whether waiting may fix it (`--watch` retries these with backoff).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ShipError::Store {
                fault: StoreFault::Unreachable | StoreFault::Other,
                ..
            }
        )
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| ShipError::Io { path, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_told_apart_by_what_s3_and_the_transport_say() {
        assert_eq!(
            classify_text("Generic S3 error: Error performing list request: Received redirect without LOCATION, this normally indicates an incorrectly configured region: <Code>NoSuchBucket</Code>"),
            StoreFault::NoBucket
        );
        assert_eq!(
            classify_text("Client error with status 403 Forbidden: <Error><Code>SignatureDoesNotMatch</Code></Error>"),
            StoreFault::Credentials
        );
        assert_eq!(
            classify_text("Generic S3 error: HTTP error: error sending request: client error (Connect): tcp connect error: Connection refused (os error 111)"),
            StoreFault::Unreachable
        );
        assert_eq!(
            classify_text("Server returned non-2xx status code: 500 Internal Server Error"),
            StoreFault::Other
        );
    }
}

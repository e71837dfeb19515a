//! meta.json: the episode's description, written atomically at start and at end.

use serde::Deserialize;
use serde_json::Value;

pub use crate::contract::meta::*;

/// The caller-supplied `--meta FILE` keys, validated so a typo is an error, not lost data.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserMeta {
    pub image_name: Option<String>,
    pub image_sha256: Option<String>,
    pub snapshot_name: Option<String>,
    pub exploit: Option<Value>,
    pub sample: Option<Value>,
    pub baseline_seconds: Option<f64>,
    pub infected_seconds: Option<f64>,
    pub dormant_seconds: Option<f64>,
}

/// `--meta` files are small JSON objects; anything larger is refused before it is read
/// into memory (a 200 MiB file once cost 620 MB of RSS).
pub const USER_META_MAX_BYTES: u64 = 1 << 20;

impl UserMeta {
    /// Read and parse a `--meta` file: only a regular file (a FIFO would block the
    /// capture's start forever) of at most [`USER_META_MAX_BYTES`].
    pub fn read_file(path: &std::path::Path) -> Result<Self, String> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| e.to_string())?;
        let md = file.metadata().map_err(|e| e.to_string())?;
        if !md.is_file() {
            return Err("not a regular file".into());
        }
        if md.len() > USER_META_MAX_BYTES {
            return Err(format!(
                "{} bytes; a --meta file may hold at most {USER_META_MAX_BYTES} bytes",
                md.len()
            ));
        }
        let mut text = String::new();
        file.take(USER_META_MAX_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| e.to_string())?;
        if text.len() as u64 > USER_META_MAX_BYTES {
            return Err(format!(
                "grew past {USER_META_MAX_BYTES} bytes while it was read"
            ));
        }
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        if !value.is_object() {
            return Err("must be a JSON object".into());
        }
        serde_json::from_value(value).map_err(|e| {
            format!(
                "{e} (accepted keys: image_name, image_sha256, snapshot_name, exploit, sample, \
                 baseline_seconds, infected_seconds, dormant_seconds)"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_meta_accepts_known_keys_and_refuses_typos() {
        let m =
            UserMeta::parse(r#"{"image_name":"win10","exploit":{"cve":"CVE-1"},"sample":null}"#)
                .unwrap();
        assert_eq!(m.image_name.as_deref(), Some("win10"));
        assert_eq!(m.exploit.unwrap()["cve"], "CVE-1");
        let err = UserMeta::parse(r#"{"imag_name":"x"}"#).unwrap_err();
        assert!(err.contains("imag_name"), "{err}");
        assert!(UserMeta::parse("[1]").is_err());
        assert!(UserMeta::parse("{").is_err());
    }

    #[test]
    fn oversized_meta_file_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.json");
        let f = std::fs::File::create(&big).unwrap();
        // Sparse: 200 MiB on paper, nothing on disk; refused by its size alone.
        f.set_len(200 << 20).unwrap();
        let err = UserMeta::read_file(&big).unwrap_err();
        assert!(err.contains("at most"), "{err}");
        let fifo = dir.path().join("fifo.json");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(
            UserMeta::read_file(&fifo).unwrap_err(),
            "not a regular file"
        );
        let ok = dir.path().join("ok.json");
        std::fs::write(&ok, r#"{"image_name":"w"}"#).unwrap();
        assert_eq!(
            UserMeta::read_file(&ok).unwrap().image_name.as_deref(),
            Some("w")
        );
    }
}

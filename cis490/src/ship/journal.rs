//! Multipart uploads that outlive the shipper: after each part lands, the upload's id and
//! the parts the store acknowledged are written to a small journal file, so a shipper
//! killed half-way through a large file resumes at its next part instead of sending the
//! whole file again.
//!
//! A journal is used only for a file the manifest vouches for, and only when it names the
//! same key, size, sha256 and part size: the parts already in the store are then the bytes
//! of this very file. The shipper still reads and hashes every byte (without sending the
//! parts already there) and completes the upload only when the whole file's sha256 is the
//! manifest's. Journals live outside the data root (`--state-dir`, by default
//! `$XDG_STATE_HOME/cis490/ship` or `~/.local/state/cis490/ship`, mode 0700): `ship` never
//! writes into the data root.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::jsonl::hex;

/// One multipart upload in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub upload_id: String,
    pub size: u64,
    pub sha256: String,
    pub part_bytes: usize,
    /// The store's ids of parts 0, 1, … (a contiguous prefix of the file).
    pub parts: Vec<String>,
}

/// The journal directory of one store (endpoint and bucket).
pub struct Journal {
    dir: PathBuf,
    store: String,
}

/// A journal never grows past this (a 1 TB file in 8 MiB parts has 125,000 ids).
const MAX_JOURNAL_BYTES: u64 = 16 << 20;

impl Journal {
    /// The default directory: `$XDG_STATE_HOME/cis490/ship`, else
    /// `$HOME/.local/state/cis490/ship`; None without either.
    pub fn default_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_STATE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| PathBuf::from(h).join(".local/state"))
            })?;
        Some(base.join("cis490").join("ship"))
    }

    /// Open (creating it 0700) the journal directory for uploads to `store` (endpoint and
    /// bucket, so two stores never share an entry).
    pub fn open(dir: &Path, store: &str) -> std::io::Result<Journal> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let md = std::fs::symlink_metadata(dir)?;
        if !md.is_dir() {
            return Err(std::io::Error::other(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        if md.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(Journal {
            dir: dir.to_owned(),
            store: store.to_owned(),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        let id = hex(&Sha256::digest(format!("{}\n{key}", self.store).as_bytes()));
        self.dir.join(format!("{}.json", &id[..32]))
    }

    /// The upload of `key` to resume, if one was recorded for exactly this file.
    pub fn load(&self, key: &str, size: u64, sha256: &str, part_bytes: usize) -> Option<Entry> {
        let bytes = crate::untrusted::read_capped(&self.path(key), MAX_JOURNAL_BYTES).ok()?;
        let e: Entry = serde_json::from_slice(&bytes).ok()?;
        let parts_fit = (e.parts.len() as u64).saturating_mul(part_bytes as u64) < size;
        (e.key == key
            && e.size == size
            && e.sha256 == sha256
            && e.part_bytes == part_bytes
            && !e.upload_id.is_empty()
            && parts_fit)
            .then_some(e)
    }

    /// Record `e` (atomically: a killed shipper leaves the previous entry or this one).
    pub fn save(&self, e: &Entry) -> Result<(), String> {
        let bytes = serde_json::to_vec(e).map_err(|x| x.to_string())?;
        crate::episode::dir::write_file_replacing(&self.path(&e.key), &bytes, 0o600)
            .map_err(|x| x.to_string())
    }

    pub fn remove(&self, key: &str) {
        let _ = std::fs::remove_file(self.path(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            key: "p/raw/E1/telemetry-proc.jsonl".into(),
            upload_id: "u-1".into(),
            size: 20 << 20,
            sha256: "ab".repeat(32),
            part_bytes: 8 << 20,
            parts: vec!["e0".into()],
        }
    }

    #[test]
    fn an_entry_resumes_only_the_same_file_to_the_same_store() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let j = Journal::open(&dir, "http://127.0.0.1:9000\nbucket").unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let e = entry();
        j.save(&e).unwrap();
        assert_eq!(
            j.load(&e.key, e.size, &e.sha256, e.part_bytes),
            Some(e.clone())
        );
        // Another size, sha256, part size or key: not this file's upload.
        assert_eq!(j.load(&e.key, e.size + 1, &e.sha256, e.part_bytes), None);
        assert_eq!(j.load(&e.key, e.size, &"cd".repeat(32), e.part_bytes), None);
        assert_eq!(j.load(&e.key, e.size, &e.sha256, 5 << 20), None);
        assert_eq!(
            j.load("p/raw/E1/other", e.size, &e.sha256, e.part_bytes),
            None
        );
        // Another store never sees it.
        let other = Journal::open(&dir, "http://127.0.0.1:9001\nbucket").unwrap();
        assert_eq!(other.load(&e.key, e.size, &e.sha256, e.part_bytes), None);
        // More parts than the file can have, or garbage: ignored, not trusted.
        let mut too_many = e.clone();
        too_many.parts = vec!["x".into(); 3];
        j.save(&too_many).unwrap();
        assert_eq!(j.load(&e.key, e.size, &e.sha256, e.part_bytes), None);
        std::fs::write(j.path(&e.key), b"{not json").unwrap();
        assert_eq!(j.load(&e.key, e.size, &e.sha256, e.part_bytes), None);
        j.remove(&e.key);
        assert!(!j.path(&e.key).exists());
    }
}

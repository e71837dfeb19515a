//! Append-only JSON-lines file with the bookkeeping the manifest needs.
//!
//! Lines are buffered (bounded: at most `BUF_LIMIT` bytes before a write), the sha256,
//! byte and line counts are kept incrementally so closing a multi-GiB stream does not
//! re-read it, and `flush_if_due` pushes the buffer to the kernel at least once a second.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::row::Row;

const BUF_LIMIT: usize = 64 * 1024;
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// Size, line count and checksum of one closed file, as listed in manifest.json.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct FileStats {
    pub name: String,
    pub bytes: u64,
    pub lines: u64,
    pub sha256: String,
}

pub struct JsonlWriter {
    name: String,
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    hasher: Sha256,
    bytes: u64,
    lines: u64,
    last_flush: Instant,
}

impl JsonlWriter {
    /// Create `dir/name`; an existing file is an error (episodes are never overwritten).
    pub fn create(dir: &Path, name: &str) -> Result<Self, Error> {
        let path = dir.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        Ok(Self {
            name: name.to_owned(),
            path,
            file,
            buf: Vec::with_capacity(BUF_LIMIT),
            hasher: Sha256::new(),
            bytes: 0,
            lines: 0,
            last_flush: Instant::now(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn lines(&self) -> u64 {
        self.lines
    }

    pub fn write_row(&mut self, row: &Row) -> Result<(), Error> {
        let start = self.buf.len();
        row.write_json_line(&mut self.buf);
        self.account(start);
        self.spill_if_full()
    }

    /// Write any serializable value as one line.
    pub fn write_value<T: Serialize>(&mut self, value: &T) -> Result<(), Error> {
        let start = self.buf.len();
        serde_json::to_writer(&mut self.buf, value).map_err(Error::Json)?;
        self.buf.push(b'\n');
        self.account(start);
        self.spill_if_full()
    }

    fn account(&mut self, start: usize) {
        let line = &self.buf[start..];
        self.hasher.update(line);
        self.bytes += line.len() as u64;
        self.lines += 1;
    }

    fn spill_if_full(&mut self) -> Result<(), Error> {
        if self.buf.len() >= BUF_LIMIT {
            self.flush()?;
        }
        Ok(())
    }

    /// Flush when the last flush is older than [`FLUSH_EVERY`].
    pub fn flush_if_due(&mut self) -> Result<(), Error> {
        if self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush()?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), Error> {
        self.last_flush = Instant::now();
        if self.buf.is_empty() {
            return Ok(());
        }
        let res = self.file.write_all(&self.buf);
        // Whatever happened, never keep growing the buffer: on a full disk the lines that
        // did not fit are lost (and the manifest would then disagree), so the caller must
        // end the episode as `error`.
        self.buf.clear();
        res.map_err(|e| Error::io(format!("writing {}", self.path.display()), e))
    }

    /// Flush, fsync and return the manifest entry.
    pub fn close(mut self) -> Result<FileStats, Error> {
        self.flush()?;
        self.file
            .sync_all()
            .map_err(|e| Error::io(format!("syncing {}", self.path.display()), e))?;
        Ok(FileStats {
            name: self.name,
            bytes: self.bytes,
            lines: self.lines,
            sha256: hex(&self.hasher.finalize()),
        })
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        write!(s, "{b:02x}").expect("write to String");
    }
    s
}

/// sha256/size/lines of a file already on disk (meta.json, or a re-check by `validate`).
pub fn stats_of_file(path: &Path) -> Result<FileStats, Error> {
    let data =
        std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    Ok(FileStats {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        bytes: data.len() as u64,
        lines: data.iter().filter(|&&b| b == b'\n').count() as u64,
        sha256: hex(&Sha256::digest(&data)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Stamp;

    #[test]
    fn incremental_stats_match_the_file_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = JsonlWriter::create(dir.path(), "telemetry-proc.jsonl").unwrap();
        for i in 0..5000u64 {
            let mut row = Row::new(
                Stamp {
                    t_mono_ns: i,
                    t_wall_ns: i,
                },
                "proc",
                false,
            );
            row.push("on_cpu_ns", i * 3);
            w.write_row(&row).unwrap();
        }
        w.write_value(&serde_json::json!({"event": "x"})).unwrap();
        let stats = w.close().unwrap();
        let on_disk = stats_of_file(&dir.path().join("telemetry-proc.jsonl")).unwrap();
        assert_eq!(stats, on_disk);
        assert_eq!(stats.lines, 5001);
    }

    #[test]
    fn existing_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("events.jsonl"), b"old\n").unwrap();
        assert!(JsonlWriter::create(dir.path(), "events.jsonl").is_err());
        assert_eq!(
            std::fs::read(dir.path().join("events.jsonl")).unwrap(),
            b"old\n"
        );
    }
}

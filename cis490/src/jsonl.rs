//! Append-only JSON-lines file with the bookkeeping the manifest needs.
//!
//! Lines are buffered (bounded: at most `BUF_LIMIT` bytes before a write), the sha256,
//! byte and line counts are kept incrementally so closing a multi-GiB stream does not
//! re-read it, and `flush_if_due` pushes the buffer to the kernel at least once a second.
//!
//! With [`Compression::Zstd`] the stream is a zstd frame (`.jsonl.zst`, read directly by
//! DuckDB and pandas); each flush ends a zstd block, so a capture killed hard still leaves
//! a prefix that streaming decoders read. The manifest then lists the compressed file's
//! size and sha256, and its `lines` count is the number of JSON lines inside.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::episode::EpisodeDir;
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

/// How telemetry streams are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Compression {
    #[default]
    None,
    Zstd,
}

impl Compression {
    /// The file name for a stream `base` (`telemetry-x.jsonl`).
    pub fn file_name(self, base: &str) -> String {
        match self {
            Compression::None => base.to_owned(),
            Compression::Zstd => format!("{base}.zst"),
        }
    }
}

/// The file plus what the manifest needs about the bytes that reach it.
struct Hashed {
    file: File,
    hasher: Sha256,
    bytes: u64,
}

impl Write for Hashed {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(data)?;
        self.hasher.update(&data[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

enum Sink {
    Plain(Hashed),
    Zstd(zstd::stream::write::Encoder<'static, Hashed>),
}

impl Sink {
    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Plain(h) => h.write_all(data),
            // Each flush ends a zstd block, so what is on disk is always decodable.
            Sink::Zstd(z) => z.write_all(data).and_then(|()| z.flush()),
        }
    }

    fn finish(self) -> std::io::Result<Hashed> {
        match self {
            Sink::Plain(h) => Ok(h),
            Sink::Zstd(z) => z.finish(),
        }
    }
}

impl FileStats {
    /// The manifest entry of a stream that failed to close: its figures are unknown, and
    /// `episode::finish` rebuilds them from the file on disk.
    pub fn unknown(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            bytes: 0,
            lines: 0,
            sha256: String::new(),
        }
    }
}

pub struct JsonlWriter {
    name: String,
    path: PathBuf,
    sink: Option<Sink>,
    buf: Vec<u8>,
    lines: u64,
    last_flush: Instant,
}

impl JsonlWriter {
    /// Create `dir/name`; an existing file (or a symlink planted there) is an error:
    /// episodes are never overwritten, and writes never follow symlinks.
    pub fn create(dir: &EpisodeDir, name: &str) -> Result<Self, Error> {
        Self::create_with(dir, name, Compression::None)
    }

    /// Create `dir/name` (plus `.zst` when compressed).
    pub fn create_with(
        dir: &EpisodeDir,
        name: &str,
        compression: Compression,
    ) -> Result<Self, Error> {
        let name = compression.file_name(name);
        let path = dir.join(&name);
        let file = dir.create_file(&name)?;
        let hashed = Hashed {
            file,
            hasher: Sha256::new(),
            bytes: 0,
        };
        let sink = match compression {
            Compression::None => Sink::Plain(hashed),
            Compression::Zstd => Sink::Zstd(
                zstd::stream::write::Encoder::new(hashed, 3)
                    .map_err(|e| Error::io(format!("starting zstd for {}", path.display()), e))?,
            ),
        };
        Ok(Self {
            name,
            path,
            sink: Some(sink),
            buf: Vec::with_capacity(BUF_LIMIT),
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

    fn account(&mut self, _start: usize) {
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
        let res = match self.sink.as_mut() {
            Some(sink) => sink.write_all(&self.buf),
            None => Ok(()),
        };
        // Whatever happened, never keep growing the buffer: on a full disk the lines that
        // did not fit are lost (and the manifest would then disagree), so the caller must
        // end the episode as `error`.
        self.buf.clear();
        res.map_err(|e| Error::io(format!("writing {}", self.path.display()), e))
    }

    /// Flush, fsync and return the manifest entry.
    pub fn close(mut self) -> Result<FileStats, Error> {
        self.flush()?;
        let sink = self
            .sink
            .take()
            .ok_or_else(|| Error::Other("stream closed twice".into()))?;
        let hashed = sink
            .finish()
            .and_then(|h| h.file.sync_all().map(|()| h))
            .map_err(|e| Error::io(format!("closing {}", self.path.display()), e))?;
        Ok(FileStats {
            name: self.name,
            bytes: hashed.bytes,
            lines: self.lines,
            sha256: hex(&hashed.hasher.finalize()),
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

/// Open a stream for reading line by line, decoding it when it is a `.zst` file.
/// A zstd frame cut short by a hard kill reads as an error after its last whole block.
pub fn open_stream(path: &Path) -> std::io::Result<Box<dyn std::io::BufRead>> {
    let file = File::open(path)?;
    if path.extension().is_some_and(|e| e == "zst") {
        Ok(Box::new(std::io::BufReader::with_capacity(
            1 << 16,
            zstd::stream::read::Decoder::new(file)?,
        )))
    } else {
        Ok(Box::new(std::io::BufReader::with_capacity(1 << 16, file)))
    }
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
        let ep = EpisodeDir::open_existing(dir.path()).unwrap();
        let mut w = JsonlWriter::create(&ep, "telemetry-proc.jsonl").unwrap();
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
    fn zstd_stream_decodes_to_the_rows_and_stats_describe_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ep = EpisodeDir::open_existing(dir.path()).unwrap();
        let mut w =
            JsonlWriter::create_with(&ep, "telemetry-proc.jsonl", Compression::Zstd).unwrap();
        let mut plain = Vec::new();
        for i in 0..3000u64 {
            let mut row = Row::new(
                Stamp {
                    t_mono_ns: i,
                    t_wall_ns: i,
                },
                "proc",
                false,
            );
            row.push("on_cpu_ns", i * 3);
            row.write_json_line(&mut plain);
            w.write_row(&row).unwrap();
            if i == 1000 {
                w.flush().unwrap();
            }
        }
        let stats = w.close().unwrap();
        assert_eq!(stats.name, "telemetry-proc.jsonl.zst");
        let path = dir.path().join(&stats.name);
        let on_disk = stats_of_file(&path).unwrap();
        assert_eq!(
            (stats.bytes, &stats.sha256),
            (on_disk.bytes, &on_disk.sha256)
        );
        assert_eq!(stats.lines, 3000);
        let decoded = zstd::stream::decode_all(std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(decoded, plain);
        assert!(
            stats.bytes * 5 < plain.len() as u64,
            "compression should pay off on rows"
        );
    }

    #[test]
    fn existing_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("events.jsonl"), b"old\n").unwrap();
        let ep = EpisodeDir::open_existing(dir.path()).unwrap();
        assert!(JsonlWriter::create(&ep, "events.jsonl").is_err());
        assert_eq!(
            std::fs::read(dir.path().join("events.jsonl")).unwrap(),
            b"old\n"
        );
    }
}

//! The episode directory: creation, the shared event log, and the closing sequence
//! (final meta.json, manifest.json, done.marker — in that order).

pub mod dir;
pub mod meta;

use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::EpisodeClock;
use crate::error::Error;
use crate::jsonl::{FileStats, JsonlWriter};
pub use dir::{Access, EpisodeDir};
pub use meta::Meta;

pub const META: &str = "meta.json";
pub const EVENTS: &str = "events.jsonl";
pub const LABELS: &str = "labels.jsonl";
pub const MANIFEST: &str = "manifest.json";
pub const DONE: &str = "done.marker";
pub const CONTROL_SOCKET: &str = "control.sock";

pub fn telemetry_file(source: &str) -> String {
    format!("telemetry-{source}.jsonl")
}

/// Create `<data_root>/episodes/<id>/` and open it (see [`dir`]). The id directory must
/// not exist: episodes are never reused or overwritten.
pub fn create_dir(data_root: &Path, id: &str, access: Access) -> Result<EpisodeDir, Error> {
    EpisodeDir::create(data_root, id, access)
}

/// Write `value` as pretty JSON to `dir/name` atomically: temp file, fsync, rename, fsync dir.
pub fn write_json_atomic<T: Serialize>(
    dir: &EpisodeDir,
    name: &str,
    value: &T,
) -> Result<(), Error> {
    dir.write_json_atomic(name, value)
}

/// Size, line count and sha256 of `name` as it is on disk, read through the handle. For a
/// `.zst` stream `lines` counts the JSON lines inside (as the writer does); the decoder
/// must reach the end of the frame.
pub fn stats_on_disk(dir: &EpisodeDir, name: &str) -> Result<FileStats, Error> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let ctx = || format!("reading {}", dir.join(name).display());
    let mut file = dir.open_regular(name, false)?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut newlines = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(ctx(), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
        newlines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
    let lines = if name.ends_with(".zst") {
        let file = dir.open_regular(name, false)?;
        let mut dec = zstd::stream::read::Decoder::new(file).map_err(|e| Error::io(ctx(), e))?;
        let mut lines = 0u64;
        loop {
            let n = dec.read(&mut buf).map_err(|e| Error::io(ctx(), e))?;
            if n == 0 {
                break lines;
            }
            lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        }
    } else {
        newlines
    };
    Ok(FileStats {
        name: name.to_owned(),
        bytes,
        lines,
        sha256: crate::jsonl::hex(&hasher.finalize()),
    })
}

/// manifest.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub episode_id: String,
    pub files: Vec<FileStats>,
}

/// events.jsonl, shared by the sampler, the control socket and the QMP/agent threads.
/// Events are rare, so each is flushed at once: a crash loses none of them.
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Mutex<EventLogInner>>,
    clock: EpisodeClock,
}

struct EventLogInner {
    writer: Option<JsonlWriter>,
    failed: Option<String>,
}

impl EventLog {
    pub fn create(dir: &EpisodeDir, clock: EpisodeClock) -> Result<Self, Error> {
        let writer = JsonlWriter::create(dir, EVENTS)?;
        Ok(Self {
            inner: Arc::new(Mutex::new(EventLogInner {
                writer: Some(writer),
                failed: None,
            })),
            clock,
        })
    }

    /// Append one typed event. A `None` field the contract declares optional for its
    /// kind is left out; one it declares required (nullable) is written as `null`.
    pub fn record(&self, event: &crate::contract::events::Event) {
        let name = event.name();
        let mut fields = match serde_json::to_value(event) {
            Ok(Value::Object(m)) => m,
            // Every variant is a struct variant: cannot happen.
            _ => Map::new(),
        };
        fields.remove("event");
        if let Some(kind) = crate::contract::events::kind(name) {
            fields.retain(|k, v| {
                !v.is_null()
                    || kind
                        .field(k)
                        .is_some_and(|c| c.presence == crate::contract::Presence::Always)
            });
        }
        self.emit(name, Value::Object(fields));
    }

    /// Append `{t_mono_ns, t_wall_ns, event, ...fields}`. A write failure is remembered
    /// (the episode then ends as `error`) rather than propagated into every caller.
    /// Callers use [`EventLog::record`]; this untyped form is for tests that must write
    /// what the contract forbids.
    pub fn emit(&self, event: &str, fields: Value) {
        // Stamp under the lock: events come from several threads, and a stamp taken
        // before waiting for the lock could land after a later one.
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = self.clock.stamp();
        let mut obj = Map::new();
        obj.insert("t_mono_ns".into(), stamp.t_mono_ns.into());
        obj.insert("t_wall_ns".into(), stamp.t_wall_ns.into());
        obj.insert("event".into(), event.into());
        if let Value::Object(extra) = fields {
            obj.extend(extra);
        }
        let res = match inner.writer.as_mut() {
            Some(w) => w.write_value(&Value::Object(obj)).and_then(|()| w.flush()),
            None => return,
        };
        if let Err(e) = res {
            inner.failed.get_or_insert(e.to_string());
        }
    }

    /// The first write error, if any.
    pub fn failure(&self) -> Option<String> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed
            .clone()
    }

    pub fn close(&self) -> Result<FileStats, Error> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let writer = inner
            .writer
            .take()
            .ok_or_else(|| Error::Other("event log closed twice".into()))?;
        writer.close()
    }
}

/// The closing sequence. `streams` are the stats of every closed stream; when `trust_streams`
/// is false (a write failed), sizes and checksums are recomputed from the files on disk so
/// the manifest describes what is really there.
pub fn finish(
    dir: &EpisodeDir,
    meta: &Meta,
    streams: Vec<FileStats>,
    trust_streams: bool,
) -> Result<(), Error> {
    dir.write_json_atomic(META, meta)?;
    let mut files = Vec::with_capacity(streams.len() + 1);
    files.push(stats_on_disk(dir, META)?);
    for s in streams {
        files.push(if trust_streams {
            s
        } else {
            stats_on_disk(dir, &s.name)?
        });
    }
    seal(dir, &meta.episode_id, files)
}

/// The last two steps of the closing sequence: manifest.json, then done.marker.
pub fn seal(dir: &EpisodeDir, episode_id: &str, mut files: Vec<FileStats>) -> Result<(), Error> {
    files.sort_by(|a, b| a.name.cmp(&b.name));
    dir.write_json_atomic(
        MANIFEST,
        &Manifest {
            episode_id: episode_id.to_owned(),
            files,
        },
    )?;
    dir.create_file(DONE)?
        .sync_all()
        .map_err(|e| Error::io(format!("creating {}", dir.join(DONE).display()), e))?;
    dir.sync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn existing_episode_id_is_refused_and_untouched() {
        let root = tempfile::tempdir().unwrap();
        let dir = create_dir(root.path(), "01J00000000000000000000000", Access::default()).unwrap();
        fs::write(dir.join("meta.json"), b"{}").unwrap();
        let err =
            create_dir(root.path(), "01J00000000000000000000000", Access::default()).unwrap_err();
        assert!(matches!(err, Error::EpisodeExists(_)), "{err}");
        assert_eq!(fs::read(dir.join("meta.json")).unwrap(), b"{}");
    }

    #[test]
    fn atomic_json_leaves_no_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = EpisodeDir::open_existing(tmp.path()).unwrap();
        write_json_atomic(&dir, "meta.json", &serde_json::json!({"a": 1})).unwrap();
        write_json_atomic(&dir, "meta.json", &serde_json::json!({"a": 2})).unwrap();
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("meta.json")]);
        let v: Value =
            serde_json::from_slice(&fs::read(tmp.path().join("meta.json")).unwrap()).unwrap();
        assert_eq!(v["a"], 2);
    }
}

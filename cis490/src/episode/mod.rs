//! The episode directory: creation, the shared event log, and the closing sequence
//! (final meta.json, manifest.json, done.marker — in that order).

pub mod meta;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::EpisodeClock;
use crate::error::Error;
use crate::jsonl::{stats_of_file, FileStats, JsonlWriter};
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

/// Create `<data_root>/episodes/<id>/`. The id directory must not exist: episodes are
/// never reused or overwritten.
pub fn create_dir(data_root: &Path, id: &str) -> Result<PathBuf, Error> {
    let episodes = data_root.join("episodes");
    fs::create_dir_all(&episodes).map_err(|e| {
        Error::Usage(format!(
            "data root {}: cannot create episodes/: {e}",
            data_root.display()
        ))
    })?;
    let dir = episodes.join(id);
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::EpisodeExists(dir))
        }
        Err(e) => {
            return Err(Error::Usage(format!(
                "cannot create episode directory {}: {e}",
                dir.display()
            )))
        }
    }
    Ok(fs::canonicalize(&dir).unwrap_or(dir))
}

/// Write `value` as pretty JSON to `dir/name` atomically: temp file, fsync, rename, fsync dir.
pub fn write_json_atomic<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), Error> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let mut bytes = serde_json::to_vec_pretty(value).map_err(Error::Json)?;
    bytes.push(b'\n');
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(format!("writing {}", path.display()), e)
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
    pub fn create(dir: &Path, clock: EpisodeClock) -> Result<Self, Error> {
        let writer = JsonlWriter::create(dir, EVENTS)?;
        Ok(Self {
            inner: Arc::new(Mutex::new(EventLogInner {
                writer: Some(writer),
                failed: None,
            })),
            clock,
        })
    }

    /// Append `{t_mono_ns, t_wall_ns, event, ...fields}`. A write failure is remembered
    /// (the episode then ends as `error`) rather than propagated into every caller.
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
    dir: &Path,
    meta: &Meta,
    streams: Vec<FileStats>,
    trust_streams: bool,
) -> Result<(), Error> {
    write_json_atomic(dir, META, meta)?;
    let mut files = Vec::with_capacity(streams.len() + 1);
    files.push(stats_of_file(&dir.join(META))?);
    for s in streams {
        files.push(if trust_streams {
            s
        } else {
            stats_of_file(&dir.join(&s.name))?
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    write_json_atomic(
        dir,
        MANIFEST,
        &Manifest {
            episode_id: meta.episode_id.clone(),
            files,
        },
    )?;
    let done = dir.join(DONE);
    File::create(&done)
        .and_then(|f| f.sync_all())
        .and_then(|()| File::open(dir)?.sync_all())
        .map_err(|e| Error::io(format!("creating {}", done.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_episode_id_is_refused_and_untouched() {
        let root = tempfile::tempdir().unwrap();
        let dir = create_dir(root.path(), "01J00000000000000000000000").unwrap();
        fs::write(dir.join("meta.json"), b"{}").unwrap();
        let err = create_dir(root.path(), "01J00000000000000000000000").unwrap_err();
        assert!(matches!(err, Error::EpisodeExists(_)), "{err}");
        assert_eq!(fs::read(dir.join("meta.json")).unwrap(), b"{}");
    }

    #[test]
    fn atomic_json_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        write_json_atomic(dir.path(), "meta.json", &serde_json::json!({"a": 1})).unwrap();
        write_json_atomic(dir.path(), "meta.json", &serde_json::json!({"a": 2})).unwrap();
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("meta.json")]);
        let v: Value =
            serde_json::from_slice(&fs::read(dir.path().join("meta.json")).unwrap()).unwrap();
        assert_eq!(v["a"], 2);
    }
}

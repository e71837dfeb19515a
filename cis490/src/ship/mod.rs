//! `cis490 ship`: complete, valid episodes into S3-compatible object storage, raw files
//! and Parquet export side by side, each verified after upload, an episode's marker
//! object last (docs/datasets.md, "Shipping to object storage").
//!
//! Idempotent: an episode whose marker is in the store is not read again. Resumable: an
//! object already in the store whose size and sha256 match is not sent again, anything
//! else at its key is replaced, and nothing is marked shipped before every object of the
//! episode has been read back and matched. The episode directory is read the way every
//! command reads files someone else may have written (no symlinks, manifest names one
//! path component), so a planted link cannot send another file to the bucket.

mod error;
pub mod journal;
pub mod plan;
pub mod store;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use error::{ShipError, StoreFault};
use plan::{Destination, Marker, MarkerObject, Origin};
pub use store::{Store, StoreOptions};

use crate::export::{self, out::OutDir};
use crate::untrusted;

/// What happened to one episode in a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Shipped {
        objects: usize,
        /// Objects already in the store with the right size and sha256 (a resumed run).
        reused: usize,
        bytes_sent: u64,
    },
    AlreadyShipped,
    /// No done.marker yet: still being captured, or killed (`cis490 recover` closes it).
    Incomplete,
    /// Complete but not valid, or unreadable: reported, never shipped.
    Refused(String),
}

/// Totals of a pass.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub shipped: usize,
    pub already: usize,
    pub incomplete: usize,
    pub refused: usize,
    pub objects: usize,
    pub reused: usize,
    pub bytes_sent: u64,
    pub seconds: f64,
}

/// Episode directories under a data root (its `episodes/` folder when there is one),
/// oldest first so a backlog ships in capture order.
pub fn episode_dirs(root: &Path) -> Result<Vec<PathBuf>, ShipError> {
    let dir = crate::ls::episodes_dir(root);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(ShipError::io(&dir))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Ship one episode directory.
pub fn ship_episode(store: &Store, dir: &Path) -> Result<Outcome, ShipError> {
    let is_file = |name: &str| dir.join(name).symlink_metadata().is_ok_and(|m| m.is_file());
    if !is_file("done.marker") {
        return Ok(Outcome::Incomplete);
    }
    let meta = match export::read_meta(dir) {
        Ok(m) => m,
        Err(e) => return Ok(Outcome::Refused(e.to_string())),
    };
    let id = meta.episode_id;
    if !plan::safe_name(&id) || id.starts_with('.') {
        return Ok(Outcome::Refused(format!(
            "episode_id {id:?} cannot name an object"
        )));
    }
    if store.marker(&id)?.is_some() {
        return Ok(Outcome::AlreadyShipped);
    }
    let manifest = untrusted::read_json(&dir.join("manifest.json"), 16 << 20).map_err(|m| {
        ShipError::Episode {
            dir: dir.to_path_buf(),
            message: format!("manifest.json: {m}"),
        }
    })?;
    let listed: Vec<(String, u64, String)> = manifest["files"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            (
                f["name"].as_str().unwrap_or_default().to_owned(),
                f["bytes"].as_u64().unwrap_or(0),
                f["sha256"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    // The Parquet export goes to a private temp folder (random name, 0700) that is
    // removed when this returns.
    let tmp = tempfile::Builder::new()
        .prefix("cis490-ship-")
        .tempdir()
        .map_err(ShipError::io(std::env::temp_dir()))?;
    let out = OutDir::open_root(tmp.path(), 0o700)?;
    // The export runs validate beside its streams and refuses an episode it does not pass
    // (one validation, not two: it reads every file, the largest cost here).
    let exported = match export::export_episode(dir, &out, Default::default()) {
        Ok(e) => e,
        Err(e @ export::ExportError::NotValid { .. }) => {
            return Ok(Outcome::Refused(e.to_string()))
        }
        Err(e) => return Err(e.into()),
    };
    let streams: Vec<(String, PathBuf)> = exported
        .streams
        .iter()
        .map(|s| (s.name().to_owned(), s.file.clone()))
        .collect();
    let uploads = plan::plan(&store.dest, &id, &listed, &streams, &exported.episodes_file)
        .map_err(|e| ShipError::Episode {
            dir: dir.to_path_buf(),
            message: e.to_string(),
        })?;
    let (mut objects, mut reused, mut bytes_sent) = (Vec::new(), 0usize, 0u64);
    for u in &uploads {
        let (file, size) = match &u.origin {
            Origin::Episode { name } => {
                let p = dir.join(name);
                untrusted::open_regular(&p).map_err(|e| ShipError::Episode {
                    dir: dir.to_path_buf(),
                    message: format!("{name}: {e}"),
                })?
            }
            Origin::Export { path } => {
                let f = std::fs::File::open(path).map_err(ShipError::io(path))?;
                let n = f.metadata().map_err(ShipError::io(path))?.len();
                (f, n)
            }
        };
        // Resume: an object of the right size may be a complete earlier upload; it is
        // kept only if its bytes hash to what this run would send.
        if store.head(&u.key)?.is_some_and(|r| r.bytes == size) {
            let want = match &u.expect {
                Some((_, sha)) => sha.clone(),
                None => sha256_of(&file).map_err(ShipError::io(&u.key))?,
            };
            let (n, sha) = store.digest(&u.key)?;
            if n == size && sha == want {
                reused += 1;
                objects.push(MarkerObject {
                    key: u.key.clone(),
                    bytes: n,
                    sha256: sha,
                });
                continue;
            }
        }
        let put = store.put_file(&u.key, file, size, u.expect.as_ref())?;
        let (n, sha) = (put.bytes, put.sha256);
        let (got_n, got_sha) = store.digest(&u.key)?;
        if got_n != n || got_sha != sha {
            return Err(ShipError::Verify {
                key: u.key.clone(),
                message: format!(
                    "sent {n} bytes sha256 {sha}, the store returns {got_n} bytes sha256 {got_sha}"
                ),
            });
        }
        bytes_sent += put.sent;
        objects.push(MarkerObject {
            key: u.key.clone(),
            bytes: n,
            sha256: sha,
        });
    }
    let count = objects.len();
    store.put_marker(&Marker {
        episode_id: id,
        shipped_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        cis490_version: env!("CARGO_PKG_VERSION").to_owned(),
        objects,
    })?;
    Ok(Outcome::Shipped {
        objects: count + 1,
        reused,
        bytes_sent,
    })
}

/// sha256 of an open file from its start (the file's offset is restored for the upload).
fn sha256_of(file: &std::fs::File) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::Start(0))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    f.seek(SeekFrom::Start(0))?;
    Ok(crate::jsonl::hex(&h.finalize()))
}

/// One pass over the data root: every episode not yet shipped. A store error ends the
/// pass (the next one, or the next run, resumes); an episode's own problem is reported
/// and the pass goes on.
///
/// `known` holds the directories already found shipped: they are not asked about again
/// (a long `--watch` over hundreds of episodes would otherwise send a request for each
/// of them on every pass).
pub fn pass(
    store: &Store,
    root: &Path,
    known: &mut HashSet<PathBuf>,
    stop: &AtomicBool,
) -> Result<Summary, ShipError> {
    let started = Instant::now();
    let mut s = Summary::default();
    for dir in episode_dirs(root)? {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if known.contains(&dir) {
            s.already += 1;
            continue;
        }
        let outcome = ship_episode(store, &dir);
        if matches!(
            outcome,
            Ok(Outcome::Shipped { .. } | Outcome::AlreadyShipped)
        ) {
            known.insert(dir.clone());
        }
        match outcome {
            Ok(Outcome::Shipped {
                objects,
                reused,
                bytes_sent,
            }) => {
                s.shipped += 1;
                s.objects += objects;
                s.reused += reused;
                s.bytes_sent += bytes_sent;
                println!(
                    "{}: shipped, {objects} objects ({reused} already there), {bytes_sent} bytes sent",
                    dir.display()
                );
            }
            Ok(Outcome::AlreadyShipped) => s.already += 1,
            Ok(Outcome::Incomplete) => s.incomplete += 1,
            Ok(Outcome::Refused(why)) => {
                s.refused += 1;
                eprintln!("cis490 ship: {}: not shipped: {why}", dir.display());
            }
            Err(e @ (ShipError::Store { .. } | ShipError::Usage(_))) => return Err(e),
            Err(e) => {
                s.refused += 1;
                eprintln!("cis490 ship: {}: not shipped: {e}", dir.display());
            }
        }
    }
    s.seconds = started.elapsed().as_secs_f64();
    Ok(s)
}

#[derive(Debug, Clone)]
pub struct ShipOptions {
    pub data_root: PathBuf,
    pub to: String,
    pub store: StoreOptions,
    /// Keep running: ship each episode as its done.marker appears.
    pub watch: bool,
}

/// The command: one pass, or with `watch` a pass whenever the data root changes (and at
/// least every [`RESCAN`]), store outages waited out with backoff, until `stop`.
pub fn run(opts: &ShipOptions, stop: &AtomicBool) -> Result<Summary, ShipError> {
    let dest = Destination::parse(&opts.to)?;
    let store = Store::connect(dest, &opts.store)?;
    if !opts.watch {
        store.check()?;
        return pass(&store, &opts.data_root, &mut HashSet::new(), stop);
    }
    watch(&store, &opts.data_root, stop)
}

/// The longest `--watch` waits without an inotify event before it looks again (a data
/// root on a file system without inotify still ships).
pub const RESCAN: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

fn watch(store: &Store, root: &Path, stop: &AtomicBool) -> Result<Summary, ShipError> {
    use notify::{RecursiveMode, Watcher};
    let (tx, rx) = std::sync::mpsc::channel();
    // Only a done.marker wakes a pass: a running capture writes all the time.
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            if ev
                .paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| n == "done.marker"))
            {
                let _ = tx.send(());
            }
        }
    })
    .map_err(|e| ShipError::Usage(format!("cannot watch {}: {e}", root.display())))?;
    let episodes = crate::ls::episodes_dir(root);
    watcher
        .watch(&episodes, RecursiveMode::Recursive)
        .map_err(|e| ShipError::Usage(format!("cannot watch {}: {e}", episodes.display())))?;
    let mut total = Summary::default();
    let mut known = HashSet::new();
    let mut backoff = Duration::from_secs(1);
    let mut down_since: Option<Instant> = None;
    eprintln!(
        "cis490 ship: watching {} -> {}",
        episodes.display(),
        store.describe()
    );
    while !stop.load(Ordering::Relaxed) {
        let wait = match store
            .check()
            .and_then(|()| pass(store, root, &mut known, stop))
        {
            Ok(s) => {
                if let Some(t) = down_since.take() {
                    eprintln!(
                        "cis490 ship: the store is back after {:.0} s; shipping resumed",
                        t.elapsed().as_secs_f64()
                    );
                }
                backoff = Duration::from_secs(1);
                total.shipped += s.shipped;
                total.objects += s.objects;
                total.reused += s.reused;
                total.bytes_sent += s.bytes_sent;
                total.refused = s.refused;
                total.incomplete = s.incomplete;
                total.already = s.already;
                RESCAN
            }
            Err(e) if e.is_transient() => {
                down_since.get_or_insert_with(Instant::now);
                eprintln!(
                    "cis490 ship: {e}; retrying in {} s (nothing is lost: unshipped episodes stay unmarked)",
                    backoff.as_secs()
                );
                let w = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                w
            }
            Err(e) => return Err(e),
        };
        // Wait for a change under the data root (a done.marker appearing is one), the
        // backoff or the rescan interval, or a stop; events that came together are one.
        let until = Instant::now() + wait;
        while !stop.load(Ordering::Relaxed) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(()) if down_since.is_none() => {
                    std::thread::sleep(Duration::from_millis(200));
                    while rx.try_recv().is_ok() {}
                    break;
                }
                _ => {}
            }
        }
    }
    Ok(total)
}

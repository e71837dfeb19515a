//! The episode directory as one open handle.
//!
//! cis490 runs as root while the data root is often shared, so no write may re-resolve a
//! path another user can change: the directory is opened once (`O_DIRECTORY|O_NOFOLLOW`,
//! created with `mkdirat` relative to an `O_NOFOLLOW` handle of `episodes`), and every
//! file is created relative to that handle with `O_CREAT|O_EXCL|O_NOFOLLOW` and an
//! explicit mode (whatever the umask). Swapping `episodes` for a symlink, or planting
//! symlinks at the names the capture will use, then either makes the capture refuse or
//! changes nothing: its writes land only in the directory it created.
//!
//! Modes: directories 0700 and files 0600, or 0750/0640 with a group (`--group`, or the
//! group of a setgid data root). Never world-readable: meta.json holds QEMU's command
//! line, which can hold secrets.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Stat};
use serde::Serialize;

use crate::error::Error;

/// Who besides the owner may read an episode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    /// Group given read access (directories 0750, files 0640); `None`: owner only.
    pub group: Option<u32>,
}

impl Access {
    pub fn dir_mode(self) -> u32 {
        if self.group.is_some() {
            0o750
        } else {
            0o700
        }
    }

    pub fn file_mode(self) -> u32 {
        if self.group.is_some() {
            0o640
        } else {
            0o600
        }
    }

    /// The access an existing directory grants (for files `recover` adds to it).
    fn of_dir(st: &Stat) -> Self {
        Self {
            group: (st.st_mode & 0o050 != 0).then_some(st.st_gid),
        }
    }
}

/// Resolve `--group NAME` (a group name or a numeric gid).
pub fn group_by_name(name: &str) -> Result<u32, Error> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let cname = std::ffi::CString::new(name)
        .map_err(|_| Error::Usage(format!("--group {name:?}: not a group name")))?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r writes only into `grp` and `buf` (whose length we pass) and
    // sets `out` to `&grp` or null.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return Err(Error::Usage(format!(
            "--group {name:?}: no such group on this host"
        )));
    }
    Ok(grp.gr_gid)
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Why a directory another user can write is unsafe for root to create episodes in,
/// or `None` when it is safe: owned by us (or root) and either not group/world-writable
/// or sticky (then others cannot rename or delete what we create in it).
pub fn unsafe_dir_reason(st: &Stat, uid: u32) -> Option<String> {
    let owner = st.st_uid;
    if owner != uid && owner != 0 {
        return Some(format!(
            "it is owned by uid {owner}, who could swap its entries"
        ));
    }
    let writable_by_others = st.st_mode & 0o022 != 0;
    let sticky = st.st_mode & 0o1000 != 0;
    if writable_by_others && !sticky {
        return Some(format!(
            "it is writable by others (mode {:04o}) and not sticky",
            st.st_mode & 0o7777
        ));
    }
    None
}

fn io_err(context: String) -> impl FnOnce(rustix::io::Errno) -> Error {
    move |e| Error::io(context, e.into())
}

/// An open, owned episode directory. Cheap to clone (the handle is shared).
#[derive(Clone, Debug)]
pub struct EpisodeDir {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    fd: OwnedFd,
    /// For messages and for readers that take paths (status line, `mark`).
    path: PathBuf,
    access: Access,
}

impl AsFd for EpisodeDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl EpisodeDir {
    /// Create `<data_root>/episodes/<id>/` and open it. `id` must be one path component;
    /// an existing id is refused ([`Error::EpisodeExists`]). `access.group` of `None`
    /// takes the group of a setgid `episodes` (or data root) directory, if any.
    pub fn create(data_root: &Path, id: &str, access: Access) -> Result<Self, Error> {
        if id.is_empty() || id == "." || id == ".." || id.contains('/') || id.contains('\0') {
            return Err(Error::Usage(format!(
                "episode id {id:?} is not a single path component"
            )));
        }
        let uid = euid();
        let root_msg =
            |what: String| Error::Usage(format!("data root {}: {what}", data_root.display()));
        // The data root itself may be a symlink the operator chose; it is checked once
        // opened (the checks then hold for the directory we really use).
        std::fs::create_dir_all(data_root)
            .map_err(|e| root_msg(format!("cannot create it: {e}")))?;
        let root = rustix::fs::open(
            data_root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| root_msg(format!("cannot open it: {e}")))?;
        let root_st = rustix::fs::fstat(&root).map_err(|e| root_msg(format!("stat: {e}")))?;
        if let Some(why) = unsafe_dir_reason(&root_st, uid) {
            return Err(root_msg(format!(
                "refusing to write episodes there: {why}. {SAFE_ROOT}"
            )));
        }
        let inherit_group = |st: &Stat| (st.st_mode & 0o2000 != 0).then_some(st.st_gid);
        let mut access = access;
        if access.group.is_none() {
            access.group = inherit_group(&root_st);
        }
        let episodes = match rustix::fs::openat(&root, "episodes", DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => {
                match rustix::fs::mkdirat(&root, "episodes", Mode::from_raw_mode(access.dir_mode()))
                {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(root_msg(format!("cannot create episodes/: {e}"))),
                }
                let fd = rustix::fs::openat(&root, "episodes", DIR_FLAGS, Mode::empty())
                    .map_err(|e| root_msg(format!("cannot open episodes/: {}", nofollow_msg(e))))?;
                // Ours (checked below): give it the episodes' own mode and group, so a
                // group given read access can reach them.
                if rustix::fs::fstat(&fd).is_ok_and(|st| st.st_uid == uid) {
                    set_mode(&fd, access.dir_mode(), access.group)
                        .map_err(|e| root_msg(format!("setting the mode of episodes/: {e}")))?;
                }
                fd
            }
            Err(e) => {
                return Err(root_msg(format!(
                    "cannot open episodes/: {}",
                    nofollow_msg(e)
                )))
            }
        };
        let ep_st =
            rustix::fs::fstat(&episodes).map_err(|e| root_msg(format!("stat episodes/: {e}")))?;
        if let Some(why) = unsafe_dir_reason(&ep_st, uid) {
            return Err(root_msg(format!(
                "refusing to write into episodes/: {why}. {SAFE_ROOT}"
            )));
        }
        if access.group.is_none() {
            access.group = inherit_group(&ep_st);
        }
        let path = data_root.join("episodes").join(id);
        match rustix::fs::mkdirat(&episodes, id, Mode::from_raw_mode(access.dir_mode())) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) => return Err(Error::EpisodeExists(path)),
            Err(e) => {
                return Err(Error::Usage(format!(
                    "cannot create episode directory {}: {}",
                    path.display(),
                    std::io::Error::from(e)
                )))
            }
        }
        let fd = rustix::fs::openat(&episodes, id, DIR_FLAGS, Mode::empty()).map_err(|e| {
            Error::Usage(format!(
                "cannot open episode directory {}: {}",
                path.display(),
                nofollow_msg(e)
            ))
        })?;
        let st = rustix::fs::fstat(&fd).map_err(io_err(format!("stat {}", path.display())))?;
        // Someone could have replaced the directory we just made between mkdirat and
        // openat; only a directory we own is ours.
        if st.st_uid != uid {
            return Err(Error::Usage(format!(
                "episode directory {} was replaced by one owned by uid {} while it was created",
                path.display(),
                st.st_uid
            )));
        }
        set_mode(&fd, access.dir_mode(), access.group)
            .map_err(io_err(format!("setting the mode of {}", path.display())))?;
        // For messages and the printed path: resolve the data root (the operator's path)
        // but not `episodes/<id>`, which another process may have renamed by now.
        let path = std::fs::canonicalize(data_root)
            .map(|r| r.join("episodes").join(id))
            .unwrap_or(path);
        Ok(Self {
            inner: Arc::new(Inner { fd, path, access }),
        })
    }

    /// Open an existing episode directory (not following a symlink at its last
    /// component). Files added to it get the access its own mode grants.
    pub fn open_existing(path: &Path) -> Result<Self, Error> {
        let fd = rustix::fs::open(path, DIR_FLAGS, Mode::empty()).map_err(|e| {
            Error::Usage(format!(
                "{}: cannot open the directory: {}",
                path.display(),
                nofollow_msg(e)
            ))
        })?;
        let st = rustix::fs::fstat(&fd).map_err(io_err(format!("stat {}", path.display())))?;
        Ok(Self {
            inner: Arc::new(Inner {
                fd,
                path: path.to_path_buf(),
                access: Access::of_dir(&st),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// `path/name`, for messages and path-based readers.
    pub fn join(&self, name: &str) -> PathBuf {
        self.inner.path.join(name)
    }

    pub fn access(&self) -> Access {
        self.inner.access
    }

    pub fn stat(&self) -> Result<Stat, Error> {
        rustix::fs::fstat(self).map_err(io_err(format!("stat {}", self.path().display())))
    }

    /// A path to `name` inside this directory that resolves through the open handle
    /// (`/proc/self/fd/N/name`), for APIs that only take paths (binding a Unix socket).
    pub fn fd_path(&self, name: &str) -> PathBuf {
        PathBuf::from(format!(
            "/proc/self/fd/{}/{name}",
            self.inner.fd.as_raw_fd()
        ))
    }

    /// Create `name` (must not exist; a symlink there is refused, never followed) with
    /// this episode's file mode, for writing.
    pub fn create_file(&self, name: &str) -> Result<File, Error> {
        self.create_file_raw(name)
            .map_err(|e| Error::io(format!("creating {}", self.join(name).display()), e))
    }

    fn create_file_raw(&self, name: &str) -> std::io::Result<File> {
        let mode = self.inner.access.file_mode();
        let fd = rustix::fs::openat(
            self,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )?;
        // The umask may have taken bits away (or, under umask 000, nothing): set the mode
        // we mean on the file itself.
        set_mode(&fd, mode, self.inner.access.group)?;
        Ok(File::from(fd))
    }

    /// Open `name` for reading: only a regular file, never through a symlink, and never
    /// blocking on a FIFO planted under a stream's name.
    pub fn open_regular(&self, name: &str, write: bool) -> Result<File, Error> {
        let ctx = || format!("opening {}", self.join(name).display());
        let mode = if write { OFlags::RDWR } else { OFlags::RDONLY };
        let fd = rustix::fs::openat(
            self,
            name,
            mode | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(ctx(), e.into()))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| Error::io(ctx(), e.into()))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(Error::Other(format!(
                "{}: not a regular file",
                self.join(name).display()
            )));
        }
        // A second hard link could be someone else's file: never modify it.
        if write && st.st_nlink != 1 {
            return Err(Error::Other(format!(
                "{}: has {} hard links; refusing to modify it",
                self.join(name).display(),
                st.st_nlink
            )));
        }
        Ok(File::from(fd))
    }

    /// `lstat` of `name` (not following a symlink); `None` when absent.
    pub fn stat_entry(&self, name: &str) -> Result<Option<Stat>, Error> {
        match rustix::fs::statat(self, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(Error::io(
                format!("stat {}", self.join(name).display()),
                e.into(),
            )),
        }
    }

    /// Remove the entry `name` (a symlink is removed, not followed).
    pub fn remove(&self, name: &str) -> Result<(), Error> {
        rustix::fs::unlinkat(self, name, AtFlags::empty())
            .map_err(io_err(format!("removing {}", self.join(name).display())))
    }

    /// Rename `from` to `to` inside this directory (`to` is replaced, never followed).
    pub fn rename(&self, from: &str, to: &str) -> Result<(), Error> {
        rustix::fs::renameat(self, from, self, to)
            .map_err(io_err(format!("renaming to {}", self.join(to).display())))
    }

    pub fn sync(&self) -> Result<(), Error> {
        rustix::fs::fsync(self).map_err(io_err(format!("fsync {}", self.path().display())))
    }

    /// The names of the entries of this directory (`.`/`..` excluded), read through the
    /// handle.
    pub fn entries(&self) -> Result<Vec<String>, Error> {
        let ctx = || format!("listing {}", self.path().display());
        let mut dir = rustix::fs::Dir::read_from(self).map_err(|e| Error::io(ctx(), e.into()))?;
        let mut names = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(|e| Error::io(ctx(), e.into()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Write `value` as pretty JSON to `name` atomically: a temp file with a unique name
    /// created O_EXCL|O_NOFOLLOW, fsync, rename within this directory, fsync the directory.
    pub fn write_json_atomic<T: Serialize>(&self, name: &str, value: &T) -> Result<(), Error> {
        let mut bytes = serde_json::to_vec_pretty(value).map_err(Error::Json)?;
        bytes.push(b'\n');
        self.write_atomic(name, &bytes)
    }

    /// Write `bytes` to `name` atomically (see [`EpisodeDir::write_json_atomic`]).
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<(), Error> {
        let tmp = temp_name(name);
        let write = || -> std::io::Result<()> {
            let mut f = self.create_file_raw(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            rustix::fs::renameat(self, tmp.as_str(), self, name)?;
            rustix::fs::fsync(self)?;
            Ok(())
        };
        write().map_err(|e| {
            let _ = rustix::fs::unlinkat(self, tmp.as_str(), AtFlags::empty());
            Error::io(format!("writing {}", self.join(name).display()), e)
        })
    }
}

/// `.<name>.<pid>-<n>.tmp`: unique per process and call, so a name planted in advance
/// cannot be predicted and O_EXCL never meets an old one of ours.
pub fn temp_name(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(".{name}.{}-{n}-{nanos:08x}.tmp", std::process::id())
}

/// Whether `name` is one of our temp files (left behind by a capture killed mid-write).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

pub const SAFE_ROOT: &str = "A safe data root (and its episodes/) is owned by this user or root and \
    not writable by other users, or is sticky (mode 1777, like /tmp) and owned by this user or root; \
    e.g. `install -d -m 0750 -o root -g GROUP /srv/cis490`";

fn nofollow_msg(e: rustix::io::Errno) -> String {
    match e {
        rustix::io::Errno::LOOP => "it is a symlink (refused: writes never follow symlinks)".into(),
        rustix::io::Errno::NOTDIR => "not a directory (or a symlink, which is refused)".into(),
        e => std::io::Error::from(e).to_string(),
    }
}

/// Set exactly `mode` (and the group, if any) on an open file or directory.
fn set_mode(fd: impl AsFd, mode: u32, group: Option<u32>) -> rustix::io::Result<()> {
    if let Some(gid) = group.filter(|&g| g != u32::MAX) {
        rustix::fs::fchown(&fd, None, Some(Gid::from_raw(gid)))?;
    }
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
}

/// Write `bytes` to `path` (an output file outside any episode, e.g. a report) without
/// ever writing through what is at `path`: a unique temp file beside it is created
/// O_EXCL|O_NOFOLLOW with `mode`, then renamed over `path` (which replaces a planted
/// symlink instead of following it).
pub fn write_file_replacing(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let ctx = || format!("writing {}", path.display());
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Usage(format!("{}: not a file name", path.display())))?;
    let dir = rustix::fs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(ctx(), e.into()))?;
    let tmp = temp_name(&name.to_string_lossy());
    let write = || -> std::io::Result<()> {
        let fd = rustix::fs::openat(
            &dir,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
        let mut f = File::from(fd);
        f.write_all(bytes)?;
        f.sync_all()?;
        rustix::fs::renameat(&dir, tmp.as_str(), &dir, name)?;
        Ok(())
    };
    write().map_err(|e| {
        let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
        Error::io(ctx(), e)
    })
}

/// Create a Unix socket bound at `name` in `dir` whose mode is `mode` from the moment it
/// exists (the umask is set around bind, since a socket's mode cannot be set on its fd).
pub fn bind_unix_private(
    dir: &EpisodeDir,
    name: &str,
) -> std::io::Result<std::os::unix::net::UnixListener> {
    let path = dir.fd_path(name);
    // Connecting needs write permission: 0600, or 0660 when a group may read the episode
    // (its members may then mark phases).
    let mode = if dir.access().group.is_some() {
        0o660
    } else {
        0o600
    };
    let mask = 0o777 & !mode;
    // SAFETY: umask has no preconditions. It is process-wide: every other file cis490
    // creates gets its mode from fchmod, so the brief change affects none of them.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    let res = std::os::unix::net::UnixListener::bind(&path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    res
}

/// Take the episode's lock: held (on the open directory) for the whole capture, so that
/// `recover` can tell a running capture from a killed one whatever state its control
/// socket is in. The kernel drops it when the process dies, even by SIGKILL.
pub fn try_lock(dir: &EpisodeDir) -> std::io::Result<bool> {
    match rustix::fs::flock(dir, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The umask is process-wide: tests that change it or depend on it run one at a time.
#[cfg(test)]
pub(crate) static UMASK_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const ID: &str = "01J00000000000000000000000";

    #[test]
    fn f1_swapped_episodes_symlink_and_planted_names_write_only_in_our_dir() {
        let root = tempfile::tempdir().unwrap();
        let attacker = tempfile::tempdir().unwrap();
        let victim = attacker.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let dir = EpisodeDir::create(root.path(), ID, Access::default()).unwrap();
        // Swap episodes/ for a symlink to a directory holding the same id, with symlinks
        // planted at the names the capture writes.
        std::fs::rename(root.path().join("episodes"), root.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(attacker.path(), root.path().join("episodes")).unwrap();
        std::fs::create_dir(attacker.path().join(ID)).unwrap();
        for name in ["meta.json", "done.marker", "events.jsonl"] {
            std::os::unix::fs::symlink(&victim, attacker.path().join(ID).join(name)).unwrap();
        }
        dir.write_json_atomic("meta.json", &serde_json::json!({"a": 1}))
            .unwrap();
        dir.create_file("done.marker").unwrap();
        dir.create_file("events.jsonl").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let ours = root.path().join("moved").join(ID);
        assert!(ours.join("meta.json").is_file());
        assert!(ours.join("done.marker").is_file());
    }

    #[test]
    fn f1_planted_symlinks_inside_the_episode_are_refused_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let victim = root.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let dir = EpisodeDir::create(root.path(), ID, Access::default()).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("done.marker")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join(".meta.json.tmp")).unwrap();
        assert!(dir.create_file("done.marker").is_err());
        // The temp name is unique: an old guessable name is simply not used.
        dir.write_json_atomic("meta.json", &serde_json::json!({"a": 1}))
            .unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // meta.json planted as a symlink is replaced by rename, not written through.
        std::os::unix::fs::symlink(&victim, dir.join("manifest.json")).unwrap();
        dir.write_json_atomic("manifest.json", &serde_json::json!({"b": 2}))
            .unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(dir.join("manifest.json"))
            .unwrap()
            .is_file());
    }

    #[test]
    fn f1_symlink_preplanted_at_the_episode_id_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("episodes")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), root.path().join("episodes").join(ID))
            .unwrap();
        let err = EpisodeDir::create(root.path(), ID, Access::default()).unwrap_err();
        assert!(matches!(err, Error::EpisodeExists(_)), "{err}");
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    }

    #[test]
    fn f1_episodes_symlink_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), root.path().join("episodes")).unwrap();
        let err = EpisodeDir::create(root.path(), ID, Access::default()).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    }

    #[test]
    fn f1_id_with_path_separators_is_refused() {
        let root = tempfile::tempdir().unwrap();
        for id in ["../../x", "..", "a/b", ""] {
            assert!(
                EpisodeDir::create(root.path(), id, Access::default()).is_err(),
                "{id}"
            );
        }
        assert!(!root.path().join("x").exists());
    }

    #[test]
    fn f1_unsafe_data_roots_are_named() {
        let root = tempfile::tempdir().unwrap();
        let md = |mode: u32| {
            std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            rustix::fs::stat(root.path()).unwrap()
        };
        assert!(unsafe_dir_reason(&md(0o755), 0).is_none());
        assert!(unsafe_dir_reason(&md(0o1777), 0).is_none());
        assert!(unsafe_dir_reason(&md(0o777), 0)
            .unwrap()
            .contains("not sticky"));
        assert!(unsafe_dir_reason(&md(0o775), 0).is_some());
        let st = md(0o755);
        let mut other = st;
        other.st_uid = 65534;
        assert!(unsafe_dir_reason(&other, 0).unwrap().contains("65534"));
        // Ours (a non-root user's own directory) is fine.
        assert!(unsafe_dir_reason(&other, 65534).is_none());
    }

    fn create_under_umask(mask: u32, access: Access) -> (u32, u32) {
        let _serial = UMASK_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let root = tempfile::tempdir().unwrap();
        // SAFETY: umask has no preconditions (this test restores it at once).
        let old = unsafe { libc::umask(mask as libc::mode_t) };
        let made = EpisodeDir::create(root.path(), ID, access)
            .and_then(|d| d.create_file("events.jsonl").map(|_| d));
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let dir = made.unwrap();
        let dmode = std::fs::metadata(dir.path()).unwrap().mode() & 0o7777;
        let fmode = std::fs::metadata(dir.join("events.jsonl")).unwrap().mode() & 0o7777;
        (dmode, fmode)
    }

    #[test]
    fn f3_modes_are_private_whatever_the_umask() {
        for mask in [0o000, 0o022, 0o077] {
            assert_eq!(
                create_under_umask(mask, Access::default()),
                (0o700, 0o600),
                "umask {mask:o}"
            );
            let g = Access { group: Some(0) };
            assert_eq!(
                create_under_umask(mask, g),
                (0o750, 0o640),
                "umask {mask:o}"
            );
        }
    }

    #[test]
    fn report_output_replaces_a_planted_symlink_instead_of_following_it() {
        let root = tempfile::tempdir().unwrap();
        let victim = root.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let out = root.path().join("x.report.png");
        std::os::unix::fs::symlink(&victim, &out).unwrap();
        write_file_replacing(&out, b"\x89PNG", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&out).unwrap(), b"\x89PNG");
        assert_eq!(std::fs::metadata(&out).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 2);
    }
}

//! The export's output tree, written the way episodes are (docs/security.md): every
//! directory below the root is created with mkdirat and opened O_DIRECTORY|O_NOFOLLOW
//! relative to its parent's handle, every file is a unique temp file created
//! O_CREAT|O_EXCL|O_NOFOLLOW and renamed over its name (a planted symlink is replaced,
//! never written through). Modes follow the root: files get its mode without execute
//! bits, so a private data root stays private.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};

use super::ExportError;
use crate::episode::dir::temp_name;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

pub struct OutDir {
    fd: OwnedFd,
    path: PathBuf,
    dir_mode: u32,
}

impl AsFd for OutDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn err(path: &Path) -> impl FnOnce(rustix::io::Errno) -> ExportError + '_ {
    move |e| ExportError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

impl OutDir {
    /// The root the user named (created if missing, with `mode` when created), opened
    /// once: a symlink the operator chose at the root itself is followed.
    pub fn open_root(path: &Path, mode: u32) -> Result<OutDir, ExportError> {
        if !path.exists() {
            std::fs::create_dir_all(path).map_err(ExportError::io(path))?;
            let f = File::open(path).map_err(ExportError::io(path))?;
            rustix::fs::fchmod(&f, Mode::from_raw_mode(mode)).map_err(err(path))?;
        }
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(err(path))?;
        let st = rustix::fs::fstat(&fd).map_err(err(path))?;
        Ok(OutDir {
            fd,
            path: path.to_path_buf(),
            dir_mode: st.st_mode & 0o7777,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` below this directory, created if missing; a symlink there is refused.
    pub fn subdir(&self, name: &str) -> Result<OutDir, ExportError> {
        let path = self.path.join(name);
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(ExportError::Output(format!(
                "{}: not one path component",
                path.display()
            )));
        }
        match rustix::fs::mkdirat(self, name, Mode::from_raw_mode(self.dir_mode)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(err(&path)(e)),
        }
        let fd = rustix::fs::openat(self, name, DIR_FLAGS, Mode::empty()).map_err(|e| {
            if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR {
                ExportError::Output(format!(
                    "{}: not a directory or a symlink (refused: the export never follows symlinks)",
                    path.display()
                ))
            } else {
                err(&path)(e)
            }
        })?;
        // The umask may have taken bits from mkdirat's mode.
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(self.dir_mode)).map_err(err(&path))?;
        Ok(OutDir {
            fd,
            path,
            dir_mode: self.dir_mode,
        })
    }

    /// `name` below this directory if it is there (never created; a symlink is refused
    /// like in [`OutDir::subdir`], as None).
    pub fn existing(&self, name: &str) -> Option<OutDir> {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return None;
        }
        let fd = rustix::fs::openat(self, name, DIR_FLAGS, Mode::empty()).ok()?;
        Some(OutDir {
            fd,
            path: self.path.join(name),
            dir_mode: self.dir_mode,
        })
    }

    /// Remove `stream/partition/part-0.parquet` if it is there, then the partition and the
    /// stream folder if that left them empty: a re-export of an episode that no longer has
    /// the stream must not leave the old rows in the dataset.
    pub fn remove_partition(&self, stream: &str, partition: &str, part: &str) {
        if let Some(s) = self.existing(stream) {
            if let Some(p) = s.existing(partition) {
                let _ = rustix::fs::unlinkat(&p, part, AtFlags::empty());
            }
            s.remove_if_empty(partition);
            drop(s);
            self.remove_if_empty(stream);
        }
    }

    /// Remove the folder `name` if it is empty (a partition an export created and then
    /// did not fill); anything in it keeps it.
    pub fn remove_if_empty(&self, name: &str) {
        let _ = rustix::fs::unlinkat(self, name, AtFlags::REMOVEDIR);
    }

    /// A new temp file for `name`; [`OutDir::commit`] renames it over `name`.
    pub fn create_temp(&self, name: &str) -> Result<(File, String), ExportError> {
        let tmp = temp_name(name);
        let path = self.path.join(&tmp);
        let mode = self.dir_mode & 0o666;
        let fd = rustix::fs::openat(
            self,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(err(&path))?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(err(&path))?;
        Ok((File::from(fd), tmp))
    }

    /// Make the written temp file `tmp` the file `name` (synced first).
    pub fn commit(&self, file: File, tmp: &str, name: &str) -> Result<(), ExportError> {
        let path = self.path.join(name);
        file.sync_all().map_err(ExportError::io(&path))?;
        drop(file);
        rustix::fs::renameat(self, tmp, self, name).map_err(err(&path))?;
        rustix::fs::fsync(self).map_err(err(&path))?;
        Ok(())
    }

    /// Remove a temp file after a failure.
    pub fn discard(&self, tmp: &str) {
        let _ = rustix::fs::unlinkat(self, tmp, AtFlags::empty());
    }
}

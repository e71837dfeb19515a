//! Reading episode files that someone else may have crafted (`validate`, `report`, `ls`).
//!
//! Episodes travel between machines, so every reader treats a file as hostile:
//! - [`open_regular`] opens with `O_NOFOLLOW | O_NONBLOCK`, checks the *opened* fd with
//!   fstat and refuses anything but a regular file, then clears `O_NONBLOCK`. A FIFO named
//!   meta.json can therefore never block a reader (opening a FIFO for reading without
//!   `O_NONBLOCK` waits for a writer forever), and a symlink is never followed (no reading
//!   /etc/shadow through an episode). Checking the fd, not the path, leaves no window to
//!   swap the file between the check and the read.
//! - [`read_capped`] refuses whole-file reads (meta.json, manifest.json) above a cap.
//! - [`LineReader`] streams lines and never keeps more than [`MAX_LINE_BYTES`] of one: a
//!   longer line is reported with its length and skipped, in constant memory, whatever a
//!   compressed stream expands to.
//! - [`open_stream`] limits a zstd frame's window, so a crafted header cannot make the
//!   decoder allocate more than [`ZSTD_WINDOW_LOG_MAX`] allows.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The longest line any reader keeps. The writer's longest rows are far below this (an
/// agent line is capped at 64 KiB before it becomes a row, a QMP reply at 8 MiB); past it a
/// line is a problem, not data.
pub const MAX_LINE_BYTES: usize = 16 << 20;
/// meta.json: QEMU's command line and the user's `--meta` are the only large parts.
pub const MAX_META_BYTES: u64 = 16 << 20;
/// manifest.json: one small entry per file.
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// zstd window at most 2^24 = 16 MiB (the writer uses level 3, a 2 MiB window; a level-19
/// file from the zstd tool uses 8 MiB). The library default would allow 128 MiB.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 24;
/// Read buffer of the streaming readers.
const BUF_BYTES: usize = 1 << 16;

/// Why an episode file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("is a symbolic link (refused: an episode holds only regular files)")]
    Symlink,
    #[error("is a {0}, not a regular file (refused)")]
    NotRegular(&'static str),
    #[error("is {size} bytes, over the {cap}-byte cap for this file (refused)")]
    TooLarge { size: u64, cap: u64 },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<ReadError> for std::io::Error {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Io(e) => e,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }
}

fn kind_name(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Open `path` for reading only if it is a regular file and not a symlink; returns the file
/// (blocking again) and its size.
pub fn open_regular(path: &Path) -> Result<(File, u64), ReadError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            // O_NOFOLLOW on a symlink fails with ELOOP.
            if e.raw_os_error() == Some(libc::ELOOP) {
                ReadError::Symlink
            } else {
                ReadError::Io(e)
            }
        })?;
    let md = file.metadata()?;
    if !md.file_type().is_file() {
        return Err(ReadError::NotRegular(kind_name(md.file_type())));
    }
    // A regular file never blocks, but later reads must not see EAGAIN semantics either.
    let flags = rustix::fs::fcntl_getfl(&file).map_err(std::io::Error::from)?;
    rustix::fs::fcntl_setfl(&file, flags - rustix::fs::OFlags::NONBLOCK)
        .map_err(std::io::Error::from)?;
    Ok((file, md.len()))
}

/// The whole of a small file, refused above `cap` bytes (also if it grows while read).
pub fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, ReadError> {
    let (file, size) = open_regular(path)?;
    if size > cap {
        return Err(ReadError::TooLarge { size, cap });
    }
    let mut data = Vec::with_capacity(size as usize);
    file.take(cap + 1).read_to_end(&mut data)?;
    if data.len() as u64 > cap {
        return Err(ReadError::TooLarge {
            size: data.len() as u64,
            cap,
        });
    }
    Ok(data)
}

/// A JSON file (meta.json, manifest.json) read with [`read_capped`]; the error says why.
pub fn read_json(path: &Path, cap: u64) -> Result<serde_json::Value, String> {
    let data = read_capped(path, cap).map_err(|e| e.to_string())?;
    serde_json::from_slice(&data).map_err(|e| format!("not valid JSON: {e}"))
}

/// A JSON-lines stream, plain or `.zst` (by extension), opened with [`open_regular`].
pub fn open_stream(path: &Path) -> Result<Box<dyn BufRead>, ReadError> {
    let (file, _) = open_regular(path)?;
    if path.extension().is_some_and(|e| e == "zst") {
        Ok(Box::new(BufReader::with_capacity(
            BUF_BYTES,
            zstd_decoder(file)?,
        )))
    } else {
        Ok(Box::new(BufReader::with_capacity(BUF_BYTES, file)))
    }
}

/// A zstd decoder whose window is bounded by [`ZSTD_WINDOW_LOG_MAX`].
pub fn zstd_decoder<R: Read>(
    inner: R,
) -> std::io::Result<zstd::stream::read::Decoder<'static, BufReader<R>>> {
    let mut d = zstd::stream::read::Decoder::new(inner)?;
    d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
    Ok(d)
}

/// What [`LineReader::next_line`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineRead {
    /// End of the stream.
    Eof,
    /// A line within the cap; [`LineReader::line`] holds it, newline included, or without
    /// one when it is the stream's last bytes (`terminated` false).
    Line { terminated: bool },
    /// A line longer than the cap: `bytes` long in all (newline included), not kept.
    TooLong { bytes: u64, terminated: bool },
}

/// Line splitting with a length cap, in memory bounded by the cap.
pub struct LineReader<R> {
    inner: R,
    cap: usize,
    line: Vec<u8>,
}

impl<R: BufRead> LineReader<R> {
    pub fn new(inner: R, cap: usize) -> Self {
        Self {
            inner,
            cap,
            line: Vec::new(),
        }
    }

    /// The line the last [`LineRead::Line`] returned.
    pub fn line(&self) -> &[u8] {
        &self.line
    }

    /// Read the next line. `raw` sees every byte consumed, kept or not (for hashing).
    pub fn next_line(&mut self, mut raw: impl FnMut(&[u8])) -> std::io::Result<LineRead> {
        self.line.clear();
        let mut total: u64 = 0;
        let mut too_long = false;
        loop {
            let avail = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // What was read of this line so far is handed back by the caller's
                    // error path only through `raw`; the partial line is dropped.
                    return Err(e);
                }
            };
            if avail.is_empty() {
                return Ok(match (total, too_long) {
                    (0, _) => LineRead::Eof,
                    (bytes, true) => LineRead::TooLong {
                        bytes,
                        terminated: false,
                    },
                    (_, false) => LineRead::Line { terminated: false },
                });
            }
            let (take, done) = match memchr::memchr(b'\n', avail) {
                Some(i) => (i + 1, true),
                None => (avail.len(), false),
            };
            let part = &avail[..take];
            raw(part);
            total += take as u64;
            if !too_long {
                if self.line.len() + take > self.cap {
                    too_long = true;
                    // Give the memory back: a 2 GiB line must not keep a 16 MiB buffer.
                    self.line = Vec::new();
                } else {
                    self.line.extend_from_slice(part);
                }
            }
            self.inner.consume(take);
            if done {
                return Ok(if too_long {
                    LineRead::TooLong {
                        bytes: total,
                        terminated: true,
                    }
                } else {
                    LineRead::Line { terminated: true }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(data: &[u8], cap: usize) -> Vec<(LineRead, Vec<u8>)> {
        let mut r = LineReader::new(BufReader::with_capacity(4, data), cap);
        let mut out = Vec::new();
        let mut seen = Vec::new();
        loop {
            let got = r.next_line(|b| seen.extend_from_slice(b)).unwrap();
            if got == LineRead::Eof {
                break;
            }
            out.push((got, r.line().to_vec()));
        }
        assert_eq!(seen, data, "raw sees every byte");
        out
    }

    #[test]
    fn lines_over_the_cap_are_reported_with_their_length_not_kept() {
        let got = lines(b"ab\n0123456789\ncd", 5);
        assert_eq!(
            got,
            vec![
                (LineRead::Line { terminated: true }, b"ab\n".to_vec()),
                (
                    LineRead::TooLong {
                        bytes: 11,
                        terminated: true
                    },
                    vec![]
                ),
                (LineRead::Line { terminated: false }, b"cd".to_vec()),
            ]
        );
        assert_eq!(
            lines(b"0123456789", 5),
            vec![(
                LineRead::TooLong {
                    bytes: 10,
                    terminated: false
                },
                vec![]
            )]
        );
        // Exactly the cap, newline included, is kept.
        assert_eq!(
            lines(b"abcd\n", 5),
            vec![(LineRead::Line { terminated: true }, b"abcd\n".to_vec())]
        );
    }

    #[test]
    fn fifo_is_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("meta.json");
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_capped(&p, 10).unwrap_err();
        assert!(matches!(e, ReadError::NotRegular("FIFO")), "{e}");
    }

    #[test]
    fn symlink_and_oversized_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("t");
        std::fs::write(&target, b"0123456789").unwrap();
        let link = d.path().join("l");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(read_capped(&link, 100), Err(ReadError::Symlink)));
        assert!(matches!(
            read_capped(&target, 5),
            Err(ReadError::TooLarge { size: 10, cap: 5 })
        ));
        assert_eq!(read_capped(&target, 10).unwrap(), b"0123456789");
        assert!(matches!(
            read_capped(d.path(), 10),
            Err(ReadError::NotRegular("directory"))
        ));
    }
}

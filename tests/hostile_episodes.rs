//! Crafted episodes against `cis490 validate`, `ls` and `report` (issue 16, F7 F8 F9 F12):
//! a real episode captured by the real binary, then altered as an attacker would. Every
//! command runs under a timeout guard, so a reader that hangs again fails the test instead
//! of hanging it, and its peak RSS is read from /proc of the child while it runs.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What a guarded run saw.
struct Run {
    code: Option<i32>,
    out: String,
    stdout: Vec<u8>,
    /// Peak resident set (VmHWM) seen in /proc/<pid>/status, KiB.
    peak_rss_kib: u64,
}

/// Longest any of these commands may take before it counts as hung (a debug build decoding
/// 2 GiB on a busy 2-core machine takes ~20 s).
const HANG_AFTER: Duration = Duration::from_secs(120);

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Run cis490 with `args`; kill it and fail if it outlives [`HANG_AFTER`].
fn run(args: &[&std::ffi::OsStr]) -> Run {
    let mut child = cis490_tests::cis490()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cis490");
    let pid = child.id();
    // Drain the pipes on threads, so a chatty child never blocks on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut so, &mut v).ok();
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut se, &mut v).ok();
        v
    });
    let start = Instant::now();
    let mut peak = 0;
    let status = loop {
        if let Some(h) = vm_hwm_kib(pid) {
            peak = peak.max(h);
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > HANG_AFTER {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cis490 {args:?} hung: killed after {HANG_AFTER:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = out_t.join().unwrap();
    let stderr = err_t.join().unwrap();
    Run {
        code: status.code(),
        out: format!(
            "{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
        stdout,
        peak_rss_kib: peak,
    }
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

fn validate(dir: &Path) -> Run {
    run(&[os("validate"), dir.as_os_str()])
}

fn ls(root: &Path) -> Run {
    run(&[os("ls"), root.as_os_str()])
}

fn report(dir: &Path, tmp: &Path) -> Run {
    let out = tmp.join("out.svg");
    run(&[os("report"), dir.as_os_str(), os("-o"), out.as_os_str()])
}

/// One real episode (2 s at 20 Hz of a sleeping child, /proc backend), captured once.
fn intact() -> &'static Path {
    static EP: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &EP.get_or_init(|| {
        let root = tempfile::tempdir().unwrap();
        let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
        let out = cis490_tests::cis490()
            .args(["trace", "--qemu-pid", &sleeper.id().to_string()])
            .args(["--duration", "2", "--rate-hz", "20", "--backend", "proc"])
            .args(["--quiet", "--data-root"])
            .arg(root.path())
            .output()
            .unwrap();
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = cis490_tests::episode_dir_from(&out);
        let v = validate(&dir);
        assert_eq!(v.code, Some(0), "the intact episode must pass: {}", v.out);
        (root, dir)
    })
    .1
}

/// A copy of the intact episode under `root/episodes/<name>` (`cp -a` keeps mtimes, so
/// done.marker stays the newest file).
fn copy_as(root: &Path, name: &[u8]) -> PathBuf {
    let eps = root.join("episodes");
    std::fs::create_dir_all(&eps).unwrap();
    let dst = eps.join(std::ffi::OsStr::from_bytes(name));
    let st = Command::new("cp")
        .arg("-a")
        .arg(intact())
        .arg(&dst)
        .status()
        .unwrap();
    assert!(st.success());
    dst
}

fn copy(root: &Path) -> PathBuf {
    copy_as(root, intact().file_name().unwrap().as_bytes())
}

fn mkfifo(p: &Path) {
    let _ = std::fs::remove_file(p);
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// F7: a FIFO in place of meta.json (and of the files report and ls stream) used to block
/// all three readers forever. Now each refuses it, names it, and exits.
#[test]
fn f7_fifo_meta_json_does_not_hang_validate_ls_or_report() {
    for name in [
        "meta.json",
        "labels.jsonl",
        "telemetry-proc.jsonl",
        "manifest.json",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = copy(tmp.path());
        mkfifo(&dir.join(name));
        let v = validate(&dir);
        assert_eq!(v.code, Some(1), "{name}: {}", v.out);
        assert!(v.out.contains("FAIL"), "{name}: {}", v.out);
        assert!(
            v.out.contains(&format!("{name}: not a regular file"))
                || v.out.contains(&format!("{name}: is a FIFO")),
            "{name}: {}",
            v.out
        );
        let l = ls(tmp.path());
        assert_eq!(l.code, Some(0), "{name}: {}", l.out);
        assert!(l.out.contains("FAIL"), "{name}: {}", l.out);
        assert!(!l.out.contains("ok:"), "{name}: {}", l.out);
        let r = report(&dir, tmp.path());
        if name == "meta.json" || name == "telemetry-proc.jsonl" || name == "labels.jsonl" {
            assert_ne!(r.code, Some(0), "{name}: {}", r.out);
            assert!(r.out.contains("FIFO"), "{name}: {}", r.out);
        }
    }
}

/// Held up before and kept: a symlink inside an episode (to a file the reader may read as
/// root) is refused by every reader, never followed.
#[test]
fn symlink_inside_an_episode_is_refused_by_validate_ls_and_report() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy(tmp.path());
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "root:SECRET-HASH:19000::::::\n").unwrap();
    for name in ["telemetry-proc.jsonl", "meta.json"] {
        std::fs::remove_file(dir.join(name)).unwrap();
        std::os::unix::fs::symlink(&secret, dir.join(name)).unwrap();
    }
    let v = validate(&dir);
    assert_eq!(v.code, Some(1), "{}", v.out);
    assert!(
        v.out.contains("telemetry-proc.jsonl: not a regular file"),
        "{}",
        v.out
    );
    assert!(v.out.contains("meta.json: is a symbolic link"), "{}", v.out);
    assert!(!v.out.contains("SECRET"), "{}", v.out);
    let l = ls(tmp.path());
    assert!(l.out.contains("FAIL"), "{}", l.out);
    let r = report(&dir, tmp.path());
    assert_ne!(r.code, Some(0), "{}", r.out);
    assert!(r.out.contains("symbolic link"), "{}", r.out);
}

/// A zstd frame of `n` bytes of 'a' and no newline: 2 GiB compress to ~67 KB.
fn zst_bomb(path: &Path, n: u64) {
    let f = std::fs::File::create(path).unwrap();
    let mut enc = zstd::stream::write::Encoder::new(f, 3).unwrap();
    let block = vec![b'a'; 1 << 20];
    for _ in 0..n / block.len() as u64 {
        enc.write_all(&block).unwrap();
    }
    enc.finish().unwrap();
}

/// Peak RSS allowed for a reader of a hostile file: the 16 MiB line cap, a bounded zstd
/// window and the binary itself. Before the fix, 2 GiB (abort) and 108-210 MB.
const RSS_BOUND_KIB: u64 = 96 * 1024;

/// F8: a 67 KB .zst that expands to one 2 GiB line aborted validate and report ("memory
/// allocation of 2147483648 bytes failed", rc 134). Now it is a line error with the file
/// and line number, and memory stays bounded.
#[test]
fn f8_zst_bomb_of_one_2gib_line_is_a_line_error_in_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy(tmp.path());
    // Report reads telemetry-proc.jsonl.zst when there is no plain one.
    std::fs::remove_file(dir.join("telemetry-proc.jsonl")).unwrap();
    let bomb = dir.join("telemetry-proc.jsonl.zst");
    zst_bomb(&bomb, 2 << 30);
    assert!(std::fs::metadata(&bomb).unwrap().len() < 200_000);
    let v = validate(&dir);
    assert_eq!(v.code, Some(1), "{}", v.out);
    assert!(
        v.out.contains(
            "telemetry-proc.jsonl.zst:1: line is 2147483648 bytes, over the 16777216-byte line cap"
        ),
        "{}",
        v.out
    );
    assert!(
        v.peak_rss_kib < RSS_BOUND_KIB,
        "validate peak RSS {} KiB",
        v.peak_rss_kib
    );
    eprintln!(
        "validate of a 2 GiB-line zst: peak RSS {} KiB",
        v.peak_rss_kib
    );
    let r = report(&dir, tmp.path());
    assert!(matches!(r.code, Some(0..=2)), "report crashed: {}", r.out);
    assert!(
        r.peak_rss_kib < RSS_BOUND_KIB,
        "report peak RSS {} KiB",
        r.peak_rss_kib
    );
    eprintln!(
        "report of a 2 GiB-line zst: peak RSS {} KiB",
        r.peak_rss_kib
    );
}

/// F8: a plain 100 MiB line cost 108-210 MB of RSS. Now: a line error, bounded memory, in
/// validate, report and ls (which validates).
#[test]
fn f8_plain_100mib_line_is_a_line_error_in_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy(tmp.path());
    let path = dir.join("telemetry-proc.jsonl");
    let lines = std::fs::read(&path)
        .unwrap()
        .iter()
        .filter(|&&b| b == b'\n')
        .count();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    let mut long = vec![b' '; 100 << 20];
    long.push(b'\n');
    f.write_all(&long).unwrap();
    drop(f);
    let v = validate(&dir);
    assert_eq!(v.code, Some(1), "{}", v.out);
    let expected = format!(
        "telemetry-proc.jsonl:{}: line is {} bytes, over the 16777216-byte line cap",
        lines + 1,
        long.len()
    );
    assert!(v.out.contains(&expected), "{expected} not in {}", v.out);
    assert!(
        v.peak_rss_kib < RSS_BOUND_KIB,
        "validate {} KiB",
        v.peak_rss_kib
    );
    let r = report(&dir, tmp.path());
    assert_eq!(r.code, Some(0), "{}", r.out);
    assert!(
        r.peak_rss_kib < RSS_BOUND_KIB,
        "report {} KiB",
        r.peak_rss_kib
    );
    let l = ls(tmp.path());
    assert!(l.out.contains("FAIL"), "{}", l.out);
    assert!(l.peak_rss_kib < RSS_BOUND_KIB, "ls {} KiB", l.peak_rss_kib);
    eprintln!(
        "100 MiB line: peak RSS validate {} KiB, report {} KiB, ls {} KiB",
        v.peak_rss_kib, r.peak_rss_kib, l.peak_rss_kib
    );
}

/// F9 (reader half): a row with a duplicate key passed validate (serde_json keeps one).
#[test]
fn f9_duplicate_keys_in_a_row_fail_validate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy(tmp.path());
    for name in ["telemetry-proc.jsonl", "events.jsonl"] {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let doubled = text.replacen("{\"t_mono_ns\":", "{\"dup\":1,\"dup\":2,\"t_mono_ns\":", 1);
        assert_ne!(doubled, text);
        std::fs::write(&path, doubled).unwrap();
    }
    let v = validate(&dir);
    assert_eq!(v.code, Some(1), "{}", v.out);
    for name in ["telemetry-proc.jsonl", "events.jsonl"] {
        assert!(
            v.out
                .contains(&format!("{name}:1: duplicate keys [\"dup\"]")),
            "{name}: {}",
            v.out
        );
    }
}

/// F12: an episode directory or file name with terminal escape sequences reached the
/// terminal raw through `ls`. Now every printed string is escaped, non-UTF-8 included, and
/// `ls --json` still works on a non-UTF-8 name.
#[test]
fn f12_escape_sequence_names_are_escaped_in_ls() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_as(tmp.path(), b"EVIL\x1b]0;pwned\x07\x1b[2J\xff");
    std::fs::write(dir.join("telemetry-\x1b[31mred.jsonl"), "").unwrap();
    let l = ls(tmp.path());
    assert_eq!(l.code, Some(0), "{}", l.out);
    assert!(
        !l.stdout.iter().any(|&b| b == 0x1b || b == 0x07),
        "raw control bytes on stdout: {:?}",
        l.out
    );
    assert!(
        l.out
            .contains("EVIL\\u{001b}]0;pwned\\u{0007}\\u{001b}[2J\\xff"),
        "{}",
        l.out
    );
    assert!(l.out.contains("\\u{001b}[31mred"), "{}", l.out);
    let j = run(&[os("ls"), os("--json"), tmp.path().as_os_str()]);
    assert_eq!(j.code, Some(0), "{}", j.out);
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    assert!(v[0]["dir"].as_str().unwrap().ends_with("\\xff"), "{v}");
}

/// F12: `ls` said `ok:` for an episode validate fails. Now its state is validate's verdict
/// for every kind of damage here; `--quick` never says ok.
#[test]
fn f12_ls_state_agrees_with_validate() {
    type Damage = fn(&Path);
    let cases: [(&str, Damage); 5] = [
        ("intact", |_| {}),
        ("flipped_byte", |d| {
            let p = d.join("telemetry-proc.jsonl");
            let mut b = std::fs::read(&p).unwrap();
            let i = b.iter().position(|&c| c == b'1').unwrap();
            b[i] = b'2';
            std::fs::write(&p, b).unwrap();
        }),
        ("no_done_marker", |d| {
            std::fs::remove_file(d.join("done.marker")).unwrap()
        }),
        ("stray_file", |d| {
            std::fs::write(d.join("stray.txt"), "x").unwrap();
        }),
        ("meta_not_json", |d| {
            std::fs::write(d.join("meta.json"), "{").unwrap();
        }),
    ];
    for (what, damage) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir = copy(tmp.path());
        damage(&dir);
        let v = validate(&dir);
        let l = ls(tmp.path());
        let line = l.out.lines().nth(1).unwrap_or_default().to_owned();
        let expected = match v.code {
            Some(0) => "ok:duration",
            _ if v.out.contains("INCOMPLETE") => "INCOMPLETE",
            _ => "FAIL",
        };
        assert!(
            line.contains(expected),
            "{what}: validate says {} but ls says {line}",
            v.out
        );
        if expected != "ok:duration" {
            assert!(!line.contains("ok:"), "{what}: {line}");
        }
        let q = run(&[os("ls"), os("--quick"), tmp.path().as_os_str()]);
        assert!(!q.out.contains("ok:"), "{what}: {}", q.out);
    }
}

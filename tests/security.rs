//! Privilege and data-loss findings of issue 16, each as the attack or accident that
//! found it: F1 (root writes through planted symlinks), F2 (report through a planted
//! symlink), F3 (modes under any umask), `cis490 recover` after kill -9 at several
//! points, and the "held up" cases of that audit kept as regression tests.
//!
//! These tests need root (CI runs as root) and `setpriv` (util-linux) to act as an
//! unprivileged user (uid/gid 65534) against a root capture.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use cis490_tests::{cis490, episode_dir_from, read_json, send_signal, wait_for, Load};

const NOBODY: u32 = 65534;
const ID: &str = "01JD0000000000000000000000";

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn trace_cmd(pid: u32, root: &Path, extra: &[&str]) -> Command {
    let mut cmd = cis490();
    cmd.args([
        "trace",
        "--backend",
        "proc",
        "--quiet",
        "--no-qmp",
        "--no-agent",
    ])
    .args([
        "--rate-hz",
        "50",
        "--qemu-pid",
        &pid.to_string(),
        "--data-root",
    ])
    .arg(root)
    .args(extra)
    .stdin(Stdio::null());
    cmd
}

fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cis490 trace")
}

fn validate(dir: &Path) -> (bool, String) {
    let o = cis490().arg("validate").arg(dir).output().unwrap();
    (o.status.success(), text(&o))
}

fn recover(dir: &Path) -> Output {
    cis490().arg("recover").arg(dir).output().unwrap()
}

/// Run `sh -c SCRIPT` as uid/gid 65534 with no supplementary groups.
fn as_nobody(script: &str) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .output()
        .expect("setpriv (util-linux) is needed to act as an unprivileged user")
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
}

/// A scratch area an unprivileged user can reach (tempdirs are 0700).
fn shared_tmp() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    chmod(t.path(), 0o755);
    t
}

/// A root-only file the attacks aim at.
fn victim(dir: &Path, name: &str) -> PathBuf {
    let v = dir.join(name);
    std::fs::write(&v, b"root-only secret\n").unwrap();
    chmod(&v, 0o600);
    v
}

fn assert_victim_untouched(v: &Path) {
    assert_eq!(
        std::fs::read(v).unwrap(),
        b"root-only secret\n",
        "{} was written",
        v.display()
    );
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn f1_data_root_owned_by_another_user_is_refused() {
    let tmp = shared_tmp();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    chown(&root, NOBODY, NOBODY);
    let load = Load::start(&["--spin", "1"]);
    let out = trace_cmd(load.pid(), &root, &["--duration", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("owned by uid 65534"), "{t}");
    assert!(t.contains("safe data root"), "{t}");
    assert!(names(&root).is_empty(), "{:?}", names(&root));
    // World-writable without the sticky bit: refused too; sticky and root's: accepted.
    chown(&root, 0, 0);
    chmod(&root, 0o777);
    let out = trace_cmd(load.pid(), &root, &["--duration", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("not sticky"), "{}", text(&out));
    chmod(&root, 0o1777);
    let out = trace_cmd(load.pid(), &root, &["--duration", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// The audit's attack, by an unprivileged user against a root capture in a sticky,
/// world-writable data root (the only shared kind that is accepted): plant `episodes`
/// as a symlink, then as its own directory, then race a running capture swapping
/// `episodes` and planting `.meta.json.tmp` / `done.marker` symlinks to root-only files.
#[test]
fn f1_unprivileged_user_racing_a_root_capture_never_redirects_its_writes() {
    let tmp = shared_tmp();
    let secrets = tempfile::tempdir().unwrap();
    let v1 = victim(secrets.path(), "victim1");
    let v2 = victim(secrets.path(), "victim2");
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    chmod(&root, 0o1777);
    let lair = tmp.path().join("lair");
    std::fs::create_dir(&lair).unwrap();
    chown(&lair, NOBODY, NOBODY);
    let load = Load::start(&["--spin", "1"]);

    // 1. `episodes` planted as a symlink to the attacker's directory.
    let o = as_nobody(&format!(
        "mkdir -p {lair}/{ID} && ln -s {v1} {lair}/{ID}/.meta.json.tmp && ln -s {v2} {lair}/{ID}/done.marker && ln -s {lair} {root}/episodes",
        lair = lair.display(),
        root = root.display(),
        v1 = v1.display(),
        v2 = v2.display()
    ));
    assert!(o.status.success(), "{}", text(&o));
    let out = trace_cmd(load.pid(), &root, &["--duration", "1", "--episode-id", ID])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("symlink"), "{}", text(&out));
    assert_eq!(names(&lair.join(ID)), vec![".meta.json.tmp", "done.marker"]);

    // 2. `episodes` planted as the attacker's own directory.
    let o = as_nobody(&format!(
        "rm {root}/episodes && mkdir {root}/episodes && ln -s {v1} {root}/episodes/x",
        root = root.display(),
        v1 = v1.display()
    ));
    assert!(o.status.success(), "{}", text(&o));
    let out = trace_cmd(load.pid(), &root, &["--duration", "1", "--episode-id", ID])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("owned by uid 65534"), "{}", text(&out));
    assert_eq!(names(&root.join("episodes")), vec!["x"]);
    let o = as_nobody(&format!("rm -r {}/episodes", root.display()));
    assert!(o.status.success(), "{}", text(&o));

    // 3. A race against a running capture: swap `episodes`, plant symlinks in it.
    let trace = spawn(trace_cmd(
        load.pid(),
        &root,
        &["--duration", "3", "--episode-id", ID],
    ));
    let ep = root.join("episodes").join(ID);
    assert!(wait_for(Duration::from_secs(10), || ep
        .join("meta.json")
        .exists()));
    let script = format!(
        "for i in $(seq 50); do \
           mv {root}/episodes {root}/old 2>/dev/null; \
           ln -s {lair} {root}/episodes 2>/dev/null; \
           ln -s {v1} {ep}/.meta.json.tmp 2>/dev/null; \
           ln -s {v2} {ep}/done.marker 2>/dev/null; \
           (: > {ep}/manifest.json) 2>/dev/null; \
           sleep 0.05; \
         done; true",
        root = root.display(),
        lair = lair.display(),
        ep = ep.display(),
        v1 = v1.display(),
        v2 = v2.display()
    );
    let o = as_nobody(&script);
    assert!(o.status.success(), "{}", text(&o));
    let out = trace.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_victim_untouched(&v1);
    assert_victim_untouched(&v2);
    let dir = episode_dir_from(&out);
    let (ok, report) = validate(&dir);
    assert!(ok, "{report}");
    // The attacker could neither move `episodes` nor add anything to it.
    assert_eq!(names(&root), vec!["episodes"]);
    assert_eq!(names(&root.join("episodes")), vec![ID]);
    assert_eq!(names(&lair.join(ID)), vec![".meta.json.tmp", "done.marker"]);
}

/// Whoever manages to swap `episodes` mid-capture (here root itself, standing in for any
/// path change the checks cannot see coming), the capture's writes stay in the directory
/// it created: they go through its handle, never through the path.
#[test]
fn f1_episodes_swapped_for_a_symlink_mid_capture_writes_only_in_its_own_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let v1 = victim(secrets.path(), "victim1");
    let v2 = victim(secrets.path(), "victim2");
    let root = tmp.path().join("root");
    let lair = tmp.path().join("lair");
    std::fs::create_dir_all(lair.join(ID)).unwrap();
    let load = Load::start(&["--spin", "1"]);
    let trace = spawn(trace_cmd(
        load.pid(),
        &root,
        &["--duration", "2", "--episode-id", ID],
    ));
    let ep = root.join("episodes").join(ID);
    assert!(wait_for(Duration::from_secs(10), || ep
        .join("meta.json")
        .exists()));
    std::fs::rename(root.join("episodes"), root.join("moved")).unwrap();
    std::os::unix::fs::symlink(&lair, root.join("episodes")).unwrap();
    for (name, v) in [
        (".meta.json.tmp", &v1),
        ("meta.json", &v1),
        ("manifest.json", &v1),
        ("done.marker", &v2),
    ] {
        std::os::unix::fs::symlink(v, lair.join(ID).join(name)).unwrap();
    }
    let out = trace.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_victim_untouched(&v1);
    assert_victim_untouched(&v2);
    let ours = root.join("moved").join(ID);
    let (ok, report) = validate(&ours);
    assert!(ok, "{report}");
    assert_eq!(
        names(&lair.join(ID)),
        vec![
            ".meta.json.tmp",
            "done.marker",
            "manifest.json",
            "meta.json"
        ]
    );
}

#[test]
fn f1_symlink_preplanted_at_the_episode_id_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("episodes")).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), tmp.path().join("episodes").join(ID)).unwrap();
    let load = Load::start(&["--spin", "1"]);
    let out = trace_cmd(
        load.pid(),
        tmp.path(),
        &["--duration", "1", "--episode-id", ID],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("already exists"), "{}", text(&out));
    assert!(names(elsewhere.path()).is_empty());
}

#[test]
fn f1_episode_id_with_path_components_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("a").join("b");
    let load = Load::start(&["--spin", "1"]);
    let out = trace_cmd(
        load.pid(),
        &root,
        &["--duration", "1", "--episode-id", "../../x"],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("not a ULID"), "{}", text(&out));
    assert!(!tmp.path().join("x").exists());
    assert!(!root.exists());
}

#[test]
fn read_only_data_root_is_a_clear_error_and_writes_nothing() {
    let mnt = tempfile::tempdir().unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "cis490-test-ro"])
        .arg(mnt.path())
        .status()
        .expect("run mount");
    assert!(
        st.success(),
        "this test needs root to mount a tmpfs (CI runs as root)"
    );
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(mnt.path());
    let load = Load::start(&["--spin", "1"]);
    let out = trace_cmd(load.pid(), mnt.path(), &["--duration", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("data root") && t.contains("Read-only"), "{t}");
    assert!(names(mnt.path()).is_empty());
}

#[test]
fn oversized_meta_file_is_refused_by_its_size_before_it_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("meta.json");
    // 200 MiB on paper (sparse): refused from its size, never read into memory.
    std::fs::File::create(&big)
        .unwrap()
        .set_len(200 << 20)
        .unwrap();
    let load = Load::start(&["--spin", "1"]);
    let out = trace_cmd(
        load.pid(),
        &tmp.path().join("data"),
        &["--duration", "1", "--meta", big.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("at most 1048576 bytes"),
        "{}",
        text(&out)
    );
    assert!(!tmp.path().join("data").exists());
}

/// A finished capture in `root` (proc backend, 1 s).
fn capture(root: &Path, extra: &[&str]) -> PathBuf {
    let load = Load::start(&["--spin", "1", "--switch", "1"]);
    let mut args = vec!["--duration", "1"];
    args.extend_from_slice(extra);
    let out = trace_cmd(load.pid(), root, &args).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    episode_dir_from(&out)
}

#[test]
fn f2_report_does_not_write_through_a_planted_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let v = victim(secrets.path(), "victim");
    let dir = capture(tmp.path(), &[]);
    let out_path = PathBuf::from(format!("{}.report.png", dir.display()));
    std::os::unix::fs::symlink(&v, &out_path).unwrap();
    let o = cis490().arg("report").arg(&dir).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_victim_untouched(&v);
    let md = std::fs::symlink_metadata(&out_path).unwrap();
    assert!(
        md.is_file(),
        "the planted symlink must be replaced by the picture"
    );
    assert_eq!(md.mode() & 0o777, 0o600);
    assert!(std::fs::read(&out_path).unwrap().starts_with(b"\x89PNG"));
    // The same for an explicit --output, and SVG.
    let svg = tmp.path().join("r.svg");
    std::os::unix::fs::symlink(&v, &svg).unwrap();
    let o = cis490()
        .arg("report")
        .arg(&dir)
        .arg("--output")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_victim_untouched(&v);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
}

/// Mode (permission bits) and gid of every entry of an episode, and of the directory.
fn modes(dir: &Path) -> (u32, BTreeMap<String, (u32, u32)>) {
    let d = std::fs::metadata(dir).unwrap().mode() & 0o7777;
    let files = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                (md.mode() & 0o7777, md.gid()),
            )
        })
        .collect();
    (d, files)
}

fn capture_under_umask(root: &Path, mask: u32, extra: &[&str]) -> PathBuf {
    let load = Load::start(&["--spin", "1"]);
    let mut args = vec!["--duration", "1"];
    args.extend_from_slice(extra);
    let mut cmd = trace_cmd(load.pid(), root, &args);
    // SAFETY: umask is async-signal-safe; it runs in the child before exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(mask as libc::mode_t);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    episode_dir_from(&out)
}

#[test]
fn f3_episode_modes_are_private_under_umask_000_and_022() {
    for mask in [0o000, 0o022] {
        let tmp = shared_tmp();
        let dir = capture_under_umask(tmp.path(), mask, &[]);
        let (d, files) = modes(&dir);
        assert_eq!(d, 0o700, "umask {mask:03o}: episode dir");
        assert!(files.len() >= 5, "{files:?}");
        for (name, (mode, _)) in &files {
            assert_eq!(*mode, 0o600, "umask {mask:03o}: {name}");
        }
        // Another user can neither read meta.json (QEMU's command line) nor plant in it.
        let o = as_nobody(&format!(
            "cat {d}/meta.json || ln -s /etc/shadow {d}/x",
            d = dir.display()
        ));
        assert!(!o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("Permission denied"), "{}", text(&o));
    }
}

#[test]
fn f3_group_read_is_given_only_when_asked() {
    let tmp = shared_tmp();
    let dir = capture_under_umask(tmp.path(), 0o000, &["--group", "nogroup"]);
    let (d, files) = modes(&dir);
    assert_eq!(d, 0o750);
    assert_eq!(std::fs::metadata(&dir).unwrap().gid(), NOBODY);
    for (name, (mode, gid)) in &files {
        assert_eq!((*mode, *gid), (0o640, NOBODY), "{name}");
    }
    // A member of the group reads the episode; others still cannot write into it.
    let o = as_nobody(&format!(
        "head -c 1 {d}/meta.json && ! touch {d}/x 2>/dev/null",
        d = dir.display()
    ));
    assert!(o.status.success(), "{}", text(&o));
    // An unknown group is a usage error before anything is written.
    let load = Load::start(&["--spin", "1"]);
    let root2 = tmp.path().join("r2");
    let out = trace_cmd(
        load.pid(),
        &root2,
        &["--duration", "1", "--group", "no-such-group-x"],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(!root2.exists());
}

#[test]
fn f3_setgid_data_root_gives_its_group_read() {
    let tmp = shared_tmp();
    chown(tmp.path(), 0, NOBODY);
    chmod(tmp.path(), 0o2755);
    let dir = capture_under_umask(tmp.path(), 0o077, &[]);
    let (d, files) = modes(&dir);
    assert_eq!(d & 0o777, 0o750);
    for (name, (mode, gid)) in &files {
        assert_eq!((*mode, *gid), (0o640, NOBODY), "{name}");
    }
}

/// Byte content and mtime of every file: what "changes nothing" compares.
fn snapshot(dir: &Path) -> BTreeMap<String, (Vec<u8>, SystemTime)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                (
                    std::fs::read(&p).unwrap(),
                    std::fs::metadata(&p).unwrap().modified().unwrap(),
                ),
            )
        })
        .collect()
}

/// kill -9 a capture once it has written rows; returns its episode directory.
fn killed_capture(root: &Path, extra: &[&str]) -> PathBuf {
    let load = Load::start(&["--spin", "1", "--switch", "1"]);
    let mut trace = spawn(trace_cmd(load.pid(), root, extra));
    let mut dir = None;
    assert!(wait_for(Duration::from_secs(15), || {
        for e in std::fs::read_dir(root.join("episodes"))
            .into_iter()
            .flatten()
        {
            let p = e.unwrap().path();
            let rows = std::fs::read_dir(&p).into_iter().flatten().any(|f| {
                let f = f.unwrap();
                f.file_name().to_string_lossy().starts_with("telemetry-")
                    && f.metadata().is_ok_and(|m| m.len() > 200)
            });
            if rows {
                dir = Some(p);
                return true;
            }
        }
        false
    }));
    // Let a few more flushes land, then kill without warning.
    std::thread::sleep(Duration::from_millis(700));
    send_signal(trace.id(), libc::SIGKILL);
    trace.wait().unwrap();
    dir.unwrap()
}

fn assert_recovers(dir: &Path) -> serde_json::Value {
    let (ok, before) = validate(dir);
    assert!(!ok && before.contains("INCOMPLETE"), "{before}");
    let o = recover(dir);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("sealed"), "{}", text(&o));
    let (ok, report) = validate(dir);
    assert!(ok, "{report}");
    assert!(!dir.join("control.sock").exists());
    let meta = read_json(&dir.join("meta.json"));
    assert_eq!(meta["result"]["end_reason"], "recovered");
    assert!(meta["result"]["rows_total"].as_u64().unwrap() > 0, "{meta}");
    assert!(
        meta["result"]["duration_observed_s"].as_f64().unwrap() > 0.5,
        "{meta}"
    );
    // Idempotent: a second run says so and changes nothing.
    let snap = snapshot(dir);
    let o = recover(dir);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("already sealed"), "{}", text(&o));
    assert_eq!(snapshot(dir), snap);
    meta
}

#[test]
fn recover_after_kill_9_mid_capture_with_a_partial_last_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = killed_capture(tmp.path(), &[]);
    // The killed capture left its socket behind.
    assert!(dir.join("control.sock").exists());
    // A write cut off mid-line, as power loss leaves it.
    let f = dir.join("telemetry-proc.jsonl");
    let mut data = std::fs::read(&f).unwrap();
    // Whole lines only (a kill can itself cut a write short), then a cut-off line.
    let whole = data.iter().rposition(|&b| b == b'\n').unwrap() + 1;
    data.truncate(whole);
    data.extend_from_slice(b"{\"t_mono_ns\":99999999999,\"t_wall");
    std::fs::write(&f, &data).unwrap();
    let meta = assert_recovers(&dir);
    assert_eq!(std::fs::metadata(&f).unwrap().len() as usize, whole);
    let dropped = meta["result"]["recovered"]["dropped"].as_array().unwrap();
    let proc = dropped
        .iter()
        .find(|d| d["file"] == "telemetry-proc.jsonl")
        .unwrap_or_else(|| panic!("{meta}"));
    assert_eq!(proc["bytes"], 32, "{meta}");
    assert!(meta["result"]["recovered"]["previous_end_reason"].is_null());
}

#[test]
fn recover_after_kill_9_mid_capture_with_zstd() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = killed_capture(tmp.path(), &["--compress", "zstd"]);
    let meta = assert_recovers(&dir);
    let proc_source = meta["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "proc")
        .unwrap_or_else(|| panic!("{meta}"))
        .clone();
    assert_eq!(proc_source["file"], "telemetry-proc.jsonl.zst");
    // The killed frame had no end: it was re-encoded to a whole one.
    let fixed = meta["result"]["recovered"]["dropped"].as_array().unwrap();
    assert!(
        fixed
            .iter()
            .any(|d| d["file"] == "telemetry-proc.jsonl.zst" && d["reencoded"] == true),
        "{meta}"
    );
    let raw = std::fs::read(dir.join("telemetry-proc.jsonl.zst")).unwrap();
    let text = String::from_utf8(zstd::stream::decode_all(&raw[..]).unwrap()).unwrap();
    assert_eq!(
        text.lines().count() as u64,
        proc_source["rows"].as_u64().unwrap()
    );
}

/// The close sequence cut at each step (meta.json written, then manifest.json, then
/// done.marker), simulated on a sealed episode by undoing its last steps.
#[test]
fn recover_after_kill_9_during_the_close_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    // After the final meta.json, before manifest.json.
    let dir = capture(tmp.path(), &[]);
    std::fs::remove_file(dir.join("done.marker")).unwrap();
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let meta = assert_recovers(&dir);
    assert_eq!(
        meta["result"]["recovered"]["previous_end_reason"],
        "duration"
    );
    // After manifest.json, before done.marker, with a leftover temp file of ours.
    let dir = capture(tmp.path(), &["--compress", "zstd"]);
    std::fs::remove_file(dir.join("done.marker")).unwrap();
    std::fs::write(
        dir.join(".manifest.json.1234-0-00000000.tmp"),
        b"{\"partial",
    )
    .unwrap();
    assert_recovers(&dir);
    assert!(!dir.join(".manifest.json.1234-0-00000000.tmp").exists());
    // Streams still open when it died: events.jsonl and a telemetry file cut mid-line,
    // no final meta.json result yet.
    let dir = capture(tmp.path(), &[]);
    for name in ["done.marker", "manifest.json"] {
        std::fs::remove_file(dir.join(name)).unwrap();
    }
    let mut meta = read_json(&dir.join("meta.json"));
    meta["result"] = serde_json::Value::Null;
    meta["sources"] = serde_json::json!([]);
    std::fs::write(dir.join("meta.json"), meta.to_string()).unwrap();
    for name in ["events.jsonl", "telemetry-proc.jsonl"] {
        let f = dir.join(name);
        let data = std::fs::read(&f).unwrap();
        std::fs::write(&f, &data[..data.len() - 10]).unwrap();
    }
    let meta = assert_recovers(&dir);
    // Rebuilt from the files on disk (perf and proc here).
    assert!(
        meta["sources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "proc"),
        "{meta}"
    );
    // Recover itself killed after its meta.json, before done.marker: run again, and the
    // capture's own end reason is still the one recorded.
    let dir = capture(tmp.path(), &[]);
    std::fs::remove_file(dir.join("done.marker")).unwrap();
    assert!(recover(&dir).status.success());
    std::fs::remove_file(dir.join("done.marker")).unwrap();
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let meta = assert_recovers(&dir);
    assert_eq!(
        meta["result"]["recovered"]["previous_end_reason"],
        "duration"
    );
    let ends = std::fs::read_to_string(dir.join("events.jsonl"))
        .unwrap()
        .matches("\"episode_end\"")
        .count();
    assert_eq!(ends, 1, "episode_end written once");
}

#[test]
fn recover_refuses_a_capture_killed_before_its_streams_existed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = capture(tmp.path(), &[]);
    for name in ["done.marker", "manifest.json", "labels.jsonl"] {
        std::fs::remove_file(dir.join(name)).unwrap();
    }
    let before = snapshot(&dir);
    let o = recover(&dir);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("nothing to recover"), "{}", text(&o));
    assert_eq!(snapshot(&dir), before);
}

#[test]
fn recover_refuses_a_running_capture() {
    let tmp = tempfile::tempdir().unwrap();
    let load = Load::start(&["--spin", "1"]);
    let trace = spawn(trace_cmd(load.pid(), tmp.path(), &["--episode-id", ID]));
    let dir = tmp.path().join("episodes").join(ID);
    assert!(wait_for(Duration::from_secs(10), || dir
        .join("control.sock")
        .exists()));
    let o = recover(&dir);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("still running"), "{}", text(&o));
    assert!(!dir.join("done.marker").exists());
    // The capture goes on and closes normally.
    send_signal(trace.id(), libc::SIGINT);
    let out = trace.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let (ok, report) = validate(&dir);
    assert!(ok, "{report}");
    assert_eq!(
        read_json(&dir.join("meta.json"))["result"]["end_reason"],
        "signal"
    );
}

#[test]
fn recover_refuses_what_is_not_an_episode() {
    let tmp = tempfile::tempdir().unwrap();
    let o = recover(tmp.path());
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no meta.json"), "{}", text(&o));
    assert!(names(tmp.path()).is_empty());
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
    let o = recover(&link);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("symlink"), "{}", text(&o));
}

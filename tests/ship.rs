//! `cis490 ship` against a real S3-compatible server (s3s-fs on 127.0.0.1, SigV4): every
//! object is the episode's file or its Parquet export byte for byte, the marker comes
//! last and only after verification, a second run uploads nothing, a killed run resumes,
//! an outage is waited out by --watch, and misconfiguration fails clearly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use cis490_tests::{bin, read_json, wait_for, Load, S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A 1 s /proc capture of a 3-thread target at `rate` Hz; returns its episode directory.
fn capture(root: &Path, rate: u32) -> PathBuf {
    capture_for(root, rate, 1)
}

/// As [`capture`], for `secs` seconds.
fn capture_for(root: &Path, rate: u32, secs: u32) -> PathBuf {
    let load = Load::start(&["--spin", "1", "--switch", "2"]);
    let out = Command::new(bin("cis490"))
        .arg("trace")
        .arg("--qemu-pid")
        .arg(load.pid().to_string())
        .arg("--data-root")
        .arg(root)
        .args(["--backend", "proc", "--duration", &secs.to_string()])
        .args(["--rate-hz", &rate.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "capture failed: {}", text(&out));
    let dir = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .trim(),
    );
    assert!(dir.join("done.marker").exists());
    dir
}

fn episode_id(dir: &Path) -> String {
    read_json(&dir.join("meta.json"))["episode_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Every raw object equals the episode's file, every listed object of the marker is in the
/// store with that size and sha256, and done.marker and the episodes row are there.
fn assert_shipped(s3: &S3Server, prefix: &str, dir: &Path) -> Value {
    let id = episode_id(dir);
    let marker_path = s3.object(&format!("{prefix}/shipped/{id}.json"));
    let marker = read_json(&marker_path);
    let manifest = read_json(&dir.join("manifest.json"));
    let mut names: Vec<String> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect();
    names.extend(["manifest.json".into(), "done.marker".into()]);
    for name in &names {
        let key = format!("{prefix}/raw/{id}/{name}");
        let stored = std::fs::read(s3.object(&key)).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(
            stored,
            std::fs::read(dir.join(name)).unwrap(),
            "{key} differs"
        );
    }
    let objects = marker["objects"].as_array().unwrap();
    for o in objects {
        let key = o["key"].as_str().unwrap();
        let data = std::fs::read(s3.object(key)).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(data.len() as u64, o["bytes"].as_u64().unwrap(), "{key}");
        assert_eq!(
            cis490::jsonl::hex(&<sha2::Sha256 as sha2::Digest>::digest(&data)),
            o["sha256"].as_str().unwrap(),
            "{key}"
        );
    }
    let keys: Vec<&str> = objects.iter().map(|o| o["key"].as_str().unwrap()).collect();
    assert!(keys
        .contains(&format!("{prefix}/dataset/episodes/episode_id={id}/part-0.parquet").as_str()));
    assert!(
        keys.contains(&format!("{prefix}/dataset/proc/episode_id={id}/part-0.parquet").as_str())
    );
    assert_eq!(
        keys.len(),
        names.len()
            + objects
                .iter()
                .filter(|o| o["key"].as_str().unwrap().contains("/dataset/"))
                .count()
    );
    marker
}

#[test]
fn three_episodes_ship_verified_readable_through_s3_and_a_second_run_sends_nothing() {
    let data = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3).map(|_| capture(data.path(), 100)).collect();
    let s3 = S3Server::start();
    let out = s3.ship(data.path(), "host-a").output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("3 shipped"), "{t}");
    for d in &dirs {
        assert_shipped(&s3, "host-a", d);
    }
    // Read the dataset back through the S3 API (pyarrow's S3 client, SigV4 to the same
    // server; polars' reader gets a 500 from s3s-fs on its ranged GETs, docs/datasets.md) and count every stream's rows against the episodes' JSONL.
    let mut expect = serde_json::Map::new();
    for stream in ["proc", "events", "labels"] {
        let file = match stream {
            "proc" => "telemetry-proc.jsonl",
            "events" => "events.jsonl",
            _ => "labels.jsonl",
        };
        let n: usize = dirs
            .iter()
            .map(|d| {
                std::fs::read_to_string(d.join(file))
                    .unwrap()
                    .lines()
                    .count()
            })
            .sum();
        expect.insert(stream.into(), n.into());
    }
    let script = format!(
        r#"
import json, pyarrow.dataset as ds, pyarrow.fs as pafs
fs = pafs.S3FileSystem(access_key="{ACCESS_KEY}", secret_key="{SECRET_KEY}", endpoint_override="127.0.0.1:{port}", scheme="http", region="us-east-1")
out = {{}}
for s in ["proc", "events", "labels"]:
    # Listed, then read: s3s-fs answers HEAD of a "folder" key with 500 where S3 says 404,
    # which pyarrow's ds.dataset(folder) trips on.
    base = "{BUCKET}/host-a/dataset/" + s
    files = [f.path for f in fs.get_file_info(pafs.FileSelector(base, recursive=True)) if f.path.endswith(".parquet")]
    t = ds.dataset(files, filesystem=fs, format="parquet", partitioning="hive", partition_base_dir=base).to_table()
    out[s] = t.num_rows
    out[s + "_episodes"] = len(set(t.column("episode_id").to_pylist()))
print(json.dumps(out))
"#,
        port = s3.port
    );
    let py = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(py.status.success(), "python: {}", text(&py));
    let got: Value = serde_json::from_slice(py.stdout.trim_ascii()).unwrap();
    for (s, n) in &expect {
        assert_eq!(&got[s], n, "{s}: read through S3 {got}, JSONL {n}");
        assert_eq!(got[format!("{s}_episodes")], 3, "{got}");
    }
    // Idempotent: nothing is sent again, no object is rewritten.
    let mtimes = |s3: &S3Server| -> Vec<(String, std::time::SystemTime)> {
        s3.keys("host-a")
            .into_iter()
            .map(|k| {
                let m = std::fs::metadata(s3.object(&k))
                    .unwrap()
                    .modified()
                    .unwrap();
                (k, m)
            })
            .collect()
    };
    let before = mtimes(&s3);
    let again = s3.ship(data.path(), "host-a").output().unwrap();
    let t = text(&again);
    assert!(again.status.success(), "{t}");
    assert!(
        t.contains("0 shipped (0 objects, 0 already in the store, 0 bytes sent"),
        "{t}"
    );
    assert!(t.contains("3 already shipped"), "{t}");
    assert_eq!(before, mtimes(&s3));
}

#[test]
fn a_shipper_killed_mid_episode_resumes_and_replaces_a_wrong_object() {
    let data = tempfile::tempdir().unwrap();
    // 1 kHz: the episodes are large enough that the second is still uploading when the
    // store is frozen below.
    let mut dirs: Vec<PathBuf> = (0..3).map(|_| capture(data.path(), 1000)).collect();
    dirs.sort(); // ship order (ULIDs sort by time)
    let ids: Vec<String> = dirs.iter().map(|d| episode_id(d)).collect();
    let s3 = S3Server::start();
    // A wrong object where the third episode's meta.json goes: same size, other bytes
    // (an upload from another run that went wrong); the shipper must not keep it.
    let meta_key = format!("host-a/raw/{}/meta.json", ids[2]);
    let real_meta = std::fs::read(dirs[2].join("meta.json")).unwrap();
    std::fs::create_dir_all(s3.object(&meta_key).parent().unwrap()).unwrap();
    std::fs::write(s3.object(&meta_key), vec![b'x'; real_meta.len()]).unwrap();
    // Every file above 4 KiB as a multipart upload: the killed run leaves one unfinished,
    // which the next run must not mistake for an object.
    let mut child = s3
        .ship(data.path(), "host-a")
        .args(["--multipart-above", "4096"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Freeze the store as soon as the second episode's first object lands, then kill the
    // shipper while its request hangs: it dies mid-episode for certain.
    let second = s3.object(&format!("host-a/raw/{}", ids[1]));
    assert!(
        wait_for(Duration::from_secs(60), || second.exists()),
        "the second episode never started uploading"
    );
    cis490_tests::send_signal(s3.pid(), libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(300));
    let _ = child.kill();
    let killed = child.wait_with_output().unwrap();
    cis490_tests::send_signal(s3.pid(), libc::SIGCONT);
    assert!(
        s3.object(&format!("host-a/shipped/{}.json", ids[0]))
            .exists(),
        "{}",
        text(&killed)
    );
    assert!(
        !s3.object(&format!("host-a/shipped/{}.json", ids[1]))
            .exists(),
        "killed mid-episode, yet marked shipped"
    );
    assert!(!s3
        .object(&format!("host-a/shipped/{}.json", ids[2]))
        .exists());
    let partial = s3.keys(&format!("host-a/raw/{}", ids[1])).len();
    assert!(partial >= 1);
    let out = s3
        .ship(data.path(), "host-a")
        .args(["--multipart-above", "4096"])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("2 shipped"), "{t}");
    assert!(t.contains("1 already shipped"), "{t}");
    // The second episode's objects that had landed were checked and kept.
    let line = t
        .lines()
        .find(|l| l.contains(&ids[1]) && l.contains("shipped,"))
        .unwrap();
    assert!(!line.contains("(0 already there)"), "{line}");
    for d in &dirs {
        assert_shipped(&s3, "host-a", d);
    }
    assert_eq!(std::fs::read(s3.object(&meta_key)).unwrap(), real_meta);
}

/// The shipper's multipart journals (`--state-dir`): (file, parts recorded).
fn journals(s3: &S3Server) -> Vec<(PathBuf, usize)> {
    std::fs::read_dir(s3.state.path())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: Value = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            Some((e.path(), v["parts"].as_array()?.len()))
        })
        .collect()
}

#[test]
fn a_shipper_killed_mid_file_resumes_at_the_file_s_next_part() {
    let data = tempfile::tempdir().unwrap();
    // 1 kHz for 10 s: telemetry-proc.jsonl is several 8 MiB parts.
    let dir = capture_for(data.path(), 1000, 10);
    let big = std::fs::metadata(dir.join("telemetry-proc.jsonl"))
        .unwrap()
        .len();
    assert!(
        big > 2 * (8 << 20),
        "telemetry-proc.jsonl is only {big} bytes"
    );
    let total: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let s3 = S3Server::start();
    let mut child = s3
        .ship(data.path(), "host-r")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // As soon as a part of the big file is journaled, freeze the store (the next part's
    // request hangs) and kill the shipper: it dies inside the file for certain.
    assert!(
        wait_for(Duration::from_secs(60), || journals(&s3)
            .iter()
            .any(|j| j.1 >= 1)),
        "no multipart part was ever journaled"
    );
    cis490_tests::send_signal(s3.pid(), libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(300));
    let _ = child.kill();
    let killed = child.wait_with_output().unwrap();
    cis490_tests::send_signal(s3.pid(), libc::SIGCONT);
    let id = episode_id(&dir);
    assert!(
        !s3.object(&format!("host-r/shipped/{id}.json")).exists(),
        "killed mid-file, yet marked shipped: {}",
        text(&killed)
    );
    let parts_before = journals(&s3).iter().map(|j| j.1).max().unwrap_or(0);
    assert!(parts_before >= 1);

    let out = s3.ship(data.path(), "host-r").output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "resuming its upload after {parts_before} parts already in the store"
        )),
        "{t}"
    );
    assert!(t.contains("1 shipped"), "{t}");
    // The resumed run sent less than the episode: the journaled parts stayed in the store.
    let sent: u64 = t
        .lines()
        .find(|l| l.contains("bytes sent") && l.contains(&id))
        .and_then(|l| l.split(", ").last())
        .and_then(|x| x.split(' ').next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no bytes sent in {t}"));
    assert!(
        sent + parts_before as u64 * (8 << 20) <= total + (4 << 20),
        "sent {sent} of {total} bytes after {parts_before} parts were already there"
    );
    // Every object, the resumed one included, is the local file byte for byte.
    assert_shipped(&s3, "host-r", &dir);
    assert!(
        journals(&s3).is_empty(),
        "a finished upload left its journal"
    );
}

#[test]
fn wrong_credentials_a_missing_bucket_and_a_down_store_fail_clearly_and_mark_nothing() {
    let data = tempfile::tempdir().unwrap();
    capture(data.path(), 100);
    let mut s3 = S3Server::start();
    let wrong = s3
        .ship(data.path(), "p")
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(2), "{}", text(&wrong));
    assert!(
        text(&wrong).contains("refused the credentials"),
        "{}",
        text(&wrong)
    );
    let no_bucket = Command::new(bin("cis490"))
        .arg("ship")
        .arg(data.path())
        .args([
            "--to",
            "s3://no-such-bucket/p",
            "--endpoint",
            &s3.endpoint(),
        ])
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .output()
        .unwrap();
    assert_eq!(no_bucket.status.code(), Some(2), "{}", text(&no_bucket));
    assert!(
        text(&no_bucket).contains("bucket does not exist"),
        "{}",
        text(&no_bucket)
    );
    s3.stop();
    let t0 = Instant::now();
    let down = s3.ship(data.path(), "p").output().unwrap();
    assert_eq!(down.status.code(), Some(2), "{}", text(&down));
    assert!(text(&down).contains("unreachable"), "{}", text(&down));
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
    assert!(s3.keys("p").is_empty(), "{:?}", s3.keys("p"));
    let bad_url = Command::new(bin("cis490"))
        .arg("ship")
        .arg(data.path())
        .args(["--to", "lab/p"])
        .output()
        .unwrap();
    assert_eq!(bad_url.status.code(), Some(2));
    assert!(
        text(&bad_url).contains("expected s3://BUCKET/PREFIX"),
        "{}",
        text(&bad_url)
    );
}

#[test]
fn incomplete_invalid_and_symlinked_episodes_are_not_shipped() {
    let data = tempfile::tempdir().unwrap();
    let good = capture(data.path(), 100);
    let incomplete = capture(data.path(), 100);
    std::fs::remove_file(incomplete.join("done.marker")).unwrap();
    let tampered = capture(data.path(), 100);
    let f = tampered.join("telemetry-proc.jsonl");
    let mut body = std::fs::read(&f).unwrap();
    body[10] ^= 1;
    std::fs::write(&f, body).unwrap();
    // A planted link where a listed file was: root must not send /etc/shadow.
    let linked = capture(data.path(), 100);
    std::fs::remove_file(linked.join("events.jsonl")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", linked.join("events.jsonl")).unwrap();
    let s3 = S3Server::start();
    let out = s3.ship(data.path(), "p").output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("1 shipped") && t.contains("1 incomplete") && t.contains("2 not shipped"),
        "{t}"
    );
    assert_shipped(&s3, "p", &good);
    for d in [&incomplete, &tampered, &linked] {
        let id = episode_id(d);
        assert!(s3.keys(&format!("p/raw/{id}")).is_empty(), "{id} sent: {t}");
        assert!(!s3.object(&format!("p/shipped/{id}.json")).exists());
    }
    let shadow = std::fs::read("/etc/shadow").unwrap_or_default();
    for k in s3.keys("p") {
        let data = std::fs::read(s3.object(&k)).unwrap();
        assert!(shadow.is_empty() || data != shadow, "{k} holds /etc/shadow");
    }
}

#[test]
fn watch_ships_each_episode_as_it_closes_and_waits_out_a_store_outage() {
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("episodes")).unwrap();
    let mut s3 = S3Server::start();
    let mut child = s3
        .ship(data.path(), "w")
        .arg("--watch")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = capture(data.path(), 100);
    let store_root = s3.root.path().join(BUCKET);
    let marker = |d: &Path| store_root.join(format!("w/shipped/{}.json", episode_id(d)));
    // An inotify wake-up, not the 10 s rescan.
    let t0 = Instant::now();
    assert!(wait_for(Duration::from_secs(30), || marker(&first).exists()));
    let woke = t0.elapsed();
    s3.stop();
    let second = capture(data.path(), 100);
    std::thread::sleep(Duration::from_secs(3));
    assert!(!marker(&second).exists());
    s3.restart();
    assert!(
        wait_for(Duration::from_secs(60), || marker(&second).exists()),
        "the second episode was not shipped after the store came back"
    );
    cis490_tests::send_signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("retrying in"), "{t}");
    assert!(t.contains("the store is back"), "{t}");
    assert!(
        woke < Duration::from_secs(8),
        "shipped {woke:?} after close: {t}"
    );
    assert_shipped(&s3, "w", &first);
    assert_shipped(&s3, "w", &second);
}

//! `cis490 validate`, `report` and `ls` against real episodes captured by the real binary
//! (a `sleep` child as the target, /proc backend) and a synthetic multi-source episode.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("debug/cis490");
    assert!(
        p.exists(),
        "{} not built (run `cargo build` or `cargo xtask test`)",
        p.display()
    );
    p
}

fn cis490(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("running cis490")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A target process that lives until killed.
struct Sleeper(Child);

impl Sleeper {
    fn start() -> Self {
        Sleeper(
            Command::new("sleep")
                .arg("60")
                .stdin(Stdio::null())
                .spawn()
                .expect("spawning sleep"),
        )
    }
    fn pid(&self) -> String {
        self.0.id().to_string()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn only_episode(root: &Path) -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root.join("episodes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(v.len(), 1, "{v:?}");
    v.pop().unwrap()
}

/// Capture a real episode: 3 s at 20 Hz of a sleeping child, with a phase mark after ~0.3 s.
fn capture(root: &Path) -> PathBuf {
    let target = Sleeper::start();
    let trace = Command::new(bin())
        .args([
            "trace",
            "--qemu-pid",
            &target.pid(),
            "--duration",
            "3",
            "--rate-hz",
            "20",
        ])
        .args(["--backend", "proc", "--quiet", "--data-root"])
        .arg(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("control.sock", Duration::from_secs(10), || {
        std::fs::read_dir(root.join("episodes"))
            .ok()
            .and_then(|mut d| d.next())
            .is_some_and(|e| e.unwrap().path().join("control.sock").exists())
    });
    let dir = only_episode(root);
    std::thread::sleep(Duration::from_millis(300));
    let mark = Command::new(bin())
        .args(["mark", "--phase", "armed", "--reason", "test"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(mark.status.success(), "{}", text(&mark));
    let out = trace.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(Path::new(printed.trim_end().lines().last().unwrap()), dir);
    dir
}

/// One intact episode shared by the tests (each mutates its own copy).
fn intact() -> &'static Path {
    static EP: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &EP.get_or_init(|| {
        let root = tempfile::tempdir().unwrap();
        let dir = capture(root.path());
        (root, dir)
    })
    .1
}

/// `cp -a` keeps the modification times, so done.marker stays the newest file.
fn copy_episode(tmp: &Path) -> PathBuf {
    let dst = tmp.join(intact().file_name().unwrap());
    let st = Command::new("cp")
        .arg("-a")
        .arg(intact())
        .arg(&dst)
        .status()
        .unwrap();
    assert!(st.success());
    dst
}

fn validate(dir: &Path) -> (bool, String) {
    let o = cis490(&["validate", dir.to_str().unwrap()]);
    (o.status.success(), text(&o))
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn seq_of(line: &str) -> u64 {
    serde_json::from_str::<Value>(line).unwrap()["seq"]
        .as_u64()
        .unwrap()
}

/// A seq in the middle of the stream whose neighbours s-1 and s+1 both have rows (a loaded
/// machine may have skipped, and declared, some ticks).
fn inner_seq(lines: &[String]) -> u64 {
    let mut seqs: Vec<u64> = lines.iter().map(|l| seq_of(l)).collect();
    seqs.dedup();
    let mid = seqs.len() / 2;
    (1..seqs.len() - 1)
        .map(|k| (k + mid) % (seqs.len() - 1))
        .find(|&k| k > 0 && seqs[k - 1] + 1 == seqs[k] && seqs[k] + 1 == seqs[k + 1])
        .map(|k| seqs[k])
        .expect("three consecutive ticks")
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(path, s).unwrap();
}

#[test]
fn intact_episode_passes() {
    let (ok, out) = validate(intact());
    assert!(ok, "{out}");
    assert!(out.contains("PASS (0 problems)"), "{out}");
}

#[test]
fn truncated_final_line_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_episode(tmp.path());
    let f = dir.join("telemetry-proc.jsonl");
    let data = std::fs::read(&f).unwrap();
    std::fs::write(&f, &data[..data.len() - 25]).unwrap();
    let (ok, out) = validate(&dir);
    assert!(!ok, "{out}");
    assert!(out.contains("telemetry-proc.jsonl:"), "{out}");
    assert!(out.contains("truncated final line"), "{out}");
    assert!(out.contains(": FAIL"), "{out}");
}

#[test]
fn missing_done_marker_is_incomplete() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_episode(tmp.path());
    std::fs::remove_file(dir.join("done.marker")).unwrap();
    let (ok, out) = validate(&dir);
    assert!(!ok, "{out}");
    assert!(out.contains("done.marker missing"), "{out}");
    assert!(out.contains(": INCOMPLETE"), "{out}");
}

#[test]
fn a_flipped_byte_in_any_file_fails() {
    for name in [
        "telemetry-proc.jsonl",
        "events.jsonl",
        "labels.jsonl",
        "meta.json",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = copy_episode(tmp.path());
        let f = dir.join(name);
        let mut data = std::fs::read(&f).unwrap();
        // Flip a digit in the middle into another digit: still valid JSON, different data.
        let mid = data.len() / 2;
        let i = (mid..data.len())
            .find(|&i| data[i].is_ascii_digit())
            .unwrap();
        data[i] = if data[i] == b'9' { b'1' } else { data[i] + 1 };
        std::fs::write(&f, &data).unwrap();
        let (ok, out) = validate(&dir);
        assert!(!ok, "{name}: {out}");
        assert!(
            out.contains(&format!("{name}: sha256 mismatch")),
            "{name}: {out}"
        );
    }
}

#[test]
fn a_flipped_byte_in_the_manifest_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_episode(tmp.path());
    let f = dir.join("manifest.json");
    let mut data = std::fs::read(&f).unwrap();
    let i = (data.len() / 2..data.len())
        .find(|&i| data[i].is_ascii_digit())
        .unwrap();
    data[i] = if data[i] == b'9' { b'1' } else { data[i] + 1 };
    std::fs::write(&f, &data).unwrap();
    let (ok, out) = validate(&dir);
    assert!(!ok, "{out}");
    assert!(out.contains(": manifest.json: "), "{out}");
}

/// `cis490 trace` under `script` (a pseudo-terminal on stderr): the status line appears;
/// with --quiet, or with stderr a pipe, it does not.
#[test]
fn status_line_only_on_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let target = Sleeper::start();
    let run = |extra: &str| -> String {
        let cmd = format!(
            "{} trace --qemu-pid {} --duration 1.5 --backend proc --data-root {} {extra}",
            bin().display(),
            target.pid(),
            tmp.path().display()
        );
        let log = tmp.path().join("typescript");
        let o = Command::new("script")
            .args(["-qe", "-c", &cmd])
            .arg(&log)
            .stdin(Stdio::null())
            .output()
            .expect("script (bsdutils)");
        let out = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
        assert!(o.status.success(), "{out}");
        out
    };
    let tty = run("");
    assert!(tty.contains("\x1b[2K"), "{tty}");
    assert!(tty.contains("| phase clean | proc "), "{tty}");
    assert!(tty.contains(" rows/s"), "{tty}");
    let quiet = run("--quiet");
    assert!(!quiet.contains("rows/s"), "{quiet}");
    let piped = Command::new(bin())
        .args([
            "trace",
            "--qemu-pid",
            &target.pid(),
            "--duration",
            "1",
            "--backend",
            "proc",
        ])
        .arg("--data-root")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(piped.status.success());
    assert!(!text(&piped).contains("rows/s"), "{}", text(&piped));
}

#[test]
fn non_monotonic_row_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_episode(tmp.path());
    let f = dir.join("telemetry-proc.jsonl");
    let mut lines = lines_of(&f);
    // Move the first row of tick s+1 before the rows of tick s.
    let s = inner_seq(&lines);
    let pos9 = lines.iter().position(|l| seq_of(l) == s).unwrap();
    let pos10 = lines.iter().position(|l| seq_of(l) == s + 1).unwrap();
    let row = lines.remove(pos10);
    lines.insert(pos9, row);
    write_lines(&f, &lines);
    let (ok, out) = validate(&dir);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "telemetry-proc.jsonl:{}: t_mono_ns decreased",
            pos9 + 2
        )),
        "{out}"
    );
}

#[test]
fn undeclared_seq_gap_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_episode(tmp.path());
    let f = dir.join("telemetry-proc.jsonl");
    let lines = lines_of(&f);
    let s = inner_seq(&lines);
    let lines: Vec<String> = lines.into_iter().filter(|l| seq_of(l) != s).collect();
    write_lines(&f, &lines);
    let (ok, out) = validate(&dir);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "undeclared seq gap {s}..={s}: no gap event for source proc"
        )),
        "{out}"
    );

    // The same hole declared by a gap event is accepted by the seq check (the manifest
    // still catches the edit).
    let ev = dir.join("events.jsonl");
    let mut events = lines_of(&ev);
    let t: u64 = serde_json::from_str::<Value>(&events[2]).unwrap()["t_mono_ns"]
        .as_u64()
        .unwrap();
    events.insert(
        3,
        json!({"t_mono_ns": t, "t_wall_ns": 1, "event": "gap", "source": "proc",
               "from_seq": s, "to_seq": s})
        .to_string(),
    );
    write_lines(&ev, &events);
    let (ok, out) = validate(&dir);
    assert!(!ok, "{out}");
    assert!(!out.contains("undeclared seq gap"), "{out}");
    assert!(out.contains("sha256 mismatch"), "{out}");
}

#[test]
fn several_dirs_exit_nonzero_if_any_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    let o = cis490(&[
        "validate",
        intact().to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("PASS"), "{out}");
    assert!(out.contains("meta.json: missing"), "{out}");
    assert!(out.contains("bad: FAIL"), "{out}");
}

/// A capture killed with SIGKILL: no done.marker; validate says INCOMPLETE (and finds a
/// partial final line when one was cut), ls lists it as incomplete.
fn killed_capture(root: &Path) -> PathBuf {
    let target = Sleeper::start();
    let mut trace = Command::new(bin())
        .args(["trace", "--qemu-pid", &target.pid(), "--rate-hz", "50"])
        .args(["--backend", "proc", "--quiet", "--data-root"])
        .arg(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut dir = None;
    wait_for("rows", Duration::from_secs(10), || {
        let Ok(mut d) = std::fs::read_dir(root.join("episodes")) else {
            return false;
        };
        let mut found = false;
        for e in d.by_ref().flatten() {
            let p = e.path();
            if !p.join("done.marker").exists()
                && std::fs::metadata(p.join("telemetry-proc.jsonl")).is_ok_and(|m| m.len() > 0)
            {
                dir = Some(p);
                found = true;
            }
        }
        found
    });
    trace.kill().unwrap();
    trace.wait().unwrap();
    dir.unwrap()
}

#[test]
fn incomplete_episode_with_partial_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = killed_capture(tmp.path());
    let (ok, out) = validate(&dir);
    assert!(!ok, "{out}");
    assert!(out.contains(": INCOMPLETE"), "{out}");
    assert!(out.contains("done.marker missing"), "{out}");
    assert!(!out.contains("control.sock"), "{out}");
    // Simulate a write cut off mid-line, as power loss would leave it.
    let f = dir.join("telemetry-proc.jsonl");
    let mut data = std::fs::read(&f).unwrap();
    data.extend_from_slice(b"{\"t_mono_ns\":99999999999,\"t_wall");
    std::fs::write(&f, &data).unwrap();
    let (_, out) = validate(&dir);
    assert!(out.contains("truncated final line (32 bytes"), "{out}");
    assert!(out.contains(": INCOMPLETE"), "{out}");
}

#[test]
fn ls_lists_complete_and_incomplete_newest_first() {
    let tmp = tempfile::tempdir().unwrap();
    let complete = capture(tmp.path());
    let incomplete = killed_capture(tmp.path());
    let o = cis490(&["ls", tmp.path().to_str().unwrap()]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let id = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    assert!(lines[1].starts_with(&id(&incomplete)), "{out}");
    assert!(lines[1].contains("INCOMPLETE"), "{out}");
    assert!(lines[2].starts_with(&id(&complete)), "{out}");
    assert!(lines[2].contains("ok:duration"), "{out}");
    assert!(lines[2].contains("clean>armed"), "{out}");
    assert!(lines[2].contains(" proc "), "{out}");

    let o = cis490(&["ls", "--json", tmp.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["id"], id(&incomplete));
    assert_eq!(arr[0]["complete"], false);
    assert_eq!(arr[1]["complete"], true);
    assert_eq!(arr[1]["backend"], "proc");
    assert_eq!(arr[1]["sources"], json!(["proc", "perf"]));
    assert_eq!(arr[1]["phases"], json!(["clean", "armed"]));
    assert_eq!(arr[1]["end_reason"], "duration");
    assert!(arr[1]["duration_s"].as_f64().unwrap() > 1.5);
}

/// The trimmed contents of every <text> element of an SVG.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = &t[t.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim().to_owned())
        })
        .collect()
}

fn png_size(path: &Path) -> (u32, u32) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    // Not blank: a picture of panels has many distinct colours.
    let distinct: std::collections::BTreeSet<&[u8]> = buf.chunks(3).take(2_000_000).collect();
    assert!(distinct.len() > 20, "{} colours", distinct.len());
    (info.width, info.height)
}

/// The report's canvas: 1400 wide, a 40 px title and 230 px per panel.
fn expected_size(panels: u32) -> (u32, u32) {
    (1400, 40 + 230 * panels)
}

#[test]
fn report_of_a_proc_episode() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_episode(tmp.path());
    // Default output: beside the episode, never inside it.
    let o = cis490(&["report", dir.to_str().unwrap()]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let png = tmp.path().join(format!(
        "{}.report.png",
        dir.file_name().unwrap().to_string_lossy()
    ));
    assert!(out.contains(png.to_str().unwrap()), "{out}");
    assert_eq!(png_size(&png), expected_size(2)); // CPU + I/O
    assert!(out.contains("clean"), "{out}");
    assert!(out.contains("armed"), "{out}");
    assert!(out.contains("cpu: process total [cores]"), "{out}");
    let (ok, vout) = validate(&dir);
    assert!(ok, "the report changed the episode: {vout}");

    let svg = tmp.path().join("r.svg");
    let o = cis490(&["report", dir.to_str().unwrap(), "-o", svg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.contains("<svg"));
    let texts = svg_texts(&s);
    for phase in ["clean", "armed"] {
        assert!(
            texts.iter().any(|t| t == phase),
            "phase band {phase} not labelled: {texts:?}"
        );
    }

    let inside = dir.join("x.png");
    let o = cis490(&[
        "report",
        dir.to_str().unwrap(),
        "-o",
        inside.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("inside the episode"), "{}", text(&o));
    assert!(!inside.exists());
}

/// A small synthetic episode with every source the report knows: proc with vCPU threads,
/// qmp exit counters, agent guest fields, net, five phases, and gap/error/QMP events.
fn rich_episode(root: &Path) -> PathBuf {
    let dir = root.join("01RICH0000000000000000000Z");
    std::fs::create_dir_all(&dir).unwrap();
    let sec = 1_000_000_000u64;
    let wall = 1_800_000_000 * sec;
    let ticks = 100u64; // 10 s at 10 Hz
    let phases = ["clean", "armed", "infecting", "infected_running", "dormant"];
    let phase_at = |i: u64| (i / 20) as usize;
    let mut proc_rows = Vec::new();
    let mut qmp_rows = Vec::new();
    let mut agent_rows = Vec::new();
    let mut net_rows = Vec::new();
    let mut gu = 0u64;
    let (mut v0, mut v1, mut other, mut rd, mut wr, mut ex0, mut ex1, mut rx, mut tx) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    for i in 0..ticks {
        if i == 45 || i == 46 {
            continue; // declared as a gap below
        }
        let t = i * sec / 10;
        let p = phase_at(i) as u64;
        // vCPU 0 busier in later phases: 0.1 cores per phase index.
        v0 += sec / 10 * (p + 1) / 10;
        v1 += sec / 100;
        other += sec / 200;
        rd += 1_000_000 * p;
        wr += 500_000;
        ex0 += 1000 * (p + 1);
        ex1 += 500;
        rx += 10_000 * (p + 1);
        gu += sec / 20 * (p + 1);
        tx += 2_000;
        for (tid, vcpu, comm, on) in [
            (101, json!(0), "CPU 0/KVM", v0),
            (102, json!(1), "CPU 1/KVM", v1),
            (103, Value::Null, "qemu-system-x86", other),
        ] {
            proc_rows.push(
                json!({"t_mono_ns": t + tid, "t_wall_ns": wall + t, "source": "proc",
                "available_in_deployment": false, "seq": i, "tid": tid, "comm": comm, "vcpu": vcpu,
                "on_cpu_ns": on, "read_bytes": 0, "write_bytes": 0, "rchar": 0, "wchar": 0}),
            );
        }
        proc_rows.push(json!({"t_mono_ns": t + 200, "t_wall_ns": wall + t, "source": "proc",
            "available_in_deployment": false, "seq": i, "tid": null, "comm": "qemu", "vcpu": null,
            "on_cpu_ns": v0 + v1 + other, "read_bytes": rd, "write_bytes": wr, "rchar": rd, "wchar": wr,
            "vsize_bytes": 123_456_789}));
        // As the QMP collector writes them: a `vm` row, then one `vcpu` row per vCPU with
        // the vCPU thread's tid and index and `<provider>_<stat>` columns.
        qmp_rows.push(
            json!({"t_mono_ns": t + 300, "t_wall_ns": wall + t, "source": "qmp",
            "available_in_deployment": false, "seq": i, "tid": null, "comm": null, "vcpu": null,
            "kind": "vm", "status": "running"}),
        );
        for (k, ex) in [(0u64, ex0), (1, ex1)] {
            qmp_rows.push(
                json!({"t_mono_ns": t + 301 + k, "t_wall_ns": wall + t, "source": "qmp",
                "available_in_deployment": false, "seq": i, "tid": 101 + k, "comm": null, "vcpu": k,
                "kind": "vcpu", "qom_path": format!("/machine/unattached/device[{k}]"),
                "kvm_exits": ex, "kvm_halt_exits": ex / 2}),
            );
        }
        net_rows.push(
            json!({"t_mono_ns": t + 400, "t_wall_ns": wall + t, "source": "net",
            "available_in_deployment": true, "seq": i, "ifname": "tap0", "rx_bytes": rx,
            "tx_bytes": tx, "rx_packets": rx / 100}),
        );
        if i % 5 == 0 {
            agent_rows.push(
                json!({"t_mono_ns": t + 500, "t_wall_ns": wall + t, "source": "agent",
                "available_in_deployment": true, "guest_seq": i / 5, "guest_mono_ns": t,
                "guest_cpu_user_ns": gu, "guest_cpu_idle_ns": i * sec,
                "guest_load1": 0.1 * p as f64, "guest_loadavg": "0.00 0.00 0.00 1/56 126",
                "guest_meminfo_avail_kb": 190_000 - 1000 * i}),
            );
        }
    }
    let labels: Vec<Value> = phases
        .iter()
        .enumerate()
        .map(|(k, ph)| {
            let t = if k == 0 { 50 } else { k as u64 * 2 * sec - sec / 20 };
            json!({"t_mono_ns": t, "t_wall_ns": wall + t, "phase": ph,
                   "prev": if k == 0 { Value::Null } else { json!(phases[k - 1]) }, "reason": "test"})
        })
        .collect();
    let ev = |t: u64, v: Value| {
        let mut o = json!({"t_mono_ns": t, "t_wall_ns": wall + t});
        o.as_object_mut()
            .unwrap()
            .extend(v.as_object().unwrap().clone());
        o
    };
    let events = vec![
        ev(1, json!({"event": "episode_start"})),
        ev(
            47 * sec / 10,
            json!({"event": "gap", "source": "proc", "from_seq": 45, "to_seq": 46}),
        ),
        ev(
            47 * sec / 10,
            json!({"event": "gap", "source": "qmp", "from_seq": 45, "to_seq": 46}),
        ),
        ev(
            47 * sec / 10,
            json!({"event": "gap", "source": "net", "from_seq": 45, "to_seq": 46}),
        ),
        ev(
            3 * sec,
            json!({"event": "qmp_event", "source": "qmp", "qmp_event": "STOP", "data": {}}),
        ),
        ev(
            33 * sec / 10,
            json!({"event": "qmp_event", "source": "qmp", "qmp_event": "RESUME", "data": {}}),
        ),
        ev(
            7 * sec,
            json!({"event": "source_error", "source": "agent", "message": "x"}),
        ),
        ev(
            10 * sec,
            json!({"event": "episode_end", "end_reason": "duration"}),
        ),
    ];
    let write = |name: &str, rows: &[Value]| {
        let mut s = String::new();
        for r in rows {
            s.push_str(&r.to_string());
            s.push('\n');
        }
        std::fs::write(dir.join(name), s).unwrap();
    };
    write("telemetry-proc.jsonl", &proc_rows);
    write("telemetry-qmp.jsonl", &qmp_rows);
    write("telemetry-agent.jsonl", &agent_rows);
    write("telemetry-net.jsonl", &net_rows);
    write("labels.jsonl", &labels);
    write("events.jsonl", &events);
    let meta = json!({"episode_id": "01RICH0000000000000000000Z", "schema_version": 1,
        "started_at_wall": "2027-01-15T08:00:00Z",
        "schedule": {"interval_ns": sec / 10, "rate_hz": 10},
        "backend": {"requested": "auto", "used": "proc", "fallback_reason": null},
        "sources": [], "result": {"end_reason": "duration", "duration_observed_s": 10.0}});
    std::fs::write(dir.join("meta.json"), meta.to_string()).unwrap();
    std::fs::write(dir.join("done.marker"), "").unwrap();
    dir
}

#[test]
fn report_of_a_rich_episode() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = rich_episode(tmp.path());
    let png = tmp.path().join("rich.png");
    let o = cis490(&["report", dir.to_str().unwrap(), "-o", png.to_str().unwrap()]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    // CPU, I/O, net, KVM exits, guest CPU, guest memory.
    assert_eq!(png_size(&png), expected_size(6));
    let svg = tmp.path().join("rich.svg");
    let o = cis490(&["report", dir.to_str().unwrap(), "-o", svg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let s = std::fs::read_to_string(&svg).unwrap();
    let texts = svg_texts(&s);
    for needle in [
        "clean",
        "armed",
        "infecting",
        "infected_running",
        "dormant",
        "STOP",
        "RESUME",
        "gap proc,qmp,net",
        "error agent",
        "vCPU 0",
        "vCPU 1",
        "other threads",
        "vcpu0 kvm_exits",
        "vcpu1 kvm_exits",
        "tap0 rx_bytes",
        "guest_meminfo_avail_kb",
        "guest_cpu_user_ns",
        "guest_load1",
        "Network (net)",
        "KVM exits (qmp)",
    ] {
        assert!(
            texts.iter().any(|t| t == needle),
            "SVG lacks {needle}: {texts:?}"
        );
    }
    // kvm_halt_exits is a per-reason counter: the plain totals win; guest idle is left out.
    assert!(!texts
        .iter()
        .any(|t| t.ends_with("halt_exits") || t == "guest_cpu_idle_ns"));
    // The table: every phase, with its duration; vCPU 0 runs at 0.1 × (phase index + 1)
    // cores, so 0.400 in infected_running; vcpu0 exits at 1000 × 4 per 0.1 s.
    let row = |phase: &str, stream: &str| -> String {
        let mut cur = "";
        for l in out.lines() {
            if !l.starts_with(' ') {
                cur = l.split_whitespace().next().unwrap_or("");
            }
            if cur == phase && l.contains(stream) {
                return l.to_owned();
            }
        }
        panic!("no row {phase}/{stream} in\n{out}");
    };
    for p in ["clean", "armed", "infecting", "infected_running", "dormant"] {
        assert!(out.lines().any(|l| l.starts_with(p)), "{p} missing:\n{out}");
    }
    let r = row("infected_running", "cpu: vCPU 0 [cores]");
    assert!(r.contains("0.400"), "{r}");
    let r = row("infected_running", "kvm: vcpu0 kvm_exits [exits/s]");
    assert!(r.contains("40.00k"), "{r}");
    let r = row("clean", "net: tap0 tx_bytes [bytes/s]");
    assert!(r.contains("20.00k"), "{r}");
    // guest_cpu_user_ns grows by 0.05 s × (phase + 1) per 0.1 s of host time: 0.5 cores
    // in clean; the first agent row of a phase still carries the rate of the one before.
    let r = row("armed", "guest-cpu: guest_cpu_user_ns");
    assert!(r.contains("1.000"), "{r}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("clean") && l.contains(" 1.95 ")),
        "{out}"
    );
    // CIS490_TEST_KEEP=1 keeps the pictures for a look.
    if std::env::var_os("CIS490_TEST_KEEP").is_some() {
        eprintln!("kept {}", tmp.keep().display());
    }
}

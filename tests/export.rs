//! `cis490 export` and `trace --export parquet` on real captures: the Parquet dataset is
//! lossless against the JSONL (every value of every row, read back), typed as the
//! contract says, partitioned so DuckDB, polars, pyarrow and pandas read many episodes
//! as one table, and it refuses what it must refuse.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use cis490_tests::{bin, episodes, read_jsonl, wait_for, Load};

fn cis490() -> Command {
    Command::new(bin("cis490"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A 2 s capture of a 3-thread target at 100 Hz (the default backend: BPF where the
/// machine allows it), marked `armed` about half-way; returns the episode directory.
fn capture(root: &Path, extra: &[&str]) -> PathBuf {
    let load = Load::start(&["--spin", "1", "--switch", "2"]);
    let mut child = cis490()
        .arg("trace")
        .arg("--qemu-pid")
        .arg(load.pid().to_string())
        .arg("--data-root")
        .arg(root)
        .args(["--duration", "2", "--rate-hz", "100"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let before = episodes(root).len();
    assert!(wait_for(Duration::from_secs(20), || {
        episodes(root).len() > before
            && episodes(root)
                .iter()
                .any(|d| d.join("control.sock").exists())
    }));
    std::thread::sleep(Duration::from_millis(900));
    let dir = episodes(root)
        .into_iter()
        .find(|d| d.join("control.sock").exists())
        .unwrap();
    let m = cis490()
        .arg("mark")
        .arg(&dir)
        .args(["--phase", "armed"])
        .output()
        .unwrap();
    assert!(m.status.success(), "{}", text(&m));
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    dir
}

fn export(dirs: &[&Path], out: &Path, extra: &[&str]) -> Output {
    cis490()
        .arg("export")
        .args(dirs)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn batches(file: &Path) -> Vec<RecordBatch> {
    let f = std::fs::File::open(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

fn part(out: &Path, stream: &str, id: &str) -> PathBuf {
    out.join(stream)
        .join(format!("episode_id={id}"))
        .join("part-0.parquet")
}

fn id_of(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}

/// The stream the backend wrote (bpf-sched or proc).
fn sched_stream(dir: &Path) -> &'static str {
    if dir.join("telemetry-bpf-sched.jsonl").exists()
        || dir.join("telemetry-bpf-sched.jsonl.zst").exists()
    {
        "bpf-sched"
    } else {
        "proc"
    }
}

#[test]
fn an_exported_episode_reads_back_value_for_value_typed_with_phases_and_deltas() {
    let root = tempfile::tempdir().unwrap();
    let plain = capture(root.path(), &[]);
    let zst = capture(root.path(), &["--compress", "zstd"]);
    let out = tempfile::tempdir().unwrap();
    let o = export(&[&plain, &zst], out.path(), &["--verify"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .matches(", verified -> ")
            .count(),
        2,
        "{}",
        text(&o)
    );

    for dir in [&plain, &zst] {
        let id = id_of(dir);
        let stream = sched_stream(dir);
        let file = part(out.path(), stream, &id);
        let b = batches(&file);
        let schema = b[0].schema();
        // Types from the contract: counters uint64, names dictionaries, deltas int64.
        assert_eq!(
            schema.field_with_name("on_cpu_ns").unwrap().data_type(),
            &DataType::UInt64
        );
        assert_eq!(
            schema.field_with_name("tid").unwrap().data_type(),
            &DataType::UInt64
        );
        assert!(matches!(
            schema.field_with_name("comm").unwrap().data_type(),
            DataType::Dictionary(_, _)
        ));
        assert_eq!(
            schema.field_with_name("d_on_cpu_ns").unwrap().data_type(),
            &DataType::Int64
        );
        assert!(
            schema.field_with_name("episode_id").is_err(),
            "the partition holds it"
        );

        // Per thread: the deltas add up to last − first, dt_ns to the time covered.
        // Per series: (sum of d_on_cpu_ns, sum of dt_ns, its (t, on_cpu_ns) rows).
        type Series = (i64, u64, Vec<(u64, u64)>);
        let mut per: std::collections::HashMap<Option<u64>, Series> = Default::default();
        let mut phases = Vec::new();
        let mut last_t = 0;
        for batch in &b {
            let tid = batch
                .column_by_name("tid")
                .unwrap()
                .as_primitive::<UInt64Type>();
            let t = batch
                .column_by_name("t_mono_ns")
                .unwrap()
                .as_primitive::<UInt64Type>();
            let on = batch
                .column_by_name("on_cpu_ns")
                .unwrap()
                .as_primitive::<UInt64Type>();
            let d = batch
                .column_by_name("d_on_cpu_ns")
                .unwrap()
                .as_primitive::<Int64Type>();
            let dt = batch
                .column_by_name("dt_ns")
                .unwrap()
                .as_primitive::<UInt64Type>();
            let phase = batch.column_by_name("phase").unwrap();
            let phase = arrow_cast_dict(phase.as_ref());
            for (i, p) in phase.iter().enumerate() {
                assert!(t.value(i) >= last_t, "rows sorted by t_mono_ns");
                last_t = t.value(i);
                let key = (!tid.is_null(i)).then(|| tid.value(i));
                let e = per.entry(key).or_default();
                if !d.is_null(i) {
                    e.0 += d.value(i);
                    e.1 += dt.value(i);
                } else {
                    assert!(e.2.is_empty(), "only a series' first row has no delta");
                }
                e.2.push((t.value(i), on.value(i)));
                phases.push(p.clone());
            }
        }
        assert!(per.len() >= 3, "process row and threads: {}", per.len());
        for (tid, (sum_d, sum_dt, rows)) in &per {
            let (first, last) = (rows[0], rows[rows.len() - 1]);
            assert_eq!(*sum_d, last.1 as i64 - first.1 as i64, "tid {tid:?}");
            assert_eq!(*sum_dt, last.0 - first.0, "tid {tid:?}");
        }
        // The phase column follows the labels: clean, then armed from the mark on.
        let armed_from = phases
            .iter()
            .position(|p| p == "armed")
            .expect("an armed row");
        assert!(armed_from > 0);
        assert!(phases[..armed_from].iter().all(|p| p == "clean"));
        assert!(phases[armed_from..].iter().all(|p| p == "armed"));

        // The episodes table: one row, meta flattened.
        let e = batches(&part(out.path(), "episodes", &id));
        assert_eq!(e.iter().map(RecordBatch::num_rows).sum::<usize>(), 1);
        let meta = cis490_tests::read_json(&dir.join("meta.json"));
        let rate = e[0]
            .column_by_name("rate_hz")
            .unwrap()
            .as_primitive::<UInt64Type>()
            .value(0);
        assert_eq!(rate, meta["schedule"]["rate_hz"].as_u64().unwrap());
        let valid = e[0].column_by_name("valid").unwrap().as_boolean().value(0);
        assert!(valid);
        // Events and labels are there too.
        assert!(part(out.path(), "events", &id).exists());
        assert!(part(out.path(), "labels", &id).exists());
    }

    // Exporting again replaces the files (no duplicates, no temp files left).
    let again = export(&[&plain], out.path(), &[]);
    assert!(again.status.success(), "{}", text(&again));
    let leftovers: Vec<_> = walk(out.path())
        .into_iter()
        .filter(|p| !p.ends_with("part-0.parquet"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    python_readers(out.path(), &[&plain, &zst]);
}

/// Dictionary<Int32, Utf8> column values as strings.
fn arrow_cast_dict(a: &dyn arrow_array::Array) -> Vec<String> {
    let d = a.as_dictionary::<arrow_array::types::Int32Type>();
    let values = d.values().as_string::<i32>();
    (0..d.len())
        .map(|i| values.value(d.keys().value(i) as usize).to_owned())
        .collect()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The loading examples of docs/datasets.md, run by the real tools over the dataset: the
/// two episodes are one table in each, with per-episode row counts equal to the JSONL's.
fn python_readers(out: &Path, dirs: &[&Path]) {
    let probe = Command::new("python3")
        .args(["-c", "import duckdb, polars, pyarrow, pandas"])
        .output();
    let have = probe.as_ref().is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3 with duckdb, polars, pyarrow and pandas is missing (cargo xtask setup installs them): {:?}",
            probe.map(|o| text(&o))
        );
        eprintln!("python readers not installed: dataset read by the Rust reader only");
        return;
    }
    let stream = sched_stream(dirs[0]);
    let mut want: Vec<(String, usize)> = dirs
        .iter()
        .map(|d| {
            let rows = if d.join(format!("telemetry-{stream}.jsonl")).exists() {
                read_jsonl(&d.join(format!("telemetry-{stream}.jsonl"))).len()
            } else {
                let f =
                    std::fs::File::open(d.join(format!("telemetry-{stream}.jsonl.zst"))).unwrap();
                let text = std::io::read_to_string(zstd::Decoder::new(f).unwrap()).unwrap();
                text.lines().count()
            };
            (id_of(d), rows)
        })
        .collect();
    want.sort();
    let script = format!(
        r#"
import duckdb, polars as pl, pyarrow.dataset as ds, pandas as pd, json
root = {root:?}
s = root + "/{stream}"
a = duckdb.sql(f"select episode_id, count(*) from read_parquet('{{s}}/*/*.parquet', hive_partitioning=true) group by 1 order by 1").fetchall()
b = pl.scan_parquet(s + "/**/*.parquet", hive_partitioning=True).group_by("episode_id").len().sort("episode_id").collect().rows()
t = ds.dataset(s, format="parquet", partitioning="hive").to_table()
c = sorted(t.group_by("episode_id").aggregate([("t_mono_ns", "count")]).to_pylist(), key=lambda r: r["episode_id"])
c = [(r["episode_id"], r["t_mono_ns_count"]) for r in c]
p = t.to_pandas(types_mapper=pd.ArrowDtype)
assert str(p["on_cpu_ns"].dtype) == "uint64[pyarrow]", p["on_cpu_ns"].dtype
assert str(p["d_on_cpu_ns"].dtype) == "int64[pyarrow]", p["d_on_cpu_ns"].dtype
# Rates are a division: the CPU share of each thread of each episode, in DuckDB.
r = duckdb.sql(f"select episode_id, tid, sum(d_on_cpu_ns) / sum(dt_ns) as share from read_parquet('{{s}}/*/*.parquet', hive_partitioning=true) where tid is not null group by all").fetchall()
assert all(0 <= x[2] <= 1.05 for x in r), r
e = duckdb.sql(f"select count(*) from read_parquet('{{root}}/episodes/*/*.parquet', hive_partitioning=true) where valid").fetchall()[0][0]
print(json.dumps({{"duckdb": [list(x) for x in a], "polars": [list(x) for x in b], "pyarrow": [list(x) for x in c], "episodes": e}}))
"#,
        root = out.display().to_string(),
    );
    let o = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    let want_json: serde_json::Value = want
        .iter()
        .map(|(id, n)| serde_json::json!([id, n]))
        .collect();
    for tool in ["duckdb", "polars", "pyarrow"] {
        assert_eq!(v[tool], want_json, "{tool}");
    }
    assert_eq!(v["episodes"], dirs.len());
}

#[test]
fn an_incomplete_episode_is_refused_unless_allowed_and_then_recorded() {
    let root = tempfile::tempdir().unwrap();
    let dir = capture(root.path(), &[]);
    std::fs::remove_file(dir.join("done.marker")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let refused = export(&[&dir], out.path(), &[]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("INCOMPLETE") && text(&refused).contains("--allow-incomplete"),
        "{}",
        text(&refused)
    );
    assert!(!out.path().join("episodes").exists(), "nothing written");
    assert!(
        walk(out.path()).is_empty(),
        "refused, yet left {:?}",
        walk(out.path())
    );
    assert!(
        std::fs::read_dir(out.path()).unwrap().next().is_none(),
        "refused, yet left empty partition folders"
    );
    let allowed = export(&[&dir], out.path(), &["--allow-incomplete", "--verify"]);
    assert!(allowed.status.success(), "{}", text(&allowed));
    let e = batches(&part(out.path(), "episodes", &id_of(&dir)));
    let col = |n: &str| e[0].column_by_name(n).unwrap().as_boolean().value(0);
    assert!(!col("complete"));
    assert!(!col("valid"));
    assert!(col("allow_incomplete"));
    // The episode loses a stream and is exported again: the old partition goes with it.
    let id = id_of(&dir);
    assert!(part(out.path(), "perf", &id).exists());
    std::fs::remove_file(dir.join("telemetry-perf.jsonl")).unwrap();
    let again = export(&[&dir], out.path(), &["--allow-incomplete"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        !part(out.path(), "perf", &id).exists(),
        "stale perf rows left"
    );
    assert!(!out.path().join("perf").exists(), "empty perf folder left");
    assert!(part(out.path(), "events", &id).exists());
}

#[test]
fn the_export_never_writes_through_a_planted_symlink() {
    let root = tempfile::tempdir().unwrap();
    let dir = capture(root.path(), &[]);
    let out = tempfile::tempdir().unwrap();
    let victim = tempfile::tempdir().unwrap();
    // The stream directory is a symlink to somewhere else: refused.
    let stream = sched_stream(&dir);
    std::os::unix::fs::symlink(victim.path(), out.path().join(stream)).unwrap();
    let o = export(&[&dir], out.path(), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("symlink"), "{}", text(&o));
    assert!(
        walk(victim.path()).is_empty(),
        "wrote into the symlink's target"
    );
    // The part file itself a symlink: replaced by the rename, its target untouched.
    std::fs::remove_file(out.path().join(stream)).unwrap();
    let target_file = victim.path().join("precious");
    std::fs::write(&target_file, b"keep").unwrap();
    let pdir = out
        .path()
        .join(stream)
        .join(format!("episode_id={}", id_of(&dir)));
    std::fs::create_dir_all(&pdir).unwrap();
    std::os::unix::fs::symlink(&target_file, pdir.join("part-0.parquet")).unwrap();
    let o = export(&[&dir], out.path(), &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&target_file).unwrap(), b"keep");
    assert!(!pdir.join("part-0.parquet").is_symlink());
}

#[test]
fn trace_with_export_writes_the_dataset_beside_the_episodes() {
    let root = tempfile::tempdir().unwrap();
    let dir = capture(root.path(), &["--export", "parquet"]);
    let id = id_of(&dir);
    let dataset = root.path().join("dataset");
    assert!(part(&dataset, sched_stream(&dir), &id).exists());
    assert!(part(&dataset, "episodes", &id).exists());
    // Private like the episode: the episode directory's mode, no world access.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(part(&dataset, "episodes", &id))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o007, 0, "dataset file mode {mode:o}");
}

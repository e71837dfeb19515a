//! `cis490 export`: episodes as one typed Parquet dataset (docs/datasets.md).
//!
//! Layout under the output root, Hive-partitioned so DuckDB, polars, pyarrow and Spark
//! read each stream of many episodes as one table (the partition gives every row its
//! `episode_id`):
//!
//! ```text
//! OUT/<stream>/episode_id=<id>/part-0.parquet   proc, bpf-sched, bpf-io, net, qmp, agent, events, labels
//! OUT/episodes/episode_id=<id>/part-0.parquet   one row per episode: meta.json flattened
//! ```
//!
//! Types come from the contract ([`crate::contract`]); rows keep the episode's order,
//! sorted by tid within an instant; `phase`, `dt_ns` and `d_<counter>` are added
//! ([`plan`]). Re-exporting an episode replaces its files (each written to a temp file
//! and renamed). [`verify`] reads a file back and compares every value with the JSONL.

mod columns;
mod error;
pub mod out;
pub mod plan;
pub mod write;

use crate::fields::RowMap;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use serde_json::{json, Map, Value};

pub use error::ExportError;
use out::OutDir;
use plan::{FamilyScan, Plan};
use write::{Phases, StreamCounts};

use crate::contract::{self, meta::Meta, ColumnType, Stream};
use crate::untrusted::{LineRead, LineReader, MAX_LINE_BYTES};
use crate::validate::{validate_dir, Verdict};

/// The table of episodes beside the streams.
pub const EPISODES: &str = "episodes";
/// Each partition's one file.
pub const PART: &str = "part-0.parquet";

#[derive(Debug, Clone, Copy, Default)]
pub struct ExportOptions {
    /// Export an episode that is incomplete (no done.marker) or fails validation; the
    /// episodes table records `complete`/`valid` and the problem count.
    pub allow_incomplete: bool,
}

/// What exporting one episode wrote.
#[derive(Debug, Clone)]
pub struct EpisodeExport {
    pub episode_id: String,
    pub verdict: Verdict,
    pub streams: Vec<StreamExport>,
    /// The phase timeline the rows' `phase` came from.
    pub phases: Phases,
    pub episodes_file: PathBuf,
}

/// One stream of an exported episode.
#[derive(Debug, Clone)]
pub struct StreamExport {
    /// The episode's file it was read from.
    pub source: PathBuf,
    /// The Parquet file written.
    pub file: PathBuf,
    /// Its columns and types ([`verify`] reads the file back with it).
    pub plan: Plan,
    pub counts: StreamCounts,
}

impl StreamExport {
    pub fn name(&self) -> &'static str {
        self.plan.stream.name
    }

    /// Read the written file back and compare it with the episode's ([`verify`]).
    pub fn verify(&self, phases: &Phases) -> Result<u64, ExportError> {
        verify(&self.source, &self.file, &self.plan, phases)
    }
}

/// The file of stream `s` in episode `dir`, plain or compressed, if it is there.
pub fn stream_file(dir: &Path, s: &Stream) -> Option<PathBuf> {
    [s.file.to_owned(), format!("{}.zst", s.file)]
        .into_iter()
        .map(|f| dir.join(f))
        .find(|p| p.symlink_metadata().is_ok_and(|m| m.is_file()))
}

/// Call `f` with every JSON-object line of `file` (1-based line number). A line that is
/// not a JSON object, or is over the line cap, is an error when `strict`; otherwise it is
/// skipped and counted in the returned total.
pub(crate) fn for_each_row(
    file: &Path,
    strict: bool,
    mut f: impl FnMut(u64, RowMap) -> Result<(), ExportError>,
) -> Result<u64, ExportError> {
    let reader = crate::untrusted::open_stream(file).map_err(|e| ExportError::Io {
        path: file.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut lines = LineReader::new(reader, MAX_LINE_BYTES);
    let (mut n, mut skipped) = (0u64, 0u64);
    let mut bad = |line: u64, message: String| {
        if strict {
            Err(ExportError::Row {
                file: file.to_path_buf(),
                line,
                message,
            })
        } else {
            skipped += 1;
            Ok(())
        }
    };
    loop {
        match lines.next_line(|_| {}).map_err(ExportError::io(file))? {
            LineRead::Eof => break,
            LineRead::TooLong { .. } => {
                n += 1;
                bad(n, "line over the 16 MiB cap".into())?;
            }
            LineRead::Line { .. } => {
                n += 1;
                match crate::fields::parse_object(lines.line()) {
                    Ok(row) => f(n, row.map)?,
                    Err(e) => bad(n, format!("not a JSON object: {e}"))?,
                }
            }
        }
    }
    Ok(skipped)
}

/// The phase timeline of an episode (empty without labels.jsonl).
pub fn phases(dir: &Path) -> Result<Phases, ExportError> {
    let mut out = Vec::new();
    let Some(file) = contract::stream("labels").and_then(|s| stream_file(dir, s)) else {
        return Ok(Phases::default());
    };
    for_each_row(&file, false, |_, row| {
        if let (Some(t), Some(p)) = (
            row.get("t_mono_ns").and_then(Value::as_u64),
            row.get("phase").and_then(Value::as_str),
        ) {
            out.push((t, p.to_owned()));
        }
        Ok(())
    })?;
    out.sort_by_key(|(t, _)| *t);
    Ok(Phases(out))
}

/// The plan for stream `s` of the file: a first pass finds the family columns.
pub fn plan_for(file: &Path, s: &'static Stream) -> Result<Plan, ExportError> {
    let mut scan = FamilyScan::default();
    if !s.families.is_empty() {
        for_each_row(file, false, |_, row| {
            scan.row(s, &row);
            Ok(())
        })?;
    }
    Ok(Plan::new(s, &scan))
}

pub fn read_meta(dir: &Path) -> Result<Meta, ExportError> {
    let v = crate::untrusted::read_json(&dir.join("meta.json"), 16 << 20).map_err(|message| {
        ExportError::Meta {
            dir: dir.to_path_buf(),
            message,
        }
    })?;
    serde_json::from_value(v).map_err(|e| ExportError::Meta {
        dir: dir.to_path_buf(),
        message: format!("not the contract's meta.json: {e}"),
    })
}

/// Export one episode directory into the dataset at `out`.
pub fn export_episode(
    dir: &Path,
    out: &OutDir,
    opts: ExportOptions,
) -> Result<EpisodeExport, ExportError> {
    let meta = read_meta(dir)?;
    let id = meta.episode_id.clone();
    if id.is_empty() || id.contains('/') || id.starts_with('.') {
        return Err(ExportError::Meta {
            dir: dir.to_path_buf(),
            message: format!("episode_id {id:?} cannot name a partition"),
        });
    }
    let partition = format!("episode_id={id}");
    let phases = phases(dir)?;
    let lenient = opts.allow_incomplete;
    // Validation and the streams run side by side (one thread each): the streams go to
    // temp files, which become the dataset's only once validate has passed the episode
    // (or --allow-incomplete says to take it anyway).
    let files: Vec<(&'static Stream, PathBuf)> = contract::streams()
        .iter()
        .filter_map(|s| stream_file(dir, s).map(|f| (s, f)))
        .collect();
    /// A stream written to its temp file, not yet renamed into the dataset.
    struct Written {
        target: OutDir,
        file: std::fs::File,
        tmp: String,
        source: PathBuf,
        plan: Plan,
        counts: StreamCounts,
    }
    let (report, results): (_, Vec<Result<Written, ExportError>>) = std::thread::scope(|scope| {
        let validation = scope.spawn(|| validate_dir(dir));
        let handles: Vec<_> = files
            .iter()
            .map(|(s, source)| {
                let (phases, id, partition) = (&phases, &id, &partition);
                scope.spawn(move || -> Result<Written, ExportError> {
                    let plan = plan_for(source, s)?;
                    let target = out.subdir(s.name)?.subdir(partition)?;
                    let (file, tmp) = target.create_temp(PART)?;
                    match write::write_stream(source, &plan, phases, id, lenient, &file) {
                        Ok(counts) => Ok(Written {
                            target,
                            file,
                            tmp,
                            source: source.clone(),
                            plan,
                            counts,
                        }),
                        Err(e) => {
                            target.discard(&tmp);
                            Err(e)
                        }
                    }
                })
            })
            .collect();
        let results = handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ExportError::Output("an export thread panicked".into()))
                })
            })
            .collect();
        let report = validation
            .join()
            .map_err(|_| ExportError::Output("validate panicked".into()));
        (report, results)
    });
    // A refusal by validate, else the first stream's failure, decides; the temp files
    // of the others are removed then.
    let mut written = Vec::new();
    let mut failure = None;
    for r in results {
        match r {
            Ok(w) => written.push(w),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    let report = report.and_then(|r| {
        let verdict = r.verdict();
        if verdict != Verdict::Pass && !opts.allow_incomplete {
            return Err(ExportError::NotValid {
                dir: dir.to_path_buf(),
                verdict: verdict.as_str(),
                problems: r.problems.len(),
                first: r
                    .problems
                    .first()
                    .map(|p| format!("; first: {}", p.message))
                    .unwrap_or_default(),
            });
        }
        Ok(r)
    });
    let report = match (report, failure) {
        (Ok(r), None) => r,
        (Err(e), _) | (Ok(_), Some(e)) => {
            for w in &written {
                w.target.discard(&w.tmp);
            }
            // Partitions this export created and did not fill go too (an earlier export's
            // file keeps its partition).
            for (s, _) in &files {
                if let Some(d) = out.existing(s.name) {
                    d.remove_if_empty(&partition);
                    drop(d);
                    out.remove_if_empty(s.name);
                }
            }
            return Err(e);
        }
    };
    let verdict = report.verdict();
    let mut streams = Vec::new();
    for w in written {
        w.target.commit(w.file, &w.tmp, PART)?;
        streams.push(StreamExport {
            file: w.target.path().join(PART),
            source: w.source,
            plan: w.plan,
            counts: w.counts,
        });
    }
    let names: Vec<&str> = streams.iter().map(StreamExport::name).collect();
    // A stream an earlier export of this episode wrote and this one did not (the episode
    // lost the file, or was re-exported with --allow-incomplete) leaves no stale rows.
    for s in contract::streams() {
        if !names.contains(&s.name) {
            out.remove_partition(s.name, &partition, PART);
        }
    }
    let row = episode_row(&meta, &report, verdict, opts, &names);
    let target = out.subdir(EPISODES)?.subdir(&partition)?;
    let (f, tmp) = target.create_temp(PART)?;
    if let Err(e) = write_episode_row(&row, &id, &f) {
        target.discard(&tmp);
        return Err(e);
    }
    target.commit(f, &tmp, PART)?;
    Ok(EpisodeExport {
        episode_id: id,
        verdict,
        streams,
        phases,
        episodes_file: target.path().join(PART),
    })
}

/// The episodes table's columns: meta.json flattened, and how the export saw the episode.
pub const EPISODE_COLUMNS: &[(&str, ColumnType)] = &[
    ("started_at_wall", ColumnType::Utf8),
    ("ended_at_wall", ColumnType::Utf8),
    ("duration_observed_s", ColumnType::Float64),
    ("end_reason", ColumnType::Dict),
    ("error", ColumnType::Utf8),
    ("backend_requested", ColumnType::Dict),
    ("backend_used", ColumnType::Dict),
    ("fallback_reason", ColumnType::Utf8),
    ("rate_hz", ColumnType::UInt64),
    ("interval_ns", ColumnType::UInt64),
    ("target_pid", ColumnType::UInt64),
    ("vcpus", ColumnType::UInt64),
    ("ram_mib", ColumnType::UInt64),
    ("image_name", ColumnType::Utf8),
    ("image_sha256", ColumnType::Utf8),
    ("snapshot_name", ColumnType::Utf8),
    ("sample", ColumnType::Json),
    ("exploit", ColumnType::Json),
    ("hostname", ColumnType::Utf8),
    ("kernel", ColumnType::Utf8),
    ("cpus", ColumnType::UInt64),
    ("qemu_version", ColumnType::Utf8),
    ("ticks_scheduled", ColumnType::UInt64),
    ("ticks_missed", ColumnType::UInt64),
    ("rows_total", ColumnType::UInt64),
    ("phases_observed", ColumnType::Json),
    ("sources", ColumnType::Json),
    ("streams", ColumnType::Json),
    ("mono_origin_ns", ColumnType::UInt64),
    ("wall_origin_ns", ColumnType::UInt64),
    ("complete", ColumnType::Bool),
    ("valid", ColumnType::Bool),
    ("problems", ColumnType::UInt64),
    ("allow_incomplete", ColumnType::Bool),
    ("cis490_version", ColumnType::Utf8),
];

fn episode_row(
    meta: &Meta,
    report: &crate::validate::EpisodeReport,
    verdict: Verdict,
    opts: ExportOptions,
    streams: &[&str],
) -> Map<String, Value> {
    let r = meta.result.as_ref();
    let v = json!({
        "started_at_wall": meta.started_at_wall,
        "ended_at_wall": meta.ended_at_wall,
        "duration_observed_s": r.map(|r| r.duration_observed_s),
        "end_reason": r.map(|r| r.end_reason.as_str()),
        "error": r.and_then(|r| r.error.clone()),
        "backend_requested": meta.backend.requested,
        "backend_used": meta.backend.used,
        "fallback_reason": meta.backend.fallback_reason,
        "rate_hz": meta.schedule.rate_hz,
        "interval_ns": meta.schedule.interval_ns,
        "target_pid": meta.vm.target_pid,
        "vcpus": meta.vm.vcpus,
        "ram_mib": meta.vm.ram_mib,
        "image_name": meta.vm.image_name,
        "image_sha256": meta.vm.image_sha256,
        "snapshot_name": meta.vm.snapshot_name,
        "sample": meta.sample,
        "exploit": meta.exploit,
        "hostname": meta.host_fingerprint.hostname,
        "kernel": meta.host_fingerprint.kernel,
        "cpus": meta.host_fingerprint.cpus,
        "qemu_version": meta.host_fingerprint.qemu_version,
        "ticks_scheduled": r.map(|r| r.ticks_scheduled),
        "ticks_missed": r.map(|r| r.ticks_missed),
        "rows_total": r.map(|r| r.rows_total),
        "phases_observed": r.map(|r| r.phases_observed.clone()),
        "sources": meta.sources.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        "streams": streams,
        "mono_origin_ns": meta.clock.mono_origin_ns,
        "wall_origin_ns": meta.clock.wall_origin_ns,
        "complete": report.complete,
        "valid": verdict == Verdict::Pass,
        "problems": report.problems.len(),
        "allow_incomplete": opts.allow_incomplete,
        "cis490_version": env!("CARGO_PKG_VERSION"),
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn write_episode_row(
    row: &Map<String, Value>,
    id: &str,
    out: &std::fs::File,
) -> Result<(), ExportError> {
    use arrow_schema::{Field, Schema};
    let fields: Vec<Field> = EPISODE_COLUMNS
        .iter()
        .map(|(n, t)| Field::new(*n, columns::arrow_type(*t), true))
        .collect();
    let schema = std::sync::Arc::new(Schema::new(fields));
    let mut arrays = Vec::new();
    for (name, ty) in EPISODE_COLUMNS {
        let mut b = columns::Builder::new(*ty);
        // A JSON-typed cell holds the value's JSON text; a value of another type than
        // declared (a meta.json from a newer writer) is kept as null rather than lost
        // silently: validate has already said what is wrong with it.
        let v = row.get(*name);
        if b.append(v).is_err() {
            b.append_null();
        }
        arrays.push(b.finish());
    }
    let batch = RecordBatch::try_new(schema.clone(), arrays).map_err(|e| ExportError::Arrow {
        context: "episodes row".into(),
        source: e,
    })?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .set_created_by(format!("cis490 {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(vec![parquet::file::metadata::KeyValue::new(
            "cis490.episode_id".into(),
            id.to_owned(),
        )]))
        .build();
    let path = PathBuf::from(format!("{EPISODES}/episode_id={id}/{PART}"));
    let perr = |e| ExportError::Parquet {
        path: path.clone(),
        source: e,
    };
    let mut w = ArrowWriter::try_new(out, schema, Some(props)).map_err(perr)?;
    w.write(&batch).map_err(perr)?;
    w.close().map_err(perr)?;
    Ok(())
}

/// Read `parquet` back and compare every value of every row with the episode's JSONL
/// `file` (rows in the export's order: by t_mono_ns, then tid), and each row's phase
/// with the labels. Returns the rows compared.
pub fn verify(
    file: &Path,
    parquet: &Path,
    plan: &Plan,
    phases: &Phases,
) -> Result<u64, ExportError> {
    let mut rows: Vec<(u64, RowMap)> = Vec::new();
    for_each_row(file, false, |n, row| {
        rows.push((n, row));
        Ok(())
    })?;
    // The writer's order: runs of equal t_mono_ns in file order, each sorted by tid.
    let mut start = 0;
    while start < rows.len() {
        let t = rows[start].1.get("t_mono_ns").and_then(Value::as_u64);
        let mut end = start + 1;
        while end < rows.len() && rows[end].1.get("t_mono_ns").and_then(Value::as_u64) == t {
            end += 1;
        }
        rows[start..end].sort_by_key(|(_, r)| write::tid_key(r));
        start = end;
    }
    let f = std::fs::File::open(parquet).map_err(ExportError::io(parquet))?;
    let perr = |e| ExportError::Parquet {
        path: parquet.to_path_buf(),
        source: e,
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(perr)?
        .build()
        .map_err(perr)?;
    let mut i = 0usize;
    let mismatch = |what: String| ExportError::Mismatch(format!("{}: {what}", parquet.display()));
    for batch in reader {
        let batch = batch.map_err(|e| ExportError::Arrow {
            context: parquet.display().to_string(),
            source: e,
        })?;
        let phase_col = batch.column_by_name(plan::PHASE).filter(|_| plan.derived);
        for r in 0..batch.num_rows() {
            let Some((line, row)) = rows.get(i) else {
                return Err(mismatch(format!(
                    "more rows than the {} of {}",
                    rows.len(),
                    file.display()
                )));
            };
            for c in &plan.columns {
                let col = batch
                    .column_by_name(&c.name)
                    .ok_or_else(|| mismatch(format!("no column {}", c.name)))?;
                let got = columns::json_at(col.as_ref(), c.ty, r);
                let want = row.get(&c.name).cloned().unwrap_or(Value::Null);
                let same = match (c.ty, &got, &want) {
                    (ColumnType::Float64, Value::Number(g), Value::Number(w)) => {
                        g.as_f64() == w.as_f64()
                    }
                    _ => got == want,
                };
                if !same {
                    return Err(mismatch(format!(
                        "{}:{line} column {}: parquet {got}, episode {want}",
                        file.display(),
                        c.name
                    )));
                }
            }
            if let Some(p) = phase_col {
                let got = columns::json_at(p.as_ref(), ColumnType::Dict, r);
                let want = row
                    .get("t_mono_ns")
                    .and_then(Value::as_u64)
                    .and_then(|t| phases.at(t))
                    .map_or(Value::Null, Value::from);
                if got != want {
                    return Err(mismatch(format!(
                        "{}:{line} phase: parquet {got}, labels {want}",
                        file.display()
                    )));
                }
            }
            i += 1;
        }
    }
    if i != rows.len() {
        return Err(mismatch(format!(
            "{i} rows, {} has {}",
            file.display(),
            rows.len()
        )));
    }
    Ok(i as u64)
}

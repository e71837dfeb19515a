//! One stream of one episode into one Parquet file: rows in the episode's order (t_mono_ns
//! never decreases in a valid stream), each group of equal t_mono_ns sorted by tid
//! (process row first), typed by the [`Plan`], with the derived columns filled in.

use crate::fields::RowMap;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use arrow_array::builder::{Int64Builder, StringDictionaryBuilder, UInt64Builder};
use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, RecordBatch};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::{KeyValue, SortingColumn};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use serde_json::Value;

use super::columns::Builder;
use super::plan::Plan;
use super::ExportError;

/// Rows per Parquet row group: small enough that min/max statistics on t_mono_ns and
/// tid prune a time-window or one-thread query to a few groups, large enough to
/// compress well (at 1 kHz and 9 rows per tick, 7 s per group).
pub const ROW_GROUP_ROWS: usize = 64 * 1024;

/// zstd level of every column. Measured on the 1 kHz 8-thread episode (BENCHMARKS.md
/// section 9): level 3 2.05 MB in 1.01 s, level 6 1.97 MB in 1.18 s, level 9 1.91 MB in
/// 1.35 s; 6 keeps the export within its time goal and the file within 1/40 of the JSONL.
/// (Delta coding the clock columns instead, tried with it, saved nothing at level 6.)
const ZSTD_LEVEL: i32 = 6;
/// Rows per batch handed to the writer (bounds the builders' memory).
const BATCH_ROWS: usize = 8 * 1024;

/// The phase in force at each instant, from labels.jsonl: (t_mono_ns, phase) in order.
#[derive(Debug, Clone, Default)]
pub struct Phases(pub Vec<(u64, String)>);

impl Phases {
    /// The phase at `t`: the last label at or before it; None before the first.
    pub fn at(&self, t: u64) -> Option<&str> {
        let i = self.0.partition_point(|(lt, _)| *lt <= t);
        (i > 0).then(|| self.0[i - 1].1.as_str())
    }
}

/// What writing one stream counted.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamCounts {
    pub rows: u64,
    /// Values of the wrong type, written as null (only with --allow-incomplete: a valid
    /// episode has none).
    pub values_nulled: u64,
    /// Lines that are not JSON objects, or over the line cap, skipped (idem).
    pub lines_skipped: u64,
}

/// The previous row of one series: its instant and cumulative values.
struct Prev {
    t: u64,
    values: Vec<Option<u64>>,
}

struct Columns<'a> {
    plan: &'a Plan,
    phases: &'a Phases,
    builders: Vec<Builder>,
    phase: StringDictionaryBuilder<Int32Type>,
    dt: UInt64Builder,
    deltas: Vec<Int64Builder>,
    prev: HashMap<String, Prev>,
    rows: usize,
    lenient: bool,
    counts: StreamCounts,
}

impl<'a> Columns<'a> {
    fn new(plan: &'a Plan, phases: &'a Phases, lenient: bool) -> Self {
        Self {
            plan,
            phases,
            builders: plan.columns.iter().map(|c| Builder::new(c.ty)).collect(),
            phase: StringDictionaryBuilder::new(),
            dt: UInt64Builder::new(),
            deltas: plan.deltas.iter().map(|_| Int64Builder::new()).collect(),
            prev: HashMap::new(),
            rows: 0,
            lenient,
            counts: StreamCounts::default(),
        }
    }

    fn push(&mut self, row: &RowMap, file: &Path, line: u64) -> Result<(), ExportError> {
        let plan = self.plan;
        for (c, b) in plan.columns.iter().zip(self.builders.iter_mut()) {
            if let Err(expected) = b.append(row.get(&c.name)) {
                if !self.lenient {
                    return Err(ExportError::Row {
                        file: file.to_path_buf(),
                        line,
                        message: format!(
                            "column {}: {} is not {expected}",
                            c.name,
                            row.get(&c.name).map_or("absent".into(), |v| v.to_string())
                        ),
                    });
                }
                b.append_null();
                self.counts.values_nulled += 1;
            }
        }
        let t = row.get("t_mono_ns").and_then(Value::as_u64);
        if plan.derived {
            match t.and_then(|t| self.phases.at(t)) {
                Some(p) => {
                    self.phase.append(p).map_err(|e| ExportError::Arrow {
                        context: "phase column".into(),
                        source: e,
                    })?;
                }
                None => self.phase.append_null(),
            }
            let mut key = String::new();
            for &i in &plan.entity {
                key.push_str(
                    &row.get(&plan.columns[i].name)
                        .map_or("null".into(), |v| v.to_string()),
                );
                key.push('\u{1f}');
            }
            let values: Vec<Option<u64>> = plan
                .deltas
                .iter()
                .map(|&i| row.get(&plan.columns[i].name).and_then(Value::as_u64))
                .collect();
            let prev = self.prev.get(&key);
            self.dt.append_option(match (prev, t) {
                (Some(p), Some(t)) => t.checked_sub(p.t),
                _ => None,
            });
            for (k, d) in self.deltas.iter_mut().enumerate() {
                d.append_option(prev.and_then(|p| {
                    let (a, b) = (p.values[k]?, values[k]?);
                    Some(b as i64 - a as i64)
                }));
            }
            if let Some(t) = t {
                self.prev.insert(key, Prev { t, values });
            }
        }
        self.rows += 1;
        self.counts.rows += 1;
        Ok(())
    }

    fn batch(&mut self) -> Result<RecordBatch, ExportError> {
        let mut arrays: Vec<ArrayRef> = self.builders.iter_mut().map(Builder::finish).collect();
        if self.plan.derived {
            arrays.push(std::sync::Arc::new(self.phase.finish()));
            arrays.push(std::sync::Arc::new(self.dt.finish()));
            for d in &mut self.deltas {
                arrays.push(std::sync::Arc::new(d.finish()));
            }
        }
        self.rows = 0;
        RecordBatch::try_new(self.plan.schema.clone(), arrays).map_err(|e| ExportError::Arrow {
            context: format!("{} batch", self.plan.stream.name),
            source: e,
        })
    }
}

/// The writer settings every file of the dataset shares.
pub fn properties(plan: &Plan, episode_id: &str) -> WriterProperties {
    let index = |name: &str| plan.columns.iter().position(|c| c.name == name);
    let sorting: Vec<SortingColumn> = ["t_mono_ns", "tid"]
        .iter()
        .filter_map(|n| index(n))
        .map(|i| SortingColumn {
            column_idx: i as i32,
            descending: false,
            nulls_first: true,
        })
        .collect();
    let mut b = WriterProperties::builder();
    // Integer columns (counters, stamps, ids and the derived differences): byte stream
    // split, no dictionary. In rows sorted by time the threads' counters interleave, so
    // neither a dictionary nor delta coding finds much; splitting each value's 8 bytes
    // into 8 streams puts the nearly constant high bytes together for zstd. Measured on
    // a 1 kHz 8-thread bpf-sched table: 2.53 MB with the defaults, 2.32 MB with
    // DELTA_BINARY_PACKED, 1.49 MB with BYTE_STREAM_SPLIT (docs/datasets.md).
    for f in plan.schema.fields() {
        if matches!(
            f.data_type(),
            arrow_schema::DataType::UInt64 | arrow_schema::DataType::Int64
        ) {
            let col = parquet::schema::types::ColumnPath::from(f.name().as_str());
            b = b
                .set_column_dictionary_enabled(col.clone(), false)
                .set_column_encoding(col, parquet::basic::Encoding::BYTE_STREAM_SPLIT);
        }
    }
    b.set_compression(Compression::ZSTD(
        ZstdLevel::try_new(ZSTD_LEVEL).unwrap_or_default(),
    ))
    .set_statistics_enabled(EnabledStatistics::Page)
    .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
    .set_sorting_columns(Some(sorting))
    .set_created_by(format!("cis490 {}", env!("CARGO_PKG_VERSION")))
    .set_key_value_metadata(Some(vec![
        KeyValue::new("cis490.episode_id".into(), episode_id.to_owned()),
        KeyValue::new("cis490.stream".into(), plan.stream.name.to_owned()),
    ]))
    .build()
}

/// The sort key within one instant: the process row (tid null) first, then by tid.
pub fn tid_key(row: &RowMap) -> (bool, u64) {
    match row.get("tid").and_then(Value::as_u64) {
        None => (false, 0),
        Some(t) => (true, t),
    }
}

/// Read `file` (an episode stream, plain or .zst) and write it to `out` as Parquet.
pub fn write_stream<W: Write + Send>(
    file: &Path,
    plan: &Plan,
    phases: &Phases,
    episode_id: &str,
    lenient: bool,
    out: W,
) -> Result<StreamCounts, ExportError> {
    let perr = |e| ExportError::Parquet {
        path: file.to_path_buf(),
        source: e,
    };
    let mut writer =
        ArrowWriter::try_new(out, plan.schema.clone(), Some(properties(plan, episode_id)))
            .map_err(perr)?;
    let mut cols = Columns::new(plan, phases, lenient);
    // The rows of the current instant, sorted by tid before they are appended.
    let mut group: Vec<(u64, RowMap)> = Vec::new();
    let mut group_t: Option<u64> = None;
    let flush_group =
        |group: &mut Vec<(u64, RowMap)>, cols: &mut Columns<'_>| -> Result<(), ExportError> {
            group.sort_by_key(|(_, r)| tid_key(r));
            for (line, row) in group.drain(..) {
                cols.push(&row, file, line)?;
            }
            Ok(())
        };
    cols.counts.lines_skipped = super::for_each_row(file, !lenient, |n, row| {
        let t = row.get("t_mono_ns").and_then(Value::as_u64);
        if t != group_t {
            flush_group(&mut group, &mut cols)?;
            if cols.rows >= BATCH_ROWS {
                writer.write(&cols.batch()?).map_err(perr)?;
            }
            group_t = t;
        }
        group.push((n, row));
        Ok(())
    })?;
    flush_group(&mut group, &mut cols)?;
    let batch = cols.batch()?;
    if batch.num_rows() > 0 {
        writer.write(&batch).map_err(perr)?;
    }
    writer.close().map_err(perr)?;
    Ok(cols.counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_at_an_instant_is_the_last_label_at_or_before_it() {
        let p = Phases(vec![(10, "clean".into()), (50, "armed".into())]);
        assert_eq!(p.at(5), None);
        assert_eq!(p.at(10), Some("clean"));
        assert_eq!(p.at(49), Some("clean"));
        assert_eq!(p.at(50), Some("armed"));
        assert_eq!(p.at(u64::MAX), Some("armed"));
    }
}

//! The one row type every telemetry stream writes.
//!
//! A row is the common header (clock pair, source, deployment flag, tick seq, thread
//! identity) plus a flat list of named scalar fields, in a stable order. Flat scalars
//! only, so `read_ndjson` in pandas/polars/DuckDB yields typed columns.

use std::borrow::Cow;
use std::sync::Arc;

use crate::clock::Stamp;

/// A scalar field value. `Null` keeps a column present (and its type inferable from other
/// rows) when a value could not be read this tick.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(String),
    /// A one-character string (the /proc state letter), kept apart from `Str` so that a
    /// 1 kHz per-thread field costs no allocation.
    Char(char),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::U64(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::I64(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::F64(v)
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_owned())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Field names are mostly static (`on_cpu_ns`), but QMP stat names and agent fields are
/// only known at run time.
pub type FieldName = Cow<'static, str>;

/// One output row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub stamp: Stamp,
    pub source: &'static str,
    pub available_in_deployment: bool,
    /// Tick number of the sampler that produced the row; `None` for streamed sources that
    /// have no ticks of their own.
    pub seq: Option<u64>,
    /// Per-thread identity; all `None` on a process-total row.
    pub tid: Option<u32>,
    /// Shared with the collector's name cache: a row per thread per tick clones a
    /// reference, not the string.
    pub comm: Option<Arc<str>>,
    pub vcpu: Option<u32>,
    /// Whether the thread-identity columns are written at all (per-thread streams) or
    /// omitted (streams with no notion of threads, such as `qmp` or `agent`).
    pub thread_columns: bool,
    pub fields: Vec<(FieldName, Value)>,
}

impl Row {
    pub fn new(stamp: Stamp, source: &'static str, available_in_deployment: bool) -> Self {
        Self {
            stamp,
            source,
            available_in_deployment,
            seq: None,
            tid: None,
            comm: None,
            vcpu: None,
            thread_columns: false,
            fields: Vec::new(),
        }
    }

    /// Make this row a fresh `Row::new(stamp, source, available_in_deployment)` while
    /// keeping the allocation of its field list (see `TickOutput::new_row`).
    pub fn reset(&mut self, stamp: Stamp, source: &'static str, available_in_deployment: bool) {
        self.stamp = stamp;
        self.source = source;
        self.available_in_deployment = available_in_deployment;
        self.seq = None;
        self.tid = None;
        self.comm = None;
        self.vcpu = None;
        self.thread_columns = false;
        self.fields.clear();
    }

    pub fn push(&mut self, name: impl Into<FieldName>, value: impl Into<Value>) -> &mut Self {
        self.fields.push((name.into(), value.into()));
        self
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Append the row as one JSON line (with the trailing newline) to `out`.
    ///
    /// Hand-written rather than through serde: at 1 kHz with ~20 rows per tick this is
    /// the tracer's hottest user-space code, and integers via `itoa` plus names copied
    /// without an escaping pass when they need none cost a fraction of `write!`.
    pub fn write_json_line(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"t_mono_ns\":");
        write_u64(out, self.stamp.t_mono_ns);
        out.extend_from_slice(b",\"t_wall_ns\":");
        write_u64(out, self.stamp.t_wall_ns);
        out.extend_from_slice(b",\"source\":");
        write_json_str(out, self.source);
        out.extend_from_slice(if self.available_in_deployment {
            b",\"available_in_deployment\":true"
        } else {
            b",\"available_in_deployment\":false"
        });
        if let Some(seq) = self.seq {
            out.extend_from_slice(b",\"seq\":");
            write_u64(out, seq);
        }
        if self.thread_columns {
            out.extend_from_slice(b",\"tid\":");
            write_opt_u64(out, self.tid.map(u64::from));
            out.extend_from_slice(b",\"comm\":");
            match &self.comm {
                Some(c) => write_json_str(out, c),
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b",\"vcpu\":");
            write_opt_u64(out, self.vcpu.map(u64::from));
        }
        for (name, value) in &self.fields {
            match name {
                // A static name is a literal in this crate's source (`on_cpu_ns`): plain
                // ASCII, so it is copied without the escaping scan. Names built at run time
                // (QMP statistics, agent fields) go through `write_json_str`.
                Cow::Borrowed(n) => {
                    debug_assert!(needs_no_escape(n), "{n:?}");
                    out.reserve(n.len() + 4);
                    out.extend_from_slice(b",\"");
                    out.extend_from_slice(n.as_bytes());
                    out.extend_from_slice(b"\":");
                }
                Cow::Owned(n) => {
                    out.push(b',');
                    write_json_str(out, n);
                    out.push(b':');
                }
            }
            write_value(out, value);
        }
        out.extend_from_slice(b"}\n");
    }
}

fn needs_no_escape(s: &str) -> bool {
    s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')
}

fn write_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

fn write_opt_u64(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        Some(v) => write_u64(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::U64(v) => write_u64(out, *v),
        Value::I64(v) => out.extend_from_slice(itoa::Buffer::new().format(*v).as_bytes()),
        // JSON has no NaN/Infinity: write null rather than an unparseable line.
        Value::F64(v) if v.is_finite() => {
            use std::io::Write as _;
            write!(out, "{v:?}").expect("write to Vec")
        }
        Value::F64(_) => out.extend_from_slice(b"null"),
        Value::Str(s) => write_json_str(out, s),
        Value::Char(c) => write_json_str(out, c.encode_utf8(&mut [0; 4])),
    }
}

/// JSON string escaping (serde_json's, so control characters and quotes in hostile thread
/// names or guest strings can never break a line). Strings with nothing to escape, such
/// as every field name, are copied as they are: serde_json escapes exactly the bytes
/// below 0x20, `"` and `\\`, so the output is the same byte for byte.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    if needs_no_escape(s) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(out, s).expect("serializing a str to a Vec cannot fail");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp() -> Stamp {
        Stamp {
            t_mono_ns: 5,
            t_wall_ns: 7,
        }
    }

    #[test]
    fn thread_row_is_flat_json_with_header_first() {
        let mut row = Row::new(stamp(), "proc", false);
        row.seq = Some(3);
        row.thread_columns = true;
        row.tid = Some(42);
        row.comm = Some("CPU 0/KVM".into());
        row.push("on_cpu_ns", 10u64)
            .push("rss_kb", Value::Null)
            .push("ratio", 0.5);
        let mut out = Vec::new();
        row.write_json_line(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("}\n"));
        assert!(text.starts_with("{\"t_mono_ns\":5,\"t_wall_ns\":7,\"source\":\"proc\""));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["seq"], 3);
        assert_eq!(v["tid"], 42);
        assert_eq!(v["comm"], "CPU 0/KVM");
        assert!(v["vcpu"].is_null());
        assert_eq!(v["on_cpu_ns"], 10);
        assert!(v["rss_kb"].is_null());
        assert_eq!(v["ratio"], 0.5);
    }

    #[test]
    fn hostile_strings_and_non_finite_floats_stay_one_valid_line() {
        let mut row = Row::new(stamp(), "agent", true);
        row.push("guest_name", "a\"b\n\u{0}c\\")
            .push("guest_x", f64::NAN);
        let mut out = Vec::new();
        row.write_json_line(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["guest_name"], "a\"b\n\u{0}c\\");
        assert!(v["guest_x"].is_null());
        assert!(
            v.get("tid").is_none(),
            "non-thread rows carry no thread columns"
        );
    }

    #[test]
    fn string_fast_path_matches_serde_json_byte_for_byte() {
        let mut samples: Vec<String> = (0u32..0x300)
            .filter_map(char::from_u32)
            .map(|c| format!("a{c}b"))
            .collect();
        samples.extend(
            [
                "",
                "on_cpu_ns",
                "CPU 0/KVM",
                "\u{7f}",
                "\u{2028}",
                "é\"",
                "x\\y",
            ]
            .map(String::from),
        );
        for s in &samples {
            let mut ours = Vec::new();
            write_json_str(&mut ours, s);
            assert_eq!(ours, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn line_is_what_serde_json_writes_for_the_same_object() {
        let mut row = Row::new(stamp(), "bpf-sched", false);
        row.seq = Some(u64::MAX);
        row.thread_columns = true;
        row.comm = Some("q\"x".into());
        row.push("state", Value::Char('S'))
            .push("a", -3i64)
            .push("b", true)
            .push("c", 1.25)
            .push("d", Value::Null);
        let mut out = Vec::new();
        row.write_json_line(&mut out);
        let expected = serde_json::json!({"t_mono_ns": 5, "t_wall_ns": 7, "source": "bpf-sched",
            "available_in_deployment": false, "seq": u64::MAX, "tid": null, "comm": "q\"x",
            "vcpu": null, "state": "S", "a": -3, "b": true, "c": 1.25, "d": null});
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{}\n", serde_json::to_string(&expected).unwrap())
        );
    }

    #[test]
    fn reset_row_is_a_new_row() {
        let mut row = Row::new(stamp(), "proc", false);
        row.seq = Some(1);
        row.thread_columns = true;
        row.tid = Some(2);
        row.comm = Some("x".into());
        row.vcpu = Some(0);
        row.push("on_cpu_ns", 1u64);
        row.reset(stamp(), "agent", true);
        assert_eq!(row, Row::new(stamp(), "agent", true));
    }
}

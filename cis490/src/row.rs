//! The one row type every telemetry stream writes.
//!
//! A row is the common header (clock pair, source, deployment flag, tick seq, thread
//! identity) plus a flat list of named scalar fields, in a stable order. Flat scalars
//! only, so `read_ndjson` in pandas/polars/DuckDB yields typed columns.

use std::borrow::Cow;
use std::io::Write;

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
    pub comm: Option<String>,
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

    pub fn push(&mut self, name: impl Into<FieldName>, value: impl Into<Value>) -> &mut Self {
        self.fields.push((name.into(), value.into()));
        self
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Append the row as one JSON line (with the trailing newline) to `out`.
    pub fn write_json_line(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        write!(
            out,
            "\"t_mono_ns\":{},\"t_wall_ns\":{}",
            self.stamp.t_mono_ns, self.stamp.t_wall_ns
        )
        .expect("write to Vec");
        out.extend_from_slice(b",\"source\":");
        write_json_str(out, self.source);
        write!(
            out,
            ",\"available_in_deployment\":{}",
            self.available_in_deployment
        )
        .expect("vec");
        if let Some(seq) = self.seq {
            write!(out, ",\"seq\":{seq}").expect("vec");
        }
        if self.thread_columns {
            write_field(out, "tid", &self.tid.map(u64::from).into());
            write_field(out, "comm", &self.comm.as_deref().into());
            write_field(out, "vcpu", &self.vcpu.map(u64::from).into());
        }
        for (name, value) in &self.fields {
            write_field(out, name, value);
        }
        out.extend_from_slice(b"}\n");
    }
}

fn write_field(out: &mut Vec<u8>, name: &str, value: &Value) {
    out.push(b',');
    write_json_str(out, name);
    out.push(b':');
    write_value(out, value);
}

fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::U64(v) => write!(out, "{v}").expect("vec"),
        Value::I64(v) => write!(out, "{v}").expect("vec"),
        // JSON has no NaN/Infinity: write null rather than an unparseable line.
        Value::F64(v) if v.is_finite() => write!(out, "{v:?}").expect("vec"),
        Value::F64(_) => out.extend_from_slice(b"null"),
        Value::Str(s) => write_json_str(out, s),
    }
}

/// JSON string escaping (serde_json's, so control characters and quotes in hostile thread
/// names or guest strings can never break a line).
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("serializing a str to a Vec cannot fail");
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
}

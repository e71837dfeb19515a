//! Checking rows against their stream's declaration.
//!
//! [`check_row`] is pure and stateless: one row (a parsed JSON object) against one
//! [`Stream`]. [`TypeCheck`] wraps it for a whole file as `cis490 validate` reads it: it
//! adds what needs memory (a family column must keep one type in a file) and reports
//! each distinct problem once, with a count of the rows that repeat it.

use std::collections::HashMap;

use serde_json::Value;

use super::{events, ColumnType, Presence, Stream, StreamKind, TypeRule};
use crate::fields::Fields;

/// The JSON shape of one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueKind {
    Null,
    Bool,
    /// A non-negative integer.
    UInt,
    /// A negative integer.
    NegInt,
    Float,
    String,
    Nested,
}

impl ValueKind {
    pub fn of(v: &Value) -> ValueKind {
        match v {
            Value::Null => ValueKind::Null,
            Value::Bool(_) => ValueKind::Bool,
            Value::Number(n) if n.is_u64() => ValueKind::UInt,
            Value::Number(n) if n.is_i64() => ValueKind::NegInt,
            Value::Number(_) => ValueKind::Float,
            Value::String(_) => ValueKind::String,
            Value::Array(_) | Value::Object(_) => ValueKind::Nested,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ValueKind::Null => "null",
            ValueKind::Bool => "a bool",
            ValueKind::UInt => "an integer",
            ValueKind::NegInt => "a negative integer",
            ValueKind::Float => "a float",
            ValueKind::String => "a string",
            ValueKind::Nested => "a nested array/object",
        }
    }

    /// Whether a value of this shape is a valid non-null value of `ty`.
    fn fits(self, ty: ColumnType) -> bool {
        match ty {
            ColumnType::Int64 => matches!(self, ValueKind::UInt | ValueKind::NegInt),
            ColumnType::UInt64 => self == ValueKind::UInt,
            ColumnType::Float64 => self == ValueKind::Float,
            ColumnType::Bool => self == ValueKind::Bool,
            ColumnType::Utf8 | ColumnType::Dict => self == ValueKind::String,
            ColumnType::Json => true,
        }
    }
}

/// What is wrong with one value or column of a row.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ViolationKind {
    /// null where the column is not nullable.
    NullInNonNullable,
    /// An integer where the column is Float64 (written `0` instead of `0.0`).
    IntInFloat,
    /// A float where the column is an integer type.
    FloatInInt,
    /// A negative integer in a UInt64 column.
    NegativeInUnsigned,
    /// Any other shape mismatch (a string in a number column, …).
    WrongType,
    /// A string outside the column's closed set of values.
    NotAllowedValue,
    /// A column neither declared nor matching a family pattern.
    UnknownColumn,
    /// A column every row (of its kind) must have is absent.
    MissingColumn,
    /// A column present in a row of a kind it does not belong to.
    WrongKind,
    /// A family column whose values changed type within the file.
    TypeChanged,
    /// An events.jsonl row whose `event` is not a declared kind.
    UnknownEventKind,
}

impl ViolationKind {
    /// The problem in a few words (for the count of repeats).
    pub fn describe(&self) -> &'static str {
        match self {
            ViolationKind::NullInNonNullable => "null in a non-nullable column",
            ViolationKind::IntInFloat => "integer in a float column",
            ViolationKind::FloatInInt => "float in an integer column",
            ViolationKind::NegativeInUnsigned => "negative integer in an unsigned column",
            ViolationKind::WrongType => "value of the wrong type",
            ViolationKind::NotAllowedValue => "value outside the allowed set",
            ViolationKind::UnknownColumn => "undeclared column",
            ViolationKind::MissingColumn => "column missing",
            ViolationKind::WrongKind => "column in a row of another kind",
            ViolationKind::TypeChanged => "column changed type",
            ViolationKind::UnknownEventKind => "undeclared event kind",
        }
    }
}

/// One problem of one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub column: String,
    pub kind: ViolationKind,
    pub message: String,
}

fn violation(column: &str, kind: ViolationKind, message: String) -> Violation {
    Violation {
        column: column.to_owned(),
        kind,
        message,
    }
}

/// Check one value against a declared type and nullability.
fn check_value(
    column: &str,
    ty: ColumnType,
    nullable: bool,
    values: Option<&[&str]>,
    v: &Value,
    out: &mut Vec<Violation>,
) {
    let kind = ValueKind::of(v);
    if kind == ValueKind::Null {
        if !nullable {
            out.push(violation(
                column,
                ViolationKind::NullInNonNullable,
                format!(
                    "column {column}: null in a non-nullable {} column",
                    ty.name()
                ),
            ));
        }
        return;
    }
    if kind.fits(ty) {
        if let (Some(allowed), Value::String(s)) = (values, v) {
            if !allowed.contains(&s.as_str()) {
                out.push(violation(
                    column,
                    ViolationKind::NotAllowedValue,
                    format!("column {column}: {s:?} is not one of {allowed:?}"),
                ));
            }
        }
        return;
    }
    let (vk, detail) = match (kind, ty) {
        (ValueKind::UInt | ValueKind::NegInt, ColumnType::Float64) => (
            ViolationKind::IntInFloat,
            " (a float column's values carry a decimal point: 0.0, not 0)",
        ),
        (ValueKind::Float, ColumnType::Int64 | ColumnType::UInt64) => {
            (ViolationKind::FloatInInt, "")
        }
        (ValueKind::NegInt, ColumnType::UInt64) => (ViolationKind::NegativeInUnsigned, ""),
        _ => (ViolationKind::WrongType, ""),
    };
    out.push(violation(
        column,
        vk,
        format!(
            "column {column}: {} ({}) in a {} column{detail}",
            kind.name(),
            short(v),
            ty.name()
        ),
    ));
}

/// A value for a message, cut to 40 characters.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() <= 40 {
        s
    } else {
        let mut cut = 40;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &s[..cut])
    }
}

/// Check one row of `stream` (a parsed JSON line). Every problem found, in column order
/// of the row; empty when the row meets the contract.
pub fn check_row(stream: &Stream, obj: &(impl Fields + ?Sized)) -> Vec<Violation> {
    let mut out = Vec::new();
    match stream.kind {
        StreamKind::Events => check_event(stream, obj, &mut out),
        StreamKind::Telemetry | StreamKind::Labels => check_columns(stream, obj, &mut out),
    }
    out
}

fn row_kind(obj: &(impl Fields + ?Sized)) -> Option<&str> {
    obj.field("kind").and_then(Value::as_str)
}

/// Whether every row of `kind` must carry `col`.
fn required(col: &super::Column, kind: Option<&str>) -> bool {
    match col.presence {
        Presence::Always => true,
        Presence::Optional => false,
        Presence::Kinds { kinds, required } => required && kind.is_some_and(|k| kinds.contains(&k)),
    }
}

fn check_columns(stream: &Stream, obj: &(impl Fields + ?Sized), out: &mut Vec<Violation>) {
    let kind = row_kind(obj);
    // Required columns met in the row; only when fewer than required are they looked up
    // one by one (saves a map lookup per column and row on the common, complete row).
    let mut required_seen = 0usize;
    for (name, v) in obj.fields() {
        if let Some(col) = stream.column(name) {
            if required(col, kind) {
                required_seen += 1;
            }
            if let Presence::Kinds { kinds, .. } = col.presence {
                if !kind.is_some_and(|k| kinds.contains(&k)) {
                    out.push(violation(
                        name,
                        ViolationKind::WrongKind,
                        format!(
                            "column {name} belongs to rows of kind {kinds:?}, not {:?}",
                            kind.unwrap_or("(none)")
                        ),
                    ));
                    continue;
                }
            }
            check_value(name, col.ty, col.nullable, col.values, v, out);
            if name == "available_in_deployment" {
                if let (Some(want), Some(got)) = (stream.available_in_deployment, v.as_bool()) {
                    if want != got {
                        out.push(violation(
                            name,
                            ViolationKind::NotAllowedValue,
                            format!(
                                "column {name}: {got}, but stream {} is always {want}",
                                stream.name
                            ),
                        ));
                    }
                }
            }
        } else if let Some(fam) = stream.family(name) {
            if let Some(kinds) = fam.kinds {
                if !kind.is_some_and(|k| kinds.contains(&k)) {
                    out.push(violation(
                        name,
                        ViolationKind::WrongKind,
                        format!(
                            "column {name} ({}) belongs to rows of kind {kinds:?}",
                            fam.pattern
                        ),
                    ));
                    continue;
                }
            }
            match fam.rule {
                TypeRule::Exact(ty) => check_value(name, ty, fam.nullable, None, v, out),
                TypeRule::OneOf(types) => {
                    let k = ValueKind::of(v);
                    let ok =
                        (k == ValueKind::Null && fam.nullable) || types.iter().any(|t| k.fits(*t));
                    if !ok {
                        let names: Vec<&str> = types.iter().map(|t| t.name()).collect();
                        out.push(violation(
                            name,
                            if k == ValueKind::Null {
                                ViolationKind::NullInNonNullable
                            } else {
                                ViolationKind::WrongType
                            },
                            format!(
                                "column {name} ({}): {} ({}), expected one of {names:?}",
                                fam.pattern,
                                k.name(),
                                short(v)
                            ),
                        ));
                    }
                }
            }
        } else {
            out.push(violation(
                name,
                ViolationKind::UnknownColumn,
                format!(
                    "unknown column {name}: stream {} declares no such column and no pattern matches it",
                    stream.name
                ),
            ));
        }
    }
    let required_count = stream.columns.iter().filter(|c| required(c, kind)).count();
    if required_seen == required_count {
        return;
    }
    for col in stream.columns {
        if required(col, kind) && obj.field(col.name).is_none() {
            out.push(violation(
                col.name,
                ViolationKind::MissingColumn,
                format!("column {} missing", col.name),
            ));
        }
    }
}

fn check_event(stream: &Stream, obj: &(impl Fields + ?Sized), out: &mut Vec<Violation>) {
    for col in stream.columns {
        match obj.field(col.name) {
            Some(v) => check_value(col.name, col.ty, col.nullable, col.values, v, out),
            None => out.push(violation(
                col.name,
                ViolationKind::MissingColumn,
                format!("column {} missing", col.name),
            )),
        }
    }
    let Some(name) = obj.field("event").and_then(Value::as_str) else {
        return;
    };
    let Some(kind) = events::kind(name) else {
        out.push(violation(
            "event",
            ViolationKind::UnknownEventKind,
            format!("event {name:?} is not a declared event kind"),
        ));
        return;
    };
    for (field, v) in obj.fields() {
        if stream.column(field).is_some() {
            continue;
        }
        match kind.field(field) {
            Some(col) => check_value(field, col.ty, col.nullable, col.values, v, out),
            None => out.push(violation(
                field,
                ViolationKind::UnknownColumn,
                format!("unknown field {field} in a {name} event"),
            )),
        }
    }
    for col in kind.fields {
        if col.presence == Presence::Always && obj.field(col.name).is_none() {
            out.push(violation(
                col.name,
                ViolationKind::MissingColumn,
                format!("{name} event without its field {}", col.name),
            ));
        }
    }
}

/// The contract check of one file, row by row, as `cis490 validate` runs it.
pub struct TypeCheck {
    stream: Option<&'static Stream>,
    file: String,
    /// (column, problem) → rows that had it after the first (which was reported).
    repeats: HashMap<(String, ViolationKind), u64>,
    /// Family columns: the shape of their first non-null value.
    family_kinds: HashMap<String, ValueKind>,
    unknown_reported: bool,
}

impl TypeCheck {
    /// For the file `file` of an episode directory (its name says the stream).
    pub fn for_file(file: &str) -> Self {
        Self {
            stream: super::stream_for_file(file),
            file: file.to_owned(),
            repeats: HashMap::new(),
            family_kinds: HashMap::new(),
            unknown_reported: false,
        }
    }

    /// For rows of `stream`, wherever they come from.
    pub fn for_stream(stream: &'static Stream) -> Self {
        Self {
            stream: Some(stream),
            file: stream.file.to_owned(),
            repeats: HashMap::new(),
            family_kinds: HashMap::new(),
            unknown_reported: false,
        }
    }

    /// The problems of one row that were not reported before (each distinct problem of a
    /// column is reported once per file; [`TypeCheck::finish`] counts the repeats).
    pub fn check(&mut self, obj: &(impl Fields + ?Sized)) -> Vec<String> {
        let Some(stream) = self.stream else {
            if self.unknown_reported {
                return Vec::new();
            }
            self.unknown_reported = true;
            return vec![format!(
                "no stream of the contract is written to {} (cis490/src/contract declares every stream)",
                self.file
            )];
        };
        let mut found = check_row(stream, obj);
        if !stream.families.is_empty() {
            self.family_stability(stream, obj, &mut found);
        }
        let mut new = Vec::new();
        for v in found {
            match self.repeats.get_mut(&(v.column.clone(), v.kind.clone())) {
                Some(n) => *n += 1,
                None => {
                    self.repeats.insert((v.column, v.kind), 0);
                    new.push(v.message);
                }
            }
        }
        new
    }

    fn family_stability(
        &mut self,
        stream: &Stream,
        obj: &(impl Fields + ?Sized),
        out: &mut Vec<Violation>,
    ) {
        for (name, v) in obj.fields() {
            if stream.column(name).is_some() || stream.family(name).is_none() {
                continue;
            }
            let k = match ValueKind::of(v) {
                ValueKind::Null | ValueKind::Nested => continue,
                // Integers of either sign and floats are one numeric column (the only
                // widening allowed: integers become floats).
                ValueKind::UInt | ValueKind::NegInt | ValueKind::Float => ValueKind::Float,
                k => k,
            };
            match self.family_kinds.get(name) {
                None => {
                    self.family_kinds.insert(name.to_owned(), k);
                }
                Some(first) if *first != k => out.push(violation(
                    name,
                    ViolationKind::TypeChanged,
                    format!(
                        "column {name} changed type: {} after {} in earlier rows",
                        k.name(),
                        if *first == ValueKind::Float {
                            "numbers"
                        } else {
                            first.name()
                        }
                    ),
                )),
                Some(_) => {}
            }
        }
    }

    /// Counts of the problems that repeated after their first report.
    pub fn finish(self) -> Vec<String> {
        let mut out: Vec<String> = self
            .repeats
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|((col, kind), n)| {
                format!(
                    "column {col}: the same problem ({}) in {n} more rows",
                    kind.describe()
                )
            })
            .collect();
        out.sort();
        out
    }
}

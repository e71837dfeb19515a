//! Pure validation of one line from the guest agent. The guest may run malware, so a
//! line is hostile until proven a small flat JSON object.
//!
//! Accepted: UTF-8 without NUL (raw or escaped as `\u0000`, in keys or values), a JSON
//! object at most [`MAX_DEPTH`] levels deep (checked by a byte scan before any parsing, so
//! 10 000 nested brackets cost one pass and no recursion), at most [`MAX_FIELDS`] scalar
//! fields, finite numbers, strings without lone surrogates. Nested objects are flattened
//! with `_`; arrays are dropped (counted). Keys become `guest_<key>` restricted to
//! `[a-z0-9_]` and [`MAX_KEY`] bytes, so a guest can never break the row's own columns.
//!
//! Columns are per episode ([`Columns`]): the first key path that maps to a column name
//! owns it, and its first non-null value fixes the column's kind. Another key path that
//! maps to the same name (`a-b` after `a.b`, `A_B`, `{"a":{"b":…}}`, a truncated long
//! key) is dropped and counted, so one column never holds two guest keys; at most
//! [`MAX_COLUMNS`] columns exist per episode. A number keeps the kind the JSON text gave
//! it (a decimal point or exponent makes a float), integers into a float column are
//! written as floats, anything else of the wrong kind is dropped and counted: a column
//! never mixes integers and floats within an episode.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::row::{FieldName, Value};

pub const MAX_LINE: usize = 64 * 1024;
pub const MAX_DEPTH: usize = 4;
pub const MAX_FIELDS: usize = 256;
pub const MAX_KEY: usize = 64;
pub const MAX_STR: usize = 1024;
/// Distinct guest columns per episode.
pub const MAX_COLUMNS: usize = 256;

/// Why a whole line was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    TooLong,
    Nul,
    Utf8,
    Nesting,
    Json,
    NotObject,
    TooManyFields,
    /// Dropped by the line-rate limiter before parsing.
    RateLimited,
    /// Dropped by the per-second byte budget before parsing.
    ByteRate,
    /// Would have taken the stream past its per-episode byte budget.
    ByteBudget,
    /// An unterminated line when the connection ended.
    Partial,
    /// An unterminated line pending when the capture stopped.
    PartialAtStop,
}

impl Reject {
    pub const ALL: [Reject; 12] = [
        Reject::TooLong,
        Reject::Nul,
        Reject::Utf8,
        Reject::Nesting,
        Reject::Json,
        Reject::NotObject,
        Reject::TooManyFields,
        Reject::RateLimited,
        Reject::ByteRate,
        Reject::ByteBudget,
        Reject::Partial,
        Reject::PartialAtStop,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::TooLong => "too_long",
            Reject::Nul => "nul",
            Reject::Utf8 => "invalid_utf8",
            Reject::Nesting => "too_deep",
            Reject::Json => "invalid_json",
            Reject::NotObject => "not_object",
            Reject::TooManyFields => "too_many_fields",
            Reject::RateLimited => "rate_limited",
            Reject::ByteRate => "byte_rate",
            Reject::ByteBudget => "byte_budget",
            Reject::Partial => "partial_line",
            Reject::PartialAtStop => "partial_at_stop",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Why one value of an accepted line was dropped or altered (the rest of the line is kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ValueIssue {
    /// An array (not a flat scalar): dropped.
    Array,
    /// Another key path already owns this column name (or the key repeats in the line):
    /// dropped.
    KeyCollision,
    /// A new column past [`MAX_COLUMNS`]: dropped.
    NewKeyLimit,
    /// A key cut to [`MAX_KEY`] bytes: kept under the cut name (if it owns it).
    KeyTruncated,
    /// A string cut to [`MAX_STR`] bytes: kept, cut.
    StringTruncated,
    /// An integer outside i64/u64: dropped (never stored as a lossy float).
    IntOutOfRange,
    /// A value of another kind than its column's (a float or string into an integer
    /// column, …): dropped.
    TypeConflict,
}

impl ValueIssue {
    pub const ALL: [ValueIssue; 7] = [
        ValueIssue::Array,
        ValueIssue::KeyCollision,
        ValueIssue::NewKeyLimit,
        ValueIssue::KeyTruncated,
        ValueIssue::StringTruncated,
        ValueIssue::IntOutOfRange,
        ValueIssue::TypeConflict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ValueIssue::Array => "array_dropped",
            ValueIssue::KeyCollision => "key_collision",
            ValueIssue::NewKeyLimit => "new_key_limit",
            ValueIssue::KeyTruncated => "key_truncated",
            ValueIssue::StringTruncated => "string_truncated",
            ValueIssue::IntOutOfRange => "int_out_of_range",
            ValueIssue::TypeConflict => "type_conflict",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The kind a column's first non-null value gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Float,
    Bool,
    Str,
}

fn kind_of(v: &Value) -> Option<Kind> {
    match v {
        Value::Null => None,
        Value::Bool(_) => Some(Kind::Bool),
        Value::U64(_) | Value::I64(_) => Some(Kind::Int),
        Value::F64(_) => Some(Kind::Float),
        Value::Str(_) | Value::Char(_) => Some(Kind::Str),
    }
}

struct Column {
    name: String,
    /// Keyed hash of the guest key path that owns the column (the path itself can be
    /// 64 KiB long; the hash keys are random per capture, so a guest cannot aim at a
    /// collision).
    origin: u64,
    kind: Option<Kind>,
}

/// The episode's guest columns: name → owner and kind. Bounded by [`MAX_COLUMNS`].
pub struct Columns {
    by_name: HashMap<String, usize>,
    cols: Vec<Column>,
    hash_keys: std::collections::hash_map::RandomState,
}

impl Default for Columns {
    fn default() -> Self {
        Self::new()
    }
}

impl Columns {
    pub fn new() -> Self {
        Self {
            by_name: HashMap::new(),
            cols: Vec::new(),
            hash_keys: std::collections::hash_map::RandomState::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.cols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cols.is_empty()
    }

    /// Each column's name and kind (`null` while only nulls were seen), in first-seen order.
    pub fn kinds(&self) -> impl Iterator<Item = (&str, Option<Kind>)> {
        self.cols.iter().map(|c| (c.name.as_str(), c.kind))
    }
}

/// The key path's hash so far, extended by one segment. Length-prefixed segments:
/// `{"a":{"b":…}}`, `"a_b"` and `"ab"` all hash apart.
fn extend(parent: &DefaultHasher, seg: &str) -> DefaultHasher {
    let mut h = parent.clone();
    h.write_usize(seg.len());
    h.write(seg.as_bytes());
    h
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Int => "integer",
            Kind::Float => "float",
            Kind::Bool => "bool",
            Kind::Str => "string",
        }
    }
}

/// Flat fields of one accepted line, plus what was dropped or altered in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub fields: Vec<(FieldName, Value)>,
    pub issues: [u32; ValueIssue::ALL.len()],
}

impl Accepted {
    pub fn issue(&self, i: ValueIssue) -> u32 {
        self.issues[i.index()]
    }
}

/// Deepest bracket nesting outside strings.
fn depth(bytes: &[u8]) -> usize {
    let (mut d, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                d += 1;
                max = max.max(d);
            }
            b'}' | b']' => d = d.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// `prefix` + the sanitized key, at most [`MAX_KEY`] bytes; true when cut.
fn key(prefix: &str, k: &str) -> (String, bool) {
    let mut s = String::with_capacity((prefix.len() + k.len()).min(MAX_KEY));
    s.push_str(prefix);
    for c in k.chars() {
        if s.len() >= MAX_KEY {
            return (s, true);
        }
        s.push(if c.is_ascii_alphanumeric() {
            c.to_ascii_lowercase()
        } else {
            '_'
        });
    }
    (s, false)
}

/// An object's members in line order, each value as its raw JSON text: the number's
/// text decides integer or float, which serde_json's parsed numbers do not keep
/// (`-0` and `1e20` would come back as floats, integers beyond u64 as lossy floats).
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Members<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Members<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Members<'a>, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    let v: &'a RawValue = m.next_value()?;
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// One scalar of the line before it meets the episode's columns.
struct Pending {
    name: String,
    origin: u64,
    truncated: bool,
    value: Value,
}

/// Validate one line (without its newline) and map its fields onto the episode's columns.
pub fn check(line: &[u8], columns: &mut Columns) -> Result<Accepted, Reject> {
    if line.len() > MAX_LINE {
        return Err(Reject::TooLong);
    }
    if line.contains(&0) {
        return Err(Reject::Nul);
    }
    let text = std::str::from_utf8(line).map_err(|_| Reject::Utf8)?;
    if depth(line) > MAX_DEPTH {
        return Err(Reject::Nesting);
    }
    let text = text.trim();
    if !text.starts_with('{') {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => Reject::NotObject,
            Err(_) => Reject::Json,
        });
    }
    let members: Members<'_> = serde_json::from_str(text).map_err(|_| Reject::Json)?;
    let mut pending = Vec::with_capacity(members.0.len().min(MAX_FIELDS));
    let mut issues = [0u32; ValueIssue::ALL.len()];
    let root = columns.hash_keys.build_hasher();
    flatten("guest_", members, &root, &mut pending, &mut issues)?;
    // The whole line is valid: only now may it claim columns.
    let mut fields = Vec::with_capacity(pending.len());
    let mut seen = [0u64; MAX_COLUMNS.div_ceil(64)];
    for p in pending {
        if p.truncated {
            issues[ValueIssue::KeyTruncated.index()] += 1;
        }
        let origin = p.origin;
        let idx = match columns.by_name.get(&p.name) {
            Some(&i) if columns.cols[i].origin == origin => i,
            Some(_) => {
                issues[ValueIssue::KeyCollision.index()] += 1;
                continue;
            }
            None if columns.cols.len() >= MAX_COLUMNS => {
                issues[ValueIssue::NewKeyLimit.index()] += 1;
                continue;
            }
            None => {
                columns.cols.push(Column {
                    name: p.name.clone(),
                    origin,
                    kind: None,
                });
                columns
                    .by_name
                    .insert(p.name.clone(), columns.cols.len() - 1);
                columns.cols.len() - 1
            }
        };
        // The same key twice in one line: the first stays.
        if seen[idx / 64] & (1 << (idx % 64)) != 0 {
            issues[ValueIssue::KeyCollision.index()] += 1;
            continue;
        }
        seen[idx / 64] |= 1 << (idx % 64);
        let col = &mut columns.cols[idx];
        let value = match (col.kind, kind_of(&p.value), p.value) {
            (_, None, v) => v,
            (None, Some(k), v) => {
                col.kind = Some(k);
                v
            }
            (Some(Kind::Float), Some(Kind::Int), Value::U64(u)) => Value::F64(u as f64),
            (Some(Kind::Float), Some(Kind::Int), Value::I64(i)) => Value::F64(i as f64),
            (Some(want), Some(got), v) if want == got => v,
            _ => {
                issues[ValueIssue::TypeConflict.index()] += 1;
                continue;
            }
        };
        fields.push((FieldName::Owned(p.name), value));
    }
    Ok(Accepted { fields, issues })
}

fn flatten(
    prefix: &str,
    members: Members<'_>,
    parent: &DefaultHasher,
    out: &mut Vec<Pending>,
    issues: &mut [u32; ValueIssue::ALL.len()],
) -> Result<(), Reject> {
    for (k, raw) in members.0 {
        if k.contains('\0') {
            return Err(Reject::Nul);
        }
        let (name, truncated) = key(prefix, &k);
        let path = extend(parent, &k);
        let text = raw.get();
        let value = match text.as_bytes().first() {
            Some(b'{') => {
                let inner: Members<'_> = serde_json::from_str(text).map_err(|_| Reject::Json)?;
                flatten(&format!("{name}_"), inner, &path, out, issues)?;
                continue;
            }
            Some(b'[') => {
                issues[ValueIssue::Array.index()] += 1;
                continue;
            }
            Some(b'"') => {
                // Decoding here (not at the raw scan) is what catches lone surrogates.
                let mut s: String = serde_json::from_str(text).map_err(|_| Reject::Json)?;
                if s.contains('\0') {
                    return Err(Reject::Nul);
                }
                if s.len() > MAX_STR {
                    let mut cut = MAX_STR;
                    while !s.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    s.truncate(cut);
                    issues[ValueIssue::StringTruncated.index()] += 1;
                }
                Value::Str(s)
            }
            Some(b't') => Value::Bool(true),
            Some(b'f') => Value::Bool(false),
            Some(b'n') => Value::Null,
            _ => match number(text) {
                Ok(v) => v,
                Err(None) => {
                    issues[ValueIssue::IntOutOfRange.index()] += 1;
                    continue;
                }
                Err(Some(r)) => return Err(r),
            },
        };
        if out.len() >= MAX_FIELDS {
            return Err(Reject::TooManyFields);
        }
        out.push(Pending {
            name,
            origin: path.finish(),
            truncated,
            value,
        });
    }
    Ok(())
}

/// A JSON number's text (already validated by serde_json) → its value, keeping its
/// kind: a fraction or exponent makes a float (finite only: `1e400` rejects the line);
/// otherwise an integer (`-0` is the integer 0), or `Err(None)` beyond i64/u64.
fn number(text: &str) -> Result<Value, Option<Reject>> {
    if text.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        return match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(Value::F64(f)),
            _ => Err(Some(Reject::Json)),
        };
    }
    if text.starts_with('-') {
        match text.parse::<i64>() {
            Ok(0) => Ok(Value::U64(0)),
            Ok(i) => Ok(Value::I64(i)),
            Err(_) => Err(None),
        }
    } else {
        text.parse::<u64>().map(Value::U64).map_err(|_| None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check1(line: &[u8]) -> Result<Accepted, Reject> {
        check(line, &mut Columns::new())
    }

    fn get<'a>(a: &'a Accepted, n: &str) -> Option<&'a Value> {
        a.fields.iter().find(|(k, _)| k == n).map(|(_, v)| v)
    }

    #[test]
    fn every_sample_line_of_the_lab_agent_is_accepted() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/qemu-10.0.2/tcg/guest-agent.sample.jsonl"
        ))
        .unwrap();
        let mut cols = Columns::new();
        let mut seqs = Vec::new();
        for line in text.lines() {
            let a = check(line.as_bytes(), &mut cols).unwrap();
            assert_eq!(a.issues, [0; ValueIssue::ALL.len()], "{line}");
            match get(&a, "guest_seq") {
                Some(Value::U64(s)) => seqs.push(*s),
                other => panic!("guest_seq {other:?}"),
            }
            assert!(matches!(get(&a, "guest_t_guest_ns"), Some(Value::U64(_))));
            assert!(matches!(get(&a, "guest_mono_ns"), Some(Value::U64(_))));
            assert!(matches!(get(&a, "guest_uptime_s"), Some(Value::F64(_))));
            assert!(matches!(get(&a, "guest_loadavg"), Some(Value::Str(_))));
            assert!(matches!(
                get(&a, "guest_meminfo_free_kb"),
                Some(Value::U64(_))
            ));
        }
        assert_eq!(seqs.len(), 35);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    }

    #[test]
    fn hostile_lines_are_rejected_with_a_reason() {
        assert_eq!(check1(b"{\"a\":1,\"b\":\"x\0\"}"), Err(Reject::Nul));
        assert_eq!(check1(b"{\"a\":\"\xff\xfe\"}"), Err(Reject::Utf8));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(check1(deep.as_bytes()), Err(Reject::Nesting));
        let deep_obj = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
        assert_eq!(check1(deep_obj.as_bytes()), Err(Reject::Nesting));
        assert_eq!(check1(b"[1,2]"), Err(Reject::NotObject));
        assert_eq!(check1(b"42"), Err(Reject::NotObject));
        assert_eq!(check1(b"{\"a\":"), Err(Reject::Json));
        assert_eq!(check1(b"{\"a\":1} trailing"), Err(Reject::Json));
        assert_eq!(check1(&vec![b' '; MAX_LINE + 1]), Err(Reject::TooLong));
        // Brackets inside strings do not count as nesting.
        assert!(check1(br#"{"s":"[[[[[[[[[[{{{{{{"}"#).is_ok());
    }

    #[test]
    fn lines_of_2000_and_10000_keys_are_rejected_whole() {
        for n in [300, 2_000, 10_000] {
            let many: Vec<String> = (0..n).map(|i| format!("\"k{i}\":{i}")).collect();
            let line = format!("{{{}}}", many.join(","));
            let want = if line.len() > MAX_LINE {
                Reject::TooLong
            } else {
                Reject::TooManyFields
            };
            let mut cols = Columns::new();
            assert_eq!(check(line.as_bytes(), &mut cols), Err(want), "{n} keys");
            assert!(cols.is_empty(), "a rejected line claimed columns");
        }
        // 2 000 one-letter-ish keys fit in 64 KiB: the field cap decides.
        let many: Vec<String> = (0..2_000).map(|i| format!("\"{i}\":0")).collect();
        let line = format!("{{{}}}", many.join(","));
        assert!(line.len() <= MAX_LINE);
        assert_eq!(check1(line.as_bytes()), Err(Reject::TooManyFields));
    }

    #[test]
    fn escaped_nul_in_a_value_or_key_rejects_the_line_as_nul() {
        assert_eq!(check1(br#"{"a":"x\u0000y"}"#), Err(Reject::Nul));
        assert_eq!(check1(br#"{"a\u0000b":1}"#), Err(Reject::Nul));
        assert_eq!(check1(br#"{"n":{"a":"\u0000"}}"#), Err(Reject::Nul));
    }

    #[test]
    fn float_overflow_lone_surrogates_and_a_bom_reject_the_line() {
        assert_eq!(check1(br#"{"x":1e400}"#), Err(Reject::Json));
        assert_eq!(check1(br#"{"x":-1e400}"#), Err(Reject::Json));
        assert_eq!(check1(br#"{"s":"\ud800"}"#), Err(Reject::Json));
        assert_eq!(check1(br#"{"s":"\udc00x"}"#), Err(Reject::Json));
        assert_eq!(check1(b"\xef\xbb\xbf{\"a\":1}"), Err(Reject::Json));
        // A valid surrogate pair is fine.
        let a = check1(br#"{"s":"\ud83d\ude00"}"#).unwrap();
        assert_eq!(get(&a, "guest_s"), Some(&Value::Str("😀".into())));
    }

    #[test]
    fn host_field_names_from_the_guest_are_stored_as_guest_fields() {
        let a = check1(
            br#"{"t_mono_ns":1,"t_wall_ns":2,"source":"evil","seq":3,"available_in_deployment":false,"t_sample_mono_ns":4,"tid":5}"#,
        )
        .unwrap();
        let names: Vec<&str> = a.fields.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(
            names,
            [
                "guest_t_mono_ns",
                "guest_t_wall_ns",
                "guest_source",
                "guest_seq",
                "guest_available_in_deployment",
                "guest_t_sample_mono_ns",
                "guest_tid"
            ]
        );
    }

    #[test]
    fn keys_that_differ_never_share_a_column_collisions_are_counted() {
        let mut cols = Columns::new();
        // In one line: `a.b` owns guest_a_b, the other three spellings are dropped.
        let a = check(br#"{"a.b":1,"a-b":2,"A_B":3,"a":{"b":4},"c":5}"#, &mut cols).unwrap();
        assert_eq!(
            a.fields,
            vec![
                ("guest_a_b".into(), Value::U64(1)),
                ("guest_c".into(), Value::U64(5))
            ]
        );
        assert_eq!(a.issue(ValueIssue::KeyCollision), 3);
        // Across lines too: the owner is kept, a later spelling is dropped.
        let a = check(br#"{"a-b":7,"a.b":8}"#, &mut cols).unwrap();
        assert_eq!(a.fields, vec![("guest_a_b".into(), Value::U64(8))]);
        assert_eq!(a.issue(ValueIssue::KeyCollision), 1);
        // The same key twice in a line: the first value stays.
        let a = check(br#"{"c":1,"c":2}"#, &mut cols).unwrap();
        assert_eq!(a.fields, vec![("guest_c".into(), Value::U64(1))]);
        assert_eq!(a.issue(ValueIssue::KeyCollision), 1);
    }

    #[test]
    fn long_keys_are_truncated_counted_and_do_not_collide_silently() {
        let mut cols = Columns::new();
        let k1 = format!("{}1", "k".repeat(500));
        let k2 = format!("{}2", "k".repeat(500));
        let a = check(format!("{{\"{k1}\":1,\"{k2}\":2}}").as_bytes(), &mut cols).unwrap();
        assert_eq!(a.fields.len(), 1);
        assert_eq!(a.fields[0].0.len(), MAX_KEY);
        assert_eq!(a.fields[0].1, Value::U64(1));
        assert_eq!(a.issue(ValueIssue::KeyTruncated), 2);
        assert_eq!(a.issue(ValueIssue::KeyCollision), 1);
    }

    #[test]
    fn numbers_keep_their_kind_minus_zero_is_integer_big_integers_are_dropped() {
        let mut cols = Columns::new();
        let a = check(
            br#"{"z":-0,"f":-0.0,"e":1e2,"u":18446744073709551615,"i":-9223372036854775808,"big":18446744073709551616,"nbig":-9223372036854775809}"#,
            &mut cols,
        )
        .unwrap();
        assert_eq!(
            a.fields,
            vec![
                ("guest_z".into(), Value::U64(0)),
                ("guest_f".into(), Value::F64(-0.0)),
                ("guest_e".into(), Value::F64(100.0)),
                ("guest_u".into(), Value::U64(u64::MAX)),
                ("guest_i".into(), Value::I64(i64::MIN)),
            ]
        );
        assert_eq!(a.issue(ValueIssue::IntOutOfRange), 2);
    }

    #[test]
    fn a_float_column_stays_float_and_an_int_column_refuses_floats() {
        let mut cols = Columns::new();
        check(
            br#"{"load1":0.08,"n":3,"s":"x","b":true,"nul":null}"#,
            &mut cols,
        )
        .unwrap();
        let a = check(br#"{"load1":0,"n":2.5,"s":1,"b":"no","nul":4}"#, &mut cols).unwrap();
        assert_eq!(
            a.fields,
            vec![
                ("guest_load1".into(), Value::F64(0.0)),
                ("guest_nul".into(), Value::U64(4)),
            ]
        );
        assert_eq!(a.issue(ValueIssue::TypeConflict), 3);
        // Nulls fit every column.
        let a = check(br#"{"load1":null,"n":null}"#, &mut cols).unwrap();
        assert_eq!(a.fields.len(), 2);
        let kinds: Vec<_> = cols.kinds().collect();
        assert_eq!(kinds[0], ("guest_load1", Some(Kind::Float)));
        assert_eq!(kinds[4], ("guest_nul", Some(Kind::Int)));
        // The row writer writes the float 0 with its fraction.
        let mut out = Vec::new();
        let mut row = crate::row::Row::new(
            crate::clock::Stamp {
                t_mono_ns: 0,
                t_wall_ns: 0,
            },
            "agent",
            true,
        );
        row.push("guest_load1", Value::F64(0.0));
        row.write_json_line(&mut out);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("\"guest_load1\":0.0"));
    }

    #[test]
    fn distinct_keys_are_bounded_per_episode_new_ones_counted() {
        let mut cols = Columns::new();
        let mut dropped = 0;
        let mut kept = 0;
        for line in 0..20 {
            let keys: Vec<String> = (0..40).map(|i| format!("\"r{line}_{i}\":{i}")).collect();
            let a = check(format!("{{{}}}", keys.join(",")).as_bytes(), &mut cols).unwrap();
            dropped += a.issue(ValueIssue::NewKeyLimit);
            kept += a.fields.len();
        }
        assert_eq!(cols.len(), MAX_COLUMNS);
        assert_eq!(kept, MAX_COLUMNS);
        assert_eq!(dropped as usize, 20 * 40 - MAX_COLUMNS);
        // Known columns still work after the bound.
        let a = check(br#"{"r0_0":5}"#, &mut cols).unwrap();
        assert_eq!(a.fields, vec![("guest_r0_0".into(), Value::U64(5))]);
    }

    #[test]
    fn keys_are_sanitized_nested_objects_flattened_arrays_dropped() {
        let a = check1(br#"{"Net":{"eth0":{"rx-bytes":5}},"x\"y":true,"arr":[1],"f":-1.5,"i":-3}"#)
            .unwrap();
        assert_eq!(
            a.fields,
            vec![
                ("guest_net_eth0_rx_bytes".into(), Value::U64(5)),
                ("guest_x_y".into(), Value::Bool(true)),
                ("guest_f".into(), Value::F64(-1.5)),
                ("guest_i".into(), Value::I64(-3)),
            ]
        );
        assert_eq!(a.issue(ValueIssue::Array), 1);
        let long_str = format!("{{\"s\":\"{}\"}}", "é".repeat(600));
        let a = check1(long_str.as_bytes()).unwrap();
        assert_eq!(a.issue(ValueIssue::StringTruncated), 1);
        assert!(matches!(&a.fields[0].1, Value::Str(s) if s.len() <= MAX_STR));
    }
}

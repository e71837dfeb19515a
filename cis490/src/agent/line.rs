//! Pure validation of one line from the guest agent. The guest may run malware, so a
//! line is hostile until proven a small flat JSON object.
//!
//! Accepted: UTF-8 without NUL, a JSON object at most [`MAX_DEPTH`] levels deep (checked
//! by a byte scan before any parsing, so 10 000 nested brackets cost one pass and no
//! recursion), at most [`MAX_FIELDS`] scalar fields. Nested objects are flattened with
//! `_`; arrays are dropped (counted). Keys become `guest_<key>` restricted to
//! `[a-z0-9_]` and [`MAX_KEY`] bytes, so a guest can never break the row's own columns.

use crate::row::{FieldName, Value};

pub const MAX_LINE: usize = 64 * 1024;
pub const MAX_DEPTH: usize = 4;
pub const MAX_FIELDS: usize = 256;
pub const MAX_KEY: usize = 64;
pub const MAX_STR: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    TooLong,
    Nul,
    Utf8,
    Nesting,
    Json,
    NotObject,
    TooManyFields,
    /// Dropped by the flood limiter before parsing.
    RateLimited,
    /// An unterminated line when the connection ended.
    Partial,
}

impl Reject {
    pub const ALL: [Reject; 9] = [
        Reject::TooLong,
        Reject::Nul,
        Reject::Utf8,
        Reject::Nesting,
        Reject::Json,
        Reject::NotObject,
        Reject::TooManyFields,
        Reject::RateLimited,
        Reject::Partial,
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
            Reject::Partial => "partial_line",
        }
    }

    pub fn index(self) -> usize {
        self as usize
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

fn key(prefix: &str, k: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + k.len() + 1);
    s.push_str(prefix);
    for c in k.chars() {
        if s.len() >= MAX_KEY {
            break;
        }
        s.push(if c.is_ascii_alphanumeric() {
            c.to_ascii_lowercase()
        } else {
            '_'
        });
    }
    s
}

/// Flat fields of one accepted line, plus the count of values dropped (arrays).
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub fields: Vec<(FieldName, Value)>,
    pub dropped_values: u32,
}

/// Validate one line (without its newline).
pub fn check(line: &[u8]) -> Result<Accepted, Reject> {
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
    let v: serde_json::Value = serde_json::from_str(text.trim()).map_err(|_| Reject::Json)?;
    let serde_json::Value::Object(obj) = v else {
        return Err(Reject::NotObject);
    };
    let mut out = Accepted {
        fields: Vec::with_capacity(obj.len()),
        dropped_values: 0,
    };
    flatten("guest_", obj, &mut out)?;
    Ok(out)
}

fn flatten(
    prefix: &str,
    obj: serde_json::Map<String, serde_json::Value>,
    out: &mut Accepted,
) -> Result<(), Reject> {
    use serde_json::Value as J;
    for (k, v) in obj {
        let name = key(prefix, &k);
        let value = match v {
            J::Null => Value::Null,
            J::Bool(b) => Value::Bool(b),
            J::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => Value::U64(u),
                (_, Some(i), _) => Value::I64(i),
                (_, _, Some(f)) => Value::F64(f),
                _ => Value::Null,
            },
            J::String(mut s) => {
                if s.len() > MAX_STR {
                    let mut cut = MAX_STR;
                    while !s.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    s.truncate(cut);
                }
                Value::Str(s)
            }
            J::Array(_) => {
                out.dropped_values += 1;
                continue;
            }
            J::Object(inner) => {
                flatten(&format!("{name}_"), inner, out)?;
                continue;
            }
        };
        if out.fields.len() >= MAX_FIELDS {
            return Err(Reject::TooManyFields);
        }
        // A later duplicate (from flattening) replaces the earlier value: one column, one value.
        if let Some(slot) = out.fields.iter_mut().find(|(n, _)| n == &name) {
            slot.1 = value;
        } else {
            out.fields.push((name.into(), value));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_line_of_the_lab_agent_is_accepted() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/qemu-10.0.2/tcg/guest-agent.sample.jsonl"
        ))
        .unwrap();
        let mut seqs = Vec::new();
        for line in text.lines() {
            let a = check(line.as_bytes()).unwrap();
            let get = |n: &str| {
                a.fields
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
            };
            match get("guest_seq") {
                Some(Value::U64(s)) => seqs.push(s),
                other => panic!("guest_seq {other:?}"),
            }
            assert!(matches!(get("guest_t_guest_ns"), Some(Value::U64(_))));
            assert!(matches!(get("guest_mono_ns"), Some(Value::U64(_))));
            assert!(matches!(get("guest_uptime_s"), Some(Value::F64(_))));
            assert!(matches!(get("guest_loadavg"), Some(Value::Str(_))));
            assert!(matches!(get("guest_meminfo_free_kb"), Some(Value::U64(_))));
        }
        assert_eq!(seqs.len(), 35);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    }

    #[test]
    fn hostile_lines_are_rejected_with_a_reason() {
        assert_eq!(check(b"{\"a\":1,\"b\":\"x\0\"}"), Err(Reject::Nul));
        assert_eq!(check(b"{\"a\":\"\xff\xfe\"}"), Err(Reject::Utf8));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(check(deep.as_bytes()), Err(Reject::Nesting));
        let deep_obj = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
        assert_eq!(check(deep_obj.as_bytes()), Err(Reject::Nesting));
        assert_eq!(check(b"[1,2]"), Err(Reject::NotObject));
        assert_eq!(check(b"42"), Err(Reject::NotObject));
        assert_eq!(check(b"{\"a\":"), Err(Reject::Json));
        assert_eq!(check(&vec![b' '; MAX_LINE + 1]), Err(Reject::TooLong));
        let many: Vec<String> = (0..300).map(|i| format!("\"k{i}\":{i}")).collect();
        assert_eq!(
            check(format!("{{{}}}", many.join(",")).as_bytes()),
            Err(Reject::TooManyFields)
        );
        // Brackets inside strings do not count as nesting.
        assert!(check(br#"{"s":"[[[[[[[[[[{{{{{{"}"#).is_ok());
    }

    #[test]
    fn keys_are_sanitized_nested_objects_flattened_arrays_dropped() {
        let a = check(br#"{"Net":{"eth0":{"rx-bytes":5}},"x\"y":true,"arr":[1],"f":-1.5,"i":-3}"#)
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
        assert_eq!(a.dropped_values, 1);
        let long_key = format!("{{\"{}\":1}}", "k".repeat(500));
        let a = check(long_key.as_bytes()).unwrap();
        assert_eq!(a.fields[0].0.len(), MAX_KEY);
    }
}

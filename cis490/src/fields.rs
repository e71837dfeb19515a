//! A parsed row's fields as `validate` and the export read them.
//!
//! Every line of an episode is parsed (twice in an export: once by its validation, once by
//! its writer), so the map a row lands in is on the hot path. serde_json's `Map` hashes
//! its keys with SipHash; a row's keys are short, and SipHash was the largest single cost
//! of `validate` (BENCHMARKS.md section 9). [`RowMap`] keeps the order and API of
//! serde_json's map with foldhash, seeded per process: the keys come from a hostile guest
//! (the agent's `guest_*` columns), so the seed must not be guessable.

use serde_json::{Map, Value};

/// One row's fields, in the order of the line.
pub type RowMap = indexmap::IndexMap<String, Value, foldhash::fast::RandomState>;

/// Read access to a row's fields, whichever map holds them.
pub trait Fields {
    fn field(&self, name: &str) -> Option<&Value>;
    fn fields(&self) -> impl Iterator<Item = (&str, &Value)>;
}

impl Fields for Map<String, Value> {
    fn field(&self, name: &str) -> Option<&Value> {
        self.get(name)
    }
    fn fields(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl Fields for RowMap {
    fn field(&self, name: &str) -> Option<&Value> {
        self.get(name)
    }
    fn fields(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// One JSON object parsed into a [`RowMap`], with the keys it repeats (serde_json keeps
/// one value of `{"a":1,"a":2}` silently; a row that says two things must be noticed).
pub struct ParsedObject {
    pub map: RowMap,
    pub duplicates: Vec<String>,
}

impl<'de> serde::Deserialize<'de> for ParsedObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ParsedObject;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<ParsedObject, A::Error> {
                // Most rows have 10 to 30 fields: no rehash on the way.
                let mut map = RowMap::with_capacity_and_hasher(32, Default::default());
                let mut duplicates = Vec::new();
                while let Some(key) = a.next_key::<String>()? {
                    let value: Value = a.next_value()?;
                    match map.entry(key) {
                        indexmap::map::Entry::Vacant(e) => {
                            e.insert(value);
                        }
                        indexmap::map::Entry::Occupied(e) => {
                            if !duplicates.contains(e.key()) {
                                duplicates.push(e.key().clone());
                            }
                        }
                    }
                }
                Ok(ParsedObject { map, duplicates })
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// Parse one line that must be a JSON object.
pub fn parse_object(line: &[u8]) -> Result<ParsedObject, serde_json::Error> {
    serde_json::from_slice(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_values_and_repeated_keys() {
        let p = parse_object(br#"{"b":1,"a":"x","b":2,"c":null,"a":3}"#).unwrap();
        let keys: Vec<&str> = p.map.keys().map(String::as_str).collect();
        assert_eq!(keys, ["b", "a", "c"]);
        assert_eq!(
            p.map.field("b"),
            Some(&Value::from(1)),
            "the first value is kept"
        );
        assert_eq!(p.duplicates, ["b", "a"]);
        assert!(parse_object(b"[1,2]").is_err());
        assert!(parse_object(b"{\"a\":").is_err());
        let m: Map<String, Value> = serde_json::from_str(r#"{"x":1}"#).unwrap();
        assert_eq!(m.fields().next(), Some(("x", &Value::from(1))));
    }
}

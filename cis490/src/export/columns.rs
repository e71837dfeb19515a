//! Typed Arrow columns filled from JSON values, and back: one [`ColumnType`] of the
//! contract is one Arrow type (docs/datasets.md has the table).

use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int64Builder, StringBuilder, StringDictionaryBuilder,
    UInt64Builder,
};
use arrow_array::types::Int32Type;
use arrow_array::{
    Array, ArrayRef, BooleanArray, DictionaryArray, Float64Array, Int64Array, StringArray,
    UInt64Array,
};
use arrow_schema::DataType;
use serde_json::Value;

use crate::contract::ColumnType;

/// The Arrow type of a contract type. `Json` values are kept as their JSON text.
pub fn arrow_type(ty: ColumnType) -> DataType {
    match ty {
        ColumnType::Int64 => DataType::Int64,
        ColumnType::UInt64 => DataType::UInt64,
        ColumnType::Float64 => DataType::Float64,
        ColumnType::Bool => DataType::Boolean,
        ColumnType::Utf8 | ColumnType::Json => DataType::Utf8,
        ColumnType::Dict => {
            DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
        }
    }
}

/// The contract type a JSON value has on its own (for open-ended column families).
pub fn value_type(v: &Value) -> Option<ColumnType> {
    match v {
        Value::Null => None,
        Value::Bool(_) => Some(ColumnType::Bool),
        Value::Number(n) if n.is_u64() => Some(ColumnType::UInt64),
        Value::Number(n) if n.is_i64() => Some(ColumnType::Int64),
        Value::Number(_) => Some(ColumnType::Float64),
        Value::String(_) => Some(ColumnType::Utf8),
        Value::Array(_) | Value::Object(_) => Some(ColumnType::Json),
    }
}

/// The one type two types of one column widen to: integers of both signs to Int64,
/// integers and floats to Float64, text kinds to Utf8; anything else to JSON text.
pub fn widen(a: ColumnType, b: ColumnType) -> ColumnType {
    use ColumnType::{Dict, Float64, Int64, Json, UInt64, Utf8};
    match (a, b) {
        _ if a == b => a,
        (UInt64, Int64) | (Int64, UInt64) => Int64,
        (UInt64 | Int64 | Float64, UInt64 | Int64 | Float64) => Float64,
        (Utf8 | Dict, Utf8 | Dict) => Utf8,
        _ => Json,
    }
}

/// One column being built.
pub enum Builder {
    U64(UInt64Builder),
    I64(Int64Builder),
    F64(Float64Builder),
    Bool(BooleanBuilder),
    Str(StringBuilder),
    /// Any JSON value, as its compact text.
    Json(StringBuilder),
    Dict(StringDictionaryBuilder<Int32Type>),
}

impl Builder {
    pub fn new(ty: ColumnType) -> Self {
        match ty {
            ColumnType::UInt64 => Builder::U64(UInt64Builder::new()),
            ColumnType::Int64 => Builder::I64(Int64Builder::new()),
            ColumnType::Float64 => Builder::F64(Float64Builder::new()),
            ColumnType::Bool => Builder::Bool(BooleanBuilder::new()),
            ColumnType::Utf8 => Builder::Str(StringBuilder::new()),
            ColumnType::Json => Builder::Json(StringBuilder::new()),
            ColumnType::Dict => Builder::Dict(StringDictionaryBuilder::new()),
        }
    }

    pub fn append_null(&mut self) {
        match self {
            Builder::U64(b) => b.append_null(),
            Builder::I64(b) => b.append_null(),
            Builder::F64(b) => b.append_null(),
            Builder::Bool(b) => b.append_null(),
            Builder::Str(b) | Builder::Json(b) => b.append_null(),
            Builder::Dict(b) => b.append_null(),
        }
    }

    /// Append `v` (absent or null: a null). A value of another type is an error that
    /// names the type expected; nothing is appended then.
    pub fn append(&mut self, v: Option<&Value>) -> Result<(), &'static str> {
        let v = match v {
            None | Some(Value::Null) => {
                self.append_null();
                return Ok(());
            }
            Some(v) => v,
        };
        match self {
            Builder::U64(b) => b.append_value(v.as_u64().ok_or("uint64")?),
            Builder::I64(b) => b.append_value(v.as_i64().ok_or("int64")?),
            // Integers in a float column (a family widened int → float) are converted.
            Builder::F64(b) => b.append_value(v.as_f64().ok_or("float64")?),
            Builder::Bool(b) => b.append_value(v.as_bool().ok_or("bool")?),
            Builder::Str(b) => b.append_value(v.as_str().ok_or("string")?),
            Builder::Json(b) => b.append_value(v.to_string()),
            Builder::Dict(b) => {
                b.append(v.as_str().ok_or("string")?)
                    .map_err(|_| "string (dictionary full)")?;
            }
        }
        Ok(())
    }

    pub fn finish(&mut self) -> ArrayRef {
        match self {
            Builder::U64(b) => Arc::new(b.finish()),
            Builder::I64(b) => Arc::new(b.finish()),
            Builder::F64(b) => Arc::new(b.finish()),
            Builder::Bool(b) => Arc::new(b.finish()),
            Builder::Str(b) | Builder::Json(b) => Arc::new(b.finish()),
            Builder::Dict(b) => Arc::new(b.finish()),
        }
    }
}

/// Row `i` of `array` as the JSON value the episode holds for it (`Json` columns parsed
/// back from their text): the read-back check compares these with the JSONL.
pub fn json_at(array: &dyn Array, ty: ColumnType, i: usize) -> Value {
    if array.is_null(i) {
        return Value::Null;
    }
    let any = array.as_any();
    match ty {
        ColumnType::UInt64 => any
            .downcast_ref::<UInt64Array>()
            .map_or(Value::Null, |a| a.value(i).into()),
        ColumnType::Int64 => any
            .downcast_ref::<Int64Array>()
            .map_or(Value::Null, |a| a.value(i).into()),
        ColumnType::Float64 => any
            .downcast_ref::<Float64Array>()
            .map_or(Value::Null, |a| a.value(i).into()),
        ColumnType::Bool => any
            .downcast_ref::<BooleanArray>()
            .map_or(Value::Null, |a| a.value(i).into()),
        ColumnType::Utf8 => any
            .downcast_ref::<StringArray>()
            .map_or(Value::Null, |a| a.value(i).into()),
        ColumnType::Json => any
            .downcast_ref::<StringArray>()
            .and_then(|a| serde_json::from_str(a.value(i)).ok())
            .unwrap_or(Value::Null),
        ColumnType::Dict => any
            .downcast_ref::<DictionaryArray<Int32Type>>()
            .and_then(|d| {
                let keys = d.keys();
                let values = d.values().as_any().downcast_ref::<StringArray>()?;
                Some(Value::from(values.value(keys.value(i) as usize)))
            })
            .unwrap_or(Value::Null),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_round_trip_through_their_arrow_column() {
        let cases: &[(ColumnType, &[Value])] = &[
            (
                ColumnType::UInt64,
                &[json!(0), json!(u64::MAX), Value::Null],
            ),
            (
                ColumnType::Int64,
                &[json!(-5), json!(i64::MIN), Value::Null],
            ),
            (
                ColumnType::Float64,
                &[json!(0.5), json!(-1e300), Value::Null],
            ),
            (ColumnType::Bool, &[json!(true), json!(false), Value::Null]),
            (ColumnType::Utf8, &[json!("a\"b"), json!(""), Value::Null]),
            (
                ColumnType::Dict,
                &[json!("R"), json!("S"), json!("R"), Value::Null],
            ),
            (
                ColumnType::Json,
                &[json!({"a": [1, 2.5, null]}), json!([]), Value::Null],
            ),
        ];
        for (ty, values) in cases {
            let mut b = Builder::new(*ty);
            for v in *values {
                b.append(Some(v)).unwrap();
            }
            let a = b.finish();
            assert_eq!(a.data_type(), &arrow_type(*ty));
            for (i, v) in values.iter().enumerate() {
                assert_eq!(&json_at(a.as_ref(), *ty, i), v, "{ty:?} row {i}");
            }
        }
    }

    #[test]
    fn a_value_of_another_type_is_refused_and_nothing_appended() {
        let mut b = Builder::new(ColumnType::UInt64);
        assert_eq!(b.append(Some(&json!(-1))), Err("uint64"));
        assert_eq!(b.append(Some(&json!("1"))), Err("uint64"));
        assert_eq!(b.finish().len(), 0);
        let mut b = Builder::new(ColumnType::Dict);
        assert_eq!(b.append(Some(&json!(3))), Err("string"));
    }

    #[test]
    fn integers_widen_into_a_float_column() {
        let mut b = Builder::new(ColumnType::Float64);
        b.append(Some(&json!(3))).unwrap();
        let a = b.finish();
        assert_eq!(json_at(a.as_ref(), ColumnType::Float64, 0), json!(3.0));
        assert_eq!(
            widen(ColumnType::UInt64, ColumnType::Float64),
            ColumnType::Float64
        );
        assert_eq!(
            widen(ColumnType::UInt64, ColumnType::Int64),
            ColumnType::Int64
        );
        assert_eq!(widen(ColumnType::Dict, ColumnType::Utf8), ColumnType::Utf8);
        assert_eq!(
            widen(ColumnType::Bool, ColumnType::UInt64),
            ColumnType::Json
        );
    }
}

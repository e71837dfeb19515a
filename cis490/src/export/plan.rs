//! Which columns a stream's Parquet file has, in which order and of which type.
//!
//! Telemetry: every declared column of the stream (also those no row of this episode
//! carries: the schema of one stream is the same in every episode), then the column
//! families' columns this file holds (sorted by name; typed by the family's rule, with
//! integers widened to float where both occur), then the derived `phase`, `dt_ns` and
//! one `d_<name>` per cumulative column. Events: the clock columns, `event`, and the
//! union of every event kind's fields (one name, one type: types that differ between
//! kinds widen). Labels: its declared columns.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::columns::{arrow_type, value_type, widen};
use crate::contract::{events::EVENTS, ColumnType, Stream, StreamKind, TypeRule};

/// One column of the file as the episode holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub name: String,
    pub ty: ColumnType,
    pub nullable: bool,
    pub cumulative: bool,
}

/// The derived columns, beside the episode's own.
pub const PHASE: &str = "phase";
pub const DT: &str = "dt_ns";
pub const DELTA_PREFIX: &str = "d_";

#[derive(Debug, Clone)]
pub struct Plan {
    pub stream: &'static Stream,
    /// The episode's columns, in output order.
    pub columns: Vec<Planned>,
    /// Index into `columns` of each entity column (the series key).
    pub entity: Vec<usize>,
    /// Index into `columns` of each cumulative column (gets a `d_` column).
    pub deltas: Vec<usize>,
    /// Telemetry: the `phase`, `dt_ns` and `d_` columns.
    pub derived: bool,
    pub schema: SchemaRef,
}

/// What the first pass over a file found in the columns no declaration names.
#[derive(Debug, Default, Clone)]
pub struct FamilyScan {
    /// Family column name → the widened type of its values (None: only nulls seen).
    pub found: BTreeMap<String, Option<ColumnType>>,
}

impl FamilyScan {
    /// Note one row's keys that are not declared columns of `stream`.
    pub fn row(&mut self, stream: &Stream, row: &(impl crate::fields::Fields + ?Sized)) {
        for (k, v) in row.fields() {
            if stream.column(k).is_some() {
                continue;
            }
            let Some(family) = stream.family(k) else {
                continue; // not in the contract: validate reports it; the export drops it
            };
            let seen = value_type(v);
            let entry = self.found.entry(k.to_owned()).or_insert(None);
            *entry = match (family.rule, *entry, seen) {
                (TypeRule::Exact(t), _, _) => Some(t),
                (_, prev, None) => prev,
                (_, None, Some(t)) => Some(t),
                (_, Some(p), Some(t)) => Some(widen(p, t)),
            };
        }
    }
}

impl Plan {
    pub fn new(stream: &'static Stream, families: &FamilyScan) -> Plan {
        let mut columns: Vec<Planned> = match stream.kind {
            StreamKind::Events => event_columns(stream),
            _ => stream
                .columns
                .iter()
                .map(|c| Planned {
                    name: c.name.to_owned(),
                    ty: c.ty,
                    nullable: c.nullable || c.presence != crate::contract::Presence::Always,
                    cumulative: c.cumulative,
                })
                .collect(),
        };
        for (name, ty) in &families.found {
            columns.push(Planned {
                name: name.clone(),
                // A family column with only nulls in this episode: text, the widest.
                ty: ty.unwrap_or(ColumnType::Utf8),
                nullable: true,
                cumulative: false,
            });
        }
        let index: HashMap<&str, usize> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.as_str(), i))
            .collect();
        let entity = stream
            .entity
            .iter()
            .filter_map(|e| index.get(e).copied())
            .collect();
        // Telemetry only: events.jsonl has a field of that name already (the `phase`
        // event's new phase), and labels.jsonl is the phase timeline itself.
        let derived = stream.kind == StreamKind::Telemetry;
        let deltas: Vec<usize> = if derived {
            columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.cumulative)
                .map(|(i, _)| i)
                .collect()
        } else {
            Vec::new()
        };
        let mut fields: Vec<Field> = columns
            .iter()
            .map(|c| Field::new(&c.name, arrow_type(c.ty), c.nullable))
            .collect();
        if derived {
            fields.push(Field::new(PHASE, arrow_type(ColumnType::Dict), true));
            fields.push(Field::new(DT, DataType::UInt64, true));
            for &i in &deltas {
                fields.push(Field::new(
                    format!("{DELTA_PREFIX}{}", columns[i].name),
                    DataType::Int64,
                    true,
                ));
            }
        }
        Plan {
            stream,
            columns,
            entity,
            deltas,
            derived,
            schema: Arc::new(Schema::new(fields)),
        }
    }

    /// Whether `name` is a column the episode holds for this stream.
    pub fn has(&self, name: &str) -> bool {
        self.columns.iter().any(|c| c.name == name)
    }
}

/// events.jsonl's columns: the stream's own (clock, `event`), then every kind's fields.
fn event_columns(stream: &Stream) -> Vec<Planned> {
    let mut out: Vec<Planned> = stream
        .columns
        .iter()
        .map(|c| Planned {
            name: c.name.to_owned(),
            ty: c.ty,
            nullable: c.nullable,
            cumulative: false,
        })
        .collect();
    for kind in EVENTS {
        for f in kind.fields {
            match out.iter_mut().find(|c| c.name == f.name) {
                Some(c) => c.ty = widen(c.ty, f.ty),
                None => out.push(Planned {
                    name: f.name.to_owned(),
                    ty: f.ty,
                    nullable: true,
                    cumulative: false,
                }),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::stream;
    use serde_json::json;

    #[test]
    fn telemetry_gets_every_declared_column_then_phase_dt_and_deltas() {
        let s = stream("bpf-sched").unwrap();
        let p = Plan::new(s, &FamilyScan::default());
        let names: Vec<&str> = p
            .schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(
            &names[..s.columns.len()],
            s.columns.iter().map(|c| c.name).collect::<Vec<_>>()
        );
        assert!(names.contains(&"phase") && names.contains(&"dt_ns"));
        assert!(names.contains(&"d_on_cpu_ns") && names.contains(&"d_minflt"));
        // Levels get no difference.
        assert!(!names.contains(&"d_rss_kb") && !names.contains(&"d_last_cpu"));
        assert!(!names.contains(&"d_t_mono_ns") && !names.contains(&"d_seq"));
        assert_eq!(p.entity.len(), 1);
        assert_eq!(p.columns[p.entity[0]].name, "tid");
    }

    #[test]
    fn family_columns_are_typed_by_their_values_and_widened() {
        let s = stream("agent").unwrap();
        let mut scan = FamilyScan::default();
        for row in [
            json!({"guest_x": 1, "guest_y": "a", "guest_z": null}),
            json!({"guest_x": 2.5, "guest_y": "b", "guest_z": null}),
        ] {
            scan.row(s, row.as_object().unwrap());
        }
        let p = Plan::new(s, &scan);
        let ty = |n: &str| p.columns.iter().find(|c| c.name == n).unwrap().ty;
        assert_eq!(ty("guest_x"), ColumnType::Float64);
        assert_eq!(ty("guest_y"), ColumnType::Utf8);
        assert_eq!(ty("guest_z"), ColumnType::Utf8, "only nulls: text");
    }

    #[test]
    fn events_have_one_column_per_field_name_across_kinds() {
        let p = Plan::new(stream("events").unwrap(), &FamilyScan::default());
        let mut names: Vec<&str> = p.columns.iter().map(|c| c.name.as_str()).collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "a field name twice");
        assert!(p.has("event") && p.has("source") && p.has("end_reason"));
        assert!(p.deltas.is_empty());
    }
}

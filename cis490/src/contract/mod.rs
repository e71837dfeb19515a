//! The output contract as code: every stream cis490 writes, its columns and their types.
//!
//! One declaration per stream ([`streams`]): file name, deployment flag, and each column's
//! name, [`ColumnType`], nullability, unit and meaning; open-ended column families (the
//! agent's `guest_*`, QMP's `kvm_*` statistics, per-interface and per-disk columns) as
//! glob patterns with a [`TypeRule`]. The event kinds of events.jsonl and their fields are
//! declared the same way ([`events::EVENTS`]) and read typed as [`events::Event`] (serde,
//! tagged by `event`); end reasons ([`EndReason`]) and phases ([`Phase`]) are enums.
//!
//! Three users, so they cannot drift apart:
//! - `cis490 validate` checks every value of every row against its column
//!   ([`check::TypeCheck`], called once per line from validate.rs);
//! - docs/data-model.md's column tables are rendered from these declarations
//!   ([`docs::render`]; a unit test compares, `CIS490_BLESS=1` rewrites);
//! - the typed export (issue 13) maps [`ColumnType`] 1:1 onto Arrow types.
//!
//! A new column or stream is one line here; the writer then must produce exactly it.

#[cfg(test)]
mod cases;
pub mod check;
pub mod docs;
pub mod events;
pub mod meta;
mod streams;

use std::collections::HashMap;
use std::sync::OnceLock;

pub use crate::labels::Phase;
pub use check::{check_row, TypeCheck, Violation, ViolationKind};
pub use streams::STREAMS;

/// A column's value type. Each maps to exactly one Arrow type (see [`ColumnType::arrow`]),
/// and to exactly one JSON shape, which is what `validate` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// Signed 64-bit integer: a JSON number without fraction or exponent.
    Int64,
    /// Unsigned 64-bit integer (counters, ids, clock stamps): a non-negative JSON integer.
    UInt64,
    /// 64-bit float: a JSON number written with a decimal point or exponent (`0.0`, never
    /// `0`), so that a reader inferring types from the first rows sees a float.
    Float64,
    Bool,
    /// Free text.
    Utf8,
    /// Text from a small set of values (thread names, phases, sources, kinds): Arrow
    /// `Dictionary<Int32, Utf8>`.
    Dict,
    /// Any JSON value, nested allowed: only in events.jsonl (QMP event data, loader
    /// reports). Exported as its JSON text (Utf8).
    Json,
}

impl ColumnType {
    /// The Arrow data type this column is exported as.
    pub fn arrow(self) -> &'static str {
        match self {
            ColumnType::Int64 => "Int64",
            ColumnType::UInt64 => "UInt64",
            ColumnType::Float64 => "Float64",
            ColumnType::Bool => "Boolean",
            ColumnType::Utf8 => "Utf8",
            ColumnType::Dict => "Dictionary(Int32, Utf8)",
            ColumnType::Json => "Utf8 (JSON text)",
        }
    }

    /// The name used in docs and problem messages.
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Int64 => "int64",
            ColumnType::UInt64 => "uint64",
            ColumnType::Float64 => "float64",
            ColumnType::Bool => "bool",
            ColumnType::Utf8 => "string",
            ColumnType::Dict => "string (dictionary)",
            ColumnType::Json => "json",
        }
    }
}

/// Which rows of a stream carry a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Every row has it (its value may be null if the column is nullable).
    Always,
    /// Rows may omit it: streams whose rows are not uniform (the agent's lines carry what
    /// the guest sent). Absent reads as null.
    Optional,
    /// Only rows whose `kind` is one of these (QMP); `required` says whether every such
    /// row has it. Absent in the other rows; a reader sees null there.
    Kinds {
        kinds: &'static [&'static str],
        required: bool,
    },
}

/// One declared column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    pub ty: ColumnType,
    pub nullable: bool,
    /// Unit (`ns`, `bytes`, `count`, …), empty when none.
    pub unit: &'static str,
    pub description: &'static str,
    pub presence: Presence,
    /// The allowed values of a string column, when they are a closed set.
    pub values: Option<&'static [&'static str]>,
    /// A count since the thread, interface or device started (or since attach) that
    /// never decreases: the export adds its per-row difference `d_<name>` beside it.
    pub cumulative: bool,
}

impl Column {
    pub const fn new(
        name: &'static str,
        ty: ColumnType,
        unit: &'static str,
        description: &'static str,
    ) -> Self {
        Self {
            name,
            ty,
            nullable: false,
            unit,
            description,
            presence: Presence::Always,
            values: None,
            cumulative: false,
        }
    }
    pub const fn cumulative(mut self) -> Self {
        self.cumulative = true;
        self
    }
    pub const fn nullable(mut self) -> Self {
        self.nullable = true;
        self
    }
    pub const fn optional(mut self) -> Self {
        self.presence = Presence::Optional;
        self
    }
    pub const fn kinds(mut self, kinds: &'static [&'static str], required: bool) -> Self {
        self.presence = Presence::Kinds { kinds, required };
        self
    }
    pub const fn values(mut self, values: &'static [&'static str]) -> Self {
        self.values = Some(values);
        self
    }
}

/// The type of every column of an open-ended family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeRule {
    /// Every column of the family has this type.
    Exact(ColumnType),
    /// Each column has one of these types, the same in every row of a file (the first
    /// value fixes it). Integers and floats may mix in one column: the column is then
    /// Float64 (integers widened), the only widening allowed.
    OneOf(&'static [ColumnType]),
}

/// A family of columns whose names are only known at run time: `pattern` is a glob with
/// one `*` standing for a non-empty name part (`guest_net_*_rx_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    pub pattern: &'static str,
    pub rule: TypeRule,
    pub nullable: bool,
    pub unit: &'static str,
    pub description: &'static str,
    /// Which rows may carry columns of the family (never required).
    pub kinds: Option<&'static [&'static str]>,
}

impl Family {
    pub const fn new(
        pattern: &'static str,
        rule: TypeRule,
        unit: &'static str,
        description: &'static str,
    ) -> Self {
        Self {
            pattern,
            rule,
            nullable: true,
            unit,
            description,
            kinds: None,
        }
    }
    pub const fn kinds(mut self, kinds: &'static [&'static str]) -> Self {
        self.kinds = Some(kinds);
        self
    }

    /// Whether `name` is a column of this family.
    pub fn matches(&self, name: &str) -> bool {
        glob_match(self.pattern, name)
    }
}

/// `*` matches one or more characters; there is at most one `*`.
fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((pre, post)) => {
            name.len() > pre.len() + post.len() && name.starts_with(pre) && name.ends_with(post)
        }
    }
}

/// What kind of file a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// `telemetry-<source>.jsonl`: rows of a source, common header first.
    Telemetry,
    /// events.jsonl: one row per event, columns per event kind ([`events::EVENTS`]).
    Events,
    /// labels.jsonl.
    Labels,
}

/// One stream's declaration.
#[derive(Debug, Clone, Copy)]
pub struct Stream {
    /// The source name (`proc`), or `events` / `labels`.
    pub name: &'static str,
    /// The file name, uncompressed (`--compress zstd` appends `.zst` to telemetry files).
    pub file: &'static str,
    pub kind: StreamKind,
    /// The value of every row's `available_in_deployment` (telemetry only).
    pub available_in_deployment: Option<bool>,
    /// Which backend or option writes it.
    pub written_by: &'static str,
    /// What one row is.
    pub rows: &'static str,
    pub columns: &'static [Column],
    pub families: &'static [Family],
    /// The columns that say which series (thread, interface, QMP object) a row belongs
    /// to: a cumulative column's difference is taken to the previous row with the same
    /// values of these. Empty: one series (or none, for events and labels).
    pub entity: &'static [&'static str],
    /// Rows only for what changed in a tick (`kvm-keys`): a tick without rows is no
    /// gap, so `validate` does not ask for a `gap` event to cover a seq hole.
    pub sparse: bool,
}

impl Stream {
    /// The declared column `name` (hashed: validate asks this for every value).
    pub fn column(&self, name: &str) -> Option<&'static Column> {
        // foldhash: the column names are ours, and this runs once per value validated.
        type Index<V> = HashMap<&'static str, V, foldhash::fast::RandomState>;
        static INDEX: OnceLock<Index<Index<&'static Column>>> = OnceLock::new();
        let index = INDEX.get_or_init(|| {
            STREAMS
                .iter()
                .map(|s| (s.name, s.columns.iter().map(|c| (c.name, c)).collect()))
                .collect()
        });
        match index.get(self.name) {
            Some(columns) => columns.get(name).copied(),
            // A stream declared outside STREAMS (tests).
            None => self.columns.iter().find(|c| c.name == name),
        }
    }

    pub fn family(&self, name: &str) -> Option<&'static Family> {
        self.families.iter().find(|f| f.matches(name))
    }
}

/// Every stream cis490 writes.
pub fn streams() -> &'static [Stream] {
    STREAMS
}

/// The declaration of stream `name` (`proc`, `bpf-sched`, …, `events`, `labels`).
pub fn stream(name: &str) -> Option<&'static Stream> {
    STREAMS.iter().find(|s| s.name == name)
}

/// The declaration for a file of an episode directory (`telemetry-proc.jsonl.zst` too).
pub fn stream_for_file(file: &str) -> Option<&'static Stream> {
    let base = file.strip_suffix(".zst").unwrap_or(file);
    STREAMS.iter().find(|s| s.file == base)
}

/// Why a capture ended (`meta.result.end_reason`, `episode_end.end_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// `--duration` elapsed.
    Duration,
    /// The traced process exited.
    TargetExit,
    /// SIGINT or SIGTERM.
    Signal,
    /// A write or source failure ended the capture (`result.error` says which).
    Error,
    /// The capture was killed hard and the episode was closed afterwards from what was on
    /// disk.
    Recovered,
}

impl EndReason {
    pub const ALL: [EndReason; 5] = [
        EndReason::Duration,
        EndReason::TargetExit,
        EndReason::Signal,
        EndReason::Error,
        EndReason::Recovered,
    ];
    pub const NAMES: [&'static str; 5] =
        ["duration", "target_exit", "signal", "error", "recovered"];

    pub fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn parse(s: &str) -> Option<EndReason> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// The phase names (labels.jsonl `phase`/`prev`, the `phase` event), from [`Phase`].
pub const PHASE_NAMES: [&str; 5] = ["clean", "armed", "infecting", "infected_running", "dormant"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_names_are_the_phase_enum() {
        let names: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
        assert_eq!(names, PHASE_NAMES);
    }

    #[test]
    fn end_reasons_cover_the_sampler_and_serialize_as_named() {
        use crate::sampler::EndReason as S;
        for s in [S::Duration, S::TargetExit, S::Signal, S::Error] {
            assert!(EndReason::parse(s.as_str()).is_some(), "{}", s.as_str());
        }
        for r in EndReason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
            assert_eq!(EndReason::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn glob_needs_a_non_empty_middle() {
        assert!(glob_match(
            "guest_net_*_rx_bytes",
            "guest_net_eth0_rx_bytes"
        ));
        assert!(!glob_match("guest_net_*_rx_bytes", "guest_net__rx_bytes"));
        assert!(!glob_match("guest_net_*_rx_bytes", "guest_net_rx_bytes"));
        assert!(glob_match("guest_*", "guest_x"));
        assert!(!glob_match("guest_*", "guest_"));
        assert!(glob_match("exact", "exact"));
    }

    #[test]
    fn every_file_has_one_stream_and_names_are_unique() {
        let mut names = std::collections::HashSet::new();
        for s in streams() {
            assert!(names.insert(s.name), "{} declared twice", s.name);
            assert_eq!(stream_for_file(s.file).unwrap().name, s.name);
            let mut cols = std::collections::HashSet::new();
            for c in s.columns {
                assert!(cols.insert(c.name), "{}.{} declared twice", s.name, c.name);
            }
        }
        assert_eq!(
            stream_for_file("telemetry-proc.jsonl.zst").unwrap().name,
            "proc"
        );
    }
}

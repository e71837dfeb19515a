//! docs/data-model.md's column tables, rendered from the declarations.
//!
//! The section between [`BEGIN`] and [`END`] in docs/data-model.md is exactly
//! [`render`]'s output; a unit test compares them, and with `CIS490_BLESS=1` rewrites the
//! section instead, so the page cannot drift from the code.

use std::fmt::Write as _;

use super::{events, ColumnType, Presence, Stream, StreamKind, TypeRule, STREAMS};

pub const BEGIN: &str = "<!-- BEGIN contract tables: generated from cis490/src/contract; CIS490_BLESS=1 cargo test -p cis490 --lib contract::docs rewrites it -->";
pub const END: &str = "<!-- END contract tables -->";

/// Table cells cannot hold a raw `|`.
fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

fn rows_of(p: Presence) -> String {
    match p {
        Presence::Always => "every".into(),
        Presence::Optional => "may be absent".into(),
        Presence::Kinds { kinds, required } => format!(
            "kind {}{}",
            kinds.join("/"),
            if required { "" } else { ", when known" }
        ),
    }
}

fn type_of(ty: ColumnType, values: Option<&[&str]>) -> String {
    match values {
        Some(v) if v.len() <= 6 => format!("{}: {}", ty.name(), v.join(", ")),
        _ => ty.name().to_owned(),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn stream_section(s: &Stream, out: &mut String) {
    let _ = writeln!(out, "### `{}`: {}\n", s.name, s.file);
    let _ = write!(out, "Written by: {}. Rows: {}.", s.written_by, s.rows);
    if !s.entity.is_empty() {
        let _ = write!(
            out,
            " One series per `{}` (the export takes a cumulative column's differences within one).",
            s.entity.join("`, `")
        );
    }
    if let Some(a) = s.available_in_deployment {
        let _ = write!(out, " `available_in_deployment`: {a}.");
    }
    out.push_str(
        "\n\n| column | type | nullable | rows | unit | meaning |\n|---|---|---|---|---|---|\n",
    );
    for c in s.columns {
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} | {} |",
            c.name,
            cell(&type_of(c.ty, c.values)),
            yes_no(c.nullable),
            rows_of(c.presence),
            cell(&if c.cumulative {
                format!("{}, cumulative", c.unit)
            } else {
                c.unit.to_owned()
            }),
            cell(c.description)
        );
    }
    if !s.families.is_empty() {
        out.push_str(
            "\nColumn families (names known only at run time; first matching pattern wins, declared columns first):\n\n| pattern | type | nullable | rows | unit | meaning |\n|---|---|---|---|---|---|\n",
        );
        for f in s.families {
            let ty = match f.rule {
                TypeRule::Exact(t) => t.name().to_owned(),
                TypeRule::OneOf(ts) => ts.iter().map(|t| t.name()).collect::<Vec<_>>().join(" or "),
            };
            let rows = match f.kinds {
                Some(k) => format!("kind {}", k.join("/")),
                None => "may be absent".into(),
            };
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} | {} | {} |",
                f.pattern,
                ty,
                yes_no(f.nullable),
                rows,
                cell(f.unit),
                cell(f.description)
            );
        }
    }
    out.push('\n');
}

/// The generated section, without the markers.
pub fn render() -> String {
    let mut out = String::new();
    out.push_str(
        "Every value of every row has its column's type; `cis490 validate` checks each one \
(a null in a non-nullable column, an integer in a float column, a float in an integer \
column, a column no declaration or pattern covers: one problem line each). A float is \
always written with a decimal point or exponent (`0.0`), an integer never is. Absent \
columns (rows of another `kind`, agent fields a line did not carry) read as null. A \
column that is null in every row of a file (`vcpu` without QMP, `wakeups` where the \
kernel does not count them) carries no type in JSON: a reader that infers types types \
it as null; give it these types as its schema.\n\n\
| type | JSON | Arrow (typed export) |\n|---|---|---|\n",
    );
    for t in [
        ColumnType::Int64,
        ColumnType::UInt64,
        ColumnType::Float64,
        ColumnType::Bool,
        ColumnType::Utf8,
        ColumnType::Dict,
        ColumnType::Json,
    ] {
        let json = match t {
            ColumnType::Int64 => "integer",
            ColumnType::UInt64 => "integer ≥ 0",
            ColumnType::Float64 => "number with `.` or exponent",
            ColumnType::Bool => "true/false",
            ColumnType::Utf8 | ColumnType::Dict => "string",
            ColumnType::Json => "any (events only)",
        };
        let _ = writeln!(out, "| {} | {json} | {} |", t.name(), t.arrow());
    }
    out.push_str(
        "\nA family typed \"a or b\" keeps one type per column within a file; integers and \
floats mixed in one column are float64 (integers widened), the only widening.\n\n",
    );
    for s in STREAMS.iter().filter(|s| s.kind != StreamKind::Events) {
        stream_section(s, &mut out);
    }
    let events = STREAMS
        .iter()
        .find(|s| s.kind == StreamKind::Events)
        .expect("events declared");
    stream_section(events, &mut out);
    out.push_str(
        "Fields per event kind (required: in every event of the kind; a field no kind declares is a problem):\n\n\
| event | field | type | nullable | required | meaning |\n|---|---|---|---|---|---|\n",
    );
    for k in events::EVENTS {
        if k.fields.is_empty() {
            let _ = writeln!(out, "| `{}` | | | | | {} |", k.name, cell(k.when));
        }
        for (i, f) in k.fields.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | `{}` | {} | {} | {} | {} |",
                if i == 0 {
                    format!("`{}` ({})", k.name, cell(k.when))
                } else {
                    String::new()
                },
                f.name,
                cell(&type_of(f.ty, f.values)),
                yes_no(f.nullable),
                yes_no(f.presence == Presence::Always),
                cell(f.description)
            );
        }
    }
    out.push_str(&format!(
        "\nEnd reasons (`meta.result.end_reason`, `episode_end.end_reason`): {}. Phases: {}.\n",
        super::EndReason::NAMES
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", "),
        super::PHASE_NAMES
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    out
}

/// `doc` with its generated section replaced by `section`; None without both markers.
pub fn splice(doc: &str, section: &str) -> Option<String> {
    let b = doc.find(BEGIN)?;
    let e = doc[b..].find(END)? + b;
    Some(format!(
        "{}{BEGIN}\n\n{section}\n{END}{}",
        &doc[..b],
        &doc[e + END.len()..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_model_md_tables_are_the_contract() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/data-model.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let want = splice(&doc, &render()).expect("docs/data-model.md lacks the contract markers");
        if std::env::var_os("CIS490_BLESS").is_some() {
            std::fs::write(path, &want).unwrap();
            return;
        }
        assert!(
            doc == want,
            "docs/data-model.md's column tables differ from cis490/src/contract: run \
             CIS490_BLESS=1 cargo test -p cis490 --lib contract::docs"
        );
    }

    #[test]
    fn splice_keeps_what_is_around_the_markers() {
        let doc = format!("a\n{BEGIN}\nold\n{END}\nb\n");
        assert_eq!(
            splice(&doc, "new\n").unwrap(),
            format!("a\n{BEGIN}\n\nnew\n\n{END}\nb\n")
        );
        assert!(splice("no markers", "x").is_none());
    }
}

//! Seq holes in a telemetry file, each of which must be covered by a gap declared in
//! events.jsonl.

use super::*;

/// Whether the ranges cover every seq of `from..=to`; returns the first uncovered seq.
fn first_uncovered(from: u64, to: u64, ranges: &[(u64, u64)]) -> Option<u64> {
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let mut next = from;
    for (a, b) in sorted {
        if a > next {
            break;
        }
        if b >= next {
            if b >= to {
                return None;
            }
            next = b + 1;
        }
    }
    Some(next)
}

/// Every hole in a stream's seq must be declared by `gap` events for that source (or, for a
/// tick the source itself failed, explained by a `source_error` between the rows around it),
/// unless the stream is `sparse` (rows only for what changed); and a declared gap must not
/// contain seqs that have rows.
pub fn check_seq_holes(
    file: &ScannedFile,
    gaps: &[GapDecl],
    source_error_times: &[u64],
    sparse: bool,
) -> Vec<Problem> {
    let mut out = Vec::new();
    let declared: Vec<(u64, u64)> = gaps.iter().map(|g| (g.from_seq, g.to_seq)).collect();
    for hole in file.holes.iter().filter(|_| !sparse) {
        if first_uncovered(hole.from_seq, hole.to_seq, &declared).is_none() {
            continue;
        }
        let explained = source_error_times
            .iter()
            .any(|&t| t >= hole.after_t && t <= hole.before_t);
        if !explained {
            out.push(Problem::new(
                Some(&file.name),
                Some(hole.line),
                format!(
                    "undeclared seq gap {}..={}: no gap event for source {} covers it",
                    hole.from_seq,
                    hole.to_seq,
                    file.source.as_deref().unwrap_or("?")
                ),
            ));
        }
    }
    if let (Some(first), Some(last)) = (file.first_seq, file.last_seq) {
        let holes: Vec<(u64, u64)> = file.holes.iter().map(|h| (h.from_seq, h.to_seq)).collect();
        for g in gaps {
            let (a, b) = (g.from_seq.max(first), g.to_seq.min(last));
            if a > b {
                continue;
            }
            if let Some(s) = first_uncovered(a, b, &holes) {
                out.push(Problem::new(
                    Some(&file.name),
                    None,
                    format!(
                        "gap event declares seq {}..={} missing, but rows with seq {s} exist",
                        g.from_seq, g.to_seq
                    ),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::testutil::*;

    #[test]
    fn seq_holes_must_be_declared() {
        let f = tele(&[
            r#"{"t_mono_ns":1,"t_wall_ns":1,"seq":0}"#,
            r#"{"t_mono_ns":2,"t_wall_ns":1,"seq":1}"#,
            r#"{"t_mono_ns":5,"t_wall_ns":1,"seq":4}"#,
            r#"{"t_mono_ns":6,"t_wall_ns":1,"seq":5}"#,
        ]);
        assert_eq!(f.holes.len(), 1);
        let undeclared = check_seq_holes(&f, &[], &[], false);
        assert_eq!(undeclared.len(), 1);
        assert!(undeclared[0].message.contains("undeclared seq gap 2..=3"));
        assert_eq!(undeclared[0].line, Some(3));
        // Declared by two adjacent gap events.
        let gaps = [
            GapDecl {
                from_seq: 2,
                to_seq: 2,
            },
            GapDecl {
                from_seq: 3,
                to_seq: 3,
            },
        ];
        assert!(check_seq_holes(&f, &gaps, &[], false).is_empty());
        // Half declared is still undeclared.
        assert_eq!(check_seq_holes(&f, &gaps[..1], &[], false).len(), 1);
        // A failing source explains its own missing ticks.
        assert!(check_seq_holes(&f, &[], &[3], false).is_empty());
        assert_eq!(check_seq_holes(&f, &[], &[9], false).len(), 1);
        // A declared gap over seqs that have rows contradicts the stream.
        let wrong = check_seq_holes(
            &f,
            &[GapDecl {
                from_seq: 1,
                to_seq: 3,
            }],
            &[],
            false,
        );
        assert!(
            wrong[0].message.contains("rows with seq 1 exist"),
            "{wrong:?}"
        );
        // A gap at the end (after the last row) is fine.
        let end = [
            GapDecl {
                from_seq: 2,
                to_seq: 3,
            },
            GapDecl {
                from_seq: 6,
                to_seq: 9,
            },
        ];
        assert!(check_seq_holes(&f, &end, &[], false).is_empty());
        // A sparse stream (rows only for what changed) has holes that are no gaps; a
        // declared gap over its rows is still a contradiction.
        assert!(check_seq_holes(&f, &[], &[], true).is_empty());
        assert_eq!(
            check_seq_holes(
                &f,
                &[GapDecl {
                    from_seq: 0,
                    to_seq: 1
                }],
                &[],
                true
            )
            .len(),
            1
        );
    }
}

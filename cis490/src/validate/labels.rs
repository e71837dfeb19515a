//! labels.jsonl: the phase chain.

use super::*;

/// labels.jsonl: first row `clean` with prev null, known phases, prev equal to the phase
/// before, and no transition to the phase already current.
pub fn check_labels(file: &str, rows: &[(u64, String, Option<String>)]) -> Vec<Problem> {
    let mut out = Vec::new();
    if rows.is_empty() {
        out.push(Problem::new(
            Some(file),
            None,
            "no label rows (the first row must be clean)",
        ));
        return out;
    }
    let mut current: Option<&str> = None;
    for (i, (_, phase, prev)) in rows.iter().enumerate() {
        let line = Some(i as u64 + 1);
        if Phase::parse(phase).is_none() {
            out.push(Problem::new(
                Some(file),
                line,
                format!("unknown phase {phase:?}"),
            ));
        }
        if i == 0 && (phase != "clean" || prev.is_some()) {
            out.push(Problem::new(
                Some(file),
                line,
                format!("first label must be clean with prev null, found {phase:?} prev {prev:?}"),
            ));
        }
        if i > 0 && prev.as_deref() != current {
            out.push(Problem::new(
                Some(file),
                line,
                format!("prev {prev:?} does not match the phase before it ({current:?})"),
            ));
        }
        if current == Some(phase.as_str()) {
            out.push(Problem::new(
                Some(file),
                line,
                format!("transition to the phase already current ({phase})"),
            ));
        }
        current = Some(phase);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(rows: &[(&str, Option<&str>)]) -> Vec<Problem> {
        let rows: Vec<_> = rows
            .iter()
            .enumerate()
            .map(|(i, (p, prev))| (i as u64, p.to_string(), prev.map(str::to_owned)))
            .collect();
        check_labels("labels.jsonl", &rows)
    }

    #[test]
    fn label_chain_rules() {
        assert!(labels(&[
            ("clean", None),
            ("armed", Some("clean")),
            ("infecting", Some("armed"))
        ])
        .is_empty());
        assert!(labels(&[("armed", None)])[0]
            .message
            .contains("first label must be clean"));
        assert!(labels(&[("clean", Some("armed"))])[0]
            .message
            .contains("first label"));
        assert!(labels(&[("clean", None), ("bogus", Some("clean"))])[0]
            .message
            .contains("unknown phase"));
        assert!(labels(&[("clean", None), ("armed", Some("dormant"))])[0]
            .message
            .contains("does not match"));
        assert!(labels(&[("clean", None), ("clean", Some("clean"))])[0]
            .message
            .contains("already current"));
        assert!(labels(&[])[0].message.contains("no label rows"));
    }
}

//! `cis490 ls`: one line per episode under a data root, newest first.
//!
//! Works on incomplete episodes too (a capture still running or killed): whatever meta.json
//! says at start, plus what is on disk (telemetry files, labels.jsonl), is enough for a line.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::episode::{DONE, LABELS, META};
use crate::error::Error;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EpisodeSummary {
    pub id: String,
    pub dir: PathBuf,
    pub started_at_wall: Option<String>,
    /// From meta.result for a complete episode; for an incomplete one an estimate from the
    /// newest file modification time (`duration_estimated` is then true).
    pub duration_s: Option<f64>,
    pub duration_estimated: bool,
    pub backend: Option<String>,
    pub sources: Vec<String>,
    pub phases: Vec<String>,
    pub complete: bool,
    pub end_reason: Option<String>,
}

/// The directory holding episode directories: `<root>/episodes` when it exists, else `root`
/// itself (so `cis490 ls data/episodes` works too).
pub fn episodes_dir(root: &Path) -> PathBuf {
    let sub = root.join("episodes");
    if sub.is_dir() {
        sub
    } else {
        root.to_path_buf()
    }
}

/// Distinct phases of labels.jsonl in order of first appearance (complete lines only).
pub fn phases_of_labels(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            if let Some(p) = v["phase"].as_str() {
                if !out.iter().any(|x| x == p) {
                    out.push(p.to_owned());
                }
            }
        }
    }
    out
}

fn wall_ns_of_rfc3339(s: &str) -> Option<i128> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
        .map(i128::from)
}

/// Summarize one episode directory; None if it does not look like an episode at all.
pub fn summarize(dir: &Path) -> Option<EpisodeSummary> {
    let id = dir.file_name()?.to_string_lossy().into_owned();
    let meta: Option<Value> = std::fs::read(dir.join(META))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut files: Vec<(String, std::fs::Metadata)> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            Some((
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().ok()?,
            ))
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    if meta.is_none()
        && !files
            .iter()
            .any(|(n, _)| n == LABELS || n.starts_with("telemetry-"))
    {
        return None;
    }
    let complete = files.iter().any(|(n, _)| n == DONE);
    let m = meta.unwrap_or(Value::Null);
    let started = m["started_at_wall"].as_str().map(str::to_owned);
    let mut sources: Vec<String> = m["sources"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for (name, _) in &files {
        if let Some(s) = name.strip_prefix("telemetry-").and_then(|s| {
            s.strip_suffix(".jsonl")
                .or_else(|| s.strip_suffix(".jsonl.zst"))
        }) {
            if !sources.iter().any(|x| x == s) {
                sources.push(s.to_owned());
            }
        }
    }
    let phases = std::fs::read_to_string(dir.join(LABELS))
        .map(|t| phases_of_labels(&t))
        .unwrap_or_default();
    let mut duration_s = m["result"]["duration_observed_s"].as_f64();
    let mut estimated = false;
    if duration_s.is_none() {
        let newest = files
            .iter()
            .filter_map(|(_, md)| md.modified().ok())
            .max()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i128);
        if let (Some(end), Some(start)) = (newest, started.as_deref().and_then(wall_ns_of_rfc3339))
        {
            duration_s = Some(((end - start).max(0) as f64) / 1e9);
            estimated = true;
        }
    }
    Some(EpisodeSummary {
        id,
        dir: dir.to_path_buf(),
        started_at_wall: started,
        duration_s,
        duration_estimated: estimated,
        backend: m["backend"]["used"].as_str().map(str::to_owned),
        sources,
        phases,
        complete,
        end_reason: m["result"]["end_reason"].as_str().map(str::to_owned),
    })
}

/// Every episode under `root`, newest first (ULIDs sort by creation time; the start time
/// breaks ties and orders non-ULID names).
pub fn list(root: &Path) -> Result<Vec<EpisodeSummary>, Error> {
    let dir = episodes_dir(root);
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| Error::Usage(format!("cannot list {}: {e}", dir.display())))?;
    let mut out: Vec<EpisodeSummary> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| summarize(&e.path()))
        .collect();
    sort_newest_first(&mut out);
    Ok(out)
}

pub fn sort_newest_first(v: &mut [EpisodeSummary]) {
    v.sort_by(|a, b| {
        let ka = (
            a.started_at_wall.as_deref().and_then(wall_ns_of_rfc3339),
            &a.id,
        );
        let kb = (
            b.started_at_wall.as_deref().and_then(wall_ns_of_rfc3339),
            &b.id,
        );
        kb.cmp(&ka)
    });
}

/// The human-readable table.
pub fn format_table(v: &[EpisodeSummary]) -> String {
    let mut out = format!(
        "{:<26}  {:<27}  {:>9}  {:<7}  {:<16}  {:<24}  {}\n",
        "ID", "STARTED", "DURATION", "BACKEND", "STATE", "SOURCES", "PHASES"
    );
    for e in v {
        let dur = match e.duration_s {
            Some(d) if e.duration_estimated => format!("~{d:.1}s"),
            Some(d) => format!("{d:.1}s"),
            None => "-".into(),
        };
        let state = if e.complete {
            e.end_reason.clone().unwrap_or_else(|| "complete".into())
        } else {
            "INCOMPLETE".into()
        };
        let state = if e.complete {
            format!("ok:{state}")
        } else {
            state
        };
        out.push_str(&format!(
            "{:<26}  {:<27}  {:>9}  {:<7}  {:<16}  {:<24}  {}\n",
            e.id,
            e.started_at_wall.as_deref().unwrap_or("-"),
            dur,
            e.backend.as_deref().unwrap_or("-"),
            state,
            if e.sources.is_empty() {
                "-".into()
            } else {
                e.sources.join(",")
            },
            if e.phases.is_empty() {
                "-".into()
            } else {
                e.phases.join(">")
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_distinct_in_order_and_skip_partial_lines() {
        let t = "{\"phase\":\"clean\"}\n{\"phase\":\"armed\"}\n{\"phase\":\"clean\"}\n{\"phase\":\"dorm";
        assert_eq!(phases_of_labels(t), vec!["clean", "armed"]);
    }

    #[test]
    fn summaries_of_complete_and_incomplete_dirs() {
        let root = tempfile::tempdir().unwrap();
        let eps = root.path().join("episodes");
        let a = eps.join("01A00000000000000000000000");
        let b = eps.join("01B00000000000000000000000");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::create_dir_all(eps.join("junk")).unwrap();
        std::fs::write(
            a.join(META),
            r#"{"started_at_wall":"2026-01-01T00:00:00Z","backend":{"used":"proc"},
                "sources":[{"name":"proc"}],"result":{"duration_observed_s":2.5,"end_reason":"duration"}}"#,
        )
        .unwrap();
        std::fs::write(a.join(DONE), "").unwrap();
        std::fs::write(a.join(LABELS), "{\"phase\":\"clean\"}\n").unwrap();
        std::fs::write(
            b.join(META),
            r#"{"started_at_wall":"2026-01-02T00:00:00Z","backend":{"used":"bpf"},"sources":[],"result":null}"#,
        )
        .unwrap();
        std::fs::write(b.join("telemetry-bpf-sched.jsonl"), "").unwrap();
        let v = list(root.path()).unwrap();
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(v[0].id, "01B00000000000000000000000");
        assert!(!v[0].complete);
        assert!(v[0].duration_estimated);
        assert_eq!(v[0].sources, vec!["bpf-sched"]);
        assert!(v[1].complete);
        assert_eq!(v[1].duration_s, Some(2.5));
        assert_eq!(v[1].phases, vec!["clean"]);
        let table = format_table(&v);
        assert!(table.contains("INCOMPLETE"));
        assert!(table.contains("ok:duration"));
        // Passing the episodes directory itself works too.
        assert_eq!(list(&eps).unwrap().len(), 2);
    }
}

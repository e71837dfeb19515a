//! manifest.json against the files on disk.

use super::*;

/// manifest.json against the files on disk: every listed file exists with the listed size,
/// line count and sha256, and every file but manifest.json and done.marker is listed.
pub fn check_manifest(
    manifest: &Value,
    meta_id: Option<&str>,
    on_disk: &BTreeMap<String, (u64, u64, String)>,
) -> Vec<Problem> {
    let mut out = Vec::new();
    let m = |msg: String| Problem::new(Some(MANIFEST), None, msg);
    let Some(files) = manifest["files"].as_array() else {
        out.push(m("no files array".into()));
        return out;
    };
    if let (Some(a), Some(b)) = (manifest["episode_id"].as_str(), meta_id) {
        if a != b {
            out.push(m(format!("episode_id {a} differs from meta.json's {b}")));
        }
    }
    let mut listed = BTreeSet::new();
    for f in files {
        let Some(name) = f["name"].as_str() else {
            out.push(m("a files[] entry has no name".into()));
            continue;
        };
        listed.insert(name.to_owned());
        let Some((bytes, lines, sha)) = on_disk.get(name) else {
            out.push(m(format!("{name} is listed but missing")));
            continue;
        };
        if f["bytes"].as_u64() != Some(*bytes) {
            out.push(m(format!(
                "{name}: size {bytes} bytes, manifest says {}",
                f["bytes"]
            )));
        }
        if f["lines"].as_u64() != Some(*lines) {
            out.push(m(format!(
                "{name}: {lines} lines, manifest says {}",
                f["lines"]
            )));
        }
        if f["sha256"].as_str() != Some(sha.as_str()) {
            out.push(m(format!(
                "{name}: sha256 mismatch (content changed): {sha}, manifest says {}",
                f["sha256"]
            )));
        }
    }
    for name in on_disk.keys() {
        if name != MANIFEST && name != DONE && !listed.contains(name) {
            out.push(m(format!("{name} is in the episode but not listed")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn manifest_contract() {
        let mut disk = BTreeMap::new();
        disk.insert("a.jsonl".to_string(), (10, 2, "aa".to_string()));
        disk.insert(MANIFEST.to_string(), (1, 1, "m".to_string()));
        disk.insert(DONE.to_string(), (0, 0, "d".to_string()));
        let man = json!({"episode_id": "E", "files": [{"name": "a.jsonl", "bytes": 10, "lines": 2, "sha256": "aa"}]});
        assert!(check_manifest(&man, Some("E"), &disk).is_empty());
        let bad = json!({"episode_id": "E", "files": [{"name": "a.jsonl", "bytes": 11, "lines": 3, "sha256": "ab"},
                                                      {"name": "b.jsonl", "bytes": 1, "lines": 1, "sha256": "x"}]});
        let msgs: Vec<String> = check_manifest(&bad, Some("F"), &disk)
            .iter()
            .map(ToString::to_string)
            .collect();
        let all = msgs.join("\n");
        assert!(all.contains("differs from meta.json"), "{all}");
        assert!(all.contains("size 10 bytes"), "{all}");
        assert!(all.contains("2 lines"), "{all}");
        assert!(all.contains("sha256 mismatch"), "{all}");
        assert!(all.contains("b.jsonl is listed but missing"), "{all}");
        disk.insert(".meta.json.tmp".to_string(), (1, 0, "t".to_string()));
        assert!(check_manifest(&man, Some("E"), &disk)[0]
            .message
            .contains("not listed"));
    }
}

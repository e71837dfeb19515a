//! meta.json: deserialized into the contract's types ([`crate::contract::meta`]), then
//! cross-checked with the files on disk.
//!
//! Each section is deserialized on its own so that every broken section is reported with
//! its path (`vm: missing field `vcpus``), not only the first one serde meets.

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::*;
use crate::contract::meta::{Meta, ResultMeta, SourceMeta, SCHEMA_VERSION};

fn problem(msg: String) -> Problem {
    Problem::new(Some(META), None, msg)
}

/// `value` (the section at `path`) as a `T`, or a problem naming the path.
fn section<T: DeserializeOwned>(out: &mut Vec<Problem>, value: &Value, path: &str) -> Option<T> {
    match T::deserialize(value) {
        Ok(t) => Some(t),
        Err(e) => {
            out.push(problem(format!("{path}: {e}")));
            None
        }
    }
}

/// meta.json: every contract key present with its type (the contract's [`Meta`]); for a
/// complete episode a result with a known end_reason; sources[] agreeing with the
/// telemetry files on disk.
pub fn check_meta(
    meta: &Value,
    dir_name: Option<&str>,
    complete: bool,
    files: &[ScannedFile],
) -> Vec<Problem> {
    let mut out = Vec::new();
    let Some(obj) = meta.as_object() else {
        out.push(problem("meta.json is not an object".into()));
        return out;
    };
    // The sections first, each with its own path in the message; then the whole, which
    // adds what only the top level can say (a missing or unknown top-level key).
    let sources: Option<Vec<Option<SourceMeta>>> = match obj.get("sources") {
        Some(Value::Array(list)) => Some(
            list.iter()
                .enumerate()
                .map(|(i, s)| section(&mut out, s, &format!("sources[{i}]")))
                .collect(),
        ),
        Some(_) => {
            out.push(problem("sources is not an array".into()));
            None
        }
        None => None,
    };
    let result: Option<ResultMeta> = match obj.get("result") {
        Some(Value::Null) | None => None,
        Some(r) => section(&mut out, r, "result"),
    };
    for key in [
        "tool",
        "clock",
        "host_fingerprint",
        "vm",
        "schedule",
        "backend",
    ] {
        if let Some(v) = obj.get(key) {
            let before = out.len();
            match key {
                "tool" => drop(section::<crate::contract::meta::Tool>(&mut out, v, key)),
                "clock" => drop(section::<crate::contract::meta::ClockMeta>(
                    &mut out, v, key,
                )),
                "host_fingerprint" => drop(section::<crate::contract::meta::HostFingerprint>(
                    &mut out, v, key,
                )),
                "vm" => drop(section::<crate::contract::meta::Vm>(&mut out, v, key)),
                "schedule" => drop(section::<crate::contract::meta::Schedule>(&mut out, v, key)),
                _ => drop(section::<crate::contract::meta::BackendMeta>(
                    &mut out, v, key,
                )),
            }
            debug_assert!(out.len() <= before + 1);
        }
    }
    let sections_ok = out.is_empty();
    let whole: Option<Meta> = match Meta::deserialize(meta) {
        Ok(m) => Some(m),
        // A section's own error was reported above with its path; the top level's error
        // would repeat it.
        Err(_) if !sections_ok => None,
        Err(e) => {
            out.push(problem(format!("meta.json: {e}")));
            None
        }
    };
    if let Some(m) = &whole {
        if m.schema_version != SCHEMA_VERSION {
            out.push(problem(format!(
                "schema_version is {}, expected {SCHEMA_VERSION}",
                m.schema_version
            )));
        }
    }
    if let (Some(id), Some(dir)) = (obj.get("episode_id").and_then(Value::as_str), dir_name) {
        if id != dir {
            out.push(problem(format!(
                "episode_id {id} differs from the directory name {dir}"
            )));
        }
    }

    let telemetry: BTreeMap<&str, &ScannedFile> = files
        .iter()
        .filter(|f| f.source.is_some())
        .map(|f| (f.name.as_str(), f))
        .collect();
    let mut listed = BTreeSet::new();
    let mut rows_sum = 0u64;
    for (i, s) in sources.iter().flatten().enumerate() {
        let Some(s) = s else { continue };
        rows_sum += s.rows;
        let (name, file) = (&s.name, &s.file);
        if *file != format!("telemetry-{name}.jsonl")
            && *file != format!("telemetry-{name}.jsonl.zst")
        {
            out.push(problem(format!(
                "sources[{i}] file {file:?} is not telemetry-{name}.jsonl"
            )));
        }
        listed.insert(file.clone());
        match telemetry.get(file.as_str()) {
            None => out.push(problem(format!(
                "sources[{i}] names {file}, which does not exist"
            ))),
            Some(f) if f.lines != s.rows => out.push(problem(format!(
                "sources[{i}] says {} rows, but {file} has {} lines",
                s.rows, f.lines
            ))),
            _ => {}
        }
    }
    if complete {
        for name in telemetry.keys() {
            if !listed.contains(*name) {
                out.push(problem(format!(
                    "{name} exists but meta.sources[] does not list it"
                )));
            }
        }
    }
    match (obj.get("result"), &result) {
        (Some(Value::Null) | None, _) => {
            if complete {
                out.push(problem("result is null in a complete episode".into()));
            }
        }
        (Some(_), None) => {} // reported above with its path
        (Some(_), Some(result)) => {
            // end_reason is typed: an unknown one failed to deserialize above.
            if result.rows_total != rows_sum {
                out.push(problem(format!(
                    "result.rows_total {} != sum of sources[].rows {rows_sum}",
                    result.rows_total
                )));
            }
            if obj.get("ended_at_wall").is_some_and(Value::is_null) {
                out.push(problem(
                    "ended_at_wall is null although result is set".into(),
                ));
            }
            out.extend(check_pcap_meta(result, files));
            if let Some(labels) = files.iter().find(|f| f.name == LABELS) {
                let a: BTreeSet<&str> = result.phases_observed.iter().map(String::as_str).collect();
                let b: BTreeSet<&str> = labels.label_phases.iter().map(String::as_str).collect();
                if a != b {
                    out.push(problem(format!(
                        "result.phases_observed {a:?} differs from the phases in labels.jsonl {b:?}"
                    )));
                }
            }
        }
    }
    out
}

/// `--pcap`: result.pcap and capture.pcapng say the same thing. A capture that started
/// wrote the file (`written`, or `error` part-way); one that could not start wrote none
/// (`absent`); without `--pcap` there is neither.
fn check_pcap_meta(result: &ResultMeta, files: &[ScannedFile]) -> Vec<Problem> {
    let file = crate::pcap::FILE;
    let on_disk = files.iter().any(|f| f.name == file);
    let status = result
        .extra
        .get(crate::pcap::META_KEY)
        .map(|p| p["status"].as_str());
    let msg = match (status, on_disk) {
        (None, false) | (Some(Some("written" | "error")), true) | (Some(Some("absent")), false) => {
            return Vec::new()
        }
        (None, true) => format!("{file} is in the episode but result.pcap does not describe it"),
        (Some(Some("absent")), true) => {
            format!("result.pcap.status is absent but {file} is in the episode")
        }
        (Some(Some(s @ ("written" | "error"))), false) => {
            format!("result.pcap.status is {s} but {file} is not in the episode")
        }
        (Some(other), _) => format!(
            "result.pcap.status is {}, not written, absent or error",
            other.unwrap_or("missing")
        ),
    };
    vec![problem(msg)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::testutil::*;
    use serde_json::json;

    fn good_meta() -> Value {
        json!({
            "episode_id": "E", "schema_version": 1, "tool": {"name": "cis490", "version": "0"},
            "started_at_wall": "x", "ended_at_wall": "y",
            "clock": {"mono_origin_ns": 1, "wall_origin_ns": 2},
            "host_fingerprint": {"hostname": "h", "kernel": "k", "cpus": 2, "qemu_version": null},
            "vm": {"target_pid": 1, "qemu_cmdline": [], "vcpus": null, "ram_mib": null,
                   "vcpu_threads": [], "image_name": null, "image_sha256": null, "snapshot_name": null},
            "exploit": null, "sample": null,
            "schedule": {"interval_ns": 1, "rate_hz": 1, "baseline_seconds": null,
                         "infected_seconds": null, "dormant_seconds": null},
            "backend": {"requested": "proc", "used": "proc", "fallback_reason": null},
            "sources": [{"name": "proc", "file": "telemetry-proc.jsonl",
                         "available_in_deployment": false, "rows": 1, "errors": 0}],
            "result": {"end_reason": "duration", "phases_observed": ["clean"], "pid_alive_at_end": true,
                       "duration_observed_s": 1.0, "ticks_scheduled": 1, "ticks_missed": 0, "rows_total": 1}
        })
    }

    #[test]
    fn meta_contract() {
        let files = vec![
            tele(&[r#"{"t_mono_ns":1,"t_wall_ns":1,"seq":0}"#]),
            scan_bytes(
                "labels.jsonl",
                FileKind::Labels,
                b"{\"t_mono_ns\":1,\"t_wall_ns\":1,\"phase\":\"clean\",\"prev\":null}\n",
            ),
        ];
        assert!(check_meta(&good_meta(), Some("E"), true, &files).is_empty());
        // --pcap: meta and the file agree.
        let pcap = scan_bytes(crate::pcap::FILE, FileKind::Events, b"\n\x0a\x0d\x0d\x0a");
        let with_file: Vec<ScannedFile> = files.iter().cloned().chain([pcap]).collect();
        let pcap_msgs = |status: Option<&str>, files: &[ScannedFile]| -> String {
            let mut m = good_meta();
            if let Some(s) = status {
                m["result"]["pcap"] = json!({"status": s});
            }
            check_meta(&m, Some("E"), true, files)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(pcap_msgs(Some("written"), &with_file), "");
        assert_eq!(pcap_msgs(Some("error"), &with_file), "");
        assert_eq!(pcap_msgs(Some("absent"), &files), "");
        assert!(pcap_msgs(None, &with_file).contains("does not describe it"));
        assert!(pcap_msgs(Some("written"), &files).contains("is not in the episode"));
        assert!(pcap_msgs(Some("absent"), &with_file).contains("status is absent but"));
        assert!(pcap_msgs(Some("done"), &with_file).contains("not written, absent or error"));
        let msgs = |m: &Value, complete| -> String {
            check_meta(m, Some("E"), complete, &files)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        };
        let mut m = good_meta();
        m["vm"].as_object_mut().unwrap().remove("vcpus");
        assert!(
            msgs(&m, true).contains("vm: missing field `vcpus`"),
            "{}",
            msgs(&m, true)
        );
        // A key the contract does not have is refused (a typo is not silently ignored).
        let mut m = good_meta();
        m["vm"]["vcpu"] = 1.into();
        assert!(msgs(&m, true).contains("vm: unknown field `vcpu`"));
        let mut m = good_meta();
        m["extra_top"] = 1.into();
        assert!(msgs(&m, true).contains("meta.json: unknown field `extra_top`"));
        // A wrong type names its section.
        let mut m = good_meta();
        m["host_fingerprint"]["cpus"] = "two".into();
        assert!(msgs(&m, true).contains("host_fingerprint: invalid type"));
        // Several broken sections are all reported.
        let mut m = good_meta();
        m["tool"] = json!({});
        m["clock"] = json!({"mono_origin_ns": -1, "wall_origin_ns": 2});
        let all = msgs(&m, true);
        assert!(
            all.contains("tool: missing field") && all.contains("clock: invalid value"),
            "{all}"
        );
        let mut m = good_meta();
        m["result"] = Value::Null;
        assert!(msgs(&m, true).contains("result is null"));
        assert!(!msgs(&m, false).contains("result is null"));
        let mut m = good_meta();
        m["result"]["end_reason"] = "crashed".into();
        assert!(
            msgs(&m, true).contains("result: unknown variant `crashed`"),
            "{}",
            msgs(&m, true)
        );
        let mut m = good_meta();
        m["schema_version"] = 2.into();
        assert!(msgs(&m, true).contains("schema_version is 2, expected 1"));
        let mut m = good_meta();
        m["sources"][0]["rows"] = 2.into();
        m["result"]["rows_total"] = 2.into();
        assert!(msgs(&m, true).contains("says 2 rows, but telemetry-proc.jsonl has 1 lines"));
        let mut m = good_meta();
        m["sources"] = json!([]);
        m["result"]["rows_total"] = 0.into();
        assert!(msgs(&m, true).contains("does not list it"));
        let mut m = good_meta();
        m["result"]["phases_observed"] = json!(["clean", "armed"]);
        assert!(msgs(&m, true).contains("phases_observed"));
        assert!(msgs(&good_meta(), true).is_empty());
        assert!(check_meta(&good_meta(), Some("F"), true, &files)[0]
            .message
            .contains("directory name"));
    }
}

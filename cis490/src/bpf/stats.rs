//! `--bpf-stats`: per-program run count and run time, read from the kernel at the end of
//! the capture (BPF_OBJ_GET_INFO_BY_FD). The kernel only counts while statistics are
//! enabled, which the loader does through BPF_ENABLE_STATS: a file descriptor that turns
//! them off again when it is closed, so a killed capture cannot leave them on.

use serde_json::{json, Map, Value};

///
/// Programs are found by kernel id among all loaded programs, because the capture holds
/// no aya program objects when the loader process did the loading (see `handoff`).
pub fn collect(programs: &[(String, u32)]) -> Value {
    let mut infos: std::collections::HashMap<u32, aya::programs::ProgramInfo> =
        std::collections::HashMap::new();
    for info in aya::programs::loaded_programs().flatten() {
        if programs.iter().any(|(_, id)| *id == info.id()) {
            infos.insert(info.id(), info);
        }
    }
    let mut out = Map::new();
    for (name, id) in programs {
        let entry = match infos.get(id) {
            Some(info) => {
                let run_cnt = info.run_count();
                let run_time_ns = info.run_time().as_nanos() as u64;
                json!({
                    "run_cnt": run_cnt,
                    "run_time_ns": run_time_ns,
                    "ns_per_run": if run_cnt > 0 { Value::from(run_time_ns as f64 / run_cnt as f64) } else { Value::Null },
                })
            }
            None => json!({"error": "program not loaded"}),
        };
        out.insert(name.clone(), entry);
    }
    Value::Object(out)
}

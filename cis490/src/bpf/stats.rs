//! `--bpf-stats`: per-program run count and run time, read from the kernel at the end of
//! the capture (BPF_OBJ_GET_INFO_BY_FD). The kernel only counts while statistics are
//! enabled, which the loader does through BPF_ENABLE_STATS: a file descriptor that turns
//! them off again when it is closed, so a killed capture cannot leave them on.

use serde_json::{json, Map, Value};

pub fn collect(ebpf: &mut aya::Ebpf, programs: &[&'static str]) -> Value {
    let mut out = Map::new();
    for name in programs {
        let entry = match ebpf.program(name).map(|p| p.info()) {
            Some(Ok(info)) => {
                let run_cnt = info.run_count();
                let run_time_ns = info.run_time().as_nanos() as u64;
                json!({
                    "run_cnt": run_cnt,
                    "run_time_ns": run_time_ns,
                    "ns_per_run": if run_cnt > 0 { Value::from(run_time_ns as f64 / run_cnt as f64) } else { Value::Null },
                })
            }
            Some(Err(e)) => json!({"error": e.to_string()}),
            None => json!({"error": "program not loaded"}),
        };
        out.insert((*name).to_owned(), entry);
    }
    Value::Object(out)
}

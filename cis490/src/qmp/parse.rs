//! Pure QMP parsing: one line from the socket → a [`Message`]; a command's `return`
//! value → facts or flat row fields. Typed with the `qapi` crate's QMP types; elements of a
//! list are decoded one by one so one unknown element (a provider or target newer than the
//! crate's schema) costs that element, not the whole reply.
//!
//! Histograms (`log2-histogram` / `linear-histogram` stats, e.g. KVM's `halt_wait_hist`)
//! are summarized, not spread over one column per bucket: `<name>_count` is the sum of
//! all buckets (an integer, cumulative like the buckets), and `<name>_buckets` is the
//! bucket vector as a comma-separated string, lossless but still one flat scalar. The
//! number of buckets can differ between kernels, which one column per bucket would turn
//! into schema drift.

use std::collections::HashMap;

use qapi::qmp::{
    BlockStats, CpuInfoFast, MemoryInfo, NameInfo, StatsResult, StatsSchema, StatsType, StatsValue,
    StatusInfo, VersionInfo,
};
use serde::de::DeserializeOwned;
use serde_json::Value as Json;

use crate::row::{FieldName, Value};

/// One line received on a QMP socket.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Greeting {
        version: Option<String>,
    },
    Return {
        id: Option<Json>,
        value: Json,
    },
    Error {
        id: Option<Json>,
        class: String,
        desc: String,
    },
    Event {
        name: String,
        data: Json,
        timestamp_us: Option<u64>,
    },
}

/// Whether `line` is an event, decided without building its value (no allocation): the
/// transport drops events cheaply this way while it sheds a flood. Same rule as
/// [`parse_message`]: an object with `event` and none of `QMP`, `return`, `error`.
pub fn is_event_line(line: &[u8]) -> bool {
    use serde::de::IgnoredAny;
    #[derive(serde::Deserialize)]
    struct Peek {
        #[serde(rename = "QMP")]
        greeting: Option<IgnoredAny>,
        #[serde(rename = "return")]
        ret: Option<IgnoredAny>,
        error: Option<IgnoredAny>,
        event: Option<IgnoredAny>,
    }
    match serde_json::from_slice::<Peek>(line) {
        Ok(p) => p.event.is_some() && p.greeting.is_none() && p.ret.is_none() && p.error.is_none(),
        Err(_) => false,
    }
}

pub fn parse_message(line: &str) -> Result<Message, String> {
    let v: Json = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let Json::Object(mut o) = v else {
        return Err("not a JSON object".into());
    };
    if let Some(g) = o.get("QMP") {
        return Ok(Message::Greeting {
            version: g
                .get("version")
                .and_then(|v| version_string(v.clone()).ok()),
        });
    }
    let id = o.remove("id");
    if let Some(value) = o.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(err) = o.get("error") {
        let s = |k: &str| {
            err.get(k)
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        return Ok(Message::Error {
            id,
            class: s("class"),
            desc: s("desc"),
        });
    }
    if let Some(Json::String(name)) = o.remove("event") {
        let timestamp_us = o.get("timestamp").and_then(|t| {
            let s = t.get("seconds")?.as_i64()?;
            let us = t.get("microseconds")?.as_i64()?;
            // QEMU writes -1/-1 when it had no clock; keep that as "unknown".
            (s >= 0 && us >= 0).then(|| s as u64 * 1_000_000 + us as u64)
        });
        return Ok(Message::Event {
            name,
            data: o.remove("data").unwrap_or(Json::Null),
            timestamp_us,
        });
    }
    Err("neither greeting, return, error nor event".into())
}

fn typed<T: DeserializeOwned>(what: &str, v: Json) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| format!("{what}: {e}"))
}

/// Decode each element of a list on its own; returns the good ones and the count of bad ones.
fn typed_list<T: DeserializeOwned>(what: &str, v: Json) -> Result<(Vec<T>, usize), String> {
    let Json::Array(items) = v else {
        return Err(format!("{what}: not a list"));
    };
    let mut ok = Vec::with_capacity(items.len());
    let mut bad = 0;
    for item in items {
        match serde_json::from_value(item) {
            Ok(t) => ok.push(t),
            Err(_) => bad += 1,
        }
    }
    Ok((ok, bad))
}

/// `query-version` → "10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)".
pub fn version_string(v: Json) -> Result<String, String> {
    let info: VersionInfo = typed("query-version", v)?;
    let q = info.qemu;
    let base = format!("{}.{}.{}", q.major, q.minor, q.micro);
    Ok(if info.package.trim().is_empty() {
        base
    } else {
        format!("{base} ({})", info.package.trim())
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuInfo {
    pub index: u32,
    /// Host thread id of the vCPU (the top-level `thread-id`; `props.thread-id` is a
    /// topology index, not a tid).
    pub tid: u32,
    pub qom_path: String,
}

pub fn vcpus(v: Json) -> Result<Vec<VcpuInfo>, String> {
    let (cpus, bad) = typed_list::<CpuInfoFast>("query-cpus-fast", v)?;
    if bad > 0 && cpus.is_empty() {
        return Err("query-cpus-fast: no element could be decoded".into());
    }
    let mut out = Vec::with_capacity(cpus.len());
    for c in cpus {
        let b = match &c {
            CpuInfoFast::s390x { base, .. } => base,
            CpuInfoFast::x86_64(b)
            | CpuInfoFast::i386(b)
            | CpuInfoFast::aarch64(b)
            | CpuInfoFast::arm(b)
            | CpuInfoFast::riscv64(b)
            | CpuInfoFast::riscv32(b)
            | CpuInfoFast::ppc64(b)
            | CpuInfoFast::ppc(b)
            | CpuInfoFast::loongarch64(b)
            | CpuInfoFast::mips64el(b)
            | CpuInfoFast::mips64(b)
            | CpuInfoFast::mipsel(b)
            | CpuInfoFast::mips(b)
            | CpuInfoFast::sparc64(b)
            | CpuInfoFast::sparc(b)
            | CpuInfoFast::alpha(b)
            | CpuInfoFast::avr(b)
            | CpuInfoFast::cris(b)
            | CpuInfoFast::hppa(b)
            | CpuInfoFast::m68k(b)
            | CpuInfoFast::microblaze(b)
            | CpuInfoFast::microblazeel(b)
            | CpuInfoFast::or1k(b)
            | CpuInfoFast::rx(b)
            | CpuInfoFast::sh4(b)
            | CpuInfoFast::sh4eb(b)
            | CpuInfoFast::tricore(b)
            | CpuInfoFast::xtensa(b)
            | CpuInfoFast::xtensaeb(b) => b,
        };
        let (Ok(index), Ok(tid)) = (u32::try_from(b.cpu_index), u32::try_from(b.thread_id)) else {
            return Err(format!(
                "query-cpus-fast: cpu-index {} / thread-id {} out of range",
                b.cpu_index, b.thread_id
            ));
        };
        out.push(VcpuInfo {
            index,
            tid,
            qom_path: b.qom_path.clone(),
        });
    }
    out.sort_by_key(|c| c.index);
    Ok(out)
}

pub fn vm_name(v: Json) -> Result<Option<String>, String> {
    Ok(typed::<NameInfo>("query-name", v)?.name)
}

/// `query-memory-size-summary` → RAM in MiB (base + hot-plugged).
pub fn ram_mib(v: Json) -> Result<u64, String> {
    let m: MemoryInfo = typed("query-memory-size-summary", v)?;
    Ok((m.base_memory + m.plugged_memory.unwrap_or(0)) / (1024 * 1024))
}

pub fn status_fields(v: Json, out: &mut Vec<(FieldName, Value)>) -> Result<(), String> {
    let s: StatusInfo = typed("query-status", v)?;
    // The enum's serde name is QEMU's own spelling ("running", "paused", "inmigrate", ...).
    let status = serde_json::to_value(s.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    out.push(("run_status".into(), status.into()));
    out.push(("running".into(), s.running.into()));
    Ok(())
}

/// What `query-stats-schemas` says about one stat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatKind {
    pub histogram: bool,
}

/// target ("vm"/"vcpu") → provider → stat name → kind.
#[derive(Debug, Clone, Default)]
pub struct Schemas {
    pub by_target: HashMap<String, HashMap<String, HashMap<String, StatKind>>>,
}

impl Schemas {
    pub fn parse(v: Json) -> Result<Self, String> {
        let (list, _bad) = typed_list::<StatsSchema>("query-stats-schemas", v)?;
        let mut s = Schemas::default();
        for schema in list {
            let target = enum_name(&schema.target);
            let provider = enum_name(&schema.provider);
            let stats = s
                .by_target
                .entry(target)
                .or_default()
                .entry(provider)
                .or_default();
            for st in schema.stats {
                let histogram = matches!(
                    st.type_,
                    StatsType::linear_histogram | StatsType::log2_histogram
                );
                stats.insert(st.name, StatKind { histogram });
            }
        }
        Ok(s)
    }

    /// Whether any provider offers stats for `target`.
    pub fn has(&self, target: &str) -> bool {
        self.by_target
            .get(target)
            .is_some_and(|p| p.values().any(|s| !s.is_empty()))
    }

    pub fn stat_count(&self, target: &str) -> usize {
        self.by_target
            .get(target)
            .map_or(0, |p| p.values().map(HashMap::len).sum())
    }
}

fn enum_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Stat and provider names come from the host kernel and QEMU: keep column names to a
/// safe alphabet whatever they contain.
pub fn column(parts: &[&str]) -> String {
    let mut s = String::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            s.push('_');
        }
        s.extend(p.chars().map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        }));
    }
    s
}

/// One `query-stats` result: a vCPU's (qom_path set) or the VM's stats as flat fields
/// `<provider>_<name>`. Booleans stay booleans; histograms are summarized (module docs).
///
/// Column names are unique within a row: sanitizing can map two stat names to one column
/// (`a-b` and `a.b` → `kvm_a_b`, `X` and `x`), a reply can list a name twice, and a stat
/// named `h_count` meets the histogram `h`'s `h_count`. The first column of a name wins,
/// in reply order; a later one is dropped and listed in `collisions` (the collector counts
/// them and reports each once), never written as a duplicate key.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsRow {
    pub qom_path: Option<String>,
    pub fields: Vec<(FieldName, Value)>,
    /// `<provider>/<stat name>` of each value dropped because its column was taken.
    pub collisions: Vec<String>,
}

/// Append `(name, value)` unless `fields` already has `name`; false when it had.
pub fn push_unique(fields: &mut Vec<(FieldName, Value)>, name: FieldName, value: Value) -> bool {
    if fields.iter().any(|(k, _)| *k == name) {
        return false;
    }
    fields.push((name, value));
    true
}

pub fn stats_rows(v: Json) -> Result<Vec<StatsRow>, String> {
    let (results, _bad) = typed_list::<StatsResult>("query-stats", v)?;
    let mut rows: Vec<StatsRow> = Vec::new();
    for r in results {
        let provider = enum_name(&r.provider);
        // Results of several providers for the same object share one row.
        let idx = match rows.iter().position(|x| x.qom_path == r.qom_path) {
            Some(i) => i,
            None => {
                rows.push(StatsRow {
                    qom_path: r.qom_path.clone(),
                    fields: Vec::new(),
                    collisions: Vec::new(),
                });
                rows.len() - 1
            }
        };
        let row = &mut rows[idx];
        for st in r.stats {
            let name = column(&[&provider, &st.name]);
            let ok = match st.value {
                StatsValue::scalar(n) => push_unique(&mut row.fields, name.into(), n.into()),
                StatsValue::boolean(b) => push_unique(&mut row.fields, name.into(), b.into()),
                StatsValue::list(buckets) => {
                    // Histograms (the schema's log2/linear-histogram types) are the only
                    // list-valued stats; a list the schema does not know is summarized the
                    // same way rather than dropped.
                    let (count, joined) = (format!("{name}_count"), format!("{name}_buckets"));
                    // Both columns or neither: half a histogram would mislead.
                    if row.fields.iter().any(|(k, _)| *k == count || *k == joined) {
                        false
                    } else {
                        let total = buckets.iter().fold(0u64, |a, b| a.saturating_add(*b));
                        let joined_v = buckets
                            .iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(",");
                        row.fields.push((count.into(), total.into()));
                        row.fields.push((joined.into(), joined_v.into()));
                        true
                    }
                }
            };
            if !ok {
                row.collisions.push(format!("{provider}/{}", st.name));
            }
        }
    }
    rows.sort_by(|a, b| a.qom_path.cmp(&b.qom_path));
    Ok(rows)
}

/// One block device's counters from `query-blockstats`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockRow {
    /// The device's name: the legacy drive name, else the qdev id (`vblk0` from
    /// `/machine/peripheral/vblk0/virtio-backend`, the -blockdev case), else the node name.
    pub device: String,
    pub fields: Vec<(FieldName, Value)>,
}

pub fn qdev_id(qdev: &str) -> &str {
    // "/machine/peripheral/<id>/virtio-backend" → "<id>"; a bare id stays as it is.
    let mut parts = qdev.trim_matches('/').split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("machine"), Some("peripheral"), Some(id)) => id,
        _ => qdev,
    }
}

pub fn block_rows(v: Json) -> Result<Vec<BlockRow>, String> {
    let (list, _bad) = typed_list::<BlockStats>("query-blockstats", v)?;
    let mut rows = Vec::with_capacity(list.len());
    for b in list {
        let device = match (&b.device, &b.qdev, &b.node_name) {
            (Some(d), _, _) if !d.is_empty() => d.clone(),
            (_, Some(q), _) if !q.is_empty() => qdev_id(q).to_owned(),
            (_, _, Some(n)) => n.clone(),
            _ => String::new(),
        };
        let s = &b.stats;
        let u = |v: i64| Value::U64(v.max(0) as u64);
        let mut f: Vec<(FieldName, Value)> = vec![
            ("device".into(), device.clone().into()),
            ("qdev".into(), b.qdev.clone().into()),
            ("node_name".into(), b.node_name.clone().into()),
            ("read_bytes".into(), u(s.rd_bytes)),
            ("write_bytes".into(), u(s.wr_bytes)),
            ("read_ops".into(), u(s.rd_operations)),
            ("write_ops".into(), u(s.wr_operations)),
            ("flush_ops".into(), u(s.flush_operations)),
            ("unmap_ops".into(), u(s.unmap_operations)),
            ("unmap_bytes".into(), u(s.unmap_bytes)),
            ("read_merged_ops".into(), u(s.rd_merged)),
            ("write_merged_ops".into(), u(s.wr_merged)),
            ("read_time_ns".into(), u(s.rd_total_time_ns)),
            ("write_time_ns".into(), u(s.wr_total_time_ns)),
            ("flush_time_ns".into(), u(s.flush_total_time_ns)),
            ("failed_read_ops".into(), u(s.failed_rd_operations)),
            ("failed_write_ops".into(), u(s.failed_wr_operations)),
            ("failed_flush_ops".into(), u(s.failed_flush_operations)),
            ("invalid_read_ops".into(), u(s.invalid_rd_operations)),
            ("invalid_write_ops".into(), u(s.invalid_wr_operations)),
            ("write_highest_offset_bytes".into(), u(s.wr_highest_offset)),
        ];
        // Absent until the device did I/O; keep the column with null meanwhile.
        f.push((
            "idle_time_ns".into(),
            s.idle_time_ns.map(|v| v.max(0) as u64).into(),
        ));
        rows.push(BlockRow { device, fields: f });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/../tests/data/qemu-10.0.2/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The `return` of a captured reply, checking that it echoes its request's id.
    fn ret(name: &str) -> Json {
        let req: Json = serde_json::from_str(&fixture(&format!("{name}.request.json"))).unwrap();
        match parse_message(fixture(&format!("{name}.json")).trim()).unwrap() {
            Message::Return { id, value } => {
                assert_eq!(id.as_ref(), req.get("id"), "{name}: id echoed");
                value
            }
            other => panic!("{name}: {other:?}"),
        }
    }

    fn field<'a>(f: &'a [(FieldName, Value)], n: &str) -> &'a Value {
        &f.iter()
            .find(|(k, _)| k == n)
            .unwrap_or_else(|| panic!("no {n}"))
            .1
    }

    #[test]
    fn greeting_and_capabilities() {
        for acc in ["kvm", "tcg"] {
            let g = parse_message(fixture(&format!("{acc}/greeting.json")).trim()).unwrap();
            assert_eq!(
                g,
                Message::Greeting {
                    version: Some("10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)".into())
                }
            );
            assert_eq!(
                ret(&format!("{acc}/qmp_capabilities")),
                serde_json::json!({})
            );
        }
    }

    #[test]
    fn version_name_memory_status() {
        for acc in ["kvm", "tcg"] {
            assert_eq!(
                version_string(ret(&format!("{acc}/query-version"))).unwrap(),
                "10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"
            );
            assert_eq!(
                ram_mib(ret(&format!("{acc}/query-memory-size-summary"))).unwrap(),
                256
            );
            let mut f = Vec::new();
            status_fields(ret(&format!("{acc}/query-status")), &mut f).unwrap();
            assert!(matches!(field(&f, "running"), Value::Bool(_)));
            assert!(matches!(field(&f, "run_status"), Value::Str(s) if !s.is_empty()));
        }
        assert_eq!(
            vm_name(ret("tcg/query-name")).unwrap().as_deref(),
            Some("cis490-vm1")
        );
    }

    #[test]
    fn cpus_fast_gives_host_thread_ids_not_topology_ids() {
        let c = vcpus(ret("tcg/query-cpus-fast")).unwrap();
        assert_eq!(
            c,
            vec![
                VcpuInfo {
                    index: 0,
                    tid: 6846,
                    qom_path: "/machine/unattached/device[0]".into()
                },
                VcpuInfo {
                    index: 1,
                    tid: 6847,
                    qom_path: "/machine/unattached/device[2]".into()
                },
            ]
        );
        let k = vcpus(ret("kvm/query-cpus-fast")).unwrap();
        assert_eq!(
            k.iter().map(|c| c.tid).collect::<Vec<_>>(),
            vec![6350, 6351]
        );
    }

    #[test]
    fn schemas_decide_which_targets_are_polled() {
        let kvm = Schemas::parse(ret("kvm/query-stats-schemas")).unwrap();
        assert!(kvm.has("vm") && kvm.has("vcpu"));
        assert_eq!(kvm.stat_count("vm"), 16);
        assert_eq!(kvm.stat_count("vcpu"), 47);
        let hist = &kvm.by_target["vcpu"]["kvm"]["halt_wait_hist"];
        assert!(hist.histogram);
        assert!(!kvm.by_target["vcpu"]["kvm"]["guest_mode"].histogram);
        // Under TCG only cryptodev has a schema: vm/vcpu stats are not polled.
        let tcg = Schemas::parse(ret("tcg/query-stats-schemas")).unwrap();
        assert!(!tcg.has("vm") && !tcg.has("vcpu"));
        let kvm_only = Schemas::parse(ret("kvm/query-stats-schemas.kvm")).unwrap();
        assert_eq!(kvm_only.stat_count("vcpu"), 47);
    }

    #[test]
    fn vm_stats_one_row_without_qom_path() {
        for name in ["kvm/query-stats.vm", "kvm/query-stats.vm.kvm"] {
            let rows = stats_rows(ret(name)).unwrap();
            assert_eq!(rows.len(), 1, "{name}");
            assert_eq!(rows[0].qom_path, None);
            assert_eq!(rows[0].fields.len(), 16);
            assert!(rows[0].fields.iter().all(|(k, _)| k.starts_with("kvm_")));
        }
    }

    #[test]
    fn vcpu_stats_with_booleans_and_summarized_histograms() {
        let rows = stats_rows(ret("kvm/query-stats.vcpu")).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0].qom_path.as_deref(),
            Some("/machine/unattached/device[0]")
        );
        let f = &rows[1].fields;
        // 44 scalars/booleans + 3 histograms x 2 columns.
        assert_eq!(f.len(), 47 + 3);
        assert_eq!(field(f, "kvm_guest_mode"), &Value::Bool(false));
        assert_eq!(field(f, "kvm_blocking"), &Value::Bool(true));
        assert_eq!(field(f, "kvm_insn_emulation"), &Value::U64(947));
        assert_eq!(field(f, "kvm_halt_wait_hist_count"), &Value::U64(3));
        match field(f, "kvm_halt_wait_hist_buckets") {
            Value::Str(s) => {
                assert_eq!(s.split(',').count(), 32);
                assert!(s.starts_with("0,0,1,1,0"));
            }
            v => panic!("{v:?}"),
        }
        for name in [
            "kvm/query-stats.vcpu.kvm",
            "kvm/query-stats.vcpu.kvm.vcpu0",
            "kvm/query-stats.vcpu.kvm.names",
        ] {
            let rows = stats_rows(ret(name)).unwrap();
            assert!(!rows.is_empty(), "{name}");
            assert!(rows.iter().all(|r| r.qom_path.is_some()), "{name}");
        }
        let names = stats_rows(ret("kvm/query-stats.vcpu.kvm.names")).unwrap();
        assert_eq!(
            field(&names[0].fields, "kvm_halt_wait_ns"),
            &Value::U64(33947889834)
        );
    }

    #[test]
    fn tcg_stats_are_empty_not_an_error() {
        for name in [
            "tcg/query-stats.vm",
            "tcg/query-stats.vcpu",
            "kvm/query-stats.cryptodev",
        ] {
            assert!(stats_rows(ret(name)).unwrap().is_empty(), "{name}");
        }
    }

    #[test]
    fn blockstats_with_blockdev_naming() {
        let rows = block_rows(ret("tcg/query-blockstats")).unwrap();
        assert_eq!(rows.len(), 1);
        let f = &rows[0].fields;
        assert_eq!(rows[0].device, "vblk0");
        assert_eq!(field(f, "node_name"), &Value::Str("disk0".into()));
        // The lab's dd: 32 MiB written and 32 MiB (+ the boot probe) read, O_DIRECT.
        assert_eq!(field(f, "write_bytes"), &Value::U64(33554432));
        assert_eq!(field(f, "read_bytes"), &Value::U64(33559040));
        assert_eq!(field(f, "write_ops"), &Value::U64(32));
        let kvm = block_rows(ret("kvm/query-blockstats")).unwrap();
        assert_eq!(kvm[0].device, "vblk0");
        // query-nodes=true lists nodes by node-name only.
        let nodes = block_rows(ret("tcg/query-blockstats.nodes")).unwrap();
        let names: Vec<_> = nodes.iter().map(|r| r.device.as_str()).collect();
        assert_eq!(names, vec!["disk0-file", "disk0"]);
    }

    #[test]
    fn error_replies_of_both_captures() {
        for acc in ["kvm", "tcg"] {
            let m = parse_message(fixture(&format!("{acc}/error.unknown-command.json")).trim())
                .unwrap();
            assert!(
                matches!(m, Message::Error { ref class, .. } if class == "CommandNotFound"),
                "{m:?}"
            );
            let m = parse_message(fixture(&format!("{acc}/error.bad-stats-target.json")).trim())
                .unwrap();
            assert!(
                matches!(m, Message::Error { ref class, ref desc, .. }
                if class == "GenericError" && desc.contains("nonsense")),
                "{m:?}"
            );
        }
    }

    #[test]
    fn boot_events_and_replies_interleaved() {
        let text = fixture("tcg/events.boot.jsonl");
        let mut names = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match parse_message(line).unwrap() {
                Message::Event {
                    name,
                    data,
                    timestamp_us,
                } => {
                    assert!(timestamp_us.unwrap() > 1_700_000_000_000_000);
                    if name == "VSERPORT_CHANGE" {
                        assert_eq!(data["id"], "gaport");
                        assert_eq!(data["open"], true);
                    }
                    names.push(name);
                }
                Message::Return { .. } | Message::Greeting { .. } => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            names,
            vec![
                "NIC_RX_FILTER_CHANGED",
                "NIC_RX_FILTER_CHANGED",
                "VSERPORT_CHANGE",
                "STOP",
                "RESUME"
            ]
        );
    }

    #[test]
    fn error_and_event_shapes() {
        let m = parse_message(
            r#"{"id": "cap-35", "error": {"class": "CommandNotFound", "desc": "nope"}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            Message::Error {
                id: Some("cap-35".into()),
                class: "CommandNotFound".into(),
                desc: "nope".into()
            }
        );
        let m =
            parse_message(r#"{"timestamp": {"seconds": -1, "microseconds": -1}, "event": "STOP"}"#)
                .unwrap();
        assert_eq!(
            m,
            Message::Event {
                name: "STOP".into(),
                data: Json::Null,
                timestamp_us: None
            }
        );
        assert!(parse_message("[1]").is_err());
        assert!(parse_message("{\"x\":1}").is_err());
        assert!(parse_message("{").is_err());
    }

    #[test]
    fn event_lines_are_told_apart_without_parsing_values() {
        let text = fixture("tcg/events.boot.jsonl");
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let is_event = matches!(parse_message(line), Ok(Message::Event { .. }));
            assert_eq!(is_event_line(line.as_bytes()), is_event, "{line}");
        }
        for (name, event) in [
            ("tcg/greeting.json", false),
            ("tcg/query-status.json", false),
            ("tcg/error.unknown-command.json", false),
        ] {
            assert_eq!(
                is_event_line(fixture(name).trim().as_bytes()),
                event,
                "{name}"
            );
        }
        // A reply that mentions "event" inside its value is a reply.
        assert!(!is_event_line(
            br#"{"return": {"event": "X"}, "id": "cis490-3"}"#
        ));
        assert!(!is_event_line(br#"{"event": "X", "return": {}}"#));
        assert!(!is_event_line(b"{\"event\": "));
        assert!(is_event_line(br#"{"event": "X"}"#));
    }

    #[test]
    fn qdev_ids() {
        assert_eq!(qdev_id("/machine/peripheral/vblk0/virtio-backend"), "vblk0");
        assert_eq!(qdev_id("ide0-hd0"), "ide0-hd0");
    }

    /// The rows of the KVM vCPU fixture with its first result's stats edited by `edit`:
    /// (the edited vCPU's row, the other one).
    fn vcpu_rows_with(edit: impl FnOnce(&mut Vec<Json>)) -> (StatsRow, StatsRow) {
        let mut v = ret("kvm/query-stats.vcpu");
        edit(v[0]["stats"].as_array_mut().unwrap());
        let edited = v[0]["qom-path"].as_str().unwrap().to_owned();
        let mut rows = stats_rows(v).unwrap();
        assert_eq!(rows.len(), 2);
        let i = rows
            .iter()
            .position(|r| r.qom_path.as_deref() == Some(edited.as_str()))
            .unwrap();
        let row = rows.remove(i);
        (row, rows.remove(0))
    }

    fn keys_unique(row: &StatsRow) {
        let mut seen = std::collections::HashSet::new();
        for (k, _) in &row.fields {
            assert!(seen.insert(k.clone()), "duplicate column {k}");
        }
    }

    #[test]
    fn stat_name_collision_same_name_twice_keeps_the_first() {
        let (r, other) = vcpu_rows_with(|stats| {
            let exits = stats.iter().find(|s| s["name"] == "exits").unwrap()["value"].clone();
            assert_ne!(exits, 999);
            stats.push(serde_json::json!({"name": "exits", "value": 999}));
        });
        keys_unique(&r);
        assert_ne!(field(&r.fields, "kvm_exits"), &Value::U64(999));
        assert_eq!(r.collisions, vec!["kvm/exits"]);
        assert!(other.collisions.is_empty());
    }

    #[test]
    fn stat_name_collision_dash_dot_and_case_map_to_one_column() {
        let (r, _) = vcpu_rows_with(|stats| {
            stats.push(serde_json::json!({"name": "a-b", "value": 1}));
            stats.push(serde_json::json!({"name": "a.b", "value": 2}));
            stats.push(serde_json::json!({"name": "A_B", "value": 3}));
        });
        keys_unique(&r);
        assert_eq!(field(&r.fields, "kvm_a_b"), &Value::U64(1));
        assert_eq!(r.collisions, vec!["kvm/a.b", "kvm/A_B"]);
    }

    #[test]
    fn stat_name_collision_histogram_count_against_a_stat_named_like_it() {
        // A stat named like the histogram's summary column, after the histogram...
        let (r, _) = vcpu_rows_with(|stats| {
            stats.push(serde_json::json!({"name": "halt_wait_hist_count", "value": 7777}));
        });
        keys_unique(&r);
        assert_ne!(
            field(&r.fields, "kvm_halt_wait_hist_count"),
            &Value::U64(7777)
        );
        assert!(matches!(
            field(&r.fields, "kvm_halt_wait_hist_buckets"),
            Value::Str(_)
        ));
        assert_eq!(r.collisions, vec!["kvm/halt_wait_hist_count"]);
        // ... and before it: the stat wins, and the histogram loses both its columns.
        let (r, _) = vcpu_rows_with(|stats| {
            stats.insert(
                0,
                serde_json::json!({"name": "halt_wait_hist_count", "value": 7777}),
            );
        });
        keys_unique(&r);
        assert_eq!(
            field(&r.fields, "kvm_halt_wait_hist_count"),
            &Value::U64(7777)
        );
        assert!(!r
            .fields
            .iter()
            .any(|(k, _)| k == "kvm_halt_wait_hist_buckets"));
        assert_eq!(r.collisions, vec!["kvm/halt_wait_hist"]);
    }

    #[test]
    fn stat_names_of_real_replies_do_not_collide() {
        for name in [
            "kvm/query-stats.vcpu",
            "kvm/query-stats.vm",
            "kvm/query-stats.vcpu.kvm.names",
        ] {
            for r in stats_rows(ret(name)).unwrap() {
                keys_unique(&r);
                assert!(r.collisions.is_empty(), "{name}: {:?}", r.collisions);
            }
        }
    }

    #[test]
    fn column_names_are_sanitized() {
        assert_eq!(
            column(&["cryptodev", "asym-sign-bytes"]),
            "cryptodev_asym_sign_bytes"
        );
        assert_eq!(column(&["kvm", "x\"y\n"]), "kvm_x_y_");
    }
}

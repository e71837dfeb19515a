//! meta.json as types: what the writer serializes and what `cis490 validate` deserializes
//! (strictly: every key of the contract present, `null` where a value is unknown, unknown
//! keys refused except in the two open maps, `sources[]` and `result` extras).

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::EndReason;

/// A key that must be present but may be `null` (serde's default for `Option` would
/// accept a missing key as `null`, and a missing key is a contract violation).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub episode_id: String,
    pub schema_version: u32,
    pub tool: Tool,
    pub started_at_wall: String,
    #[serde(deserialize_with = "present")]
    pub ended_at_wall: Option<String>,
    pub clock: ClockMeta,
    pub host_fingerprint: HostFingerprint,
    pub vm: Vm,
    #[serde(deserialize_with = "present")]
    pub exploit: Option<Value>,
    #[serde(deserialize_with = "present")]
    pub sample: Option<Value>,
    pub schedule: Schedule,
    pub backend: BackendMeta,
    pub sources: Vec<SourceMeta>,
    #[serde(deserialize_with = "present")]
    pub result: Option<ResultMeta>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockMeta {
    pub mono_origin_ns: u64,
    pub wall_origin_ns: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFingerprint {
    pub hostname: String,
    pub kernel: String,
    pub cpus: usize,
    #[serde(deserialize_with = "present")]
    pub qemu_version: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuThread {
    pub index: u32,
    pub tid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub target_pid: u32,
    pub qemu_cmdline: Vec<String>,
    #[serde(deserialize_with = "present")]
    pub vcpus: Option<u32>,
    #[serde(deserialize_with = "present")]
    pub ram_mib: Option<u64>,
    pub vcpu_threads: Vec<VcpuThread>,
    #[serde(deserialize_with = "present")]
    pub image_name: Option<String>,
    #[serde(deserialize_with = "present")]
    pub image_sha256: Option<String>,
    #[serde(deserialize_with = "present")]
    pub snapshot_name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    pub interval_ns: u64,
    pub rate_hz: u32,
    #[serde(deserialize_with = "present")]
    pub baseline_seconds: Option<f64>,
    #[serde(deserialize_with = "present")]
    pub infected_seconds: Option<f64>,
    #[serde(deserialize_with = "present")]
    pub dormant_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendMeta {
    pub requested: String,
    pub used: String,
    #[serde(deserialize_with = "present")]
    pub fallback_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceMeta {
    pub name: String,
    pub file: String,
    pub available_in_deployment: bool,
    pub rows: u64,
    pub errors: u64,
    /// Source-specific facts (e.g. the agent's reject counts).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResultMeta {
    pub end_reason: EndReason,
    pub phases_observed: Vec<String>,
    pub pid_alive_at_end: bool,
    pub duration_observed_s: f64,
    pub ticks_scheduled: u64,
    pub ticks_missed: u64,
    pub rows_total: u64,
    /// The error message when `end_reason` is `error`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// Backend-specific results (e.g. per-program BPF run-time statistics).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

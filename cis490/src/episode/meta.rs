//! meta.json: the episode's description, written atomically at start and at end.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub episode_id: String,
    pub schema_version: u32,
    pub tool: Tool,
    pub started_at_wall: String,
    pub ended_at_wall: Option<String>,
    pub clock: ClockMeta,
    pub host_fingerprint: HostFingerprint,
    pub vm: Vm,
    pub exploit: Option<Value>,
    pub sample: Option<Value>,
    pub schedule: Schedule,
    pub backend: BackendMeta,
    pub sources: Vec<SourceMeta>,
    pub result: Option<ResultMeta>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ClockMeta {
    pub mono_origin_ns: u64,
    pub wall_origin_ns: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostFingerprint {
    pub hostname: String,
    pub kernel: String,
    pub cpus: usize,
    pub qemu_version: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuThread {
    pub index: u32,
    pub tid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vm {
    pub target_pid: u32,
    pub qemu_cmdline: Vec<String>,
    pub vcpus: Option<u32>,
    pub ram_mib: Option<u64>,
    pub vcpu_threads: Vec<VcpuThread>,
    pub image_name: Option<String>,
    pub image_sha256: Option<String>,
    pub snapshot_name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Schedule {
    pub interval_ns: u64,
    pub rate_hz: u32,
    pub baseline_seconds: Option<f64>,
    pub infected_seconds: Option<f64>,
    pub dormant_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendMeta {
    pub requested: String,
    pub used: String,
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
    pub end_reason: String,
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

/// The caller-supplied `--meta FILE` keys, validated so a typo is an error, not lost data.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserMeta {
    pub image_name: Option<String>,
    pub image_sha256: Option<String>,
    pub snapshot_name: Option<String>,
    pub exploit: Option<Value>,
    pub sample: Option<Value>,
    pub baseline_seconds: Option<f64>,
    pub infected_seconds: Option<f64>,
    pub dormant_seconds: Option<f64>,
}

impl UserMeta {
    pub fn parse(text: &str) -> Result<Self, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        if !value.is_object() {
            return Err("must be a JSON object".into());
        }
        serde_json::from_value(value).map_err(|e| {
            format!(
                "{e} (accepted keys: image_name, image_sha256, snapshot_name, exploit, sample, \
                 baseline_seconds, infected_seconds, dormant_seconds)"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_meta_accepts_known_keys_and_refuses_typos() {
        let m =
            UserMeta::parse(r#"{"image_name":"win10","exploit":{"cve":"CVE-1"},"sample":null}"#)
                .unwrap();
        assert_eq!(m.image_name.as_deref(), Some("win10"));
        assert_eq!(m.exploit.unwrap()["cve"], "CVE-1");
        let err = UserMeta::parse(r#"{"imag_name":"x"}"#).unwrap_err();
        assert!(err.contains("imag_name"), "{err}");
        assert!(UserMeta::parse("[1]").is_err());
        assert!(UserMeta::parse("{").is_err());
    }
}

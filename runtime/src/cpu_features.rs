//! The CPU's vector instruction sets, as they decide which kernels ONNX Runtime's MLAS runs:
//! fp32 GEMMs on AVX-512F or AVX2+FMA, int8 GEMMs on AMX, AVX-512 VNNI, AVX-VNNI or plain
//! AVX2 (in that order of preference). `agiqa bench` prints them so that a throughput figure
//! comes with the hardware path that produced it.

use serde::Serialize;

/// What this CPU offers ONNX Runtime's kernels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CpuFeatures {
    /// The CPU's name, where the OS says it (`/proc/cpuinfo` on Linux).
    pub model: Option<String>,
    /// The instruction sets detected, of those MLAS dispatches on.
    pub detected: Vec<&'static str>,
    /// The fp32 GEMM path MLAS takes.
    pub fp32_path: &'static str,
    /// The int8 GEMM path MLAS takes (AMX needs Linux ≥ 5.16, which grants the tiles).
    pub int8_path: &'static str,
}

impl CpuFeatures {
    /// Detects this CPU's features at run time.
    pub fn detect() -> Self {
        let detected = detected_features();
        CpuFeatures {
            model: cpu_model(),
            fp32_path: fp32_path(&detected),
            int8_path: int8_path(&detected),
            detected,
        }
    }

    /// One line: `Intel Xeon …: fp32 AVX-512F, int8 AMX (avx2 fma avx512f …)`.
    pub fn summary(&self) -> String {
        format!(
            "{}: fp32 {}, int8 {} ({})",
            self.model.as_deref().unwrap_or("CPU"),
            self.fp32_path,
            self.int8_path,
            if self.detected.is_empty() {
                "no vector extensions detected".to_string()
            } else {
                self.detected.join(" ")
            }
        )
    }
}

fn fp32_path(detected: &[&str]) -> &'static str {
    let has = |f: &str| detected.contains(&f);
    if has("avx512f") {
        "AVX-512F"
    } else if has("avx2") && has("fma") {
        "AVX2+FMA"
    } else if has("avx") {
        "AVX"
    } else {
        "SSE or scalar"
    }
}

fn int8_path(detected: &[&str]) -> &'static str {
    let has = |f: &str| detected.contains(&f);
    if has("amx_int8") && has("amx_tile") {
        "AMX"
    } else if has("avx512_vnni") {
        "AVX-512 VNNI"
    } else if has("avx_vnni") {
        "AVX-VNNI"
    } else if has("avx512bw") {
        "AVX-512BW"
    } else if has("avx2") {
        "AVX2"
    } else {
        "SSE or scalar"
    }
}

/// The features MLAS cares about, named as Linux's `/proc/cpuinfo` names them.
const RELEVANT: [&str; 10] = [
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
];

#[cfg(target_arch = "x86_64")]
fn detected_features() -> Vec<&'static str> {
    // The standard library's detection (CPUID) for what it names; AVX-VNNI and AMX from
    // /proc/cpuinfo, which also says whether the kernel enabled them.
    let flags = cpuinfo_flags();
    RELEVANT
        .into_iter()
        .filter(|&f| match f {
            "avx" => std::arch::is_x86_feature_detected!("avx"),
            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
            "fma" => std::arch::is_x86_feature_detected!("fma"),
            "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
            "avx512_vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
            "avx512_bf16" => std::arch::is_x86_feature_detected!("avx512bf16"),
            other => flags.iter().any(|flag| flag == other),
        })
        .collect()
}

#[cfg(not(target_arch = "x86_64"))]
fn detected_features() -> Vec<&'static str> {
    let flags = cpuinfo_flags();
    RELEVANT
        .into_iter()
        .filter(|f| flags.iter().any(|flag| flag == f))
        .collect()
}

fn cpuinfo() -> String {
    std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()
}

fn cpuinfo_flags() -> Vec<String> {
    cpuinfo()
        .lines()
        .find(|line| line.starts_with("flags"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, flags)| flags.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn cpu_model() -> Option<String> {
    cpuinfo()
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paths_follow_mlas_preference_order() {
        let sapphire_rapids = [
            "avx",
            "avx2",
            "fma",
            "avx512f",
            "avx512_vnni",
            "amx_tile",
            "amx_int8",
        ];
        assert_eq!(fp32_path(&sapphire_rapids), "AVX-512F");
        assert_eq!(int8_path(&sapphire_rapids), "AMX");
        let ice_lake = ["avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"];
        assert_eq!(int8_path(&ice_lake), "AVX-512 VNNI");
        let alder_lake = ["avx", "avx2", "fma", "avx_vnni"];
        assert_eq!(
            (fp32_path(&alder_lake), int8_path(&alder_lake)),
            ("AVX2+FMA", "AVX-VNNI")
        );
        assert_eq!(int8_path(&[]), "SSE or scalar");
    }

    #[test]
    fn detection_finds_only_known_names() {
        let features = CpuFeatures::detect();
        assert!(features.detected.iter().all(|f| RELEVANT.contains(f)));
        assert!(features.summary().contains(features.int8_path));
    }
}

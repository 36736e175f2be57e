//! The NVIDIA GPUs this machine has, as the driver reports them (`nvidia-smi`, which ships with
//! every Linux driver), and a plain reason when there is no driver.

/// One GPU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Gpu {
    pub index: u32,
    pub name: String,
    pub driver: String,
    /// e.g. `9.0` (H100/H200), `8.9` (L4, RTX 4090).
    pub compute_capability: String,
    pub memory_total_mib: Option<u64>,
}

/// What the driver says.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GpuReport {
    pub gpus: Vec<Gpu>,
    /// Why no GPU is listed (no driver, driver/library mismatch), when none is.
    pub problem: Option<String>,
    /// `CUDA_VISIBLE_DEVICES` as set (CUDA numbers only the GPUs it names).
    pub cuda_visible_devices: Option<String>,
}

const QUERY: &str = "--query-gpu=index,name,driver_version,compute_cap,memory.total";

/// Asks `nvidia-smi` (on `PATH`, or the driver's usual folder).
pub fn query() -> GpuReport {
    let cuda_visible_devices = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let (gpus, problem) = match crate::nvidia_smi::run(&[QUERY, "--format=csv,noheader,nounits"]) {
        Err(e) => (Vec::new(), Some(e.to_string())),
        Ok(text) => {
            let gpus = parse(&text);
            let problem = gpus
                .is_empty()
                .then(|| "nvidia-smi lists no GPU".to_string());
            (gpus, problem)
        }
    };
    GpuReport {
        gpus,
        problem,
        cuda_visible_devices,
    }
}

/// `nvidia-smi --format=csv,noheader,nounits` lines; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Gpu> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [index, name, driver, cc, memory] = fields[..] else {
                return None;
            };
            Some(Gpu {
                index: index.parse().ok()?,
                name: name.to_string(),
                driver: driver.to_string(),
                compute_capability: cc.to_string(),
                memory_total_mib: memory.parse().ok(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_csv_is_parsed() {
        let gpus = parse("0, NVIDIA H200, 580.95.05, 9.0, 143771\n1, NVIDIA L4, 580.95.05, 8.9, [N/A]\nbad line\n");
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].name, "NVIDIA H200");
        assert_eq!(gpus[0].compute_capability, "9.0");
        assert_eq!(gpus[0].memory_total_mib, Some(143771));
        assert_eq!(gpus[1].index, 1);
        assert_eq!(gpus[1].memory_total_mib, None);
    }
}

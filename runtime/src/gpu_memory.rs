//! GPU memory held by this process, as the NVIDIA driver reports it (`nvidia-smi`), so that
//! `agiqa bench` can print what a model at a batch size costs on the GPU. ONNX Runtime's CUDA
//! arena does not report its size through the C API, and the driver's figure is also what an
//! operator sees.

/// Memory this process holds on every GPU, in MiB, or why it is unknown.
pub fn used_by_this_process() -> Result<u64, String> {
    let csv = crate::nvidia_smi::run(&[
        "--query-compute-apps=pid,used_memory",
        "--format=csv,noheader,nounits",
    ])
    .map_err(|e| e.to_string())?;
    used_by(&csv, std::process::id())
        .ok_or_else(|| "nvidia-smi lists no GPU memory for this process".to_string())
}

/// Sums the `pid, used_memory` lines of `csv` (nvidia-smi's `--query-compute-apps`) for `pid`.
fn used_by(csv: &str, pid: u32) -> Option<u64> {
    let mut total = None;
    for line in csv.lines() {
        let mut fields = line.split(',').map(str::trim);
        let (Some(p), Some(mib)) = (fields.next(), fields.next()) else {
            continue;
        };
        if p.parse::<u32>().ok() == Some(pid) {
            if let Ok(mib) = mib.parse::<u64>() {
                *total.get_or_insert(0) += mib;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_this_pid_over_gpus_and_ignores_others() {
        let csv = "4242, 1536\n17, 900\n4242, 512\n[N/A], [N/A]\n";
        assert_eq!(used_by(csv, 4242), Some(2048));
        assert_eq!(used_by(csv, 17), Some(900));
        assert_eq!(used_by(csv, 5), None);
        assert_eq!(used_by("", 5), None);
    }
}

//! Runs the NVIDIA driver's `nvidia-smi`, the one way to read GPU names, compute capabilities
//! and per-process memory without linking the driver: on `PATH`, else in the driver's usual
//! folders. Used by `doctor`, `bench` and the TensorRT cache key.

use std::process::Command;

/// Why `nvidia-smi` gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum NvidiaSmiError {
    #[error("no NVIDIA driver found: nvidia-smi is not installed")]
    NotInstalled,
    #[error("the NVIDIA driver does not answer: nvidia-smi: {0}")]
    Failed(String),
}

const CANDIDATES: [&str; 3] = [
    "nvidia-smi",
    "/usr/bin/nvidia-smi",
    "/usr/local/nvidia/bin/nvidia-smi",
];

/// `nvidia-smi ARGS`' standard output, or why there is none.
pub fn run(args: &[&str]) -> Result<String, NvidiaSmiError> {
    let output = CANDIDATES
        .iter()
        .find_map(|cmd| Command::new(cmd).args(args).output().ok())
        .ok_or(NvidiaSmiError::NotInstalled)?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let said: Vec<&str> = stdout.trim().lines().chain(stderr.trim().lines()).collect();
        return Err(NvidiaSmiError::Failed(said.join(" ")));
    }
    Ok(stdout)
}

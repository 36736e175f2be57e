//! Where tensors live: device names (`cpu`, `cuda`, `cuda:N`, `auto`) and loading libtorch's CUDA
//! backend at run time. Used by the trainer and the exporter alike.

use tch::Device;

/// Why a requested device cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceError {
    #[error("device {requested:?} requested but {reason}")]
    CudaUnavailable { requested: String, reason: String },
    #[error("unknown device {0:?}: use cpu, cuda, cuda:N or auto")]
    Unknown(String),
}

/// Makes libtorch's CUDA backend available when the machine has it, and says why not otherwise.
///
/// The linker drops `libtorch_cuda.so` (nothing references it by symbol), and linking it
/// unconditionally would stop the binary from starting on machines without CUDA libraries. So
/// it is loaded here, at run time: its static initialisers register CUDA with libtorch.
pub fn enable_cuda() -> Result<(), String> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            // SAFETY: loading libtorch's own CUDA library runs only libtorch's initialisers.
            let library = unsafe { libloading::Library::new("libtorch_cuda.so") }.map_err(|e| {
                let detail = std::error::Error::source(&e)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default();
                format!("libtorch_cuda.so could not be loaded ({e}{detail})")
            })?;
            // Kept loaded for the life of the process.
            std::mem::forget(library);
            if tch::Cuda::is_available() {
                Ok(())
            } else {
                Err("libtorch_cuda.so is loaded but no CUDA device is visible".into())
            }
        })
        .clone()
}

/// Picks the device a config names: `auto` (CUDA when available, else CPU, saying why),
/// `cpu`, `cuda` or `cuda:N` (an error when CUDA cannot be used).
pub fn device_from(name: &str) -> Result<Device, DeviceError> {
    let cuda = |index: usize| {
        enable_cuda()
            .map(|()| Device::Cuda(index))
            .map_err(|reason| DeviceError::CudaUnavailable {
                requested: name.to_string(),
                reason,
            })
    };
    match name {
        "auto" => Ok(match enable_cuda() {
            Ok(()) => Device::Cuda(0),
            Err(reason) => {
                eprintln!("note: running on CPU ({reason})");
                Device::Cpu
            }
        }),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(index) => cuda(index),
            None => Err(DeviceError::Unknown(other.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_ones_are_refused() {
        assert_eq!(device_from("cpu").unwrap(), Device::Cpu);
        let err = device_from("tpu").unwrap_err().to_string();
        assert!(err.contains("cpu, cuda, cuda:N or auto"), "{err}");
        assert!(device_from("cuda:x").is_err());
    }
}

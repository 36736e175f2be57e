//! Where tensors live: device names (`cpu`, `cuda`, `cuda:N`, `auto`), loading libtorch's CUDA
//! backend at run time, and turning an out-of-memory failure into an error that says what to
//! change. Used by the trainer and the exporter alike.

use tch::Device;

/// Why a requested device cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceError {
    #[error("device {requested:?} requested but {reason}")]
    CudaUnavailable { requested: String, reason: String },
    #[error("unknown device {0:?}: use cpu, cuda, cuda:N or auto")]
    Unknown(String),
    #[error("device {requested:?} requested but only {count} CUDA device(s) are visible (cuda:0 … cuda:{last}); check CUDA_VISIBLE_DEVICES", last = count.saturating_sub(1))]
    OutOfRange { requested: String, count: i64 },
    #[error(
        "out of memory on {device} at batch size {batch_size} ({detail}); pass a smaller \
         --batch-size (e.g. {smaller})",
        smaller = (batch_size / 2).max(1)
    )]
    OutOfMemory {
        device: String,
        batch_size: usize,
        detail: String,
    },
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

/// `cpu`, `cuda:0`, …: how logs, checkpoints and errors name a device.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Cpu => "cpu".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// `cpu` or `cuda`: the part of a device that changes computed values (the feature-cache key).
pub fn device_kind(device: Device) -> &'static str {
    match device {
        Device::Cuda(_) => "cuda",
        Device::Cpu => "cpu",
        Device::Mps => "mps",
        Device::Vulkan => "vulkan",
    }
}

/// Runs `f` (a forward or training step over `batch_size` images on `device`), turning
/// libtorch's out-of-memory failure — a panic inside tch's non-`f_` methods — into
/// [`DeviceError::OutOfMemory`]. Any other panic continues unwinding.
pub fn catch_oom<T>(
    device: Device,
    batch_size: usize,
    f: impl FnOnce() -> T,
) -> Result<T, DeviceError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let text = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        match out_of_memory_line(text) {
            Some(detail) => DeviceError::OutOfMemory {
                device: device_name(device),
                batch_size,
                detail,
            },
            None => std::panic::resume_unwind(payload),
        }
    })
}

/// The line of a libtorch message that reports an allocation failure, if it is one.
fn out_of_memory_line(text: &str) -> Option<String> {
    const MARKERS: [&str; 3] = [
        "CUDA out of memory",
        "CUBLAS_STATUS_ALLOC_FAILED",
        "DefaultCPUAllocator: can't allocate memory",
    ];
    text.lines()
        .find(|line| MARKERS.iter().any(|m| line.contains(m)))
        .map(|line| {
            let line = line.trim();
            // tch prefixes "called `Result::unwrap()` on an `Err` value: Torch(\"…"
            let start = MARKERS
                .iter()
                .filter_map(|m| line.find(m))
                .min()
                .unwrap_or(0);
            let detail = &line[start..];
            detail.chars().take(200).collect()
        })
}

/// Picks the device a config names: `auto` (CUDA when available, else CPU, saying why),
/// `cpu`, `cuda` or `cuda:N` (an error when CUDA cannot be used).
pub fn device_from(name: &str) -> Result<Device, DeviceError> {
    let cuda = |index: usize| {
        enable_cuda().map_err(|reason| DeviceError::CudaUnavailable {
            requested: name.to_string(),
            reason,
        })?;
        let count = tch::Cuda::device_count();
        if index as i64 >= count {
            return Err(DeviceError::OutOfRange {
                requested: name.to_string(),
                count,
            });
        }
        Ok(Device::Cuda(index))
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
        assert_eq!(device_name(Device::Cuda(1)), "cuda:1");
        assert_eq!(device_kind(Device::Cuda(1)), "cuda");
    }

    #[test]
    fn cuda_without_a_usable_gpu_says_why() {
        // On a machine with a GPU and its libraries this test has nothing to check.
        if enable_cuda().is_ok() {
            let count = tch::Cuda::device_count();
            let err = device_from(&format!("cuda:{count}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("CUDA device(s) are visible"), "{err}");
            return;
        }
        let err = device_from("cuda:0").unwrap_err().to_string();
        assert!(err.starts_with("device \"cuda:0\" requested but"), "{err}");
        assert!(
            err.contains("libtorch_cuda.so") || err.contains("no CUDA device"),
            "{err}"
        );
        assert_eq!(device_from("auto").unwrap(), Device::Cpu);
    }

    #[test]
    fn out_of_memory_becomes_a_batch_size_hint() {
        let message = "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. \
                       Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)\nException raised from …\")";
        let err = catch_oom(Device::Cuda(0), 64, || -> () {
            std::panic::panic_any(message.to_string())
        })
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("out of memory on cuda:0 at batch size 64 (CUDA out of memory. Tried"),
            "{text}"
        );
        assert!(text.contains("--batch-size (e.g. 32)"), "{text}");
        assert!(!text.contains("Exception raised"), "{text}");
        assert_eq!(catch_oom(Device::Cpu, 8, || 5).unwrap(), 5);
        // Other panics are not swallowed.
        let other =
            std::panic::catch_unwind(|| catch_oom(Device::Cpu, 8, || panic!("shape mismatch")));
        assert!(other.is_err());
    }
}

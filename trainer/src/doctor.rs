//! `agiqa-train doctor`: what this process's libtorch can run on — the library loaded (path,
//! version), whether its CUDA backend loads (and the exact reason when not), the GPUs (name,
//! compute capability, memory, from the CUDA driver), cuDNN, and which precisions work.

use std::ffi::{c_char, c_int, c_uint};
use std::fmt;
use std::path::PathBuf;

use serde::Serialize;
use tch::Device;

use crate::device::enable_cuda;
use crate::precision::Precision;

/// The libtorch version torch-sys (tch 0.24) was built against.
pub const LIBTORCH_BUILT_FOR: &str = "2.11.0";

/// One GPU as the CUDA driver describes it (ordinals follow `CUDA_VISIBLE_DEVICES`, as torch's).
#[derive(Clone, Debug, Serialize)]
pub struct Gpu {
    pub index: i32,
    pub name: String,
    /// `major.minor`, e.g. `9.0` for H100/H200.
    pub compute_capability: String,
    pub memory_gib: f64,
}

/// Everything `doctor` reports.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceReport {
    pub libtorch_built_for: String,
    /// `libtorch_cpu.so` as mapped into this process.
    pub libtorch_path: Option<PathBuf>,
    /// From the installation's `version.py` (PyTorch wheels) or `build-version` (libtorch zips).
    pub libtorch_version: Option<String>,
    /// `Ok` when libtorch's CUDA backend loaded and sees a device; else why not.
    pub cuda: Result<(), String>,
    pub cuda_device_count: i64,
    pub cudnn_available: bool,
    /// cuDNN and CUDA runtime versions libtorch reports (0 when CUDA is not loaded).
    pub cudnn_version: i64,
    pub cudart_version: i64,
    pub cuda_visible_devices: Option<String>,
    /// The driver's CUDA version (`13.0`) or why the driver library could not be asked.
    pub driver: Result<String, String>,
    pub gpus: Vec<Gpu>,
    /// The precisions CLIP can run in on CPU and on `cuda:0`, checked by running them.
    pub precisions: Vec<(String, Precision, Result<(), String>)>,
}

/// Probes this process's libtorch and the machine's CUDA set-up. Loads libtorch's CUDA backend
/// (as `--device cuda` would) but allocates only tiny probe tensors.
pub fn device_report() -> DeviceReport {
    let libtorch_path = loaded_library("libtorch_cpu.so");
    let libtorch_version = libtorch_path.as_ref().and_then(|p| installation_version(p));
    let cuda = enable_cuda();
    let cuda_ok = cuda.is_ok();
    let driver = cuda_driver();
    let (driver_version, gpus) = match driver {
        Ok((version, gpus)) => (Ok(version), gpus),
        Err(e) => (Err(e), Vec::new()),
    };
    let mut devices = vec![Device::Cpu];
    if cuda_ok {
        devices.push(Device::Cuda(0));
    }
    let precisions = devices
        .into_iter()
        .flat_map(|device| {
            [Precision::Fp32, Precision::Fp16, Precision::Bf16].map(move |p| {
                let name = crate::device::device_name(device);
                (name, p, p.check(device).map_err(|e| e.to_string()))
            })
        })
        .collect();
    DeviceReport {
        libtorch_built_for: LIBTORCH_BUILT_FOR.into(),
        libtorch_path,
        libtorch_version,
        cuda,
        cuda_device_count: if cuda_ok {
            tch::Cuda::device_count()
        } else {
            0
        },
        cudnn_available: cuda_ok && tch::Cuda::cudnn_is_available(),
        cudnn_version: if cuda_ok {
            tch::utils::version_cudnn()
        } else {
            0
        },
        cudart_version: if cuda_ok {
            tch::utils::version_cudart()
        } else {
            0
        },
        cuda_visible_devices: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
        driver: driver_version,
        gpus,
        precisions,
    }
}

/// The path of a shared library mapped into this process (from `/proc/self/maps`).
fn loaded_library(file_name: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.rsplit('/').next() == Some(file_name))
        .map(PathBuf::from)
}

/// `2.11.0+cu130` from `<torch>/version.py` or `<libtorch>/build-version`, beside `lib/`.
fn installation_version(library: &std::path::Path) -> Option<String> {
    let root = library.parent()?.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        let line = text.lines().find(|l| l.starts_with("__version__"))?;
        return Some(line.split(['\'', '"']).nth(1)?.to_string());
    }
    let text = std::fs::read_to_string(root.join("build-version")).ok()?;
    Some(text.trim().to_string())
}

type CuResult = c_int;

/// The driver version and the GPUs, from `libcuda.so.1` (the driver's own library: its C API is
/// small and stable, and tch exposes no device names).
fn cuda_driver() -> Result<(String, Vec<Gpu>), String> {
    // SAFETY: the CUDA driver library's initialisers only set up the driver.
    let lib = unsafe { libloading::Library::new("libcuda.so.1") }.map_err(|e| {
        let detail = std::error::Error::source(&e)
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        format!("no NVIDIA driver library ({e}{detail})")
    })?;
    // SAFETY: the signatures are those of cuda.h (CUDA 12/13), which the driver keeps stable.
    unsafe {
        let symbol = |name: &str| format!("libcuda.so.1 lacks {name}");
        let init: libloading::Symbol<unsafe extern "C" fn(c_uint) -> CuResult> =
            lib.get(b"cuInit\0").map_err(|_| symbol("cuInit"))?;
        let version: libloading::Symbol<unsafe extern "C" fn(*mut c_int) -> CuResult> = lib
            .get(b"cuDriverGetVersion\0")
            .map_err(|_| symbol("cuDriverGetVersion"))?;
        let count: libloading::Symbol<unsafe extern "C" fn(*mut c_int) -> CuResult> = lib
            .get(b"cuDeviceGetCount\0")
            .map_err(|_| symbol("cuDeviceGetCount"))?;
        let get: libloading::Symbol<unsafe extern "C" fn(*mut c_int, c_int) -> CuResult> = lib
            .get(b"cuDeviceGet\0")
            .map_err(|_| symbol("cuDeviceGet"))?;
        let name: libloading::Symbol<unsafe extern "C" fn(*mut c_char, c_int, c_int) -> CuResult> =
            lib.get(b"cuDeviceGetName\0")
                .map_err(|_| symbol("cuDeviceGetName"))?;
        let attribute: libloading::Symbol<
            unsafe extern "C" fn(*mut c_int, c_int, c_int) -> CuResult,
        > = lib
            .get(b"cuDeviceGetAttribute\0")
            .map_err(|_| symbol("cuDeviceGetAttribute"))?;
        let memory: libloading::Symbol<unsafe extern "C" fn(*mut usize, c_int) -> CuResult> = lib
            .get(b"cuDeviceTotalMem_v2\0")
            .map_err(|_| symbol("cuDeviceTotalMem_v2"))?;
        let check = |what: &str, status: CuResult| {
            if status == 0 {
                Ok(())
            } else {
                Err(format!("{what} failed with CUDA driver error {status}"))
            }
        };
        check("cuInit", init(0))?;
        let mut v = 0;
        check("cuDriverGetVersion", version(&mut v))?;
        let mut n = 0;
        check("cuDeviceGetCount", count(&mut n))?;
        let mut gpus = Vec::new();
        for index in 0..n {
            let mut device = 0;
            check("cuDeviceGet", get(&mut device, index))?;
            let mut buffer = [0 as c_char; 256];
            check("cuDeviceGetName", name(buffer.as_mut_ptr(), 256, device))?;
            let text = std::ffi::CStr::from_ptr(buffer.as_ptr())
                .to_string_lossy()
                .into_owned();
            // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR.
            let (mut major, mut minor) = (0, 0);
            check("cuDeviceGetAttribute", attribute(&mut major, 75, device))?;
            check("cuDeviceGetAttribute", attribute(&mut minor, 76, device))?;
            let mut bytes = 0usize;
            check("cuDeviceTotalMem", memory(&mut bytes, device))?;
            gpus.push(Gpu {
                index,
                name: text,
                compute_capability: format!("{major}.{minor}"),
                memory_gib: bytes as f64 / (1u64 << 30) as f64,
            });
        }
        Ok((format!("{}.{}", v / 1000, (v % 1000) / 10), gpus))
    }
}

impl fmt::Display for DeviceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown".into());
        writeln!(f, "libtorch (built for {})", self.libtorch_built_for)?;
        let path = self
            .libtorch_path
            .as_ref()
            .map_or("not found in this process".into(), |p| {
                p.display().to_string()
            });
        writeln!(f, "  loaded   {path}")?;
        writeln!(f, "  version  {}", or_unknown(&self.libtorch_version))?;
        match &self.cuda {
            Ok(()) => writeln!(
                f,
                "CUDA       available: {} device(s); CUDA runtime {}, cuDNN {} ({})",
                self.cuda_device_count,
                self.cudart_version,
                self.cudnn_version,
                if self.cudnn_available {
                    "available"
                } else {
                    "not available"
                }
            )?,
            Err(reason) => writeln!(f, "CUDA       not available: {reason}")?,
        }
        writeln!(
            f,
            "  CUDA_VISIBLE_DEVICES {}",
            self.cuda_visible_devices.as_deref().unwrap_or("(unset)")
        )?;
        match &self.driver {
            Ok(version) => writeln!(f, "  driver   CUDA {version}, {} GPU(s)", self.gpus.len())?,
            Err(reason) => writeln!(f, "  driver   {reason}")?,
        }
        for gpu in &self.gpus {
            writeln!(
                f,
                "  cuda:{}   {} (compute capability {}, {:.1} GiB)",
                gpu.index, gpu.name, gpu.compute_capability, gpu.memory_gib
            )?;
        }
        writeln!(f, "precisions (CLIP's ops run on a probe tensor)")?;
        for (device, precision, result) in &self.precisions {
            match result {
                Ok(()) => writeln!(f, "  {device:<7} {precision}: ok")?,
                Err(e) => writeln!(f, "  {device:<7} {precision}: no ({e})")?,
            }
        }
        if self.cuda.is_err() {
            writeln!(
                f,
                "hint: CUDA training needs libtorch 2.11's CUDA libraries (e.g. a PyTorch \
                 2.11.0+cu130 install's torch/lib and nvidia/*/lib) on LD_LIBRARY_PATH, and an \
                 NVIDIA driver"
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_loaded_libtorch_and_why_cuda_is_missing() {
        let report = device_report();
        let path = report
            .libtorch_path
            .as_ref()
            .expect("libtorch_cpu.so is mapped");
        assert!(path.ends_with("lib/libtorch_cpu.so"), "{path:?}");
        let version = report.libtorch_version.clone().unwrap_or_default();
        assert!(version.starts_with(LIBTORCH_BUILT_FOR), "{version}");
        let text = report.to_string();
        match &report.cuda {
            Ok(()) => assert!(report.cuda_device_count >= 1, "{text}"),
            Err(reason) => {
                assert!(!reason.is_empty());
                assert!(text.contains("CUDA       not available: "), "{text}");
                assert!(text.contains("hint: CUDA training needs"), "{text}");
            }
        }
        // fp32, fp16 and bf16 all run on this libtorch's CPU (see precision.rs).
        assert!(report
            .precisions
            .iter()
            .filter(|(d, _, _)| d == "cpu")
            .all(|(_, _, r)| r.is_ok()));
        assert!(text.contains("cpu     bf16: ok"), "{text}");
        serde_json::to_string(&report).unwrap();
    }
}

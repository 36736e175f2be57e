//! `agiqa doctor` on this CPU machine: a stub CUDA provider whose `DT_NEEDED` names a missing
//! `libcublasLt.so.13` is explained by that name, and the node placement of a fixture model.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::model;
use serde_json::Value;

fn agiqa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agiqa"))
        .args(args)
        .output()
        .expect("agiqa runs")
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "agiqa failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("doctor --json prints JSON")
}

fn cc(args: &[&str], dir: &Path) {
    let status = Command::new("cc")
        .args(args)
        .current_dir(dir)
        .status()
        .expect("cc runs (it builds libjpeg-turbo too)");
    assert!(status.success(), "cc {args:?}");
}

/// The CPU library this checkout's binaries use, by its real path.
fn cpu_library() -> std::path::PathBuf {
    agiqa_runtime::onnxruntime::locate_library(None).expect("scripts/setup has run")
}

#[test]
fn a_missing_cublaslt_is_named_for_the_cuda_provider() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("stub.c"), "int agiqa_stub(void) { return 1; }\n").unwrap();
    // A fake cuBLASLt to link against, deleted afterwards: the provider then names a library
    // that the loader cannot find, as on a machine without the CUDA 13 wheels.
    cc(
        &[
            "-shared",
            "-fPIC",
            "-o",
            "libcublasLt.so.13",
            "-Wl,-soname,libcublasLt.so.13",
            "stub.c",
        ],
        d,
    );
    cc(
        &[
            "-shared",
            "-fPIC",
            "-o",
            "libonnxruntime_providers_cuda.so",
            "stub.c",
            "-L.",
            "-Wl,--no-as-needed",
            "-l:libcublasLt.so.13",
        ],
        d,
    );
    std::fs::remove_file(d.join("libcublasLt.so.13")).unwrap();
    std::os::unix::fs::symlink(cpu_library(), d.join("libonnxruntime.so")).unwrap();
    let lib = d.join("libonnxruntime.so");
    let out = agiqa(&["doctor", "--json", "--ort-lib", lib.to_str().unwrap()]);
    let report = json(&out);
    assert_eq!(report["library"]["found"], lib.to_str().unwrap());
    let cuda = report["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "cuda")
        .expect("a cuda entry");
    assert_eq!(cuda["loads"], false);
    let missing: Vec<&str> = cuda["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(missing, ["libcublasLt.so.13"], "{cuda}");
    let summary = cuda["summary"].as_str().unwrap();
    assert!(summary.contains("missing libcublasLt.so.13"), "{summary}");
    // The TensorRT provider is not there at all: said so, with what to run.
    let trt = report["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "tensorrt")
        .unwrap();
    assert!(trt["library"].is_null());
    assert!(trt["summary"]
        .as_str()
        .unwrap()
        .contains("scripts/setup --gpu"));

    // The text form names it too.
    let out = agiqa(&["doctor", "--ort-lib", lib.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("missing: libcublasLt.so.13 (needed by"),
        "{text}"
    );
    assert!(text.contains("CUDA_VISIBLE_DEVICES"), "{text}");
}

#[test]
fn cpu_node_placement_counts_every_node_of_the_model() {
    let fixture = model("mean_f32.onnx");
    let out = agiqa(&[
        "doctor",
        "--json",
        "--provider",
        "cpu",
        "--model",
        fixture.to_str().unwrap(),
    ]);
    let report = json(&out);
    let nodes = report["placement"]["nodes"].as_object().expect("placement");
    assert_eq!(nodes.keys().collect::<Vec<_>>(), ["CPUExecutionProvider"]);
    let count = nodes["CPUExecutionProvider"].as_u64().unwrap();
    assert_eq!(count, EXPECTED_MEAN_F32_NODES, "{report}");
    assert_eq!(report["placement"]["requested"], "cpu");
}

/// `mean_f32.onnx` is ReduceMean → Mul → Add (scripts/fixtures/make_runtime_models.py); ONNX
/// Runtime fuses none of them on CPU.
const EXPECTED_MEAN_F32_NODES: u64 = 3;

#[test]
fn a_gpu_placement_on_a_cpu_library_is_an_error_not_a_silent_cpu_run() {
    let fixture = model("mean_f32.onnx");
    let out = agiqa(&[
        "doctor",
        "--provider",
        "cuda",
        "--model",
        fixture.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("provider cuda"), "{err}");
}

#[test]
fn libraries_in_the_library_path_file_are_preloaded_and_satisfy_the_provider() {
    let dir = tempfile::tempdir().unwrap();
    let (d, cuda) = (dir.path(), dir.path().join("cuda"));
    std::fs::create_dir(&cuda).unwrap();
    std::fs::write(d.join("stub.c"), "int agiqa_stub(void) { return 1; }\n").unwrap();
    for soname in ["libcudart.so.13", "libcublasLt.so.13"] {
        let out = format!("cuda/{soname}");
        let flag = format!("-Wl,-soname,{soname}");
        cc(&["-shared", "-fPIC", "-o", &out, &flag, "stub.c"], d);
    }
    cc(
        &[
            "-shared",
            "-fPIC",
            "-o",
            "libonnxruntime_providers_cuda.so",
            "stub.c",
            "-Lcuda",
            "-Wl,--no-as-needed",
            "-l:libcudart.so.13",
            "-l:libcublasLt.so.13",
        ],
        d,
    );
    // Relative to the file's folder, as scripts/setup --gpu and the bundle may write it.
    std::fs::write(d.join("library-path"), "# test\ncuda\n").unwrap();
    std::os::unix::fs::symlink(cpu_library(), d.join("libonnxruntime.so")).unwrap();
    let lib = d.join("libonnxruntime.so");
    let report = json(&agiqa(&[
        "doctor",
        "--json",
        "--ort-lib",
        lib.to_str().unwrap(),
    ]));
    let preloaded: Vec<(&str, bool)> = report["library"]["preloaded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["error"].is_null()))
        .collect();
    assert_eq!(
        preloaded,
        [("libcudart.so.13", true), ("libcublasLt.so.13", true)],
        "{report}"
    );
    let cuda = report["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "cuda")
        .unwrap();
    assert_eq!(cuda["missing"].as_array().unwrap().len(), 0, "{cuda}");
}

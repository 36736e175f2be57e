//! `scripts/bundle` on this CPU machine, cheaply: the `agiqa` binary and the CPU ONNX Runtime
//! split into 4 MB parts, unpacked by the bundle's `run` and `agiqa doctor` run from it; an older
//! ONNX Runtime is refused, and a damaged part is caught.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run_bundle(dir: &Path, args: &[&str], ort_dylib: Option<&Path>) -> Output {
    let mut command = Command::new(dir.join("run"));
    command.args(args).env_remove("ORT_DYLIB_PATH");
    if let Some(lib) = ort_dylib {
        command.env("ORT_DYLIB_PATH", lib);
    }
    command.output().expect("the bundle's run script starts")
}

#[test]
fn a_split_bundle_unpacks_runs_doctor_and_refuses_an_older_onnxruntime() {
    let tmp = tempfile::tempdir().unwrap();
    let lib_dir = tmp.path().join("ort");
    std::fs::create_dir(&lib_dir).unwrap();
    let cpu = agiqa_runtime::onnxruntime::locate_library(None).expect("scripts/setup has run");
    std::os::unix::fs::symlink(&cpu, lib_dir.join("libonnxruntime.so")).unwrap();
    let bundle = tmp.path().join("bundle");
    let agiqa = PathBuf::from(env!("CARGO_BIN_EXE_agiqa"));
    let out = Command::new("bash")
        .arg(workspace().join("scripts/bundle"))
        .arg("--out")
        .arg(&bundle)
        .arg("--bin")
        .arg(agiqa.parent().unwrap())
        .arg("--ort-lib")
        .arg(&lib_dir)
        .args(["--binaries", "agiqa", "--split-size", "4M", "--level", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bundle: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parts: Vec<_> = std::fs::read_dir(bundle.join("payload"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("libonnxruntime.so.1.31.1.zst.part-"))
        .collect();
    // 29 MB of library, ~12 MB compressed: several 4 MB parts.
    assert!(parts.len() >= 2, "{parts:?}");
    let manifest = std::fs::read_to_string(bundle.join("MANIFEST.txt")).unwrap();
    assert!(manifest.contains("NVIDIA driver"), "{manifest}");

    let out = run_bundle(&bundle, &["doctor", "--json"], None);
    assert!(
        out.status.success(),
        "run doctor: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let used = report["library"]["path"].as_str().unwrap();
    assert!(
        used.starts_with(bundle.join("unpacked/bin/lib").to_str().unwrap()),
        "{used}"
    );
    assert_eq!(report["library"]["version"], "1.31.1");

    let old = tmp.path().join("libonnxruntime.so.1.30.0");
    std::fs::write(&old, b"").unwrap();
    let out = run_bundle(&bundle, &["doctor"], Some(&old));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("1.30.0") && err.contains("older than 1.31.0"),
        "{err}"
    );

    // A damaged part: the next unpack refuses rather than running a broken library.
    let part = bundle.join("payload").join(&parts[0]);
    let bytes = std::fs::read(&part).unwrap();
    std::fs::write(&part, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_dir_all(bundle.join("unpacked")).unwrap();
    let out = run_bundle(&bundle, &["doctor"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("libonnxruntime.so.1.31.1.zst"), "{err}");
}

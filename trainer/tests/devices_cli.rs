//! `agiqa-train`'s device surface as a user (and `gpu-check`) meets it: `doctor --json`, the
//! flags a GPU run uses, and the error when CUDA is asked for where it cannot load.

use std::process::Command;

fn agiqa_train() -> Command {
    Command::new(env!("CARGO_BIN_EXE_agiqa-train"))
}

#[test]
fn doctor_json_reports_libtorch_and_cuda_status() {
    let out = agiqa_train().args(["doctor", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let version = report["libtorch_version"].as_str().unwrap_or_default();
    assert!(version.starts_with("2.11.0"), "{report}");
    // `cuda` is {"Ok": null} or {"Err": "<why>"}; a reason is never empty.
    match report["cuda"].get("Err").and_then(|e| e.as_str()) {
        Some(reason) => assert!(
            reason.contains("libtorch_cuda.so") || reason.contains("no CUDA device"),
            "{reason}"
        ),
        None => assert!(
            report["cuda_device_count"].as_i64().unwrap_or(0) >= 1,
            "{report}"
        ),
    }
    assert!(
        report["precisions"]
            .as_array()
            .is_some_and(|p| p.len() >= 3),
        "{report}"
    );
}

#[test]
fn train_documents_the_gpu_flags() {
    let out = agiqa_train().args(["train", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--device",
        "--precision",
        "--stop-after-epochs",
        "--resume",
        "--batch-size",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    assert!(help.contains("fp16") && help.contains("bf16"), "{help}");
}

#[test]
fn cuda_where_it_cannot_load_is_an_error_naming_why() {
    let doctor = agiqa_train().args(["doctor", "--json"]).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let device = if report["cuda"].get("Err").is_some() {
        "cuda".to_string()
    } else {
        // With a GPU: an index past the last one.
        format!("cuda:{}", report["cuda_device_count"].as_i64().unwrap_or(0))
    };
    let dir = std::env::temp_dir().join(format!("agiqa-devices-cli-{}", std::process::id()));
    let out = agiqa_train()
        .args(["train", "--random", "tiny", "--dataset"])
        .arg(format!("agiqa3k:{}", dir.join("missing").display()))
        .args(["--device", &device, "--out"])
        .arg(dir.join("run"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("device \"{device}\" requested but")),
        "{stderr}"
    );
    assert!(
        !dir.join("run").exists(),
        "nothing is written before the device is known"
    );
}

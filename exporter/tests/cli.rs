//! `agiqa-export` as users run it: a tiny untrained checkpoint exported with verification, a
//! Triton entry and a JSON report; a broken checkpoint refused with a clear message and no
//! file left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("agiqa-export-cli-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Building a random CLIP seeds and draws from libtorch's process-global generator; these tests
/// run in parallel, so they take turns there (the binary then rebuilds the same weights).
fn torch_rng_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn untrained(dir: &Path) -> PathBuf {
    let _turn = torch_rng_turn();
    let source = agiqa_trainer::clip::ClipSource::Random {
        preset: "tiny".into(),
        seed: 0,
    };
    let config = agiqa_trainer::model::ModelConfig {
        context_len: 4,
        ..Default::default()
    };
    let tokenizer = agiqa_trainer::tokenizer::ClipTokenizer::embedded().unwrap();
    agiqa_trainer::checkpoint::write_untrained(
        &source,
        &config,
        "quality",
        0,
        dir,
        &tokenizer,
        tch::Device::Cpu,
    )
    .unwrap()
}

fn export(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agiqa-export"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

#[test]
fn exports_verifies_and_writes_triton_and_report() {
    let dir = scratch("ok");
    let stem = untrained(&dir.join("run"));
    let onnx = dir.join("model.onnx");
    let report = dir.join("report.json");
    let triton = dir.join("triton");
    let output = export(&[
        stem.as_os_str(),
        "--out".as_ref(),
        onnx.as_os_str(),
        "--verify".as_ref(),
        "--fp16".as_ref(),
        "--triton".as_ref(),
        triton.as_os_str(),
        "--report".as_ref(),
        report.as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("PASSED (fp16)"), "{stdout}");
    assert!(triton.join("clip_agiqa/1/model.onnx").exists());
    assert!(triton.join("clip_agiqa/config.pbtxt").exists());
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["verify"]["passed"], true);
    assert_eq!(report["precision"], "fp16");
    assert_eq!(report["bytes"], std::fs::metadata(&onnx).unwrap().len());
}

/// `--int8` alone takes the default mode, `--verify` prints and reports the budget figures;
/// an impossible combination (int8 + fp16) is refused before anything is written.
#[test]
fn int8_exports_report_their_budget() {
    let dir = scratch("int8");
    let stem = untrained(&dir.join("run"));
    let onnx = dir.join("model.onnx");
    let report = dir.join("report.json");
    let output = export(&[
        stem.as_os_str(),
        "--out".as_ref(),
        onnx.as_os_str(),
        "--int8".as_ref(),
        "--verify".as_ref(),
        "--budget-count=16".as_ref(),
        "--report".as_ref(),
        report.as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("SRCC(int8, fp32 scores)"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let quantization = &report["quantization"];
    assert_eq!(
        quantization["mode"],
        agiqa_exporter::DEFAULT_INT8_MODE.name()
    );
    assert_eq!(quantization["accuracy"]["within_budget"], true);
    assert_eq!(quantization["accuracy"]["count"], 16);

    let refused = dir.join("refused.onnx");
    let output = export(&[
        stem.as_os_str(),
        "--out".as_ref(),
        refused.as_os_str(),
        "--int8=static".as_ref(),
        "--fp16".as_ref(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("drop --fp16"), "{stderr}");
    assert!(!refused.exists());
}

#[test]
fn a_broken_checkpoint_is_refused_and_nothing_is_written() {
    let dir = scratch("broken");
    let stem = untrained(&dir.join("run"));
    // Tensors that do not belong to the description: truncate the safetensors file.
    let tensors = dir.join("run/best.safetensors");
    let bytes = std::fs::read(&tensors).unwrap();
    std::fs::write(&tensors, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let output = export(&[
        stem.as_os_str(),
        "--out".as_ref(),
        out.join("model.onnx").as_os_str(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("best"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        0,
        "files left behind"
    );

    // Two checkpoints on different CLIP weights cannot share one graph.
    let other = {
        let _turn = torch_rng_turn();
        let source = agiqa_trainer::clip::ClipSource::Random {
            preset: "tiny".into(),
            seed: 9,
        };
        let tokenizer = agiqa_trainer::tokenizer::ClipTokenizer::embedded().unwrap();
        agiqa_trainer::checkpoint::write_untrained(
            &source,
            &Default::default(),
            "quality",
            0,
            &dir.join("other"),
            &tokenizer,
            tch::Device::Cpu,
        )
        .unwrap()
    };
    let good = untrained(&dir.join("good"));
    let output = export(&[
        format!("a={}", good.display()).as_ref(),
        format!("b={}", other.display()).as_ref(),
        "--out".as_ref(),
        out.join("multi.onnx").as_os_str(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("same image encoder weights"), "{stderr}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}

/// Every numeric flag refuses negative, zero (where meaningless), NaN and absurd values at
/// parse time: a clap usage error (exit 2) naming the flag, never a panic.
#[test]
fn numeric_flags_out_of_range_are_clear_errors_not_panics() {
    for flag in [
        "--verify-random=0",
        "--verify-random=-1",
        "--verify-random=nan",
        "--verify-random=1000000000",
        "--verify-images=-1",
        "--verify-images=1e9",
        "--triton-max-batch=0",
        "--triton-max-batch=-1",
        "--triton-max-batch=99999999999",
        "--triton-instances=0",
        "--triton-instances=nan",
    ] {
        let output = export(&[
            "run/best".as_ref(),
            "--out".as_ref(),
            "model.onnx".as_ref(),
            flag.as_ref(),
        ]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let name = flag.split('=').next().unwrap();
        assert_eq!(output.status.code(), Some(2), "{flag}: {stderr}");
        assert!(!stderr.contains("panicked"), "{flag}: {stderr}");
        assert!(
            stderr.contains("invalid value") && stderr.contains(name),
            "{flag}: {stderr}"
        );
    }
}

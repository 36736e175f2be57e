//! The `agiqa` binary end to end: `score` on a folder of good and corrupt images (JSONL, CSV,
//! resume, exit status), `bench --json`, and provider errors.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use agiqa_runtime::pipeline::{score_paths, PipelineOptions};
use common::{bad_images, good_images, load, model};
use serde_json::Value;

fn agiqa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agiqa"))
        .args(args)
        .output()
        .expect("agiqa runs")
}

/// `good` and `bad` images in `dir` (bad ones keep image extensions, so folders pick them up).
fn fill(dir: &Path) -> (usize, usize) {
    let good = good_images();
    let bad: Vec<_> = bad_images()
        .into_iter()
        .filter(|(name, _, _)| !name.ends_with(".txt") && !name.ends_with(".ppm"))
        .collect();
    std::fs::create_dir_all(dir.join("nested")).unwrap();
    for (i, (name, bytes)) in good.iter().enumerate() {
        let sub = if i % 2 == 0 { "" } else { "nested/" };
        std::fs::write(dir.join(format!("{sub}{name}")), bytes).unwrap();
    }
    for (name, bytes, _) in &bad {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    std::fs::write(dir.join("README.txt"), "not scored: no image extension").unwrap();
    (good.len(), bad.len())
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn pipeline_scores_good_images_and_reports_corrupt_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (n_good, n_bad) = fill(dir.path());
    let paths =
        agiqa_runtime::batch_io::collect_inputs(&[dir.path().display().to_string()], &[]).unwrap();
    assert_eq!(paths.len(), n_good + n_bad);
    let scorer = load("mean_f32.onnx");
    let mut results = Vec::new();
    let stats = score_paths(
        &scorer,
        &paths,
        &PipelineOptions::for_scorer(&scorer),
        |s| {
            results.push(s);
            true
        },
    );
    assert_eq!((stats.scored, stats.failed), (n_good, n_bad));
    assert_eq!(results.len(), n_good + n_bad);
    for r in &results {
        // Each result is the single-image score of its own file: no mix-ups across batches.
        match (&r.result, scorer.score_file(&r.path)) {
            (Ok(a), Ok(b)) => assert!((a[0] - b[0]).abs() < 1e-6, "{}", r.path.display()),
            (Err(_), Err(_)) => {}
            (a, b) => panic!("{}: {a:?} vs {b:?}", r.path.display()),
        }
    }
}

#[test]
fn score_writes_n_scores_and_m_errors_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let (n_good, n_bad) = fill(&images);
    let out = dir.path().join("scores.jsonl");
    let m = model("three_heads.onnx");
    let output = agiqa(&[
        "score",
        "--model",
        m.to_str().unwrap(),
        "--provider",
        "cpu",
        "--quiet",
        images.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !output.status.success(),
        "a failed image makes the exit status non-zero"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{n_bad} of {} images failed", n_good + n_bad)),
        "{stderr}"
    );
    let lines = jsonl(&out);
    let scored: Vec<_> = lines.iter().filter(|l| l.get("scores").is_some()).collect();
    let failed: Vec<_> = lines.iter().filter(|l| l.get("error").is_some()).collect();
    assert_eq!((scored.len(), failed.len()), (n_good, n_bad), "{lines:?}");
    for l in &scored {
        for head in ["quality", "alignment", "authenticity"] {
            assert!(l["scores"][head].is_f64(), "{l}");
        }
    }
    let truncated = failed
        .iter()
        .find(|l| l["path"].as_str().unwrap().ends_with("truncated.jpg"))
        .unwrap();
    assert!(
        truncated["error"].as_str().unwrap().contains("truncated"),
        "{truncated}"
    );

    // --resume: only the new image is scored and appended.
    std::fs::write(images.join("new.png"), &good_images()[1].1).unwrap();
    let output = agiqa(&[
        "score",
        "--model",
        m.to_str().unwrap(),
        "--provider",
        "cpu",
        "--quiet",
        "--resume",
        images.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = jsonl(&out);
    assert_eq!(lines.len(), n_good + n_bad + 1);
    assert!(lines.last().unwrap()["path"]
        .as_str()
        .unwrap()
        .ends_with("new.png"));
}

#[test]
fn score_writes_csv_from_a_list_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = good_images();
    let mut list = String::new();
    for (name, bytes) in good.iter().take(3) {
        std::fs::write(dir.path().join(name), bytes).unwrap();
        list.push_str(&format!("{name}\n"));
    }
    std::fs::write(dir.path().join("list.txt"), list).unwrap();
    let out = dir.path().join("scores.csv");
    let output = agiqa(&[
        "score",
        "--model",
        model("mean_u8.onnx").to_str().unwrap(),
        "--provider",
        "cpu",
        "--quiet",
        "--list",
        dir.path().join("list.txt").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows[0], "path,quality,error");
    assert_eq!(rows.len(), 4, "{text}");
    for row in &rows[1..] {
        let fields: Vec<&str> = row.split(',').collect();
        assert!(
            fields[1].parse::<f32>().is_ok() && fields[2].is_empty(),
            "{row}"
        );
    }
}

#[test]
fn bench_reports_json_per_batch_size_and_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in good_images() {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let output = agiqa(&[
        "bench",
        "--model",
        model("mean_f32.onnx").to_str().unwrap(),
        "--provider",
        "cpu",
        "--batch-sizes",
        "1,4",
        "--seconds",
        "0.2",
        "--json",
        "--images",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reports: Value = serde_json::from_slice(&output.stdout).unwrap();
    let report = &reports[0];
    assert_eq!(report["provider"], "cpu");
    let model_only = report["model_only"].as_array().unwrap();
    assert_eq!(model_only.len(), 2);
    for (m, n) in model_only.iter().zip([1, 4]) {
        assert_eq!(m["batch_size"], n);
        let l = &m["latency_ms"];
        let (p50, p95, p99) = (
            l["p50"].as_f64().unwrap(),
            l["p95"].as_f64().unwrap(),
            l["p99"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p95 && p95 <= p99, "{m}");
        assert!(m["images_per_second"].as_f64().unwrap() > 0.0);
    }
    let e2e = &report["end_to_end"];
    assert_eq!(e2e["scored"], good_images().len());
    assert!(e2e["images_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(e2e["jpeg_decoding"], "exact");
    // Decoding on its own, per core, beside the model's rate; and the CPU's kernel paths.
    let decode = &report["decode_per_core"];
    assert!(decode["images"].as_u64().unwrap() >= good_images().len() as u64);
    assert_eq!(decode["failed"], 0);
    assert!(decode["images_per_second"].as_f64().unwrap() > 0.0);
    assert!(decode["cores_to_feed_the_model"].as_f64().unwrap() > 0.0);
    assert!(report["cpu"]["int8_path"].is_string(), "{}", report["cpu"]);
}

#[test]
fn explicit_cuda_is_an_error_and_auto_says_it_fell_back() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.png"), &good_images()[1].1).unwrap();
    let m = model("mean_f32.onnx");
    let img = dir.path().join("a.png");
    let output = agiqa(&[
        "score",
        "--model",
        m.to_str().unwrap(),
        "--provider",
        "cuda",
        "--quiet",
        img.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("execution provider cuda could not be used"),
        "{stderr}"
    );
    let output = agiqa(&[
        "score",
        "--model",
        m.to_str().unwrap(),
        "--provider",
        "auto",
        "--quiet",
        img.to_str().unwrap(),
    ]);
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cuda unavailable") && stderr.contains("on cpu"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
}

#[test]
fn bench_reports_each_provider_and_fails_for_one_that_cannot_load() {
    let m = model("mean_f32.onnx");
    let output = agiqa(&[
        "bench",
        "--model",
        m.to_str().unwrap(),
        "--providers",
        "cpu,cuda",
        "--batch-sizes",
        "2",
        "--seconds",
        "0.05",
        "--json",
    ]);
    assert!(!output.status.success());
    let reports: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(reports[0]["provider"], "cpu");
    assert_eq!(reports[0]["model_only"][0]["batch_size"], 2);
    assert_eq!(reports[1]["provider"], "cuda");
    assert!(
        reports[1]["error"]
            .as_str()
            .unwrap()
            .contains("could not be used"),
        "{reports}"
    );
}

#[test]
fn a_model_that_does_not_fit_is_refused_with_its_reason() {
    let output = agiqa(&[
        "score",
        "--model",
        model("wrong_image_size.onnx").to_str().unwrap(),
        "--provider",
        "cpu",
        "x.png",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("wrong_image_size.onnx") && stderr.contains("R = 32"),
        "{stderr}"
    );
}

/// Every numeric flag refuses negative, zero (where meaningless), NaN, infinite and absurd
/// values at parse time: a clap usage error (exit 2) naming the flag, never a panic.
#[test]
fn numeric_flags_out_of_range_are_clear_errors_not_panics() {
    let model = ["--model", "absent.onnx"];
    let cases: &[(&str, &[&str])] = &[
        (
            "serve",
            &[
                "--timeout=-1",
                "--timeout=nan",
                "--timeout=0",
                "--timeout=inf",
                "--timeout=1e300",
                "--timeout=abc",
            ],
        ),
        (
            "serve",
            &[
                "--queue=0",
                "--queue=-1",
                "--queue=99999999999999999999",
                "--body-limit=0",
                "--max-wait-ms=-5",
                "--max-wait-ms=1e9",
            ],
        ),
        (
            "serve",
            &[
                "--batch-size=0",
                "--sessions=0",
                "--threads=0",
                "--device-id=-1",
                "--max-side=0",
                "--max-pixels=0",
            ],
        ),
        (
            "serve",
            &[
                "--header-timeout=nan",
                "--body-timeout=-1",
                "--keep-alive=0",
                "--max-connections=0",
                "--drain-grace=-1",
                "--drain-grace=nan",
            ],
        ),
        (
            "bench",
            &[
                "--seconds=nan",
                "--seconds=-1",
                "--seconds=0",
                "--seconds=1e300",
                "--batch-sizes=1,0",
                "--repeat=0",
                "--warmup=-1",
            ],
        ),
        ("score", &["--workers=0", "--batch-size=nan"]),
    ];
    for (command, flags) in cases {
        for flag in *flags {
            let mut args = vec![*command];
            args.extend(model);
            args.push(flag);
            if *command == "score" {
                args.push("some.png");
            }
            let output = agiqa(&args);
            let stderr = String::from_utf8_lossy(&output.stderr);
            let name = flag.split('=').next().unwrap();
            assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
            assert!(
                stderr.contains("invalid value") && stderr.contains(name),
                "{args:?}: {stderr}"
            );
        }
    }
    let output = agiqa(&["preprocess", "--image-size=0", "a.png"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--image-size"));
}

#[test]
fn fast_decode_is_opt_in_close_and_said_in_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    // A large smooth photo-like JPEG: reduced-size decoding changes its pixels only slightly.
    let image = image::RgbImage::from_fn(1600, 1200, |x, y| {
        image::Rgb([(x / 7) as u8, (y / 5) as u8, ((x + y) / 11) as u8])
    });
    let mut bytes = Vec::new();
    image
        .write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
            &mut bytes, 90,
        ))
        .unwrap();
    let path = dir.path().join("large.jpg");
    std::fs::write(&path, bytes).unwrap();
    let score = |extra: &[&str]| {
        let out = dir.path().join(format!("scores{}.jsonl", extra.len()));
        let model = model("mean_f32.onnx");
        let mut args = vec![
            "score",
            "--model",
            model.to_str().unwrap(),
            "--provider",
            "cpu",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
            path.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let output = agiqa(&args);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{stderr}");
        let score = jsonl(&out)[0]["scores"]["quality"].as_f64().unwrap();
        (score, stderr)
    };
    let (exact, exact_said) = score(&[]);
    let (fast, fast_said) = score(&["--fast-decode"]);
    assert!(!exact_said.contains("reduced size"), "{exact_said}");
    assert!(fast_said.contains("reduced size"), "{fast_said}");
    assert!(exact != fast, "reduced decoding gave the exact score");
    assert!((exact - fast).abs() < 0.01, "exact {exact}, fast {fast}");
}

/// `score` on one folder with extra flags: exit status, stdout lines as JSON, stderr.
fn score_with(model_name: &str, images: &Path, flags: &[&str]) -> (bool, Vec<Value>, String) {
    let m = model(model_name);
    let mut args = vec!["score", "--model", m.to_str().unwrap(), "--quiet"];
    args.extend(flags);
    args.push(images.to_str().unwrap());
    let output = agiqa(&args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
    (
        output.status.success(),
        lines,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn session_and_binding_flags_score_the_same_uint8_model() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in good_images().into_iter().take(5) {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let (ok, plain, stderr) = score_with("mean_u8.onnx", dir.path(), &["--provider", "cpu"]);
    assert!(ok, "{stderr}");
    assert_eq!(plain.len(), 5);
    assert!(
        stderr.contains("input pixels_uint8") && !stderr.contains("IoBinding"),
        "{stderr}"
    );
    let (ok, tuned, stderr) = score_with(
        "mean_u8.onnx",
        dir.path(),
        &[
            "--provider=cpu",
            "--io-binding",
            "--batch-size=2",
            "--sessions=2",
            "--device-id=0",
            "--graph-optimization=basic",
            "--no-memory-pattern",
            "--no-cpu-arena",
            "--spin",
            "--trt-max-batch=8",
            "--cudnn-conv-search=heuristic",
        ],
    );
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("IoBinding") && stderr.contains("2 sessions"),
        "{stderr}"
    );
    assert_eq!(tuned, plain, "IoBinding and session knobs change no score");
}

#[test]
fn gpu_flags_are_checked_and_explained() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.png"), &good_images()[1].1).unwrap();
    // Parse errors (exit status 2) name the flag.
    for (flag, words) in [
        ("--device-id=0,0", "twice"),
        ("--device-id=0,x", "GPU ordinal"),
        (
            "--graph-optimization=max",
            "disable, basic, extended or all",
        ),
        ("--cudnn-conv-search=fast", "exhaustive or heuristic"),
    ] {
        let m = model("mean_f32.onnx");
        let output = agiqa(&["score", "--model", m.to_str().unwrap(), flag, "a.png"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag}: {stderr}");
        assert!(stderr.contains(words), "{flag}: {stderr}");
    }
    // A list of devices is accepted (and ignored on CPU, with a note).
    let (ok, lines, stderr) = score_with(
        "mean_f32.onnx",
        dir.path(),
        &["--provider=cpu", "--device-id=0,1"],
    );
    assert!(ok && lines.len() == 1, "{stderr}");
    assert!(
        stderr.contains("--device-id 0,1 ignored on cpu"),
        "{stderr}"
    );
    // Combinations that cannot work are refused before scoring.
    let (ok, _, stderr) = score_with(
        "mean_f32.onnx",
        dir.path(),
        &["--provider=cpu", "--cuda-graph"],
    );
    assert!(
        !ok && stderr.contains("--cuda-graph needs --provider cuda"),
        "{stderr}"
    );
    let (ok, _, stderr) = score_with(
        "mean_f32.onnx",
        dir.path(),
        &["--provider=tensorrt", "--batch-size=8", "--trt-max-batch=4"],
    );
    assert!(!ok && stderr.contains("below the batch size 8"), "{stderr}");
}

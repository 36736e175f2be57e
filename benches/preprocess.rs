//! Decode + preprocess speed per core, against what users run: PIL decoding and torchvision's
//! `Resize(224, BICUBIC)`, `CenterCrop`, `ToTensor`, `Normalize` (`scripts/bench/pil_preprocess.py`),
//! on the same images in the same run: JPEG 512×384 and 1024×1024, 4:2:0 and 4:4:4, and PNG.
//! Both sides decode from bytes in memory on one thread and count that thread's CPU time. It
//! also checks that the 224×224 crops are PIL's pixel for pixel, and times `--fast-decode`
//! (reduced-size JPEG decoding).
//!
//! `cargo bench -p agiqa-benches --bench preprocess` — needs a Python with Pillow, numpy,
//! torch and torchvision: `AGIQA_TORCH_PYTHON`, else `.venv-ref/bin/python`
//! (`scripts/make-fixtures --venv-only` makes it). `AGIQA_BENCH_SECONDS` sets the time per set.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use agiqa_runtime::preprocess::{DecodeLimits, JpegDecoding, Preprocessing, Preprocessor};
use serde_json::Value;

const SETS: [&str; 5] = [
    "jpeg_512x384_420",
    "jpeg_512x384_444",
    "jpeg_1024x1024_420",
    "jpeg_1024x1024_444",
    "png_512x384",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ is inside the workspace")
        .to_path_buf()
}

/// The Python that has PIL and torchvision, or why there is none.
fn reference_python() -> Result<PathBuf, String> {
    let python = std::env::var_os("AGIQA_TORCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv-ref/bin/python"));
    let probe = Command::new(&python)
        .args(["-c", "import PIL, numpy, torch, torchvision"])
        .output();
    match probe {
        Ok(out) if out.status.success() => Ok(python),
        Ok(out) => Err(format!(
            "{} lacks Pillow/numpy/torch/torchvision: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run {}: {e}", python.display())),
    }
}

fn run_python(python: &Path, args: &[&str]) -> Result<String, String> {
    let script = repo_root().join("scripts/bench/pil_preprocess.py");
    let out = Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {args:?} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// This thread's CPU time: a per-core figure that other processes on the machine do not
/// inflate (the Python side uses `time.thread_time`, the same clock).
fn thread_cpu_time() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec; CLOCK_THREAD_CPUTIME_ID exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Whole passes over `blobs` until `budget` of CPU time has passed; images per CPU second.
fn per_second(blobs: &[Vec<u8>], budget: Duration, mut f: impl FnMut(&[u8])) -> f64 {
    for blob in blobs.iter().take(2) {
        f(blob);
    }
    let start = thread_cpu_time();
    let mut n = 0usize;
    loop {
        for blob in blobs {
            f(blob);
            n += 1;
        }
        if thread_cpu_time() - start >= budget {
            break;
        }
    }
    n as f64 / (thread_cpu_time() - start).as_secs_f64()
}

struct SetResult {
    name: &'static str,
    pil: f64,
    ours: f64,
    fast: Option<f64>,
    /// Images whose 224×224 crop differs from PIL's, and the largest difference in levels.
    differing: usize,
    max_level_difference: u8,
    images: usize,
}

fn measure_set(
    name: &'static str,
    folder: &Path,
    pil: &Value,
    preprocessor: &Preprocessor,
    budget: Duration,
) -> Result<SetResult, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .map_err(|e| format!("{}: {e}", folder.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e != "rgb"))
        .collect();
    files.sort();
    let blobs: Vec<Vec<u8>> = files
        .iter()
        .map(|p| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display())))
        .collect::<Result<_, _>>()?;
    let limits = DecodeLimits::default();
    let mut differing = 0;
    let mut max_level_difference = 0u8;
    for (file, blob) in files.iter().zip(&blobs) {
        let theirs = std::fs::read(file.with_extension(format!(
            "{}.rgb",
            file.extension().and_then(|e| e.to_str()).unwrap_or("")
        )))
        .map_err(|e| format!("PIL's crop of {}: {e}", file.display()))?;
        let ours = preprocessor
            .resize_and_crop(
                &preprocessor
                    .decode(blob, &limits)
                    .map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?
            .into_raw();
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        if worst > 0 || ours.len() != theirs.len() {
            differing += 1;
        }
        max_level_difference = max_level_difference.max(worst);
    }
    let mut out = vec![0f32; preprocessor.config().tensor_len()];
    let mut run = |jpeg: JpegDecoding| {
        per_second(&blobs, budget, |blob| {
            let image = preprocessor
                .decode_with(blob, &limits, jpeg)
                .expect("decodes");
            preprocessor
                .preprocess_into(&image, &mut out)
                .expect("preprocesses");
            black_box(&out);
        })
    };
    let ours = run(JpegDecoding::Exact);
    let fast = name.starts_with("jpeg").then(|| run(JpegDecoding::Reduced));
    Ok(SetResult {
        name,
        pil: pil[name]["images_per_second"].as_f64().unwrap_or(f64::NAN),
        ours,
        fast,
        differing,
        max_level_difference,
        images: blobs.len(),
    })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let python = match reference_python() {
        Ok(python) => python,
        Err(why) => {
            println!(
                "preprocess benchmark skipped: the PIL + torchvision baseline is needed ({why})"
            );
            return;
        }
    };
    let seconds: f64 = std::env::var("AGIQA_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| s.is_finite() && *s > 0.0)
        .unwrap_or(2.0);
    let dir = std::env::temp_dir().join(format!("agiqa-bench-preprocess-{}", std::process::id()));
    let dir_text = dir.to_string_lossy().into_owned();
    let result = (|| -> Result<(Value, Vec<SetResult>), String> {
        run_python(&python, &["make", &dir_text])?;
        let pil: Value = serde_json::from_str(&run_python(
            &python,
            &["time", &dir_text, "--seconds", &seconds.to_string()],
        )?)
        .map_err(|e| format!("the PIL timing is not JSON: {e}"))?;
        let preprocessor = Preprocessor::new(Preprocessing::default());
        let budget = Duration::from_secs_f64(seconds);
        let results = SETS
            .iter()
            .map(|name| measure_set(name, &dir.join(name), &pil, &preprocessor, budget))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((pil, results))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let (pil, results) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("preprocess benchmark failed: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "decode + preprocess to 224x224 on one core, {seconds} CPU-s per set; baseline PIL {} + torchvision {} (torch {})",
        pil["versions"]["pillow"].as_str().unwrap_or("?"),
        pil["versions"]["torchvision"].as_str().unwrap_or("?"),
        pil["versions"]["torch"].as_str().unwrap_or("?"),
    );
    println!(
        "| set | PIL + torchvision img/s | agiqa img/s | ratio | identical pixels | --fast-decode img/s | fast vs exact |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        let identical = if r.differing == 0 {
            format!("yes ({} of {})", r.images, r.images)
        } else {
            format!(
                "no: {} of {} differ, by up to {} levels",
                r.differing, r.images, r.max_level_difference
            )
        };
        let (fast, speedup) = match r.fast {
            Some(f) => (format!("{f:.1}"), format!("{:.2}x", f / r.ours)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {:.1} | {:.1} | {:.2}x | {identical} | {fast} | {speedup} |",
            r.name,
            r.pil,
            r.ours,
            r.ours / r.pil
        );
    }
}

//! `score_files` and `bench::run_providers` as embedders call them: the observer hears every
//! image, the summary and the result file agree, resume skips and appends, and a provider
//! that cannot load is one failed row among measured ones.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use agiqa_runtime::batch_io::OutputFormat;
use agiqa_runtime::bench::{run_providers, BenchOptions, ProviderBench, ProviderBenchOptions};
use agiqa_runtime::score_files::{
    score_files, ResultsOut, ScoreFilesError, ScoreFilesOptions, ScoreObserver,
};
use agiqa_runtime::scorer::{ExecutionProvider, ScoreError, Scorer};
use common::{bad_images, cpu_options, good_images, model};

#[derive(Default)]
struct Recorder {
    resumed: Option<(usize, usize)>,
    loaded_heads: Vec<String>,
    started: Option<usize>,
    scored: Vec<PathBuf>,
    failed: usize,
}

impl ScoreObserver for Recorder {
    fn resumed(&mut self, _out: &Path, skipped: usize, total: usize) {
        self.resumed = Some((skipped, total));
    }
    fn loaded(&mut self, scorer: &Scorer) {
        self.loaded_heads = scorer.head_names().iter().map(|h| h.to_string()).collect();
    }
    fn started(&mut self, images: usize) {
        self.started = Some(images);
    }
    fn scored(&mut self, path: &Path, result: Result<&[f32], &ScoreError>) {
        self.scored.push(path.to_path_buf());
        self.failed += usize::from(result.is_err());
    }
}

fn write_images(dir: &Path) -> (Vec<PathBuf>, usize) {
    let mut paths = Vec::new();
    for (name, bytes) in good_images().into_iter().take(4) {
        paths.push(dir.join(name));
        std::fs::write(paths.last().unwrap(), bytes).unwrap();
    }
    let bad: Vec<_> = bad_images().into_iter().take(2).collect();
    for (name, bytes, _) in &bad {
        paths.push(dir.join(name));
        std::fs::write(paths.last().unwrap(), bytes).unwrap();
    }
    (paths, bad.len())
}

/// Stops after `after` images, as an embedder's Ctrl-C does.
struct StopAfter {
    after: usize,
    seen: usize,
}

impl ScoreObserver for StopAfter {
    fn scored(&mut self, _path: &Path, _result: Result<&[f32], &ScoreError>) {
        self.seen += 1;
    }
    fn keep_going(&mut self) -> bool {
        self.seen < self.after
    }
}

#[test]
fn observer_that_stops_ends_the_run_early_with_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for i in 0..40 {
        let path = dir.path().join(format!("{i}.png"));
        std::fs::write(&path, &good_images()[1].1).unwrap();
        paths.push(path);
    }
    let out = dir.path().join("scores.jsonl");
    let mut cpu = cpu_options();
    cpu.batch_size = 1;
    let options = ScoreFilesOptions {
        model: model("mean_f32.onnx"),
        scorer: cpu,
        paths: paths.clone(),
        out: ResultsOut::File {
            path: out.clone(),
            resume: false,
        },
        format: OutputFormat::Jsonl,
        workers: Some(1),
    };
    let mut stop = StopAfter { after: 3, seen: 0 };
    let summary = score_files(&options, &mut stop).unwrap();
    assert_eq!(stop.seen, 3);
    assert_eq!(summary.stats.scored + summary.stats.failed, 3);
    assert_eq!(summary.stats.images, paths.len());
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
}

#[test]
fn observer_summary_and_csv_agree_and_resume_appends_only_new_images() {
    let dir = tempfile::tempdir().unwrap();
    let (mut paths, n_bad) = write_images(dir.path());
    let out = dir.path().join("scores.csv");
    let mut options = ScoreFilesOptions {
        model: model("three_heads.onnx"),
        scorer: cpu_options(),
        paths: paths.clone(),
        out: ResultsOut::File {
            path: out.clone(),
            resume: false,
        },
        format: OutputFormat::Csv,
        workers: Some(2),
    };
    let mut seen = Recorder::default();
    let summary = score_files(&options, &mut seen).unwrap();
    assert_eq!(seen.resumed, None);
    assert_eq!(seen.loaded_heads, ["quality", "alignment", "authenticity"]);
    assert_eq!(seen.started, Some(paths.len()));
    assert_eq!(seen.scored.len(), paths.len());
    assert_eq!(seen.failed, n_bad);
    let stats = &summary.stats;
    assert_eq!((summary.skipped, stats.images), (0, paths.len()));
    assert_eq!((stats.scored, stats.failed), (paths.len() - n_bad, n_bad));
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 1 + paths.len(), "{text}");
    assert!(text.starts_with("path,quality,alignment,authenticity,error\n"));

    let new = dir.path().join("new.png");
    std::fs::write(&new, &good_images()[1].1).unwrap();
    paths.push(new.clone());
    options.paths = paths.clone();
    options.out = ResultsOut::File {
        path: out.clone(),
        resume: true,
    };
    let mut seen = Recorder::default();
    let summary = score_files(&options, &mut seen).unwrap();
    assert_eq!(seen.resumed, Some((paths.len() - 1, paths.len())));
    assert_eq!(seen.scored, std::slice::from_ref(&new));
    assert_eq!(
        (summary.skipped, summary.stats.images),
        (paths.len() - 1, 1)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        text.lines().count(),
        1 + paths.len(),
        "one header, one new row"
    );
    assert!(text
        .lines()
        .last()
        .unwrap()
        .starts_with(new.to_str().unwrap()));
}

#[test]
fn an_unfit_model_is_a_typed_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let options = ScoreFilesOptions {
        model: model("wrong_image_size.onnx"),
        scorer: cpu_options(),
        paths: vec![dir.path().join("x.png")],
        out: ResultsOut::File {
            path: dir.path().join("out.jsonl"),
            resume: false,
        },
        format: OutputFormat::Jsonl,
        workers: None,
    };
    match score_files(&options, &mut ()) {
        Err(ScoreFilesError::Model { path, .. }) => assert_eq!(path, options.model),
        other => panic!("expected a model error, got {other:?}"),
    }
    assert!(!dir.path().join("out.jsonl").exists(), "nothing written");
}

#[test]
fn run_providers_measures_cpu_and_reports_cuda_as_a_failed_row() {
    let options = ProviderBenchOptions {
        model: model("mean_f32.onnx"),
        scorer: cpu_options(),
        providers: vec![ExecutionProvider::Cpu, ExecutionProvider::Cuda],
        bench: BenchOptions {
            batch_sizes: vec![2],
            duration: Duration::from_millis(20),
            warmup: 1,
            images: Vec::new(),
            repeat: 1,
        },
    };
    let mut streamed = 0;
    let rows = run_providers(&options, |_| streamed += 1);
    assert_eq!((rows.len(), streamed), (2, 2));
    match &rows[0] {
        ProviderBench::Measured(report) => {
            assert_eq!(report.provider, "cpu");
            assert_eq!(report.model_only[0].batch_size, 2);
            assert!(report.end_to_end.is_none());
        }
        other => panic!("cpu should measure: {other:?}"),
    }
    let json = serde_json::to_value(&rows[1]).unwrap();
    assert_eq!(json["provider"], "cuda");
    let error = json["error"].as_str().unwrap();
    assert!(
        error.starts_with("cannot use model") && error.contains(": execution provider cuda"),
        "the error carries its cause: {error}"
    );
}

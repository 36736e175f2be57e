//! `agiqa score` as one library call: image files in, one flushed result line per image out
//! (JSONL or CSV), resumable. Progress goes to a [`ScoreObserver`] of the caller's choice, so
//! embedders get no terminal progress bar they did not ask for.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::batch_io::{recorded_paths, OutputFormat, ResultWriter};
use crate::pipeline::{score_paths, PipelineOptions, PipelineStats};
use crate::preprocess::JpegDecoding;
use crate::scorer::{ScoreError, Scorer, ScorerOptions};

/// Where the result lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResultsOut {
    /// Standard output.
    Stdout,
    /// A file; with `resume`, images it already records are skipped and new lines appended,
    /// otherwise it is replaced.
    File {
        /// The result file.
        path: PathBuf,
        /// Keep the lines already there and score only the images they do not record.
        resume: bool,
    },
}

/// One scoring run over image files.
#[derive(Clone, Debug)]
pub struct ScoreFilesOptions {
    /// Exported model (`.onnx` with agiqa metadata).
    pub model: PathBuf,
    /// How the model runs (provider, inference batch size, threads...). `intra_op_spinning`
    /// is turned off: the decoders need the cores between batches.
    pub scorer: ScorerOptions,
    /// Image files, in order (see [`crate::batch_io::collect_inputs`]).
    pub paths: Vec<PathBuf>,
    /// Where the result lines go.
    pub out: ResultsOut,
    /// JSONL or CSV (see [`OutputFormat::for_path`]).
    pub format: OutputFormat,
    /// Decode/preprocess threads (`None`: every core).
    pub workers: Option<usize>,
}

/// What a run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScoreSummary {
    /// Images skipped because the result file already recorded them (resume).
    pub skipped: usize,
    /// How JPEGs were decoded (`reduced`: opt-in fast decoding, not the training pixels).
    pub jpeg_decoding: JpegDecoding,
    /// The images of this run: how many, scored, failed, batches, seconds, images per second.
    #[serde(flatten)]
    pub stats: PipelineStats,
}

/// Hears about a run as it goes; every method does nothing unless overridden, and `()`
/// hears nothing.
pub trait ScoreObserver {
    /// The result file recorded `skipped` of the `total` images given (resume only).
    fn resumed(&mut self, _out: &Path, _skipped: usize, _total: usize) {}
    /// The model is loaded; nothing has been scored yet.
    fn loaded(&mut self, _scorer: &Scorer) {}
    /// Scoring starts on `images` images.
    fn started(&mut self, _images: usize) {}
    /// One image's scores ([`Scorer::head_names`] order) or why it has none, just before its
    /// line is written.
    fn scored(&mut self, _path: &Path, _result: Result<&[f32], &ScoreError>) {}
    /// Asked after every image: `false` stops the run after the batch in flight (an embedder's
    /// Ctrl-C); the summary then counts fewer results than images.
    fn keep_going(&mut self) -> bool {
        true
    }
}

impl ScoreObserver for () {}

/// Why a run stopped. A failed image is not one: it is a result line and a count in
/// [`ScoreSummary`].
#[derive(Debug, thiserror::Error)]
pub enum ScoreFilesError {
    #[error("cannot read {path} to resume")]
    Resume {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot use model {path}")]
    Model {
        path: PathBuf,
        #[source]
        source: ScoreError,
    },
    #[error("cannot write {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the results header")]
    Header(#[source] io::Error),
    #[error("cannot write results")]
    Write(#[source] io::Error),
}

/// Scores `options.paths` with the model, writing one line per image as it completes (in
/// completion order), and returns the totals. Stops at the first write error.
pub fn score_files(
    options: &ScoreFilesOptions,
    observer: &mut dyn ScoreObserver,
) -> Result<ScoreSummary, ScoreFilesError> {
    let mut paths = options.paths.clone();
    let mut header = true;
    let mut skipped = 0;
    if let ResultsOut::File { path, resume: true } = &options.out {
        let done =
            recorded_paths(path, options.format).map_err(|source| ScoreFilesError::Resume {
                path: path.clone(),
                source,
            })?;
        header = std::fs::metadata(path).map_or(true, |m| m.len() == 0);
        let total = paths.len();
        paths.retain(|p| !done.contains(p));
        skipped = total - paths.len();
        observer.resumed(path, skipped, total);
    }
    let scorer_options = ScorerOptions {
        intra_op_spinning: false,
        ..options.scorer.clone()
    };
    let scorer =
        Scorer::load(&options.model, scorer_options).map_err(|source| ScoreFilesError::Model {
            path: options.model.clone(),
            source,
        })?;
    observer.loaded(&scorer);
    let sink: Box<dyn Write> = match &options.out {
        ResultsOut::File { path, resume } => Box::new(
            OpenOptions::new()
                .create(true)
                .append(*resume)
                .write(true)
                .truncate(!*resume)
                .open(path)
                .map_err(|source| ScoreFilesError::Open {
                    path: path.clone(),
                    source,
                })?,
        ),
        ResultsOut::Stdout => Box::new(io::stdout().lock()),
    };
    let mut writer = ResultWriter::new(sink, options.format, &scorer.head_names(), header)
        .map_err(ScoreFilesError::Header)?;
    let mut pipeline = PipelineOptions::for_scorer(&scorer);
    if let Some(workers) = options.workers {
        pipeline.workers = workers;
    }
    observer.started(paths.len());
    let mut write_error = None;
    let stats = score_paths(&scorer, &paths, &pipeline, |scored| {
        observer.scored(&scored.path, scored.result.as_deref());
        let written = match &scored.result {
            Ok(scores) => writer.write(&scored.path, Ok(scores)),
            Err(e) => writer.write(&scored.path, Err(&e.to_string())),
        };
        written.map_err(|e| write_error = Some(e)).is_ok() && observer.keep_going()
    });
    match write_error {
        Some(e) => Err(ScoreFilesError::Write(e)),
        None => Ok(ScoreSummary {
            skipped,
            jpeg_decoding: scorer.options().jpeg_decoding,
            stats,
        }),
    }
}

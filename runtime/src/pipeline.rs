//! The throughput pipeline: decode and preprocess on every core, overlapped with inference
//! through a bounded queue, in batches of the scorer's batch size.
//!
//! Worker threads take paths from a shared counter, decode and preprocess them (the shared
//! [`crate::preprocess`] code, through [`Scorer::prepare_file`]) and send the model inputs into a
//! bounded channel; the calling thread fills batches from it and runs the model. While a batch
//! runs, the workers decode the next one; the bound keeps memory flat (at most `queue` prepared
//! images wait). Results reach the caller's callback as they are produced, in completion order.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::scorer::{ModelInput, ScoreError, Scorer};

/// How the pipeline runs.
#[derive(Clone, Debug)]
pub struct PipelineOptions {
    /// Decode/preprocess threads (default: every core).
    pub workers: usize,
    /// Prepared images that may wait for inference (default: two batches).
    pub queue: usize,
}

impl PipelineOptions {
    /// Every core decodes; two batches of prepared images may wait.
    pub fn for_scorer(scorer: &Scorer) -> Self {
        PipelineOptions {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            queue: 2 * scorer.batch_size(),
        }
    }
}

/// One image's outcome.
#[derive(Debug)]
pub struct Scored {
    /// Position of the path in the input list.
    pub index: usize,
    pub path: PathBuf,
    /// One score per head ([`Scorer::head_names`] order), or why this image has none.
    pub result: Result<Vec<f32>, ScoreError>,
}

/// Totals of one run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PipelineStats {
    pub images: usize,
    pub scored: usize,
    pub failed: usize,
    pub batches: usize,
    pub seconds: f64,
    pub images_per_second: f64,
}

/// Scores `paths`, calling `on_result` (on this thread) for every image as soon as its result
/// is known. Per-image failures (unreadable, corrupt, too large...) are results, not errors;
/// a batch whose inference fails reports that error for each of its images. Returning `false`
/// from `on_result` stops the run early (remaining images are not reported).
pub fn score_paths(
    scorer: &Scorer,
    paths: &[PathBuf],
    options: &PipelineOptions,
    mut on_result: impl FnMut(Scored) -> bool,
) -> PipelineStats {
    let start = Instant::now();
    let mut stats = PipelineStats {
        images: paths.len(),
        ..PipelineStats::default()
    };
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let batch_size = scorer.batch_size();
    let (tx, rx) = sync_channel::<(usize, Result<ModelInput, ScoreError>)>(options.queue.max(1));
    std::thread::scope(|scope| {
        for _ in 0..options.workers.max(1) {
            let tx = tx.clone();
            let (next, stop) = (&next, &stop);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= paths.len() || stop.load(Ordering::Relaxed) {
                    break;
                }
                let prepared = scorer.prepare_file(&paths[i]).map_err(ScoreError::from);
                if tx.send((i, prepared)).is_err() {
                    break;
                }
            });
        }
        drop(tx);

        let mut batch: Vec<(usize, ModelInput)> = Vec::with_capacity(batch_size);
        let mut report =
            |index: usize, result: Result<Vec<f32>, ScoreError>, stats: &mut PipelineStats| {
                match &result {
                    Ok(_) => stats.scored += 1,
                    Err(_) => stats.failed += 1,
                }
                let go = on_result(Scored {
                    index,
                    path: paths[index].clone(),
                    result,
                });
                if !go {
                    stop.store(true, Ordering::Relaxed);
                }
                go
            };
        loop {
            // A partial batch runs when the queue stays empty for a while (decoding is the
            // bottleneck), so results keep streaming out on slow inputs.
            let keep_going = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok((i, Ok(input))) => {
                    batch.push((i, input));
                    batch.len() < batch_size || flush(scorer, &mut batch, &mut stats, &mut report)
                }
                Ok((i, Err(e))) => report(i, Err(e), &mut stats),
                Err(RecvTimeoutError::Timeout) => {
                    flush(scorer, &mut batch, &mut stats, &mut report)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    flush(scorer, &mut batch, &mut stats, &mut report);
                    break;
                }
            };
            if !keep_going {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        // Dropping the receiver wakes workers blocked on a full queue; their sends then fail.
        drop(rx);
    });
    stats.seconds = start.elapsed().as_secs_f64();
    stats.images_per_second = stats.scored as f64 / stats.seconds.max(1e-9);
    stats
}

type Report<'a> = dyn FnMut(usize, Result<Vec<f32>, ScoreError>, &mut PipelineStats) -> bool + 'a;

/// Runs the waiting batch and reports its images; `false` when the caller asked to stop.
fn flush(
    scorer: &Scorer,
    batch: &mut Vec<(usize, ModelInput)>,
    stats: &mut PipelineStats,
    report: &mut Report<'_>,
) -> bool {
    if batch.is_empty() {
        return true;
    }
    stats.batches += 1;
    let (indices, inputs): (Vec<usize>, Vec<ModelInput>) = batch.drain(..).unzip();
    match scorer.run_batch(&inputs) {
        Ok(scores) => indices
            .into_iter()
            .zip(scores)
            .all(|(i, s)| report(i, Ok(s), stats)),
        Err(e) => {
            let message = e.to_string();
            indices
                .into_iter()
                .all(|i| report(i, Err(ScoreError::Inference(message.clone())), stats))
        }
    }
}

//! From an admitted image to its scores: decoding on the blocking pool, then one batcher task
//! that gathers the waiting images into dynamic batches, and restarts if it panics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::http::StatusCode;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::metrics::Metrics;
use super::{AppState, ServeOptions};
use crate::scorer::{ModelInput, ScoreError, Scorer};

/// One image waiting for inference.
pub(super) struct Job {
    input: ModelInput,
    reply: oneshot::Sender<Result<Vec<f32>, String>>,
    /// The request's span, so that the batcher's log lines about this image carry its id.
    span: tracing::Span,
    /// The image's admission slot, given back when its batch is done.
    admitted: OwnedSemaphorePermit,
}

/// One image's scores, or the status and reason it was not scored.
pub(super) type Outcome = Result<Vec<f32>, (StatusCode, String)>;

/// Decodes one admitted image on the decode pool and scores it in the next batch; the
/// admission slot is held until its batch is done.
pub(super) async fn score_one(
    state: Arc<AppState>,
    bytes: Bytes,
    admitted: OwnedSemaphorePermit,
) -> Outcome {
    let (input, admitted) = decode(&state, bytes, admitted).await?;
    let (reply, answer) = oneshot::channel();
    state.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
    let job = Job {
        input,
        reply,
        span: tracing::Span::current(),
        admitted,
    };
    // Never waits: the channel holds as many jobs as there are admission slots.
    if state.queue.send(job).await.is_err() {
        state.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
    }
    match answer.await {
        Ok(Ok(scores)) => Ok(scores),
        Ok(Err(e)) => Err((StatusCode::INTERNAL_SERVER_ERROR, e)),
        Err(_) if state.draining.load(Ordering::Acquire) => {
            Err((StatusCode::SERVICE_UNAVAILABLE, "shutting down".to_string()))
        }
        // The batcher dropped the job: it crashed with this image in hand (and was restarted).
        Err(_) => Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            "the batcher crashed while this image was in its batch; retry".to_string(),
        )),
    }
}

/// Decodes and preprocesses on the blocking pool, a bounded number at a time. The admission
/// slot travels with the work, so a request abandoned mid-decode still holds it until the
/// decoder is done (the backlog stays bounded).
async fn decode(
    state: &Arc<AppState>,
    bytes: Bytes,
    admitted: OwnedSemaphorePermit,
) -> Result<(ModelInput, OwnedSemaphorePermit), (StatusCode, String)> {
    let decoder = Arc::clone(&state.decoders)
        .acquire_owned()
        .await
        .map_err(|_| (StatusCode::SERVICE_UNAVAILABLE, "shutting down".to_string()))?;
    let scorer = Arc::clone(&state.scorer);
    let faults = state.options.faults.clone();
    // A panic here unwinds the blocking thread only (tokio starts another for the next job),
    // releasing the decoder and admission slots it holds.
    let result = tokio::task::spawn_blocking(move || {
        let _decoder = decoder;
        if let Some(faults) = &faults {
            faults.before_decode(&bytes);
        }
        (scorer.prepare_bytes(&bytes), admitted)
    })
    .await;
    match result {
        Ok((Ok(input), admitted)) => Ok((input, admitted)),
        Ok((Err(e), _)) => {
            state.metrics.error("bad_image");
            state.metrics.images_failed.fetch_add(1, Ordering::Relaxed);
            Err((StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))
        }
        Err(e) => {
            state.metrics.error("decode_panic");
            state.metrics.images_failed.fetch_add(1, Ordering::Relaxed);
            let reason = panic_reason(e);
            tracing::error!(%reason, "decoding crashed");
            Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("decoding crashed: {reason}"),
            ))
        }
    }
}

/// Runs the batcher, and starts a new one on the same queue if it panics (the images in its
/// hands are answered 500 when their jobs drop); returns when the queue is closed.
pub(super) async fn supervise_batcher(
    scorer: Arc<Scorer>,
    options: ServeOptions,
    metrics: Arc<Metrics>,
    jobs: mpsc::Receiver<Job>,
) {
    // Behind a lock only so that the queue outlives a batcher that panicked while holding it.
    let jobs = Arc::new(tokio::sync::Mutex::new(jobs));
    loop {
        let batcher = tokio::spawn(run_batcher(
            Arc::clone(&scorer),
            options.clone(),
            Arc::clone(&metrics),
            Arc::clone(&jobs),
        ));
        match batcher.await {
            Ok(()) => return,
            Err(e) => {
                metrics.error("batcher_panic");
                tracing::error!(reason = %panic_reason(e), "the batcher crashed; restarting it");
            }
        }
    }
}

async fn run_batcher(
    scorer: Arc<Scorer>,
    options: ServeOptions,
    metrics: Arc<Metrics>,
    jobs: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
) {
    let mut jobs = jobs.lock().await;
    let max_batch = options.max_batch.clamp(1, scorer.batch_size());
    let take = || {
        metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
    };
    while let Some(first) = jobs.recv().await {
        take();
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + options.max_wait;
        while batch.len() < max_batch {
            match tokio::time::timeout_at(deadline, jobs.recv()).await {
                Ok(Some(job)) => {
                    take();
                    batch.push(job);
                }
                Ok(None) | Err(_) => break,
            }
        }
        if let Some(faults) = &options.faults {
            faults.batch_formed(batch.len());
        }
        // Requests that already timed out or hung up need no inference.
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let mut inputs = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        let mut admitted = Vec::with_capacity(batch.len());
        for job in batch {
            inputs.push(job.input);
            replies.push((job.reply, job.span));
            admitted.push(job.admitted);
        }
        let scorer = Arc::clone(&scorer);
        let start = Instant::now();
        let n = inputs.len();
        let faults = options.faults.clone();
        // A failure (or a panic, which unwinds only this blocking thread) fails this batch's
        // images with the reason; the batcher goes on with the next batch.
        let outcome = tokio::task::spawn_blocking(move || {
            if let Some(faults) = &faults {
                faults.before_inference(inputs.len())?;
            }
            scorer
                .run_batch(&inputs)
                .map_err(|e: ScoreError| e.to_string())
        })
        .await;
        metrics.observe_batch(n, start.elapsed());
        // The batch's slots are free before any of its clients hears back, so a client that
        // sends its next image on the answer finds room.
        drop(admitted);
        let failure = match outcome {
            Ok(Ok(scores)) if scores.len() == n => {
                metrics.images_scored.fetch_add(n as u64, Ordering::Relaxed);
                for ((reply, _), s) in replies.into_iter().zip(scores) {
                    let _ = reply.send(Ok(s));
                }
                continue;
            }
            Ok(Ok(scores)) => {
                metrics.error("inference");
                format!("inference failed: {} scores for {n} images", scores.len())
            }
            Ok(Err(message)) => {
                metrics.error("inference");
                format!("inference failed: {message}")
            }
            Err(e) => {
                metrics.error("inference_panic");
                format!("inference crashed: {}", panic_reason(e))
            }
        };
        metrics.images_failed.fetch_add(n as u64, Ordering::Relaxed);
        for (reply, span) in replies {
            span.in_scope(|| tracing::error!(images = n, reason = %failure, "batch failed"));
            let _ = reply.send(Err(failure.clone()));
        }
    }
}

/// The message a panicking blocking task left, if it was text.
fn panic_reason(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_string()),
        Err(e) => e.to_string(),
    }
}

//! Admission: a slot per image in the service (being read, decoded, queued or scored), taken
//! before any work and refused with 503 and a `Retry-After` estimated from the backlog.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use tokio::sync::OwnedSemaphorePermit;

use super::routes::{closing, error};
use super::AppState;

/// Why an image was not admitted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum NoRoom {
    /// Every admission slot is taken.
    QueueFull,
    /// The images ahead would take longer than `--max-queue-delay` to score.
    QueueDelay { predicted: Duration },
}

/// One admission slot, if one is free and (with a queue-delay bound) the backlog ahead is
/// predicted to be scored within the bound.
pub(super) fn admit(state: &AppState) -> Result<OwnedSemaphorePermit, NoRoom> {
    if let Some(bound) = state.options.max_queue_delay {
        if let Some(predicted) = state.predicted_wait() {
            if predicted > bound {
                return Err(NoRoom::QueueDelay { predicted });
            }
        }
    }
    Arc::clone(&state.admission)
        .try_acquire_owned()
        .map_err(|_| NoRoom::QueueFull)
}

/// The 503 for a request that found no room, with a `Retry-After` from the backlog; its body
/// is not read, so the connection closes after it.
pub(super) fn busy(state: &AppState, why: NoRoom) -> Response {
    let retry_after = state.retry_after_seconds();
    let reason = match why {
        NoRoom::QueueFull => {
            state.metrics.error("queue_full");
            "scoring queue is full".to_string()
        }
        NoRoom::QueueDelay { predicted } => {
            state.metrics.error("queue_delay");
            format!(
                "the images ahead would take {:.0} ms, over the {:.0} ms queue-delay bound",
                predicted.as_secs_f64() * 1e3,
                state
                    .options
                    .max_queue_delay
                    .unwrap_or_default()
                    .as_secs_f64()
                    * 1e3
            )
        }
    };
    let mut response = error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("server busy: {reason}, retry in {retry_after} s"),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    closing(response)
}

impl AppState {
    /// Images admitted and not yet answered (reading, decoding, queued or in inference).
    pub(super) fn admitted(&self) -> usize {
        self.options
            .queue_capacity
            .max(1)
            .saturating_sub(self.admission.available_permits())
    }

    /// How long the images admitted now would take in inference, at the cost per image seen
    /// so far (the batches' time over their images); `None` before the first batch.
    pub(super) fn predicted_wait(&self) -> Option<Duration> {
        let images = self.metrics.batch_size.sum();
        let seconds = self.metrics.inference.sum();
        (images > 0.0).then(|| Duration::from_secs_f64(seconds / images * self.admitted() as f64))
    }

    /// Seconds until the admitted backlog is likely scored: its batches at the mean batch
    /// time so far (1 s before any batch has run), at least 1 and at most 60.
    pub(super) fn retry_after_seconds(&self) -> u64 {
        let batches = self
            .admitted()
            .div_ceil(self.options.max_batch.max(1))
            .max(1);
        let per_batch = self.metrics.inference.mean().unwrap_or(1.0);
        ((batches as f64 * per_batch).ceil() as u64).clamp(1, 60)
    }
}

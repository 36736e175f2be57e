//! Admission: a slot per image in the service (being read, decoded, queued or scored), taken
//! before any work and refused with 503 and a `Retry-After` estimated from the backlog.

use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use tokio::sync::OwnedSemaphorePermit;

use super::routes::error;
use super::AppState;

/// One admission slot, if one is free.
pub(super) fn admit(state: &AppState) -> Option<OwnedSemaphorePermit> {
    Arc::clone(&state.admission).try_acquire_owned().ok()
}

/// The 503 for a request that found no admission slot, with a `Retry-After` from the backlog.
pub(super) fn busy(state: &AppState) -> Response {
    state.metrics.error("queue_full");
    let retry_after = state.retry_after_seconds();
    let mut response = error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("server busy: scoring queue is full, retry in {retry_after} s"),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

impl AppState {
    /// Images admitted and not yet answered (reading, decoding, queued or in inference).
    pub(super) fn admitted(&self) -> usize {
        self.options
            .queue_capacity
            .max(1)
            .saturating_sub(self.admission.available_permits())
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

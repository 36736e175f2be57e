//! `multipart/form-data` scoring: each part is admitted as it arrives, before its bytes are
//! read, and decoded on the pool while the next part streams in. The first part that finds no
//! room refuses the whole request (503); what was not admitted is never read or decoded; a
//! request with more parts than the service could ever admit gets 413.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::Instrument as _;

use super::admission::{admit, busy, NoRoom};
use super::batcher::{score_one, Outcome};
use super::routes::{body_timeout, closing, error, named, rejection_response};
use super::AppState;

/// One part read in full, with its admission slot.
struct Part {
    name: String,
    bytes: Bytes,
    admitted: OwnedSemaphorePermit,
}

/// Why a multipart request was refused before all its parts were read.
#[derive(Debug)]
enum Refusal {
    /// More parts than `capacity`, the most the service could ever admit at once.
    TooManyParts { capacity: usize },
    /// The next part found no room.
    Busy(NoRoom),
    /// The body did not arrive within the body-read deadline.
    BodyTimeout,
    /// The body is not valid multipart (or over the body limit), as axum rejected it.
    Malformed { status: StatusCode, reason: String },
}

/// Reads a multipart body's parts one by one; each is admitted by `admit` before its bytes
/// are read. `seen` is how many parts were read before, `capacity` the admission limit.
async fn next_part(
    multipart: &mut Multipart,
    admit: &(dyn Fn() -> Result<OwnedSemaphorePermit, NoRoom> + Sync),
    capacity: usize,
    seen: usize,
    deadline: Instant,
) -> Result<Option<Part>, Refusal> {
    let malformed = |e: axum::extract::multipart::MultipartError| Refusal::Malformed {
        status: e.status(),
        reason: e.body_text(),
    };
    let mut field = match tokio::time::timeout_at(deadline, multipart.next_field()).await {
        Ok(Ok(Some(field))) => field,
        Ok(Ok(None)) => return Ok(None),
        Ok(Err(e)) => return Err(malformed(e)),
        Err(_) => return Err(Refusal::BodyTimeout),
    };
    if seen == capacity {
        return Err(Refusal::TooManyParts { capacity });
    }
    let admitted = admit().map_err(Refusal::Busy)?;
    let name = field
        .file_name()
        .or(field.name())
        .map_or_else(|| format!("image{seen}"), str::to_string);
    let mut bytes = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, field.chunk()).await {
            Ok(Ok(Some(chunk))) => bytes.extend_from_slice(&chunk),
            Ok(Ok(None)) => break,
            Ok(Err(e)) => return Err(malformed(e)),
            Err(_) => return Err(Refusal::BodyTimeout),
        }
    }
    Ok(Some(Part {
        name,
        bytes: Bytes::from(bytes),
        admitted,
    }))
}

/// Scores every part of a multipart request: `{"results": [{"name", "scores" | "error"}]}`.
pub(super) async fn score_multipart(state: &Arc<AppState>, request: Request) -> Response {
    let mut multipart = match Multipart::from_request(request, state).await {
        Ok(m) => m,
        Err(rejection) => {
            return rejection_response(state, rejection.status(), rejection.body_text())
        }
    };
    let capacity = state.options.queue_capacity.max(1);
    let deadline = Instant::now() + state.options.body_read_timeout;
    let mut parts = tokio::task::JoinSet::new();
    let mut names = Vec::new();
    loop {
        let next = next_part(
            &mut multipart,
            &|| admit(state),
            capacity,
            names.len(),
            deadline,
        )
        .await;
        let part = match next {
            Ok(Some(part)) => part,
            Ok(None) => break,
            Err(refusal) => {
                // Cancel the admitted parts before answering, so that their decode slots are
                // free when the client hears the refusal (queued ones are skipped by the
                // batcher once their receivers are gone).
                parts.shutdown().await;
                return refusal_response(state, refusal);
            }
        };
        let index = names.len();
        names.push(part.name);
        let state = Arc::clone(state);
        // The part's work runs in its own task, still under the request's span (its id).
        parts.spawn(
            async move { (index, score_one(state, part.bytes, part.admitted).await) }
                .in_current_span(),
        );
    }
    if names.is_empty() {
        return error(StatusCode::BAD_REQUEST, "multipart body has no parts");
    }
    let mut outcomes: Vec<Option<Outcome>> = vec![None; names.len()];
    while let Some(joined) = parts.join_next().await {
        match joined {
            Ok((index, outcome)) => outcomes[index] = Some(outcome),
            Err(e) => {
                state.metrics.error("part_panic");
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("scoring a part crashed: {e}"),
                );
            }
        }
    }
    let body: Vec<Value> = names
        .iter()
        .zip(outcomes)
        .map(|(name, outcome)| match outcome {
            Some(Ok(scores)) => json!({ "name": name, "scores": named(&state.scorer, &scores) }),
            Some(Err((_, message))) => json!({ "name": name, "error": message }),
            None => json!({ "name": name, "error": "not scored" }),
        })
        .collect();
    Json(json!({ "results": body })).into_response()
}

fn refusal_response(state: &AppState, refusal: Refusal) -> Response {
    match refusal {
        Refusal::TooManyParts { capacity } => {
            state.metrics.error("too_many_images");
            closing(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "more than {capacity} images in one request: the service admits at most \
                     {capacity} at once; send them in smaller requests"
                ),
            ))
        }
        Refusal::Busy(why) => busy(state, why),
        Refusal::BodyTimeout => body_timeout(state),
        Refusal::Malformed { status, reason } => rejection_response(state, status, reason),
    }
}

/// For the fuzz targets: reads `body` as a multipart request with `content_type` through the
/// same part reading and admission as the service (`capacity` slots, no decoding), and returns
/// each part's name and size, or the refusal's status and reason.
#[doc(hidden)]
pub fn read_parts_for_fuzzing(
    body: &[u8],
    content_type: &str,
    capacity: usize,
) -> Result<Vec<(String, usize)>, (u16, String)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| (500, e.to_string()))?;
    runtime.block_on(async {
        let request = Request::builder()
            .method("POST")
            .header(axum::http::header::CONTENT_TYPE, content_type)
            .body(axum::body::Body::from(body.to_vec()))
            .map_err(|e| (400, e.to_string()))?;
        let mut multipart = Multipart::from_request(request, &())
            .await
            .map_err(|e| (e.status().as_u16(), e.body_text()))?;
        let capacity = capacity.max(1);
        let admission = Arc::new(Semaphore::new(capacity));
        let admit = || {
            Arc::clone(&admission)
                .try_acquire_owned()
                .map_err(|_| NoRoom::QueueFull)
        };
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let mut parts = Vec::new();
        loop {
            match next_part(&mut multipart, &admit, capacity, parts.len(), deadline).await {
                Ok(Some(part)) => parts.push((part.name, part.bytes.len())),
                Ok(None) => return Ok(parts),
                Err(Refusal::TooManyParts { capacity }) => {
                    return Err((413, format!("more than {capacity} parts")))
                }
                // Parts give their slots back at once here: only the capacity refuses.
                Err(Refusal::Busy(_)) => return Err((503, "busy".to_string())),
                Err(Refusal::BodyTimeout) => return Err((408, "body timeout".to_string())),
                Err(Refusal::Malformed { status, reason }) => {
                    return Err((status.as_u16(), reason))
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::read_parts_for_fuzzing;

    fn body(parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (name, bytes) in parts {
            body.extend_from_slice(
                format!("--X\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n")
                    .as_bytes(),
            );
            body.extend_from_slice(bytes);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"--X--\r\n");
        body
    }

    const TYPE: &str = "multipart/form-data; boundary=X";

    #[test]
    fn parts_are_read_with_their_names_and_sizes() {
        let parts = read_parts_for_fuzzing(&body(&[("a", b"12345"), ("b", b"")]), TYPE, 4);
        assert_eq!(parts, Ok(vec![("a".into(), 5), ("b".into(), 0)]));
    }

    #[test]
    fn more_parts_than_the_capacity_are_refused_with_413() {
        let refused = read_parts_for_fuzzing(&body(&[("a", b"1"), ("b", b"2")]), TYPE, 1);
        assert_eq!(refused.map_err(|(status, _)| status), Err(413));
    }

    #[test]
    fn a_body_cut_short_or_without_a_boundary_is_a_4xx() {
        let mut cut = body(&[("a", b"12345")]);
        cut.truncate(cut.len() - 8);
        for (body, content_type) in [(cut, TYPE), (b"garbage".to_vec(), "multipart/form-data")] {
            match read_parts_for_fuzzing(&body, content_type, 4) {
                Err((status, _)) => assert!((400..500).contains(&status), "{status}"),
                Ok(parts) => panic!("accepted {parts:?}"),
            }
        }
    }
}

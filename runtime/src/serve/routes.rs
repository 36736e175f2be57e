//! The HTTP routes: scoring (raw bodies here, multipart in its own module), health, liveness,
//! readiness and metrics, with the request-id and metrics middleware and the error bodies.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::admission::{admit, busy};
use super::batcher::score_one;
use super::multipart::score_multipart;
use super::AppState;
use crate::scorer::Scorer;

pub(super) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/score", post(score))
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(state.options.body_limit))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), observe))
        .with_state(state)
}

/// Counts every request by path and status, and times it; gives it an `x-request-id` (the
/// client's, if it sent a usable one) that is on its response and on its log lines.
async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    use tracing::Instrument as _;
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let id = request
        .headers()
        .get(REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .cloned()
        .unwrap_or_else(|| {
            let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            HeaderValue::from_str(&format!("{:08x}-{n:x}", std::process::id()))
                .unwrap_or(HeaderValue::from_static("unknown"))
        });
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    let span = tracing::info_span!("request", id = %id.to_str().unwrap_or("?"));
    let start = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    let elapsed = start.elapsed();
    state
        .metrics
        .observe_request(&path, response.status(), elapsed);
    span.in_scope(|| {
        tracing::info!(%method, %path, status = response.status().as_u16(),
            ms = elapsed.as_secs_f64() * 1e3, "answered")
    });
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

/// The request-id header, echoed or assigned.
const REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// Liveness: the process answers (restart it if not).
async fn live() -> Json<Value> {
    Json(json!({ "status": "alive" }))
}

/// Readiness: the model is loaded and warm and the service is not draining (send traffic
/// elsewhere if not).
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::Acquire) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "draining: shutting down");
    }
    if !state.warm.load(Ordering::Acquire) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "warming up the model");
    }
    Json(json!({ "status": "ready" })).into_response()
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "provider": state.scorer.provider().as_str(),
        "heads": state.scorer.head_names(),
        "backbone": state.scorer.metadata().backbone,
        "jpeg_decoding": state.scorer.options().jpeg_decoding,
    }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(state.admitted()),
    )
}

pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn score(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let timeout = state.options.request_timeout;
    match tokio::time::timeout(timeout, score_request(&state, request)).await {
        Ok(response) => response,
        Err(_) => {
            state.metrics.error("timeout");
            error(
                StatusCode::GATEWAY_TIMEOUT,
                format!("not scored within {} s", timeout.as_secs_f64()),
            )
        }
    }
}

async fn score_request(state: &Arc<AppState>, request: Request) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.options.body_limit as u64) {
        return body_too_large(state);
    }
    // A compressed body's decoded size is not bounded by the body limit (a gzip bomb), so
    // only identity bodies are accepted; images are compressed already.
    if let Some(encoding) = request.headers().get(header::CONTENT_ENCODING) {
        if !encoding.as_bytes().eq_ignore_ascii_case(b"identity") {
            state.metrics.error("compressed_body");
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Content-Encoding {} is not accepted: send the image bytes uncompressed",
                    String::from_utf8_lossy(encoding.as_bytes())
                ),
            );
        }
    }
    let is_multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if is_multipart {
        score_multipart(state, request).await
    } else {
        score_raw(state, request).await
    }
}

/// A raw body is one image: admitted (or refused with 503) before a byte of it is read.
async fn score_raw(state: &Arc<AppState>, request: Request) -> Response {
    let admitted = match admit(state) {
        Ok(admitted) => admitted,
        Err(why) => return busy(state, why),
    };
    let read = Bytes::from_request(request, state);
    let bytes = match tokio::time::timeout(state.options.body_read_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(rejection)) => {
            return rejection_response(state, rejection.status(), rejection.body_text())
        }
        Err(_) => return body_timeout(state),
    };
    match score_one(Arc::clone(state), bytes, admitted).await {
        Ok(scores) => Json(json!({ "scores": named(&state.scorer, &scores) })).into_response(),
        Err((status, message)) => error(status, message),
    }
}

/// `{head: score}` for one image.
pub(super) fn named(scorer: &Scorer, scores: &[f32]) -> Value {
    let map: Map<String, Value> = scorer
        .head_names()
        .iter()
        .zip(scores)
        .map(|(h, s)| (h.to_string(), json!(s)))
        .collect();
    Value::Object(map)
}

/// 408 for a body not sent within the body-read timeout; the connection is closed after it.
pub(super) fn body_timeout(state: &AppState) -> Response {
    state.metrics.error("body_timeout");
    state.metrics.connection_closed("body_timeout");
    let mut response = error(
        StatusCode::REQUEST_TIMEOUT,
        format!(
            "request body not received within {} s",
            state.options.body_read_timeout.as_secs_f64()
        ),
    );
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

pub(super) fn body_too_large(state: &AppState) -> Response {
    state.metrics.error("body_too_large");
    closing(error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "request body over the limit of {} bytes",
            state.options.body_limit
        ),
    ))
}

/// Marks a response sent before its request's body was read in full: hyper closes such a
/// connection after answering, and `Connection: close` tells the client so, instead of it
/// sending its next request into a closed socket.
pub(super) fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

pub(super) fn rejection_response(state: &AppState, status: StatusCode, text: String) -> Response {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return body_too_large(state);
    }
    state.metrics.error("bad_request");
    // The body was left unread where it broke.
    closing(error(status, text))
}

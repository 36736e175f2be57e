//! `agiqa serve`: an HTTP scoring service for running next to other services.
//!
//! - `POST /v1/score`: a raw image body → `{"scores": {"<head>": s, ...}}`; or
//!   `multipart/form-data` with several images → `{"results": [{"name", "scores" | "error"}]}`.
//! - `GET /health` (model description), `GET /live` (the process answers), `GET /ready` (the
//!   model is warm and the service not draining), `GET /metrics` (Prometheus text).
//!
//! Every response carries an `x-request-id` (the client's or a new one), also on its log line.
//! Slow clients are bounded: headers, bodies and keep-alive idle each have a timeout, open
//! connections a limit, and what the service closes is counted in `/metrics`. Compressed
//! bodies (`Content-Encoding`) are refused with 415: their decoded size escapes the body limit.
//!
//! Admission comes before any work, as text-embeddings-inference does it: at most
//! `queue_capacity` images may be in the service at once (being read, decoded, queued or
//! scored). A raw body is one image, admitted or refused (503 with `Retry-After`) before a byte
//! of it is read; multipart parts are admitted one by one as they stream in, and the first part
//! that finds no room refuses the request without reading or decoding it; a request with more
//! parts than the service could ever admit gets 413. Admitted images decode on the blocking
//! pool (a bounded number at a time, a request's parts in parallel), then hand their model
//! inputs to one batcher task: it takes the first waiting image, gathers more for at most
//! `max_wait` or until `max_batch`, and runs them as one batch while the next ones queue.
//! Bodies over the limit get 413; images over the dimension limit 422;
//! a request that is not answered within the timeout 504. Shutdown (SIGTERM or Ctrl-C) stops
//! accepting connections and finishes the requests in flight.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::scorer::{ModelInput, ScoreError, Scorer};

/// How the service runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Most images in one inference batch.
    pub max_batch: usize,
    /// Longest an image waits for others to share its batch.
    pub max_wait: Duration,
    /// Images that may be in the service at once (waiting for or in inference); a request
    /// whose images do not fit gets 503.
    pub queue_capacity: usize,
    /// Largest request body, in bytes (413 beyond).
    pub body_limit: usize,
    /// Longest a request may take before it is answered 504.
    pub request_timeout: Duration,
    /// Images decoded at the same time (decoding is CPU-bound; more only thrashes).
    pub decode_concurrency: usize,
    /// Longest a client may take to send a request's headers; the connection is closed beyond.
    pub header_read_timeout: Duration,
    /// Longest a client may take to send a request's body, from its headers (408 beyond, and
    /// the connection is closed).
    pub body_read_timeout: Duration,
    /// Longest a keep-alive connection may wait for its next request. Hyper also runs the
    /// header-read timer while it waits, so the smaller of the two applies.
    pub keep_alive_timeout: Duration,
    /// Most connections open at once; one beyond is closed as soon as it is accepted.
    pub max_connections: usize,
    /// After the shutdown signal, how long the service keeps serving while `/ready` answers
    /// 503, so that load balancers stop sending before connections close.
    pub drain_grace: Duration,
    /// Faults injected into decoding and inference, for tests of how the service contains
    /// them; `None` in service.
    #[doc(hidden)]
    pub faults: Option<Arc<dyn Faults>>,
}

/// Where tests inject failures (see [`ServeOptions::faults`]); each hook runs on the thread
/// that does the work, so a panic in it is a panic in that work.
#[doc(hidden)]
pub trait Faults: Send + Sync + std::fmt::Debug {
    /// Before an image's bytes are decoded.
    fn before_decode(&self, _bytes: &[u8]) {}
    /// In the batcher task, when it has gathered a batch of `size` images.
    fn batch_formed(&self, _size: usize) {}
    /// Before a batch of `size` images runs; an error fails the batch as ONNX Runtime would.
    fn before_inference(&self, _size: usize) -> Result<(), String> {
        Ok(())
    }
}

impl ServeOptions {
    /// Defaults for a scorer: its batch size, 5 ms wait, 256 queued images, 32 MiB bodies,
    /// 30 s timeout, one decoder per core; 10 s to send headers, 30 s a body, 5 s keep-alive
    /// idle, 1024 connections.
    pub fn for_scorer(scorer: &Scorer) -> Self {
        ServeOptions {
            max_batch: scorer.batch_size(),
            max_wait: Duration::from_millis(5),
            queue_capacity: 256,
            body_limit: 32 << 20,
            request_timeout: Duration::from_secs(30),
            decode_concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(5),
            max_connections: 1024,
            drain_grace: Duration::ZERO,
            faults: None,
        }
    }
}

/// One image waiting for inference.
struct Job {
    input: ModelInput,
    reply: oneshot::Sender<Result<Vec<f32>, String>>,
    /// The image's admission slot, given back when its batch is done.
    _admitted: OwnedSemaphorePermit,
}

struct AppState {
    scorer: Arc<Scorer>,
    queue: mpsc::Sender<Job>,
    admission: Arc<Semaphore>,
    decoders: Arc<Semaphore>,
    options: ServeOptions,
    metrics: Arc<Metrics>,
    /// The model has run a warm-up batch.
    warm: AtomicBool,
    /// Shutdown has begun: no new connections, requests in flight finish.
    draining: AtomicBool,
}

/// Serves until `shutdown` completes, then finishes in-flight requests and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    scorer: Arc<Scorer>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (queue, jobs) = mpsc::channel(options.queue_capacity.max(1));
    let metrics = Arc::new(Metrics::default());
    // The batcher ends when the last queue sender (held by the state) is gone, i.e. after the
    // server has finished every request.
    let batcher = tokio::spawn(supervise_batcher(
        Arc::clone(&scorer),
        options.clone(),
        Arc::clone(&metrics),
        jobs,
    ));
    let state = Arc::new(AppState {
        scorer,
        queue,
        admission: Arc::new(Semaphore::new(options.queue_capacity.max(1))),
        decoders: Arc::new(Semaphore::new(options.decode_concurrency.max(1))),
        options,
        metrics,
        warm: AtomicBool::new(false),
        draining: AtomicBool::new(false),
    });
    tokio::spawn(warm_up(Arc::clone(&state)));
    let result = accept_connections(listener, Arc::clone(&state), shutdown).await;
    drop(state);
    let _ = batcher.await;
    result
}

/// Runs one batch of a blank image so that the first request does not pay for lazy
/// initialisation (and TensorRT engine builds); `/ready` answers 200 only after it.
async fn warm_up(state: Arc<AppState>) {
    let scorer = Arc::clone(&state.scorer);
    let outcome = tokio::task::spawn_blocking(move || {
        let input = scorer.prepare(&image::RgbImage::new(8, 8))?;
        scorer.run_batch(&[input]).map(|_| ())
    })
    .await;
    match outcome {
        Ok(Ok(())) => {
            state.warm.store(true, Ordering::Release);
            tracing::info!("model warm: ready");
        }
        Ok(Err(e)) => tracing::error!(error = %e, "warm-up batch failed: not ready"),
        Err(e) => tracing::error!(error = %e, "warm-up batch crashed: not ready"),
    }
}

/// The accept loop: one task per connection, at most `max_connections` at once, each with the
/// header-read, body-read and keep-alive limits. On shutdown it answers `/ready` 503 for the
/// drain grace, then stops accepting, asks every connection to close once its request is
/// answered, and waits for them.
async fn accept_connections(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(Arc::clone(&state));
    let limit = state
        .options
        .max_connections
        .clamp(1, Semaphore::MAX_PERMITS >> 1);
    let open = Arc::new(Semaphore::new(limit));
    let (closing, closing_seen) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    // Set once the shutdown signal came: not ready from then on, closing at this instant.
    let mut close_at: Option<tokio::time::Instant> = None;
    loop {
        let stream = tokio::select! {
            () = &mut shutdown, if close_at.is_none() => {
                state.draining.store(true, Ordering::Release);
                close_at = Some(tokio::time::Instant::now() + state.options.drain_grace);
                continue;
            }
            () = tokio::time::sleep_until(close_at.unwrap_or_else(tokio::time::Instant::now)),
                if close_at.is_some() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&open).try_acquire_owned() else {
            state.metrics.connection_closed("connection_limit");
            continue;
        };
        let (app, state, closing) = (app.clone(), Arc::clone(&state), closing_seen.clone());
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(stream, app, &state, closing).await;
        });
    }
    state.draining.store(true, Ordering::Release);
    let _ = closing.send(true);
    drop(app);
    // Every connection has finished once all the slots are back.
    let _ = open.acquire_many(limit as u32).await;
    Ok(())
}

/// Requests in flight on one connection, and since when it has been idle (after its first
/// request: a fresh connection is bounded by the header-read timeout).
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Option<Instant>>,
}

/// Marks a request in flight until dropped.
struct Busy(Arc<Activity>);

impl Activity {
    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(self))
    }

    /// When the keep-alive limit runs out, if the connection is idle now.
    fn idle_deadline(&self, keep_alive: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        since.map(|t| t + keep_alive)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    app: Router,
    state: &AppState,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    use hyper::service::Service as _;
    state
        .metrics
        .open_connections
        .fetch_add(1, Ordering::Relaxed);
    let activity = Arc::new(Activity::default());
    let service = {
        let (service, activity) = (
            hyper_util::service::TowerToHyperService::new(app),
            Arc::clone(&activity),
        );
        hyper::service::service_fn(move |request| {
            let busy = activity.begin();
            let answer = service.call(request);
            async move {
                let response = answer.await;
                drop(busy);
                response
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(state.options.header_read_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let keep_alive = state.options.keep_alive_timeout;
    let mut closing_asked = false;
    let outcome = loop {
        let idle_deadline = activity.idle_deadline(keep_alive);
        // Re-checked at least every keep-alive period: a request may start or end meanwhile.
        let wake = idle_deadline.unwrap_or_else(|| Instant::now() + keep_alive);
        tokio::select! {
            outcome = connection.as_mut() => break outcome,
            _ = closing.changed(), if !closing_asked => {
                closing_asked = true;
                connection.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(wake.into()), if !closing_asked => {
                if activity.idle_deadline(keep_alive).is_some_and(|d| d <= Instant::now()) {
                    state.metrics.connection_closed("keep_alive_idle");
                    closing_asked = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    };
    if let Err(e) = outcome {
        if e.is_timeout() {
            state.metrics.connection_closed("header_timeout");
            tracing::info!("closed a connection that did not send its headers in time");
        } else {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
    state
        .metrics
        .open_connections
        .fetch_sub(1, Ordering::Relaxed);
}

/// Binds `addr` and serves until SIGTERM or Ctrl-C.
pub async fn serve_until_signal(
    addr: SocketAddr,
    scorer: Arc<Scorer>,
    options: ServeOptions,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(address = %listener.local_addr()?, "listening");
    serve(listener, scorer, options, shutdown_signal()).await
}

/// Completes on SIGTERM (what orchestrators send) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}

fn router(state: Arc<AppState>) -> Router {
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
    }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(state.admitted()),
    )
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
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
    let Some(admitted) = admit(state) else {
        return busy(state);
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

/// Multipart: each part is admitted as it arrives, before its bytes are read, and decoded on
/// the pool while the next part streams in. The first part that finds no room refuses the
/// whole request (503); what was not admitted is never read or decoded.
async fn score_multipart(state: &Arc<AppState>, request: Request) -> Response {
    let mut multipart = match Multipart::from_request(request, state).await {
        Ok(m) => m,
        Err(rejection) => {
            return rejection_response(state, rejection.status(), rejection.body_text())
        }
    };
    // Dropping the set (a refusal, a timeout, a client gone) aborts the parts in flight.
    let mut parts = tokio::task::JoinSet::new();
    let mut names = Vec::new();
    let body_deadline = tokio::time::Instant::now() + state.options.body_read_timeout;
    loop {
        let mut field = match tokio::time::timeout_at(body_deadline, multipart.next_field()).await {
            Ok(Ok(Some(field))) => field,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => return rejection_response(state, e.status(), e.body_text()),
            Err(_) => return body_timeout(state),
        };
        let capacity = state.options.queue_capacity.max(1);
        if names.len() == capacity {
            state.metrics.error("too_many_images");
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "more than {capacity} images in one request: the service admits at most \
                     {capacity} at once; send them in smaller requests"
                ),
            );
        }
        let Some(admitted) = admit(state) else {
            return busy(state);
        };
        let name = field
            .file_name()
            .or(field.name())
            .map_or_else(|| format!("image{}", names.len()), str::to_string);
        let mut bytes = Vec::new();
        loop {
            match tokio::time::timeout_at(body_deadline, field.chunk()).await {
                Ok(Ok(Some(chunk))) => bytes.extend_from_slice(&chunk),
                Ok(Ok(None)) => break,
                Ok(Err(e)) => return rejection_response(state, e.status(), e.body_text()),
                Err(_) => return body_timeout(state),
            }
        }
        let index = names.len();
        names.push(name);
        let state = Arc::clone(state);
        parts.spawn(async move { (index, score_one(state, Bytes::from(bytes), admitted).await) });
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

/// `{head: score}` for one image.
fn named(scorer: &Scorer, scores: &[f32]) -> Value {
    let map: Map<String, Value> = scorer
        .head_names()
        .iter()
        .zip(scores)
        .map(|(h, s)| (h.to_string(), json!(s)))
        .collect();
    Value::Object(map)
}

/// One admission slot, if one is free.
fn admit(state: &AppState) -> Option<OwnedSemaphorePermit> {
    Arc::clone(&state.admission).try_acquire_owned().ok()
}

/// The 503 for a request that found no admission slot, with a `Retry-After` from the backlog.
fn busy(state: &AppState) -> Response {
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
    fn admitted(&self) -> usize {
        self.options
            .queue_capacity
            .max(1)
            .saturating_sub(self.admission.available_permits())
    }

    /// Seconds until the admitted backlog is likely scored: its batches at the mean batch
    /// time so far (1 s before any batch has run), at least 1 and at most 60.
    fn retry_after_seconds(&self) -> u64 {
        let batches = self
            .admitted()
            .div_ceil(self.options.max_batch.max(1))
            .max(1);
        let per_batch = self.metrics.inference.mean().unwrap_or(1.0);
        ((batches as f64 * per_batch).ceil() as u64).clamp(1, 60)
    }
}

/// One image's scores, or the status and reason it was not scored.
type Outcome = Result<Vec<f32>, (StatusCode, String)>;

/// Decodes one admitted image on the decode pool and scores it in the next batch; the
/// admission slot is held until its batch is done.
async fn score_one(state: Arc<AppState>, bytes: Bytes, admitted: OwnedSemaphorePermit) -> Outcome {
    let (input, admitted) = decode(&state, bytes, admitted).await?;
    let (reply, answer) = oneshot::channel();
    state.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
    let job = Job {
        input,
        reply,
        _admitted: admitted,
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

/// 408 for a body not sent within the body-read timeout; the connection is closed after it.
fn body_timeout(state: &AppState) -> Response {
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

fn body_too_large(state: &AppState) -> Response {
    state.metrics.error("body_too_large");
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "request body over the limit of {} bytes",
            state.options.body_limit
        ),
    )
}

fn rejection_response(state: &AppState, status: StatusCode, text: String) -> Response {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return body_too_large(state);
    }
    state.metrics.error("bad_request");
    error(status, text)
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
async fn supervise_batcher(
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
        let (inputs, replies): (Vec<ModelInput>, Vec<_>) =
            batch.into_iter().map(|j| (j.input, j.reply)).unzip();
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
        let failure = match outcome {
            Ok(Ok(scores)) if scores.len() == n => {
                metrics.images_scored.fetch_add(n as u64, Ordering::Relaxed);
                for (reply, s) in replies.into_iter().zip(scores) {
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
        tracing::error!(images = n, reason = %failure, "batch failed");
        metrics.images_failed.fetch_add(n as u64, Ordering::Relaxed);
        for reply in replies {
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

/// Prometheus histogram with fixed buckets.
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: f64) {
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            if value <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The mean observation, once there is one.
    fn mean(&self) -> Option<f64> {
        let count = self.count.load(Ordering::Relaxed);
        (count > 0).then(|| self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6 / count as f64)
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// All the service's Prometheus series, rendered by hand (a dozen lines do not need a crate).
struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    latency: Histogram,
    batch_size: Histogram,
    inference: Histogram,
    images_scored: AtomicU64,
    images_failed: AtomicU64,
    queue_depth: AtomicUsize,
    /// Connections the service closed, by reason (slow headers, idle keep-alive, the limit).
    connections_closed: Mutex<BTreeMap<&'static str, u64>>,
    open_connections: AtomicUsize,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            errors: Mutex::default(),
            latency: Histogram::new(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            batch_size: Histogram::new(&[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
            inference: Histogram::new(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            images_scored: AtomicU64::new(0),
            images_failed: AtomicU64::new(0),
            queue_depth: AtomicUsize::new(0),
            connections_closed: Mutex::default(),
            open_connections: AtomicUsize::new(0),
        }
    }
}

impl Metrics {
    fn observe_request(&self, path: &str, status: StatusCode, elapsed: Duration) {
        // Unknown paths share one label so that scanners cannot grow the series without bound.
        let path = match path {
            "/v1/score" | "/health" | "/live" | "/ready" | "/metrics" => path,
            _ => "other",
        };
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *requests
            .entry((path.to_string(), status.as_u16()))
            .or_default() += 1;
        drop(requests);
        if path == "/v1/score" {
            self.latency.observe(elapsed.as_secs_f64());
        }
    }

    fn observe_batch(&self, size: usize, elapsed: Duration) {
        self.batch_size.observe(size as f64);
        self.inference.observe(elapsed.as_secs_f64());
    }

    fn connection_closed(&self, reason: &'static str) {
        let mut closed = self
            .connections_closed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *closed.entry(reason).or_default() += 1;
    }

    fn error(&self, kind: &'static str) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *errors.entry(kind).or_default() += 1;
    }

    /// The series in Prometheus text; `admitted` is the admission gauge (owned by the state).
    fn render(&self, admitted: usize) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        out.push_str("# HELP agiqa_requests_total HTTP requests by path and status.\n# TYPE agiqa_requests_total counter\n");
        for ((path, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "agiqa_requests_total{{path=\"{path}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP agiqa_errors_total Failed requests or images by kind.\n# TYPE agiqa_errors_total counter\n");
        for (kind, n) in self.errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "agiqa_errors_total{{kind=\"{kind}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP agiqa_images_total Images by outcome.\n# TYPE agiqa_images_total counter\n\
             agiqa_images_total{{outcome=\"scored\"}} {}\nagiqa_images_total{{outcome=\"failed\"}} {}",
            self.images_scored.load(Ordering::Relaxed),
            self.images_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP agiqa_queue_depth Images waiting for inference.\n# TYPE agiqa_queue_depth gauge\n\
             agiqa_queue_depth {}",
            self.queue_depth.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP agiqa_images_admitted Images admitted and not yet answered (reading, \
             decoding, queued or in inference).\n# TYPE agiqa_images_admitted gauge\n\
             agiqa_images_admitted {admitted}"
        );
        out.push_str("# HELP agiqa_connections_closed_total Connections the service closed, by reason.\n# TYPE agiqa_connections_closed_total counter\n");
        for (reason, n) in self
            .connections_closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "agiqa_connections_closed_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP agiqa_connections_open Open client connections.\n# TYPE agiqa_connections_open gauge\n\
             agiqa_connections_open {}",
            self.open_connections.load(Ordering::Relaxed)
        );
        self.latency.render(
            "agiqa_request_duration_seconds",
            "Latency of POST /v1/score.",
            &mut out,
        );
        self.batch_size
            .render("agiqa_batch_size", "Images per inference batch.", &mut out);
        self.inference.render(
            "agiqa_inference_duration_seconds",
            "Time of one inference batch.",
            &mut out,
        );
        out
    }
}

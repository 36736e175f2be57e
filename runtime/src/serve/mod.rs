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

mod admission;
mod batcher;
mod connection;
mod metrics;
mod multipart;
mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};

use crate::scorer::Scorer;
use batcher::{supervise_batcher, Job};
use connection::accept_connections;
use metrics::Metrics;

#[doc(hidden)]
pub use multipart::read_parts_for_fuzzing;

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
    /// With a bound, an image is refused (503) when the images already admitted are predicted
    /// to take longer than this to score (at the inference cost per image so far), so that
    /// what is accepted under overload is answered in about this time plus its own batch.
    pub max_queue_delay: Option<Duration>,
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
            max_queue_delay: None,
            drain_grace: Duration::ZERO,
            faults: None,
        }
    }
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

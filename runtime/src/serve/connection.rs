//! The HTTP/1 connections: the accept loop with its connection limit, and per connection the
//! header-read and keep-alive timeouts and the graceful close on shutdown.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use tokio::sync::Semaphore;

use super::routes::router;
use super::AppState;

/// The accept loop: one task per connection, at most `max_connections` at once, each with the
/// header-read, body-read and keep-alive limits. On shutdown it answers `/ready` 503 for the
/// drain grace, then stops accepting, asks every connection to close once its request is
/// answered, and waits for them.
pub(super) async fn accept_connections(
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

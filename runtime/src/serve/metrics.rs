//! The service's Prometheus series.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use axum::http::StatusCode;

/// Prometheus histogram with fixed buckets.
pub(super) struct Histogram {
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

    /// The sum of the observations.
    pub(super) fn sum(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// The mean observation, once there is one.
    pub(super) fn mean(&self) -> Option<f64> {
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
pub(super) struct Metrics {
    pub(super) requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub(super) errors: Mutex<BTreeMap<&'static str, u64>>,
    pub(super) latency: Histogram,
    pub(super) batch_size: Histogram,
    pub(super) inference: Histogram,
    pub(super) images_scored: AtomicU64,
    pub(super) images_failed: AtomicU64,
    pub(super) queue_depth: AtomicUsize,
    /// Connections the service closed, by reason (slow headers, idle keep-alive, the limit).
    pub(super) connections_closed: Mutex<BTreeMap<&'static str, u64>>,
    pub(super) open_connections: AtomicUsize,
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
    pub(super) fn observe_request(&self, path: &str, status: StatusCode, elapsed: Duration) {
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

    pub(super) fn observe_batch(&self, size: usize, elapsed: Duration) {
        self.batch_size.observe(size as f64);
        self.inference.observe(elapsed.as_secs_f64());
    }

    pub(super) fn connection_closed(&self, reason: &'static str) {
        let mut closed = self
            .connections_closed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *closed.entry(reason).or_default() += 1;
    }

    pub(super) fn error(&self, kind: &'static str) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *errors.entry(kind).or_default() += 1;
    }

    /// The series in Prometheus text; `admitted` is the admission gauge (owned by the state).
    pub(super) fn render(&self, admitted: usize) -> String {
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

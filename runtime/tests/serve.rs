//! The HTTP service over loopback with a real HTTP client: concurrent clients and dynamic
//! batching, multipart, bad images, an oversized body, a full queue, metrics, and a graceful
//! shutdown that finishes the request in flight.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agiqa_runtime::scorer::Scorer;
use agiqa_runtime::serve::{serve, ServeOptions};
use common::{bad_images, good_images, load};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

struct Server {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(scorer: Scorer, configure: impl FnOnce(&mut ServeOptions)) -> Server {
        let scorer = Arc::new(scorer);
        let mut options = ServeOptions::for_scorer(&scorer);
        configure(&mut options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, scorer, options, async {
            let _ = stopped.await;
        }));
        Server {
            url,
            stop: Some(stop),
            task,
        }
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("shuts down")
            .unwrap()
            .unwrap();
    }
}

/// `POST /v1/score` with a raw image body.
async fn post_raw(client: &reqwest::Client, url: &str, body: Vec<u8>) -> reqwest::Response {
    client
        .post(format!("{url}/v1/score"))
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn metrics(client: &reqwest::Client, url: &str) -> String {
    client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Polls `/metrics` until `series` reads `value` (a condition, not a sleep of some margin).
async fn wait_for_metric(client: &reqwest::Client, url: &str, series: &str, value: f64) {
    for _ in 0..1000 {
        if metric(&metrics(client, url).await, series) == value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{series} never reached {value}");
}

/// Everything the server sends until it closes the connection or goes quiet for 10 s.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&out);
                // A JSON error body is complete once its closing brace is in.
                if text.contains("\r\n\r\n") && text.trim_end().ends_with('}') {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A raw-socket request whose headers declare `length` body bytes, none of them sent yet.
async fn headers_only(url: &str, content_type: &str, length: usize) -> TcpStream {
    let mut stream = TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /v1/score HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n\
         Content-Length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refuses_before_the_body_is_read() {
    let server = Server::start(load("mean_f32.onnx"), |o| o.queue_capacity = 1).await;
    let client = reqwest::Client::new();
    let (_, image) = good_images().remove(0);
    // The first request takes the only slot as soon as its headers are in, body unsent.
    let mut first = headers_only(&server.url, "image/jpeg", image.len()).await;
    wait_for_metric(&client, &server.url, "agiqa_images_admitted", 1.0).await;
    // The second is refused while its client has not sent (and never sends) its body.
    let mut second = headers_only(&server.url, "image/jpeg", image.len()).await;
    let refused = read_response(&mut second).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: "),
        "{refused}"
    );
    assert!(refused.contains("queue is full"), "{refused}");
    // Its body is never read, so the connection closes, and the client is told.
    assert!(
        refused.to_ascii_lowercase().contains("connection: close"),
        "{refused}"
    );
    // A multipart request is refused at its first part's headers, its bytes never sent.
    let boundary = "XyZ";
    let mut third = headers_only(
        &server.url,
        &format!("multipart/form-data; boundary={boundary}"),
        100_000,
    )
    .await;
    third
        .write_all(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"a\"; \
                 filename=\"a.jpg\"\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let refused = read_response(&mut third).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    // The admitted one is scored once its body comes.
    first.write_all(&image).await.unwrap();
    let scored = read_response(&mut first).await;
    assert!(scored.starts_with("HTTP/1.1 200"), "{scored}");
    assert!(scored.contains("\"quality\""), "{scored}");
    let text = metrics(&client, &server.url).await;
    assert_eq!(
        metric(&text, "agiqa_errors_total{kind=\"queue_full\"}"),
        2.0
    );
    assert_eq!(metric(&text, "agiqa_images_admitted"), 0.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_images_than_the_queue_holds_get_413() {
    let server = Server::start(load("mean_f32.onnx"), |o| o.queue_capacity = 2).await;
    let client = reqwest::Client::new();
    let (_, image) = good_images().remove(0);
    let mut form = reqwest::multipart::Form::new();
    for name in ["a", "b", "c"] {
        form = form.part(name, reqwest::multipart::Part::bytes(image.clone()));
    }
    let response = client
        .post(format!("{}/v1/score", server.url))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let json: Value = response.json().await.unwrap();
    assert!(
        json["error"].as_str().unwrap().contains("at most 2"),
        "{json}"
    );
    // The refused request's two admitted parts are abandoned: their slots come back once
    // their work is cancelled or finished, which may be just after the 413 was sent.
    wait_for_metric(&client, &server.url, "agiqa_images_admitted", 0.0).await;
    // Two fit.
    let form = reqwest::multipart::Form::new()
        .part("a", reqwest::multipart::Part::bytes(image.clone()))
        .part("b", reqwest::multipart::Part::bytes(image));
    let response = client
        .post(format!("{}/v1/score", server.url))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = metrics(&client, &server.url).await;
    assert_eq!(
        metric(&text, "agiqa_errors_total{kind=\"too_many_images\"}"),
        1.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_are_batched_and_scored() {
    let reference = load("mean_f32.onnx");
    let images = good_images();
    let expected: Vec<f32> = images
        .iter()
        .map(|(_, b)| reference.score_bytes(b).unwrap()[0])
        .collect();
    let server = Server::start(load("mean_f32.onnx"), |o| {
        o.max_batch = 4;
        o.max_wait = Duration::from_millis(30);
    })
    .await;
    let client = reqwest::Client::new();
    let health: Value = client
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["provider"], "cpu");

    let requests = 32;
    let mut tasks = Vec::new();
    for i in 0..requests {
        let (client, url) = (client.clone(), server.url.clone());
        let (body, want) = (
            images[i % images.len()].1.clone(),
            expected[i % images.len()],
        );
        tasks.push(tokio::spawn(async move {
            let response = post_raw(&client, &url, body).await;
            assert_eq!(response.status(), 200);
            let json: Value = response.json().await.unwrap();
            let got = json["scores"]["quality"].as_f64().unwrap() as f32;
            assert!((got - want).abs() < 1e-5, "{json} vs {want}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let text = metrics(&client, &server.url).await;
    let batches = metric(&text, "agiqa_batch_size_count");
    let images_in_batches = metric(&text, "agiqa_batch_size_sum");
    assert_eq!(images_in_batches, requests as f64);
    assert!(
        batches < requests as f64,
        "no request shared a batch:\n{text}"
    );
    assert_eq!(
        metric(
            &text,
            "agiqa_requests_total{path=\"/v1/score\",status=\"200\"}"
        ),
        requests as f64
    );
    assert_eq!(
        metric(&text, "agiqa_request_duration_seconds_count"),
        requests as f64
    );
    assert_eq!(metric(&text, "agiqa_queue_depth"), 0.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_scores_each_part_and_reports_bad_ones() {
    let server = Server::start(load("three_heads.onnx"), |_| {}).await;
    let client = reqwest::Client::new();
    let (good_name, good) = good_images().remove(1);
    let (bad_name, bad, _) = bad_images().remove(3);
    let form = reqwest::multipart::Form::new()
        .part(
            "a",
            reqwest::multipart::Part::bytes(good.clone()).file_name(good_name.clone()),
        )
        .part(
            "b",
            reqwest::multipart::Part::bytes(bad).file_name(bad_name.clone()),
        )
        .part("c", reqwest::multipart::Part::bytes(good));
    let response = client
        .post(format!("{}/v1/score", server.url))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let json: Value = response.json().await.unwrap();
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{json}");
    assert_eq!(results[0]["name"], good_name.as_str());
    for head in ["quality", "alignment", "authenticity"] {
        assert!(results[0]["scores"][head].is_f64(), "{json}");
    }
    assert_eq!(results[0]["scores"], results[2]["scores"]);
    assert_eq!(results[1]["name"], bad_name.as_str());
    assert!(
        results[1]["error"].as_str().unwrap().contains("corrupt"),
        "{json}"
    );

    // A single bad raw body is a 422 with the reason.
    let (_, huge, _) = bad_images()
        .into_iter()
        .find(|(n, _, _)| n == "huge.png")
        .unwrap();
    let response = post_raw(&client, &server.url, huge).await;
    assert_eq!(response.status(), 422);
    let json: Value = response.json().await.unwrap();
    assert!(
        json["error"].as_str().unwrap().contains("over the limit"),
        "{json}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413() {
    let server = Server::start(load("mean_f32.onnx"), |o| o.body_limit = 16 * 1024).await;
    let client = reqwest::Client::new();
    let big = vec![0u8; 64 * 1024];
    let response = post_raw(&client, &server.url, big.clone()).await;
    assert_eq!(response.status(), 413);
    let json: Value = response.json().await.unwrap();
    assert!(json["error"].as_str().unwrap().contains("16384"), "{json}");
    // Same through multipart.
    let form = reqwest::multipart::Form::new().part("a", reqwest::multipart::Part::bytes(big));
    let response = client
        .post(format!("{}/v1/score", server.url))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    // The server still works.
    let (_, small) = good_images().remove(0);
    let response = post_raw(&client, &server.url, small).await;
    assert_eq!(response.status(), 200);
    let text = metrics(&client, &server.url).await;
    assert_eq!(
        metric(&text, "agiqa_errors_total{kind=\"body_too_large\"}"),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "agiqa_requests_total{path=\"/v1/score\",status=\"413\"}"
        ),
        2.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_503() {
    // Room for one image; the first waits 2 s for batch company, so the second finds no room.
    let server = Server::start(load("mean_f32.onnx"), |o| {
        o.max_batch = 4;
        o.max_wait = Duration::from_secs(2);
        o.queue_capacity = 1;
    })
    .await;
    let client = reqwest::Client::new();
    let (_, image) = good_images().remove(0);
    let first = tokio::spawn({
        let (client, url, body) = (client.clone(), server.url.clone(), image.clone());
        async move {
            let r = post_raw(&client, &url, body).await;
            r.status().as_u16()
        }
    });
    wait_for_metric(&client, &server.url, "agiqa_images_admitted", 1.0).await;
    let second = post_raw(&client, &server.url, image.clone()).await;
    assert_eq!(second.status(), 503);
    let body = second.text().await.unwrap();
    assert!(body.contains("queue is full"), "{body}");
    assert_eq!(first.await.unwrap(), 200);
    // Once the first is answered its slot is free again.
    let third = post_raw(&client, &server.url, image).await;
    assert_eq!(third.status(), 200);
    let text = metrics(&client, &server.url).await;
    assert_eq!(
        metric(&text, "agiqa_errors_total{kind=\"queue_full\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "agiqa_requests_total{path=\"/v1/score\",status=\"503\"}"
        ),
        1.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_time_out_with_504() {
    // The lone image waits 400 ms for company; the request may take 100 ms.
    let server = Server::start(load("mean_f32.onnx"), |o| {
        o.max_batch = 4;
        o.max_wait = Duration::from_millis(400);
        o.request_timeout = Duration::from_millis(100);
    })
    .await;
    let (_, image) = good_images().remove(0);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/score", server.url))
        .body(image)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight() {
    let server = Server::start(load("mean_f32.onnx"), |o| {
        o.max_batch = 4;
        o.max_wait = Duration::from_millis(300);
    })
    .await;
    let url = server.url.clone();
    let (_, image) = good_images().remove(0);
    let client = reqwest::Client::new();
    let in_flight = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post(format!("{url}/v1/score"))
                .body(image)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    // The request is now waiting in its batch; shut down underneath it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.shutdown().await;
    assert_eq!(in_flight.await.unwrap().unwrap(), 200);
    // And the server is gone.
    assert!(client.get(format!("{url}/health")).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_header_is_closed_after_the_header_timeout_and_counted() {
    let server = Server::start(load("mean_f32.onnx"), |o| {
        o.header_read_timeout = Duration::from_millis(200);
    })
    .await;
    let client = reqwest::Client::new();
    let mut stalled = TcpStream::connect(server.url.trim_start_matches("http://"))
        .await
        .unwrap();
    stalled
        .write_all(b"POST /v1/score HTTP/1.1\r\nHost: te")
        .await
        .unwrap();
    // The server closes it (EOF), well before this 10 s guard; nothing is answered.
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf))
        .await
        .expect("the server closes a stalled header");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    wait_for_metric(
        &client,
        &server.url,
        "agiqa_connections_closed_total{reason=\"header_timeout\"}",
        1.0,
    )
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408_and_is_counted() {
    let server = Server::start(load("mean_f32.onnx"), |o| {
        o.body_read_timeout = Duration::from_millis(200);
    })
    .await;
    let client = reqwest::Client::new();
    let mut stalled = headers_only(&server.url, "image/png", 1000).await;
    stalled.write_all(b"\x89PNG").await.unwrap();
    let answer = read_response(&mut stalled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("not received within"), "{answer}");
    let text = metrics(&client, &server.url).await;
    assert_eq!(
        metric(
            &text,
            "agiqa_connections_closed_total{reason=\"body_timeout\"}"
        ),
        1.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_and_counted() {
    let server = Server::start(load("mean_f32.onnx"), |o| {
        o.keep_alive_timeout = Duration::from_millis(200);
    })
    .await;
    let client = reqwest::Client::new();
    let mut idle = TcpStream::connect(server.url.trim_start_matches("http://"))
        .await
        .unwrap();
    idle.write_all(b"GET /live HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let answer = read_response(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Then nothing: the server closes the idle connection.
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("the server closes an idle keep-alive connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    wait_for_metric(
        &client,
        &server.url,
        "agiqa_connections_closed_total{reason=\"keep_alive_idle\"}",
        1.0,
    )
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_and_counted() {
    let server = Server::start(load("mean_f32.onnx"), |o| o.max_connections = 1).await;
    // The one allowed connection, kept open.
    let mut first = TcpStream::connect(server.url.trim_start_matches("http://"))
        .await
        .unwrap();
    first
        .write_all(b"GET /live HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut first).await.starts_with("HTTP/1.1 200"));
    // A second is closed unanswered.
    let mut second = TcpStream::connect(server.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let _ = second
        .write_all(b"GET /live HTTP/1.1\r\nHost: test\r\n\r\n")
        .await;
    assert_eq!(read_response(&mut second).await, "");
    // The first still works, and the refusal is counted.
    first
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 8192];
    while !String::from_utf8_lossy(&text).contains("agiqa_connections_open") {
        let n = tokio::time::timeout(Duration::from_secs(10), first.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        text.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("agiqa_connections_closed_total{reason=\"connection_limit\"} 1"),
        "{text}"
    );
    drop(first);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_ready_request_ids_and_compressed_bodies() {
    let server = Server::start(load("mean_f32.onnx"), |_| {}).await;
    let client = reqwest::Client::new();
    let live = client
        .get(format!("{}/live", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    assert!(live.headers().contains_key("x-request-id"));
    // Ready once the warm-up batch has run (a condition, polled).
    let mut ready = 0;
    for _ in 0..1000 {
        ready = client
            .get(format!("{}/ready", server.url))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ready, 200);
    // A client's request id is echoed; a compressed body is refused.
    let (_, image) = good_images().remove(0);
    let response = client
        .post(format!("{}/v1/score", server.url))
        .header("x-request-id", "abc-123")
        .header("content-encoding", "gzip")
        .body(image)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    assert_eq!(response.headers()["x-request-id"], "abc-123");
    let json: Value = response.json().await.unwrap();
    assert!(json["error"].as_str().unwrap().contains("gzip"), "{json}");
    let text = metrics(&client, &server.url).await;
    assert_eq!(
        metric(&text, "agiqa_errors_total{kind=\"compressed_body\"}"),
        1.0
    );
    server.shutdown().await;
}

/// Fails or panics the next inference batch on request, and panics decoding `PANIC…` bodies.
#[derive(Debug, Default)]
struct Injected {
    fail_next_batch: std::sync::atomic::AtomicBool,
    panic_next_batch: std::sync::atomic::AtomicBool,
    panic_batcher: std::sync::atomic::AtomicBool,
}

impl agiqa_runtime::serve::Faults for Injected {
    fn before_decode(&self, bytes: &[u8]) {
        if bytes.starts_with(b"PANIC") {
            panic!("injected decode panic");
        }
    }

    fn batch_formed(&self, _size: usize) {
        if self
            .panic_batcher
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("injected batcher panic");
        }
    }

    fn before_inference(&self, _size: usize) -> Result<(), String> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.panic_next_batch.swap(false, SeqCst) {
            panic!("injected inference panic");
        }
        if self.fail_next_batch.swap(false, SeqCst) {
            return Err("injected failure".to_string());
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_failures_and_panics_fail_only_their_batch_and_the_batcher_restarts() {
    use std::sync::atomic::Ordering::SeqCst;
    let faults = Arc::new(Injected::default());
    let server = Server::start(load("mean_f32.onnx"), |o| {
        o.max_wait = Duration::ZERO;
        o.faults = Some(faults.clone());
    })
    .await;
    let client = reqwest::Client::new();
    let (_, image) = good_images().remove(0);
    let score = |body: Vec<u8>| {
        let (client, url) = (client.clone(), server.url.clone());
        async move {
            let response = post_raw(&client, &url, body).await;
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let (status, json) = score(image.clone()).await;
    assert_eq!(status, 200, "{json}");
    // A failed batch: its request gets 500 with the reason; the next one is scored.
    faults.fail_next_batch.store(true, SeqCst);
    let (status, json) = score(image.clone()).await;
    assert_eq!(status, 500, "{json}");
    assert!(
        json["error"].as_str().unwrap().contains("injected failure"),
        "{json}"
    );
    assert_eq!(score(image.clone()).await.0, 200);
    // A panicking batch likewise.
    faults.panic_next_batch.store(true, SeqCst);
    let (status, json) = score(image.clone()).await;
    assert_eq!(status, 500, "{json}");
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("injected inference panic"),
        "{json}"
    );
    assert_eq!(score(image.clone()).await.0, 200);
    // A panic while decoding: that image gets 500, its multipart neighbour is scored.
    let (status, json) = score(b"PANIC".to_vec()).await;
    assert_eq!(status, 500, "{json}");
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("injected decode panic"),
        "{json}"
    );
    let form = reqwest::multipart::Form::new()
        .part("bad", reqwest::multipart::Part::bytes(b"PANIC!".to_vec()))
        .part("good", reqwest::multipart::Part::bytes(image.clone()));
    let json: Value = client
        .post(format!("{}/v1/score", server.url))
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let results = json["results"].as_array().unwrap();
    assert!(
        results[0]["error"]
            .as_str()
            .unwrap()
            .contains("decode panic"),
        "{json}"
    );
    assert!(results[1]["scores"]["quality"].is_f64(), "{json}");
    assert_eq!(score(image.clone()).await.0, 200);
    // The batcher itself panics with the image in hand: 500, and a new batcher scores on.
    faults.panic_batcher.store(true, SeqCst);
    let (status, json) = score(image.clone()).await;
    assert_eq!(status, 500, "{json}");
    assert!(
        json["error"].as_str().unwrap().contains("batcher crashed"),
        "{json}"
    );
    assert_eq!(score(image).await.0, 200);
    let text = metrics(&client, &server.url).await;
    assert_eq!(
        metric(&text, "agiqa_errors_total{kind=\"batcher_panic\"}"),
        1.0
    );
    assert_eq!(metric(&text, "agiqa_errors_total{kind=\"inference\"}"), 1.0);
    assert_eq!(
        metric(&text, "agiqa_errors_total{kind=\"inference_panic\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "agiqa_errors_total{kind=\"decode_panic\"}"),
        2.0
    );
    assert_eq!(metric(&text, "agiqa_images_admitted"), 0.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_is_not_ready_but_alive() {
    let mut server = Server::start(load("mean_f32.onnx"), |o| {
        o.drain_grace = Duration::from_secs(5);
    })
    .await;
    let client = reqwest::Client::new();
    let url = server.url.clone();
    let status = |path: &'static str| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .get(format!("{url}{path}"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok()
        }
    };
    for _ in 0..1000 {
        if status("/ready").await == Some(200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status("/ready").await, Some(200), "never warm");
    let stopped = std::time::Instant::now();
    let _ = server.stop.take().unwrap().send(());
    // Within the grace the service still answers, but is no longer ready (polled: the
    // signal reaches the accept loop asynchronously).
    let mut ready = None;
    for _ in 0..100 {
        ready = status("/ready").await;
        if ready == Some(503) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(ready, Some(503));
    assert_eq!(status("/live").await, Some(200));
    // Both answered within the 5 s grace (the close that follows it also answers 503).
    assert!(stopped.elapsed() < Duration::from_secs(5));
    server.shutdown().await;
}

/// Each decode waits (up to 10 s) until `expected` decodes are running at once, and records
/// whether they were.
#[derive(Debug)]
struct Rendezvous {
    expected: usize,
    running: std::sync::Mutex<usize>,
    all_in: std::sync::Condvar,
    met: std::sync::atomic::AtomicUsize,
}

impl agiqa_runtime::serve::Faults for Rendezvous {
    fn before_decode(&self, _bytes: &[u8]) {
        let mut running = self.running.lock().unwrap();
        *running += 1;
        self.all_in.notify_all();
        let (running, _) = self
            .all_in
            .wait_timeout_while(running, Duration::from_secs(10), |n| *n < self.expected)
            .unwrap();
        if *running >= self.expected {
            self.met.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_requests_images_decode_in_parallel() {
    let rendezvous = Arc::new(Rendezvous {
        expected: 3,
        running: std::sync::Mutex::new(0),
        all_in: std::sync::Condvar::new(),
        met: std::sync::atomic::AtomicUsize::new(0),
    });
    let server = Server::start(load("mean_f32.onnx"), |o| {
        o.decode_concurrency = 3;
        o.faults = Some(rendezvous.clone());
    })
    .await;
    let (_, image) = good_images().remove(0);
    let mut form = reqwest::multipart::Form::new();
    for name in ["a", "b", "c"] {
        form = form.part(name, reqwest::multipart::Part::bytes(image.clone()));
    }
    let response = reqwest::Client::new()
        .post(format!("{}/v1/score", server.url))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // All three decodes were running at the same time (sequential decoding never meets).
    assert_eq!(rendezvous.met.load(std::sync::atomic::Ordering::SeqCst), 3);
    server.shutdown().await;
}

/// Holds every inference batch until released, and says when one is waiting.
#[derive(Debug, Default)]
struct Gate {
    held: std::sync::Mutex<bool>,
    changed: std::sync::Condvar,
    released: std::sync::atomic::AtomicBool,
}

impl agiqa_runtime::serve::Faults for Gate {
    fn before_inference(&self, _size: usize) -> Result<(), String> {
        *self.held.lock().unwrap() = true;
        self.changed.notify_all();
        let waited = self
            .changed
            .wait_timeout_while(self.held.lock().unwrap(), Duration::from_secs(10), |_| {
                !self.released.load(std::sync::atomic::Ordering::SeqCst)
            })
            .unwrap();
        drop(waited);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_in_inference_keeps_its_slot_until_answered() {
    let gate = Arc::new(Gate::default());
    let server = Server::start(load("mean_f32.onnx"), |o| {
        o.queue_capacity = 1;
        o.max_wait = Duration::from_millis(1);
        o.faults = Some(gate.clone());
    })
    .await;
    let client = reqwest::Client::new();
    let (_, image) = good_images().remove(0);
    let first = tokio::spawn({
        let (client, url, body) = (client.clone(), server.url.clone(), image.clone());
        async move { post_raw(&client, &url, body).await.status().as_u16() }
    });
    // Wait until the first image's batch is in inference.
    let gate_in = Arc::clone(&gate);
    tokio::task::spawn_blocking(move || {
        let held = gate_in.held.lock().unwrap();
        let _ = gate_in
            .changed
            .wait_timeout_while(held, Duration::from_secs(10), |held| !*held)
            .unwrap();
    })
    .await
    .unwrap();
    assert!(*gate.held.lock().unwrap(), "no batch reached inference");
    assert_eq!(
        metric(
            &metrics(&client, &server.url).await,
            "agiqa_images_admitted"
        ),
        1.0
    );
    let second = post_raw(&client, &server.url, image.clone()).await;
    assert_eq!(second.status(), 503);
    gate.released
        .store(true, std::sync::atomic::Ordering::SeqCst);
    gate.changed.notify_all();
    assert_eq!(first.await.unwrap(), 200);
    // Its slot came back before its answer did.
    let third = post_raw(&client, &server.url, image).await;
    assert_eq!(third.status(), 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_delay_bound_refuses_what_would_wait_too_long() {
    let gate = Arc::new(Gate::default());
    let server = Server::start(load("mean_f32.onnx"), |o| {
        o.queue_capacity = 8;
        o.max_wait = Duration::from_millis(1);
        // Any image ahead costs more than a nanosecond: with one admitted, the next waits too long.
        o.max_queue_delay = Some(Duration::from_nanos(1));
        o.faults = Some(gate.clone());
    })
    .await;
    let client = reqwest::Client::new();
    let (_, image) = good_images().remove(0);
    // No batch has run yet, so there is no cost to predict from: admitted.
    gate.released
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        post_raw(&client, &server.url, image.clone()).await.status(),
        200
    );
    // Hold the next batch: its image stays admitted.
    gate.released
        .store(false, std::sync::atomic::Ordering::SeqCst);
    *gate.held.lock().unwrap() = false;
    let first = tokio::spawn({
        let (client, url, body) = (client.clone(), server.url.clone(), image.clone());
        async move { post_raw(&client, &url, body).await.status().as_u16() }
    });
    wait_for_metric(&client, &server.url, "agiqa_images_admitted", 1.0).await;
    // Room in the queue (1 of 8), but the image ahead would take over the bound.
    let refused = post_raw(&client, &server.url, image.clone()).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body = refused.text().await.unwrap();
    assert!(body.contains("queue-delay bound"), "{body}");
    gate.released
        .store(true, std::sync::atomic::Ordering::SeqCst);
    gate.changed.notify_all();
    assert_eq!(first.await.unwrap(), 200);
    let text = metrics(&client, &server.url).await;
    assert_eq!(
        metric(&text, "agiqa_errors_total{kind=\"queue_delay\"}"),
        1.0
    );
    server.shutdown().await;
}

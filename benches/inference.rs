//! Model-only inference through `agiqa_runtime::scorer::Scorer` on the fixture model
//! `runtime/tests/fixtures/conv224.onnx` (a small conv net on 224×224 `pixel_values`), CPU.
//! For each batch size N it times one batched run of N images against the baseline of N
//! single-image runs, measured in the same process, and prints the ratio (what batching buys).
//!
//! `cargo bench -p agiqa-benches --bench inference`

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use agiqa_runtime::scorer::{ExecutionProvider, Scorer, ScorerOptions, TensorBatch};
use criterion::{BenchmarkId, Criterion, Throughput};

const BATCH_SIZES: [usize; 3] = [1, 8, 32];

fn per_second(mut f: impl FnMut(), images_per_call: usize, budget: Duration) -> f64 {
    let start = Instant::now();
    let mut calls = 0usize;
    while start.elapsed() < budget || calls < 3 {
        f();
        calls += 1;
    }
    (calls * images_per_call) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/tests/fixtures/conv224.onnx");
    let options = ScorerOptions {
        provider: ExecutionProvider::Cpu,
        batch_size: 32,
        ..ScorerOptions::default()
    };
    let scorer = match Scorer::load(&model, options) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skipping the inference benchmark: {e}");
            return;
        }
    };
    let per_image = scorer.input_len();
    let data: Vec<f32> = (0..32 * per_image)
        .map(|i| ((i * 7919) % 997) as f32 / 498.5 - 1.0)
        .collect();
    let batch = |n: usize| TensorBatch::PixelValues(&data[..n * per_image]);

    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("conv224_cpu");
    for n in BATCH_SIZES {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("agiqa batched", n), &n, |b, &n| {
            b.iter(|| scorer.score_tensor(black_box(batch(n))).unwrap())
        });
        group.bench_with_input(
            BenchmarkId::new("baseline one image at a time", n),
            &n,
            |b, &n| {
                b.iter(|| {
                    for i in 0..n {
                        let one = &data[i * per_image..(i + 1) * per_image];
                        black_box(scorer.score_tensor(TensorBatch::PixelValues(one)).unwrap());
                    }
                })
            },
        );
    }
    group.finish();
    criterion.final_summary();

    let budget = Duration::from_secs(2);
    for n in BATCH_SIZES {
        let batched = per_second(|| drop(black_box(scorer.score_tensor(batch(n)))), n, budget);
        let single = per_second(
            || {
                for i in 0..n {
                    let one = &data[i * per_image..(i + 1) * per_image];
                    drop(black_box(
                        scorer.score_tensor(TensorBatch::PixelValues(one)),
                    ));
                }
            },
            n,
            budget,
        );
        println!(
            "conv224 batch {n}: agiqa batched {batched:.0} img/s, baseline one at a time {single:.0} img/s, ratio {:.2}x",
            batched / single
        );
    }
}

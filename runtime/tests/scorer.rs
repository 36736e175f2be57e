//! The library API on the fixture models: contract checks at load, both input kinds, several
//! heads, every way of handing over an image, bad input, and provider selection.

mod common;

use std::sync::Arc;

use agiqa_runtime::preprocess::{decode_image, DecodeLimits, CLIP_MEAN, CLIP_STD};
use agiqa_runtime::scorer::{
    DeviceIds, ExecutionProvider, GraphOptimization, InputKind, ScoreError, Scorer, ScorerOptions,
    TensorBatch, TensorRtProfile,
};
use common::{bad_images, cpu_options, good_images, load, model, picture};
use image::RgbImage;

/// What `mean_f32.onnx` computes for a uniform image of `value` in every channel.
fn expected_uniform(value: u8) -> f32 {
    let mean: f32 = (0..3)
        .map(|c| (f32::from(value) / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c])
        .sum::<f32>()
        / 3.0;
    0.5 * mean + 2.5
}

#[test]
fn metadata_gives_preprocessing_and_heads() {
    let scorer = load("mean_f32.onnx");
    assert_eq!(scorer.head_names(), ["quality"]);
    assert_eq!(scorer.preprocessor().config().image_size, 32);
    assert_eq!(scorer.input_kind(), InputKind::PixelValues);
    assert_eq!(scorer.provider(), ExecutionProvider::Cpu);
    let scorer = load("three_heads.onnx");
    assert_eq!(
        scorer.head_names(),
        ["quality", "alignment", "authenticity"]
    );
}

#[test]
fn uniform_image_scores_as_computed_by_hand() {
    let scorer = load("mean_f32.onnx");
    for value in [0u8, 77, 128, 255] {
        let image = RgbImage::from_pixel(50, 40, image::Rgb([value; 3]));
        let score = scorer.score_image(&image).unwrap();
        assert_eq!(score.len(), 1);
        assert!(
            (score[0] - expected_uniform(value)).abs() < 1e-5,
            "{value}: {score:?}"
        );
    }
}

#[test]
fn uint8_and_float_models_agree() {
    let f32_model = load("mean_f32.onnx");
    let u8_model = load("mean_u8.onnx");
    assert_eq!(u8_model.input_kind(), InputKind::PixelsUint8);
    let images: Vec<RgbImage> = (0..7).map(|s| picture(60 + s * 9, 45, s)).collect();
    let a = f32_model.score_images(&images).unwrap();
    let b = u8_model.score_images(&images).unwrap();
    assert_eq!(a.len(), 7);
    for (x, y) in a.iter().zip(&b) {
        assert!((x[0] - y[0]).abs() < 1e-5, "{x:?} vs {y:?}");
    }
    // Scores differ between images, so batching cannot have mixed them up unnoticed.
    assert!(a.windows(2).any(|w| (w[0][0] - w[1][0]).abs() > 1e-3));
}

#[test]
fn batching_does_not_change_scores() {
    let scorer = load("mean_f32.onnx");
    let images: Vec<RgbImage> = (0..9).map(|s| picture(70, 50 + s, s)).collect();
    let batched = scorer.score_images(&images).unwrap();
    for (image, expected) in images.iter().zip(&batched) {
        let single = scorer.score_image(image).unwrap();
        assert!((single[0] - expected[0]).abs() < 1e-6);
    }
}

#[test]
fn three_heads_come_back_in_metadata_order() {
    let scorer = load("three_heads.onnx");
    let image = RgbImage::from_pixel(40, 40, image::Rgb([255, 0, 128]));
    let s = scorer.score_image(&image).unwrap();
    let norm = |c: usize, v: f32| (v / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
    let expected = [
        0.5 * norm(0, 255.0) + 2.5,
        norm(1, 0.0) + 50.0,
        -norm(2, 128.0) + 3.0,
    ];
    for (got, want) in s.iter().zip(expected) {
        assert!((got - want).abs() < 1e-5, "{s:?} vs {expected:?}");
    }
}

#[test]
fn bytes_files_images_and_tensors_give_the_same_score() {
    let scorer = load("mean_f32.onnx");
    let (_, bytes) = good_images().remove(0);
    let from_bytes = scorer.score_bytes(&bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jpg");
    std::fs::write(&path, &bytes).unwrap();
    let from_file = scorer.score_file(&path).unwrap();
    let image = decode_image(&bytes, &DecodeLimits::default()).unwrap();
    let from_image = scorer.score_image(&image).unwrap();
    let tensor = scorer.preprocessor().preprocess(&image).unwrap();
    let from_tensor = scorer
        .score_tensor(TensorBatch::PixelValues(&tensor))
        .unwrap();
    assert_eq!(from_bytes, from_file);
    assert_eq!(from_bytes, from_image);
    assert_eq!(vec![from_bytes], from_tensor);
    // The wrong layout or a partial image is refused.
    assert!(matches!(
        scorer.score_tensor(TensorBatch::PixelsUint8(&[0u8; 3 * 32 * 32])),
        Err(ScoreError::Tensor(_))
    ));
    let err = scorer
        .score_tensor(TensorBatch::PixelValues(&tensor[1..]))
        .unwrap_err();
    assert!(err.to_string().contains("whole number"), "{err}");
}

#[test]
fn every_good_format_scores_and_every_bad_input_is_a_clear_error() {
    let scorer = load("mean_f32.onnx");
    for (name, bytes) in good_images() {
        let s = scorer
            .score_bytes(&bytes)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(s[0].is_finite(), "{name}");
    }
    for (name, bytes, words) in bad_images() {
        let err = scorer.score_bytes(&bytes).expect_err(&name);
        assert!(matches!(err, ScoreError::Preprocess(_)), "{name}: {err:?}");
        let message = err.to_string().to_lowercase();
        assert!(
            message.contains(words),
            "{name}: '{message}' lacks '{words}'"
        );
    }
}

#[test]
fn models_that_do_not_fit_are_refused_at_load() {
    let cases = [
        ("no_metadata.onnx", "agiqa.format_version"),
        ("wrong_input_name.onnx", "input is called `image`"),
        ("wrong_image_size.onnx", "R = 32"),
        ("wrong_dtype.onnx", "Float64"),
        ("heads_mismatch.onnx", "2 heads"),
        ("two_inputs.onnx", "exactly one input"),
    ];
    for (name, words) in cases {
        let err = Scorer::load(&model(name), cpu_options()).expect_err(name);
        let message = err.to_string();
        assert!(
            matches!(
                err,
                ScoreError::Contract { .. } | ScoreError::Metadata { .. }
            ),
            "{name}: {err:?}"
        );
        assert!(
            message.contains(words),
            "{name}: '{message}' lacks '{words}'"
        );
        assert!(
            message.contains(name),
            "{name}: the error names the file: {message}"
        );
    }
    let err = Scorer::load(&model("missing.onnx"), cpu_options()).unwrap_err();
    assert!(matches!(err, ScoreError::Load { .. }), "{err:?}");
}

#[test]
fn explicit_gpu_providers_are_errors_on_a_cpu_only_library() {
    for provider in [ExecutionProvider::Cuda, ExecutionProvider::TensorRt] {
        let options = ScorerOptions {
            provider,
            ..cpu_options()
        };
        let err = Scorer::load(&model("mean_f32.onnx"), options).unwrap_err();
        let ScoreError::ProviderUnavailable {
            provider: p,
            available,
            ..
        } = &err
        else {
            panic!("{provider}: expected ProviderUnavailable, got {err:?}");
        };
        assert_eq!(*p, provider);
        assert!(available.contains("CPUExecutionProvider"), "{err}");
        assert!(
            !available.contains("CUDAExecutionProvider"),
            "this test assumes a CPU-only ONNX Runtime"
        );
        assert!(err.to_string().contains(provider.as_str()), "{err}");
    }
}

#[test]
fn auto_falls_back_to_cpu_and_says_why() {
    let options = ScorerOptions {
        provider: ExecutionProvider::Auto,
        ..cpu_options()
    };
    let scorer = Scorer::load(&model("mean_f32.onnx"), options).unwrap();
    assert_eq!(scorer.provider(), ExecutionProvider::Cpu);
    let notes = scorer.provider_notes();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes[0].contains("tensorrt unavailable"), "{notes:?}");
    assert!(notes[1].contains("cuda unavailable"), "{notes:?}");
}

#[test]
fn one_scorer_serves_many_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Scorer>();
    let options = ScorerOptions {
        sessions: 2,
        ..cpu_options()
    };
    let scorer = Arc::new(Scorer::load(&model("mean_f32.onnx"), options).unwrap());
    let handles: Vec<_> = (0..4u8)
        .map(|t| {
            let scorer = Arc::clone(&scorer);
            std::thread::spawn(move || {
                (0..10)
                    .map(|_| {
                        let image = RgbImage::from_pixel(33, 33, image::Rgb([t * 50; 3]));
                        scorer.score_image(&image).unwrap()[0]
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for (t, h) in handles.into_iter().enumerate() {
        for score in h.join().unwrap() {
            assert!((score - expected_uniform(t as u8 * 50)).abs() < 1e-5);
        }
    }
}

/// Scores of every way a batch can be cut (1, partial, full, several chunks) as raw bits.
fn tensor_scores(scorer: &Scorer, images: usize) -> Vec<Vec<u32>> {
    let len = scorer.input_len();
    let bits = |scores: Vec<Vec<f32>>| -> Vec<Vec<u32>> {
        scores
            .into_iter()
            .map(|row| row.into_iter().map(f32::to_bits).collect())
            .collect()
    };
    let mut out = Vec::new();
    for n in [1, 3, scorer.batch_size(), images] {
        let scores = match scorer.input_kind() {
            InputKind::PixelValues => {
                let data: Vec<f32> = (0..n * len)
                    .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
                    .collect();
                scorer
                    .score_tensor(TensorBatch::PixelValues(&data))
                    .unwrap()
            }
            InputKind::PixelsUint8 => {
                let data: Vec<u8> = (0..n * len).map(|i| ((i * 7919) % 256) as u8).collect();
                scorer
                    .score_tensor(TensorBatch::PixelsUint8(&data))
                    .unwrap()
            }
        };
        assert_eq!(scores.len(), n);
        out.extend(bits(scores));
    }
    out
}

#[test]
fn io_binding_scores_equal_the_plain_path_bit_for_bit() {
    for name in [
        "mean_f32.onnx",
        "mean_u8.onnx",
        "three_heads.onnx",
        "conv224.onnx",
    ] {
        let plain = load(name);
        assert!(
            !plain.uses_io_binding(),
            "IoBinding is off on CPU by default"
        );
        let bound = Scorer::load(
            &model(name),
            ScorerOptions {
                io_binding: Some(true),
                ..cpu_options()
            },
        )
        .unwrap();
        assert!(bound.uses_io_binding());
        let want = tensor_scores(&plain, 11);
        // Twice: the second pass runs on the reused buffers.
        for pass in 0..2 {
            assert_eq!(tensor_scores(&bound, 11), want, "{name}, pass {pass}");
        }
        let image = picture(70, 50, 3);
        assert_eq!(
            bound.score_image(&image).unwrap(),
            plain.score_image(&image).unwrap(),
            "{name}"
        );
        // `run_batch` with more than a batch is split, not refused by the bound buffers.
        let inputs: Vec<_> = (0..9)
            .map(|s| bound.prepare(&picture(40 + s, 30, s)).unwrap())
            .collect();
        assert_eq!(
            bound.run_batch(&inputs).unwrap(),
            plain.run_batch(&inputs).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn session_knobs_load_and_score_the_same() {
    let baseline = load("three_heads.onnx");
    let want = tensor_scores(&baseline, 6);
    for (what, options) in [
        (
            "no optimisation",
            ScorerOptions {
                graph_optimization: GraphOptimization::Disable,
                ..cpu_options()
            },
        ),
        (
            "basic",
            ScorerOptions {
                graph_optimization: GraphOptimization::Basic,
                ..cpu_options()
            },
        ),
        (
            "no memory pattern, no arena, no spin",
            ScorerOptions {
                memory_pattern: false,
                cpu_arena: false,
                spin: Some(false),
                ..cpu_options()
            },
        ),
    ] {
        let scorer = Scorer::load(&model("three_heads.onnx"), options).unwrap();
        let got = tensor_scores(&scorer, 6);
        for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
            let (a, b) = (f32::from_bits(*a), f32::from_bits(*b));
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{what}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn sessions_multiply_and_cpu_ignores_device_lists() {
    let options = ScorerOptions {
        sessions: 3,
        device_id: "0,1".parse::<DeviceIds>().unwrap(),
        ..cpu_options()
    };
    let scorer = Scorer::load(&model("mean_f32.onnx"), options).unwrap();
    assert_eq!(scorer.session_devices(), [0, 0, 0]);
    assert!(
        scorer
            .provider_notes()
            .iter()
            .any(|n| n.contains("--device-id 0,1 ignored on cpu")),
        "{:?}",
        scorer.provider_notes()
    );
}

/// `mean_f32.onnx` with one `com.microsoft` node merged into its graph (protobuf concatenation
/// merges repeated fields), written to a temporary file.
fn with_microsoft_node(dir: &std::path::Path) -> std::path::PathBuf {
    fn len_field(number: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![number << 3 | 2];
        let mut len = payload.len();
        while len >= 0x80 {
            out.push((len & 0x7f) as u8 | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
        out.extend_from_slice(payload);
        out
    }
    let mut node = len_field(4, b"FusedMatMul");
    node.extend(len_field(7, b"com.microsoft"));
    let mut bytes = std::fs::read(model("mean_f32.onnx")).unwrap();
    bytes.extend(len_field(7, &len_field(1, &node)));
    let path = dir.join("fused.onnx");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn tensorrt_refuses_graphs_with_microsoft_ops_before_registering() {
    let dir = tempfile::tempdir().unwrap();
    let fused = with_microsoft_node(dir.path());
    let options = ScorerOptions {
        provider: ExecutionProvider::TensorRt,
        ..cpu_options()
    };
    let err = Scorer::load(&fused, options).unwrap_err();
    assert!(matches!(err, ScoreError::UnsupportedOps { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("FusedMatMul") && text.contains("com.microsoft"),
        "{text}"
    );
    // CUDA is not refused for it: it fails here only because this library has no CUDA.
    let options = ScorerOptions {
        provider: ExecutionProvider::Cuda,
        ..cpu_options()
    };
    let err = Scorer::load(&fused, options).unwrap_err();
    assert!(
        matches!(err, ScoreError::ProviderUnavailable { .. }),
        "{err:?}"
    );
    // The plain fixture is not refused on TensorRT (it fails for want of the library).
    let options = ScorerOptions {
        provider: ExecutionProvider::TensorRt,
        ..cpu_options()
    };
    let err = Scorer::load(&model("mean_f32.onnx"), options).unwrap_err();
    assert!(
        matches!(err, ScoreError::ProviderUnavailable { .. }),
        "{err:?}"
    );
}

#[test]
fn cuda_graphs_and_bad_profiles_are_refused_at_load() {
    let options = ScorerOptions {
        cuda_graph: true,
        ..cpu_options()
    };
    let err = Scorer::load(&model("mean_f32.onnx"), options).unwrap_err();
    assert!(matches!(err, ScoreError::Options(_)), "{err:?}");
    let options = ScorerOptions {
        provider: ExecutionProvider::TensorRt,
        batch_size: 8,
        tensorrt_profile: Some(TensorRtProfile {
            min: 1,
            opt: 4,
            max: 4,
        }),
        ..cpu_options()
    };
    let err = Scorer::load(&model("mean_f32.onnx"), options).unwrap_err();
    assert!(err.to_string().contains("below the batch size 8"), "{err}");
}

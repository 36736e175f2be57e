//! The exporter end to end on tiny random CLIPs of both tower kinds: graphs agree with the
//! trainer's forward through ONNX Runtime (fp32, fp16, float and uint8 inputs, image features
//! and scores), pass the official ONNX checker with shape inference, carry the metadata the
//! runtime reads, share one encoder between several heads, and refuse what they cannot export
//! without leaving files behind. Triton configs are parsed with Triton's own schema.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use agiqa_exporter::onnx_proto::ModelProto;
use agiqa_exporter::triton::{config_pbtxt, write_repository, InstanceKind, TritonOptions};
use agiqa_exporter::verify::{verify, VerifyOptions};
use agiqa_exporter::{
    build_model, write_model, ExportError, ExportOptions, HeadSource, InputKind, Precision,
};
use agiqa_runtime::metadata::ModelMetadata;
use agiqa_runtime::scorer::{ExecutionProvider, Scorer, ScorerOptions};
use agiqa_trainer::checkpoint::{load_checkpoint, write_untrained, LoadedCheckpoint};
use agiqa_trainer::clip::ClipSource;
use agiqa_trainer::evaluate::predict_files;
use agiqa_trainer::model::{ImageNorm, ModelConfig, Variant};
use agiqa_trainer::tokenizer::ClipTokenizer;
use tch::{Device, Kind, Tensor};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("agiqa-export-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tokenizer() -> &'static ClipTokenizer {
    static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| ClipTokenizer::embedded().unwrap())
}

/// The workspace's Python with `onnx` and `tritonclient` (installed by scripts/setup).
fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup",
        python.display()
    );
    python
}

/// An untrained checkpoint on a random `preset` CLIP, loaded.
fn checkpoint(
    dir: &Path,
    preset: &str,
    clip_seed: i64,
    config: &ModelConfig,
    dimension: &str,
    seed: u64,
) -> LoadedCheckpoint {
    let source = ClipSource::Random {
        preset: preset.into(),
        seed: clip_seed,
    };
    let stem = write_untrained(
        &source,
        config,
        dimension,
        seed,
        dir,
        tokenizer(),
        Device::Cpu,
    )
    .unwrap();
    load_checkpoint(&stem, None, tokenizer(), Device::Cpu).unwrap()
}

/// A head whose scores depend clearly on the image: whitening fitted to skewed features and
/// a first layer scaled up, so that a wrong encoder output cannot hide behind a flat head.
fn sharpen(loaded: &mut LoadedCheckpoint) {
    let e = loaded.model.clip().config().embed_dim;
    tch::manual_seed(17);
    let features = Tensor::randn([300, e], (Kind::Float, Device::Cpu)) * 0.2 + 0.03;
    loaded.model.fit_image_norm(&features);
}

fn regression(image_norm: ImageNorm) -> ModelConfig {
    ModelConfig {
        image_norm,
        context_len: 4,
        ..ModelConfig::default()
    }
}

fn onnx_checker(path: &Path) {
    let output = Command::new(python())
        .args([
            "-c",
            "import sys, onnx; onnx.checker.check_model(sys.argv[1], full_check=True); print('ok')",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "onnx.checker rejected {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn metadata_of(path: &Path) -> ModelMetadata {
    let proto = ModelProto::from_bytes(&std::fs::read(path).unwrap()).unwrap();
    let props = proto
        .metadata_props
        .iter()
        .map(|p| (p.key.clone().unwrap(), p.value.clone().unwrap()))
        .collect();
    ModelMetadata::from_props(&props).unwrap()
}

/// Exports `heads` with `options`, checks it with the ONNX checker and verifies it.
fn export_and_verify(
    dir: &Path,
    name: &str,
    heads: &[HeadSource],
    options: &ExportOptions,
) -> agiqa_exporter::verify::VerifyReport {
    let path = dir.join(format!("{name}.onnx"));
    let model = build_model(heads, options).unwrap();
    write_model(&path, &model.proto).unwrap();
    onnx_checker(&path);
    let report = verify(
        &path,
        heads,
        options.input,
        options.precision,
        &VerifyOptions::default(),
    )
    .unwrap();
    println!("{name}:\n{report}");
    assert!(report.passed, "{name}: {report}");
    report
}

#[test]
fn vit_and_resnet_graphs_match_the_trainer_in_fp32_and_fp16() {
    let dir = scratch("towers");
    for preset in ["tiny", "tiny-rn"] {
        let mut loaded = checkpoint(
            &dir.join(preset),
            preset,
            0,
            &regression(ImageNorm::Whiten),
            "quality",
            1,
        );
        sharpen(&mut loaded);
        let heads = [HeadSource {
            name: "quality".into(),
            checkpoint: &loaded,
        }];
        // Both inputs in fp32; fp16 with the uint8 input, which runs the float path after
        // its adapter (the full matrix: `scripts/export-parity`).
        for (precision, input) in [
            (Precision::Fp32, InputKind::PixelValues),
            (Precision::Fp32, InputKind::PixelsUint8),
            (Precision::Fp16, InputKind::PixelsUint8),
        ] {
            let options = ExportOptions {
                precision,
                input,
                image_features: true,
                ..ExportOptions::default()
            };
            let name = format!("{preset}-{precision:?}-{input:?}");
            let report = export_and_verify(&dir, &name, &heads, &options);
            let features = report
                .cases
                .iter()
                .find(|c| c.label.contains("image features"))
                .expect("the image features are compared");
            let limit = match precision {
                Precision::Fp32 => 1e-5,
                Precision::Fp16 => 5e-3,
            };
            assert!(features.max_abs < limit, "{name}: {report}");
        }
        // fp16 halves the file.
        let fp32 = std::fs::metadata(dir.join(format!("{preset}-Fp32-PixelsUint8.onnx"))).unwrap();
        let fp16 = std::fs::metadata(dir.join(format!("{preset}-Fp16-PixelsUint8.onnx"))).unwrap();
        assert!(
            fp16.len() * 10 < fp32.len() * 6,
            "{} vs {}",
            fp16.len(),
            fp32.len()
        );
    }
}

#[test]
fn metadata_and_initializer_names_come_from_the_checkpoint() {
    let dir = scratch("metadata");
    let loaded = checkpoint(&dir, "tiny", 0, &regression(ImageNorm::None), "quality", 2);
    let heads = [HeadSource {
        name: "quality".into(),
        checkpoint: &loaded,
    }];
    let path = dir.join("m.onnx");
    let model = build_model(&heads, &ExportOptions::default()).unwrap();
    write_model(&path, &model.proto).unwrap();
    let meta = metadata_of(&path);
    assert_eq!(meta, model.metadata);
    assert_eq!(meta.backbone, "tiny");
    assert_eq!(meta.preprocessing, loaded.meta.preprocessing);
    assert_eq!(meta.context_len, 4);
    assert_eq!(meta.heads.len(), 1);
    let head = &meta.heads[0];
    assert_eq!((head.scale.min, head.scale.max), (0.0, 5.0));
    assert_eq!(head.scale.dimension, "quality");
    assert_eq!(head.variant.as_deref(), Some("regression"));
    assert_eq!(head.checkpoint_sha256.as_ref().map(String::len), Some(64));
    assert_eq!(meta.clip_weights_sha256.as_ref(), Some(&loaded.clip_sha256));

    let graph = model.proto.graph.as_ref().unwrap();
    let names: Vec<&str> = graph
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref())
        .collect();
    for name in [
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.transformer.resblocks.1.attn.in_proj_weight",
        "visual.ln_post.bias",
        "visual.proj",
        "heads.quality.fc1.bias_folded",
    ] {
        assert!(names.contains(&name), "no initializer {name}");
    }
    // The text branch is gone: nothing of the text tower or the prompts is in the graph.
    assert!(!names
        .iter()
        .any(|n| n.starts_with("transformer.") || n.contains("prompt") || n.contains("token")));
    assert_eq!(graph.input[0].name.as_deref(), Some("pixel_values"));
    assert_eq!(graph.output[0].name.as_deref(), Some("score"));
    assert_eq!(model.proto.opset_import[0].version, Some(17));
}

#[test]
fn several_checkpoints_share_one_encoder() {
    let dir = scratch("multi");
    let quality = checkpoint(
        &dir.join("q"),
        "tiny",
        0,
        &regression(ImageNorm::None),
        "quality",
        3,
    );
    let authenticity = checkpoint(
        &dir.join("a"),
        "tiny",
        0,
        &ModelConfig {
            score_max: 100.0,
            ..regression(ImageNorm::None)
        },
        "authenticity",
        4,
    );
    let classes = checkpoint(
        &dir.join("c"),
        "tiny",
        0,
        &ModelConfig {
            variant: Variant::Classification,
            ..regression(ImageNorm::None)
        },
        "correspondence",
        5,
    );
    let heads = [
        HeadSource {
            name: "quality".into(),
            checkpoint: &quality,
        },
        HeadSource {
            name: "authenticity".into(),
            checkpoint: &authenticity,
        },
        HeadSource {
            name: "correspondence".into(),
            checkpoint: &classes,
        },
    ];
    let options = ExportOptions::default();
    export_and_verify(&dir, "multi", &heads, &options);
    let meta = metadata_of(&dir.join("multi.onnx"));
    let names: Vec<&str> = meta.heads.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["quality", "authenticity", "correspondence"]);
    assert_eq!(meta.heads[1].scale.max, 100.0);
    assert_eq!(meta.heads[2].variant.as_deref(), Some("classification"));
    let proto = ModelProto::from_bytes(&std::fs::read(dir.join("multi.onnx")).unwrap()).unwrap();
    let graph = proto.graph.unwrap();
    assert_eq!(graph.output[0].name.as_deref(), Some("scores"));
    // One encoder: its weights appear once.
    let convs = graph
        .initializer
        .iter()
        .filter(|t| t.name.as_deref() == Some("visual.conv1.weight"))
        .count();
    assert_eq!(convs, 1);

    // Heads on other CLIP weights, or duplicate names, are refused.
    let other = checkpoint(
        &dir.join("o"),
        "tiny",
        1,
        &regression(ImageNorm::None),
        "quality",
        6,
    );
    let mixed = [
        HeadSource {
            name: "quality".into(),
            checkpoint: &quality,
        },
        HeadSource {
            name: "other".into(),
            checkpoint: &other,
        },
    ];
    let err = build_model(&mixed, &options).err().unwrap();
    assert!(matches!(err, ExportError::Incompatible(_)), "{err}");
    assert!(err.to_string().contains("same image encoder"), "{err}");
    let twice = [
        HeadSource {
            name: "quality".into(),
            checkpoint: &quality,
        },
        HeadSource {
            name: "quality".into(),
            checkpoint: &authenticity,
        },
    ];
    let err = build_model(&twice, &options).err().unwrap();
    assert!(err.to_string().contains("NAME=CHECKPOINT"), "{err}");
}

#[test]
fn bad_checkpoints_and_options_are_clear_errors() {
    let dir = scratch("bad");
    let loaded = checkpoint(&dir, "tiny", 0, &regression(ImageNorm::None), "quality", 7);
    let stem = loaded.path.clone();
    drop(loaded);

    // The config says 8 context tokens, the tensors hold 4.
    let json_path = dir.join("best.json");
    let json = std::fs::read_to_string(&json_path).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value["model"]["context_len"] = 8.into();
    std::fs::write(&json_path, serde_json::to_string(&value).unwrap()).unwrap();
    let err = load_checkpoint(&stem, None, tokenizer(), Device::Cpu)
        .err()
        .unwrap();
    assert!(err.to_string().contains("prompt.ctx"), "{err}");

    // An unknown backbone.
    value["model"]["context_len"] = 4.into();
    value["clip_source"] = serde_json::json!({"kind": "random", "preset": "ViT-Z/99", "seed": 0});
    std::fs::write(&json_path, serde_json::to_string(&value).unwrap()).unwrap();
    let err = load_checkpoint(&stem, None, tokenizer(), Device::Cpu)
        .err()
        .unwrap();
    assert!(err.to_string().contains("ViT-Z/99"), "{err}");

    // An unsupported option: TensorRT on CPU instances.
    let err = config_pbtxt(
        &TritonOptions {
            kind: InstanceKind::Cpu,
            ..TritonOptions::default()
        },
        InputKind::PixelValues,
        224,
        1,
    )
    .unwrap_err();
    assert!(err.to_string().contains("TensorRT needs GPU"), "{err}");
}

/// Parses `config.pbtxt` with Triton's `ModelConfig` schema (from the tritonclient wheel) and
/// prints it back as JSON.
fn parse_triton_config(path: &Path) -> serde_json::Value {
    let script = r#"
import importlib.util, json, os, sys, sysconfig
from google.protobuf import text_format, json_format
site = sysconfig.get_paths()["purelib"]
spec = importlib.util.spec_from_file_location(
    "model_config_pb2", os.path.join(site, "tritonclient", "grpc", "model_config_pb2.py"))
schema = importlib.util.module_from_spec(spec)
spec.loader.exec_module(schema)
config = text_format.Parse(open(sys.argv[1]).read(), schema.ModelConfig())
print(json_format.MessageToJson(config))
"#;
    let output = Command::new(python())
        .args(["-c", script])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "Triton's schema rejected {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn triton_repositories_follow_tritons_schema() {
    let dir = scratch("triton");
    let model_bytes = b"not parsed by this test";
    for (input, heads, options) in [
        (InputKind::PixelValues, 1, TritonOptions::default()),
        (
            InputKind::PixelsUint8,
            3,
            TritonOptions {
                name: "agiqa_multi".into(),
                max_batch_size: 16,
                preferred_batch_sizes: vec![4, 16],
                instances: 2,
                tensorrt_fp16: false,
                ..TritonOptions::default()
            },
        ),
        (
            InputKind::PixelValues,
            1,
            TritonOptions {
                name: "agiqa_cpu".into(),
                kind: InstanceKind::Cpu,
                tensorrt: false,
                ..TritonOptions::default()
            },
        ),
    ] {
        let config = config_pbtxt(&options, input, 224, heads).unwrap();
        let entry = write_repository(&dir, &options, model_bytes, &config).unwrap();
        assert_eq!(
            std::fs::read(entry.join("1/model.onnx")).unwrap(),
            model_bytes
        );
        let parsed = parse_triton_config(&entry.join("config.pbtxt"));
        assert_eq!(parsed["name"], options.name.as_str());
        assert_eq!(parsed["platform"], "onnxruntime_onnx");
        assert_eq!(parsed["maxBatchSize"], options.max_batch_size);
        let input_json = &parsed["input"][0];
        match input {
            InputKind::PixelValues => {
                assert_eq!(input_json["name"], "pixel_values");
                assert_eq!(input_json["dataType"], "TYPE_FP32");
                assert_eq!(input_json["dims"], serde_json::json!(["3", "224", "224"]));
            }
            InputKind::PixelsUint8 => {
                assert_eq!(input_json["name"], "pixels_uint8");
                assert_eq!(input_json["dataType"], "TYPE_UINT8");
                assert_eq!(input_json["dims"], serde_json::json!(["224", "224", "3"]));
            }
        }
        let output = &parsed["output"][0];
        if heads == 1 {
            assert_eq!(output["name"], "score");
            assert!(output["reshape"].is_object());
        } else {
            assert_eq!(output["name"], "scores");
            assert_eq!(output["dims"], serde_json::json!([heads.to_string()]));
        }
        assert!(parsed["dynamicBatching"].is_object());
        let group = &parsed["instanceGroup"][0];
        assert_eq!(group["count"], options.instances);
        let accelerators = &parsed["optimization"]["executionAccelerators"];
        if options.tensorrt {
            let trt = &accelerators["gpuExecutionAccelerator"][0];
            assert_eq!(trt["name"], "tensorrt");
            let precision = if options.tensorrt_fp16 {
                "FP16"
            } else {
                "FP32"
            };
            assert_eq!(trt["parameters"]["precision_mode"], precision);
            // The runtime's TensorRT profile: batches 1..=max_batch_size, one engine.
            let shape = |n: u32| match input {
                InputKind::PixelValues => format!("pixel_values:{n}x3x224x224"),
                InputKind::PixelsUint8 => format!("pixels_uint8:{n}x224x224x3"),
            };
            let max = options.max_batch_size;
            assert_eq!(trt["parameters"]["trt_profile_min_shapes"], shape(1));
            assert_eq!(trt["parameters"]["trt_profile_opt_shapes"], shape(max));
            assert_eq!(trt["parameters"]["trt_profile_max_shapes"], shape(max));
            let fallback = &trt["parameters"]["trt_layer_norm_fp32_fallback"];
            if options.tensorrt_fp16 {
                assert_eq!(fallback, "true");
            } else {
                assert!(fallback.is_null(), "{fallback}");
            }
        } else {
            assert!(accelerators.is_null());
        }
    }
    // Re-exporting replaces the entry and leaves no staging folder.
    let options = TritonOptions::default();
    let config = config_pbtxt(&options, InputKind::PixelValues, 224, 1).unwrap();
    write_repository(&dir, &options, b"v2", &config).unwrap();
    assert_eq!(
        std::fs::read(dir.join("clip_agiqa/1/model.onnx")).unwrap(),
        b"v2"
    );
    let hidden = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .count();
    assert_eq!(hidden, 0);
}

/// Train-time scoring (`agiqa-train predict`) and the runtime's scorer on the exported graph
/// give the same scores for the same image files: one preprocessing, one model, two engines.
#[test]
fn the_runtime_scores_files_as_the_trainer_does() {
    use agiqa_trainer::synthetic_images::{procedural_scene, Distortion};
    let dir = scratch("runtime");
    let mut loaded = checkpoint(
        &dir.join("run"),
        "tiny",
        0,
        &regression(ImageNorm::Whiten),
        "quality",
        8,
    );
    sharpen(&mut loaded);
    let mut paths = Vec::new();
    for (i, distortion) in [
        Distortion::Blur(0.0),
        Distortion::Blur(3.0),
        Distortion::Noise(25.0),
        Distortion::Jpeg(10),
        Distortion::ColourShift(50.0),
    ]
    .iter()
    .enumerate()
    {
        let image = distortion.apply(
            &procedural_scene(40 + i as u64, 300 + 40 * i as u32, 260),
            1,
        );
        let path = dir.join(format!("{i}.{}", if i % 2 == 0 { "png" } else { "jpg" }));
        image.save(&path).unwrap();
        paths.push(path);
    }
    let expected: Vec<f64> = predict_files(&loaded, &paths)
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let spread = expected.iter().cloned().fold(f64::MIN, f64::max)
        - expected.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 1e-3, "scores {expected:?} hardly vary");
    let heads = [HeadSource {
        name: "quality".into(),
        checkpoint: &loaded,
    }];
    for input in [InputKind::PixelValues, InputKind::PixelsUint8] {
        let path = dir.join(format!("{input:?}.onnx"));
        let model = build_model(
            &heads,
            &ExportOptions {
                input,
                image_features: true,
                ..ExportOptions::default()
            },
        )
        .unwrap();
        write_model(&path, &model.proto).unwrap();
        let scorer = Scorer::load(
            &path,
            ScorerOptions {
                provider: ExecutionProvider::Cpu,
                ..ScorerOptions::default()
            },
        )
        .unwrap();
        assert_eq!(scorer.head_names(), ["quality"]);
        for (path, want) in paths.iter().zip(&expected) {
            let got = scorer.score_file(path).unwrap();
            assert!(
                (f64::from(got[0]) - want).abs() < 1e-4,
                "{input:?} {}: runtime {} vs trainer {want}",
                path.display(),
                got[0]
            );
        }
    }
}

/// `n` synthetic image files in `dir` (calibration or held-out images for int8 exports).
fn image_folder(dir: &Path, n: usize, seed: u64) -> PathBuf {
    use agiqa_trainer::synthetic_images::{procedural_scene, Distortion};
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let distortion = [
            Distortion::Blur(1.5),
            Distortion::Noise(12.0),
            Distortion::Jpeg(30),
            Distortion::ColourShift(30.0),
        ][i % 4];
        let image = distortion.apply(&procedural_scene(seed + i as u64, 280, 240), 1);
        image.save(dir.join(format!("{i}.png"))).unwrap();
    }
    dir.to_path_buf()
}

/// A small, quick int8 export: `mode`, calibrated on `calibration` (static).
fn int8_options(
    mode: agiqa_exporter::Int8Mode,
    calibration: Option<&Path>,
) -> agiqa_exporter::Int8Export {
    let mut int8 = agiqa_exporter::Int8Export::new(mode);
    int8.calibration = calibration.map(|p| p.display().to_string());
    int8.calibration_images = 12;
    int8.held_out_images = 24;
    int8
}

fn quantised(model: &agiqa_exporter::ExportedModel) -> &agiqa_runtime::metadata::Quantization {
    model.metadata.quantization.as_ref().unwrap()
}

/// int8 ViT graphs of both modes and both inputs: the ONNX checker accepts them, their
/// accuracy against fp32 is within the budget and recorded, the runtime scores them on CPU
/// unchanged, and a dynamic graph is refused on TensorRT and CUDA with a clear error.
#[test]
fn int8_vit_graphs_stay_within_budget_and_name_their_providers() {
    use agiqa_exporter::{build_int8_model, Int8Mode};
    use agiqa_runtime::scorer::ScoreError;
    let dir = scratch("int8-vit");
    let mut loaded = checkpoint(
        &dir.join("run"),
        "tiny",
        0,
        &regression(ImageNorm::Whiten),
        "quality",
        21,
    );
    sharpen(&mut loaded);
    let calibration = image_folder(&dir.join("calibration"), 12, 500);
    let heads = [HeadSource {
        name: "quality".into(),
        checkpoint: &loaded,
    }];
    let verify = VerifyOptions::default();
    let image = dir.join("calibration/0.png");
    for (mode, input) in [
        (Int8Mode::Dynamic, InputKind::PixelValues),
        (Int8Mode::Static, InputKind::PixelsUint8),
    ] {
        let options = ExportOptions {
            input,
            ..ExportOptions::default()
        };
        let int8 = int8_options(mode, Some(&calibration));
        let model = build_int8_model(&heads, &options, &int8, Some(&verify)).unwrap();
        let path = dir.join(format!("{}.onnx", mode.name()));
        write_model(&path, &model.proto).unwrap();
        onnx_checker(&path);
        let q = quantised(&model);
        assert_eq!(q.mode, mode);
        // tiny: 2 layers × (in_proj, out_proj, c_fc, c_proj); patch embedding, projection,
        // attention scores and the head stay in float.
        assert_eq!(q.int8_layers, 8, "{q:?}");
        assert!(q
            .float_layers
            .iter()
            .any(|l| l.layer == "visual.conv1.weight"));
        let accuracy = q.accuracy.as_ref().unwrap();
        assert!(accuracy.within_budget, "{mode:?}: {accuracy:?}");
        assert!(accuracy.feature_cosine_min >= 0.999 && accuracy.srcc_vs_fp32 >= 0.99);
        assert_eq!(accuracy.count, 24);
        assert_eq!(mode == Int8Mode::Static, q.calibration.is_some());
        // What the file says is what the library returned (JSON keeps floats to ~1 ulp).
        let written = metadata_of(&path).quantization.unwrap();
        assert_eq!(
            (
                &written.providers,
                &written.float_layers,
                written.int8_layers
            ),
            (&q.providers, &q.float_layers, q.int8_layers)
        );
        let written_accuracy = written.accuracy.unwrap();
        assert!((written_accuracy.srcc_vs_fp32 - accuracy.srcc_vs_fp32).abs() < 1e-12);
        assert_eq!(written_accuracy.within_budget, accuracy.within_budget);
        let cpu = Scorer::load(
            &path,
            ScorerOptions {
                provider: ExecutionProvider::Cpu,
                ..ScorerOptions::default()
            },
        )
        .unwrap();
        let score = cpu.score_file(&image).unwrap()[0];
        assert!(score.is_finite());
        for provider in [ExecutionProvider::TensorRt, ExecutionProvider::Cuda] {
            let refused = Scorer::load(
                &path,
                ScorerOptions {
                    provider,
                    ..ScorerOptions::default()
                },
            );
            match (mode, refused) {
                (Int8Mode::Dynamic, Err(e @ ScoreError::ProviderRefused(_))) => {
                    let message = e.to_string();
                    assert!(
                        message.contains("dynamic int8 graph built for cpu")
                            && message.contains("--int8 static"),
                        "{message}"
                    );
                }
                // Static QDQ is meant for GPUs: whatever fails here is the missing GPU build.
                (Int8Mode::Static, Err(ScoreError::ProviderUnavailable { .. })) => {}
                (_, other) => panic!("{mode:?} on {provider}: {other:?}"),
            }
        }
        // auto skips the providers the graph is not for, and says so.
        let auto = Scorer::load(&path, ScorerOptions::default()).unwrap();
        assert_eq!(auto.provider(), ExecutionProvider::Cpu);
        if mode == Int8Mode::Dynamic {
            assert!(
                auto.provider_notes()
                    .iter()
                    .any(|n| n.contains("tensorrt skipped")),
                "{:?}",
                auto.provider_notes()
            );
        }
    }
}

/// The budget is enforced both ways: a budget the graph cannot meet fails the export with the
/// figures, `allow_over_budget` writes it marked as over; calibration images are never
/// held-out images, and static int8 without calibration images says what to pass.
#[test]
fn int8_budget_is_enforced_and_images_are_kept_apart() {
    use agiqa_exporter::{build_int8_model, Int8Mode};
    let dir = scratch("int8-budget");
    let loaded = checkpoint(
        &dir.join("run"),
        "tiny",
        0,
        &regression(ImageNorm::None),
        "quality",
        22,
    );
    let heads = [HeadSource {
        name: "quality".into(),
        checkpoint: &loaded,
    }];
    let options = ExportOptions::default();
    let verify = VerifyOptions::default();
    let mut strict = int8_options(Int8Mode::Dynamic, None);
    strict.budget.min_feature_cosine = 1.000_001; // no int8 graph reaches this
    match build_int8_model(&heads, &options, &strict, Some(&verify)) {
        Err(ExportError::OverBudget(figures)) => {
            assert!(figures.contains("image-feature cosine min"), "{figures}");
            assert!(figures.contains("OVER BUDGET"), "{figures}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("an impossible budget passed"),
    }
    strict.allow_over_budget = true;
    let model = build_int8_model(&heads, &options, &strict, Some(&verify)).unwrap();
    let accuracy = quantised(&model).accuracy.clone().unwrap();
    assert!(!accuracy.within_budget);
    assert!(accuracy.feature_cosine_min > 0.99, "{accuracy:?}");
    // Without --verify nothing is measured, and nothing is claimed.
    let unmeasured = build_int8_model(&heads, &options, &strict, None).unwrap();
    assert!(quantised(&unmeasured).accuracy.is_none());

    let images = image_folder(&dir.join("images"), 4, 900);
    let mut same = int8_options(Int8Mode::Static, Some(&images));
    same.held_out = Some(images.display().to_string());
    let err = build_int8_model(&heads, &options, &same, Some(&verify))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("both a calibration image"), "{err}");
    let err = build_int8_model(
        &heads,
        &options,
        &int8_options(Int8Mode::Static, None),
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("--calibration"), "{err}");
}

/// ModifiedResNet (batch norms folded, per-channel ConvInteger / QDQ Conv) and a two-head
/// graph in int8: checker, budget, and the runtime's scores for every head.
#[test]
fn int8_resnet_and_multi_head_graphs() {
    use agiqa_exporter::{build_int8_model, Int8Mode};
    let dir = scratch("int8-rn");
    let calibration = image_folder(&dir.join("calibration"), 12, 700);
    let quality = checkpoint(
        &dir.join("q"),
        "tiny-rn",
        0,
        &regression(ImageNorm::None),
        "quality",
        23,
    );
    let authenticity = checkpoint(
        &dir.join("a"),
        "tiny-rn",
        0,
        &ModelConfig {
            score_max: 100.0,
            ..regression(ImageNorm::None)
        },
        "authenticity",
        24,
    );
    let heads = [
        HeadSource {
            name: "quality".into(),
            checkpoint: &quality,
        },
        HeadSource {
            name: "authenticity".into(),
            checkpoint: &authenticity,
        },
    ];
    let verify = VerifyOptions::default();
    for mode in [Int8Mode::Dynamic, Int8Mode::Static] {
        let mut int8 = int8_options(mode, Some(&calibration));
        // Measured on tiny-rn: static S8S8 on ReLU outputs misses the feature-cosine budget
        // (0.998); it is a finding, recorded here, not hidden.
        int8.allow_over_budget = mode == Int8Mode::Static;
        let model =
            build_int8_model(&heads, &ExportOptions::default(), &int8, Some(&verify)).unwrap();
        let path = dir.join(format!("rn-{}.onnx", mode.name()));
        write_model(&path, &model.proto).unwrap();
        onnx_checker(&path);
        let proto = ModelProto::from_bytes(&std::fs::read(&path).unwrap()).unwrap();
        let ops: Vec<&str> = proto
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .filter_map(|n| n.op_type.as_deref())
            .collect();
        assert!(
            !ops.contains(&"BatchNormalization"),
            "batch norms are folded"
        );
        let conv_op = if mode == Int8Mode::Dynamic {
            "ConvInteger"
        } else {
            "DequantizeLinear"
        };
        assert!(ops.contains(&conv_op), "{mode:?}: {ops:?}");
        let q = quantised(&model);
        let accuracy = q.accuracy.as_ref().unwrap();
        if mode == Int8Mode::Dynamic {
            assert!(accuracy.within_budget, "{accuracy:?}");
        }
        assert!(accuracy.srcc_vs_fp32 > 0.95, "{accuracy:?}");
        let scorer = Scorer::load(
            &path,
            ScorerOptions {
                provider: ExecutionProvider::Cpu,
                ..ScorerOptions::default()
            },
        )
        .unwrap();
        assert_eq!(scorer.head_names(), ["quality", "authenticity"]);
        let scores = scorer.score_file(&calibration.join("1.png")).unwrap();
        assert_eq!(scores.len(), 2);
        assert!(scores.iter().all(|s| s.is_finite()), "{scores:?}");
    }
}

/// ONNX Runtime's op counts in the graph it actually runs (level All, saved optimised model).
fn optimised_ops(path: &Path) -> std::collections::BTreeMap<String, usize> {
    use ort::session::builder::GraphOptimizationLevel;
    agiqa_runtime::onnxruntime::init(None).unwrap();
    let environment = agiqa_runtime::onnxruntime::environment().unwrap();
    let optimised = path.with_extension("optimised.onnx");
    ort::session::Session::builder(environment)
        .unwrap()
        .with_optimization_level(GraphOptimizationLevel::All)
        .unwrap()
        .with_optimized_model_path(&optimised)
        .unwrap()
        .commit_from_file(path)
        .unwrap();
    let proto = ModelProto::from_bytes(&std::fs::read(&optimised).unwrap()).unwrap();
    let mut ops = std::collections::BTreeMap::new();
    for node in &proto.graph.unwrap().node {
        *ops.entry(node.op_type.clone().unwrap_or_default())
            .or_insert(0) += 1;
    }
    ops
}

/// The fusions scoring relies on fire on our graphs (tiny ViT, 2 blocks): QuickGelu, the
/// attention scale folded into its MatMul, LayerNormalization kept whole; int8 dynamic
/// becomes one `DynamicQuantizeMatMul` per linear (bias included), static QDQ one
/// `MatMulIntegerToFloat`, with no loose (de)quantisation left.
#[test]
fn onnx_runtime_fuses_what_scoring_relies_on() {
    use agiqa_exporter::{build_int8_model, Int8Mode};
    let dir = scratch("fusions");
    let loaded = checkpoint(
        &dir.join("run"),
        "tiny",
        0,
        &regression(ImageNorm::None),
        "quality",
        31,
    );
    let heads = [HeadSource {
        name: "quality".into(),
        checkpoint: &loaded,
    }];
    let count = |ops: &std::collections::BTreeMap<String, usize>, op: &str| {
        ops.get(op).copied().unwrap_or(0)
    };
    let fp32 = dir.join("fp32.onnx");
    let model = build_model(&heads, &ExportOptions::default()).unwrap();
    write_model(&fp32, &model.proto).unwrap();
    let ops = optimised_ops(&fp32);
    let layers = 2;
    assert_eq!(count(&ops, "QuickGelu"), layers, "{ops:?}");
    assert_eq!(count(&ops, "Sigmoid"), 0, "{ops:?}");
    assert_eq!(count(&ops, "FusedMatMul"), layers, "{ops:?}");
    assert_eq!(count(&ops, "LayerNormalization"), 2 * layers + 2, "{ops:?}");

    let calibration = image_folder(&dir.join("calibration"), 8, 300);
    for (mode, fused, loose) in [
        (
            Int8Mode::Dynamic,
            "DynamicQuantizeMatMul",
            ["DynamicQuantizeLinear", "MatMulInteger"],
        ),
        (
            Int8Mode::Static,
            "MatMulIntegerToFloat",
            ["DequantizeLinear", "MatMulInteger"],
        ),
    ] {
        let path = dir.join(format!("{}.onnx", mode.name()));
        let int8 = int8_options(mode, Some(&calibration));
        let model = build_int8_model(&heads, &ExportOptions::default(), &int8, None).unwrap();
        write_model(&path, &model.proto).unwrap();
        let ops = optimised_ops(&path);
        assert_eq!(count(&ops, fused), 4 * layers, "{mode:?}: {ops:?}");
        for op in loose {
            assert_eq!(count(&ops, op), 0, "{mode:?}: {op} left: {ops:?}");
        }
        assert_eq!(count(&ops, "QuickGelu"), layers, "{mode:?}: {ops:?}");
    }
}

/// `--fused-attention`: one `com.microsoft.MultiHeadAttention` per block instead of the plain
/// Q·Kᵀ/softmax/P·V ops, the same scores as the trainer (fp32 and int8 dynamic), the choice
/// recorded in the metadata, and refused for ResNet towers (their attention pool stays plain).
#[test]
fn fused_attention_is_one_kernel_per_block_and_matches_the_trainer() {
    use agiqa_exporter::{build_int8_model, AttentionOps, Int8Mode};
    let dir = scratch("fused-attention");
    let mut loaded = checkpoint(
        &dir.join("run"),
        "tiny",
        0,
        &regression(ImageNorm::Whiten),
        "quality",
        37,
    );
    sharpen(&mut loaded);
    let heads = [HeadSource {
        name: "quality".into(),
        checkpoint: &loaded,
    }];
    let fused = ExportOptions {
        image_features: true,
        attention: AttentionOps::MicrosoftMultiHead,
        ..ExportOptions::default()
    };
    let report = export_and_verify(&dir, "fused", &heads, &fused);
    let features = report
        .cases
        .iter()
        .find(|c| c.label.contains("image features"))
        .expect("the image features are compared");
    assert!(features.max_abs < 1e-5, "{report}");
    let path = dir.join("fused.onnx");
    assert_eq!(
        metadata_of(&path).attention.as_deref(),
        Some("com.microsoft.MultiHeadAttention")
    );
    let ops = optimised_ops(&path);
    let layers = 2;
    assert_eq!(ops.get("MultiHeadAttention"), Some(&layers), "{ops:?}");
    assert_eq!(ops.get("Softmax"), None, "{ops:?}");

    let plain = build_model(&heads, &ExportOptions::default()).unwrap();
    assert_eq!(
        plain.metadata.attention.as_deref(),
        Some(AttentionOps::Plain.metadata_name())
    );

    let calibration = image_folder(&dir.join("calibration"), 8, 300);
    let int8 = int8_options(Int8Mode::Dynamic, Some(&calibration));
    let model = build_int8_model(&heads, &fused, &int8, None).unwrap();
    let int8_path = dir.join("fused-dynamic.onnx");
    write_model(&int8_path, &model.proto).unwrap();
    let ops = optimised_ops(&int8_path);
    assert_eq!(ops.get("MultiHeadAttention"), Some(&layers), "{ops:?}");
    assert_eq!(
        ops.get("DynamicQuantizeMatMul"),
        Some(&(4 * layers)),
        "{ops:?}"
    );

    let rn = checkpoint(
        &dir.join("rn"),
        "tiny-rn",
        0,
        &regression(ImageNorm::None),
        "quality",
        38,
    );
    let rn_heads = [HeadSource {
        name: "quality".into(),
        checkpoint: &rn,
    }];
    let err = build_model(&rn_heads, &fused)
        .err()
        .expect("ResNet refused");
    assert!(err.to_string().contains("ViT towers only"), "{err}");
}

//! The tch CLIP against the reference PyTorch implementations (OpenAI's `clip` package and
//! `transformers`' CLIPModel) on random-weight fixtures written by `scripts/make-fixtures`.
//!
//! References are fp32; the OpenAI ones were computed from the archive's fp16-rounded weights,
//! which is exactly what the loader reads, so the only differences left are float reordering.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use agiqa_trainer::clip::{
    Activation, Clip, ClipConfig, ResNetConfig, TextConfig, VisionConfig, VitConfig,
};
use agiqa_trainer::weights::{self, hf, load_state_dict, WeightsError, WeightsFormat};
use tch::{Device, Kind, Tensor};

/// Max abs difference allowed between our fp32 embeddings and the reference's.
const TOLERANCE: f64 = 1e-4;

fn fixture(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/clip")
        .join(relative)
}

/// Inputs and expected outputs from a `reference.safetensors`.
struct Reference {
    tensors: HashMap<String, Tensor>,
    path: PathBuf,
}

impl Reference {
    fn load(path: &Path) -> Reference {
        let tensors = weights::read_safetensors(path)
            .unwrap_or_else(|e| panic!("{e} (regenerate with scripts/make-fixtures)"))
            .into_iter()
            .collect();
        Reference {
            tensors,
            path: path.to_path_buf(),
        }
    }

    fn get(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{} has no `{name}`", self.path.display()))
    }
}

fn max_abs_diff(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(
        ours.size(),
        reference.size(),
        "shape differs from the reference"
    );
    // Guards the tolerance's meaning: near-zero references would make any output pass.
    assert!(
        reference.abs().max().double_value(&[]) > 100. * TOLERANCE,
        "reference is ~0"
    );
    (ours.to_device(Device::Cpu) - reference)
        .abs()
        .max()
        .double_value(&[])
}

/// Encodes the reference inputs and checks both towers; returns (image, text) max |Δ|.
fn assert_parity(clip: &Clip, reference: &Reference, prefix: &str, label: &str) -> (f64, f64) {
    let (image, text) = tch::no_grad(|| {
        (
            clip.encode_image(reference.get("pixel_values")),
            clip.encode_text(reference.get("input_ids")),
        )
    });
    let image_diff = max_abs_diff(&image, reference.get(&format!("{prefix}.image_embeds")));
    let text_diff = max_abs_diff(&text, reference.get(&format!("{prefix}.text_embeds")));
    eprintln!("{label}: image max|Δ| = {image_diff:.3e}, text max|Δ| = {text_diff:.3e}");
    assert!(
        image_diff <= TOLERANCE,
        "{label}: image embeddings differ by {image_diff:e}"
    );
    assert!(
        text_diff <= TOLERANCE,
        "{label}: text embeddings differ by {text_diff:e}"
    );
    // The reference stores the parameter itself, i.e. the log of the scale.
    let scale = reference
        .get(&format!("{prefix}.logit_scale"))
        .double_value(&[0])
        .exp();
    assert!(
        (clip.logit_scale() - scale).abs() <= 1e-5 * scale,
        "{label}: logit scale {} vs {scale}",
        clip.logit_scale()
    );
    (image_diff, text_diff)
}

fn tiny_text() -> TextConfig {
    TextConfig {
        context_length: 77,
        vocab_size: 1000,
        width: 128,
        layers: 2,
        heads: 2,
        activation: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
    }
}

/// `VIT_TINY` of scripts/fixtures/make_fixtures.py.
fn vit_tiny_config() -> ClipConfig {
    ClipConfig {
        embed_dim: 64,
        vision: VisionConfig::Vit(VitConfig {
            image_resolution: 64,
            patch_size: 16,
            width: 128,
            layers: 2,
            heads: 2,
            activation: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }),
        text: tiny_text(),
    }
}

/// `RN_TINY` of scripts/fixtures/make_fixtures.py (attention-pool heads = width·32/64).
fn rn_tiny_config() -> ClipConfig {
    ClipConfig {
        embed_dim: 64,
        vision: VisionConfig::ResNet(ResNetConfig {
            image_resolution: 64,
            layers: [1, 1, 1, 1],
            width: 8,
            heads: 4,
        }),
        text: tiny_text(),
    }
}

#[test]
fn vit_tiny_openai_torchscript_matches_openai_clip() {
    let path = fixture("vit_tiny/openai.pt");
    let (_, format) = load_state_dict(&path).unwrap();
    assert_eq!(format, WeightsFormat::OpenAiTorchScript);
    let clip = Clip::load(&path, Device::Cpu).unwrap();
    assert_parity(
        &clip,
        &Reference::load(&fixture("vit_tiny/reference.safetensors")),
        "openai",
        "vit_tiny openai.pt",
    );
}

#[test]
fn rn_tiny_openai_torchscript_matches_openai_clip() {
    let path = fixture("rn_tiny/openai.pt");
    let clip = Clip::load(&path, Device::Cpu).unwrap();
    assert_eq!(clip.config(), &rn_tiny_config());
    // BatchNorm running statistics are buffers, not parameters: they must have been loaded too.
    let (sd, _) = load_state_dict(&path).unwrap();
    let running_var = sd
        .get("visual.layer1.0.bn1.running_var")
        .expect("BN buffers are read");
    assert!(
        !running_var.equal(&running_var.ones_like()),
        "fixture BN stats should not be the defaults"
    );
    assert_parity(
        &clip,
        &Reference::load(&fixture("rn_tiny/reference.safetensors")),
        "openai",
        "rn_tiny openai.pt",
    );
}

#[test]
fn vit_tiny_hf_safetensors_matches_transformers() {
    let folder = fixture("vit_tiny/hf");
    let (_, format) = load_state_dict(&folder).unwrap();
    assert_eq!(format, WeightsFormat::HuggingFaceSafetensors);
    let reference = Reference::load(&fixture("vit_tiny/reference.safetensors"));
    let clip = Clip::load(&folder, Device::Cpu).unwrap();
    assert_parity(&clip, &reference, "hf", "vit_tiny hf/ folder");
    // The weights file alone, with config.json found beside it.
    let clip = Clip::load(&folder.join("model.safetensors"), Device::Cpu).unwrap();
    assert_eq!(clip.config(), &vit_tiny_config());
}

#[test]
fn inferred_config_is_the_tiny_config() {
    for (path, expected) in [
        ("vit_tiny/openai.pt", vit_tiny_config()),
        ("rn_tiny/openai.pt", rn_tiny_config()),
    ] {
        let (sd, _) = load_state_dict(&fixture(path)).unwrap();
        assert_eq!(ClipConfig::infer(&sd.shapes()).unwrap(), expected, "{path}");
    }
    let clip = Clip::load(&fixture("vit_tiny/hf"), Device::Cpu).unwrap();
    assert_eq!(clip.config(), &vit_tiny_config());
    assert_eq!(clip.config().image_resolution(), 64);
}

#[test]
fn mismatch_names_the_missing_unexpected_and_misshaped_tensors_at_once() {
    let (mut sd, _) = load_state_dict(&fixture("vit_tiny/openai.pt")).unwrap();
    let removed = "visual.transformer.resblocks.1.mlp.c_fc.bias";
    let extra = "visual.transformer.resblocks.1.mlp.gate.weight";
    let reshaped = "transformer.resblocks.0.ln_2.weight";
    assert!(sd.remove(removed).is_some());
    sd.insert(extra, &Tensor::zeros([3, 5], (Kind::Float, Device::Cpu)));
    let original = sd.remove(reshaped).unwrap();
    sd.insert(reshaped, &original.reshape([64, 2]));

    let err = Clip::from_state_dict(sd, Device::Cpu).unwrap_err();
    let message = err.to_string();
    let WeightsError::Mismatch(mismatch) = err else {
        panic!("expected a mismatch, got: {message}")
    };
    assert_eq!(mismatch.missing, vec![(removed.to_string(), vec![512])]);
    assert_eq!(mismatch.unexpected, vec![(extra.to_string(), vec![3, 5])]);
    assert_eq!(mismatch.misshaped.len(), 1);
    assert_eq!(
        (
            &mismatch.misshaped[0].name,
            &mismatch.misshaped[0].expected,
            &mismatch.misshaped[0].found
        ),
        (&reshaped.to_string(), &vec![128], &vec![64, 2])
    );
    for needle in [
        removed,
        extra,
        reshaped,
        "[512]",
        "[3, 5]",
        "expected [128], found [64, 2]",
    ] {
        assert!(message.contains(needle), "`{needle}` not in: {message}");
    }
}

#[test]
fn declared_config_mismatch_lists_every_wrong_tensor() {
    let (sd, _) = load_state_dict(&fixture("vit_tiny/openai.pt")).unwrap();
    let mut config = vit_tiny_config();
    config.text.layers = 3; // the checkpoint has 2 text blocks
    let Err(WeightsError::Mismatch(mismatch)) =
        Clip::from_state_dict_with_config(sd, &config, Device::Cpu)
    else {
        panic!("a 3-layer text tower cannot load a 2-layer checkpoint");
    };
    let missing: BTreeSet<&str> = mismatch.missing.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(missing.len(), 12, "all 12 tensors of block 2: {missing:?}");
    assert!(missing
        .iter()
        .all(|n| n.starts_with("transformer.resblocks.2.")));
    assert!(mismatch.unexpected.is_empty() && mismatch.misshaped.is_empty());
}

#[test]
fn hf_names_round_trip() {
    // HF → OpenAI → HF is the identity on names and values.
    let hf_tensors = weights::read_safetensors(&fixture("vit_tiny/hf/model.safetensors")).unwrap();
    let openai = hf::to_openai(
        hf_tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect(),
    );
    let back: BTreeMap<String, Tensor> = hf::from_openai(&openai).into_iter().collect();
    let original: BTreeMap<String, Tensor> = hf_tensors
        .into_iter()
        .filter(|(n, _)| !weights::is_ignored(n))
        .collect();
    assert_eq!(
        back.keys().collect::<Vec<_>>(),
        original.keys().collect::<Vec<_>>()
    );
    for (name, tensor) in &original {
        assert!(
            back[name].equal(&tensor.to_kind(Kind::Float)),
            "{name} changed in the round trip"
        );
    }
    // The HF checkpoint maps onto exactly the names of the OpenAI archive of the same architecture.
    let (archive, _) = load_state_dict(&fixture("vit_tiny/openai.pt")).unwrap();
    assert_eq!(openai.shapes(), archive.shapes());
    // OpenAI → HF → OpenAI too.
    let again = hf::to_openai(hf::from_openai(&archive));
    assert_eq!(again.shapes(), archive.shapes());
    assert!(archive
        .iter()
        .all(|(name, t)| again.get(name).is_some_and(|u| u.equal(t))));
}

#[test]
fn openai_safetensors_round_trip_reproduces_the_model() {
    let clip = Clip::load(&fixture("vit_tiny/openai.pt"), Device::Cpu).unwrap();
    let dir = std::env::temp_dir().join(format!("agiqa-clip-parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vit_tiny.safetensors");
    clip.state_dict().save_safetensors(&path).unwrap();
    let (_, format) = load_state_dict(&path).unwrap();
    assert_eq!(format, WeightsFormat::OpenAiSafetensors);
    let reloaded = Clip::load(&path, Device::Cpu).unwrap();
    let reference = Reference::load(&fixture("vit_tiny/reference.safetensors"));
    let ids = reference.get("input_ids");
    assert!(clip.encode_text(ids).equal(&reloaded.encode_text(ids)));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn loaded_weights_are_frozen() {
    for path in ["vit_tiny/openai.pt", "rn_tiny/openai.pt", "vit_tiny/hf"] {
        let clip = Clip::load(&fixture(path), Device::Cpu).unwrap();
        let named = clip.named_tensors();
        assert!(!named.is_empty());
        let trainable: Vec<&str> = named
            .iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(n, _)| n.as_str())
            .collect();
        assert!(trainable.is_empty(), "{path}: {trainable:?} require grad");
    }
}

#[test]
fn embedded_prompt_entry_point_matches_reference_text_embeddings() {
    let clip = Clip::load(&fixture("vit_tiny/openai.pt"), Device::Cpu).unwrap();
    let reference = Reference::load(&fixture("vit_tiny/reference.safetensors"));
    let ids = reference.get("input_ids");
    let eot = ids.argmax(-1, false);
    let features = tch::no_grad(|| clip.encode_text_embedded(&clip.embed_tokens(ids), &eot));
    assert!(max_abs_diff(&features, reference.get("openai.text_embeds")) <= TOLERANCE);
    assert_eq!(clip.embed_tokens(ids).size(), [3, 77, 128]);
}

#[test]
fn presets_have_the_released_parameter_counts() {
    // Counts printed by OpenAI's CLIP notebook / open_clip for the released models.
    for (name, parameters) in [
        ("ViT-B/16", 149_620_737),
        ("ViT-B/32", 151_277_313),
        ("RN50", 102_007_137),
        ("RN101", 119_688_033),
    ] {
        let config = ClipConfig::preset(name).unwrap();
        let clip = Clip::random(&config, 0, Device::Cpu);
        assert_eq!(clip.parameter_count(), parameters, "{name}");
        assert_eq!(clip.config().name(), name);
        let shapes: BTreeMap<String, Vec<i64>> = clip
            .named_tensors()
            .iter()
            .map(|(n, t)| (n.clone(), t.size()))
            .collect();
        assert_eq!(
            ClipConfig::infer(&shapes).unwrap(),
            config,
            "{name}: inference from its own shapes"
        );
    }
    let b16 = Clip::random(&ClipConfig::preset("ViT-B/16").unwrap(), 0, Device::Cpu);
    let shapes: BTreeMap<String, Vec<i64>> = b16
        .named_tensors()
        .iter()
        .map(|(n, t)| (n.clone(), t.size()))
        .collect();
    assert_eq!(shapes["visual.conv1.weight"], [768, 3, 16, 16]);
    assert_eq!(shapes["visual.positional_embedding"], [197, 768]);
    assert_eq!(shapes["visual.proj"], [768, 512]);
    assert_eq!(
        shapes["transformer.resblocks.11.attn.in_proj_weight"],
        [1536, 512]
    );
    assert_eq!(shapes["token_embedding.weight"], [49408, 512]);
    assert_eq!(shapes["logit_scale"], Vec::<i64>::new());
}

#[test]
fn random_models_run_for_every_tower_kind() {
    for config in [vit_tiny_config(), rn_tiny_config()] {
        let clip = Clip::random(&config, 5, Device::Cpu);
        let reference = Reference::load(&fixture("vit_tiny/reference.safetensors"));
        let image = clip.encode_image(reference.get("pixel_values"));
        let text = clip.encode_text(reference.get("input_ids"));
        assert_eq!((image.size(), text.size()), (vec![2, 64], vec![3, 64]));
        let finite = |t: &Tensor| t.isfinite().all().int64_value(&[]) == 1;
        assert!(finite(&image) && finite(&text), "{}", config.name());
    }
}

#[test]
#[ignore = "allocates ViT-L/14 (1.7 GB of fp32 weights)"]
fn vit_l14_preset_has_the_released_parameter_count() {
    let clip = Clip::random(&ClipConfig::preset("ViT-L/14").unwrap(), 0, Device::Cpu);
    assert_eq!(clip.parameter_count(), 427_616_513);
}

/// Full-size ViT-B/16 with random weights: `scripts/make-fixtures --full` writes it (about 1 GB).
#[test]
#[ignore = "needs target/fixtures-full/vit_b16 from scripts/make-fixtures --full"]
fn vit_b16_full_size_matches_openai_clip_and_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures-full/vit_b16");
    for file in [
        "openai.pt",
        "hf/model.safetensors",
        "hf/config.json",
        "reference.safetensors",
    ] {
        assert!(
            dir.join(file).is_file(),
            "{} is missing: run `scripts/make-fixtures --full` to generate the full-size ViT-B/16 fixtures",
            dir.join(file).display()
        );
    }
    let reference = Reference::load(&dir.join("reference.safetensors"));
    let clip = Clip::load(&dir.join("openai.pt"), Device::Cpu).unwrap();
    assert_eq!(clip.config().name(), "ViT-B/16");
    assert_parity(&clip, &reference, "openai", "ViT-B/16 openai.pt");
    let clip = Clip::load(&dir.join("hf"), Device::Cpu).unwrap();
    assert_eq!(clip.config().name(), "ViT-B/16");
    assert_parity(&clip, &reference, "hf", "ViT-B/16 hf/");
}

//! CLIP's vision transformer (ViT-B/32, ViT-B/16, ViT-L/14, ...), stored under `visual.`.

use tch::nn;
use tch::Tensor;

use super::attention::{layer_norm, randn, Transformer, TransformerShape};
use super::config::VitConfig;

/// Patch embedding, class token, pre-LN transformer, class-token projection.
#[derive(Debug)]
pub struct VisionTransformer {
    conv1: nn::Conv2D,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: super::norm::Fp32LayerNorm,
    transformer: Transformer,
    ln_post: super::norm::Fp32LayerNorm,
    proj: Tensor,
}

impl VisionTransformer {
    /// Random init follows OpenAI's `VisionTransformer.__init__` (scale = width^-½).
    pub fn new(p: nn::Path, config: &VitConfig, embed_dim: i64) -> Self {
        let VitConfig {
            image_resolution,
            patch_size,
            width,
            layers,
            heads,
            ..
        } = *config;
        let scale = (width as f64).powf(-0.5);
        let grid = image_resolution / patch_size;
        let conv = nn::ConvConfig {
            stride: patch_size,
            bias: false,
            ..Default::default()
        };
        let shape = TransformerShape {
            width,
            layers,
            heads,
            activation: config.activation,
            layer_norm_eps: config.layer_norm_eps,
        };
        Self {
            conv1: nn::conv2d(&p / "conv1", 3, width, patch_size, conv),
            class_embedding: p.var("class_embedding", &[width], randn(scale)),
            positional_embedding: p.var(
                "positional_embedding",
                &[grid * grid + 1, width],
                randn(scale),
            ),
            ln_pre: layer_norm(&p / "ln_pre", width, config.layer_norm_eps),
            transformer: Transformer::new(&p / "transformer", &shape),
            ln_post: layer_norm(&p / "ln_post", width, config.layer_norm_eps),
            proj: p.var("proj", &[width, embed_dim], randn(scale)),
        }
    }

    /// `[N, 3, R, R]` normalised pixels → `[N, E]` image features (not L2-normalised).
    ///
    /// # Panics
    /// When `R` is not the configured resolution (the positional embedding has a fixed length).
    pub fn forward(&self, pixels: &Tensor) -> Tensor {
        let patches = pixels.apply(&self.conv1); // [N, W, g, g]
        let (n, width) = (patches.size()[0], patches.size()[1]);
        let tokens = patches.flatten(2, -1).transpose(1, 2); // [N, g², W]
        let class = self
            .class_embedding
            .expand([n, 1, width], false)
            .to_kind(tokens.kind());
        let expected = self.positional_embedding.size()[0];
        assert_eq!(
            tokens.size()[1] + 1,
            expected,
            "image of {:?} does not give the {} patches this ViT was built for",
            pixels.size(),
            expected - 1
        );
        let x = Tensor::cat(&[class, tokens], 1) + &self.positional_embedding;
        let x = self.transformer.forward(&x.apply(&self.ln_pre), false);
        x.select(1, 0).apply(&self.ln_post).matmul(&self.proj)
    }
}

//! CLIP's causal text transformer, stored at the state dict's top level.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::attention::{layer_norm, randn, Transformer, TransformerShape};
use super::config::TextConfig;

/// Token + position embeddings, causal transformer, final LN, projection of the EOT token.
#[derive(Debug)]
pub struct TextTransformer {
    token_embedding: nn::Embedding,
    positional_embedding: Tensor,
    transformer: Transformer,
    ln_final: super::norm::Fp32LayerNorm,
    text_projection: Tensor,
}

impl TextTransformer {
    /// Random init follows OpenAI's `initialize_parameters`.
    pub fn new(p: &nn::Path, config: &TextConfig, embed_dim: i64) -> Self {
        let TextConfig {
            context_length,
            vocab_size,
            width,
            layers,
            heads,
            ..
        } = *config;
        let embedding = nn::EmbeddingConfig {
            ws_init: randn(0.02),
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
            token_embedding: nn::embedding(p / "token_embedding", vocab_size, width, embedding),
            positional_embedding: p.var(
                "positional_embedding",
                &[context_length, width],
                randn(0.01),
            ),
            transformer: Transformer::new(p / "transformer", &shape),
            ln_final: layer_norm(p / "ln_final", width, config.layer_norm_eps),
            text_projection: p.var(
                "text_projection",
                &[width, embed_dim],
                randn((width as f64).powf(-0.5)),
            ),
        }
    }

    /// `[N, L]` token ids → `[N, L, W]` token embeddings, without positions.
    pub fn embed_tokens(&self, token_ids: &Tensor) -> Tensor {
        self.token_embedding.forward(token_ids)
    }

    /// `[N, L]` token ids → `[N, E]`; pools at the EOT token, the highest id in OpenAI's vocabulary.
    pub fn forward(&self, token_ids: &Tensor) -> Tensor {
        let eot = token_ids.argmax(-1, false);
        self.forward_embedded(&self.embed_tokens(token_ids), &eot)
    }

    /// `[N, L, W]` token embeddings (positions not yet added) and `[N]` EOT positions → `[N, E]`.
    ///
    /// This is CoOp's entry point: learned context vectors are spliced into the embedded prompt.
    ///
    /// # Panics
    /// When `L` exceeds the context length or the width differs.
    pub fn forward_embedded(&self, embedded: &Tensor, eot_positions: &Tensor) -> Tensor {
        let (n, l, width) = embedded.size3().expect("embedded prompts are [N, L, W]");
        let context_length = self.positional_embedding.size()[0];
        assert!(
            l <= context_length,
            "{l} tokens exceed the context length {context_length}"
        );
        let x = embedded + self.positional_embedding.narrow(0, 0, l);
        let x = self.transformer.forward(&x, true).apply(&self.ln_final);
        let rows = Tensor::arange(n, (Kind::Int64, x.device()));
        let eot = eot_positions.to_kind(Kind::Int64).to_device(x.device());
        let pooled = x.index(&[Some(rows), Some(eot)]);
        debug_assert_eq!(pooled.size(), [n, width]);
        pooled.matmul(&self.text_projection)
    }
}

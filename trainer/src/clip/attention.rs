//! The pre-LN self-attention transformer shared by CLIP's ViT and text towers.
//!
//! Parameter names follow `torch.nn.MultiheadAttention` as OpenAI used it (`in_proj_weight`
//! packs q, k, v), so the var store paths are the OpenAI state-dict names.

use tch::nn::{self, Init};
use tch::Tensor;

use super::config::Activation;
use super::norm::Fp32LayerNorm;

/// Multi-head self-attention with packed q/k/v projections, batch-first.
#[derive(Debug)]
pub struct MultiheadSelfAttention {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: nn::Linear,
    heads: i64,
}

impl MultiheadSelfAttention {
    /// Random init follows OpenAI's `initialize_parameters` for the text tower.
    pub fn new(p: nn::Path, width: i64, heads: i64, layers: i64) -> Self {
        let attn_std = (width as f64).powf(-0.5);
        Self {
            in_proj_weight: p.var("in_proj_weight", &[3 * width, width], randn(attn_std)),
            in_proj_bias: p.var("in_proj_bias", &[3 * width], Init::Const(0.)),
            out_proj: linear(&p / "out_proj", width, width, projection_std(width, layers)),
            heads,
        }
    }

    /// `[N, L, W]` → `[N, L, W]`; `causal` hides later positions (the text tower's mask).
    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let (n, l, w) = x.size3().expect("attention input is [N, L, W]");
        let head_dim = w / self.heads;
        let qkv = x
            .linear(&self.in_proj_weight, Some(&self.in_proj_bias))
            .view([n, l, 3, self.heads, head_dim])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.,
            causal,
            None,
            false,
        );
        out.transpose(1, 2).reshape([n, l, w]).apply(&self.out_proj)
    }
}

/// Position-wise MLP: `c_fc` (×4 width), activation, `c_proj`.
#[derive(Debug)]
pub struct Mlp {
    c_fc: nn::Linear,
    c_proj: nn::Linear,
    activation: Activation,
}

impl Mlp {
    pub fn new(p: nn::Path, width: i64, layers: i64, activation: Activation) -> Self {
        let fc_std = (2. * width as f64).powf(-0.5);
        Self {
            c_fc: linear(&p / "c_fc", width, 4 * width, fc_std),
            c_proj: linear(
                &p / "c_proj",
                4 * width,
                width,
                projection_std(width, layers),
            ),
            activation,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let hidden = x.apply(&self.c_fc);
        let hidden = match self.activation {
            Activation::QuickGelu => quick_gelu(&hidden),
            Activation::Gelu => hidden.gelu("none"),
        };
        hidden.apply(&self.c_proj)
    }
}

/// `x * sigmoid(1.702 x)`: OpenAI's cheap GELU approximation, which the weights were trained with.
pub fn quick_gelu(x: &Tensor) -> Tensor {
    x * (x * 1.702).sigmoid()
}

/// One pre-LN block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Debug)]
pub struct ResidualAttentionBlock {
    ln_1: Fp32LayerNorm,
    attn: MultiheadSelfAttention,
    ln_2: Fp32LayerNorm,
    mlp: Mlp,
}

impl ResidualAttentionBlock {
    pub fn new(p: nn::Path, shape: &TransformerShape) -> Self {
        let TransformerShape {
            width,
            layers,
            heads,
            activation,
            layer_norm_eps,
        } = *shape;
        Self {
            ln_1: layer_norm(&p / "ln_1", width, layer_norm_eps),
            attn: MultiheadSelfAttention::new(&p / "attn", width, heads, layers),
            ln_2: layer_norm(&p / "ln_2", width, layer_norm_eps),
            mlp: Mlp::new(&p / "mlp", width, layers, activation),
        }
    }

    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let x = x + self.attn.forward(&x.apply(&self.ln_1), causal);
        let mlp = self.mlp.forward(&x.apply(&self.ln_2));
        x + mlp
    }
}

/// Hyper-parameters of a [`Transformer`].
#[derive(Debug, Clone, Copy)]
pub struct TransformerShape {
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    pub activation: Activation,
    pub layer_norm_eps: f64,
}

/// A stack of residual attention blocks, stored as `resblocks.N`.
#[derive(Debug)]
pub struct Transformer {
    resblocks: Vec<ResidualAttentionBlock>,
}

impl Transformer {
    pub fn new(p: nn::Path, shape: &TransformerShape) -> Self {
        let blocks = &p / "resblocks";
        let resblocks = (0..shape.layers)
            .map(|i| ResidualAttentionBlock::new(&blocks / i, shape))
            .collect();
        Self { resblocks }
    }

    /// `[N, L, W]` → `[N, L, W]`.
    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let mut x = x.shallow_clone();
        for block in &self.resblocks {
            x = block.forward(&x, causal);
        }
        x
    }
}

/// OpenAI scales output projections by depth so the residual stream keeps unit variance.
fn projection_std(width: i64, layers: i64) -> f64 {
    (width as f64).powf(-0.5) * (2. * layers.max(1) as f64).powf(-0.5)
}

pub(crate) fn randn(stdev: f64) -> Init {
    Init::Randn { mean: 0., stdev }
}

/// Linear layer with normal-initialised weight and zero bias.
pub(crate) fn linear(p: nn::Path, in_dim: i64, out_dim: i64, stdev: f64) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: randn(stdev),
        bs_init: Some(Init::Const(0.)),
        bias: true,
    };
    nn::linear(p, in_dim, out_dim, config)
}

/// Layer norm computed in fp32 (see `norm.rs`).
pub(crate) fn layer_norm(p: nn::Path, width: i64, eps: f64) -> Fp32LayerNorm {
    Fp32LayerNorm(nn::layer_norm(
        p,
        vec![width],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Reference: softmax(q kᵀ / √d) v written out, with an explicit −inf mask above the diagonal.
    fn naive_attention(attn: &MultiheadSelfAttention, x: &Tensor, causal: bool) -> Tensor {
        let (n, l, w) = x.size3().unwrap();
        let d = w / attn.heads;
        let qkv = x
            .linear(&attn.in_proj_weight, Some(&attn.in_proj_bias))
            .chunk(3, -1);
        let split = |t: &Tensor| t.view([n, l, attn.heads, d]).transpose(1, 2);
        let (q, k, v) = (split(&qkv[0]), split(&qkv[1]), split(&qkv[2]));
        let mut scores = q.matmul(&k.transpose(-2, -1)) / (d as f64).sqrt();
        if causal {
            let mask = Tensor::ones([l, l], (Kind::Bool, Device::Cpu)).triu(1);
            scores = scores.masked_fill(&mask, f64::NEG_INFINITY);
        }
        let out = scores.softmax(-1, Kind::Float).matmul(&v);
        out.transpose(1, 2).reshape([n, l, w]).apply(&attn.out_proj)
    }

    #[test]
    fn fused_attention_matches_the_textbook_formula() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let attn = MultiheadSelfAttention::new(vs.root() / "attn", 32, 4, 2);
        let x = Tensor::randn([2, 7, 32], (Kind::Float, Device::Cpu));
        for causal in [false, true] {
            let diff = (attn.forward(&x, causal) - naive_attention(&attn, &x, causal))
                .abs()
                .max();
            assert!(diff.double_value(&[]) < 1e-5, "causal={causal}: {diff}");
        }
    }

    #[test]
    fn causal_attention_ignores_later_tokens() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let attn = MultiheadSelfAttention::new(vs.root() / "attn", 16, 2, 1);
        let x = Tensor::randn([1, 5, 16], (Kind::Float, Device::Cpu));
        let changed = x.copy();
        let _ = changed.narrow(1, 4, 1).fill_(3.0);
        let diff = (attn.forward(&x, true) - attn.forward(&changed, true))
            .narrow(1, 0, 4)
            .abs()
            .max();
        assert_eq!(diff.double_value(&[]), 0.0);
    }

    #[test]
    fn quick_gelu_is_x_sigmoid_1702x() {
        let x = Tensor::from_slice(&[-2.0f32, 0.0, 1.0]);
        let y = Vec::<f32>::try_from(quick_gelu(&x)).unwrap();
        let expect = [
            -2.0 / (1.0 + (3.404f32).exp()),
            0.0,
            1.0 / (1.0 + (-1.702f32).exp()),
        ];
        for (a, b) in y.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}

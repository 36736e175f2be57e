//! OpenAI's ModifiedResNet (RN50, RN101, RN50x4, ...), stored under `visual.`.
//!
//! Differences from torchvision's ResNet, per the CLIP paper: a 3-conv stem with an average pool
//! instead of a max pool, anti-aliased strided convolutions (an average pool before the stride-1
//! conv) and an attention pool instead of global average pooling.

use tch::nn::{self, Init};
use tch::Tensor;

use super::attention::{linear, randn};
use super::config::ResNetConfig;
use super::norm::Fp32BatchNorm;

/// Batch norm in eval mode (running statistics), as every CLIP checkpoint is used.
const BATCH_NORM_EPS: f64 = 1e-5;

/// Channel expansion of the last conv of a bottleneck.
const EXPANSION: i64 = 4;

/// Stem, four stages of bottlenecks, attention pooling.
#[derive(Debug)]
pub struct ModifiedResNet {
    stem: [(nn::Conv2D, Fp32BatchNorm); 3],
    stages: Vec<Vec<Bottleneck>>,
    attnpool: AttentionPool2d,
}

impl ModifiedResNet {
    pub fn new(p: nn::Path, config: &ResNetConfig, embed_dim: i64) -> Self {
        let width = config.width;
        let stem = [
            (
                conv(&p / "conv1", 3, width / 2, 3, 2),
                batch_norm(&p / "bn1", width / 2, 1.),
            ),
            (
                conv(&p / "conv2", width / 2, width / 2, 3, 1),
                batch_norm(&p / "bn2", width / 2, 1.),
            ),
            (
                conv(&p / "conv3", width / 2, width, 3, 1),
                batch_norm(&p / "bn3", width, 1.),
            ),
        ];
        let mut inplanes = width;
        let mut stages = Vec::with_capacity(4);
        for (i, &blocks) in config.layers.iter().enumerate() {
            let stage = &p / format!("layer{}", i + 1);
            let planes = width << i;
            let stride = if i == 0 { 1 } else { 2 };
            let mut stage_blocks = vec![Bottleneck::new(&stage / 0, inplanes, planes, stride)];
            inplanes = planes * EXPANSION;
            stage_blocks
                .extend((1..blocks).map(|b| Bottleneck::new(&stage / b, inplanes, planes, 1)));
            stages.push(stage_blocks);
        }
        let spacial = config.image_resolution / 32;
        let attnpool = AttentionPool2d::new(
            &p / "attnpool",
            spacial,
            width * 32,
            config.heads,
            embed_dim,
        );
        Self {
            stem,
            stages,
            attnpool,
        }
    }

    /// `[N, 3, R, R]` normalised pixels → `[N, E]` image features (not L2-normalised).
    pub fn forward(&self, pixels: &Tensor) -> Tensor {
        let mut x = pixels.shallow_clone();
        for (conv, bn) in &self.stem {
            x = x.apply(conv).apply_t(bn, false).relu();
        }
        x = avg_pool(&x, 2);
        for block in self.stages.iter().flatten() {
            x = block.forward(&x);
        }
        self.attnpool.forward(&x)
    }
}

/// 1x1 → 3x3 → (avg pool) → 1x1 ×4 with a pooled projection shortcut when the shape changes.
#[derive(Debug)]
pub struct Bottleneck {
    conv1: nn::Conv2D,
    bn1: Fp32BatchNorm,
    conv2: nn::Conv2D,
    bn2: Fp32BatchNorm,
    conv3: nn::Conv2D,
    bn3: Fp32BatchNorm,
    stride: i64,
    /// OpenAI's `downsample` Sequential: `-1` is the parameter-free AvgPool, then `0` conv, `1` bn.
    downsample: Option<(nn::Conv2D, Fp32BatchNorm)>,
}

impl Bottleneck {
    pub fn new(p: nn::Path, inplanes: i64, planes: i64, stride: i64) -> Self {
        let downsample = (stride > 1 || inplanes != planes * EXPANSION).then(|| {
            let d = &p / "downsample";
            (
                conv(&d / 0, inplanes, planes * EXPANSION, 1, 1),
                batch_norm(&d / 1, planes * EXPANSION, 1.),
            )
        });
        Self {
            conv1: conv(&p / "conv1", inplanes, planes, 1, 1),
            bn1: batch_norm(&p / "bn1", planes, 1.),
            conv2: conv(&p / "conv2", planes, planes, 3, 1),
            bn2: batch_norm(&p / "bn2", planes, 1.),
            conv3: conv(&p / "conv3", planes, planes * EXPANSION, 1, 1),
            // OpenAI zero-initialises the last BN so each fresh block starts as the identity.
            bn3: batch_norm(&p / "bn3", planes * EXPANSION, 0.),
            stride,
            downsample,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let out = x.apply(&self.conv1).apply_t(&self.bn1, false).relu();
        let out = out.apply(&self.conv2).apply_t(&self.bn2, false).relu();
        let out = avg_pool(&out, self.stride);
        let out = out.apply(&self.conv3).apply_t(&self.bn3, false);
        let identity = match &self.downsample {
            Some((conv, bn)) => avg_pool(x, self.stride).apply(conv).apply_t(bn, false),
            None => x.shallow_clone(),
        };
        (out + identity).relu()
    }
}

/// Multi-head attention of the mean feature (the query) over all spatial features plus the mean.
#[derive(Debug)]
pub struct AttentionPool2d {
    positional_embedding: Tensor,
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    c_proj: nn::Linear,
    heads: i64,
}

impl AttentionPool2d {
    pub fn new(p: nn::Path, spacial: i64, embed_dim: i64, heads: i64, output_dim: i64) -> Self {
        let std = (embed_dim as f64).powf(-0.5);
        let positions = spacial * spacial + 1;
        Self {
            positional_embedding: p.var(
                "positional_embedding",
                &[positions, embed_dim],
                randn(std),
            ),
            q_proj: linear(&p / "q_proj", embed_dim, embed_dim, std),
            k_proj: linear(&p / "k_proj", embed_dim, embed_dim, std),
            v_proj: linear(&p / "v_proj", embed_dim, embed_dim, std),
            c_proj: linear(&p / "c_proj", embed_dim, output_dim, std),
            heads,
        }
    }

    /// `[N, C, H, W]` → `[N, output_dim]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (n, c, _, _) = x.size4().expect("attention pool input is [N, C, H, W]");
        let tokens = x.flatten(2, -1).transpose(1, 2); // [N, HW, C]
        let mean = tokens.mean_dim(1, true, None);
        let tokens = Tensor::cat(&[mean, tokens], 1) + &self.positional_embedding;
        let head_dim = c / self.heads;
        let split = |t: Tensor| {
            let l = t.size()[1];
            t.view([n, l, self.heads, head_dim]).transpose(1, 2)
        };
        let q = split(tokens.narrow(1, 0, 1).apply(&self.q_proj));
        let k = split(tokens.apply(&self.k_proj));
        let v = split(tokens.apply(&self.v_proj));
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.,
            false,
            None,
            false,
        );
        out.transpose(1, 2).reshape([n, c]).apply(&self.c_proj)
    }
}

/// `AvgPool2d(k)` (kernel = stride = k); identity for k = 1.
fn avg_pool(x: &Tensor, k: i64) -> Tensor {
    if k == 1 {
        x.shallow_clone()
    } else {
        x.avg_pool2d([k, k], [k, k], [0, 0], false, true, None)
    }
}

/// Bias-free square conv with "same" padding for odd kernels.
fn conv(p: nn::Path, in_dim: i64, out_dim: i64, kernel: i64, stride: i64) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride,
        padding: kernel / 2,
        bias: false,
        ws_init: nn::init::DEFAULT_KAIMING_NORMAL,
        ..Default::default()
    };
    nn::conv2d(p, in_dim, out_dim, kernel, config)
}

/// Batch norm computed in fp32 (see `norm.rs`).
fn batch_norm(p: nn::Path, dim: i64, weight: f64) -> Fp32BatchNorm {
    let config = nn::BatchNormConfig {
        eps: BATCH_NORM_EPS,
        ws_init: Init::Const(weight),
        bs_init: Init::Const(0.),
        ..Default::default()
    };
    Fp32BatchNorm(nn::batch_norm2d(p, dim, config))
}

//! Normalisation layers that compute in fp32 whatever CLIP's precision, as OpenAI's code does
//! (its `LayerNorm` subclass casts to fp32 and back; `convert_weights` leaves norms in fp32):
//! fp16 statistics over a 768-wide row lose too much.

use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

/// `nn::LayerNorm` run on `x.to(fp32)`, its output cast back to `x`'s kind.
#[derive(Debug)]
pub struct Fp32LayerNorm(pub nn::LayerNorm);

impl Module for Fp32LayerNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        in_fp32(x, |x| x.apply(&self.0))
    }
}

/// `nn::BatchNorm` (ModifiedResNet) run in fp32 the same way.
#[derive(Debug)]
pub struct Fp32BatchNorm(pub nn::BatchNorm);

impl ModuleT for Fp32BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        in_fp32(x, |x| x.apply_t(&self.0, train))
    }
}

fn in_fp32(x: &Tensor, f: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
    match x.kind() {
        Kind::Float => f(x),
        kind => f(&x.to_kind(Kind::Float)).to_kind(kind),
    }
}

/// Whether the variable `name` (OpenAI naming) belongs to a normalisation layer or is the
/// temperature: those stay fp32 when CLIP's weights are cast to a lower precision.
pub fn stays_fp32(name: &str) -> bool {
    name == "logit_scale"
        || name.contains("downsample.1.")
        || name.split('.').any(|part| {
            part.starts_with("ln_")
                || part
                    .strip_prefix("bn")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_names_are_recognised() {
        for name in [
            "logit_scale",
            "ln_final.weight",
            "visual.ln_post.bias",
            "transformer.resblocks.3.ln_2.weight",
            "visual.layer1.0.bn3.running_var",
            "visual.bn1.weight",
            "visual.layer2.0.downsample.1.running_mean",
        ] {
            assert!(stays_fp32(name), "{name}");
        }
        for name in [
            "visual.proj",
            "positional_embedding",
            "transformer.resblocks.0.attn.in_proj_weight",
            "visual.layer2.0.downsample.0.weight",
            "token_embedding.weight",
            "visual.attnpool.k_proj.weight",
        ] {
            assert!(!stays_fp32(name), "{name}");
        }
    }
}

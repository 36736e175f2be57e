//! Freezing the text branch: a trained model's prompts depend on no input, so their features
//! are computed once and folded into the head's constants.
//!
//! Regression: the first layer on `[x; t]` is `W_img·x + (W_txt·t + b)`; the bracket is one
//! bias vector. With [`ImageNorm::Whiten`](agiqa_trainer::model::ImageNorm) the fixed affine
//! map `x ↦ (x − μ)·M` folds in too: `A = M·W_imgᵀ`, `c = W_txt·t + b − μ·A`. Classification
//! and zero-shot: `logit_scale · t` becomes one constant `[E, K]` matrix. Folding runs in f64.

use agiqa_trainer::model::{AgiqaModel, Variant};
use tch::{Kind, Tensor};

use crate::graph::HostTensor;
use crate::ExportError;

/// A head with its text branch folded into constants; input: L2-normalised `[N, E]` features.
#[derive(Clone, Debug)]
pub enum FoldedHead {
    /// `relu(x·A + c)·w + b`.
    Regression {
        /// `A`, `[E, hidden]`.
        image_weight: HostTensor,
        /// `c`, `[hidden]`.
        bias: HostTensor,
        /// `w`, `[hidden, 1]`.
        out_weight: HostTensor,
        /// `b`, `[1]`.
        out_bias: HostTensor,
    },
    /// `softmax(x·T)·centres`.
    Softmax {
        /// `logit_scale · textᵀ`, `[E, K]`.
        text: HostTensor,
        /// Score of each class, `[K, 1]`.
        centres: HostTensor,
    },
}

/// A `[d0, d1, …]` tensor copied to the host as f32.
pub fn host(tensor: &Tensor) -> Result<HostTensor, ExportError> {
    let dims = tensor.size();
    let values = Vec::<f32>::try_from(
        tensor
            .to_device(tch::Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous()
            .view([-1]),
    )
    .map_err(|e| ExportError::Internal(format!("tensor to host: {e}")))?;
    Ok(HostTensor { dims, values })
}

/// Folds `model`'s text branch and head (eval mode: dropout is the identity).
pub fn fold_head(model: &AgiqaModel) -> Result<FoldedHead, ExportError> {
    tch::no_grad(|| {
        let text = model.text_features().to_kind(Kind::Double); // [K, E]
        let (k, e) = (text.size()[0], text.size()[1]);
        match (model.config().variant, model.head()) {
            (Variant::Regression, Some(head)) => {
                let w1 = head.fc1().ws.to_kind(Kind::Double); // [hidden, (K+1)E]
                let b1 = head
                    .fc1()
                    .bs
                    .as_ref()
                    .ok_or_else(|| ExportError::Internal("head.fc1 has no bias".into()))?
                    .to_kind(Kind::Double);
                if w1.size()[1] != (k + 1) * e {
                    return Err(ExportError::Mismatch(format!(
                        "head.fc1.weight is {:?}, but {k} prompts of width {e} need {} inputs",
                        w1.size(),
                        (k + 1) * e
                    )));
                }
                let w_img = w1.narrow(1, 0, e);
                let w_txt = w1.narrow(1, e, k * e);
                let mut bias = w_txt.matmul(&text.reshape([-1])) + b1;
                let mut image_weight = w_img.transpose(0, 1); // [E, hidden]
                if let Some((mean, whitening)) = model.image_norm() {
                    image_weight = whitening.to_kind(Kind::Double).matmul(&image_weight);
                    bias -= mean.to_kind(Kind::Double).matmul(&image_weight);
                }
                let out_weight = head.fc2().ws.to_kind(Kind::Double).transpose(0, 1);
                let out_bias = head
                    .fc2()
                    .bs
                    .as_ref()
                    .ok_or_else(|| ExportError::Internal("head.fc2 has no bias".into()))?
                    .shallow_clone();
                Ok(FoldedHead::Regression {
                    image_weight: host(&image_weight)?,
                    bias: host(&bias)?,
                    out_weight: host(&out_weight)?,
                    out_bias: host(&out_bias)?,
                })
            }
            (Variant::Regression, None) => Err(ExportError::Internal(
                "a regression model without a head".into(),
            )),
            (Variant::Classification | Variant::ZeroShot, _) => {
                let scaled = text.transpose(0, 1) * model.clip().logit_scale();
                let centres: Vec<f64> = match model.config().variant {
                    // The zero-shot softmax is over (good, bad): p(good)·max + p(bad)·min.
                    Variant::ZeroShot => vec![model.config().score_max, model.config().score_min],
                    _ => model.config().bin_centres(),
                };
                let centres = Tensor::from_slice(&centres).view([-1, 1]);
                Ok(FoldedHead::Softmax {
                    text: host(&scaled)?,
                    centres: host(&centres)?,
                })
            }
        }
    })
}

impl FoldedHead {
    /// The folded head's scores for L2-normalised `[N, E]` features, in tch: the reference
    /// the graph's head is tested against, and the proof that folding changes nothing.
    pub fn scores(&self, features: &Tensor) -> Tensor {
        let t = |h: &HostTensor| Tensor::from_slice(&h.values).view(h.dims.as_slice());
        let x = features.to_device(tch::Device::Cpu).to_kind(Kind::Float);
        match self {
            FoldedHead::Regression {
                image_weight,
                bias,
                out_weight,
                out_bias,
            } => {
                (x.matmul(&t(image_weight)) + t(bias))
                    .relu()
                    .matmul(&t(out_weight))
                    .squeeze_dim(-1)
                    + t(out_bias)
            }
            FoldedHead::Softmax { text, centres } => x
                .matmul(&t(text))
                .softmax(-1, Kind::Float)
                .matmul(&t(centres))
                .squeeze_dim(-1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agiqa_trainer::clip::{Clip, ClipConfig};
    use agiqa_trainer::model::{ImageNorm, ModelConfig};
    use agiqa_trainer::tokenizer::ClipTokenizer;
    use tch::Device;

    /// `[n, E]` deterministic unit vectors (no global libtorch RNG).
    fn unit_rows(n: i64, e: i64, seed: u64) -> Tensor {
        let mut rng = agiqa_trainer::synthetic_images::SplitMix64::new(seed);
        let values: Vec<f32> = (0..n * e)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect();
        let x = Tensor::from_slice(&values).view([n, e]);
        &x / x.norm_scalaropt_dim(2, [-1i64].as_slice(), true)
    }

    fn max_diff(model: &AgiqaModel) -> f64 {
        let e = model.clip().config().embed_dim;
        let features = unit_rows(16, e, 5);
        let unfolded = tch::no_grad(|| model.scores(&features, &model.text_features(), false));
        let folded = fold_head(model).unwrap().scores(&features);
        let spread = unfolded.std(true).double_value(&[]);
        assert!(
            spread > 0.0,
            "scores must vary for the comparison to mean anything"
        );
        (unfolded - folded).abs().max().double_value(&[])
    }

    #[test]
    fn folded_heads_score_as_the_unfolded_model() {
        let tokenizer = ClipTokenizer::embedded().unwrap();
        let clip = Clip::random(&ClipConfig::preset("tiny").unwrap(), 3, Device::Cpu);
        for (variant, image_norm) in [
            (Variant::Regression, ImageNorm::None),
            (Variant::Regression, ImageNorm::Whiten),
            (Variant::Classification, ImageNorm::None),
            (Variant::ZeroShot, ImageNorm::None),
        ] {
            let config = ModelConfig {
                variant,
                image_norm,
                ..ModelConfig::default()
            };
            let mut model = AgiqaModel::new(clip.clone_frozen(), &tokenizer, &config).unwrap();
            // A non-trivial whitening: fitted to skewed features, so μ ≠ 0 and M ≠ I.
            model.fit_image_norm(&(unit_rows(400, 256, 9) * 0.3 + 0.05));
            let diff = max_diff(&model);
            assert!(diff < 1e-5, "{variant:?}/{image_norm:?}: max |Δ| {diff}");
        }
    }
}

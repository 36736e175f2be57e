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
                    bias = bias - mean.to_kind(Kind::Double).matmul(&image_weight);
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

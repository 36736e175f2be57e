//! The optimisers, written out (PyTorch semantics) so that their state is checkpointed with the
//! parameters — tch's optimiser cannot save its state, and a resumed run must continue exactly:
//! SGD with momentum and weight decay (dampening 0, no Nesterov, the first step's buffer is the
//! gradient), or AdamW (decoupled weight decay, bias-corrected moments).

use std::collections::BTreeMap;

use tch::{TchError, Tensor};

use crate::config::{OptimizerConfig, OptimizerKind};
use crate::model::AgiqaModel;

/// Prefix of optimiser-state tensors in a `last` checkpoint.
const STATE_PREFIX: &str = "optimizer/";

/// Optimiser state: per-parameter buffers and the step count.
#[derive(Default)]
pub struct Optimizer {
    /// `momentum/<param>` (SGD) or `exp_avg/<param>` and `exp_avg_sq/<param>` (AdamW).
    buffers: BTreeMap<String, Tensor>,
    /// Optimiser steps taken (AdamW's bias correction).
    steps: i64,
}

impl Optimizer {
    /// Back-propagates `loss` and updates the model's trainable parameters at learning rate
    /// `lr`. Any failing tensor operation (a state buffer of the wrong shape, say) is an error
    /// naming the parameter, never a silently skipped update.
    pub fn step(
        &mut self,
        model: &AgiqaModel,
        loss: &Tensor,
        lr: f64,
        optimizer: &OptimizerConfig,
    ) -> Result<(), TchError> {
        let mut vars = model.trainable().variables();
        for v in vars.values_mut() {
            v.zero_grad();
        }
        loss.f_backward()?;
        self.steps += 1;
        let t = self.steps as i32;
        tch::no_grad(|| {
            for (name, param) in &vars {
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                self.update(name, param, &grad, lr, t, optimizer)
                    .map_err(|e| TchError::Kind(format!("optimizer step for {name}: {e}")))?;
            }
            Ok(())
        })
    }

    fn update(
        &mut self,
        name: &str,
        param: &Tensor,
        grad: &Tensor,
        lr: f64,
        t: i32,
        optimizer: &OptimizerConfig,
    ) -> Result<(), TchError> {
        let mut p = param.shallow_clone();
        match optimizer.kind {
            OptimizerKind::Sgd => {
                let d = grad.f_add(&param.f_mul_scalar(optimizer.weight_decay)?)?;
                let key = format!("momentum/{name}");
                let buffer = match self.buffers.remove(&key) {
                    Some(b) => b.f_mul_scalar(optimizer.momentum)?.f_add(&d)?,
                    None => d,
                };
                let _ = p.f_sub_(&buffer.f_mul_scalar(lr)?)?;
                self.buffers.insert(key, buffer);
            }
            OptimizerKind::AdamW => {
                let (b1, b2) = optimizer.betas;
                let _ = p.f_mul_scalar_(1.0 - lr * optimizer.weight_decay)?;
                let m_key = format!("exp_avg/{name}");
                let v_key = format!("exp_avg_sq/{name}");
                let m = match self.buffers.remove(&m_key) {
                    Some(m) => m.f_mul_scalar(b1)?,
                    None => grad.f_zeros_like()?,
                }
                .f_add(&grad.f_mul_scalar(1.0 - b1)?)?;
                let v = match self.buffers.remove(&v_key) {
                    Some(v) => v.f_mul_scalar(b2)?,
                    None => grad.f_zeros_like()?,
                }
                .f_add(&grad.f_square()?.f_mul_scalar(1.0 - b2)?)?;
                let m_hat = m.f_div_scalar(1.0 - b1.powi(t))?;
                let v_hat = v.f_div_scalar(1.0 - b2.powi(t))?;
                let update = m_hat.f_div(&v_hat.f_sqrt()?.f_add_scalar(optimizer.eps)?)?;
                let _ = p.f_sub_(&update.f_mul_scalar(lr)?)?;
                self.buffers.insert(m_key, m);
                self.buffers.insert(v_key, v);
            }
        }
        Ok(())
    }

    /// The state as named tensors (`optimizer/...`), stored beside the parameters.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut all: Vec<(String, Tensor)> = self
            .buffers
            .iter()
            .map(|(name, b)| (format!("{STATE_PREFIX}{name}"), b.shallow_clone()))
            .collect();
        all.push((format!("{STATE_PREFIX}steps"), Tensor::from(self.steps)));
        all
    }

    /// Takes the optimiser state out of checkpoint `tensors` (moved to `device`) and returns the
    /// remaining, parameter, tensors.
    pub fn restore(
        &mut self,
        tensors: &[(String, Tensor)],
        device: tch::Device,
    ) -> Result<Vec<(String, Tensor)>, TchError> {
        let mut parameters = Vec::new();
        for (name, tensor) in tensors {
            match name.strip_prefix(STATE_PREFIX) {
                Some("steps") => self.steps = tensor.f_int64_value(&[])?,
                Some(buffer) => {
                    self.buffers
                        .insert(buffer.to_string(), tensor.f_to_device(device)?);
                }
                None => parameters.push((name.clone(), tensor.shallow_clone())),
            }
        }
        Ok(parameters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::{Clip, ClipConfig};
    use crate::config::OptimizerConfig;
    use crate::model::ModelConfig;
    use crate::tokenizer::ClipTokenizer;
    use tch::{Device, Kind};

    fn model() -> AgiqaModel {
        let clip = Clip::random(&ClipConfig::preset("tiny").unwrap(), 0, Device::Cpu);
        let tokenizer = ClipTokenizer::embedded().unwrap();
        AgiqaModel::new(clip, &tokenizer, &ModelConfig::default()).unwrap()
    }

    fn loss(model: &AgiqaModel) -> Tensor {
        let image = Tensor::randn(
            [4, model.clip().config().embed_dim],
            (Kind::Float, Device::Cpu),
        );
        let image = &image / image.norm_scalaropt_dim(2, [-1], true);
        model
            .loss(&image, &Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]), false)
            .unwrap()
    }

    #[test]
    fn a_bad_state_buffer_is_an_error_naming_the_parameter_not_a_lost_update() {
        let model = model();
        let mut optimizer = Optimizer::default();
        optimizer
            .step(&model, &loss(&model), 0.01, &OptimizerConfig::default())
            .unwrap();
        // Corrupt one momentum buffer, as a mismatched `last` checkpoint would.
        let state = optimizer.state_tensors();
        let (name, _) = state.iter().find(|(n, _)| n.contains("momentum/")).unwrap();
        let mut corrupt: Vec<(String, Tensor)> = state
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        for (n, t) in corrupt.iter_mut() {
            if n == name {
                *t = Tensor::zeros([3, 5, 7], (Kind::Float, Device::Cpu));
            }
        }
        let mut restored = Optimizer::default();
        restored.restore(&corrupt, Device::Cpu).unwrap();
        let err = restored
            .step(&model, &loss(&model), 0.01, &OptimizerConfig::default())
            .unwrap_err()
            .to_string();
        let param = name.trim_start_matches("optimizer/momentum/");
        assert!(err.contains(param), "{err}");
    }

    #[test]
    fn state_round_trips_through_tensors() {
        let model = model();
        let mut optimizer = Optimizer::default();
        let config = OptimizerConfig {
            kind: OptimizerKind::AdamW,
            ..OptimizerConfig::default()
        };
        optimizer
            .step(&model, &loss(&model), 0.01, &config)
            .unwrap();
        optimizer
            .step(&model, &loss(&model), 0.01, &config)
            .unwrap();
        let mut tensors = crate::checkpoint::trainable_tensors(&model);
        let n_params = tensors.len();
        tensors.extend(optimizer.state_tensors());
        let mut restored = Optimizer::default();
        let parameters = restored.restore(&tensors, Device::Cpu).unwrap();
        assert_eq!(parameters.len(), n_params);
        assert_eq!(restored.steps, 2);
        assert_eq!(restored.buffers.len(), optimizer.buffers.len());
    }
}

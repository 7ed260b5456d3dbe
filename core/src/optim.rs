//! Optimisers and learning-rate schedules with PyTorch semantics.
//!
//! [`Adam`] reproduces `torch.optim.Adam` (single-tensor CPU path, no weight decay, no
//! amsgrad) operation for operation, and exposes its state so that checkpoints can carry it
//! and so that data-parallel workers can all apply the same averaged gradient.
//! [`ReduceLrOnPlateau`] reproduces `torch.optim.lr_scheduler.ReduceLROnPlateau` with a
//! relative threshold.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Hyper-parameters of [`Adam`]; the defaults are PyTorch's.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first-moment estimate.
    pub beta1: f64,
    /// Decay of the second-moment estimate.
    pub beta2: f64,
    /// Term added to the denominator for numerical stability.
    pub eps: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl AdamConfig {
    /// The default configuration with another learning rate.
    pub fn with_lr(lr: f64) -> Self {
        Self {
            lr,
            ..Self::default()
        }
    }
}

/// Moment estimates of one parameter.
#[derive(Clone, Debug)]
struct Moments {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Adam over a named set of parameters.
///
/// Parameters are addressed by name (the MONAI `state_dict` name), so that a gradient
/// received over the network, or a state loaded from a checkpoint, is matched explicitly.
#[derive(Debug)]
pub struct Adam {
    config: AdamConfig,
    params: Vec<(String, Var)>,
    moments: HashMap<String, Moments>,
    step: u64,
}

impl Adam {
    /// An optimiser over `params` (name, variable), in a fixed order.
    pub fn new(params: Vec<(String, Var)>, config: AdamConfig) -> Result<Self> {
        if !(config.lr > 0.0 && config.lr.is_finite()) {
            return Err(Error::invalid(
                "lr",
                format!("must be > 0, got {}", config.lr),
            ));
        }
        if !(0.0..1.0).contains(&config.beta1) || !(0.0..1.0).contains(&config.beta2) {
            return Err(Error::invalid(
                "betas",
                format!(
                    "must be in [0, 1), got ({}, {})",
                    config.beta1, config.beta2
                ),
            ));
        }
        Ok(Self {
            config,
            params,
            moments: HashMap::new(),
            step: 0,
        })
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.config.lr
    }

    /// Sets the learning rate (used by schedulers).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// The number of steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The optimiser's hyper-parameters.
    pub fn config(&self) -> AdamConfig {
        self.config
    }

    /// One Adam step with the gradients of a backward pass.
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        let named: HashMap<String, Tensor> = self
            .params
            .iter()
            .filter_map(|(name, var)| grads.get(var).map(|g| (name.clone(), g.clone())))
            .collect();
        self.step_named(&named)
    }

    /// One Adam step with gradients addressed by parameter name. A parameter without a
    /// gradient is left untouched (PyTorch skips parameters whose `.grad` is `None`).
    pub fn step_named(&mut self, grads: &HashMap<String, Tensor>) -> Result<()> {
        for name in grads.keys() {
            if !self.params.iter().any(|(n, _)| n == name) {
                return Err(Error::invalid(
                    "gradient",
                    format!("no parameter named `{name}`"),
                ));
            }
        }
        self.step += 1;
        let AdamConfig {
            lr,
            beta1,
            beta2,
            eps,
        } = self.config;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let step_size = lr / bias_correction1;
        for (name, var) in &self.params {
            let Some(grad) = grads.get(name) else {
                continue;
            };
            let param = var.as_tensor();
            if grad.dims() != param.dims() {
                return Err(Error::ShapeMismatch {
                    op: "adam step",
                    expected: format!("{:?} for `{name}`", param.dims()),
                    got: format!("{:?}", grad.dims()),
                });
            }
            let grad = grad.to_dtype(param.dtype())?;
            let moments = match self.moments.get(name) {
                Some(m) => m.clone(),
                None => Moments {
                    exp_avg: param.zeros_like()?,
                    exp_avg_sq: param.zeros_like()?,
                },
            };
            // exp_avg.lerp_(grad, 1 - beta1)
            let exp_avg = (&moments.exp_avg + ((&grad - &moments.exp_avg)? * (1.0 - beta1))?)?;
            // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value = 1 - beta2)
            let exp_avg_sq = ((&moments.exp_avg_sq * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            // denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps
            let denom = ((exp_avg_sq.sqrt()? / bias_correction2_sqrt)? + eps)?;
            // param.addcdiv_(exp_avg, denom, value = -step_size)
            let update = ((&exp_avg / &denom)? * step_size)?;
            var.set(&(param - update)?)?;
            self.moments.insert(
                name.clone(),
                Moments {
                    exp_avg,
                    exp_avg_sq,
                },
            );
        }
        Ok(())
    }

    /// The optimiser state as named tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`) plus
    /// the step count, for checkpoints.
    pub fn state_tensors(&self) -> (HashMap<String, Tensor>, u64) {
        let mut out = HashMap::new();
        for (name, m) in &self.moments {
            out.insert(format!("exp_avg.{name}"), m.exp_avg.clone());
            out.insert(format!("exp_avg_sq.{name}"), m.exp_avg_sq.clone());
        }
        (out, self.step)
    }

    /// Restores a state produced by [`Adam::state_tensors`]. Every tensor must belong to a
    /// known parameter and have its shape; `source` names the file in errors.
    pub fn load_state_tensors(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        step: u64,
        source: &Path,
    ) -> Result<()> {
        let mut moments = HashMap::new();
        for (name, var) in &self.params {
            let m = tensors.get(&format!("exp_avg.{name}"));
            let v = tensors.get(&format!("exp_avg_sq.{name}"));
            match (m, v) {
                (Some(m), Some(v)) => {
                    for (key, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                        if t.dims() != var.dims() {
                            return Err(Error::Weights {
                                path: source.to_path_buf(),
                                tensor: format!("{key}.{name}"),
                                reason: format!(
                                    "shape {:?}, the parameter has {:?}",
                                    t.dims(),
                                    var.dims()
                                ),
                            });
                        }
                    }
                    let dtype = var.dtype();
                    let device = var.device();
                    moments.insert(
                        name.clone(),
                        Moments {
                            exp_avg: m.to_dtype(dtype)?.to_device(device)?,
                            exp_avg_sq: v.to_dtype(dtype)?.to_device(device)?,
                        },
                    );
                }
                (None, None) => {}
                _ => {
                    return Err(Error::Weights {
                        path: source.to_path_buf(),
                        tensor: name.clone(),
                        reason: "only one of exp_avg / exp_avg_sq is present".into(),
                    })
                }
            }
        }
        let known = moments.len() * 2;
        if known != tensors.len() {
            let unknown = tensors
                .keys()
                .find(|k| {
                    let name = k
                        .strip_prefix("exp_avg_sq.")
                        .or_else(|| k.strip_prefix("exp_avg."));
                    name.is_none_or(|n| !moments.contains_key(n))
                })
                .cloned()
                .unwrap_or_default();
            return Err(Error::Weights {
                path: source.to_path_buf(),
                tensor: unknown,
                reason: "not a state of any parameter of this model".into(),
            });
        }
        self.moments = moments;
        self.step = step;
        Ok(())
    }
}

/// Whether a smaller or a larger monitored value is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlateauMode {
    /// Lower is better (a loss).
    Min,
    /// Higher is better (a Dice score).
    Max,
}

/// `torch.optim.lr_scheduler.ReduceLROnPlateau` with `threshold_mode="rel"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReduceLrOnPlateau {
    /// Direction of improvement.
    pub mode: PlateauMode,
    /// Factor the learning rate is multiplied by on a plateau.
    pub factor: f64,
    /// Epochs without improvement tolerated before reducing.
    pub patience: u32,
    /// Relative improvement needed to count as better.
    pub threshold: f64,
    /// Epochs to wait after a reduction before counting again.
    pub cooldown: u32,
    /// Lower bound of the learning rate.
    pub min_lr: f64,
    /// Minimal change of the learning rate; smaller changes are ignored.
    pub eps: f64,
    best: Option<f64>,
    num_bad_epochs: u32,
    cooldown_counter: u32,
}

impl ReduceLrOnPlateau {
    /// The quickstart's scheduler: factor 0.5, patience 5, PyTorch's other defaults.
    pub fn new(mode: PlateauMode) -> Self {
        Self {
            mode,
            factor: 0.5,
            patience: 5,
            threshold: 1e-4,
            cooldown: 0,
            min_lr: 0.0,
            eps: 1e-8,
            best: None,
            num_bad_epochs: 0,
            cooldown_counter: 0,
        }
    }

    /// The number of consecutive epochs without improvement.
    pub fn num_bad_epochs(&self) -> u32 {
        self.num_bad_epochs
    }

    fn is_better(&self, value: f64, best: f64) -> bool {
        match self.mode {
            PlateauMode::Min => value < best * (1.0 - self.threshold),
            PlateauMode::Max => value > best * (1.0 + self.threshold),
        }
    }

    /// Records an epoch's metric and returns the learning rate to use from now on.
    pub fn step(&mut self, metric: f64, lr: f64) -> f64 {
        match self.best {
            Some(best) if !self.is_better(metric, best) => self.num_bad_epochs += 1,
            _ => {
                self.best = Some(metric);
                self.num_bad_epochs = 0;
            }
        }
        if self.cooldown_counter > 0 {
            self.cooldown_counter -= 1;
            self.num_bad_epochs = 0;
        }
        if self.num_bad_epochs > self.patience {
            self.cooldown_counter = self.cooldown;
            self.num_bad_epochs = 0;
            let new_lr = (lr * self.factor).max(self.min_lr);
            if lr - new_lr > self.eps {
                return new_lr;
            }
        }
        lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Adam on f(x) = sum((x - 3)^2) compared with a scalar re-implementation of PyTorch's
    /// update rule (torch/optim/adam.py, `_single_tensor_adam`).
    #[test]
    fn adam_matches_the_pytorch_update_rule() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0, 0.5], &dev)?)?;
        let mut adam = Adam::new(vec![("x".into(), x.clone())], AdamConfig::with_lr(0.1))?;
        let mut reference = [1.0f64, -2.0, 0.5];
        let (mut m, mut v) = ([0.0f64; 3], [0.0f64; 3]);
        for t in 1..=5 {
            let loss = (x.as_tensor() - 3.0)?.sqr()?.sum_all()?;
            adam.step(&loss.backward()?)?;
            for i in 0..3 {
                let g = 2.0 * (reference[i] - 3.0);
                m[i] += (g - m[i]) * 0.1;
                v[i] = v[i] * 0.999 + g * g * 0.001;
                let denom = v[i].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
                reference[i] -= 0.1 / (1.0 - 0.9f64.powi(t)) * m[i] / denom;
            }
        }
        let got = x.as_tensor().to_vec1::<f64>()?;
        for (g, r) in got.iter().zip(reference) {
            assert!((g - r).abs() < 1e-12, "{g} vs {r}");
        }
        assert_eq!(adam.step_count(), 5);
        Ok(())
    }

    #[test]
    fn adam_state_round_trips_and_rejects_foreign_tensors() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Var::zeros((2, 2), DType::F32, &dev)?;
        let mut adam = Adam::new(vec![("w".into(), x.clone())], AdamConfig::default())?;
        let loss = (x.as_tensor() + 1.0)?.sqr()?.sum_all()?;
        adam.step(&loss.backward()?)?;
        let (state, step) = adam.state_tensors();
        let mut other = Adam::new(vec![("w".into(), x.clone())], AdamConfig::default())?;
        other.load_state_tensors(&state, step, Path::new("opt.safetensors"))?;
        assert_eq!(other.step_count(), 1);

        let mut bad = state.clone();
        bad.insert("exp_avg.nope".into(), Tensor::zeros(2, DType::F32, &dev)?);
        let err = other
            .load_state_tensors(&bad, step, Path::new("opt.safetensors"))
            .unwrap_err();
        assert!(err.to_string().contains("exp_avg.nope"), "{err}");
        Ok(())
    }

    #[test]
    fn adam_rejects_unknown_gradient_names() -> anyhow::Result<()> {
        let x = Var::zeros(2, DType::F32, &Device::Cpu)?;
        let mut adam = Adam::new(vec![("w".into(), x)], AdamConfig::default())?;
        let mut grads = HashMap::new();
        grads.insert("v".to_string(), Tensor::zeros(2, DType::F32, &Device::Cpu)?);
        assert!(adam.step_named(&grads).is_err());
        Ok(())
    }

    /// Sequence checked by hand against PyTorch's ReduceLROnPlateau(mode="min", factor=0.5,
    /// patience=5): the 7th epoch without improvement (num_bad_epochs = 6 > 5) halves the
    /// learning rate, and the counter restarts.
    #[test]
    fn plateau_halves_after_patience_is_exceeded() {
        let mut s = ReduceLrOnPlateau::new(PlateauMode::Min);
        let mut lr = 1e-4;
        lr = s.step(1.0, lr);
        for _ in 0..5 {
            lr = s.step(1.0, lr);
            assert_eq!(lr, 1e-4);
        }
        lr = s.step(1.0, lr);
        assert!((lr - 5e-5).abs() < 1e-15);
        // An improvement resets the count.
        lr = s.step(0.5, lr);
        assert_eq!(s.num_bad_epochs(), 0);
        assert!((lr - 5e-5).abs() < 1e-15);
        let mut up = ReduceLrOnPlateau::new(PlateauMode::Max);
        assert_eq!(up.step(0.5, 1.0), 1.0);
        up.step(0.6, 1.0);
        assert_eq!(up.num_bad_epochs(), 0);
    }
}

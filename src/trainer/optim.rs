//! AdamW (PyTorch's `torch.optim.AdamW`, decoupled weight decay) with state that can be saved and
//! restored exactly, and global-norm gradient clipping (`torch.nn.utils.clip_grad_norm_`).
//! candle's own AdamW keeps its moments private, so a resumed run could not continue exactly.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

/// AdamW hyper-parameters (Hugging Face's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One trainable tensor: its name (the adapter or checkpoint key), the `Var`, whether weight decay applies
/// (Hugging Face exempts biases and norm weights), and its learning rate as a multiple of the schedule's (a
/// parameter group's: LoRA+ gives lora_B `loraplus_lr_ratio`).
pub struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
    pub lr_scale: f64,
}

/// The trainable tensors as the optimizer's parameters, with Hugging Face's weight-decay rule (biases and norm
/// weights exempt) and LLaMA-Factory's LoRA+ groups (`create_loraplus_optimizer`: with `loraplus_lr_ratio`, lora_B and
/// every 1-D parameter — DoRA's magnitudes, biases — learn at learning_rate × the ratio, the rest at learning_rate).
pub fn param_groups(vars: Vec<(String, Var)>, loraplus_lr_ratio: Option<f64>) -> Vec<Param> {
    vars.into_iter()
        .map(|(name, var)| {
            let decay = !(name.ends_with(".bias") || name.contains("norm"));
            let lr_scale = match loraplus_lr_ratio {
                Some(r) if name.contains("lora_B") || var.rank() == 1 => r,
                _ => 1.0,
            };
            Param {
                name,
                var,
                decay,
                lr_scale,
            }
        })
        .collect()
}

struct Moments {
    m: Tensor,
    v: Tensor,
}

/// The optimizer and its state. Moments are kept in f32 whatever the parameter dtype.
pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<Param>,
    moments: Vec<Moments>,
    /// Updates applied so far (PyTorch's `state['step']`, shared by all parameters here).
    step: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("optimizer state {path}: {reason}")]
    State { path: String, reason: String },
}

impl AdamW {
    pub fn new(params: Vec<Param>, config: AdamWConfig) -> Result<Self, OptimError> {
        let moments = params
            .iter()
            .map(|p| {
                let z = Tensor::zeros(p.var.shape(), DType::F32, p.var.device())?;
                Ok(Moments { m: z.clone(), v: z })
            })
            .collect::<Result<Vec<_>, candle_core::Error>>()?;
        Ok(AdamW {
            config,
            params,
            moments,
            step: 0,
        })
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Applies one update with learning rate `lr` from `grads` (parameters without a gradient are
    /// left alone, as PyTorch does for `grad is None`).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<(), OptimError> {
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
        let t = self.step as i32;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2 = 1.0 - beta2.powi(t);
        for (p, mom) in self.params.iter().zip(self.moments.iter_mut()) {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let lr = lr * p.lr_scale;
            let g = g.to_dtype(DType::F32)?;
            mom.m = ((&mom.m * beta1)? + (&g * (1.0 - beta1))?)?;
            mom.v = ((&mom.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let mut w = p.var.as_tensor().to_dtype(DType::F32)?;
            if p.decay && weight_decay != 0.0 {
                w = (w * (1.0 - lr * weight_decay))?;
            }
            // PyTorch: denom = sqrt(v) / sqrt(bc2) + eps; w -= (lr / bc1) * m / denom
            let denom = ((mom.v.sqrt()? / bc2.sqrt())? + eps)?;
            let update = ((&mom.m / denom)? * (lr / bc1))?;
            let w = (w - update)?;
            p.var.set(&w.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }

    /// Saves the moments and step count as safetensors (`<name>.exp_avg`, `<name>.exp_avg_sq`,
    /// `__step__`).
    pub fn save(&self, path: &Path) -> Result<(), OptimError> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (p, mom) in self.params.iter().zip(&self.moments) {
            tensors.insert(format!("{}.exp_avg", p.name), mom.m.clone());
            tensors.insert(format!("{}.exp_avg_sq", p.name), mom.v.clone());
        }
        #[allow(clippy::cast_precision_loss)]
        let step = Tensor::new(&[self.step as f64], &Device::Cpu)?;
        tensors.insert("__step__".into(), step);
        crate::engine::weights::save_safetensors(&tensors, path)?;
        Ok(())
    }

    /// Restores what [`AdamW::save`] wrote; every parameter must be present with its shape.
    pub fn load(&mut self, path: &Path) -> Result<(), OptimError> {
        let err = |reason: String| OptimError::State {
            path: path.display().to_string(),
            reason,
        };
        let device = self
            .params
            .first()
            .map_or(Device::Cpu, |p| p.var.device().clone());
        let mut tensors = candle_core::safetensors::load(path, &device)?;
        let step = tensors
            .remove("__step__")
            .ok_or_else(|| err("no step count".into()))?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let step = step.first().copied().unwrap_or(0.0) as u64;
        for (p, mom) in self.params.iter().zip(self.moments.iter_mut()) {
            for (suffix, slot) in [("exp_avg", &mut mom.m), ("exp_avg_sq", &mut mom.v)] {
                let key = format!("{}.{suffix}", p.name);
                let t = tensors.remove(&key).ok_or_else(|| {
                    err(format!(
                        "missing {key}: the checkpoint belongs to another setup"
                    ))
                })?;
                if t.shape() != p.var.shape() {
                    return Err(err(format!(
                        "{key} has shape {:?}, the parameter {:?}",
                        t.dims(),
                        p.var.dims()
                    )));
                }
                *slot = t.to_dtype(DType::F32)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of the gradients of `params` (before clipping), and the clipped gradients
/// when the norm exceeds `max_norm` (PyTorch: scale by `max_norm / (norm + 1e-6)`). `max_norm <= 0`
/// disables clipping.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    params: &[Param],
    max_norm: f64,
) -> Result<f64, candle_core::Error> {
    // The squares are summed on the device and read back once (one host round trip per step, not per parameter).
    let mut sum_sq: Option<Tensor> = None;
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            let s = g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?;
            sum_sq = Some(match sum_sq {
                None => s,
                Some(acc) => (acc + s)?,
            });
        }
    }
    let norm = match sum_sq {
        Some(t) => t.to_scalar::<f64>()?.sqrt(),
        None => 0.0,
    };
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for p in params {
                if let Some(g) = grads.remove(p.var.as_tensor()) {
                    grads.insert(p.var.as_tensor(), (g * coef)?);
                }
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_nn::Optimizer;

    fn params(seed: u64) -> Vec<Param> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..3)
            .map(|i| {
                let data: Vec<f32> = (0..12).map(|_| rng.random_range(-1.0..1.0)).collect();
                Param {
                    name: format!("p{i}"),
                    var: Var::from_tensor(&Tensor::from_vec(data, (3, 4), &Device::Cpu).unwrap())
                        .unwrap(),
                    decay: true,
                    lr_scale: 1.0,
                }
            })
            .collect()
    }

    fn loss(ps: &[Param]) -> Tensor {
        // A non-trivial smooth loss of every parameter.
        let mut total = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
        for (i, p) in ps.iter().enumerate() {
            let t = p.var.as_tensor();
            let term = ((t * (i as f64 + 1.0))
                .unwrap()
                .sin()
                .unwrap()
                .sqr()
                .unwrap())
            .sum_all()
            .unwrap();
            total = (total + term).unwrap();
        }
        total
    }

    /// Our AdamW against candle-nn's (an independent implementation of the same decoupled
    /// AdamW), 10 steps with weight decay: the parameters must agree.
    #[test]
    fn matches_candle_adamw() {
        let ours_p = params(1);
        let theirs_p = params(1);
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.05,
        };
        let vars: Vec<Var> = theirs_p.iter().map(|p| p.var.clone()).collect();
        let mut theirs = candle_nn::AdamW::new(
            vars,
            candle_nn::ParamsAdamW {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
                weight_decay: 0.05,
            },
        )
        .unwrap();
        let mut ours = AdamW::new(ours_p, cfg).unwrap();
        for _ in 0..10 {
            let g = loss(ours.params()).backward().unwrap();
            ours.step(&g, 1e-2).unwrap();
            let g = loss(&theirs_p).backward().unwrap();
            theirs.step(&g).unwrap();
        }
        assert_eq!(ours.params().len(), theirs_p.len());
        for (a, b) in ours.params().iter().zip(&theirs_p) {
            let diff = (a.var.as_tensor() - b.var.as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-6, "{}: {diff}", a.name);
        }
    }

    /// A parameter's `lr_scale` is its group's learning rate (LoRA+): each parameter of ours moves as candle-nn's
    /// AdamW moves it alone at `lr × lr_scale` (the test loss is a sum of one term per parameter).
    #[test]
    fn lr_scale_gives_each_parameter_its_groups_learning_rate() {
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let scales = [1.0, 16.0, 0.25];
        let mut ours_p = params(3);
        for (p, s) in ours_p.iter_mut().zip(scales) {
            p.lr_scale = s;
        }
        let mut ours = AdamW::new(ours_p, cfg).unwrap();
        let theirs_p = params(3);
        let mut theirs: Vec<candle_nn::AdamW> = theirs_p
            .iter()
            .zip(scales)
            .map(|(p, s)| {
                candle_nn::AdamW::new(
                    vec![p.var.clone()],
                    candle_nn::ParamsAdamW {
                        lr: 1e-2 * s,
                        weight_decay: 0.1,
                        ..candle_nn::ParamsAdamW::default()
                    },
                )
                .unwrap()
            })
            .collect();
        for _ in 0..5 {
            let g = loss(ours.params()).backward().unwrap();
            ours.step(&g, 1e-2).unwrap();
            let g = loss(&theirs_p).backward().unwrap();
            for opt in &mut theirs {
                opt.step(&g).unwrap();
            }
        }
        let start = params(3);
        for ((a, b), s) in ours.params().iter().zip(&theirs_p).zip(&start) {
            let diff =
                crate::engine::testing::max_abs_diff(a.var.as_tensor(), b.var.as_tensor()).unwrap();
            let moved =
                crate::engine::testing::max_abs_diff(a.var.as_tensor(), s.var.as_tensor()).unwrap();
            assert!(
                diff < 1e-6 && moved > 1e-3,
                "{}: {diff} (moved {moved})",
                a.name
            );
        }
    }

    #[test]
    fn save_and_load_resume_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AdamWConfig::default();
        let mut a = AdamW::new(params(2), cfg).unwrap();
        for _ in 0..3 {
            let g = loss(a.params()).backward().unwrap();
            a.step(&g, 1e-2).unwrap();
        }
        let path = dir.path().join("optimizer.safetensors");
        a.save(&path).unwrap();
        // b starts from a's parameters and state.
        let b_params: Vec<Param> = a
            .params()
            .iter()
            .map(|p| Param {
                name: p.name.clone(),
                var: Var::from_tensor(&p.var.as_tensor().copy().unwrap()).unwrap(),
                decay: p.decay,
                lr_scale: p.lr_scale,
            })
            .collect();
        let mut b = AdamW::new(b_params, cfg).unwrap();
        b.load(&path).unwrap();
        assert_eq!(b.steps_done(), 3);
        for _ in 0..2 {
            let g = loss(a.params()).backward().unwrap();
            a.step(&g, 1e-2).unwrap();
            let g = loss(b.params()).backward().unwrap();
            b.step(&g, 1e-2).unwrap();
        }
        let values = |p: &Param| {
            p.var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(a.params().len(), b.params().len());
        for (x, y) in a.params().iter().zip(b.params()) {
            assert_eq!(values(x), values(y), "{}", x.name);
        }
    }

    #[test]
    fn clipping_scales_to_max_norm_and_reports_the_original() {
        let ps = params(3);
        let mut g = loss(&ps).backward().unwrap();
        let norm = clip_grad_norm(&mut g, &ps, 0.0).unwrap();
        assert!(norm > 0.1);
        let clipped = clip_grad_norm(&mut g, &ps, norm / 4.0).unwrap();
        assert!((clipped - norm).abs() < 1e-9);
        let after = clip_grad_norm(&mut g, &ps, 0.0).unwrap();
        assert!(
            (after - norm / 4.0).abs() < 1e-4 * norm,
            "{after} vs {}",
            norm / 4.0
        );
    }
}

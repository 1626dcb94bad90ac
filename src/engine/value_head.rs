//! A reward model's value head: TRL's `ValueHead` as LLaMA-Factory's `stage: rm` trains it. A linear map of the
//! final hidden state (after the last norm) to one score, with dropout 0.1 on its input while training
//! (`summary_dropout_prob`, TRL's default), kept in f32 like every trainable tensor; saved beside the adapter or
//! model as `value_head.safetensors` with the keys `v_head.summary.weight` (1, hidden) and `v_head.summary.bias` (1).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::error::{EngineError, Result};

/// The file LLaMA-Factory writes and reads (`V_HEAD_SAFE_WEIGHTS_NAME`).
pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";
pub const WEIGHT_KEY: &str = "v_head.summary.weight";
pub const BIAS_KEY: &str = "v_head.summary.bias";
/// TRL's `summary_dropout_prob` default.
pub const DROPOUT: f32 = 0.1;

/// The value head's parameters.
pub struct ValueHead {
    pub weight: Var,
    pub bias: Var,
}

impl ValueHead {
    /// A fresh head as `torch.nn.Linear(hidden, 1)` initialises one (TRL sets no init strategy): weight and bias
    /// uniform in ±1/√hidden, drawn from `seed`.
    pub fn new(hidden: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x7648_6561_6400_0001);
        #[allow(clippy::cast_precision_loss)]
        let bound = 1.0 / (hidden as f64).sqrt();
        let mut draw = |n: usize| -> Vec<f32> {
            #[allow(clippy::cast_possible_truncation)]
            (0..n)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect()
        };
        let w = Tensor::from_vec(draw(hidden), (1, hidden), device)?;
        let b = Tensor::from_vec(draw(1), 1, device)?;
        Ok(Self {
            weight: Var::from_tensor(&w)?,
            bias: Var::from_tensor(&b)?,
        })
    }

    /// Reads `value_head.safetensors` of `dir` (an rm run's output or checkpoint), checking the shapes against the
    /// model's `hidden` size.
    pub fn load(dir: &Path, hidden: usize, device: &Device) -> Result<Self> {
        let path = dir.join(VALUE_HEAD_FILE);
        if !path.exists() {
            return Err(EngineError::File {
                path,
                why: "not found: a reward model (stage rm) keeps its value head here".into(),
            });
        }
        let tensors =
            super::weights::load_safetensors(std::slice::from_ref(&path), DType::F32, device)?;
        let get = |key: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors.get(key).ok_or_else(|| EngineError::File {
                path: path.clone(),
                why: format!("has no tensor `{key}`"),
            })?;
            if t.dims() != shape {
                return Err(EngineError::File {
                    path: path.clone(),
                    why: format!(
                        "`{key}` has shape {:?}, the model needs {shape:?} (a value head of another model?)",
                        t.dims()
                    ),
                });
            }
            Ok(t.clone())
        };
        Ok(Self {
            weight: Var::from_tensor(&get(WEIGHT_KEY, &[1, hidden])?)?,
            bias: Var::from_tensor(&get(BIAS_KEY, &[1])?)?,
        })
    }

    /// Writes `value_head.safetensors` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = [
            (WEIGHT_KEY.to_string(), self.weight.as_tensor().clone()),
            (BIAS_KEY.to_string(), self.bias.as_tensor().clone()),
        ]
        .into();
        super::weights::save_safetensors(&tensors, &dir.join(VALUE_HEAD_FILE))
    }

    /// The trainable tensors under their saved names.
    pub fn vars(&self) -> Vec<(String, Var)> {
        vec![
            (WEIGHT_KEY.to_string(), self.weight.clone()),
            (BIAS_KEY.to_string(), self.bias.clone()),
        ]
    }

    /// Scores (n) of hidden states (n, hidden), in f32 (f64 for an f64 model). `dropout_seed`: training, with dropout on the input (the
    /// weights tracked); `None`: inference.
    pub fn forward(&self, hidden: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let (w, b) = match dropout_seed {
            Some(_) => (
                self.weight.as_tensor().clone(),
                self.bias.as_tensor().clone(),
            ),
            None => (
                self.weight.as_detached_tensor(),
                self.bias.as_detached_tensor(),
            ),
        };
        // f32 as TRL casts to the head's dtype; f64 models (the numerical tests) stay in f64.
        let dt = if hidden.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let mut x = hidden.to_dtype(dt)?;
        if let Some(seed) = dropout_seed {
            let mask =
                super::ops::lora_dropout_mask(x.shape(), DROPOUT, seed, "v_head", dt, x.device())?;
            x = (x * mask)?;
        }
        let (w, b) = (w.to_dtype(dt)?, b.to_dtype(dt)?);
        Ok(x.matmul(&w.t()?)?.squeeze(1)?.broadcast_add(&b)?)
    }
}

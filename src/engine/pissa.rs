//! PiSSA (PEFT's `init_lora_weights: "pissa"` / `"pissa_niter_N"`, LLaMA-Factory's `pissa_init`): LoRA's A and B
//! start as the weight's `r` principal singular directions and the frozen base keeps the residual, so the model
//! computes the same function at step 0 but trains the principal part.
//!
//! PEFT's `_pissa_decomposition`, in f32: with `W ≈ U·diag(S)·Vᵀ` (the `r` largest singular values),
//! `A = diag(√(S/s))·Vᵀ`, `B = U·diag(√(S/s))`, base ← `W − s·B·A` (s the LoRA scale). The SVD is exact
//! (`pissa_iter: -1`, PEFT's `"pissa"`) or torch's `svd_lowrank(W, r, niter)` (Halko et al.'s randomized range
//! finder with `niter` subspace iterations, PEFT's `"pissa_niter_N"`), seeded per module so that loading the
//! adapter again rebuilds exactly the residual it was trained on (torch draws from its global generator, so PEFT
//! rebuilds one equal only up to the approximation).
//!
//! PEFT's loading re-runs the decomposition on the original base (the adapter holds only A and B), which is why
//! [`super::adapter`] calls [`decompose`] again for an adapter whose config says PiSSA.

use candle_core::{DType, Device, Tensor};
use faer::Mat;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::Value;

use super::error::{EngineError, Result};

/// How a new LoRA's A and B start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// PEFT's default (`init_lora_weights: true`): A kaiming-uniform, B zero; the base is untouched.
    #[default]
    Default,
    /// PiSSA: `niter` subspace iterations of the randomized SVD, or `None` for the exact SVD.
    Pissa { niter: Option<usize> },
}

impl LoraInit {
    /// LLaMA-Factory's `pissa_init` / `pissa_iter` (-1: the exact SVD).
    pub fn from_preset(pissa_init: bool, pissa_iter: i64) -> Self {
        if !pissa_init {
            Self::Default
        } else {
            Self::Pissa {
                niter: usize::try_from(pissa_iter).ok(),
            }
        }
    }

    /// The `init_lora_weights` value PEFT writes for it.
    pub fn peft_value(self) -> Value {
        match self {
            Self::Default => Value::Bool(true),
            Self::Pissa { niter: None } => Value::String("pissa".into()),
            Self::Pissa { niter: Some(n) } => Value::String(format!("pissa_niter_{n}")),
        }
    }

    /// What an adapter's `init_lora_weights` means for loading it: the initialisations that only set A and B are
    /// [`LoraInit::Default`] (the file holds them); PiSSA's changes the base; the others that change the base
    /// weights are refused, with the fix.
    pub fn from_peft(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Bool(_) | Value::Null => Ok(Self::Default),
            Value::String(s) => {
                let lower = s.to_ascii_lowercase();
                if lower == "pissa" {
                    return Ok(Self::Pissa { niter: None });
                }
                if let Some(n) = lower.strip_prefix("pissa_niter_") {
                    // PEFT parses the count with `int()`; a negative one runs no iterations.
                    return n
                        .parse::<i64>()
                        .map(|n| Self::Pissa {
                            niter: Some(usize::try_from(n).unwrap_or(0)),
                        })
                        .map_err(|_| {
                            format!("`init_lora_weights: {s:?}` is not pissa_niter_<number>")
                        });
                }
                match lower.as_str() {
                    "gaussian" | "eva" | "orthogonal" | "mica" => Ok(Self::Default),
                    _ => Err(format!(
                        "`init_lora_weights: {s:?}` changes the base model's weights when the adapter is loaded, which termtune reproduces only for PiSSA; convert the adapter to a plain LoRA with PEFT (`save_pretrained(..., path_initial_model_for_weight_conversion=...)`) and load that"
                    )),
                }
            }
            other => Err(format!(
                "`init_lora_weights: {other}` is not a PEFT initialisation"
            )),
        }
    }
}

/// PiSSA's starting point for one weight: `a` (r, in) and `b` (out, r) in f32, and the residual base weight
/// (out, in) in f32, all on the weight's device.
pub struct Decomposition {
    pub a: Tensor,
    pub b: Tensor,
    pub residual: Tensor,
}

/// The seed of a module's randomized SVD: fixed by its name (FNV-1a), so training and every later load draw the
/// same sketch.
pub fn module_seed(module: &str) -> u64 {
    module.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// PEFT's `_pissa_decomposition` of `weight` (out, in; any float dtype and device) for rank `r` and LoRA scale
/// `scale`: see the module doc. `niter`: the randomized SVD's subspace iterations ([`LoraInit::Pissa`]), or `None`
/// for the exact SVD. `module` names the weight in errors and seeds the randomized SVD.
pub fn decompose(
    weight: &Tensor,
    r: usize,
    scale: f64,
    niter: Option<usize>,
    module: &str,
) -> Result<Decomposition> {
    let (m, n) = weight.dims2()?;
    if r == 0 || r > m.min(n) {
        return Err(EngineError::Invalid(format!(
            "PiSSA needs the LoRA rank ({r}) between 1 and the smaller side of `{module}`'s [{m}, {n}] weight; lower lora_rank"
        )));
    }
    let device = weight.device().clone();
    let w32 = weight.to_dtype(DType::F32)?;
    let host: Vec<f32> = w32.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
    let w = Mat::<f32>::from_fn(m, n, |i, j| host[i * n + j]);
    // u: (m, r) left vectors, s: r values, v: (n, r) right vectors.
    let (u, s, v) = match niter {
        None => {
            let svd = w.thin_svd().map_err(|e| {
                EngineError::Invalid(format!("the SVD of `{module}` did not converge: {e:?}"))
            })?;
            let s: Vec<f32> = (0..r).map(|i| svd.S().column_vector()[i]).collect();
            (
                svd.U().subcols(0, r).to_owned(),
                s,
                svd.V().subcols(0, r).to_owned(),
            )
        }
        Some(niter) => svd_lowrank(&w, r, niter, module_seed(module), module)?,
    };
    // PEFT: Sr /= scaling; A = diag(√Sr)·Vᵀ; B = U·diag(√Sr).
    let root: Vec<f32> = s.iter().map(|x| (x / scale as f32).sqrt()).collect();
    let a: Vec<f32> = (0..r)
        .flat_map(|k| (0..n).map(move |j| (k, j)))
        .map(|(k, j)| root[k] * v[(j, k)])
        .collect();
    let b: Vec<f32> = (0..m)
        .flat_map(|i| (0..r).map(move |k| (i, k)))
        .map(|(i, k)| u[(i, k)] * root[k])
        .collect();
    let a = Tensor::from_vec(a, (r, n), &device)?;
    let b = Tensor::from_vec(b, (m, r), &device)?;
    let residual = (w32 - (b.matmul(&a)? * scale)?)?;
    Ok(Decomposition { a, b, residual })
}

/// torch's `svd_lowrank(w, q, niter)` (`torch/_lowrank.py`): the range of `w` (transposed first when it is wide)
/// sketched with a Gaussian `(n, q)` matrix, refined by `niter` subspace iterations with a QR after every
/// product, then the exact SVD of the `(q, n)` projection. Returns `(U, S, V)` with `w ≈ U·diag(S)·Vᵀ`.
fn svd_lowrank(
    w: &Mat<f32>,
    q: usize,
    niter: usize,
    seed: u64,
    module: &str,
) -> Result<(Mat<f32>, Vec<f32>, Mat<f32>)> {
    let wide = w.nrows() < w.ncols();
    let a = if wide {
        w.transpose().to_owned()
    } else {
        w.clone()
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let sketch = Mat::<f32>::from_fn(a.ncols(), q, |_, _| StandardNormal.sample(&mut rng));
    let mut basis = (&a * &sketch).qr().compute_thin_Q();
    for _ in 0..niter {
        basis = (a.transpose() * &basis).qr().compute_thin_Q();
        basis = (&a * &basis).qr().compute_thin_Q();
    }
    let projected = basis.transpose() * &a;
    let svd = projected.thin_svd().map_err(|e| {
        EngineError::Invalid(format!("the SVD of `{module}` did not converge: {e:?}"))
    })?;
    let s: Vec<f32> = (0..q).map(|i| svd.S().column_vector()[i]).collect();
    let u = &basis * svd.U();
    let v = svd.V().to_owned();
    Ok(if wide { (v, s, u) } else { (u, s, v) })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn matrix(m: usize, n: usize, f: impl Fn(usize, usize) -> f32) -> Tensor {
        let data: Vec<f32> = (0..m * n).map(|k| f(k / n, k % n)).collect();
        Tensor::from_vec(data, (m, n), &Device::Cpu).unwrap()
    }

    /// Σ_k 4^-k·f_k(i)·g_k(j): each direction a quarter of the one before (`scripts/pissa_reference.py` builds
    /// the same matrix).
    fn decaying(m: usize, n: usize) -> Tensor {
        matrix(m, n, |i, j| {
            (0..6)
                .map(|k| {
                    let (i, j, k) = (i as f64, j as f64, k as f64);
                    0.25f64.powf(k) * ((k + 1.0) * (i + 0.5)).cos() * ((k + 1.3) * (j + 0.7)).sin()
                })
                .sum::<f64>() as f32
        })
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    #[test]
    fn peft_values_round_trip() {
        for init in [
            LoraInit::Default,
            LoraInit::Pissa { niter: None },
            LoraInit::Pissa { niter: Some(16) },
        ] {
            assert_eq!(LoraInit::from_peft(&init.peft_value()).unwrap(), init);
        }
        assert_eq!(
            LoraInit::from_preset(true, -1),
            LoraInit::Pissa { niter: None }
        );
        assert_eq!(LoraInit::from_preset(false, 16), LoraInit::Default);
        assert_eq!(
            LoraInit::from_peft(&Value::String("gaussian".into())).unwrap(),
            LoraInit::Default
        );
        let err = LoraInit::from_peft(&Value::String("olora".into())).unwrap_err();
        assert!(err.contains("olora") && err.contains("path_initial_model_for_weight_conversion"));
    }

    /// PEFT 0.22's `_pissa_decomposition(w, 3, 2.0, "pissa")` of the same matrices (`python
    /// scripts/pissa_reference.py`): B·A's first row and the residual's second, tall and wide.
    #[test]
    fn exact_decomposition_matches_peft() {
        /// (shape, B·A's first row, the residual's second row).
        type Golden<'a> = ((usize, usize), &'a [f32], &'a [f32]);
        let goldens: [Golden; 2] = [
            (
                (24, 10),
                &[
                    0.4188918, 0.3022726, -0.1615055, -0.3839114, -0.1437596, 0.4331472, 0.308442,
                    -0.3055151, -0.3560171, -0.0003953,
                ],
                &[
                    0.0128243, 0.0053862, -0.0067209, 0.0027395, 0.006312, -0.0035155, -0.0046155,
                    0.0073978, 0.002592, -0.0072162,
                ],
            ),
            (
                (10, 24),
                &[
                    0.4160421, 0.3026092, -0.1612903, -0.383801, -0.1424732, 0.431956, 0.3078699,
                    -0.3040677, -0.3560958, -0.0003039, 0.3911103, 0.2780915, -0.371004,
                    -0.3699968, 0.1561327, 0.3740128, 0.1629803, -0.3627397, -0.3787239, 0.2695157,
                    0.3951474, 0.0065572, -0.3524085, -0.3103477,
                ],
                &[
                    0.003614, 0.0100453, -0.0081517, 5.92e-05, 0.0125341, -0.0077424, -0.0068748,
                    0.0134346, -0.0008592, -0.0080125, 0.0104302, 0.0026131, -0.0138361, 0.0116723,
                    0.005523, -0.0119758, 0.0062199, 0.0110068, -0.0141859, 0.0036076, 0.0100778,
                    -0.0085302, -7.77e-05, 0.0133272,
                ],
            ),
        ];
        for ((m, n), ba_row, residual_row) in goldens {
            let d = decompose(&decaying(m, n), 3, 2.0, None, "m").unwrap();
            let ba: Vec<f32> = d.b.matmul(&d.a).unwrap().get(0).unwrap().to_vec1().unwrap();
            let res: Vec<f32> = d.residual.get(1).unwrap().to_vec1().unwrap();
            for (got, want) in ba.iter().zip(ba_row).chain(res.iter().zip(residual_row)) {
                assert!(
                    (got - want).abs() < 2e-6,
                    "({m}, {n}): {got} vs PEFT {want}"
                );
            }
        }
    }

    /// The residual plus s·B·A gives the weight back, and B·A is the best rank-r part: the randomized SVD
    /// (16 iterations, a matrix whose spectrum decays) finds the exact one's, tall and wide alike.
    #[test]
    fn decomposition_keeps_the_function_and_finds_the_principal_part() {
        for (m, n) in [(24, 10), (10, 24)] {
            let w = decaying(m, n);
            let exact = decompose(&w, 3, 2.0, None, "m").unwrap();
            let fast = decompose(&w, 3, 2.0, Some(16), "m").unwrap();
            for d in [&exact, &fast] {
                let back = (&d.residual + (d.b.matmul(&d.a).unwrap() * 2.0).unwrap()).unwrap();
                assert!(max_abs(&(back - &w).unwrap()) < 1e-5);
                assert_eq!(d.a.dims(), [3, n]);
                assert_eq!(d.b.dims(), [m, 3]);
            }
            let gap =
                (exact.b.matmul(&exact.a).unwrap() - fast.b.matmul(&fast.a).unwrap()).unwrap();
            assert!(
                max_abs(&gap) < 1e-4,
                "randomized vs exact: {}",
                max_abs(&gap)
            );
            // A's rows are orthogonal (scaled right singular vectors).
            let gram = exact.a.matmul(&exact.a.t().unwrap()).unwrap();
            let off = (gram.clone()
                - Tensor::eye(3, DType::F32, &Device::Cpu)
                    .unwrap()
                    .mul(&gram)
                    .unwrap())
            .unwrap();
            assert!(max_abs(&off) < 1e-4);
        }
        let w = matrix(4, 6, |i, j| (i + j) as f32);
        let err = decompose(&w, 5, 1.0, None, "x.q_proj")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("x.q_proj") && err.contains("lora_rank"),
            "{err}"
        );
    }
}

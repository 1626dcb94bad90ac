//! Learning-rate schedules with Hugging Face's formulas (`transformers.optimization`), and the step
//! arithmetic of its Trainer (total steps, warm-up steps).
//!
//! Hugging Face wraps each schedule in a `LambdaLR`: after `s` calls of `scheduler.step()` the rate is
//! `learning_rate * lambda(s)`. The k-th optimizer update (1-based) therefore uses `lambda(k - 1)`,
//! and the `lr` the Trainer logs after update k is `lambda(k)`. [`Schedule::lr_at`] is that `lambda`
//! times the peak rate, as a pure function of `s`.

use std::f64::consts::PI;

use crate::config::{Preset, SchedulerArg, SchedulerType};

/// A resolved schedule: everything `lr_at` needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub kind: SchedulerType,
    pub peak_lr: f64,
    pub total_steps: u64,
    pub warmup_steps: u64,
    /// cosine: 0.5 (half a wave); cosine_with_restarts: 1 (one hard restart).
    pub num_cycles: f64,
    /// polynomial only.
    pub power: f64,
    /// polynomial only: the rate reached at the end.
    pub lr_end: f64,
    /// cosine_with_min_lr (`min_lr_rate`, or `min_lr` / `learning_rate`) and warmup_stable_decay
    /// (`min_lr_ratio`): the floor as a fraction of the peak.
    pub min_lr_rate: f64,
    /// inverse_sqrt: `timescale` (default: the warm-up steps, or 10 000 without warm-up).
    pub timescale: f64,
    /// warmup_stable_decay: `num_stable_steps` (default: total − warm-up − decay) and `num_decay_steps`.
    pub stable_steps: u64,
    pub decay_steps: u64,
    /// warmup_stable_decay: `warmup_type` (linear) and `decay_type` (cosine).
    pub warmup_curve: Curve,
    pub decay_curve: Curve,
}

/// The shape of warmup_stable_decay's warm-up and decay (`linear`, `cosine`, `1-sqrt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curve {
    Linear,
    Cosine,
    OneMinusSqrt,
}

impl Curve {
    pub fn parse(s: &str) -> Option<Curve> {
        Some(match s {
            "linear" => Curve::Linear,
            "cosine" => Curve::Cosine,
            "1-sqrt" => Curve::OneMinusSqrt,
            _ => return None,
        })
    }
}

/// Hugging Face's `get_warmup_steps`: `warmup_steps` if > 0, else `ceil(total * warmup_ratio)`.
pub fn warmup_steps(total_steps: u64, warmup_steps: u64, warmup_ratio: f64) -> u64 {
    if warmup_steps > 0 {
        warmup_steps
    } else {
        // total_steps is far below 2^52, so the f64 round trip is exact.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let w = (total_steps as f64 * warmup_ratio).ceil() as u64;
        w
    }
}

/// Optimizer steps of a run, as Hugging Face's Trainer counts them: `max_steps` when > 0, else
/// `ceil(epochs * updates_per_epoch)` with `updates_per_epoch = ceil(batches / accumulation)` and
/// `batches = ceil(examples / batch_size)` (the last, partial accumulation still makes an update).
pub fn total_steps(
    num_examples: usize,
    batch_size: usize,
    grad_accum: usize,
    num_train_epochs: f64,
    max_steps: i64,
) -> u64 {
    if max_steps > 0 {
        return max_steps.unsigned_abs();
    }
    let per_epoch = updates_per_epoch(num_examples, batch_size, grad_accum);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let steps = (num_train_epochs * per_epoch as f64).ceil() as u64;
    steps.max(1)
}

/// Optimizer updates in one pass over `num_examples`.
pub fn updates_per_epoch(num_examples: usize, batch_size: usize, grad_accum: usize) -> u64 {
    let batches = num_examples.div_ceil(batch_size.max(1));
    (batches.div_ceil(grad_accum.max(1)) as u64).max(1)
}

impl Schedule {
    /// The schedule of a preset for a run of `total_steps` updates.
    pub fn from_preset(p: &Preset, total_steps: u64) -> Schedule {
        let kw = |k: &str| p.lr_scheduler_kwargs.get(k).and_then(SchedulerArg::number);
        let curve = |k: &str, default: Curve| match p.lr_scheduler_kwargs.get(k) {
            Some(SchedulerArg::Text(t)) => Curve::parse(t).unwrap_or(default),
            _ => default,
        };
        let num_cycles = kw("num_cycles").unwrap_or(match p.lr_scheduler_type {
            SchedulerType::CosineWithRestarts => 1.0,
            _ => 0.5,
        });
        let warmup = warmup_steps(total_steps, p.warmup_steps, p.warmup_ratio);
        // Validation makes these whole numbers ≥ 0.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let steps = |k: &str| kw(k).map(|v| v as u64);
        let decay_steps = steps("num_decay_steps").unwrap_or(0);
        let min_lr_rate = match p.lr_scheduler_type {
            SchedulerType::WarmupStableDecay => kw("min_lr_ratio").unwrap_or(0.0),
            _ => kw("min_lr_rate")
                .or_else(|| kw("min_lr").map(|m| m / p.learning_rate))
                .unwrap_or(0.0),
        };
        #[allow(clippy::cast_precision_loss)]
        let timescale =
            kw("timescale").unwrap_or(if warmup > 0 { warmup as f64 } else { 10_000.0 });
        Schedule {
            kind: p.lr_scheduler_type,
            peak_lr: p.learning_rate,
            total_steps,
            warmup_steps: warmup,
            num_cycles,
            power: kw("power").unwrap_or(1.0),
            lr_end: kw("lr_end").unwrap_or(1e-7),
            min_lr_rate,
            timescale,
            stable_steps: steps("num_stable_steps").unwrap_or_else(|| {
                total_steps
                    .saturating_sub(warmup)
                    .saturating_sub(decay_steps)
            }),
            decay_steps,
            warmup_curve: curve("warmup_type", Curve::Linear),
            decay_curve: curve("decay_type", Curve::Cosine),
        }
    }

    /// The learning rate after `s` scheduler steps (used by update `s + 1`).
    #[allow(clippy::cast_precision_loss)]
    pub fn lr_at(&self, s: u64) -> f64 {
        let step = s as f64;
        let warm = self.warmup_steps as f64;
        let total = self.total_steps as f64;
        let in_warmup = s < self.warmup_steps;
        let warmup_factor = step / warm.max(1.0);
        let progress = (step - warm) / (total - warm).max(1.0);
        let factor = match self.kind {
            SchedulerType::Constant => 1.0,
            SchedulerType::ConstantWithWarmup => {
                if in_warmup {
                    warmup_factor
                } else {
                    1.0
                }
            }
            SchedulerType::Cosine => {
                if in_warmup {
                    warmup_factor
                } else {
                    (0.5 * (1.0 + (PI * self.num_cycles * 2.0 * progress).cos())).max(0.0)
                }
            }
            SchedulerType::CosineWithMinLr => {
                if in_warmup {
                    warmup_factor
                } else {
                    let f = 0.5 * (1.0 + (PI * self.num_cycles * 2.0 * progress).cos());
                    (f * (1.0 - self.min_lr_rate) + self.min_lr_rate).max(0.0)
                }
            }
            SchedulerType::InverseSqrt => {
                if in_warmup {
                    warmup_factor
                } else {
                    let shift = self.timescale - warm;
                    1.0 / ((step + shift) / self.timescale).sqrt()
                }
            }
            SchedulerType::WarmupStableDecay => self.wsd(s),
            SchedulerType::CosineWithRestarts => {
                if in_warmup {
                    warmup_factor
                } else if progress >= 1.0 {
                    0.0
                } else {
                    (0.5 * (1.0 + (PI * ((self.num_cycles * progress) % 1.0)).cos())).max(0.0)
                }
            }
            SchedulerType::Polynomial => {
                let lr_init = self.peak_lr;
                if in_warmup {
                    warmup_factor
                } else if step > total {
                    self.lr_end / lr_init
                } else {
                    let decay_steps = total - warm;
                    let pct_remaining = 1.0 - (step - warm) / decay_steps.max(1.0);
                    ((lr_init - self.lr_end) * pct_remaining.powf(self.power) + self.lr_end)
                        / lr_init
                }
            }
            // Linear, and the schedules validation refuses (never reached for a valid preset).
            _ => {
                if in_warmup {
                    warmup_factor
                } else {
                    ((total - step) / (total - warm).max(1.0)).max(0.0)
                }
            }
        };
        self.peak_lr * factor
    }

    /// transformers' `_get_wsd_scheduler_lambda`.
    #[allow(clippy::cast_precision_loss)]
    fn wsd(&self, s: u64) -> f64 {
        let floor = self.min_lr_rate;
        let scaled = |f: f64| (f * (1.0 - floor) + floor).max(0.0);
        if s < self.warmup_steps {
            let p = s as f64 / (self.warmup_steps as f64).max(1.0);
            return scaled(match self.warmup_curve {
                Curve::Linear => p,
                Curve::Cosine => 0.5 * (1.0 - (PI * p).cos()),
                Curve::OneMinusSqrt => 1.0 - (1.0 - p).sqrt(),
            });
        }
        if s < self.warmup_steps + self.stable_steps {
            return 1.0;
        }
        if s < self.warmup_steps + self.stable_steps + self.decay_steps {
            let p = (s - self.warmup_steps - self.stable_steps) as f64
                / (self.decay_steps as f64).max(1.0);
            return scaled(match self.decay_curve {
                Curve::Linear => 1.0 - p,
                Curve::Cosine => 0.5 * (1.0 + (PI * self.num_cycles * 2.0 * p).cos()),
                Curve::OneMinusSqrt => 1.0 - p.sqrt(),
            });
        }
        floor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: SchedulerType, total: u64, warmup: u64) -> Schedule {
        Schedule {
            kind,
            peak_lr: 1e-3,
            total_steps: total,
            warmup_steps: warmup,
            num_cycles: if kind == SchedulerType::CosineWithRestarts {
                1.0
            } else {
                0.5
            },
            power: 1.0,
            lr_end: 1e-7,
            min_lr_rate: 0.0,
            timescale: 10.0,
            stable_steps: 0,
            decay_steps: 0,
            warmup_curve: Curve::Linear,
            decay_curve: Curve::Cosine,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 + 1e-9 * b.abs()
    }

    // Expected values are Hugging Face's lambdas evaluated by hand:
    // warm-up s/w; linear (T-s)/(T-w); cosine 0.5(1+cos(pi*p)); p = (s-w)/(T-w).
    #[test]
    fn warmup_starts_at_zero_and_peaks_at_the_end_of_warmup() {
        for kind in [
            SchedulerType::Linear,
            SchedulerType::Cosine,
            SchedulerType::CosineWithRestarts,
            SchedulerType::Polynomial,
            SchedulerType::ConstantWithWarmup,
        ] {
            let s = sched(kind, 100, 10);
            assert_eq!(s.lr_at(0), 0.0, "{kind:?}");
            assert!(close(s.lr_at(5), 0.5e-3), "{kind:?} {}", s.lr_at(5));
            assert!(close(s.lr_at(10), 1e-3), "{kind:?} {}", s.lr_at(10));
        }
    }

    #[test]
    fn linear_decays_to_zero() {
        let s = sched(SchedulerType::Linear, 100, 10);
        assert!(close(s.lr_at(55), 1e-3 * 45.0 / 90.0));
        assert_eq!(s.lr_at(100), 0.0);
        assert_eq!(s.lr_at(120), 0.0);
    }

    #[test]
    fn cosine_is_half_at_the_middle_and_zero_at_the_end() {
        let s = sched(SchedulerType::Cosine, 110, 10);
        assert!(close(s.lr_at(60), 0.5e-3));
        assert!(s.lr_at(110) < 1e-18);
        let q = s.lr_at(35); // progress 0.25
        assert!(close(q, 1e-3 * 0.5 * (1.0 + (PI * 0.25).cos())));
    }

    #[test]
    fn cosine_with_restarts_restarts() {
        let mut s = sched(SchedulerType::CosineWithRestarts, 100, 0);
        s.num_cycles = 2.0;
        // progress 0.5 with 2 cycles is the start of the second wave: back at the peak.
        assert!(close(s.lr_at(50), 1e-3));
        assert!(close(s.lr_at(25), 0.5e-3));
        assert_eq!(s.lr_at(100), 0.0);
    }

    #[test]
    fn polynomial_reaches_lr_end() {
        let s = sched(SchedulerType::Polynomial, 100, 0);
        assert!(close(s.lr_at(100), 1e-7));
        assert!(close(s.lr_at(50), (1e-3 - 1e-7) * 0.5 + 1e-7));
        assert!(close(s.lr_at(150), 1e-7));
    }

    #[test]
    fn constant_ignores_warmup() {
        let s = sched(SchedulerType::Constant, 100, 10);
        assert_eq!(s.lr_at(0), 1e-3);
        assert_eq!(s.lr_at(99), 1e-3);
    }

    /// transformers' `get_scheduler` (tests/fixtures/lr_schedule_reference.json, from
    /// scripts/lr_schedule_reference.py): the rate after each scheduler step, for the newer schedules.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn matches_transformers() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/lr_schedule_reference.json"
        );
        let fixture: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 7);
        for case in cases {
            let p = Preset {
                lr_scheduler_type: serde_json::from_value(case["lr_scheduler_type"].clone())
                    .unwrap(),
                lr_scheduler_kwargs: serde_json::from_value(case["lr_scheduler_kwargs"].clone())
                    .unwrap(),
                learning_rate: fixture["peak_lr"].as_f64().unwrap(),
                warmup_steps: fixture["warmup_steps"].as_u64().unwrap(),
                ..Preset::default()
            };
            let issues = crate::config::validate(&p, crate::config::Purpose::Train);
            assert!(
                issues.iter().all(|i| !i.key.starts_with("lr_scheduler")),
                "{issues:?}"
            );
            let s = Schedule::from_preset(&p, fixture["total_steps"].as_u64().unwrap());
            for (step, w) in case["lr"].as_array().unwrap().iter().enumerate() {
                let w = w.as_f64().unwrap();
                let got = s.lr_at(step as u64);
                assert!(
                    (got - w).abs() <= 1e-15 + 1e-12 * w.abs(),
                    "{case}: step {step}: {got} vs {w}"
                );
            }
        }
    }

    #[test]
    fn step_arithmetic_matches_the_trainer() {
        // 1000 examples, batch 4 -> 250 batches; accumulation 8 -> 31 full updates + 1 partial = 32.
        assert_eq!(updates_per_epoch(1000, 4, 8), 32);
        assert_eq!(total_steps(1000, 4, 8, 3.0, -1), 96);
        assert_eq!(total_steps(1000, 4, 8, 0.5, -1), 16);
        assert_eq!(total_steps(1000, 4, 8, 3.0, 7), 7);
        assert_eq!(total_steps(3, 8, 1, 1.0, -1), 1);
        assert_eq!(warmup_steps(96, 0, 0.1), 10); // ceil(9.6)
        assert_eq!(warmup_steps(96, 5, 0.1), 5);
    }
}

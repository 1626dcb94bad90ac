//! The GPU's code path. Two halves:
//!
//! - On the CPU (always, also in CI): the generic kernels that CUDA runs (`ops::generic`, chosen by
//!   `ops::Backend`) against the fused CPU kernels, and the whole training path forced onto them
//!   (`Backend::generic_only`) against finite differences in f64 and against the fused path in f32.
//! - On a CUDA device (when one is present; otherwise each test prints "no CUDA device: skipped"): every kernel,
//!   the loss, logits and every LoRA gradient against the CPU in f32 (1e-4 relative) and bf16, finite differences
//!   in f64, a 20-step LoRA run (and a PiSSA one; a Muon one to 2 %) against the CPU run (1 % per step), greedy generation against the CPU (and with a prompt cache against a fresh one), a 4-bit
//!   (QLoRA) run and a GGUF base kept in each block type against the CPU, and dpo, orpo, kto and rm runs against
//!   the CPU runs.
//!   Run them on a GPU machine with a CUDA build: `scripts/build-cuda.sh test --release --test integration gpu::`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use termtune::config::{self, Purpose};
use termtune::engine::device::{DeviceSpec, cuda_device_count, select};
use termtune::engine::model::{Kernels, Weight};
use termtune::engine::ops::{self, Backend};
use termtune::engine::testing::{TinyOpts, tiny_llama};
use termtune::engine::weights::load_hf_folder;
use termtune::engine::{ArchKind, AttnMask, Finetune, LoraSpec, LoraTargets, Model};
use termtune::trainer::protocol::TrainEvent;
use termtune::trainer::run::run_training;

use crate::tiny_util::{tiny_model_and_toy_data, varied_rows};

const CPU: Device = Device::Cpu;

/// The first CUDA device, or `None` after saying the test is skipped.
fn cuda() -> Option<Device> {
    if cuda_device_count() == 0 {
        eprintln!("no CUDA device: skipped");
        return None;
    }
    Some(select(DeviceSpec::Cuda(0)).expect("a visible CUDA device starts"))
}

fn seeded(shape: &[usize], seed: u64, dtype: DType, device: &Device) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, shape, device)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_device(&CPU)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest difference relative to the larger magnitude of `b` (so tiny entries do not dominate).
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (to_f64(a), to_f64(b));
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-12f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// A causal mask with some keys hidden (−1e9), per batch row.
fn bias(b: usize, t: usize, device: &Device) -> Tensor {
    let mut v = vec![0f32; b * t * t];
    for bi in 0..b {
        for q in 0..t {
            for k in 0..t {
                if k > q || (bi == 1 && k == 0 && q > 0) {
                    v[(bi * t + q) * t + k] = -1e9;
                }
            }
        }
    }
    Tensor::from_vec(v, (b, 1, t, t), device).unwrap()
}

/// Every kernel of the training path, forward and backward pieces, on `dev` (generic kernels when `generic`)
/// against the fused CPU kernels; returns the largest relative difference per kernel.
fn kernel_diffs(dev: &Device, dtype: DType, generic: bool) -> Vec<(&'static str, f64)> {
    let run = |f: &dyn Fn() -> Vec<Tensor>| -> Vec<Tensor> {
        if generic {
            Backend::generic_only(f)
        } else {
            f()
        }
    };
    let mut out = Vec::new();
    let mut check = |name: &'static str, f: &dyn Fn(&Device, DType) -> Vec<Tensor>| {
        let reference = f(&CPU, DType::F32);
        let got = run(&|| f(dev, dtype));
        assert_eq!(reference.len(), got.len(), "{name}: outputs compared");
        let worst = reference
            .iter()
            .zip(&got)
            .map(|(r, g)| rel_diff(g, r))
            .fold(0f64, f64::max);
        out.push((name, worst));
    };
    check("rms_norm", &|d, dt| {
        let (x, w, gy) = (
            seeded(&[2, 3, 16], 1, dt, d),
            seeded(&[16], 2, dt, d),
            seeded(&[2, 3, 16], 3, dt, d),
        );
        vec![
            ops::fused::rms_norm(&x, &w, 1e-5).unwrap(),
            ops::fused::rms_norm_backward(&x, &w, &gy, 1e-5).unwrap(),
        ]
    });
    check("rope", &|d, dt| {
        let x = seeded(&[2, 3, 5, 8], 4, dt, d);
        let ang = seeded(&[2, 1, 5, 4], 5, DType::F32, d);
        let (cos, sin) = (
            ang.cos().unwrap().to_dtype(dt).unwrap(),
            ang.sin().unwrap().to_dtype(dt).unwrap(),
        );
        vec![
            ops::fused::rope(&x, &cos, &sin).unwrap(),
            ops::fused::rope_backward(&x, &cos, &sin).unwrap(),
        ]
    });
    check("swiglu", &|d, dt| {
        let (g, u, gy) = (
            seeded(&[3, 7, 11], 9, dt, d),
            seeded(&[3, 7, 11], 10, dt, d),
            seeded(&[3, 7, 11], 11, dt, d),
        );
        let (dg, du) = ops::fused::swiglu_backward(&g, &u, &gy).unwrap();
        vec![ops::fused::swiglu(&g, &u).unwrap(), dg, du]
    });
    check("attention", &|d, dt| {
        let (q, k, v, gy) = (
            seeded(&[2, 6, 5, 4], 20, dt, d),
            seeded(&[2, 2, 5, 4], 21, dt, d),
            seeded(&[2, 2, 5, 4], 22, dt, d),
            seeded(&[2, 6, 5, 4], 23, dt, d),
        );
        let bias = bias(2, 5, d);
        let (dq, dk, dv) = ops::fused::attention_backward(&q, &k, &v, &bias, 0.5, &gy).unwrap();
        vec![
            ops::fused::attention(&q, &k, &v, &bias, 0.5).unwrap(),
            dq,
            dk,
            dv,
        ]
    });
    check("cross_entropy", &|d, dt| {
        let x = seeded(&[6, 13], 12, dt, d);
        let tg = Tensor::new(&[0u32, 12, 5, 5, 7, 1], d).unwrap();
        let (loss, grad) =
            ops::fused::cross_entropy_sum_and_grad(&x, &tg, ops::TokenLoss::PLAIN, true).unwrap();
        vec![
            ops::fused::cross_entropy_sum(&x, &tg, ops::TokenLoss::PLAIN).unwrap(),
            loss,
            grad.unwrap(),
        ]
    });
    for (name, loss) in [
        (
            "cross_entropy label-smoothed",
            ops::TokenLoss {
                smoothing: 0.1,
                ..ops::TokenLoss::PLAIN
            },
        ),
        (
            "cross_entropy dft",
            ops::TokenLoss {
                dft: true,
                ..ops::TokenLoss::PLAIN
            },
        ),
        (
            "cross_entropy eaft",
            ops::TokenLoss {
                eaft: Some(0.5),
                ..ops::TokenLoss::PLAIN
            },
        ),
    ] {
        check(name, &|d, dt| {
            // 29 columns: EAFT reads the 20 largest of each row.
            let x = seeded(&[6, 29], 12, dt, d);
            let tg = Tensor::new(&[0u32, 12, 5, 5, 7, 28], d).unwrap();
            let (sum, grad) = ops::fused::cross_entropy_sum_and_grad(&x, &tg, loss, true).unwrap();
            vec![
                ops::fused::cross_entropy_sum(&x, &tg, loss).unwrap(),
                sum,
                grad.unwrap(),
            ]
        });
    }
    out
}

#[test]
fn generic_kernels_match_the_fused_cpu_kernels() {
    for (name, d) in kernel_diffs(&CPU, DType::F32, true) {
        assert!(
            d < 1e-5,
            "generic {name} differs from the fused kernel: {d}"
        );
    }
    // bf16 on the CPU takes the generic kernels by itself: within bf16's resolution.
    for (name, d) in kernel_diffs(&CPU, DType::BF16, false) {
        assert!(d < 3e-2, "bf16 {name} differs from the f32 kernel: {d}");
    }
}

fn lora(r: usize) -> Finetune {
    Finetune::Lora(LoraSpec {
        r,
        alpha: 16.0,
        dropout: 0.0,
        targets: LoraTargets::parse("all").unwrap(),
        use_rslora: false,
        use_dora: false,
        seed: 7,
        init: Default::default(),
    })
}

/// DoRA (`use_dora`) on every linear: its factor, norms and backward take the generic kernels off the CPU.
fn dora(r: usize) -> Finetune {
    match lora(r) {
        Finetune::Lora(spec) => Finetune::Lora(LoraSpec {
            use_dora: true,
            ..spec
        }),
        other => other,
    }
}

fn tiny(dir: &Path, opts: &TinyOpts) {
    tiny_llama(dir, 1234, opts).unwrap();
}

fn load(dir: &Path, dtype: DType, device: &Device, ft: &Finetune) -> Model {
    let files = load_hf_folder(dir, dtype, device).unwrap();
    let m = Model::from_files(&files, dtype, device, ft).unwrap();
    seed_lora_b(&m);
    m
}

/// Non-zero LoRA B (as after some training), the same values on every device.
fn seed_lora_b(m: &Model) {
    for (i, (name, v)) in m.trainable_vars().iter().enumerate() {
        if name.ends_with("lora_B.weight") {
            let t = seeded(v.dims(), 50 + i as u64, v.dtype(), &CPU);
            v.set(&(t * 0.2).unwrap().to_device(&m.device).unwrap())
                .unwrap();
        }
    }
}

/// The inputs of one padded batch and one packed batch, on `device`.
fn batches(device: &Device) -> Vec<(Tensor, AttnMask, Tensor)> {
    let ids = Tensor::new(
        &[[5u32, 70, 71, 100, 33, 9], [250, 12, 40, 41, 42, 43]],
        device,
    )
    .unwrap();
    let labels = Tensor::new(
        &[
            [-100i64, 70, 71, 100, 33, 9],
            [-100, 12, 40, 41, -100, -100],
        ],
        device,
    )
    .unwrap();
    let padded = AttnMask::Padding {
        attention_mask: Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], device).unwrap(),
    };
    let packed = AttnMask::Packed {
        seq_ids: Tensor::new(&[[1u32, 1, 1, 2, 2, 2], [1, 1, 1, 1, 2, 2]], device).unwrap(),
        position_ids: Tensor::new(&[[0u32, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]], device).unwrap(),
        branch_ids: None,
    };
    vec![(ids.clone(), padded, labels.clone()), (ids, packed, labels)]
}

/// (mean loss, logits, every trainable gradient by name) of one batch.
fn loss_logits_grads(
    m: &Model,
    (ids, mask, labels): &(Tensor, AttnMask, Tensor),
) -> (Tensor, Tensor, HashMap<String, Tensor>) {
    let logits = m.forward(ids, mask, false).unwrap();
    let (s, n) = m.forward_loss(ids, mask, labels, true).unwrap();
    let loss = (s / n as f64).unwrap();
    let g = loss.backward().unwrap();
    let grads = m
        .trainable_vars()
        .into_iter()
        .map(|(name, v)| {
            let gv = g
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"))
                .clone();
            (name, gv)
        })
        .collect();
    (loss, logits, grads)
}

/// The memory savers and kernel choices a device path must agree on.
const SETTINGS: [(bool, Option<usize>, bool); 4] = [
    (false, None, false),
    (true, None, true),
    (false, Some(3), true),
    (true, Some(1), false),
];

fn configure(m: &mut Model, (ckpt, chunk, manual): (bool, Option<usize>, bool)) {
    m.kernels = Kernels::Fused;
    m.checkpointing = ckpt;
    m.head_chunk_rows = chunk;
    m.manual_backward = manual;
}

/// Compares `m` on `dev` with the same model on the CPU (fused kernels), for every setting and batch.
fn compare_with_cpu(dir: &Path, dev: &Device, dtype: DType, tol: f64, generic: bool) {
    compare_finetune_with_cpu(dir, dev, dtype, tol, generic, &lora(4));
}

/// [`compare_with_cpu`] for any kind of fine-tuning (LoRA, freeze, full).
fn compare_finetune_with_cpu(
    dir: &Path,
    dev: &Device,
    dtype: DType,
    tol: f64,
    generic: bool,
    ft: &Finetune,
) {
    let mut cpu_m = load(dir, DType::F32, &CPU, ft);
    let mut dev_m = load(dir, dtype, dev, ft);
    let cpu_batches = batches(&CPU);
    let dev_batches = batches(dev);
    assert_eq!(cpu_batches.len(), dev_batches.len());
    for s in SETTINGS {
        configure(&mut cpu_m, s);
        configure(&mut dev_m, s);
        for (bc, bd) in cpu_batches.iter().zip(&dev_batches) {
            let (lc, xc, gc) = loss_logits_grads(&cpu_m, bc);
            let (ld, xd, gd) = if generic {
                Backend::generic_only(|| loss_logits_grads(&dev_m, bd))
            } else {
                loss_logits_grads(&dev_m, bd)
            };
            let what = format!("{dev:?} {dtype:?} {s:?}");
            let dl = rel_diff(&ld, &lc);
            assert!(dl < tol, "{what}: loss {lc} vs {ld} ({dl})");
            let dx = rel_diff(&xd, &xc);
            assert!(dx < tol, "{what}: logits differ by {dx}");
            assert_eq!(gc.len(), gd.len());
            for (name, g) in &gc {
                let d = rel_diff(&gd[name], g);
                assert!(d < tol * 10.0, "{what}: gradient of {name} differs by {d}");
            }
        }
    }
}

/// The tiny Gemma 3 (sliding window, two RoPE bases, (1 + w) norms, GeGLU).
fn gemma3() -> TinyOpts {
    TinyOpts {
        arch: ArchKind::Gemma3,
        ..TinyOpts::default()
    }
}

#[test]
fn generic_training_path_matches_the_fused_path_in_f32() {
    for opts in [TinyOpts::default(), gemma3()] {
        let d = tempfile::tempdir().unwrap();
        tiny(d.path(), &opts);
        compare_with_cpu(d.path(), &CPU, DType::F32, 1e-4, true);
        // Freeze and full fine-tuning: trainable base weights and norms take candle's graph on every device.
        for ft in [Finetune::freeze(1), Finetune::Full] {
            compare_finetune_with_cpu(d.path(), &CPU, DType::F32, 1e-4, true, &ft);
        }
        compare_finetune_with_cpu(d.path(), &CPU, DType::F32, 1e-4, true, &dora(4));
    }
}

/// Finite differences on a few LoRA entries of the model on `dev` in f64.
fn finite_differences(dir: &Path, dev: &Device, generic: bool) {
    let mut m = load(dir, DType::F64, dev, &lora(4));
    configure(&mut m, (true, Some(2), true));
    let (ids, mask, labels) = batches(dev).swap_remove(0);
    let loss_of = |m: &Model| -> Tensor {
        let f = || {
            let (s, n) = m.forward_loss(&ids, &mask, &labels, true).unwrap();
            (s / n as f64).unwrap()
        };
        if generic {
            Backend::generic_only(f)
        } else {
            f()
        }
    };
    let grads = loss_of(&m).backward().unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let mut checked = 0;
    for (name, v) in m.trainable_vars().iter().filter(|(n, _)| {
        n.contains("layers.0.self_attn.q_proj")
            || n.contains("layers.1.mlp.down_proj")
            || n.contains("layers.1.self_attn.v_proj")
    }) {
        let g = to_f64(grads.get(v.as_tensor()).unwrap());
        let orig = v.as_tensor().copy().unwrap();
        let base = to_f64(&orig);
        for _ in 0..3 {
            let i = rng.random_range(0..base.len());
            let h = 1e-5;
            let at = |delta: f64| {
                let mut flat = base.clone();
                flat[i] += delta;
                v.set(
                    &Tensor::from_vec(flat, orig.shape(), &CPU)
                        .unwrap()
                        .to_device(dev)
                        .unwrap(),
                )
                .unwrap();
                loss_of(&m).to_scalar::<f64>().unwrap()
            };
            let num = (at(h) - at(-h)) / (2.0 * h);
            v.set(&orig).unwrap();
            let rel = (num - g[i]).abs() / num.abs().max(g[i].abs()).max(1e-7);
            assert!(
                rel < 1e-3,
                "{dev:?} {name}[{i}]: analytic {} numeric {num}",
                g[i]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 18);
}

#[test]
fn generic_training_path_matches_finite_differences_f64() {
    for opts in [TinyOpts::default(), gemma3()] {
        let d = tempfile::tempdir().unwrap();
        tiny(d.path(), &opts);
        finite_differences(d.path(), &CPU, true);
    }
}

#[test]
fn cuda_kernels_match_the_cpu() {
    let Some(dev) = cuda() else { return };
    for (name, d) in kernel_diffs(&dev, DType::F32, false) {
        assert!(d < 1e-5, "CUDA f32 {name} differs from the CPU: {d}");
    }
    for (name, d) in kernel_diffs(&dev, DType::BF16, false) {
        assert!(d < 3e-2, "CUDA bf16 {name} differs from the CPU f32: {d}");
    }
}

#[test]
fn cuda_logits_loss_and_lora_gradients_match_the_cpu() {
    let Some(dev) = cuda() else { return };
    for opts in [
        TinyOpts::default(),
        TinyOpts {
            arch: ArchKind::Qwen3,
            tie_word_embeddings: false,
            ..TinyOpts::default()
        },
        TinyOpts {
            arch: ArchKind::Qwen2,
            ..TinyOpts::default()
        },
        gemma3(),
    ] {
        let d = tempfile::tempdir().unwrap();
        tiny(d.path(), &opts);
        // f32: the same arithmetic up to summation order (cuBLAS's TF32 is off in candle by default).
        compare_with_cpu(d.path(), &dev, DType::F32, 1e-4, false);
        // bf16 base with f32 LoRA: within bf16's resolution over two layers.
        compare_with_cpu(d.path(), &dev, DType::BF16, 5e-2, false);
        for ft in [Finetune::freeze(1), Finetune::Full] {
            compare_finetune_with_cpu(d.path(), &dev, DType::F32, 1e-4, false, &ft);
        }
        compare_finetune_with_cpu(d.path(), &dev, DType::F32, 1e-4, false, &dora(4));
        compare_finetune_with_cpu(d.path(), &dev, DType::BF16, 5e-2, false, &dora(4));
    }
}

#[test]
fn cuda_gradients_match_finite_differences_f64() {
    let Some(dev) = cuda() else { return };
    for opts in [TinyOpts::default(), gemma3()] {
        let d = tempfile::tempdir().unwrap();
        tiny(d.path(), &opts);
        finite_differences(d.path(), &dev, false);
    }
}

fn train_losses(root: &Path, device: &Device, extra: &str) -> Vec<f64> {
    let text = format!(
        "model_name_or_path: {}\ndataset: toy\ndataset_dir: {}\ntemplate: chatml\ncutoff_len: 64\n\
         output_dir: {}\nlogging_steps: 1\nsave_steps: 1000\nper_device_train_batch_size: 4\n\
         gradient_accumulation_steps: 2\nlearning_rate: 5.0e-3\nlora_rank: 4\nlora_target: all\n\
         lr_scheduler_type: cosine\nwarmup_steps: 2\nmax_steps: 20\ntokenized_path: {}\nseed: 3\n\
         overwrite_output_dir: true\n{extra}",
        root.join("model").display(),
        root.join("data").display(),
        root.join(format!("out-{}", device.is_cpu())).display(),
        root.join("tokcache").display(),
    );
    let loaded = config::parse(&text, &[], Purpose::Train).unwrap_or_else(|e| panic!("{e:?}"));
    let (_tx, rx) = mpsc::channel();
    let mut losses = Vec::new();
    let mut device_name = String::new();
    run_training(&loaded, device, &rx, &mut |ev| match ev {
        TrainEvent::StepFinished(m) => losses.push(m.loss),
        TrainEvent::Started { device, .. } => device_name = device,
        _ => {}
    })
    .unwrap();
    assert_eq!(
        device_name.split(' ').next(),
        Some(termtune::engine::device::short_name(device).as_str())
    );
    losses
}

#[test]
fn cuda_lora_run_follows_the_cpu_run() {
    let Some(dev) = cuda() else { return };
    let d = tempfile::tempdir().unwrap();
    tiny_model_and_toy_data(d.path(), &varied_rows(64));
    for extra in [
        "",
        "disable_gradient_checkpointing: true\n",
        // PiSSA: the decomposition on the host, the residual and the training on the device.
        "pissa_init: true\npissa_convert: true\n",
    ] {
        let cpu = train_losses(d.path(), &CPU, extra);
        let gpu = train_losses(d.path(), &dev, extra);
        assert_eq!(cpu.len(), 20);
        assert_eq!(gpu.len(), cpu.len());
        for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
            let rel = (c - g).abs() / c.abs();
            assert!(
                rel < 0.01,
                "step {}: CPU {c} vs CUDA {g} ({extra:?})",
                i + 1
            );
        }
        eprintln!("CPU losses  {cpu:.4?}\nCUDA losses {gpu:.4?}");
    }
}

/// `use_muon` on CUDA: Muon's Newton-Schulz products run in bf16 on the device (cuBLAS) and on the host (gemm),
/// whose results differ by bf16 rounding (~0.03 of entries ~0.5, as ours and torch's do on the CPU), so the run
/// follows the CPU's to 2 % per step rather than 1 %.
#[test]
fn cuda_muon_run_follows_the_cpu_run() {
    let Some(dev) = cuda() else { return };
    let d = tempfile::tempdir().unwrap();
    tiny_model_and_toy_data(d.path(), &varied_rows(64));
    let extra = "use_muon: true\nweight_decay: 0.1\n";
    let cpu = train_losses(d.path(), &CPU, extra);
    let gpu = train_losses(d.path(), &dev, extra);
    assert_eq!(gpu.len(), cpu.len());
    for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        assert!(
            (c - g).abs() / c.abs() < 0.02,
            "step {}: CPU {c} vs CUDA {g}",
            i + 1
        );
    }
    eprintln!("Muon CPU losses  {cpu:.4?}\nMuon CUDA losses {gpu:.4?}");
}

/// `quantization_bit: 4` on CUDA: the 4-bit weights dequantize on the device (the candle-op path) to exactly the
/// CPU's values, and a QLoRA run (the base read on the host, sent to the GPU 4-bit) follows the CPU's.
#[test]
fn cuda_4bit_base_dequantizes_exactly_and_trains_like_the_cpu() {
    use termtune::engine::bnb4::{Bnb4Tensor, FourBit};
    let Some(dev) = cuda() else { return };
    let w = seeded(&[96, 200], 5, DType::F32, &CPU);
    for (kind, double) in [(FourBit::Nf4, true), (FourBit::Fp4, false)] {
        let q = Bnb4Tensor::quantize_onto(&w, kind, double, &dev).unwrap();
        let on_gpu = q.dequantize().unwrap().to_device(&CPU).unwrap();
        let on_cpu = q.to_device(&CPU).unwrap().dequantize().unwrap();
        assert_eq!(rel_diff(&on_gpu, &on_cpu), 0.0, "{kind:?}");
    }
    let d = tempfile::tempdir().unwrap();
    tiny_model_and_toy_data(d.path(), &varied_rows(64));
    let cpu = train_losses(d.path(), &CPU, "quantization_bit: 4\n");
    let gpu = train_losses(d.path(), &dev, "quantization_bit: 4\n");
    assert_eq!((cpu.len(), gpu.len()), (20, 20));
    for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        assert!(
            (c - g).abs() / c.abs() < 0.01,
            "step {}: CPU {c} vs CUDA {g}",
            i + 1
        );
    }
    eprintln!("4-bit CPU losses  {cpu:.4?}\n4-bit CUDA losses {gpu:.4?}");
}

/// Logits of the prompt and of one cached decode step after it (the chat path), on the model's device.
fn prompt_and_step_logits(m: &Model) -> (Tensor, Tensor) {
    let mut cache = termtune::engine::KvCache::new(m.layers.len());
    let ids = Tensor::new(crate::quantized::prompt().as_slice(), &m.device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = m.forward_cached(&ids, &mut cache, false).unwrap();
    let next = Tensor::new(&[[17u32]], &m.device).unwrap();
    let b = m.forward_cached(&next, &mut cache, false).unwrap();
    (a, b)
}

/// The loss (per label token) and every LoRA gradient of one causal batch of `rows` x 16 tokens.
fn loss_and_lora_grads(m: &Model, rows: usize) -> (f64, Vec<(String, Tensor)>) {
    let ids: Vec<u32> = (0..rows as u32 * 16).map(|i| (i * 29 + 3) % 300).collect();
    let input = Tensor::from_vec(ids.clone(), (rows, 16), &m.device).unwrap();
    let labels = Tensor::from_vec(
        ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(),
        (rows, 16),
        &m.device,
    )
    .unwrap();
    let (loss, n) = m
        .forward_loss(&input, &AttnMask::Causal, &labels, true)
        .unwrap();
    let loss = (loss / n as f64).unwrap();
    let g = loss.backward().unwrap();
    let grads = m
        .trainable_vars()
        .iter()
        .map(|(k, v)| (k.clone(), g.get(v.as_tensor()).unwrap().clone()))
        .collect();
    (to_f64(&loss)[0], grads)
}

/// A GGUF base kept in its block types on CUDA (candle's CUDA quantized kernels under 64 rows, the weight
/// dequantized on the device from 64 rows on), for every block type termtune keeps: the chat logits (a prompt and
/// one cached step), the loss and the LoRA gradients against the same model with the weights dequantized, in f32
/// on the CPU — within the CPU quantized kernels' own tolerances (`quantized::`); and the base stays quantized on
/// the GPU.
#[test]
fn cuda_quantized_gguf_base_matches_the_dequantized_model() {
    let Some(dev) = cuda() else { return };
    for ty in crate::quantized::TYPES {
        let d = tempfile::tempdir().unwrap();
        let (mut quant, dense) = crate::quantized::tiny_pair(d.path(), ty);
        quant.move_to(&dev).unwrap();
        let mq = Model::from_files(&quant, DType::F32, &dev, &lora(4)).unwrap();
        let md = Model::from_files(&dense, DType::F32, &CPU, &lora(4)).unwrap();
        seed_lora_b(&mq);
        seed_lora_b(&md);
        for l in &mq.layers {
            for lin in l.linears() {
                let Weight::Quantized(q) = &lin.weight else {
                    panic!("{ty:?}: a linear weight is not quantized on the GPU")
                };
                assert!(q.device().is_cuda(), "{ty:?}");
            }
        }
        let (qa, qb) = prompt_and_step_logits(&mq);
        let (da, db) = prompt_and_step_logits(&md);
        let logits = rel_diff(&qa, &da).max(rel_diff(&qb, &db));
        assert!(logits < 0.03, "{ty:?}: relative logit difference {logits}");
        // 2 rows: the quantized kernels (activations rounded to 8 bits); 4 x 16 = 64 rows: the dequantized weight.
        for (rows, loss_tol, grad_tol) in [(2, 2e-3, 0.08), (4, 1e-4, 1e-3)] {
            let (lq, gq) = loss_and_lora_grads(&mq, rows);
            let (ld, gd) = loss_and_lora_grads(&md, rows);
            assert!(
                (lq - ld).abs() < loss_tol * ld.abs(),
                "{ty:?} {rows} rows: loss {lq} vs {ld}"
            );
            let grads = gq
                .iter()
                .zip(&gd)
                .map(|((kq, a), (kd, b))| {
                    assert_eq!(kq, kd);
                    rel_diff(a, b)
                })
                .fold(0f64, f64::max);
            assert!(
                grads < grad_tol,
                "{ty:?} {rows} rows: relative LoRA gradient difference {grads}"
            );
            eprintln!(
                "{ty:?} {rows} rows: logits {logits:.5}, loss {lq:.6} vs {ld:.6}, gradients {grads:.5}"
            );
        }
    }
}

/// Each metric of a preference or reward run, per step, on `device` (its own output folder).
fn stage_run(
    root: &Path,
    device: &Device,
    stage: &str,
    dataset: &str,
    extra: &[&str],
) -> Vec<termtune::trainer::protocol::StepMetrics> {
    let out = format!(
        "output_dir: {}",
        root.join(format!("out-{stage}-{}-{}", extra.len(), device.is_cpu()))
            .display()
    );
    let mut all = vec!["max_steps: 8", "overwrite_output_dir: true", out.as_str()];
    all.extend_from_slice(extra);
    let loaded = crate::tiny_util::preference_preset(root, stage, dataset, &all)
        .unwrap_or_else(|e| panic!("{stage} {extra:?}: {e:?}"));
    let (_tx, rx) = mpsc::channel();
    let mut steps = Vec::new();
    run_training(&loaded, device, &rx, &mut |ev| {
        if let TrainEvent::StepFinished(m) = ev {
            steps.push(m);
        }
    })
    .unwrap_or_else(|e| panic!("{stage} {extra:?} on {device:?}: {e}"));
    steps
}

/// dpo (pairs sharing their prompt in one row, the branch mask, the adapter-off reference), orpo (no reference),
/// kto (its KL sequences) and rm (the value head) on CUDA follow the CPU runs step for step: the loss within 1 %,
/// each reward, margin, log-probability and KL within 1e-3 + 1 %; dpo's first loss is ln 2 there too.
#[test]
fn cuda_preference_and_reward_runs_follow_the_cpu_runs() {
    let Some(dev) = cuda() else { return };
    let (_d, root) = crate::tiny_util::preference_fixture(16);
    for (stage, dataset, extra) in [
        ("dpo", "prefs", &[][..]),
        ("dpo", "prefs", &["pref_loss: orpo"][..]),
        ("kto", "feedback", &[][..]),
        ("rm", "prefs", &[][..]),
    ] {
        let cpu = stage_run(&root, &CPU, stage, dataset, extra);
        let gpu = stage_run(&root, &dev, stage, dataset, extra);
        assert_eq!((cpu.len(), gpu.len()), (8, 8), "{stage} {extra:?}");
        if stage == "dpo" && extra.is_empty() {
            let first = gpu[0].loss;
            assert!(
                (first - std::f64::consts::LN_2).abs() < 1e-6,
                "CUDA dpo step 1: {first}"
            );
        }
        for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
            let what = format!("{stage} {extra:?} step {}", i + 1);
            assert!(
                (c.loss - g.loss).abs() < 0.01 * c.loss.abs(),
                "{what}: loss CPU {} vs CUDA {}",
                c.loss,
                g.loss
            );
            assert_eq!(
                c.metrics.keys().collect::<Vec<_>>(),
                g.metrics.keys().collect::<Vec<_>>(),
                "{what}"
            );
            for (key, cv) in &c.metrics {
                // An accuracy counts signs: a margin within rounding of 0 may flip it.
                if key.contains("accurac") {
                    continue;
                }
                let gv = g.metrics[key];
                assert!(
                    (cv - gv).abs() < 1e-3 + 0.01 * cv.abs(),
                    "{what}: {key} CPU {cv} vs CUDA {gv}"
                );
            }
        }
        let losses = |s: &[termtune::trainer::protocol::StepMetrics]| -> Vec<f64> {
            s.iter().map(|m| m.loss).collect()
        };
        eprintln!(
            "{stage} {extra:?}: CPU losses {:.4?}, CUDA losses {:.4?}",
            losses(&cpu),
            losses(&gpu)
        );
    }
}

#[test]
fn cuda_greedy_generation_matches_the_cpu() {
    let Some(dev) = cuda() else { return };
    // Gemma 3's sliding-window layer masks the cache's older keys while decoding.
    let g = tempfile::tempdir().unwrap();
    tiny(g.path(), &gemma3());
    let d = tempfile::tempdir().unwrap();
    tiny(d.path(), &TinyOpts::default());
    for dir in [g.path(), d.path()] {
        let greedy = |device: &Device| -> Vec<u32> {
            let m = load(dir, DType::F32, device, &lora(4));
            let mut ids: Vec<u32> = vec![5, 70, 71, 100, 33];
            let mut cache = termtune::engine::KvCache::new(2);
            let mut next = Tensor::new(ids.as_slice(), device)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            for _ in 0..24 {
                let logits = m.forward_cached(&next, &mut cache, true).unwrap();
                let last = Model::last_logits(&logits).unwrap();
                let id = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
                ids.push(id);
                next = Tensor::new(&[[id]], device).unwrap();
            }
            ids
        };
        assert_eq!(greedy(&dev), greedy(&CPU), "{}", dir.display());
    }
    // A prompt cache on the GPU (its keys and values truncated and appended to there) answers as a fresh
    // generation: a follow-up prompt and one that leaves the held tokens part-way.
    let m = load(d.path(), DType::F32, &dev, &lora(4));
    let params = termtune::engine::generate::GenerationParams {
        max_new_tokens: 8,
        ..Default::default()
    };
    let run = |prompt: &[u32], cache: &mut termtune::engine::generate::PromptCache| {
        termtune::engine::generate::generate_cached(&m, prompt, &params, &[], None, cache, |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap()
    };
    let mut cache = termtune::engine::generate::PromptCache::default();
    let first: Vec<u32> = vec![5, 70, 71, 100, 33, 8, 9];
    let (a, _, _) = run(&first, &mut cache);
    let mut follow = first.clone();
    follow.extend(&a);
    follow.extend([12, 13, 14]);
    let mut branch = first[..4].to_vec();
    branch.extend([40, 41]);
    for prompt in [follow, branch] {
        let (got, _, t) = run(&prompt, &mut cache);
        assert!(t.cached_tokens > 0);
        let (want, _, _) = run(
            &prompt,
            &mut termtune::engine::generate::PromptCache::default(),
        );
        assert_eq!(got, want);
    }
}

#[test]
fn cuda_bf16_base_keeps_lora_weights_f32_on_the_gpu() {
    let Some(dev) = cuda() else { return };
    let d = tempfile::tempdir().unwrap();
    tiny(d.path(), &TinyOpts::default());
    let m = load(d.path(), DType::BF16, &dev, &lora(4));
    for (name, v) in m.trainable_vars() {
        assert_eq!(v.dtype(), DType::F32, "{name}");
        assert!(!v.device().is_cpu(), "{name} is not on the GPU");
    }
}

#[test]
fn cuda_lora_dropout_is_seeded_and_checkpointing_sees_the_same_masks() {
    let Some(dev) = cuda() else { return };
    let shape = candle_core::Shape::from((400, 64));
    let mask = |seed: u64| {
        to_f64(
            &ops::lora_dropout_mask(
                &shape,
                0.25,
                seed,
                "model.layers.0.mlp.up_proj",
                DType::F32,
                &dev,
            )
            .unwrap(),
        )
    };
    let m1 = mask(3);
    let zeros = m1.iter().filter(|&&x| x == 0.0).count() as f64 / m1.len() as f64;
    assert!((zeros - 0.25).abs() < 0.02, "zero fraction {zeros}");
    assert_eq!(m1, mask(3));
    assert_ne!(m1, mask(4));
    let d = tempfile::tempdir().unwrap();
    tiny(d.path(), &TinyOpts::default());
    let ft = Finetune::Lora(LoraSpec {
        r: 4,
        alpha: 16.0,
        dropout: 0.25,
        targets: LoraTargets::parse("all").unwrap(),
        use_rslora: false,
        use_dora: false,
        seed: 7,
        init: Default::default(),
    });
    let mut m = load(d.path(), DType::F32, &dev, &ft);
    m.dropout_seed = 9;
    let batch = batches(&dev).swap_remove(0);
    let mut first: Option<(Tensor, HashMap<String, Tensor>)> = None;
    for s in SETTINGS {
        configure(&mut m, s);
        let (loss, _, grads) = loss_logits_grads(&m, &batch);
        match &first {
            None => first = Some((loss, grads)),
            Some((l0, g0)) => {
                assert!(rel_diff(&loss, l0) < 1e-5, "{s:?}: loss differs");
                for (name, g) in g0 {
                    assert!(rel_diff(&grads[name], g) < 1e-4, "{s:?}: {name} differs");
                }
            }
        }
    }
}

#[test]
fn host_inputs_give_what_the_tensors_give() {
    // The trainer hands the model its host copies (no read-back from a GPU): same loss and gradients as the
    // tensors alone, for a padded batch (with unpadding) and a packed one.
    let d = tempfile::tempdir().unwrap();
    tiny(d.path(), &TinyOpts::default());
    let m = load(d.path(), DType::F32, &CPU, &lora(4));
    let ids: Vec<u32> = vec![5, 70, 71, 100, 33, 9, 250, 12, 40, 41, 42, 43];
    let labels: Vec<i64> = vec![-100, 70, 71, 100, 33, 9, -100, 12, 40, 41, -100, -100];
    let attention: Vec<u32> = vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0];
    let seq: Vec<u32> = vec![1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 2, 2];
    for (i, (t_ids, mask, t_labels)) in batches(&CPU).into_iter().enumerate() {
        let host = termtune::engine::HostInputs {
            input_ids: &ids,
            labels: &labels,
            attention_mask: (i == 0).then_some(attention.as_slice()),
            sequence_ids: (i == 1).then_some(seq.as_slice()),
            branch_ids: None,
            position_ids: None,
        };
        let run = |h: Option<&termtune::engine::HostInputs>| {
            let (s, n) = m
                .forward_loss_with(&t_ids, &mask, &t_labels, h, true)
                .unwrap();
            let loss = (s / n as f64).unwrap();
            let g = loss.backward().unwrap();
            let grads: Vec<Vec<f64>> = m
                .trainable_vars()
                .iter()
                .map(|(_, v)| to_f64(g.get(v.as_tensor()).unwrap()))
                .collect();
            (to_f64(&loss), grads)
        };
        assert_eq!(run(None), run(Some(&host)), "batch {i}");
    }
}

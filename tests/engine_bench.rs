//! Benchmark, not a test: forward+backward of a LoRA r8 all-linear step on a SmolLM2-135M-shaped model
//! (30 layers, d 576, ffn 1536, 9/3 heads, vocab 49152, tied embeddings), random weights, f32 CPU, batch 4 × 256.
//!
//! Run: `cargo test --release --test integration engine_bench -- --ignored --nocapture`
//! Env: `BENCH_STEPS` (default 3), `BENCH_BATCH` (4), `BENCH_SEQ` (256), `BENCH_KERNELS` (fused|pure|both),
//! `BENCH_CKPT` (1: gradient checkpointing), `BENCH_MANUAL` (0: candle-graph layer backward instead of the
//! hand-written one).

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use termtune::engine::model::Kernels;
use termtune::engine::{AttnMask, Finetune, LoraSpec, LoraTargets, Model, ModelConfig};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

/// A `/proc/self/status` memory line (`VmRSS:`, `VmHWM:`), in MiB.
fn status_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key)).map(String::from))
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU time (user + system) of this process in seconds, from /proc/self/stat (clock ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            // Fields after the command: state is index 0, utime 11, stime 12.
            Some((rest.get(11)?.parse::<f64>().ok()? + rest.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

fn smollm2_shaped() -> (ModelConfig, HashMap<String, Tensor>) {
    let cfg = ModelConfig::from_hf_config(&serde_json::json!({"model_type":"llama","vocab_size":49152,
        "hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
        "num_key_value_heads":3,"rms_norm_eps":1e-5,"rope_theta":100000.0,"max_position_embeddings":8192,
        "tie_word_embeddings":true,"bos_token_id":1,"eos_token_id":2}))
    .unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let mut rand = |shape: &[usize], std: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-std..std)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let (h, ff, hd) = (576, 1536, 64);
    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), rand(&[49152, h], 0.05));
    t.insert("model.norm.weight".into(), rand(&[h], 1.0).abs().unwrap());
    for i in 0..30 {
        let p = format!("model.layers.{i}");
        for (n, o, inp) in [
            ("self_attn.q_proj", 9 * hd, h),
            ("self_attn.k_proj", 3 * hd, h),
            ("self_attn.v_proj", 3 * hd, h),
            ("self_attn.o_proj", h, 9 * hd),
            ("mlp.gate_proj", ff, h),
            ("mlp.up_proj", ff, h),
            ("mlp.down_proj", h, ff),
        ] {
            t.insert(format!("{p}.{n}.weight"), rand(&[o, inp], 0.04));
        }
        t.insert(
            format!("{p}.input_layernorm.weight"),
            rand(&[h], 1.0).abs().unwrap(),
        );
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            rand(&[h], 1.0).abs().unwrap(),
        );
    }
    (cfg, t)
}

#[test]
#[ignore = "benchmark; run with --release -- --ignored --nocapture"]
fn bench_lora_step_smollm2_shape() {
    let (b, s, steps) = (
        env("BENCH_BATCH", 4),
        env("BENCH_SEQ", 256),
        env("BENCH_STEPS", 3),
    );
    let (cfg, tensors) = smollm2_shaped();
    let spec = LoraSpec {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: LoraTargets::All,
        use_rslora: false,
        use_dora: false,
        seed: 0,
        init: Default::default(),
    };
    let mut model = Model::from_tensors(
        cfg,
        &tensors,
        DType::F32,
        &Device::Cpu,
        &Finetune::Lora(spec),
    )
    .unwrap();
    drop(tensors);
    model.checkpointing = env("BENCH_CKPT", 0) == 1;
    model.manual_backward = env("BENCH_MANUAL", 1) == 1;
    let (tr, total) = model.param_counts();
    println!(
        "params: trainable {tr}, total {total}; threads {}",
        rayon::current_num_threads()
    );
    let mut rng = StdRng::seed_from_u64(1);
    let ids: Vec<u32> = (0..b * s).map(|_| rng.random_range(0..49152u32)).collect();
    let input = Tensor::from_vec(ids.clone(), (b, s), &Device::Cpu).unwrap();
    let labels = Tensor::from_vec(
        ids.iter().map(|&x| i64::from(x)).collect::<Vec<_>>(),
        (b, s),
        &Device::Cpu,
    )
    .unwrap();
    let kernels = std::env::var("BENCH_KERNELS").unwrap_or_else(|_| "fused".into());
    let sets: Vec<Kernels> = match kernels.as_str() {
        "pure" => vec![Kernels::Pure],
        "both" => vec![Kernels::Fused, Kernels::Pure],
        _ => vec![Kernels::Fused],
    };
    for k in sets {
        model.kernels = k;
        let mut fwd_total = 0.0;
        let mut bwd_total = 0.0;
        let mut cpu_total = 0.0;
        for step in 0..=steps {
            let c0 = cpu_seconds();
            let t0 = Instant::now();
            let (sum, n) = model
                .forward_loss(&input, &AttnMask::Causal, &labels, true)
                .unwrap();
            let loss = (sum / n as f64).unwrap();
            let _ = loss.to_scalar::<f32>().unwrap();
            let t1 = Instant::now();
            let grads = loss.backward().unwrap();
            let t2 = Instant::now();
            drop(grads);
            drop(loss);
            let (f, bw) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
            let cpu = cpu_seconds() - c0;
            println!(
                "{k:?} step {step}: forward {f:.2}s backward {bw:.2}s ({:.0} tok/s)",
                (b * s) as f64 / (f + bw)
            );
            if step > 0 {
                cpu_total += cpu;
                fwd_total += f;
                bwd_total += bw;
            }
        }
        let n = steps as f64;
        println!(
            "{k:?} mean over {steps} steps (after 1 warm-up): forward {:.2}s backward {:.2}s total {:.2}s → {:.0} tokens/s",
            fwd_total / n,
            bwd_total / n,
            (fwd_total + bwd_total) / n,
            (b * s) as f64 * n / (fwd_total + bwd_total)
        );
        println!(
            "{k:?} mean process CPU time per step: {:.2}s",
            cpu_total / n
        );
        println!("peak RSS so far: {:.0} MiB", peak_rss_mib());
    }
}

/// Per-kernel timing at the benchmark's sizes: fused CustomOp vs pure candle ops, forward + backward.
#[test]
#[ignore = "benchmark; run with --release -- --ignored --nocapture"]
fn bench_kernels_fused_vs_pure() {
    use candle_core::Var;
    use termtune::engine::ops;
    let dev = Device::Cpu;
    let rv = |shape: &[usize]| {
        Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap()
    };
    let time = |name: &str, f: &dyn Fn() -> Tensor, x: &Var| {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t0 = Instant::now();
            let y = f();
            let p = y.ones_like().unwrap();
            let g = (y * p).unwrap().sum_all().unwrap().backward().unwrap();
            let _ = g.get(x).unwrap();
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!("{name:<28} {:8.2} ms", best * 1e3);
    };
    let x = rv(&[4, 256, 576]);
    let w = Tensor::ones(576, DType::F32, &dev).unwrap();
    time(
        "rms_norm fused",
        &|| ops::fused::rms_norm(&x, &w, 1e-5).unwrap(),
        &x,
    );
    time(
        "rms_norm pure",
        &|| ops::rms_norm_pure(&x, &w, 1e-5).unwrap(),
        &x,
    );
    let q = rv(&[4, 9, 256, 64]);
    let cos = Tensor::randn(0f32, 1.0, (1, 1, 256, 32), &dev).unwrap();
    let sin = Tensor::randn(0f32, 1.0, (1, 1, 256, 32), &dev).unwrap();
    time(
        "rope fused",
        &|| ops::fused::rope(&q, &cos, &sin).unwrap(),
        &q,
    );
    time("rope pure", &|| ops::rope_pure(&q, &cos, &sin).unwrap(), &q);
    let a = rv(&[4, 9, 256, 256]);
    let bias = Tensor::zeros((1, 1, 256, 256), DType::F32, &dev).unwrap();
    time(
        "softmax fused",
        &|| ops::fused::masked_softmax(&a, &bias, 0.125).unwrap(),
        &a,
    );
    time(
        "softmax pure",
        &|| ops::softmax_pure(&(&*a * 0.125).unwrap().broadcast_add(&bias).unwrap()).unwrap(),
        &a,
    );
    let g = rv(&[4, 256, 1536]);
    let u = Tensor::randn(0f32, 1.0, (4, 256, 1536), &dev).unwrap();
    time("swiglu fused", &|| ops::fused::swiglu(&g, &u).unwrap(), &g);
    time("swiglu pure", &|| ops::swiglu_pure(&g, &u).unwrap(), &g);
    let l = rv(&[1020, 49152]);
    let tg = Tensor::zeros(1020, DType::U32, &dev).unwrap();
    let ones = Tensor::ones(1020, DType::F32, &dev).unwrap();
    time(
        "cross-entropy fused",
        &|| ops::fused::cross_entropy_sum(&l, &tg, ops::TokenLoss::PLAIN).unwrap(),
        &l,
    );
    time(
        "cross-entropy pure",
        &|| ops::nll_sum_pure(&l, &tg, &ones).unwrap(),
        &l,
    );
    let xl = rv(&[1024, 576]);
    let wl = Tensor::randn(0f32, 0.04, (1536, 576), &dev).unwrap();
    time(
        "frozen linear 576→1536",
        &|| ops::frozen_linear(&xl, &wl).unwrap(),
        &xl,
    );
    time(
        "plain linear 576→1536",
        &|| ops::linear(&xl, &wl).unwrap(),
        &xl,
    );
}

/// Memory over repeated steps with padded batches of varying length (leak check), fused vs pure kernels.
#[test]
#[ignore = "benchmark; run with --release -- --ignored --nocapture"]
fn bench_memory_over_steps() {
    let (cfg, tensors) = smollm2_shaped();
    let spec = LoraSpec {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        targets: LoraTargets::All,
        use_rslora: false,
        use_dora: false,
        seed: 0,
        init: Default::default(),
    };
    let mut model = Model::from_tensors(
        cfg,
        &tensors,
        DType::F32,
        &Device::Cpu,
        &Finetune::Lora(spec),
    )
    .unwrap();
    drop(tensors);
    let kernels = std::env::var("BENCH_KERNELS").unwrap_or_else(|_| "fused".into());
    model.kernels = if kernels == "pure" {
        Kernels::Pure
    } else {
        Kernels::Fused
    };
    for step in 0..env("BENCH_STEPS", 6) {
        let fixed_t = env("BENCH_T", 0);
        let (b, t) = (
            8,
            if fixed_t > 0 {
                fixed_t
            } else {
                64 + (step * 13) % 64
            },
        );
        let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % 49000) as u32).collect();
        let input = Tensor::from_vec(ids.clone(), (b, t), &Device::Cpu).unwrap();
        let am: Vec<u32> = (0..b * t)
            .map(|i| u32::from(i % t < t - (i / t) * 3))
            .collect();
        let mask = AttnMask::Padding {
            attention_mask: Tensor::from_vec(am, (b, t), &Device::Cpu).unwrap(),
        };
        let labels = Tensor::from_vec(
            ids.iter().map(|&x| i64::from(x)).collect::<Vec<_>>(),
            (b, t),
            &Device::Cpu,
        )
        .unwrap();
        let (sum, n) = model.forward_loss(&input, &mask, &labels, true).unwrap();
        let g = (sum / n as f64).unwrap().backward().unwrap();
        drop(g);
        println!(
            "{kernels} step {step} t {t}: RSS {:.0} MiB",
            status_mib("VmRSS:")
        );
    }
}

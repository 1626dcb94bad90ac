//! Quantized base weights (GGUF Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0 kept in their block format): the loader,
//! the chat forward with candle's quantized matmul, and LoRA training over them, each against the same model
//! with those weights dequantized to dense f32.
//!
//! The quantized matmul also rounds the *activations* to 8 bits (as llama.cpp does), so the two forwards differ
//! by that rounding only; the tolerances below are a few times the differences measured on these models.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use termtune::engine::gguf::{load_gguf, load_gguf_quantized};
use termtune::engine::memory::BaseStorage;
use termtune::engine::model::{KvCache, Weight};
use termtune::engine::ops;
use termtune::engine::qweight::QWeight;
use termtune::engine::testing::{TinyOpts, tiny_llama};
use termtune::engine::weights::{ModelFiles, load_hf_folder, load_hf_folder_with};
use termtune::engine::{AttnMask, Finetune, LoraSpec, LoraTargets, Model};

use crate::tiny_util::{max_abs, max_abs_diff};

const CPU: Device = Device::Cpu;

/// The GGML block types a GGUF base keeps quantized in these tests: the K-quants, and the legacy 32-wide blocks
/// (Q5_0 and Q5_1 are what llama.cpp's K-quant files hold for rows not a multiple of 256 wide).
pub const TYPES: [GgmlDType; 8] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8_0,
];

fn lora(r: usize) -> Finetune {
    Finetune::Lora(LoraSpec {
        r,
        alpha: 16.0,
        dropout: 0.0,
        targets: LoraTargets::All,
        use_rslora: false,
        use_dora: false,
        seed: 7,
        init: Default::default(),
    })
}

/// A tiny random llama (in-features multiples of 256, as the K-quants' blocks need) as two model files: every
/// 2-D weight (linears and the tied embedding) quantized to `ty`, and the same weights dequantized (dense f32).
pub fn tiny_pair(dir: &std::path::Path, ty: GgmlDType) -> (ModelFiles, ModelFiles) {
    let opts = TinyOpts {
        hidden_size: 256,
        intermediate_size: 512,
        num_heads: 4,
        num_kv_heads: 2,
        ..TinyOpts::default()
    };
    tiny_llama(dir, 99, &opts).unwrap();
    crate::tiny_util::quantized_pair(dir, ty, |_| true)
}

pub fn prompt() -> Vec<u32> {
    (0..14u32).map(|i| (i * 37 + 5) % 300).collect()
}

/// Logits of the prompt and of one decoded token after it (KV-cache path).
fn cached_logits(m: &Model) -> (Tensor, Tensor) {
    let mut cache = KvCache::new(m.layers.len());
    let ids = Tensor::new(prompt().as_slice(), &CPU)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = m.forward_cached(&ids, &mut cache, false).unwrap();
    let next = Tensor::new(&[17u32], &CPU).unwrap().unsqueeze(0).unwrap();
    let b = m.forward_cached(&next, &mut cache, false).unwrap();
    (a, b)
}

#[test]
fn quantized_linear_backward_is_the_product_with_the_dequantized_weight() {
    let w = Tensor::randn(0f32, 0.05, (96, 256), &CPU).unwrap();
    let q = QWeight::new(Arc::new(QTensor::quantize(&w, GgmlDType::Q4K).unwrap())).unwrap();
    let wd = q.dequantize(&CPU).unwrap();
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5, 256), &CPU).unwrap())
        .unwrap();
    let gy = Tensor::randn(0f32, 1.0, (3, 5, 96), &CPU).unwrap();
    let y = ops::quantized_linear(x.as_tensor(), &q).unwrap();
    assert_eq!(y.dims(), [3, 5, 96]);
    // Forward: the dequantized product up to the 8-bit rounding of x.
    let dense = x.as_tensor().broadcast_matmul(&wd.t().unwrap()).unwrap();
    let rel = max_abs_diff(&y, &dense) / max_abs(&dense);
    assert!(rel < 0.02, "quantized forward off by {rel} (relative)");
    // Backward: dX = gy·W with W dequantized, and nothing for the weight.
    let g = (y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = g.get(x.as_tensor()).unwrap();
    let want = gy.broadcast_matmul(&wd).unwrap();
    assert!(max_abs_diff(dx, &want) < 1e-4);
}

/// Training's rule (`ops::quantized_linear`): under `QUANTIZED_DENSE_MIN_ROWS` rows the product rounds x to 8
/// bits (llama.cpp's kernels, termtune's own for Q4_1, Q8_0 and Q4_K here); from that many rows on (training steps) it is
/// the exact product with W dequantized, tracked or not, for Q4_1, Q8_0, Q4_K and Q3_K. Inference's rule
/// (`ops::quantized_linear_for_inference`, the KV-cached forward): an untracked x times a weight of a type with
/// termtune's own kernels (Q4_1; with AVX2 also Q8_0 and Q4_K; not Q3_K, which is candle's) runs them for any
/// number of rows (a prompt's too: each row's product is the one it has alone, up to the order of the float
/// additions), anything else follows training's rule.
#[test]
fn training_multiplies_many_rows_by_the_dequantized_weight_and_inference_keeps_the_integer_kernels()
{
    let n = ops::QUANTIZED_DENSE_MIN_ROWS;
    for ty in [
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4K,
        GgmlDType::Q3K,
    ] {
        let w = Tensor::randn(0f32, 0.05, (72, 512), &CPU).unwrap();
        let q = QWeight::new(Arc::new(QTensor::quantize(&w, ty).unwrap())).unwrap();
        let wd = q.dequantize(&CPU).unwrap();
        // Q8_0 and the K-quants where termtune's kernels are SIMD (an x86 CPU with AVX2); candle's elsewhere.
        let simd = termtune::engine::legacy_quants::Kernel::detect()
            != termtune::engine::legacy_quants::Kernel::Scalar;
        let integer_inference = ty == GgmlDType::Q4_1 || (simd && ty != GgmlDType::Q3K);
        for rows in [1, 7, n - 1, n, 3 * n] {
            let x = Tensor::randn(0f32, 1.0, (rows, 512), &CPU).unwrap();
            let dense = x.matmul(&wd.t().unwrap()).unwrap();
            let tracked = candle_core::Var::from_tensor(&x).unwrap();
            let exact = |y: &Tensor, what: &str, want: bool| {
                let rel = max_abs_diff(y, &dense) / max_abs(&dense);
                if want {
                    assert!(rel < 1e-6, "{what} {ty:?} {rows} rows: {rel}");
                } else {
                    assert!(rel > 1e-5 && rel < 0.02, "{what} {ty:?} {rows} rows: {rel}");
                }
            };
            for y in [
                ops::quantized_linear(&x, &q).unwrap(),
                ops::quantized_linear(tracked.as_tensor(), &q).unwrap(),
                ops::quantized_linear_for_inference(tracked.as_tensor(), &q).unwrap(),
            ] {
                exact(&y, "training", rows >= n);
            }
            let y = ops::quantized_linear_for_inference(&x, &q).unwrap();
            exact(&y, "inference", rows >= n && !integer_inference);
            if integer_inference {
                // Row by row (one row: the decode kernels) gives the same products.
                let scale = max_abs(&dense);
                for r in [0, rows / 2, rows - 1] {
                    let xr = x.narrow(0, r, 1).unwrap();
                    let one = ops::quantized_linear_for_inference(&xr, &q).unwrap();
                    let diff = max_abs_diff(&one, &y.narrow(0, r, 1).unwrap()) / scale;
                    assert!(diff < 1e-5, "inference {ty:?} row {r} of {rows}: {diff}");
                }
            }
        }
    }
}

#[test]
fn quantized_chat_forward_matches_the_dequantized_model_for_each_type() {
    for ty in TYPES {
        let dir = tempfile::tempdir().unwrap();
        let (quant, dense) = tiny_pair(dir.path(), ty);
        let mq = Model::from_files(&quant, DType::F32, &CPU, &Finetune::Frozen).unwrap();
        let md = Model::from_files(&dense, DType::F32, &CPU, &Finetune::Frozen).unwrap();
        // The linears and the embedding (also the tied lm_head) stay quantized: no dense copy is kept.
        assert!(matches!(mq.embed, Weight::Quantized(_)), "{ty:?}");
        for l in &mq.layers {
            for lin in l.linears() {
                assert!(matches!(lin.weight, Weight::Quantized(_)), "{ty:?}");
            }
        }
        let (qa, qb) = cached_logits(&mq);
        let (da, db) = cached_logits(&md);
        let scale = max_abs(&da).max(max_abs(&db));
        let diff = max_abs_diff(&qa, &da).max(max_abs_diff(&qb, &db)) / scale;
        eprintln!("{ty:?}: max |Δlogit| / max |logit| = {diff:.5}");
        assert!(diff < 0.03, "{ty:?}: relative logit difference {diff}");
    }
}

/// LoRA gradients over a quantized base (quantized forward, input gradient through the dequantized weight)
/// against the dequantized dense base, with the hand-written layer backward and with candle's graph.
#[test]
fn lora_gradients_over_a_quantized_base_match_the_dequantized_base() {
    for ty in [GgmlDType::Q4K, GgmlDType::Q8_0] {
        for manual in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (quant, dense) = tiny_pair(dir.path(), ty);
            let mut mq = Model::from_files(&quant, DType::F32, &CPU, &lora(4)).unwrap();
            let mut md = Model::from_files(&dense, DType::F32, &CPU, &lora(4)).unwrap();
            for (m, seed) in [(&mut mq, 5u64), (&mut md, 5u64)] {
                m.manual_backward = manual;
                // Non-zero B (as after some training), so A gets a gradient too; same values in both.
                for (i, (name, v)) in m.trainable_vars().iter().enumerate() {
                    if name.ends_with("lora_B.weight") {
                        let shape = v.dims().to_vec();
                        let mut rng = seed + i as u64;
                        let vals: Vec<f32> = (0..shape.iter().product::<usize>())
                            .map(|_| {
                                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
                                ((rng >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.2
                            })
                            .collect();
                        v.set(&Tensor::from_vec(vals, shape, &CPU).unwrap())
                            .unwrap();
                    }
                }
            }
            let ids: Vec<u32> = (0..2 * 16u32).map(|i| (i * 29 + 3) % 300).collect();
            let input = Tensor::from_vec(ids.clone(), (2, 16), &CPU).unwrap();
            let labels = Tensor::from_vec(
                ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(),
                (2, 16),
                &CPU,
            )
            .unwrap();
            let grads = |m: &Model| {
                let (loss, n) = m
                    .forward_loss(&input, &AttnMask::Causal, &labels, true)
                    .unwrap();
                let loss = (loss / n as f64).unwrap();
                let g = loss.backward().unwrap();
                let v: Vec<(String, Tensor)> = m
                    .trainable_vars()
                    .iter()
                    .map(|(k, v)| (k.clone(), g.get(v.as_tensor()).unwrap().clone()))
                    .collect();
                (loss.to_scalar::<f32>().unwrap(), v)
            };
            let (lq, gq) = grads(&mq);
            let (ld, gd) = grads(&md);
            assert!(
                (lq - ld).abs() < 2e-3 * ld.abs(),
                "{ty:?}: loss {lq} vs {ld}"
            );
            let (mut worst, mut norm) = (0f32, 0f32);
            for ((kq, a), (kd, b)) in gq.iter().zip(&gd) {
                assert_eq!(kq, kd);
                worst = worst.max(max_abs_diff(a, b));
                norm = norm.max(max_abs(b));
            }
            eprintln!(
                "{ty:?} manual={manual}: loss {lq} vs {ld}, max |Δgrad| / max |grad| = {:.5}",
                worst / norm
            );
            // Measured: 0.035 (Q4_K): the 8-bit rounding of the activations in the forward.
            assert!(
                worst < 0.08 * norm,
                "{ty:?} manual={manual}: {worst} vs {norm}"
            );
            // The base stayed quantized through the step (no dense copy swapped in).
            for l in &mq.layers {
                assert!(matches!(l.q.weight, Weight::Quantized(_)));
            }
        }
    }
}

/// A GGUF's quantized tied head runs in chunks like a dense one: dequantized once for the head pass, the loss, the
/// per-sequence log-probabilities and the LoRA gradients are those of the dequantized model (the full logits are
/// never formed), where the unchunked head rounds the activations to 8 bits on so few rows.
#[test]
fn a_quantized_head_runs_chunked_with_the_dequantized_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (mut quant, mut dense) = tiny_pair(dir.path(), GgmlDType::Q8_0);
    let md = Model::from_files(&dense, DType::F32, &CPU, &lora(4)).unwrap();
    // Only the tied embedding (the head) quantized; the decoder layers dense as in `md`.
    let embed = "model.embed_tokens.weight";
    dense.tensors.remove(embed).unwrap();
    dense
        .quantized
        .insert(embed.into(), quant.quantized.remove(embed).unwrap());
    let mut mq = Model::from_files(&dense, DType::F32, &CPU, &lora(4)).unwrap();
    assert!(matches!(mq.embed, Weight::Quantized(_)) && mq.lm_head.is_none());
    for m in [&md, &mq] {
        for (i, (name, v)) in m.trainable_vars().iter().enumerate() {
            if name.ends_with("lora_B.weight") {
                // The same non-zero B in both (as after some training), so A gets a gradient too.
                let n = v.elem_count();
                let vals: Vec<f32> = (0..n).map(|j| 0.002 * ((j * 7 + i) as f32).sin()).collect();
                v.set(&Tensor::from_vec(vals, v.dims(), &CPU).unwrap())
                    .unwrap();
            }
        }
    }
    let ids: Vec<u32> = (0..2 * 16u32).map(|i| (i * 29 + 3) % 300).collect();
    let input = Tensor::from_vec(ids.clone(), (2, 16), &CPU).unwrap();
    let labels: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    let labels = Tensor::from_vec(labels, (2, 16), &CPU).unwrap();
    let run = |m: &Model| {
        let (loss, n) = m
            .forward_loss(&input, &AttnMask::Causal, &labels, true)
            .unwrap();
        let loss = (loss / n as f64).unwrap();
        let g = loss.backward().unwrap();
        let grads: Vec<Tensor> = m
            .trainable_vars()
            .iter()
            .map(|(_, v)| g.get(v.as_tensor()).unwrap().clone())
            .collect();
        let lp = m
            .sequence_logps(&input, &AttnMask::Causal, &labels, None, true)
            .unwrap();
        let lg = lp.backward(&[1.0, -0.5]).unwrap();
        let lp_grads: Vec<Tensor> = m
            .trainable_vars()
            .iter()
            .map(|(_, v)| lg.get(v.as_tensor()).unwrap().clone())
            .collect();
        (loss.to_scalar::<f32>().unwrap(), grads, lp.logps, lp_grads)
    };
    let (ld, gd, pd, qd) = run(&md);
    let close = |a: &[Tensor], b: &[Tensor]| {
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| max_abs_diff(x, y))
            .fold(0f32, f32::max);
        let norm = b.iter().map(max_abs).fold(0f32, f32::max);
        worst / norm
    };
    mq.head_chunk_rows = Some(3);
    let (lq, gq, pq, qq) = run(&mq);
    assert!(
        (lq - ld).abs() < 1e-6 * ld.abs(),
        "chunked: loss {lq} vs {ld}"
    );
    assert!(
        close(&gq, &gd) < 1e-4,
        "chunked: gradients {}",
        close(&gq, &gd)
    );
    for (a, b) in pq.iter().zip(&pd) {
        assert!((a - b).abs() < 1e-4, "chunked: logps {pq:?} vs {pd:?}");
    }
    assert!(
        close(&qq, &qd) < 1e-4,
        "chunked: logps gradients {}",
        close(&qq, &qd)
    );
    mq.head_chunk_rows = None;
    let (lu, ..) = run(&mq);
    eprintln!("loss: dequantized {ld}, chunked {lq}, unchunked {lu}");
    assert!(
        (lu - ld).abs() > 1e-5 * ld.abs(),
        "unchunked: loss {lu} vs {ld}"
    );
}

#[test]
fn a_quantized_lora_model_merges_into_dense_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (quant, dense) = tiny_pair(dir.path(), GgmlDType::Q8_0);
    let mq = Model::from_files(&quant, DType::F32, &CPU, &lora(4)).unwrap();
    let md = Model::from_files(&dense, DType::F32, &CPU, &lora(4)).unwrap();
    let tq = mq.merged_tensors().unwrap();
    let td = md.merged_tensors().unwrap();
    assert_eq!(tq.len(), td.len());
    for (k, v) in &td {
        assert_eq!(max_abs_diff(&tq[k], v), 0.0, "{k}");
    }
}

// ------------------------------------------------------------------------------------- the real SmolLM2 GGUF

/// Every quantized tensor of the SmolLM2 Q4_1 file, kept quantized (Q/K rows regrouped as bytes), dequantizes
/// to exactly what the dequantizing loader gives; the dense remainder is the same too.
#[test]
fn smollm2_quantized_loader_equals_the_dequantizing_loader() {
    let path = termtune::testing::smollm2_gguf();
    let dense = load_gguf(&path, DType::F32, &CPU).unwrap();
    let quant = load_gguf_quantized(&path, DType::F32, &CPU).unwrap();
    // 30 layers × 7 linears + the embedding are quantized; the 61 norms are F32 in the file.
    assert_eq!(quant.quantized.len(), 30 * 7 + 1);
    assert_eq!(quant.tensors.len(), 30 * 2 + 1);
    let mut bytes = 0usize;
    for (name, q) in &quant.quantized {
        // The file's linears are Q4_1, its embedding Q8_0.
        let want_type = if name == "model.embed_tokens.weight" {
            GgmlDType::Q8_0
        } else {
            GgmlDType::Q4_1
        };
        assert_eq!(q.dtype(), want_type, "{name}");
        bytes += q.storage_size_in_bytes();
        let want = &dense.tensors[name];
        assert_eq!(
            max_abs_diff(&q.dequantize(&CPU).unwrap(), want),
            0.0,
            "{name}"
        );
    }
    for (name, t) in &quant.tensors {
        assert_eq!(max_abs_diff(t, &dense.tensors[name]), 0.0, "{name}");
    }
    // Q4_1 is 20 bytes per 32 weights: ~5.3× smaller than f32.
    let f32_bytes: usize = quant
        .quantized
        .values()
        .map(|q| q.shape().elem_count() * 4)
        .sum();
    assert!(
        bytes * 6 < f32_bytes + f32_bytes / 2,
        "{bytes} vs {f32_bytes}"
    );
}

/// The real file kept quantized against the same file dequantized: the logits of a chat prompt stay within 10 %
/// of the largest logit (measured: 5 %: candle's quantized kernels round the activations to 8 bits, as llama.cpp
/// does). That is enough to change SmolLM2-135M's greedy answer to this very prompt ("The capital of France is
/// Paris." dequantized), which is why `gguf_dequantize` exists.
#[test]
fn smollm2_quantized_logits_stay_close_to_the_dequantized_model() {
    let path = termtune::testing::smollm2_gguf();
    let dense = load_gguf(&path, DType::F32, &CPU).unwrap();
    let quant = load_gguf_quantized(&path, DType::F32, &CPU).unwrap();
    let cfg = termtune::engine::ModelConfig::from_hf_config(&dense.config).unwrap();
    let text = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
                <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let ids = dense
        .tokenizer
        .encode(text, false)
        .unwrap()
        .get_ids()
        .to_vec();
    let logits = |m: &Model| {
        let mut c = KvCache::new(m.layers.len());
        let x = Tensor::new(ids.as_slice(), &CPU)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        m.forward_cached(&x, &mut c, false).unwrap()
    };
    let none = HashMap::new();
    let md = Model::from_parts(
        cfg.clone(),
        &dense.tensors,
        &none,
        &HashMap::new(),
        DType::F32,
        &CPU,
        &Finetune::Frozen,
    )
    .unwrap();
    let mq = Model::from_parts(
        cfg,
        &quant.tensors,
        &quant.quantized,
        &HashMap::new(),
        DType::F32,
        &CPU,
        &Finetune::Frozen,
    )
    .unwrap();
    let (d, q) = (logits(&md), logits(&mq));
    let rel = max_abs_diff(&q, &d) / max_abs(&d);
    eprintln!("SmolLM2 Q4_1: max |Δlogit| / max |logit| = {rel:.4}");
    assert!(rel < 0.1, "{rel}");
    // The program's default for a named file: kept quantized; `gguf_dequantize: true` dequantizes on load (the
    // numbers transformers computes, which the chat_smollm2 tests check).
    let load = |gguf| crate::tiny_util::load_f32(&path, gguf);
    use termtune::engine::source::GgufWeights;
    assert!(load(GgufWeights::Dequantized).files.quantized.is_empty());
    let kept = load(GgufWeights::Quantized).files.quantized;
    assert_eq!(
        kept.len(),
        30 * 7 + 1,
        "{:?}",
        kept.keys().collect::<Vec<_>>()
    );
}

/// An sft LoRA preset over the tiny model and `varied_rows` (constant lr, a log line per step), with overrides.
fn sft_preset(root: &std::path::Path, out: &str, extra: &[&str]) -> termtune::config::Loaded {
    let text = format!(
        "model_name_or_path: {}\ndataset: toy\ndataset_dir: {}\ntemplate: chatml\ncutoff_len: 64\n\
         output_dir: {}\nlogging_steps: 1\nsave_steps: 1000\nper_device_train_batch_size: 2\n\
         learning_rate: 1.0e-2\nlora_rank: 4\nlr_scheduler_type: constant\ntokenized_path: {}\nseed: 3\n",
        root.join("model").display(),
        root.join("data").display(),
        root.join(out).display(),
        root.join("tokcache").display(),
    );
    let overrides: Vec<String> = extra.iter().map(|e| e.replacen(": ", "=", 1)).collect();
    termtune::config::parse(&text, &overrides, termtune::config::Purpose::Train)
        .unwrap_or_else(|e| panic!("{e:?}"))
}

fn step_losses(loaded: &termtune::config::Loaded) -> Vec<f64> {
    let (_tx, rx) = std::sync::mpsc::channel();
    let mut losses = Vec::new();
    termtune::trainer::run::run_training(loaded, &CPU, &rx, &mut |e| {
        if let termtune::trainer::protocol::TrainEvent::StepFinished(m) = e {
            losses.push(m.loss);
        }
    })
    .unwrap();
    losses
}

/// `quantization_bit: 8`: the decoder's linears become Q8_0 blocks at load (embeddings and norms stay dense), LoRA
/// trains over them and follows the dense run's losses closely, and the adapter is an ordinary PEFT adapter.
#[test]
fn quantization_bit_8_trains_lora_over_q8_0_linears_close_to_the_dense_base() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    crate::tiny_util::tiny_model_and_toy_data(root, &crate::tiny_util::varied_rows(12));
    // The loader's part: 7 linears per layer quantized, nothing else.
    let mut files = load_hf_folder(&root.join("model"), DType::F32, &CPU).unwrap();
    let dense_before = files.tensors.len();
    let q8 = BaseStorage::Linears(GgmlDType::Q8_0);
    let n = files.quantize_linears(q8, &CPU).unwrap();
    let cfg = termtune::engine::ModelConfig::from_hf_config(&files.config).unwrap();
    assert_eq!(n, 7 * cfg.num_layers);
    assert_eq!(files.quantized.len(), n);
    assert_eq!(files.tensors.len(), dense_before - n);
    assert!(files.tensors.contains_key("model.embed_tokens.weight"));
    // Quantized as read, weight by weight (what `quantization_bit` does): the same blocks, the same dense rest.
    let streamed = load_hf_folder_with(&root.join("model"), DType::F32, &CPU, q8).unwrap();
    assert_eq!(streamed.quantized.len(), n);
    for (name, q) in &files.quantized {
        assert_eq!(
            streamed.quantized[name].gguf_bytes().unwrap(),
            q.gguf_bytes().unwrap(),
            "{name}"
        );
    }
    let mut names: Vec<&String> = streamed.tensors.keys().collect();
    names.sort();
    let mut want: Vec<&String> = files.tensors.keys().collect();
    want.sort();
    assert_eq!(names, want);

    let dense = step_losses(&sft_preset(root, "dense", &["max_steps: 8"]));
    let q8 = step_losses(&sft_preset(
        root,
        "q8",
        &["max_steps: 8", "quantization_bit: 8"],
    ));
    assert_eq!(q8.len(), 8);
    eprintln!("dense {dense:?}\nq8    {q8:?}");
    for (i, (a, b)) in dense.iter().zip(&q8).enumerate() {
        assert!(
            (a - b).abs() < 0.02 * a.abs().max(1.0),
            "step {}: dense {a} vs q8 {b}",
            i + 1
        );
    }
    assert!(q8[7] < q8[0], "{q8:?}");
    // The adapter trained over the quantized base merges into the dense base.
    let mut m = Model::from_files(
        &load_hf_folder(&root.join("model"), DType::F32, &CPU).unwrap(),
        DType::F32,
        &CPU,
        &Finetune::Frozen,
    )
    .unwrap();
    termtune::engine::adapter::merge_adapters(&mut m, &[root.join("q8")]).unwrap();
}

/// `quantization_bit: 4` (NF4, double quantization, as LLaMA-Factory's defaults): the decoder's linears are held in
/// bitsandbytes' 4-bit layout and LoRA trains over them: its losses are those of a dense run over a copy of the
/// model whose linears hold the dequantized weights (the 4-bit forward and backward are exact products with them),
/// and stay near the dense base's (NF4 moves a weight by up to half a code step: on this tiny random model the
/// losses differ by up to 7 %, against Q8_0's 1 %). FP4 without double quantization runs too, and the adapter is an
/// ordinary PEFT adapter that merges into the dense base.
#[test]
fn quantization_bit_4_trains_lora_over_nf4_linears_like_the_dequantized_base() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    crate::tiny_util::tiny_model_and_toy_data(root, &crate::tiny_util::varied_rows(12));
    // The same model with its linears replaced by their NF4-dequantized values.
    let deq = root.join("model_nf4_dequantized");
    std::fs::create_dir_all(&deq).unwrap();
    for e in std::fs::read_dir(root.join("model")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "safetensors") {
            std::fs::copy(&p, deq.join(p.file_name().unwrap())).unwrap();
        }
    }
    let mut files = load_hf_folder(&root.join("model"), DType::F32, &CPU).unwrap();
    files
        .quantize_linears(
            BaseStorage::Bnb4(termtune::engine::bnb4::FourBit::Nf4, true),
            &CPU,
        )
        .unwrap();
    let mut tensors = files.tensors.clone();
    for (name, q) in &files.bnb4 {
        tensors.insert(name.clone(), q.dequantize().unwrap());
    }
    candle_core::safetensors::save(&tensors, deq.join("model.safetensors")).unwrap();

    let dense = step_losses(&sft_preset(root, "dense", &["max_steps: 8"]));
    let nf4 = step_losses(&sft_preset(
        root,
        "nf4",
        &["max_steps: 8", "quantization_bit: 4"],
    ));
    let over_deq = step_losses(&sft_preset(
        root,
        "deq",
        &[
            "max_steps: 8",
            &format!("model_name_or_path: {}", deq.display()),
        ],
    ));
    let fp4 = step_losses(&sft_preset(
        root,
        "fp4",
        &[
            "max_steps: 8",
            "quantization_bit: 4",
            "quantization_type: fp4",
            "double_quantization: false",
        ],
    ));
    eprintln!("dense {dense:?}\nnf4   {nf4:?}\ndeq   {over_deq:?}\nfp4   {fp4:?}");
    assert_eq!((nf4.len(), fp4.len(), over_deq.len()), (8, 8, 8));
    for (i, (((a, b), d), c)) in dense.iter().zip(&nf4).zip(&over_deq).zip(&fp4).enumerate() {
        assert!(
            (b - d).abs() < 1e-4 * d.abs().max(1.0),
            "step {}: nf4 {b} vs dense over the dequantized weights {d}",
            i + 1
        );
        assert!(
            (a - b).abs() < 0.12 * a.abs().max(1.0),
            "step {}: dense {a} vs nf4 {b}",
            i + 1
        );
        assert!(
            (a - c).abs() < 0.2 * a.abs().max(1.0),
            "step {}: dense {a} vs fp4 {c}",
            i + 1
        );
        assert!((b - c).abs() > 0.0, "nf4 and fp4 gave the same loss");
    }
    assert!(nf4[7] < nf4[0], "{nf4:?}");
    let mut m = Model::from_files(
        &load_hf_folder(&root.join("model"), DType::F32, &CPU).unwrap(),
        DType::F32,
        &CPU,
        &Finetune::Frozen,
    )
    .unwrap();
    termtune::engine::adapter::merge_adapters(&mut m, &[root.join("nf4")]).unwrap();

    // Chat with the QLoRA adapter: beside the 4-bit base (unmerged, the base stays 4-bit), the logits are those of
    // the dequantized base with the adapter merged.
    let chat = |extra: &[&str]| {
        let loaded = sft_preset(root, "unused", extra);
        termtune::chat::ChatSession::load(&loaded.preset, &CPU, &mut |_| {}).unwrap()
    };
    let adapter = format!("adapter_name_or_path: {}", root.join("nf4").display());
    let q = chat(&["quantization_bit: 4", &adapter]);
    assert!(!q.info.merged, "{}", q.info);
    assert!(q.info.to_string().contains("unmerged"), "{}", q.info);
    assert!(matches!(q.model.layers[0].q.weight, Weight::Bnb4(_)));
    assert!(q.model.layers[0].q.lora.is_some());
    let d = chat(&[&format!("model_name_or_path: {}", deq.display()), &adapter]);
    assert!(d.info.merged);
    let (lq, _) = cached_logits(&q.model);
    let (ld, _) = cached_logits(&d.model);
    let rel = max_abs_diff(&lq, &ld) / max_abs(&ld);
    assert!(
        rel < 1e-5,
        "4-bit + unmerged adapter vs dequantized + merged: {rel}"
    );

    // QDoRA (`use_dora` over the 4-bit base): DoRA's norms are taken of the dequantized weights, so training follows
    // the dense run over them, and chat (unmerged, its factor fixed once) answers as the merged dense model.
    let nf4_dora = step_losses(&sft_preset(
        root,
        "nf4_dora",
        &["max_steps: 4", "quantization_bit: 4", "use_dora: true"],
    ));
    let deq_dora = step_losses(&sft_preset(
        root,
        "deq_dora",
        &[
            "max_steps: 4",
            "use_dora: true",
            &format!("model_name_or_path: {}", deq.display()),
        ],
    ));
    for (i, (b, d)) in nf4_dora.iter().zip(&deq_dora).enumerate() {
        assert!(
            (b - d).abs() < 1e-4 * d.abs().max(1.0),
            "step {}: QDoRA {b} vs DoRA over the dequantized weights {d}",
            i + 1
        );
    }
    let adapter = format!("adapter_name_or_path: {}", root.join("nf4_dora").display());
    let q = chat(&["quantization_bit: 4", &adapter]);
    assert!(!q.info.merged, "{}", q.info);
    let d = chat(&[&format!("model_name_or_path: {}", deq.display()), &adapter]);
    let (lq, _) = cached_logits(&q.model);
    let (ld, _) = cached_logits(&d.model);
    let rel = max_abs_diff(&lq, &ld) / max_abs(&ld);
    assert!(rel < 1e-5, "QDoRA unmerged vs dequantized + merged: {rel}");
}

/// The memory estimate holds the quantized linears at Q8_0's 8.5 bits per weight, the rest dense.
#[test]
fn the_memory_estimate_counts_quantized_linears() {
    use termtune::engine::memory::{BaseStorage, base_weight_bytes};
    let cfg = crate::tiny_util::llama_8b_config();
    let ft = lora(16);
    let dense = base_weight_bytes(&cfg, &ft, DType::BF16, BaseStorage::Dense);
    let q8 = base_weight_bytes(
        &cfg,
        &ft,
        DType::BF16,
        BaseStorage::Linears(GgmlDType::Q8_0),
    );
    let linears: u64 = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336);
    assert_eq!(dense - q8, linears * 2 - linears * 34 / 32);
    let ratio = q8 as f64 / dense as f64;
    assert!((0.55..0.6).contains(&ratio), "{ratio}");
}

#[test]
fn unsupported_quantization_is_refused_with_the_fix() {
    for (kv, want) in [
        ("quantization_bit=3", "must be 4 or 8"),
        (
            "quantization_method=hqq",
            "`quantization_method: hqq` is not supported",
        ),
        ("quantization_method=gptq", "set `quantization_method: bnb`"),
        ("quantization_type=nf3", "quantization_type"),
        ("double_quantization=maybe", "double_quantization"),
    ] {
        let e = termtune::config::parse(
            "model_name_or_path: m\ndataset: d\n",
            &[kv.to_string()],
            termtune::config::Purpose::Train,
        )
        .expect_err(kv);
        let text = format!("{e:?}");
        assert!(text.contains(want), "{kv}: {text}");
    }
    for (text, key) in [
        (
            "model_name_or_path: m\ndataset: d\nfinetuning_type: full\nquantization_bit: 8\n",
            "quantization_bit",
        ),
        (
            "model_name_or_path: m.gguf\ndataset: d\nquantization_bit: 8\n",
            "quantization_bit",
        ),
        (
            "model_name_or_path: m\ndataset: d\nfinetuning_type: freeze\nquantization_bit: 4\n",
            "quantization_bit",
        ),
    ] {
        let issues =
            termtune::config::parse(text, &[], termtune::config::Purpose::Train).unwrap_err();
        assert!(issues.iter().any(|i| i.key == key), "{text}: {issues:?}");
    }
}

/// LLaMA-Factory's own QLoRA example (`examples/train_qlora/qwen3_lora_sft_otfq.yaml`: 4-bit bnb, LoRA on every
/// linear), pointed at a local Qwen3-shaped model and LF's demo data, trains as it stands (two of its steps).
#[test]
fn llamafactory_qlora_example_trains_unchanged() {
    use termtune::engine::ArchKind;
    use termtune::engine::testing::{TinyOpts, tiny_llama};
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let opts = TinyOpts {
        arch: ArchKind::Qwen3,
        ..TinyOpts::default()
    };
    tiny_llama(&model, 5, &opts).unwrap();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lf_examples/qwen3_lora_sft_otfq.yaml");
    let overrides = [
        format!("model_name_or_path={}", model.display()),
        format!(
            "dataset_dir={}",
            termtune::testing::lf_demo_data().display()
        ),
        format!("output_dir={}", dir.path().join("out").display()),
        format!("tokenized_path={}", dir.path().join("tok").display()),
        "max_steps=2".to_string(),
    ];
    let loaded = termtune::config::load(&example, &overrides, termtune::config::Purpose::Train)
        .unwrap_or_else(|e| panic!("{e}"));
    let p = &loaded.preset;
    assert_eq!(p.quantization_bit, Some(4));
    assert_eq!(
        (
            p.quantization_method,
            p.quantization_type,
            p.double_quantization
        ),
        (
            termtune::config::QuantizationMethod::Bnb,
            termtune::config::QuantizationType::Nf4,
            true
        )
    );
    let losses = step_losses(&loaded);
    assert_eq!(losses.len(), 2);
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    assert!(dir.path().join("out/adapter_model.safetensors").is_file());
}

//! Engine evidence on a tiny seeded random model (CPU, seconds): loaders, gradient checks, LoRA identities,
//! PEFT adapter round trip, KV cache, masks, fused-vs-pure kernels, generation.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::{D, DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use termtune::engine::adapter;
use termtune::engine::generate::{self, GenerationParams, StopReason, TextStreamer};
use termtune::engine::model::Kernels;
use termtune::engine::ops;
use termtune::engine::testing::{TinyOpts, tiny_llama};
use termtune::engine::weights::load_hf_folder;
use termtune::engine::{ArchKind, AttnMask, EngineError, Finetune, LoraSpec, LoraTargets, Model};

use crate::tiny_util::{assert_logits_0_5, ids, padded_batch};

const CPU: Device = Device::Cpu;

fn lora(targets: &str, r: usize) -> Finetune {
    Finetune::Lora(LoraSpec {
        r,
        alpha: 16.0,
        dropout: 0.0,
        targets: LoraTargets::parse(targets).unwrap(),
        use_rslora: false,
        use_dora: false,
        seed: 7,
        init: Default::default(),
    })
}

fn build(
    dir: &Path,
    opts: &TinyOpts,
    dtype: DType,
    ft: &Finetune,
) -> (Model, tokenizers::Tokenizer) {
    let tok = tiny_llama(dir, 1234, opts).unwrap();
    let files = load_hf_folder(dir, dtype, &CPU).unwrap();
    (Model::from_files(&files, dtype, &CPU, ft).unwrap(), tok)
}

fn seeded(shape: (usize, usize), seed: u64, std: f64, dtype: DType) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f64> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-std..std))
        .collect();
    Tensor::from_vec(v, shape, &CPU)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Give every LoRA B a seeded non-zero value (as after some training).
fn randomize_b(model: &Model, seed: u64) {
    for (i, (name, v)) in model.trainable_vars().iter().enumerate() {
        if name.ends_with("lora_B.weight") {
            let (o, r) = v.dims2().unwrap();
            v.set(&seeded((o, r), seed + i as u64, 0.2, v.dtype()))
                .unwrap();
        }
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    termtune::engine::testing::max_abs_diff(a, b).unwrap()
}

fn all_variants() -> Vec<TinyOpts> {
    vec![
        TinyOpts::default(),
        TinyOpts {
            tie_word_embeddings: false,
            ..TinyOpts::default()
        },
        TinyOpts {
            arch: ArchKind::Qwen2,
            ..TinyOpts::default()
        },
        TinyOpts {
            arch: ArchKind::Qwen3,
            tie_word_embeddings: false,
            ..TinyOpts::default()
        },
        TinyOpts {
            arch: ArchKind::Mistral,
            ..TinyOpts::default()
        },
        TinyOpts {
            arch: ArchKind::Gemma3,
            ..TinyOpts::default()
        },
    ]
}

#[test]
fn tiny_folder_loads_every_variant_and_gives_finite_logits() {
    for opts in all_variants() {
        let d = tempfile::tempdir().unwrap();
        let (m, tok) = build(d.path(), &opts, DType::F32, &Finetune::Frozen);
        assert_eq!(m.cfg.arch, opts.arch);
        assert_eq!(m.lm_head.is_none(), opts.tie_word_embeddings);
        assert_eq!(m.cfg.qkv_bias, opts.arch == ArchKind::Qwen2);
        assert_eq!(
            m.cfg.qk_norm,
            matches!(opts.arch, ArchKind::Qwen3 | ArchKind::Gemma3)
        );
        let enc = tok
            .encode("<|im_start|>user\nhello there<|im_end|>", false)
            .unwrap();
        assert_eq!(enc.get_ids()[0], tok.token_to_id("<|im_start|>").unwrap());
        let logits = m
            .forward(&ids(enc.get_ids(), 1), &AttnMask::Causal, false)
            .unwrap();
        assert_eq!(logits.dims(), &[1, enc.get_ids().len(), m.vocab_size()]);
        let s = logits.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(s.is_finite());
    }
}

#[test]
fn pickle_checkpoints_are_refused_and_sharded_index_loads() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path(), 1, &TinyOpts::default()).unwrap();
    let single = load_hf_folder(d.path(), DType::F32, &CPU).unwrap();
    // Re-shard into two files with an index, remove the single file.
    let names: Vec<String> = single.tensors.keys().cloned().collect();
    let (a, b): (Vec<_>, Vec<_>) = names.iter().partition(|n| n.contains("layers.0"));
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", &a),
        ("model-00002-of-00002.safetensors", &b),
    ] {
        let t: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), single.tensors[*n].clone()))
            .collect();
        termtune::engine::weights::save_safetensors(&t, &d.path().join(file)).unwrap();
        for n in part.iter() {
            map.insert((*n).clone(), file.into());
        }
    }
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let sharded = load_hf_folder(d.path(), DType::F32, &CPU).unwrap();
    assert_eq!(sharded.tensors.len(), single.tensors.len());
    for (k, t) in &single.tensors {
        assert_eq!(max_abs_diff(t, &sharded.tensors[k]), 0.0, "{k}");
    }
    // Pickle only → refused with an explanation.
    let p = tempfile::tempdir().unwrap();
    std::fs::copy(d.path().join("config.json"), p.path().join("config.json")).unwrap();
    std::fs::write(p.path().join("pytorch_model.bin"), b"not really a pickle").unwrap();
    let e = load_hf_folder(p.path(), DType::F32, &CPU).err().unwrap();
    assert!(matches!(e, EngineError::PickleRefused { .. }), "{e}");
    assert!(e.to_string().contains("safetensors"), "{e}");
}

#[test]
fn unsupported_model_type_and_bad_lora_target_are_clear_errors() {
    let e =
        termtune::engine::ModelConfig::from_hf_config(&serde_json::json!({"model_type": "phi3"}))
            .unwrap_err();
    assert!(
        e.to_string().contains("llama, mistral, qwen2, qwen3"),
        "{e}"
    );
    let e = LoraTargets::parse("q_proj,qkv").unwrap_err();
    assert!(e.to_string().contains("qkv"), "{e}");
    assert_eq!(LoraTargets::parse("all").unwrap().leaves().len(), 7);
}

/// Finite-difference check of dLoss/dA and dLoss/dB (f64) through embedding, RMSNorm, q/k norm (qwen3), RoPE,
/// GQA attention with a padding mask, SwiGLU (GeGLU and Gemma 3's norms and window), untied lm_head and the masked
/// loss, for both kernel sets.
/// Tolerance: relative error < 1e-3 (observed ~1e-8); central differences with h = 1e-5.
#[test]
fn lora_gradients_match_finite_differences_f64() {
    for (opts, kernels) in [
        (TinyOpts::default(), Kernels::Fused),
        (
            TinyOpts {
                arch: ArchKind::Qwen3,
                tie_word_embeddings: false,
                ..TinyOpts::default()
            },
            Kernels::Fused,
        ),
        (
            TinyOpts {
                arch: ArchKind::Qwen2,
                ..TinyOpts::default()
            },
            Kernels::Pure,
        ),
        // The same, with activation checkpointing and a chunked lm_head loss (flagged by Mistral below).
        (
            TinyOpts {
                arch: ArchKind::Mistral,
                ..TinyOpts::default()
            },
            Kernels::Fused,
        ),
        // Gemma 3: (1 + w) norms around attention and MLP, GeGLU, the sliding window, the embedding scale.
        (
            TinyOpts {
                arch: ArchKind::Gemma3,
                ..TinyOpts::default()
            },
            Kernels::Fused,
        ),
    ] {
        let d = tempfile::tempdir().unwrap();
        let (mut m, _) = build(d.path(), &opts, DType::F64, &lora("all", 4));
        m.kernels = kernels;
        m.checkpointing = opts.arch == ArchKind::Mistral;
        m.head_chunk_rows = (opts.arch == ArchKind::Mistral).then_some(2);
        randomize_b(&m, 99);
        let (input, mask, labels) = padded_batch();
        let loss_of = |m: &Model| {
            let (s, n) = m.forward_loss(&input, &mask, &labels, true).unwrap();
            (s / n as f64).unwrap()
        };
        let loss = loss_of(&m);
        let grads = loss.backward().unwrap();
        let vars = m.trainable_vars();
        let mut rng = StdRng::seed_from_u64(3);
        let mut checked = 0;
        for (name, v) in vars.iter().filter(|(n, _)| {
            n.contains("layers.0.self_attn.q_proj")
                || n.contains("layers.1.mlp.down_proj")
                || n.contains("layers.0.self_attn.k_proj")
                || n.contains("layers.1.self_attn.v_proj")
        }) {
            let g = grads
                .get(v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let orig = v.as_tensor().copy().unwrap();
            let n = orig.elem_count();
            for _ in 0..3 {
                let i = rng.random_range(0..n);
                let h = 1e-5;
                let mut flat = orig.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                flat[i] += h;
                v.set(&Tensor::from_vec(flat.clone(), orig.shape(), &CPU).unwrap())
                    .unwrap();
                let lp = loss_of(&m).to_scalar::<f64>().unwrap();
                flat[i] -= 2.0 * h;
                v.set(&Tensor::from_vec(flat, orig.shape(), &CPU).unwrap())
                    .unwrap();
                let lm = loss_of(&m).to_scalar::<f64>().unwrap();
                v.set(&orig).unwrap();
                let num = (lp - lm) / (2.0 * h);
                let rel = (num - g[i]).abs() / num.abs().max(g[i].abs()).max(1e-7);
                assert!(
                    rel < 1e-3,
                    "{:?} {kernels:?} {name}[{i}]: analytic {} numeric {num} rel {rel}",
                    opts.arch,
                    g[i]
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 24);
    }
}

#[test]
fn lora_with_zero_b_gives_base_logits_and_merge_matches_adapter() {
    for opts in all_variants() {
        let d = tempfile::tempdir().unwrap();
        let (base, _) = build(d.path(), &opts, DType::F32, &Finetune::Frozen);
        let files = load_hf_folder(d.path(), DType::F32, &CPU).unwrap();
        let mut m = Model::from_files(&files, DType::F32, &CPU, &lora("all", 8)).unwrap();
        let x = ids(&[1, 2, 3, 200, 201, 57, 88, 9], 1);
        let l0 = base.forward(&x, &AttnMask::Causal, false).unwrap();
        let l1 = m.forward(&x, &AttnMask::Causal, false).unwrap();
        assert_eq!(
            max_abs_diff(&l0, &l1),
            0.0,
            "B = 0 must be an exact identity"
        );
        randomize_b(&m, 5);
        let with_adapter = m.forward(&x, &AttnMask::Causal, false).unwrap();
        assert!(
            max_abs_diff(&l0, &with_adapter) > 1e-3,
            "the adapter must change the logits"
        );
        m.merge_lora().unwrap();
        let merged = m.forward(&x, &AttnMask::Causal, false).unwrap();
        let diff = max_abs_diff(&with_adapter, &merged);
        assert!(
            diff < 1e-4,
            "{:?}: base+adapter vs merged max diff {diff}",
            opts.arch
        );
    }
}

#[test]
fn adapter_save_load_is_bit_exact_with_peft_names_and_shapes() {
    let d = tempfile::tempdir().unwrap();
    let opts = TinyOpts {
        arch: ArchKind::Qwen2,
        ..TinyOpts::default()
    };
    let (m, _) = build(
        d.path(),
        &opts,
        DType::F32,
        &lora("q_proj,v_proj,down_proj", 4),
    );
    randomize_b(&m, 11);
    let out = tempfile::tempdir().unwrap();
    adapter::save_adapter(&m, out.path(), "HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
    // File layout as PEFT writes it.
    let bytes = std::fs::read(out.path().join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );
    let a = st
        .tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape(), &[4, 64]);
    let b = st
        .tensor("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
        .unwrap();
    assert_eq!(b.shape(), &[32, 4]);
    let dn = st
        .tensor("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")
        .unwrap();
    assert_eq!(dn.shape(), &[4, 128]);
    assert_eq!(st.len(), 2 * 3 * 2);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    for (k, v) in [
        ("peft_type", serde_json::json!("LORA")),
        ("task_type", serde_json::json!("CAUSAL_LM")),
        (
            "base_model_name_or_path",
            serde_json::json!("HuggingFaceTB/SmolLM2-135M-Instruct"),
        ),
        ("r", serde_json::json!(4)),
        ("lora_alpha", serde_json::json!(16.0)),
        ("lora_dropout", serde_json::json!(0.0)),
        (
            "target_modules",
            serde_json::json!(["v_proj", "q_proj", "down_proj"]),
        ),
        ("use_rslora", serde_json::json!(false)),
        ("bias", serde_json::json!("none")),
        ("fan_in_fan_out", serde_json::json!(false)),
        ("inference_mode", serde_json::json!(true)),
        ("use_dora", serde_json::json!(false)),
        ("modules_to_save", serde_json::Value::Null),
    ] {
        if k == "target_modules" {
            let mut got: Vec<String> = serde_json::from_value(cfg[k].clone()).unwrap();
            let mut want: Vec<String> = serde_json::from_value(v).unwrap();
            got.sort();
            want.sort();
            assert_eq!(got, want);
        } else {
            assert_eq!(cfg[k], v, "{k}");
        }
    }
    // Load into a fresh base: every tensor bit-identical, logits identical.
    let files = load_hf_folder(d.path(), DType::F32, &CPU).unwrap();
    let mut m2 = Model::from_files(&files, DType::F32, &CPU, &Finetune::Frozen).unwrap();
    adapter::load_adapter_trainable(&mut m2, out.path()).unwrap();
    let v1 = m.trainable_vars();
    let v2 = m2.trainable_vars();
    assert_eq!(v1.len(), v2.len());
    for ((n1, a), (n2, b)) in v1.iter().zip(&v2) {
        assert_eq!(n1, n2);
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len(), "{n1}");
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{n1}"
        );
    }
    let x = ids(&[3, 4, 5, 6], 1);
    let l1 = m.forward(&x, &AttnMask::Causal, false).unwrap();
    let l2 = m2.forward(&x, &AttnMask::Causal, false).unwrap();
    assert_eq!(max_abs_diff(&l1, &l2), 0.0);
    // Stacking a,b for inference = merging both.
    let mut m3 = Model::from_files(&files, DType::F32, &CPU, &Finetune::Frozen).unwrap();
    adapter::merge_adapters(
        &mut m3,
        &adapter::parse_adapter_list(&format!("{0},{0}", out.path().display())),
    )
    .unwrap();
    let mut m4 = Model::from_files(&files, DType::F32, &CPU, &Finetune::Frozen).unwrap();
    adapter::load_adapter_trainable(&mut m4, out.path()).unwrap();
    for (n, v) in m4.trainable_vars() {
        if n.ends_with("lora_B.weight") {
            v.set(&(v.as_tensor() * 2.0).unwrap()).unwrap(); // two identical adapters = one with 2·B
        }
    }
    let d34 = max_abs_diff(
        &m3.forward(&x, &AttnMask::Causal, false).unwrap(),
        &m4.forward(&x, &AttnMask::Causal, false).unwrap(),
    );
    assert!(d34 < 1e-4, "stacked merge diff {d34}");
}

#[test]
fn only_lora_tensors_get_gradients_and_all_of_them_nonzero() {
    let d = tempfile::tempdir().unwrap();
    let (m, _) = build(d.path(), &TinyOpts::default(), DType::F32, &lora("all", 4));
    let x = ids(&[5, 6, 7, 8, 9, 10, 11, 12], 1);
    let labels = Tensor::new(&[[5i64, 6, 7, 8, 9, 10, 11, 12]], &CPU).unwrap();
    let vars = m.trainable_vars();
    assert_eq!(vars.len(), 2 * 7 * 2);
    let step = |m: &Model| {
        let (s, n) = m
            .forward_loss(&x, &AttnMask::Causal, &labels, true)
            .unwrap();
        (s / n as f64).unwrap().backward().unwrap()
    };
    let g = step(&m);
    // Besides the LoRA Vars, the GradStore may only hold activation-sized leaves of the first layer (the
    // untracked embedding output in the residual add and the q/k/v inputs that meet LoRA branches: 7 tensors of
    // t × hidden elements): no frozen weight, norm, mask or RoPE-table buffers.
    let var_ids: Vec<_> = vars.iter().map(|(_, v)| v.id()).collect();
    let extras: Vec<_> = g.get_ids().filter(|id| !var_ids.contains(id)).collect();
    assert!(extras.len() <= 7, "{} extra gradient buffers", extras.len());
    for id in extras {
        let n = g.get_id(*id).unwrap().elem_count();
        assert!(n <= 8 * 64, "extra gradient of {n} elements");
    }
    for l in &m.layers {
        for lin in l.linears() {
            assert!(
                g.get(&lin.weight.tensor().unwrap()).is_none(),
                "{} got a gradient",
                lin.name
            );
        }
        assert!(g.get(&l.input_norm.tensor().unwrap()).is_none());
    }
    assert!(g.get(&m.embed.tensor().unwrap()).is_none());
    // Gradients must be plain values: a gradient that still tracks the forward graph would keep it alive in the
    // optimizer state (one leaked graph per step).
    for (n, v) in &vars {
        assert!(
            !g.get(v).unwrap().track_op(),
            "{n}: gradient carries an autograd graph"
        );
    }
    // At init B = 0, so dA = 0 exactly (as in PEFT); B gets a non-zero gradient. After one SGD step, all do.
    for (n, v) in &vars {
        let norm = g
            .get(v)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if n.contains("lora_B") {
            assert!(norm > 0.0, "{n}");
        }
    }
    use candle_nn::Optimizer;
    let mut sgd = candle_nn::SGD::new(vars.iter().map(|(_, v)| v.clone()).collect(), 0.1).unwrap();
    sgd.step(&g).unwrap();
    let g2 = step(&m);
    for (n, v) in &vars {
        let norm = g2
            .get(v)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{n} got a zero gradient");
    }
}

#[test]
fn freeze_and_full_expose_the_right_trainable_vars() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path(), 3, &TinyOpts::default()).unwrap();
    let files = load_hf_folder(d.path(), DType::F32, &CPU).unwrap();
    let last = Model::from_files(&files, DType::F32, &CPU, &Finetune::freeze(1)).unwrap();
    let names: Vec<String> = last.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 9);
    assert!(
        names.iter().all(|n| n.starts_with("model.layers.1.")),
        "{names:?}"
    );
    let first = Model::from_files(&files, DType::F32, &CPU, &Finetune::freeze(-1)).unwrap();
    assert!(
        first
            .trainable_vars()
            .iter()
            .all(|(n, _)| n.starts_with("model.layers.0."))
    );
    let full = Model::from_files(&files, DType::F32, &CPU, &Finetune::Full).unwrap();
    let (tr, total) = full.param_counts();
    assert_eq!(tr, total);
    // Gradients reach a trainable norm weight and an attention weight in freeze mode.
    let x = ids(&[5, 6, 7, 8], 1);
    let labels = Tensor::new(&[[5i64, 6, 7, 8]], &CPU).unwrap();
    let (s, _) = last
        .forward_loss(&x, &AttnMask::Causal, &labels, true)
        .unwrap();
    let g = s.backward().unwrap();
    for (n, v) in last.trainable_vars() {
        let norm = g
            .get(&v)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{n}");
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    for opts in all_variants() {
        let d = tempfile::tempdir().unwrap();
        let (m, _) = build(d.path(), &opts, DType::F32, &lora("all", 4));
        randomize_b(&m, 1);
        let seq: Vec<u32> = vec![1, 50, 60, 70, 80, 90, 100, 110, 120, 130];
        let full = m.forward(&ids(&seq, 1), &AttnMask::Causal, false).unwrap();
        let mut cache = termtune::engine::KvCache::new(m.layers.len());
        let pre = m
            .forward_cached(&ids(&seq[..4], 1), &mut cache, false)
            .unwrap();
        assert!(max_abs_diff(&pre, &full.narrow(1, 0, 4).unwrap()) < 1e-4);
        for (i, t) in seq.iter().enumerate().skip(4) {
            let step = m.forward_cached(&ids(&[*t], 1), &mut cache, true).unwrap();
            let diff = max_abs_diff(&step, &full.narrow(1, i, 1).unwrap());
            assert!(diff < 1e-4, "{:?} position {i}: {diff}", opts.arch);
        }
    }
}

#[test]
fn left_padded_batch_generation_equals_each_row_alone() {
    for opts in all_variants() {
        let d = tempfile::tempdir().unwrap();
        let (m, _) = build(d.path(), &opts, DType::F32, &lora("all", 4));
        randomize_b(&m, 3);
        let prompts: Vec<Vec<u32>> = vec![
            vec![1, 50, 60],
            vec![1, 70, 80, 90, 100, 110, 120],
            vec![1, 130, 140, 150, 160],
        ];
        // The padded prefill gives each row the logits it has alone.
        let longest = 7;
        let mut flat = Vec::new();
        let pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
        for p in &prompts {
            flat.extend(std::iter::repeat_n(0u32, longest - p.len()));
            flat.extend_from_slice(p);
        }
        let batch = Tensor::from_vec(flat, (3, longest), &Device::Cpu).unwrap();
        let mut cache = termtune::engine::KvCache::new(m.layers.len());
        let padded = m
            .forward_cached_padded(&batch, &mut cache, &pads, false)
            .unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let mut own = termtune::engine::KvCache::new(m.layers.len());
            let alone = m.forward_cached(&ids(p, 1), &mut own, false).unwrap();
            let row = padded.get(i).unwrap().narrow(0, pads[i], p.len()).unwrap();
            let diff = max_abs_diff(&row, &alone.get(0).unwrap());
            assert!(diff < 1e-4, "{:?} row {i}: {diff}", opts.arch);
        }
        // Greedy answers equal, including a row that stops at once (it leaves the batch) and rows
        // that stop later than others.
        let params = GenerationParams {
            max_new_tokens: 6,
            ..GenerationParams::default()
        };
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                generate::generate(&m, p, &params, &[], None, |_| ControlFlow::Continue(()))
                    .unwrap()
                    .0
            })
            .collect();
        let stop = alone[1][0];
        let mut seen = vec![Vec::new(); 3];
        let batched = generate::generate_batch(&m, &prompts, &params, &[stop], None, |row, id| {
            seen[row].push(id);
        })
        .unwrap();
        for (i, (tokens, why)) in batched.iter().enumerate() {
            let cut = alone[i].iter().position(|&t| t == stop);
            let expect = &alone[i][..cut.unwrap_or(alone[i].len())];
            assert_eq!(tokens.as_slice(), expect, "{:?} row {i}", opts.arch);
            assert_eq!(&seen[i], tokens);
            let want = if cut.is_some() {
                StopReason::Stop(stop)
            } else {
                StopReason::MaxTokens
            };
            assert_eq!(*why, want, "{:?} row {i}", opts.arch);
        }
        assert_eq!(batched[1].1, StopReason::Stop(stop));
        assert!(batched[1].0.is_empty());
        // Sampled rows draw from their own generator: the same answer as alone.
        let sampled = GenerationParams {
            max_new_tokens: 5,
            temperature: 0.9,
            seed: 7,
            ..GenerationParams::default()
        };
        let batched =
            generate::generate_batch(&m, &prompts, &sampled, &[], None, |_, _| {}).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let (one, _) =
                generate::generate(&m, p, &sampled, &[], None, |_| ControlFlow::Continue(()))
                    .unwrap();
            assert_eq!(batched[i].0, one, "{:?} sampled row {i}", opts.arch);
        }
        // Cancelled before the first step: every row says so.
        let cancel = AtomicBool::new(true);
        let out =
            generate::generate_batch(&m, &prompts, &params, &[], Some(&cancel), |_, _| {}).unwrap();
        assert!(
            out.iter()
                .all(|(t, w)| t.is_empty() && *w == StopReason::Cancelled)
        );
        assert!(generate::generate_batch(&m, &[vec![]], &params, &[], None, |_, _| {}).is_err());

        // The inference layout (weights stored transposed) gives the same logits and answers.
        let (mut prepared, _) = build(d.path(), &opts, DType::F32, &Finetune::Frozen);
        let (plain, _) = build(d.path(), &opts, DType::F32, &Finetune::Frozen);
        prepared.prepare_for_inference().unwrap();
        for p in &prompts {
            let mut c1 = termtune::engine::KvCache::new(plain.layers.len());
            let mut c2 = termtune::engine::KvCache::new(plain.layers.len());
            let a = plain.forward_cached(&ids(p, 1), &mut c1, false).unwrap();
            let b = prepared.forward_cached(&ids(p, 1), &mut c2, false).unwrap();
            assert!(max_abs_diff(&a, &b) < 1e-5, "{:?}", opts.arch);
        }
        let a = generate::generate_batch(&plain, &prompts, &params, &[], None, |_, _| {}).unwrap();
        let b =
            generate::generate_batch(&prepared, &prompts, &params, &[], None, |_, _| {}).unwrap();
        assert_eq!(a, b, "{:?}", opts.arch);
    }
}

#[test]
fn packed_examples_do_not_attend_to_each_other() {
    let d = tempfile::tempdir().unwrap();
    let (m, _) = build(d.path(), &TinyOpts::default(), DType::F32, &lora("all", 4));
    randomize_b(&m, 2);
    let ex1a = [10u32, 11, 12, 13];
    let ex1b = [200u32, 201, 202, 203];
    let ex2 = [30u32, 31, 32];
    let pack = |ex1: &[u32]| {
        let mut v = ex1.to_vec();
        v.extend_from_slice(&ex2);
        v.push(0); // padding
        ids(&v, 1)
    };
    let mask = AttnMask::Packed {
        seq_ids: Tensor::new(&[[1u32, 1, 1, 1, 2, 2, 2, 0]], &CPU).unwrap(),
        position_ids: Tensor::new(&[[0u32, 1, 2, 3, 0, 1, 2, 0]], &CPU).unwrap(),
        branch_ids: None,
    };
    let la = m.forward(&pack(&ex1a), &mask, false).unwrap();
    let lb = m.forward(&pack(&ex1b), &mask, false).unwrap();
    assert!(max_abs_diff(&la.narrow(1, 0, 4).unwrap(), &lb.narrow(1, 0, 4).unwrap()) > 1e-3);
    assert_eq!(
        max_abs_diff(&la.narrow(1, 4, 3).unwrap(), &lb.narrow(1, 4, 3).unwrap()),
        0.0
    );
    // And example 2 inside the pack equals example 2 alone (positions restart at 0).
    let alone = m.forward(&ids(&ex2, 1), &AttnMask::Causal, false).unwrap();
    assert!(max_abs_diff(&la.narrow(1, 4, 3).unwrap(), &alone) < 1e-5);
}

#[test]
fn right_padding_does_not_change_real_positions() {
    let d = tempfile::tempdir().unwrap();
    let (m, _) = build(
        d.path(),
        &TinyOpts {
            arch: ArchKind::Qwen2,
            ..TinyOpts::default()
        },
        DType::F32,
        &Finetune::Frozen,
    );
    let a = [7u32, 8, 9, 10, 11, 12];
    let b = [40u32, 41, 42];
    let batch = ids(&[7, 8, 9, 10, 11, 12, 40, 41, 42, 0, 0, 0], 2);
    let mask = AttnMask::Padding {
        attention_mask: Tensor::new(&[[1u32; 6], [1, 1, 1, 0, 0, 0]], &CPU).unwrap(),
    };
    let lb = m.forward(&batch, &mask, false).unwrap();
    let la1 = m.forward(&ids(&a, 1), &AttnMask::Causal, false).unwrap();
    let lb1 = m.forward(&ids(&b, 1), &AttnMask::Causal, false).unwrap();
    assert!(max_abs_diff(&lb.get(0).unwrap().unsqueeze(0).unwrap(), &la1) < 1e-5);
    assert!(
        max_abs_diff(
            &lb.get(1)
                .unwrap()
                .narrow(0, 0, 3)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            &lb1
        ) < 1e-5
    );
}

/// `a` equals `b` to 1e-5 relative to b's largest entry.
fn close(a: &Tensor, b: &Tensor, what: &str) {
    let scale = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1e-6);
    let d = max_abs_diff(a, b);
    assert!(d / scale < 1e-5, "{what}: max diff {d} (scale {scale})");
}

/// Each fused kernel against its pure-op version: values and input gradients (f32, tolerance 1e-5 relative).
#[test]
fn fused_kernels_match_pure_ops_values_and_gradients() {
    let r = |shape: &[usize], seed: u64| {
        let n: usize = shape.iter().product();
        let t = seeded((1, n), seed, 1.0, DType::F32)
            .reshape(shape)
            .unwrap();
        Var::from_tensor(&t).unwrap()
    };
    let probe = |shape: &[usize], seed: u64| {
        seeded((1, shape.iter().product()), seed, 1.0, DType::F32)
            .reshape(shape)
            .unwrap()
    };
    // RMSNorm with trainable weight.
    let (x, w) = (r(&[2, 3, 16], 1), r(&[16], 2));
    let p = probe(&[2, 3, 16], 3);
    let f = ops::fused::rms_norm(&x, &w, 1e-5).unwrap();
    let q = ops::rms_norm_pure(&x, &w, 1e-5).unwrap();
    close(&f, &q, "rms value");
    let gf = (f * &p).unwrap().sum_all().unwrap().backward().unwrap();
    let gq = (q * &p).unwrap().sum_all().unwrap().backward().unwrap();
    close(gf.get(&x).unwrap(), gq.get(&x).unwrap(), "rms dx");
    close(gf.get(&w).unwrap(), gq.get(&w).unwrap(), "rms dw");
    // RoPE with per-batch tables.
    let x = r(&[2, 3, 5, 8], 4);
    let cos = probe(&[2, 1, 5, 4], 5).cos().unwrap();
    let sin = probe(&[2, 1, 5, 4], 5).sin().unwrap();
    let p = probe(&[2, 3, 5, 8], 6);
    let f = ops::fused::rope(&x, &cos, &sin).unwrap();
    let q = ops::rope_pure(&x, &cos, &sin).unwrap();
    close(&f, &q, "rope value");
    let gf = (f * &p).unwrap().sum_all().unwrap().backward().unwrap();
    let gq = (q * &p).unwrap().sum_all().unwrap().backward().unwrap();
    close(gf.get(&x).unwrap(), gq.get(&x).unwrap(), "rope dx");
    // Masked softmax.
    let x = r(&[2, 3, 5, 5], 7);
    let mut bias = vec![0f32; 2 * 25];
    for (i, b) in bias.iter_mut().enumerate() {
        if (i % 5) > (i / 5) % 5 {
            *b = -1e9;
        }
    }
    let bias = Tensor::from_vec(bias, (2, 1, 5, 5), &CPU).unwrap();
    let p = probe(&[2, 3, 5, 5], 8);
    let f = ops::fused::masked_softmax(&x, &bias, 0.125).unwrap();
    let q = ops::softmax_pure(&(&*x * 0.125).unwrap().broadcast_add(&bias).unwrap()).unwrap();
    close(&f, &q, "softmax value");
    let gf = (f * &p).unwrap().sum_all().unwrap().backward().unwrap();
    let gq = (q * &p).unwrap().sum_all().unwrap().backward().unwrap();
    close(gf.get(&x).unwrap(), gq.get(&x).unwrap(), "softmax dx");
    // Attention with GQA (6 query heads on 2 kv heads) and a per-batch mask.
    let (q, k, v) = (
        r(&[2, 6, 5, 4], 20),
        r(&[2, 2, 5, 4], 21),
        r(&[2, 2, 5, 4], 22),
    );
    let p = probe(&[2, 6, 5, 4], 23);
    let f = ops::fused::attention(&q, &k, &v, &bias, 0.5).unwrap();
    let kr = candle_transformers::utils::repeat_kv(k.as_tensor().clone(), 3).unwrap();
    let vr = candle_transformers::utils::repeat_kv(v.as_tensor().clone(), 3).unwrap();
    let att = (q.matmul(&kr.t().unwrap()).unwrap() * 0.5)
        .unwrap()
        .broadcast_add(&bias)
        .unwrap();
    let qq = ops::softmax_pure(&att).unwrap().matmul(&vr).unwrap();
    close(&f, &qq, "attention value");
    let gf = (f * &p).unwrap().sum_all().unwrap().backward().unwrap();
    let gq = (qq * &p).unwrap().sum_all().unwrap().backward().unwrap();
    close(gf.get(&q).unwrap(), gq.get(&q).unwrap(), "attention dq");
    close(gf.get(&k).unwrap(), gq.get(&k).unwrap(), "attention dk");
    close(gf.get(&v).unwrap(), gq.get(&v).unwrap(), "attention dv");
    // SwiGLU.
    let (g, u) = (r(&[3, 7, 11], 9), r(&[3, 7, 11], 10));
    let p = probe(&[3, 7, 11], 11);
    let f = ops::fused::swiglu(&g, &u).unwrap();
    let q = ops::swiglu_pure(&g, &u).unwrap();
    close(&f, &q, "swiglu value");
    let gf = (f * &p).unwrap().sum_all().unwrap().backward().unwrap();
    let gq = (q * &p).unwrap().sum_all().unwrap().backward().unwrap();
    close(gf.get(&g).unwrap(), gq.get(&g).unwrap(), "swiglu dg");
    close(gf.get(&u).unwrap(), gq.get(&u).unwrap(), "swiglu du");
    // Cross-entropy.
    let x = r(&[6, 13], 12);
    let tg = Tensor::new(&[0u32, 12, 5, 5, 7, 1], &CPU).unwrap();
    let f = ops::fused::cross_entropy_sum(&x, &tg, ops::TokenLoss::PLAIN).unwrap();
    let q = ops::nll_sum_pure(&x, &tg, &Tensor::ones(6, DType::F32, &CPU).unwrap()).unwrap();
    close(&f, &q, "ce value");
    let gf = (f * 0.7).unwrap().backward().unwrap();
    let gq = (q * 0.7).unwrap().backward().unwrap();
    close(gf.get(&x).unwrap(), gq.get(&x).unwrap(), "ce dx");
    // Whole model: loss and every LoRA gradient, fused vs pure.
    model_loss_fused_and_pure(ArchKind::Qwen3, ops::TokenLoss::PLAIN, 4);
}

/// A tiny model's loss with `token_loss`: the fused and the pure (candle autograd) paths give the same loss and
/// LoRA gradients; returns the loss.
fn model_loss_fused_and_pure(arch: ArchKind, token_loss: ops::TokenLoss, seed: u64) -> f64 {
    let d = tempfile::tempdir().unwrap();
    let opts = TinyOpts {
        arch,
        ..TinyOpts::default()
    };
    let (mut m, _) = build(d.path(), &opts, DType::F32, &lora("all", 4));
    randomize_b(&m, seed);
    m.token_loss = token_loss;
    let x = ids(&[5, 6, 7, 8, 9, 10], 1);
    let labels = Tensor::new(&[[5i64, 6, 7, 8, 9, 10]], &CPU).unwrap();
    let (lf, _) = m
        .forward_loss(&x, &AttnMask::Causal, &labels, true)
        .unwrap();
    let gf = lf.backward().unwrap();
    m.kernels = Kernels::Pure;
    let (lq, _) = m
        .forward_loss(&x, &AttnMask::Causal, &labels, true)
        .unwrap();
    let gq = lq.backward().unwrap();
    close(&lf, &lq, "model loss");
    for (n, v) in m.trainable_vars() {
        close(gf.get(&v).unwrap(), gq.get(&v).unwrap(), &n);
    }
    lq.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

const SMOOTH: ops::TokenLoss = ops::TokenLoss {
    smoothing: 0.1,
    ..ops::TokenLoss::PLAIN
};

/// The logits and targets of scripts/label_smoothing_reference.py: x[i][j] = 3·sin(0.37·i + 0.11·j²), 5 counted
/// tokens × 11, targets (3·i + 1) mod 11.
fn reference_logits() -> (Tensor, Tensor) {
    let x: Vec<f64> = (0..5)
        .flat_map(|i| {
            (0..11).map(move |j| 3.0 * (0.37 * f64::from(i) + 0.11 * f64::from(j * j)).sin())
        })
        .collect();
    (
        Tensor::from_vec(x, (5, 11), &CPU).unwrap(),
        Tensor::new(&[1u32, 4, 7, 10, 2], &CPU).unwrap(),
    )
}

/// `label_smoothing_factor`: the fused, generic and pure losses equal transformers' `LabelSmoother` (epsilon 0.1,
/// scripts/label_smoothing_reference.py), the fused gradient equals finite differences, and on a whole model the
/// fused and pure paths give the same loss and LoRA gradients.
#[test]
fn label_smoothing_matches_transformers() {
    let (x, tg) = reference_logits();
    // LabelSmoother sums the smoothed term in float32 (`dtype=torch.float32`), hence 1e-7 relative.
    let want = 3.5150883855563304;
    let per_token = |t: &Tensor| t.to_scalar::<f64>().unwrap() / 5.0;
    let fused = ops::fused::cross_entropy_sum(&x, &tg, SMOOTH).unwrap();
    assert!(
        (per_token(&fused) / want - 1.0).abs() < 1e-7,
        "{}",
        per_token(&fused)
    );
    let (with_grad, g) = ops::fused::cross_entropy_sum_and_grad(&x, &tg, SMOOTH, true).unwrap();
    assert!((per_token(&with_grad) - per_token(&fused)).abs() < 1e-12);
    let generic = ops::generic::cross_entropy_sum(&x, &tg, SMOOTH).unwrap();
    assert!((per_token(&generic) - per_token(&fused)).abs() < 1e-12);
    let (_, gg) = ops::generic::cross_entropy_sum_and_grad(&x, &tg, SMOOTH, true).unwrap();
    // Central differences of the loss sum, entry by entry.
    let g = g.unwrap().to_vec2::<f64>().unwrap();
    let gg = gg.unwrap().to_vec2::<f64>().unwrap();
    let base = x.to_vec2::<f64>().unwrap();
    let h = 1e-6;
    for i in 0..5 {
        for j in 0..11 {
            let at = |d: f64| {
                let mut v = base.clone();
                v[i][j] += d;
                let t = Tensor::new(v, &CPU).unwrap();
                ops::fused::cross_entropy_sum(&t, &tg, SMOOTH)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (g[i][j] - fd).abs() < 1e-7,
                "({i},{j}): {} vs {fd}",
                g[i][j]
            );
            assert!(
                (gg[i][j] - fd).abs() < 1e-7,
                "generic ({i},{j}): {} vs {fd}",
                gg[i][j]
            );
        }
    }
    // The autograd backward of the fused op agrees with the returned gradient.
    let v = Var::from_tensor(&x).unwrap();
    let grads = ops::fused::cross_entropy_sum(v.as_tensor(), &tg, SMOOTH)
        .unwrap()
        .backward()
        .unwrap();
    let gb = grads.get(v.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
    for i in 0..5 {
        for j in 0..11 {
            assert!((gb[i][j] - g[i][j]).abs() < 1e-12);
        }
    }

    // A whole model: fused and pure (candle autograd) agree with smoothing on, and smoothing changes the loss
    // (the test would notice it being ignored).
    let (smoothed, plain) = (
        model_loss_fused_and_pure(ArchKind::Llama, SMOOTH, 4),
        model_loss_fused_and_pure(ArchKind::Llama, ops::TokenLoss::PLAIN, 4),
    );
    assert!((smoothed - plain).abs() > 1e-3, "{smoothed} vs {plain}");
}

/// `use_dft_loss`: fused and generic losses equal LLaMA-Factory's `_dft_cross_entropy`
/// (scripts/label_smoothing_reference.py), their gradients are the detached-weight gradient p[t]·(softmax −
/// one-hot), and on a whole model fused and pure paths agree.
#[test]
fn dft_loss_matches_llamafactory() {
    let dft = ops::TokenLoss {
        dft: true,
        ..ops::TokenLoss::PLAIN
    };
    let (x, tg) = reference_logits();
    let per_token = |t: &Tensor| t.to_scalar::<f64>().unwrap() / 5.0;
    let want = 0.15932908285716707;
    let fused = ops::fused::cross_entropy_sum(&x, &tg, dft).unwrap();
    assert!(
        (per_token(&fused) - want).abs() < 1e-12,
        "{}",
        per_token(&fused)
    );
    let generic = ops::generic::cross_entropy_sum(&x, &tg, dft).unwrap();
    assert!((per_token(&generic) - want).abs() < 1e-12);
    let (_, g) = ops::fused::cross_entropy_sum_and_grad(&x, &tg, dft, true).unwrap();
    let (_, gg) = ops::generic::cross_entropy_sum_and_grad(&x, &tg, dft, true).unwrap();
    // The expected gradient, by hand: p[t]·(softmax − one-hot) per row.
    let rows = x.to_vec2::<f64>().unwrap();
    let t = tg.to_vec1::<u32>().unwrap();
    let (g, gg) = (
        g.unwrap().to_vec2::<f64>().unwrap(),
        gg.unwrap().to_vec2::<f64>().unwrap(),
    );
    for (i, r) in rows.iter().enumerate() {
        let z: f64 = r.iter().map(|v| v.exp()).sum();
        let pt = r[t[i] as usize].exp() / z;
        for (j, v) in r.iter().enumerate() {
            let onehot = if j == t[i] as usize { 1.0 } else { 0.0 };
            let want = pt * (v.exp() / z - onehot);
            assert!((g[i][j] - want).abs() < 1e-12, "({i},{j})");
            assert!((gg[i][j] - want).abs() < 1e-12, "generic ({i},{j})");
        }
    }
    model_loss_fused_and_pure(ArchKind::Llama, dft, 5);
}

/// `use_eaft_loss`: fused, generic and pure losses and gradients equal LLaMA-Factory's own `_eaft_cross_entropy`
/// (imported from the 0.9.5 sdist by scripts/label_smoothing_reference.py, torch autograd for the gradient) on 5
/// tokens × 29 logits with a tie among a row's largest, for eaft_alpha 1 and 0.5; on a whole model fused and pure
/// paths agree.
#[test]
fn eaft_loss_matches_llamafactory() {
    let mut rows: Vec<Vec<f64>> = (0..5)
        .map(|i| {
            (0..29)
                .map(|j| 3.0 * (0.37 * f64::from(i) + 0.11 * f64::from(j * j)).sin())
                .collect()
        })
        .collect();
    rows[2][5] = rows[2][7];
    let x = Tensor::new(rows, &CPU).unwrap();
    let tg = Tensor::new(&[1u32, 4, 7, 10, 13], &CPU).unwrap();
    let cases = [
        (
            1.0,
            3.665850329133606,
            [
                0.008009691416503893,
                0.010090856492985889,
                0.01697270622906116,
                0.020488218626107186,
            ],
        ),
        (
            0.5,
            3.953291760461009,
            [
                0.008623370422235304,
                0.010863988247704213,
                0.018273105076107868,
                0.022057965696483744,
            ],
        ),
    ];
    for (alpha, want, want_grad) in cases {
        let eaft = ops::TokenLoss {
            eaft: Some(alpha),
            ..ops::TokenLoss::PLAIN
        };
        let per_token = |t: &Tensor| t.to_scalar::<f64>().unwrap() / 5.0;
        let fused = ops::fused::cross_entropy_sum(&x, &tg, eaft).unwrap();
        let generic = ops::generic::cross_entropy_sum(&x, &tg, eaft).unwrap();
        for (what, got) in [("fused", &fused), ("generic", &generic)] {
            assert!(
                (per_token(got) - want).abs() < 1e-12,
                "{what} alpha {alpha}: {} vs {want}",
                per_token(got)
            );
        }
        let (_, g) = ops::fused::cross_entropy_sum_and_grad(&x, &tg, eaft, true).unwrap();
        let (_, gg) = ops::generic::cross_entropy_sum_and_grad(&x, &tg, eaft, true).unwrap();
        for (what, g) in [("fused", g), ("generic", gg)] {
            let row: Vec<f64> = g.unwrap().get(2).unwrap().to_vec1().unwrap();
            for (j, w) in want_grad.iter().enumerate() {
                assert!(
                    (row[j] / 5.0 - w).abs() < 1e-12,
                    "{what} alpha {alpha} grad[2][{j}]: {} vs {w}",
                    row[j] / 5.0
                );
            }
        }
        // The weight is not the plain loss's 1: the test would notice EAFT being ignored.
        let plain = ops::fused::cross_entropy_sum(&x, &tg, ops::TokenLoss::PLAIN).unwrap();
        assert!((per_token(&plain) - want).abs() > 0.1);
    }
    model_loss_fused_and_pure(
        ArchKind::Llama,
        ops::TokenLoss {
            eaft: Some(1.0),
            ..ops::TokenLoss::PLAIN
        },
        6,
    );
}

/// A prompt cache reads only the tokens after those it holds and answers as a fresh generation does: a follow-up
/// turn (the first prompt, its answer, more tokens), a prompt that leaves the held tokens part-way (the cache is
/// truncated), the same prompt again (all but its last token held), an unrelated prompt (nothing reused).
#[test]
fn prompt_cache_reuses_the_shared_prefix_and_answers_as_a_fresh_generation() {
    let d = tempfile::tempdir().unwrap();
    let (m, tok) = build(
        d.path(),
        &TinyOpts::default(),
        DType::F32,
        &Finetune::Frozen,
    );
    let ids = |text: &str| tok.encode(text, false).unwrap().get_ids().to_vec();
    let first = ids("<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n");
    let params = GenerationParams {
        max_new_tokens: 7,
        ..GenerationParams::default()
    };
    let fresh = |prompt: &[u32]| {
        generate::generate_timed(
            &m,
            prompt,
            &params,
            &[],
            None,
            |_| ControlFlow::Continue(()),
        )
        .unwrap()
    };
    let mut cache = generate::PromptCache::default();
    let cached = |prompt: &[u32], cache: &mut generate::PromptCache| {
        generate::generate_cached(&m, prompt, &params, &[], None, cache, |_| {
            ControlFlow::Continue(())
        })
        .unwrap()
    };
    let (a, _, t) = cached(&first, &mut cache);
    assert_eq!(a, fresh(&first).0);
    assert_eq!((t.prompt_tokens, t.cached_tokens), (first.len(), 0));
    // The prompt and the answer's tokens read after it (the last one sampled, never read).
    assert_eq!(cache.len(), first.len() + a.len() - 1);
    let mut follow = first.clone();
    follow.extend(&a);
    follow.extend(ids(
        "<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n",
    ));
    let (b, _, t) = cached(&follow, &mut cache);
    assert_eq!(b, fresh(&follow).0);
    assert_eq!(t.cached_tokens, first.len() + a.len() - 1);
    assert_eq!(t.prompt_tokens, follow.len() - t.cached_tokens);
    // Leaving the held tokens part-way: the first 5 are reused.
    let mut branch = follow[..5].to_vec();
    branch.extend(ids("bye now"));
    assert_ne!(branch[5], follow[5]);
    let (c, _, t) = cached(&branch, &mut cache);
    assert_eq!(c, fresh(&branch).0);
    assert_eq!(t.cached_tokens, 5);
    // The same prompt again: all but its last token (read for the first logits).
    let (c2, _, t) = cached(&branch, &mut cache);
    assert_eq!(
        (c2, t.cached_tokens, t.prompt_tokens),
        (c, branch.len() - 1, 1)
    );
    // Nothing shared.
    let other = ids("zzz");
    assert_ne!(other[0], branch[0]);
    let (e, _, t) = cached(&other, &mut cache);
    assert_eq!((e, t.cached_tokens), (fresh(&other).0, 0));
    cache.clear();
    assert!(cache.is_empty());
}

#[test]
fn greedy_generation_matches_argmax_and_stops_and_cancels() {
    let d = tempfile::tempdir().unwrap();
    let (m, tok) = build(
        d.path(),
        &TinyOpts::default(),
        DType::F32,
        &Finetune::Frozen,
    );
    let prompt = tok
        .encode(
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
            false,
        )
        .unwrap();
    let prompt = prompt.get_ids().to_vec();
    // Reference: recompute the full forward each step and take the argmax.
    let mut ctx = prompt.clone();
    let mut want = Vec::new();
    for _ in 0..6 {
        let l = m.forward(&ids(&ctx, 1), &AttnMask::Causal, false).unwrap();
        let next = l
            .get(0)
            .unwrap()
            .get(ctx.len() - 1)
            .unwrap()
            .argmax(D::Minus1)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        want.push(next);
        ctx.push(next);
    }
    let params = GenerationParams {
        max_new_tokens: 6,
        ..GenerationParams::default()
    };
    let mut seen = Vec::new();
    let (got, stop) = generate::generate(&m, &prompt, &params, &[], None, |t| {
        seen.push(t);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(got, want);
    assert_eq!(seen, want);
    assert_eq!(stop, StopReason::MaxTokens);
    // A stop id ends generation without being emitted.
    let (got, stop) = generate::generate(&m, &prompt, &params, &[want[2]], None, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(stop, StopReason::Stop(want[2]));
    assert_eq!(
        got,
        want.iter()
            .copied()
            .take_while(|t| *t != want[2])
            .collect::<Vec<_>>()
    );
    // Callback break and the AtomicBool both cancel.
    let (got, stop) =
        generate::generate(&m, &prompt, &params, &[], None, |_| ControlFlow::Break(())).unwrap();
    assert_eq!((got.len(), stop), (1, StopReason::Cancelled));
    let flag = AtomicBool::new(true);
    let (got, stop) = generate::generate(&m, &prompt, &params, &[], Some(&flag), |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!((got.len(), stop), (0, StopReason::Cancelled));
    // Sampling is reproducible for a seed.
    let sp = GenerationParams {
        temperature: 0.8,
        top_p: Some(0.9),
        top_k: Some(20),
        repetition_penalty: 1.1,
        ..params
    };
    let a = generate::generate(&m, &prompt, &sp, &[], None, |_| ControlFlow::Continue(())).unwrap();
    let b = generate::generate(&m, &prompt, &sp, &[], None, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(a, b);
    // chat_completion streams text pieces that add up to the decoded answer.
    let rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
    let mut pieces = String::new();
    let ans = generate::chat_completion(&m, &tok, rendered, &params, &[], None, |p| {
        pieces.push_str(p);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(ans.tokens, want);
    assert_eq!(pieces, ans.text);
    assert_eq!(ans.text, tok.decode(&want, true).unwrap());
}

#[test]
fn streamer_holds_back_split_multibyte_characters() {
    let tok = termtune::engine::testing::tiny_tokenizer().unwrap();
    let text = "the héllo 🙂 and 日本 ok";
    let enc = tok.encode(text, false).unwrap();
    // The emoji is 4 bytes = 4 byte-level tokens here, so partial decodes would produce U+FFFD.
    assert!(enc.get_ids().len() > text.chars().count() / 2);
    let mut s = TextStreamer::new(&tok);
    let mut out = String::new();
    for id in enc.get_ids() {
        if let Some(p) = s.push(*id).unwrap() {
            assert!(!p.contains('\u{FFFD}'), "piece {p:?}");
            out.push_str(&p);
        }
    }
    if let Some(p) = s.finish().unwrap() {
        out.push_str(&p);
    }
    assert_eq!(out, text);
}

#[test]
fn stop_ids_merge_config_and_generation_config() {
    let d = tempfile::tempdir().unwrap();
    let (m, tok) = build(
        d.path(),
        &TinyOpts::default(),
        DType::F32,
        &Finetune::Frozen,
    );
    let files = load_hf_folder(d.path(), DType::F32, &CPU).unwrap();
    let ids = generate::stop_ids(&m, &files.generation_config, &[7]);
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let mut want = vec![7, eot, im_end];
    want.sort_unstable();
    assert_eq!(ids, want);
    assert!(
        files.tokenizer_config["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>")
    );
}

#[test]
fn bf16_training_path_runs_and_tracks_f32() {
    // Gemma 3 too: its (1 + w) norms run in f32 and round once, its embedding scale rounds to bf16.
    for arch in [ArchKind::Qwen2, ArchKind::Gemma3] {
        bf16_tracks_f32(arch);
    }
}

fn bf16_tracks_f32(arch: ArchKind) {
    let d = tempfile::tempdir().unwrap();
    let opts = TinyOpts {
        arch,
        ..TinyOpts::default()
    };
    let (m32, _) = build(d.path(), &opts, DType::F32, &lora("all", 4));
    let files = load_hf_folder(d.path(), DType::BF16, &CPU).unwrap();
    let m16 = Model::from_files(&files, DType::BF16, &CPU, &lora("all", 4)).unwrap();
    assert_eq!(
        m16.trainable_vars()[0].1.dtype(),
        DType::F32,
        "LoRA params stay f32"
    );
    let x = ids(&[5, 6, 7, 8, 9, 10], 1);
    let labels = Tensor::new(&[[5i64, 6, 7, 8, 9, 10]], &CPU).unwrap();
    let (l32, _) = m32
        .forward_loss(&x, &AttnMask::Causal, &labels, true)
        .unwrap();
    let (l16, _) = m16
        .forward_loss(&x, &AttnMask::Causal, &labels, true)
        .unwrap();
    let (a, b) = (
        l32.to_scalar::<f32>().unwrap(),
        l16.to_scalar::<f32>().unwrap(),
    );
    // bf16 has ~3 significant digits; 2% on a summed loss of 5 tokens is generous but catches layout bugs.
    assert!(
        (a - b).abs() / a.abs() < 2e-2,
        "{arch:?}: f32 loss {a} vs bf16 loss {b}"
    );
    let g = l16.backward().unwrap();
    for (n, v) in m16.trainable_vars() {
        if n.contains("lora_B") {
            let norm = g
                .get(&v)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{n}");
        }
    }
}

/// Writes tiny models + adapters + our logits/loss/gradients for `tests/engine_reference.py`, which recomputes
/// them with transformers + PEFT (the independent implementation). Run:
/// `ENGINE_REF_DIR=/tmp/ref cargo test --test integration engine::dump_reference_fixture -- --ignored`
#[test]
#[ignore = "writes a fixture for tests/engine_reference.py"]
fn dump_reference_fixture() {
    let root = std::path::PathBuf::from(std::env::var("ENGINE_REF_DIR").unwrap());
    for (name, opts) in [
        ("llama", TinyOpts::default()),
        (
            "qwen2",
            TinyOpts {
                arch: ArchKind::Qwen2,
                ..TinyOpts::default()
            },
        ),
        (
            "qwen3",
            TinyOpts {
                arch: ArchKind::Qwen3,
                tie_word_embeddings: false,
                ..TinyOpts::default()
            },
        ),
        (
            "gemma3",
            TinyOpts {
                arch: ArchKind::Gemma3,
                ..TinyOpts::default()
            },
        ),
    ] {
        let dir = root.join(name);
        let (m, _) = build(&dir.join("model"), &opts, DType::F32, &lora("all", 4));
        randomize_b(&m, 21);
        adapter::save_adapter(&m, &dir.join("adapter"), "model").unwrap();
        crate::tiny_util::write_reference_case(&dir, &m);
    }
}

/// Golden values from transformers 5.24.0 + peft 0.21.2 + torch 2.15.0 (CPU, f32, eager attention), produced by
/// `tests/engine_reference.py` on the fixture of `dump_reference_fixture` (seed 1234 models, LoRA r4 all, B seeded
/// 21): the masked mean loss of the padded batch and logits[0, -1, :4]. The same script reported max |logits diff|
/// ≤ 1.4e-5 over all valid positions and LoRA gradients within 1.3e-6 relative. gemma3 (transformers 5.25.0, same
/// script): a 3-position sliding window on layer 0 with its own RoPE base, linear RoPE scaling on layer 1, a score
/// scale of 1/√24; logits within 5.8e-6, gradients within 9.2e-7 relative (changing any of those four settings in
/// the reference's config moves its logits by 0.46 to 2.9).
#[test]
fn matches_transformers_and_peft_goldens() {
    let cases = [
        (
            "llama",
            TinyOpts::default(),
            14.150979f32,
            [-0.630_694_1f32, -2.966_400_1, 2.665_892_8, -2.420_692_7],
        ),
        (
            "qwen2",
            TinyOpts {
                arch: ArchKind::Qwen2,
                ..TinyOpts::default()
            },
            13.220149,
            [0.957_952_1, -2.389_204_7, -0.201_525_06, 4.453_696_3],
        ),
        (
            "qwen3",
            TinyOpts {
                arch: ArchKind::Qwen3,
                tie_word_embeddings: false,
                ..TinyOpts::default()
            },
            6.048663,
            [-0.540_908_4, -0.826_565_6, -0.695_282_2, 1.666_353_1],
        ),
        (
            "gemma3",
            TinyOpts {
                arch: ArchKind::Gemma3,
                ..TinyOpts::default()
            },
            29.303873,
            [2.256_14, -0.810_907_7, 2.695_704_5, -5.062_42],
        ),
    ];
    for (name, opts, want_loss, want_logits) in cases {
        let d = tempfile::tempdir().unwrap();
        let (m, _) = build(d.path(), &opts, DType::F32, &lora("all", 4));
        randomize_b(&m, 21);
        let (x, mask, labels) = padded_batch();
        let (s, n) = m.forward_loss(&x, &mask, &labels, false).unwrap();
        let loss = (s / n as f64).unwrap().to_scalar::<f32>().unwrap();
        assert!(
            (loss - want_loss).abs() < 1e-4 * want_loss.abs(),
            "{name}: loss {loss} vs transformers {want_loss}"
        );
        assert_logits_0_5(
            &m,
            &want_logits.map(f64::from),
            &format!("{name}: transformers"),
        );
    }
}

#[test]
fn chat_model_with_adapter_answers_like_merged_weights() {
    let d = tempfile::tempdir().unwrap();
    let (m, _) = build(
        d.path(),
        &TinyOpts::default(),
        DType::F32,
        &lora("q_proj,v_proj", 4),
    );
    randomize_b(&m, 8);
    let ad = tempfile::tempdir().unwrap();
    adapter::save_adapter(&m, ad.path(), "tiny").unwrap();
    let chat =
        generate::load_chat_model(d.path(), &[ad.path().to_path_buf()], DType::F32, &CPU).unwrap();
    let im_end = chat.tokenizer.token_to_id("<|im_end|>").unwrap();
    assert!(chat.stop_ids.contains(&im_end));
    let rendered = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n";
    let params = GenerationParams {
        max_new_tokens: 5,
        ..GenerationParams::default()
    };
    let got = generate::chat_completion(
        &chat.model,
        &chat.tokenizer,
        rendered,
        &params,
        &[],
        None,
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    // Same answer from the unmerged LoRA model (the adapter is applied, not ignored).
    let want = generate::chat_completion(&m, &chat.tokenizer, rendered, &params, &[], None, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(got.tokens, want.tokens);
    let (base, _) = build(
        d.path(),
        &TinyOpts::default(),
        DType::F32,
        &Finetune::Frozen,
    );
    let l_base = base
        .forward(&ids(&[1, 2, 3], 1), &AttnMask::Causal, false)
        .unwrap();
    let l_chat = chat
        .model
        .forward(&ids(&[1, 2, 3], 1), &AttnMask::Causal, false)
        .unwrap();
    assert!(
        max_abs_diff(&l_base, &l_chat) > 1e-3,
        "adapter was not merged"
    );
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let d = tempfile::tempdir().unwrap();
    let (m, _) = build(d.path(), &TinyOpts::default(), DType::F32, &lora("all", 2));
    let e = m
        .forward(&ids(&[1, 2, 9999], 1), &AttnMask::Causal, false)
        .unwrap_err();
    assert!(e.to_string().contains("9999"), "{e}");
    let labels = Tensor::new(&[[1i64, 2]], &CPU).unwrap();
    let e = m
        .forward_loss(&ids(&[1, 2, 3], 1), &AttnMask::Causal, &labels, true)
        .err()
        .unwrap();
    assert!(e.to_string().contains("labels"), "{e}");
    let bad = AttnMask::Padding {
        attention_mask: Tensor::new(&[[1u32, 1]], &CPU).unwrap(),
    };
    assert!(m.forward(&ids(&[1, 2, 3], 1), &bad, false).is_err());
    let labels = Tensor::new(&[[1i64, 2, 5000]], &CPU).unwrap();
    let e = m
        .forward_loss(&ids(&[1, 2, 3], 1), &AttnMask::Causal, &labels, true)
        .err()
        .unwrap();
    assert!(e.to_string().contains("5000"), "{e}");
    // All labels ignored: zero loss, zero tokens (the trainer skips it), no error.
    let labels = Tensor::new(&[[-100i64, -100, -100]], &CPU).unwrap();
    let (s, n) = m
        .forward_loss(&ids(&[1, 2, 3], 1), &AttnMask::Causal, &labels, true)
        .unwrap();
    assert_eq!((s.to_scalar::<f32>().unwrap(), n), (0.0, 0));
}

/// Loss and every trainable gradient of one forward/backward, as f64 vectors.
fn loss_and_grads(
    m: &Model,
    input: &Tensor,
    mask: &AttnMask,
    labels: &Tensor,
) -> (f64, Vec<Vec<f64>>) {
    let (s, n) = m.forward_loss(input, mask, labels, true).unwrap();
    let loss = (s / n as f64).unwrap();
    let g = loss.backward().unwrap();
    let grads = m
        .trainable_vars()
        .iter()
        .map(|(name, v)| {
            let gv = g.get(v).unwrap_or_else(|| panic!("{name}: no gradient"));
            assert!(!gv.track_op(), "{name}: gradient carries a graph");
            gv.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
        .collect();
    (
        loss.to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        grads,
    )
}

#[test]
fn checkpointing_chunked_head_loss_and_unpadding_match_the_plain_path() {
    // f64: the paths differ only by float rounding, so the tolerance can be tight.
    let (input, mask, labels) = padded_batch();
    let finetunes = [
        lora("all", 4),
        lora("q_proj,v_proj", 2),
        Finetune::freeze(1),
        Finetune::freeze(-1),
        Finetune::Full,
    ];
    let mut compared = 0;
    for opts in all_variants() {
        for (fi, ft) in finetunes.iter().enumerate() {
            for kernels in [Kernels::Fused, Kernels::Pure] {
                let d = tempfile::tempdir().unwrap();
                let (mut m, _) = build(d.path(), &opts, DType::F64, ft);
                m.kernels = kernels;
                randomize_b(&m, 5 + fi as u64);
                m.checkpointing = false;
                m.head_chunk_rows = None;
                m.unpad = false;
                m.manual_backward = false;
                let (l0, g0) = loss_and_grads(&m, &input, &mask, &labels);
                assert!(!g0.is_empty());
                for (ckpt, chunk, unpad, manual) in [
                    (true, None, false, false),
                    (false, Some(3), false, false),
                    (false, None, true, false),
                    (false, None, false, true),
                    (true, None, false, true),
                    (true, Some(1), true, true),
                    (false, Some(1000), true, true),
                ] {
                    m.checkpointing = ckpt;
                    m.head_chunk_rows = chunk;
                    m.unpad = unpad;
                    m.manual_backward = manual;
                    let (l1, g1) = loss_and_grads(&m, &input, &mask, &labels);
                    let what = format!(
                        "{:?} {ft:?} {kernels:?} ckpt {ckpt} chunk {chunk:?} unpad {unpad} manual {manual}",
                        opts.arch
                    );
                    assert!((l0 - l1).abs() < 1e-12, "{what}: loss {l0} vs {l1}");
                    assert_eq!(g0.len(), g1.len(), "{what}: trainable tensors");
                    for (a, b) in g0.iter().zip(&g1) {
                        assert_eq!(a.len(), b.len(), "{what}: gradient sizes");
                        let scale = a.iter().fold(1e-6f64, |m, x| m.max(x.abs()));
                        let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
                        assert!(
                            diff / scale < 1e-10,
                            "{what}: gradient differs by {diff} (scale {scale})"
                        );
                    }
                    compared += 1;
                }
            }
        }
    }
    assert_eq!(compared, all_variants().len() * 5 * 2 * 7);
}

#[test]
fn checkpointing_and_chunked_head_loss_match_in_f32_over_training_steps() {
    // f32 with the fused LoRA op: three SGD steps give the same losses with and without the memory savers.
    let d = tempfile::tempdir().unwrap();
    let input = ids(&[5, 70, 71, 100, 33, 9, 250, 12, 40, 41, 42, 43], 2);
    let labels = Tensor::new(
        &[[-100i64, 70, 71, 100, 33, 9], [-100, 12, 40, 41, 42, 43]],
        &CPU,
    )
    .unwrap();
    let run = |ckpt: bool, chunk: Option<usize>| -> Vec<f64> {
        let (mut m, _) = build(d.path(), &TinyOpts::default(), DType::F32, &lora("all", 4));
        m.checkpointing = ckpt;
        m.head_chunk_rows = chunk;
        if !ckpt && chunk.is_none() {
            // The baseline is the pre-optimisation path: candle's graph over the fused LoRA op, padded.
            m.manual_backward = false;
            m.unpad = false;
        }
        use candle_nn::Optimizer;
        let vars: Vec<Var> = m.trainable_vars().into_iter().map(|(_, v)| v).collect();
        let mut sgd = candle_nn::SGD::new(vars, 0.05).unwrap();
        (0..3)
            .map(|_| {
                let (s, n) = m
                    .forward_loss(&input, &AttnMask::Causal, &labels, true)
                    .unwrap();
                let loss = (s / n as f64).unwrap();
                sgd.step(&loss.backward().unwrap()).unwrap();
                loss.to_scalar::<f32>().unwrap() as f64
            })
            .collect()
    };
    let plain = run(false, None);
    assert!(plain[2] < plain[0], "training lowers the loss: {plain:?}");
    for (ckpt, chunk) in [(true, None), (false, Some(2)), (true, Some(2))] {
        let other = run(ckpt, chunk);
        assert_eq!(plain.len(), other.len(), "ckpt {ckpt} chunk {chunk:?}");
        for (a, b) in plain.iter().zip(&other) {
            assert!(
                (a - b).abs() < 1e-5,
                "ckpt {ckpt} chunk {chunk:?}: {plain:?} vs {other:?}"
            );
        }
    }
}

#[test]
fn lora_dropout_masks_are_seeded_and_every_path_sees_the_same_ones() {
    // Mask statistics: about p of the entries are zero, the rest 1/(1 − p); the same seed and module give the
    // same mask, another seed or module another one.
    let shape = candle_core::Shape::from((400, 64));
    let mask = |seed: u64, module: &str| {
        ops::lora_dropout_mask(&shape, 0.3, seed, module, DType::F32, &CPU)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let m1 = mask(5, "model.layers.0.self_attn.q_proj");
    let zeros = m1.iter().filter(|&&x| x == 0.0).count() as f64 / m1.len() as f64;
    assert!((zeros - 0.3).abs() < 0.02, "zero fraction {zeros}");
    assert!(m1.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.7).abs() < 1e-6));
    assert_eq!(m1, mask(5, "model.layers.0.self_attn.q_proj"));
    assert_ne!(m1, mask(6, "model.layers.0.self_attn.q_proj"));
    assert_ne!(m1, mask(5, "model.layers.0.self_attn.k_proj"));

    // The model with dropout 0.3, f64: the plain graph, checkpointing and the hand-written backward (fused CPU
    // kernels, and the generic kernels CUDA runs) give the same loss and gradients for one seed.
    let (input, mask, labels) = padded_batch();
    let d = tempfile::tempdir().unwrap();
    let ft = Finetune::Lora(LoraSpec {
        r: 4,
        alpha: 16.0,
        dropout: 0.3,
        targets: LoraTargets::parse("all").unwrap(),
        use_rslora: false,
        use_dora: false,
        seed: 7,
        init: Default::default(),
    });
    let (mut m, _) = build(d.path(), &TinyOpts::default(), DType::F64, &ft);
    randomize_b(&m, 21);
    m.dropout_seed = 11;
    m.head_chunk_rows = None;
    let mut results = Vec::new();
    for generic in [false, true] {
        for (ckpt, manual) in [(false, false), (true, false), (false, true), (true, true)] {
            m.checkpointing = ckpt;
            m.manual_backward = manual;
            let r = if generic {
                ops::Backend::generic_only(|| loss_and_grads(&m, &input, &mask, &labels))
            } else {
                loss_and_grads(&m, &input, &mask, &labels)
            };
            results.push(((generic, ckpt, manual), r));
        }
    }
    let (_, (l0, g0)) = &results[0];
    for (what, (l, g)) in &results[1..] {
        assert!((l0 - l).abs() < 1e-12, "{what:?}: loss {l0} vs {l}");
        assert_eq!(g0.len(), g.len());
        for (a, b) in g0.iter().zip(g) {
            assert_eq!(a.len(), b.len());
            let scale = a.iter().fold(1e-6f64, |m, x| m.max(x.abs()));
            let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff / scale < 1e-10, "{what:?}: gradient differs by {diff}");
        }
    }
    // Another seed draws other masks; no dropout outside training.
    m.dropout_seed = 12;
    let (l12, _) = loss_and_grads(&m, &input, &mask, &labels);
    assert!(
        (l12 - l0).abs() > 1e-6,
        "seeds 11 and 12 gave the same loss"
    );
    let a = m.forward(&input, &mask, false).unwrap();
    m.dropout_seed = 11;
    let b = m.forward(&input, &mask, false).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

/// Freeze's `freeze_trainable_modules` / `freeze_extra_modules` train exactly the weights LLaMA-Factory 0.9.5's own
/// `_setup_freeze_tuning` marks trainable on the same tiny llama (`scripts/freeze_modules_reference.py` printed the
/// lists): `norm` also takes every layer's norms (LF matches by substring), and a tied model has no `lm_head`.
#[test]
fn freeze_modules_train_what_llamafactory_trains() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path(), 3, &TinyOpts::default()).unwrap();
    let files = load_hf_folder(d.path(), DType::F32, &CPU).unwrap();
    let freeze = |layers: i64, modules: &str, extra: &str| Finetune::Freeze {
        trainable_layers: layers,
        modules: termtune::config::comma_list(modules),
        extra: termtune::config::comma_list(extra),
    };
    let names = |ft: &Finetune| -> Result<Vec<String>, String> {
        let m = Model::from_files(&files, DType::F32, &CPU, ft).map_err(|e| e.to_string())?;
        let mut n: Vec<String> = m.trainable_vars().into_iter().map(|(n, _)| n).collect();
        n.sort();
        Ok(n)
    };
    let l = |i: usize, rest: &[&str]| -> Vec<String> {
        rest.iter()
            .map(|r| format!("model.layers.{i}.{r}.weight"))
            .collect()
    };
    let attn = [
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ];
    let mlp = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"];
    let norms = ["input_layernorm", "post_attention_layernorm"];
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    // (1, all): the last layer whole.
    let want = sorted([l(1, &attn), l(1, &mlp), l(1, &norms)].concat());
    assert_eq!(names(&freeze(1, "all", "")).unwrap(), want);
    assert_eq!(names(&Finetune::freeze(1)).unwrap(), want);
    // (1, mlp; embed_tokens, norm): the last MLP, the embedding, and every norm.
    let want = sorted(
        [
            vec![
                "model.embed_tokens.weight".to_string(),
                "model.norm.weight".to_string(),
            ],
            l(0, &norms),
            l(1, &norms),
            l(1, &mlp),
        ]
        .concat(),
    );
    assert_eq!(names(&freeze(1, "mlp", "embed_tokens,norm")).unwrap(), want);
    // (-1, self_attn + post_attention_layernorm): the first layer's attention and its second norm.
    let want = sorted([l(0, &attn), l(0, &["post_attention_layernorm"])].concat());
    assert_eq!(
        names(&freeze(-1, "self_attn,post_attention_layernorm", "")).unwrap(),
        want
    );
    // A tied model has no lm_head to train; an untied one does.
    let e = names(&freeze(2, "input_layernorm", "lm_head")).unwrap_err();
    assert!(
        e.contains("freeze_extra_modules")
            && e.contains("lm_head")
            && e.contains("embed_tokens, norm"),
        "{e}"
    );
    let u = tempfile::tempdir().unwrap();
    tiny_llama(
        u.path(),
        3,
        &TinyOpts {
            tie_word_embeddings: false,
            ..TinyOpts::default()
        },
    )
    .unwrap();
    let untied = load_hf_folder(u.path(), DType::F32, &CPU).unwrap();
    let m = Model::from_files(
        &untied,
        DType::F32,
        &CPU,
        &freeze(2, "input_layernorm", "lm_head"),
    )
    .unwrap();
    let mut got: Vec<String> = m.trainable_vars().into_iter().map(|(n, _)| n).collect();
    got.sort();
    let want = sorted(
        [
            vec!["lm_head.weight".to_string()],
            l(0, &["input_layernorm"]),
            l(1, &["input_layernorm"]),
        ]
        .concat(),
    );
    assert_eq!(got, want);
    // The preset's lists of names are the union of what the engine accepts over the architectures.
    let mut layer: Vec<&str> = vec!["all"];
    let mut outer: Vec<&str> = Vec::new();
    for opts in [
        TinyOpts::default(),
        TinyOpts {
            tie_word_embeddings: false,
            ..TinyOpts::default()
        },
        TinyOpts {
            arch: ArchKind::Gemma3,
            ..TinyOpts::default()
        },
    ] {
        let d = tempfile::tempdir().unwrap();
        tiny_llama(d.path(), 3, &opts).unwrap();
        let cfg = load_hf_folder(d.path(), DType::F32, &CPU).unwrap().config;
        let (h, o) = termtune::engine::model::freeze_module_names(
            &termtune::engine::ModelConfig::from_hf_config(&cfg).unwrap(),
        );
        layer.extend(h.iter().filter(|n| !layer.contains(n)).collect::<Vec<_>>());
        outer.extend(o.iter().filter(|n| !outer.contains(n)).collect::<Vec<_>>());
    }
    layer.sort_unstable();
    outer.sort_unstable();
    let mut want_layer = termtune::config::FREEZE_LAYER_MODULES.to_vec();
    let mut want_outer = termtune::config::FREEZE_EXTRA_MODULES.to_vec();
    want_layer.sort_unstable();
    want_outer.sort_unstable();
    assert_eq!((layer, outer), (want_layer, want_outer));
    // The memory estimate counts the same parameters.
    let (trainable, _) =
        termtune::engine::memory::param_counts(&m.cfg, &freeze(2, "input_layernorm", "lm_head"));
    let counted: usize = m
        .trainable_vars()
        .iter()
        .map(|(_, v)| v.as_tensor().elem_count())
        .sum();
    assert_eq!(trainable, counted as u64);
}

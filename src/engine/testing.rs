//! Test helpers: write a tiny seeded random model folder that the real loaders read.
//!
//! Compiled for tests only (`cfg(test)`, or the `testing` feature the integration tests turn on), never used
//! by the program (see [`crate::testing`]).
#![doc(hidden)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokenizers::models::bpe::BPE;
use tokenizers::{AddedToken, Tokenizer};

use super::arch::ArchKind;
use super::error::{EngineError, Result};
use super::weights::save_safetensors;

/// The largest |a − b| of two tensors of one shape, computed in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?;
    Ok(d.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// Shape and variant of the tiny model.
#[derive(Debug, Clone)]
pub struct TinyOpts {
    pub arch: ArchKind,
    pub tie_word_embeddings: bool,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub vocab_size: usize,
}

impl Default for TinyOpts {
    fn default() -> Self {
        Self {
            arch: ArchKind::Llama,
            tie_word_embeddings: true,
            num_layers: 2,
            hidden_size: 64,
            intermediate_size: 128,
            num_heads: 4,
            num_kv_heads: 2,
            vocab_size: 320,
        }
    }
}

/// GPT-2's byte → printable-char table (the alphabet of byte-level BPE).
pub fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap_or(' ');
    }
    table
}

/// Merges of the tiny tokenizer (a handful of English pairs; `Ġ` = space).
const MERGES: &[(&str, &str)] = &[
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "s"),
    ("r", "e"),
    ("a", "t"),
    ("e", "n"),
    ("Ġ", "w"),
    ("o", "r"),
    ("i", "s"),
    ("Ġ", "i"),
    ("in", "g"),
    ("Ġ", "c"),
    ("Ġ", "o"),
    ("l", "l"),
    ("a", "n"),
    ("Ġ", "h"),
    ("Ġ", "b"),
    ("e", "s"),
    ("Ġ", "f"),
    ("o", "u"),
    ("Ġ", "m"),
    ("Ġ", "d"),
    ("e", "d"),
    ("Ġ", "p"),
    ("Ġa", "n"),
    ("Ġan", "d"),
    ("Ġ", "Ġ"),
];

/// Special tokens, added after the BPE vocabulary in this order.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A real byte-level BPE tokenizer (GPT-2 style) with ChatML special tokens.
pub fn tiny_tokenizer() -> Result<Tokenizer> {
    let table = bytes_to_unicode();
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for c in &table {
        let id = vocab.len() as u32;
        vocab.insert(c.to_string(), id);
    }
    let mut merges = Vec::new();
    for (a, b) in MERGES {
        let id = vocab.len() as u32;
        vocab.insert(format!("{a}{b}"), id);
        merges.push(((*a).to_string(), (*b).to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(
            vocab
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .build()
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    let mut tok = Tokenizer::new(bpe);
    let bl = tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true);
    tok.with_pre_tokenizer(Some(bl));
    tok.with_decoder(Some(bl));
    tok.with_post_processor(Some(bl));
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    Ok(tok)
}

/// ChatML template (Qwen/SmolLM2 style).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

fn normal(rng: &mut StdRng, std: f64) -> f64 {
    // Box–Muller.
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random::<f64>();
    std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn rand_tensor(rng: &mut StdRng, shape: &[usize], mean: f64, std: f64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (mean + normal(rng, std)) as f32).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Write a tiny random model (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
/// generation_config.json) into `dir`. Weights come from `StdRng::seed_from_u64(seed)`, so a seed gives the same
/// model everywhere. Returns the tokenizer.
pub fn tiny_llama(dir: &Path, seed: u64, opts: &TinyOpts) -> Result<Tokenizer> {
    std::fs::create_dir_all(dir)
        .map_err(|e| EngineError::io(format!("creating {}", dir.display()), e))?;
    let tok = tiny_tokenizer()?;
    let id = |s: &str| {
        tok.token_to_id(s)
            .ok_or_else(|| EngineError::Tokenizer(format!("no token {s}")))
    };
    let (eot, im_end) = (id("<|endoftext|>")?, id("<|im_end|>")?);
    let v = opts.vocab_size.max(tok.get_vocab_size(true));
    let (h, ff, nh, nkv, nl) = (
        opts.hidden_size,
        opts.intermediate_size,
        opts.num_heads,
        opts.num_kv_heads,
        opts.num_layers,
    );
    let hd = h / nh;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        rand_tensor(&mut rng, &[v, h], 0.0, 0.5)?,
    );
    let qkv_bias = opts.arch == ArchKind::Qwen2;
    // Gemma's norms multiply by (1 + w): weights around 0 there, around 1 elsewhere.
    let gemma = opts.arch == ArchKind::Gemma3;
    let norm_mean = if gemma { 0.0 } else { 1.0 };
    for i in 0..nl {
        let p = format!("model.layers.{i}");
        let lin = |rng: &mut StdRng,
                   t: &mut HashMap<String, Tensor>,
                   name: String,
                   out: usize,
                   inp: usize| {
            rand_tensor(rng, &[out, inp], 0.0, 1.0 / (inp as f64).sqrt()).map(|x| t.insert(name, x))
        };
        lin(
            &mut rng,
            &mut t,
            format!("{p}.self_attn.q_proj.weight"),
            nh * hd,
            h,
        )?;
        lin(
            &mut rng,
            &mut t,
            format!("{p}.self_attn.k_proj.weight"),
            nkv * hd,
            h,
        )?;
        lin(
            &mut rng,
            &mut t,
            format!("{p}.self_attn.v_proj.weight"),
            nkv * hd,
            h,
        )?;
        lin(
            &mut rng,
            &mut t,
            format!("{p}.self_attn.o_proj.weight"),
            h,
            nh * hd,
        )?;
        lin(&mut rng, &mut t, format!("{p}.mlp.gate_proj.weight"), ff, h)?;
        lin(&mut rng, &mut t, format!("{p}.mlp.up_proj.weight"), ff, h)?;
        lin(&mut rng, &mut t, format!("{p}.mlp.down_proj.weight"), h, ff)?;
        if qkv_bias {
            for (n, o) in [
                ("q_proj", nh * hd),
                ("k_proj", nkv * hd),
                ("v_proj", nkv * hd),
            ] {
                t.insert(
                    format!("{p}.self_attn.{n}.bias"),
                    rand_tensor(&mut rng, &[o], 0.0, 0.1)?,
                );
            }
        }
        if matches!(opts.arch, ArchKind::Qwen3 | ArchKind::Gemma3) {
            t.insert(
                format!("{p}.self_attn.q_norm.weight"),
                rand_tensor(&mut rng, &[hd], norm_mean, 0.1)?,
            );
            t.insert(
                format!("{p}.self_attn.k_norm.weight"),
                rand_tensor(&mut rng, &[hd], norm_mean, 0.1)?,
            );
        }
        t.insert(
            format!("{p}.input_layernorm.weight"),
            rand_tensor(&mut rng, &[h], norm_mean, 0.1)?,
        );
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            rand_tensor(&mut rng, &[h], norm_mean, 0.1)?,
        );
        if gemma {
            for n in ["pre_feedforward_layernorm", "post_feedforward_layernorm"] {
                t.insert(
                    format!("{p}.{n}.weight"),
                    rand_tensor(&mut rng, &[h], norm_mean, 0.1)?,
                );
            }
        }
    }
    t.insert(
        "model.norm.weight".to_string(),
        rand_tensor(&mut rng, &[h], norm_mean, 0.1)?,
    );
    if !opts.tie_word_embeddings {
        t.insert(
            "lm_head.weight".to_string(),
            rand_tensor(&mut rng, &[v, h], 0.0, 1.0 / (h as f64).sqrt())?,
        );
    }
    save_safetensors(&t, &dir.join("model.safetensors"))?;
    let mut config = json!({
        "architectures": [match opts.arch {
            ArchKind::Llama => "LlamaForCausalLM", ArchKind::Mistral => "MistralForCausalLM",
            ArchKind::Qwen2 => "Qwen2ForCausalLM", ArchKind::Qwen3 => "Qwen3ForCausalLM",
            ArchKind::Gemma3 => "Gemma3ForCausalLM" }],
        "model_type": opts.arch.model_type(),
        "vocab_size": v, "hidden_size": h, "intermediate_size": ff, "num_hidden_layers": nl,
        "num_attention_heads": nh, "num_key_value_heads": nkv, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": opts.tie_word_embeddings,
        "bos_token_id": eot, "eos_token_id": im_end, "torch_dtype": "float32", "hidden_act": "silu",
    });
    if opts.arch == ArchKind::Qwen3 {
        config["head_dim"] = json!(hd);
    }
    if gemma {
        // Every Gemma 3 feature where a tiny batch sees it: layer 0 slides over 3 positions with its own RoPE
        // base, layer 1 attends to everything with linearly scaled RoPE; the score scale is not 1/√head_dim.
        let extra = json!({
            "head_dim": hd, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 24,
            "sliding_window": 3, "layer_types": (0..nl)
                .map(|i| if i % 2 == 0 { "sliding_attention" } else { "full_attention" })
                .collect::<Vec<_>>(),
            "rope_local_base_freq": 100.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "final_logit_softcapping": null, "attn_logit_softcapping": null, "rms_norm_eps": 1e-6,
        });
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
            c.remove("hidden_act");
            c.extend(e.clone());
        }
    }
    let write = |name: &str, v: &serde_json::Value| -> Result<()> {
        let p = dir.join(name);
        let s = serde_json::to_string_pretty(v).map_err(|e| EngineError::Json {
            context: name.into(),
            source: e,
        })?;
        std::fs::write(&p, s).map_err(|e| EngineError::io(format!("writing {}", p.display()), e))
    };
    write("config.json", &config)?;
    write(
        "tokenizer_config.json",
        &json!({"bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "unk_token": null, "chat_template": CHATML_TEMPLATE, "model_max_length": 512,
            "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": false}),
    )?;
    write(
        "generation_config.json",
        &json!({"bos_token_id": eot, "eos_token_id": [im_end, eot]}),
    )?;
    tok.save(dir.join("tokenizer.json"), false)
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    Ok(tok)
}

//! Fixtures shared by the tests that train or chat with the tiny seeded model: the model folder and a
//! toy alpaca dataset registered as `toy` in `dataset_info.json`; for the preference stages, preference pairs,
//! kto rows and an f64 model with a trained-looking adapter.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use termtune::config::{self, Purpose};
use termtune::engine::model::Kernels;
use termtune::engine::testing::{TinyOpts, tiny_llama};
use termtune::engine::weights::load_hf_folder;
use termtune::engine::{Finetune, LoraSpec, LoraTargets, Model};

/// Writes the tiny llama (seed 7) to `root/model` and `rows` as dataset `toy` in `root/data`.
pub fn tiny_model_and_toy_data(root: &Path, rows: &[Value]) {
    tiny_llama(&root.join("model"), 7, &TinyOpts::default()).unwrap();
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("toy.json"), serde_json::to_string(rows).unwrap()).unwrap();
    std::fs::write(
        data.join("dataset_info.json"),
        r#"{"toy": {"file_name": "toy.json"}}"#,
    )
    .unwrap();
}

/// `n` examples of varied lengths ("say i abc…" → "ok 7i xyz…").
pub fn varied_rows(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({
                "instruction": format!("say {i} {}", "abc".repeat(i % 3 + 1)),
                "input": "",
                "output": format!("ok {} {}", i * 7, "xyz".repeat(i % 4 + 1)),
            })
        })
        .collect()
}

/// `n` examples ("say i") that all answer `output`.
pub fn same_answer_rows(n: usize, output: &str) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"instruction": format!("say {i}"), "input": "", "output": output}))
        .collect()
}

/// Token ids `v` as a (b, len / b) batch.
pub fn ids(v: &[u32], b: usize) -> Tensor {
    Tensor::from_vec(v.to_vec(), (b, v.len() / b), &Device::Cpu).unwrap()
}

/// Two rows, the second right-padded by two, with the first position of each unlabelled (as the collator does):
/// (input_ids, padding mask, labels). The batch of `tests/engine_reference.py`'s fixtures.
pub fn padded_batch() -> (Tensor, termtune::engine::AttnMask, Tensor) {
    let input = ids(&[5, 70, 71, 100, 33, 9, 250, 12, 40, 41, 42, 43], 2);
    let mask = termtune::engine::AttnMask::Padding {
        attention_mask: Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu)
            .unwrap(),
    };
    let labels = Tensor::new(
        &[
            [-100i64, 70, 71, 100, 33, 9],
            [-100, 12, 40, 41, -100, -100],
        ],
        &Device::Cpu,
    )
    .unwrap();
    (input, mask, labels)
}

/// logits[0, 5, :4] of the padded batch equal `want` to 1e-4.
pub fn assert_logits_0_5(m: &Model, want: &[f64], what: &str) {
    let (x, mask, _) = padded_batch();
    let logits = m.forward(&x, &mask, false).unwrap();
    let got = logits
        .get(0)
        .unwrap()
        .get(5)
        .unwrap()
        .narrow(0, 0, 4)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(got.len(), want.len(), "{what}: logits compared");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (f64::from(*g) - w).abs() < 1e-4,
            "{what}: logits {got:?} vs {want:?}"
        );
    }
}

/// Writes `dir/ours.json` for `tests/engine_reference.py`: the padded batch, `m`'s logits of it, its masked mean
/// loss and the gradients of layers.0.self_attn.q_proj's and layers.1.mlp.down_proj's trainable tensors (f32).
pub fn write_reference_case(dir: &Path, m: &Model) {
    let (x, mask, labels) = padded_batch();
    let logits = m.forward(&x, &mask, false).unwrap();
    let (s, n) = m.forward_loss(&x, &mask, &labels, true).unwrap();
    let loss = (s / n as f64).unwrap();
    let g = loss.backward().unwrap();
    let mut grads = serde_json::Map::new();
    for (n, v) in m.trainable_vars() {
        if n.contains("layers.0.self_attn.q_proj") || n.contains("layers.1.mlp.down_proj") {
            let g = g.get(&v).unwrap().flatten_all().unwrap();
            grads.insert(n, json!(g.to_vec1::<f32>().unwrap()));
        }
    }
    let out = json!({
        "input_ids": x.to_vec2::<u32>().unwrap(),
        "attention_mask": [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]],
        "labels": labels.to_vec2::<i64>().unwrap(),
        "logits": logits.to_vec3::<f32>().unwrap(),
        "loss": loss.to_scalar::<f32>().unwrap(),
        "grads": grads,
    });
    std::fs::write(dir.join("ours.json"), out.to_string()).unwrap();
}

/// The model folder `dir` as two model files: the 2-D weights that `quantize` names held in `ty` blocks, and the
/// same weights dequantized (dense f32).
pub fn quantized_pair(
    dir: &Path,
    ty: candle_core::quantized::GgmlDType,
    quantize: impl Fn(&str) -> bool,
) -> (
    termtune::engine::weights::ModelFiles,
    termtune::engine::weights::ModelFiles,
) {
    let mut quant = load_hf_folder(dir, DType::F32, &Device::Cpu).unwrap();
    let mut dense = load_hf_folder(dir, DType::F32, &Device::Cpu).unwrap();
    let names: Vec<String> = quant
        .tensors
        .iter()
        .filter(|(n, t)| t.rank() == 2 && quantize(n))
        .map(|(n, _)| n.clone())
        .collect();
    for name in names {
        let t = quant.tensors.remove(&name).unwrap();
        let q = candle_core::quantized::QTensor::quantize(&t, ty).unwrap();
        dense
            .tensors
            .insert(name.clone(), q.dequantize(&Device::Cpu).unwrap());
        let q = termtune::engine::qweight::QWeight::new(std::sync::Arc::new(q)).unwrap();
        quant.quantized.insert(name, q);
    }
    (quant, dense)
}

/// The largest absolute difference of two f32 tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// The largest absolute value of an f32 tensor.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Llama-3.1-8B's shape (its config.json's numbers), for memory estimates.
pub fn llama_8b_config() -> termtune::engine::ModelConfig {
    termtune::engine::ModelConfig::from_hf_config(&json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": false
    }))
    .unwrap()
}

/// The tiny model (seed 1234) in f64 with LoRA r 4 on every linear layer whose B matrices are random (a trained
/// adapter: the policy differs from the base), running `kernels`.
pub fn tiny_lora_f64(dir: &Path, kernels: Kernels) -> Model {
    tiny_lora_f64_of(dir, kernels, &TinyOpts::default())
}

/// [`tiny_lora_f64`] on the tiny model of `opts`.
pub fn tiny_lora_f64_of(dir: &Path, kernels: Kernels, opts: &TinyOpts) -> Model {
    tiny_llama(dir, 1234, opts).unwrap();
    let files = load_hf_folder(dir, DType::F64, &Device::Cpu).unwrap();
    let ft = Finetune::Lora(LoraSpec {
        r: 4,
        alpha: 16.0,
        dropout: 0.0,
        targets: LoraTargets::parse("all").unwrap(),
        use_rslora: false,
        use_dora: false,
        seed: 7,
        init: Default::default(),
    });
    let mut m = Model::from_files(&files, DType::F64, &Device::Cpu, &ft).unwrap();
    m.kernels = kernels;
    for (i, (name, v)) in m.trainable_vars().iter().enumerate() {
        if name.ends_with("lora_B.weight") {
            let mut rng = StdRng::seed_from_u64(40 + i as u64);
            let vals: Vec<f64> = (0..v.elem_count())
                .map(|_| rng.random_range(-0.2..0.2))
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    m
}

/// The tiny model (seed 7) and, in `root/data`, `n` preference pairs (alpaca ranking) as `prefs`, the same answers
/// unpaired and tagged (good for even rows) as kto data `feedback`, and SFT rows as `toy`.
pub fn preference_fixture(n: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    tiny_llama(&root.join("model"), 7, &TinyOpts::default()).unwrap();
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let chosen = |i: usize| format!("blue {}", "and green ".repeat(i % 3));
    let rejected = |i: usize| format!("I will not {}", "say it ".repeat(i % 2 + 1));
    let pairs: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "instruction": format!("name a colour {i}"),
                "input": "",
                "chosen": chosen(i),
                "rejected": rejected(i),
            })
        })
        .collect();
    let feedback: Vec<Value> = (0..n)
        .map(|i| {
            let good = i % 2 == 0;
            json!({
                "instruction": format!("name a colour {i}"),
                "input": "",
                "output": if good { chosen(i) } else { rejected(i) },
                "label": good,
            })
        })
        .collect();
    let sft: Vec<Value> = (0..4)
        .map(|i| json!({"instruction": format!("say {i}"), "input": "", "output": "ok"}))
        .collect();
    for (file, rows) in [
        ("prefs.json", pairs),
        ("feedback.json", feedback),
        ("toy.json", sft),
    ] {
        std::fs::write(data.join(file), serde_json::to_string(&rows).unwrap()).unwrap();
    }
    std::fs::write(
        data.join("dataset_info.json"),
        r#"{"prefs": {"file_name": "prefs.json", "ranking": true,
             "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
            "feedback": {"file_name": "feedback.json",
             "columns": {"prompt": "instruction", "query": "input", "response": "output", "kto_tag": "label"}},
            "toy": {"file_name": "toy.json"}}"#,
    )
    .unwrap();
    (dir, root)
}

/// A training preset of `stage` on `dataset` over [`preference_fixture`]'s folder (LoRA r 4, batch 2 x 2, constant
/// lr 5e-3, a log line per step), with `extra` overrides (`key: value`).
pub fn preference_preset(
    root: &Path,
    stage: &str,
    dataset: &str,
    extra: &[&str],
) -> Result<config::Loaded, Vec<config::ConfigIssue>> {
    let text = format!(
        "model_name_or_path: {}\nstage: {stage}\ndataset: {dataset}\ndataset_dir: {}\ntemplate: chatml\ncutoff_len: 64\n\
         output_dir: {}\nlogging_steps: 1\nsave_steps: 1000\nper_device_train_batch_size: 2\n\
         gradient_accumulation_steps: 2\nlearning_rate: 5.0e-3\nlora_rank: 4\n\
         lr_scheduler_type: constant\ntokenized_path: {}\nseed: 3\n",
        root.join("model").display(),
        root.join("data").display(),
        root.join("out").display(),
        root.join("tokcache").display(),
    );
    let overrides: Vec<String> = extra.iter().map(|e| e.replacen(": ", "=", 1)).collect();
    config::parse(&text, &overrides, Purpose::Train)
}

/// Trains `loaded` on the CPU: the outcome (its error as text) and each step's metrics.
pub fn train_steps(
    loaded: &config::Loaded,
) -> (
    Result<(), String>,
    Vec<termtune::trainer::protocol::StepMetrics>,
) {
    let (_tx, rx) = std::sync::mpsc::channel();
    let mut steps = Vec::new();
    let r = termtune::trainer::run::run_training(loaded, &Device::Cpu, &rx, &mut |e| {
        if let termtune::trainer::protocol::TrainEvent::StepFinished(m) = e {
            steps.push(m);
        }
    })
    .map(|_| ())
    .map_err(|e| e.to_string());
    (r, steps)
}

/// A model file or folder loaded on the CPU in f32 as `gguf` says, offline (no hub variables).
pub fn load_f32(
    path: &std::path::Path,
    gguf: termtune::engine::source::GgufWeights,
) -> termtune::engine::source::LoadedSource {
    let hub = termtune::engine::hub::HubOptions::from_vars(|_| None);
    termtune::engine::source::load_model_with(
        path.to_str().unwrap(),
        &hub,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        gguf,
        &mut |_| {},
    )
    .unwrap()
}

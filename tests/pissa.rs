//! PiSSA (`pissa_init`, `pissa_iter`, `pissa_convert`) on the tiny seeded llama: the model starts as the base, a
//! saved PiSSA adapter loads (merged or trained on) as the model that was trained, the conversion is a plain LoRA
//! for the original base, and the preset rules. PEFT's own decomposition is checked in `engine::pissa`'s goldens;
//! `scripts/pissa_peft_check.py` loads these adapters in PEFT (`dump_pissa_reference`).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use termtune::config::{self, Purpose};
use termtune::engine::adapter::{load_adapter_trainable, merge_adapter, save_adapter};
use termtune::engine::pissa::LoraInit;
use termtune::engine::testing::{TinyOpts, tiny_llama};
use termtune::engine::weights::load_hf_folder;
use termtune::engine::{AttnMask, Finetune, LoraSpec, LoraTargets, Model};

use crate::tiny_util::{max_abs_diff, tiny_model_and_toy_data, train_steps, varied_rows};

const CPU: Device = Device::Cpu;

fn spec(init: LoraInit, use_dora: bool) -> LoraSpec {
    LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: LoraTargets::All,
        use_rslora: false,
        use_dora,
        seed: 7,
        init,
    }
}

fn model(dir: &Path, ft: &Finetune) -> Model {
    let files = load_hf_folder(dir, DType::F32, &CPU).unwrap();
    Model::from_files(&files, DType::F32, &CPU, ft).unwrap()
}

fn logits(m: &Model) -> Tensor {
    let x = Tensor::from_vec((3..19u32).collect::<Vec<_>>(), (1, 16), &CPU).unwrap();
    m.forward(&x, &AttnMask::Causal, false).unwrap()
}

/// As after training: every trainable tensor moved by a seeded amount in ±0.05.
fn nudge(m: &Model, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (_, v) in m.trainable_vars() {
        let n = v.elem_count();
        let d: Vec<f32> = (0..n).map(|_| rng.random_range(-0.05..0.05)).collect();
        let d = Tensor::from_vec(d, v.dims(), &CPU).unwrap();
        v.set(&(v.as_tensor() + d).unwrap()).unwrap();
    }
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// At step 0 a PiSSA model computes the base's function (residual + s·B·A = W), though B ≠ 0; after training,
/// its saved adapter (`init_lora_weights` says how it started) loads over a fresh base, merged (chat, export)
/// or as the LoRA to train on, as the same model: loading re-makes the residual. Without that step (the file
/// read as a plain LoRA) it would be another model.
#[test]
fn a_pissa_adapter_starts_at_the_base_and_loads_as_trained() {
    let dir = tempfile::tempdir().unwrap();
    let base_dir = dir.path().join("model");
    tiny_llama(&base_dir, 7, &TinyOpts::default()).unwrap();
    let base = logits(&model(&base_dir, &Finetune::Frozen));
    for (init, dora) in [
        (LoraInit::Pissa { niter: Some(16) }, false),
        (LoraInit::Pissa { niter: None }, false),
        (LoraInit::Pissa { niter: Some(4) }, true),
    ] {
        let what = format!("{init:?} dora {dora}");
        let m = model(&base_dir, &Finetune::Lora(spec(init, dora)));
        let b_norm: f32 = m
            .trainable_vars()
            .iter()
            .filter(|(n, _)| n.ends_with("lora_B.weight"))
            .map(|(_, v)| crate::tiny_util::max_abs(v.as_tensor()))
            .fold(0.0, f32::max);
        assert!(b_norm > 0.01, "{what}: PiSSA's B starts non-zero");
        let start = max_abs_diff(&logits(&m), &base);
        assert!(
            start < 1e-4,
            "{what}: step 0 differs from the base by {start}"
        );

        nudge(&m, 11);
        let trained = logits(&m);
        let saved = dir.path().join(format!("adapter-{}", init.peft_value()));
        save_adapter(&m, &saved, "tiny").unwrap();
        let cfg = read_json(&saved.join("adapter_config.json"));
        assert_eq!(cfg["init_lora_weights"], init.peft_value(), "{what}");

        let mut merged = model(&base_dir, &Finetune::Frozen);
        merge_adapter(&mut merged, &saved).unwrap();
        let d = max_abs_diff(&logits(&merged), &trained);
        assert!(d < 1e-4, "{what}: merged over a fresh base differs by {d}");

        let mut resumed = model(&base_dir, &Finetune::Frozen);
        load_adapter_trainable(&mut resumed, &saved).unwrap();
        let d = max_abs_diff(&logits(&resumed), &trained);
        assert!(d < 1e-4, "{what}: loaded to train on differs by {d}");

        // The same tensors read as a plain LoRA are another model.
        let mut plain_cfg = cfg.clone();
        plain_cfg["init_lora_weights"] = Value::Bool(true);
        std::fs::write(saved.join("adapter_config.json"), plain_cfg.to_string()).unwrap();
        let mut plain = model(&base_dir, &Finetune::Frozen);
        merge_adapter(&mut plain, &saved).unwrap();
        let d = max_abs_diff(&logits(&plain), &trained);
        assert!(d > 1e-2, "{what}: the residual made no difference ({d})");
    }
}

/// An adapter whose initialisation changed the base in a way termtune does not re-make (OLoRA, CorDA, LoftQ, …)
/// is refused with the fix, instead of loading as another model.
#[test]
fn other_base_changing_initialisations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base_dir = dir.path().join("model");
    tiny_llama(&base_dir, 7, &TinyOpts::default()).unwrap();
    let m = model(&base_dir, &Finetune::Lora(spec(LoraInit::Default, false)));
    let saved = dir.path().join("olora");
    save_adapter(&m, &saved, "tiny").unwrap();
    let mut cfg = read_json(&saved.join("adapter_config.json"));
    cfg["init_lora_weights"] = Value::String("olora".into());
    std::fs::write(saved.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut fresh = model(&base_dir, &Finetune::Frozen);
    let err = merge_adapter(&mut fresh, &saved).unwrap_err().to_string();
    assert!(
        err.contains("olora") && err.contains("path_initial_model_for_weight_conversion"),
        "{err}"
    );
}

/// A GGUF base kept in its quantized blocks has no float weight to decompose: the error says to dequantize it.
#[test]
fn pissa_on_gguf_blocks_says_to_dequantize() {
    let dir = tempfile::tempdir().unwrap();
    let base_dir = dir.path().join("model");
    tiny_llama(&base_dir, 7, &TinyOpts::default()).unwrap();
    let (quant, _) =
        crate::tiny_util::quantized_pair(&base_dir, candle_core::quantized::GgmlDType::Q8_0, |n| {
            n.contains("layers.")
        });
    let ft = Finetune::Lora(spec(LoraInit::Pissa { niter: Some(2) }, false));
    let err = Model::from_files(&quant, DType::F32, &CPU, &ft)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("gguf_dequantize: true"), "{err}");
}

fn preset_text(root: &Path, out: &str) -> String {
    format!(
        "model_name_or_path: {}\ndataset: toy\ndataset_dir: {}\ntemplate: chatml\ncutoff_len: 64\n\
         output_dir: {}\nlogging_steps: 1\nsave_steps: 1000\nper_device_train_batch_size: 2\n\
         learning_rate: 1.0e-2\nlora_rank: 4\nlr_scheduler_type: constant\nmax_steps: 3\n\
         tokenized_path: {}\nseed: 3\n",
        root.join("model").display(),
        root.join("data").display(),
        root.join(out).display(),
        root.join("tokcache").display(),
    )
}

fn loaded(root: &Path, out: &str, extra: &[&str]) -> config::Loaded {
    let overrides: Vec<String> = extra.iter().map(|e| e.replacen(": ", "=", 1)).collect();
    config::parse(&preset_text(root, out), &overrides, Purpose::Train)
        .unwrap_or_else(|e| panic!("{e:?}"))
}

/// `pissa_init` + `pissa_convert` through the trainer, as LLaMA-Factory lays the run out: the run folder holds the
/// PiSSA adapter, `pissa_init/` its start as a plain adapter, `pissa_converted/` a plain LoRA of rank 2r with
/// alpha doubled. Step 1's loss is the base model's (a plain LoRA run's step 1), the converted adapter on the
/// original base is the PiSSA adapter on its residual, and the two SVDs train differently from plain LoRA.
#[test]
fn pissa_convert_writes_a_plain_lora_for_the_original_base() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    tiny_model_and_toy_data(root, &varied_rows(8));
    let (r, plain) = train_steps(&loaded(root, "plain", &[]));
    r.unwrap();
    // rsLoRA's scale alpha/√r: the conversion keeps it with alpha × √2 (PEFT's rule), checked by the logits below;
    // LoRA+ rides along (its learning rates do not touch the conversion).
    for (out, iter, extra) in [
        ("fast", "16", &[][..]),
        ("exact", "-1", &[][..]),
        (
            "rslora",
            "16",
            &["use_rslora: true", "loraplus_lr_ratio: 4"][..],
        ),
    ] {
        let run = root.join(out);
        let iter_line = format!("pissa_iter: {iter}");
        let mut options = vec!["pissa_init: true", &iter_line, "pissa_convert: true"];
        options.extend_from_slice(extra);
        let (r, steps) = train_steps(&loaded(root, out, &options));
        r.unwrap();
        assert!(
            (steps[0].loss - plain[0].loss).abs() < 1e-4,
            "{out}: step 1 {} vs the base's {}",
            steps[0].loss,
            plain[0].loss
        );
        assert!(
            (steps[2].loss - plain[2].loss).abs() > 1e-4,
            "{out}: PiSSA trained as plain LoRA does"
        );
        let cfg = read_json(&run.join("adapter_config.json"));
        let want = if iter == "-1" {
            "pissa".to_string()
        } else {
            "pissa_niter_16".to_string()
        };
        assert_eq!(cfg["init_lora_weights"], Value::String(want), "{out}");
        let start = read_json(&run.join("pissa_init/adapter_config.json"));
        assert_eq!(start["init_lora_weights"], Value::Bool(true), "{out}");
        assert_eq!(start["r"], 4);
        let conv = read_json(&run.join("pissa_converted/adapter_config.json"));
        assert_eq!(conv["init_lora_weights"], Value::Bool(true), "{out}");
        assert_eq!(conv["r"], 8);
        let alpha_factor = if out == "rslora" {
            std::f64::consts::SQRT_2
        } else {
            2.0
        };
        // (serde_json reads floats to within an ulp, not exactly round-trip)
        let want_alpha = alpha_factor * cfg["lora_alpha"].as_f64().unwrap();
        assert!(
            (conv["lora_alpha"].as_f64().unwrap() - want_alpha).abs() < 1e-9,
            "{out}: {} vs {want_alpha}",
            conv["lora_alpha"]
        );

        let mut pissa = model(&root.join("model"), &Finetune::Frozen);
        merge_adapter(&mut pissa, &run).unwrap();
        let mut converted = model(&root.join("model"), &Finetune::Frozen);
        merge_adapter(&mut converted, &run.join("pissa_converted")).unwrap();
        let d = max_abs_diff(&logits(&converted), &logits(&pissa));
        assert!(d < 1e-4, "{out}: converted vs PiSSA differ by {d}");
        let base = logits(&model(&root.join("model"), &Finetune::Frozen));
        assert!(
            max_abs_diff(&logits(&converted), &base) > 1e-3,
            "{out}: trained"
        );
    }
}

/// `termtune export --adapter-only` of a PiSSA adapter trained without `pissa_convert`: the exported folder is the
/// conversion (its start decomposed again from the base), a plain rank-2r LoRA that over the original base is the
/// trained model, with the tokenizer files and a model card; a plain adapter is still copied as it is.
#[test]
fn adapter_only_export_converts_a_pissa_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    tiny_model_and_toy_data(root, &varied_rows(8));
    let run = root.join("run");
    let (r, _) = train_steps(&loaded(root, "run", &["pissa_init: true"]));
    r.unwrap();
    let out = root.join("exported");
    let text = format!(
        "model_name_or_path: {}\nadapter_name_or_path: {}\nexport_dir: {}\ntemplate: chatml\n",
        root.join("model").display(),
        run.display(),
        out.display()
    );
    let p = config::parse(&text, &[], Purpose::Export).unwrap().preset;
    let mut lines = Vec::new();
    let report = termtune::export::export_adapter(&p, &mut |l| lines.push(l.to_string())).unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("is a PiSSA adapter: converting")),
        "{lines:?}"
    );
    for f in [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
    ] {
        assert!(
            report.files.iter().any(|x| x == f),
            "{f}: {:?}",
            report.files
        );
    }
    assert!(!out.join(".pissa").exists());
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["init_lora_weights"], Value::Bool(true));
    assert_eq!(cfg["r"], 8);
    let mut pissa = model(&root.join("model"), &Finetune::Frozen);
    merge_adapter(&mut pissa, &run).unwrap();
    let mut converted = model(&root.join("model"), &Finetune::Frozen);
    merge_adapter(&mut converted, &out).unwrap();
    let d = max_abs_diff(&logits(&converted), &logits(&pissa));
    assert!(d < 1e-4, "exported conversion vs the PiSSA adapter: {d}");
}

/// LLaMA-Factory's rules and termtune's where LLaMA-Factory would silently do something else, each naming the key.
#[test]
fn pissa_keys_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cases: [(&[&str], &str, &str); 6] = [
        (&["pissa_iter: -2"], "pissa_iter", "-1 for the exact SVD"),
        (
            &["pissa_convert: true"],
            "pissa_convert",
            "pissa_init: true",
        ),
        (
            &["pissa_init: true", "finetuning_type: full"],
            "pissa_init",
            "only valid for LoRA",
        ),
        (
            &["pissa_init: true", "quantization_bit: 4"],
            "pissa_init",
            "quantized base",
        ),
        (
            &["pissa_init: true", "stage: kto"],
            "pissa_init",
            "residual model",
        ),
        (
            &["pissa_init: true", "adapter_name_or_path: some/adapter"],
            "pissa_init",
            "create_new_adapter: true",
        ),
    ];
    for (extra, key, says) in cases {
        let overrides: Vec<String> = extra.iter().map(|e| e.replacen(": ", "=", 1)).collect();
        let err = config::parse(&preset_text(root, "out"), &overrides, Purpose::Train)
            .err()
            .unwrap_or_else(|| panic!("{extra:?} was accepted"));
        let text = format!("{err:?}");
        assert!(
            text.contains(key) && text.contains(says),
            "{extra:?}: {text}"
        );
    }
    // The exact SVD on a LoRA run is fine.
    let overrides = ["pissa_init=true".to_string(), "pissa_iter=-1".to_string()];
    config::parse(&preset_text(root, "out"), &overrides, Purpose::Train).unwrap();
}

/// Writes what `scripts/pissa_peft_check.py` compares with PEFT: the tiny base, a trained PiSSA adapter for each
/// SVD (its start in `pissa_init/`, its conversion in `pissa_converted/`) and termtune's logits of a fixed input:
/// `PISSA_REF_DIR=/tmp/pissa cargo test --test integration -- --ignored dump_pissa_reference`
#[test]
#[ignore = "writes PISSA_REF_DIR for scripts/pissa_peft_check.py"]
fn dump_pissa_reference() {
    let out = std::path::PathBuf::from(std::env::var("PISSA_REF_DIR").unwrap());
    let base_dir = out.join("model");
    tiny_llama(&base_dir, 7, &TinyOpts::default()).unwrap();
    for (name, init) in [
        ("exact", LoraInit::Pissa { niter: None }),
        ("niter16", LoraInit::Pissa { niter: Some(16) }),
    ] {
        let m = model(&base_dir, &Finetune::Lora(spec(init, false)));
        let run = out.join(name);
        termtune::engine::adapter::save_adapter_as(
            &m,
            &run.join("pissa_init"),
            "tiny",
            LoraInit::Default,
        )
        .unwrap();
        nudge(&m, 11);
        save_adapter(&m, &run, "tiny").unwrap();
        termtune::engine::adapter::convert_pissa(
            &run,
            &run.join("pissa_init"),
            &run.join("pissa_converted"),
        )
        .unwrap();
        let l = logits(&m).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        std::fs::write(
            run.join("termtune_logits.json"),
            serde_json::to_string(&l).unwrap(),
        )
        .unwrap();
    }
}

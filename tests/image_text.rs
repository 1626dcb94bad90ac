//! Gemma 3's image-and-text checkpoints (`gemma3`, Gemma3ForConditionalGeneration: gemma-3-4b and larger): termtune
//! runs their text model. The test checkpoint is the tiny Gemma 3 text model (whose logits and LoRA gradients equal
//! transformers': `engine::matches_transformers_and_peft_goldens`) stored as transformers 5.25 stores an
//! image-and-text model, with a tiny SigLIP vision tower and projector (tests/fixtures/gemma3_image_text, written by
//! transformers; `scripts/gemma3_image_text_reference.py` checks the whole round trip in transformers + PEFT).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use termtune::engine::testing::{TinyOpts, max_abs_diff, tiny_llama};
use termtune::engine::weights::{load_hf_folder, save_safetensors};
use termtune::engine::{
    ArchKind, AttnMask, Finetune, LoraSpec, LoraTargets, Model, adapter, weights,
};

const CPU: Device = Device::Cpu;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma3_image_text")
}

/// The tiny Gemma 3 text model in `root/text` and the same weights as an image-and-text checkpoint in
/// `root/image_text` (text tensors under `language_model.model.`, the fixture's vision tower and projector).
fn checkpoints(root: &Path) -> (PathBuf, PathBuf) {
    let text = root.join("text");
    let opts = TinyOpts {
        arch: ArchKind::Gemma3,
        ..TinyOpts::default()
    };
    tiny_llama(&text, 1234, &opts).unwrap();
    let it = root.join("image_text");
    std::fs::create_dir_all(&it).unwrap();
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(text.join("model.safetensors"), &CPU)
            .unwrap()
            .into_iter()
            .map(|(n, t)| (format!("language_model.{n}"), t))
            .collect();
    tensors.extend(
        candle_core::safetensors::load(fixture().join("vision.safetensors"), &CPU).unwrap(),
    );
    save_safetensors(&tensors, &it.join("model.safetensors")).unwrap();
    std::fs::copy(fixture().join("config.json"), it.join("config.json")).unwrap();
    // A processor file, as the image-and-text checkpoints carry (an export copies it).
    std::fs::write(
        it.join("preprocessor_config.json"),
        r#"{"image_processor_type": "Gemma3ImageProcessor"}"#,
    )
    .unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(text.join(f), it.join(f)).unwrap();
    }
    (text, it)
}

fn lora() -> Finetune {
    Finetune::Lora(LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: LoraTargets::parse("all").unwrap(),
        use_rslora: false,
        use_dora: false,
        seed: 3,
        init: Default::default(),
    })
}

fn load(dir: &Path, ft: &Finetune) -> Model {
    let files = load_hf_folder(dir, DType::F32, &CPU).unwrap();
    Model::from_files(&files, DType::F32, &CPU, ft).unwrap()
}

fn logits(m: &Model) -> Tensor {
    let ids = Tensor::new(&[[5u32, 71, 200, 13, 290, 17, 33, 101, 250, 9]], &CPU).unwrap();
    m.forward(&ids, &AttnMask::Causal, false).unwrap()
}

/// Seeded non-zero LoRA B (as after training).
fn trained(m: &Model) {
    let mut rng = StdRng::seed_from_u64(9);
    for (name, v) in m.trainable_vars() {
        if name.ends_with("lora_B.weight") {
            let (o, r) = v.dims2().unwrap();
            let data: Vec<f32> = (0..o * r).map(|_| rng.random_range(-0.2..0.2)).collect();
            v.set(&Tensor::from_vec(data, (o, r), &CPU).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn the_text_model_of_an_image_text_checkpoint_is_the_text_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (text, it) = checkpoints(tmp.path());
    let files = load_hf_folder(&it, DType::F32, &CPU).unwrap();
    // Only the text model was read, under termtune's names.
    assert!(files.tensors.keys().all(|n| n.starts_with("model.")));
    assert!(
        files
            .tensors
            .contains_key("model.layers.1.post_feedforward_layernorm.weight")
    );
    let m = Model::from_files(&files, DType::F32, &CPU, &Finetune::Frozen).unwrap();
    assert!(m.cfg.image_text);
    assert_eq!(m.cfg.layer_windows, [Some(3), None]);
    assert_eq!(m.cfg.eos_token_ids, [290]);
    let diff = max_abs_diff(&logits(&m), &logits(&load(&text, &Finetune::Frozen))).unwrap();
    assert_eq!(diff, 0.0);
    // Full and freeze fine-tuning would save a model without its vision tower: refused, naming the fix.
    for ft in [Finetune::Full, Finetune::freeze(1)] {
        let err = Model::from_files(&files, DType::F32, &CPU, &ft)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("finetuning_type: lora"), "{err}");
    }
}

/// The adapter names the modules as PEFT does on the checkpoint (transformers 4's layout, which PEFT also reads
/// under transformers 5) with LLaMA-Factory's vision-tower-excluding pattern; an adapter written with transformers
/// 5's names loads the same; merging it equals applying it; the export writes the merged text model under the
/// checkpoint's names beside the untouched vision tower, and reloads to the same logits.
#[test]
fn adapters_and_exports_of_an_image_text_checkpoint_keep_its_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, it) = checkpoints(tmp.path());
    let m = load(&it, &lora());
    trained(&m);
    let want = logits(&m);
    let ad = tmp.path().join("adapter");
    adapter::save_adapter(&m, &ad, "tiny/gemma3-image-text").unwrap();
    let saved = candle_core::safetensors::load(ad.join("adapter_model.safetensors"), &CPU).unwrap();
    assert_eq!(saved.len(), 2 * 7 * 2);
    assert!(
        saved
            .keys()
            .all(|k| k.starts_with("base_model.model.language_model.model.layers.")),
        "{:?}",
        saved.keys().collect::<Vec<_>>()
    );
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(ad.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["target_modules"],
        "^(?!.*vision_tower).*(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj).*"
    );
    // transformers 5's module names (what PEFT 0.21 writes there) read the same.
    let ad5 = tmp.path().join("adapter5");
    std::fs::create_dir_all(&ad5).unwrap();
    std::fs::copy(
        ad.join("adapter_config.json"),
        ad5.join("adapter_config.json"),
    )
    .unwrap();
    let renamed: HashMap<String, Tensor> = saved
        .iter()
        .map(|(k, t)| {
            (
                k.replace(
                    "base_model.model.language_model.model.",
                    "base_model.model.model.language_model.",
                ),
                t.clone(),
            )
        })
        .collect();
    save_safetensors(&renamed, &ad5.join("adapter_model.safetensors")).unwrap();
    for dir in [&ad, &ad5] {
        let mut merged = load(&it, &Finetune::Frozen);
        adapter::merge_adapter(&mut merged, dir).unwrap();
        let d = max_abs_diff(&logits(&merged), &want).unwrap();
        assert!(d < 1e-4, "{}: {d}", dir.display());
    }

    let out = tmp.path().join("merged");
    let p = crate::export::merge_preset(&it, &ad, &out);
    let mut lines = Vec::new();
    termtune::export::export(&p, &CPU, &mut |l| lines.push(l.to_string())).unwrap();
    assert!(
        lines.iter().any(|l| l.contains("vision tower")),
        "{lines:?}"
    );
    let written =
        weights::load_safetensors(&weights::safetensors_files(&out).unwrap(), DType::F32, &CPU)
            .unwrap();
    let vision =
        candle_core::safetensors::load(fixture().join("vision.safetensors"), &CPU).unwrap();
    for (n, t) in &vision {
        assert_eq!(
            max_abs_diff(&written[n], t).unwrap(),
            0.0,
            "{n} copied through"
        );
    }
    assert_eq!(
        written.len(),
        vision.len() + load(&it, &Finetune::Frozen).merged_tensors().unwrap().len()
    );
    assert!(written.contains_key("language_model.model.layers.0.self_attn.q_proj.weight"));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gemma3");
    assert_eq!(
        std::fs::read(out.join("preprocessor_config.json")).unwrap(),
        std::fs::read(it.join("preprocessor_config.json")).unwrap()
    );
    let d = max_abs_diff(&logits(&load(&out, &Finetune::Frozen)), &want).unwrap();
    assert!(d < 1e-4, "{d}");

    // `scripts/gemma3_image_text_reference.py` loads these in transformers + PEFT (not in CI).
    if let Ok(keep) = std::env::var("TERMTUNE_IMAGE_TEXT_REFERENCE_DIR") {
        let keep = Path::new(&keep);
        for (from, to) in [(&it, "checkpoint"), (&ad, "adapter"), (&out, "merged")] {
            let dst = keep.join(to);
            std::fs::create_dir_all(&dst).unwrap();
            for e in std::fs::read_dir(from).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
            }
        }
        let v: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        std::fs::write(keep.join("logits.json"), serde_json::to_string(&v).unwrap()).unwrap();
    }
}

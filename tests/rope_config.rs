//! RoPE settings in both config.json layouts: transformers 4's top-level `rope_theta` + `rope_scaling` and
//! transformers 5's `rope_parameters` give the same model (bit-identical logits) for every rope_type termtune
//! computes; a rope_type it does not compute is an error naming it. YaRN's logits equal transformers'
//! (`scripts/rope_reference.py` wrote the goldens).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};
use termtune::engine::testing::{TinyOpts, tiny_llama};
use termtune::engine::weights::load_hf_folder;
use termtune::engine::{AttnMask, Finetune, Model};

const CPU: Device = Device::Cpu;

/// The tiny model's config.json with the RoPE keys replaced by `rope` (the other keys as written).
fn write_config(dir: &Path, base: &Value, rope: &Value) {
    let mut c = base.clone();
    let map = c.as_object_mut().unwrap();
    for k in ["rope_theta", "rope_scaling", "rope_parameters"] {
        map.remove(k);
    }
    for (k, v) in rope.as_object().unwrap() {
        map.insert(k.clone(), v.clone());
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&c).unwrap(),
    )
    .unwrap();
}

/// Logits of the tiny model loaded from `dir` through the real loader, on 24 positions (long enough that
/// the low frequencies, which the scalings change, move the logits).
fn logits(dir: &Path) -> Result<Vec<f32>, String> {
    let files = load_hf_folder(dir, DType::F32, &CPU).map_err(|e| e.to_string())?;
    let model = Model::from_files(&files, DType::F32, &CPU, &Finetune::Frozen)
        .map_err(|e| e.to_string())?;
    let ids: Vec<u32> = (0..24).map(|i| 3 + (i * 7) % 200).collect();
    let x = Tensor::from_vec(ids, (1, 24), &CPU).unwrap();
    let l = model.forward(&x, &AttnMask::Causal, false).unwrap();
    Ok(l.flatten_all().unwrap().to_vec1::<f32>().unwrap())
}

/// The largest difference between two logit lists.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

#[test]
fn old_and_new_rope_layouts_give_identical_logits() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path(), 11, &TinyOpts::default()).unwrap();
    let base: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap())
            .unwrap();

    write_config(d.path(), &base, &json!({}));
    let plain = logits(d.path()).unwrap();

    let llama3 = json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16});
    let mut llama3_old = llama3.clone();
    llama3_old["rope_type"] = json!("llama3");
    let mut llama3_new = llama3;
    llama3_new["rope_type"] = json!("llama3");
    llama3_new["rope_theta"] = json!(20000.0);
    let cases = [
        (
            "default",
            json!({"rope_theta": 500.0}),
            json!({"rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}}),
        ),
        (
            "linear",
            json!({"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}),
            json!({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}}),
        ),
        (
            "llama3",
            json!({"rope_theta": 20000.0, "rope_scaling": llama3_old}),
            json!({"rope_parameters": llama3_new}),
        ),
        (
            "yarn",
            json!({"rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 4.0,
                "original_max_position_embeddings": 16, "beta_fast": 8.0}}),
            json!({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                "original_max_position_embeddings": 16, "beta_fast": 8.0}}),
        ),
    ];
    for (kind, old, new) in cases {
        write_config(d.path(), &base, &old);
        let a = logits(d.path()).unwrap_or_else(|e| panic!("{kind} (old layout): {e}"));
        write_config(d.path(), &base, &new);
        let b = logits(d.path()).unwrap_or_else(|e| panic!("{kind} (new layout): {e}"));
        assert_eq!((a.len(), b.len()), (plain.len(), plain.len()), "{kind}");
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{kind}: the layouts give different logits"
        );
        // The settings reach the model: the logits are not those of plain RoPE at theta 10000.
        let moved = max_diff(&a, &plain);
        assert!(moved > 1e-4, "{kind}: logits equal plain RoPE's ({moved})");
    }

    // A rope_type termtune does not compute is an error naming it, in either layout.
    for rope in [
        json!({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
        json!({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}),
        json!({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}),
    ] {
        write_config(d.path(), &base, &rope);
        let e = logits(d.path()).err().unwrap();
        let kind = rope.as_object().unwrap().values().next().unwrap()["rope_type"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!("{kind:?}")) && e.contains("rope_type"),
            "{e}"
        );
    }
}

/// The YaRN cases of [`yarn_matches_transformers_goldens`]: name, RoPE keys, transformers 5.25's logits at
/// positions 5 and 23 (first four of the vocabulary), from `scripts/rope_reference.py`.
fn yarn_cases() -> Vec<(&'static str, Value, [f32; 4], [f32; 4])> {
    vec![
        (
            // transformers 4's layout, `type`, every optional key at its default (attention factor 0.1·ln 4 + 1).
            "yarn_default",
            json!({"rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 4.0,
                "original_max_position_embeddings": 16}}),
            GOLDEN_YARN_DEFAULT.0,
            GOLDEN_YARN_DEFAULT.1,
        ),
        (
            // transformers 5's layout with every optional key: betas, mscale / mscale_all_dim, no truncation.
            "yarn_all_keys",
            json!({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0,
                "original_max_position_embeddings": 12, "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.7,
                "mscale_all_dim": 0.3, "truncate": false}}),
            GOLDEN_YARN_ALL_KEYS.0,
            GOLDEN_YARN_ALL_KEYS.1,
        ),
        (
            // An explicit attention factor; the pretraining length from the top-level key (Phi-3's place).
            "yarn_attention_factor",
            json!({"rope_theta": 10000.0, "original_max_position_embeddings": 20,
                "rope_scaling": {"rope_type": "yarn", "factor": 3.0, "attention_factor": 1.3}}),
            GOLDEN_YARN_ATTENTION_FACTOR.0,
            GOLDEN_YARN_ATTENTION_FACTOR.1,
        ),
    ]
}

type Golden = ([f32; 4], [f32; 4]);
const GOLDEN_YARN_DEFAULT: Golden = (
    [0.210_565_34, 0.234_248_41, -0.400_655_7, -5.979_624],
    [7.318_472_4, -3.153_313, 0.888_742_7, -4.765_348_4],
);
const GOLDEN_YARN_ALL_KEYS: Golden = (
    [1.237_729_4, -0.680_965_2, -2.106_109, -6.354_636],
    [8.950_946, -3.520_089_6, 1.998_048, -2.888_941_8],
);
const GOLDEN_YARN_ATTENTION_FACTOR: Golden = (
    [-0.330_784_92, 0.039_406_557, 0.186_849_16, -6.628_331_7],
    [5.870_201_6, -3.708_462_5, 0.550_014_6, -5.147_536_3],
);

#[test]
fn yarn_matches_transformers_goldens() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path(), 11, &TinyOpts::default()).unwrap();
    let base: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap())
            .unwrap();
    write_config(d.path(), &base, &json!({}));
    let plain = logits(d.path()).unwrap();
    let vocab = plain.len() / 24;
    for (name, rope, at5, at23) in yarn_cases() {
        write_config(d.path(), &base, &rope);
        let got = logits(d.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (pos, want) in [(5, at5), (23, at23)] {
            let row = &got[pos * vocab..pos * vocab + 4];
            for (g, w) in row.iter().zip(want) {
                assert!(
                    (g - w).abs() < 1e-4,
                    "{name}: logits[{pos}] {row:?} vs transformers {want:?}"
                );
            }
        }
        let moved = max_diff(&got, &plain);
        assert!(moved > 1e-3, "{name}: logits equal plain RoPE's ({moved})");
    }
}

/// Writes each YaRN case as a model folder with termtune's logits (`ours.json`) under `ROPE_REF_DIR`, for
/// `scripts/rope_reference.py`.
#[test]
#[ignore = "writes the fixture scripts/rope_reference.py reads (ROPE_REF_DIR)"]
fn dump_rope_reference() {
    let root = std::path::PathBuf::from(std::env::var("ROPE_REF_DIR").expect("ROPE_REF_DIR"));
    for (name, rope, _, _) in yarn_cases() {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        tiny_llama(&d, 11, &TinyOpts::default()).unwrap();
        let base: Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
        write_config(&d, &base, &rope);
        let got = logits(&d).unwrap();
        let ids: Vec<u32> = (0..24).map(|i| 3 + (i * 7) % 200).collect();
        std::fs::write(
            d.join("ours.json"),
            serde_json::to_string(&json!({"input_ids": [ids], "logits": got})).unwrap(),
        )
        .unwrap();
    }
}

/// The loading lines and step losses of training `loaded` on the CPU.
fn train_logged(loaded: &termtune::config::Loaded) -> (Vec<String>, Vec<f64>) {
    let (_tx, rx) = std::sync::mpsc::channel();
    let (mut lines, mut losses) = (Vec::new(), Vec::new());
    termtune::trainer::run::run_training(loaded, &CPU, &rx, &mut |e| match e {
        termtune::trainer::protocol::TrainEvent::Loading { what } => lines.push(what),
        termtune::trainer::protocol::TrainEvent::StepFinished(m) => losses.push(m.loss),
        _ => {}
    })
    .unwrap();
    (lines, losses)
}

/// LLaMA-Factory's `rope_scaling` key: training past the model's 512 positions scales RoPE by ⌈cutoff_len / 512⌉
/// (the losses move; a cutoff_len that fits changes nothing), the export's config.json carries the scaling and the
/// grown length, and chat without the training cutoff_len takes factor 2 (LLaMA-Factory's inference rule).
#[test]
fn rope_scaling_key_extends_the_context_in_training_chat_and_export() {
    use termtune::config::Purpose;
    let (_d, root) = crate::tiny_util::preference_fixture(4);
    let run = |out: &str, extra: &[&str]| {
        let mut all = vec!["max_steps: 2"];
        all.extend_from_slice(extra);
        let mut loaded = crate::tiny_util::preference_preset(&root, "sft", "toy", &all).unwrap();
        loaded.preset.output_dir = root.join(out).display().to_string();
        train_logged(&loaded)
    };
    let (_, plain) = run("plain", &[]);
    let (lines, fits) = run("fits", &["rope_scaling: linear", "cutoff_len: 500"]);
    assert!(
        lines.iter().any(|l| l.contains("rope_scaling linear: off")
            && l.contains("cutoff_len 500 fits the model's 512 positions")),
        "{lines:?}"
    );
    assert_eq!(
        fits, plain,
        "a cutoff_len that fits leaves the model as it is"
    );
    let (lines, scaled) = run("scaled", &["rope_scaling: linear", "cutoff_len: 1500"]);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("rope_scaling linear: factor 3 (512 → 1536 positions)")),
        "{lines:?}"
    );
    assert!(
        (scaled[0] - plain[0]).abs() > 1e-4,
        "the scaled RoPE reaches training: {scaled:?} vs {plain:?}"
    );

    // Export with the training preset's cutoff_len: the same factor, written into config.json.
    let export = |name: &str, extra: &[&str]| -> Value {
        let out = root.join(name);
        let mut lines = vec![
            format!("model_name_or_path: {}", root.join("model").display()),
            format!("adapter_name_or_path: {}", root.join("scaled").display()),
            format!("export_dir: {}", out.display()),
            "infer_dtype: float32".into(),
        ];
        lines.extend(extra.iter().map(|s| (*s).to_string()));
        let p = termtune::config::parse(&lines.join("\n"), &[], Purpose::Export)
            .unwrap()
            .preset;
        termtune::export::export(&p, &CPU, &mut |_| {}).unwrap();
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap()
    };
    let c = export("merged", &["rope_scaling: linear", "cutoff_len: 1500"]);
    assert_eq!(
        c["rope_scaling"],
        json!({"rope_type": "linear", "factor": 3.0})
    );
    assert_eq!(c["max_position_embeddings"], json!(1536));
    // Without a cutoff_len: factor 2, as LLaMA-Factory's export and chat.
    let c = export("merged2", &["rope_scaling: yarn"]);
    assert_eq!(
        c["rope_scaling"],
        json!({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512})
    );
    assert_eq!(c["max_position_embeddings"], json!(1024));
    let chat = termtune::config::parse(
        &format!(
            "model_name_or_path: {}\nrope_scaling: llama3",
            root.join("model").display()
        ),
        &[],
        Purpose::Chat,
    )
    .unwrap()
    .preset;
    let m =
        termtune::resolve::load_model(&chat, Purpose::Chat, DType::F32, &CPU, &mut |_| {}).unwrap();
    let cfg = termtune::engine::ModelConfig::from_hf_config(&m.files.config).unwrap();
    assert!(
        matches!(cfg.rope_scaling, Some(termtune::engine::arch::RopeScaling::Llama3(s))
            if s.factor == 2.0 && s.original_max_position_embeddings == 512),
        "{:?}",
        cfg.rope_scaling
    );
}

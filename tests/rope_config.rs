//! RoPE settings in both config.json layouts: transformers 4's top-level `rope_theta` + `rope_scaling` and
//! transformers 5's `rope_parameters` give the same model (bit-identical logits) for every rope_type termtune
//! computes; a rope_type it does not compute is an error naming it.

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
        let moved = a
            .iter()
            .zip(&plain)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(moved > 1e-4, "{kind}: logits equal plain RoPE's ({moved})");
    }

    // A rope_type termtune does not compute is an error naming it, in either layout.
    for rope in [
        json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}}),
        json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
            "original_max_position_embeddings": 128}}),
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

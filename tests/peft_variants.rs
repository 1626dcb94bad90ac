//! PEFT's LoRA variants on a tiny seeded random model (CPU, seconds): DoRA (`use_dora`) against PEFT's goldens,
//! finite differences, its adapter format, merge and the quantized base; NEFTune's embedding noise.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use termtune::engine::adapter;
use termtune::engine::model::Kernels;
use termtune::engine::ops;
use termtune::engine::testing::{TinyOpts, tiny_llama};
use termtune::engine::weights::load_hf_folder;
use termtune::engine::{ArchKind, Finetune, LoraSpec, LoraTargets, Model};

use crate::tiny_util::{assert_logits_0_5, padded_batch, quantized_pair};

const CPU: Device = Device::Cpu;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    termtune::engine::testing::max_abs_diff(a, b).unwrap()
}

fn dora(r: usize, dropout: f32) -> Finetune {
    Finetune::Lora(LoraSpec {
        r,
        alpha: 16.0,
        dropout,
        targets: LoraTargets::All,
        use_rslora: false,
        use_dora: true,
        seed: 7,
        init: Default::default(),
    })
}

fn build(dir: &std::path::Path, opts: &TinyOpts, dtype: DType, ft: &Finetune) -> Model {
    tiny_llama(dir, 1234, opts).unwrap();
    let files = load_hf_folder(dir, dtype, &CPU).unwrap();
    Model::from_files(&files, dtype, &CPU, ft).unwrap()
}

fn seeded(dims: &[usize], seed: u64, lo: f64, hi: f64, dtype: DType) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_vec(v, dims, &CPU)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// As after some training: every lora_B seeded in ±0.2, every magnitude scaled by a seeded factor in [0.8, 1.2).
fn trained(model: &Model, seed: u64) {
    for (i, (name, v)) in model.trainable_vars().iter().enumerate() {
        let s = seed + i as u64;
        if name.ends_with("lora_B.weight") {
            v.set(&seeded(v.dims(), s, -0.2, 0.2, v.dtype())).unwrap();
        } else if name.ends_with("lora_magnitude_vector") {
            let f = seeded(v.dims(), s, 0.8, 1.2, v.dtype());
            v.set(&v.as_tensor().mul(&f).unwrap()).unwrap();
        }
    }
}

fn mean_loss(m: &Model, train: bool) -> Tensor {
    let (input, mask, labels) = padded_batch();
    let (s, n) = m.forward_loss(&input, &mask, &labels, train).unwrap();
    (s / n as f64).unwrap()
}

fn qwen2() -> TinyOpts {
    TinyOpts {
        arch: ArchKind::Qwen2,
        ..TinyOpts::default()
    }
}

/// Writes the DoRA cases for `tests/engine_reference.py` beside `engine::dump_reference_fixture`'s:
/// `ENGINE_REF_DIR=/tmp/ref cargo test --test integration peft_variants::dump_dora_reference_fixture -- --ignored`
#[test]
#[ignore = "writes a fixture for tests/engine_reference.py"]
fn dump_dora_reference_fixture() {
    let root = std::path::PathBuf::from(std::env::var("ENGINE_REF_DIR").unwrap());
    for (name, opts) in [("llama_dora", TinyOpts::default()), ("qwen2_dora", qwen2())] {
        let dir = root.join(name);
        let m = build(&dir.join("model"), &opts, DType::F32, &dora(4, 0.0));
        trained(&m, 21);
        adapter::save_adapter(&m, &dir.join("adapter"), "model").unwrap();
        crate::tiny_util::write_reference_case(&dir, &m);
    }
}

/// Golden values from PEFT 0.21.2 + transformers 5.25.0 + torch 2.15.0 (CPU, f32, eager attention), written by
/// `tests/engine_reference.py` on `dump_dora_reference_fixture`'s models: the masked mean loss, logits[0, 5, :4],
/// and the first gradients of layers.0.self_attn.q_proj's magnitude and lora_A. The same run reported max |logits
/// diff| ≤ 1.3e-5 over all valid positions and gradients (A, B, magnitude) within 2.9e-6 relative.
#[test]
fn dora_matches_peft_goldens() {
    let cases = [
        ("llama", TinyOpts::default(), GOLDEN_LLAMA),
        ("qwen2", qwen2(), GOLDEN_QWEN2),
    ];
    for (name, opts, golden) in cases {
        let Golden(want_loss, want_logits, want_gm, want_ga) = golden;
        let d = tempfile::tempdir().unwrap();
        let m = build(d.path(), &opts, DType::F32, &dora(4, 0.0));
        trained(&m, 21);
        let loss = mean_loss(&m, true);
        let l = loss.to_scalar::<f32>().unwrap();
        assert!(
            (l - want_loss).abs() < 1e-4 * want_loss.abs(),
            "{name}: loss {l} vs PEFT {want_loss}"
        );
        assert_logits_0_5(&m, &want_logits.map(f64::from), &format!("{name}: PEFT"));
        let grads = loss.backward().unwrap();
        let vars = m.trainable_vars();
        for (suffix, want) in [
            ("q_proj.lora_magnitude_vector", want_gm),
            ("q_proj.lora_A.weight", want_ga),
        ] {
            let (_, v) = vars
                .iter()
                .find(|(n, _)| n.contains("layers.0.self_attn.") && n.ends_with(suffix))
                .unwrap();
            let g = grads
                .get(v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let scale = g.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (a, b) in g.iter().zip(want) {
                assert!(
                    (a - b).abs() < 1e-4 * scale,
                    "{name} {suffix}: gradient {:?} vs PEFT {want:?}",
                    &g[..3]
                );
            }
        }
    }
}

/// (loss, logits[0, 5, :4], d magnitude[:3], d lora_A[:3]) of layers.0.self_attn.q_proj, from PEFT.
struct Golden(f32, [f32; 4], [f32; 3], [f32; 3]);

const GOLDEN_LLAMA: Golden = Golden(
    13.370_069,
    [-3.388_545, 4.492_699, -3.876_460_8, 6.259_14],
    [-0.013_062_95, 0.117_326_15, -0.045_729_15],
    [-0.208_853_93, -0.244_069_34, 0.161_549_2],
);
const GOLDEN_QWEN2: Golden = Golden(
    13.515_041,
    [2.000_699, -0.945_290_1, 2.228_721_6, 3.884_698_2],
    [-0.331_826_3, -0.015_062_73, -0.263_738_36],
    [0.095_926_88, -0.012_532_996, -0.010_467_212],
);

/// The norm in DoRA's factor is detached (PEFT, the paper's §4.3), so only the magnitude's gradient is the loss's
/// true derivative: it equals central differences (f64), on the plain graph, with checkpointing and with the
/// fused kernels; lora_A/B's equal PEFT's (above). At B = 0 (a fresh adapter) the model is exactly the base.
#[test]
fn dora_magnitude_gradients_match_finite_differences_and_a_fresh_adapter_is_the_base() {
    let d = tempfile::tempdir().unwrap();
    let base = build(d.path(), &qwen2(), DType::F64, &Finetune::Frozen);
    let mut m = build(d.path(), &qwen2(), DType::F64, &dora(4, 0.0));
    let (x, mask, _) = padded_batch();
    assert_eq!(
        max_abs_diff(
            &base.forward(&x, &mask, false).unwrap(),
            &m.forward(&x, &mask, false).unwrap()
        ),
        0.0,
        "a fresh DoRA adapter (B = 0, m = ‖W‖) must be an exact identity"
    );
    trained(&m, 5);
    let mut rng = StdRng::seed_from_u64(3);
    let mut reference: Option<Vec<Vec<f64>>> = None;
    for (kernels, ckpt, manual) in [
        (Kernels::Pure, false, false),
        (Kernels::Fused, true, true),
        (Kernels::Fused, false, true),
        (Kernels::Fused, true, false),
    ] {
        m.kernels = kernels;
        m.checkpointing = ckpt;
        m.manual_backward = manual;
        let loss = mean_loss(&m, true);
        let grads = loss.backward().unwrap();
        let vars = m.trainable_vars();
        let all: Vec<Vec<f64>> = vars
            .iter()
            .map(|(_, v)| {
                let g = grads.get(v).unwrap().flatten_all().unwrap();
                g.to_vec1::<f64>().unwrap()
            })
            .collect();
        assert!(all.iter().all(|g| g.iter().any(|x| *x != 0.0)));
        match &reference {
            None => reference = Some(all.clone()),
            Some(r) => {
                for (a, b) in r.iter().zip(&all) {
                    let scale = a.iter().fold(1e-9f64, |m, x| m.max(x.abs()));
                    let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
                    assert!(diff / scale < 1e-10, "{kernels:?} ckpt {ckpt}: {diff}");
                }
            }
        }
        let mut checked = 0;
        for ((name, v), g) in vars.iter().zip(&all) {
            if !name.ends_with("lora_magnitude_vector")
                || !(name.contains("layers.0.self_attn.k_proj") || name.contains("layers.1.mlp"))
            {
                continue;
            }
            let orig = v.as_tensor().copy().unwrap();
            for _ in 0..3 {
                let i = rng.random_range(0..orig.elem_count());
                let h = 1e-5;
                let at = |delta: f64| {
                    let mut flat = orig.to_vec1::<f64>().unwrap();
                    flat[i] += delta;
                    v.set(&Tensor::from_vec(flat, orig.shape(), &CPU).unwrap())
                        .unwrap();
                    mean_loss(&m, true).to_scalar::<f64>().unwrap()
                };
                let num = (at(h) - at(-h)) / (2.0 * h);
                v.set(&orig).unwrap();
                let rel = (num - g[i]).abs() / num.abs().max(g[i].abs()).max(1e-7);
                assert!(rel < 1e-5, "{name}[{i}]: analytic {} numeric {num}", g[i]);
                checked += 1;
            }
        }
        assert_eq!(checked, 12);
    }
}

/// A DoRA adapter is saved in PEFT's format (`use_dora: true`, `<module>.lora_magnitude_vector` beside lora_A/B),
/// loads back to the same logits, merges (export) into weights that give the adapter's logits, and over a quantized
/// base (unmerged, its factor fixed once for decoding) answers as the dense base with the same adapter.
#[test]
fn dora_adapters_round_trip_merge_and_run_over_a_quantized_base() {
    let d = tempfile::tempdir().unwrap();
    let opts = qwen2();
    let m = build(d.path(), &opts, DType::F32, &dora(4, 0.0));
    trained(&m, 9);
    let (x, mask, _) = padded_batch();
    let want = m.forward(&x, &mask, false).unwrap();
    let out = tempfile::tempdir().unwrap();
    adapter::save_adapter(&m, out.path(), "tiny").unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["use_dora"], serde_json::json!(true));
    let tensors =
        candle_core::safetensors::load(out.path().join("adapter_model.safetensors"), &CPU).unwrap();
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector";
    assert_eq!(tensors[key].dims(), [64]);
    assert_eq!(tensors.len(), 3 * 7 * 2, "A, B and a magnitude per linear");

    // Loaded back for training: the same vars, the same logits.
    let mut back = build(d.path(), &opts, DType::F32, &Finetune::Frozen);
    adapter::load_adapter_trainable(&mut back, out.path()).unwrap();
    assert_eq!(
        max_abs_diff(&want, &back.forward(&x, &mask, false).unwrap()),
        0.0
    );
    assert_eq!(back.trainable_vars().len(), tensors.len());
    // Fixing the factor for decoding changes nothing.
    back.fix_dora().unwrap();
    assert_eq!(
        max_abs_diff(&want, &back.forward(&x, &mask, false).unwrap()),
        0.0
    );

    // Merged (export, `adapter_name_or_path` over a 16-bit base): the same logits from plain weights.
    let mut merged = build(d.path(), &opts, DType::F32, &Finetune::Frozen);
    adapter::merge_adapter(&mut merged, out.path()).unwrap();
    let diff = max_abs_diff(&want, &merged.forward(&x, &mask, false).unwrap());
    assert!(diff < 1e-4, "merged DoRA logits differ by {diff}");

    // Over a Q8_0 base (unmerged): as the dense base holding the same dequantized weights.
    let (quant, dense) = quantized_pair(d.path(), GgmlDType::Q8_0, |n| n.contains(".layers."));
    let mut qm = Model::from_files(&quant, DType::F32, &CPU, &Finetune::Frozen).unwrap();
    let mut notes = Vec::new();
    let merged_in = adapter::apply_adapters(&mut qm, &[out.path().to_path_buf()], true, &mut |n| {
        notes.push(n)
    })
    .unwrap();
    assert!(!merged_in, "{notes:?}");
    let mut dm = Model::from_files(&dense, DType::F32, &CPU, &Finetune::Frozen).unwrap();
    adapter::merge_adapter(&mut dm, out.path()).unwrap();
    let (a, b) = (
        qm.forward(&x, &mask, false).unwrap(),
        dm.forward(&x, &mask, false).unwrap(),
    );
    let scale = f64::from(
        b.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
    );
    let diff = max_abs_diff(&a, &b);
    assert!(
        diff < 0.02 * scale,
        "quantized DoRA {diff} vs dense (scale {scale})"
    );
}

/// With LoRA dropout, DoRA's base term is recomputed on the dropped input (PEFT's forward when dropout is on):
/// training draws the masks of its seed, and every path sees the same ones: candle's graph (pure kernels), the
/// hand-written backward with and without checkpointing (also with the generic kernels CUDA runs) and the
/// checkpointed graph give one loss and one set of gradients (f64). Inference has no dropout.
#[test]
fn dora_with_dropout_is_seeded_and_every_backward_agrees() {
    let d = tempfile::tempdir().unwrap();
    let mut m = build(d.path(), &TinyOpts::default(), DType::F64, &dora(4, 0.3));
    trained(&m, 2);
    m.dropout_seed = 11;
    let run = |m: &Model| {
        let loss = mean_loss(m, true);
        let g = loss.backward().unwrap();
        let grads: Vec<Vec<f64>> = m
            .trainable_vars()
            .iter()
            .map(|(_, v)| {
                let g = g.get(v).unwrap().flatten_all().unwrap();
                g.to_vec1::<f64>().unwrap()
            })
            .collect();
        (loss.to_scalar::<f64>().unwrap(), grads)
    };
    m.kernels = Kernels::Pure;
    let (l0, g0) = run(&m);
    assert_eq!(g0.len(), 2 * 7 * 3);
    m.kernels = Kernels::Fused;
    for (generic, ckpt, manual) in [
        (false, true, true),
        (false, false, true),
        (false, true, false),
        (true, true, true),
        (true, false, true),
    ] {
        m.checkpointing = ckpt;
        m.manual_backward = manual;
        let (l, g) = if generic {
            ops::Backend::generic_only(|| run(&m))
        } else {
            run(&m)
        };
        let what = (generic, ckpt, manual);
        assert!((l - l0).abs() < 1e-12, "{what:?}: loss {l} vs {l0}");
        for (a, b) in g0.iter().zip(&g) {
            let scale = a.iter().fold(1e-9f64, |m, x| m.max(x.abs()));
            let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff / scale < 1e-10, "{what:?}: gradient differs by {diff}");
        }
    }
    let eval = mean_loss(&m, false).to_scalar::<f64>().unwrap();
    let mut no_dropout = build(d.path(), &TinyOpts::default(), DType::F64, &dora(4, 0.0));
    trained(&no_dropout, 2);
    no_dropout.dropout_seed = 11;
    let want = mean_loss(&no_dropout, true).to_scalar::<f64>().unwrap();
    assert!(
        (eval - want).abs() < 1e-12,
        "inference {eval} vs no dropout {want}"
    );
    assert!((l0 - want).abs() > 1e-6, "dropout changed nothing");
}

/// NEFTune's noise (`ops::uniform_noise`): uniform in [−mag, mag), centred, the same for a seed, another for
/// another seed; on the model it changes training losses only, in proportion to α for a small α.
#[test]
fn neftune_noise_is_uniform_seeded_and_only_in_training() {
    let shape = candle_core::Shape::from((300, 64));
    let draw = |seed: u64| {
        ops::uniform_noise(&shape, 0.25, seed, "neftune", DType::F32, &CPU)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let u = draw(4);
    assert!(u.iter().all(|x| (-0.25..0.25).contains(x)));
    let n = u.len() as f64;
    let mean = u.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = u.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n;
    assert!(mean.abs() < 0.005, "mean {mean}");
    assert!(
        (var - 0.25f64.powi(2) / 3.0).abs() < 0.001,
        "variance {var}"
    );
    assert_eq!(u, draw(4));
    assert_ne!(u, draw(5));

    let d = tempfile::tempdir().unwrap();
    let mut m = build(d.path(), &TinyOpts::default(), DType::F64, &dora(4, 0.0));
    trained(&m, 3);
    m.dropout_seed = 8;
    let clean = mean_loss(&m, true).to_scalar::<f64>().unwrap();
    let eval = mean_loss(&m, false).to_scalar::<f64>().unwrap();
    let mut at = |alpha: f64, seed: u64| {
        m.neftune_alpha = Some(alpha);
        m.dropout_seed = seed;
        let train = mean_loss(&m, true).to_scalar::<f64>().unwrap();
        let inference = mean_loss(&m, false).to_scalar::<f64>().unwrap();
        assert_eq!(inference, eval, "NEFTune must not touch inference");
        train - clean
    };
    let (d1, d2) = (at(1e-3, 8), at(2e-3, 8));
    assert!(d1.abs() > 1e-9, "no noise at alpha 1e-3");
    assert!(
        (d2 / d1 - 2.0).abs() < 0.01,
        "not linear in alpha: {d1} {d2}"
    );
    assert_eq!(at(1e-3, 8), d1);
    assert_ne!(at(1e-3, 9), d1);
}

/// A DoRA adapter written by PEFT (`scripts/peft_dora_reference.py`: r 4 on every linear of the tiny qwen2, random
/// B, perturbed magnitudes, PEFT's full adapter_config.json) loads in termtune, merged (export, chat over a 16-bit
/// base) and unmerged (further training), and gives PEFT's loss and logits.
#[test]
fn a_dora_adapter_written_by_peft_gives_peft_logits() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_dora");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("reference.json")).unwrap())
            .unwrap();
    let want_loss = reference["loss"].as_f64().unwrap();
    let want_logits: Vec<f64> = reference["logits_0_5_4"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let d = tempfile::tempdir().unwrap();
    let mut merged = build(d.path(), &qwen2(), DType::F32, &Finetune::Frozen);
    adapter::merge_adapter(&mut merged, &fixture).unwrap();
    let mut live = build(d.path(), &qwen2(), DType::F32, &Finetune::Frozen);
    adapter::load_adapter_trainable(&mut live, &fixture).unwrap();
    assert_eq!(live.trainable_vars().len(), 2 * 7 * 3);
    for (what, m) in [("merged", &merged), ("unmerged", &live)] {
        let loss = f64::from(mean_loss(m, false).to_scalar::<f32>().unwrap());
        assert!(
            (loss - want_loss).abs() < 1e-4 * want_loss,
            "{what}: loss {loss} vs PEFT {want_loss}"
        );
        assert_logits_0_5(m, &want_logits, &format!("{what}: PEFT"));
    }
}

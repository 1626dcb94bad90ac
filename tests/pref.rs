//! `stage: dpo`: the per-sequence log-probabilities, the preference losses against LLaMA-Factory's and TRL's formulas
//! (tests/fixtures/pref_loss_reference.json, from scripts/pref_loss_reference.py), the DPO gradient against finite
//! differences through the whole model, and runs of the trainer on the tiny model.

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use termtune::config::{self, PrefLoss};
use termtune::data::pack::Batch;
use termtune::engine::model::Kernels;
use termtune::engine::ops;
use termtune::engine::testing::{TinyOpts, tiny_llama};
use termtune::engine::{AttnMask, Model, SequenceLogps};
use termtune::trainer::pref::{PairLogps, PrefConfig, preference_loss};
use termtune::trainer::run::{batch_tensors, host_inputs, regroup_shared_prompts, u32_mask};

use termtune::trainer::runlog::{TrainerState, read_log};

const CPU: Device = Device::Cpu;

fn reference() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pref_loss_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The fixture's pairs (policy and reference sums, answer lengths).
fn reference_pairs(r: &Value) -> Vec<PairLogps> {
    r["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PairLogps {
            chosen: p["chosen"].as_f64().unwrap(),
            rejected: p["rejected"].as_f64().unwrap(),
            ref_chosen: Some(p["ref_chosen"].as_f64().unwrap()),
            ref_rejected: Some(p["ref_rejected"].as_f64().unwrap()),
            chosen_tokens: p["chosen_len"].as_u64().unwrap() as usize,
            rejected_tokens: p["rejected_len"].as_u64().unwrap() as usize,
        })
        .collect()
}

fn loss_kind(s: &str) -> PrefLoss {
    match s {
        "sigmoid" => PrefLoss::Sigmoid,
        "hinge" => PrefLoss::Hinge,
        "ipo" => PrefLoss::Ipo,
        "orpo" => PrefLoss::Orpo,
        "simpo" => PrefLoss::Simpo,
        other => panic!("unknown loss {other}"),
    }
}

#[test]
fn every_loss_and_metric_equals_the_llamafactory_formulas() {
    let r = reference();
    let pairs = reference_pairs(&r);
    let cases = r["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let k = &c["config"];
        let cfg = PrefConfig {
            loss: loss_kind(k["pref_loss"].as_str().unwrap()),
            beta: k["pref_beta"].as_f64().unwrap(),
            ftx: k["pref_ftx"].as_f64().unwrap(),
            label_smoothing: k["dpo_label_smoothing"].as_f64().unwrap(),
            simpo_gamma: k["simpo_gamma"].as_f64().unwrap(),
            bco_weight: 0.0,
            bco_delta: 0.0,
        };
        // ORPO and SimPO must not need the reference.
        let input: Vec<PairLogps> = if cfg.loss.uses_reference() {
            pairs.clone()
        } else {
            pairs
                .iter()
                .map(|p| PairLogps {
                    ref_chosen: None,
                    ref_rejected: None,
                    ..*p
                })
                .collect()
        };
        let out = preference_loss(&cfg, &input).unwrap();
        let close = |a: f64, b: f64, what: &str| {
            assert!(
                (a - b).abs() <= 1e-9 * (1.0 + b.abs()),
                "{k}: {what}: termtune {a} reference {b}"
            );
        };
        for (got, want) in out.losses.iter().zip(c["losses"].as_array().unwrap()) {
            close(*got, want.as_f64().unwrap(), "pair loss");
        }
        close(out.mean_loss(), c["loss"].as_f64().unwrap(), "loss");
        let metrics = c["metrics"].as_object().unwrap();
        let entries = out.metrics.entries("");
        assert_eq!(entries.len(), metrics.len(), "{k}: {entries:?}");
        for (key, v) in entries {
            close(v, metrics[&key].as_f64().unwrap(), &key);
        }
    }
}

/// `pref_bco_weight`: LLaMA-Factory's `bco_loss` mixed into the DPO losses, its baseline TRL's `RunningMoments`
/// over the batches in order (the fixture's `bco` cases: three batches each, sigmoid, ipo with ftx, hinge).
#[test]
fn bco_losses_and_baseline_equal_the_llamafactory_formulas() {
    let r = reference();
    let all = reference_pairs(&r);
    let cases = r["bco"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for c in cases {
        let k = &c["config"];
        let mut cfg = PrefConfig {
            loss: loss_kind(k["pref_loss"].as_str().unwrap()),
            beta: k["pref_beta"].as_f64().unwrap(),
            ftx: k["pref_ftx"].as_f64().unwrap(),
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            bco_weight: k["pref_bco_weight"].as_f64().unwrap(),
            bco_delta: 0.0,
        };
        assert!(cfg.uses_bco());
        let mut running = termtune::trainer::pref::RunningMean::default();
        for b in c["batches"].as_array().unwrap() {
            let pairs: Vec<PairLogps> = b["pairs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| all[i.as_u64().unwrap() as usize])
                .collect();
            running.update(termtune::trainer::pref::bco_batch_reward(&cfg, &pairs).unwrap());
            let delta = b["delta"].as_f64().unwrap();
            assert!(
                (running.mean - delta).abs() < 1e-12,
                "{k}: δ {} vs {delta}",
                running.mean
            );
            cfg.bco_delta = running.mean;
            let out = preference_loss(&cfg, &pairs).unwrap();
            for (got, want) in out.losses.iter().zip(b["losses"].as_array().unwrap()) {
                let want = want.as_f64().unwrap();
                assert!(
                    (got - want).abs() <= 1e-9 * (1.0 + want.abs()),
                    "{k}: {got} vs {want}"
                );
            }
        }
    }
}

fn tiny(dir: &Path, kernels: Kernels) -> Model {
    crate::tiny_util::tiny_lora_f64(dir, kernels)
}

/// Two pairs: chosen rows 0 and 1, rejected rows 2 and 3, right-padded, prompts unlabelled.
fn pair_batch() -> (Tensor, AttnMask, Tensor) {
    let ids: [[u32; 7]; 4] = [
        [5, 70, 71, 100, 33, 9, 8],
        [6, 12, 40, 41, 0, 0, 0],
        [5, 70, 71, 200, 201, 0, 0],
        [6, 12, 90, 91, 92, 93, 0],
    ];
    let am: [[u32; 7]; 4] = [
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
    ];
    let labels: [[i64; 7]; 4] = [
        [-100, -100, -100, 100, 33, 9, 8],
        [-100, -100, 40, 41, -100, -100, -100],
        [-100, -100, -100, 200, 201, -100, -100],
        [-100, -100, 90, 91, 92, 93, -100],
    ];
    (
        Tensor::new(&ids, &CPU).unwrap(),
        AttnMask::Padding {
            attention_mask: Tensor::new(&am, &CPU).unwrap(),
        },
        Tensor::new(&labels, &CPU).unwrap(),
    )
}

#[test]
fn sequence_logps_are_the_labelled_log_softmax_sums_on_every_path() {
    let (ids, mask, labels) = pair_batch();
    let lab = labels.to_vec2::<i64>().unwrap();
    for (kernels, chunk) in [(Kernels::Fused, Some(3)), (Kernels::Pure, None)] {
        let d = tempfile::tempdir().unwrap();
        let mut m = tiny(d.path(), kernels);
        m.head_chunk_rows = chunk;
        let logits = m.forward(&ids, &mask, false).unwrap();
        let logp = ops::log_softmax_pure(&logits)
            .unwrap()
            .to_vec3::<f64>()
            .unwrap();
        let got = m.sequence_logps(&ids, &mask, &labels, None, false).unwrap();
        for (b, row) in lab.iter().enumerate() {
            let mut want = 0.0;
            let mut n = 0;
            for t in 0..row.len() - 1 {
                if row[t + 1] >= 0 {
                    want += logp[b][t][row[t + 1] as usize];
                    n += 1;
                }
            }
            assert!(
                (got.logps[b] - want).abs() < 1e-10,
                "{kernels:?} row {b}: {} vs {want}",
                got.logps[b]
            );
            assert_eq!(got.tokens[b], n);
        }
        // Switching the adapter off gives the base model's numbers, and it comes back.
        let with = got.logps.clone();
        let off = m.with_adapter_disabled(|m| {
            m.sequence_logps(&ids, &mask, &labels, None, false)
                .unwrap()
                .logps
        });
        assert!(off.iter().zip(&with).all(|(a, b)| (a - b).abs() > 1e-6));
        let again = m
            .sequence_logps(&ids, &mask, &labels, None, false)
            .unwrap()
            .logps;
        assert_eq!(again, with);
    }
}

/// [`pair_batch`] as the trainer holds it.
fn pair_batch_host() -> Batch {
    let (ids, mask, labels) = pair_batch();
    let AttnMask::Padding { attention_mask } = mask else {
        unreachable!()
    };
    let (batch_size, seq_len) = ids.dims2().unwrap();
    let real: Vec<u32> = attention_mask.flatten_all().unwrap().to_vec1().unwrap();
    Batch {
        batch_size,
        seq_len,
        input_ids: ids.flatten_all().unwrap().to_vec1().unwrap(),
        labels: labels.flatten_all().unwrap().to_vec1().unwrap(),
        attention_mask: real.iter().map(|&m| u8::from(m != 0)).collect(),
        position_ids: (0..batch_size)
            .flat_map(|_| 0..u32::try_from(seq_len).unwrap())
            .collect(),
        sequence_ids: real,
        block_diagonal: false,
        kto_tags: Vec::new(),
        seq_index: vec![10, 11, 12, 13],
        branch_ids: Vec::new(),
    }
}

/// The trainer's per-sequence log-probabilities of `b` (shared prompts regrouped into chosen, then rejected).
fn trainer_logps(m: &Model, b: &Batch, train: bool) -> SequenceLogps {
    let (ids, labels, mask) = batch_tensors(b, &CPU).unwrap();
    let am = u32_mask(b);
    let mut out = m
        .sequence_logps(&ids, &mask, &labels, Some(&host_inputs(b, &am)), train)
        .unwrap();
    regroup_shared_prompts(&mut out, b).unwrap();
    out
}

#[test]
fn pairs_sharing_their_prompt_give_each_answer_the_numbers_of_its_own_row() {
    let unshared = pair_batch_host();
    let shared = unshared.share_prompts(64).unwrap();
    // Pair 0: prompt 5 70 71, chosen 100 33 9 8, rejected 200 201; pair 1: prompt 6 12, chosen 40 41, rejected
    // 90 91 92 93. The last prompt token opens each answer's branch; positions continue the prompt's.
    assert_eq!(
        (shared.batch_size, shared.seq_len, shared.sequences()),
        (2, 10, 4)
    );
    assert_eq!(
        &shared.input_ids[..10],
        &[5, 70, 71, 100, 33, 9, 8, 71, 200, 201]
    );
    assert_eq!(&shared.position_ids[..10], &[0, 1, 2, 3, 4, 5, 6, 2, 3, 4]);
    assert_eq!(&shared.branch_ids[..10], &[0, 0, 1, 1, 1, 1, 1, 2, 2, 2]);
    assert_eq!(
        &shared.input_ids[10..19],
        &[6, 12, 40, 41, 12, 90, 91, 92, 93]
    );
    assert_eq!(&shared.position_ids[10..19], &[0, 1, 2, 3, 1, 2, 3, 4, 5]);
    assert_eq!(&shared.branch_ids[10..19], &[0, 1, 1, 1, 2, 2, 2, 2, 2]);
    assert_eq!(
        &shared.attention_mask[10..],
        &[1, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    );
    assert_eq!(shared.chosen_label_counts(), vec![4, 2]);
    assert_eq!(shared.answer_ends(), vec![6, 13, 9, 18]);
    assert!(unshared.answer_ends().is_empty());
    assert_eq!(shared.seq_index, unshared.seq_index);
    // Nothing to share: pairs whose first tokens differ, an odd batch, a batch already shared.
    let mut apart = unshared.clone();
    apart.input_ids[2 * 7] = 7;
    assert!(apart.share_prompts(64).is_none());
    assert!(unshared.rows(0..3).share_prompts(64).is_none());
    assert!(shared.share_prompts(64).is_none());
    // Rows of 10 where sequences may be 7 long: more attention scores than 4 rows of 7 (√2 × 7 < 10).
    assert!(unshared.share_prompts(7).is_none());
    assert!(unshared.share_prompts(8).is_some());

    // Gemma 3's layer 0 slides over 3 positions: a rejected answer after the chosen one must count its window
    // from the shared prompt (positions), not from the row's start.
    let gemma = termtune::engine::testing::TinyOpts {
        arch: termtune::engine::ArchKind::Gemma3,
        ..termtune::engine::testing::TinyOpts::default()
    };
    let llama = termtune::engine::testing::TinyOpts::default();
    let cases = [
        (Kernels::Fused, Some(3), false, &llama),
        (Kernels::Fused, None, true, &llama),
        (Kernels::Pure, None, false, &llama),
        (Kernels::Fused, Some(3), false, &gemma),
    ];
    for (kernels, chunk, checkpointing, opts) in cases {
        let what = format!(
            "{:?} {kernels:?} chunk {chunk:?} checkpointing {checkpointing}",
            opts.arch
        );
        let d = tempfile::tempdir().unwrap();
        let mut m = crate::tiny_util::tiny_lora_f64_of(d.path(), kernels, opts);
        m.head_chunk_rows = chunk;
        m.checkpointing = checkpointing;
        let a = trainer_logps(&m, &unshared, true);
        let b = trainer_logps(&m, &shared, true);
        assert_eq!(a.tokens, b.tokens, "{what}");
        assert_eq!(a.tokens, vec![4, 2, 2, 4], "{what}");
        for (x, y) in a.logps.iter().zip(&b.logps) {
            assert!(
                (x - y).abs() < 1e-10,
                "{what}: {:?} vs {:?}",
                a.logps,
                b.logps
            );
        }
        // The reference (adapter off) too, and the way back: the same gradients for the same ∂L/∂logps.
        let ra = m.with_adapter_disabled(|m| trainer_logps(m, &unshared, false).logps);
        let rb = m.with_adapter_disabled(|m| trainer_logps(m, &shared, false).logps);
        assert!(
            ra.iter().zip(&rb).all(|(x, y)| (x - y).abs() < 1e-10),
            "{what}"
        );
        let dl = [0.3, -0.7, 0.5, 1.1];
        let (ga, gb) = (a.backward(&dl).unwrap(), b.backward(&dl).unwrap());
        let mut compared = 0;
        for (name, v) in m.trainable_vars() {
            let flat = |g: &candle_core::backprop::GradStore| {
                g.get(&v)
                    .unwrap_or_else(|| panic!("{what}: no gradient for {name}"))
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            let (x, y) = (flat(&ga), flat(&gb));
            let scale = x.iter().fold(0f64, |s, v| s.max(v.abs()));
            let diff = x
                .iter()
                .zip(&y)
                .fold(0f64, |s, (p, q)| s.max((p - q).abs()));
            assert!(
                diff <= 1e-9 * scale.max(1.0),
                "{what} {name}: {diff} (scale {scale})"
            );
            compared += usize::from(scale > 0.0);
        }
        assert!(compared > 0, "{what}: no gradient compared");
        // A reward model's input: each sequence's last hidden state, and its way back.
        let last = |b: &Batch, shared: bool| {
            let (ids, _, mask) = batch_tensors(b, &CPU).unwrap();
            let am = u32_mask(b);
            let host = host_inputs(b, &am);
            if shared {
                m.hidden_at(&ids, &mask, Some(&host), true, b.answer_ends())
                    .unwrap()
            } else {
                m.last_hidden(&ids, &mask, Some(&host), true).unwrap()
            }
        };
        let (ha, hb) = (last(&unshared, false), last(&shared, true));
        assert_eq!(ha.dims(), hb.dims());
        let dh = (ha - &hb).unwrap().abs().unwrap().max_all().unwrap();
        assert!(
            dh.to_scalar::<f64>().unwrap() < 1e-10,
            "{what}: last hidden states"
        );
        let probe = Tensor::randn(0f64, 1.0, hb.dims(), &CPU).unwrap();
        let score = |h: Tensor| (h * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (sa, sb) = (score(last(&unshared, false)), score(hb));
        let mut compared = 0;
        for (name, v) in m.trainable_vars() {
            let (Some(x), Some(y)) = (sa.get(&v), sb.get(&v)) else {
                continue;
            };
            let d = (x - y).unwrap().abs().unwrap().max_all().unwrap();
            assert!(
                d.to_scalar::<f64>().unwrap() < 1e-9,
                "{what} {name}: score gradients"
            );
            compared += 1;
        }
        assert!(compared > 0, "{what}: no score gradient");
        // LD-DPO's weights count each sequence's own tokens, shared or not.
        let (mut wa, mut wb) = (a, b);
        termtune::trainer::pref::apply_ld_alpha(&mut wa, 0.5);
        termtune::trainer::pref::apply_ld_alpha(&mut wb, 0.5);
        assert!(
            wa.logps
                .iter()
                .zip(&wb.logps)
                .all(|(x, y)| (x - y).abs() < 1e-10),
            "{what}"
        );
    }
}

/// The mean DPO loss of the pair batch, the reference being the model with its adapter off.
fn batch_loss(m: &mut Model, cfg: &PrefConfig) -> f64 {
    let (ids, mask, labels) = pair_batch();
    let p = m.sequence_logps(&ids, &mask, &labels, None, false).unwrap();
    let r =
        m.with_adapter_disabled(|m| m.sequence_logps(&ids, &mask, &labels, None, false).unwrap());
    preference_loss(cfg, &pairs_of(&p.logps, &r.logps, &p.tokens))
        .unwrap()
        .mean_loss()
}

fn pairs_of(policy: &[f64], reference: &[f64], tokens: &[usize]) -> Vec<PairLogps> {
    (0..2)
        .map(|i| PairLogps {
            chosen: policy[i],
            rejected: policy[2 + i],
            ref_chosen: Some(reference[i]),
            ref_rejected: Some(reference[2 + i]),
            chosen_tokens: tokens[i],
            rejected_tokens: tokens[2 + i],
        })
        .collect()
}

/// Checks 3 random entries of each trainable variable whose name contains one of `names` against central
/// differences of `loss_of` (f64, h 1e-5, relative 1e-4); returns how many were checked.
fn check_against_finite_differences(
    m: &mut Model,
    grads: &candle_core::backprop::GradStore,
    names: &[&str],
    seed: u64,
    what: &str,
    loss_of: &dyn Fn(&mut Model) -> f64,
) -> usize {
    let vars = m.trainable_vars();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut checked = 0;
    for (name, v) in vars
        .iter()
        .filter(|(n, _)| names.iter().any(|k| n.contains(k)))
    {
        let g = grads
            .get(v)
            .unwrap_or_else(|| panic!("{what}: no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let orig = v.as_tensor().copy().unwrap();
        for _ in 0..3 {
            let i = rng.random_range(0..orig.elem_count());
            let h = 1e-5;
            let mut flat = orig.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            flat[i] += h;
            v.set(&Tensor::from_vec(flat.clone(), orig.shape(), &CPU).unwrap())
                .unwrap();
            let lp = loss_of(m);
            flat[i] -= 2.0 * h;
            v.set(&Tensor::from_vec(flat, orig.shape(), &CPU).unwrap())
                .unwrap();
            let lm = loss_of(m);
            v.set(&orig).unwrap();
            let num = (lp - lm) / (2.0 * h);
            let rel = (num - g[i]).abs() / num.abs().max(g[i].abs()).max(1e-7);
            assert!(
                rel < 1e-4,
                "{what} {name}[{i}]: analytic {} numeric {num} rel {rel}",
                g[i]
            );
            checked += 1;
        }
    }
    checked
}

#[test]
fn dpo_gradients_match_finite_differences_f64() {
    let cases = [
        (Kernels::Fused, Some(2), true, PrefLoss::Sigmoid, 0.5),
        (Kernels::Pure, None, false, PrefLoss::Sigmoid, 0.5),
        (Kernels::Fused, Some(5), false, PrefLoss::Ipo, 0.1),
        (Kernels::Fused, None, false, PrefLoss::Orpo, 0.3),
        (Kernels::Fused, Some(4), true, PrefLoss::Simpo, 2.0),
    ];
    for (kernels, chunk, checkpointing, loss, beta) in cases {
        let d = tempfile::tempdir().unwrap();
        let mut m = tiny(d.path(), kernels);
        m.head_chunk_rows = chunk;
        m.checkpointing = checkpointing;
        let cfg = PrefConfig {
            loss,
            beta,
            ftx: 0.3,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            bco_weight: 0.0,
            bco_delta: 0.0,
        };
        let (ids, mask, labels) = pair_batch();
        let policy = m.sequence_logps(&ids, &mask, &labels, None, true).unwrap();
        let r = m.with_adapter_disabled(|m| {
            m.sequence_logps(&ids, &mask, &labels, None, false).unwrap()
        });
        let out =
            preference_loss(&cfg, &pairs_of(&policy.logps, &r.logps, &policy.tokens)).unwrap();
        // The mean over the 2 pairs.
        let dl = [
            out.d_chosen[0] / 2.0,
            out.d_chosen[1] / 2.0,
            out.d_rejected[0] / 2.0,
            out.d_rejected[1] / 2.0,
        ];
        let grads = policy.backward(&dl).unwrap();
        let checked = check_against_finite_differences(
            &mut m,
            &grads,
            &["layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"],
            5,
            &format!("{loss:?} {kernels:?}"),
            &|m| batch_loss(m, &cfg),
        );
        assert_eq!(checked, 12);
    }
}

/// LD-DPO (`ld_alpha`) as LLaMA-Factory's `get_batch_logps` computes it, transcribed line for line over the
/// labels and the log-softmax of the logits: the policy's weighted sums, on both head paths, and the DPO gradient
/// through them against finite differences.
#[test]
fn ld_alpha_weights_the_longer_answers_extra_tokens_as_llamafactory() {
    let alpha = 0.3;
    let (ids, mask, labels) = pair_batch();
    // labels[:, 1:] (the label of each next token), loss_mask, valid_length.
    let lab: Vec<Vec<i64>> = labels
        .to_vec2::<i64>()
        .unwrap()
        .iter()
        .map(|r| r[1..].to_vec())
        .collect();
    let loss_mask: Vec<Vec<bool>> = lab
        .iter()
        .map(|r| r.iter().map(|&l| l != -100).collect())
        .collect();
    let valid: Vec<usize> = loss_mask
        .iter()
        .map(|r| r.iter().filter(|&&m| m).count())
        .collect();
    let n = 2;
    let min_len: Vec<usize> = (0..n).map(|i| valid[i].min(valid[n + i])).collect();
    for (kernels, chunk) in [(Kernels::Fused, Some(3)), (Kernels::Pure, None)] {
        let d = tempfile::tempdir().unwrap();
        let mut m = tiny(d.path(), kernels);
        m.head_chunk_rows = chunk;
        let logits = m.forward(&ids, &mask, false).unwrap();
        let logp = ops::log_softmax_pure(&logits)
            .unwrap()
            .to_vec3::<f64>()
            .unwrap();
        let mut got = m.sequence_logps(&ids, &mask, &labels, None, false).unwrap();
        termtune::trainer::pref::apply_ld_alpha(&mut got, alpha);
        for b in 0..2 * n {
            // start_positions = argmax(loss_mask); public_lengths = start + cat([min, min]).
            let start = loss_mask[b].iter().position(|&m| m).unwrap();
            let public = start + min_len[b % n];
            let (mut front, mut rear) = (0.0, 0.0);
            for t in 0..lab[b].len() {
                if !loss_mask[b][t] {
                    continue;
                }
                let lp = logp[b][t][lab[b][t] as usize];
                if t < public { front += lp } else { rear += lp }
            }
            let want = front + alpha * rear;
            assert!(
                (got.logps[b] - want).abs() < 1e-10,
                "{kernels:?} row {b}: {} vs {want}",
                got.logps[b]
            );
            assert_eq!(got.tokens[b], valid[b]);
        }
        // Row 0 (4 answer tokens against 2) and row 3 (4 against 2) have a rear part; rows 1 and 2 do not.
        assert!(valid[0] > valid[2] && valid[3] > valid[1]);
    }
    // The gradient through the weighted sums (sigmoid DPO, reference = adapter off, unweighted).
    let cfg = PrefConfig {
        loss: PrefLoss::Sigmoid,
        beta: 0.5,
        ftx: 0.3,
        label_smoothing: 0.0,
        simpo_gamma: 0.5,
        bco_weight: 0.0,
        bco_delta: 0.0,
    };
    let loss_of = |m: &mut Model| {
        let mut p = m.sequence_logps(&ids, &mask, &labels, None, false).unwrap();
        termtune::trainer::pref::apply_ld_alpha(&mut p, alpha);
        let r = m.with_adapter_disabled(|m| {
            m.sequence_logps(&ids, &mask, &labels, None, false).unwrap()
        });
        preference_loss(&cfg, &pairs_of(&p.logps, &r.logps, &p.tokens))
            .unwrap()
            .mean_loss()
    };
    for (kernels, chunk) in [(Kernels::Fused, Some(2)), (Kernels::Pure, None)] {
        let d = tempfile::tempdir().unwrap();
        let mut m = tiny(d.path(), kernels);
        m.head_chunk_rows = chunk;
        let mut policy = m.sequence_logps(&ids, &mask, &labels, None, true).unwrap();
        termtune::trainer::pref::apply_ld_alpha(&mut policy, alpha);
        let r = m.with_adapter_disabled(|m| {
            m.sequence_logps(&ids, &mask, &labels, None, false).unwrap()
        });
        let out =
            preference_loss(&cfg, &pairs_of(&policy.logps, &r.logps, &policy.tokens)).unwrap();
        let dl = [
            out.d_chosen[0] / 2.0,
            out.d_chosen[1] / 2.0,
            out.d_rejected[0] / 2.0,
            out.d_rejected[1] / 2.0,
        ];
        let grads = policy.backward(&dl).unwrap();
        let checked = check_against_finite_differences(
            &mut m,
            &grads,
            &["layers.0.self_attn.q_proj"],
            9,
            &format!("ld_alpha {kernels:?}"),
            &loss_of,
        );
        assert_eq!(checked, 6);
    }
}

/// A dpo preset on the pairs of [`fixture`] (LoRA dropout 0.1, which dpo switches off).
fn preset(root: &Path, extra: &[&str]) -> Result<config::Loaded, Vec<config::ConfigIssue>> {
    let mut all = vec!["lora_dropout: 0.1"];
    all.extend_from_slice(extra);
    crate::tiny_util::preference_preset(root, "dpo", "prefs", &all)
}

use crate::tiny_util::preference_fixture as fixture;

use crate::tiny_util::train_steps as train;

#[test]
fn a_lora_dpo_run_starts_at_ln2_and_learns_the_preference() {
    let (_d, root) = fixture(16);
    let loaded = preset(
        &root,
        &[
            "max_steps: 12",
            "val_size: 4",
            "eval_strategy: steps",
            "eval_steps: 6",
        ],
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let (r, steps) = train(&loaded);
    r.unwrap();
    assert_eq!(steps.len(), 12);
    // B = 0 at step 1: the policy is the reference, every log-ratio 0, the sigmoid loss ln 2 exactly.
    let first = &steps[0].metrics;
    assert!(
        (steps[0].loss - std::f64::consts::LN_2).abs() < 1e-9,
        "{}",
        steps[0].loss
    );
    assert_eq!(first["rewards/accuracies"], 0.0);
    assert_eq!(first["rewards/margins"], 0.0);
    let last = &steps[11].metrics;
    assert!(last["rewards/margins"] > 0.05, "{last:?}");
    assert!(last["rewards/accuracies"] > 0.5, "{last:?}");
    assert!(steps[11].loss < 0.6, "{}", steps[11].loss);

    // The run folder: LLaMA-Factory's `accuracy`, TRL's metric names, evaluations with eval_ ones.
    let out = root.join("out");
    let log = read_log(&out).unwrap();
    assert_eq!(log[0].accuracy, Some(0.0));
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(log[0].metrics.contains_key(key), "{key}: {:?}", log[0]);
        assert!(
            log.iter()
                .any(|l| l.metrics.contains_key(&format!("eval_{key}"))),
            "eval_{key}"
        );
    }
    let state = TrainerState::load(&out.join("trainer_state.json")).unwrap();
    let evals: Vec<_> = state
        .log_history
        .iter()
        .filter(|h| h.eval_loss.is_some())
        .collect();
    assert_eq!(evals.len(), 2);
    assert!(evals[0].metrics.contains_key("eval_rewards/accuracies"));
    assert!(out.join("adapter_model.safetensors").exists());
    assert!(out.join("training_rewards_accuracies.png").exists());
}

#[test]
fn orpo_runs_without_a_reference_and_full_dpo_with_a_frozen_copy() {
    let (_d, root) = fixture(8);
    for extra in [
        vec!["max_steps: 2", "pref_loss: orpo"],
        vec![
            "max_steps: 2",
            "finetuning_type: full",
            "learning_rate: 1.0e-4",
        ],
    ] {
        let mut e = extra.clone();
        e.push("overwrite_output_dir: true");
        let loaded = preset(&root, &e).unwrap_or_else(|e| panic!("{e:?}"));
        let (r, steps) = train(&loaded);
        r.unwrap_or_else(|e| panic!("{extra:?}: {e}"));
        let first = &steps[0];
        let m = &first.metrics;
        if extra.contains(&"pref_loss: orpo") {
            assert!(
                m.contains_key("sft_loss") && m.contains_key("odds_ratio_loss"),
                "{m:?}"
            );
            assert!(first.loss > 0.0);
        } else {
            // The policy starts as its frozen copy (in f32, through the trainable head's pure ops where the frozen
            // copy's head runs the fused chunked kernel: equal to rounding).
            assert!(
                (first.loss - std::f64::consts::LN_2).abs() < 1e-5,
                "{}",
                first.loss
            );
        }
    }
}

#[test]
fn wrong_data_and_keys_are_refused_with_the_fix() {
    let (_d, root) = fixture(4);
    // SFT data for dpo: the message names the dataset and what it needs.
    let loaded = preset(&root, &["dataset: toy", "max_steps: 1"]).unwrap();
    let (r, _) = train(&loaded);
    let e = r.unwrap_err();
    assert!(e.contains("preference dataset") && e.contains("toy"), "{e}");
    // Keys: each problem named.
    for (kv, key) in [
        ("pref_loss: kto_pair", "pref_loss"),
        ("dpo_label_smoothing: 0.7", "dpo_label_smoothing"),
        ("pref_beta: 0", "pref_beta"),
        ("packing: true", "packing"),
        ("ld_alpha: 1.5", "ld_alpha"),
    ] {
        let issues = preset(&root, &[kv]).expect_err(kv);
        assert!(issues.iter().any(|i| i.key == key), "{kv}: {issues:?}");
    }
    // Label smoothing is a sigmoid-loss key.
    let issues = preset(&root, &["pref_loss: hinge", "dpo_label_smoothing: 0.1"]).unwrap_err();
    assert!(issues[0].message.contains("sigmoid"), "{issues:?}");
    // BCO needs a loss with a reference, and a run with it trains.
    let issues = preset(&root, &["pref_loss: orpo", "pref_bco_weight: 0.5"]).unwrap_err();
    assert!(
        issues.iter().any(|i| i.key == "pref_bco_weight"),
        "{issues:?}"
    );
    let loaded = preset(&root, &["pref_bco_weight: 0.5", "max_steps: 2"]).unwrap();
    let (r, _) = train(&loaded);
    assert!(r.is_ok(), "{r:?}");
    // LD-DPO's weight is in [0, 1], and a run with one trains.
    let issues = preset(&root, &["ld_alpha: 1.5"]).unwrap_err();
    assert!(issues[0].message.contains("[0, 1]"), "{issues:?}");
    let loaded = preset(&root, &["ld_alpha: 0.5", "max_steps: 2"]).unwrap();
    let (r, _) = train(&loaded);
    assert!(r.is_ok(), "{r:?}");
}

#[test]
fn a_separate_reference_model_replaces_the_adapter_off_base() {
    let (_d, root) = fixture(8);
    // The same weights as the policy's base: step 1 is ln 2 exactly, as with the adapter off.
    let same = format!("ref_model: {}", root.join("model").display());
    let loaded = preset(&root, &["max_steps: 1", &same]).unwrap_or_else(|e| panic!("{e:?}"));
    let (r, steps) = train(&loaded);
    r.unwrap();
    let m = &steps[0];
    assert!((m.loss - std::f64::consts::LN_2).abs() < 1e-9, "{}", m.loss);
    // Another model (same tokenizer, other weights): the policy differs from it at step 1.
    tiny_llama(&root.join("other"), 99, &TinyOpts::default()).unwrap();
    let other = format!("ref_model: {}", root.join("other").display());
    let loaded = preset(
        &root,
        &["max_steps: 1", "overwrite_output_dir: true", &other],
    )
    .unwrap();
    let (r, steps) = train(&loaded);
    r.unwrap();
    let m = &steps[0];
    assert!((m.loss - std::f64::consts::LN_2).abs() > 1e-3, "{}", m.loss);
    assert!(m.metrics["rewards/chosen"].abs() > 1e-3, "{:?}", m.metrics);
    // The same weights quantized (`ref_model_quantization_bit`): the reference moves off the policy by the
    // quantization error only, 4-bit more than 8-bit.
    let mut off = Vec::new();
    for bits in ["4", "8"] {
        let q = format!("ref_model_quantization_bit: {bits}");
        let loaded = preset(
            &root,
            &["max_steps: 1", "overwrite_output_dir: true", &same, &q],
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        let (r, steps) = train(&loaded);
        r.unwrap();
        off.push((steps[0].loss - std::f64::consts::LN_2).abs());
        eprintln!("{bits}-bit reference: step-1 loss {}", steps[0].loss);
    }
    assert!(
        off[0] > off[1] && off[1] > 1e-6,
        "|loss - ln 2| 4-bit, 8-bit: {off:?}"
    );
    // Keys that cannot apply are refused.
    for (kv, key) in [
        (vec!["pref_loss: orpo", same.as_str()], "ref_model"),
        (
            vec!["ref_model_adapters: some/adapter"],
            "ref_model_adapters",
        ),
        (
            vec!["ref_model_quantization_bit: 4"],
            "ref_model_quantization_bit",
        ),
        (
            vec![same.as_str(), "ref_model_quantization_bit: 2"],
            "ref_model_quantization_bit",
        ),
    ] {
        let issues = preset(&root, &kv).expect_err(key);
        assert!(issues.iter().any(|i| i.key == key), "{kv:?}: {issues:?}");
    }
}

/// From the second epoch on the reference's log-probabilities come from the cache: the losses equal those of a run
/// resumed at the epoch boundary, which starts with an empty cache and computes them again.
#[test]
fn cached_reference_logps_give_the_losses_of_a_recomputed_reference() {
    let (_d, root) = fixture(16);
    let base = [
        "num_train_epochs: 2",
        "gradient_accumulation_steps: 2",
        "save_steps: 4",
        "overwrite_output_dir: true",
    ];
    let steps_of = |steps: &[termtune::trainer::protocol::StepMetrics]| -> Vec<(u64, f64)> {
        steps.iter().map(|m| (m.step, m.loss)).collect()
    };
    let loaded = preset(&root, &base).unwrap_or_else(|e| panic!("{e:?}"));
    let (r, steps) = train(&loaded);
    r.unwrap();
    let whole = steps_of(&steps);
    assert_eq!(whole.len(), 8);
    let checkpoint = root.join("out").join("checkpoint-4");
    assert!(checkpoint.is_dir());
    let resume = format!("resume_from_checkpoint: {}", checkpoint.display());
    let out2 = format!("output_dir: {}", root.join("out2").display());
    let mut extra = base.to_vec();
    extra.push(&resume);
    extra.push(&out2);
    let loaded = preset(&root, &extra).unwrap_or_else(|e| panic!("{e:?}"));
    let (r, steps) = train(&loaded);
    r.unwrap();
    let resumed = steps_of(&steps);
    assert_eq!(resumed.len(), 4);
    for ((s1, l1), (s2, l2)) in whole[4..].iter().zip(&resumed) {
        assert_eq!(s1, s2);
        assert!(
            (l1 - l2).abs() < 1e-6,
            "step {s1}: cached {l1} vs recomputed {l2}"
        );
    }
    // The policy moved: the losses are not all ln 2, so equal losses compare real reference numbers.
    assert!(
        whole[4..]
            .iter()
            .any(|(_, l)| (l - std::f64::consts::LN_2).abs() > 1e-4)
    );
}

/// An epoch's last, partial accumulation: the step's loss is the mean over the micro-batches it has (the Hugging Face
/// trainer divides by them), not a fraction of a full step's.
#[test]
fn a_partial_last_step_averages_over_its_own_micro_batches() {
    // 6 pairs, 2 per micro-batch, 2 micro-batches per step: step 1 has two, step 2 one.
    let (_d, root) = fixture(6);
    let loaded = preset(&root, &["num_train_epochs: 1", "learning_rate: 1.0e-12"]).unwrap();
    let (r, steps) = train(&loaded);
    r.unwrap();
    let losses: Vec<f64> = steps.iter().map(|m| m.loss).collect();
    assert_eq!(losses.len(), 2);
    for l in losses {
        assert!((l - std::f64::consts::LN_2).abs() < 1e-6, "{l}");
    }
}

/// `termtune check`, the pre-flight memory check and the TUI count the reference model a preference stage keeps
/// beside the policy: none for LoRA (the adapter switched off) or without a reference loss, a frozen copy of the
/// base for full fine-tuning, `ref_model` as `ref_model_quantization_bit` holds it.
#[test]
fn the_memory_estimate_counts_the_reference_model() {
    use candle_core::DType;
    use termtune::config::{FinetuningType, Preset, Stage};
    use termtune::engine::Finetune;
    use termtune::engine::memory::{BaseStorage, base_weight_bytes};
    use termtune::resolve::{memory_estimate, reference_weight_bytes};
    let cfg = crate::tiny_util::llama_8b_config();
    let dense = base_weight_bytes(&cfg, &Finetune::Frozen, DType::BF16, BaseStorage::Dense);
    let bytes = |p: &Preset| reference_weight_bytes(p, &cfg, None, DType::BF16, BaseStorage::Dense);
    let mut p = Preset::default();
    assert_eq!(bytes(&p), 0, "sft");
    p.stage = Stage::Dpo;
    p.finetuning_type = FinetuningType::Lora;
    assert_eq!(bytes(&p), 0, "lora: the adapter off");
    p.finetuning_type = FinetuningType::Full;
    assert_eq!(bytes(&p), dense, "full: a frozen copy");
    p.pref_loss = PrefLoss::Orpo;
    assert_eq!(bytes(&p), 0, "orpo: no reference");
    p.pref_loss = PrefLoss::Sigmoid;
    p.finetuning_type = FinetuningType::Lora;
    p.ref_model = Some("some/model".into());
    assert_eq!(bytes(&p), dense, "ref_model");
    p.ref_model_quantization_bit = Some(4);
    let ratio = bytes(&p) as f64 / dense as f64;
    assert!((0.3..0.37).contains(&ratio), "4-bit ref_model: {ratio}");
    let (dtype, est) = memory_estimate(&p, &cfg, false, BaseStorage::Dense, None, None).unwrap();
    let want = reference_weight_bytes(&p, &cfg, None, dtype, BaseStorage::Dense);
    assert_eq!(est.reference, want);
    assert!(est.total() >= est.weights + est.reference);
    assert!(
        est.describe().contains("reference model"),
        "{}",
        est.describe()
    );
    p.stage = Stage::Kto;
    p.ref_model = None;
    p.ref_model_quantization_bit = None;
    assert_eq!(bytes(&p), 0, "kto with lora: the adapter off");
}

/// `metric_for_best_model` on a stage's metrics: KTO's `rewards/margins` (derived from chosen − rejected, as it is
/// logged) ranks checkpoints; a name the evaluation did not log stops the run at the first evaluation with the
/// names it did log.
#[test]
fn stage_metrics_rank_the_best_checkpoint() {
    let (_d, root) = fixture(16);
    let best = [
        "max_steps: 2",
        "val_size: 0.25",
        "eval_strategy: steps",
        "eval_steps: 1",
        "save_steps: 1",
        "load_best_model_at_end: true",
    ];
    let kto = crate::tiny_util::preference_preset(
        &root,
        "kto",
        "feedback",
        &[&best[..], &["metric_for_best_model: rewards/margins"]].concat(),
    )
    .unwrap();
    let (r, steps) = train(&kto);
    r.unwrap();
    assert_eq!(steps.len(), 2);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("out/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert!(state["best_metric"].as_f64().is_some(), "{state}");

    let out2 = format!("output_dir: {}", root.join("out2").display());
    let dpo = crate::tiny_util::preference_preset(
        &root,
        "dpo",
        "prefs",
        &[
            &best[..],
            &["metric_for_best_model: rewards/nonesuch", out2.as_str()],
        ]
        .concat(),
    )
    .unwrap();
    let (r, steps) = train(&dpo);
    let e = r.unwrap_err();
    assert_eq!(steps.len(), 1);
    assert!(
        e.contains("eval_rewards/nonesuch") && e.contains("eval_rewards/accuracies"),
        "{e}"
    );
}

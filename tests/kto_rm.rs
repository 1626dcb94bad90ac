//! Stages kto and rm: their losses and logged metrics against TRL's and LLaMA-Factory's formulas
//! (tests/fixtures/kto_rm_reference.json, from scripts/kto_rm_reference.py), their derivatives against finite
//! differences (the reward model's through the whole model and its value head), the KL pairs of the kto data, and
//! runs of the trainer, `termtune score` and the chat refusal on the tiny model.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use termtune::chat::ChatSession;
use termtune::chat::score::Scorer;
use termtune::engine::value_head::{BIAS_KEY, VALUE_HEAD_FILE, WEIGHT_KEY};
use termtune::engine::{AttnMask, Model, ValueHead};
use termtune::trainer::pref::{KtoConfig, KtoExample, kto_loss, reward_pair_loss};
use termtune::trainer::runlog::{TrainerState, read_log};

const CPU: Device = Device::Cpu;

fn reference() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kto_rm_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() < 1e-9 * (1.0 + want.abs()),
        "{what}: {got} vs {want}"
    );
}

fn kto_inputs(case: &Value) -> (KtoConfig, Vec<KtoExample>, Vec<f64>, Vec<f64>) {
    let c = &case["config"];
    let cfg = KtoConfig {
        beta: c["pref_beta"].as_f64().unwrap(),
        desirable_weight: c["kto_chosen_weight"].as_f64().unwrap(),
        undesirable_weight: c["kto_rejected_weight"].as_f64().unwrap(),
        ftx: c["pref_ftx"].as_f64().unwrap(),
    };
    let b = &case["batch"];
    let examples = b["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| KtoExample {
            logps: e["logps"].as_f64().unwrap(),
            ref_logps: e["ref_logps"].as_f64().unwrap(),
            tokens: e["len"].as_u64().unwrap() as usize,
            desirable: e["tag"].as_bool().unwrap(),
        })
        .collect();
    let floats = |k: &str| -> Vec<f64> {
        b[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    (cfg, examples, floats("kl_policy"), floats("kl_ref"))
}

#[test]
fn the_kto_loss_and_metrics_equal_the_trl_formulas_and_its_derivatives_the_differences() {
    let r = reference();
    let cases = r["kto"].as_array().unwrap();
    assert_eq!(cases.len(), 9);
    for (n, case) in cases.iter().enumerate() {
        let (cfg, examples, klp, klr) = kto_inputs(case);
        let out = kto_loss(&cfg, &examples, &klp, &klr).unwrap();
        close(
            out.loss,
            case["loss"].as_f64().unwrap(),
            &format!("case {n} loss"),
        );
        let want = case["metrics"].as_object().unwrap();
        let got = out.metrics.values("");
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>(),
            "case {n}"
        );
        for (k, v) in want {
            close(got[k], v.as_f64().unwrap(), &format!("case {n} {k}"));
        }
        // ∂loss/∂logps against central differences, the KL sequences held (TRL detaches the KL estimate).
        let h = 1e-6;
        for i in 0..examples.len() {
            let at = |d: f64| {
                let mut e = examples.clone();
                e[i].logps += d;
                kto_loss(&cfg, &e, &klp, &klr).unwrap().loss
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (fd - out.d_logps[i]).abs() < 1e-7 * (1.0 + fd.abs()),
                "case {n} example {i}: {} vs {fd}",
                out.d_logps[i]
            );
        }
    }
}

#[test]
fn the_reward_model_loss_and_metrics_equal_the_llamafactory_formulas() {
    let r = reference();
    for (n, case) in r["rm"].as_array().unwrap().iter().enumerate() {
        let floats = |k: &str| -> Vec<f64> {
            case["batch"][k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        };
        let (c, rj) = (floats("chosen"), floats("rejected"));
        let out = reward_pair_loss(&c, &rj);
        close(out.mean_loss(), case["loss"].as_f64().unwrap(), "loss");
        for (i, l) in case["losses"].as_array().unwrap().iter().enumerate() {
            close(
                out.losses[i],
                l.as_f64().unwrap(),
                &format!("case {n} pair {i}"),
            );
        }
        let got = out.metrics.values("");
        for (k, v) in case["metrics"].as_object().unwrap() {
            close(got[k], v.as_f64().unwrap(), &format!("case {n} {k}"));
        }
        assert_eq!(got.len(), 4);
        // The derivatives of the mean loss, rows = chosen then rejected.
        let k = c.len();
        let h = 1e-6;
        for row in 0..2 * k {
            let at = |d: f64| {
                let (mut a, mut b) = (c.clone(), rj.clone());
                if row < k {
                    a[row] += d;
                } else {
                    b[row - k] += d;
                }
                reward_pair_loss(&a, &b).mean_loss()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!((fd - out.d_rows[row]).abs() < 1e-8, "row {row}");
        }
    }
}

/// Two pairs (chosen rows 0 and 1, rejected 2 and 3), right-padded.
fn pair_batch() -> (Tensor, AttnMask) {
    let ids: [[u32; 6]; 4] = [
        [5, 70, 71, 100, 33, 9],
        [6, 12, 40, 41, 0, 0],
        [5, 70, 71, 200, 0, 0],
        [6, 12, 90, 91, 92, 0],
    ];
    let am: [[u32; 6]; 4] = [
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
    ];
    (
        Tensor::new(&ids, &CPU).unwrap(),
        AttnMask::Padding {
            attention_mask: Tensor::new(&am, &CPU).unwrap(),
        },
    )
}

fn rm_loss(m: &Model, head: &ValueHead, seed: u64) -> (f64, Tensor, Vec<f64>) {
    let (ids, mask) = pair_batch();
    let h = m.last_hidden(&ids, &mask, None, true).unwrap();
    let v = head.forward(&h, Some(seed)).unwrap();
    let vals = v.to_vec1::<f64>().unwrap();
    let out = reward_pair_loss(&vals[..2], &vals[2..]);
    (out.mean_loss(), v, out.d_rows)
}

#[test]
fn the_reward_model_gradient_matches_finite_differences_through_the_model_and_its_head() {
    let d = tempfile::tempdir().unwrap();
    let m = crate::tiny_util::tiny_lora_f64(d.path(), termtune::engine::model::Kernels::Fused);
    let head = ValueHead::new(m.cfg.hidden_size, 3, &CPU).unwrap();
    // The head reads each row's last real token: equal to the full forward's hidden state there.
    let (ids, mask) = pair_batch();
    let full = m.forward_hidden(&ids, &mask, false).unwrap();
    let last = m.last_hidden(&ids, &mask, None, false).unwrap();
    for (row, pos) in [(0usize, 5usize), (1, 3), (2, 3), (3, 4)] {
        let a = full
            .get(row)
            .unwrap()
            .get(pos)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let b = last.get(row).unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(a, b, "row {row}");
    }
    // The same dropout mask for the same seed: the loss is a function of the parameters alone.
    let seed = 11;
    let (_, v, dl) = rm_loss(&m, &head, seed);
    let dlt = Tensor::new(dl.as_slice(), &CPU).unwrap();
    let grads = (v * dlt).unwrap().sum_all().unwrap().backward().unwrap();
    let mut vars: Vec<(String, candle_core::Var)> = m
        .trainable_vars()
        .into_iter()
        .filter(|(n, _)| {
            n.contains("layers.1.self_attn.v_proj") || n.contains("layers.0.mlp.up_proj")
        })
        .collect();
    vars.extend(head.vars());
    let mut rng = StdRng::seed_from_u64(5);
    let mut checked = 0;
    for (name, var) in &vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let orig = var.as_tensor().copy().unwrap();
        let dt = orig.dtype();
        for _ in 0..3 {
            let i = rng.random_range(0..orig.elem_count());
            let step = if dt == DType::F64 { 1e-5 } else { 1e-2 };
            let mut flat = orig
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let mut at = |delta: f64| {
                flat[i] += delta;
                let t = Tensor::from_vec(flat.clone(), orig.shape(), &CPU)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                var.set(&t).unwrap();
                flat[i] -= delta;
                rm_loss(&m, &head, seed).0
            };
            let num = (at(step) - at(-step)) / (2.0 * step);
            var.set(&orig).unwrap();
            let rel = (num - g[i]).abs() / num.abs().max(g[i].abs()).max(1e-6);
            // The head's parameters are f32 (as TRL keeps them): a looser bound for them.
            let tol = if dt == DType::F64 { 1e-5 } else { 2e-2 };
            assert!(
                rel < tol,
                "{name}[{i}]: analytic {} numeric {num} rel {rel}",
                g[i]
            );
            checked += 1;
        }
    }
    // lora_A and lora_B of two modules, and the head's weight and bias.
    assert_eq!(checked, 18);
}

use crate::tiny_util::{
    preference_fixture as fixture, preference_preset as preset, train_steps as train,
};

#[test]
fn the_kto_data_pairs_each_prompt_with_the_previous_answer_for_the_kl_term() {
    let (_d, root) = fixture(5);
    let loaded = preset(&root, "kto", "feedback", &[]).unwrap();
    let opts = termtune::resolve::data_options(&loaded.preset);
    let ex = termtune::data::pipeline::load_examples(&opts)
        .unwrap()
        .train;
    assert_eq!(ex.len(), 5);
    let answer = |i: usize| {
        ex[i]
            .response
            .iter()
            .find(|m| !m.content.is_empty())
            .unwrap()
            .content
            .clone()
    };
    for (i, e) in ex.iter().enumerate() {
        let kl = e.kl_answer.as_ref().unwrap().content.clone();
        assert_eq!(kl, answer((i + 4) % 5), "example {i}");
    }
    assert_eq!(ex[0].kto_tag, Some(true));
    assert_eq!(ex[1].kto_tag, Some(false));
}

#[test]
fn a_lora_kto_run_starts_at_half_with_zero_kl_and_separates_the_rewards() {
    let (_d, root) = fixture(16);
    let loaded = preset(
        &root,
        "kto",
        "feedback",
        &[
            "max_steps: 10",
            "val_size: 4",
            "eval_strategy: steps",
            "eval_steps: 5",
        ],
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let (r, steps) = train(&loaded);
    r.unwrap();
    assert_eq!(steps.len(), 10);
    // B = 0: the policy is the reference, every log-ratio and the KL estimate 0, each loss 1 − σ(0) = 0.5.
    close(steps[0].loss, 0.5, "step 1 loss");
    assert_eq!(steps[0].metrics["kl"], 0.0);
    assert_eq!(steps[0].metrics["rewards/margins"], 0.0);
    let last = &steps[9].metrics;
    assert!(last["rewards/margins"] > 0.0, "{last:?}");
    assert!(steps[9].loss < 0.5, "{}", steps[9].loss);
    let out = root.join("out");
    let log = read_log(&out).unwrap();
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "kl",
    ] {
        assert!(log[0].metrics.contains_key(key), "{key}: {:?}", log[0]);
        assert!(
            log.iter()
                .any(|l| l.metrics.contains_key(&format!("eval_{key}"))),
            "eval_{key}"
        );
    }
    assert!(out.join("adapter_model.safetensors").exists());
    assert!(out.join("training_rewards_chosen.png").exists());
    assert!(!out.join(VALUE_HEAD_FILE).exists());
}

#[test]
fn a_lora_reward_model_learns_to_rank_saves_its_value_head_and_scores() {
    let (_d, root) = fixture(16);
    let loaded = preset(
        &root,
        "rm",
        "prefs",
        &[
            "max_steps: 12",
            "val_size: 4",
            "eval_strategy: steps",
            "eval_steps: 6",
            "learning_rate: 1.0e-2",
        ],
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let (r, steps) = train(&loaded);
    r.unwrap();
    assert_eq!(steps.len(), 12);
    let first_loss = steps[0].loss;
    let late: f64 = steps[9..].iter().map(|s| s.loss).sum::<f64>() / 3.0;
    assert!(late < first_loss, "{first_loss} -> {late}");
    assert!(
        steps[11].metrics["rewards/accuracies"] > 0.5,
        "{:?}",
        steps[11].metrics
    );
    let out = root.join("out");
    // The value head as LLaMA-Factory saves it.
    let vh =
        termtune::engine::weights::load_safetensors(&[out.join(VALUE_HEAD_FILE)], DType::F32, &CPU)
            .unwrap();
    assert_eq!(vh[WEIGHT_KEY].dims(), &[1, 64]);
    assert_eq!(vh[BIAS_KEY].dims(), &[1]);
    let state = TrainerState::load(&out.join("trainer_state.json")).unwrap();
    let evals: Vec<_> = state
        .log_history
        .iter()
        .filter(|h| h.eval_loss.is_some())
        .collect();
    assert_eq!(evals.len(), 2);
    assert!(evals.iter().all(|e| e.eval_accuracy.is_some()), "{evals:?}");
    let all: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
            .unwrap();
    assert!(all["eval_accuracy"].is_number(), "{all}");
    assert!(out.join("training_eval_accuracy.png").exists());

    // Scoring with the trained model; chat refuses it.
    let mut p = loaded.preset.clone();
    p.adapter_name_or_path = Some(out.display().to_string());
    let scorer = Scorer::load(&p, &CPU, &mut |_| {}).unwrap();
    let good = scorer
        .score("", "name a colour 3", "blue and green ")
        .unwrap();
    let bad = scorer
        .score("", "name a colour 3", "I will not say it say it ")
        .unwrap();
    assert!(good.is_finite() && bad.is_finite());
    assert!(good > bad, "{good} vs {bad}");
    let err = ChatSession::load(&p, &CPU, &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("reward model") && err.contains("termtune score"),
        "{err}"
    );
}

#[test]
fn wrong_data_for_kto_and_rm_is_refused_with_the_dataset_named() {
    let (_d, root) = fixture(4);
    // rm on SFT data, kto on pairs, kto on data without a kto_tag column.
    for (stage, dataset, want) in [
        ("rm", "toy", "preference dataset"),
        ("kto", "prefs", "kto"),
        ("kto", "toy", "kto_tag"),
    ] {
        let loaded = preset(&root, stage, dataset, &["max_steps: 1"]).unwrap();
        let (r, _) = train(&loaded);
        let e = r.unwrap_err();
        assert!(
            e.contains(want) && e.contains(dataset),
            "{stage} on {dataset}: {e}"
        );
    }
    // A kto row without its tag is skipped, named by file and row.
    let data = root.join("data");
    let mut rows: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(data.join("feedback.json")).unwrap())
            .unwrap();
    rows[1].as_object_mut().unwrap().remove("label");
    std::fs::write(
        data.join("feedback.json"),
        serde_json::to_string(&rows).unwrap(),
    )
    .unwrap();
    let loaded = preset(&root, "kto", "feedback", &[]).unwrap();
    let opts = termtune::resolve::data_options(&loaded.preset);
    let got = termtune::data::pipeline::load_examples(&opts).unwrap();
    assert_eq!(got.train.len(), 3);
    let first = got.counts.first[0].to_string();
    assert!(
        first.contains("feedback.json") && first.contains("label"),
        "{first}"
    );
    // Keys.
    for (stage, kv, key) in [
        ("kto", "kto_chosen_weight: 0", "kto_chosen_weight"),
        ("kto", "kto_rejected_weight: -1", "kto_rejected_weight"),
        ("kto", "packing: true", "packing"),
        ("rm", "do_predict: true", "do_predict"),
        ("rm", "compute_accuracy: true", "compute_accuracy"),
        ("ppo", "max_steps: 1", "stage"),
    ] {
        let issues = preset(&root, stage, "prefs", &[kv]).expect_err(kv);
        assert!(issues.iter().any(|i| i.key == key), "{kv}: {issues:?}");
    }
}

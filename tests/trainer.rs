//! The training loop on a tiny seeded random llama (seconds): overfitting, accumulation
//! equivalence, exact resume, fault handling and the event sequence.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use crate::tiny_util::*;
use candle_core::{Device, Tensor};
use termtune::config::{self, Purpose};
use termtune::trainer::protocol::{TrainCommand, TrainEvent};
use termtune::trainer::run::{Outcome, TrainError, run_training};
use termtune::trainer::runlog::read_log;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn fixture(rows: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    tiny_model_and_toy_data(&root, &varied_rows(rows));
    Fixture { _dir: dir, root }
}

fn preset(f: &Fixture, out: &str, extra: &[&str]) -> config::Loaded {
    let text = format!(
        "model_name_or_path: {}\ndataset: toy\ndataset_dir: {}\ntemplate: chatml\ncutoff_len: 64\n\
         output_dir: {}\nlogging_steps: 1\nsave_steps: 1000\nper_device_train_batch_size: 2\n\
         gradient_accumulation_steps: 1\nlearning_rate: 1.0e-2\nlora_rank: 4\nlr_scheduler_type: constant\n\
         tokenized_path: {}\nseed: 3\n",
        f.root.join("model").display(),
        f.root.join("data").display(),
        f.root.join(out).display(),
        f.root.join("tokcache").display(),
    );
    let overrides: Vec<String> = extra.iter().map(|e| e.replacen(": ", "=", 1)).collect();
    config::parse(&text, &overrides, Purpose::Train).unwrap_or_else(|e| panic!("{e:?}"))
}

fn run(
    loaded: &config::Loaded,
    commands: &[(u64, TrainCommand)],
) -> (Result<Outcome, TrainError>, Vec<TrainEvent>) {
    let (tx, rx) = mpsc::channel();
    let mut events = Vec::new();
    let mut pending: Vec<(u64, TrainCommand)> = commands.to_vec();
    let result = run_training(loaded, &Device::Cpu, &rx, &mut |ev| {
        if let TrainEvent::StepFinished(m) = &ev {
            pending.retain(|(at, cmd)| {
                if *at == m.step {
                    tx.send(cmd.clone()).unwrap();
                    false
                } else {
                    true
                }
            });
        }
        events.push(ev);
    });
    (result, events)
}

fn losses(events: &[TrainEvent]) -> Vec<f64> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::StepFinished(m) => Some(m.loss),
            _ => None,
        })
        .collect()
}

fn adapter(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let t = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t
        .into_iter()
        .map(|(k, t): (String, Tensor)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn overfitting_a_small_set_drives_the_loss_down() {
    let f = fixture(2);
    let loaded = preset(&f, "run", &["max_steps: 40", "lora_rank: 8"]);
    let (result, events) = run(&loaded, &[]);
    assert!(matches!(result.unwrap(), Outcome::Finished(_)));
    let l = losses(&events);
    assert_eq!(l.len(), 40);
    assert!(l[39] < 0.5 * l[0], "loss {} -> {}", l[0], l[39]);
    // The run folder as LLaMA-Factory writes it.
    let out = f.root.join("run");
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_log.jsonl",
        "trainer_state.json",
        "train_results.json",
        "all_results.json",
        "training_args.yaml",
        "tokenizer.json",
        "training_loss.png",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    let log = read_log(&out).unwrap();
    assert_eq!(log.len(), 40);
    assert_eq!(log[39].current_steps, 40);
    assert_eq!(log[39].percentage, 100.0);
    // training_args.yaml runs again, here and in LLaMA-Factory (which trains only with `do_train: true`).
    assert!(config::load(&out.join("training_args.yaml"), &[], Purpose::Train).is_ok());
    let args = std::fs::read_to_string(out.join("training_args.yaml")).unwrap();
    let method = args.split("### method\n").nth(1).unwrap_or_default();
    let method = method.split("\n\n").next().unwrap_or_default();
    assert!(method.lines().any(|l| l == "do_train: true"), "{args}");
    assert!(!args.contains("do_eval"), "no validation split: {args}");
}

#[test]
fn the_event_sequence_of_a_run() {
    let f = fixture(6);
    let loaded = preset(&f, "run", &["max_steps: 3", "save_steps: 2"]);
    let (result, events) = run(&loaded, &[]);
    result.unwrap();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            TrainEvent::Loading { .. } => "loading",
            TrainEvent::Warning(_) => "warning",
            TrainEvent::Note(_) => "note",
            TrainEvent::Resuming { .. } => "resuming",
            TrainEvent::Started { .. } => "started",
            TrainEvent::StepFinished(_) => "step",
            TrainEvent::EvalFinished { .. } => "eval",
            TrainEvent::CheckpointSaved { .. } => "checkpoint",
            TrainEvent::Paused => "paused",
            TrainEvent::Resumed => "resumed",
            TrainEvent::Finished(_) => "finished",
            TrainEvent::Failed(_) => "failed",
        })
        .filter(|k| *k != "loading" && *k != "warning")
        .collect();
    assert_eq!(
        kinds,
        [
            "started",
            "step",
            "step",
            "checkpoint",
            "step",
            "checkpoint",
            "finished"
        ]
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, TrainEvent::Loading { .. }))
    );
}

#[test]
fn accumulating_four_micro_batches_equals_one_batch_of_four() {
    let f = fixture(4);
    let a = preset(
        &f,
        "a",
        &[
            "max_steps: 1",
            "per_device_train_batch_size: 4",
            "gradient_accumulation_steps: 1",
        ],
    );
    let b = preset(
        &f,
        "b",
        &[
            "max_steps: 1",
            "per_device_train_batch_size: 1",
            "gradient_accumulation_steps: 4",
        ],
    );
    let (ra, ea) = run(&a, &[]);
    let (rb, eb) = run(&b, &[]);
    ra.unwrap();
    rb.unwrap();
    let (la, lb) = (losses(&ea)[0], losses(&eb)[0]);
    assert!((la - lb).abs() < 1e-5, "loss {la} vs {lb}");
    let (wa, wb) = (adapter(&f.root.join("a")), adapter(&f.root.join("b")));
    assert_eq!(wa.len(), wb.len(), "the same adapter tensors");
    for ((na, va), (nb, vb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        assert_eq!(va.len(), vb.len(), "{na}");
        let max = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(max < 1e-5, "{na}: {max}");
    }
}

#[test]
fn resume_matches_the_uninterrupted_run() {
    // Also with LoRA dropout: its masks follow (seed, step, micro-batch), so a resumed run draws the same ones; and
    // with DoRA's magnitudes, LoRA+'s learning-rate groups and NEFTune's noise (drawn as the masks are), and PiSSA.
    for (tag, options) in [
        ("", &["lora_dropout: 0.0"][..]),
        ("-dropout", &["lora_dropout: 0.2"][..]),
        (
            "-dora",
            &[
                "lora_dropout: 0.1",
                "use_dora: true",
                "loraplus_lr_ratio: 16",
                "neftune_noise_alpha: 5",
            ][..],
        ),
        // PiSSA: the checkpoint's adapter makes the residual again when it is loaded; pissa_init/ is kept.
        ("-pissa", &["pissa_init: true", "pissa_convert: true"][..]),
        // Muon: its momentum buffers are in the checkpoint's optimizer state.
        ("-muon", &["use_muon: true", "weight_decay: 0.1"][..]),
    ] {
        resume_matches_with(tag, options);
    }
}

fn resume_matches_with(tag: &str, options: &[&str]) {
    let dropout = options.join(", ");
    let f = fixture(10);
    let (straight_dir, split_dir) = (format!("straight{tag}"), format!("split{tag}"));
    let straight = preset(
        &f,
        &straight_dir,
        &[
            &[
                "max_steps: 4",
                "lr_scheduler_type: cosine",
                "warmup_steps: 1",
            ],
            options,
        ]
        .concat(),
    );
    let (r, e_straight) = run(&straight, &[]);
    r.unwrap();

    let split = preset(
        &f,
        &split_dir,
        &[
            &[
                "max_steps: 4",
                "lr_scheduler_type: cosine",
                "warmup_steps: 1",
            ],
            options,
        ]
        .concat(),
    );
    let (r, e_first) = run(&split, &[(2, TrainCommand::Stop { save: true })]);
    assert!(matches!(r.unwrap(), Outcome::Stopped(_)));
    assert!(
        f.root
            .join(&split_dir)
            .join("checkpoint-2/trainer_state.json")
            .exists()
    );
    // Same preset again: resumes from output_dir's newest checkpoint automatically.
    let (r, e_second) = run(&split, &[]);
    assert!(matches!(r.unwrap(), Outcome::Finished(_)));
    assert!(
        e_second
            .iter()
            .any(|e| matches!(e, TrainEvent::Resuming { step: 2, .. }))
    );

    let mut resumed = losses(&e_first);
    resumed.extend(losses(&e_second));
    let straight_losses = losses(&e_straight);
    assert_eq!(resumed.len(), 4);
    assert_eq!(straight_losses.len(), resumed.len());
    for (a, b) in straight_losses.iter().zip(&resumed) {
        assert!(
            (a - b).abs() < 1e-6,
            "{dropout}: {straight_losses:?} vs {resumed:?}"
        );
    }
    let (wa, wb) = (
        adapter(&f.root.join(&straight_dir)),
        adapter(&f.root.join(&split_dir)),
    );
    assert_eq!(wa, wb, "{dropout}: final adapters differ");
}

/// `load_best_model_at_end` + `early_stopping_steps` (the Hugging Face Trainer's EarlyStoppingCallback): with
/// `greater_is_better: true` on eval_loss, which training lowers, the first evaluation stays the best, the next two
/// bring no improvement and the run stops after step 3 of 10; it ends with checkpoint-1's weights (kept by the
/// rotation although `save_total_limit` is 1), whose evaluation is the run's, and trainer_state.json names it.
#[test]
fn early_stopping_ends_with_the_best_checkpoint() {
    let f = fixture(12);
    let loaded = preset(
        &f,
        "best",
        &[
            "max_steps: 10",
            "val_size: 0.25",
            "eval_strategy: steps",
            "eval_steps: 1",
            "save_steps: 1",
            "save_total_limit: 1",
            "load_best_model_at_end: true",
            "greater_is_better: true",
            "early_stopping_steps: 2",
        ],
    );
    let (r, events) = run(&loaded, &[]);
    let summary = match r.unwrap() {
        Outcome::Finished(s) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!(summary.steps, 3);
    let evals: Vec<f64> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::EvalFinished { eval_loss, .. } => Some(*eval_loss),
            _ => None,
        })
        .collect();
    assert_eq!(evals.len(), 3);
    assert!(evals[1] < evals[0] && evals[2] < evals[0], "{evals:?}");
    let notes: Vec<&String> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Note(n) => Some(n),
            _ => None,
        })
        .collect();
    assert!(notes[0].contains("early stopping at step 3"), "{notes:?}");
    assert!(notes[1].contains("step 1"), "{notes:?}");
    let out = f.root.join("best");
    assert_eq!(checkpoint_steps(&out), [1, 3]);
    assert_eq!(adapter(&out), adapter(&out.join("checkpoint-1")));
    assert_ne!(adapter(&out), adapter(&out.join("checkpoint-3")));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
            .unwrap();
    assert!((state["best_metric"].as_f64().unwrap() - evals[0]).abs() < 1e-9);
    assert!(
        state["best_model_checkpoint"]
            .as_str()
            .unwrap()
            .ends_with("checkpoint-1")
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval_results.json")).unwrap())
            .unwrap();
    assert!((results["eval_loss"].as_f64().unwrap() - evals[0]).abs() < 1e-3);
}

/// The best checkpoint and the patience count survive a stop and resume: stopped after step 2, the resumed run
/// still stops after step 3 and ends with checkpoint-1's weights, as the uninterrupted run.
#[test]
fn early_stopping_resumes_with_its_best_and_patience() {
    let f = fixture(12);
    let opts = [
        "max_steps: 10",
        "val_size: 0.25",
        "eval_strategy: steps",
        "eval_steps: 1",
        "save_steps: 1",
        "load_best_model_at_end: true",
        "greater_is_better: true",
        "early_stopping_steps: 2",
    ];
    let (r, _) = run(&preset(&f, "straight", &opts), &[]);
    r.unwrap();
    let split = preset(&f, "split", &opts);
    let (r, _) = run(&split, &[(2, TrainCommand::Stop { save: true })]);
    assert!(matches!(r.unwrap(), Outcome::Stopped(_)));
    let (r, events) = run(&split, &[]);
    match r.unwrap() {
        Outcome::Finished(s) => assert_eq!(s.steps, 3),
        other => panic!("{other:?}"),
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, TrainEvent::Note(n) if n.contains("early stopping at step 3")))
    );
    let (a, b) = (f.root.join("straight"), f.root.join("split"));
    assert_eq!(adapter(&a), adapter(&b));
    assert_eq!(adapter(&b), adapter(&b.join("checkpoint-1")));
}

/// LoRA+ (`loraplus_lr_ratio`): lora_B learns at learning_rate × the ratio. Adam's first step moves each entry by
/// its learning rate (m̂/√v̂ = ±1), and lora_A not at all (its gradient is 0 while B = 0): so after one step every
/// lora_B entry is ±lr·ratio, and ±lr without LoRA+.
#[test]
fn loraplus_gives_lora_b_the_ratio_of_the_learning_rate() {
    let f = fixture(4);
    let mut max_b = Vec::new();
    for (out, extra) in [("plain", &[][..]), ("plus", &["loraplus_lr_ratio: 16"][..])] {
        let loaded = preset(&f, out, &[&["max_steps: 1"][..], extra].concat());
        let (r, _) = run(&loaded, &[]);
        r.unwrap();
        let mut b_max = 0f32;
        for (name, v) in adapter(&f.root.join(out)) {
            let m = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            if name.ends_with("lora_B.weight") {
                b_max = b_max.max(m);
            }
        }
        max_b.push(b_max);
    }
    assert!((max_b[0] - 1e-2).abs() < 1e-5, "{max_b:?}");
    assert!((max_b[1] - 16e-2).abs() < 1e-4, "{max_b:?}");
}

/// `use_muon`: LLaMA-Factory's split (LoRA's A and B all Muon; a full run's embedding and norms AdamW, its hidden
/// matrices Muon), said at the start; the run trains (the loss falls on a small set) and differs from AdamW's.
#[test]
fn muon_trains_lora_and_full_runs() {
    let f = fixture(4);
    for (tag, extra) in [("lora", &[][..]), ("full", &["finetuning_type: full"][..])] {
        let train = |out: &str, muon: bool| {
            let mut options = vec!["max_steps: 6", "learning_rate: 2.0e-2"];
            options.extend_from_slice(extra);
            if muon {
                options.push("use_muon: true");
            }
            run(&preset(&f, out, &options), &[])
        };
        let (r, events) = train(&format!("muon-{tag}"), true);
        r.unwrap();
        let said = events
            .iter()
            .find_map(|e| match e {
                TrainEvent::Loading { what } if what.starts_with("optimizer: Muon") => {
                    Some(what.clone())
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("{tag}: the optimizer line is missing"));
        let counts: Vec<usize> = said.split(' ').filter_map(|w| w.parse().ok()).collect();
        assert!(counts[0] > 0, "{tag}: {said}");
        assert_eq!(counts[1] == 0, tag == "lora", "{tag}: {said}");
        let muon = losses(&events);
        assert!(muon[5] < 0.8 * muon[0], "{tag}: {muon:?}");
        let (r, events) = train(&format!("adamw-{tag}"), false);
        r.unwrap();
        let adamw = losses(&events);
        assert!(
            (muon[5] - adamw[5]).abs() > 1e-3,
            "{tag}: {muon:?} vs {adamw:?}"
        );
    }
    // LoRA+ picks the optimizer too: refused together, naming both.
    let text = "model_name_or_path: m\ndataset: toy\ntemplate: chatml\nuse_muon: true\nloraplus_lr_ratio: 16\n";
    let err = format!(
        "{:?}",
        config::parse(text, &[], Purpose::Train).unwrap_err()
    );
    assert!(
        err.contains("use_muon") && err.contains("loraplus_lr_ratio"),
        "{err}"
    );
}

#[test]
fn a_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint() {
    let f = fixture(6);
    // An absurd learning rate blows the weights up within a few steps.
    let loaded = preset(
        &f,
        "boom",
        &[
            "max_steps: 30",
            "save_steps: 1",
            "learning_rate: 1.0e+30",
            "max_grad_norm: 0.0",
        ],
    );
    let (result, _) = run(&loaded, &[]);
    let err = result.expect_err("the run must fail");
    let msg = err.to_string();
    assert!(msg.contains("training stopped"), "{msg}");
    assert!(msg.contains("learning_rate"), "{msg}");
    let (step, dir) =
        termtune::trainer::checkpoint::latest_checkpoint(&f.root.join("boom")).unwrap();
    assert!(step >= 1);
    // The kept checkpoint is a loadable PEFT adapter.
    termtune::engine::adapter::read_adapter(&dir, &Device::Cpu).unwrap();
}

#[test]
fn an_unwritable_output_dir_fails_before_training() {
    let f = fixture(2);
    let blocker = f.root.join("file");
    std::fs::write(&blocker, "x").unwrap();
    let loaded = preset(&f, "file/run", &["max_steps: 1"]);
    let (result, events) = run(&loaded, &[]);
    let msg = result.err().unwrap().to_string();
    assert!(msg.contains("output_dir"), "{msg}");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, TrainEvent::Started { .. }))
    );
}

/// Training with the trainer's optimizer changes only the adapter: every base weight (embeddings,
/// norms, every linear) stays bit-identical, and every LoRA tensor moves.
#[test]
fn training_changes_only_the_adapter() {
    use termtune::engine::{AttnMask, Finetune, LoraSpec, LoraTargets, Model};
    use termtune::trainer::optim::{AdamW, AdamWConfig, Param};
    let f = fixture(2);
    let files = termtune::engine::weights::load_hf_folder(
        &f.root.join("model"),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: LoraTargets::All,
        use_rslora: false,
        use_dora: false,
        seed: 1,
        init: Default::default(),
    };
    let model = Model::from_files(
        &files,
        candle_core::DType::F32,
        &Device::Cpu,
        &Finetune::Lora(spec),
    )
    .unwrap();
    let snapshot = |m: &Model| -> Vec<Vec<f32>> {
        let mut all = vec![
            m.embed
                .tensor()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        ];
        all.push(
            m.norm
                .tensor()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
        for l in &m.layers {
            all.push(
                l.input_norm
                    .tensor()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            for lin in l.linears() {
                all.push(
                    lin.weight
                        .tensor()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                );
            }
        }
        all
    };
    let base_before = snapshot(&model);
    let vars = model.trainable_vars();
    let lora_before: Vec<Vec<f32>> = vars
        .iter()
        .map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect();
    let params = vars
        .iter()
        .map(|(name, var)| Param {
            name: name.clone(),
            var: var.clone(),
            decay: true,
            lr_scale: 1.0,
        })
        .collect();
    let mut opt = AdamW::new(params, AdamWConfig::default()).unwrap();
    let x = Tensor::new(&[[5u32, 6, 7, 8, 9, 10, 11, 12]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[[5i64, 6, 7, 8, 9, 10, 11, 12]], &Device::Cpu).unwrap();
    for _ in 0..3 {
        let (s, n) = model.forward_loss(&x, &AttnMask::Causal, &y, true).unwrap();
        let g = (s / n as f64).unwrap().backward().unwrap();
        opt.step(&g, 1e-2).unwrap();
    }
    assert_eq!(base_before, snapshot(&model), "a base weight changed");
    assert_eq!(vars.len(), lora_before.len());
    for ((name, v), before) in vars.iter().zip(&lora_before) {
        let after = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(&after, before, "{name} did not move");
    }
}

#[test]
fn pretraining_on_raw_text_with_packing_trains() {
    let f = fixture(2);
    let texts: Vec<serde_json::Value> = (0..12)
        .map(|i| serde_json::json!({"text": format!("paragraph {i}: {}", "the quick brown fox ".repeat(i % 5 + 2))}))
        .collect();
    std::fs::write(
        f.root.join("data/text.json"),
        serde_json::to_string(&texts).unwrap(),
    )
    .unwrap();
    std::fs::write(
        f.root.join("data/dataset_info.json"),
        r#"{"toy": {"file_name": "toy.json"}, "text": {"file_name": "text.json", "columns": {"prompt": "text"}}}"#,
    )
    .unwrap();
    let loaded = preset(
        &f,
        "pt",
        &[
            "stage: pt",
            "dataset: text",
            "max_steps: 15",
            "cutoff_len: 32",
        ],
    );
    assert!(loaded.preset.packing_resolved());
    let (result, events) = run(&loaded, &[]);
    assert!(matches!(result.unwrap(), Outcome::Finished(_)));
    let l = losses(&events);
    assert!(l[14] < l[0], "{l:?}");
}

/// The real binary: SIGHUP (an SSH drop) does not stop training; Ctrl-C saves a checkpoint and
/// exits with 130.
#[test]
fn headless_train_survives_sighup_and_stops_cleanly_on_ctrl_c() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let f = fixture(8);
    let out = f.root.join("sig");
    let preset_path = f.root.join("preset.yaml");
    std::fs::write(
        &preset_path,
        format!(
            "model_name_or_path: {}\ndataset: toy\ndataset_dir: {}\ntemplate: chatml\ncutoff_len: 64\n\
             output_dir: {}\nlogging_steps: 1\nsave_steps: 100000\nper_device_train_batch_size: 2\n\
             max_steps: 100000\nlearning_rate: 1.0e-3\ntokenized_path: {}\n",
            f.root.join("model").display(),
            f.root.join("data").display(),
            out.display(),
            f.root.join("tokcache").display(),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_termtune"))
        .arg("train")
        .arg(&preset_path)
        .env("TERMTUNE_CACHE", f.root.join("cache"))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut wait_for = |needle: &str| -> String {
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line.contains(needle) {
                return line;
            }
        }
        panic!("the run ended before {needle:?}");
    };
    wait_for("step 3/");
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait_for("step 20/");
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait_for("checkpoint for step");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let (step, dir) = termtune::trainer::checkpoint::latest_checkpoint(&out).unwrap();
    assert!(step >= 20);
    termtune::engine::adapter::read_adapter(&dir, &Device::Cpu).unwrap();
}

#[test]
fn checkpointing_off_and_a_thread_cap_train_the_same_adapter() {
    // Gradient checkpointing is on by default (LLaMA-Factory); turning it off, or running in a one-thread pool
    // (`num_threads: 1`, events relayed from the pool), changes speed and memory, not the numbers.
    let f = fixture(4);
    let steps = ["max_steps: 3"];
    let runs = [
        ("ckpt", vec![]),
        ("keep", vec!["disable_gradient_checkpointing: true"]),
        ("one", vec!["num_threads: 1"]),
    ];
    let mut results = Vec::new();
    for (out, extra) in &runs {
        let mut args: Vec<&str> = steps.to_vec();
        args.extend(extra.iter().copied());
        let loaded = preset(&f, out, &args);
        let (r, ev) = run(&loaded, &[]);
        r.unwrap();
        assert!(
            ev.iter()
                .any(|e| matches!(e, TrainEvent::Finished(_) | TrainEvent::Started { .. })),
            "{out}: the relay delivers events"
        );
        results.push((losses(&ev), adapter(&f.root.join(out))));
    }
    let (l0, w0) = &results[0];
    assert_eq!(l0.len(), 3);
    assert_eq!(runs.len(), results.len());
    for ((out, _), (l, w)) in runs.iter().zip(&results).skip(1) {
        assert_eq!(l.len(), l0.len(), "{out}: every step's loss arrives");
        assert_eq!(w.len(), w0.len(), "{out}: the same adapter tensors");
        for (a, b) in l0.iter().zip(l) {
            assert!(
                (a - b).abs() < 1e-5 * a.abs().max(1.0),
                "{out}: losses {l0:?} vs {l:?}"
            );
        }
        for ((na, va), (nb, vb)) in w0.iter().zip(w) {
            assert_eq!(na, nb);
            assert_eq!(va.len(), vb.len(), "{out} {na}");
            let max = va
                .iter()
                .zip(vb)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(max < 1e-5, "{out} {na}: {max}");
        }
    }
}

fn checkpoint_steps(out: &Path) -> Vec<u64> {
    termtune::trainer::checkpoint::list_checkpoints(out)
        .iter()
        .map(|c| c.0)
        .collect()
}

fn saved_steps(events: &[TrainEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::CheckpointSaved { step, .. } => Some(*step),
            _ => None,
        })
        .collect()
}

/// As the Hugging Face Trainer: with `save_strategy: steps` the last step is saved too, once, and
/// `save_total_limit` still rotates.
#[test]
fn the_last_step_is_checkpointed_like_the_hf_trainer() {
    let f = fixture(6);
    let loaded = preset(&f, "even", &["max_steps: 4", "save_steps: 2"]);
    let (r, events) = run(&loaded, &[]);
    assert!(matches!(r.unwrap(), Outcome::Finished(_)));
    assert_eq!(checkpoint_steps(&f.root.join("even")), [2, 4]);
    assert_eq!(saved_steps(&events), [2, 4], "step 4 saved once");

    let loaded = preset(
        &f,
        "odd",
        &["max_steps: 5", "save_steps: 2", "save_total_limit: 2"],
    );
    let (r, events) = run(&loaded, &[]);
    r.unwrap();
    assert_eq!(saved_steps(&events), [2, 4, 5]);
    assert_eq!(checkpoint_steps(&f.root.join("odd")), [4, 5]);

    let loaded = preset(&f, "none", &["max_steps: 2", "save_strategy: \"no\""]);
    let (r, events) = run(&loaded, &[]);
    r.unwrap();
    assert!(saved_steps(&events).is_empty());
    assert!(checkpoint_steps(&f.root.join("none")).is_empty());
}

/// Every file of the run folder (checkpoints included) has the mode a plain `File::create` gives here (0666
/// less the umask): the safetensors files too, which the safetensors crate alone makes owner-only.
#[cfg(unix)]
#[test]
fn run_folder_files_follow_the_umask() {
    use std::os::unix::fs::PermissionsExt as _;
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let f = fixture(4);
    let loaded = preset(&f, "run", &["max_steps: 2", "save_steps: 1"]);
    run(&loaded, &[]).0.unwrap();
    let probe = f.root.join("probe");
    std::fs::File::create(&probe).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let expected = mode(&probe);
    let mut files = Vec::new();
    walk(&f.root.join("run"), &mut files);
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for must in [
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(
            names.iter().filter(|n| *n == must).count() >= 2,
            "{must}: {names:?}"
        );
    }
    for p in &files {
        assert_eq!(
            mode(p),
            expected,
            "{}: {:o} instead of {expected:o}",
            p.display(),
            mode(p)
        );
    }
}

/// A full disk while writing a checkpoint: the error names the file, the checkpoint's size and the free space,
/// and says what to do; the last good checkpoint stays whole and nothing half-written is left.
#[test]
fn a_full_disk_names_the_file_the_sizes_and_the_fix() {
    use termtune::fsutil::SimulatedDisk;
    let f = fixture(6);
    let out = f.root.join("full");
    let loaded = preset(
        &f,
        "full",
        &["max_steps: 4", "save_steps: 1", "save_total_limit: 3"],
    );
    let disk = SimulatedDisk::new(&out, 1 << 30);
    let (tx, rx) = mpsc::channel::<TrainCommand>();
    let mut paused = false;
    let result = run_training(&loaded, &Device::Cpu, &rx, &mut |ev| match ev {
        TrainEvent::CheckpointSaved { step: 1, .. } => disk.set_free(1000), // full before checkpoint-2
        // The run waits for room; the user stops it instead.
        TrainEvent::Paused => {
            paused = true;
            tx.send(TrainCommand::Stop { save: true }).unwrap();
        }
        _ => {}
    });
    assert!(paused, "a full disk pauses the run first");
    drop(tx);
    let err = result.expect_err("the save of checkpoint-2 must fail");
    assert!(matches!(err, TrainError::DiskFull(_)), "{err:?}");
    let msg = err.to_string();
    for part in [
        "no space left on device while writing ",
        "adapter_model.safetensors (",
        "checkpoint-2 needs about ",
        &format!("the file system of {} has 1.0 kB free", out.display()),
        &format!(
            "the last good checkpoint {} (step 1) is intact",
            out.join("checkpoint-1").display()
        ),
        "Free some space there, or lower `save_total_limit` (now 3)",
    ] {
        assert!(msg.contains(part), "{part:?} missing in: {msg}");
    }
    assert_eq!(checkpoint_steps(&out), [1]);
    let (_, dir) = termtune::trainer::checkpoint::latest_checkpoint(&out).unwrap();
    termtune::engine::adapter::read_adapter(&dir, &Device::Cpu).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A full disk while saving checkpoint-2 pauses the run with its state in memory; once room is
/// made and it is told to resume, it saves and trains on, and ends exactly as a run that never
/// met a full disk (same losses, same checkpoints, same adapter).
#[test]
fn a_run_paused_on_a_full_disk_resumes_when_room_is_made_and_ends_as_if_nothing_happened() {
    use termtune::fsutil::SimulatedDisk;
    let f = fixture(6);
    let keys = ["max_steps: 4", "save_steps: 1", "lr_scheduler_type: cosine"];
    let (r, straight) = run(&preset(&f, "roomy", &keys), &[]);
    r.unwrap();
    let out = f.root.join("tight");
    let loaded = preset(&f, "tight", &keys);
    let disk = SimulatedDisk::new(&out, 1 << 30);
    let (tx, rx) = mpsc::channel::<TrainCommand>();
    let mut events = Vec::new();
    let result = run_training(&loaded, &Device::Cpu, &rx, &mut |ev| {
        match &ev {
            TrainEvent::CheckpointSaved { step: 1, .. } => disk.set_free(1000),
            TrainEvent::Paused => {
                // While paused, nothing was written: checkpoint-2 is not there, half or whole.
                assert_eq!(checkpoint_steps(&out), [1]);
                disk.set_free(1 << 30); // the user makes room
                tx.send(TrainCommand::Resume).unwrap();
            }
            _ => {}
        }
        events.push(ev);
    });
    assert!(matches!(result.unwrap(), Outcome::Finished(_)));
    let warning = events
        .iter()
        .find_map(|e| match e {
            TrainEvent::Warning(w) if w.contains("no space left") => Some(w.clone()),
            _ => None,
        })
        .expect("the full disk is told");
    assert!(
        warning.contains("paused with its state in memory"),
        "{warning}"
    );
    let order: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Paused => Some("paused"),
            TrainEvent::Resumed => Some("resumed"),
            TrainEvent::CheckpointSaved { step: 2, .. } => Some("checkpoint-2"),
            _ => None,
        })
        .collect();
    assert_eq!(order, ["paused", "resumed", "checkpoint-2"]);
    assert_eq!(losses(&events), losses(&straight));
    assert_eq!(saved_steps(&events), saved_steps(&straight));
    assert_eq!(checkpoint_steps(&out), [1, 2, 3, 4]);
    assert_eq!(adapter(&out), adapter(&f.root.join("roomy")));
}

/// `termtune check`'s disk section: a warning when output_dir's file system cannot hold two checkpoints.
#[test]
fn check_warns_when_the_output_disk_cannot_hold_two_checkpoints() {
    use termtune::fsutil::SimulatedDisk;
    let f = fixture(2);
    let loaded = preset(&f, "checked", &["lora_rank: 8"]);
    let out = f.root.join("checked");
    let disk = SimulatedDisk::new(&out, 10_000);
    let text = termtune::commands::disk_report(&loaded.preset);
    assert!(text.contains("# disk (estimate)"), "{text}");
    assert!(
        text.contains(&format!("warning: {} has 10.0 kB free", out.display())),
        "{text}"
    );
    assert!(text.contains("less than two checkpoints"), "{text}");
    disk.set_free(1 << 40);
    let text = termtune::commands::disk_report(&loaded.preset);
    assert!(!text.contains("warning"), "{text}");
    assert!(text.contains("room for "), "{text}");
}

/// `compute_accuracy`: eval_accuracy is LLaMA-Factory's per-example token accuracy (argmax at position i
/// against the label at i + 1, −100 ignored), averaged over the examples — recomputed here from the final
/// adapter's logits on the same evaluation rows.
#[test]
fn compute_accuracy_reports_lfs_token_accuracy() {
    use candle_core::{D, DType};
    let f = fixture(12);
    let loaded = preset(
        &f,
        "acc",
        &[
            "max_steps: 3",
            "val_size: 4",
            "compute_accuracy: true",
            "per_device_eval_batch_size: 3",
        ],
    );
    let (result, _) = run(&loaded, &[]);
    result.unwrap();
    let out = f.root.join("acc");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval_results.json")).unwrap())
            .unwrap();
    let reported = results["eval_accuracy"].as_f64().unwrap();
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
            .unwrap();
    assert_eq!(all["eval_accuracy"].as_f64(), Some(reported));
    let state = std::fs::read_to_string(out.join("trainer_state.json")).unwrap();
    assert!(state.contains("\"eval_accuracy\""), "{state}");

    // The same rows, the final adapter merged, the accuracy counted by hand.
    let p = &loaded.preset;
    let opts = termtune::resolve::data_options(p);
    let chat = termtune::engine::generate::load_chat_model(
        &f.root.join("model"),
        std::slice::from_ref(&out),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let enc = termtune::data::Encoder::new(&opts, &chat.tokenizer, &chat.tokenizer_config).unwrap();
    let data = termtune::data::prepare_dataset(&opts, &enc).unwrap();
    assert_eq!(data.eval.len(), 4);
    let mut per_example = Vec::new();
    for seq in &data.eval {
        let ids = Tensor::new(seq.input_ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = chat
            .model
            .forward(&ids, &termtune::engine::AttnMask::Causal, false)
            .unwrap();
        let preds: Vec<u32> = logits
            .argmax(D::Minus1)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let (mut hit, mut total) = (0.0, 0.0);
        for j in 1..seq.input_ids.len() {
            if seq.labels[j] >= 0 {
                total += 1.0;
                if i64::from(preds[j - 1]) == seq.labels[j] {
                    hit += 1.0;
                }
            }
        }
        per_example.push(hit / total);
    }
    let want = per_example.iter().sum::<f64>() / per_example.len() as f64;
    assert!((reported - want).abs() < 1e-9, "{reported} vs {want}");
}

/// Freeze and full fine-tuning leave model folders, as `save_pretrained` writes them: config.json (the model's, in
/// the saved weights' dtype) and generation_config.json beside model.safetensors, in the run folder and in each
/// checkpoint, so termtune (`model_name_or_path`) and transformers load them; the tokenizer_config.json keeps the
/// model's own keys (add_bos_token, model_max_length) with the template's chat template and training's right padding.
#[test]
fn freeze_and_full_runs_are_model_folders() {
    use termtune::engine::weights::load_hf_folder;
    use termtune::engine::{AttnMask, Finetune, Model};
    let f = fixture(8);
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let source = read(&f.root.join("model/config.json"));
    let logits = |dir: &Path| -> Vec<f32> {
        let files = load_hf_folder(dir, candle_core::DType::F32, &Device::Cpu).unwrap();
        let m = Model::from_files(
            &files,
            candle_core::DType::F32,
            &Device::Cpu,
            &Finetune::Frozen,
        )
        .unwrap();
        let x = Tensor::from_vec((3..19u32).collect::<Vec<_>>(), (1, 16), &Device::Cpu).unwrap();
        let l = m.forward(&x, &AttnMask::Causal, false).unwrap();
        l.flatten_all().unwrap().to_vec1().unwrap()
    };
    let base = logits(&f.root.join("model"));
    for (out, extra) in [
        ("full", &["finetuning_type: full"][..]),
        (
            "freeze",
            &["finetuning_type: freeze", "freeze_trainable_layers: 1"][..],
        ),
    ] {
        let loaded = preset(
            &f,
            out,
            &[extra, &["max_steps: 2", "save_steps: 2"]].concat(),
        );
        let (r, _) = run(&loaded, &[]);
        r.unwrap();
        let dir = f.root.join(out);
        for d in [dir.clone(), dir.join("checkpoint-2")] {
            let mut config = read(&d.join("config.json"));
            assert_eq!(config["torch_dtype"], "float32", "{out}");
            assert_eq!(config["dtype"], "float32", "{out}");
            let map = config.as_object_mut().unwrap();
            for k in ["torch_dtype", "dtype", "use_cache"] {
                map.remove(k);
            }
            let mut want = source.clone();
            for k in ["torch_dtype", "dtype", "use_cache"] {
                want.as_object_mut().unwrap().remove(k);
            }
            assert_eq!(config, want, "{out}: the model's config.json");
            assert!(d.join("generation_config.json").is_file(), "{out}");
        }
        // Named as an adapter by mistake, the folder says what it is and how to use it.
        let e = termtune::engine::adapter::read_adapter(&dir, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("model folder") && e.contains("model_name_or_path"),
            "{e}"
        );
        let trained = logits(&dir);
        assert_eq!(trained, logits(&dir.join("checkpoint-2")), "{out}");
        let moved = trained
            .iter()
            .zip(&base)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            moved > 1e-4,
            "{out}: the saved weights are the trained ones ({moved})"
        );
        let tok = read(&dir.join("tokenizer_config.json"));
        let src_tok = read(&f.root.join("model/tokenizer_config.json"));
        for k in ["model_max_length", "add_bos_token", "tokenizer_class"] {
            assert_eq!(tok[k], src_tok[k], "{out}: tokenizer_config.json keeps {k}");
        }
        // chatml replaces the tokenizer's own template, as LLaMA-Factory's fix_jinja_template does.
        assert!(
            tok["chat_template"].as_str().is_some_and(
                |t| t.contains("<|im_start|>assistant") && t != src_tok["chat_template"]
            ),
            "{out}: {}",
            tok["chat_template"]
        );
        assert_eq!(tok["padding_side"], "right");
    }
}

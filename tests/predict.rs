//! `termtune predict` on the tiny seeded model, through the real binary: LLaMA-Factory's files and keys, the
//! batched greedy answers equal `termtune chat`'s one by one, the metrics equal the mean of each row's scores,
//! `all_results.json` keeps what was there, and presets that cannot predict are refused with the key named.

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use serde_json::{Value, json};
use termtune::chat::ChatSession;
use termtune::config::{self, Purpose};
use termtune::predict::metrics;

use crate::tiny_util::{tiny_model_and_toy_data, varied_rows};

fn preset_text(root: &Path, extra: &str) -> String {
    format!(
        "model_name_or_path: {}\ntemplate: chatml\ndataset_dir: {}\neval_dataset: toy\noutput_dir: {}\ndo_predict: true\npredict_with_generate: true\ndo_sample: false\nmax_new_tokens: 6\ncutoff_len: 64\nper_device_eval_batch_size: 2\n{extra}",
        root.join("model").display(),
        root.join("data").display(),
        root.join("out").display(),
    )
}

fn predict(preset: &Path, overrides: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_termtune"))
        .arg("predict")
        .arg(preset)
        .args(overrides)
        .output()
        .unwrap()
}

#[test]
fn predict_writes_lf_files_and_answers_as_chat_does() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let mut rows = varied_rows(5);
    // A broken row is skipped and counted, not fatal.
    rows.push(json!({"instruction": 7}));
    tiny_model_and_toy_data(root, &rows);
    let preset = root.join("predict.yaml");
    std::fs::write(&preset, preset_text(root, "")).unwrap();
    let out_dir = root.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("all_results.json"), r#"{"train_loss": 1.5}"#).unwrap();

    let out = predict(&preset, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stderr}\n{stdout}");
    assert!(stdout.contains("predict_rouge-1"), "{stdout}");
    assert!(stderr.contains("1 row(s) skipped"), "{stderr}");
    assert!(stderr.contains("5 examples in batches of 2"), "{stderr}");

    let lines: Vec<Value> = std::fs::read_to_string(out_dir.join("generated_predictions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    // The same answers as chat gives each instruction alone (greedy), and LF's keys.
    let loaded = config::load(&preset, &[], Purpose::Chat).unwrap();
    let mut session = ChatSession::load(&loaded.preset, &Device::Cpu, &mut |_| {}).unwrap();
    let mut scores = Vec::new();
    for (line, row) in lines.iter().zip(&rows) {
        let keys: Vec<&String> = line.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["prompt", "predict", "label"], "LF's order");
        let instruction = row["instruction"].as_str().unwrap();
        let prompt = line["prompt"].as_str().unwrap();
        assert!(
            prompt.contains("<|im_start|>user") && prompt.contains(instruction),
            "{prompt}"
        );
        assert_eq!(
            line["label"].as_str().unwrap().trim_end(),
            row["output"].as_str().unwrap()
        );
        session.clear();
        let chat = session
            .answer(instruction, None, |_| std::ops::ControlFlow::Continue(()))
            .unwrap();
        let predicted = line["predict"].as_str().unwrap();
        assert_eq!(predicted, chat.text, "{instruction}");
        scores.push(metrics::scores(predicted, line["label"].as_str().unwrap()));
    }
    // The metrics are the mean of each row's scores, under LF's names; the HF Trainer's speed keys beside.
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("predict_results.json")).unwrap(),
    )
    .unwrap();
    let mean = metrics::mean(&scores);
    for (key, want) in [
        ("predict_rouge-1", mean.rouge1),
        ("predict_rouge-2", mean.rouge2),
        ("predict_rouge-l", mean.rouge_l),
        ("predict_bleu-4", mean.bleu4),
    ] {
        let got = results[key].as_f64().unwrap();
        assert!((got - want).abs() < 1e-9, "{key}: {got} vs {want}");
    }
    for key in [
        "predict_runtime",
        "predict_samples_per_second",
        "predict_steps_per_second",
    ] {
        assert!(results[key].as_f64().unwrap() > 0.0, "{key}");
    }
    let all: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("all_results.json")).unwrap())
            .unwrap();
    assert_eq!(all["train_loss"], json!(1.5));
    assert_eq!(all["predict_bleu-4"], results["predict_bleu-4"]);

    // Batch size 1 gives the same predictions (left padding changes nothing).
    let out1 = root.join("out1");
    let dir_arg = format!("output_dir={}", out1.display());
    let out = predict(&preset, &["per_device_eval_batch_size=1", &dir_arg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let one_by_one: Vec<Value> = std::fs::read_to_string(out1.join("generated_predictions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(one_by_one, lines);
}

#[test]
fn presets_that_cannot_predict_name_the_key() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    tiny_model_and_toy_data(root, &varied_rows(2));
    let preset = root.join("p.yaml");
    let text = preset_text(root, "").replace("eval_dataset: toy\n", "");
    std::fs::write(&preset, text).unwrap();
    let out = predict(&preset, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("eval_dataset"), "{stderr}");

    std::fs::write(&preset, preset_text(root, "")).unwrap();
    let out = predict(&preset, &["predict_with_generate=false"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("predict_with_generate"), "{stderr}");
}

#[test]
fn train_with_do_predict_predicts_with_the_trained_adapter() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    tiny_model_and_toy_data(root, &varied_rows(6));
    let preset = root.join("train.yaml");
    let text = preset_text(root, "")
        + "dataset: toy\nmax_steps: 2\nper_device_train_batch_size: 2\nlearning_rate: 1.0e-2\nlora_rank: 4\nseed: 3\nmax_samples: 3\n";
    std::fs::write(&preset, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_termtune"))
        .arg("train")
        .arg(&preset)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("do_predict: predicting with the trained model"),
        "{stderr}"
    );
    let out_dir = root.join("out");
    assert!(out_dir.join("adapter_model.safetensors").is_file());
    let lines = std::fs::read_to_string(out_dir.join("generated_predictions.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3);
    // The predictions are the trained adapter's: chat with it gives the same first answer.
    let first: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    let adapter = format!("adapter_name_or_path={}", out_dir.display());
    let loaded = config::load(&preset, &[adapter], Purpose::Chat).unwrap();
    let mut session = ChatSession::load(&loaded.preset, &Device::Cpu, &mut |_| {}).unwrap();
    let chat = session
        .answer("say 0 abc", None, |_| std::ops::ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(first["predict"].as_str().unwrap(), chat.text);
    let all: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("all_results.json")).unwrap())
            .unwrap();
    assert!(all.get("predict_rouge-l").is_some(), "{all}");
}

#[test]
fn predict_on_lf_demo_data_writes_lf_files() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    tiny_model_and_toy_data(root, &varied_rows(1));
    let lf = crate::data_util::lf_data_dir();
    let preset = root.join("predict.yaml");
    std::fs::write(&preset, preset_text(root, "")).unwrap();
    let data_arg = format!("dataset_dir={}", lf.display());
    let out = predict(
        &preset,
        &[
            &data_arg,
            "eval_dataset=alpaca_en_demo,identity",
            "max_samples=3",
            "cutoff_len=4096",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let out_dir = root.join("out");
    let mut files: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "all_results.json",
            "generated_predictions.jsonl",
            "predict_results.json"
        ]
    );
    // max_samples of each dataset, in order; the labels are the data's answers (cutoff_len leaves them whole).
    let alpaca: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(lf.join("alpaca_en_demo.json")).unwrap())
            .unwrap();
    let lines: Vec<Value> = std::fs::read_to_string(out_dir.join("generated_predictions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    for (line, row) in lines.iter().zip(&alpaca).take(3) {
        assert_eq!(
            line["label"].as_str().unwrap().trim_end(),
            row["output"].as_str().unwrap().trim_end()
        );
        let prompt = line["prompt"].as_str().unwrap();
        let instruction = row["instruction"].as_str().unwrap();
        assert!(prompt.contains(instruction), "{prompt:?} / {instruction:?}");
    }
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("predict_results.json")).unwrap(),
    )
    .unwrap();
    let keys: Vec<&String> = results.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "predict_bleu-4",
            "predict_rouge-1",
            "predict_rouge-2",
            "predict_rouge-l",
            "predict_runtime",
            "predict_samples_per_second",
            "predict_steps_per_second"
        ]
    );
}

//! One broken preset per rule in tests/fixtures/presets/, run through the real binary
//! (`termtune check`), asserting the message a user sees (bottom's invalid_config_tests pattern).

use std::path::Path;
use std::process::Command;

fn check(fixture: &str) -> (i32, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/presets")
        .join(fixture);
    assert!(path.exists(), "missing fixture {}", path.display());
    let out = Command::new(env!("CARGO_BIN_EXE_termtune"))
        .arg("check")
        .arg(&path)
        .env(
            "TERMTUNE_CACHE",
            std::env::temp_dir().join("termtune-test-cache"),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

/// (fixture, expected fragments of stderr)
const CASES: &[(&str, &[&str])] = &[
    (
        "invalid_unknown_key.yaml",
        &[
            "invalid_unknown_key.yaml:3:15:",
            "unknown key `learning_rat`",
            "did you mean `learning_rate`?",
        ],
    ),
    (
        "invalid_type.yaml",
        &[
            "invalid_type.yaml:3:12:",
            "`lora_rank`",
            "expected a whole number",
            "\"eight\"",
        ],
    ),
    (
        "invalid_yaml_syntax.yaml",
        &["invalid_yaml_syntax.yaml:3:", "not valid YAML"],
    ),
    (
        "invalid_not_mapping.yaml",
        &["a preset is a mapping of `key: value` lines, found a list"],
    ),
    (
        "invalid_unsupported_key.yaml",
        &[
            "invalid_unsupported_key.yaml:3:13:",
            "`use_galore: true` is not supported yet",
            "GaLore",
            "remove the key (or set it to false)",
        ],
    ),
    (
        "invalid_quantization.yaml",
        &[
            ":3:19:",
            "`quantization_bit` must be 4 or 8 (bitsandbytes), got 3",
        ],
    ),
    (
        "invalid_stage.yaml",
        &[
            ":2:8:",
            "`stage: ppo` is not supported yet",
            "sft",
            "pt",
            "dpo",
        ],
    ),
    (
        "invalid_enum_value.yaml",
        &[
            ":3:20:",
            "`lr_scheduler_type`",
            "unknown variant `cosin`",
            "cosine",
        ],
    ),
    (
        "invalid_missing_model.yaml",
        &["`model_name_or_path` is required"],
    ),
    (
        "invalid_missing_dataset.yaml",
        &["`dataset` is required to train"],
    ),
    (
        "invalid_mask_history_with_train_on_prompt.yaml",
        &[
            ":3:",
            "`mask_history` is incompatible with `train_on_prompt`",
        ],
    ),
    (
        "invalid_neat_packing_not_sft.yaml",
        &[":4:", "`neat_packing` is only valid for `stage: sft`"],
    ),
    (
        "invalid_rslora_without_lora.yaml",
        &[":4:", "`use_rslora` is only valid for LoRA training"],
    ),
    (
        "invalid_peft_variants_without_lora.yaml",
        &[
            ":4:",
            "`use_dora` is only valid for LoRA training",
            ":5:",
            "`loraplus_lr_ratio` is only valid for LoRA training",
            ":6:",
            "`neftune_noise_alpha` must be a number ≥ 0",
        ],
    ),
    (
        "invalid_loraplus_ratio.yaml",
        &[":3:", "`loraplus_lr_ratio` must be a positive number"],
    ),
    (
        "invalid_best_model.yaml",
        &[
            ":6:",
            "`save_steps` (25) must be a multiple of `eval_steps` (10)",
            ":8:",
            "`metric_for_best_model: bleu` is not a metric this run evaluates",
            ":9:",
            "`early_stopping_steps` must be at least 1",
        ],
    ),
    (
        "invalid_best_model_rm.yaml",
        &[
            ":6:",
            "`load_best_model_at_end` is not available for `stage: rm`",
        ],
    ),
    (
        "invalid_early_stopping_without_best.yaml",
        &[
            ":5:",
            "`early_stopping_steps` needs `load_best_model_at_end: true`",
        ],
    ),
    (
        "invalid_adapter_without_lora.yaml",
        &[
            ":2:",
            "`adapter_name_or_path` is only valid with `finetuning_type: lora`",
        ],
    ),
    (
        "invalid_streaming_without_max_steps.yaml",
        &[":4:", "`streaming: true` needs `max_steps`"],
    ),
    (
        "invalid_do_train_false.yaml",
        &[
            "invalid_do_train_false.yaml:3:11:",
            "`do_train: false` means no training",
            "set `do_train: true`",
        ],
    ),
    (
        "invalid_eval_without_split.yaml",
        &[":3:", "no validation split", "`val_size` or `eval_dataset`"],
    ),
    (
        "invalid_lora_dropout.yaml",
        &[":3:", "`lora_dropout` must be in [0, 1), got 1.5"],
    ),
    (
        "invalid_val_size.yaml",
        &[
            ":3:",
            "`val_size` must be a fraction in [0, 1) or a whole number",
        ],
    ),
    (
        "invalid_optimizer.yaml",
        &[
            ":3:",
            "`optim: paged_adamw_8bit` is not supported yet",
            "AdamW",
        ],
    ),
    (
        "invalid_scheduler_kwargs.yaml",
        &[
            "`lr_scheduler_kwargs`: `decay_type` must be linear, cosine or 1-sqrt",
            "`min_lr_rate` is not a setting of `warmup_stable_decay` (it takes num_decay_steps, num_stable_steps, min_lr_ratio, num_cycles, warmup_type, decay_type)",
            "`warmup_stable_decay` needs `lr_scheduler_kwargs: {num_decay_steps: N}`",
        ],
    ),
    (
        "invalid_cosine_min_lr.yaml",
        &["`cosine_with_min_lr` needs `lr_scheduler_kwargs: {min_lr_rate: 0.1}`"],
    ),
    (
        "invalid_label_smoothing_dpo.yaml",
        &[
            ":4:",
            "`label_smoothing_factor` smooths the language-model loss of sft and pt; stage `dpo` computes its own loss (TRL's), so it would have no effect: remove it",
        ],
    ),
    (
        "invalid_dft_with_smoothing.yaml",
        &[
            ":3:",
            "`use_dft_loss` replaces the loss, so `label_smoothing_factor` would be ignored (as in LLaMA-Factory): set one of them",
        ],
    ),
    (
        "invalid_freeze_modules.yaml",
        &[
            ":4:",
            "`freeze_trainable_modules`: unknown module `attention`; choose from all, self_attn, mlp",
            ":5:",
            "`freeze_extra_modules`: unknown module `vision_tower`; choose from embed_tokens, norm, lm_head",
            ":6:",
            "`rope_scaling: dynamic` is not supported",
        ],
    ),
    (
        "invalid_eaft.yaml",
        &[
            ":4:",
            "`use_dft_loss` and `use_eaft_loss` each replace the loss (LLaMA-Factory would silently use DFT): set one of them",
            ":5:",
            "`eaft_alpha` must be a number ≥ 0 (1.0 is LLaMA-Factory's default), got -1",
        ],
    ),
    (
        "invalid_bf16_and_fp16.yaml",
        &[":4:", "`bf16` and `fp16` cannot both be true"],
    ),
    (
        "invalid_lora_target.yaml",
        &[":3:", "\"v-proj\" is not a module name"],
    ),
];

#[test]
fn each_broken_preset_gets_its_message() {
    let mut failures = Vec::new();
    for (fixture, expected) in CASES {
        let (code, stderr) = check(fixture);
        if code != 2 {
            failures.push(format!("{fixture}: exit {code}, expected 2\n{stderr}"));
        }
        for fragment in *expected {
            if !stderr.contains(fragment) {
                failures.push(format!("{fixture}: missing {fragment:?} in:\n{stderr}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_fixture_is_covered() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/presets");
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name == "invalid_many_problems.yaml" {
            continue;
        }
        assert!(
            CASES.iter().any(|(f, _)| *f == name),
            "fixture {name} has no case"
        );
    }
}

#[test]
fn all_problems_are_reported_at_once_in_file_order() {
    let (code, stderr) = check("invalid_many_problems.yaml");
    assert_eq!(code, 2);
    assert!(stderr.contains("5 problems"), "{stderr}");
    let expected_in_order = [
        ":4:12: `lora_rank` must be at least 1",
        ":5:16: `learning_rate` must be > 0",
        ":6:30: `per_device_train_batch_size`: wrong type",
        ":7:15: `warmup_ratio` must be in [0, 1]",
        ":8:19: unknown key `lr_sheduler_type`; did you mean `lr_scheduler_type`?",
    ];
    let mut at = 0;
    for fragment in expected_in_order {
        let found = stderr[at..].find(fragment);
        assert!(
            found.is_some(),
            "{fragment:?} not found (in order) in:\n{stderr}"
        );
        at += found.unwrap();
    }
}

#[test]
fn missing_preset_file_names_the_path() {
    let out = Command::new(env!("CARGO_BIN_EXE_termtune"))
        .args(["check", "no/such/preset.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no/such/preset.yaml"), "{stderr}");
    assert!(stderr.contains("cannot read the preset"), "{stderr}");
}

#[test]
fn overrides_are_checked_like_file_keys() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("presets/quickstart.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_termtune"))
        .arg("check")
        .arg(&path)
        .args(["lora_rank=0", "learnin_rate=1e-4", "learning_rate=2e-4"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("command line: `lora_rank` must be at least 1"),
        "{stderr}"
    );
    assert!(
        stderr.contains("command line: unknown key `learnin_rate`; did you mean `learning_rate`?"),
        "{stderr}"
    );
}

#[test]
fn check_estimates_training_memory_from_config_json() {
    // A tiny model folder (no weights are read for the estimate) and a dataset: `check` prints the estimated
    // peak memory with and without gradient checkpointing, marking the preset's own setting.
    let dir = tempfile::tempdir().unwrap();
    crate::tiny_util::tiny_model_and_toy_data(dir.path(), &crate::tiny_util::varied_rows(4));
    let preset = dir.path().join("p.yaml");
    std::fs::write(
        &preset,
        format!(
            "model_name_or_path: {}\ndataset: toy\ndataset_dir: {}\ntemplate: chatml\ncutoff_len: 64\n\
             per_device_train_batch_size: 2\n",
            dir.path().join("model").display(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_termtune"))
        .args(["--device", "cpu", "check"])
        .arg(&preset)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("# memory (estimate, cpu in F32)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("gradient checkpointing on (this preset): "),
        "{stdout}"
    );
    assert!(stdout.contains("at batch 2 x cutoff_len 64"), "{stdout}");
}

#[test]
fn check_says_what_rope_scaling_does_and_warns_past_the_models_length() {
    // The tiny model has 512 positions: 1500 tokens need rope_scaling, which check then states; without it, a warning.
    let dir = tempfile::tempdir().unwrap();
    crate::tiny_util::tiny_model_and_toy_data(dir.path(), &crate::tiny_util::varied_rows(4));
    let check = |extra: &str| -> String {
        let preset = dir.path().join("p.yaml");
        std::fs::write(
            &preset,
            format!(
                "model_name_or_path: {}\ndataset: toy\ndataset_dir: {}\ntemplate: chatml\ncutoff_len: 1500\n{extra}",
                dir.path().join("model").display(),
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_termtune"))
            .args(["--device", "cpu", "check"])
            .arg(&preset)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let warned = check("");
    assert!(
        warned.contains(
            "# warning: cutoff_len 1500 exceeds the model's 512 positions; set rope_scaling"
        ),
        "{warned}"
    );
    let scaled = check("rope_scaling: yarn\n");
    assert!(
        scaled.contains("#   rope_scaling yarn: factor 3 (512 → 1536 positions)"),
        "{scaled}"
    );
    assert!(!scaled.contains("# warning: cutoff_len"), "{scaled}");
}

//! Every shipped preset parses and validates; LLaMA-Factory-style files load with only
//! "no effect" notes; load -> save -> load is the identity.

use std::path::{Path, PathBuf};

use termtune::config::{self, Purpose};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_preset_validates_for_training() {
    let files = yaml_files(&root().join("presets"));
    assert!(
        files.len() >= 5,
        "expected the shipped presets, found {files:?}"
    );
    for f in files {
        let loaded = config::load(&f, &[], Purpose::Train).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            loaded.notes.is_empty(),
            "{}: {:?}",
            f.display(),
            loaded.notes
        );
        // LLaMA-Factory trains only with `do_train: true`, and evaluates after training (as termtune does
        // with a validation split) only with `do_eval: true`.
        let says =
            |key: &str| loaded.passthrough.get(key) == Some(&serde_norway::Value::Bool(true));
        assert!(says("do_train"), "{} must say do_train: true", f.display());
        assert_eq!(
            says("do_eval"),
            loaded.preset.has_validation_split(),
            "{}: do_eval: true exactly when there is a validation split",
            f.display()
        );
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            text.starts_with("# "),
            "{} must open with a comment saying what it is for",
            f.display()
        );
        assert!(
            text.contains("Derived:"),
            "{} must state its derived numbers",
            f.display()
        );
        assert!(
            text.contains("Memory:"),
            "{} must state its rough memory",
            f.display()
        );
    }
}

#[test]
fn quickstart_uses_smollm2_and_the_products_demo_data() {
    let loaded =
        config::load(&root().join("presets/quickstart.yaml"), &[], Purpose::Train).unwrap();
    let p = &loaded.preset;
    assert_eq!(p.model_name_or_path, "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert_eq!(p.lora_rank, 8);
    assert_eq!(p.finetuning_type, config::FinetuningType::Lora);
    let info: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("data/dataset_info.json")).unwrap(),
    )
    .unwrap();
    for name in p.datasets() {
        assert!(
            info.get(&name).is_some(),
            "dataset {name} is not in data/dataset_info.json"
        );
    }
}

#[test]
fn llamafactory_example_files_load_with_only_no_effect_notes() {
    for f in yaml_files(&root().join("tests/fixtures/lf_examples")) {
        let loaded = config::load(&f, &[], Purpose::Train).unwrap_or_else(|e| panic!("{e}"));
        let noted: Vec<&str> = loaded.notes.iter().map(|n| n.key.as_str()).collect();
        assert!(
            noted.contains(&"preprocessing_num_workers"),
            "{}: preprocessing_num_workers should be noted as no effect: {noted:?}",
            f.display()
        );
        // `do_train: true` is read (and written back), not a note: termtune writes it itself.
        assert_eq!(
            loaded.passthrough.get("do_train"),
            Some(&serde_norway::Value::Bool(true)),
            "{}",
            f.display()
        );
        assert!(!noted.contains(&"do_train"), "{}: {noted:?}", f.display());
    }
    let loaded = config::load(
        &root().join("tests/fixtures/lf_examples/llama3_lora_sft.yaml"),
        &[],
        Purpose::Train,
    )
    .unwrap();
    let p = &loaded.preset;
    assert_eq!(p.template.as_deref(), Some("llama3"));
    assert_eq!(p.datasets(), ["identity", "alpaca_en_demo"]);
    assert!((p.learning_rate - 1e-4).abs() < 1e-12);
    assert_eq!(p.lora_alpha_resolved(), 16);
    assert_eq!(p.gradient_accumulation_steps, 8);
    assert_eq!(p.lr_scheduler_type, config::SchedulerType::Cosine);
    assert!(p.bf16);
    assert_eq!(
        termtune::resolve::data_options(p).val_size,
        termtune::data::ValSize::Fraction(0.1)
    );
    assert_eq!(p.eval_steps_resolved(), 500);
    // LLaMA-Factory 0.9.5's examples/extras/loraplus/llama3_lora_sft.yaml, unchanged.
    let loaded = config::load(
        &root().join("tests/fixtures/lf_examples/llama3_lora_sft_loraplus.yaml"),
        &[],
        Purpose::Train,
    )
    .unwrap();
    assert_eq!(loaded.preset.loraplus_lr_ratio, Some(16.0));
    // examples/extras/dft/qwen2_full_sft.yaml, unchanged.
    let loaded = config::load(
        &root().join("tests/fixtures/lf_examples/qwen2_full_sft_dft.yaml"),
        &[],
        Purpose::Train,
    )
    .unwrap();
    assert!(loaded.preset.use_dft_loss);
    assert_eq!(loaded.preset.finetuning_type, config::FinetuningType::Full);
    // examples/extras/eaft/qwen25_05b_eaft_full.yaml, unchanged.
    let loaded = config::load(
        &root().join("tests/fixtures/lf_examples/qwen25_05b_eaft_full.yaml"),
        &[],
        Purpose::Train,
    )
    .unwrap();
    assert!(loaded.preset.use_eaft_loss && !loaded.preset.use_dft_loss);
    assert_eq!(loaded.preset.eaft_alpha, 1.0);
    // examples/extras/pissa/llama3_lora_sft.yaml and examples/extras/muon/qwen2_full_sft.yaml, unchanged.
    let loaded = config::load(
        &root().join("tests/fixtures/lf_examples/llama3_lora_sft_pissa.yaml"),
        &[],
        Purpose::Train,
    )
    .unwrap();
    let p = &loaded.preset;
    assert!(p.pissa_init && p.pissa_convert && p.pissa_iter == 16);
    let loaded = config::load(
        &root().join("tests/fixtures/lf_examples/qwen2_full_sft_muon.yaml"),
        &[],
        Purpose::Train,
    )
    .unwrap();
    assert!(loaded.preset.use_muon);
    assert_eq!(loaded.preset.finetuning_type, config::FinetuningType::Full);
}

#[test]
fn load_save_load_is_the_identity() {
    let mut files = yaml_files(&root().join("presets"));
    files.extend(yaml_files(&root().join("tests/fixtures/lf_examples")));
    let dir = tempfile::tempdir().unwrap();
    for f in files {
        let first = config::load(&f, &[], Purpose::Train).unwrap();
        let saved = dir.path().join("saved.yaml");
        config::save(&first, &saved, Some("saved by the round-trip test")).unwrap();
        let second = config::load(&saved, &[], Purpose::Train).unwrap_or_else(|e| {
            panic!(
                "{}: reloading the saved file failed: {e}\n{}",
                f.display(),
                std::fs::read_to_string(&saved).unwrap()
            )
        });
        assert_eq!(first.preset, second.preset, "{}", f.display());
        // The pass-through keys come back, plus the switches LLaMA-Factory needs to train (and evaluate) as
        // termtune does.
        let mut want = first.passthrough.clone();
        want.entry("do_train".into())
            .or_insert(serde_norway::Value::Bool(true));
        if first.preset.has_validation_split() {
            want.insert("do_eval".into(), serde_norway::Value::Bool(true));
        }
        let mut got = second.passthrough.clone();
        want.sort_keys();
        got.sort_keys();
        assert_eq!(got, want, "{}", f.display());
        // And saving again gives the same text.
        let again = dir.path().join("again.yaml");
        config::save(&second, &again, Some("saved by the round-trip test")).unwrap();
        assert_eq!(
            std::fs::read_to_string(&saved).unwrap(),
            std::fs::read_to_string(&again).unwrap()
        );
    }
}

#[test]
fn saved_preset_is_grouped_like_llamafactory() {
    let loaded = config::load(
        &root().join("tests/fixtures/lf_examples/llama3_lora_sft.yaml"),
        &[],
        Purpose::Train,
    )
    .unwrap();
    let text = config::to_yaml(&loaded);
    let headers: Vec<&str> = text.lines().filter(|l| l.starts_with("### ")).collect();
    assert_eq!(
        headers,
        [
            "### model",
            "### method",
            "### dataset",
            "### output",
            "### train",
            "### eval"
        ]
    );
    assert!(text.contains("learning_rate: 1.0e-4\n"), "{text}");
    assert!(
        text.contains("dataset: identity,alpaca_en_demo\n"),
        "{text}"
    );
    assert!(text.contains("preprocessing_num_workers: 16\n"), "{text}");
    // Keys with no value are not written (LLaMA-Factory's WebUI strips them too).
    assert!(!text.contains("resume_from_checkpoint"), "{text}");
}

#[test]
fn overrides_win_over_the_file_and_parse_as_yaml_scalars() {
    let loaded = config::load(
        &root().join("presets/quickstart.yaml"),
        &[
            "learning_rate=2e-4".into(),
            "lora_rank=16".into(),
            "bf16=true".into(),
            "template=".into(),
        ],
        Purpose::Train,
    )
    .unwrap();
    let p = &loaded.preset;
    assert!((p.learning_rate - 2e-4).abs() < 1e-15);
    assert_eq!(p.lora_rank, 16);
    assert_eq!(p.lora_alpha_resolved(), 32);
    assert!(p.bf16);
    assert_eq!(p.template, None);
}

#[test]
fn numbers_written_as_strings_are_accepted() {
    let loaded = config::parse(
        "model_name_or_path: m\ndataset: d\nlearning_rate: \"1e-4\"\nlora_rank: '4'\n",
        &[],
        Purpose::Train,
    )
    .unwrap();
    assert!((loaded.preset.learning_rate - 1e-4).abs() < 1e-15);
    assert_eq!(loaded.preset.lora_rank, 4);
}

#[test]
fn chat_presets_need_no_dataset() {
    let loaded = config::parse(
        "model_name_or_path: m\ntemplate: llama3\n",
        &[],
        Purpose::Chat,
    );
    assert!(loaded.is_ok(), "{loaded:?}");
    let train = config::parse(
        "model_name_or_path: m\ntemplate: llama3\n",
        &[],
        Purpose::Train,
    );
    assert!(train.is_err());
}

#[test]
fn readme_key_table_matches_the_code() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let table = config::keys_markdown_table();
    assert!(
        readme.contains(&table),
        "README.md's key table is out of date; replace it with:\n{table}"
    );
}

#[test]
fn ci_runs_the_readme_test_command() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    let quick_start = readme.split("## Quick start").nth(1).unwrap();
    let test_line = quick_start
        .lines()
        .find(|l| l.starts_with("cargo test"))
        .expect("the Quick start has a test command");
    let command = test_line.split('#').next().unwrap().trim();
    assert!(
        ci.lines().any(|l| l.trim() == command),
        ".ci/run must run `{command}`"
    );
}

#[test]
fn saved_presets_tell_llamafactory_to_train_and_evaluate() {
    let method_lines = |text: &str| -> Vec<String> {
        let section = text.split("### method\n").nth(1).unwrap_or_default();
        let section = section.split("\n\n").next().unwrap_or_default();
        section.lines().map(str::to_string).collect()
    };
    // No do_train in the file, no validation split: do_train only.
    let loaded = config::parse("model_name_or_path: m\ndataset: d\n", &[], Purpose::Train).unwrap();
    let text = config::to_yaml(&loaded);
    assert!(
        method_lines(&text).contains(&"do_train: true".to_string()),
        "{text}"
    );
    assert!(!text.contains("do_eval"), "{text}");
    // A validation split (val_size or eval_dataset): do_eval too, under ### eval, whatever the file said.
    for split in [
        "val_size: 0.1",
        "eval_dataset: d2",
        "val_size: 0.1\ndo_eval: false",
    ] {
        let loaded = config::parse(
            &format!("model_name_or_path: m\ndataset: d\n{split}\n"),
            &[],
            Purpose::Train,
        )
        .unwrap();
        let text = config::to_yaml(&loaded);
        assert!(
            method_lines(&text).contains(&"do_train: true".to_string()),
            "{text}"
        );
        let eval = text.split("### eval\n").nth(1).unwrap_or_default();
        assert!(
            eval.lines().any(|l| l == "do_eval: true"),
            "{split}: {text}"
        );
        assert_eq!(text.matches("do_eval").count(), 1, "{text}");
    }
    // Written once, even when the file had it.
    let loaded = config::parse(
        "model_name_or_path: m\ndataset: d\ndo_train: true\n",
        &[],
        Purpose::Train,
    )
    .unwrap();
    assert_eq!(config::to_yaml(&loaded).matches("do_train").count(), 1);
}

#[test]
fn do_train_false_is_refused_for_training_only() {
    let text = "model_name_or_path: m\ndataset: d\ndo_train: false\n";
    let issues = config::parse(text, &[], Purpose::Train).unwrap_err();
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_eq!(issues[0].key, "do_train");
    assert!(
        issues[0].message.contains("`do_train: false`")
            && issues[0].message.contains("set `do_train: true`"),
        "{}",
        issues[0].message
    );
    assert_eq!(
        issues[0].origin,
        config::Origin::File {
            line: 3,
            column: 11
        }
    );
    // As an override too.
    let issues = config::parse(
        "model_name_or_path: m\ndataset: d\n",
        &["do_train=false".into()],
        Purpose::Train,
    )
    .unwrap_err();
    assert_eq!(issues[0].key, "do_train");
    // Chat and export do not train: the key does not matter there.
    assert!(config::parse(text, &[], Purpose::Chat).is_ok());
    assert!(config::parse(&format!("{text}export_dir: out\n"), &[], Purpose::Export).is_ok());
    // Not a boolean: an error for every purpose.
    let issues = config::parse(
        "model_name_or_path: m\ndataset: d\ndo_train: maybe\n",
        &[],
        Purpose::Chat,
    )
    .unwrap_err();
    assert!(
        issues[0].key == "do_train" && issues[0].message.contains("true or false"),
        "{issues:?}"
    );
}

/// The memory estimate counts the sequences a micro-batch runs with a graph: pairs are two each (dpo, rm).
#[test]
fn a_pair_micro_batch_counts_two_sequences_per_pair() {
    for (stage, n, words) in [
        ("sft", 2, "batch 2"),
        ("kto", 2, "batch 2"),
        ("dpo", 4, "batch 2 pairs (4 sequences)"),
        ("rm", 4, "batch 2 pairs (4 sequences)"),
    ] {
        let text = format!(
            "model_name_or_path: m\nstage: {stage}\ndataset: d\nper_device_train_batch_size: 2\n"
        );
        let loaded = config::parse(&text, &[], Purpose::Train).unwrap();
        assert_eq!(loaded.preset.sequences_per_micro_batch(), n, "{stage}");
        assert_eq!(loaded.preset.micro_batch_words(), words, "{stage}");
    }
}

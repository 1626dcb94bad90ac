//! Every local text-only dataset of LLaMA-Factory's demo `dataset_info.json` loads with its row count;
//! registry errors name the file and the fix.

use crate::data_util;

use data_util::{lf_data_dir, options};
use termtune::data::pipeline::load_examples;
use termtune::data::{DataError, DataOptions, Role, Stage};

fn load(names: &[&str], stage: Stage) -> termtune::data::pipeline::LoadedExamples {
    let tmp = tempfile::tempdir().unwrap();
    let opts = DataOptions {
        stage,
        ..options(&lf_data_dir(), names, None, tmp.path())
    };
    load_examples(&opts).unwrap()
}

#[test]
fn every_local_text_dataset_loads_with_the_expected_row_count() {
    // Row counts counted in the files of the llamafactory 0.9.5 source archive with Python: `len(json.load(f))`,
    // the non-empty lines of the .jsonl and of wiki_demo.txt (a .txt gives one `text` row per non-empty line).
    let cases: &[(&str, Stage, usize)] = &[
        ("alpaca_en_demo", Stage::Sft, 999),
        ("alpaca_zh_demo", Stage::Sft, 1000),
        ("identity", Stage::Sft, 91),
        ("glaive_toolcall_en_demo", Stage::Sft, 300),
        ("glaive_toolcall_zh_demo", Stage::Sft, 300),
        ("dpo_en_demo", Stage::Dpo, 300),
        ("dpo_zh_demo", Stage::Dpo, 300),
        ("kto_en_demo", Stage::Kto, 300),
        ("c4_demo", Stage::Pt, 300),
        ("wiki_demo", Stage::Pt, 30),
    ];
    for &(name, stage, rows) in cases {
        let loaded = load(&[name], stage);
        assert_eq!(loaded.counts.read, rows, "{name}: rows read");
        assert_eq!(
            loaded.train.len(),
            rows,
            "{name}: rows kept, skipped: {:?}",
            loaded.counts.first
        );
        assert!(
            loaded.counts.skipped.is_empty(),
            "{name}: {:?}",
            loaded.counts.first
        );
    }
}

#[test]
fn converted_shapes_match_llamafactory() {
    // alpaca: instruction + "\n" + input as the user turn; 412 of 999 rows have a non-empty input (counted in
    // the file with Python).
    let a = load(&["alpaca_en_demo"], Stage::Sft);
    let with_input = a
        .train
        .iter()
        .filter(|e| e.prompt[0].content.contains('\n'))
        .count();
    assert!(with_input >= 412, "{with_input}");
    assert!(
        a.train
            .iter()
            .all(|e| e.prompt.len() == 1 && e.response.len() == 1)
    );

    // glaive: tools JSON string, function_call / observation turns.
    let g = load(&["glaive_toolcall_en_demo"], Stage::Sft);
    assert!(g.train.iter().all(|e| !e.tools.is_empty()));
    assert!(
        g.train
            .iter()
            .any(|e| e.prompt.iter().any(|m| m.role == Role::Function))
    );
    assert!(
        g.train
            .iter()
            .any(|e| e.prompt.iter().any(|m| m.role == Role::Observation))
    );

    // dpo: prompt + (chosen, rejected).
    let d = load(&["dpo_en_demo"], Stage::Dpo);
    assert!(d.train.iter().all(|e| e.response.len() == 2));

    // kto: 150 desirable / 150 undesirable, the answer paired with an empty dummy.
    let k = load(&["kto_en_demo"], Stage::Kto);
    assert_eq!(
        k.train.iter().filter(|e| e.kto_tag == Some(true)).count(),
        150
    );
    assert_eq!(
        k.train.iter().filter(|e| e.kto_tag == Some(false)).count(),
        150
    );
    assert!(
        k.train
            .iter()
            .all(|e| e.response.len() == 2 && e.response.iter().any(|m| m.content.is_empty()))
    );
}

#[test]
fn glaive_tool_data_tokenises_with_default_and_qwen_tool_formats() {
    let tmp = tempfile::tempdir().unwrap();
    for template in ["default", "qwen"] {
        let opts = options(
            &lf_data_dir(),
            &["glaive_toolcall_en_demo"],
            Some(template),
            tmp.path(),
        );
        let enc = termtune::data::Encoder::new(
            &opts,
            &data_util::tokenizer(),
            &data_util::chat_config(None, "</s>"),
        )
        .unwrap();
        let prepared = termtune::data::prepare_dataset(&opts, &enc).unwrap();
        assert_eq!(
            prepared.stats.train_examples, 300,
            "{template}: {:?}",
            prepared.stats.first_skips
        );
        let p = termtune::data::pipeline::preview(&opts, &enc, 0).unwrap();
        assert!(p.skipped.is_none());
        if template == "default" {
            assert!(
                p.rendered
                    .contains("You have access to the following tools:\n> Tool Name: "),
                "{}",
                p.rendered
            );
            assert!(p.rendered.contains("Action: "), "{}", p.rendered);
        } else {
            assert!(
                p.rendered
                    .contains("<tools>\n{\"type\": \"function\", \"function\": {"),
                "{}",
                p.rendered
            );
            assert!(
                p.rendered.contains("<tool_call>\n{\"name\": "),
                "{}",
                p.rendered
            );
            assert!(
                p.rendered.contains("<|im_start|>user\n<tool_response>\n"),
                "{}",
                p.rendered
            );
        }
    }
}

#[test]
fn mix_strategies_and_max_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = options(
        &lf_data_dir(),
        &["identity", "alpaca_en_demo"],
        None,
        tmp.path(),
    );
    opts.max_samples = Some(10);
    assert_eq!(load_examples(&opts).unwrap().train.len(), 20);
    opts.max_samples = Some(100);
    opts.mix_strategy = termtune::data::MixStrategy::InterleaveUnder;
    // Round robin until identity (91 rows) runs out: 91 + 91 rows.
    assert_eq!(load_examples(&opts).unwrap().train.len(), 182);
    opts.mix_strategy = termtune::data::MixStrategy::InterleaveOver;
    // Until both were exhausted once: 100 + 100 (identity cycles).
    assert_eq!(load_examples(&opts).unwrap().train.len(), 200);
    opts.interleave_probs = Some(vec![0.5, 0.5]);
    let n = load_examples(&opts).unwrap().train.len();
    assert!(n >= 200, "{n}");
}

#[test]
fn val_size_fraction_and_count_and_eval_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = options(&lf_data_dir(), &["identity"], None, tmp.path());
    opts.val_size = termtune::data::ValSize::from_f64(0.1);
    let l = load_examples(&opts).unwrap();
    assert_eq!((l.train.len(), l.eval.len()), (81, 10)); // ceil(91 * 0.1) = 10
    opts.val_size = termtune::data::ValSize::from_f64(5.0);
    let l = load_examples(&opts).unwrap();
    assert_eq!((l.train.len(), l.eval.len()), (86, 5));
    // Same seed → same split; another seed → another split.
    let again = load_examples(&opts).unwrap();
    assert_eq!(l.eval, again.eval);
    opts.seed = 7;
    assert_ne!(load_examples(&opts).unwrap().eval, l.eval);
    opts.val_size = termtune::data::ValSize::None;
    opts.eval_dataset = vec!["alpaca_en_demo".into()];
    let l = load_examples(&opts).unwrap();
    assert_eq!((l.train.len(), l.eval.len()), (91, 999));
}

fn err(names: &[&str], stage: Stage) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let opts = DataOptions {
        stage,
        ..options(&lf_data_dir(), names, None, tmp.path())
    };
    load_examples(&opts).unwrap_err().to_string()
}

#[test]
fn registry_errors_name_the_file_and_the_fix() {
    // A hub entry, offline with an empty cache.
    let m = err(&["alpaca_en"], Stage::Sft);
    assert!(
        m.starts_with(
            "dataset `alpaca_en` (Hugging Face Hub `llamafactory/alpaca_en`): offline mode is on"
        ) && m.contains("huggingface-cli download --repo-type dataset llamafactory/alpaca_en"),
        "{m}"
    );
    // A registered file that is not there (the demo's own dataset_info.json, without its data files).
    let bare = tempfile::tempdir().unwrap();
    std::fs::copy(
        lf_data_dir().join("dataset_info.json"),
        bare.path().join("dataset_info.json"),
    )
    .unwrap();
    let m = load_examples(&DataOptions {
        stage: Stage::Pt,
        ..options(bare.path(), &["wiki_demo"], None, bare.path())
    })
    .unwrap_err()
    .to_string();
    assert!(
        m.contains("wiki_demo.txt") && m.contains("not found") && m.contains("file_name"),
        "{m}"
    );
    let m = err(&["no_such_set"], Stage::Sft);
    assert!(
        m.contains("`no_such_set` is not in")
            && m.contains("dataset_info.json")
            && m.contains("alpaca_en_demo"),
        "{m}"
    );
    let m = err(&["mllm_demo"], Stage::Sft);
    assert!(
        m.contains("images/videos/audios") && m.contains("text-only"),
        "{m}"
    );
    let m = err(&["dpo_en_demo"], Stage::Sft);
    assert!(m.contains("ranking") && m.contains("stage `sft`"), "{m}");

    let tmp = tempfile::tempdir().unwrap();
    let m = load_examples(&options(tmp.path(), &["x"], None, tmp.path())).unwrap_err();
    assert!(matches!(m, DataError::MissingRegistry { .. }));
    assert!(
        m.to_string().contains("dataset_info.json") && m.to_string().contains("dataset_dir"),
        "{m}"
    );

    std::fs::write(
        tmp.path().join("dataset_info.json"),
        "{\"x\": {\"file_name\": \"a.json\",}",
    )
    .unwrap();
    let m = load_examples(&options(tmp.path(), &["x"], None, tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        m.starts_with("malformed `")
            && m.contains("dataset_info.json")
            && m.contains("fix the JSON"),
        "{m}"
    );
}

#[test]
fn a_folder_of_same_type_files_is_one_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("parts");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("a.jsonl"),
        "{\"instruction\": \"a\", \"output\": \"b\"}\n",
    )
    .unwrap();
    std::fs::write(dir.join("b.jsonl"), "{\"instruction\": \"c\", \"output\": \"d\"}\n{\"instruction\": \"e\", \"output\": \"f\"}\n").unwrap();
    std::fs::write(
        tmp.path().join("dataset_info.json"),
        r#"{"parts": {"file_name": "parts"}}"#,
    )
    .unwrap();
    let l = load_examples(&options(tmp.path(), &["parts"], None, tmp.path())).unwrap();
    assert_eq!(l.train.len(), 3);
    // .json and .jsonl are one type (LLaMA-Factory's `json` loader); text is another.
    std::fs::write(dir.join("c.json"), "[]").unwrap();
    let l = load_examples(&options(tmp.path(), &["parts"], None, tmp.path())).unwrap();
    assert_eq!(l.train.len(), 3);
    std::fs::write(dir.join("d.txt"), "plain text\n").unwrap();
    let m = load_examples(&options(tmp.path(), &["parts"], None, tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(m.contains("mixes file types (json, text)"), "{m}");
}

#[test]
fn openai_messages_with_tool_calls_and_merged_tool_results() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = serde_json::json!([
        {"messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny"},
            {"role": "tool", "content": "22C"},
            {"role": "assistant", "content": "Sunny, 22C."}
        ],
         "tools": [{"name": "get_weather", "description": "d", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "c"}}, "required": ["city"]}}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    ]);
    std::fs::write(tmp.path().join("oa.json"), rows.to_string()).unwrap();
    std::fs::write(
        tmp.path().join("dataset_info.json"),
        r#"{"oa": {"file_name": "oa.json", "formatting": "openai", "columns": {"messages": "messages", "tools": "tools"}}}"#,
    )
    .unwrap();
    let opts = options(tmp.path(), &["oa"], Some("qwen"), tmp.path());
    let l = load_examples(&opts).unwrap();
    let e = &l.train[0];
    // Expected values follow LLaMA-Factory's OpenAIDatasetConverter (read from its source).
    assert_eq!(e.system, "S\n", "with tools a system prompt gets a newline");
    assert_eq!(e.prompt[1].role, Role::Function);
    assert_eq!(
        e.prompt[1].content,
        r#"[{"name": "get_weather", "arguments": {"city": "Paris"}}]"#
    );
    assert_eq!(e.prompt[2].role, Role::Observation);
    assert_eq!(
        e.prompt[2].content,
        "sunny\n</tool_response>\n<tool_response>\n22C"
    );
    assert!(e.tools.starts_with(r#"[{"name": "get_weather", "#));
    assert_eq!(
        l.train[1].system, "detailed thinking off",
        "LLaMA-Factory's quirk without tools"
    );

    let enc = termtune::data::Encoder::new(
        &opts,
        &data_util::tokenizer(),
        &data_util::chat_config(None, "</s>"),
    )
    .unwrap();
    let p = termtune::data::pipeline::preview(&opts, &enc, 0).unwrap();
    assert!(
        p.rendered.contains(
            "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n"
        ),
        "{}",
        p.rendered
    );
    assert!(p.rendered.contains(
        "<tool_response>\nsunny\n</tool_response>\n<tool_response>\n22C\n</tool_response>"
    ));
    // The function call is trained (it is an assistant turn), the tool results are not.
    let trained: Vec<&str> = p
        .spans
        .iter()
        .filter(|s| s.trained)
        .map(|s| s.text.as_str())
        .collect();
    assert!(
        trained[0].starts_with("<tool_call>") && trained[1] == "Sunny, 22C.<|im_end|>\n",
        "{trained:?}"
    );

    // tool_format overrides the tool format; the function slots become `{{content}}` + eos (qwen: <|im_end|>).
    let mut opts = opts;
    opts.tool_format = Some("default".into());
    let enc = termtune::data::Encoder::new(
        &opts,
        &data_util::tokenizer(),
        &data_util::chat_config(None, "</s>"),
    )
    .unwrap();
    let p = termtune::data::pipeline::preview(&opts, &enc, 0).unwrap();
    assert!(
        p.rendered
            .contains("Action: get_weather\nAction Input: {\"city\": \"Paris\"}<|im_end|>"),
        "{}",
        p.rendered
    );
    assert!(
        p.rendered.contains("  - city (string, required): c\n"),
        "{}",
        p.rendered
    );
}

/// `disable_shuffling` (LLaMA-Factory's `SequentialSampler`): dataset order every epoch, over `group_by_length` too.
#[test]
fn disable_shuffling_keeps_the_dataset_order_every_epoch() {
    use termtune::data::Sampler;
    let lengths: Vec<usize> = (0..60).map(|i| (i * 37) % 101).collect();
    assert_eq!(Sampler::of(true, true), Sampler::Sequential);
    assert_eq!(Sampler::of(true, false), Sampler::LengthGrouped);
    assert_eq!(Sampler::of(false, false), Sampler::Random);
    for epoch in 0..3 {
        let order = termtune::data::pack::epoch_order(&lengths, 4, Sampler::Sequential, 42, epoch);
        assert_eq!(order, (0..60).collect::<Vec<_>>());
        let shuffled = termtune::data::pack::epoch_order(&lengths, 4, Sampler::Random, 42, epoch);
        assert_ne!(shuffled, order);
    }
}

#[test]
fn length_grouped_order_is_a_seeded_permutation_with_the_longest_first() {
    let lengths: Vec<usize> = (0..400).map(|i| (i * 37) % 101).collect();
    let order = termtune::data::pack::epoch_order(
        &lengths,
        4,
        termtune::data::Sampler::LengthGrouped,
        42,
        0,
    );
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..400).collect::<Vec<_>>());
    assert_eq!(lengths[order[0]], 100);
    assert_eq!(
        order,
        termtune::data::pack::epoch_order(
            &lengths,
            4,
            termtune::data::Sampler::LengthGrouped,
            42,
            0
        )
    );
    assert_ne!(
        order,
        termtune::data::pack::epoch_order(
            &lengths,
            4,
            termtune::data::Sampler::LengthGrouped,
            42,
            1
        )
    );
}

#[test]
fn alpaca_history_and_system_columns_are_used_and_history_answers_trained() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = serde_json::json!([
        {"instruction": "And 3+3?", "input": "", "output": "6.", "system": "Be terse.", "history": [["What is 2+2?", "4."]]}
    ]);
    std::fs::write(tmp.path().join("h.json"), rows.to_string()).unwrap();
    std::fs::write(
        tmp.path().join("dataset_info.json"),
        r#"{"h": {"file_name": "h.json", "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"}}}"#,
    )
    .unwrap();
    let opts = options(tmp.path(), &["h"], Some("chatml"), tmp.path());
    let enc = termtune::data::Encoder::new(
        &opts,
        &data_util::tokenizer(),
        &data_util::chat_config(None, "</s>"),
    )
    .unwrap();
    let p = termtune::data::pipeline::preview(&opts, &enc, 0).unwrap();
    assert_eq!(
        p.rendered,
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6.<|im_end|>\n"
    );
    let trained: Vec<&str> = p
        .spans
        .iter()
        .filter(|s| s.trained)
        .map(|s| s.text.as_str())
        .collect();
    assert_eq!(trained, vec!["4.<|im_end|>\n", "6.<|im_end|>\n"]);
}

//! Token ids and labels equal LLaMA-Factory's own output (0.9.5 `SupervisedDatasetProcessor`) on
//! SmolLM2-135M-Instruct's real vocabulary, for 9 templates × 4 conversations (system prompt, alpaca-style,
//! multi-turn, function call + tool result) × {plain, train_on_prompt, mask_history, cutoff_len 12}, and
//! preference pairs (`PairwiseDatasetProcessor`) for 4 templates × 2 cutoffs.
//! The reference is tests/fixtures/data/reference/lf_supervised_smollm2.json, made by
//! make_lf_reference.py in the same folder (its docstring says how).

use crate::data_util;

use serde_json::{Value, json};
use termtune::data::convert::{Example, Message, Role};
use termtune::data::process::{MaskOptions, encode_supervised};
use termtune::data::reader::Location;
use termtune::data::{DataOptions, Encoder};

fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "function" => Role::Function,
                "observation" => Role::Observation,
                other => panic!("role {other}"),
            };
            Message::new(role, m["content"].as_str().unwrap())
        })
        .collect()
}

#[test]
fn ids_and_labels_match_llamafactory_on_smollm2() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data/reference/lf_supervised_smollm2.json");
    let reference: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let tokenizer = data_util::smollm2_tokenizer();
    let chat_template = data_util::gguf_chat_template(&data_util::smollm2_gguf());
    // SmolLM2's tokenizer_config.json special tokens.
    let config = json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                        "unk_token": "<|endoftext|>", "chat_template": chat_template});
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 136);
    let mut failures = Vec::new();
    for case in cases {
        let template = case["template"].as_str().unwrap();
        let ex_name = case["example"].as_str().unwrap();
        let ex = &reference["examples"][ex_name];
        let opts = DataOptions {
            template: Some(template.to_string()),
            ..DataOptions::default()
        };
        let enc = Encoder::new(&opts, &tokenizer, &config).unwrap();
        let example = Example {
            prompt: messages(&ex["prompt"]),
            response: messages(&ex["response"]),
            system: ex["system"].as_str().unwrap().to_string(),
            tools: ex["tools"].as_str().unwrap().to_string(),
            kto_tag: None,
            kl_answer: None,
            file: std::sync::Arc::new("ref".into()),
            location: Location::Row(1),
        };
        let mask = MaskOptions {
            cutoff_len: usize::try_from(case["cutoff_len"].as_u64().unwrap()).unwrap(),
            train_on_prompt: case["train_on_prompt"].as_bool().unwrap(),
            mask_history: case["mask_history"].as_bool().unwrap(),
        };
        let got = encode_supervised(&enc, &example, mask).unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let want_labels: Vec<i64> = serde_json::from_value(case["labels"].clone()).unwrap();
        assert_eq!(enc.eos.0, case["eos_token"].as_str().unwrap(), "{template}");
        assert_eq!(
            u64::from(enc.eos.1),
            case["eos_token_id"].as_u64().unwrap(),
            "{template}"
        );
        assert_eq!(
            enc.tokenizer.get_vocab_size(true) as u64,
            case["vocab_size"].as_u64().unwrap(),
            "{template}: tokens added by the template fix"
        );
        if got.input_ids != want_ids || got.labels != want_labels {
            failures.push(format!(
                "{template}/{ex_name}/{mask:?}:\n  got  {:?}\n  want {:?}\n  got labels  {:?}\n  want labels {:?}",
                enc.tokenizer.decode(&got.input_ids, false).unwrap(),
                case["text"].as_str().unwrap(),
                got.labels,
                want_labels
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn preference_pairs_match_llamafactory_on_smollm2() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data/reference/lf_supervised_smollm2.json");
    let reference: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let tokenizer = data_util::smollm2_tokenizer();
    let config = json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "chat_template": "x"});
    let pw = &reference["pairwise"];
    let example = Example {
        prompt: messages(&pw["prompt"]),
        response: messages(&pw["response"]),
        system: pw["system"].as_str().unwrap().to_string(),
        tools: String::new(),
        kto_tag: None,
        kl_answer: None,
        file: std::sync::Arc::new("ref".into()),
        location: Location::Row(1),
    };
    let cases = pw["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let template = case["template"].as_str().unwrap();
        let opts = DataOptions {
            template: Some(template.to_string()),
            ..DataOptions::default()
        };
        let enc = Encoder::new(&opts, &tokenizer, &config).unwrap();
        let cutoff = usize::try_from(case["cutoff_len"].as_u64().unwrap()).unwrap();
        let got = termtune::data::process::encode_pairwise(&enc, &example, cutoff).unwrap();
        let ids = |k: &str| -> Vec<u32> { serde_json::from_value(case[k].clone()).unwrap() };
        let labels = |k: &str| -> Vec<i64> { serde_json::from_value(case[k].clone()).unwrap() };
        assert_eq!(
            got.chosen_input_ids,
            ids("chosen_input_ids"),
            "{template}/{cutoff}"
        );
        assert_eq!(
            got.chosen_labels,
            labels("chosen_labels"),
            "{template}/{cutoff}"
        );
        assert_eq!(
            got.rejected_input_ids,
            ids("rejected_input_ids"),
            "{template}/{cutoff}"
        );
        assert_eq!(
            got.rejected_labels,
            labels("rejected_labels"),
            "{template}/{cutoff}"
        );
    }
}

/// `termtune api`'s prompt for a request with `tools`, a function call and a tool result equals the
/// prompt LLaMA-Factory's `encode_oneturn` builds for the same conversation: the reference's tool
/// example up to its last answer (the trailing run of trained labels), for each template of the
/// reference. The request is an OpenAI one (`tools` wrapped as `{"type": "function", "function"}`, the
/// call as a `function` message, the result as a `tool` message) going through the server's own
/// request checks. qwen3 is left out: LF's reasoning template adds an empty thought to every answer
/// in training data but not to earlier answers in a prompt, so its training prefix is not the prompt.
#[test]
fn api_tool_prompts_match_llamafactory_on_smollm2() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data/reference/lf_supervised_smollm2.json");
    let reference: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let tokenizer = data_util::smollm2_tokenizer();
    let config = json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                        "unk_token": "<|endoftext|>"});
    let ex = &reference["examples"]["tools"];
    let tools: Value = serde_json::from_str(ex["tools"].as_str().unwrap()).unwrap();
    let mut messages = Vec::new();
    for m in ex["prompt"].as_array().unwrap() {
        let role = match m["role"].as_str().unwrap() {
            "observation" => "tool",
            other => other,
        };
        messages.push(json!({"role": role, "content": m["content"]}));
    }
    let body = json!({
        "model": "m",
        "messages": messages,
        "tools": tools.as_array().unwrap().iter().map(|f| json!({"type": "function", "function": f})).collect::<Vec<_>>(),
    });
    let request: termtune::api::protocol::WireRequest = serde_json::from_value(body).unwrap();
    let request = request
        .check(&termtune::engine::generate::GenerationParams::default(), 0)
        .unwrap();
    let mut checked = 0;
    for case in reference["cases"].as_array().unwrap() {
        let template = case["template"].as_str().unwrap();
        if case["example"] != "tools"
            || case["train_on_prompt"] == true
            || case["mask_history"] == true
            || case["cutoff_len"] != 2048
            || template == "qwen3"
        {
            continue;
        }
        let opts = DataOptions {
            template: Some(template.to_string()),
            ..DataOptions::default()
        };
        let enc = Encoder::new(&opts, &tokenizer, &config).unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let labels: Vec<i64> = serde_json::from_value(case["labels"].clone()).unwrap();
        let answer = labels.iter().rev().take_while(|&&l| l != -100).count();
        let want = &ids[..ids.len() - answer];
        let got = enc
            .chat_prompt_with_tools(
                request.system.as_deref(),
                &request.turns,
                request.tools.as_deref().unwrap(),
            )
            .unwrap();
        assert_eq!(
            got.ids,
            want,
            "{template}:\n got  {:?}\n want {:?}",
            got.text,
            enc.tokenizer.decode(want, false).unwrap()
        );
        checked += 1;
    }
    assert_eq!(checked, 6, "smollm2, chatml, qwen, alpaca, default, empty");
}

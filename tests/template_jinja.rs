//! The tokenizer's own Jinja chat_template: Hugging Face semantics in minijinja, LLaMA-Factory's
//! `parse_template`, and the evidence that SmolLM2's own template renders like the built-in chatml /
//! smollm2 templates.

use crate::data_util;

use data_util::{config, decode, tokenizer, trained_runs};
use serde_json::json;
use termtune::data::convert::{Example, Message, Role};
use termtune::data::jinja::{JinjaTemplate, parse_template};
use termtune::data::process::{MaskOptions, encode_supervised};
use termtune::data::reader::Location;
use termtune::data::{DataOptions, Encoder};

const SMOLLM2_DEFAULT: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

fn conversation(system: Option<&str>) -> serde_json::Value {
    let mut m = Vec::new();
    if let Some(s) = system {
        m.push(json!({"role": "system", "content": s}));
    }
    m.push(json!({"role": "user", "content": "What is 2+2?"}));
    m.push(json!({"role": "assistant", "content": "4."}));
    m.push(json!({"role": "user", "content": "And 3+3?"}));
    m.push(json!({"role": "assistant", "content": "6."}));
    serde_json::Value::Array(m)
}

fn example(system: &str) -> Example {
    Example {
        prompt: vec![
            Message::new(Role::User, "What is 2+2?"),
            Message::new(Role::Assistant, "4."),
            Message::new(Role::User, "And 3+3?"),
        ],
        response: vec![Message::new(Role::Assistant, "6.")],
        system: system.to_string(),
        tools: String::new(),
        kto_tag: None,
        kl_answer: None,
        file: std::sync::Arc::new("mem".into()),
        location: Location::Row(1),
    }
}

/// The text a built-in template renders for `example(system)`, with an optional default_system override.
fn builtin_text(template: &str, system: &str, default_system: Option<&str>) -> String {
    let opts = DataOptions {
        template: Some(template.into()),
        default_system: default_system.map(str::to_string),
        ..DataOptions::default()
    };
    let enc = Encoder::new(&opts, &tokenizer(), &config(None, "<|im_end|>", Some("x"))).unwrap();
    let ex = example(system);
    let mut msgs = ex.prompt.clone();
    msgs.extend(ex.response.clone());
    enc.render_multiturn(&msgs, &ex.system, "")
        .unwrap()
        .into_iter()
        .map(|(p, a)| p + &a)
        .collect()
}

#[test]
fn smollm2_own_jinja_template_renders_like_the_builtin_templates() {
    let gguf = data_util::smollm2_gguf();
    let source = data_util::gguf_chat_template(&gguf);
    let jinja = JinjaTemplate::new(&source, "<|im_start|>", "<|im_end|>").unwrap();

    // With an explicit system prompt: identical to chatml and smollm2.
    let own = jinja
        .render(&conversation(Some("You are terse.")), false, None)
        .unwrap();
    assert_eq!(own, builtin_text("chatml", "You are terse.", None));
    assert_eq!(own, builtin_text("smollm2", "You are terse.", None));

    // Without one, the model's template injects SmolLM2's default system prompt (no period): chatml with
    // that default renders the same text; LLaMA-Factory's smollm2 default differs only by its final period.
    let own = jinja.render(&conversation(None), false, None).unwrap();
    assert!(
        own.starts_with(&format!(
            "<|im_start|>system\n{SMOLLM2_DEFAULT}<|im_end|>\n"
        )),
        "{own}"
    );
    assert_eq!(own, builtin_text("chatml", "", Some(SMOLLM2_DEFAULT)));
    assert_eq!(
        builtin_text("smollm2", "", None),
        own.replacen(SMOLLM2_DEFAULT, &format!("{SMOLLM2_DEFAULT}."), 1)
    );

    // The generation prompt.
    let mut c = conversation(None);
    c.as_array_mut().unwrap().pop();
    assert!(
        jinja
            .render(&c, true, None)
            .unwrap()
            .ends_with("<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")
    );
}

#[test]
fn template_unset_derives_slots_from_the_tokenizer_jinja() {
    // `template` unset + SmolLM2's chat_template (copied from the GGUF metadata `tokenizer.chat_template`).
    let source = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let enc = Encoder::new(
        &DataOptions::default(),
        &tokenizer(),
        &config(None, "<|im_end|>", Some(source)),
    )
    .unwrap();
    assert_eq!(enc.template.default_system, SMOLLM2_DEFAULT);
    let t = encode_supervised(
        &enc,
        &example(""),
        MaskOptions {
            cutoff_len: 4096,
            train_on_prompt: false,
            mask_history: false,
        },
    )
    .unwrap();
    let jinja = JinjaTemplate::new(source, "", "<|im_end|>").unwrap();
    // Same text as the model's own template, with the answers (and their end marker) trained.
    assert_eq!(
        decode(&enc, &t.input_ids),
        jinja.render(&conversation(None), false, None).unwrap()
    );
    assert_eq!(
        trained_runs(&enc, &t.labels),
        vec!["4.<|im_end|>\n", "6.<|im_end|>\n"]
    );
    // Chat prompts come from the Jinja template itself.
    let p = enc
        .chat_prompt(None, &[Message::new(Role::User, "Hi")])
        .unwrap();
    assert_eq!(
        p.text,
        format!(
            "<|im_start|>system\n{SMOLLM2_DEFAULT}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        )
    );
    assert_eq!(p.stop_ids, vec![enc.eos.1]);
    // The Jinja template has no tool format: tools, calls and tool results are refused by name.
    let with_tools = |tools: &str, turns: &[Message]| {
        enc.chat_prompt_with_tools(None, turns, tools)
            .unwrap_err()
            .to_string()
    };
    let e = with_tools(
        r#"[{"name": "f", "parameters": {"properties": {}}}]"#,
        &[Message::new(Role::User, "Hi")],
    );
    assert!(
        e.contains("tokenizer chat_template")
            && e.contains("no tool format")
            && e.contains("`template:`"),
        "{e}"
    );
    let e = with_tools(
        "",
        &[
            Message::new(Role::User, "Hi"),
            Message::new(Role::Function, r#"{"name": "f", "arguments": {}}"#),
            Message::new(Role::Observation, "1"),
        ],
    );
    assert!(e.contains("no tool format"), "{e}");
}

#[test]
fn hf_semantics_raise_exception_tojson_python_methods_and_block_trimming() {
    let source = "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}\n{% for m in messages %}\n  {{- m['content'].strip() | upper }}|{{ m.content.startswith(' x') }}|{{ m | tojson }}\n{% endfor %}\n{% if tools %}{% for k, v in tools[0].items() %}{{ k }}={{ v }};{% endfor %}{% endif %}{{ eos_token }}";
    let j = JinjaTemplate::new(source, "<s>", "</s>").unwrap();
    let out = j
        .render(
            &json!([{"role": "user", "content": " xy "}]),
            false,
            Some(&json!([{"name": "f", "a": 1}])),
        )
        .unwrap();
    // trim_blocks/lstrip_blocks remove the block lines; booleans print as Python does; tojson is
    // Python's json.dumps (", " and ": "). Expected text written by hand from Jinja2 semantics.
    assert_eq!(
        out,
        "XY|True|{\"role\": \"user\", \"content\": \" xy \"}\nname=f;a=1;</s>"
    );
    let err = j
        .render(&json!([{"role": "bad", "content": ""}]), false, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Conversation roles must alternate"), "{err}");
}

#[test]
fn parse_template_finds_no_default_system_when_the_template_has_none() {
    let source = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let t = parse_template(&JinjaTemplate::new(source, "", "").unwrap(), "").unwrap();
    assert_eq!(t.default_system, "");
    assert_eq!(
        t.format_user,
        vec![termtune::data::template::Slot::Text(
            "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n".into()
        )]
    );
    assert_eq!(
        t.format_assistant,
        vec![termtune::data::template::Slot::Text(
            "{{content}}<|im_end|>\n".into()
        )]
    );
}

#[test]
fn no_template_and_no_chat_template_falls_back_to_empty_with_a_warning() {
    let enc = Encoder::new(
        &DataOptions::default(),
        &tokenizer(),
        &config(None, "</s>", None),
    )
    .unwrap();
    assert_eq!(enc.template.name, "empty");
    assert!(
        enc.warnings
            .iter()
            .any(|w| w.contains("no chat_template") && w.contains("`empty`")),
        "{:?}",
        enc.warnings
    );
}

#[test]
fn qwen2_5_and_gemma3_chat_templates_render_like_python_jinja2_with_hf_settings() {
    // Reference: tests/fixtures/data/reference/jinja_reference.json, rendered by Python Jinja2 3.1.6 with
    // transformers' environment (make_jinja_reference.py in the same folder). Gemma 3's folds the system prompt
    // into the first user turn and reads list contents' text parts.
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/reference");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("jinja_reference.json")).unwrap()).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let source = std::fs::read_to_string(dir.join(case["template"].as_str().unwrap())).unwrap();
        let j = JinjaTemplate::new(
            &source,
            case["bos_token"].as_str().unwrap(),
            case["eos_token"].as_str().unwrap(),
        )
        .unwrap();
        let tools = (!case["tools"].is_null()).then(|| &case["tools"]);
        let got = j
            .render(
                &case["messages"],
                case["add_generation_prompt"].as_bool().unwrap(),
                tools,
            )
            .unwrap();
        assert_eq!(
            got,
            case["text"].as_str().unwrap(),
            "{}",
            case["conversation"]
        );
    }
}

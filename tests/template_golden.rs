//! Golden renderings and label masks of the built-in templates, matching LLaMA-Factory.
//!
//! Every expected string was written by hand from LLaMA-Factory's `template.py` slot definitions
//! (`register_template(...)`, commit 00577a8 as read in the code index) and checked against a hand-written table
//! of that code's exact renderings. The trained text is the decoded run of labelled
//! tokens: for every template only the assistant text and the template's end token(s) are trained.

use crate::data_util;

use data_util::{decode, encoder, trained_runs};
use termtune::data::convert::{Example, Message, Role};
use termtune::data::process::{MaskOptions, encode_supervised};
use termtune::data::reader::Location;

fn example(system: &str, turns: &[&str]) -> Example {
    let mut prompt = Vec::new();
    for (i, t) in turns.iter().enumerate() {
        let role = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        prompt.push(Message::new(role, *t));
    }
    let last = prompt.pop().unwrap();
    Example {
        prompt,
        response: vec![last],
        system: system.to_string(),
        tools: String::new(),
        kto_tag: None,
        kl_answer: None,
        file: std::sync::Arc::new("mem".into()),
        location: Location::Row(1),
    }
}

const MASK: MaskOptions = MaskOptions {
    cutoff_len: 4096,
    train_on_prompt: false,
    mask_history: false,
};

/// Renders `ex` (text of the whole conversation) and returns (text, trained runs).
fn render(template: &str, bos: Option<&str>, eos: &str, ex: &Example) -> (String, Vec<String>) {
    let enc = encoder(template, bos, eos);
    let tok = encode_supervised(&enc, ex, MASK).unwrap();
    let mut msgs = ex.prompt.clone();
    msgs.extend(ex.response.clone());
    let text: String = enc
        .render_multiturn(&msgs, &ex.system, &ex.tools)
        .unwrap()
        .into_iter()
        .map(|(p, a)| p + &a)
        .collect();
    // The ids are the per-piece tokenisation of the same text.
    assert_eq!(
        decode(&enc, &tok.input_ids),
        text,
        "ids decode to the rendered text"
    );
    (text, trained_runs(&enc, &tok.labels))
}

fn sys() -> Example {
    example("S", &["Hi", "Hi!"])
}
fn alpaca() -> Example {
    // The converter joins instruction + "\n" + input (see data_datasets.rs for the converter itself).
    example("", &["Name a color.\nSky", "Blue."])
}
fn multi() -> Example {
    example("", &["Hi", "Hello!", "Bye", "Ciao."])
}

#[test]
fn llama3_renderings() {
    let b = Some("<|begin_of_text|>");
    let e = "<|end_of_text|>";
    let u = |c: &str| {
        format!(
            "<|start_header_id|>user<|end_header_id|>\n\n{c}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        )
    };
    assert_eq!(
        render("llama3", b, e, &sys()),
        (
            format!(
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>{}Hi!<|eot_id|>",
                u("Hi")
            ),
            vec!["Hi!<|eot_id|>".to_string()]
        )
    );
    assert_eq!(
        render("llama3", b, e, &alpaca()),
        (
            format!(
                "<|begin_of_text|>{}Blue.<|eot_id|>",
                u("Name a color.\nSky")
            ),
            vec!["Blue.<|eot_id|>".to_string()]
        )
    );
    assert_eq!(
        render("llama3", b, e, &multi()),
        (
            format!(
                "<|begin_of_text|>{}Hello!<|eot_id|>{}Ciao.<|eot_id|>",
                u("Hi"),
                u("Bye")
            ),
            vec![
                "Hello!<|eot_id|>".to_string(),
                "Ciao.<|eot_id|>".to_string()
            ]
        )
    );
}

const QWEN_DEFAULT: &str = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

fn im(role: &str, c: &str) -> String {
    format!("<|im_start|>{role}\n{c}<|im_end|>\n")
}

#[test]
fn qwen_renderings_with_default_system() {
    let e = "<|endoftext|>";
    let ga = "<|im_start|>assistant\n";
    assert_eq!(
        render("qwen", None, e, &sys()),
        (
            format!(
                "{}{}{ga}Hi!<|im_end|>\n",
                im("system", "S"),
                im("user", "Hi")
            ),
            vec!["Hi!<|im_end|>\n".to_string()]
        )
    );
    assert_eq!(
        render("qwen", None, e, &alpaca()),
        (
            format!(
                "{}{}{ga}Blue.<|im_end|>\n",
                im("system", QWEN_DEFAULT),
                im("user", "Name a color.\nSky")
            ),
            vec!["Blue.<|im_end|>\n".to_string()]
        )
    );
    assert_eq!(
        render("qwen", None, e, &multi()),
        (
            format!(
                "{}{}{ga}Hello!<|im_end|>\n{}{ga}Ciao.<|im_end|>\n",
                im("system", QWEN_DEFAULT),
                im("user", "Hi"),
                im("user", "Bye")
            ),
            vec![
                "Hello!<|im_end|>\n".to_string(),
                "Ciao.<|im_end|>\n".to_string()
            ]
        )
    );
}

#[test]
fn chatml_renderings_have_no_default_system() {
    let e = "<|endoftext|>";
    let ga = "<|im_start|>assistant\n";
    assert_eq!(
        render("chatml", None, e, &sys()).0,
        format!(
            "{}{}{ga}Hi!<|im_end|>\n",
            im("system", "S"),
            im("user", "Hi")
        )
    );
    assert_eq!(
        render("chatml", None, e, &alpaca()),
        (
            format!("{}{ga}Blue.<|im_end|>\n", im("user", "Name a color.\nSky")),
            vec!["Blue.<|im_end|>\n".to_string()]
        )
    );
    assert_eq!(
        render("chatml", None, e, &multi()).1,
        vec![
            "Hello!<|im_end|>\n".to_string(),
            "Ciao.<|im_end|>\n".to_string()
        ]
    );
}

#[test]
fn mistral_fuses_system_into_first_user_turn() {
    let (b, e) = (Some("<s>"), "</s>");
    assert_eq!(
        render("mistral", b, e, &sys()),
        (
            "<s>[INST] S\n\nHi[/INST] Hi!</s>".to_string(),
            vec![" Hi!</s>".to_string()]
        )
    );
    assert_eq!(
        render("mistral", b, e, &alpaca()),
        (
            "<s>[INST] Name a color.\nSky[/INST] Blue.</s>".to_string(),
            vec![" Blue.</s>".to_string()]
        )
    );
    assert_eq!(
        render("mistral", b, e, &multi()),
        (
            "<s>[INST] Hi[/INST] Hello!</s>[INST] Bye[/INST] Ciao.</s>".to_string(),
            vec![" Hello!</s>".to_string(), " Ciao.</s>".to_string()]
        )
    );
}

const ALPACA_SYSTEM: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n";

#[test]
fn alpaca_renderings() {
    let e = "</s>";
    let u = |c: &str| format!("### Instruction:\n{c}\n\n### Response:\n");
    // A given system prompt is glued to the instruction with no separator (LLAMAFACTORY_NOTES §5).
    assert_eq!(
        render("alpaca", None, e, &sys()),
        (
            format!("S{}Hi!</s>\n\n", u("Hi")),
            vec!["Hi!</s>\n\n".to_string()]
        )
    );
    assert_eq!(
        render("alpaca", None, e, &alpaca()),
        (
            format!("{ALPACA_SYSTEM}{}Blue.</s>\n\n", u("Name a color.\nSky")),
            vec!["Blue.</s>\n\n".to_string()]
        )
    );
    assert_eq!(
        render("alpaca", None, e, &multi()),
        (
            format!(
                "{ALPACA_SYSTEM}{}Hello!</s>\n\n{}Ciao.</s>\n\n",
                u("Hi"),
                u("Bye")
            ),
            vec!["Hello!</s>\n\n".to_string(), "Ciao.</s>\n\n".to_string()]
        )
    );
}

#[test]
fn default_renderings() {
    let e = "</s>";
    assert_eq!(
        render("default", None, e, &sys()),
        (
            "System: S</s>\nHuman: Hi</s>\nAssistant:Hi!</s>\n".to_string(),
            vec!["Hi!</s>\n".to_string()]
        )
    );
    assert_eq!(
        render("default", None, e, &alpaca()).0,
        "Human: Name a color.\nSky</s>\nAssistant:Blue.</s>\n"
    );
    assert_eq!(
        render("default", None, e, &multi()),
        (
            "Human: Hi</s>\nAssistant:Hello!</s>\nHuman: Bye</s>\nAssistant:Ciao.</s>\n"
                .to_string(),
            vec!["Hello!</s>\n".to_string(), "Ciao.</s>\n".to_string()]
        )
    );
}

#[test]
fn empty_template_is_raw_concatenation_without_eos() {
    let e = "</s>";
    assert_eq!(
        render("empty", None, e, &sys()),
        ("SHiHi!".to_string(), vec!["Hi!".to_string()])
    );
    assert_eq!(
        render("empty", None, e, &alpaca()).0,
        "Name a color.\nSkyBlue."
    );
    assert_eq!(
        render("empty", None, e, &multi()),
        (
            "HiHello!ByeCiao.".to_string(),
            vec!["Hello!".to_string(), "Ciao.".to_string()]
        )
    );
}

#[test]
fn llama2_gemma_phi4_smollm2_renderings() {
    assert_eq!(
        render("llama2", Some("<s>"), "</s>", &sys()),
        (
            "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST]Hi!</s>".to_string(),
            vec!["Hi!</s>".to_string()]
        )
    );
    assert_eq!(
        render("gemma", Some("<s>"), "</s>", &sys()),
        (
            "<s><start_of_turn>user\nS\n\nHi<end_of_turn>\n<start_of_turn>model\nHi!<end_of_turn>\n".to_string(),
            vec!["Hi!<end_of_turn>\n".to_string()]
        )
    );
    assert_eq!(
        render("gemma3", Some("<s>"), "</s>", &sys()),
        render("gemma", Some("<s>"), "</s>", &sys())
    );
    assert_eq!(
        render("phi4", None, "<|endoftext|>", &sys()),
        (
            "<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>Hi!<|im_end|>"
                .to_string(),
            vec!["Hi!<|im_end|>".to_string()]
        )
    );
    // LLaMA-Factory's smollm2 default system ends with a period (the model's own Jinja has none).
    assert_eq!(
        render("smollm2", None, "<|im_end|>", &alpaca()).0,
        format!(
            "{}{}<|im_start|>assistant\nBlue.<|im_end|>\n",
            im(
                "system",
                "You are a helpful AI assistant named SmolLM, trained by Hugging Face."
            ),
            im("user", "Name a color.\nSky")
        )
    );
    assert_eq!(
        render("smollm", None, "<|im_end|>", &alpaca()).0,
        format!(
            "{}<|im_start|>assistant\nBlue.<|im_end|>\n",
            im("user", "Name a color.\nSky")
        )
    );
}

#[test]
fn qwen3_trains_the_empty_thought_and_nothink_does_not_add_it() {
    let e = "<|endoftext|>";
    let (text, trained) = render("qwen3", None, e, &sys());
    assert_eq!(
        text,
        format!(
            "{}{}<|im_start|>assistant\n<think>\n\n</think>\n\nHi!<|im_end|>\n",
            im("system", "S"),
            im("user", "Hi")
        )
    );
    assert_eq!(
        trained,
        vec!["<think>\n\n</think>\n\nHi!<|im_end|>\n".to_string()]
    );

    // enable_thinking: false → the empty thought moves into the (masked) prompt.
    let opts = termtune::data::DataOptions {
        template: Some("qwen3".into()),
        enable_thinking: false,
        ..Default::default()
    };
    let enc = termtune::data::Encoder::new(
        &opts,
        &data_util::tokenizer(),
        &data_util::chat_config(None, e),
    )
    .unwrap();
    let tok = encode_supervised(&enc, &sys(), MASK).unwrap();
    assert_eq!(
        trained_runs(&enc, &tok.labels),
        vec!["Hi!<|im_end|>\n".to_string()]
    );
    assert!(
        decode(&enc, &tok.input_ids).contains("<|im_start|>assistant\n<think>\n\n</think>\n\nHi!")
    );

    let (text, trained) = render("qwen3_nothink", None, e, &sys());
    assert!(!text.contains("<think>"));
    assert_eq!(trained, vec!["Hi!<|im_end|>\n".to_string()]);
}

#[test]
fn per_piece_tokenisation_keeps_a_trailing_double_newline_as_one_token() {
    // LLAMAFACTORY_NOTES §5: a "\n\n" that ends a piece is one token; inside a piece the byte-level
    // pre-tokenizer splits it. The test tokenizer merges "\n\n" into id 256.
    let enc = encoder("alpaca", None, "</s>");
    let tok = encode_supervised(&enc, &sys(), MASK).unwrap();
    let eos = enc.eos.1;
    assert_eq!(eos, 266, "</s> is special id 266 of the test tokenizer");
    // The answer piece "Hi!" + eos + "\n\n": 72 105 33, 266, 256 — all trained.
    assert_eq!(
        &tok.input_ids[tok.input_ids.len() - 5..],
        &[72, 105, 33, 266, 256]
    );
    assert_eq!(
        &tok.labels[tok.labels.len() - 5..],
        &[72, 105, 33, 266, 256]
    );
    // Inside the user piece "...Hi\n\n### Response:\n" the two newlines are two tokens (10, 10).
    let user_ids = enc.encode_text("### Instruction:\nHi\n\n### Response:\n");
    assert!(user_ids.windows(2).any(|w| w == [10, 10]));
    assert!(!user_ids.contains(&256));
    // Tokenising the whole rendered text at once differs when the "\n\n" is followed by the next turn:
    // per piece it is 256, in the whole text 10 10.
    let tok = encode_supervised(&enc, &multi(), MASK).unwrap();
    let whole = enc.encode_text(&decode(&enc, &tok.input_ids));
    assert_ne!(whole, tok.input_ids);
    // Per piece: the default system piece ("…request.\n\n") and both answer pieces end with "\n\n".
    assert_eq!(tok.input_ids.iter().filter(|&&i| i == 256).count(), 3);
    // Whole text: only the final "\n\n" (end of text) stays merged.
    assert_eq!(whole.iter().filter(|&&i| i == 256).count(), 1);
}

#[test]
fn stop_tokens_and_eos_replacement() {
    let enc = encoder("llama3", Some("<|begin_of_text|>"), "<|end_of_text|>");
    assert_eq!(enc.eos.0, "<|eot_id|>");
    // <|eot_id|> is id 261 of the test tokenizer; <|eom_id|> is missing, so it is added as id 267.
    assert_eq!(enc.stop_ids, vec![261, 267]);
    assert_eq!(enc.added_tokens, vec!["<|eom_id|>".to_string()]);
    assert!(
        enc.warnings
            .iter()
            .any(|w| w.contains("<|eom_id|>") && w.contains("resized"))
    );

    let enc = encoder("chatml", None, "<|endoftext|>");
    assert_eq!(enc.eos.0, "<|im_end|>");
    assert_eq!(enc.stop_ids, vec![263, 262]);
    assert!(enc.added_tokens.is_empty());
}

#[test]
fn warns_for_missing_special_tokens_and_for_a_base_model_with_a_chat_template() {
    use termtune::data::{DataOptions, Encoder};
    let opts = DataOptions {
        template: Some("llama3".into()),
        ..Default::default()
    };
    // No chat_template in the tokenizer config → a base model; the tokenizer lacks llama3's header tokens.
    let tok = data_util::tokenizer_without(&["<|start_header_id|>", "<|end_header_id|>"]);
    let enc = Encoder::new(
        &opts,
        &tok,
        &data_util::config(Some("<|begin_of_text|>"), "<|end_of_text|>", None),
    )
    .unwrap();
    assert!(
        enc.warnings
            .iter()
            .any(|w| w.contains("base model") && w.contains("`llama3`")),
        "{:?}",
        enc.warnings
    );
    assert!(
        enc.warnings
            .iter()
            .any(|w| w.contains("`<|start_header_id|>`") && w.contains("`<|end_header_id|>`")),
        "{:?}",
        enc.warnings
    );
    // `default` on a base model is fine.
    let opts = DataOptions {
        template: Some("default".into()),
        ..Default::default()
    };
    let enc = Encoder::new(
        &opts,
        &data_util::tokenizer(),
        &data_util::config(None, "</s>", None),
    )
    .unwrap();
    assert!(enc.warnings.is_empty(), "{:?}", enc.warnings);
}

#[test]
fn unknown_template_is_an_error_listing_the_known_ones() {
    let opts = termtune::data::DataOptions {
        template: Some("llama9".into()),
        ..Default::default()
    };
    let err = termtune::data::Encoder::new(
        &opts,
        &data_util::tokenizer(),
        &data_util::chat_config(None, "</s>"),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("unknown template `llama9`") && msg.contains("qwen3_nothink"),
        "{msg}"
    );
}

#[test]
fn chat_prompt_ends_with_the_generation_prompt_and_knows_stop_ids() {
    let enc = encoder("qwen", None, "<|endoftext|>");
    let turns = [
        Message::new(Role::User, "Hi"),
        Message::new(Role::Assistant, "Hello!"),
        Message::new(Role::User, "Bye"),
    ];
    let p = enc.chat_prompt(Some("S"), &turns).unwrap();
    assert_eq!(
        p.text,
        format!(
            "{}{}<|im_start|>assistant\nHello!<|im_end|>\n{}<|im_start|>assistant\n",
            im("system", "S"),
            im("user", "Hi"),
            im("user", "Bye")
        )
    );
    assert_eq!(decode(&enc, &p.ids), p.text);
    assert_eq!(p.stop_ids, vec![263]);
    // No system given → the template's default system.
    let p = enc.chat_prompt(None, &turns[2..]).unwrap();
    assert!(p.text.starts_with(&im("system", QWEN_DEFAULT)));
}

#[test]
fn marker_scan_reports_special_markers_only() {
    use termtune::data::template::find_markers;
    assert_eq!(
        find_markers(
            "<start_of_turn>user\n{{content}}<end_of_turn>\n<|im_start|><tool_response>[INST]<<SYS>>"
        ),
        vec!["<start_of_turn>", "<end_of_turn>", "<|im_start|>"]
    );
}

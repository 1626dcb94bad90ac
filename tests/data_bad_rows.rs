//! Bad data never stops silently and never crashes: one fixture per skip reason
//! (tests/fixtures/data/, each = good row(s) + one bad row) with the message users see.

use crate::data_util;

use data_util::{chat_config, fixtures_dir, options, tokenizer};
use termtune::data::pipeline::load_examples;
use termtune::data::{DataOptions, Encoder, Stage, prepare_dataset};

/// Loads fixture dataset `name`, tokenises it with `chatml` and returns the stats.
fn stats_of(name: &str, stage: Stage) -> termtune::data::DatasetStats {
    let tmp = tempfile::tempdir().unwrap();
    let opts = DataOptions {
        stage,
        ..options(&fixtures_dir(), &[name], Some("chatml"), tmp.path())
    };
    if stage == Stage::Dpo {
        let l = load_examples(&opts).unwrap();
        let mut s = termtune::data::DatasetStats {
            rows_read: l.counts.read,
            rows_kept: l.counts.kept,
            skipped: l.counts.skipped.clone(),
            ..Default::default()
        };
        s.first_skips = l.counts.first.iter().map(ToString::to_string).collect();
        return s;
    }
    let enc = Encoder::new(&opts, &tokenizer(), &chat_config(None, "<|endoftext|>")).unwrap();
    prepare_dataset(&opts, &enc).unwrap().stats
}

/// Asserts one skipped row with `kind`, and that the first report names file, place and reason.
fn assert_one_skip(name: &str, file: &str, place: &str, kind: &str, message: &str, stage: Stage) {
    let s = stats_of(name, stage);
    assert_eq!(s.skipped.get(kind), Some(&1), "{name}: {:?}", s.skipped);
    assert_eq!(s.skipped_total(), 1, "{name}: {:?}", s.skipped);
    let first = &s.first_skips[0];
    assert!(first.contains(file), "{name}: {first}");
    assert!(
        first.contains(&format!("{file} {place}: {message}")),
        "{name}: {first}"
    );
}

#[test]
fn unparsable_json_line() {
    assert_one_skip(
        "invalid_json",
        "invalid_json.jsonl",
        "line 2",
        "invalid json",
        "unparsable JSON (",
        Stage::Sft,
    );
}

#[test]
fn invalid_utf8_line() {
    assert_one_skip(
        "invalid_utf8",
        "invalid_utf8.jsonl",
        "line 2",
        "invalid utf-8",
        "invalid UTF-8",
        Stage::Sft,
    );
}

#[test]
fn broken_element_of_a_json_array_skips_only_that_row() {
    let s = stats_of("broken_array", Stage::Sft);
    assert_eq!((s.rows_read, s.rows_kept), (3, 2));
    assert!(
        s.first_skips[0].contains("broken_array.json row 2: unparsable JSON"),
        "{:?}",
        s.first_skips
    );
}

#[test]
fn row_that_is_not_an_object() {
    assert_one_skip(
        "not_object",
        "not_object.json",
        "row 2",
        "not an object",
        "the row is not a JSON object",
        Stage::Sft,
    );
}

#[test]
fn missing_column() {
    assert_one_skip(
        "missing_column",
        "missing_column.json",
        "row 2",
        "missing column",
        "missing column `output`",
        Stage::Sft,
    );
}

#[test]
fn wrong_column_type() {
    assert_one_skip(
        "wrong_type",
        "wrong_type.json",
        "row 2",
        "wrong column type",
        "column `output` must be a string",
        Stage::Sft,
    );
}

#[test]
fn empty_answer() {
    assert_one_skip(
        "empty_answer",
        "empty_answer.json",
        "row 2",
        "empty answer",
        "empty answer",
        Stage::Sft,
    );
}

#[test]
fn wrong_role_order() {
    assert_one_skip(
        "wrong_role_order",
        "wrong_role_order.json",
        "row 2",
        "wrong role order",
        "message 1 has role `gpt`, expected `human` or `observation`",
        Stage::Sft,
    );
}

#[test]
fn odd_message_count() {
    assert_one_skip(
        "odd_messages",
        "odd_messages.json",
        "row 2",
        "wrong message count",
        "3 messages after the system turn, expected an even, non-zero number",
        Stage::Sft,
    );
}

#[test]
fn invalid_tools_json() {
    assert_one_skip(
        "invalid_tools",
        "invalid_tools.json",
        "row 2",
        "invalid tools",
        "invalid `tools` JSON (",
        Stage::Sft,
    );
}

#[test]
fn invalid_function_call() {
    assert_one_skip(
        "invalid_function_call",
        "invalid_function_call.json",
        "row 2",
        "invalid function call",
        "invalid function call (not JSON",
        Stage::Sft,
    );
}

#[test]
fn invalid_preference_pair() {
    assert_one_skip(
        "invalid_pair",
        "invalid_pair.json",
        "row 2",
        "invalid preference pair",
        "invalid preference pair (`chosen` has role `human`",
        Stage::Dpo,
    );
}

#[test]
fn zero_usable_rows_is_an_error_naming_the_file_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = options(&fixtures_dir(), &["all_bad"], None, tmp.path());
    let m = load_examples(&opts).unwrap_err().to_string();
    assert!(
        m.starts_with("no usable rows in dataset `all_bad` ("),
        "{m}"
    );
    assert!(
        m.contains("all_bad.json") && m.contains("2 rows read"),
        "{m}"
    );
    assert!(
        m.contains("1 missing column") && m.contains("1 empty answer"),
        "{m}"
    );
    assert!(m.contains("check `formatting`/`columns`/`tags`"), "{m}");
}

#[test]
fn missing_file_and_hub_entries_are_errors_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load_examples(&options(
        &fixtures_dir(),
        &["missing_file"],
        None,
        tmp.path(),
    ))
    .unwrap_err()
    .to_string();
    assert!(
        m.contains("does_not_exist.json") && m.contains("put the file there or fix `file_name`"),
        "{m}"
    );
    let m = load_examples(&options(&fixtures_dir(), &["hub"], None, tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        m.contains("(Hugging Face Hub `someone/some_set`): offline mode is on")
            && m.contains("run once online"),
        "{m}"
    );
}

#[test]
fn stats_text_lists_reasons_and_first_rows() {
    let s = stats_of("invalid_json", Stage::Sft);
    let text = termtune::data::stats::format_stats(&s);
    assert!(text.contains("rows: 3 read, 2 kept, 1 skipped"), "{text}");
    assert!(text.contains("skipped (invalid json): 1"), "{text}");
    assert!(
        text.contains("invalid_json.jsonl line 2: unparsable JSON"),
        "{text}"
    );
}

#[test]
fn malformed_files_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs: &[&[u8]] = &[
        b"",
        b"[",
        b"[1,",
        b"[{\"instruction\": \"a\", \"output\": \"b\"",
        b"{",
        b"\"just a string\"",
        b"[[[[[[[[[[]]]]]]]]]]",
        b"[{\"instruction\": \"a\\\", \"output\": \"b\"}]",
        b"\xff\xfe\x00[",
        b"[{}, {\"output\": 1e999}, null, true]",
        b"{\"conversations\": 5}\n{\"instruction\": {\"x\": 1}}\n",
    ];
    std::fs::write(
        tmp.path().join("dataset_info.json"),
        r#"{"x": {"file_name": "x.json"}, "s": {"file_name": "x.json", "formatting": "sharegpt"}}"#,
    )
    .unwrap();
    for (i, bytes) in inputs.iter().enumerate() {
        std::fs::write(tmp.path().join("x.json"), bytes).unwrap();
        for name in ["x", "s"] {
            let opts = options(tmp.path(), &[name], Some("chatml"), tmp.path());
            match load_examples(&opts) {
                Ok(l) => assert!(!l.train.is_empty(), "input {i}"),
                Err(e) => assert!(e.to_string().contains("no usable rows"), "input {i}: {e}"),
            }
        }
    }
}

//! CSV, Parquet and Arrow dataset files (LLaMA-Factory's `FILEEXT2TYPE`): the rows equal what Hugging Face
//! `datasets` loads from the same files (tests/fixtures/tabular/reference.json, written by
//! scripts/tabular_reference.py), the examples equal those of the same rows as JSON, streaming reads them too,
//! and broken files or rows get the file, line and fix.

use std::path::{Path, PathBuf};

use serde_json::Value;
use termtune::data::pipeline::load_examples;
use termtune::data::reader::{Location, RowStream, read_file};
use termtune::data::{DataError, DataOptions, Stage};

use crate::data_util::options;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tabular")
}

fn reference() -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(dir().join("reference.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["files"].as_object().unwrap().clone()
}

#[test]
fn rows_equal_what_hugging_face_datasets_loads() {
    let reference = reference();
    assert_eq!(reference.len(), 7);
    for (name, expected) in &reference {
        let rows = read_file(&dir().join(name)).unwrap();
        let values: Vec<Value> = rows
            .into_iter()
            .map(|r| r.unwrap_or_else(|s| panic!("{name}: skipped {s}")).value)
            .collect();
        let expected = expected.as_array().unwrap();
        assert_eq!(values.len(), expected.len(), "{name}: row count");
        for (i, (got, want)) in values.iter().zip(expected).enumerate() {
            assert_eq!(got, want, "{name}: row {}", i + 1);
        }
    }
}

#[test]
fn streaming_reads_the_same_rows() {
    let files: Vec<PathBuf> = ["dpo.parquet", "corner_cases.csv", "kto.arrow"]
        .iter()
        .map(|f| dir().join(f))
        .collect();
    let streamed: Vec<_> = RowStream::new(files.clone())
        .unwrap()
        .map(|r| r.unwrap().unwrap())
        .collect();
    let read: Vec<_> = files
        .iter()
        .flat_map(|f| read_file(f).unwrap())
        .map(Result::unwrap)
        .collect();
    assert_eq!(streamed, read);
    // Rows across parquet row groups (5 rows each) are numbered through the file.
    assert_eq!(streamed[15].location, Location::Row(16));
    // A CSV row is found by the line it starts on (row 2 spans lines 3–4).
    assert_eq!(streamed[16].location, Location::Line(2));
    assert_eq!(streamed[18].location, Location::Line(5));
}

/// A dataset_info.json registering each fixture under its file name.
fn registry(entries: &[(&str, Value)]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let mut info = serde_json::Map::new();
    for (name, entry) in entries {
        info.insert((*name).to_string(), entry.clone());
    }
    std::fs::write(
        tmp.path().join("dataset_info.json"),
        serde_json::to_string_pretty(&Value::Object(info)).unwrap(),
    )
    .unwrap();
    tmp
}

#[test]
fn examples_equal_those_of_the_same_rows_as_json() {
    let sharegpt_tools = serde_json::json!({
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools"}
    });
    let dpo = serde_json::json!({
        "ranking": true,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
    });
    let kto = serde_json::json!({
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "kto_tag": "label"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    });
    let cases: &[(&str, &[&str], Value, Stage)] = &[
        (
            "alpaca",
            &["alpaca.parquet", "alpaca.csv"],
            serde_json::json!({}),
            Stage::Sft,
        ),
        (
            "glaive",
            &["glaive.parquet", "glaive_feather.arrow"],
            sharegpt_tools,
            Stage::Sft,
        ),
        ("dpo", &["dpo.parquet"], dpo, Stage::Dpo),
        ("kto", &["kto.arrow"], kto, Stage::Kto),
    ];
    for (stem, files, entry, stage) in cases {
        let with_file = |file: &str| {
            let mut e = entry.clone();
            e["file_name"] = Value::String(dir().join(file).to_string_lossy().into_owned());
            e
        };
        let json_name = format!("{stem}.json");
        let mut entries = vec![("json", with_file(&json_name))];
        entries.extend(files.iter().map(|f| (*f, with_file(f))));
        let reg = registry(&entries);
        let load = |name: &str| {
            let cache = tempfile::tempdir().unwrap();
            let opts = DataOptions {
                stage: *stage,
                ..options(reg.path(), &[name], None, cache.path())
            };
            let loaded = load_examples(&opts).unwrap();
            assert!(
                loaded.counts.skipped.is_empty(),
                "{name}: {:?}",
                loaded.counts.first
            );
            loaded
                .train
                .into_iter()
                .map(|e| (e.prompt, e.response, e.system, e.tools, e.kto_tag))
                .collect::<Vec<_>>()
        };
        let want = load("json");
        assert_eq!(want.len(), 16, "{stem}");
        for f in *files {
            assert_eq!(load(f), want, "{f} vs {json_name}");
        }
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn broken_csv_rows_are_skipped_with_their_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        tmp.path(),
        "rows.csv",
        b"instruction,output\nok,fine\n\"multi\nline\",x,extra\nbad,\xff\xfe\nlast,one\n",
    );
    let rows = read_file(&p).unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(
        rows[0].as_ref().unwrap().value,
        serde_json::json!({"instruction": "ok", "output": "fine"})
    );
    let long = rows[1].as_ref().unwrap_err();
    assert_eq!(long.location, Location::Line(3));
    assert_eq!(
        long.to_string(),
        format!(
            "{} line 3: invalid example (3 fields, the header has 2)",
            p.display()
        )
    );
    let utf8 = rows[2].as_ref().unwrap_err();
    assert_eq!(utf8.location, Location::Line(5));
    assert_eq!(utf8.reason.kind(), "invalid utf-8");
    assert_eq!(rows[3].as_ref().unwrap().location, Location::Line(6));
}

#[test]
fn csv_columns_are_typed_per_chunk_of_ten_thousand_rows_as_pandas_does() {
    // pandas types each 10 000-row chunk on its own: a boolean column stays boolean in the first chunk even when
    // a later chunk has text in it.
    let tmp = tempfile::tempdir().unwrap();
    let mut text = String::from("q,tag\n");
    for i in 0..10_000 {
        text.push_str(&format!(
            "q{i},{}\n",
            if i % 2 == 0 { "True" } else { "false" }
        ));
    }
    text.push_str("last,maybe\n");
    let p = write(tmp.path(), "tags.csv", text.as_bytes());
    let rows = read_file(&p).unwrap();
    assert_eq!(rows.len(), 10_001);
    assert_eq!(rows[0].as_ref().unwrap().value["tag"], Value::Bool(true));
    assert_eq!(
        rows[9_999].as_ref().unwrap().value["tag"],
        Value::Bool(false)
    );
    assert_eq!(
        rows[10_000].as_ref().unwrap().value["tag"],
        Value::from("maybe")
    );
}

#[test]
fn broken_files_name_the_file_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let good = std::fs::read(dir().join("alpaca.parquet")).unwrap();
    let truncated = write(tmp.path(), "cut.parquet", &good[..good.len() / 2]);
    let err = read_file(&truncated).err().unwrap();
    assert!(matches!(err, DataError::BadTable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("cut.parquet") && msg.contains("not a readable parquet file"),
        "{msg}"
    );
    assert!(msg.contains("re-download or re-export"), "{msg}");

    let not_arrow = write(tmp.path(), "text.arrow", b"{\"instruction\": \"hi\"}\n");
    let msg = read_file(&not_arrow).err().unwrap().to_string();
    assert!(
        msg.contains("text.arrow") && msg.contains("not a readable Arrow file"),
        "{msg}"
    );
}

#[test]
fn a_folder_may_mix_json_and_jsonl_but_not_other_types() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("data");
    std::fs::create_dir(&folder).unwrap();
    write(
        &folder,
        "a.json",
        br#"[{"instruction": "a", "output": "b"}]"#,
    );
    write(
        &folder,
        "b.jsonl",
        br#"{"instruction": "c", "output": "d"}"#,
    );
    let reg = registry(&[(
        "mixed",
        serde_json::json!({"file_name": folder.to_string_lossy()}),
    )]);
    let cache = tempfile::tempdir().unwrap();
    let loaded = load_examples(&options(reg.path(), &["mixed"], None, cache.path())).unwrap();
    assert_eq!(loaded.train.len(), 2);

    std::fs::copy(dir().join("alpaca.parquet"), folder.join("c.parquet")).unwrap();
    let err = load_examples(&options(reg.path(), &["mixed"], None, cache.path()))
        .err()
        .unwrap();
    assert!(matches!(err, DataError::MixedFolder { .. }), "{err:?}");
    assert!(err.to_string().contains("json, parquet"), "{err}");
}

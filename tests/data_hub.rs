//! Hub datasets (`hf_hub_url`, `dataset_dir: ONLINE`): the data files chosen as Hugging Face `datasets` chooses
//! them (tests/fixtures/hub_layouts.json, from scripts/hub_layout_reference.py), a real download from a loopback
//! server speaking the Hub's protocol into the standard cache, offline use of that cache, and the errors.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use termtune::data::hub::{HubSource, choose_files};
use termtune::data::pipeline::{fetch_hub_datasets, load_examples};
use termtune::data::{DataError, DataOptions};
use termtune::engine::hub::{HubOptions, HubProgress};

use crate::data_util::options;
use crate::hub_cache::{dead_endpoint, opts as hub, serve_repo};

#[test]
fn data_files_are_chosen_as_hugging_face_datasets_chooses_them() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hub_layouts.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 14);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let listed: Vec<String> = case["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        let src = HubSource {
            repo: "org/data".into(),
            subset: case["subset"].as_str().map(str::to_string),
            folder: case["folder"].as_str().map(str::to_string),
        };
        let readme = case["readme"].as_str();
        match case.get("splits") {
            Some(splits) => {
                for (split, files) in splits.as_object().unwrap() {
                    let want: Vec<String> = files
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|f| f.as_str().unwrap().to_string())
                        .collect();
                    let got = choose_files(&src, split, &listed, readme)
                        .unwrap_or_else(|e| panic!("{name} {split}: {e}"));
                    assert_eq!(got, want, "{name}: split {split}");
                }
                let err = choose_files(&src, "nosuch", &listed, readme).unwrap_err();
                assert!(
                    err.starts_with("no split `nosuch` (its splits: "),
                    "{name}: {err}"
                );
            }
            None => {
                let err = choose_files(&src, "train", &listed, readme).unwrap_err();
                let want = case["error"].as_str().unwrap();
                // datasets: "BuilderConfig 'nope' not found. Available: [...]" / "Config name is missing."
                if want.contains("not found") {
                    assert_eq!(
                        err,
                        "no subset `nope`; its subsets (configs of README.md): default, chat, extra; fix `subset` in dataset_info.json"
                    );
                } else {
                    assert!(want.contains("Config name is missing"), "{want}");
                    assert_eq!(
                        err,
                        "several subsets (a, b) and no default; set `subset` in dataset_info.json"
                    );
                }
            }
        }
    }
}

const REPO: &str = "llamafactory/alpaca_demo_parquet";
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tabular")
            .join(name),
    )
    .unwrap()
}

/// A registry with `alpaca_hub` → REPO and `alpaca_local` → the same rows as a local parquet file.
fn registry(extra: &[(&str, Value)]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let local: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tabular/alpaca.parquet");
    let mut info = serde_json::json!({
        "alpaca_hub": {"hf_hub_url": REPO},
        "alpaca_local": {"file_name": local.to_string_lossy()},
    });
    for (k, v) in extra {
        info[*k] = v.clone();
    }
    std::fs::write(tmp.path().join("dataset_info.json"), info.to_string()).unwrap();
    tmp
}

fn load(
    reg: &Path,
    name: &str,
    hub_opts: HubOptions,
    cache: &Path,
) -> Result<Vec<String>, DataError> {
    let opts = DataOptions {
        hub: Some(hub_opts),
        ..options(reg, &[name], None, cache)
    };
    load_examples(&opts).map(|l| {
        l.train
            .iter()
            .map(|e| format!("{:?} → {:?}", e.prompt, e.response))
            .collect()
    })
}

#[test]
fn a_hub_dataset_downloads_into_the_cache_then_loads_offline() {
    let card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n---\n# demo\n";
    let files = vec![
        (
            ".gitattributes".to_string(),
            b"*.parquet filter=lfs".to_vec(),
        ),
        ("README.md".to_string(), card.as_bytes().to_vec()),
        (
            "data/train-00000-of-00001.parquet".to_string(),
            fixture("alpaca.parquet"),
        ),
        (
            "data/test-00000-of-00001.parquet".to_string(),
            b"never fetched".to_vec(),
        ),
    ];
    let auth = Arc::new(Mutex::new(Vec::new()));
    let endpoint = serve_repo(
        format!("/api/datasets/{REPO}/revision/main"),
        format!("/datasets/{REPO}/resolve/main/"),
        files,
        20,
        auth,
    );
    let reg = registry(&[]);
    let hub_cache = tempfile::tempdir().unwrap();
    let data_cache = tempfile::tempdir().unwrap();
    let want = load(
        reg.path(),
        "alpaca_local",
        hub(hub_cache.path(), true, "x"),
        data_cache.path(),
    )
    .unwrap();
    assert_eq!(want.len(), 16);
    // A run fetches first, reporting the downloads (the train shard and the card; not the test shard).
    let mut events = Vec::new();
    let fetch_opts = DataOptions {
        hub: Some(hub(hub_cache.path(), false, &endpoint)),
        ..options(reg.path(), &["alpaca_hub"], None, data_cache.path())
    };
    fetch_hub_datasets(&fetch_opts, &mut |p| events.push(p.clone())).unwrap();
    let shard = "data/train-00000-of-00001.parquet".to_string();
    assert!(events.contains(&HubProgress::Start {
        file: shard.clone(),
        bytes: fixture("alpaca.parquet").len() as u64
    }));
    assert!(events.contains(&HubProgress::Done { file: shard }));
    assert!(events.contains(&HubProgress::Done {
        file: "README.md".into()
    }));
    assert!(
        !events
            .iter()
            .any(|e| format!("{e:?}").contains("test-0000"))
    );
    let got = load(
        reg.path(),
        "alpaca_hub",
        hub(hub_cache.path(), false, &endpoint),
        data_cache.path(),
    )
    .unwrap();
    assert_eq!(got, want);
    // The standard cache layout (what `huggingface_hub` writes and reads).
    let repo_dir = hub_cache
        .path()
        .join("datasets--llamafactory--alpaca_demo_parquet");
    let snaps: Vec<_> = std::fs::read_dir(repo_dir.join("snapshots"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(snaps.len(), 1);
    let snap = snaps[0].path();
    assert!(snap.join("data/train-00000-of-00001.parquet").is_file());
    assert!(
        !snap.join("data/test-00000-of-00001.parquet").exists(),
        "only the train split is fetched"
    );
    // Offline (HF_HUB_OFFLINE), and with the Hub unreachable, the cached snapshot serves.
    let offline = load(
        reg.path(),
        "alpaca_hub",
        hub(hub_cache.path(), true, "x"),
        data_cache.path(),
    )
    .unwrap();
    assert_eq!(offline, want);
    let unreachable = load(
        reg.path(),
        "alpaca_hub",
        hub(hub_cache.path(), false, &dead_endpoint()),
        data_cache.path(),
    )
    .unwrap();
    assert_eq!(unreachable, want);
    // dataset_dir: ONLINE names the repo directly.
    let online = DataOptions {
        hub: Some(hub(hub_cache.path(), true, "x")),
        ..options(Path::new("ONLINE"), &[REPO], None, data_cache.path())
    };
    assert_eq!(load_examples(&online).unwrap().train.len(), 16);
}

#[test]
fn hub_errors_name_the_dataset_the_repo_and_the_fix() {
    let reg = registry(&[
        (
            "test_split",
            serde_json::json!({"hf_hub_url": REPO, "split": "validation"}),
        ),
        (
            "ms_only",
            serde_json::json!({"ms_hub_url": "AI-ModelScope/alpaca"}),
        ),
        ("script", serde_json::json!({"script_url": "my_script"})),
    ]);
    let hub_cache = tempfile::tempdir().unwrap();
    let data_cache = tempfile::tempdir().unwrap();
    let err = |name: &str, h: HubOptions| {
        load(reg.path(), name, h, data_cache.path())
            .unwrap_err()
            .to_string()
    };

    let e = err("alpaca_hub", hub(hub_cache.path(), true, "x"));
    assert!(
        e.starts_with(&format!("dataset `alpaca_hub` (Hugging Face Hub `{REPO}`): offline mode is on (HF_HUB_OFFLINE), and the hub cache ("))
            && e.contains(&format!("huggingface-cli download --repo-type dataset {REPO}")),
        "{e}"
    );
    let e = err("alpaca_hub", hub(hub_cache.path(), false, &dead_endpoint()));
    assert!(
        e.contains("did not answer") && e.contains("run once online"),
        "{e}"
    );

    // A cached snapshot without the asked split.
    let repo_dir = hub_cache
        .path()
        .join("datasets--llamafactory--alpaca_demo_parquet");
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), SHA).unwrap();
    let snap = repo_dir.join("snapshots").join(SHA);
    std::fs::create_dir_all(snap.join("data")).unwrap();
    std::fs::write(
        snap.join("data/train-00000-of-00001.parquet"),
        fixture("alpaca.parquet"),
    )
    .unwrap();
    let e = err("test_split", hub(hub_cache.path(), true, "x"));
    assert_eq!(
        e,
        format!(
            "dataset `test_split` (Hugging Face Hub `{REPO}`): no split `validation` (its splits: train); fix `split` in dataset_info.json"
        )
    );

    let e = err("ms_only", hub(hub_cache.path(), true, "x"));
    assert!(e.starts_with("dataset `ms_only` comes from ModelScope (`AI-ModelScope/alpaca`), which termtune does not load; "), "{e}");
    let e = err("script", hub(hub_cache.path(), true, "x"));
    assert!(
        e.contains("a loading script") && e.contains("register them with `file_name`"),
        "{e}"
    );
    let e = err("nosuch", hub(hub_cache.path(), true, "x"));
    assert!(
        e.contains("alpaca_local, and 2 on the Hugging Face Hub"),
        "{e}"
    );
}

#[test]
fn every_entry_of_llamafactorys_registry_resolves_or_says_why_not() {
    use termtune::data::registry::{DataSource, resolve_all};
    let dir = crate::data_util::lf_data_dir();
    let registry = termtune::data::registry::load_registry(&dir).unwrap();
    let (mut local, mut hub, mut media, mut other) = (0, 0, 0, Vec::new());
    for name in registry.keys() {
        match resolve_all(&dir, std::slice::from_ref(name)) {
            Ok(attrs) => match &attrs[0].source {
                DataSource::Local(_) => local += 1,
                DataSource::Hub(src) => {
                    hub += 1;
                    if name == "alpaca_en" {
                        assert_eq!(src.repo, "llamafactory/alpaca_en");
                    }
                    if name == "dpo_mix_en" {
                        assert_eq!(src.subset.as_deref(), Some("en"));
                        assert!(attrs[0].ranking);
                    }
                }
            },
            Err(DataError::Unsupported { .. }) => media += 1,
            Err(DataError::OtherSource { what, .. }) => other.push((name.clone(), what)),
            Err(e) => panic!("{name}: {e}"),
        }
    }
    // Counted in the llamafactory 0.9.5 archive's data/dataset_info.json with Python: 104 entries; 14 with
    // `file_name` and 89 with `hf_hub_url`, of which 4 and 9 have image/video/audio columns; `deepctrl` is on
    // ModelScope only.
    assert_eq!((local, hub, media), (10, 80, 13));
    assert_eq!(other, vec![("deepctrl".to_string(), "ModelScope")]);
}

#[test]
fn a_missing_or_gated_repo_says_so() {
    // The Hub answers 404 for a repo it does not have (and for a private one without a token).
    let endpoint = serve_repo(
        "/api/datasets/other/repo/revision/main".into(),
        "/datasets/other/repo/resolve/main/".into(),
        Vec::new(),
        4,
        Arc::new(Mutex::new(Vec::new())),
    );
    let reg = registry(&[]);
    let hub_cache = tempfile::tempdir().unwrap();
    let data_cache = tempfile::tempdir().unwrap();
    let e = load(
        reg.path(),
        "alpaca_hub",
        hub(hub_cache.path(), false, &endpoint),
        data_cache.path(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with(&format!(
            "dataset `alpaca_hub` (Hugging Face Hub `{REPO}`): the Hub at {endpoint} has no such dataset, and the hub cache ("
        )) && e.ends_with(
            "does not hold it; fix `hf_hub_url` in dataset_info.json (a private repo also needs HF_TOKEN or `hf_hub_token`)"
        ),
        "{e}"
    );
}

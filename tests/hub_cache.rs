//! Hub ids resolved through the standard Hugging Face cache layout built in a temp folder, offline and cache-first,
//! the error messages when the model is not there, environment handling, and a real download from a loopback
//! server speaking the Hub's file protocol (as hf-hub 0.5 uses it).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use termtune::engine::hub::{
    HubError, HubOptions, HubProgress, cached_snapshot, looks_like_hub_id, model_cache_dir, resolve,
};

const ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
const SHA: &str = "12fd25f77366fa6b3b4b768ec3050bf629380bac";

pub(crate) fn opts(cache: &Path, offline: bool, endpoint: &str) -> HubOptions {
    HubOptions {
        cache_dir: cache.to_path_buf(),
        endpoint: endpoint.to_string(),
        token: None,
        offline,
        revision: "main".into(),
    }
}

/// Lays out `files` the way huggingface_hub does: blobs named by etag, snapshot entries as relative symlinks.
fn populate(cache: &Path, id: &str, files: &[(&str, &str)]) -> PathBuf {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snap = repo.join("snapshots").join(SHA);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), SHA).unwrap();
    for (i, (name, body)) in files.iter().enumerate() {
        let etag = format!("{i:040x}");
        std::fs::write(repo.join("blobs").join(&etag), body).unwrap();
        let link = snap.join(name);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let depth = name.matches('/').count();
        let target = format!("{}../../blobs/{etag}", "../".repeat(depth));
        std::os::unix::fs::symlink(target, &link).unwrap();
    }
    snap
}

/// An endpoint where nothing listens (a port just released by the OS).
pub(crate) fn dead_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

fn noop(_: &HubProgress) {}

#[test]
fn offline_hub_id_resolves_from_prepopulated_cache() {
    let cache = tempfile::tempdir().unwrap();
    let snap = populate(
        cache.path(),
        ID,
        &[
            ("config.json", r#"{"model_type": "llama"}"#),
            ("tokenizer.json", "{}"),
            ("model.safetensors", "weights"),
        ],
    );
    let got = resolve(ID, &opts(cache.path(), true, &dead_endpoint()), &mut noop).unwrap();
    assert_eq!(got, snap);
    assert_eq!(
        std::fs::read_to_string(got.join("config.json")).unwrap(),
        r#"{"model_type": "llama"}"#
    );
    assert_eq!(
        model_cache_dir(ID, &opts(cache.path(), true, "")),
        snap.parent().unwrap().parent().unwrap()
    );

    // Not offline, Hub unreachable: the complete cached snapshot is used without asking the network.
    let got = resolve(ID, &opts(cache.path(), false, &dead_endpoint()), &mut noop).unwrap();
    assert_eq!(got, snap);
}

#[test]
fn sharded_snapshot_needs_every_shard() {
    let cache = tempfile::tempdir().unwrap();
    let index = r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;
    populate(
        cache.path(),
        ID,
        &[
            ("config.json", "{}"),
            ("model.safetensors.index.json", index),
            ("model-00001-of-00002.safetensors", "1"),
        ],
    );
    let o = opts(cache.path(), true, &dead_endpoint());
    assert!(cached_snapshot(ID, &o).is_none());
    assert!(matches!(
        resolve(ID, &o, &mut noop),
        Err(HubError::NotCached { .. })
    ));
    let repo = model_cache_dir(ID, &o);
    std::fs::write(
        repo.join("snapshots")
            .join(SHA)
            .join("model-00002-of-00002.safetensors"),
        "2",
    )
    .unwrap();
    assert!(cached_snapshot(ID, &o).is_some());
}

#[test]
fn missing_model_errors_name_the_id_and_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let cache_s = cache.path().display().to_string();
    let err = resolve(ID, &opts(cache.path(), true, &dead_endpoint()), &mut noop)
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(matches!(err, HubError::NotCached { .. }));
    assert!(
        msg.contains(ID) && msg.contains(&cache_s) && msg.contains("HF_HUB_OFFLINE"),
        "{msg}"
    );

    let endpoint = dead_endpoint();
    let err = resolve(ID, &opts(cache.path(), false, &endpoint), &mut noop)
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(matches!(err, HubError::Unreachable { .. }), "{msg}");
    assert!(
        msg.contains(ID) && msg.contains(&cache_s) && msg.contains(&endpoint),
        "{msg}"
    );

    let msg = resolve("../etc/passwd", &opts(cache.path(), true, ""), &mut noop)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("not a hub id"), "{msg}");
}

#[test]
fn hub_ids_are_told_from_paths() {
    assert!(looks_like_hub_id(ID));
    assert!(looks_like_hub_id("Qwen/Qwen2.5-0.5B-Instruct"));
    assert!(!looks_like_hub_id("model.gguf"));
    assert!(!looks_like_hub_id("/abs/path"));
    assert!(!looks_like_hub_id("./org/name"));
    assert!(!looks_like_hub_id("a/b/c"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("org/name")).unwrap();
    let local = dir.path().join("org/name");
    assert!(!looks_like_hub_id(local.to_str().unwrap()));
}

#[test]
fn environment_follows_huggingface_hub_precedence() {
    let home = tempfile::tempdir().unwrap();
    let hf_home = home.path().join("hf");
    std::fs::create_dir_all(&hf_home).unwrap();
    std::fs::write(hf_home.join("token"), "hf_file_token\n").unwrap();
    let env = |pairs: &[(&str, String)]| {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        HubOptions::from_vars(move |k| m.get(k).cloned())
    };
    let h = home.path().display().to_string();
    let o = env(&[("HOME", h.clone())]);
    assert_eq!(o.cache_dir, home.path().join(".cache/huggingface/hub"));
    assert_eq!(o.endpoint, "https://huggingface.co");
    assert!(!o.offline && o.token.is_none());

    let o = env(&[("HOME", h.clone()), ("XDG_CACHE_HOME", "/x".into())]);
    assert_eq!(o.cache_dir, PathBuf::from("/x/huggingface/hub"));

    let hh = hf_home.display().to_string();
    let o = env(&[("HOME", h.clone()), ("HF_HOME", hh.clone())]);
    assert_eq!(o.cache_dir, hf_home.join("hub"));
    assert_eq!(o.token.as_deref(), Some("hf_file_token"));

    let o = env(&[
        ("HF_HOME", hh.clone()),
        ("HF_HUB_CACHE", "/c".into()),
        ("HF_TOKEN", "hf_env".into()),
        ("HF_HUB_OFFLINE", "1".into()),
        ("HF_ENDPOINT", "http://mirror.local/".into()),
    ]);
    assert_eq!(o.cache_dir, PathBuf::from("/c"));
    assert_eq!(o.token.as_deref(), Some("hf_env"));
    assert!(o.offline);
    assert_eq!(o.endpoint, "http://mirror.local");
    for (v, off) in [
        ("true", true),
        ("YES", true),
        ("on", true),
        ("0", false),
        ("no", false),
    ] {
        assert_eq!(env(&[("HF_HUB_OFFLINE", v.into())]).offline, off, "{v}");
    }
    let o = env(&[("HUGGINGFACE_HUB_CACHE", "/legacy".into())]);
    assert_eq!(o.cache_dir, PathBuf::from("/legacy"));
}

/// A loopback server answering the requests hf-hub 0.5 makes: repo info, then per file a `Range: bytes=0-0`
/// metadata probe (etag, x-repo-commit, content-range) and the ranged download. Serves at most `max` connections.
fn serve(files: Vec<(&'static str, Vec<u8>)>, max: usize) -> String {
    serve_logged(files, max, Arc::new(Mutex::new(Vec::new())))
}

/// [`serve`], recording every request's `Authorization` header (or "none") in `auth`.
fn serve_logged(
    files: Vec<(&'static str, Vec<u8>)>,
    max: usize,
    auth: Arc<Mutex<Vec<String>>>,
) -> String {
    let files = files.into_iter().map(|(n, b)| (n.to_string(), b)).collect();
    serve_repo(
        format!("/api/models/{ID}/revision/main"),
        format!("/{ID}/resolve/main/"),
        files,
        max,
        auth,
    )
}

/// The loopback Hub for one repository: `info` answers the repo-info request (siblings = `files`),
/// `resolve` prefixes the file downloads (`/{id}/resolve/main/` for a model, `/datasets/{id}/resolve/main/` for a
/// dataset). Serves at most `max` connections, recording each request's `Authorization` header in `auth`.
pub(crate) fn serve_repo(
    info: String,
    resolve: String,
    files: Vec<(String, Vec<u8>)>,
    max: usize,
    auth: Arc<Mutex<Vec<String>>>,
) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut range_start = None;
            let mut authorization = String::from("none");
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
                let lower = h.to_ascii_lowercase();
                if lower.starts_with("authorization:") {
                    authorization = h.trim_end().to_string();
                }
                if let Some(r) = lower.strip_prefix("range: bytes=") {
                    let (a, b) = r.trim().split_once('-').unwrap();
                    range_start = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().ok()));
                }
            }
            auth.lock().unwrap().push(authorization);
            let (status, headers, body) = if path == info {
                let siblings: Vec<_> = files
                    .iter()
                    .map(|(n, _)| serde_json::json!({"rfilename": n}))
                    .collect();
                let body = serde_json::json!({"sha": SHA, "siblings": siblings}).to_string();
                (
                    "200 OK",
                    String::from("Content-Type: application/json\r\n"),
                    body.into_bytes(),
                )
            } else if let Some(name) = path.strip_prefix(resolve.as_str()) {
                match files.iter().position(|(n, _)| *n == name) {
                    Some(i) => {
                        let data = &files[i].1;
                        let (a, b) = range_start.unwrap_or((0, None));
                        let b = b.unwrap_or(data.len() - 1).min(data.len() - 1);
                        let headers = format!(
                            "ETag: \"etag{i:036}\"\r\nX-Repo-Commit: {SHA}\r\nContent-Range: bytes {a}-{b}/{}\r\n",
                            data.len()
                        );
                        ("206 Partial Content", headers, data[a..=b].to_vec())
                    }
                    None => ("404 Not Found", String::new(), b"no such file".to_vec()),
                }
            } else {
                ("404 Not Found", String::new(), b"no such repo".to_vec())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    format!("http://{addr}")
}

#[test]
fn download_fills_the_standard_cache_with_progress() {
    let weights = vec![7u8; 300_000];
    let auth = Arc::new(Mutex::new(Vec::new()));
    let endpoint = serve_logged(
        vec![
            ("config.json", br#"{"model_type": "qwen2"}"#.to_vec()),
            ("tokenizer.json", b"{}".to_vec()),
            ("README.md", b"not fetched".to_vec()),
            ("model.safetensors", weights.clone()),
        ],
        20,
        auth.clone(),
    );
    let cache = tempfile::tempdir().unwrap();
    let mut events = Vec::new();
    let with_token = HubOptions {
        token: Some("hf_test_token".into()),
        ..opts(cache.path(), false, &endpoint)
    };
    let snap = resolve(ID, &with_token, &mut |p| events.push(p.clone())).unwrap();
    // HF_TOKEN (HubOptions::token) goes to the Hub on every request as a bearer token.
    let seen = auth.lock().unwrap().clone();
    assert!(seen.len() >= 7, "{seen:?}");
    assert!(
        seen.iter()
            .all(|a| a.eq_ignore_ascii_case("authorization: Bearer hf_test_token")),
        "{seen:?}"
    );
    let repo = model_cache_dir(ID, &opts(cache.path(), false, &endpoint));
    assert_eq!(snap, repo.join("snapshots").join(SHA));
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        SHA
    );
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        weights
    );
    assert!(
        std::fs::symlink_metadata(snap.join("config.json"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(!snap.join("README.md").exists());
    assert!(events.contains(&HubProgress::Start {
        file: "model.safetensors".into(),
        bytes: 300_000
    }));
    assert!(events.iter().any(|e| matches!(e,
        HubProgress::Advance { file, done, total } if file == "model.safetensors" && *done == 300_000 && *total == 300_000)));
    assert!(events.contains(&HubProgress::Done {
        file: "config.json".into()
    }));
    // A second resolve is served from the cache, offline.
    let again = resolve(ID, &opts(cache.path(), true, &dead_endpoint()), &mut noop).unwrap();
    assert_eq!(again, snap);
}

#[test]
fn a_cached_snapshot_without_tokenizer_json_is_completed_online() {
    let cache = tempfile::tempdir().unwrap();
    let snap = populate(
        cache.path(),
        ID,
        &[("config.json", "{}"), ("model.safetensors", "w")],
    );
    // Offline: config + weights are enough.
    assert_eq!(
        resolve(ID, &opts(cache.path(), true, &dead_endpoint()), &mut noop).unwrap(),
        snap
    );
    // Online: tokenizer.json is fetched, the cached files are not downloaded again.
    let endpoint = serve(
        vec![
            ("config.json", b"{}".to_vec()),
            ("tokenizer.json", b"{\"v\": 1}".to_vec()),
            ("model.safetensors", b"w".to_vec()),
        ],
        10,
    );
    let mut events = Vec::new();
    let got = resolve(ID, &opts(cache.path(), false, &endpoint), &mut |p| {
        events.push(p.clone())
    })
    .unwrap();
    assert_eq!(got, snap);
    assert_eq!(
        std::fs::read_to_string(snap.join("tokenizer.json")).unwrap(),
        "{\"v\": 1}"
    );
    assert!(events.contains(&HubProgress::Cached {
        file: "model.safetensors".into()
    }));
    assert!(events.contains(&HubProgress::Done {
        file: "tokenizer.json".into()
    }));
}

#[test]
fn repository_without_safetensors_is_refused() {
    let endpoint = serve(
        vec![
            ("config.json", b"{}".to_vec()),
            ("pytorch_model.bin", b"pickle".to_vec()),
        ],
        10,
    );
    let cache = tempfile::tempdir().unwrap();
    let msg = resolve(ID, &opts(cache.path(), false, &endpoint), &mut noop)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("safetensors or GGUF only"), "{msg}");
}

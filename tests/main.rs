//! All integration tests, linked into one test binary: each `tests/*.rs` is a module here.
//!
//! One binary instead of one per file: with candle statically linked, every test binary is
//! tens of megabytes, and linking two dozen of them cost CI minutes and gigabytes of disk.
//! Run one file's tests with its module name as the filter, e.g. `cargo test --test integration trainer::`.
#![allow(clippy::unwrap_used)]

/// The program's allocator (src/main.rs), so engine_bench's times and memory are the program's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod data_util;
mod tiny_util;

mod api;
mod architecture;
mod chat_smollm2;
mod chat_worker;
mod config_errors;
mod data_bad_rows;
mod data_bench;
mod data_datasets;
mod data_hub;
mod data_labels_packing;
mod data_tabular;
mod engine;
mod engine_bench;
mod export;
mod gguf_loader;
mod gguf_mirror;
mod gguf_reference;
mod gguf_smollm2;
mod gpu;
mod hub_cache;
mod identity_smollm2;
mod image_text;
mod kto_rm;
mod lf_demo_data;
mod nf4;
mod peft_variants;
mod pissa;
mod predict;
mod predict_metrics;
mod pref;
mod presets;
mod quantized;
mod rope_config;
#[cfg(unix)]
mod runs;
mod template_golden;
mod template_jinja;
mod template_lf_reference;
mod tokenizer_families;
mod tokenizer_gguf;
mod trainer;
mod tui_app;
mod tui_export;
mod tui_mouse;
mod tui_tmux;
mod ui_snapshots;

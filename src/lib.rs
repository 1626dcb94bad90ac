//! termtune: fine-tune LLMs from a terminal.
//!
//! Module groups:
//! - [`config`]: presets (LLaMA-Factory's flat YAML keys), validation, resolution.
//! - [`engine`]: candle model, LoRA, adapters, model sources, generation (never imports the UI).
//! - [`data`]: datasets, chat templates, label masking, packing (UI-free).
//! - [`trainer`]: schedules, optimizer, run folder, the training loop.
//! - [`chat`], [`export`], [`bench`]: what users do with a model besides training.
//! - [`app`], [`ui`], [`tui`]: the terminal UI (state + update, pure rendering, the event loop).
//! - [`runs`]: detached runs, their registry and control socket (`termtune runs`, `termtune attach`).
//! - [`telemetry`]: GPU (NVML) and system readings.
//! - [`cli`], [`commands`], [`headless`], [`logging`], [`panic`]: the edges.
pub mod api;
pub mod app;
pub mod bench;
pub mod chat;
pub mod cli;
pub mod commands;
pub mod config;
pub mod data;
pub mod engine;
pub mod export;
pub mod fsutil;
pub mod headless;
pub mod logging;
pub mod panic;
pub mod predict;
pub mod resolve;
pub mod runs;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trainer;
pub mod tui;
pub mod ui;

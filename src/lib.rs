//! termtune: fine-tune LLMs from a terminal.
//!
//! Module groups:
//! - `config`: presets (LLaMA-Factory's flat YAML keys), validation, resolution.
//! - `engine`: candle model, LoRA, adapters, generation, training (never imports the UI).
//! - `data`: datasets, chat templates, label masking, packing (UI-free).
//! - `cli`, `logging`, `panic`: the edges.

pub mod data;

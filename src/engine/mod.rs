//! The engine: model sources, model, LoRA, generation, training (never imports the UI).

pub mod gguf;
pub mod hub;
pub mod mirror;
pub mod tokenizer;

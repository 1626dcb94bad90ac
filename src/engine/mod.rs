//! The engine: a trainable llama-family transformer on candle, LoRA/freeze/full fine-tuning parameters,
//! PEFT adapter files, model sources (folders, GGUF, hub, PyPI mirror), tokenizers and generation.
//! Never imports the UI.
//!
//! Keep this file to module declarations and re-exports (several helpers add modules here).

pub mod adapter;
pub mod arch;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod mirror;
pub mod model;
pub mod ops;
pub mod source;
pub mod testing;
pub mod tokenizer;
pub mod weights;

pub use arch::{ArchKind, ModelConfig};
pub use error::EngineError;
pub use model::{AttnMask, Finetune, KvCache, LoraSpec, LoraTargets, Model};
pub use weights::ModelFiles;

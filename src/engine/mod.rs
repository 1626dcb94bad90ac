//! The engine: a trainable llama-family transformer on candle, LoRA/freeze/full fine-tuning parameters,
//! PEFT adapter files, model sources (folders, GGUF, hub, PyPI mirror), tokenizers and generation.
//! Never imports the UI.
//!
//! Sources: a local HF folder ([`weights::load_hf_folder`] → [`Model::from_files`]) or any HF-named tensor map
//! with its config.json value ([`Model::from_tensors`], e.g. a GGUF file converted by `engine::gguf`).
//! Chat: [`generate::load_chat_model`] / [`generate::ChatModel::new`] then [`generate::chat_completion`].
//!
//! Keep this file to module declarations and re-exports (several helpers add modules here).

pub mod adapter;
pub mod arch;
pub mod bnb4;
pub mod device;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod kquants;
pub mod layer;
pub mod legacy_quants;
pub mod memory;
pub mod mirror;
pub mod model;
pub mod ops;
pub mod pissa;
pub mod profile;
pub mod qweight;
pub mod rope_ext;
pub mod source;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tokenizer;
pub mod value_head;
pub mod weights;

pub use arch::{ArchKind, ModelConfig};
pub use error::EngineError;
pub use generate::{ChatModel, GenerationParams, StopReason};
pub use model::{
    AttnMask, Finetune, HostInputs, KvCache, LoraSpec, LoraTargets, Model, SequenceLogps,
};
pub use value_head::ValueHead;
pub use weights::ModelFiles;

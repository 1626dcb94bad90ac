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
pub mod device;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod layer;
pub mod memory;
pub mod mirror;
pub mod model;
pub mod ops;
pub mod source;
pub mod testing;
pub mod tokenizer;
pub mod weights;

/// candle allocates a fresh buffer for every op result; with glibc each large one was mapped, page-faulted and
/// zeroed anew. mimalloc reuses freed pages: single-thread CPU time per 4×256 step 5.17–5.71 s with glibc,
/// 4.38–4.65 s with mimalloc (`cargo test --release --test integration engine_bench -- --ignored --nocapture`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub use arch::{ArchKind, ModelConfig};
pub use error::EngineError;
pub use generate::{ChatModel, GenerationParams, StopReason};
pub use model::{AttnMask, Finetune, KvCache, LoraSpec, LoraTargets, Model};
pub use weights::ModelFiles;

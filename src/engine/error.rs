//! The engine's error type.

use std::path::PathBuf;

/// Everything that can go wrong in `engine` (loading, building, training, generating).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("config.json: `model_type` {found:?} is not supported; supported: {supported}")]
    UnsupportedModelType { found: String, supported: String },
    #[error("config.json: missing or invalid key `{key}` ({why})")]
    ConfigKey { key: String, why: String },
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error(
        "{path}: pickle checkpoints (*.bin, *.pt, *.pth) are refused because loading them can run code; \
         convert the model to safetensors (e.g. `save_pretrained(..., safe_serialization=True)`) or use a GGUF file"
    )]
    PickleRefused { path: PathBuf },
    #[error("weights: tensor `{name}` is missing; the checkpoint does not match config.json")]
    MissingTensor { name: String },
    #[error("weights: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("adapter {path}: {why}")]
    Adapter { path: PathBuf, why: String },
    #[error(
        "lora_target: unknown module `{0}`; use `all` or a comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    UnknownLoraTarget(String),
    #[error("{0}")]
    Invalid(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("json {context}: {source}")]
    Json {
        context: String,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for the engine.
pub type Result<T> = std::result::Result<T, EngineError>;

impl EngineError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
    pub(crate) fn key(key: impl Into<String>, why: impl Into<String>) -> Self {
        Self::ConfigKey {
            key: key.into(),
            why: why.into(),
        }
    }
}

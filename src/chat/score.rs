//! A reward model's scores (`termtune score`): the base model with the rm run's adapter merged, its value head,
//! and the template. A (prompt, answer) pair is encoded as stage rm trains on it (the prompt turn and the answer
//! turn of the template, `encode_oneturn`) and scored at its last token, as LLaMA-Factory's `PairwiseTrainer`
//! reads the value head.

use candle_core::{DType, Device, Tensor};

use super::{ChatError, LoadedInfo, load_parts};
use crate::config::Preset;
use crate::data::process::encode_answer;
use crate::data::{Encoder, Message, Role};
use crate::engine::source::SourceProgress;
use crate::engine::{AttnMask, Model, ValueHead};
use crate::resolve::value_head_dir;

/// A loaded reward model.
pub struct Scorer {
    model: Model,
    encoder: Encoder,
    head: ValueHead,
    pub info: LoadedInfo,
    /// Where the value head was read from.
    pub head_dir: std::path::PathBuf,
}

impl Scorer {
    /// Loads `preset`'s model and adapters and the value head beside the last adapter (or in the model folder).
    pub fn load(
        preset: &Preset,
        device: &Device,
        progress: &mut dyn FnMut(SourceProgress),
    ) -> Result<Scorer, ChatError> {
        let Some(head_dir) = value_head_dir(preset) else {
            return Err(ChatError::Invalid(format!(
                "no value_head.safetensors beside {}: scores need a reward model trained with `stage: rm` (pass its output folder as --adapter, or as --model for full fine-tuning)",
                preset
                    .adapter_name_or_path
                    .as_deref()
                    .unwrap_or(&preset.model_name_or_path)
            )));
        };
        let (model, encoder, info) = load_parts(preset, device, progress)?;
        let head = ValueHead::load(&head_dir, model.cfg.hidden_size, device)?;
        Ok(Scorer {
            model,
            encoder,
            head,
            info,
            head_dir,
        })
    }

    /// The token ids of `prompt` answered by `answer` after `system` ("" for none), as stage rm encodes a pair's
    /// side; longer than the model's context is an error (nothing is cut).
    pub fn encode(&self, system: &str, prompt: &str, answer: &str) -> Result<Vec<u32>, ChatError> {
        let limit = self.model.cfg.max_position_embeddings;
        let seq = encode_answer(
            &self.encoder,
            &[Message::new(Role::User, prompt)],
            Message::new(Role::Assistant, answer),
            system,
            "",
            limit,
        )
        .map_err(|e| ChatError::Invalid(format!("cannot encode the pair: {e}")))?;
        if seq.truncated {
            return Err(ChatError::Invalid(format!(
                "the prompt and answer are longer than the model's context of {limit} tokens; shorten them"
            )));
        }
        Ok(seq.input_ids)
    }

    /// The reward of `answer` to `prompt`.
    pub fn score(&self, system: &str, prompt: &str, answer: &str) -> Result<f64, ChatError> {
        let ids = self.encode(system, prompt, answer)?;
        let n = ids.len();
        let t = Tensor::from_vec(ids, (1, n), &self.model.device).map_err(engine)?;
        let h = self.model.last_hidden(&t, &AttnMask::Causal, None, false)?;
        let v = self.head.forward(&h, None)?;
        Ok(v.to_dtype(DType::F64)
            .and_then(|v| v.to_vec1::<f64>())
            .map_err(engine)?[0])
    }
}

fn engine(e: candle_core::Error) -> ChatError {
    ChatError::Engine(e.into())
}

//! Checkpoint folders in LLaMA-Factory's layout (`output_dir/checkpoint-<step>/`), written so that a
//! crash never leaves a half checkpoint that looks complete: everything goes into
//! `.checkpoint-<step>.tmp/` first, and only the final rename makes it a `checkpoint-<step>`.

use std::path::{Path, PathBuf};

use crate::fsutil::StagedDir;

/// The folder name of the checkpoint after `step` optimizer updates.
pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

/// A checkpoint being written. Write files into [`PendingCheckpoint::dir`], then
/// [`PendingCheckpoint::commit`]; dropping it without committing removes the partial folder.
pub struct PendingCheckpoint(StagedDir);

impl PendingCheckpoint {
    /// Starts `output_dir/checkpoint-<step>` (in the hidden sibling `.checkpoint-<step>.tmp`).
    pub fn begin(output_dir: &Path, step: u64) -> std::io::Result<Self> {
        let name = checkpoint_name(step);
        StagedDir::begin(
            output_dir.join(format!(".{name}.tmp")),
            output_dir.join(name),
        )
        .map(Self)
    }

    /// Where to write the checkpoint's files.
    pub fn dir(&self) -> &Path {
        self.0.dir()
    }

    /// Makes the checkpoint visible (replacing an older folder of the same step).
    pub fn commit(self) -> std::io::Result<PathBuf> {
        self.0.commit()
    }
}

/// An allowance for a checkpoint's small files: `trainer_state.json` (which grows with the log history),
/// `scheduler.json`, `adapter_config.json`, `tokenizer_config.json` and the safetensors headers.
pub const SMALL_FILES_BYTES: u64 = 1 << 20;

/// The estimated size of one checkpoint folder, bytes: the trained weights as saved (`weights_bytes`: the
/// LoRA adapter in f32, or the whole model in its dtype for freeze/full), AdamW's two f32 moments per
/// trainable parameter (`optimizer.safetensors`), `tokenizer.json`, and [`SMALL_FILES_BYTES`].
pub fn estimate_checkpoint_bytes(
    weights_bytes: u64,
    trainable_params: u64,
    tokenizer_bytes: u64,
) -> u64 {
    weights_bytes
        .saturating_add(trainable_params.saturating_mul(8))
        .saturating_add(tokenizer_bytes)
        .saturating_add(SMALL_FILES_BYTES)
}

/// Complete checkpoints in `output_dir`, oldest first, as `(step, path)`.
pub fn list_checkpoints(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
            Some((step, e.path()))
        })
        .filter(|(_, p)| p.join("trainer_state.json").is_file())
        .collect();
    found.sort_by_key(|(s, _)| *s);
    found
}

/// The newest complete checkpoint (what LLaMA-Factory resumes from automatically).
pub fn latest_checkpoint(output_dir: &Path) -> Option<(u64, PathBuf)> {
    list_checkpoints(output_dir).pop()
}

/// Deletes the oldest checkpoints beyond `limit`, never `best`; returns the folders removed.
pub fn rotate(output_dir: &Path, limit: u32, best: Option<&Path>) -> std::io::Result<Vec<PathBuf>> {
    let all = list_checkpoints(output_dir);
    // The Hugging Face Trainer never removes the best checkpoint (`load_best_model_at_end`), and keeps two when
    // the limit is one and the best is not the newest.
    let best = best.filter(|b| all.iter().any(|(_, p)| p == b));
    let newest_is_best = best.is_some_and(|b| all.last().is_some_and(|(_, p)| p == b));
    let limit = if best.is_some() && limit == 1 && !newest_is_best {
        2
    } else {
        limit as usize
    };
    let excess = all.len().saturating_sub(limit);
    let mut removed = Vec::new();
    for (_, path) in all
        .into_iter()
        .filter(|(_, p)| Some(p.as_path()) != best)
        .take(excess)
    {
        std::fs::remove_dir_all(&path)?;
        removed.push(path);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn write_complete(out: &Path, step: u64) {
        let ck = PendingCheckpoint::begin(out, step).unwrap();
        std::fs::write(ck.dir().join("trainer_state.json"), "{}").unwrap();
        ck.commit().unwrap();
    }

    #[test]
    fn an_abandoned_checkpoint_leaves_nothing_that_looks_complete() {
        let dir = tempfile::tempdir().unwrap();
        write_complete(dir.path(), 2);
        {
            let ck = PendingCheckpoint::begin(dir.path(), 4).unwrap();
            std::fs::write(ck.dir().join("trainer_state.json"), "{}").unwrap();
            // dropped without commit: a crash or a failed write
        }
        assert_eq!(latest_checkpoint(dir.path()).unwrap().0, 2);
        assert!(!dir.path().join(".checkpoint-4.tmp").exists());
        // A folder without trainer_state.json (e.g. left by a killed process) is not complete.
        std::fs::create_dir_all(dir.path().join("checkpoint-9")).unwrap();
        assert_eq!(latest_checkpoint(dir.path()).unwrap().0, 2);
    }

    #[test]
    fn a_checkpoint_is_weights_plus_two_f32_moments_plus_tokenizer_and_small_files() {
        // LoRA rank 8 on q_proj and v_proj of a 2-layer, hidden-64 llama (q 64x64, v 64x64 with 4 kv heads x 16):
        // 2 layers x 2 linears x 8 x (64 + 64) = 4096 parameters, saved in f32 = 16 384 bytes; AdamW's m and v
        // in f32 = 32 768 bytes; plus a 2 MB tokenizer.json and the 1 MiB allowance.
        assert_eq!(
            estimate_checkpoint_bytes(16_384, 4096, 2_000_000),
            16_384 + 32_768 + 2_000_000 + 1_048_576
        );
        // Full fine-tuning of a 1B model in bf16: 2 GB of weights and 8 GB of optimizer state.
        assert_eq!(
            estimate_checkpoint_bytes(2_000_000_000, 1_000_000_000, 0),
            10_000_000_000 + SMALL_FILES_BYTES
        );
        assert_eq!(estimate_checkpoint_bytes(u64::MAX, u64::MAX, 1), u64::MAX);
    }

    #[test]
    fn rotation_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for s in [10, 2, 30, 20] {
            write_complete(dir.path(), s);
        }
        let removed = rotate(dir.path(), 2, None).unwrap();
        assert_eq!(removed.len(), 2);
        let steps: Vec<u64> = list_checkpoints(dir.path()).iter().map(|c| c.0).collect();
        assert_eq!(steps, [20, 30]);
    }

    /// As the Hugging Face Trainer's `_sorted_checkpoints`: the best checkpoint survives, and a limit of 1 keeps
    /// the newest beside it.
    #[test]
    fn rotation_never_removes_the_best() {
        let dir = tempfile::tempdir().unwrap();
        let steps = |d: &Path| -> Vec<u64> { list_checkpoints(d).iter().map(|c| c.0).collect() };
        for s in [1, 2, 3, 4] {
            write_complete(dir.path(), s);
        }
        let best = dir.path().join("checkpoint-2");
        rotate(dir.path(), 2, Some(&best)).unwrap();
        assert_eq!(steps(dir.path()), [2, 4]);
        write_complete(dir.path(), 5);
        rotate(dir.path(), 1, Some(&best)).unwrap();
        assert_eq!(steps(dir.path()), [2, 5]);
        let best = dir.path().join("checkpoint-5");
        rotate(dir.path(), 1, Some(&best)).unwrap();
        assert_eq!(steps(dir.path()), [5]);
    }
}

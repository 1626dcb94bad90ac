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

/// Deletes the oldest checkpoints beyond `limit`; returns the folders removed.
pub fn rotate(output_dir: &Path, limit: u32) -> std::io::Result<Vec<PathBuf>> {
    let all = list_checkpoints(output_dir);
    let excess = all.len().saturating_sub(limit as usize);
    let mut removed = Vec::new();
    for (_, path) in all.into_iter().take(excess) {
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
    fn rotation_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for s in [10, 2, 30, 20] {
            write_complete(dir.path(), s);
        }
        let removed = rotate(dir.path(), 2).unwrap();
        assert_eq!(removed.len(), 2);
        let steps: Vec<u64> = list_checkpoints(dir.path()).iter().map(|c| c.0).collect();
        assert_eq!(steps, [20, 30]);
    }
}

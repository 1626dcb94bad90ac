//! File-system helpers shared by every writer: nothing half-written ever looks complete.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so readers
/// see either the old file or the whole new one (a full disk fails before the rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = tmp_sibling(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `dir/.name.tmp-<pid>` next to `path`.
pub fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// A folder written in full before it appears under its name: files go into a hidden sibling
/// ([`StagedDir::dir`]), [`StagedDir::commit`] renames it to the target, and dropping it uncommitted
/// (an error, a cancel, unwinding) removes it. Checkpoints and exports are written this way.
#[derive(Debug)]
pub struct StagedDir {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Stages `target` in `tmp`, created afresh (a leftover of an earlier crash is removed first).
    pub fn begin(tmp: PathBuf, target: PathBuf) -> std::io::Result<Self> {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        Ok(Self {
            tmp,
            target,
            committed: false,
        })
    }

    /// Where to write the folder's files.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// The name the folder gets on commit.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Renames the staged folder to the target, replacing a folder already there; returns the target.
    pub fn commit(mut self) -> std::io::Result<PathBuf> {
        if self.target.exists() {
            std::fs::remove_dir_all(&self.target)?;
        }
        std::fs::rename(&self.tmp, &self.target)?;
        self.committed = true;
        Ok(std::mem::take(&mut self.target))
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// termtune's cache folder: `$TERMTUNE_CACHE`, else `$XDG_CACHE_HOME/termtune`, else
/// `~/.cache/termtune`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("TERMTUNE_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("termtune");
    }
    home_dir().join(".cache").join("termtune")
}

/// `$HOME`, or the current folder when it is unset.
pub fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from("."), PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sub").join("a.yaml");
        write_atomic(&p, b"one").expect("write");
        write_atomic(&p, b"two").expect("write");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        let names: Vec<_> = std::fs::read_dir(p.parent().expect("parent"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1);
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_staged_folder_appears_whole_on_commit_and_not_at_all_when_dropped() {
        let root = tempfile::tempdir().expect("tempdir");
        let target = root.path().join("out");
        let staged = StagedDir::begin(root.path().join(".out.tmp"), target.clone()).expect("begin");
        std::fs::write(staged.dir().join("a.txt"), "a").expect("write");
        assert!(
            !target.exists(),
            "nothing under the target's name before commit"
        );
        assert_eq!(staged.commit().expect("commit"), target);
        assert_eq!(names(root.path()), ["out"]);
        assert_eq!(
            std::fs::read_to_string(target.join("a.txt")).expect("read"),
            "a"
        );

        // A second write of the same target replaces it; an abandoned one leaves the first intact.
        let again = StagedDir::begin(root.path().join(".out.tmp"), target.clone()).expect("begin");
        std::fs::write(again.dir().join("b.txt"), "b").expect("write");
        drop(again);
        assert_eq!(names(root.path()), ["out"]);
        assert_eq!(names(&target), ["a.txt"]);
        let replacing =
            StagedDir::begin(root.path().join(".out.tmp"), target.clone()).expect("begin");
        std::fs::write(replacing.dir().join("c.txt"), "c").expect("write");
        replacing.commit().expect("commit");
        assert_eq!(names(&target), ["c.txt"]);
    }

    #[test]
    fn a_leftover_staging_folder_is_cleared_first() {
        let root = tempfile::tempdir().expect("tempdir");
        let tmp = root.path().join(".x.tmp");
        std::fs::create_dir_all(&tmp).expect("mkdir");
        std::fs::write(tmp.join("stale"), "old").expect("write");
        let staged = StagedDir::begin(tmp, root.path().join("x")).expect("begin");
        assert!(names(staged.dir()).is_empty());
    }
}

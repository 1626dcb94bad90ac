//! File-system helpers shared by every writer: nothing half-written ever looks complete, every file
//! gets the permissions of a plain `File::create` (0666 less the umask), and a full disk names the file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so readers
/// see either the old file or the whole new one (a full disk fails before the rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, bytes.len() as u64, |w| w.write_all(bytes))
}

/// [`write_atomic`] for content streamed by `fill` (`size_bytes`: how much it will write, for the
/// message of a full disk).
pub fn write_atomic_with(
    path: &Path,
    size_bytes: u64,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = tmp_sibling(path);
    let result = (|| {
        let mut f = FileWriter::create(&tmp)?;
        let mut buffered = std::io::BufWriter::with_capacity(1 << 20, &mut f);
        fill(&mut buffered)?;
        buffered.flush()?;
        drop(buffered);
        f.file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| name_full_disk(e, path, size_bytes))
}

/// Writes `bytes` to `path` (created or truncated; mode as with `File::create`). For files inside a
/// staged folder, which only appears whole anyway.
pub fn write_file(path: &Path, bytes: impl AsRef<[u8]>) -> std::io::Result<()> {
    let bytes = bytes.as_ref();
    let result = FileWriter::create(path).and_then(|mut f| f.write_all(bytes));
    result.map_err(|e| name_full_disk(e, path, bytes.len() as u64))
}

/// A file being written: `File::create` (so the umask decides its mode, as for every file of the run
/// folder) whose writes also count against a [`SimulatedDisk`] covering its path.
struct FileWriter {
    file: std::fs::File,
    free: Option<Arc<AtomicU64>>,
}

impl FileWriter {
    fn create(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            file: std::fs::File::create(path)?,
            free: simulated_free(path),
        })
    }
}

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(free) = &self.free {
            let n = buf.len() as u64;
            free.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(n)
            })
            .map_err(|_| no_space())?;
        }
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The error a full disk gives (`ENOSPC` on Unix).
fn no_space() -> std::io::Error {
    #[cfg(unix)]
    {
        std::io::Error::from_raw_os_error(28)
    }
    #[cfg(not(unix))]
    {
        std::io::Error::from(std::io::ErrorKind::StorageFull)
    }
}

/// Whether `e` says the disk (or the user's quota) is full.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// A full disk met while writing a file: which file, and how large it was to be.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct DiskFull {
    pub path: PathBuf,
    /// The size of the file being written.
    pub size_bytes: u64,
    #[source]
    pub source: std::io::Error,
}

/// A full-disk error turned into one that carries [`DiskFull`] (same kind, so callers that only test
/// the kind still see it); other errors unchanged.
fn name_full_disk(e: std::io::Error, path: &Path, size_bytes: u64) -> std::io::Error {
    if !is_disk_full(&e) || e.get_ref().is_some_and(|inner| inner.is::<DiskFull>()) {
        return e;
    }
    std::io::Error::new(
        e.kind(),
        DiskFull {
            path: path.to_path_buf(),
            size_bytes,
            source: e,
        },
    )
}

/// The [`DiskFull`] behind `err`, looking through its chain of sources (and inside `io::Error`s).
pub fn find_disk_full<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a DiskFull> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(full) = e.downcast_ref::<DiskFull>() {
            return Some(full);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(full) = io.get_ref().and_then(|i| i.downcast_ref::<DiskFull>())
        {
            return Some(full);
        }
        next = e.source();
    }
    None
}

/// Bytes free for this user on the file system that holds (or will hold) `dir`, when the platform
/// tells (a [`SimulatedDisk`] covering `dir` answers first).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    if let Some(free) = simulated_free(dir) {
        return Some(free.load(Ordering::SeqCst));
    }
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        probe = probe.parent()?.to_path_buf();
        if probe.as_os_str().is_empty() {
            probe = PathBuf::from(".");
        }
    }
    let probe = probe.canonicalize().ok()?;
    let disks = sysinfo::Disks::new_with_refreshed_list().ok()?;
    (&disks)
        .into_iter()
        .filter(|d| probe.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(sysinfo::Disk::available_space)
}

/// The simulated disks in force: (folder, bytes left).
static SIMULATED: Mutex<Vec<(PathBuf, Arc<AtomicU64>)>> = Mutex::new(Vec::new());

fn simulated_free(path: &Path) -> Option<Arc<AtomicU64>> {
    let all = SIMULATED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    all.iter()
        .filter(|(dir, _)| path.starts_with(dir))
        .max_by_key(|(dir, _)| dir.as_os_str().len())
        .map(|(_, free)| Arc::clone(free))
}

/// A test seam in the real write path: while it lives, the folder `dir` behaves like a file system
/// with [`SimulatedDisk::set_free`] bytes left. Every write of this module under `dir` uses them up
/// and fails with "No space left on device" once they are gone, and [`free_bytes`] reports them
/// (deleting files gives nothing back: call `set_free` to "make room").
#[derive(Debug)]
pub struct SimulatedDisk {
    dir: PathBuf,
    free: Arc<AtomicU64>,
}

impl SimulatedDisk {
    pub fn new(dir: &Path, free_bytes: u64) -> Self {
        let free = Arc::new(AtomicU64::new(free_bytes));
        SIMULATED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((dir.to_path_buf(), Arc::clone(&free)));
        Self {
            dir: dir.to_path_buf(),
            free,
        }
    }

    pub fn set_free(&self, bytes: u64) {
        self.free.store(bytes, Ordering::SeqCst);
    }

    pub fn free(&self) -> u64 {
        self.free.load(Ordering::SeqCst)
    }
}

impl Drop for SimulatedDisk {
    fn drop(&mut self) {
        SIMULATED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|(d, f)| !(d == &self.dir && Arc::ptr_eq(f, &self.free)));
    }
}

/// `1.5 GB`, `12.0 MB`, `640 B`: sizes in messages (decimal units, like `df -H`).
pub fn human_bytes(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
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
    fn a_simulated_full_disk_fails_the_write_and_names_the_file() {
        let root = tempfile::tempdir().expect("tempdir");
        let disk = SimulatedDisk::new(root.path(), 100);
        assert_eq!(free_bytes(&root.path().join("not/yet")), Some(100));
        write_file(&root.path().join("small"), [0u8; 60]).expect("fits");
        assert_eq!(disk.free(), 40);
        let big = root.path().join("big.safetensors");
        let err = write_atomic(&big, &[0u8; 50]).expect_err("does not fit");
        assert!(is_disk_full(&err), "{err}");
        let full = find_disk_full(&err).expect("names the file");
        assert_eq!((full.path.as_path(), full.size_bytes), (big.as_path(), 50));
        assert!(err.to_string().contains("big.safetensors: "), "{err}");
        assert_eq!(names(root.path()), ["small"], "no temporary file left");
        disk.set_free(1000);
        write_atomic(&big, &[0u8; 50]).expect("room made");
        drop(disk);
        assert_ne!(free_bytes(root.path()), Some(950), "the real disk again");
    }

    #[test]
    fn sizes_read_in_decimal_units() {
        assert_eq!(human_bytes(640), "640 B");
        assert_eq!(human_bytes(10_000), "10.0 kB");
        assert_eq!(human_bytes(12_345_678), "12.3 MB");
        assert_eq!(human_bytes(1_500_000_000), "1.50 GB");
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

//! On-disk cache of the tokenised dataset (LLaMA-Factory's `tokenized_path` idea, automatic): the key is
//! a SHA-256 of the dataset files' contents, their registry entries, the data options that change the
//! tokens, and the template + tokenizer fingerprint. Files are written atomically (temp + rename).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::pack::PackedSequence;
use super::stats::DatasetStats;
use super::{DataError, DataOptions};

const MAGIC: &[u8; 8] = b"TTDATA02";

/// The default cache folder: `$TERMTUNE_CACHE`, `$XDG_CACHE_HOME/termtune`, or `~/.cache/termtune`,
/// then `datasets/`.
pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("TERMTUNE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("termtune")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("termtune"))
        })
        .unwrap_or_else(|| std::env::temp_dir().join("termtune"));
    base.join("datasets")
}

/// Incremental cache key.
pub struct CacheKey(Sha256);

impl CacheKey {
    pub fn new(opts: &DataOptions, fingerprint: &str) -> CacheKey {
        let mut h = Sha256::new();
        h.update(b"termtune-data-v1\0");
        let relevant = format!(
            "{:?}|{:?}|{}|{}|{}|{:?}|{:?}|{:?}|{}|{:?}|{:?}|{:?}|{:?}|{:?}|{}|{:?}|{:?}",
            opts.dataset,
            opts.eval_dataset,
            opts.cutoff_len,
            opts.train_on_prompt,
            opts.mask_history,
            opts.max_samples,
            opts.val_size,
            opts.packing_enabled(),
            opts.neat_packing,
            opts.mix_strategy,
            opts.interleave_probs,
            opts.default_system,
            (opts.enable_thinking, opts.preserve_thinking),
            opts.tool_format,
            opts.seed,
            opts.stage,
            opts.placeholders,
        );
        h.update(relevant.as_bytes());
        h.update(b"\0");
        h.update(fingerprint.as_bytes());
        CacheKey(h)
    }

    /// Adds a dataset file (path and contents).
    pub fn add_file(&mut self, path: &Path) -> Result<(), DataError> {
        let mut f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
        self.0.update(path.to_string_lossy().as_bytes());
        self.0.update(b"\0");
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(|e| DataError::io(path, e))?;
            if n == 0 {
                break;
            }
            self.0.update(&buf[..n]);
        }
        Ok(())
    }

    pub fn add_str(&mut self, s: &str) {
        self.0.update(s.as_bytes());
        self.0.update(b"\0");
    }

    pub fn finish(self) -> String {
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// What the cache holds.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedData {
    pub train: Vec<PackedSequence>,
    pub eval: Vec<PackedSequence>,
    pub stats: DatasetStats,
    pub warnings: Vec<String>,
    /// Stage kto's tags (one per example; empty otherwise).
    pub train_tags: Vec<bool>,
    pub eval_tags: Vec<bool>,
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Per sequence: length, ids (u32), labels (i32), then the sequence-id runs as (id, length) pairs;
/// position ids are rebuilt from the runs (they restart per run, 0 on padding).
fn put_seqs(out: &mut Vec<u8>, seqs: &[PackedSequence]) {
    put_u64(out, seqs.len() as u64);
    for s in seqs {
        put_u64(out, s.len() as u64);
        for &v in &s.input_ids {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for &v in &s.labels {
            let v = i32::try_from(v).unwrap_or(i32::MIN);
            out.extend_from_slice(&v.to_le_bytes());
        }
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for &id in &s.sequence_ids {
            match runs.last_mut() {
                Some((last, n)) if *last == id => *n += 1,
                _ => runs.push((id, 1)),
            }
        }
        put_u64(out, runs.len() as u64);
        for (id, n) in runs {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn len(&mut self) -> Option<usize> {
        usize::try_from(self.u64()?).ok()
    }

    fn u32s(&mut self, n: usize) -> Option<Vec<u32>> {
        let b = self.take(n.checked_mul(4)?)?;
        Some(
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }

    fn labels(&mut self, n: usize) -> Option<Vec<i64>> {
        let b = self.take(n.checked_mul(4)?)?;
        Some(
            b.chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        )
    }

    fn seqs(&mut self) -> Option<Vec<PackedSequence>> {
        let n = self.len()?;
        let mut out = Vec::with_capacity(n.min(1 << 20));
        for _ in 0..n {
            let len = self.len()?;
            let input_ids = self.u32s(len)?;
            let labels = self.labels(len)?;
            let n_runs = self.len()?;
            let mut sequence_ids = Vec::with_capacity(len);
            let mut position_ids = Vec::with_capacity(len);
            for _ in 0..n_runs {
                let pair = self.u32s(2)?;
                let (id, n) = (pair[0], pair[1]);
                sequence_ids.extend(std::iter::repeat_n(id, n as usize));
                if id == 0 {
                    position_ids.extend(std::iter::repeat_n(0, n as usize));
                } else {
                    position_ids.extend(0..n);
                }
            }
            if sequence_ids.len() != len {
                return None;
            }
            out.push(PackedSequence {
                input_ids,
                labels,
                position_ids,
                sequence_ids,
            });
        }
        Some(out)
    }
}

/// The cache file of `key` in `dir`.
pub fn cache_file(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.ttdata"))
}

/// Writes `data` atomically.
pub fn write(path: &Path, data: &CachedData) -> Result<(), DataError> {
    let err = |message: String| DataError::Cache {
        path: path.to_path_buf(),
        message,
    };
    let header = serde_json::json!({
        "stats": data.stats,
        "warnings": data.warnings,
        "train_tags": data.train_tags,
        "eval_tags": data.eval_tags,
    });
    let header = serde_json::to_vec(&header).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    put_u64(&mut out, header.len() as u64);
    out.extend_from_slice(&header);
    put_seqs(&mut out, &data.train);
    put_seqs(&mut out, &data.eval);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
    f.write_all(&out).map_err(|e| DataError::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))?;
    Ok(())
}

/// Reads a cache file; `Ok(None)` when it does not exist.
pub fn read(path: &Path) -> Result<Option<CachedData>, DataError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DataError::io(path, e)),
    };
    let corrupt = || DataError::Cache {
        path: path.to_path_buf(),
        message: "the file is truncated or not a termtune dataset cache".into(),
    };
    let mut c = Cursor {
        bytes: &bytes,
        pos: 0,
    };
    if c.take(8) != Some(MAGIC.as_slice()) {
        return Err(corrupt());
    }
    let hlen = c.len().ok_or_else(corrupt)?;
    let header: serde_json::Value =
        serde_json::from_slice(c.take(hlen).ok_or_else(corrupt)?).map_err(|_| corrupt())?;
    let stats: DatasetStats =
        serde_json::from_value(header["stats"].clone()).map_err(|_| corrupt())?;
    let warnings: Vec<String> =
        serde_json::from_value(header["warnings"].clone()).unwrap_or_default();
    let tags = |key: &str| -> Vec<bool> {
        serde_json::from_value(header[key].clone()).unwrap_or_default()
    };
    let (train_tags, eval_tags) = (tags("train_tags"), tags("eval_tags"));
    let train = c.seqs().ok_or_else(corrupt)?;
    let eval = c.seqs().ok_or_else(corrupt)?;
    Ok(Some(CachedData {
        train,
        eval,
        stats,
        warnings,
        train_tags,
        eval_tags,
    }))
}

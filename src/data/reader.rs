//! Dataset files → raw JSON rows. A bad row never stops reading: it becomes a [`SkipRecord`].
//!
//! `.json` holding an array is split into its elements by a byte scanner, so one broken element (bad
//! JSON, invalid UTF-8) skips only that row; a `.json` that is not an array and `.jsonl` are read as
//! JSON Lines (like Hugging Face `datasets`); `.txt` gives one `{"text": line}` row per non-empty line;
//! `.csv`, `.parquet` and `.arrow` are read by [`tabular`]. A folder is read file by file (sorted) and all
//! files must have the same type (LLaMA-Factory's rule: `.json` and `.jsonl` count as one).

use std::fmt;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::DataError;
use tabular::{TableKind, TableRows};

pub mod tabular;

/// Where a row came from: `row N` of a JSON array or `line N` of a JSON Lines / text file (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Location {
    Row(usize),
    Line(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Row(n) => write!(f, "row {n}"),
            Location::Line(n) => write!(f, "line {n}"),
        }
    }
}

/// Why a row was skipped. [`SkipReason::kind`] is the counting key; `Display` is the message users see.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SkipReason {
    InvalidJson(String),
    InvalidUtf8,
    NotAnObject,
    MissingColumn(String),
    WrongType {
        column: String,
        expected: &'static str,
    },
    InvalidRoleOrder {
        position: usize,
        role: String,
        expected: String,
    },
    InvalidMessageCount {
        count: usize,
        expected: &'static str,
    },
    EmptyAnswer,
    InvalidTools(String),
    InvalidFunctionCall(String),
    InvalidPair(String),
    InvalidShape(String),
}

impl SkipReason {
    /// Short stable key used to count skips per reason.
    pub fn kind(&self) -> &'static str {
        match self {
            SkipReason::InvalidJson(_) => "invalid json",
            SkipReason::InvalidUtf8 => "invalid utf-8",
            SkipReason::NotAnObject => "not an object",
            SkipReason::MissingColumn(_) => "missing column",
            SkipReason::WrongType { .. } => "wrong column type",
            SkipReason::InvalidRoleOrder { .. } => "wrong role order",
            SkipReason::InvalidMessageCount { .. } => "wrong message count",
            SkipReason::EmptyAnswer => "empty answer",
            SkipReason::InvalidTools(_) => "invalid tools",
            SkipReason::InvalidFunctionCall(_) => "invalid function call",
            SkipReason::InvalidPair(_) => "invalid preference pair",
            SkipReason::InvalidShape(_) => "invalid example shape",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::InvalidJson(e) => write!(f, "unparsable JSON ({e})"),
            SkipReason::InvalidUtf8 => write!(f, "invalid UTF-8"),
            SkipReason::NotAnObject => write!(f, "the row is not a JSON object"),
            SkipReason::MissingColumn(c) => write!(f, "missing column `{c}`"),
            SkipReason::WrongType { column, expected } => {
                write!(f, "column `{column}` must be {expected}")
            }
            SkipReason::InvalidRoleOrder {
                position,
                role,
                expected,
            } => write!(
                f,
                "message {position} has role `{role}`, expected {expected}"
            ),
            SkipReason::InvalidMessageCount { count, expected } => {
                write!(
                    f,
                    "{count} messages after the system turn, expected {expected}"
                )
            }
            SkipReason::EmptyAnswer => write!(f, "empty answer"),
            SkipReason::InvalidTools(e) => write!(f, "invalid `tools` JSON ({e})"),
            SkipReason::InvalidFunctionCall(e) => write!(f, "invalid function call ({e})"),
            SkipReason::InvalidPair(e) => write!(f, "invalid preference pair ({e})"),
            SkipReason::InvalidShape(e) => write!(f, "invalid example ({e})"),
        }
    }
}

/// One skipped row: file, place and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkipRecord {
    pub file: Arc<PathBuf>,
    pub location: Location,
    pub reason: SkipReason,
}

impl fmt::Display for SkipRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.file.display(),
            self.location,
            self.reason
        )
    }
}

/// One parsed row.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRow {
    pub value: Value,
    pub file: Arc<PathBuf>,
    pub location: Location,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Json,
    Jsonl,
    Text,
    Table(TableKind),
}

impl FileKind {
    /// LLaMA-Factory's loader type (`FILEEXT2TYPE`): `.json` and `.jsonl` are both `json`.
    fn loader(self) -> &'static str {
        match self {
            FileKind::Json | FileKind::Jsonl => "json",
            FileKind::Text => "text",
            FileKind::Table(TableKind::Csv) => "csv",
            FileKind::Table(TableKind::Parquet) => "parquet",
            FileKind::Table(TableKind::Arrow) => "arrow",
        }
    }
}

fn file_kind(path: &Path) -> Result<FileKind, DataError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "json" => Ok(FileKind::Json),
        "jsonl" => Ok(FileKind::Jsonl),
        "txt" => Ok(FileKind::Text),
        "csv" => Ok(FileKind::Table(TableKind::Csv)),
        "parquet" => Ok(FileKind::Table(TableKind::Parquet)),
        "arrow" => Ok(FileKind::Table(TableKind::Arrow)),
        _ => Err(DataError::UnsupportedFileType {
            path: path.to_path_buf(),
            ext,
            extra: String::new(),
        }),
    }
}

/// The data files of a dataset path: the file itself, or the sorted files of a folder (same type).
pub fn data_files(name: &str, path: &Path) -> Result<Vec<PathBuf>, DataError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DataError::MissingFile {
                name: name.to_string(),
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(DataError::io(path, e)),
    };
    if !meta.is_dir() {
        file_kind(path)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| DataError::io(path, e))? {
        let entry = entry.map_err(|e| DataError::io(path, e))?;
        let p = entry.path();
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if p.is_file() && !hidden {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(DataError::MissingFile {
            name: name.to_string(),
            path: path.to_path_buf(),
        });
    }
    let mut loaders = Vec::with_capacity(files.len());
    for f in &files {
        loaders.push(file_kind(f)?.loader());
    }
    loaders.sort_unstable();
    loaders.dedup();
    if loaders.len() > 1 {
        return Err(DataError::MixedFolder {
            path: path.to_path_buf(),
            types: loaders.join(", "),
        });
    }
    Ok(files)
}

/// Rows of one file: parsed rows and skipped rows, in file order.
pub fn read_file(path: &Path) -> Result<Vec<Result<RawRow, SkipRecord>>, DataError> {
    let kind = file_kind(path)?;
    if let FileKind::Table(table) = kind {
        return TableRows::open(path, table)?.collect();
    }
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let file = Arc::new(path.to_path_buf());
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
    Ok(match (kind, first) {
        (_, None) => Vec::new(),
        (FileKind::Json, Some(b'[')) => split_json_array(&bytes)
            .into_iter()
            .enumerate()
            .map(|(i, elem)| parse_element(elem, &file, Location::Row(i + 1)))
            .collect(),
        (FileKind::Text, _) => read_text_lines(&bytes, &file),
        (FileKind::Json | FileKind::Jsonl | FileKind::Table(_), _) => bytes
            .split(|&b| b == b'\n')
            .enumerate()
            .filter(|(_, line)| line.iter().any(|b| !b.is_ascii_whitespace()))
            .map(|(i, line)| parse_element(line, &file, Location::Line(i + 1)))
            .collect(),
    })
}

fn read_text_lines(bytes: &[u8], file: &Arc<PathBuf>) -> Vec<Result<RawRow, SkipRecord>> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| line.iter().any(|b| !b.is_ascii_whitespace()))
        .map(|(i, line)| text_row(line, file, Location::Line(i + 1)))
        .collect()
}

/// One line of a `.txt` file as a `{"text": …}` row (a trailing `\r` dropped).
fn text_row(line: &[u8], file: &Arc<PathBuf>, location: Location) -> Result<RawRow, SkipRecord> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match std::str::from_utf8(line) {
        Ok(s) => Ok(RawRow {
            value: serde_json::json!({ "text": s }),
            file: Arc::clone(file),
            location,
        }),
        Err(_) => Err(SkipRecord {
            file: Arc::clone(file),
            location,
            reason: SkipReason::InvalidUtf8,
        }),
    }
}

/// Parses one JSON value from bytes, as a row.
pub fn parse_element(
    bytes: &[u8],
    file: &Arc<PathBuf>,
    location: Location,
) -> Result<RawRow, SkipRecord> {
    let skip = |reason| SkipRecord {
        file: Arc::clone(file),
        location,
        reason,
    };
    let text = std::str::from_utf8(bytes).map_err(|_| skip(SkipReason::InvalidUtf8))?;
    let value: Value = serde_json::from_str(text.trim())
        .map_err(|e| skip(SkipReason::InvalidJson(e.to_string())))?;
    if !value.is_object() {
        return Err(skip(SkipReason::NotAnObject));
    }
    Ok(RawRow {
        value,
        file: Arc::clone(file),
        location,
    })
}

/// Splits the bytes of a top-level JSON array into its element slices without parsing them, tracking
/// strings and nesting. An unterminated last element is returned as is (it then fails to parse).
pub fn split_json_array(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let Some(open) = bytes.iter().position(|&b| b == b'[') else {
        return out;
    };
    let mut i = open + 1;
    let n = bytes.len();
    loop {
        while i < n && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= n || bytes[i] == b']' {
            break;
        }
        let start = i;
        let mut depth = 0usize;
        let mut in_string = false;
        let mut escaped = false;
        while i < n {
            let b = bytes[i];
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
            } else {
                match b {
                    b'"' => in_string = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' if depth > 0 => depth -= 1,
                    b',' | b']' if depth == 0 => break,
                    _ => {}
                }
            }
            i += 1;
        }
        out.push(&bytes[start..i]);
        if i < n && bytes[i] == b',' {
            i += 1;
        }
    }
    out
}

/// One open file of a [`RowStream`].
enum OpenFile {
    Lines {
        file: Arc<PathBuf>,
        reader: std::io::BufReader<std::fs::File>,
        line_no: usize,
        text: bool,
    },
    Table(TableRows),
}

/// Streaming reader with bounded memory: JSON Lines and text one line at a time, CSV / Parquet / Arrow one
/// chunk at a time. A `.json` file holding an array cannot be streamed (refused by [`RowStream::new`]).
pub struct RowStream {
    files: Vec<PathBuf>,
    current: Option<OpenFile>,
    buf: Vec<u8>,
}

impl RowStream {
    /// Opens a stream over `files`.
    pub fn new(files: Vec<PathBuf>) -> Result<Self, DataError> {
        for f in &files {
            if !matches!(file_kind(f)?, FileKind::Json | FileKind::Jsonl) {
                continue;
            }
            let mut head = [0u8; 64];
            let mut file = std::fs::File::open(f).map_err(|e| DataError::io(f, e))?;
            let n = std::io::Read::read(&mut file, &mut head).map_err(|e| DataError::io(f, e))?;
            if head[..n].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
                return Err(DataError::Option {
                    key: "streaming",
                    message: format!(
                        "`{}` is a JSON array; streaming reads JSON Lines only: convert it to .jsonl or set `streaming: false`",
                        f.display()
                    ),
                });
            }
        }
        let mut files = files;
        files.reverse();
        Ok(RowStream {
            files,
            current: None,
            buf: Vec::new(),
        })
    }

    fn open(path: PathBuf) -> Result<OpenFile, DataError> {
        let kind = file_kind(&path)?;
        if let FileKind::Table(table) = kind {
            return Ok(OpenFile::Table(TableRows::open(&path, table)?));
        }
        let file = std::fs::File::open(&path).map_err(|e| DataError::io(&path, e))?;
        Ok(OpenFile::Lines {
            file: Arc::new(path),
            reader: std::io::BufReader::new(file),
            line_no: 0,
            text: kind == FileKind::Text,
        })
    }
}

impl Iterator for RowStream {
    type Item = Result<Result<RawRow, SkipRecord>, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.current.is_none() {
                let path = self.files.pop()?;
                match Self::open(path) {
                    Ok(open) => self.current = Some(open),
                    Err(e) => return Some(Err(e)),
                }
            }
            match self.current.as_mut()? {
                OpenFile::Table(rows) => match rows.next() {
                    Some(item) => return Some(item),
                    None => self.current = None,
                },
                OpenFile::Lines {
                    file,
                    reader,
                    line_no,
                    text,
                } => {
                    self.buf.clear();
                    match reader.read_until(b'\n', &mut self.buf) {
                        Ok(0) => self.current = None,
                        Ok(_) => {
                            *line_no += 1;
                            if self.buf.iter().all(u8::is_ascii_whitespace) {
                                continue;
                            }
                            let location = Location::Line(*line_no);
                            if *text {
                                let line = self.buf.strip_suffix(b"\n").unwrap_or(&self.buf);
                                return Some(Ok(text_row(line, file, location)));
                            }
                            return Some(Ok(parse_element(&self.buf, file, location)));
                        }
                        Err(e) => {
                            let path = file.as_ref().clone();
                            self.current = None;
                            return Some(Err(DataError::io(path, e)));
                        }
                    }
                }
            }
        }
    }
}

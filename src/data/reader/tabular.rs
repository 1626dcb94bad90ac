//! CSV, Parquet and Arrow dataset files → JSON rows, as Hugging Face `datasets` hands them to LLaMA-Factory.
//!
//! - **Parquet** (what `datasets.push_to_hub`, pandas and polars write; snappy, zstd or gzip) and **Arrow IPC**
//!   (`Dataset.save_to_disk`'s `data-*.arrow`, stream format; the file format too) are read batch by batch, each
//!   batch turned into JSON objects by arrow-json: nested lists and structs (sharegpt's `conversations`) stay
//!   nested, a null stays an explicit `null` (not a missing column).
//! - **CSV** is read as `datasets` reads it (pandas `read_csv` in chunks of 10 000 rows): a header row names the
//!   columns; in each chunk a column whose cells all read as booleans (`True`/`true`/`TRUE`, `False`/…) becomes
//!   booleans (a `kto_tag` column works), all integers → integers (floats when the column has a missing cell),
//!   all numbers → floats, otherwise strings; pandas' missing-value spellings (empty, `NA`, `N/A`, `NaN`, `null`,
//!   `None`, …) become `null`. A row with more fields than the header is skipped with its line (pandas would stop
//!   the whole load); a row with fewer gets `null`s.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use serde_json::{Map, Number, Value};

use super::{Location, RawRow, SkipReason, SkipRecord, parse_element};
use crate::data::DataError;

/// The tabular file types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    Csv,
    Parquet,
    Arrow,
}

/// `datasets`' CSV chunk (pandas `read_csv(chunksize=10_000)`): column types are inferred per chunk.
const CSV_CHUNK: usize = 10_000;
/// Rows per Arrow record batch read from a parquet file.
const PARQUET_BATCH: usize = 1024;

/// pandas' default missing-value spellings (`read_csv`'s `na_values` with `keep_default_na=True`).
const PANDAS_NA: &[&str] = &[
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
];

type BatchIter = Box<dyn Iterator<Item = Result<RecordBatch, arrow_schema::ArrowError>> + Send>;

enum Source {
    Csv {
        reader: csv::Reader<BufReader<File>>,
        header: Vec<String>,
        /// Added to the csv crate's line numbers: with CRLF line ends a record's position is the `\n` of the line
        /// before, one line short.
        line_offset: usize,
    },
    Batches {
        batches: BatchIter,
        rows_done: usize,
    },
}

/// The rows of one CSV, Parquet or Arrow file, read a chunk at a time (bounded memory when streaming).
pub struct TableRows {
    file: Arc<PathBuf>,
    source: Source,
    pending: VecDeque<Result<RawRow, SkipRecord>>,
    done: bool,
}

fn malformed(path: &Path, what: &str, e: impl std::fmt::Display) -> DataError {
    DataError::BadTable {
        path: path.to_path_buf(),
        message: format!("not a readable {what} file ({e})"),
        fix: format!("check that it is a complete {what} file (re-download or re-export it)"),
    }
}

impl TableRows {
    pub fn open(path: &Path, kind: TableKind) -> Result<Self, DataError> {
        let file = Arc::new(path.to_path_buf());
        let open = || File::open(path).map_err(|e| DataError::io(path, e));
        let source = match kind {
            TableKind::Csv => {
                let mut reader = csv::ReaderBuilder::new()
                    .has_headers(true)
                    .flexible(true)
                    .from_reader(BufReader::new(open()?));
                let raw = reader
                    .byte_headers()
                    .map_err(|e| csv_error(path, e))?
                    .clone();
                let mut head = Vec::with_capacity(1 << 16);
                open()?
                    .take(1 << 16)
                    .read_to_end(&mut head)
                    .map_err(|e| DataError::io(path, e))?;
                let crlf = head
                    .iter()
                    .position(|&b| b == b'\n')
                    .is_some_and(|i| i > 0 && head[i - 1] == b'\r');
                Source::Csv {
                    reader,
                    header: header_names(&raw),
                    line_offset: usize::from(crlf),
                }
            }
            TableKind::Parquet => {
                let builder =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(open()?)
                        .map_err(|e| malformed(path, "parquet", e))?;
                let reader = builder
                    .with_batch_size(PARQUET_BATCH)
                    .build()
                    .map_err(|e| malformed(path, "parquet", e))?;
                Source::Batches {
                    batches: Box::new(reader),
                    rows_done: 0,
                }
            }
            TableKind::Arrow => {
                // The IPC file format starts with the magic `ARROW1`; `datasets` writes the stream format.
                let mut magic = [0u8; 6];
                let n = open()?
                    .read(&mut magic)
                    .map_err(|e| DataError::io(path, e))?;
                let batches: BatchIter = if n == 6 && &magic == b"ARROW1" {
                    Box::new(
                        arrow_ipc::reader::FileReader::try_new(BufReader::new(open()?), None)
                            .map_err(|e| malformed(path, "Arrow", e))?,
                    )
                } else {
                    Box::new(
                        arrow_ipc::reader::StreamReader::try_new(BufReader::new(open()?), None)
                            .map_err(|e| malformed(path, "Arrow", e))?,
                    )
                };
                Source::Batches {
                    batches,
                    rows_done: 0,
                }
            }
        };
        Ok(TableRows {
            file,
            source,
            pending: VecDeque::new(),
            done: false,
        })
    }

    /// Reads the next chunk into `pending`; false at the end of the file.
    fn fill(&mut self) -> Result<bool, DataError> {
        match &mut self.source {
            Source::Csv {
                reader,
                header,
                line_offset,
            } => {
                let mut chunk = Vec::with_capacity(1024);
                let mut record = csv::ByteRecord::new();
                while chunk.len() < CSV_CHUNK {
                    if !reader
                        .read_byte_record(&mut record)
                        .map_err(|e| csv_error(&self.file, e))?
                    {
                        break;
                    }
                    let line = record
                        .position()
                        .map_or(0, |p| p.line() as usize + *line_offset);
                    chunk.push((Location::Line(line), record.clone()));
                }
                if chunk.is_empty() {
                    return Ok(false);
                }
                self.pending
                    .extend(csv_chunk_rows(&self.file, header, chunk));
                Ok(true)
            }
            Source::Batches { batches, rows_done } => {
                let Some(batch) = batches.next() else {
                    return Ok(false);
                };
                let batch = batch.map_err(|e| malformed(&self.file, "columnar", e))?;
                let mut writer = arrow_json::WriterBuilder::new()
                    .with_explicit_nulls(true)
                    .build::<_, arrow_json::writer::LineDelimited>(Vec::new());
                writer
                    .write(&batch)
                    .and_then(|()| writer.finish())
                    .map_err(|e| DataError::BadTable {
                        path: self.file.to_path_buf(),
                        message: format!("a column cannot be read as JSON ({e})"),
                        fix: "keep text, number, boolean, list and struct columns only".into(),
                    })?;
                let bytes = writer.into_inner();
                for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    *rows_done += 1;
                    self.pending.push_back(parse_element(
                        line,
                        &self.file,
                        Location::Row(*rows_done),
                    ));
                }
                Ok(true)
            }
        }
    }
}

impl Iterator for TableRows {
    type Item = Result<Result<RawRow, SkipRecord>, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(row) = self.pending.pop_front() {
                return Some(Ok(row));
            }
            if self.done {
                return None;
            }
            match self.fill() {
                Ok(true) => {}
                Ok(false) => self.done = true,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

fn csv_error(path: &Path, e: csv::Error) -> DataError {
    match e.into_kind() {
        csv::ErrorKind::Io(e) => DataError::io(path, e),
        other => malformed(path, "CSV", format!("{other:?}")),
    }
}

/// Column names as pandas gives them: an empty name is `Unnamed: <i>`, a repeated one gets `.1`, `.2`, ….
fn header_names(raw: &csv::ByteRecord) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(raw.len());
    for (i, field) in raw.iter().enumerate() {
        let name = String::from_utf8_lossy(field).into_owned();
        let name = if i == 0 {
            name.trim_start_matches('\u{feff}').to_string()
        } else {
            name
        };
        let mut name = if name.is_empty() {
            format!("Unnamed: {i}")
        } else {
            name
        };
        if names.contains(&name) {
            let base = name.clone();
            let mut k = 1;
            while names.contains(&name) {
                name = format!("{base}.{k}");
                k += 1;
            }
        }
        names.push(name);
    }
    names
}

#[derive(Clone, Copy)]
struct ColumnType {
    any: bool,
    missing: bool,
    bool_: bool,
    int: bool,
    float: bool,
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "True" | "true" | "TRUE" => Some(true),
        "False" | "false" | "FALSE" => Some(false),
        _ => None,
    }
}

fn parse_float(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

/// A CSV row's place and cells (`None` = missing).
type CsvCells<'a> = (Location, Vec<Option<&'a str>>);

/// One CSV chunk → rows, with pandas' per-chunk column types.
fn csv_chunk_rows(
    file: &Arc<PathBuf>,
    header: &[String],
    chunk: Vec<(Location, csv::ByteRecord)>,
) -> Vec<Result<RawRow, SkipRecord>> {
    let skip = |location, reason| {
        Err(SkipRecord {
            file: Arc::clone(file),
            location,
            reason,
        })
    };
    // Cells as text (`None` = missing); rows that cannot be read are skipped here.
    let mut rows: Vec<Result<CsvCells<'_>, SkipRecord>> = Vec::with_capacity(chunk.len());
    for (location, record) in &chunk {
        if record.len() > header.len() {
            rows.push(skip(
                *location,
                SkipReason::InvalidShape(format!(
                    "{} fields, the header has {}",
                    record.len(),
                    header.len()
                )),
            ));
            continue;
        }
        let mut cells = Vec::with_capacity(header.len());
        let mut bad = false;
        for field in record.iter() {
            match std::str::from_utf8(field) {
                Ok(s) if PANDAS_NA.contains(&s) => cells.push(None),
                Ok(s) => cells.push(Some(s)),
                Err(_) => {
                    bad = true;
                    break;
                }
            }
        }
        if bad {
            rows.push(skip(*location, SkipReason::InvalidUtf8));
            continue;
        }
        cells.resize(header.len(), None);
        rows.push(Ok((*location, cells)));
    }
    let mut types = vec![
        ColumnType {
            any: false,
            missing: false,
            bool_: true,
            int: true,
            float: true,
        };
        header.len()
    ];
    for (_, cells) in rows.iter().flatten() {
        for (t, cell) in types.iter_mut().zip(cells) {
            match cell {
                None => t.missing = true,
                Some(s) => {
                    t.any = true;
                    t.bool_ &= parse_bool(s).is_some();
                    t.int &= s.trim().parse::<i64>().is_ok();
                    t.float &= parse_float(s).is_some();
                }
            }
        }
    }
    rows.into_iter()
        .map(|row| {
            let (location, cells) = row?;
            let mut obj = Map::with_capacity(header.len());
            for ((name, t), cell) in header.iter().zip(&types).zip(cells) {
                let value = match cell {
                    None => Value::Null,
                    Some(s) if t.any && t.bool_ => Value::Bool(parse_bool(s).unwrap_or_default()),
                    Some(s) if t.any && t.int && !t.missing => s
                        .trim()
                        .parse::<i64>()
                        .map_or(Value::Null, |v| Value::Number(v.into())),
                    Some(s) if t.any && t.float => parse_float(s)
                        .and_then(Number::from_f64)
                        .map_or(Value::Null, Value::Number),
                    Some(s) => Value::String(s.to_string()),
                };
                obj.insert(name.clone(), value);
            }
            Ok(RawRow {
                value: Value::Object(obj),
                file: Arc::clone(file),
                location,
            })
        })
        .collect()
}

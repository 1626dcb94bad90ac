//! Errors of the data module: whole-dataset problems that stop preparation.
//! Problems with single rows are not errors: they are skipped and counted (see [`super::SkipReason`]).

use std::path::PathBuf;

/// Everything that stops the data pipeline. Messages are lower-case, name the file/key and say the fix.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read `{path}`: {source}; check that the file exists and is readable")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`{path}` not found; create `dataset_info.json` in `dataset_dir` (LLaMA-Factory format) or set `dataset_dir` to the folder that has it"
    )]
    MissingRegistry { path: PathBuf },
    #[error(
        "malformed `{path}`: {message}; fix the JSON (it must be an object of dataset name -> {{\"file_name\": ...}})"
    )]
    MalformedRegistry { path: PathBuf, message: String },
    #[error(
        "dataset `{name}` is not in `{path}`; add an entry for it or fix the name (known: {known})"
    )]
    UnknownDataset {
        name: String,
        path: PathBuf,
        known: String,
    },
    #[error("dataset `{name}` comes from {what} (`{url}`), which termtune does not load; {fix}")]
    OtherSource {
        name: String,
        what: &'static str,
        url: String,
        fix: &'static str,
    },
    #[error("dataset `{name}` (Hugging Face Hub `{repo}`): {message}")]
    Hub {
        name: String,
        repo: String,
        message: String,
    },
    #[error(
        "dataset `{name}` has no `file_name` in dataset_info.json; add `\"file_name\": \"your_file.json\"`"
    )]
    NoFileName { name: String },
    #[error(
        "dataset file `{path}` (dataset `{name}`) not found; put the file there or fix `file_name` in dataset_info.json"
    )]
    MissingFile { name: String, path: PathBuf },
    #[error(
        "`{path}`: unsupported file type `{ext}`; use .json (array), .jsonl (JSON lines), .csv, .parquet, .arrow or .txt{extra}"
    )]
    UnsupportedFileType {
        path: PathBuf,
        ext: String,
        extra: String,
    },
    #[error(
        "folder `{path}` mixes file types ({types}); all files of a dataset folder must have the same type"
    )]
    MixedFolder { path: PathBuf, types: String },
    #[error(
        "`{path}` is not a JSON array or JSON lines file: {message}; fix the file (a .json file must hold one array of objects)"
    )]
    MalformedFile { path: PathBuf, message: String },
    #[error("`{path}`: {message}; {fix}")]
    BadTable {
        path: PathBuf,
        message: String,
        fix: String,
    },
    #[error("dataset `{name}`: {message}")]
    Unsupported { name: String, message: String },
    #[error(
        "no usable rows in {what}: {read} rows read, all skipped ({reasons}); check `formatting`/`columns`/`tags` in dataset_info.json against the file"
    )]
    NoUsableRows {
        what: String,
        read: usize,
        reasons: String,
    },
    #[error(
        "`template`: unknown template `{name}`; use one of: {known}, or leave `template` unset to use the tokenizer's chat_template"
    )]
    UnknownTemplate { name: String, known: String },
    #[error("tokenizer chat_template: {0}; set `template` to a built-in template instead")]
    Jinja(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("`{key}`: {message}")]
    Option { key: &'static str, message: String },
    #[error("cache `{path}`: {message}; delete the file or set `overwrite_cache: true`")]
    Cache { path: PathBuf, message: String },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}

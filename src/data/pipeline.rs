//! The whole data pipeline: registry → rows → examples → tokens → sequences, with statistics, the
//! tokenised-dataset cache, a streaming variant and the preview of one example.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::cache::{self, CacheKey, CachedData};
use super::convert::{Example, convert};
use super::encoder::Encoder;
use super::pack::{
    Batch, PackedSequence, Sampler, collate, epoch_batches, epoch_order, pack_pretrain,
    pack_supervised,
};
use super::process::{
    FeedbackExample, MaskOptions, PairwiseExample, TokenizedExample, encode_feedback,
    encode_pairwise, encode_pretrain, encode_supervised,
};
use super::reader::{RawRow, RowStream, SkipRecord, data_files, read_file};
use super::registry::{DataSource, DatasetAttr, resolve_all};
use super::stats::{DatasetStats, Preview, spans};
use super::{DataError, DataOptions, MixStrategy, Stage, ValSize};
use crate::engine::hub::{HubOptions, HubProgress};

/// How many skipped rows are reported with file and place.
pub const FIRST_SKIPS: usize = 5;

/// Read/kept/skipped counters.
#[derive(Debug, Clone, Default)]
pub struct RowCounts {
    pub read: usize,
    pub kept: usize,
    pub skipped: BTreeMap<String, usize>,
    pub first: Vec<SkipRecord>,
}

impl RowCounts {
    fn skip(&mut self, record: SkipRecord) {
        *self
            .skipped
            .entry(record.reason.kind().to_string())
            .or_default() += 1;
        if self.first.len() < FIRST_SKIPS {
            self.first.push(record);
        }
    }

    fn reasons(&self) -> String {
        if self.skipped.is_empty() {
            return "the file is empty".into();
        }
        let mut s: Vec<String> = self
            .skipped
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        if let Some(first) = self.first.first() {
            s.push(format!("first: {first}"));
        }
        s.join(", ")
    }

    fn into_stats(self) -> DatasetStats {
        DatasetStats {
            rows_read: self.read,
            rows_kept: self.kept,
            skipped: self.skipped,
            first_skips: self.first.iter().map(ToString::to_string).collect(),
            ..DatasetStats::default()
        }
    }
}

/// Converted examples of the train and eval sets.
#[derive(Debug, Clone, Default)]
pub struct LoadedExamples {
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub counts: RowCounts,
}

/// Raw rows of one dataset after `num_samples` and `max_samples`.
type Rows = Vec<Result<RawRow, SkipRecord>>;

/// The data files of a dataset: local ones, or a hub dataset's (downloaded into the hub cache when needed).
fn attr_files(attr: &DatasetAttr, opts: &DataOptions) -> Result<Vec<PathBuf>, DataError> {
    match &attr.source {
        DataSource::Local(path) => data_files(&attr.name, path),
        DataSource::Hub(src) => {
            let hub = opts.hub.clone().unwrap_or_else(HubOptions::from_env);
            super::hub::dataset_files(&attr.name, src, &attr.split, &hub, &mut |_| {})
        }
    }
}

/// Downloads the hub datasets of `dataset` and `eval_dataset` that the cache lacks, with `progress` (a run does
/// this before loading the model, so a wrong split or subset fails early and downloads are shown).
pub fn fetch_hub_datasets(
    opts: &DataOptions,
    progress: &mut dyn FnMut(&HubProgress),
) -> Result<(), DataError> {
    let hub = opts.hub.clone().unwrap_or_else(HubOptions::from_env);
    for names in [&opts.dataset, &opts.eval_dataset] {
        for attr in resolve_all(&opts.dataset_dir, names)? {
            if let DataSource::Hub(src) = &attr.source {
                super::hub::dataset_files(&attr.name, src, &attr.split, &hub, progress)?;
            }
        }
    }
    Ok(())
}

fn dataset_rows(attr: &DatasetAttr, opts: &DataOptions) -> Result<(Vec<PathBuf>, Rows), DataError> {
    let files = attr_files(attr, opts)?;
    let mut rows = Vec::new();
    for f in &files {
        rows.extend(read_file(f)?);
    }
    if let Some(n) = attr.num_samples {
        // A seeded permutation, topped up with random picks when N exceeds the size (LLaMA-Factory).
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let mut idx: Vec<usize> = (0..rows.len()).collect();
        idx.shuffle(&mut rng);
        idx.truncate(n);
        while idx.len() < n && !rows.is_empty() {
            idx.push(rng.random_range(0..rows.len()));
        }
        rows = idx.into_iter().map(|i| rows[i].clone()).collect();
    }
    if let Some(m) = opts.max_samples {
        rows.truncate(m);
    }
    Ok((files, rows))
}

fn check_stage(attr: &DatasetAttr, stage: Stage) -> Result<(), DataError> {
    if stage.needs_ranking() != attr.ranking && stage != Stage::Kto {
        return Err(DataError::Unsupported {
            name: attr.name.clone(),
            message: if attr.ranking {
                format!(
                    "a preference (`ranking: true`) dataset cannot train stage `{}`; use `stage: dpo` or `rm`, or a non-ranking dataset",
                    stage.as_str()
                )
            } else {
                format!(
                    "stage `{}` needs a preference dataset (`ranking: true` with chosen/rejected)",
                    stage.as_str()
                )
            },
        });
    }
    if stage == Stage::Kto && attr.kto_tag.is_none() {
        return Err(DataError::Unsupported {
            name: attr.name.clone(),
            message: "stage `kto` needs a `kto_tag` column in dataset_info.json".into(),
        });
    }
    Ok(())
}

/// Loads and converts one list of dataset names (each must give at least one usable row).
fn load_names(
    names: &[String],
    opts: &DataOptions,
    counts: &mut RowCounts,
) -> Result<Vec<Vec<Example>>, DataError> {
    let attrs = resolve_all(&opts.dataset_dir, names)?;
    let mut out = Vec::new();
    for attr in &attrs {
        check_stage(attr, opts.stage)?;
        let (files, rows) = dataset_rows(attr, opts)?;
        let converted: Vec<Result<Example, SkipRecord>> = rows
            .into_par_iter()
            .map(|row| {
                let row = row?;
                convert(attr, &row, opts.stage)
                    .map(|e| e.filled(&opts.placeholders))
                    .map_err(|reason| SkipRecord {
                        file: row.file.clone(),
                        location: row.location,
                        reason,
                    })
            })
            .collect();
        let mut local = RowCounts::default();
        let mut examples = Vec::new();
        for r in converted {
            local.read += 1;
            match r {
                Ok(e) => {
                    local.kept += 1;
                    examples.push(e);
                }
                Err(s) => local.skip(s),
            }
        }
        if examples.is_empty() {
            return Err(DataError::NoUsableRows {
                what: format!(
                    "dataset `{}` ({})",
                    attr.name,
                    files
                        .iter()
                        .map(|f| f.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                read: local.read,
                reasons: local.reasons(),
            });
        }
        counts.read += local.read;
        counts.kept += local.kept;
        for (k, v) in local.skipped {
            *counts.skipped.entry(k).or_default() += v;
        }
        for f in local.first {
            if counts.first.len() < FIRST_SKIPS {
                counts.first.push(f);
            }
        }
        out.push(examples);
    }
    Ok(out)
}

/// `merge_dataset`: concat, or interleave (round robin, or sampled with `interleave_probs`) stopping at
/// the first exhausted dataset (`interleave_under`) or when all were exhausted once (`interleave_over`).
pub fn mix<T: Clone>(
    sets: Vec<Vec<T>>,
    strategy: MixStrategy,
    probs: Option<&[f64]>,
    seed: u64,
) -> Vec<T> {
    if sets.len() <= 1 || strategy == MixStrategy::Concat {
        return sets.into_iter().flatten().collect();
    }
    let n = sets.len();
    if probs.is_none_or(|p| p.len() != n) {
        // Hugging Face `interleave_datasets` without probabilities: whole rounds, `min_len` rounds for
        // first_exhausted, `max_len` rounds (short sets cycling) for all_exhausted.
        let lens = sets.iter().map(Vec::len);
        let rounds = if strategy == MixStrategy::InterleaveUnder {
            lens.min()
        } else {
            lens.max()
        }
        .unwrap_or(0);
        if sets.iter().any(Vec::is_empty) {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(rounds * n);
        for r in 0..rounds {
            for s in &sets {
                out.push(s[r % s.len()].clone());
            }
        }
        return out;
    }
    let mut pos = vec![0usize; n];
    let mut exhausted = vec![false; n];
    let mut out = Vec::new();
    let weights = probs.unwrap_or_default();
    let total: f64 = weights.iter().sum();
    let mut rng = StdRng::seed_from_u64(seed);
    loop {
        let mut x = rng.random::<f64>() * total;
        let mut i = n - 1;
        for (k, w) in weights.iter().enumerate() {
            if x < *w {
                i = k;
                break;
            }
            x -= w;
        }
        if sets[i].is_empty() {
            return out;
        }
        if pos[i] >= sets[i].len() {
            exhausted[i] = true;
            if strategy == MixStrategy::InterleaveUnder || exhausted.iter().all(|&e| e) {
                return out;
            }
            pos[i] = 0;
        }
        out.push(sets[i][pos[i]].clone());
        pos[i] += 1;
        if pos[i] >= sets[i].len() {
            exhausted[i] = true;
            if strategy == MixStrategy::InterleaveUnder || exhausted.iter().all(|&e| e) {
                return out;
            }
            pos[i] = 0;
        }
    }
}

fn check_options(opts: &DataOptions) -> Result<(), DataError> {
    if opts.dataset.is_empty() {
        return Err(DataError::Option {
            key: "dataset",
            message: "no dataset given; name at least one entry of dataset_info.json".into(),
        });
    }
    if opts.mask_history && opts.train_on_prompt {
        return Err(DataError::Option {
            key: "mask_history",
            message:
                "`mask_history` is incompatible with `train_on_prompt`; set one of them to false"
                    .into(),
        });
    }
    if opts.cutoff_len < 2 {
        return Err(DataError::Option {
            key: "cutoff_len",
            message: "must be at least 2".into(),
        });
    }
    if let Some(p) = &opts.interleave_probs {
        if opts.mix_strategy == MixStrategy::Concat {
            return Err(DataError::Option {
                key: "interleave_probs",
                message: "only used with `mix_strategy: interleave_under` or `interleave_over`"
                    .into(),
            });
        }
        if p.len() != opts.dataset.len()
            || p.iter().any(|x| !x.is_finite() || *x < 0.0)
            || p.iter().sum::<f64>() <= 0.0
        {
            return Err(DataError::Option {
                key: "interleave_probs",
                message: format!(
                    "needs one non-negative probability per dataset ({} datasets, {} probabilities)",
                    opts.dataset.len(),
                    p.len()
                ),
            });
        }
    }
    Ok(())
}

/// LLaMA-Factory's preprocessing batch (`preprocessing_batch_size`, 1000): stage kto pairs answers within one.
const PREPROCESSING_BATCH: usize = 1000;

/// Stage kto's mismatched pairs for the KL estimate: within each preprocessing batch, example i gets the answer of
/// example i − 1 (the first gets the last's), as `FeedbackDatasetProcessor` rotates `_response`. Runs on the mixed
/// dataset before the validation split, as LLaMA-Factory preprocesses before it splits.
fn assign_kl_answers(examples: &mut [Example]) {
    for chunk in examples.chunks_mut(PREPROCESSING_BATCH) {
        let answers: Vec<Option<super::convert::Message>> =
            chunk.iter().map(|e| e.kto_answer().cloned()).collect();
        let n = chunk.len();
        for (i, e) in chunk.iter_mut().enumerate() {
            e.kl_answer = answers[(i + n - 1) % n].clone();
        }
    }
}

/// Reads, converts, mixes and splits the datasets (no tokenisation). Every stage's data is validated here.
pub fn load_examples(opts: &DataOptions) -> Result<LoadedExamples, DataError> {
    check_options(opts)?;
    let mut counts = RowCounts::default();
    let sets = load_names(&opts.dataset, opts, &mut counts)?;
    let mut train = mix(
        sets,
        opts.mix_strategy,
        opts.interleave_probs.as_deref(),
        opts.seed,
    );
    if opts.stage == Stage::Kto {
        assign_kl_answers(&mut train);
    }
    let eval = if opts.eval_dataset.is_empty() {
        let n_val = opts.val_size.count_of(train.len());
        if n_val > 0 {
            if n_val >= train.len() {
                return Err(DataError::Option {
                    key: "val_size",
                    message: format!(
                        "takes {n_val} of {} rows, leaving none to train on; lower it",
                        train.len()
                    ),
                });
            }
            // `train_test_split(test_size, seed)`: a seeded shuffle, then the tail is the test split.
            let mut rng = StdRng::seed_from_u64(opts.seed);
            train.shuffle(&mut rng);
            train.split_off(train.len() - n_val)
        } else {
            Vec::new()
        }
    } else {
        let mut eval: Vec<Example> = load_names(&opts.eval_dataset, opts, &mut counts)?
            .into_iter()
            .flatten()
            .collect();
        if opts.stage == Stage::Kto {
            assign_kl_answers(&mut eval);
        }
        eval
    };
    Ok(LoadedExamples {
        train,
        eval,
        counts,
    })
}

/// The evaluation examples alone (`termtune predict`): `eval_dataset`, else the `val_size` split of
/// `dataset` (as training would hold it out).
pub fn load_eval_examples(opts: &DataOptions) -> Result<(Vec<Example>, RowCounts), DataError> {
    if !opts.eval_dataset.is_empty() {
        let mut counts = RowCounts::default();
        let sets = load_names(&opts.eval_dataset, opts, &mut counts)?;
        return Ok((sets.into_iter().flatten().collect(), counts));
    }
    if opts.val_size == super::ValSize::None || opts.dataset.is_empty() {
        return Err(DataError::Option {
            key: "eval_dataset",
            message: "nothing to evaluate on: name the evaluation data with `eval_dataset` (e.g. `eval_dataset=alpaca_en_demo` on the command line), or hold out part of `dataset` with `val_size`".into(),
        });
    }
    let loaded = load_examples(opts)?;
    Ok((loaded.eval, loaded.counts))
}

/// The tokenised, packed dataset, ready for batches.
#[derive(Debug, Clone)]
pub struct PreparedDataset {
    pub train: Vec<PackedSequence>,
    pub eval: Vec<PackedSequence>,
    pub stats: DatasetStats,
    pub warnings: Vec<String>,
    pub from_cache: bool,
    pub cache_file: Option<PathBuf>,
    pub pad_id: u32,
    /// Neat packing: batches need the block-diagonal mask.
    pub block_diagonal: bool,
    /// Preference pairs (`stage: dpo`): sequence `2i` is pair i's chosen answer, `2i + 1` its rejected one, and a
    /// batch of k pairs holds the k chosen sequences, then the k rejected ones (LLaMA-Factory's
    /// `PairwiseDataCollatorWithPadding`). Stage rm lays out its pairs the same way, and stage kto its examples:
    /// sequence `2i` is example i (prompt + answer), `2i + 1` its KL sequence (prompt + an unrelated answer).
    pub pairwise: bool,
    /// Stage kto: whether each training example's answer is desirable (`kto_tag`); empty for the other stages.
    pub train_tags: Vec<bool>,
    /// Stage kto: the same for the evaluation examples.
    pub eval_tags: Vec<bool>,
}

impl PreparedDataset {
    /// Training examples: sequences, or pairs of them.
    pub fn train_examples(&self) -> usize {
        self.examples_in(&self.train)
    }

    /// Evaluation examples: sequences, or pairs of them.
    pub fn eval_examples(&self) -> usize {
        self.examples_in(&self.eval)
    }

    fn examples_in(&self, seqs: &[PackedSequence]) -> usize {
        if self.pairwise {
            seqs.len() / 2
        } else {
            seqs.len()
        }
    }

    /// The training batches of `epoch` in the order of `sampler` (seeded by `seed` and the epoch).
    pub fn epoch_batches(
        &self,
        batch_size: usize,
        sampler: Sampler,
        seed: u64,
        epoch: u64,
    ) -> Vec<Batch> {
        let lengths: Vec<usize> = if self.pairwise {
            self.train
                .chunks(2)
                .map(|p| p.iter().map(PackedSequence::len).max().unwrap_or(0))
                .collect()
        } else {
            self.train.iter().map(PackedSequence::len).collect()
        };
        let order = epoch_order(&lengths, batch_size, sampler, seed, epoch);
        self.batches(&self.train, &self.train_tags, &order, batch_size)
    }

    /// Evaluation batches in order.
    pub fn eval_batches(&self, batch_size: usize) -> Vec<Batch> {
        let order: Vec<usize> = (0..self.eval_examples()).collect();
        self.batches(&self.eval, &self.eval_tags, &order, batch_size)
    }

    fn batches(
        &self,
        seqs: &[PackedSequence],
        tags: &[bool],
        order: &[usize],
        batch_size: usize,
    ) -> Vec<Batch> {
        if !self.pairwise {
            return epoch_batches(seqs, order, batch_size, self.pad_id, self.block_diagonal);
        }
        order
            .chunks(batch_size.max(1))
            .map(|chunk| {
                let index: Vec<usize> = [0, 1]
                    .iter()
                    .flat_map(|&side| chunk.iter().map(move |&i| 2 * i + side))
                    .filter(|&j| j < seqs.len())
                    .collect();
                let items: Vec<&PackedSequence> = index.iter().map(|&j| &seqs[j]).collect();
                let mut batch = collate(&items, self.pad_id, false);
                batch.kto_tags = chunk.iter().filter_map(|&i| tags.get(i).copied()).collect();
                batch.seq_index = index;
                batch
            })
            .collect()
    }
}

/// `cutoff_len` as the processors use it: one less when packing (LLaMA-Factory).
fn effective_cutoff(opts: &DataOptions) -> usize {
    if opts.packing_enabled() {
        opts.cutoff_len.saturating_sub(1).max(1)
    } else {
        opts.cutoff_len
    }
}

/// Tokenises one example for `opts.stage`.
pub fn tokenize_example(
    enc: &Encoder,
    ex: &Example,
    opts: &DataOptions,
) -> Result<TokenizedExample, super::SkipReason> {
    let cutoff_len = effective_cutoff(opts);
    match opts.stage {
        Stage::Pt => Ok(encode_pretrain(enc, ex, cutoff_len, opts.packing_enabled())),
        _ => encode_supervised(
            enc,
            ex,
            MaskOptions {
                cutoff_len,
                train_on_prompt: opts.train_on_prompt,
                mask_history: opts.mask_history,
            },
        ),
    }
}

fn tokenize_all(
    enc: &Encoder,
    examples: &[Example],
    opts: &DataOptions,
    counts: &mut RowCounts,
) -> Vec<TokenizedExample> {
    tokenize_with(examples, counts, |ex| tokenize_example(enc, ex, opts))
}

/// Preference pairs as two sequences each (chosen, then rejected), for stages dpo and rm.
fn tokenize_pairs(
    enc: &Encoder,
    examples: &[Example],
    opts: &DataOptions,
    counts: &mut RowCounts,
) -> Vec<TokenizedExample> {
    tokenize_with(examples, counts, |ex| {
        encode_pairwise(enc, ex, opts.cutoff_len)
    })
    .into_iter()
    .flat_map(|p: PairwiseExample| {
        [
            TokenizedExample {
                input_ids: p.chosen_input_ids,
                labels: p.chosen_labels,
                truncated: p.chosen_truncated,
            },
            TokenizedExample {
                input_ids: p.rejected_input_ids,
                labels: p.rejected_labels,
                truncated: p.rejected_truncated,
            },
        ]
    })
    .collect()
}

/// Stage kto's examples as two sequences each (the example, then its KL sequence) and their tags.
fn tokenize_feedback(
    enc: &Encoder,
    examples: &[Example],
    opts: &DataOptions,
    counts: &mut RowCounts,
) -> (Vec<TokenizedExample>, Vec<bool>) {
    let encoded: Vec<FeedbackExample> = tokenize_with(examples, counts, |ex| {
        encode_feedback(enc, ex, opts.cutoff_len)
    });
    let tags = encoded.iter().map(|f| f.desirable).collect();
    let seqs = encoded.into_iter().flat_map(|f| [f.target, f.kl]).collect();
    (seqs, tags)
}

/// `encode` on every example in parallel; the skipped ones are counted with their file and place.
fn tokenize_with<T: Send>(
    examples: &[Example],
    counts: &mut RowCounts,
    encode: impl Fn(&Example) -> Result<T, super::SkipReason> + Sync,
) -> Vec<T> {
    let results: Vec<Result<T, SkipRecord>> = examples
        .par_iter()
        .map(|ex| {
            encode(ex).map_err(|reason| SkipRecord {
                file: ex.file.clone(),
                location: ex.location,
                reason,
            })
        })
        .collect();
    let mut out = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(t) => out.push(t),
            Err(s) => {
                counts.kept = counts.kept.saturating_sub(1);
                counts.skip(s);
            }
        }
    }
    out
}

fn to_sequences(
    enc: &Encoder,
    examples: Vec<TokenizedExample>,
    opts: &DataOptions,
) -> (Vec<PackedSequence>, usize) {
    if !opts.packing_enabled() {
        return (examples.into_iter().map(PackedSequence::from).collect(), 0);
    }
    let examples = examples.as_slice();
    let cutoff = effective_cutoff(opts);
    if opts.stage == Stage::Pt && !opts.neat_packing {
        let bos = if enc.add_bos_token {
            enc.bos.as_ref().map(|b| b.1)
        } else {
            None
        };
        return (pack_pretrain(examples, cutoff, bos, enc.pad_id), 0);
    }
    let packed = pack_supervised(examples, cutoff, enc.pad_id);
    (packed.sequences, packed.dropped_too_long)
}

/// Runs the pipeline for `pt` / `sft`, reusing the on-disk cache when the inputs are unchanged.
pub fn prepare_dataset(opts: &DataOptions, enc: &Encoder) -> Result<PreparedDataset, DataError> {
    check_options(opts)?;
    if opts.streaming {
        return Err(DataError::Option {
            key: "streaming",
            message: "a streamed dataset is read with `stream_dataset`, not prepared in memory"
                .into(),
        });
    }
    // Cache key: options, template + tokenizer, registry entries and file contents.
    let mut key = CacheKey::new(opts, &enc.fingerprint());
    let mut names = opts.dataset.clone();
    names.extend(opts.eval_dataset.iter().cloned());
    for attr in resolve_all(&opts.dataset_dir, &names)? {
        key.add_str(&format!("{attr:?}"));
        for f in attr_files(&attr, opts)? {
            key.add_file(&f)?;
        }
    }
    let dir = opts
        .tokenized_path
        .clone()
        .unwrap_or_else(cache::default_cache_dir);
    let file = cache::cache_file(&dir, &key.finish());
    let block_diagonal = opts.neat_packing;
    let mut cache_warning = None;
    if !opts.overwrite_cache {
        match cache::read(&file) {
            Ok(Some(c)) => {
                return Ok(PreparedDataset {
                    train: c.train,
                    eval: c.eval,
                    stats: c.stats,
                    warnings: c.warnings,
                    from_cache: true,
                    cache_file: Some(file),
                    pad_id: enc.pad_id,
                    block_diagonal,
                    pairwise: opts.stage.in_pairs(),
                    train_tags: c.train_tags,
                    eval_tags: c.eval_tags,
                });
            }
            Ok(None) => {}
            Err(e) => cache_warning = Some(format!("ignored a broken cache file: {e}")),
        }
    }

    if opts.stage == Stage::Ppo {
        let loaded = load_examples(opts)?;
        return Err(DataError::Unsupported {
            name: opts.dataset.join(","),
            message: format!(
                "stage `{}` training is not implemented yet (its data was validated: {} examples)",
                opts.stage.as_str(),
                loaded.train.len() + loaded.eval.len()
            ),
        });
    }

    let loaded = load_examples(opts)?;
    let mut counts = loaded.counts;
    let pairwise = opts.stage.in_pairs();
    let (mut train_tags, mut eval_tags) = (Vec::new(), Vec::new());
    let (train_tok, eval_tok) = match opts.stage {
        Stage::Dpo | Stage::Rm => (
            tokenize_pairs(enc, &loaded.train, opts, &mut counts),
            tokenize_pairs(enc, &loaded.eval, opts, &mut counts),
        ),
        Stage::Kto => {
            let (train, t) = tokenize_feedback(enc, &loaded.train, opts, &mut counts);
            let (eval, e) = tokenize_feedback(enc, &loaded.eval, opts, &mut counts);
            (train_tags, eval_tags) = (t, e);
            (train, eval)
        }
        _ => (
            tokenize_all(enc, &loaded.train, opts, &mut counts),
            tokenize_all(enc, &loaded.eval, opts, &mut counts),
        ),
    };
    if train_tok.is_empty() {
        return Err(DataError::NoUsableRows {
            what: format!("datasets {}", opts.dataset.join(", ")),
            read: counts.read,
            reasons: counts.reasons(),
        });
    }
    let mut stats = counts.into_stats();
    let per_example = if pairwise { 2 } else { 1 };
    stats.train_examples = train_tok.len() / per_example;
    stats.eval_examples = eval_tok.len() / per_example;
    stats.set_lengths(&train_tok);
    stats.untrained = train_tok.iter().filter(|t| t.trained_tokens() == 0).count();
    let (train, dropped) = to_sequences(enc, train_tok, opts);
    let (eval, _) = to_sequences(enc, eval_tok, opts);
    stats.dropped_too_long = dropped;
    stats.train_sequences = train.len() / per_example;
    stats.tokens_per_epoch = train.iter().map(PackedSequence::real_tokens).sum();
    stats.trained_tokens_per_epoch = train
        .iter()
        .map(|s| {
            s.labels
                .iter()
                .filter(|&&l| l != super::IGNORE_INDEX)
                .count()
        })
        .sum();
    stats.set_steps(
        opts.per_device_train_batch_size,
        opts.gradient_accumulation_steps,
        opts.num_train_epochs,
        opts.max_steps,
    );
    let mut warnings = enc.warnings.clone();
    warnings.extend(cache_warning);
    if train.is_empty() {
        return Err(DataError::Option {
            key: "cutoff_len",
            message: format!(
                "packing left no training sequence ({} examples longer than cutoff_len {} were dropped); raise `cutoff_len` or turn `packing` off",
                dropped, opts.cutoff_len
            ),
        });
    }
    let data = CachedData {
        train,
        eval,
        stats,
        warnings,
        train_tags,
        eval_tags,
    };
    let cache_file = match cache::write(&file, &data) {
        Ok(()) => Some(file),
        Err(e) => {
            let mut d = data;
            d.warnings
                .push(format!("could not write the dataset cache: {e}"));
            return Ok(PreparedDataset {
                train: d.train,
                eval: d.eval,
                stats: d.stats,
                warnings: d.warnings,
                from_cache: false,
                cache_file: None,
                pad_id: enc.pad_id,
                block_diagonal,
                pairwise,
                train_tags: d.train_tags,
                eval_tags: d.eval_tags,
            });
        }
    };
    Ok(PreparedDataset {
        train: data.train,
        eval: data.eval,
        stats: data.stats,
        warnings: data.warnings,
        from_cache: false,
        cache_file,
        pad_id: enc.pad_id,
        block_diagonal,
        pairwise,
        train_tags: data.train_tags,
        eval_tags: data.eval_tags,
    })
}

/// A streamed, tokenised dataset: JSON Lines read one line at a time through a shuffle buffer of
/// `buffer_size` rows (bounded memory). Skipped rows are counted in [`StreamingDataset::counts`].
pub struct StreamingDataset<'a> {
    enc: &'a Encoder,
    opts: DataOptions,
    sources: Vec<(DatasetAttr, RowStream)>,
    current: usize,
    buffer: Vec<Example>,
    rng: StdRng,
    taken: usize,
    pub counts: RowCounts,
}

/// Opens `opts.dataset` for streaming (`streaming: true`; `max_steps` is required as the length is unknown).
pub fn stream_dataset<'a>(
    opts: &DataOptions,
    enc: &'a Encoder,
) -> Result<StreamingDataset<'a>, DataError> {
    check_options(opts)?;
    if opts.max_steps.is_none() {
        return Err(DataError::Option {
            key: "max_steps",
            message: "streaming needs `max_steps` (the dataset length is unknown)".into(),
        });
    }
    if opts.mix_strategy != MixStrategy::Concat {
        return Err(DataError::Option {
            key: "mix_strategy",
            message: "streaming supports `concat` only for now".into(),
        });
    }
    if !matches!(opts.val_size, ValSize::None) || !opts.eval_dataset.is_empty() {
        return Err(DataError::Option {
            key: "val_size",
            message:
                "streaming has no validation split yet; set `val_size: 0` and no `eval_dataset`"
                    .into(),
        });
    }
    if !matches!(opts.stage, Stage::Pt | Stage::Sft) {
        return Err(DataError::Option {
            key: "stage",
            message: format!("stage `{}` cannot stream yet", opts.stage.as_str()),
        });
    }
    let mut sources = Vec::new();
    for attr in resolve_all(&opts.dataset_dir, &opts.dataset)? {
        check_stage(&attr, opts.stage)?;
        let files = attr_files(&attr, opts)?;
        sources.push((attr, RowStream::new(files)?));
    }
    Ok(StreamingDataset {
        enc,
        opts: opts.clone(),
        sources,
        current: 0,
        buffer: Vec::new(),
        rng: StdRng::seed_from_u64(opts.seed),
        taken: 0,
        counts: RowCounts::default(),
    })
}

impl StreamingDataset<'_> {
    /// Next converted example from the files, skipping (and counting) bad rows.
    fn next_example(&mut self) -> Option<Result<Example, DataError>> {
        loop {
            if self.opts.max_samples.is_some_and(|m| self.taken >= m) {
                return None;
            }
            let (attr, stream) = self.sources.get_mut(self.current)?;
            match stream.next() {
                None => self.current += 1,
                Some(Err(e)) => return Some(Err(e)),
                Some(Ok(row)) => {
                    self.taken += 1;
                    self.counts.read += 1;
                    let converted = row.and_then(|row| {
                        convert(attr, &row, self.opts.stage)
                            .map(|e| e.filled(&self.opts.placeholders))
                            .map_err(|reason| SkipRecord {
                                file: row.file.clone(),
                                location: row.location,
                                reason,
                            })
                    });
                    match converted {
                        Ok(e) => {
                            self.counts.kept += 1;
                            return Some(Ok(e));
                        }
                        Err(s) => self.counts.skip(s),
                    }
                }
            }
        }
    }
}

impl Iterator for StreamingDataset<'_> {
    type Item = Result<TokenizedExample, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            while self.buffer.len() < self.opts.buffer_size.max(1) {
                match self.next_example() {
                    Some(Ok(e)) => self.buffer.push(e),
                    Some(Err(e)) => return Some(Err(e)),
                    None => break,
                }
            }
            if self.buffer.is_empty() {
                return None;
            }
            let i = self.rng.random_range(0..self.buffer.len());
            let ex = self.buffer.swap_remove(i);
            match tokenize_example(self.enc, &ex, &self.opts) {
                Ok(t) => return Some(Ok(t)),
                Err(reason) => {
                    self.counts.kept = self.counts.kept.saturating_sub(1);
                    self.counts.skip(SkipRecord {
                        file: ex.file.clone(),
                        location: ex.location,
                        reason,
                    });
                }
            }
        }
    }
}

/// Example `index` (0-based, over the rows of `opts.dataset` in file order, after `max_samples`): the raw
/// record, the rendered text and the ids with trained/masked spans, or why the row is skipped.
pub fn preview(opts: &DataOptions, enc: &Encoder, index: usize) -> Result<Preview, DataError> {
    let attrs = resolve_all(&opts.dataset_dir, &opts.dataset)?;
    let mut seen = 0usize;
    for attr in &attrs {
        let (_, rows) = dataset_rows(attr, opts)?;
        if index >= seen + rows.len() {
            seen += rows.len();
            continue;
        }
        let row = &rows[index - seen];
        let mut p = Preview {
            index,
            source: String::new(),
            raw: serde_json::Value::Null,
            skipped: None,
            rendered: String::new(),
            input_ids: Vec::new(),
            labels: Vec::new(),
            spans: Vec::new(),
        };
        let row = match row {
            Ok(r) => r,
            Err(s) => {
                p.source = format!("{} {}", s.file.display(), s.location);
                p.skipped = Some(s.reason.to_string());
                return Ok(p);
            }
        };
        p.source = format!("{} {}", row.file.display(), row.location);
        p.raw = row.value.clone();
        let ex = match convert(attr, row, opts.stage) {
            Ok(e) => e.filled(&opts.placeholders),
            Err(reason) => {
                p.skipped = Some(reason.to_string());
                return Ok(p);
            }
        };
        let tok = match tokenize_example(enc, &ex, opts) {
            Ok(t) => t,
            Err(reason) => {
                p.skipped = Some(reason.to_string());
                return Ok(p);
            }
        };
        p.rendered = if opts.stage == Stage::Pt {
            enc.tokenizer
                .decode(&tok.input_ids, false)
                .unwrap_or_default()
        } else {
            let mut messages = ex.prompt.clone();
            messages.extend(ex.response.iter().cloned());
            enc.render_multiturn(&messages, &ex.system, &ex.tools)
                .map(|turns| turns.into_iter().map(|(a, b)| a + &b).collect::<String>())
                .unwrap_or_default()
        };
        p.spans = spans(&tok.input_ids, &tok.labels, |ids| {
            enc.tokenizer.decode(ids, false).unwrap_or_default()
        });
        p.input_ids = tok.input_ids;
        p.labels = tok.labels;
        return Ok(p);
    }
    Err(DataError::Option {
        key: "preview",
        message: format!("example {index} does not exist: the datasets have {seen} rows"),
    })
}

//! Dataset statistics and the tokenised preview of one example (pure data + text formatters, used by
//! the TUI's dataset pane and `termtune check --preview N`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::process::{IGNORE_INDEX, TokenizedExample};

/// Counts of reading and converting rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DatasetStats {
    pub rows_read: usize,
    pub rows_kept: usize,
    /// Skipped rows per reason ([`super::SkipReason::kind`]).
    pub skipped: BTreeMap<String, usize>,
    /// The first few skipped rows: "file line N: reason".
    pub first_skips: Vec<String>,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub tokens_mean: f64,
    pub tokens_p50: usize,
    pub tokens_p95: usize,
    pub tokens_max: usize,
    /// Examples cut by `cutoff_len`.
    pub truncated: usize,
    /// Examples left with no trained token (the prompt filled `cutoff_len`); LLaMA-Factory keeps them.
    pub untrained: usize,
    /// Examples dropped by packing because they are longer than `cutoff_len`.
    pub dropped_too_long: usize,
    /// Training sequences after packing (= `train_examples` without packing).
    pub train_sequences: usize,
    /// Non-padding tokens in the training sequences, i.e. per epoch.
    pub tokens_per_epoch: usize,
    /// Tokens with a label per epoch.
    pub trained_tokens_per_epoch: usize,
    /// Optimizer steps per epoch for the batch settings (⌈batches / accumulation⌉, at least 1, as Hugging Face's Trainer).
    pub steps_per_epoch: usize,
    /// Total optimizer steps (`max_steps` if set, else epochs × steps per epoch).
    pub total_steps: usize,
}

impl DatasetStats {
    pub fn skipped_total(&self) -> usize {
        self.skipped.values().sum()
    }

    /// Fills the token-length fields from the tokenised train examples.
    pub fn set_lengths(&mut self, examples: &[TokenizedExample]) {
        let mut lens: Vec<usize> = examples.iter().map(TokenizedExample::len).collect();
        lens.sort_unstable();
        self.truncated = examples.iter().filter(|e| e.truncated).count();
        if lens.is_empty() {
            return;
        }
        #[allow(clippy::cast_precision_loss)]
        {
            self.tokens_mean = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
        }
        self.tokens_p50 = percentile(&lens, 50);
        self.tokens_p95 = percentile(&lens, 95);
        self.tokens_max = lens.last().copied().unwrap_or(0);
    }

    /// Optimizer steps for `sequences` training sequences.
    pub fn set_steps(
        &mut self,
        batch_size: usize,
        grad_accum: usize,
        epochs: f64,
        max_steps: Option<usize>,
    ) {
        let batches = self.train_sequences.div_ceil(batch_size.max(1));
        // Hugging Face's Trainer: the last, partial accumulation still makes an update.
        self.steps_per_epoch = batches.div_ceil(grad_accum.max(1)).max(1);
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let total = (self.steps_per_epoch as f64 * epochs).ceil() as usize;
        self.total_steps = max_steps.unwrap_or(total);
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[usize], p: usize) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

/// A text formatter for `termtune check`.
pub fn format_stats(s: &DatasetStats) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rows: {} read, {} kept, {} skipped",
        s.rows_read,
        s.rows_kept,
        s.skipped_total()
    );
    for (reason, n) in &s.skipped {
        let _ = writeln!(out, "  skipped ({reason}): {n}");
    }
    for line in &s.first_skips {
        let _ = writeln!(out, "  e.g. {line}");
    }
    let _ = writeln!(
        out,
        "examples: {} train, {} eval",
        s.train_examples, s.eval_examples
    );
    let _ = writeln!(
        out,
        "tokens per example: mean {:.1}, p50 {}, p95 {}, max {}",
        s.tokens_mean, s.tokens_p50, s.tokens_p95, s.tokens_max
    );
    let _ = writeln!(out, "truncated by cutoff_len: {}", s.truncated);
    if s.untrained > 0 {
        let _ = writeln!(
            out,
            "warning: {} examples have no trained token (the prompt fills cutoff_len); raise `cutoff_len`",
            s.untrained
        );
    }
    if s.dropped_too_long > 0 || s.train_sequences != s.train_examples {
        let _ = writeln!(
            out,
            "packed: {} sequences ({} examples dropped as longer than cutoff_len)",
            s.train_sequences, s.dropped_too_long
        );
    }
    let _ = writeln!(
        out,
        "tokens per epoch: {} ({} trained)",
        s.tokens_per_epoch, s.trained_tokens_per_epoch
    );
    let _ = writeln!(
        out,
        "optimizer steps: {} per epoch, {} total",
        s.steps_per_epoch, s.total_steps
    );
    out
}

/// A run of tokens that are all trained or all masked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub trained: bool,
    pub start: usize,
    pub end: usize,
    pub text: String,
}

/// Example *i* as the model sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preview {
    pub index: usize,
    /// "file row N" of the raw record.
    pub source: String,
    pub raw: serde_json::Value,
    /// Why the row is skipped, if it is.
    pub skipped: Option<String>,
    /// The rendered text (template applied).
    pub rendered: String,
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub spans: Vec<Span>,
}

/// Splits ids into trained/masked spans, decoding each with `decode`.
pub fn spans(input_ids: &[u32], labels: &[i64], decode: impl Fn(&[u32]) -> String) -> Vec<Span> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < input_ids.len() {
        let trained = labels.get(start).is_some_and(|&l| l != IGNORE_INDEX);
        let mut end = start + 1;
        while end < input_ids.len()
            && labels.get(end).is_some_and(|&l| l != IGNORE_INDEX) == trained
        {
            end += 1;
        }
        out.push(Span {
            trained,
            start,
            end,
            text: decode(&input_ids[start..end]),
        });
        start = end;
    }
    out
}

/// A text formatter for `termtune check --preview N`.
pub fn format_preview(p: &Preview) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "example {} ({})", p.index, p.source);
    let _ = writeln!(out, "--- raw record");
    let _ = writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(&p.raw).unwrap_or_default()
    );
    if let Some(reason) = &p.skipped {
        let _ = writeln!(out, "--- skipped: {reason}");
        return out;
    }
    let _ = writeln!(out, "--- rendered");
    let _ = writeln!(out, "{}", p.rendered);
    let _ = writeln!(
        out,
        "--- tokens: {} ({} trained)",
        p.input_ids.len(),
        p.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    );
    let _ = writeln!(out, "input_ids: {:?}", p.input_ids);
    let _ = writeln!(out, "labels:    {:?}", p.labels);
    for s in &p.spans {
        let _ = writeln!(
            out,
            "[{} {}..{}] {:?}",
            if s.trained { "trained" } else { "masked " },
            s.start,
            s.end,
            s.text
        );
    }
    out
}

//! Packing (LLaMA-Factory's `greedy_knapsack` + `PackedSupervisedDatasetProcessor`, and the `pt`
//! concatenate-and-cut), batches (padding collate, block-diagonal attention) and the epoch sampler.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::process::{IGNORE_INDEX, TokenizedExample, pretrain_labels};

/// One training sequence: a single example, or several packed ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedSequence {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Restart at 0 for every packed example; 0 on padding.
    pub position_ids: Vec<u32>,
    /// 1, 2, 3… per packed example, 0 on padding (LLaMA-Factory's neat-packing attention mask values).
    pub sequence_ids: Vec<u32>,
}

impl From<TokenizedExample> for PackedSequence {
    /// A single, unpacked example (moves the ids and labels).
    fn from(ex: TokenizedExample) -> PackedSequence {
        let n = ex.input_ids.len();
        PackedSequence {
            input_ids: ex.input_ids,
            labels: ex.labels,
            position_ids: (0..u32::try_from(n).unwrap_or(u32::MAX)).collect(),
            sequence_ids: vec![1; n],
        }
    }
}

impl PackedSequence {
    /// A single, unpacked example.
    pub fn single(ex: &TokenizedExample) -> PackedSequence {
        let n = ex.input_ids.len();
        PackedSequence {
            input_ids: ex.input_ids.clone(),
            labels: ex.labels.clone(),
            position_ids: (0..u32::try_from(n).unwrap_or(u32::MAX)).collect(),
            sequence_ids: vec![1; n],
        }
    }

    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Tokens that are not padding.
    pub fn real_tokens(&self) -> usize {
        self.sequence_ids.iter().filter(|&&s| s != 0).count()
    }
}

/// `greedy_knapsack(numbers, capacity)`: groups lengths so each group sums to ≤ `capacity`. Returns
/// groups of lengths in the order LLaMA-Factory picks them (ascending sort, then the largest that fits).
pub fn greedy_knapsack(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut numbers = lengths.to_vec();
    numbers.sort_unstable();
    let mut knapsacks = Vec::new();
    while !numbers.is_empty() {
        let mut current = Vec::new();
        let mut remaining = capacity;
        loop {
            // bisect.bisect(numbers, remaining) - 1
            let index = numbers.partition_point(|&n| n <= remaining);
            if index == 0 {
                break;
            }
            let n = numbers.remove(index - 1);
            remaining -= n;
            current.push(n);
        }
        if current.is_empty() {
            // Only lengths > capacity are left; the caller drops those before packing.
            break;
        }
        knapsacks.push(current);
    }
    knapsacks
}

/// Result of packing supervised examples.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Packed {
    pub sequences: Vec<PackedSequence>,
    /// Examples longer than the capacity, dropped ("Dropped lengthy example").
    pub dropped_too_long: usize,
}

/// Packs supervised examples into sequences of exactly `cutoff_len + 1` tokens (`cutoff_len` here is
/// the already-reduced one, LLaMA-Factory's `cutoff_len - 1`), padding with `pad_id`.
pub fn pack_supervised(examples: &[TokenizedExample], cutoff_len: usize, pad_id: u32) -> Packed {
    let mut lengths = Vec::new();
    let mut length2indexes: std::collections::HashMap<usize, Vec<usize>> =
        std::collections::HashMap::new();
    let mut kept: Vec<&TokenizedExample> = Vec::new();
    let mut dropped = 0;
    for ex in examples {
        let length = ex.input_ids.len();
        if length > cutoff_len {
            dropped += 1;
            continue;
        }
        lengths.push(length);
        length2indexes.entry(length).or_default().push(kept.len());
        kept.push(ex);
    }
    let mut sequences = Vec::new();
    for knapsack in greedy_knapsack(&lengths, cutoff_len) {
        let mut seq = PackedSequence {
            input_ids: Vec::with_capacity(cutoff_len + 1),
            labels: Vec::with_capacity(cutoff_len + 1),
            position_ids: Vec::with_capacity(cutoff_len + 1),
            sequence_ids: Vec::with_capacity(cutoff_len + 1),
        };
        for (i, length) in knapsack.iter().enumerate() {
            let Some(index) = length2indexes.get_mut(length).and_then(Vec::pop) else {
                continue;
            };
            let ex = kept[index];
            seq.input_ids.extend_from_slice(&ex.input_ids);
            seq.labels.extend_from_slice(&ex.labels);
            seq.position_ids
                .extend(0..u32::try_from(ex.input_ids.len()).unwrap_or(u32::MAX));
            seq.sequence_ids.extend(std::iter::repeat_n(
                u32::try_from(i + 1).unwrap_or(u32::MAX),
                ex.input_ids.len(),
            ));
        }
        let pad = (cutoff_len + 1).saturating_sub(seq.input_ids.len());
        seq.input_ids.extend(std::iter::repeat_n(pad_id, pad));
        seq.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        seq.position_ids.extend(std::iter::repeat_n(0, pad));
        seq.sequence_ids.extend(std::iter::repeat_n(0, pad));
        sequences.push(seq);
    }
    Packed {
        sequences,
        dropped_too_long: dropped,
    }
}

/// `pt` packing: concatenate all texts and cut into blocks of `block_size` (the remainder is dropped);
/// with `bos` the first token of every block becomes the bos id. Every block is one sequence (plain
/// causal attention across documents, as in LLaMA-Factory's pretraining).
pub fn pack_pretrain(
    examples: &[TokenizedExample],
    block_size: usize,
    bos: Option<u32>,
    pad_id: u32,
) -> Vec<PackedSequence> {
    if block_size == 0 {
        return Vec::new();
    }
    let all: Vec<u32> = examples
        .iter()
        .flat_map(|e| e.input_ids.iter().copied())
        .collect();
    let total = (all.len() / block_size) * block_size;
    all[..total]
        .chunks(block_size)
        .map(|chunk| {
            let mut ids = chunk.to_vec();
            if let (Some(b), Some(first)) = (bos, ids.first_mut()) {
                *first = b;
            }
            let labels = pretrain_labels(&ids, pad_id);
            PackedSequence {
                position_ids: (0..u32::try_from(ids.len()).unwrap_or(u32::MAX)).collect(),
                sequence_ids: vec![1; ids.len()],
                input_ids: ids,
                labels,
            }
        })
        .collect()
}

/// A padded batch, row-major `batch_size × seq_len` (plain data; the engine makes tensors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u8>,
    pub position_ids: Vec<u32>,
    /// Which packed example a token belongs to (0 = padding).
    pub sequence_ids: Vec<u32>,
    /// True with neat packing: attention must stay inside one sequence id (block-diagonal causal mask;
    /// the engine builds it from `sequence_ids` and `position_ids`).
    pub block_diagonal: bool,
    /// Stage kto: whether each example's answer is desirable (the batch holds k examples, then their k KL
    /// sequences); empty for the other stages.
    pub kto_tags: Vec<bool>,
    /// Stages dpo, kto and rm: the index of each row's sequence in its split (train or eval), which identifies it
    /// across epochs (the reference's log-probabilities are cached by it); empty for the other stages.
    pub seq_index: Vec<usize>,
    /// A batch of pairs sharing their prompts ([`Batch::share_prompts`]): each token's branch, row-major, 0 for the
    /// pair's prompt (seen by both answers), 1 for the chosen answer, 2 for the rejected one (neither sees the
    /// other); empty for every other batch.
    pub branch_ids: Vec<u32>,
}

impl Batch {
    /// Rows `range` of the batch as a batch of their own, cut to their longest real row (stage kto runs its
    /// examples and their KL sequences apart).
    #[must_use]
    pub fn rows(&self, range: std::ops::Range<usize>) -> Batch {
        let t = self.seq_len;
        let range = range.start.min(self.batch_size)..range.end.min(self.batch_size);
        let len = range
            .clone()
            .map(|r| {
                self.attention_mask[r * t..(r + 1) * t]
                    .iter()
                    .rposition(|&m| m != 0)
                    .map_or(0, |p| p + 1)
            })
            .max()
            .unwrap_or(0);
        fn take<T: Copy>(v: &[T], rows: std::ops::Range<usize>, t: usize, len: usize) -> Vec<T> {
            rows.flat_map(|r| v[r * t..r * t + len].iter().copied())
                .collect()
        }
        Batch {
            batch_size: range.len(),
            seq_len: len,
            input_ids: take(&self.input_ids, range.clone(), t, len),
            labels: take(&self.labels, range.clone(), t, len),
            attention_mask: take(&self.attention_mask, range.clone(), t, len),
            position_ids: take(&self.position_ids, range.clone(), t, len),
            sequence_ids: take(&self.sequence_ids, range.clone(), t, len),
            block_diagonal: self.block_diagonal,
            kto_tags: Vec::new(),
            seq_index: range
                .filter_map(|r| self.seq_index.get(r).copied())
                .collect(),
            branch_ids: Vec::new(),
        }
    }

    /// The sequences the batch holds: its rows, or twice as many when pairs share their prompts.
    pub fn sequences(&self) -> usize {
        if self.branch_ids.is_empty() {
            self.batch_size
        } else {
            2 * self.batch_size
        }
    }

    /// A pairwise batch (k chosen rows, then their k rejected rows, right-padded) with each pair in one row that
    /// holds its prompt once: the prompt but its last token, then that token and the chosen answer, then that token
    /// again and the rejected answer. The answers' positions both continue the prompt's, the attention stays inside
    /// the pair and neither answer sees the other ([`Batch::branch_ids`]), so every answer token has the context
    /// (and the log-probability) it has in its own row, and the prompt runs once instead of twice. The last prompt
    /// token is repeated so that each answer's first token is predicted inside its own branch. `None` when the
    /// batch is not pairwise, a pair has no common unlabelled prefix, or a shared row would be longer than
    /// √2 × `max_len` (the longest a sequence may be, `cutoff_len`: beyond, k rows would hold more attention scores
    /// than 2k rows of `max_len`).
    #[must_use]
    pub fn share_prompts(&self, max_len: usize) -> Option<Batch> {
        let t = self.seq_len;
        let k = self.batch_size / 2;
        if k == 0 || !self.batch_size.is_multiple_of(2) || !self.branch_ids.is_empty() {
            return None;
        }
        let len = |r: usize| {
            self.attention_mask[r * t..(r + 1) * t]
                .iter()
                .rposition(|&m| m != 0)
                .map_or(0, |p| p + 1)
        };
        // (prompt length, chosen length, rejected length) per pair: the prompt is the common prefix that neither
        // row labels.
        let mut spans = Vec::with_capacity(k);
        for i in 0..k {
            let (c, r) = (i * t, (k + i) * t);
            let (lc, lr) = (len(i), len(k + i));
            let p = (0..lc.min(lr))
                .take_while(|&j| {
                    self.input_ids[c + j] == self.input_ids[r + j]
                        && self.labels[c + j] == IGNORE_INDEX
                        && self.labels[r + j] == IGNORE_INDEX
                        && self.attention_mask[c + j] != 0
                        && self.attention_mask[r + j] != 0
                })
                .count();
            if p == 0 {
                return None;
            }
            spans.push((p, lc, lr));
        }
        // Attention holds rows x length² scores: k rows up to twice `max_len` (short prompts, long answers) can
        // hold up to twice the scores of 2k rows of `max_len`, which the memory estimate counts. Shared only while
        // they hold no more (a shared row is the prompt once and both answers from its last token).
        let longest = spans
            .iter()
            .map(|&(p, lc, lr)| lc + lr + 1 - p)
            .max()
            .unwrap_or(0);
        if longest * longest > 2 * max_len * max_len {
            return None;
        }
        let pad_id = (0..self.input_ids.len())
            .find(|&j| self.attention_mask[j] == 0)
            .map_or(0, |j| self.input_ids[j]);
        let mut rows = Vec::with_capacity(k);
        let mut branches = Vec::with_capacity(k);
        for (i, &(p, lc, lr)) in spans.iter().enumerate() {
            let mut row = PackedSequence {
                input_ids: Vec::new(),
                labels: Vec::new(),
                position_ids: Vec::new(),
                sequence_ids: vec![1; lc + lr + 1 - p],
            };
            let mut branch_ids = Vec::with_capacity(row.sequence_ids.len());
            // (source row, source range, branch): the shared prompt, then the two answers from the last prompt token.
            for (src, range, branch) in [(i, 0..p - 1, 0), (i, p - 1..lc, 1), (k + i, p - 1..lr, 2)]
            {
                let at = src * t;
                row.input_ids
                    .extend_from_slice(&self.input_ids[at + range.start..at + range.end]);
                row.labels
                    .extend_from_slice(&self.labels[at + range.start..at + range.end]);
                row.position_ids
                    .extend(range.clone().map(|j| u32::try_from(j).unwrap_or(u32::MAX)));
                branch_ids.extend(std::iter::repeat_n(branch, range.len()));
            }
            rows.push(row);
            branches.push(branch_ids);
        }
        let mut out = collate(&rows.iter().collect::<Vec<_>>(), pad_id, true);
        out.seq_index.clone_from(&self.seq_index);
        for b in &mut branches {
            b.resize(out.seq_len, 0);
        }
        out.branch_ids = branches.concat();
        Some(out)
    }

    /// For a batch from [`Batch::share_prompts`], each sequence's last token as a flat position (row · seq_len +
    /// index): the k chosen answers' ends, then the k rejected ones' (where a reward model reads its score). Empty
    /// for other batches.
    pub fn answer_ends(&self) -> Vec<u32> {
        let t = self.seq_len;
        let last = |branch: u32| {
            (0..self.batch_size).filter_map(move |r| {
                (0..t)
                    .rposition(|j| self.branch_ids.get(r * t + j) == Some(&branch))
                    .and_then(|j| u32::try_from(r * t + j).ok())
            })
        };
        last(1).chain(last(2)).collect()
    }

    /// For a batch from [`Batch::share_prompts`], the chosen answer's labelled tokens of each row (they come before
    /// the rejected answer's): row r's first that many labelled positions are sequence r's, the rest sequence
    /// k + r's. Empty for other batches.
    pub fn chosen_label_counts(&self) -> Vec<usize> {
        if self.branch_ids.is_empty() {
            return Vec::new();
        }
        let t = self.seq_len;
        (0..self.batch_size)
            .map(|r| {
                (r * t + 1..(r + 1) * t)
                    .filter(|&j| self.labels[j] != IGNORE_INDEX && self.branch_ids[j] == 1)
                    .count()
            })
            .collect()
    }
}

/// Pads sequences to the longest in the batch (right padding: `pad_id`, label −100, mask 0).
pub fn collate(items: &[&PackedSequence], pad_id: u32, block_diagonal: bool) -> Batch {
    let seq_len = items.iter().map(|s| s.len()).max().unwrap_or(0);
    let n = items.len() * seq_len;
    let mut batch = Batch {
        batch_size: items.len(),
        seq_len,
        input_ids: Vec::with_capacity(n),
        labels: Vec::with_capacity(n),
        attention_mask: Vec::with_capacity(n),
        position_ids: Vec::with_capacity(n),
        sequence_ids: Vec::with_capacity(n),
        block_diagonal,
        kto_tags: Vec::new(),
        seq_index: Vec::new(),
        branch_ids: Vec::new(),
    };
    for s in items {
        let pad = seq_len - s.len();
        batch.input_ids.extend_from_slice(&s.input_ids);
        batch.input_ids.extend(std::iter::repeat_n(pad_id, pad));
        batch.labels.extend_from_slice(&s.labels);
        batch.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        batch
            .attention_mask
            .extend(s.sequence_ids.iter().map(|&id| u8::from(id != 0)));
        batch.attention_mask.extend(std::iter::repeat_n(0, pad));
        batch.position_ids.extend_from_slice(&s.position_ids);
        batch.position_ids.extend(std::iter::repeat_n(0, pad));
        batch.sequence_ids.extend_from_slice(&s.sequence_ids);
        batch.sequence_ids.extend(std::iter::repeat_n(0, pad));
    }
    batch
}

/// How an epoch orders the training sequences: the Hugging Face Trainer's train samplers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampler {
    /// A seeded shuffle (seed + epoch): `RandomSampler`.
    Random,
    /// `group_by_length`: `LengthGroupedSampler` (megabatches of 50 batches sorted by length, longest first).
    LengthGrouped,
    /// LLaMA-Factory's `disable_shuffling`: `SequentialSampler`, dataset order every epoch (it wins over
    /// `group_by_length`, as in LLaMA-Factory's `_get_train_sampler`).
    Sequential,
}

impl Sampler {
    /// The sampler of the keys `group_by_length` and `disable_shuffling`.
    pub fn of(group_by_length: bool, disable_shuffling: bool) -> Self {
        match (disable_shuffling, group_by_length) {
            (true, _) => Self::Sequential,
            (false, true) => Self::LengthGrouped,
            (false, false) => Self::Random,
        }
    }
}

/// The order of sequence indexes for `epoch` under `sampler`.
pub fn epoch_order(
    lengths: &[usize],
    batch_size: usize,
    sampler: Sampler,
    seed: u64,
    epoch: u64,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    if sampler == Sampler::Sequential {
        return order;
    }
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(epoch));
    order.shuffle(&mut rng);
    if sampler == Sampler::Random || lengths.is_empty() {
        return order;
    }
    let batch_size = batch_size.max(1);
    let mega = (batch_size * 50)
        .min((lengths.len() / (batch_size * 4)).max(1) * batch_size)
        .max(batch_size);
    let mut megabatches: Vec<Vec<usize>> = order.chunks(mega).map(<[usize]>::to_vec).collect();
    for mb in &mut megabatches {
        mb.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
    }
    // Put the longest element first so an out-of-memory shows at step 1.
    if let Some((mi, _)) = megabatches
        .iter()
        .enumerate()
        .filter_map(|(i, mb)| mb.first().map(|&x| (i, lengths[x])))
        .max_by_key(|&(_, l)| l)
        && mi != 0
        && !megabatches[0].is_empty()
    {
        let (a, b) = megabatches.split_at_mut(mi);
        std::mem::swap(&mut a[0][0], &mut b[0][0]);
    }
    megabatches.into_iter().flatten().collect()
}

/// Batches of one epoch, in `order`.
pub fn epoch_batches(
    seqs: &[PackedSequence],
    order: &[usize],
    batch_size: usize,
    pad_id: u32,
    block_diagonal: bool,
) -> Vec<Batch> {
    order
        .chunks(batch_size.max(1))
        .map(|chunk| {
            let items: Vec<&PackedSequence> = chunk.iter().filter_map(|&i| seqs.get(i)).collect();
            collate(&items, pad_id, block_diagonal)
        })
        .collect()
}

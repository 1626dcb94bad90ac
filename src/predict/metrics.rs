//! LLaMA-Factory's generation metrics (`ComputeSimilarity`, `src/llamafactory/train/sft/metric.py`), computed as
//! it computes them, per example:
//!
//! - ROUGE-1, ROUGE-2, ROUGE-L: the prediction and the label cut into words by jieba (with its HMM), joined by
//!   spaces and scored by rouge-chinese's `Rouge().get_scores` (its sentence split, unique n-grams, ROUGE-L as
//!   the LCS of all words); the F score. Both sides empty after the cut → 0.
//! - BLEU-4: nltk's `sentence_bleu` over characters with `SmoothingFunction().method3`.
//!
//! Each ×100 and rounded to 4 places (Python's `round`), then the mean over examples (`predict_rouge-1`, …).
//! `tests/fixtures/predict_metrics_reference.json` holds the Python libraries' own scores on fixed strings.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

/// One example's scores (×100, rounded to 4 places).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Scores {
    pub rouge1: f64,
    pub rouge2: f64,
    pub rouge_l: f64,
    pub bleu4: f64,
}

/// The scores of `prediction` against `label`.
pub fn scores(prediction: &str, label: &str) -> Scores {
    let hyp = jieba_cut(prediction);
    let reference = jieba_cut(label);
    let (rouge1, rouge2, rouge_l) = if hyp.join(" ").split_whitespace().next().is_none()
        || reference.join(" ").split_whitespace().next().is_none()
    {
        (0.0, 0.0, 0.0)
    } else {
        let h = rouge_sentences(&hyp.join(" "));
        let r = rouge_sentences(&reference.join(" "));
        (rouge_n(&h, &r, 1), rouge_n(&h, &r, 2), rouge_l(&h, &r))
    };
    let pred_chars: Vec<char> = prediction.chars().collect();
    let label_chars: Vec<char> = label.chars().collect();
    Scores {
        rouge1: round4(rouge1 * 100.0),
        rouge2: round4(rouge2 * 100.0),
        rouge_l: round4(rouge_l * 100.0),
        bleu4: round4(bleu4_method3(&label_chars, &pred_chars) * 100.0),
    }
}

/// The mean of each score over `all` (LF's `np.mean` of the per-example lists); zeros for none.
pub fn mean(all: &[Scores]) -> Scores {
    if all.is_empty() {
        return Scores::default();
    }
    #[allow(clippy::cast_precision_loss)]
    let n = all.len() as f64;
    let avg = |f: fn(&Scores) -> f64| all.iter().map(f).sum::<f64>() / n;
    Scores {
        rouge1: avg(|s| s.rouge1),
        rouge2: avg(|s| s.rouge2),
        rouge_l: avg(|s| s.rouge_l),
        bleu4: avg(|s| s.bleu4),
    }
}

/// Python's `round(x, 4)`: the nearest 4-decimal value of x's exact binary value, ties to even (Rust's float
/// formatting rounds the exact value the same way).
fn round4(x: f64) -> f64 {
    format!("{x:.4}").parse().unwrap_or(x)
}

/// `list(jieba.cut(text))` (accurate mode, HMM on), with jieba's default dictionary.
pub fn jieba_cut(text: &str) -> Vec<&str> {
    static JIEBA: OnceLock<jieba_rs::Jieba> = OnceLock::new();
    JIEBA.get_or_init(jieba_rs::Jieba::new).cut(text, true)
}

/// rouge-chinese's `cut_sent` then `" ".join(s.split())` of each non-empty piece.
fn rouge_sentences(text: &str) -> Vec<String> {
    static RULES: OnceLock<Vec<regex::Regex>> = OnceLock::new();
    let rules = RULES.get_or_init(|| {
        [
            r"([。！？\?])([^”’])",
            r"(\.{6})([^”’])",
            r"(…{2})([^”’])",
            r"([。！？\?][”’])([^，。！？\?])",
        ]
        .iter()
        .filter_map(|p| regex::Regex::new(p).ok())
        .collect()
    });
    let mut para = text.to_string();
    for rule in rules {
        para = rule.replace_all(&para, "$1\n$2").into_owned();
    }
    para.trim_end()
        .split('\n')
        .filter(|s| !s.is_empty())
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// The words of sentences as rouge-chinese splits them: on single spaces (`"".split(" ")` is `[""]`).
fn words(sentences: &[String]) -> Vec<&str> {
    sentences.iter().flat_map(|s| s.split(' ')).collect()
}

/// `f` of `2·p·r / (p + r + 1e-8)`.
fn f_score(overlap: usize, hyp: usize, reference: usize) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let (o, h, r) = (overlap as f64, hyp as f64, reference as f64);
    let p = if hyp == 0 { 0.0 } else { o / h };
    let rc = if reference == 0 { 0.0 } else { o / r };
    2.0 * ((p * rc) / (p + rc + 1e-8))
}

/// ROUGE-N F over the sets of word n-grams (rouge-chinese's `exclusive=True`).
fn rouge_n(hyp: &[String], reference: &[String], n: usize) -> f64 {
    let grams = |s: &[String]| -> HashSet<Vec<String>> {
        let w = words(s);
        w.windows(n)
            .map(|g| g.iter().map(|x| (*x).to_string()).collect())
            .collect()
    };
    let (h, r) = (grams(hyp), grams(reference));
    f_score(h.intersection(&r).count(), h.len(), r.len())
}

/// ROUGE-L F (rouge-chinese's summary level): the LCS of all words of both sides.
fn rouge_l(hyp: &[String], reference: &[String]) -> f64 {
    let (h, r) = (words(hyp), words(reference));
    let mut prev = vec![0usize; h.len() + 1];
    for rw in &r {
        let mut cur = vec![0usize; h.len() + 1];
        for (j, hw) in h.iter().enumerate() {
            cur[j + 1] = if rw == hw {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        prev = cur;
    }
    let lcs = prev[h.len()];
    #[allow(clippy::cast_precision_loss)]
    let (l, m, n) = (lcs as f64, r.len() as f64, h.len() as f64);
    let (rl, pl) = (l / m, l / n);
    2.0 * ((pl * rl) / (pl + rl + 1e-8))
}

/// nltk's `sentence_bleu([reference], hypothesis, smoothing_function=SmoothingFunction().method3)` with the
/// default weights (0.25 each for 1- to 4-grams).
fn bleu4_method3(reference: &[char], hypothesis: &[char]) -> f64 {
    fn counts(s: &[char], n: usize) -> HashMap<&[char], usize> {
        let mut m = HashMap::new();
        if s.len() >= n {
            for g in s.windows(n) {
                *m.entry(g).or_insert(0) += 1;
            }
        }
        m
    }
    // Modified precision per order as (numerator, denominator), unreduced like nltk's Fraction(_normalize=False).
    let mut precisions = Vec::with_capacity(4);
    for n in 1..=4 {
        let hyp = counts(hypothesis, n);
        let refc = counts(reference, n);
        let clipped: usize = hyp
            .iter()
            .map(|(g, c)| (*c).min(refc.get(g).copied().unwrap_or(0)))
            .sum();
        let total: usize = hyp.values().sum();
        precisions.push((clipped, total.max(1)));
    }
    if precisions[0].0 == 0 {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)]
    let (hyp_len, ref_len) = (hypothesis.len() as f64, reference.len() as f64);
    let bp = if hyp_len > ref_len {
        1.0
    } else if hyp_len == 0.0 {
        0.0
    } else {
        (1.0 - ref_len / hyp_len).exp()
    };
    // Method 3: a zero count becomes 1 / (2^k · denominator), k = 1, 2, … over the orders that need it.
    let mut k = 1i32;
    let mut logs = Vec::with_capacity(4);
    for (num, den) in precisions {
        #[allow(clippy::cast_precision_loss)]
        let p = if num == 0 {
            let v = 1.0 / (2f64.powi(k) * den as f64);
            k += 1;
            v
        } else {
            num as f64 / den as f64
        };
        if p > 0.0 {
            logs.push(0.25 * p.ln());
        }
    }
    bp * fsum(&logs).exp()
}

/// `math.fsum` (correctly rounded) approximated by Neumaier's compensated sum: equal for four terms of this size
/// to far below the 1e-4 the scores are rounded to.
fn fsum(xs: &[f64]) -> f64 {
    let mut sum = 0.0f64;
    let mut c = 0.0f64;
    for &x in xs {
        let t = sum + x;
        if sum.abs() >= x.abs() {
            c += (sum - t) + x;
        } else {
            c += (x - t) + sum;
        }
        sum = t;
    }
    sum + c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_round_ties_to_even_on_the_exact_value() {
        assert_eq!(round4(0.123_45), 0.1235, "0.12345 is stored above the tie");
        assert_eq!(round4(83.023_850_000_1), 83.0239);
        assert_eq!(round4(100.0), 100.0);
    }
}

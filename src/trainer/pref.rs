//! Preference losses of `stage: dpo`, as LLaMA-Factory's `CustomDPOTrainer` computes them over TRL's `dpo_loss`:
//! sigmoid (DPO, with cDPO label smoothing), hinge (SLiC), IPO, ORPO and SimPO, the `pref_ftx` SFT term, and the
//! logged metrics (`rewards/*`, `logps/*`, ORPO's `sft_loss` and `odds_ratio_loss`).
//!
//! Stage kto's loss (TRL's `kto_loss` under LLaMA-Factory's `CustomKTOTrainer`) and stage rm's pairwise loss on
//! the value head's scores (`PairwiseTrainer`) are here too, in the same form.
//!
//! The losses are functions of four numbers per pair (the policy's and the reference's log-probabilities of the
//! chosen and the rejected answer), so they are computed here in f64 on the host with their derivatives written
//! out; [`crate::engine::SequenceLogps::backward`] carries ∂L/∂logp through the model.

use std::collections::BTreeMap;

use crate::config::{PrefLoss, Preset};

/// The keys that shape the loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefConfig {
    pub loss: PrefLoss,
    pub beta: f64,
    pub ftx: f64,
    pub label_smoothing: f64,
    pub simpo_gamma: f64,
    /// `pref_bco_weight`: the weight of BCO's loss mixed into the losses with a reference (0: none).
    pub bco_weight: f64,
    /// BCO's reward baseline δ for this batch: the running mean of the batch reward means so far, this batch's
    /// included ([`RunningMean`], [`bco_batch_reward`]).
    pub bco_delta: f64,
}

impl PrefConfig {
    pub fn from_preset(p: &Preset) -> Self {
        Self {
            loss: p.pref_loss,
            beta: p.pref_beta,
            ftx: p.pref_ftx,
            label_smoothing: p.dpo_label_smoothing,
            simpo_gamma: p.simpo_gamma,
            bco_weight: p.pref_bco_weight,
            bco_delta: 0.0,
        }
    }

    /// Whether BCO's loss is mixed in (LLaMA-Factory: `bco_gemma > 1e-6`, losses with a reference only).
    pub fn uses_bco(&self) -> bool {
        self.bco_weight > 1e-6 && self.loss.uses_reference()
    }
}

/// TRL's `RunningMoments` as LLaMA-Factory's BCO term uses it: the running mean of one value per update (the
/// batch's mean reward), starting from mean 0 over a count of 1e-24.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunningMean {
    pub mean: f64,
    count: f64,
}

impl Default for RunningMean {
    fn default() -> Self {
        Self {
            mean: 0.0,
            count: 1e-24,
        }
    }
}

impl RunningMean {
    /// Adds one value (TRL's `update` of a single-element tensor).
    pub fn update(&mut self, x: f64) {
        let total = self.count + 1.0;
        self.mean += (x - self.mean) / total;
        self.count = total;
    }
}

/// The mean of a batch's rewards β·(policy − reference) over its chosen and rejected answers: what BCO's running
/// baseline is updated with. `None` without reference log-probabilities.
pub fn bco_batch_reward(cfg: &PrefConfig, pairs: &[PairLogps]) -> Option<f64> {
    let avg = cfg.loss.averages_logps();
    let mut sum = 0.0;
    for p in pairs {
        #[allow(clippy::cast_precision_loss)]
        let (sc, sr) = if avg {
            (p.chosen_tokens as f64, p.rejected_tokens as f64)
        } else {
            (1.0, 1.0)
        };
        sum += cfg.beta * (p.chosen / sc - p.ref_chosen? / sc);
        sum += cfg.beta * (p.rejected / sr - p.ref_rejected? / sr);
    }
    #[allow(clippy::cast_precision_loss)]
    Some(sum / (2 * pairs.len()).max(1) as f64)
}

/// LD-DPO (`ld_alpha`): reweights the policy's log-probabilities of a dpo batch (k chosen rows, then their k
/// rejected rows) as LLaMA-Factory's `get_batch_logps` does: in each pair, the first min(chosen, rejected) answer
/// tokens of both answers count once and the longer answer's tokens past them `alpha` times, so the extra length
/// of an answer weighs less in its log-probability (and in the gradient through it).
pub fn apply_ld_alpha(policy: &mut crate::engine::SequenceLogps, alpha: f64) {
    let k = policy.tokens.len() / 2;
    let public: Vec<usize> = (0..k)
        .map(|i| policy.tokens[i].min(policy.tokens[k + i]))
        .collect();
    policy.weight_positions(|r, j| if j < public[r % k] { 1.0 } else { alpha });
}

/// One pair's log-probabilities: sums over the answer's tokens, and the token counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLogps {
    pub chosen: f64,
    pub rejected: f64,
    /// The reference model's sums; `None` for ORPO and SimPO.
    pub ref_chosen: Option<f64>,
    pub ref_rejected: Option<f64>,
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
}

/// The metrics LLaMA-Factory logs for a batch (means over its pairs).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PrefMetrics {
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub rewards_accuracies: f64,
    pub rewards_margins: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
    /// ORPO only.
    pub sft_loss: Option<f64>,
    /// ORPO only.
    pub odds_ratio_loss: Option<f64>,
}

impl PrefMetrics {
    /// The logged keys and values, in LLaMA-Factory's order, with `prefix` (`""` or `"eval_"`).
    pub fn entries(&self, prefix: &str) -> Vec<(String, f64)> {
        let mut out = vec![
            (format!("{prefix}rewards/chosen"), self.rewards_chosen),
            (format!("{prefix}rewards/rejected"), self.rewards_rejected),
            (
                format!("{prefix}rewards/accuracies"),
                self.rewards_accuracies,
            ),
            (format!("{prefix}rewards/margins"), self.rewards_margins),
            (format!("{prefix}logps/chosen"), self.logps_chosen),
            (format!("{prefix}logps/rejected"), self.logps_rejected),
        ];
        if let Some(v) = self.sft_loss {
            out.push((format!("{prefix}sft_loss"), v));
        }
        if let Some(v) = self.odds_ratio_loss {
            out.push((format!("{prefix}odds_ratio_loss"), v));
        }
        out
    }
}

/// A preference or reward stage's logged metrics under TRL's names, each kept as (sum, weight) so that several
/// micro-batches combine as the trainers combine them: a batch mean has weight 1 (the Hugging Face trainer logs the
/// mean of the stored batch means), KTO's per-answer sums carry their counts (LLaMA-Factory divides the summed
/// rewards by the summed counts).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageMetrics(BTreeMap<String, (f64, f64)>);

impl StageMetrics {
    /// Adds one batch mean.
    pub fn push(&mut self, key: &str, value: f64) {
        self.push_sum(key, value, 1.0);
    }

    /// Adds a sum over `count` items.
    pub fn push_sum(&mut self, key: &str, sum: f64, count: f64) {
        let e = self.0.entry(key.to_string()).or_insert((0.0, 0.0));
        e.0 += sum;
        e.1 += count;
    }

    /// Adds every entry of `other`.
    pub fn merge(&mut self, other: &StageMetrics) {
        for (k, (sum, w)) in &other.0 {
            self.push_sum(k, *sum, *w);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of `key` (sum / weight); `None` when absent or counted zero times.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.0
            .get(key)
            .and_then(|&(sum, w)| (w > 0.0).then(|| sum / w))
    }

    /// The logged keys and values with `prefix` (`""` or `"eval_"`); `rewards/margins` is chosen − rejected when
    /// a stage logs the two but not their difference (KTO).
    pub fn values(&self, prefix: &str) -> BTreeMap<String, f64> {
        let mut out: BTreeMap<String, f64> = self
            .0
            .keys()
            .filter_map(|k| self.get(k).map(|v| (format!("{prefix}{k}"), v)))
            .collect();
        if let (Some(c), Some(r), None) = (
            self.get("rewards/chosen"),
            self.get("rewards/rejected"),
            self.0.get("rewards/margins"),
        ) {
            out.insert(format!("{prefix}rewards/margins"), c - r);
        }
        out
    }
}

impl From<&PrefMetrics> for StageMetrics {
    fn from(m: &PrefMetrics) -> Self {
        let mut out = StageMetrics::default();
        for (k, v) in m.entries("") {
            out.push(&k, v);
        }
        out
    }
}

/// Stage kto's keys.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoConfig {
    pub beta: f64,
    /// `kto_chosen_weight`: the weight of a desirable example's loss.
    pub desirable_weight: f64,
    /// `kto_rejected_weight`: the weight of an undesirable example's loss.
    pub undesirable_weight: f64,
    /// `pref_ftx`: the SFT term on the desirable answers.
    pub ftx: f64,
}

impl KtoConfig {
    pub fn from_preset(p: &Preset) -> Self {
        Self {
            beta: p.pref_beta,
            desirable_weight: p.kto_chosen_weight,
            undesirable_weight: p.kto_rejected_weight,
            ftx: p.pref_ftx,
        }
    }
}

/// One kto example's log-probabilities (sums over its answer's tokens).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoExample {
    pub logps: f64,
    pub ref_logps: f64,
    pub tokens: usize,
    pub desirable: bool,
}

/// A batch's kto loss: the batch loss, ∂loss/∂(policy logps) per example, and the metrics (with `kl`, the clamped
/// KL estimate: a constant of the loss, no gradient flows through it).
#[derive(Debug, Clone, PartialEq)]
pub struct KtoOutput {
    pub loss: f64,
    pub d_logps: Vec<f64>,
    pub metrics: StageMetrics,
}

/// TRL's `kto_loss` as LLaMA-Factory's `get_batch_loss_metrics` calls it: with `kl` = max(0, mean over the batch of
/// policy − reference log-probabilities of the mismatched KL sequences) held constant, a desirable answer's loss is
/// `w_d (1 − σ(β (logratio − kl)))`, an undesirable one's `w_u (1 − σ(β (kl − logratio)))`; the batch loss is their
/// mean, plus `pref_ftx` × the desirable answers' mean token loss / their count × the batch size (LF's rescaling).
pub fn kto_loss(
    cfg: &KtoConfig,
    examples: &[KtoExample],
    kl_policy: &[f64],
    kl_reference: &[f64],
) -> Result<KtoOutput, PrefError> {
    if examples.iter().any(|e| e.tokens == 0) {
        return Err(PrefError::EmptyAnswer);
    }
    let kl_terms: Vec<f64> = kl_policy
        .iter()
        .zip(kl_reference)
        .map(|(p, r)| p - r)
        .collect();
    let kl = mean(&kl_terms).max(0.0);
    #[allow(clippy::cast_precision_loss)]
    let n = examples.len() as f64;
    let beta = cfg.beta;
    let mut loss = 0.0;
    let mut d_logps = Vec::with_capacity(examples.len());
    let mut metrics = StageMetrics::default();
    let n_chosen = examples.iter().filter(|e| e.desirable).count();
    for e in examples {
        let logratio = e.logps - e.ref_logps;
        let (side, l, d) = if e.desirable {
            let s = sigmoid(beta * (logratio - kl));
            let w = cfg.desirable_weight;
            ("chosen", w * (1.0 - s), -w * beta * s * (1.0 - s))
        } else {
            let s = sigmoid(beta * (kl - logratio));
            let w = cfg.undesirable_weight;
            ("rejected", w * (1.0 - s), w * beta * s * (1.0 - s))
        };
        loss += l / n;
        d_logps.push(d / n);
        metrics.push_sum(&format!("rewards/{side}"), beta * logratio, 1.0);
        metrics.push_sum(&format!("logps/{side}"), e.logps, 1.0);
    }
    if cfg.ftx > 1e-6 && n_chosen > 0 {
        #[allow(clippy::cast_precision_loss)]
        let nc = n_chosen as f64;
        // ftx · mean(−logps/tokens over the desirable answers) / n_chosen · n
        let scale = cfg.ftx / nc / nc * n;
        for (e, d) in examples.iter().zip(d_logps.iter_mut()) {
            if e.desirable {
                #[allow(clippy::cast_precision_loss)]
                let t = e.tokens as f64;
                loss += scale * (-e.logps / t);
                *d += -scale / t;
            }
        }
    }
    metrics.push("kl", kl);
    Ok(KtoOutput {
        loss,
        d_logps,
        metrics,
    })
}

/// A batch's reward-model loss (LLaMA-Factory's `PairwiseTrainer.compute_loss`): the mean over pairs of
/// −log σ(score(chosen) − score(rejected)), its derivatives with respect to each score (rows: the k chosen, then the
/// k rejected), and the metrics: the mean scores as `rewards/chosen` and `rewards/rejected`, their margin, and how
/// often chosen scores higher as `rewards/accuracies` (LLaMA-Factory's `ComputeAccuracy`).
pub fn reward_pair_loss(chosen: &[f64], rejected: &[f64]) -> BatchLoss {
    #[allow(clippy::cast_precision_loss)]
    let k = chosen.len().max(1) as f64;
    let mut losses = Vec::with_capacity(chosen.len());
    let mut d_rows = vec![0.0; 2 * chosen.len()];
    let mut acc = Vec::new();
    for (i, (&c, &r)) in chosen.iter().zip(rejected).enumerate() {
        let z = c - r;
        losses.push(-log_sigmoid(z));
        let d = -sigmoid(-z) / k;
        d_rows[i] = d;
        d_rows[chosen.len() + i] = -d;
        acc.push(if c > r { 1.0 } else { 0.0 });
    }
    let (mc, mr) = (
        chosen.iter().sum::<f64>() / k,
        rejected.iter().sum::<f64>() / k,
    );
    let mut metrics = StageMetrics::default();
    metrics.push("rewards/chosen", mc);
    metrics.push("rewards/rejected", mr);
    metrics.push("rewards/accuracies", mean(&acc));
    metrics.push("rewards/margins", mc - mr);
    BatchLoss {
        losses,
        d_rows,
        metrics,
    }
}

/// One micro-batch's loss as the trainer uses it, for every stage here.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLoss {
    /// Per example, for the evaluation's mean (KTO: the batch loss once per example, as the Hugging Face
    /// evaluation loop weights a batch by its size).
    pub losses: Vec<f64>,
    /// ∂(batch mean loss)/∂(each row's value): log-probabilities, or the value head's scores.
    pub d_rows: Vec<f64>,
    pub metrics: StageMetrics,
}

impl BatchLoss {
    pub fn mean_loss(&self) -> f64 {
        mean(&self.losses)
    }
}

impl From<PrefOutput> for BatchLoss {
    /// DPO's rows: the k chosen, then the k rejected.
    fn from(out: PrefOutput) -> Self {
        #[allow(clippy::cast_precision_loss)]
        let k = out.losses.len().max(1) as f64;
        let d_rows = out
            .d_chosen
            .iter()
            .chain(&out.d_rejected)
            .map(|d| d / k)
            .collect();
        BatchLoss {
            metrics: StageMetrics::from(&out.metrics),
            losses: out.losses,
            d_rows,
        }
    }
}

impl From<KtoOutput> for BatchLoss {
    /// KTO's rows: the k examples (the KL sequences get no gradient).
    fn from(out: KtoOutput) -> Self {
        BatchLoss {
            losses: vec![out.loss; out.d_logps.len()],
            d_rows: out.d_logps,
            metrics: out.metrics,
        }
    }
}

/// The loss of a batch of pairs: each pair's loss, its derivatives with respect to the policy's *summed*
/// log-probabilities, and the batch's metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefOutput {
    pub losses: Vec<f64>,
    /// ∂loss_i/∂(policy chosen sum of pair i).
    pub d_chosen: Vec<f64>,
    /// ∂loss_i/∂(policy rejected sum of pair i).
    pub d_rejected: Vec<f64>,
    pub metrics: PrefMetrics,
}

impl PrefOutput {
    pub fn mean_loss(&self) -> f64 {
        mean(&self.losses)
    }
}

/// Why a batch has no loss.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefError {
    #[error("pref_loss `{0}` has no loss here (use sigmoid, hinge, ipo, orpo or simpo)")]
    Unsupported(&'static str),
    #[error("pref_loss `{0}` needs the reference model's log-probabilities")]
    MissingReference(&'static str),
    #[error(
        "a preference pair has an answer with no trained token (cut away by cutoff_len?); raise `cutoff_len`"
    )]
    EmptyAnswer,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)]
    let n = v.len() as f64;
    v.iter().sum::<f64>() / n
}

/// σ(x), stable for large |x|.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log σ(x) = −softplus(−x), stable for large |x| (torch's `F.logsigmoid`).
pub fn log_sigmoid(x: f64) -> f64 {
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

/// The losses, derivatives and metrics of `pairs` (LLaMA-Factory `get_batch_loss_metrics`).
pub fn preference_loss(cfg: &PrefConfig, pairs: &[PairLogps]) -> Result<PrefOutput, PrefError> {
    let beta = cfg.beta;
    let avg = cfg.loss.averages_logps();
    let mut out = PrefOutput {
        losses: Vec::with_capacity(pairs.len()),
        d_chosen: Vec::with_capacity(pairs.len()),
        d_rejected: Vec::with_capacity(pairs.len()),
        metrics: PrefMetrics::default(),
    };
    let (mut rc, mut rr, mut acc, mut lc, mut lr, mut sft, mut orl) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for p in pairs {
        if p.chosen_tokens == 0 || p.rejected_tokens == 0 {
            return Err(PrefError::EmptyAnswer);
        }
        #[allow(clippy::cast_precision_loss)]
        let (nc, nr) = (p.chosen_tokens as f64, p.rejected_tokens as f64);
        // The loss's variables: sums, or for IPO/ORPO/SimPO means over the answer's tokens.
        let (sc, sr) = if avg { (nc, nr) } else { (1.0, 1.0) };
        let (c, r) = (p.chosen / sc, p.rejected / sr);
        let reference = || -> Result<(f64, f64), PrefError> {
            match (p.ref_chosen, p.ref_rejected) {
                (Some(a), Some(b)) => Ok((a / sc, b / sr)),
                _ => Err(PrefError::MissingReference(cfg.loss.as_str())),
            }
        };
        // (loss, ∂/∂c, ∂/∂r, chosen reward, rejected reward)
        let (mut loss, mut dc, dr, reward_c, reward_r) = match cfg.loss {
            PrefLoss::Sigmoid | PrefLoss::Hinge | PrefLoss::Ipo => {
                let (ref_c, ref_r) = reference()?;
                let logits = (c - r) - (ref_c - ref_r);
                let (l, dlogits) = match cfg.loss {
                    PrefLoss::Sigmoid => {
                        let ls = cfg.label_smoothing;
                        let x = beta * logits;
                        (
                            -log_sigmoid(x) * (1.0 - ls) - log_sigmoid(-x) * ls,
                            beta * (-(1.0 - ls) * sigmoid(-x) + ls * sigmoid(x)),
                        )
                    }
                    PrefLoss::Hinge => {
                        let m = 1.0 - beta * logits;
                        if m > 0.0 { (m, -beta) } else { (0.0, 0.0) }
                    }
                    _ => {
                        let z = logits - 1.0 / (2.0 * beta);
                        (z * z, 2.0 * z)
                    }
                };
                let (mut l, mut dc, mut dr) = (l, dlogits, -dlogits);
                if cfg.uses_bco() {
                    // LLaMA-Factory's bco_loss, mixed as (dpo + w·bco) / (1 + w); δ is a constant of the batch.
                    let (w, delta) = (cfg.bco_weight, cfg.bco_delta);
                    let uc = beta * (c - ref_c) - delta;
                    let ur = beta * (r - ref_r) - delta;
                    let bco = -log_sigmoid(uc) - log_sigmoid(-ur);
                    l = (l + w * bco) / (1.0 + w);
                    dc = (dc - w * beta * sigmoid(-uc)) / (1.0 + w);
                    dr = (dr + w * beta * sigmoid(ur)) / (1.0 + w);
                }
                (l, dc, dr, beta * (c - ref_c), beta * (r - ref_r))
            }
            PrefLoss::Orpo => {
                // log odds(y) = log p − log(1 − p), p the mean-token probability exp(c).
                let log_odds = (c - r) - ((-c.exp()).ln_1p() - (-r.exp()).ln_1p());
                let d_lo = -beta * sigmoid(-log_odds);
                let l = -c + beta * -log_sigmoid(log_odds);
                (
                    l,
                    -1.0 + d_lo / (1.0 - c.exp()),
                    -d_lo / (1.0 - r.exp()),
                    beta * c,
                    beta * r,
                )
            }
            PrefLoss::Simpo => {
                let logits = (c - r) - cfg.simpo_gamma / beta;
                let d = -beta * sigmoid(-beta * logits);
                (-log_sigmoid(beta * logits), d, -d, beta * c, beta * r)
            }
            PrefLoss::KtoPair => return Err(PrefError::Unsupported("kto_pair")),
        };
        // The SFT term: the chosen answer's mean token loss.
        let sft_loss = if avg { -c } else { -c / nc };
        if cfg.ftx > 1e-6 {
            loss += cfg.ftx * sft_loss;
            dc += cfg.ftx * if avg { -1.0 } else { -1.0 / nc };
        }
        out.losses.push(loss);
        out.d_chosen.push(dc / sc);
        out.d_rejected.push(dr / sr);
        rc.push(reward_c);
        rr.push(reward_r);
        acc.push(if reward_c > reward_r { 1.0 } else { 0.0 });
        lc.push(c);
        lr.push(r);
        if cfg.loss == PrefLoss::Orpo {
            sft.push(sft_loss);
            orl.push((loss - sft_loss) / beta);
        }
    }
    let margins: Vec<f64> = rc.iter().zip(&rr).map(|(a, b)| a - b).collect();
    out.metrics = PrefMetrics {
        rewards_chosen: mean(&rc),
        rewards_rejected: mean(&rr),
        rewards_accuracies: mean(&acc),
        rewards_margins: mean(&margins),
        logps_chosen: mean(&lc),
        logps_rejected: mean(&lr),
        sft_loss: (cfg.loss == PrefLoss::Orpo).then(|| mean(&sft)),
        odds_ratio_loss: (cfg.loss == PrefLoss::Orpo).then(|| mean(&orl)),
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pairs() -> Vec<PairLogps> {
        vec![
            PairLogps {
                chosen: -12.5,
                rejected: -20.25,
                ref_chosen: Some(-13.0),
                ref_rejected: Some(-19.0),
                chosen_tokens: 9,
                rejected_tokens: 14,
            },
            PairLogps {
                chosen: -30.0,
                rejected: -8.0,
                ref_chosen: Some(-29.5),
                ref_rejected: Some(-8.5),
                chosen_tokens: 21,
                rejected_tokens: 5,
            },
        ]
    }

    /// The written-out derivatives equal central differences of the loss, for every loss and the SFT term.
    #[test]
    fn derivatives_match_finite_differences() {
        for loss in [
            PrefLoss::Sigmoid,
            PrefLoss::Hinge,
            PrefLoss::Ipo,
            PrefLoss::Orpo,
            PrefLoss::Simpo,
        ] {
            for (ftx, ls, bco) in [
                (0.0, 0.0, 0.0),
                (0.7, 0.0, 0.0),
                (0.0, 0.2, 0.0),
                (0.4, 0.0, 0.8),
            ] {
                if ls > 0.0 && loss != PrefLoss::Sigmoid {
                    continue;
                }
                let cfg = PrefConfig {
                    loss,
                    beta: 0.3,
                    ftx,
                    label_smoothing: ls,
                    simpo_gamma: 0.5,
                    bco_weight: bco,
                    bco_delta: -0.05,
                };
                let base = pairs();
                let out = preference_loss(&cfg, &base).unwrap();
                let h = 1e-6;
                for i in 0..base.len() {
                    for side in 0..2 {
                        let shifted = |d: f64| {
                            let mut p = base.clone();
                            if side == 0 {
                                p[i].chosen += d;
                            } else {
                                p[i].rejected += d;
                            }
                            preference_loss(&cfg, &p).unwrap().losses[i]
                        };
                        let fd = (shifted(h) - shifted(-h)) / (2.0 * h);
                        let got = if side == 0 {
                            out.d_chosen[i]
                        } else {
                            out.d_rejected[i]
                        };
                        assert!(
                            (fd - got).abs() < 1e-6 * (1.0 + fd.abs()),
                            "{loss:?} ftx {ftx} ls {ls} pair {i} side {side}: {got} vs {fd}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn log_sigmoid_is_stable() {
        assert!((log_sigmoid(0.0) - 0.5f64.ln()).abs() < 1e-15);
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9);
        assert!(log_sigmoid(800.0).abs() < 1e-300);
        assert!((sigmoid(-800.0)).abs() < 1e-300);
    }
}

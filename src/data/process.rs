//! Examples → token ids + labels, following LLaMA-Factory's `processor/supervised.py` and
//! `processor/pretrain.py` (label masking, `train_on_prompt`, `mask_history`, `infer_seqlen`).

use super::convert::Example;
use super::encoder::Encoder;
use super::reader::SkipReason;

/// Label of a token that is not trained on.
pub const IGNORE_INDEX: i64 = -100;

/// One tokenised example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Whether `cutoff_len` cut something off.
    pub truncated: bool,
}

impl TokenizedExample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Tokens with a label (trained on).
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// LLaMA-Factory's `infer_seqlen(source_len, target_len, cutoff_len)`: how much of a (prompt, answer)
/// turn fits the remaining budget. Truncates the source when the target is short (target·2 < budget),
/// else the target when the source is short, else both proportionally.
pub fn infer_seqlen(source_len: usize, target_len: usize, cutoff_len: usize) -> (usize, usize) {
    let max_target_len = if target_len * 2 < cutoff_len {
        cutoff_len
    } else if source_len * 2 < cutoff_len {
        cutoff_len - source_len
    } else {
        // int(cutoff_len * (target_len / (source_len + target_len))): float, then truncation.
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let v =
            (cutoff_len as f64 * (target_len as f64 / (source_len + target_len) as f64)) as usize;
        v
    };
    let new_target_len = max_target_len.min(target_len);
    let max_source_len = cutoff_len.saturating_sub(new_target_len);
    let new_source_len = max_source_len.min(source_len);
    (new_source_len, new_target_len)
}

/// Label-masking switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskOptions {
    pub cutoff_len: usize,
    pub train_on_prompt: bool,
    pub mask_history: bool,
}

/// `SupervisedDatasetProcessor._encode_data_example`.
pub fn encode_supervised(
    enc: &Encoder,
    ex: &Example,
    opts: MaskOptions,
) -> Result<TokenizedExample, SkipReason> {
    let mut messages = ex.prompt.clone();
    messages.extend(ex.response.iter().cloned());
    // LLaMA-Factory 0.9.5: with mask_history, earlier thoughts are dropped unless preserve_thinking.
    let discard_history_cot = opts.mask_history && !enc.template.preserve_thinking;
    let mut pairs = enc.encode_multiturn(&messages, &ex.system, &ex.tools, discard_history_cot)?;
    let efficient_eos = enc.template.efficient_eos;
    let eos_id = enc.eos.1;
    let full_len: usize =
        pairs.iter().map(|(s, t)| s.len() + t.len()).sum::<usize>() + usize::from(efficient_eos);
    let mut total_length = usize::from(efficient_eos);
    if opts.mask_history {
        pairs.reverse(); // the last turn gets the budget first
    }
    let mut input_ids: Vec<u32> = Vec::new();
    let mut labels: Vec<i64> = Vec::new();
    for (turn_idx, (source_ids, target_ids)) in pairs.into_iter().enumerate() {
        if total_length >= opts.cutoff_len {
            break;
        }
        let (source_len, target_len) = infer_seqlen(
            source_ids.len(),
            target_ids.len(),
            opts.cutoff_len - total_length,
        );
        let source_ids = &source_ids[..source_len];
        let target_ids = &target_ids[..target_len];
        total_length += source_len + target_len;

        let source_label: Vec<i64> = if opts.train_on_prompt {
            source_ids.iter().map(|&i| i64::from(i)).collect()
        } else if efficient_eos && turn_idx != 0 {
            let mut l = vec![IGNORE_INDEX; source_len];
            if let Some(first) = l.first_mut() {
                *first = i64::from(eos_id);
            }
            l
        } else {
            vec![IGNORE_INDEX; source_len]
        };
        let target_label: Vec<i64> = if opts.mask_history && turn_idx != 0 {
            vec![IGNORE_INDEX; target_len]
        } else {
            target_ids.iter().map(|&i| i64::from(i)).collect()
        };
        if opts.mask_history {
            let mut ids = source_ids.to_vec();
            ids.extend_from_slice(target_ids);
            ids.extend_from_slice(&input_ids);
            input_ids = ids;
            let mut ls = source_label;
            ls.extend(target_label);
            ls.extend_from_slice(&labels);
            labels = ls;
        } else {
            input_ids.extend_from_slice(source_ids);
            input_ids.extend_from_slice(target_ids);
            labels.extend(source_label);
            labels.extend(target_label);
        }
    }
    if efficient_eos {
        input_ids.push(eos_id);
        labels.push(i64::from(eos_id));
    }
    let truncated = input_ids.len() < full_len;
    Ok(TokenizedExample {
        input_ids,
        labels,
        truncated,
    })
}

/// `UnsupervisedDatasetProcessor._encode_data_example` (LLaMA-Factory's evaluation data for
/// `predict_with_generate`): the prompt (every message but the last, with the generation prompt) and the label
/// (the last assistant message, plus the eos token with an `efficient_eos` template), cut to `cutoff_len` by
/// `infer_seqlen`. A row with no answer gets an empty one (and an empty label).
pub fn encode_unsupervised(
    enc: &Encoder,
    ex: &Example,
    cutoff_len: usize,
) -> Result<(Vec<u32>, Vec<u32>), SkipReason> {
    let mut messages = ex.prompt.clone();
    match ex.response.as_slice() {
        [one] => messages.push(one.clone()),
        _ => messages.push(super::Message::new(super::Role::Assistant, "")),
    }
    let (mut prompt, mut label) = enc.encode_oneturn(&messages, &ex.system, &ex.tools)?;
    if enc.template.efficient_eos {
        label.push(enc.eos.1);
    }
    let (source_len, target_len) = infer_seqlen(prompt.len(), label.len(), cutoff_len);
    prompt.truncate(source_len);
    label.truncate(target_len);
    Ok((prompt, label))
}

/// A tokenised preference pair (for `rm`/`dpo`): prompt + chosen and prompt + rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairwiseExample {
    pub chosen_input_ids: Vec<u32>,
    pub chosen_labels: Vec<i64>,
    pub rejected_input_ids: Vec<u32>,
    pub rejected_labels: Vec<i64>,
    /// Whether `cutoff_len` cut the prompt or that answer.
    pub chosen_truncated: bool,
    pub rejected_truncated: bool,
}

/// `PairwiseDatasetProcessor._encode_data_example`: the budget is shared by giving the answer the longer
/// of the two lengths (`infer_seqlen(prompt, max(chosen, rejected), cutoff_len)`).
pub fn encode_pairwise(
    enc: &Encoder,
    ex: &Example,
    cutoff_len: usize,
) -> Result<PairwiseExample, SkipReason> {
    let [chosen, rejected] = ex.response.as_slice() else {
        return Err(SkipReason::InvalidPair(
            "need exactly a chosen and a rejected answer".into(),
        ));
    };
    let mut chosen_messages = ex.prompt.clone();
    chosen_messages.push(chosen.clone());
    let mut rejected_messages = ex.prompt.clone();
    rejected_messages.push(rejected.clone());
    let (prompt_ids, mut chosen_ids) =
        enc.encode_oneturn(&chosen_messages, &ex.system, &ex.tools)?;
    let (_, mut rejected_ids) = enc.encode_oneturn(&rejected_messages, &ex.system, &ex.tools)?;
    if enc.template.efficient_eos {
        chosen_ids.push(enc.eos.1);
        rejected_ids.push(enc.eos.1);
    }
    let (source_len, target_len) = infer_seqlen(
        prompt_ids.len(),
        chosen_ids.len().max(rejected_ids.len()),
        cutoff_len,
    );
    let prompt_cut = source_len < prompt_ids.len();
    let chosen_truncated = prompt_cut || target_len < chosen_ids.len();
    let rejected_truncated = prompt_cut || target_len < rejected_ids.len();
    let prompt_ids = &prompt_ids[..source_len];
    chosen_ids.truncate(target_len);
    rejected_ids.truncate(target_len);
    let join = |answer: &[u32]| -> (Vec<u32>, Vec<i64>) {
        let mut ids = prompt_ids.to_vec();
        ids.extend_from_slice(answer);
        let mut labels = vec![IGNORE_INDEX; source_len];
        labels.extend(answer.iter().map(|&i| i64::from(i)));
        (ids, labels)
    };
    let (chosen_input_ids, chosen_labels) = join(&chosen_ids);
    let (rejected_input_ids, rejected_labels) = join(&rejected_ids);
    Ok(PairwiseExample {
        chosen_input_ids,
        chosen_labels,
        rejected_input_ids,
        rejected_labels,
        chosen_truncated,
        rejected_truncated,
    })
}

/// Stage kto's example: the trained sequence (prompt + its answer), the KL sequence (the same prompt + an unrelated
/// answer) and whether the answer is desirable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackExample {
    pub target: TokenizedExample,
    pub kl: TokenizedExample,
    pub desirable: bool,
}

/// `FeedbackDatasetProcessor._encode_data_example`: the answer is whichever of the two response slots is non-empty
/// (the first for a desirable example), the same for the KL answer; each sequence gets its own `infer_seqlen`
/// budget.
pub fn encode_feedback(
    enc: &Encoder,
    ex: &Example,
    cutoff_len: usize,
) -> Result<FeedbackExample, SkipReason> {
    let Some(desirable) = ex.kto_tag else {
        return Err(SkipReason::InvalidShape(
            "no `kto_tag` value (stage kto labels each answer true or false)".into(),
        ));
    };
    let (Some(own), Some(kl_answer)) = (ex.kto_answer().cloned(), ex.kl_answer.clone()) else {
        return Err(SkipReason::EmptyAnswer);
    };
    Ok(FeedbackExample {
        target: encode_answer(enc, &ex.prompt, own, &ex.system, &ex.tools, cutoff_len)?,
        kl: encode_answer(
            enc, &ex.prompt, kl_answer, &ex.system, &ex.tools, cutoff_len,
        )?,
        desirable,
    })
}

/// `prompt` answered by `answer` as one sequence: `encode_oneturn`, the eos of `efficient_eos` templates, then
/// `infer_seqlen`'s budget of `cutoff_len`; the answer's tokens are labelled (a kto sequence, a scored answer).
pub fn encode_answer(
    enc: &Encoder,
    prompt: &[super::convert::Message],
    answer: super::convert::Message,
    system: &str,
    tools: &str,
    cutoff_len: usize,
) -> Result<TokenizedExample, SkipReason> {
    let mut messages = prompt.to_vec();
    messages.push(answer);
    let (prompt_ids, mut answer_ids) = enc.encode_oneturn(&messages, system, tools)?;
    if enc.template.efficient_eos {
        answer_ids.push(enc.eos.1);
    }
    let (source_len, target_len) = infer_seqlen(prompt_ids.len(), answer_ids.len(), cutoff_len);
    let truncated = source_len < prompt_ids.len() || target_len < answer_ids.len();
    let mut input_ids = prompt_ids[..source_len].to_vec();
    input_ids.extend_from_slice(&answer_ids[..target_len]);
    let mut labels = vec![IGNORE_INDEX; source_len];
    labels.extend(answer_ids[..target_len].iter().map(|&i| i64::from(i)));
    Ok(TokenizedExample {
        input_ids,
        labels,
        truncated,
    })
}

/// `PretrainDatasetProcessor`: text + eos. Without packing a bos is prepended when the tokenizer adds one
/// and the result is cut at `cutoff_len`; with packing the caller concatenates and cuts into blocks.
/// Labels are the ids, except tokens equal to the pad id (`DataCollatorForLanguageModeling`).
pub fn encode_pretrain(
    enc: &Encoder,
    ex: &Example,
    cutoff_len: usize,
    packing: bool,
) -> TokenizedExample {
    let text = ex.prompt.first().map_or("", |m| m.content.as_str());
    // LLaMA-Factory uses `<|end_of_text|>` as the document end for the llama3 template.
    let eos_text = if enc.template.name == "llama3" {
        "<|end_of_text|>"
    } else {
        enc.eos.0.as_str()
    };
    let mut full = format!("{text}{eos_text}");
    if !packing
        && enc.add_bos_token
        && let Some((b, _)) = &enc.bos
    {
        full = format!("{b}{full}");
    }
    let mut ids = enc.encode_text(&full);
    let mut truncated = false;
    if !packing && ids.len() > cutoff_len {
        ids.truncate(cutoff_len);
        truncated = true;
    }
    let labels = pretrain_labels(&ids, enc.pad_id);
    TokenizedExample {
        input_ids: ids,
        labels,
        truncated,
    }
}

/// Labels of pretraining ids: the ids themselves, pad-id tokens ignored.
pub fn pretrain_labels(ids: &[u32], pad_id: u32) -> Vec<i64> {
    ids.iter()
        .map(|&i| {
            if i == pad_id {
                IGNORE_INDEX
            } else {
                i64::from(i)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infer_seqlen_matches_llamafactory() {
        // Each expected pair worked out by hand from LLaMA-Factory's `infer_seqlen` source (three rules).
        assert_eq!(infer_seqlen(3000, 2000, 1000), (600, 400)); // proportional: int(1000*2000/5000)=400
        assert_eq!(infer_seqlen(2000, 3000, 1000), (400, 600));
        assert_eq!(infer_seqlen(1000, 100, 1000), (900, 100)); // short target → source cut
        assert_eq!(infer_seqlen(100, 1000, 1000), (100, 900)); // short source → target cut
        assert_eq!(infer_seqlen(100, 500, 1000), (100, 500)); // fits
        assert_eq!(infer_seqlen(500, 100, 1000), (500, 100));
        assert_eq!(infer_seqlen(10, 10, 0), (0, 0));
    }
}

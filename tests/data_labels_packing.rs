//! Label masking (train_on_prompt, mask_history, cutoff_len with infer_seqlen), packing (knapsack,
//! neat-packing mask never crosses examples, position ids restart), batches, cache, pt, streaming, preview.

use crate::data_util;

use data_util::{chat_config, decode, encoder, lf_data_dir, options, tokenizer, trained_runs};
use termtune::data::convert::{Example, Message, Role};
use termtune::data::pack::{collate, greedy_knapsack, pack_supervised};
use termtune::data::process::{MaskOptions, TokenizedExample, encode_supervised, infer_seqlen};
use termtune::data::reader::Location;
use termtune::data::{DataOptions, Encoder, IGNORE_INDEX, Stage, prepare_dataset};

fn multi() -> Example {
    Example {
        prompt: vec![
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, "Hello!"),
            Message::new(Role::User, "Bye"),
        ],
        response: vec![Message::new(Role::Assistant, "Ciao.")],
        system: String::new(),
        tools: String::new(),
        kto_tag: None,
        kl_answer: None,
        file: std::sync::Arc::new("mem".into()),
        location: Location::Row(1),
    }
}

fn mask(cutoff_len: usize, train_on_prompt: bool, mask_history: bool) -> MaskOptions {
    MaskOptions {
        cutoff_len,
        train_on_prompt,
        mask_history,
    }
}

#[test]
fn every_assistant_turn_is_trained_and_prompts_are_masked() {
    let enc = encoder("chatml", None, "<|endoftext|>");
    let t = encode_supervised(&enc, &multi(), mask(4096, false, false)).unwrap();
    assert_eq!(
        trained_runs(&enc, &t.labels),
        vec!["Hello!<|im_end|>\n", "Ciao.<|im_end|>\n"]
    );
    assert!(!t.truncated);
}

#[test]
fn train_on_prompt_labels_everything() {
    let enc = encoder("chatml", None, "<|endoftext|>");
    let t = encode_supervised(&enc, &multi(), mask(4096, true, false)).unwrap();
    assert!(t.labels.iter().all(|&l| l != IGNORE_INDEX));
    assert_eq!(
        t.labels,
        t.input_ids
            .iter()
            .map(|&i| i64::from(i))
            .collect::<Vec<_>>()
    );
}

#[test]
fn mask_history_trains_only_the_last_turn() {
    let enc = encoder("chatml", None, "<|endoftext|>");
    let full = encode_supervised(&enc, &multi(), mask(4096, false, false)).unwrap();
    let t = encode_supervised(&enc, &multi(), mask(4096, false, true)).unwrap();
    assert_eq!(t.input_ids, full.input_ids, "same ids, only labels differ");
    assert_eq!(trained_runs(&enc, &t.labels), vec!["Ciao.<|im_end|>\n"]);
}

#[test]
fn cutoff_len_uses_the_per_turn_budget_split() {
    let enc = encoder("empty", None, "</s>");
    // empty template + byte tokenizer: one token per byte. Turn 1: source "Hi" (2) target "Hello!" (6);
    // turn 2: source "Bye" (3) target "Ciao." (5). Total 16.
    let t = encode_supervised(&enc, &multi(), mask(10, false, false)).unwrap();
    // Turn 1 with budget 10: infer_seqlen(2, 6, 10) = (2, 6) → 8 used; turn 2 budget 2:
    // infer_seqlen(3, 5, 2): 10 ≥ 2, 6 ≥ 2 → proportional int(2*5/8)=1 → target 1, source 1.
    assert_eq!(infer_seqlen(3, 5, 2), (1, 1));
    assert_eq!(decode(&enc, &t.input_ids), "HiHello!BC");
    assert_eq!(trained_runs(&enc, &t.labels), vec!["Hello!", "C"]);
    assert!(t.truncated);
    // With mask_history the last turn gets the budget first: infer_seqlen(3, 5, 10) = (3, 5), then
    // infer_seqlen(2, 6, 2) = proportional int(2*6/8)=1 → (1, 1); the earlier turn is put in front.
    let t = encode_supervised(&enc, &multi(), mask(10, false, true)).unwrap();
    assert_eq!(decode(&enc, &t.input_ids), "HHByeCiao.");
    assert_eq!(trained_runs(&enc, &t.labels), vec!["Ciao."]);
}

#[test]
fn knapsack_matches_llamafactory_greedy_order() {
    // Worked by hand with LLaMA-Factory's greedy_knapsack (sort, then repeatedly the largest that fits).
    assert_eq!(
        greedy_knapsack(&[3, 7, 2, 5, 8], 10),
        vec![vec![8, 2], vec![7, 3], vec![5]]
    );
    assert_eq!(greedy_knapsack(&[10, 1, 1], 10), vec![vec![10], vec![1, 1]]);
}

fn ex(len: usize, base: u32) -> TokenizedExample {
    TokenizedExample {
        input_ids: (0..len).map(|i| base + u32::try_from(i).unwrap()).collect(),
        labels: (0..len)
            .map(|i| {
                if i % 2 == 0 {
                    IGNORE_INDEX
                } else {
                    i64::from(base)
                }
            })
            .collect(),
        truncated: false,
    }
}

#[test]
fn neat_packing_never_attends_across_examples_and_positions_restart() {
    let examples = vec![ex(3, 100), ex(7, 200), ex(2, 300), ex(5, 400), ex(12, 500)];
    // cutoff_len 11 → packing uses 10 and pads to 11 (LLaMA-Factory's cutoff_len - 1 + 1).
    let packed = pack_supervised(&examples, 10, 0);
    assert_eq!(
        packed.dropped_too_long, 1,
        "the 12-token example is dropped"
    );
    assert_eq!(packed.sequences.len(), 2);
    for s in &packed.sequences {
        assert_eq!(s.len(), 11);
    }
    let first = &packed.sequences[0];
    // Knapsack [7, 3], then [5, 2]: example 200.. then 100.., then padding.
    assert_eq!(first.sequence_ids, vec![1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0]);
    assert_eq!(first.position_ids, vec![0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0]);
    assert_eq!(&first.input_ids[7..10], &[100, 101, 102]);
    assert_eq!(first.labels[10], IGNORE_INDEX);

    let seqs: Vec<_> = packed.sequences.iter().collect();
    let batch = collate(&seqs, 0, true);
    // The engine's block-diagonal mask is built from these rows: one id per packed example (0 on
    // padding) and positions restarting at each example.
    assert!(batch.block_diagonal);
    assert_eq!((batch.batch_size, batch.seq_len), (2, 11));
    assert_eq!(&batch.sequence_ids[..11], first.sequence_ids.as_slice());
    assert_eq!(&batch.position_ids[..11], first.position_ids.as_slice());
    assert_eq!(
        &batch.attention_mask[..11],
        &[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    );
    // Plain packing lets packed examples see each other (LLaMA-Factory's `packing` without `neat_packing`).
    let plain = collate(&seqs, 0, false);
    assert!(!plain.block_diagonal);
    assert_eq!(plain.sequence_ids, batch.sequence_ids);
}

#[test]
fn collate_pads_to_the_longest_in_the_batch() {
    let a = termtune::data::PackedSequence::single(&ex(3, 10));
    let b = termtune::data::PackedSequence::single(&ex(5, 20));
    let batch = collate(&[&a, &b], 9, false);
    assert_eq!((batch.batch_size, batch.seq_len), (2, 5));
    assert_eq!(&batch.input_ids[..5], &[10, 11, 12, 9, 9]);
    assert_eq!(&batch.labels[3..5], &[IGNORE_INDEX, IGNORE_INDEX]);
    assert_eq!(&batch.attention_mask[..5], &[1, 1, 1, 0, 0]);
    assert_eq!(
        &batch.sequence_ids[..5],
        &[1, 1, 1, 0, 0],
        "padding has no example id"
    );
}

#[test]
fn sft_pipeline_packs_counts_and_reuses_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = options(&lf_data_dir(), &["identity"], Some("chatml"), tmp.path());
    opts.cutoff_len = 256;
    opts.neat_packing = true;
    opts.per_device_train_batch_size = 2;
    opts.gradient_accumulation_steps = 2;
    let enc = Encoder::new(&opts, &tokenizer(), &chat_config(None, "<|endoftext|>")).unwrap();
    let first = prepare_dataset(&opts, &enc).unwrap();
    assert!(!first.from_cache);
    let s = &first.stats;
    assert_eq!(
        (s.rows_read, s.train_examples),
        (91, 91 - s.dropped_too_long)
    );
    assert!(
        s.train_sequences < s.train_examples,
        "packing merges examples: {s:?}"
    );
    assert!(first.train.iter().all(|q| q.len() == 256));
    assert_eq!(
        s.steps_per_epoch,
        s.train_sequences.div_ceil(2).div_ceil(2).max(1)
    );
    assert!(s.tokens_p50 <= s.tokens_p95 && s.tokens_p95 <= s.tokens_max);
    assert!(first.block_diagonal);

    let second = prepare_dataset(&opts, &enc).unwrap();
    assert!(second.from_cache);
    assert_eq!(second.train, first.train);
    assert_eq!(second.stats, first.stats);

    // Another cutoff is another cache entry.
    opts.cutoff_len = 128;
    assert!(!prepare_dataset(&opts, &enc).unwrap().from_cache);
    // overwrite_cache ignores the entry.
    opts.cutoff_len = 256;
    opts.overwrite_cache = true;
    assert!(!prepare_dataset(&opts, &enc).unwrap().from_cache);

    let batches = first.epoch_batches(2, termtune::data::Sampler::LengthGrouped, 42, 0);
    assert_eq!(batches.len(), first.train.len().div_ceil(2));
    assert!(batches.iter().all(|b| b.block_diagonal && b.seq_len == 256));
}

#[test]
fn cache_key_follows_file_contents() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(
        data.join("dataset_info.json"),
        r#"{"x": {"file_name": "x.jsonl"}}"#,
    )
    .unwrap();
    std::fs::write(
        data.join("x.jsonl"),
        "{\"instruction\": \"a\", \"output\": \"b\"}\n",
    )
    .unwrap();
    let opts = options(&data, &["x"], Some("chatml"), &tmp.path().join("cache"));
    let enc = Encoder::new(&opts, &tokenizer(), &chat_config(None, "<|endoftext|>")).unwrap();
    assert!(!prepare_dataset(&opts, &enc).unwrap().from_cache);
    assert!(prepare_dataset(&opts, &enc).unwrap().from_cache);
    std::fs::write(
        data.join("x.jsonl"),
        "{\"instruction\": \"a\", \"output\": \"c\"}\n",
    )
    .unwrap();
    let p = prepare_dataset(&opts, &enc).unwrap();
    assert!(!p.from_cache, "changed contents must re-tokenise");
    assert_eq!(
        decode(&enc, &p.train[0].input_ids).chars().rev().nth(11),
        Some('c')
    );
}

#[test]
fn pretraining_text_is_concatenated_into_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = options(&lf_data_dir(), &["c4_demo"], Some("default"), tmp.path());
    opts.stage = Stage::Pt;
    opts.cutoff_len = 513;
    opts.max_samples = Some(20);
    let enc = Encoder::new(&opts, &tokenizer(), &data_util::config(None, "</s>", None)).unwrap();
    let p = prepare_dataset(&opts, &enc).unwrap();
    // packing defaults to on for pt: blocks of cutoff_len - 1 = 512 tokens.
    assert!(!p.train.is_empty());
    assert!(p.train.iter().all(|s| s.len() == 512));
    let total: usize = p.stats.train_examples;
    assert_eq!(total, 20);
    // Every document ends with eos; labels are the ids except pad (= eos here, HF's LM collator).
    let all: Vec<u32> = p.train.iter().flat_map(|s| s.input_ids.clone()).collect();
    assert!(all.contains(&enc.eos.1));
    for s in &p.train {
        assert_eq!(s.input_ids.len(), s.labels.len());
        for (i, l) in s.input_ids.iter().zip(&s.labels) {
            assert_eq!(
                *l,
                if *i == enc.pad_id {
                    IGNORE_INDEX
                } else {
                    i64::from(*i)
                }
            );
        }
    }
    // Without packing each document is one sequence, cut at cutoff_len.
    opts.packing = Some(false);
    let p = prepare_dataset(&opts, &enc).unwrap();
    assert_eq!(p.train.len(), 20);
    assert!(p.train.iter().all(|s| s.len() <= 513));
    assert!(p.stats.truncated > 0);
}

#[test]
fn streaming_reads_jsonl_lazily_and_needs_max_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = options(&lf_data_dir(), &["c4_demo"], Some("default"), tmp.path());
    opts.stage = Stage::Pt;
    opts.streaming = true;
    opts.buffer_size = 8;
    let enc = Encoder::new(&opts, &tokenizer(), &data_util::config(None, "</s>", None)).unwrap();
    let m = termtune::data::pipeline::stream_dataset(&opts, &enc)
        .err()
        .unwrap()
        .to_string();
    assert!(m.contains("`max_steps`"), "{m}");
    opts.max_steps = Some(10);
    let stream = termtune::data::pipeline::stream_dataset(&opts, &enc).unwrap();
    assert_eq!(stream.count(), 300);
    // A JSON array cannot be streamed.
    let mut opts2 = options(&lf_data_dir(), &["identity"], Some("default"), tmp.path());
    opts2.streaming = true;
    opts2.max_steps = Some(1);
    let m = termtune::data::pipeline::stream_dataset(&opts2, &enc)
        .err()
        .unwrap()
        .to_string();
    assert!(m.contains("JSON array") && m.contains(".jsonl"), "{m}");
}

#[test]
fn preview_shows_raw_rendered_and_trained_spans() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = options(&lf_data_dir(), &["identity"], Some("llama3"), tmp.path());
    let enc = Encoder::new(
        &opts,
        &tokenizer(),
        &chat_config(Some("<|begin_of_text|>"), "<|end_of_text|>"),
    )
    .unwrap();
    let p = termtune::data::pipeline::preview(&opts, &enc, 0).unwrap();
    // identity.json row 1: {"instruction": "hi", "input": "", "output": "Hello! I am {{name}}, …"}
    assert_eq!(p.raw["instruction"], "hi");
    assert!(p.source.ends_with("identity.json row 1"), "{}", p.source);
    assert!(
        p.rendered.starts_with(
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        )
    );
    assert_eq!(p.spans.len(), 2);
    assert!(!p.spans[0].trained && p.spans[1].trained);
    assert!(
        p.spans[1].text.starts_with("Hello! I am {{name}}")
            && p.spans[1].text.ends_with("<|eot_id|>")
    );
    let text = termtune::data::stats::format_preview(&p);
    assert!(
        text.contains("--- rendered") && text.contains("[trained "),
        "{text}"
    );
    let err = termtune::data::pipeline::preview(&opts, &enc, 91)
        .unwrap_err()
        .to_string();
    assert!(err.contains("91 rows"), "{err}");
}

#[test]
fn stage_options_are_validated() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = options(&lf_data_dir(), &["identity"], Some("chatml"), tmp.path());
    opts.mask_history = true;
    opts.train_on_prompt = true;
    let enc = Encoder::new(
        &DataOptions::default(),
        &tokenizer(),
        &chat_config(None, "</s>"),
    )
    .unwrap();
    let m = prepare_dataset(&opts, &enc).unwrap_err().to_string();
    assert!(
        m.contains("`mask_history` is incompatible with `train_on_prompt`"),
        "{m}"
    );
    let mut opts = options(
        &lf_data_dir(),
        &["alpaca_en_demo"],
        Some("chatml"),
        tmp.path(),
    );
    opts.stage = Stage::Ppo;
    let m = prepare_dataset(&opts, &enc).unwrap_err().to_string();
    assert!(m.contains("not implemented yet"), "{m}");
    // kto: each example is its own sequence, then its KL sequence (the same prompt with another example's answer);
    // the tags follow the data (150 good, 150 bad answers in LF's demo).
    let mut opts = options(&lf_data_dir(), &["kto_en_demo"], Some("chatml"), tmp.path());
    opts.stage = Stage::Kto;
    let k = prepare_dataset(&opts, &enc).unwrap();
    assert!(k.pairwise);
    assert_eq!(k.train_examples(), 300);
    assert_eq!(k.train.len(), 600);
    assert_eq!(k.train_tags.len(), 300);
    assert_eq!(k.train_tags.iter().filter(|&&t| t).count(), 150);
    for pair in k.train.chunks(2) {
        let prompt = |s: &termtune::data::PackedSequence| {
            s.labels.iter().take_while(|&&l| l == -100).count()
        };
        // A long answer may cut the prompt (infer_seqlen keeps its start): the shorter is a prefix of the other.
        let n = prompt(&pair[0]).min(prompt(&pair[1]));
        assert!(n > 0);
        assert_eq!(pair[0].input_ids[..n], pair[1].input_ids[..n]);
    }
    let batches = k.epoch_batches(4, termtune::data::Sampler::Random, 1, 0);
    assert_eq!(batches[0].batch_size, 8);
    assert_eq!(batches[0].kto_tags.len(), 4);
    // dpo: each pair is its chosen and its rejected sequence, sharing the prompt; a batch of k pairs is the k
    // chosen rows, then the k rejected ones.
    let mut opts = options(&lf_data_dir(), &["dpo_en_demo"], Some("chatml"), tmp.path());
    opts.stage = Stage::Dpo;
    let d = prepare_dataset(&opts, &enc).unwrap();
    assert!(d.pairwise);
    assert_eq!(d.train_examples(), 300);
    assert_eq!(d.train.len(), 600);
    assert_eq!(d.stats.train_examples, 300);
    for pair in d.train.chunks(2) {
        let prompt = |s: &termtune::data::PackedSequence| {
            s.labels.iter().take_while(|&&l| l == -100).count()
        };
        assert_eq!(prompt(&pair[0]), prompt(&pair[1]));
        assert_eq!(
            pair[0].input_ids[..prompt(&pair[0])],
            pair[1].input_ids[..prompt(&pair[1])]
        );
        assert_ne!(pair[0].input_ids, pair[1].input_ids);
    }
    let batches = d.epoch_batches(3, termtune::data::Sampler::Random, 1, 0);
    assert_eq!(batches.len(), 100);
    assert_eq!(batches[0].batch_size, 6);
}

/// A pair's sequences count as truncated when cutoff_len cut its prompt or that answer.
#[test]
fn truncated_preference_pairs_are_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let enc = Encoder::new(
        &DataOptions::default(),
        &tokenizer(),
        &chat_config(None, "</s>"),
    )
    .unwrap();
    let mut opts = options(&lf_data_dir(), &["dpo_en_demo"], Some("chatml"), tmp.path());
    opts.stage = Stage::Dpo;
    opts.cutoff_len = 64;
    let short = prepare_dataset(&opts, &enc).unwrap();
    assert!(short.stats.truncated > 300, "{}", short.stats.truncated);
    assert!(short.train.iter().all(|s| s.len() <= 64));
    opts.cutoff_len = 1 << 20;
    let whole = prepare_dataset(&opts, &enc).unwrap();
    assert_eq!(whole.stats.truncated, 0);
}

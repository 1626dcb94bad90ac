#!/usr/bin/env python3
"""Reference ids for termtune's GGUF tokenizer builder on the families it supports besides SmolLM2.

Not run by CI. Trains two small tokenizers on Python standard-library sources, writes them as vocabulary-only
GGUF files (gguf-py), and tokenizes a corpus with independent implementations:
  - byte-level BPE (HF `tokenizers` trainer) in tests/fixtures/toy_bpe.gguf; reference ids from llama.cpp
    (llama-cpp-python, vocab_only) for each `tokenizer.ggml.pre` in PRES (the GGUF is rewritten per pre);
  - SentencePiece BPE with byte fallback, Llama-style options (identity normalization, no whitespace collapsing,
    dummy prefix, split digits) in tests/fixtures/toy_spm.gguf; reference ids from sentencepiece itself, and from
    llama.cpp for comparison.
Output: tests/fixtures/toy_tokenizer_reference.json.

  /tmp/ref/bin/pip install llama-cpp-python gguf tokenizers sentencepiece numpy
  /tmp/ref/bin/python scripts/tokenizer_families_reference.py
"""

import glob
import json
import os
import platform
import sysconfig
import tempfile
from importlib.metadata import version

import gguf

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "tests", "fixtures")
PRES = ["gpt-2", "smollm", "llama-bpe", "qwen2"]

CORPUS = [
    "Hello world",
    "  leading spaces and trailing spaces   ",
    "line one\nline two\n\nline four\r\nwindows line",
    "multiple     spaces      between words\t\ttabs",
    "Numbers: 0 7 42 123 2024 31415926535 3.14159 -17 1,000,000",
    "It's don't I'm we'll they've she'd you're IT'S DON'T",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (i = 0; i < 10; i++) { printf(\"%d\\n\", i); }",
    "Unicode: café naïve résumé Zürich Ångström",
    "中文测试，你好世界。Привет мир",
    "Emoji: 😀 🎉 👍🏽",
    "<|endoftext|>text<|endoftext|>",
    "CamelCaseIdentifier snake_case_name kebab-case-name",
    "!!!??? ... --- ___ *** ### $$$",
    "x" * 30,
    "",
    " ",
    "\n\n",
]


def training_text():
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:120]
    text = []
    for f in files:
        with open(f, encoding="utf-8", errors="ignore") as fh:
            text.append(fh.read())
    return "\n".join(text) + "\n" + "\n".join(CORPUS) * 5


def write_vocab_gguf(path, model, pre, tokens, types, merges=None, scores=None, specials=None, add_bos=False):
    w = gguf.GGUFWriter(path, "llama")
    # Minimal llama hyper-parameters so that llama.cpp accepts the file with vocab_only.
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    for k, v in (specials or {}).items():
        getattr(w, f"add_{k}_token_id")(v)
    w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def lcpp_tokenize(path, texts, add_bos=False):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    return [llm.tokenize(t.encode("utf-8"), add_bos=add_bos, special=True) for t in texts]


def main():
    text = training_text()
    out = {
        "note": "see scripts/tokenizer_families_reference.py; ids without bos unless stated",
        "tools": {
            "llama-cpp-python": version("llama-cpp-python"),
            "tokenizers": version("tokenizers"),
            "sentencepiece": version("sentencepiece"),
            "gguf": version("gguf"),
            "python": platform.python_version(),
        },
        "command": "python scripts/tokenizer_families_reference.py",
        "corpus": CORPUS,
    }

    # Byte-level BPE.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    types = [3 if t == "<|endoftext|>" else 1 for t in tokens]
    specials = {"bos": 0, "eos": 0}
    write_vocab_gguf(os.path.join(FIX, "toy_bpe.gguf"), "gpt2", "gpt-2", tokens, types, merges, specials=specials)
    out["bpe"] = {}
    with tempfile.TemporaryDirectory() as d:
        for pre in PRES:
            p = os.path.join(d, f"{pre}.gguf")
            write_vocab_gguf(p, "gpt2", pre, tokens, types, merges, specials=specials)
            out["bpe"][pre] = lcpp_tokenize(p, CORPUS)

    # SentencePiece BPE, Llama-style.
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as d:
        txt = os.path.join(d, "train.txt")
        with open(txt, "w", encoding="utf-8") as f:
            f.write(text)
        prefix = os.path.join(d, "spm")
        spm.SentencePieceTrainer.train(
            input=txt,
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=1000,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            character_coverage=0.9995,
            max_sentence_length=100000,
            minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
        tokens, scores, types = [], [], []
        for i in range(sp.get_piece_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            # llama.cpp's convert_hf_to_gguf.py SentencePiece token types.
            if sp.is_unknown(i):
                types.append(2)
            elif sp.is_control(i):
                types.append(3)
            elif sp.is_unused(i):
                types.append(5)
            elif sp.is_byte(i):
                types.append(6)
            else:
                types.append(1)
        spm_path = os.path.join(FIX, "toy_spm.gguf")
        write_vocab_gguf(
            spm_path, "llama", "default", tokens, types, scores=[float(s) for s in scores],
            specials={"bos": 1, "eos": 2, "unk": 0}, add_bos=True,
        )
        plain = [t for t in CORPUS if "<|endoftext|>" not in t]
        out["spm"] = {
            "note": "texts without special tokens; `sentencepiece` = SentencePieceProcessor.encode(text) (no bos), "
            "`llama_cpp` = llama-cpp-python tokenize(add_bos=False)",
            "texts": plain,
            "sentencepiece": [sp.encode(t) for t in plain],
            "llama_cpp": lcpp_tokenize(spm_path, plain),
        }
    with open(os.path.join(FIX, "toy_tokenizer_reference.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    diff = sum(a != b for a, b in zip(out["spm"]["sentencepiece"], out["spm"]["llama_cpp"]))
    print("spm: sentencepiece vs llama.cpp disagree on", diff, "texts")
    for pre in PRES:
        print(pre, out["bpe"][pre][4])


if __name__ == "__main__":
    main()

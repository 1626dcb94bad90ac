#!/usr/bin/env python3
"""Writes tests/fixtures/tiny_gemma3.gguf and tests/fixtures/tiny_gemma3_gguf_reference.json (not run in CI).

A tiny Gemma 3 text model (transformers, seeded random weights: 6 layers of width 32, 2 query heads and 1 key-value
head of 16, layers 0-4 sliding over 3 positions with RoPE base 100, layer 5 global with linear RoPE scaling 2, the
norms random around 0) is converted by llama.cpp's own convert_hf_to_gguf.py (the one vendored in
llama-cpp-python 0.3.36's sdist) to an f16 GGUF; the reference is transformers' logits of the same model with its
2-D weights rounded to f16 as the GGUF stores them (the norms stay f32 there). The tokenizer is termtune's tiny
byte-level BPE (any folder the engine tests write, e.g. the `gemma3/model` of `dump_reference_fixture`); the
converter does not know its pre-tokenizer, so it is named `gpt-2` here.

Usage: python scripts/gemma3_gguf_reference.py LLAMA_CPP_DIR TINY_TOKENIZER_DIR
  LLAMA_CPP_DIR: llama_cpp_python-0.3.36/vendor/llama.cpp from `pip download --no-binary :all: llama-cpp-python==0.3.36`
  (pip install torch transformers numpy sentencepiece)
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

llama_cpp = Path(sys.argv[1])
tok_dir = Path(sys.argv[2])
sys.path.insert(0, str(llama_cpp / "gguf-py"))
sys.path.insert(0, str(llama_cpp))

import torch  # noqa: E402
from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

repo = Path(__file__).resolve().parent.parent
out_gguf = repo / "tests/fixtures/tiny_gemma3.gguf"
out_ref = repo / "tests/fixtures/tiny_gemma3_gguf_reference.json"

vocab = json.loads((tok_dir / "tokenizer.json").read_text())
n_vocab = len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])
cfg = Gemma3TextConfig(
    vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
    layer_types=["sliding_attention"] * 5 + ["full_attention"], max_position_embeddings=512,
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
    bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=True,
)
torch.manual_seed(5)
model = Gemma3ForCausalLM(cfg).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.copy_(torch.randn_like(p) * 0.1)
        else:
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
            p.copy_(p.half().float())  # what the f16 GGUF holds

with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    model.save_pretrained(d)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(tok_dir / f, d / f)
    from conversion import base  # noqa: E402

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    import convert_hf_to_gguf  # noqa: E402

    sys.argv = ["convert_hf_to_gguf.py", str(d), "--outfile", str(out_gguf), "--outtype", "f16"]
    convert_hf_to_gguf.main()

ids = [[5, 71, 200, 13, 290, 17, 33, 101, 250, 9, 44, 180]]
with torch.no_grad():
    logits = model(input_ids=torch.tensor(ids)).logits[0]
out_ref.write_text(json.dumps({
    "note": "transformers' logits of the model in tiny_gemma3.gguf (scripts/gemma3_gguf_reference.py)",
    "input_ids": ids[0],
    "logits_first_8": logits[:, :8].tolist(),
    "last_logits": logits[-1].tolist(),
}))
print(f"wrote {out_gguf} ({out_gguf.stat().st_size} bytes) and {out_ref}")

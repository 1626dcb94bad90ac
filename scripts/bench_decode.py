#!/usr/bin/env python3
"""Decode speed of `termtune chat` against llama.cpp on the same GGUF file, prompt, threads and token count.

    pip install llama-cpp-python numpy     # builds llama.cpp for this CPU (a few minutes)
    python3 scripts/bench_decode.py MODEL.gguf [--termtune target/release/termtune] [--threads 2] [--reps 3]
                                    [--prompt-repeat 1]

Both get the same ChatML prompt (SmolLM2's template and system prompt by default; any ChatML model works), decode
128 greedy tokens, and report prompt and decode tokens/s; the reps alternate the two programs so that a noisy
machine slows both alike, and the last line is the ratio of the medians. llama.cpp keeps its model loaded between
reps (its first rep warms up and is dropped); termtune starts afresh each rep, its timing line covering the prompt
and the decode only. termtune's thread count is RAYON_NUM_THREADS (set here to --threads). --prompt-repeat N puts
the user's text N times into the prompt (a longer prefill; 4 gives about 330 tokens).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = (
    "Explain in detail how a transformer language model is trained, covering tokenization, the embedding layer, "
    "attention, the feed-forward blocks, the loss function, the optimizer, learning rate schedules, batching, "
    "gradient accumulation and mixed precision. Then describe how fine-tuning with LoRA differs from full "
    "fine-tuning."
)
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face."


def llama_cpp_run(llm, tokens, new_tokens):
    import llama_cpp
    import numpy as np

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    t1 = time.perf_counter()
    out = []
    for i in range(new_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        out.append(int(np.argmax(logits)))
        if i + 1 < new_tokens:
            llm.eval([out[-1]])
    t2 = time.perf_counter()
    return len(tokens) / (t1 - t0), (new_tokens - 1) / (t2 - t1), out


def termtune_run(binary, gguf, threads, new_tokens, workdir, prompt):
    preset = os.path.join(workdir, "bench_decode.yaml")
    with open(preset, "w") as f:
        f.write(f"model_name_or_path: {gguf}\ntemplate: smollm2\n")
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    r = subprocess.run(
        [binary, "chat", preset, "--system", SYSTEM, "--prompt", prompt, "--temperature", "0",
         "--max-new-tokens", str(new_tokens)],
        capture_output=True, text=True, env=env, check=True,
    )
    m = re.search(r"prompt (\d+) tokens in [\d.]+ s \(([\d.]+) tokens/s\); decode \d+ tokens in [\d.]+ s "
                  r"\(([\d.]+) tokens/s\)", r.stderr)
    if not m:
        sys.exit(f"no timing line in termtune's stderr:\n{r.stderr}")
    return int(m.group(1)), float(m.group(2)), float(m.group(3)), r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--termtune", default="target/release/termtune")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-repeat", type=int, default=1)
    a = ap.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python numpy")

    prompt = "\n\n".join([PROMPT] * a.prompt_repeat)
    text = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n")
    n_ctx = 1024 if a.prompt_repeat == 1 else 4096
    llm = Llama(model_path=a.gguf, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=n_ctx, verbose=False)
    tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
    llama_cpp_run(llm, tokens, 8)  # warm-up
    lp, ld, tp, td = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.reps):
            p, d, out = llama_cpp_run(llm, tokens, a.new_tokens)
            lp.append(p)
            ld.append(d)
            n, p2, d2, answer = termtune_run(a.termtune, a.gguf, a.threads, a.new_tokens, tmp, prompt)
            tp.append(p2)
            td.append(d2)
            if n != len(tokens):
                print(f"warning: termtune's prompt has {n} tokens, llama.cpp's {len(tokens)}", file=sys.stderr)
            print(f"rep {rep + 1}: llama.cpp prompt {p:.1f} decode {d:.1f} tokens/s | "
                  f"termtune prompt {p2:.1f} decode {d2:.1f} tokens/s")
    ref = llm.detokenize(out).decode(errors="replace")
    same = os.path.commonprefix([ref, answer])
    print(f"greedy answers agree on their first {len(same)} of {len(ref)} characters")
    mp, md = statistics.median(tp) / statistics.median(lp), statistics.median(td) / statistics.median(ld)
    print(f"{os.path.basename(a.gguf)}, {a.threads} threads, {len(tokens)}-token prompt, {a.new_tokens} greedy "
          f"tokens: termtune / llama.cpp = {mp:.2f}x prompt, {md:.2f}x decode (medians of {a.reps})")


if __name__ == "__main__":
    main()

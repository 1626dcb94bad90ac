#!/usr/bin/env python3
"""transformers' view of a termtune merged export (not run by CI).

Loads the f32 Hugging Face folder written by tests/export.rs (tiny seeded llama + seeded LoRA, merged) with
transformers + torch, computes the logits of the test prompt and writes tests/fixtures/export_transformers_reference.json,
so the test checks that transformers reads the exported folder (config, safetensors names, tied embeddings,
tokenizer files) as termtune means it.

  TERMTUNE_EXPORT_REFERENCE_DIR=/tmp/exportref cargo test --test integration export::f32_export_gives
  /work/venv-ref/bin/python scripts/export_transformers_reference.py /tmp/exportref/tiny-hf-f32
"""

import json
import os
import sys
from importlib.metadata import version

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# Same ids as PROMPT in tests/export.rs.
PROMPT = [5, 71, 200, 13, 290, 17, 33, 101, 250, 9, 44, 180]


def main():
    d = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(d)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0]
    chat = tok.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=False, add_generation_prompt=True)
    ref = {
        "note": "transformers + torch (float32) on the tiny f32 export of tests/export.rs; made by "
        "scripts/export_transformers_reference.py",
        "transformers": version("transformers"),
        "torch": version("torch"),
        "prompt_ids": PROMPT,
        "argmax_per_position": [int(x) for x in logits.argmax(-1)],
        "last_logits": [round(float(x), 7) for x in logits[-1]],
        "chat_template_render": chat,
        "padding_side": tok.padding_side,
    }
    dst = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "export_transformers_reference.json")
    with open(dst, "w") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print({k: v for k, v in ref.items() if k != "last_logits"})


if __name__ == "__main__":
    main()

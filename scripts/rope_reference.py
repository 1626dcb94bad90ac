"""Independent check of termtune's RoPE scalings against transformers (not run in CI: needs torch).

1. ROPE_REF_DIR=/tmp/rope cargo test --test integration -- --ignored dump_rope_reference
2. python scripts/rope_reference.py /tmp/rope

Each case folder holds a tiny llama whose config.json carries one RoPE scaling (YaRN with its defaults, with every
optional key, with an explicit attention factor) and termtune's logits for 24 tokens (ours.json). The script loads
the folder with AutoModelForCausalLM, compares the logits and prints the goldens tests/rope_config.rs hard-codes.
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

root = Path(sys.argv[1])
print(f"transformers {transformers.__version__}, torch {torch.__version__}")
for d in sorted(p.parent for p in root.glob("*/ours.json")):
    ours = json.loads((d / "ours.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = torch.tensor(ours["input_ids"])
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0]
    mine = torch.tensor(ours["logits"]).reshape(ref.shape)
    rot = model.model.rotary_emb
    print(f"{d.name}: max|logits diff| {(ref - mine).abs().max().item():.3e}  "
          f"attention scaling {rot.attention_scaling}")
    print(f"  golden: ({ref[5, :4].tolist()}, {ref[23, :4].tolist()})")

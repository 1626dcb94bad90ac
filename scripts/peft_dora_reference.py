#!/usr/bin/env python3
"""A DoRA adapter written by PEFT, for `tests/peft_variants.rs` (not run by CI: needs torch).

    ENGINE_REF_DIR=/tmp/ref cargo test --test integration -- --ignored dump_dora_reference_fixture
    python scripts/peft_dora_reference.py /tmp/ref/qwen2_dora/model tests/fixtures/peft_dora

Loads the tiny qwen2 (seed 1234) with transformers, puts PEFT's DoRA (r 4, alpha 16, all linear layers) on it with
random B (init_lora_weights=False) and magnitudes scaled by seeded factors, saves the adapter with
save_pretrained, and records the loss and logits[0, 5, :4] of the padded test batch (reference.json).
"""
import json
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(5)
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
cfg = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_dora=True, init_lora_weights=False)
model = get_peft_model(base, cfg)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
            p.mul_(1 + 0.2 * (torch.rand_like(p) - 0.5))
model.eval()
model.save_pretrained(out)
ids = torch.tensor([[5, 70, 71, 100, 33, 9], [250, 12, 40, 41, 42, 43]])
am = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
labels = torch.tensor([[-100, 70, 71, 100, 33, 9], [-100, 12, 40, 41, -100, -100]])
with torch.no_grad():
    o = model(input_ids=ids, attention_mask=am, labels=labels)
ref = {
    "versions": f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}",
    "loss": o.loss.item(),
    "logits_0_5_4": o.logits[0, 5, :4].tolist(),
}
(out / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
print(ref)

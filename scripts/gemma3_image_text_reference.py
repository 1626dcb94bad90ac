#!/usr/bin/env python3
"""Checks termtune's handling of Gemma 3's image-and-text checkpoints in transformers + PEFT (not run in CI).

1. TERMTUNE_IMAGE_TEXT_REFERENCE_DIR=/tmp/itref cargo test --test integration -- image_text::adapters_and_exports
   (writes checkpoint/ — the tiny Gemma 3 stored as Gemma3ForConditionalGeneration —, adapter/ — termtune's LoRA
   on it —, merged/ — termtune's export — and logits.json — termtune's logits of base + adapter)
2. python scripts/gemma3_image_text_reference.py /tmp/itref   (pip install torch transformers peft)

Loads the checkpoint with Gemma3ForConditionalGeneration, termtune's adapter with PeftModel.from_pretrained (every
adapter tensor must be used: no missing or unexpected LoRA keys), and the merged export; prints the largest logit
differences against termtune's.
"""
import json
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Gemma3ForConditionalGeneration

root = Path(sys.argv[1])
print(f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}")
ids = torch.tensor([[5, 71, 200, 13, 290, 17, 33, 101, 250, 9]])
ours = torch.tensor(json.loads((root / "logits.json").read_text())).reshape(1, ids.shape[1], -1)


def load(d):
    return Gemma3ForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()


model = PeftModel.from_pretrained(load(root / "checkpoint"), root / "adapter")
# Every tensor of the file lands on a LoRA module of the language model (none in the vision tower, none unused).
sd = load_file(root / "adapter" / "adapter_model.safetensors")
result = set_peft_model_state_dict(model, sd)
unexpected = [k for k in result.unexpected_keys if "lora" in k]
missing = [k for k in result.missing_keys if "lora" in k]
print(f"adapter tensors {len(sd)}, unexpected {len(unexpected)}, missing LoRA keys {len(missing)}")
wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "vision_tower" in n]
print(f"LoRA modules in the vision tower: {len(wrapped)}")
with torch.no_grad():
    peft_logits = model(input_ids=ids).logits
    with model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    merged_logits = load(root / "merged")(input_ids=ids).logits
print(f"PEFT on the checkpoint vs termtune: max |diff| {(peft_logits - ours).abs().max().item():.3e}")
print(f"merged export vs termtune:        max |diff| {(merged_logits - ours).abs().max().item():.3e}")
print(f"the adapter's effect:             max |diff| {(peft_logits - base_logits).abs().max().item():.3e}")

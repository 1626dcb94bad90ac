"""Independent check of termtune's engine against transformers + PEFT (not run in CI: needs torch).

1. ENGINE_REF_DIR=/tmp/ref cargo test --test integration -- --ignored dump_reference_fixture
   (engine::dump_reference_fixture and peft_variants::dump_dora_reference_fixture)
2. python tests/engine_reference.py /tmp/ref

For each tiny model (llama tied, qwen2 with qkv bias, qwen3 with q/k norm and untied head, gemma3 with its sliding
window, two RoPE bases, (1 + w) norms and GeGLU; llama and qwen2 with a
DoRA adapter) it loads the folder with AutoModelForCausalLM, the adapter with PeftModel.from_pretrained, and compares
logits (padded batch), the masked loss and the LoRA gradients with the values termtune wrote (ours.json). Prints max
differences and the golden values the tests hard-code.
"""
import json
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM

torch.manual_seed(0)
root = Path(sys.argv[1])
print(f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}")
for d in sorted(p.parent for p in root.glob("*/ours.json")):
    case = d.name
    ours = json.loads((d / "ours.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(d / "model", torch_dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, d / "adapter", is_trainable=True)
    model.eval()
    ids = torch.tensor(ours["input_ids"])
    am = torch.tensor(ours["attention_mask"])
    labels = torch.tensor(ours["labels"])
    out = model(input_ids=ids, attention_mask=am, labels=labels)
    ref = out.logits.detach()
    mine = torch.tensor(ours["logits"])
    valid = am.bool()
    dl = (ref - mine).abs()[valid].max().item()
    out.loss.backward()
    gmax = 0.0
    params = dict(model.named_parameters())
    for name, g in ours["grads"].items():
        # PEFT keeps the adapter name in the live parameter name.
        live = (
            name.replace("lora_A.weight", "lora_A.default.weight")
            .replace("lora_B.weight", "lora_B.default.weight")
            .replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")
        )
        pg = params[live].grad.flatten()
        gmax = max(gmax, (pg - torch.tensor(g)).abs().max().item() / max(pg.abs().max().item(), 1e-12))
    print(f"{case}: max|logits diff| {dl:.3e}  loss ours {ours['loss']:.6f} torch {out.loss.item():.6f}  "
          f"max rel grad diff {gmax:.3e}  first logits torch {ref[0, -1, :4].tolist()}")
    q = "base_model.model.model.layers.0.self_attn.q_proj."
    golden = [params[q + "lora_A.default.weight"].grad.flatten()[:3].tolist()]
    if q + "lora_magnitude_vector.default.weight" in params:
        golden.insert(0, params[q + "lora_magnitude_vector.default.weight"].grad.flatten()[:3].tolist())
    print(f"  golden: loss {out.loss.item()!r}, logits[0, 5, :4] {ref[0, 5, :4].tolist()}, grads {golden}")

"""Independent check of termtune's PiSSA adapters in PEFT (not run in CI: needs torch, transformers and peft).

1. PISSA_REF_DIR=/tmp/pissa cargo test --test integration -- --ignored dump_pissa_reference
2. python scripts/pissa_peft_check.py /tmp/pissa

For each SVD (`exact`: pissa_iter -1, `niter16`: the randomized one) the folder holds a PiSSA adapter as termtune
saves it after training, its start (`pissa_init/`), its conversion (`pissa_converted/`) and termtune's logits of
tokens 3..18. PEFT loads the PiSSA adapter on the original base (re-running its own decomposition, as it does for
`init_lora_weights: pissa…`) and the converted one as a plain LoRA; both are compared with termtune's logits. PEFT's
own PiSSA start (`get_peft_model` with the same rank, alpha and init) is compared with termtune's `pissa_init/`.
"""
import json
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

root = Path(sys.argv[1])
print(f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}")
ids = torch.arange(3, 19).unsqueeze(0)


def base():
    m = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32, attn_implementation="eager")
    return m.eval()


def logits(m):
    with torch.no_grad():
        return m(input_ids=ids).logits[0]


for case, init in [("exact", "pissa"), ("niter16", "pissa_niter_16")]:
    run = root / case
    ours = torch.tensor(json.loads((run / "termtune_logits.json").read_text())).reshape(16, -1)
    torch.manual_seed(0)
    pissa = PeftModel.from_pretrained(base(), run)
    torch.manual_seed(1)
    again = PeftModel.from_pretrained(base(), run)
    converted = PeftModel.from_pretrained(base(), run / "pissa_converted")
    print(f"{case}: PEFT loads the PiSSA adapter: max|logits - termtune's| "
          f"{(logits(pissa) - ours).abs().max().item():.3e}; "
          f"the converted LoRA: {(logits(converted) - ours).abs().max().item():.3e} "
          f"(logits up to {ours.abs().max().item():.2f}); PEFT loading it twice (torch seeds 0, 1): "
          f"{(logits(pissa) - logits(again)).abs().max().item():.3e}")
    # PEFT's own start on the same base vs termtune's pissa_init/ (B0·A0 per module, sign-free).
    cfg = json.loads((run / "adapter_config.json").read_text())
    fresh = get_peft_model(base(), LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                                              target_modules=cfg["target_modules"], init_lora_weights=init))
    start = load_file(run / "pissa_init" / "adapter_model.safetensors")
    worst = 0.0
    for name, mod in fresh.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            key = "base_model.model." + name.removeprefix("base_model.model.")
            ba_peft = mod.lora_B["default"].weight @ mod.lora_A["default"].weight
            ba_ours = start[key + ".lora_B.weight"] @ start[key + ".lora_A.weight"]
            worst = max(worst, (ba_peft - ba_ours).abs().max().item() / ba_peft.abs().max().item())
    print(f"{case}: PEFT's own PiSSA start vs termtune's: max relative |B0·A0 difference| {worst:.3e}")

"""LLaMA-Factory's own freeze selection on a tiny model (not run in CI: needs torch and LF's sdist).

Runs `_setup_freeze_tuning` from llamafactory 0.9.5 (its source, read from the sdist's model/adapter.py and run with
the two helpers it needs stubbed: no composite model, no forbidden modules) on a folder transformers loads, for the
cases tests/engine.rs `freeze_modules_train_what_llamafactory_trains` hard-codes, and prints the trainable names.

    python scripts/freeze_modules_reference.py <llamafactory-0.9.5/src/llamafactory/model/adapter.py> <model dir>
"""
import ast
import re
import sys
import types

import torch
from transformers import AutoModelForCausalLM

src = open(sys.argv[1]).read()
fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "_setup_freeze_tuning")
code = ast.get_source_segment(src, fn)
ns = {
    "re": re,
    "torch": torch,
    "logger": types.SimpleNamespace(info_rank0=lambda *a: None),
    "COMPOSITE_MODELS": {},
    "get_forbidden_modules": lambda config, args: set(),
}
exec(code, ns)
CASES = [
    (1, "all", None),
    (1, "mlp", "embed_tokens,norm"),
    (-1, "self_attn,post_attention_layernorm", None),
    (2, "input_layernorm", "lm_head"),
]
for layers, modules, extra in CASES:
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
    args = types.SimpleNamespace(
        use_llama_pro=False,
        freeze_trainable_layers=layers,
        freeze_trainable_modules=modules.split(","),
        freeze_extra_modules=extra.split(",") if extra else None,
        freeze_multi_modal_projector=True,
    )
    try:
        ns["_setup_freeze_tuning"](model, args, True, False)
        names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        print(f"({layers}, {modules!r}, {extra!r}): {names}")
    except ValueError as e:
        print(f"({layers}, {modules!r}, {extra!r}): error {e}")

"""LLaMA-Factory 0.9.5's own Muon (src/llamafactory/third_party/muon/muon.py, run from its source archive) on the
parameters and gradients `trainer::optim`'s Muon test builds, printed as that test's goldens.

    pip download --no-deps --no-binary :all: llamafactory==0.9.5 && tar xzf llamafactory-0.9.5.tar.gz
    python scripts/muon_reference.py llamafactory-0.9.5        # needs torch
"""
import importlib.util
import math
import sys
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location(
    "muon", Path(sys.argv[1]) / "src/llamafactory/third_party/muon/muon.py"
)
muon = importlib.util.module_from_spec(spec)
spec.loader.exec_module(muon)


def values(shape, k):
    n = math.prod(shape)
    return torch.tensor([math.sin(0.7 * k + 1.3 * i + 0.37 * i * i) for i in range(n)], dtype=torch.float32).reshape(shape)


# name, shape, Muon (LLaMA-Factory's rule: 2-D and neither embed nor lm_head)
params = [
    ("model.layers.0.self_attn.q_proj.weight", (6, 4)),
    ("model.layers.0.mlp.down_proj.weight", (3, 5)),
    ("model.embed_tokens.weight", (4, 3)),
    ("model.norm.weight", (4,)),
]
tensors = [torch.nn.Parameter(values(s, i + 1)) for i, (_, s) in enumerate(params)]
use_muon = [len(s) == 2 and "embed" not in n and "lm_head" not in n for n, s in params]
opt = muon.Muon(
    lr=0.02,
    wd=0.5,
    muon_params=[t for t, m in zip(tensors, use_muon) if m],
    adamw_params=[t for t, m in zip(tensors, use_muon) if not m],
    adamw_betas=(0.9, 0.999),
    adamw_eps=1e-8,
)
for step in range(3):
    for i, t in enumerate(tensors):
        t.grad = values(t.shape, 10 * (step + 1) + i)
    opt.step()
for (name, _), t in zip(params, tensors):
    print(name, [round(x, 6) for x in t.detach().flatten().tolist()])
g = values((6, 4), 99)
print("newton_schulz5", [round(x, 5) for x in muon.zeropower_via_newtonschulz5(g, 5).float().flatten().tolist()])
# How far bf16's Newton-Schulz is from the exact iteration (the tolerance the Rust test allows its own bf16 one).
a, b, c = (3.4445, -4.7750, 2.0315)
X = g.double().T
X = X / X.norm()
for _ in range(5):
    A = X @ X.T
    X = a * X + (b * A + c * A @ A) @ X
print("bf16 vs f64 Newton-Schulz:", (muon.zeropower_via_newtonschulz5(g, 5).double() - X.T).abs().max().item())

#!/usr/bin/env python3
"""Reference for `label_smoothing_factor` and `use_dft_loss`: transformers' `LabelSmoother` (epsilon 0.1) on fixed logits, the number
asserted by tests/engine.rs's `label_smoothing_matches_transformers` (logits x[i][j] = 3·sin(0.37·i + 0.11·j²),
6 tokens × 11 vocabulary, targets (3·i + 1) mod 11, the last one ignored with -100; the loss is normalised by the
5 counted tokens, as the Trainer does with `num_items_in_batch`).

Usage: python scripts/label_smoothing_reference.py   (pip install torch transformers)
"""

import math

import torch
import transformers
from transformers.trainer_pt_utils import LabelSmoother

x = torch.tensor([[3 * math.sin(0.37 * i + 0.11 * j * j) for j in range(11)] for i in range(6)], dtype=torch.float64)
labels = torch.tensor([(3 * i + 1) % 11 for i in range(5)] + [-100])
loss = LabelSmoother(epsilon=0.1)({"logits": x.unsqueeze(0)}, labels.unsqueeze(0), num_items_in_batch=5)
print("transformers", transformers.__version__)
print(repr(loss.item()))

# LLaMA-Factory's `use_dft_loss` (`_dft_cross_entropy` of llamafactory 0.9.5's train/trainer_utils.py, transcribed):
# each token's cross-entropy weighted by its detached probability, normalised by num_items_in_batch.
per_token = torch.nn.functional.cross_entropy(x, labels, ignore_index=-100, reduction="none")
valid = per_token[labels != -100]
dft = (valid * torch.exp(-valid).detach()).sum() / 5
print("dft", repr(dft.item()))

# LLaMA-Factory's `use_eaft_loss` (`_eaft_cross_entropy` of llamafactory 0.9.5, imported from its source when the
# sdist is unpacked at LF_SRC, e.g. LF_SRC=/tmp/lf/llamafactory-0.9.5/src; needs omegaconf and trl<=0.24):
# a vocabulary of 29 (EAFT reads the 20 largest logits), x[i][j] = 3·sin(0.37·i + 0.11·j²) for 5 tokens, with
# x[2][5] set to x[2][7] (a tie among the largest), targets (3·i + 1) mod 29, normalised by the 5 counted tokens.
import os
import sys

if os.environ.get("LF_SRC"):
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    sys.path.insert(0, os.environ["LF_SRC"])
    from llamafactory.train.trainer_utils import _eaft_cross_entropy

    x29 = torch.tensor([[3 * math.sin(0.37 * i + 0.11 * j * j) for j in range(29)] for i in range(5)], dtype=torch.float64)
    x29[2][5] = x29[2][7]
    t29 = torch.tensor([(3 * i + 1) % 29 for i in range(5)])
    for alpha in (1.0, 0.5):
        v = x29.clone().requires_grad_(True)
        loss = _eaft_cross_entropy(v, t29, num_items_in_batch=torch.tensor(5), alpha=alpha)
        loss.backward()
        print(f"eaft alpha {alpha}", repr(loss.item()), "grad[2][:4]", [repr(g) for g in v.grad[2][:4].tolist()])

#!/usr/bin/env python3
"""Reference for termtune's learning-rate schedules: writes tests/fixtures/lr_schedule_reference.json, for
transformers' `get_scheduler` with the schedules and `scheduler_specific_kwargs` below (peak 1e-3, 20 steps,
4 warm-up steps), the rate after each of steps 0..=21 (LambdaLR's lr after `s` calls of `step()`); read by
src/trainer/schedule.rs's `matches_transformers` test.

Usage: python scripts/lr_schedule_reference.py   (pip install torch transformers)
"""

import json
import os

import torch
import transformers
from transformers import get_scheduler

CASES = [
    ("inverse_sqrt", {}),
    ("inverse_sqrt", {"timescale": 7}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", {"min_lr": 2e-4, "num_cycles": 0.75}),
    ("warmup_stable_decay", {"num_decay_steps": 6}),
    ("warmup_stable_decay", {"num_decay_steps": 5, "num_stable_steps": 8, "min_lr_ratio": 0.05,
                             "warmup_type": "cosine", "decay_type": "1-sqrt"}),
    ("warmup_stable_decay", {"num_decay_steps": 10, "warmup_type": "1-sqrt", "decay_type": "linear"}),
]

out = {"transformers": transformers.__version__, "peak_lr": 1e-3, "total_steps": 20, "warmup_steps": 4, "cases": []}
for name, kwargs in CASES:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-3)
    sched = get_scheduler(name, opt, num_warmup_steps=4, num_training_steps=20, scheduler_specific_kwargs=kwargs)
    lrs = []
    for _ in range(22):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    out["cases"].append({"lr_scheduler_type": name, "lr_scheduler_kwargs": kwargs, "lr": lrs})
path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "lr_schedule_reference.json")
with open(path, "w") as f:
    json.dump(out, f, indent=1)

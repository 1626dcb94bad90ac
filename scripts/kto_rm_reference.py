#!/usr/bin/env python3
"""Writes tests/fixtures/kto_rm_reference.json: stage kto's and stage rm's losses and logged metrics for fixed
inputs, transcribed line by line from TRL's `KTOTrainer.kto_loss` (loss_type "kto") under LLaMA-Factory's
`CustomKTOTrainer.get_batch_loss_metrics` and `log` (sums / counts, margins), and LLaMA-Factory's
`PairwiseTrainer.compute_loss` and `ComputeAccuracy` for rm (LLaMA-Factory logs only the loss and, at evaluation,
the accuracy; termtune also logs the mean scores as `rewards/chosen`, `rewards/rejected` and their margin, whose
formulas are here too). Python's math module stands in for torch (each tensor op is elementwise over the batch).

    python3 scripts/kto_rm_reference.py > tests/fixtures/kto_rm_reference.json
"""

import json
import math


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def logsigmoid(x):  # F.logsigmoid
    return min(x, 0.0) - math.log1p(math.exp(-abs(x)))


def mean(xs):
    return sum(xs) / len(xs)


# One kto batch: per example the policy's and the reference's summed log-probabilities of its answer, the answer's
# length and tag; per example the policy's and the reference's log-probabilities of its KL (mismatched) sequence.
KTO_BATCHES = [
    {
        "examples": [
            {"logps": -12.5, "ref_logps": -13.0, "len": 9, "tag": True},
            {"logps": -30.0, "ref_logps": -29.5, "len": 21, "tag": False},
            {"logps": -4.75, "ref_logps": -4.5, "len": 3, "tag": True},
            {"logps": -55.0, "ref_logps": -60.0, "len": 40, "tag": False},
        ],
        "kl_policy": [-40.0, -22.5, -31.0, -18.0],
        "kl_ref": [-41.0, -22.0, -30.0, -18.75],
    },
    {
        # The KL estimate is negative here: clamped to 0.
        "examples": [
            {"logps": -8.0, "ref_logps": -9.5, "len": 6, "tag": False},
            {"logps": -16.0, "ref_logps": -15.0, "len": 11, "tag": True},
        ],
        "kl_policy": [-20.0, -25.0],
        "kl_ref": [-19.0, -23.5],
    },
    {
        # Desirable answers only.
        "examples": [
            {"logps": -7.0, "ref_logps": -7.5, "len": 5, "tag": True},
            {"logps": -3.0, "ref_logps": -2.0, "len": 2, "tag": True},
            {"logps": -11.0, "ref_logps": -12.25, "len": 8, "tag": True},
        ],
        "kl_policy": [-14.0, -9.0, -6.0],
        "kl_ref": [-14.5, -9.25, -6.0],
    },
]

KTO_CONFIGS = [
    {"pref_beta": 0.1, "kto_chosen_weight": 1.0, "kto_rejected_weight": 1.0, "pref_ftx": 0.0},
    {"pref_beta": 0.5, "kto_chosen_weight": 1.0, "kto_rejected_weight": 1.33, "pref_ftx": 0.0},
    {"pref_beta": 0.2, "kto_chosen_weight": 0.8, "kto_rejected_weight": 1.0, "pref_ftx": 0.4},
]


def kto_case(cfg, batch):
    beta = cfg["pref_beta"]
    ex = batch["examples"]
    tags = [e["tag"] for e in ex]
    # concatenated_forward: chosen = target[kto_tags], rejected = target[~kto_tags]
    policy_chosen_logps = [e["logps"] for e in ex if e["tag"]]
    policy_rejected_logps = [e["logps"] for e in ex if not e["tag"]]
    policy_chosen_logps_avg = [e["logps"] / e["len"] for e in ex if e["tag"]]
    reference_chosen_logps = [e["ref_logps"] for e in ex if e["tag"]]
    reference_rejected_logps = [e["ref_logps"] for e in ex if not e["tag"]]
    # TRL kto_loss
    kl = mean([p - r for p, r in zip(batch["kl_policy"], batch["kl_ref"])])  # .mean().detach()
    kl = max(kl, 0.0)  # gather(kl).mean().clamp(min=0)
    chosen_losses, chosen_rewards = [], []
    for p, r in zip(policy_chosen_logps, reference_chosen_logps):
        chosen_logratios = p - r
        chosen_losses.append(1 - sigmoid(beta * (chosen_logratios - kl)))
        chosen_rewards.append(beta * chosen_logratios)
    rejected_losses, rejected_rewards = [], []
    for p, r in zip(policy_rejected_logps, reference_rejected_logps):
        rejected_logratios = p - r
        rejected_losses.append(1 - sigmoid(beta * (kl - rejected_logratios)))
        rejected_rewards.append(beta * rejected_logratios)
    losses = [cfg["kto_chosen_weight"] * l for l in chosen_losses] + [
        cfg["kto_rejected_weight"] * l for l in rejected_losses
    ]
    # get_batch_loss_metrics
    loss = mean(losses)  # losses.nanmean()
    if cfg["pref_ftx"] > 1e-6 and len(policy_chosen_logps) > 0:
        sft_loss = [-x for x in policy_chosen_logps_avg]
        loss += cfg["pref_ftx"] * mean(sft_loss) / len(policy_chosen_logps) * len(ex)
    stored = {}
    if chosen_rewards:
        stored["rewards/chosen_sum"] = sum(chosen_rewards)
        stored["logps/chosen_sum"] = sum(policy_chosen_logps)
        stored["count/chosen"] = float(len(chosen_rewards))
    if rejected_rewards:
        stored["rewards/rejected_sum"] = sum(rejected_rewards)
        stored["logps/rejected_sum"] = sum(policy_rejected_logps)
        stored["count/rejected"] = float(len(rejected_rewards))
    stored["kl"] = kl
    # log: averages from sums and counts, then the margin
    logs = {}
    for split in ["chosen", "rejected"]:
        if f"count/{split}" in stored:
            for key in ("rewards", "logps"):
                logs[f"{key}/{split}"] = stored[f"{key}/{split}_sum"] / stored[f"count/{split}"]
    if "rewards/chosen" in logs and "rewards/rejected" in logs:
        logs["rewards/margins"] = logs["rewards/chosen"] - logs["rewards/rejected"]
    logs["kl"] = stored["kl"]
    return {"config": cfg, "batch": batch, "tags": tags, "loss": loss, "metrics": logs}


RM_BATCHES = [
    {"chosen": [0.75, -1.25, 3.0, 0.0], "rejected": [0.5, 0.25, -2.0, 0.0]},
    {"chosen": [12.0, -7.5], "rejected": [-30.0, 9.0]},
]


def rm_case(batch):
    c, r = batch["chosen"], batch["rejected"]
    # PairwiseTrainer.compute_loss: -logsigmoid(chosen_scores - rejected_scores).mean()
    losses = [-logsigmoid(a - b) for a, b in zip(c, r)]
    metrics = {
        "rewards/chosen": mean(c),
        "rewards/rejected": mean(r),
        "rewards/accuracies": mean([1.0 if a > b else 0.0 for a, b in zip(c, r)]),  # ComputeAccuracy
        "rewards/margins": mean(c) - mean(r),
    }
    return {"batch": batch, "losses": losses, "loss": mean(losses), "metrics": metrics}


print(
    json.dumps(
        {
            "kto": [kto_case(c, b) for c in KTO_CONFIGS for b in KTO_BATCHES],
            "rm": [rm_case(b) for b in RM_BATCHES],
        },
        indent=1,
    )
)

#!/usr/bin/env python3
"""Writes tests/fixtures/pref_loss_reference.json: LLaMA-Factory's DPO-stage losses and metrics for fixed
log-probabilities, transcribed line by line from `CustomDPOTrainer` (concatenated_forward, compute_preference_loss,
odds_ratio_loss, simpo_loss, get_batch_loss_metrics) and TRL's `dpo_loss` (sigmoid, hinge, ipo), with Python's
math module standing in for torch (each tensor op is elementwise over the pairs).

    python3 scripts/pref_loss_reference.py > tests/fixtures/pref_loss_reference.json
"""

import json
import math


def logsigmoid(x):  # F.logsigmoid
    return min(x, 0.0) - math.log1p(math.exp(-abs(x)))


def relu(x):
    return max(x, 0.0)


# Per pair: policy sums, reference sums, answer lengths (chosen, rejected).
PAIRS = [
    {"chosen": -12.5, "rejected": -20.25, "ref_chosen": -13.0, "ref_rejected": -19.0, "chosen_len": 9, "rejected_len": 14},
    {"chosen": -30.0, "rejected": -8.0, "ref_chosen": -29.5, "ref_rejected": -8.5, "chosen_len": 21, "rejected_len": 5},
    {"chosen": -4.75, "rejected": -4.5, "ref_chosen": -4.75, "ref_rejected": -4.5, "chosen_len": 3, "rejected_len": 4},
    {"chosen": -55.0, "rejected": -71.0, "ref_chosen": -60.0, "ref_rejected": -66.0, "chosen_len": 40, "rejected_len": 37},
]

CONFIGS = [
    {"pref_loss": "sigmoid", "pref_beta": 0.1, "pref_ftx": 0.0, "dpo_label_smoothing": 0.0, "simpo_gamma": 0.5},
    {"pref_loss": "sigmoid", "pref_beta": 0.25, "pref_ftx": 0.0, "dpo_label_smoothing": 0.1, "simpo_gamma": 0.5},
    {"pref_loss": "sigmoid", "pref_beta": 0.1, "pref_ftx": 0.5, "dpo_label_smoothing": 0.0, "simpo_gamma": 0.5},
    {"pref_loss": "hinge", "pref_beta": 0.1, "pref_ftx": 0.0, "dpo_label_smoothing": 0.0, "simpo_gamma": 0.5},
    {"pref_loss": "hinge", "pref_beta": 2.0, "pref_ftx": 0.0, "dpo_label_smoothing": 0.0, "simpo_gamma": 0.5},
    {"pref_loss": "ipo", "pref_beta": 0.1, "pref_ftx": 0.0, "dpo_label_smoothing": 0.0, "simpo_gamma": 0.5},
    {"pref_loss": "ipo", "pref_beta": 0.5, "pref_ftx": 1.0, "dpo_label_smoothing": 0.0, "simpo_gamma": 0.5},
    {"pref_loss": "orpo", "pref_beta": 0.1, "pref_ftx": 0.0, "dpo_label_smoothing": 0.0, "simpo_gamma": 0.5},
    {"pref_loss": "orpo", "pref_beta": 0.3, "pref_ftx": 0.2, "dpo_label_smoothing": 0.0, "simpo_gamma": 0.5},
    {"pref_loss": "simpo", "pref_beta": 2.0, "pref_ftx": 0.0, "dpo_label_smoothing": 0.0, "simpo_gamma": 0.5},
    {"pref_loss": "simpo", "pref_beta": 2.5, "pref_ftx": 0.0, "dpo_label_smoothing": 0.0, "simpo_gamma": 1.4},
]


def mean(xs):
    return sum(xs) / len(xs)


def case(cfg):
    beta, loss_type = cfg["pref_beta"], cfg["pref_loss"]
    use_ref_model = loss_type not in ["orpo", "simpo"]
    # concatenated_forward
    avg = loss_type in ["ipo", "orpo", "simpo"]
    pc = [p["chosen"] / (p["chosen_len"] if avg else 1) for p in PAIRS]
    pr = [p["rejected"] / (p["rejected_len"] if avg else 1) for p in PAIRS]
    rc = [p["ref_chosen"] / (p["chosen_len"] if avg else 1) for p in PAIRS]
    rr = [p["ref_rejected"] / (p["rejected_len"] if avg else 1) for p in PAIRS]
    chosen_logps_avg = pc if avg else [c / p["chosen_len"] for c, p in zip(pc, PAIRS)]
    # compute_preference_loss
    losses, chosen_rewards, rejected_rewards = [], [], []
    for i in range(len(PAIRS)):
        if not use_ref_model:
            if loss_type == "orpo":
                log_odds = (pc[i] - pr[i]) - (math.log1p(-math.exp(pc[i])) - math.log1p(-math.exp(pr[i])))
                sft_loss = -pc[i]
                odds_ratio_loss = -logsigmoid(log_odds)
                losses.append(sft_loss + beta * odds_ratio_loss)
            else:
                pi_logratios = pc[i] - pr[i]
                gamma_logratios = cfg["simpo_gamma"] / beta
                logits = pi_logratios - gamma_logratios
                losses.append(-logsigmoid(beta * logits))
            chosen_rewards.append(beta * pc[i])
            rejected_rewards.append(beta * pr[i])
        else:
            # TRL dpo_loss
            chosen_logratios = pc[i] - rc[i]
            rejected_logratios = pr[i] - rr[i]
            logits = chosen_logratios - rejected_logratios
            ls = cfg["dpo_label_smoothing"]
            if loss_type == "sigmoid":
                losses.append(-logsigmoid(beta * logits) * (1 - ls) - logsigmoid(-beta * logits) * ls)
            elif loss_type == "hinge":
                losses.append(relu(1 - beta * logits))
            elif loss_type == "ipo":
                losses.append((logits - 1 / (2 * beta)) ** 2)
            chosen_rewards.append(beta * (pc[i] - rc[i]))
            rejected_rewards.append(beta * (pr[i] - rr[i]))
    # get_batch_loss_metrics
    sft_loss = [-x for x in chosen_logps_avg]
    if cfg["pref_ftx"] > 1e-6:
        losses = [l + cfg["pref_ftx"] * s for l, s in zip(losses, sft_loss)]
    metrics = {
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/accuracies": mean([1.0 if c > r else 0.0 for c, r in zip(chosen_rewards, rejected_rewards)]),
        "rewards/margins": mean([c - r for c, r in zip(chosen_rewards, rejected_rewards)]),
        "logps/chosen": mean(pc),
        "logps/rejected": mean(pr),
    }
    if loss_type == "orpo":
        metrics["sft_loss"] = mean(sft_loss)
        metrics["odds_ratio_loss"] = mean([(l - s) / beta for l, s in zip(losses, sft_loss)])
    return {"config": cfg, "losses": losses, "loss": mean(losses), "metrics": metrics}


print(json.dumps({"pairs": PAIRS, "cases": [case(c) for c in CONFIGS]}, indent=1))

#!/usr/bin/env python3
"""Writes tests/fixtures/pref_loss_reference.json: LLaMA-Factory's DPO-stage losses and metrics for fixed
log-probabilities, transcribed line by line from `CustomDPOTrainer` (concatenated_forward, compute_preference_loss,
odds_ratio_loss, simpo_loss, bco_loss, get_batch_loss_metrics), TRL's `dpo_loss` (sigmoid, hinge, ipo) and
`RunningMoments` (BCO's baseline), with Python's math module standing in for torch (each tensor op is elementwise
over the pairs).

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


class RunningMoments:
    """TRL's RunningMoments (single process), as LLaMA-Factory's BCO term updates it with one scalar per batch."""

    def __init__(self):
        self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24

    def update(self, x):
        xs_count, xs_var, xs_mean = 1, 0.0, x  # torch.var_mean(xs, unbiased=False) of one value
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        tot_sum = old_sum + new_sum
        self.mean += delta * xs_count / tot_count
        new_var = tot_sum / tot_count
        # A tensor division in TRL (inf at the first update, where 1e-24 + 1 == 1); the mean does not use it.
        self.std = math.sqrt(new_var * tot_count / (tot_count - 1)) if tot_count != 1 else math.inf
        self.var = new_var
        self.count = tot_count


# BCO mixed into the DPO losses (`pref_bco_weight`): batches run in order, each updating the running baseline.
BCO_CONFIGS = [
    {"pref_loss": "sigmoid", "pref_beta": 0.1, "pref_ftx": 0.0, "pref_bco_weight": 0.5},
    {"pref_loss": "ipo", "pref_beta": 0.5, "pref_ftx": 0.2, "pref_bco_weight": 1.0},
    {"pref_loss": "hinge", "pref_beta": 0.3, "pref_ftx": 0.0, "pref_bco_weight": 2.0},
]
BCO_BATCHES = [[0, 1], [2, 3], [1, 3]]


def bco_case(cfg):
    beta, loss_type, w = cfg["pref_beta"], cfg["pref_loss"], cfg["pref_bco_weight"]
    avg = loss_type in ["ipo", "orpo", "simpo"]
    running = RunningMoments()
    out = []
    for idx in BCO_BATCHES:
        ps = [PAIRS[i] for i in idx]
        pc = [p["chosen"] / (p["chosen_len"] if avg else 1) for p in ps]
        pr = [p["rejected"] / (p["rejected_len"] if avg else 1) for p in ps]
        rc = [p["ref_chosen"] / (p["chosen_len"] if avg else 1) for p in ps]
        rr = [p["ref_rejected"] / (p["rejected_len"] if avg else 1) for p in ps]
        # bco_loss: the batch's rewards (chosen and rejected) averaged, the baseline updated, then the loss.
        rewards = [beta * (c - r) for c, r in zip(pc, rc)] + [beta * (c - r) for c, r in zip(pr, rr)]
        running.update(mean(rewards))
        delta = running.mean
        losses = []
        for i in range(len(ps)):
            logits = (pc[i] - rc[i]) - (pr[i] - rr[i])
            if loss_type == "sigmoid":
                dpo = -logsigmoid(beta * logits)
            elif loss_type == "hinge":
                dpo = relu(1 - beta * logits)
            else:
                dpo = (logits - 1 / (2 * beta)) ** 2
            bco = -logsigmoid(beta * (pc[i] - rc[i]) - delta) - logsigmoid(-(beta * (pr[i] - rr[i]) - delta))
            loss = (dpo + bco * w) / (1.0 + w)
            chosen_avg = pc[i] if avg else pc[i] / ps[i]["chosen_len"]
            if cfg["pref_ftx"] > 1e-6:
                loss += cfg["pref_ftx"] * -chosen_avg
            losses.append(loss)
        out.append({"pairs": idx, "delta": delta, "losses": losses})
    return {"config": cfg, "batches": out}


print(json.dumps({"pairs": PAIRS, "cases": [case(c) for c in CONFIGS], "bco": [bco_case(c) for c in BCO_CONFIGS]},
                 indent=1))

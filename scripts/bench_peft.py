#!/usr/bin/env python3
"""PyTorch + PEFT reference for `termtune bench` (not run by CI).

Runs the same LoRA training steps as termtune on exactly the same batches (termtune writes them
to a JSON file: input_ids, labels, attention_mask per step, padded to the longest row as
LLaMA-Factory's collator does) and prints one JSON object with its timings, losses and peak memory
(RSS on the CPU; torch.cuda's peak allocated and reserved on a GPU). On a GPU the base is loaded in
--dtype (bfloat16) with sdpa attention; PEFT keeps the LoRA weights in float32 (autocast_adapter_dtype).

Needs: torch, transformers, peft (and gguf for a .gguf model), e.g.
    python3 -m venv venv && venv/bin/pip install torch transformers peft gguf
    TERMTUNE_BENCH_PYTHON=venv/bin/python termtune bench
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a Hugging Face folder or a .gguf file")
    ap.add_argument("--batches", required=True, help="JSON written by termtune bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dora", type=int, default=0, help="1: use_dora")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    if args.model.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(args.model)),
            gguf_file=os.path.basename(args.model),
            torch_dtype=dtype,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, torch_dtype=dtype, attn_implementation="sdpa"
        )
    model.to(device)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    cfg = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        use_dora=bool(args.dora),
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    def sync():
        if gpu:
            torch.cuda.synchronize(device)

    with open(args.batches) as f:
        batches = json.load(f)
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    steps = []
    for i, b in enumerate(batches):
        ids = torch.tensor(b["input_ids"], dtype=torch.long, device=device)
        labels = torch.tensor(b["labels"], dtype=torch.long, device=device)
        mask = torch.tensor(b["attention_mask"], dtype=torch.long, device=device)
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        loss = float(out.loss.detach())  # a sync point, as termtune reads its loss
        t1 = time.perf_counter()
        out.loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        steps.append(
            {
                "loss": loss,
                "forward_s": t1 - t0,
                "backward_s": t2 - t1,
                "optimizer_s": t3 - t2,
                "step_s": t3 - t0,
                "real_tokens": int(mask.sum()),
                "padded_tokens": int(mask.numel()),
            }
        )
        print(f"reference step {i + 1}/{len(batches)}: {t3 - t0:.2f} s", file=sys.stderr)
    measured = steps[args.warmup:] or steps
    med = lambda k: statistics.median(s[k] for s in measured)  # noqa: E731
    real = sum(s["real_tokens"] for s in measured)
    padded = sum(s["padded_tokens"] for s in measured)
    total = sum(s["step_s"] for s in measured)
    import peft
    import transformers

    mem = {}
    if gpu:
        mem = {
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
        }
    print(
        json.dumps(
            {
                **mem,
                "tool": f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, {args.dtype}, sdpa, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}",
                "losses": [s["loss"] for s in steps],
                "step_s_median": med("step_s"),
                "forward_s_median": med("forward_s"),
                "backward_s_median": med("backward_s"),
                "optimizer_s_median": med("optimizer_s"),
                "real_tokens_per_s": real / total,
                "padded_tokens_per_s": padded / total,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

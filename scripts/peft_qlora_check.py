#!/usr/bin/env python3
"""A QLoRA adapter trained by termtune (`quantization_bit: 4`) on PEFT + transformers, on the 16-bit base.

    pip install torch transformers peft
    python3 scripts/peft_qlora_check.py BASE_FOLDER ADAPTER_FOLDER --termtune target/release/termtune \
        [--prompt "Who are you?"] [--new-tokens 32]

PEFT loads the adapter onto the base (float32, as transformers reads the folder), answers the prompt greedily with
the folder's own chat template, and the script asks `termtune chat` the same (same base folder, same adapter,
greedy, the tokenizer's own template) and prints both answers and whether their tokens are equal. Not run by CI
(it needs torch); the session notes carry its output.
"""

import argparse
import subprocess
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("--termtune", default="target/release/termtune")
    ap.add_argument("--prompt", default="Who are you?")
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(a.base)
    model = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, a.adapter)
    model.eval()
    ids = tok.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True,
                                  return_tensors="pt")
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=a.new_tokens, do_sample=False, eos_token_id=tok.eos_token_id)
    peft_ids = out[0, ids.shape[1]:].tolist()
    if peft_ids and peft_ids[-1] == tok.eos_token_id:
        peft_ids = peft_ids[:-1]
    peft_text = tok.decode(peft_ids, skip_special_tokens=True)
    print(f"PEFT + transformers: {peft_text!r}")

    r = subprocess.run(
        [a.termtune, "chat", "--model", a.base, "--adapter", a.adapter, "--prompt", a.prompt, "--temperature", "0",
         "--max-new-tokens", str(a.new_tokens)],
        capture_output=True, text=True, check=True,
    )
    tt_text = r.stdout.rstrip("\n")
    print(f"termtune chat:       {tt_text!r}")
    tt_ids = tok(tt_text, add_special_tokens=False)["input_ids"]
    same = tt_ids == peft_ids
    print(f"same tokens: {same} ({len(peft_ids)} PEFT tokens)")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()

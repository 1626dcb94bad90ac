"""PyTorch + PEFT counterpart of tests/engine_bench.rs (not run in CI: needs torch, transformers, peft).

Same shape (SmolLM2-135M: 30 layers, d 576, ffn 1536, 9/3 heads, vocab 49152, tied), random init, LoRA r8 alpha 16
on all linear layers except lm_head, f32, CPU, batch 4 x 256, labels on every token, eager attention.
Run: python tests/engine_bench_torch.py [steps] (threads = torch default; set OMP_NUM_THREADS to compare).
"""
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                  max_position_embeddings=8192, tie_word_embeddings=True, attn_implementation="eager")
model = LlamaForCausalLM(cfg)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], task_type="CAUSAL_LM"))
model.train()
model.print_trainable_parameters()
print("threads", torch.get_num_threads(), "torch", torch.__version__)
ids = torch.randint(0, 49152, (4, 256))
tot = 0.0
cpu_tot = 0.0
for step in range(steps + 1):
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    t1 = time.perf_counter()
    out.loss.backward()
    t2 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    cpu = time.process_time() - c0
    print(f"step {step}: forward {t1 - t0:.2f}s backward {t2 - t1:.2f}s ({1024 / (t2 - t0):.0f} tok/s), "
          f"process CPU time {cpu:.2f}s")
    if step > 0:
        tot += t2 - t0
        cpu_tot += cpu
print(f"mean over {steps} steps: {tot / steps:.2f}s -> {1024 * steps / tot:.0f} tokens/s; "
      f"CPU time per step {cpu_tot / steps:.2f}s")

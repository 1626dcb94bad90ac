#!/usr/bin/env python3
"""Reference for termtune's bitsandbytes 4-bit quantization (`quantization_bit: 4`): writes
tests/fixtures/nf4_reference.json.

`reference_*` below is a numpy transcription of bitsandbytes' `quantize_4bit` / `dequantize_4bit` (its default
torch kernels: absmax per block of 64, values scaled by the reciprocal of the absmax, clamped to [-1, 1], bucketed
at the float32 midpoints of the sorted code, two 4-bit codes per byte, high nibble first) with double quantization
(`compress_statistics=True`, LLaMA-Factory's `double_quantization: true`): the absmax minus their mean quantized
with bitsandbytes' 8-bit dynamic map in blocks of 256 (absmax of the block, value / absmax, nearest code, ties to
the lower one). When bitsandbytes and torch are importable (`pip install bitsandbytes torch numpy`), every output
is also compared with bitsandbytes' own on the same tensors and the script stops on a difference.

The mean of the absmax is the exactly rounded mean (summed in float64): torch sums float32 in its own order, which
can differ in the last bit for a few hundred blocks; the script reports when it does.

    python3 scripts/nf4_reference.py            # writes the fixture (needs numpy)
"""
import json
import os
import sys

import numpy as np

f32 = np.float32

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
FP4 = [0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
       0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204,
       -0.25]


def dynamic_map():
    """bitsandbytes' `create_dynamic_map()` (signed, 7 exponent bits): the float32 values as torch computes them,
    read from the bundled table (`tests/fixtures/nf4_reference.json` carries it; regenerate with bitsandbytes)."""
    try:
        import bitsandbytes.functional as F
        return F.create_dynamic_map().numpy().astype(f32)
    except ImportError:
        here = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "nf4_reference.json")
        with open(here) as fh:
            h = json.load(fh)["dynamic_map_bits"]
        return np.array([int(h[i:i + 8], 16) for i in range(0, len(h), 8)], np.uint32).view(f32)


def reference_quantize_4bit(a, quant_type, blocksize=64):
    code = np.array(NF4 if quant_type == "nf4" else FP4, f32)
    order = np.argsort(code, kind="stable")
    mid = (code[order[:-1]] + code[order[1:]]) / f32(2)
    x = a.reshape(-1).astype(f32)
    n = x.size
    rem = n % blocksize
    full = n - rem
    blocks = x[:full].reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1).astype(f32)
    scaled = np.clip(blocks * (f32(1) / np.maximum(absmax, f32(1e-38)))[:, None], f32(-1), f32(1)).reshape(-1)
    if rem:
        am = np.maximum(np.abs(x[full:]).max(), f32(1e-38)).astype(f32)
        absmax = np.concatenate([absmax, np.array([am], f32)])
        scaled = np.concatenate([scaled, np.clip(x[full:] / am, f32(-1), f32(1)).astype(f32)])
    if scaled.size % 2:
        scaled = np.concatenate([scaled, np.zeros(1, f32)])
    q = np.searchsorted(mid, scaled, side="left")  # torch.bucketize(right=False): mid[q-1] < x <= mid[q]
    q = order[q].astype(np.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).astype(np.uint8)
    return packed, absmax


def reference_quantize_blockwise(a, code, blocksize=256):
    x = a.reshape(-1).astype(f32)
    out = np.empty(x.size, np.uint8)
    absmax = []
    for s in range(0, x.size, blocksize):
        blk = x[s:s + blocksize]
        am = f32(np.abs(blk).max())
        absmax.append(am)
        normed = (blk / am).astype(f32)
        # the largest code <= value (the first one for a value below them all), then the right neighbour when it is
        # strictly closer
        idx = np.clip(np.searchsorted(code, normed, side="right") - 1, 0, 255)
        nxt = np.minimum(idx + 1, 255)
        right = np.abs(normed - code[nxt]) < np.abs(normed - code[idx])
        out[s:s + blocksize] = np.where((idx < 255) & right, nxt, idx)
    return out, np.array(absmax, f32)


def reference_quantize(a, quant_type, double):
    packed, absmax = reference_quantize_4bit(a, quant_type)
    if not double:
        return {"packed": packed, "absmax": absmax}
    offset = f32(absmax.astype(np.float64).sum() / absmax.size)
    qabs, absmax2 = reference_quantize_blockwise((absmax - offset).astype(f32), dynamic_map())
    return {"packed": packed, "qabsmax": qabs, "absmax2": absmax2, "offset": offset}


def reference_absmax(state):
    if "absmax" in state:
        return state["absmax"]
    code = dynamic_map()
    q = state["qabsmax"]
    blk = np.repeat(state["absmax2"], 256)[: q.size]
    return (code[q] * blk + state["offset"]).astype(f32)


def reference_dequantize(state, quant_type, n, blocksize=64):
    code = np.array(NF4 if quant_type == "nf4" else FP4, f32)
    p = state["packed"]
    q = np.empty(p.size * 2, np.uint8)
    q[0::2] = p >> 4
    q[1::2] = p & 15
    vals = code[q[:n]]
    absmax = reference_absmax(state)
    return (vals * np.repeat(absmax, blocksize)[:n]).astype(f32)


def bnb_outputs(a, quant_type, double):
    import torch
    import bitsandbytes.functional as F

    t = torch.from_numpy(a.copy())
    packed, st = F.quantize_4bit(t, blocksize=64, quant_type=quant_type, compress_statistics=double)
    out = {"packed": packed.reshape(-1).numpy()}
    if double:
        out.update(qabsmax=st.absmax.numpy(), absmax2=st.state2.absmax.numpy(), offset=f32(st.offset.item()))
    else:
        out["absmax"] = st.absmax.numpy()
    out["dequantized"] = F.dequantize_4bit(packed, st).reshape(-1).numpy()
    return out


def bits(x):
    """float32 values as one string of 8-hex-digit bit patterns."""
    return "".join(format(int(v), "08x") for v in np.asarray(x, f32).reshape(-1).view(np.uint32))


def bf16_bits(x):
    """bfloat16-representable float32 values as one string of 4-hex-digit bit patterns (their high halves)."""
    u = np.asarray(x, f32).reshape(-1).view(np.uint32)
    assert not (u & np.uint32(0xFFFF)).any(), "input is not bfloat16-representable"
    return "".join(format(int(v) >> 16, "04x") for v in u)


def cases():
    rng = np.random.default_rng(1234)
    w = (rng.standard_normal((20, 832)) * 0.02).astype(f32)  # 260 blocks: two absmax blocks, the second short
    w[3, 64:128] = 0.0  # an all-zero block
    w[7, 5] = 0.5  # an outlier
    small = rng.standard_normal((3, 100)).astype(f32)  # 300 values: a short last block
    # bfloat16 values, as a bf16 checkpoint holds them
    w = (w.view(np.uint32) & np.uint32(0xFFFF0000)).view(f32)
    small = (small.view(np.uint32) & np.uint32(0xFFFF0000)).view(f32)
    return [("weight_nf4_double", w, "nf4", True), ("weight_nf4", w[:4], "nf4", False),
            ("weight_fp4_double", w[:4], "fp4", True), ("short_nf4_double", small, "nf4", True)]


def main():
    try:
        import bitsandbytes  # noqa: F401
        have_bnb = True
    except ImportError:
        have_bnb = False
        print("bitsandbytes not importable: writing the reference without comparing it", file=sys.stderr)
    out = {"source": "scripts/nf4_reference.py", "blocksize": 64, "nf4_code": NF4, "fp4_code": FP4,
           "dynamic_map_bits": bits(dynamic_map()), "cases": []}
    for name, a, qt, double in cases():
        st = reference_quantize(a, qt, double)
        deq = reference_dequantize(st, qt, a.size)
        if have_bnb:
            b = bnb_outputs(a, qt, double)
            for k in st:
                same = np.array_equal(np.asarray(st[k]), np.asarray(b[k]))
                if k == "offset" and not same:
                    print(f"{name}: offset {st[k]!r} (exact mean) vs torch's {b[k]!r}", file=sys.stderr)
                    continue
                if not same:
                    diff = int((np.asarray(st[k]).reshape(-1) != np.asarray(b[k]).reshape(-1)).sum())
                    sys.exit(f"{name}: {k} differs from bitsandbytes in {diff} places")
            if (not double or st["offset"] == b["offset"]) and not np.array_equal(deq, b["dequantized"]):
                sys.exit(f"{name}: dequantized values differ from bitsandbytes")
            print(f"{name}: equal to bitsandbytes", file=sys.stderr)
        case = {"name": name, "shape": list(a.shape), "quant_type": qt, "double_quant": double,
                "input_bf16_bits": bf16_bits(a), "packed": st["packed"].tobytes().hex(), "dequantized_bits": bits(deq)}
        if double:
            case.update(qabsmax=st["qabsmax"].tobytes().hex(), absmax2_bits=bits(st["absmax2"]),
                        offset_bits=bits([st["offset"]]))
        else:
            case["absmax_bits"] = bits(st["absmax"])
        out["cases"].append(case)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "nf4_reference.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
        fh.write("\n")
    print(f"wrote {os.path.normpath(path)}", file=sys.stderr)


if __name__ == "__main__":
    main()

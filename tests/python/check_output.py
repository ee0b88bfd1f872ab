"""Loads a mergestream output with the Python `safetensors` package, as users do, and checks
every tensor against a numpy ExPO reference computed from the input pair.

Usage: check_output.py PAIR_DIR OUT_DIR ALPHA
Exits 0 and prints a summary when every tensor matches bit for bit.
"""

import json
import os
import sys

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors.numpy loads BF16)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file


def load_dir(path):
    """Every tensor of a Hugging Face model directory, via the index when there is one."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        loaded = load_file(os.path.join(path, name))
        for key, value in loaded.items():
            assert key not in tensors, f"{key} in two shards"
            if weight_map is not None:
                assert weight_map[key] == name, f"index puts {key} in {weight_map[key]}, found in {name}"
            tensors[key] = value
    if weight_map is not None:
        assert set(weight_map) == set(tensors), "index and shards list different tensors"
    return tensors


def bits(array):
    return array.view({2: np.uint16, 4: np.uint32, 8: np.uint64, 1: np.uint8}[array.dtype.itemsize])


def expo_reference(aligned, sft, alpha):
    """aligned + alpha * (aligned - sft) in float32, unfused, round to nearest even, canonical NaN."""
    a = aligned.astype(np.float32)
    s = sft.astype(np.float32)
    d = a - s
    t = np.float32(alpha) * d
    o = a + t
    nan = np.isnan(o)
    if aligned.dtype == ml_dtypes.bfloat16:
        u = o.view(np.uint32).astype(np.uint64)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        r[nan] = 0x7FC0
        return r
    if aligned.dtype == np.float16:
        with np.errstate(over="ignore"):
            r = o.astype(np.float16).view(np.uint16).copy()
        r[nan] = 0x7E00
        return r
    r = o.view(np.uint32).copy()
    r[nan] = 0x7FC00000
    return r


def main():
    pair, out, alpha = sys.argv[1], sys.argv[2], np.float32(sys.argv[3])
    sft = load_dir(os.path.join(pair, "sft"))
    aligned = load_dir(os.path.join(pair, "aligned"))
    merged = load_dir(out)
    assert set(merged) == set(aligned), "merged and aligned name different tensors"
    elements = 0
    for name, m in merged.items():
        a, s = aligned[name], sft[name]
        assert m.dtype == a.dtype and m.shape == a.shape, f"{name}: {m.dtype}{m.shape} vs {a.dtype}{a.shape}"
        if m.dtype in (ml_dtypes.bfloat16, np.float16, np.float32):
            with np.errstate(all="ignore"):
                want = expo_reference(a, s, alpha)
            got = bits(m)
            bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
            assert bad.size == 0, f"{name}: {bad.size} elements differ, first at {bad[0]}: got {got.reshape(-1)[bad[0]]:#x}, want {want.reshape(-1)[bad[0]]:#x}"
        else:
            assert np.array_equal(bits(m), bits(a)), f"{name}: copied tensor differs"
        elements += m.size
    # safe_open reads the metadata the tool wrote.
    first = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[0]
    with safe_open(os.path.join(out, first), framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["mergestream.method"] == "expo", meta
    print(f"python safetensors: {len(merged)} tensors, {elements} elements match the numpy reference")


if __name__ == "__main__":
    main()

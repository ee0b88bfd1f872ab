#!/usr/bin/env python3
"""Random differential test of the numpy reference (tests/python/mergekit_ref.py) against
mergekit 0.1.5's own merge-method objects, called in-process on torch tensors: thousands
of small cases per minute, far more than `mergekit-yaml` runs allow (see
scripts/mergekit-compare.py for the end-to-end comparison).

Each case draws a method, 1..17 inputs in BF16/F16/F32 (often mixed), compute and output
dtypes, weights (negative, zero-sum), normalize, lambda, a shape, and a rate of special
values (NaN payloads, +-Inf, +-0, subnormals). Then it converts the inputs to the config
dtype as mergekit's loader does, runs `merge_methods.get(name)._execute_resolved` exactly
as mergekit's graph task does, applies `out_dtype` as mergekit's writer does, and compares
the bytes with the reference.

Shapes: with `--shapes aligned` every tensor has a multiple of 64 elements (real
checkpoints), and every byte must match. With `--shapes ragged`, torch's scalar loop tails
write some NaNs with a different encoding (position- and thread-count dependent; see
docs/mergekit-arithmetic.md), so only NaN-vs-NaN differences are tolerated there.

What it deliberately does not do: exercise mergekit's YAML parsing, loader or writer.

Usage (a venv with mergekit==0.1.5 and numpy, e.g. via MERGEKIT_VENV):
    mergekit-ref-fuzz.py [--cases N] [--seed S] [--threads T] [--shapes aligned|ragged|big]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from mergekit import merge_methods
from mergekit.merge_methods import TensorGroup
from mergekit.merge_methods.base import PerInputValues

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "python"))
import mergekit_ref as mr  # noqa: E402

TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BITS = {"bfloat16": np.uint16, "float16": np.uint16, "float32": np.uint32}
SPECIALS = {
    "bfloat16": [0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80,
                 0x7FC0, 0xFFC0, 0x7F81, 0xFFA5, 0x7FFF],
    "float16": [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00,
                0x7E00, 0xFE00, 0x7C01, 0xFD55, 0x7FFF],
    "float32": [0, 0x80000000, 1, 0x80000001, 0x007FFFFF, 0x7F7FFFFF, 0xFF7FFFFF,
                0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFD54321,
                0x7FFFFFFF],
}
SHAPES = {
    "aligned": [(64,), (32, 64), (128,), (2, 96), (3, 64)],
    "ragged": [(7,), (3, 5), (1,), (100,), (33, 70), (12,), (45,)],
    "big": [(256, 256), (64, 1024), (100, 1000), (333, 333)],
}


def gen(rng, dtype, shape, special_frac):
    n = int(np.prod(shape))
    v = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 2)).astype(np.float32)
    bits = np.array(mr.narrow(v.view(np.uint32), dtype), dtype=BITS[dtype])
    m = rng.random(n) < special_frac
    bits[m] = rng.choice(np.array(SPECIALS[dtype], dtype=BITS[dtype]), int(m.sum()))
    m = rng.random(n) < special_frac  # tiny values: subnormals and exact ties
    bits[m] = rng.integers(0, 0x400 if dtype != "float32" else 0x800000, int(m.sum()))
    return bits.reshape(shape)


def to_torch(bits, dtype):
    signed = np.int16 if bits.dtype == np.uint16 else np.int32
    return torch.from_numpy(bits.view(signed).copy()).view(TORCH[dtype])


def from_torch(t):
    if t.element_size() == 2:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.contiguous().view(torch.int32).numpy().view(np.uint32)


def loaded(ts, compute):
    """mergekit's LoadTensor: `.to(dtype)` when the config has a dtype that differs."""
    return [t.to(TORCH[compute]) if compute and t.dtype != TORCH[compute] else t for t in ts]


def mergekit_linear(ins, w, normalize, compute, out):
    g = TensorGroup.from_tensors(loaded([to_torch(b, d) for b, d in ins], compute))
    params = {"weight": PerInputValues([(e.id, x) for e, x in zip(g.entries, w)]),
              "normalize": normalize}
    (r,) = merge_methods.get("linear")._execute_resolved((g,), [params], dtype=None,
                                                         out_dtype=None)
    return from_torch(r.to(TORCH[out]) if out else r)


def mergekit_task_arithmetic(base, ins, w, normalize, lam, compute, out):
    ts = loaded([to_torch(b, d) for b, d in [base] + ins], compute)
    g = TensorGroup.from_tensors(ts, base_index=0)
    nb = g.non_base
    params = {"weight": PerInputValues([(e.id, x) for e, x in zip(nb, w)]),
              "normalize": normalize, "lambda": lam, "int8_mask": False, "rescale": False,
              "density": PerInputValues([(e.id, 1.0) for e in nb])}
    (r,) = merge_methods.get("task_arithmetic")._execute_resolved((g,), [params], dtype=None,
                                                                  out_dtype=None)
    return from_torch(r.to(TORCH[out]) if out else r)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="aligned")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    strict = args.shapes != "ragged" and not (args.shapes == "big" and args.threads > 1)
    cases = identical = nan_only = bad = 0
    for _ in range(args.cases):
        method = str(rng.choice(["linear", "task_arithmetic"]))
        n = int(rng.choice([1, 2, 3, 4, 5, 8, 9, 17]))
        store = [str(rng.choice(list(TORCH))) for _ in range(n + 1)]
        if rng.random() < 0.6:
            store = [store[0]] * (n + 1)
        compute = rng.choice([None, "bfloat16", "float16", "float32"])
        out = rng.choice([None, None, "bfloat16", "float16", "float32"])
        shapes = SHAPES[args.shapes]
        shape = shapes[rng.integers(len(shapes))]
        arrs = [gen(rng, store[i], shape, float(rng.choice([0.0, 0.01, 0.2])))
                for i in range(n + 1)]
        w = [float(x) for x in [rng.uniform(-1, 2, n), np.round(rng.uniform(-1, 2, n), 1),
                                np.full(n, 1.0 / n)][rng.integers(3)]]
        if rng.random() < 0.1:
            w[-1] = -sum(w[:-1])
        normalize = bool(rng.random() < 0.5)
        lam = float(rng.choice([1.0, 0.5, 1.3, 0.0, -0.7]))
        if method == "linear":
            ins = [(arrs[i], store[i]) for i in range(n)]
            got = mergekit_linear(ins, w, normalize, compute, out)
            want, dt = mr.linear(ins, w, normalize=normalize, compute=compute, out_dtype=out)
        else:
            ins = [(arrs[i + 1], store[i + 1]) for i in range(n)]
            got = mergekit_task_arithmetic((arrs[0], store[0]), ins, w, normalize, lam,
                                           compute, out)
            want, dt = mr.task_arithmetic((arrs[0], store[0]), ins, w, normalize=normalize,
                                          lam=lam, compute=compute, out_dtype=out)
        got, want = got.reshape(-1), np.asarray(want).reshape(-1)
        cases += 1
        diff = np.nonzero(got != want)[0]
        if diff.size == 0:
            identical += 1
            continue
        both_nan = (np.isnan(mr.widen(got[diff], dt).view(np.float32))
                    & np.isnan(mr.widen(want[diff], dt).view(np.float32)))
        if both_nan.all() and not strict:
            nan_only += 1
            continue
        bad += 1
        if bad <= 5:
            i = diff[0]
            print(f"MISMATCH {method} n={n} store={store} compute={compute} out={out} "
                  f"normalize={normalize} lambda={lam} shape={shape} w={w}: {diff.size}/"
                  f"{got.size} differ, first at {i}: mergekit {got[i]:#x} reference "
                  f"{want[i]:#x}; inputs {[hex(a.reshape(-1)[i]) for a in arrs]}")
    print(f"{args.shapes} shapes, {args.threads} torch thread(s), seed {args.seed}: "
          f"{cases} cases, {identical} byte-identical, {nan_only} differing only in NaN "
          f"encodings (tolerated for ragged shapes), {bad} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

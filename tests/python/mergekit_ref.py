#!/usr/bin/env python3
"""Independent numpy model of the arithmetic of mergekit 0.1.5's `linear` and
`task_arithmetic` merges, as CPU torch (x86-64, AVX2/AVX-512 build) executes them.

It spells out, one torch operation at a time, what happens to a tensor between
loading it and writing it (see docs/mergekit-arithmetic.md for the derivation and
the probes behind every rule). It depends on numpy only (BF16 is handled as bit patterns,
so not even ml_dtypes is needed): no torch, no mergekit, no code shared with
mergestream's Rust kernel. Values are carried as raw
bit patterns (uint16 / uint32 arrays) so that NaN payloads, signed zeros and
subnormals are exactly what the model says, never what numpy happens to do.

What it deliberately does not do: parse mergekit YAML, resolve per-tensor weights
(filters, layer gradients) or read model directories; a caller passes the weights of
each tensor. It does not model torch's scalar-tail quirks for NaN *encodings* that
depend on the number of torch threads (documented in docs/mergekit-arithmetic.md);
it does model the deterministic reduction-order tail of the task-arithmetic sum.

Library use:

    import mergekit_ref as mr
    out_bits, out_dtype = mr.linear([(bits0, "BF16"), (bits1, "BF16")], [0.3, 0.7],
                                    normalize=True, compute="bfloat16", out_dtype=None)

CLI use (expected outputs for end-to-end tests):

    mergekit_ref.py SPEC.json OUT.safetensors
    mergekit_ref.py --batch JOBS.json        # a JSON list of SPECs, each with "out": path

SPEC.json:
    {"method": "linear" | "task_arithmetic",
     "inputs": ["a.safetensors", "b.safetensors", ...],   # in config order; a model directory
                                                          # (index + shards, or model.safetensors)
                                                          # works too
     "base": "base.safetensors",                          # task_arithmetic only
     "dtype": "bfloat16" | "float16" | "float32" | null,  # mergekit `dtype:`
     "out_dtype": ... | null,
     "normalize": true | false | null,                    # null: the method's default
     "lambda": 1.0,                                        # task_arithmetic only
     "weights": {"tensor.name": [w0, w1, ...], ...},       # per tensor, one per input
     "default_weights": [w0, w1, ...],                     # for tensors not listed
     "truncate_rows": false}                               # true: where the inputs' first
                                                          # dimensions differ, keep the rows all
                                                          # have (mergekit's
                                                          # --unsafe-truncate-embeddings)
"""

from __future__ import annotations

import json
import math
import sys
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

# --------------------------------------------------------------------------- dtypes

#: canonical names (mergekit's config spelling) and their aliases
_ALIASES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16", "BF16": "bfloat16",
    "float16": "float16", "f16": "float16", "F16": "float16", "half": "float16",
    "float32": "float32", "f32": "float32", "F32": "float32", "float": "float32",
}
_ST_NAME = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_BITS_DTYPE = {"bfloat16": np.uint16, "float16": np.uint16, "float32": np.uint32}


def canon(dtype: Optional[str]) -> Optional[str]:
    """Canonical dtype name ("bfloat16", "float16", "float32") or None."""
    if dtype is None:
        return None
    name = str(dtype)
    if name.startswith("torch."):
        name = name[len("torch."):]
    try:
        return _ALIASES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}") from None


def promote(dtypes: Iterable[str]) -> str:
    """torch.promote_types over the inputs' dtypes (what mergekit computes in when
    the config has no `dtype:`): equal dtypes stay, anything else is float32."""
    ds = {canon(d) for d in dtypes}
    return ds.pop() if len(ds) == 1 else "float32"


# ----------------------------------------------------------------- f32 bit helpers

U32 = np.uint32
QUIET32 = U32(0x0040_0000)
#: the NaN x86 SSE/AVX arithmetic produces for an invalid operation (0*Inf, Inf-Inf, 0/0)
DEFAULT_NAN32 = U32(0xFFC0_0000)
ZERO32 = U32(0)


def _u32(x) -> np.ndarray:
    return np.asarray(x, dtype=U32)


def isnan32(b: np.ndarray) -> np.ndarray:
    return (_u32(b) & U32(0x7FFF_FFFF)) > U32(0x7F80_0000)


def _f(b: np.ndarray) -> np.ndarray:
    return _u32(b).view(np.float32)


def f32_bits_of_python_float(x: float) -> np.ndarray:
    """Python float (binary64) to float32 bits, round to nearest even (what
    torch.tensor(..., dtype=float32) and scalar arguments of f32 ops do)."""
    with np.errstate(over="ignore"):
        return np.array([x], dtype=np.float64).astype(np.float32).view(U32)[0]


def _propagate(r: np.ndarray, *operands: np.ndarray) -> np.ndarray:
    """x86 NaN rule for one arithmetic instruction: the first NaN operand in the
    given priority order, quieted, sign and payload kept; otherwise, if the result
    is NaN (invalid operation), the x86 default NaN 0xFFC00000."""
    r = np.where(isnan32(r), DEFAULT_NAN32, r)
    for op in reversed(operands):
        r = np.where(isnan32(op), _u32(op) | QUIET32, r)
    return r.astype(U32)


def add32(a, b):
    """a + b in binary32, RNE; NaN priority a, b."""
    with np.errstate(all="ignore"):
        r = (_f(a) + _f(b)).view(U32)
    return _propagate(r, a, b)


def sub32(a, b):
    with np.errstate(all="ignore"):
        r = (_f(a) - _f(b)).view(U32)
    return _propagate(r, a, b)


def mul32(a, b):
    with np.errstate(all="ignore"):
        r = (_f(a) * _f(b)).view(U32)
    return _propagate(r, a, b)


def div32(a, b):
    with np.errstate(all="ignore"):
        r = (_f(a) / _f(b)).view(U32)
    return _propagate(r, a, b)


def fma32(a, b, c):
    """a * b + c rounded once (IEEE fusedMultiplyAdd, binary32, RNE).

    Exact by construction without an fma primitive: a*b is exact in binary64
    (24 + 24 bits), the sum with c is done in binary64 and its rounding error
    recovered with TwoSum; the binary64 sum is then rounded *to odd* (sticky bit)
    and finally to binary32, which is correct because 53 >= 24 + 2.
    NaN priority a, c, b (what torch's addcmul_ does: the tensor, then the
    running sum; see the docs)."""
    with np.errstate(all="ignore"):
        a64, b64, c64 = (_f(x).astype(np.float64) for x in (a, b, c))
        p = a64 * b64
        s = p + c64
        bb = s - p
        e = (p - (s - bb)) + (c64 - bb)
    sb = s.view(np.uint64)
    adjust = np.isfinite(s) & (e != 0) & ((sb & np.uint64(1)) == 0)
    away = (e > 0) == (s > 0)  # the exact value lies beyond s, away from zero
    sb = np.where(adjust, np.where(away, sb + np.uint64(1), sb - np.uint64(1)), sb)
    with np.errstate(all="ignore"):
        r = sb.view(np.float64).astype(np.float32).view(U32)
    return _propagate(r, a, c, b)


# ------------------------------------------------------------ dtype conversions

def widen(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Storage/compute dtype bits to binary32 bits, as torch's vectorised copy
    does: bf16 is exact (a NaN keeps its bits, not even quieted); f16 is exact
    for numbers, a NaN is quieted with its payload shifted up (vcvtph2ps)."""
    dtype = canon(dtype)
    if dtype == "float32":
        return _u32(bits).copy()
    b = np.asarray(bits, dtype=np.uint16).astype(U32)
    if dtype == "bfloat16":
        return b << U32(16)
    # float16
    nan = (b & U32(0x7C00)) == U32(0x7C00)
    nan &= (b & U32(0x03FF)) != 0
    num = np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float32).view(U32)
    nanbits = ((b & U32(0x8000)) << U32(16)) | U32(0x7FC0_0000) | ((b & U32(0x03FF)) << U32(13))
    return np.where(nan, nanbits, num).astype(U32)


def _bf16_rne(b: np.ndarray) -> np.ndarray:
    b64 = _u32(b).astype(np.uint64)
    return ((b64 + np.uint64(0x7FFF) + ((b64 >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)).astype(np.uint16)


def narrow(b32: np.ndarray, dtype: str, *, scalar_path: bool = False) -> np.ndarray:
    """binary32 bits to `dtype` bits, round to nearest even, subnormals kept,
    overflow to +-Inf. NaN: bf16 -> 0xFFFF (torch's vectorised f32->bf16 code; its
    scalar code, `scalar_path=True`, gives 0x7FC0); f16 -> sign | 0x7E00 | top
    payload bits (vcvtps2ph)."""
    dtype = canon(dtype)
    b32 = _u32(b32)
    nan = isnan32(b32)
    if dtype == "float32":
        return b32.copy()
    if dtype == "bfloat16":
        r = _bf16_rne(b32)
        return np.where(nan, np.uint16(0x7FC0 if scalar_path else 0xFFFF), r).astype(np.uint16)
    with np.errstate(all="ignore"):
        num = b32.view(np.float32).astype(np.float16).view(np.uint16)
    nanbits = (((b32 >> U32(16)) & U32(0x8000)) | U32(0x7E00) | ((b32 >> U32(13)) & U32(0x03FF))).astype(np.uint16)
    return np.where(nan, nanbits, num).astype(np.uint16)


def convert(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    """torch `tensor.to(dst)` for a tensor of dtype `src` (bulk, vectorised path)."""
    src, dst = canon(src), canon(dst)
    if src == dst:
        return np.array(bits, copy=True)
    if src == "float16" and dst == "bfloat16":
        # torch converts f16 -> bf16 through float with its scalar conversion:
        # every NaN becomes 0x7FC0.
        return narrow(widen(bits, src), dst, scalar_path=True)
    return narrow(widen(bits, src), dst)


def round_to(b32: np.ndarray, dtype: str, *, scalar_path: bool = False) -> np.ndarray:
    """An f32 result stored in `dtype` and read back as f32 (a compute-dtype
    rounding point)."""
    return widen(narrow(b32, dtype, scalar_path=scalar_path), dtype)


def python_float_to(x: float, dtype: str) -> np.ndarray:
    """torch.tensor([x], dtype=dtype)[0] for a Python float: binary64 -> binary32
    (RNE) -> dtype (RNE): double rounding for bf16/f16, as torch does. As f32 bits."""
    return round_to(f32_bits_of_python_float(x), dtype, scalar_path=True)


# ---------------------------------------------------------------- torch reductions

def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


def add32_pri(a, b, b_first=False):
    """a + b where, if both are NaN, `b` wins wherever `b_first` (a bool or a mask)
    is true. torch's compiled reductions commute some of their additions; which
    operand an instruction lists first is only visible through NaN payloads."""
    r = add32(a, b)
    if b_first is False:
        return r
    return np.where(b_first & isnan32(b), _u32(b) | QUIET32, r).astype(U32)


def multi_row_sum(rows: Sequence[Sequence[np.ndarray]], nrows: int, fold_level_first=False) -> List[np.ndarray]:
    """torch's cascade sum over `rows` (a list of `size` rows, each `nrows` values
    summed independently): blocks of 2^level_power rows are summed from zero into
    level 0, each finished block is carried into level 1 (and every 2^level_power
    blocks further up, four levels in all); at the end level 0 takes levels 1..3.
    Accumulators are the left operand, except in the final fold wherever
    `fold_level_first` says the level accumulator comes first."""
    size = len(rows)
    level_power = max(4, _ceil_log2(size) // 4) if size > 0 else 4
    step = 1 << level_power
    mask = step - 1
    acc = [[ZERO32 for _ in range(nrows)] for _ in range(4)]
    i = 0
    while i + step <= size:
        for _ in range(step):
            for k in range(nrows):
                acc[0][k] = add32(acc[0][k], rows[i][k])
            i += 1
        for lv in range(1, 4):
            for k in range(nrows):
                acc[lv][k] = add32(acc[lv][k], acc[lv - 1][k])
                acc[lv - 1][k] = ZERO32
            if i & (mask << (lv * level_power)):
                break
    while i < size:
        for k in range(nrows):
            acc[0][k] = add32(acc[0][k], rows[i][k])
        i += 1
    for lv in range(1, 4):
        for k in range(nrows):
            acc[0][k] = add32_pri(acc[0][k], acc[lv][k], fold_level_first)
    return acc[0]


def row_sum(items: Sequence[np.ndarray], fold_partial_first: Tuple[int, ...] = ()) -> np.ndarray:
    """torch's row_sum: four interleaved partial sums (item i goes to partial
    i % 4, each partial a cascade sum), leftover items added to partial 0, then
    partial 0 + 1 + 2 + 3 (partial k first for k in `fold_partial_first`)."""
    n = len(items) // 4
    partial = multi_row_sum([items[4 * i: 4 * i + 4] for i in range(n)], 4)
    for i in range(4 * n, len(items)):
        partial[0] = add32(partial[0], items[i])
    for k in range(1, 4):
        partial[0] = add32_pri(partial[0], partial[k], k in fold_partial_first)
    return partial[0]


#: elements of one AVX2 vector of the *stored* dtype, which is what torch's sum kernel
#: (compiled for AVX2 even on AVX-512 machines) compares reduction sizes against
_VEC_ELEMS = {"float32": 8, "bfloat16": 16, "float16": 16}
#: f32 lanes of the accumulator vector
_ACC_LANES = 8
#: In the vectorised cascade (4 accumulator vectors of 8 lanes = 32 columns), the
#: final fold puts the level accumulator first for these vectors (by dtype).
_BULK_FOLD_LEVEL_FIRST = {"float32": (0, 1), "float16": (0,), "bfloat16": ()}
#: The vectorised row_sum (columns in whole groups of 8 after the bulk) folds with
#: partial k first for these k (by dtype).
_VEC_ROWSUM_PARTIAL_FIRST = {"float32": (), "float16": (1,), "bfloat16": ()}


def inner_sum(values: Sequence[np.ndarray], dtype: str) -> np.ndarray:
    """torch `x.sum()` over a contiguous run of `values` (f32 bits of `dtype`
    elements; all arrays broadcast together), accumulated in f32. Not rounded to
    `dtype` yet (see `store_sum`)."""
    dtype = canon(dtype)
    k = len(values)
    v = _VEC_ELEMS[dtype]
    if k < v:
        return row_sum(list(values))
    n_vec = k // v
    vecs = []
    for i in range(n_vec):
        chunk = values[i * v:(i + 1) * v]
        if dtype == "float32":
            vecs.append(list(chunk))
        else:
            # a 16-element bf16/f16 vector is loaded as two f32 vectors (elements
            # 0..7 and 8..15) that are added lane by lane
            vecs.append([add32(chunk[j], chunk[j + _ACC_LANES]) for j in range(_ACC_LANES)])
    # row_sum over vectors, lane by lane
    lanes = [row_sum([vec[j] for vec in vecs]) for j in range(_ACC_LANES)]
    final = ZERO32
    for i in range(n_vec * v, k):
        final = add32(final, values[i])
    for j in range(_ACC_LANES):
        final = add32_pri(final, lanes[j], True)
    return final


def store_sum(acc: np.ndarray, dtype: str) -> np.ndarray:
    """torch's sum writes `out += acc` into an output filled with zeros, in the
    output dtype (scalar code): 0 + acc, rounded to `dtype`. Returns f32 bits."""
    return round_to(add32(ZERO32, acc), dtype, scalar_path=True)


def outer_sum_regions(numel: int, dtype: str) -> Tuple[int, int, int]:
    """How torch's sum over dim 0 of a [k, numel] tensor treats each column
    (element index) j, for numel > 1:
      j < a:        cascade order (vectorised, or 4-column scalar groups);
      a <= j < b:   row_sum order, vectorised (groups of 8 columns);
      b <= j:       row_sum order, scalar.
    Returns (a, b, vectorised) with vectorised 1 if the bulk is the vector code."""
    v = _VEC_ELEMS[canon(dtype)]
    if numel >= v:
        a = numel - numel % (4 * _ACC_LANES)
        b = a + (numel - a) // _ACC_LANES * _ACC_LANES
        return a, b, 1
    a = numel - numel % 4
    return a, a, 0


def outer_sum(rows: Sequence[np.ndarray], dtype: str) -> np.ndarray:
    """torch `stack(rows).sum(dim=0)` for 1-D arrays of f32 bits of `dtype`
    values, accumulated in f32, stored in `dtype` (returned as f32 bits)."""
    dtype = canon(dtype)
    numel = rows[0].shape[0]
    if numel == 1:
        acc = inner_sum([r[0:1] for r in rows], dtype)
        return store_sum(acc, dtype)
    a, b, vectorised = outer_sum_regions(numel, dtype)
    idx = np.arange(numel)
    if vectorised:
        level_first = np.isin((idx % 32) // 8, _BULK_FOLD_LEVEL_FIRST[dtype])
    else:
        level_first = False
    bulk = multi_row_sum([[r] for r in rows], 1, level_first)[0]
    vec_tail = row_sum(list(rows), _VEC_ROWSUM_PARTIAL_FIRST[dtype])
    scalar_tail = row_sum(list(rows))
    acc = np.where(idx < a, bulk, np.where(idx < b, vec_tail, scalar_tail)).astype(U32)
    return store_sum(acc, dtype)


# ------------------------------------------------------------------------ methods

Tensor = Tuple[np.ndarray, str]  # (bits, dtype)


def _flat_bits(t: Tensor) -> Tuple[np.ndarray, str]:
    bits, dtype = t
    dtype = canon(dtype)
    return np.ascontiguousarray(bits).reshape(-1).astype(_BITS_DTYPE[dtype]), dtype


def _load(t: Tensor, compute: Optional[str]) -> Tuple[np.ndarray, str]:
    """mergekit's LoadTensor: convert to the config `dtype` if it differs."""
    bits, dtype = _flat_bits(t)
    if compute is not None and compute != dtype:
        return convert(bits, dtype, compute), compute
    return bits, dtype


def _finish(bits: np.ndarray, dtype: str, out_dtype: Optional[str], shape) -> Tensor:
    out_dtype = canon(out_dtype)
    if out_dtype is not None and out_dtype != dtype:
        bits, dtype = convert(bits, dtype, out_dtype), out_dtype
    return bits.reshape(shape), dtype


def linear(tensors: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = True,
           compute: Optional[str] = None, out_dtype: Optional[str] = None) -> Tensor:
    """mergekit `linear` for one tensor. `tensors` in config order, `weights` the
    Python floats mergekit resolved for this tensor (one per tensor).

        c = compute dtype (config dtype, else promotion of the inputs' dtypes)
        x_i = inputs converted to c                       (LoadTensor / packing)
        w_i = float32(weight_i)                           (coefficient tensor)
        r = +0 (float32)
        r = fma(x_i, w_i, r) for i in order               (addcmul_, fused)
        if normalize: r = r / sum(w)                      (sum in f32, torch order)
        out = float32 -> c                                (.to(first.dtype))
        then -> out_dtype                                 (SaveTensor)
    """
    if len(tensors) != len(weights) or not tensors:
        raise ValueError("linear: need one weight per tensor and at least one tensor")
    compute = canon(compute)
    shape = np.shape(tensors[0][0])
    c = compute or promote(d for _, d in tensors)
    xs = [_load(t, compute) for t in tensors]
    xs = [convert(b, d, c) for b, d in xs]  # promotion at packing time (no-op if compute set)
    w32 = [f32_bits_of_python_float(w) for w in weights]
    r = np.zeros(xs[0].shape, dtype=U32)
    for x, w in zip(xs, w32):
        r = fma32(widen(x, c), w, r)
    if normalize:
        den = inner_sum(w32, "float32")
        den = add32(ZERO32, den)  # the sum's store into a zero-filled float32 output
        r = div32(r, den)
    return _finish(narrow(r, c), c, out_dtype, shape)


def _threshold(dtype: str) -> np.ndarray:
    """`divisor.abs() < 1e-8` compares in the divisor's dtype: the Python scalar is
    converted to that dtype (bf16: 0x322C, f16: 0 - never true, f32: 0x322BCC77)."""
    return python_float_to(1e-8, dtype)


def task_arithmetic(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], *,
                    normalize: bool = False, lam: float = 1.0, compute: Optional[str] = None,
                    out_dtype: Optional[str] = None) -> Tensor:
    """mergekit `task_arithmetic` for one tensor. `tensors` are the non-base
    models in config order, `weights` their weights for this tensor.

    Every step is one torch op in the compute dtype c (f32 math, rounded to c):
        d_i = x_i - base ; d_i = d_i * c(w_i)
        m = sum_i d_i            (f32 accumulation in torch's order, rounded once)
        s = sum_i c(w_i)         (same), replaced by 1 if |s| < c(1e-8)
        if normalize: m = m / s
        if lambda != 1: m = m * float32(lambda)
        out = base + m, then -> out_dtype
    """
    if len(tensors) != len(weights):
        raise ValueError("task_arithmetic: need one weight per non-base tensor")
    compute = canon(compute)
    shape = np.shape(base[0])
    everything = [base, *tensors]
    c = compute or promote(d for _, d in everything)
    loaded = [_load(t, compute) for t in everything]
    loaded = [convert(b, d, c) for b, d in loaded]
    b = widen(loaded[0], c)
    if not tensors:
        return _finish(loaded[0], c, out_dtype, shape)
    xs = [widen(x, c) for x in loaded[1:]]

    def op(fn, a, bb):
        return round_to(fn(a, bb), c)

    wc = [python_float_to(w, c) for w in weights]
    deltas = [op(sub32, x, b) for x in xs]
    deltas = [op(mul32, d, w) for d, w in zip(deltas, wc)]
    mixed = outer_sum(deltas, c)
    if normalize:
        divisor = store_sum(inner_sum(wc, c), c)
        if np.abs(_f(divisor)) < np.abs(_f(_threshold(c))):
            divisor = widen(narrow(f32_bits_of_python_float(1.0), c), c)
        mixed = op(div32, mixed, divisor)
    if lam != 1:
        mixed = op(mul32, mixed, f32_bits_of_python_float(lam))
    out = narrow(add32(b, mixed), c)
    return _finish(out, c, out_dtype, shape)


# ---------------------------------------------------------------------------- CLI

def _read_safetensors(path: str):
    """name -> (bits array shaped, dtype), plus the file's metadata, without any
    dependency beyond numpy."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    data = raw[8 + n:]
    out = {}
    st_to_canon = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
    for name, info in header.items():
        start, end = info["data_offsets"]
        if info["dtype"] not in st_to_canon:
            out[name] = (np.frombuffer(data[start:end], dtype=np.uint8).copy(), info["dtype"], info["shape"])
            continue
        dt = st_to_canon[info["dtype"]]
        arr = np.frombuffer(data[start:end], dtype=np.dtype(_BITS_DTYPE[dt]).newbyteorder("<"))
        out[name] = (arr.astype(_BITS_DTYPE[dt]).reshape(info["shape"]), dt, info["shape"])
    return out, meta


def _read_model(path: str):
    """name -> (bits, dtype, shape) of a .safetensors file or a model directory (its
    model.safetensors.index.json and shards, or its model.safetensors)."""
    import os
    if not os.path.isdir(path):
        return _read_safetensors(path)[0]
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        return _read_safetensors(os.path.join(path, "model.safetensors"))[0]
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for shard in shards:
        out.update(_read_safetensors(os.path.join(path, shard))[0])
    return out


def _write_safetensors(path: str, tensors) -> None:
    """tensors: list of (name, bits, dtype) in the order to write."""
    header = {}
    blobs = []
    offset = 0
    for name, bits, dtype in tensors:
        blob = np.ascontiguousarray(bits).astype(np.dtype(_BITS_DTYPE[dtype]).newbyteorder("<")).tobytes()
        header[name] = {"dtype": _ST_NAME[dtype], "shape": list(np.shape(bits)),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for blob in blobs:
            f.write(blob)


def run_spec(spec: dict, out_path: str) -> None:
    method = spec["method"]
    if method not in ("linear", "task_arithmetic"):
        raise ValueError(f"unsupported method {method!r}")
    inputs = [_read_model(p) for p in spec["inputs"]]
    base = _read_model(spec["base"]) if method == "task_arithmetic" else None
    normalize = spec.get("normalize")
    if normalize is None:
        normalize = method == "linear"
    compute, out_dtype = spec.get("dtype"), spec.get("out_dtype")
    names = list((base or inputs[0]).keys())
    results = []
    for name in names:
        weights = spec.get("weights", {}).get(name, spec.get("default_weights"))
        if weights is None:
            raise ValueError(f"no weights for tensor {name}")
        ts = [(m[name][0], m[name][1]) for m in inputs]
        b = (base[name][0], base[name][1]) if base is not None else None
        if spec.get("truncate_rows"):
            rows = min(np.shape(t[0])[0] for t in ts + ([b] if b else []))
            ts = [(t[0][:rows], t[1]) for t in ts]
            b = (b[0][:rows], b[1]) if b else None
        if method == "linear":
            bits, dt = linear(ts, weights, normalize=normalize, compute=compute, out_dtype=out_dtype)
        else:
            bits, dt = task_arithmetic(b, ts, weights, normalize=normalize,
                                       lam=float(spec.get("lambda", 1.0)), compute=compute,
                                       out_dtype=out_dtype)
        results.append((name, bits, dt))
    _write_safetensors(out_path, results)


def main(argv: List[str]) -> int:
    if len(argv) == 3 and argv[1] == "--batch":
        # many merges in one process: a JSON list of specs, each with an "out" path
        with open(argv[2]) as f:
            for spec in json.load(f):
                run_spec(spec, spec["out"])
        return 0
    if len(argv) != 3 or argv[1] in ("-h", "--help"):
        print(__doc__.split("Library use:")[0].strip(), file=sys.stderr)
        print(f"\nusage: {argv[0]} SPEC.json OUT.safetensors\n"
              f"       {argv[0]} --batch JOBS.json   (a list of specs, each with \"out\")",
              file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        spec = json.load(f)
    run_spec(spec, argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

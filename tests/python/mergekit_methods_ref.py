#!/usr/bin/env python3
"""Independent numpy reference for mergestream's statistics-based merge methods.

Methods: ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear,
slerp, model_stock. It spells out *mergestream's* defined semantics (docs/mergekit-methods.md):
mergekit 0.1.5's arithmetic where bytes must match (element-wise steps, rounding points, exact
selections), and mergestream's own fixed-order reductions, tie rule (lower index first among
equal magnitudes), counter-based RNG (Philox4x32-10 keyed by BLAKE3) and f64 acos/sin where
mergekit's result depends on torch internals.

It shares no code with the Rust implementation: whole-tensor numpy, stable sorts instead of
radix histograms, numpy's float16 casts instead of bit tricks, its own BLAKE3 and Philox.

Library use:
    merge_tensor(method, params, name, shape, compute, inputs, out_dtype) -> numpy uint array
CLI:
    mergekit_methods_ref.py SPEC.json OUT.safetensors
    SPEC = {"method": "ties", "compute": "BF16", "out_dtype": "BF16" (optional),
            "inputs": ["base.safetensors", "a.safetensors", ...],   # base first
            "params": {"inputs": [{"weight": 1, "density": 0.5, ...}, ...],
                       "normalize": null, "rescale": null, "lambda": 1.0, "t": 0.5,
                       "filter_wise": false, "seed": 0},
            "per_tensor": {"name": {"t": 0.3}}  (optional overrides),
            "tensors": ["name", ...] (optional; default: every floating tensor)}
Needs only numpy.
"""
import json
import math
import struct
import sys

import numpy as np

BLOCK = 4096
LANES = 16
DTYPES = ("BF16", "F16", "F32")
SIZE = {"BF16": 2, "F16": 2, "F32": 4}

# --------------------------------------------------------------------- dtypes


def bits_to_f32(dtype, bits):
    """Storage bits (uint16/uint32 array) -> float32 values (exact)."""
    if dtype == "F32":
        return np.asarray(bits, np.uint32).view(np.float32)
    if dtype == "BF16":
        return (np.asarray(bits, np.uint32) << 16).astype(np.uint32).view(np.float32)
    return np.asarray(bits, np.uint16).view(np.float16).astype(np.float32)


def f32_to_bits(dtype, x):
    """float32 values -> storage bits, round-to-nearest-even, NaN canonical."""
    x = np.asarray(x, np.float32)
    nan = np.isnan(x)
    if dtype == "F32":
        b = x.view(np.uint32).copy()
        b[nan] = 0x7FC00000
        return b
    if dtype == "F16":
        with np.errstate(over="ignore"):
            b = x.astype(np.float16).view(np.uint16).copy()
        b[nan] = 0x7E00
        return b
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r[nan] = 0x7FC0
    return r


def rc(dtype, x):
    """Round float32 values to `dtype` (kept as float32); NaN stays NaN."""
    x = np.asarray(x, np.float32)
    if dtype == "F32":
        return x
    nan = np.isnan(x)
    if dtype == "F16":
        with np.errstate(over="ignore"):
            r = x.astype(np.float16).astype(np.float32)
    else:
        u = x.view(np.uint32).astype(np.uint64)
        r = ((((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16) & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    return np.where(nan, x, r).astype(np.float32)


def rs(dtype, v):
    """Round one Python float to `dtype` via float32, as a float32 scalar."""
    return rc(dtype, np.array([v], np.float32))[0]


def mag_key(dtype, x):
    """Magnitude key: |x|'s bits in `dtype`; every NaN the largest key."""
    nan = np.isnan(x)
    if dtype == "F32":
        k = x.view(np.uint32) & np.uint32(0x7FFFFFFF)
        k = k.astype(np.int64)
        k[nan] = 0x7FFFFFFF
    elif dtype == "BF16":
        k = ((x.view(np.uint32) >> 16) & 0x7FFF).astype(np.int64)
        k[nan] = 0x7FFF
    else:
        k = (x.astype(np.float16).view(np.uint16) & 0x7FFF).astype(np.int64)
        k[nan] = 0x7FFF
    return k


# ------------------------------------------------------------ fixed-order sums


def block_sums(summands, block):
    """Per-block lane sums (see stats.rs): 16 lanes sequential in f64 from +0, folded by halving."""
    s = np.asarray(summands, np.float64)
    n = s.size
    if n == 0:
        return np.zeros(0)
    nb = -(-n // block)
    per = -(-block // LANES) * LANES
    pad = np.zeros((nb, per))
    for b in range(nb):
        seg = s[b * block:(b + 1) * block]
        pad[b, :seg.size] = seg
    pad = pad.reshape(nb, per // LANES, LANES)
    acc = np.zeros((nb, LANES))
    for r in range(per // LANES):
        acc = acc + pad[:, r, :]
    h = LANES // 2
    while h:
        acc = acc[:, :h] + acc[:, h:2 * h]
        h //= 2
    return acc[:, 0]


def tree(blocks):
    v = list(np.asarray(blocks, np.float64))
    if not v:
        return 0.0
    m = 1
    while m < len(v):
        m *= 2
    v += [0.0] * (m - len(v))
    v = np.array(v)
    while v.size > 1:
        v = v[0::2] + v[1::2]
    return float(v[0])


def total(summands, block=BLOCK):
    return tree(block_sums(summands, block))


# ------------------------------------------- torch's reductions
# model_stock takes torch's one-thread `sum` and `norm` (ATen's cascade sum and last-dimension
# norm kernel; see src/kernel/torch_order.rs), written here from that description with numpy:
# `np.add.accumulate` adds strictly in order, in float32. `half`: the tensor is bfloat16 or
# float16 (given as float32 values): 16-element vectors, whose halves the sum adds first.


def seq_f32(rows):
    """Sequential float32 sum from +0.0 down axis 0 of `rows` (one result per column)."""
    rows = np.asarray(rows, np.float32)
    zero = np.zeros((1,) + rows.shape[1:], np.float32)
    return np.add.accumulate(np.concatenate([zero, rows]), axis=0)[-1]


def torch_sum(x, half=False):
    x = np.asarray(x, np.float32).reshape(-1)
    n = x.size
    full = 16 if half else 8
    vl, w = (full, 8) if n >= full else (1, 1)
    vecs = n // vl
    if half and w == 8:
        pv = x[: vecs * 16].reshape(vecs, 2, 8)
        lanes = (pv[:, 0, :] + pv[:, 1, :]).astype(F32)
    else:
        lanes = x[: vecs * vl].reshape(vecs, w)
    rows = vecs // 4
    rl = 4 * w
    p = max(4, (0 if rows <= 1 else int(rows - 1).bit_length()) // 4)
    step = 1 << p
    acc = np.zeros((4, rl), np.float32)
    full_steps = rows // step
    r = lanes[: rows * 4].reshape(rows, rl)
    for b in range(full_steps):
        acc[0] = seq_f32(r[b * step : (b + 1) * step])
        i = (b + 1) * step
        for j in range(1, 4):
            acc[j] = acc[j] + acc[j - 1]
            acc[j - 1] = 0
            if i & ((step - 1) << (j * p)):
                break
    acc[0] = acc[0] + seq_f32(r[full_steps * step :])
    for j in range(1, 4):
        acc[0] = acc[0] + acc[j]
    ps = acc[0]
    for v in range(rows * 4, vecs):
        ps[:w] = ps[:w] + lanes[v]
    for k in range(1, 4):
        ps[:w] = ps[:w] + ps[k * w : (k + 1) * w]
    if w == 1:
        return F32(ps[0])
    t = F32(0)
    for e in x[vecs * vl :]:
        t = F32(t + e)
    for lane in ps[:w]:
        t = F32(t + lane)
    return t


def torch_norm2(x, half=False, f16=False):
    """Σx² as torch.norm accumulates it (its float32 square root is the norm). A float16
    tensor (`f16`) takes ATen's generic reduction: one accumulator, element by element."""
    x = np.asarray(x, np.float32).reshape(-1)
    if f16:
        return F32(seq_f32((x * x).astype(np.float32)))
    m = x.size - x.size % (16 if half else 8)
    v = x[:m].reshape(-1, 8)
    lanes = seq_f32((v * v).astype(np.float32)) if m else np.zeros(8, np.float32)
    s = lanes[0]
    for lane in lanes[1:]:
        s = F32(s + lane)
    r = x.size - m
    for i, e in enumerate(x[m:]):
        s = F32(s + F32(e * e)) if i < r // 4 * 4 else fma_f32(e, e, s)
    return F32(s)


def fma_f32(a, b, c):
    """float32 fma(a, b, c), correctly rounded: a·b is exact in float64, the float64 sum is
    made round-to-odd (TwoSum's error nudges an inexact even result), which float32's
    round-to-nearest-even then rounds correctly."""
    p = float(a) * float(b)
    c = float(c)
    t = p + c
    if math.isfinite(t):
        bp = t - c
        err = (p - bp) + (c - (t - bp))
        if err != 0 and (np.float64(t).view(np.uint64) & 1) == 0:
            t = float(np.nextafter(t, math.inf if err > 0 else -math.inf))
    return F32(t)


# ------------------------------------------------------------------- BLAKE3

_IV = [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19]
_PERM = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8]
M32 = 0xFFFFFFFF


def _g(s, a, b, c, d, x, y):
    s[a] = (s[a] + s[b] + x) & M32
    s[d] = ((s[d] ^ s[a]) >> 16 | (s[d] ^ s[a]) << 16) & M32
    s[c] = (s[c] + s[d]) & M32
    s[b] = ((s[b] ^ s[c]) >> 12 | (s[b] ^ s[c]) << 20) & M32
    s[a] = (s[a] + s[b] + y) & M32
    s[d] = ((s[d] ^ s[a]) >> 8 | (s[d] ^ s[a]) << 24) & M32
    s[c] = (s[c] + s[d]) & M32
    s[b] = ((s[b] ^ s[c]) >> 7 | (s[b] ^ s[c]) << 25) & M32


def _compress(cv, block, blen, flags):
    m = list(struct.unpack("<16I", block))
    s = list(cv) + _IV[:4] + [0, 0, blen, flags]
    for r in range(7):
        _g(s, 0, 4, 8, 12, m[0], m[1]); _g(s, 1, 5, 9, 13, m[2], m[3])
        _g(s, 2, 6, 10, 14, m[4], m[5]); _g(s, 3, 7, 11, 15, m[6], m[7])
        _g(s, 0, 5, 10, 15, m[8], m[9]); _g(s, 1, 6, 11, 12, m[10], m[11])
        _g(s, 2, 7, 8, 13, m[12], m[13]); _g(s, 3, 4, 9, 14, m[14], m[15])
        if r < 6:
            m = [m[i] for i in _PERM]
    return [s[i] ^ s[i + 8] for i in range(8)]


def blake3_short(data):
    """BLAKE3 hash (first 32 bytes) of a message of at most 1024 bytes (one chunk)."""
    if len(data) > 1024:
        raise ValueError("blake3_short handles messages of at most 1024 bytes")
    blocks = [data[i:i + 64] for i in range(0, len(data), 64)] or [b""]
    cv = list(_IV)
    for i, b in enumerate(blocks):
        flags = (1 if i == 0 else 0) | (2 | 8 if i == len(blocks) - 1 else 0)
        cv = _compress(cv, b.ljust(64, b"\0"), len(b), flags)
    return struct.pack("<8I", *cv)


# ------------------------------------------------------------------- Philox


def tensor_key(seed, name):
    h = blake3_short(b"mergestream rng v1\0" + struct.pack("<Q", seed) + name.encode())
    return struct.unpack("<2I", h[:8])


def philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 over uint64 arrays holding 32-bit words."""
    m = np.uint64(M32)
    x = [np.asarray(v, np.uint64) & m for v in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for r in range(10):
        if r:
            k0 = (k0 + np.uint64(0x9E3779B9)) & m
            k1 = (k1 + np.uint64(0xBB67AE85)) & m
        p0 = x[0] * np.uint64(0xD2511F53)
        p1 = x[2] * np.uint64(0xCD9E8D57)
        x = [((p1 >> np.uint64(32)) ^ x[1] ^ k0) & m, p1 & m, ((p0 >> np.uint64(32)) ^ x[3] ^ k1) & m, p0 & m]
    return x


def uniforms(key, model, purpose, n):
    i = np.arange(n, dtype=np.uint64)
    blk = i >> np.uint64(2)
    w = philox(blk & np.uint64(M32), blk >> np.uint64(32), np.full(n, model, np.uint64), np.full(n, purpose, np.uint64), *key)
    word = np.choose((i & np.uint64(3)).astype(np.int64), w)
    return ((word >> np.uint64(8)).astype(np.float32) * np.float32(2.0 ** -24)).astype(np.float32)


# -------------------------------------------------------------- acos / sin

PIO2_HI = 1.57079632679489655800e+00
PIO2_LO = 6.12323399573676603587e-17
PS = [1.66666666666666657415e-01, -3.25565818622400915405e-01, 2.01212532134862925881e-01,
      -4.00555345006794114027e-02, 7.91534994289814532176e-04, 3.47933107596021167570e-05]
QS = [-2.40339491173441421878e+00, 2.02094576023350569471e+00, -6.88283971605453293030e-01,
      7.70381505559019352791e-02]
P1 = 1.57079632673412561417e+00
P1T = 6.07710050650619224932e-11
FRAC_2_PI = 6.36619772367581382433e-01
SC = [-1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04,
      2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10]
CC = [4.16666666666666019037e-02, -1.38888888888741095749e-03, 2.48015872894767294178e-05,
      -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11]


def _r(z):
    p = z * (PS[0] + z * (PS[1] + z * (PS[2] + z * (PS[3] + z * (PS[4] + z * PS[5])))))
    q = 1.0 + z * (QS[0] + z * (QS[1] + z * (QS[2] + z * QS[3])))
    return p / q


def det_acos(x):
    if math.isnan(x) or abs(x) > 1.0:
        return math.nan
    if x == 1.0:
        return 0.0
    if x == -1.0:
        return 2.0 * PIO2_HI
    if abs(x) < 0.5:
        if abs(x) <= 2.0 ** -57:
            return PIO2_HI
        return PIO2_HI - (x - (PIO2_LO - x * _r(x * x)))
    if x < 0.0:
        z = (1.0 + x) * 0.5
        s = math.sqrt(z)
        w = _r(z) * s - PIO2_LO
        return 2.0 * (PIO2_HI - (s + w))
    z = (1.0 - x) * 0.5
    s = math.sqrt(z)
    df = struct.unpack("<d", struct.pack("<Q", struct.unpack("<Q", struct.pack("<d", s))[0] & 0xFFFFFFFF00000000))[0]
    c = (z - df * df) / (s + df)
    w = _r(z) * s + c
    return 2.0 * (df + w)


def _ksin(x):
    z = x * x
    return x + x * z * (SC[0] + z * (SC[1] + z * (SC[2] + z * (SC[3] + z * (SC[4] + z * SC[5])))))


def _kcos(x):
    z = x * x
    return 1.0 - 0.5 * z + z * z * (CC[0] + z * (CC[1] + z * (CC[2] + z * (CC[3] + z * (CC[4] + z * CC[5])))))


def det_sin(x):
    if not math.isfinite(x):
        return math.nan
    if abs(x) <= 0.7853981633974483:
        return _ksin(x)
    n = math.floor(x * FRAC_2_PI + 0.5)
    y = (x - n * P1) - n * P1T
    q = int(n) & 3
    return [_ksin(y), _kcos(y), -_ksin(y), -_kcos(y)][q]


# ------------------------------------------------------------------ methods

SPARSIFY = {"ties": "magnitude", "dare_linear": "random", "dare_ties": "random",
            "breadcrumbs": "outliers", "breadcrumbs_ties": "outliers",
            "della": "della", "della_linear": "della"}
CONSENSUS = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
DEFAULT_NORMALIZE = {"ties", "della"}
DEFAULT_RESCALE = {"dare_linear", "dare_ties", "della", "della_linear"}
F32 = np.float32


def keep_first(order_idx, n, count):
    keep = np.zeros(n, bool)
    keep[order_idx[:count]] = True
    return keep


def desc_order(keys):
    return np.argsort(-keys, kind="stable")


def asc_order(keys):
    return np.argsort(keys, kind="stable")


def della_keep(c, w, delta, shape, lo, eps, u):
    n = delta.size
    row = 1 if len(shape) == 0 else (shape[0] if len(shape) == 1 else shape[1])
    keep = np.zeros(n, bool)
    for r0 in range(0, n, row):
        x = delta[r0:r0 + row]
        m = x.size
        order = asc_order(mag_key(c, x))
        rank0 = np.empty(m, np.int64)
        rank0[order] = np.arange(m)
        rn = (rank0.astype(np.float64) / (m - 1)).astype(F32) if m > 1 else np.zeros(m, F32)
        p = rc(w, F32(lo) + (rn * F32(2.0)) * F32(eps))
        keep[r0:r0 + row] = u[r0:r0 + row] < p
    return keep


def sparsify(kind, c, w, delta, shape, ip, rescale, key, k):
    """One model's sparsified task vector, in the compute dtype."""
    n = delta.size
    d = ip.get("density", 1.0)
    if d >= 1.0:
        return delta
    if kind == "magnitude":
        if d <= 0.0 or n == 0:
            return np.zeros(n, F32)
        keep = keep_first(desc_order(mag_key(c, delta)), n, max(1, int(d * n)))
        wd, block = c, BLOCK
    elif kind == "outliers":
        target = int(d * n)
        n_top = int(ip.get("gamma", 0.01) * n)
        n_bot = max(0, n - target - n_top)
        order = asc_order(mag_key(c, delta))
        keep = np.zeros(n, bool)
        keep[order[n_bot:n_bot + target]] = True
        wd, block = c, BLOCK
    elif kind == "random":
        p = rs(w, d)
        keep = uniforms(key, k, 0, n) < p
        wd, block = w, BLOCK
    else:
        if d <= 0.0:
            return np.zeros(n, F32)
        eps = ip.get("epsilon", 0.15)
        keep = della_keep(c, w, delta, shape, F32(d - eps), F32(eps), uniforms(key, k, 1, n))
        wd = w
        block = 1 if len(shape) == 0 else (shape[0] if len(shape) == 1 else shape[1])
    masked = (delta * np.where(keep, F32(1), F32(0))).astype(F32)
    if not rescale:
        return masked
    before = rs(wd, F32(total(np.abs(delta).astype(np.float64), block)))
    after = rs(wd, F32(total(np.abs(masked).astype(np.float64), block)))
    e = rs(wd, 1e-7)
    if before < e or after < e:
        return masked
    ratio = rs(wd, before / after)
    return rc(c, rc(wd, masked * ratio))


def seq_sum(c, arrays):
    acc = np.zeros_like(arrays[0], dtype=F32)
    for a in arrays:
        acc = (acc + a).astype(F32)
    return rc(c, acc)


def task_arithmetic(method, p, name, shape, c, vals):
    base, xs = vals[0], vals[1:]
    K = len(xs)
    ips = p["inputs"]
    assert len(ips) == K
    normalize = p.get("normalize")
    normalize = (method in DEFAULT_NORMALIZE) if normalize is None else normalize
    rescale = p.get("rescale")
    rescale = (method in DEFAULT_RESCALE) if rescale is None else rescale
    lam = p.get("lambda", 1.0)
    w = "BF16" if c == "BF16" else "F32"
    key = tensor_key(p.get("seed", 0), name)
    weights = [rs(c, ip["weight"]) for ip in ips]
    ds = []
    for k, (x, ip) in enumerate(zip(xs, ips)):
        delta = rc(c, x - base)
        s = sparsify(SPARSIFY[method], c, w, delta, shape, ip, rescale, key, k)
        ds.append(rc(c, s * weights[k]))
    if method in CONSENSUS:
        sw = seq_sum(c, ds)
        maj = np.where(sw >= 0, 1, -1)
        masks = [np.sign(np.nan_to_num(dk, nan=0.0)).astype(np.int64) == maj for dk in ds]
        mixed = seq_sum(c, [(dk * np.where(m, F32(1), F32(0))).astype(F32) for dk, m in zip(ds, masks)])
        div = seq_sum(c, [(wk * np.where(m, F32(1), F32(0))).astype(F32) for wk, m in zip(weights, masks)])
        div = np.where(div == 0, F32(1), div).astype(F32)
    else:
        mixed = seq_sum(c, ds)
        dv = seq_sum(c, [np.array([wk], F32) for wk in weights])[0]
        div = F32(1) if abs(dv) < rs(c, 1e-8) else dv
    with np.errstate(all="ignore"):
        if normalize:
            mixed = rc(c, mixed / div)
        if lam != 1.0:
            mixed = rc(c, mixed * F32(lam))
        return rc(c, base + mixed)


def slerp(p, name, shape, c, vals):
    a, b = vals
    t = F32(p.get("t", 0.5))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    saa, sbb, sab = total(a64 * a64), total(b64 * b64), total(a64 * b64)
    eps = F32(1e-8)

    def norm(s):
        n = F32(math.sqrt(s)) if s == s else F32(math.nan)
        return n if n > eps else F32(1.0)

    na, nb = norm(saa), norm(sbb)
    with np.errstate(all="ignore"):
        dot = F32(sab / (float(na) * float(nb)))
    if not math.isnan(dot):
        dot = F32(min(max(dot, F32(-1.0)), F32(1.0)))
    if abs(dot) > F32(0.9995):
        ca, cb = F32(F32(1.0) - t), t
    else:
        th = det_acos(float(dot))
        s = det_sin(th)
        ca = F32(det_sin((1.0 - float(t)) * th) / s) if s == s else F32(math.nan)
        cb = F32(det_sin(float(t) * th) / s) if s == s else F32(math.nan)
    with np.errstate(all="ignore"):
        return rc(c, (ca * a).astype(F32) + (cb * b).astype(F32))


def stock_t(c, ds, block):
    K = len(ds)
    half = c != "F32"
    norms = [rs(c, math.sqrt(float(torch_norm2(d, half, c == "F16")))) for d in ds]
    cos = []
    with np.errstate(all="ignore"):
        for i in range(K):
            for j in range(i + 1, K):
                npd = rs(c, norms[i] * norms[j])
                floor = rs(c, 1e-6)
                npd = floor if npd < floor else npd
                dot = rs(c, torch_sum(rc(c, ds[i] * ds[j]), half))
                x = rs(c, dot / npd)
                if not math.isnan(x):
                    x = F32(min(max(x, F32(-1)), F32(1)))
                cos.append(x)
        acc = F32(0)
        for x in cos:
            acc = F32(acc + x)
        ct = rs(c, acc / F32(len(cos)))
        den = rs(c, F32(1) + rs(c, F32(K - 1) * ct))
        if abs(den) < rs(c, 1e-6):
            return F32(0)
        return rs(c, rs(c, F32(K) * ct) / den)


def model_stock(p, name, shape, c, vals):
    w0, ws = vals[0], vals[1:]
    K = len(ws)
    ds = [rc(c, w - w0) for w in ws]
    n = w0.size
    row = (shape[-1] if shape else 1) if p.get("filter_wise") else max(n, 1)
    out = np.empty(n, F32)
    with np.errstate(all="ignore"):
        for r0 in range(0, n, row):
            sl = slice(r0, r0 + row)
            if p.get("filter_wise"):
                # One row is one block: its lane sum is the whole statistic.
                t = stock_t(c, [d[sl] for d in ds], row)
            elif r0 == 0:
                t = stock_t(c, ds, BLOCK)
            acc = rc(c, F32(0) + ws[0][sl])
            for x in ws[1:]:
                acc = rc(c, acc + x[sl])
            avg = rc(c, acc / F32(K))
            omt = rs(c, F32(1) - t)
            out[sl] = rc(c, rc(c, t * avg) + rc(c, omt * w0[sl]))
    return out


def merge_tensor(method, params, name, shape, compute, inputs, out_dtype=None):
    """inputs: [(dtype, bits array)] base first. Returns the output bits (uint16/uint32)."""
    out_dtype = out_dtype or compute
    vals = [rc(compute, bits_to_f32(dt, b).reshape(-1)) for dt, b in inputs]
    shape = list(shape)
    with np.errstate(all="ignore"):
        if method in SPARSIFY:
            r = task_arithmetic(method, params, name, shape, compute, vals)
        elif method == "slerp":
            r = slerp(params, name, shape, compute, vals)
        elif method == "model_stock":
            r = model_stock(params, name, shape, compute, vals)
        else:
            raise ValueError("unknown method %r" % method)
    return f32_to_bits(out_dtype, r)


# --------------------------------------------------------------- safetensors


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    body = data[8 + hlen:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        dt = info["dtype"]
        raw = body[a:b]
        if dt in ("BF16", "F16"):
            arr = np.frombuffer(raw, "<u2")
        elif dt == "F32":
            arr = np.frombuffer(raw, "<u4")
        else:
            arr = np.frombuffer(raw, np.uint8)
        out[name] = (dt, info["shape"], arr)
    return out


def write_safetensors(path, tensors):
    header, off, blobs = {}, 0, []
    for name, (dt, shape, arr) in tensors.items():
        raw = np.ascontiguousarray(arr).astype("<u2" if SIZE[dt] == 2 else "<u4").tobytes()
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.load(open(argv[1]))
    files = [read_safetensors(p) for p in spec["inputs"]]
    names = spec.get("tensors") or [n for n, (dt, _, _) in files[0].items() if dt in DTYPES]
    out = {}
    for name in names:
        ins = [(f[name][0], f[name][2]) for f in files]
        shape = files[0][name][1]
        params = dict(spec.get("params", {}))
        params.update(spec.get("per_tensor", {}).get(name, {}))
        odt = spec.get("out_dtype") or spec["compute"]
        out[name] = (odt, shape, merge_tensor(spec["method"], params, name, shape, spec["compute"], ins, odt))
    write_safetensors(argv[2], out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

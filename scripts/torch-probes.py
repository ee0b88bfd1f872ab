#!/usr/bin/env python3
"""The torch 2.15 behaviours docs/mergekit-methods.md relies on, each checked and printed.

Run with the python that has mergekit 0.1.5 and torch: /tmp/mkvenv/bin/python scripts/torch-probes.py
"""
import math

import numpy as np
import torch

bf = torch.bfloat16


def show(what, got, expect):
    print("%-70s %-28s %s" % (what, got, "ok" if got == expect else "UNEXPECTED (doc assumes %r)" % (expect,)))


# Sort stability: stable up to 16 elements (insertion sort), not above.
def stable(n, desc):
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 4, (n,), generator=g).float()
    i = torch.argsort(x, descending=desc)
    xs = x[i]
    same = xs[1:] == xs[:-1]
    return bool(((i[1:] > i[:-1]) | ~same).all())


show("argsort(descending) keeps index order among ties, n=16", stable(16, True), True)
show("argsort(descending) keeps index order among ties, n=5000", stable(5000, True), False)
show("sort(ascending) keeps index order among ties, n=5000", stable(5000, False), False)
x = torch.tensor([1.0, float("nan"), float("inf"), 0.0])
show("NaN sorts above +Inf (descending argsort first index)", int(torch.argsort(x, descending=True)[0]), 1)
# Sums over the models axis: sequential f32 from +0; bf16 accumulates in f32, rounds once.
show("f32 sum(dim=0) of [1, 1e8, -1e8] (sequential -> 0)", torch.tensor([[1.0], [1e8], [-1e8]]).sum(0).item(), 0.0)
show("f32 sum(dim=0) of [-0, -0] is +0", math.copysign(1, torch.tensor([[-0.0], [-0.0]]).sum(0).item()), 1.0)
show("bf16 sum(dim=0) of [1, 2^-8, 2^-8] (f32 acc -> 1.0078125)",
     torch.tensor([[1.0], [2**-8], [2**-8]]).to(bf).sum(0).float().item(), 1.0078125)
# Python scalars: to f32 for arithmetic; cast to the tensor dtype for comparisons.
y = torch.full((2,), 3.0, dtype=bf)
y *= 1 + 2**-8
show("bf16 *= (1+2^-8): scalar used as f32 (-> 3.015625)", y[0].float().item(), 3.015625)
y = torch.full((2,), 1 + 3 * 2**-23)
y *= 1 + 2**-24
show("f32 *= (1+2^-24): scalar rounded to f32 first", y[0].item() == 1 + 3 * 2**-23, True)
show("f32 tensor(f32(1e-8)) < 1e-8 (scalar cast to f32 -> False)",
     bool((torch.tensor([float(np.float32(1e-8))]) < 1e-8).item()), False)
show("f16 tensor(0) < 1e-8 (f16(1e-8) = 0 -> False)",
     bool((torch.tensor([0.0], dtype=torch.float16) < 1e-8).item()), False)
show("torch.tensor([1+2^-8+2^-30], bf16) rounds via f32 (-> 1.0)",
     torch.tensor([1 + 2**-8 + 2**-30], dtype=bf).float().item(), 1.0)
show("sign(NaN) is 0", torch.sign(torch.tensor([float("nan")])).item(), 0.0)
# SLERP reduces over the whole tensor, not per row.
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.merge_methods.slerp import slerp_merge_method  # noqa: E402

a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
(r,) = slerp_merge_method([TensorGroup.from_tensors([a, b], base_index=0)], parameters={"t": 0.5})
whole = math.sin(0.5 * math.acos(0.5)) / math.sin(math.acos(0.5))
show("slerp row 1 uses the whole-tensor angle (per-row would give 1.0)", round(r[1, 0].item(), 5), round(2 * whole, 5))
# torch's f32 acos/sin on one element are not correctly rounded.
rng = np.random.default_rng(0)
bad = sum(np.float32(torch.acos(torch.tensor([[v]])).item()) != np.float32(math.acos(float(v)))
          for v in rng.uniform(-1, 1, 2000).astype(np.float32))
print("%-70s %s" % ("torch f32 acos differs from the correctly rounded value", "%d / 2000" % bad))
# model_stock's float32 statistics: torch's one-thread float32 sum (cascade) and norm (8 lanes,
# then the tail rule), as src/kernel/torch_order.rs and the numpy reference reproduce them.
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))
from mergekit_methods_ref import seq_f32, torch_norm2, torch_sum  # noqa: E402

threads = torch.get_num_threads()
torch.set_num_threads(1)
rng = np.random.default_rng(1)
same_sum = same_norm = 0
for i in range(2000):
    n = int(rng.integers(0, 200)) if i < 1980 else int(rng.integers(200, 300_000))
    v = (rng.normal(0, 1, n) * np.exp(rng.normal(0, 3, n))).astype(np.float32)
    t = torch.from_numpy(v)
    same_sum += np.float32(t.sum().item()) == torch_sum(v)
    same_norm += np.float32(torch.norm(t).item()) == np.float32(math.sqrt(float(torch_norm2(v))))
show("one-thread f32 sum is the cascade order, of 2000 random vectors", int(same_sum), 2000)
show("f32 norm is the 8-lane order with its tail rule, of 2000", int(same_norm), 2000)
# 16-bit tensors: the sum adds each 16-element vector's halves first (cancelling sums, whose
# 16-bit result shows the float order); the bfloat16 norm has 8 lanes, the float16 norm one
# accumulator (long vectors of small values, whose 16-bit norms tell the two apart).
for dt, f16 in ((torch.bfloat16, False), (torch.float16, True)):
    same_sum = 0
    for i in range(300):
        n = int(rng.integers(1, 1500))
        half = (rng.normal(0, 1, n // 2) * np.exp(rng.normal(0, 2, n // 2))).astype(np.float32)
        half = torch.from_numpy(half).to(dt).float().numpy()
        v = np.concatenate([half, -half, rng.normal(0, 1, n - 2 * (n // 2)).astype(np.float32)])
        v = v + rng.normal(0, 1e-3, n).astype(np.float32)
        rng.shuffle(v)
        t = torch.from_numpy(v.astype(np.float32)).to(dt)
        model = torch.tensor(float(torch_sum(t.float().numpy(), True))).to(dt)
        same_sum += bool(t.sum() == model) or bool(t.sum().isnan() and model.isnan())
    show("%s sum: vector halves added first, of 300 cancelling vectors" % dt, same_sum, 300)
    fits = []
    for i in range(12):
        n = 1_000_000 + 77_777 * i
        v = rng.uniform(-0.5, 0.5, n) * np.exp2(rng.integers(0, 40, n) - 26.0)  # many binades
        t = torch.from_numpy((np.clip(v, -0.5, 0.5) * 0.004).astype(np.float32)).to(dt)
        x = t.float().numpy()
        one = torch.tensor(math.sqrt(float(seq_f32((x * x).astype(np.float32))))).to(dt)
        eight = torch.tensor(math.sqrt(float(torch_norm2(x, True)))).to(dt)
        if one != eight:
            fits.append("one" if torch.norm(t) == one else "eight" if torch.norm(t) == eight else "neither")
    show("%s norm: accumulators, where one and eight differ" % dt, sorted(set(fits)),
         ["one"] if f16 else ["eight"])
torch.set_num_threads(2)
v = rng.normal(0, 1, 1 << 20).astype(np.float32)
show("a whole-tensor f32 sum with 2 threads differs from 1 thread's (some vector)",
     any(np.float32(torch.from_numpy(w).sum().item()) != torch_sum(w)
         for w in (rng.normal(0, 1, 1 << 20).astype(np.float32) for _ in range(8))), True)
torch.set_num_threads(threads)
# torch's float32 acos on CPU is MKL VML's (vsAcos in libtorch_cpu), dispatched by MKL on the
# CPU: its bits follow MKL's instruction set, so they differ between AVX2 and AVX-512 machines.
import subprocess  # noqa: E402

probe = ("import torch, numpy as np, hashlib; v = np.random.default_rng(0).uniform(-1, 1, 100000)"
         ".astype(np.float32); print(hashlib.md5(torch.acos(torch.from_numpy(v)).numpy().tobytes()).hexdigest())")
digests = {subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, **extra), capture_output=True,
                          text=True).stdout.strip() for extra in ({}, {"MKL_ENABLE_INSTRUCTIONS": "AVX2"})}
show("f32 acos bits change with MKL_ENABLE_INSTRUCTIONS=AVX2 (on an AVX-512 machine)", len(digests) == 2, True)
# mergekit's float32 slerp on one thread is torch's reductions (above) plus torch's acos/sin:
# a model from those pieces is bit-identical to it (what it cannot do without torch is acos).
from mergekit.merge_methods.slerp import slerp as mk_slerp  # noqa: E402

torch.set_num_threads(1)
C = 1 << 20


def slerp_model(a, b, t):
    def norm(v):
        return np.float32(math.sqrt(float(torch_norm2(v))))
    na = norm(np.array([norm(a[s:s + C]) for s in range(0, a.size, C)], np.float32))
    nb = norm(np.array([norm(b[s:s + C]) for s in range(0, b.size, C)], np.float32))
    na, nb = (na if na > np.float32(1e-8) else np.float32(1)), (nb if nb > np.float32(1e-8) else np.float32(1))
    parts = [torch_sum((a[s:s + C] / na).astype(np.float32) * (b[s:s + C] / nb).astype(np.float32))
             for s in range(0, a.size, C)]
    dot = min(max(torch_sum(np.array(parts, np.float32)), np.float32(-1)), np.float32(1))
    tt = torch.tensor([[t]], dtype=torch.float32)
    th = torch.acos(torch.tensor([[float(dot)]]))
    ca, cb = torch.sin((1 - tt) * th) / torch.sin(th), torch.sin(tt * th) / torch.sin(th)
    return (ca * torch.from_numpy(a) + cb * torch.from_numpy(b)).numpy().reshape(-1)


same = 0
for n in (1000, 3 * C + 12345):
    a = rng.normal(0, 0.02, n).astype(np.float32)
    b = (a + rng.normal(0, 0.002, n)).astype(np.float32)
    want = mk_slerp(torch.tensor([0.5]), torch.from_numpy(a).reshape(1, -1), torch.from_numpy(b).reshape(1, -1))
    same += bool((want.reshape(-1).numpy().view(np.uint32) == slerp_model(a, b, 0.5).view(np.uint32)).all())
show("mergekit f32 slerp (1 thread) = torch-order sums + torch acos/sin, of 2 tensors", same, 2)
torch.set_num_threads(threads)

#!/usr/bin/env python3
"""Byte-for-byte comparison of mergekit 0.1.5 itself with the numpy reference of its
arithmetic (tests/python/mergekit_ref.py), and optionally with other engines.

It generates Llama-shaped model sets (2, 3 and 8 models plus a base; BF16, F16, F32 and
mixed storage; NaN/Inf/subnormal/zero values sprinkled in), writes `linear` and
`task_arithmetic` configs that use scalar weights, negative weights, layer gradients and
name filters, normalize on and off, lambda, `dtype` and `out_dtype`; runs `mergekit-yaml`
on each, computes the same merge with the numpy reference (weights resolved from the YAML
by this script's own small resolver, not by mergekit), and compares every output tensor
byte for byte. Extra engines are added with `--engine NAME=TEMPLATE`, where TEMPLATE is a
command line with `{config}` and `{out}` placeholders; their outputs are compared with
mergekit's and the reference's the same way. `--mergestream BIN` adds mergestream itself:
`BIN merge CONFIG --out OUT` as an engine column, `BIN merge CONFIG --check MERGEKIT_OUT`
on every merge (mergestream's own audit of mergekit's output: exit 0 means identical), and
a "vocab" category: models whose vocabularies differ, merged by mergekit with
`--unsafe-truncate-embeddings` (the rows all models have) and by mergestream with
`--vocab-mismatch copy-base` (those rows, then the base model's extra rows): the shared rows
and every other tensor must be identical, the extra rows the base model's.

Sets whose tensors have element counts that are multiples of 64 ("aligned", what real
checkpoints have) must be 100 % identical. The "ragged" sets (odd widths) expose torch's
scalar loop tails, where torch writes NaNs with an encoding that depends on the position
and on the number of torch threads; there, differences are allowed only if both sides are
NaN (they are reported as `nan-encoding`). Any other difference fails the run.

What it deliberately does not do: install anything (see scripts/mergekit-compare.sh), time
anything, or test YAML features beyond what the arithmetic needs.

Usage (inside a venv with mergekit==0.1.5, numpy):
    mergekit-compare.py [--work DIR] [--quick] [--engine NAME=TEMPLATE ...] [--threads N]
                        [--mergestream target/release/mergestream]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "python"))
import mergekit_ref as mr  # noqa: E402

# ------------------------------------------------------------------ model generation

ALIGNED = dict(hidden=128, inter=320, layers=4, vocab=256, heads=4, kv_heads=2)
RAGGED = dict(hidden=40, inter=100, layers=3, vocab=333, heads=4, kv_heads=2)


def tensor_shapes(arch: dict) -> List[Tuple[str, Tuple[int, ...]]]:
    h, i, v = arch["hidden"], arch["inter"], arch["vocab"]
    kv = h // arch["heads"] * arch["kv_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for l in range(arch["layers"]):
        p = f"model.layers.{l}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


SPECIALS_F32 = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFA12345, 0x7FFFFFFF,
                         0x7F800000, 0xFF800000, 0x00000000, 0x80000000, 0x00000001,
                         0x80000010, 0x00400000, 0x7F7FFFFF], dtype=np.uint32)


def make_values(rng: np.random.Generator, base: Optional[np.ndarray], shape, norm: bool,
                specials: float) -> np.ndarray:
    """f32 bits: a base-like tensor, or base plus a small task vector."""
    n = int(np.prod(shape))
    if base is None:
        v = (1.0 + 0.1 * rng.standard_normal(n)) if norm else 0.02 * rng.standard_normal(n)
        v = v.astype(np.float32)
    else:
        with np.errstate(all="ignore"):  # the base's NaN/Inf carry over
            v = (base.view(np.float32) + 0.002 * rng.standard_normal(n)).astype(np.float32)
    bits = v.view(np.uint32).copy()
    m = rng.random(n) < specials
    bits[m] = rng.choice(SPECIALS_F32, int(m.sum()))
    m = rng.random(n) < specials  # values that are subnormal in BF16/F16/F32
    bits[m] = rng.integers(0, 0x04000000, int(m.sum())).astype(np.uint32) | (
        rng.integers(0, 2, int(m.sum())).astype(np.uint32) << 31)
    return bits


def write_model(path: Path, arch: dict, tensors: Dict[str, np.ndarray], dtype: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    shapes = dict(tensor_shapes(arch))
    out = []
    for name, bits in tensors.items():
        if dtype == "bfloat16":
            b = (bits >> np.uint32(16)).astype(np.uint16)  # truncation keeps NaN payloads
        else:
            b = mr.narrow(bits, dtype)
        out.append((name, np.asarray(b).reshape(shapes[name]), dtype))
    mr._write_safetensors(str(path / "model.safetensors"), out)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": arch["hidden"], "intermediate_size": arch["inter"],
        "num_hidden_layers": arch["layers"], "num_attention_heads": arch["heads"],
        "num_key_value_heads": arch["kv_heads"], "vocab_size": arch["vocab"],
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": dtype,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))


def make_set(root: Path, name: str, arch: dict, dtypes: Sequence[str], seed: int,
             specials: float) -> List[Path]:
    """A base and len(dtypes) - 1 fine-tunes of it; model i stored as dtypes[i]."""
    rng = np.random.default_rng(seed)
    base: Dict[str, np.ndarray] = {}
    paths = []
    for i, dtype in enumerate(dtypes):
        tensors = {}
        for tname, shape in tensor_shapes(arch):
            norm = tname.endswith("norm.weight")
            tensors[tname] = make_values(rng, base.get(tname), shape, norm, specials)
        if i == 0:
            base = tensors
        p = root / name / f"m{i}"
        write_model(p, arch, tensors, dtype)
        paths.append(p)
    return paths


# ------------------------------------------------------------- configs and weights

def yaml_value(v) -> str:
    return json.dumps(v)  # JSON scalars/lists/objects are valid YAML flow style


def resolve(setting, tensor_name: str, t: float) -> Optional[float]:
    """mergekit's documented resolution of one parameter setting for one tensor: a
    number; a list of numbers (a gradient, interpolated linearly at t); or a list of
    {filter, value} taking the first entry whose filter is absent, "*", or a substring
    of the tensor name. Written from the documented behaviour, not mergekit's code."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return float(setting)
    if isinstance(setting, list) and setting and all(
            isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        vals = [float(e) for e in setting]
        scaled = t * (len(vals) - 1)
        i0 = int(scaled)
        i1 = min(len(vals) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * vals[i0] + frac * vals[i1]
    if isinstance(setting, list):
        for cond in setting:
            f = cond.get("filter")
            if f is None or f == "*" or f in tensor_name:
                return resolve(cond["value"], tensor_name, t)
        return None
    raise ValueError(f"unsupported setting {setting!r}")


def layer_t(tensor_name: str, layers: int) -> float:
    """The gradient position mergekit uses: layer i of L at i / (L - 1) (1 if L == 1);
    embeddings, final norm and lm_head at 0."""
    parts = tensor_name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        i = int(parts[2])
        return i / (layers - 1) if layers > 1 else 1.0
    return 0.0


class Merge:
    """One mergekit config and everything needed to compute it independently."""

    def __init__(self, name: str, method: str, models: List[Path], weights: List,
                 base: Optional[Path] = None, dtype: Optional[str] = None,
                 out_dtype: Optional[str] = None, normalize: Optional[bool] = None,
                 lam: Optional[float] = None, arch: dict = ALIGNED, truncate: bool = False):
        self.name, self.method, self.models, self.weights = name, method, models, weights
        self.base, self.dtype, self.out_dtype = base, dtype, out_dtype
        self.normalize, self.lam, self.arch = normalize, lam, arch
        # vocabularies differ: the reference merges the rows all models have
        self.truncate = truncate

    def yaml(self) -> str:
        lines = ["models:"]
        for m, w in zip(self.models, self.weights):
            lines += [f"  - model: {m}", "    parameters:", f"      weight: {yaml_value(w)}"]
        lines.append(f"merge_method: {self.method}")
        if self.base is not None:
            lines.append(f"base_model: {self.base}")
        params = {}
        if self.normalize is not None:
            params["normalize"] = self.normalize
        if self.lam is not None:
            params["lambda"] = self.lam
        if params:
            lines.append("parameters:")
            lines += [f"  {k}: {yaml_value(v)}" for k, v in params.items()]
        if self.dtype:
            lines.append(f"dtype: {self.dtype}")
        if self.out_dtype:
            lines.append(f"out_dtype: {self.out_dtype}")
        return "\n".join(lines) + "\n"

    def reference(self) -> Dict[str, Tuple[np.ndarray, str]]:
        models = [mr._read_safetensors(str(m / "model.safetensors"))[0] for m in self.models]
        base = mr._read_safetensors(str(self.base / "model.safetensors"))[0] if self.base else None
        normalize = self.normalize if self.normalize is not None else self.method == "linear"
        out = {}
        for tname, _shape in tensor_shapes(self.arch):
            t = layer_t(tname, self.arch["layers"])
            w = [resolve(s, tname, t) for s in self.weights]
            ts = [(m[tname][0], m[tname][1]) for m in models]
            b = (base[tname][0], base[tname][1]) if base else None
            if self.truncate:
                rows = min(t.shape[0] for t, _ in ts + ([b] if b else []))
                ts = [(t[:rows], d) for t, d in ts]
                b = (b[0][:rows], b[1]) if b else None
            if self.method == "linear":
                out[tname] = mr.linear(ts, w, normalize=normalize, compute=self.dtype,
                                       out_dtype=self.out_dtype)
            else:
                out[tname] = mr.task_arithmetic(
                    b, ts, w, normalize=normalize,
                    lam=1.0 if self.lam is None else self.lam, compute=self.dtype,
                    out_dtype=self.out_dtype)
        return out


# ------------------------------------------------------------------ engines, compare

Output = Dict[str, Tuple[np.ndarray, str]]


def read_output_dir(d: Path) -> Output:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        for name, (bits, dt, _shape) in mr._read_safetensors(str(f))[0].items():
            out[name] = (bits, dt)
    return out


def run_engine(template: str, config: Path, out: Path, threads: Optional[int]) -> float:
    """Runs one engine: `template` with {config}, {out} (and {threads}) substituted.
    Returns the wall time; raises if the command fails."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = template.format(config=shlex.quote(str(config)), out=shlex.quote(str(out)),
                          threads=threads or os.cpu_count() or 1)
    t0 = time.monotonic()
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"`{cmd}` failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return time.monotonic() - t0


def compare(a: Output, b: Output) -> dict:
    """Tensor-by-tensor, element-by-element comparison of two outputs."""
    res = dict(tensors=0, identical_tensors=0, elements=0, identical_elements=0,
               bytes=0, nan_elements=0, nan_encoding=0, value=0, missing=0, first=None)
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            res["missing"] += 1
            res["first"] = res["first"] or f"{name}: only in one output"
            continue
        (x, dx), (y, dy) = a[name], b[name]
        res["tensors"] += 1
        if dx != dy or x.shape != y.shape:
            res["value"] += x.size
            res["first"] = res["first"] or f"{name}: {dx}{x.shape} vs {dy}{y.shape}"
            continue
        x, y = x.reshape(-1), y.reshape(-1)
        res["elements"] += x.size
        res["nan_elements"] += int(np.isnan(mr.widen(x, dx).view(np.float32)).sum())
        res["bytes"] += x.nbytes
        diff = np.nonzero(x != y)[0]
        res["identical_elements"] += x.size - diff.size
        if diff.size == 0:
            res["identical_tensors"] += 1
            continue
        xn = np.isnan(mr.widen(x[diff], dx).view(np.float32))
        yn = np.isnan(mr.widen(y[diff], dy).view(np.float32))
        both = xn & yn
        res["nan_encoding"] += int(both.sum())
        res["value"] += int((~both).sum())
        i = diff[0]
        res["first"] = res["first"] or (
            f"{name}[{i}]: {x[i]:#x} vs {y[i]:#x} ({int(both.sum())} NaN-encoding, "
            f"{int((~both).sum())} value differences)")
    return res


def make_vocab_set(root: Path, name: str, vocabs: Sequence[int], dtype: str,
                   seed: int) -> List[Path]:
    """Models as make_set makes them, model i with vocabs[i] rows of embed_tokens and lm_head
    (the rows they share hold the same values a common vocabulary would)."""
    arch = dict(ALIGNED, vocab=max(vocabs))
    paths = make_set(root, name, arch, [dtype] * len(vocabs), seed, 0.002)
    for p, v in zip(paths, vocabs):
        tensors, _ = mr._read_safetensors(str(p / "model.safetensors"))
        out = []
        for tname, _shape in tensor_shapes(arch):
            bits, dt, _ = tensors[tname]
            if tname in ("model.embed_tokens.weight", "lm_head.weight"):
                bits = bits[:v]
            out.append((tname, bits, dt))
        mr._write_safetensors(str(p / "model.safetensors"), out)
        cfg = json.loads((p / "config.json").read_text())
        cfg["vocab_size"] = v
        (p / "config.json").write_text(json.dumps(cfg, indent=1))
    return paths


def build_merges(root: Path, quick: bool) -> List[Tuple[str, Merge]]:
    """(category, merge) pairs: 'aligned' must be byte-identical, 'ragged' may differ
    only in NaN encodings."""
    merges: List[Tuple[str, Merge]] = []
    grad3 = [0.2, 0.5, 0.3]
    filt = [{"filter": "self_attn", "value": 0.7}, {"filter": "mlp", "value": [0.1, 0.9]},
            {"value": 0.4}]
    ns = (3,) if quick else (2, 3, 8)
    stores = ("bfloat16",) if quick else ("bfloat16", "float16", "float32")
    seed = 1
    for store in stores:
        for n in ns:
            seed += 1
            models = make_set(root, f"{store}-{n}", ALIGNED, [store] * (n + 1), seed, 0.002)
            base, tuned = models[0], models[1:]
            w_mix = [[0.5, filt, grad3, 1.0, 0.25, filt, 0.6, -0.1][i] for i in range(n)]
            w_neg = [[1.2, -0.3, 0.35, -0.5, 0.8, 0.1, -0.25, 0.4][i] for i in range(n)]
            other = {"bfloat16": "float32", "float16": "bfloat16", "float32": "float16"}[store]
            tag = f"{store} x{n}"
            merges += [
                ("aligned", Merge(f"linear {tag} default", "linear", tuned, w_mix)),
                ("aligned", Merge(f"linear {tag} normalize=false dtype={other}", "linear",
                                  tuned, w_neg, normalize=False, dtype=other)),
                ("aligned", Merge(f"task_arithmetic {tag} default", "task_arithmetic",
                                  tuned, w_mix, base=base)),
                ("aligned", Merge(f"task_arithmetic {tag} normalize lambda=0.6 dtype=float32 "
                                  f"out_dtype={store}", "task_arithmetic", tuned, w_neg,
                                  base=base, normalize=True, lam=0.6, dtype="float32",
                                  out_dtype=store)),
            ]
    if not quick:
        mixed = make_set(root, "mixed-3", ALIGNED, ["bfloat16", "float16", "float32", "bfloat16"],
                         99, 0.002)
        merges += [
            ("aligned", Merge("linear mixed storage x3 (promoted to float32)", "linear",
                              mixed[1:], [0.3, filt, grad3])),
            ("aligned", Merge("task_arithmetic mixed storage x3 dtype=bfloat16 out_dtype=float16",
                              "task_arithmetic", mixed[1:], [0.5, -0.2, grad3], base=mixed[0],
                              normalize=True, dtype="bfloat16", out_dtype="float16")),
        ]
    ragged = make_set(root, "ragged-5", RAGGED, ["bfloat16"] + ["float16"] * 5, 123, 0.01)
    merges += [
        ("ragged", Merge("ragged linear x5 dtype=bfloat16", "linear", ragged[1:],
                         [0.3, -0.2, 0.5, grad3, filt], dtype="bfloat16", arch=RAGGED)),
        ("ragged", Merge("ragged task_arithmetic x5 (f32 compute, torch's interleaved tails)",
                         "task_arithmetic", ragged[1:], [0.3, -0.2, 0.5, grad3, filt],
                         base=ragged[0], normalize=True, lam=0.8, arch=RAGGED)),
        ("ragged", Merge("ragged task_arithmetic x5 dtype=bfloat16", "task_arithmetic",
                         ragged[1:], [0.3, 0.2, 0.5, grad3, filt], base=ragged[0],
                         dtype="bfloat16", arch=RAGGED)),
    ]
    return merges


def vocab_category(root: Path, mk_template: str, ms: str, threads: Optional[int],
                   totals: Dict[Tuple[str, str], dict]) -> int:
    """Vocabularies of different sizes: mergekit refuses them by default and, with
    --unsafe-truncate-embeddings, merges the rows all models have; mergestream with
    --vocab-mismatch copy-base merges the same rows and copies the base model's extra rows.
    Returns the number of failed checks."""
    failures = 0
    vocabs = [260, 256, 258, 256, 256, 257]  # base first: 4 more rows than the fewest
    merges = []
    for dtype in ("bfloat16", "float32"):
        paths = make_vocab_set(root / "models", f"vocab-{dtype}", vocabs, dtype, 7 + len(dtype))
        base, tuned = paths[0], paths[1:]
        merges += [
            Merge(f"vocab task_arithmetic {dtype} x5", "task_arithmetic", tuned,
                  [0.5, -0.2, [0.2, 0.5, 0.3], 0.3, 0.25], base=base, dtype="float32",
                  out_dtype=dtype, truncate=True),
            Merge(f"vocab linear {dtype} x6 (base first)", "linear", [base, *tuned],
                  [0.3, 0.2, 0.1, 0.2, 0.1, 0.1], dtype=dtype, truncate=True),
        ]
    embeds = ("model.embed_tokens.weight", "lm_head.weight")
    for k, merge in enumerate(merges):
        cfg = root / "configs" / f"vocab-{k:02d}.yml"
        cfg.write_text(merge.yaml())
        mk_out = root / "out" / "mergekit" / f"vocab-{k:02d}"
        ms_out = root / "out" / "mergestream" / f"vocab-{k:02d}"
        line = [f"[vocab] {merge.name}:"]
        try:
            run_engine(mk_template, cfg, mk_out, threads)
            line.append("mergekit without the flag: merged?! (expected a size-mismatch error)")
            failures += 1
        except RuntimeError as e:
            said = "size mismatch" in str(e).lower()
            line.append("mergekit without the flag: " + ("refused (size mismatch)" if said
                                                         else "failed otherwise"))
            failures += not said
        run_engine(mk_template + " --unsafe-truncate-embeddings", cfg, mk_out, threads)
        run_engine(f"{ms} merge {{config}} --out {{out}} --quiet --vocab-mismatch copy-base",
                   cfg, ms_out, threads)
        mk, ms_full = read_output_dir(mk_out), read_output_dir(ms_out)
        layout = mr._read_safetensors(str(merge.base or merge.models[0]) + "/model.safetensors")[0]
        ms_shared, extra_ok = {}, True
        for name, (bits, dt) in ms_full.items():
            if name in embeds:
                rows = mk[name][0].shape[0]
                ms_shared[name] = (bits[:rows], dt)
                want = layout[name][0][rows:]
                extra_ok &= bool(np.array_equal(bits[rows:], want)) and want.shape[0] == 4
            else:
                ms_shared[name] = (bits, dt)
        for a, b, other in (("mergekit", "reference", mk), ("mergestream", "mergekit", ms_shared)):
            r = compare(other, merge.reference() if b == "reference" else mk)
            tot = totals.setdefault(("vocab", f"{a} vs {b}"), dict(
                merges=0, tensors=0, identical_tensors=0, elements=0,
                identical_elements=0, bytes=0, nan_elements=0, nan_encoding=0, value=0,
                missing=0))
            tot["merges"] += 1
            for key in tot:
                if key != "merges":
                    tot[key] += r[key]
            bad = r["value"] or r["missing"] or r["nan_encoding"]
            failures += bool(bad)
            line.append(f"{a} vs {b} (shared rows): {r['identical_tensors']}/{r['tensors']} "
                        f"tensors identical" + (f", FAIL {r['first']}" if bad else ""))
        line.append("mergestream's extra rows: " + ("the base model's" if extra_ok else "FAIL"))
        failures += not extra_ok
        print("  ".join(line), flush=True)
    return failures


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None,
                    help="working directory (default: a new temporary directory, removed)")
    ap.add_argument("--quick", action="store_true", help="a small subset (BF16, 3 models)")
    ap.add_argument("--mergekit", default=None,
                    help="mergekit-yaml command (default: mergekit-yaml next to this python)")
    ap.add_argument("--engine", action="append", default=[], metavar="NAME=TEMPLATE",
                    help="another engine: a command with {config} and {out} (and {threads})")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for mergekit (-j); default: mergekit's default")
    ap.add_argument("--mergestream", default=None, metavar="BIN",
                    help="add mergestream (this binary): a `merge` column, `merge --check` of "
                         "mergekit's output, and the vocab category")
    args = ap.parse_args(argv)

    mk = args.mergekit or str(Path(sys.executable).with_name("mergekit-yaml"))
    mk_template = (f"{shlex.quote(mk)} {{config}} {{out}} --no-copy-tokenizer "
                   f"--no-write-model-card --quiet")
    if args.threads:
        mk_template += " -j {threads}"
    engines: Dict[str, str] = {"mergekit": mk_template}
    for e in args.engine:
        name, _, template = e.partition("=")
        if not template or "{config}" not in template or "{out}" not in template:
            ap.error(f"--engine {e!r}: expected NAME=TEMPLATE with {{config}} and {{out}}")
        engines[name] = template
    ms = args.mergestream
    if ms:
        ms = shlex.quote(str(Path(ms).resolve()))
        engines["mergestream"] = f"{ms} merge {{config}} --out {{out}} --quiet"

    tmp = None
    if args.work is None:
        import tempfile
        tmp = tempfile.TemporaryDirectory(prefix="mergekit-compare-")
        root = Path(tmp.name)
    else:
        root = args.work
        root.mkdir(parents=True, exist_ok=True)

    failures = 0
    totals: Dict[Tuple[str, str], dict] = {}
    merges = build_merges(root / "models", args.quick)
    checks = dict(merges=0, identical=0, failed=[])
    print(f"{len(merges)} merges; engines: {', '.join(engines)} vs the numpy reference",
          flush=True)
    for k, (category, merge) in enumerate(merges):
        cfg = root / "configs" / f"{k:02d}.yml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(merge.yaml())
        ref = merge.reference()
        outputs = {}
        for name, template in engines.items():
            out = root / "out" / name / f"{k:02d}"
            run_engine(template, cfg, out, args.threads)
            outputs[name] = read_output_dir(out)
        pairs = [(n, "reference") for n in engines] + [
            (n, "mergekit") for n in engines if n != "mergekit"]
        line = [f"[{category}] {merge.name}:"]
        for a, b in pairs:
            r = compare(outputs[a], ref if b == "reference" else outputs[b])
            tot = totals.setdefault((category, f"{a} vs {b}"), dict(
                merges=0, tensors=0, identical_tensors=0, elements=0,
                identical_elements=0, bytes=0, nan_elements=0, nan_encoding=0, value=0,
                missing=0))
            tot["merges"] += 1
            for key in tot:
                if key != "merges":
                    tot[key] += r[key]
            bad = r["value"] or r["missing"] or (category == "aligned" and r["nan_encoding"])
            failures += bool(bad)
            line.append(f"{a} vs {b}: {r['identical_tensors']}/{r['tensors']} tensors identical"
                        + (f", {r['nan_encoding']} NaN-encoding diffs" if r["nan_encoding"] else "")
                        + (f", FAIL {r['first']}" if bad else ""))
        if ms:
            # mergestream's audit of mergekit's output: exit 0 only if every tensor is
            # identical (expected for every aligned merge).
            r = subprocess.run(f"{ms} merge {shlex.quote(str(cfg))} --check "
                               f"{shlex.quote(str(root / 'out' / 'mergekit' / f'{k:02d}'))} --quiet",
                               shell=True, capture_output=True, text=True)
            checks["merges"] += 1
            if r.returncode == 0:
                checks["identical"] += 1
            else:
                checks["failed"].append(f"[{category}] {merge.name}: exit {r.returncode}: "
                                        + (r.stdout.strip().splitlines() or [r.stderr])[0])
                failures += category == "aligned"
            line.append("mergestream --check mergekit: "
                        + ("identical" if r.returncode == 0 else f"exit {r.returncode}"))
        print("  ".join(line), flush=True)

    if ms:
        failures += vocab_category(root, mk_template, ms, args.threads, totals)

    print("\nsummary")
    for (category, pair), t in sorted(totals.items()):
        pct = 100.0 * t["identical_elements"] / max(1, t["elements"])
        print(f"  {category:8s} {pair:24s} {t['merges']:3d} merges, {t['tensors']:5d} tensors, "
              f"{t['bytes'] / 1e6:8.2f} MB: {t['identical_tensors']}/{t['tensors']} tensors "
              f"and {pct:.4f} % of {t['elements']} elements ({t['nan_elements']} of them NaN) "
              f"byte-identical; NaN-encoding diffs {t['nan_encoding']}, other diffs "
              f"{t['value']}, missing {t['missing']}")
    if ms:
        print(f"  mergestream merge --check of mergekit's outputs: {checks['identical']} of "
              f"{checks['merges']} merges reported identical (exit 0)")
        for f in checks["failed"]:
            print(f"    {f}")
    print("RESULT:", "FAIL" if failures else "PASS")
    if tmp is not None:
        tmp.cleanup()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Measure how closely tools agree with mergekit 0.1.5 on the statistics-based methods.

For each method (ties, breadcrumbs, breadcrumbs_ties, slerp, model_stock; dare_* and della*
are run but their masks come from different generators, so no agreement is expected) this
script generates a 3-model set (a base and two fine-tunes: base + N(0, 0.002) noise on
N(0, 0.02) weights, Llama-shaped), writes a mergekit YAML, runs mergekit-yaml, and runs every
*candidate* on the same config. A candidate is a name and a command template with the
placeholders {config} (the YAML), {out} (an output directory to create, which must hold
model.safetensors), {spec} (a JSON for tests/python/mergekit_methods_ref.py) and {python}.
The default candidate is mergestream's numpy reference; add mergestream itself with e.g.
  --candidate 'mergestream=target/release/mergestream merge {config} --out {out}'

For every candidate it prints, per method and dtype: elements compared, the percentage
bit-identical to mergekit, the percentage within 1 ulp (of the output dtype), and, for the
magnitude-selection methods, the percentage identical outside threshold tie groups (elements
whose magnitude equals a model's selection threshold, where torch's argsort order is
unspecified and mergestream keeps lower indices first). NaN equals NaN.

It also times every command (wall seconds, and peak RSS measured by GNU time, the Debian
`time` package), mergekit included. A candidate that prints mergestream's `--json` summary (add `--json` to its
template) reports `bytes_read`, the input bytes its reduction passes and output pass read;
for it the script measures the **floor**: reading that many bytes of the method's input
files in 4 MiB reads (the files over and over, as the passes do) and writing an output file
of the same size with fsync, no arithmetic. `passes` is bytes_read / input bytes. Timings are
medians of --runs runs (the candidate and the floor interleaved; mergekit once).

Usage:
  /tmp/mkvenv/bin/python scripts/mergekit-agreement.py [--dir DIR] [--mergekit-yaml PATH]
      [--dtypes bfloat16,float32] [--methods ties,slerp,...] [--candidate NAME=TEMPLATE ...]
      [--shape HIDDEN,INTER,VOCAB,KV,LAYERS] [--runs N] [--no-reference] [--keep]
      [--json OUT.json]
The python running it needs numpy; mergekit-yaml defaults to /tmp/mkvenv/bin/mergekit-yaml.
"""
import argparse
import math
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from statistics import median

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))
import mergekit_methods_ref as ref  # noqa: E402

METHODS = ["ties", "breadcrumbs", "breadcrumbs_ties", "slerp", "model_stock",
           "dare_linear", "dare_ties", "della", "della_linear"]
# Not in the default run: model_stock with `filter_wise: true` (per-row cosines).
VARIANTS = {"model_stock_filter_wise": ("model_stock", {"filter_wise": True}),
            "ties_rescale": ("ties", {"rescale": True})}
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
SELECTING = {"ties": "desc", "breadcrumbs": "band", "breadcrumbs_ties": "band"}
ST = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}

MODEL_PARAMS = {
    "ties": [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.3}],
    "breadcrumbs": [{"weight": 1.0, "density": 0.8, "gamma": 0.05}, {"weight": 0.5, "density": 0.6, "gamma": 0.02}],
    "breadcrumbs_ties": [{"weight": 1.0, "density": 0.8, "gamma": 0.05}, {"weight": 0.5, "density": 0.6, "gamma": 0.02}],
    "dare_linear": [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.7}],
    "dare_ties": [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.7}],
    "della": [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"weight": 0.6, "density": 0.7, "epsilon": 0.2}],
    "della_linear": [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"weight": 0.6, "density": 0.7, "epsilon": 0.2}],
}
SLERP_T = 0.3


def shapes(h=256, inter=688, vocab=1000, kv=128, layers=2):
    s = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for layer in range(layers):
        p = "model.layers.%d." % layer
        s.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                  p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                  p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                  p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                  p + "post_attention_layernorm.weight": (h,)})
    return s, {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
               "intermediate_size": inter, "num_attention_heads": 4, "num_key_value_heads": 2,
               "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-5,
               "tie_word_embeddings": False, "max_position_embeddings": 256}


def make_models(root, st, seed, shape=None, shared=0.0):
    shp, cfg = shapes(*(shape or ()))
    rng = np.random.default_rng(seed)
    base = {k: rng.standard_normal(v, dtype=np.float32) * np.float32(0.02) for k, v in shp.items()}
    # With --shared-update S the fine-tunes' updates share a component (their cosine is about S).
    common = {k: rng.standard_normal(v, dtype=np.float32) for k, v in shp.items()} if shared else {}
    dirs = []
    for m in range(3):
        d = os.path.join(root, "%s-m%d" % (st, m))
        os.makedirs(d, exist_ok=True)
        tensors = {}
        for k, v in base.items():
            if m == 0:
                x = v
            elif shared:
                own = rng.standard_normal(v.shape, dtype=np.float32)
                x = v + (np.float32(math.sqrt(shared)) * common[k] + np.float32(math.sqrt(1 - shared)) * own) * np.float32(0.002)
            else:
                x = v + rng.standard_normal(v.shape, dtype=np.float32) * np.float32(0.002)
            tensors[k] = (st, v.shape, ref.f32_to_bits(st, x.astype(np.float32).reshape(-1)))
        ref.write_safetensors(os.path.join(d, "model.safetensors"), tensors)
        json.dump(dict(cfg, torch_dtype={"BF16": "bfloat16", "F32": "float32", "F16": "float16"}[st]),
                  open(os.path.join(d, "config.json"), "w"))
        dirs.append(d)
    return dirs


def write_config(path, method, dirs, dtype):
    method, extra = VARIANTS.get(method, (method, {}))
    lines = ["merge_method: %s" % method, "base_model: %s" % dirs[0], "dtype: %s" % dtype, "models:"]
    if method == "slerp":
        lines += ["  - model: %s" % dirs[1], "parameters:", "  t: %r" % SLERP_T]
    elif method == "model_stock":
        lines += ["  - model: %s" % d for d in dirs[1:]]
        if extra:
            lines += ["parameters:"] + ["  %s: %s" % (k, str(v).lower()) for k, v in extra.items()]
    else:
        for d, p in zip(dirs[1:], MODEL_PARAMS[method]):
            lines += ["  - model: %s" % d, "    parameters:"] + ["      %s: %r" % kv for kv in p.items()]
        if extra:
            lines += ["parameters:"] + ["  %s: %s" % (k, str(v).lower()) for k, v in extra.items()]
    open(path, "w").write("\n".join(lines) + "\n")


def write_spec(path, method, dirs, st):
    method, extra = VARIANTS.get(method, (method, {}))
    inputs = dirs[:2] if method == "slerp" else dirs
    params = dict({"inputs": MODEL_PARAMS.get(method, []), "t": SLERP_T, "seed": 0}, **extra)
    json.dump({"method": method, "compute": st, "out_dtype": st, "params": params,
               "inputs": [os.path.join(d, "model.safetensors") for d in inputs]}, open(path, "w"))


def ordered(st, bits):
    """Output bits -> integers whose difference is the distance in ulps."""
    b = bits.astype(np.int64)
    width = 32 if st == "F32" else 16
    sign = 1 << (width - 1)
    return np.where(b & sign, sign - b, b)


def tie_mask(method, st, dirs, name):
    """Elements where some model's task-vector magnitude equals its selection threshold."""
    files = [ref.read_safetensors(os.path.join(d, "model.safetensors")) for d in dirs]
    vals = [ref.rc(st, ref.bits_to_f32(f[name][0], f[name][2]).reshape(-1)) for f in files]
    n = vals[0].size
    mask = np.zeros(n, bool)
    for x, p in zip(vals[1:], MODEL_PARAMS[method]):
        key = ref.mag_key(st, ref.rc(st, x - vals[0]))
        s = np.sort(key)
        if SELECTING[method] == "desc":
            k = max(1, int(p["density"] * n))
            cuts = [s[n - k]] if k < n else []
        else:
            target, n_top = int(p["density"] * n), int(p["gamma"] * n)
            n_bot = max(0, n - target - n_top)
            cuts = [s[i] for i in (n_bot, n_bot + target) if i < n]
        for t in cuts:
            mask |= key == t
    return mask


def compare(method, st, mk_out, cand_out, dirs):
    a = ref.read_safetensors(os.path.join(mk_out, "model.safetensors"))
    b = ref.read_safetensors(os.path.join(cand_out, "model.safetensors"))
    tot = same = ulp1 = outside = outside_same = 0
    for name, (dt, _, bits) in a.items():
        if name not in b:
            raise SystemExit("%s: candidate output lacks %s" % (cand_out, name))
        x, y = bits, b[name][2]
        fx, fy = ref.bits_to_f32(dt, x), ref.bits_to_f32(b[name][0], y)
        both_nan = np.isnan(fx) & np.isnan(fy)
        eq = (x == y) | both_nan
        d = np.abs(ordered(dt, x) - ordered(dt, y))
        tot += x.size
        same += int(eq.sum())
        ulp1 += int((eq | (d <= 1)).sum())
        if method in SELECTING:
            ties = tie_mask(method, st, dirs, name)
            outside += int((~ties).sum())
            outside_same += int((eq & ~ties).sum())
    row = {"elements": tot, "identical": same / tot, "within_1ulp": ulp1 / tot}
    if method in SELECTING:
        row["identical_outside_ties"] = outside_same / max(outside, 1)
        row["tie_elements"] = (tot - outside) / tot
    return row


def run(cmd, log):
    """Runs a shell command; returns (wall seconds, peak RSS in MiB of its largest process).

    The peak comes from GNU time (`/usr/bin/time -f %M`): its child is forked from a small
    process, whereas a child forked from this Python process would count this process's
    resident pages as its own high-water mark until it execs. Without GNU time, wait4's
    figure is reported (an overestimate by this process's RSS)."""
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    rss_file = log + ".rss"
    full = "%s -q -f %%M -o %s sh -c %s" % (gnu_time, shlex.quote(rss_file), shlex.quote(cmd)) if gnu_time else cmd
    t = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(full, shell=True, stdout=f, stderr=subprocess.STDOUT,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"))
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    secs = time.time() - t
    if p.returncode != 0:
        raise SystemExit("command failed (%s): %s\nsee %s" % (p.returncode, cmd, log))
    rss_kib = usage.ru_maxrss
    if gnu_time:
        rss_kib = int(open(rss_file).read().split()[-1])
        os.unlink(rss_file)
    return secs, rss_kib / 1024


def bytes_read(log):
    """bytes_read of a mergestream --json summary in the log, if there is one."""
    text = open(log).read()
    at = text.find("{")
    while at >= 0:
        try:
            doc, _ = json.JSONDecoder().raw_decode(text[at:])
            if isinstance(doc, dict) and "bytes_read" in doc:
                return doc["bytes_read"]
        except ValueError:
            pass
        at = text.find("{", at + 1)
    return None


def floor(inputs, nbytes, out_bytes, out_path):
    """Seconds to read `nbytes` of the files `inputs` (cyclically, 4 MiB reads) and write
    `out_bytes` to `out_path` with fsync: the I/O of the passes without arithmetic."""
    piece = 4 << 20
    buf = bytearray(piece)
    t = time.time()
    left = nbytes
    while left > 0:
        for path in inputs:
            with open(path, "rb", buffering=0) as f:
                while left > 0:
                    n = f.readinto(memoryview(buf)[:min(piece, left)])
                    if not n:
                        break
                    left -= n
            if left <= 0:
                break
    with open(out_path, "wb", buffering=0) as f:
        left = out_bytes
        while left > 0:
            left -= f.write(memoryview(buf)[:min(piece, left)])
        os.fsync(f.fileno())
    secs = time.time() - t
    os.unlink(out_path)
    return secs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/mergekit-agreement")
    ap.add_argument("--mergekit-yaml", default="/tmp/mkvenv/bin/mergekit-yaml")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--candidate", action="append", default=[])
    ap.add_argument("--shape", help="HIDDEN,INTER,VOCAB,KV,LAYERS (default 256,688,1000,128,2)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--shared-update", type=float, default=0.0,
                    help="fine-tunes whose updates share this fraction (their cosine; default 0: independent)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (they are removed once compared)")
    ap.add_argument("--no-reference", action="store_true",
                    help="leave out the numpy reference candidate (slow on large sets)")
    ap.add_argument("--json")
    args = ap.parse_args()
    shape = tuple(int(x) for x in args.shape.split(",")) if args.shape else None
    refcmd = "{python} %s {spec} {out}/model.safetensors" % shlex.quote(
        os.path.join(HERE, "..", "tests", "python", "mergekit_methods_ref.py"))
    cands = [] if args.no_reference else [("numpy-ref", "mkdir -p {out} && " + refcmd)]
    for c in args.candidate:
        name, _, tmpl = c.partition("=")
        cands.append((name, tmpl))
    os.makedirs(args.dir, exist_ok=True)
    results = []
    for dtype in args.dtypes.split(","):
        st = ST[dtype]
        dirs = make_models(args.dir, st, seed=len(results) + 11, shape=shape, shared=args.shared_update)
        for method in args.methods.split(","):
            tag = "%s-%s" % (method, dtype)
            cfg = os.path.join(args.dir, tag + ".yml")
            spec = os.path.join(args.dir, tag + ".json")
            write_config(cfg, method, dirs, dtype)
            write_spec(spec, method, dirs, st)
            mk_out = os.path.join(args.dir, "out-mergekit-" + tag)
            if os.path.exists(mk_out):
                shutil.rmtree(mk_out)
            secs, mk_rss = run("%s %s %s --no-copy-tokenizer" % (args.mergekit_yaml, cfg, mk_out),
                               os.path.join(args.dir, tag + "-mergekit.log"))
            inputs = [os.path.join(d, "model.safetensors") for d in (dirs[:2] if method == "slerp" else dirs)]
            in_bytes = sum(os.path.getsize(p) for p in inputs)
            out_bytes = os.path.getsize(os.path.join(mk_out, "model.safetensors"))
            for name, tmpl in cands:
                out = os.path.join(args.dir, "out-%s-%s" % (name, tag))
                log = os.path.join(args.dir, "%s-%s.log" % (tag, name))
                times, rsss, floors, nread = [], [], [], None
                for _ in range(args.runs):
                    if os.path.exists(out):
                        shutil.rmtree(out)
                    csecs, rss = run(tmpl.format(config=cfg, out=out, spec=spec, python=sys.executable), log)
                    times.append(csecs)
                    rsss.append(rss)
                    nread = bytes_read(log)
                    if nread is not None:
                        floors.append(floor(inputs, nread, out_bytes, out + ".floor"))
                row = {"method": method, "dtype": dtype, "candidate": name,
                       "mergekit_s": round(secs, 2), "mergekit_rss_mib": round(mk_rss),
                       "candidate_s": round(median(times), 2), "candidate_rss_mib": round(max(rsss))}
                if floors:
                    row.update({"floor_s": round(median(floors), 2), "passes": round(nread / in_bytes, 2)})
                row.update(compare(method, st, mk_out, out, dirs))
                results.append(row)
                print(json.dumps(row), flush=True)
                if not args.keep:
                    shutil.rmtree(out)
            if not args.keep:
                shutil.rmtree(mk_out)
    print("\n| method | dtype | candidate | elements | identical | within 1 ulp | identical outside threshold ties | tie elements |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        note = " (random masks: not comparable)" if r["method"] in RANDOM else ""
        pct = lambda k: ("%.4f %%" % (100 * r[k])) if k in r else "—"
        print("| %s%s | %s | %s | %d | %s | %s | %s | %s |" % (
            r["method"], note, r["dtype"], r["candidate"], r["elements"], pct("identical"),
            pct("within_1ulp"), pct("identical_outside_ties"), pct("tie_elements")))
    print("\n| method | dtype | candidate | passes | floor s | candidate s | ratio to floor | peak RSS MiB | mergekit s | mergekit peak RSS MiB | mergekit / candidate |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        floor_s = r.get("floor_s")
        print("| %s | %s | %s | %s | %s | %.2f | %s | %d | %.2f | %d | %.1f× |" % (
            r["method"], r["dtype"], r["candidate"], r.get("passes", "—"),
            "%.2f" % floor_s if floor_s else "—", r["candidate_s"],
            "%.2f" % (r["candidate_s"] / floor_s) if floor_s else "—", r["candidate_rss_mib"],
            r["mergekit_s"], r["mergekit_rss_mib"], r["mergekit_s"] / max(r["candidate_s"], 1e-9)))
    if args.json:
        json.dump(results, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()

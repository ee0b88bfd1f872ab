#!/usr/bin/env python3
"""Writes the PyTorch checkpoint fixtures under tests/fixtures/torch/ with real `torch.save`.

Run with a Python that has torch, safetensors and huggingface_hub (the fixtures committed were
written by the versions MANIFEST.json records):

    /tmp/mkvenv/bin/python tests/python/make_torch_fixtures.py [--only STEP ...] [OUT_DIR]

With `--only` (steps: single, sharded, protocol4, refused, malicious, zip64, pairs, many) only those
steps' directories are rewritten, then MANIFEST.json; without it OUT_DIR is rewritten whole.

What it writes (OUT_DIR defaults to tests/fixtures/torch):

- single/pytorch_model.bin: a real module's state dict (an OrderedDict with `_metadata`) in
  BF16/F16/F32, an I64 buffer, tied weights (two names, one storage), views with a storage offset,
  a `torch.nn.Parameter`, a Parameter and a tensor carrying Python attributes, a 0-d and an empty
  tensor, a size-1 dimension with an odd stride, float8/uint16 (`_rebuild_tensor_v3`), bool, int8,
  uint8, int32, float64, and one 640 KiB tensor (for chunked reads);
- sharded/pytorch_model-0000k-of-00003.bin and pytorch_model.bin.index.json, as transformers 4.x
  wrote them (huggingface_hub.split_torch_state_dict_into_shards), BF16;
- protocol4/pytorch_model.bin: torch.save(..., pickle_protocol=4) (FRAME, STACK_GLOBAL, MEMOIZE);
- reference/<case>.safetensors: the same tensors written by safetensors.torch.save_file, which the
  tests compare byte for byte with what the Rust reader finds at its offsets;
- refused/*.bin: files the reader must refuse, each for one reason (non-contiguous tensor, legacy
  format, big-endian byteorder record, complex dtype, nested checkpoint);
- malicious/*.bin: real torch.save archives whose data.pkl runs a payload under pickle.load
  (os.system, posix.system, __builtin__.eval, builtins.eval via STACK_GLOBAL, subprocess.call, the
  INST opcode, a payload hidden in a tensor's arguments). Each payload creates a marker file
  `mergestream-pwned-<case>` in the current directory; this script checks, in a scratch
  directory, that `torch.load(weights_only=False)` does create it;
- zip64/: a real torch.save of a 4.4 GB checkpoint (ZIP64 records and extra fields, offsets past
  4 GiB), kept as its first and last bytes: the 4.4 GB in between are the data of an all-zero
  tensor, which the tests restore as a hole in a sparse file;
- pairs/<case>/{bin,st}/{sft,aligned}/: small Llama-shaped SFT/aligned pairs for merging, each
  written twice from the same tensors: `bin/` by torch.save (pytorch_model.bin, or
  pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json as huggingface_hub splits
  them), `st/` by safetensors.torch.save_file (model.safetensors, or model-0000k-of-0000n + index).
  Each torch.save'd file lists its tensors in the order the safetensors twin stores them, so a
  merge of either gives the same output layout. Cases: `bf16` (single files, an I64 buffer,
  NaN/Inf/-0/subnormal values), `f16` (both sharded, differently), `f32` (SFT sharded, aligned
  single). The aligned directories hold the same config.json in both formats;
- many/pytorch_model.bin: 2 000 one-element tensors with Mixtral-style expert names, for what
  reading a state dict of many tensors costs (`format::pickle`'s `real_state_dicts_fit`);
- MANIFEST.json: the versions used and the SHA-256 of every file.
"""

import collections
import hashlib
import io
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile

import huggingface_hub
import safetensors
import safetensors.torch
import torch

ARGS = sys.argv[1:]
ONLY = []
while ARGS[:1] == ["--only"]:
    ONLY.append(ARGS[1])
    ARGS = ARGS[2:]
OUT = os.path.abspath(ARGS[0] if ARGS else os.path.join(os.path.dirname(__file__), "..", "fixtures", "torch"))


def path(*parts):
    p = os.path.join(OUT, *parts)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    return p


def reference(case, sd):
    """The same tensors as independent contiguous copies, in safetensors."""
    plain = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    safetensors.torch.save_file(plain, path("reference", case + ".safetensors"))


def check_loads(file, sd, weights_only=True):
    """torch.load gives back exactly the tensors saved (a check of the fixture, not the reader)."""
    back = torch.load(file, weights_only=weights_only)
    assert list(back) == list(sd), file
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, (file, k)
        assert torch.equal(bits(back[k]), bits(v)), (file, k)


def bits(t):
    """A tensor's bytes as uint8 (so NaNs compare equal to themselves, bit for bit)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 32)
        self.q_proj = torch.nn.Linear(32, 32, bias=False)
        self.mlp = torch.nn.Linear(32, 48)
        self.norm = torch.nn.LayerNorm(32)
        self.lm_head = torch.nn.Linear(32, 64, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        self.register_buffer("position_ids", torch.arange(64).unsqueeze(0))


def single():
    torch.manual_seed(10)
    m = Block()
    m.embed.to(torch.bfloat16)
    m.q_proj.to(torch.float16)
    sd = m.state_dict()  # OrderedDict with _metadata; embed.weight and lm_head.weight share storage
    assert sd["embed.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()

    base = torch.randn(10, 8)
    sd["view.rows"] = base[3:7]  # contiguous, storage offset 24 in base's storage
    sd["view.flat"] = base.view(-1)[5:17]  # same storage, offset 5
    p = torch.nn.Parameter(torch.randn(3, 5))
    sd["param.plain"] = p  # _rebuild_parameter
    q = torch.nn.Parameter(torch.randn(4).half())
    q._is_hf_initialized = True
    sd["param.with_state"] = q  # _rebuild_parameter_with_state
    t = torch.randn(2, 3)
    t.note = "attribute"
    sd["tensor.with_attr"] = t  # _rebuild_from_type_v2
    sd["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    sd["empty"] = torch.zeros(0, 3, dtype=torch.bfloat16)
    sd["odd_stride"] = torch.randn(4, 3).as_strided((4, 1, 3), (3, 7, 1))  # contiguous per torch
    assert sd["odd_stride"].is_contiguous()
    sd["f8"] = torch.randn(16).to(torch.float8_e4m3fn)
    sd["f8_e5m2"] = torch.randn(16).to(torch.float8_e5m2)
    sd["u16"] = torch.arange(0, 60000, 997, dtype=torch.int64).to(torch.uint16)
    sd["mask"] = torch.tensor([True, False, True])
    sd["i8"] = torch.arange(-5, 5, dtype=torch.int8)
    sd["u8"] = torch.arange(250, 256, dtype=torch.int64).to(torch.uint8)
    sd["i32"] = torch.tensor([-(2**31), 2**31 - 1, 7], dtype=torch.int32)
    # 640 KiB: bigger than two 256 KiB chunks; structured values keep the repository small.
    sd["big"] = (torch.arange(160 * 1024, dtype=torch.float32) % 251 - 125).reshape(160, 1024) / 8
    f = path("single", "pytorch_model.bin")
    torch.save(sd, f)
    check_loads(f, sd)
    reference("single", sd)


def sharded():
    torch.manual_seed(20)
    sd = {}
    for i in range(3):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(24, 16).to(torch.bfloat16)
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(40, 16).to(torch.bfloat16)
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(16).to(torch.bfloat16)
    sd["model.embed_tokens.weight"] = torch.randn(50, 16).to(torch.bfloat16)
    sd["model.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    split = huggingface_hub.split_torch_state_dict_into_shards(
        sd, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=3000
    )
    assert split.is_sharded and len(split.filename_to_tensors) == 3, split.filename_to_tensors
    for name, tensors in split.filename_to_tensors.items():
        shard = {t: sd[t].contiguous() for t in tensors}
        torch.save(shard, path("sharded", name))
        check_loads(path("sharded", name), shard)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    with open(path("sharded", "pytorch_model.bin.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    reference("sharded", sd)


def protocol4():
    torch.manual_seed(30)
    base = torch.zeros(70000)  # a storage size that needs BININT; zeros keep the repository small
    base[:9] = torch.randn(9)
    sd = {
        "a": torch.randn(5, 7).half(),
        "b": torch.nn.Parameter(base[:9]),
        "c": torch.arange(3),
    }
    f = path("protocol4", "pytorch_model.bin")
    torch.save(sd, f, pickle_protocol=4)
    # torch's weights_only loader does not read FRAME, so check this trusted file the other way.
    check_loads(f, sd, weights_only=False)
    reference("protocol4", sd)


def refused():
    torch.manual_seed(40)
    torch.save({"ok": torch.randn(3), "transposed": torch.randn(3, 4).t()}, path("refused", "noncontiguous.bin"))
    torch.save({"w": torch.randn(3)}, path("refused", "legacy.bin"), _use_new_zipfile_serialization=False)
    torch.save({"w": torch.randn(3, dtype=torch.complex64)}, path("refused", "complex.bin"))
    torch.save({"model": {"w": torch.randn(3)}, "epoch": 3}, path("refused", "nested.bin"))
    # Repacked with deflate (as `zip -r` would): data.pkl stays stored, the storages are deflated.
    src = path("refused", "deflated-src.bin")
    torch.save({"w": torch.zeros(64), "b": torch.ones(8)}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path("refused", "deflated.bin"), "w") as zout:
        for info in zin.infolist():
            method = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
            zout.writestr(info.filename.replace("deflated-src/", "deflated/"), zin.read(info), compress_type=method)
    os.remove(src)
    real = sys.byteorder
    try:
        sys.byteorder = "big"  # what a big-endian machine records (the data stays little-endian)
        torch.save({"w": torch.randn(3)}, path("refused", "bigendian.bin"))
    finally:
        sys.byteorder = real
    with zipfile.ZipFile(path("refused", "bigendian.bin")) as z:
        assert z.read("bigendian/byteorder") == b"big"


class Payload:
    """Pickles as a call of `func(*args)`: what a malicious checkpoint holds."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class HiddenTensor:
    """Pickles as `_rebuild_tensor_v2(storage, 0, size, stride, False, <payload>)`."""

    def __init__(self, t, payload):
        self.t, self.payload = t, payload

    def __reduce__(self):
        t = self.t
        return (
            torch._utils._rebuild_tensor_v2,
            (t.storage(), 0, tuple(t.size()), t.stride(), False, self.payload),
        )


def marker(case):
    return f"mergestream-pwned-{case}"


def replace_pickle(src, dst, old, new):
    """Copies the zip `src` to `dst` with data.pkl's bytes `old` replaced by `new`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                assert data.count(old) == 1, (old, data)
                data = data.replace(old, new)
            zout.writestr(info.filename, data)


def malicious():
    d = path("malicious", "x")
    d = os.path.dirname(d)
    w = torch.randn(4)
    cases = {}

    def save(case, sd, **kw):
        f = os.path.join(d, case + ".bin")
        torch.save(sd, f, **kw)
        cases[case] = f
        return f

    save("posix-system", {"w": w, "evil": Payload(os.system, "touch " + marker("posix-system"))})
    # os.system pickles as posix.system on Linux; the name 'os' is what a hand-written exploit uses.
    tmp = save("os-system", {"w": w, "evil": Payload(os.system, "touch " + marker("os-system"))})
    fixed = tmp + ".tmp"
    replace_pickle(tmp, fixed, b"cposix\nsystem\n", b"cos\nsystem\n")
    os.replace(fixed, tmp)
    save("builtin-eval", {"evil": Payload(eval, f"open({marker('builtin-eval')!r}, 'w').close()"), "w": w})
    save(
        "builtins-eval-protocol4",
        {"w": w, "evil": Payload(eval, f"open({marker('builtins-eval-protocol4')!r}, 'w').close()")},
        pickle_protocol=4,
    )
    # Protocol 3: protocol 2 would rename the module to Python 2's 'commands'.
    save(
        "subprocess",
        {"w": w, "evil": Payload(subprocess.call, ["touch", marker("subprocess")])},
        pickle_protocol=3,
    )
    save(
        "hidden-in-tensor",
        {"w": w, "x": HiddenTensor(torch.randn(3), Payload(os.system, "touch " + marker("hidden-in-tensor")))},
    )
    # INST: calls a class or function named in the opcode itself, with no GLOBAL.
    tmp = save("inst-opcode", {"w": w, "evil": Payload(os.system, "touch " + marker("inst-opcode"))})
    with zipfile.ZipFile(tmp) as z:
        pkl = z.read("inst-opcode/data.pkl")
    start = pkl.index(b"cposix\nsystem\n")
    # `GLOBAL posix.system; [BINPUT n]; (MARK) BINUNICODE cmd [BINPUT m]; TUPLE1 [BINPUT k]; REDUCE`
    # becomes `MARK; BINUNICODE cmd; INST posix system`, which pickle runs just the same.
    cmd = ("touch " + marker("inst-opcode")).encode()
    end = pkl.index(b"R", pkl.index(cmd)) + 1
    inst = b"(X" + len(cmd).to_bytes(4, "little") + cmd + b"iposix\nsystem\n"
    fixed = tmp + ".tmp"
    replace_pickle(tmp, fixed, pkl[start:end], inst)
    os.replace(fixed, tmp)

    # Each payload really runs under torch.load (weights_only=False) and creates its marker.
    for case, f in cases.items():
        with tempfile.TemporaryDirectory() as scratch:
            cwd = os.getcwd()
            os.chdir(scratch)
            try:
                try:
                    torch.load(f, weights_only=False)
                except Exception as e:  # the payload ran before whatever failed after it
                    print(f"  {case}: torch.load raised {type(e).__name__} after the payload", file=sys.stderr)
                assert os.path.exists(marker(case)), f"{case}: the payload did not run"
            finally:
                os.chdir(cwd)
            # And torch's own safe loader refuses it.
            try:
                torch.load(f, weights_only=True)
                raise AssertionError(f"{case}: weights_only=True loaded it")
            except pickle.UnpicklingError:
                pass


def zip64():
    """A 4.4 GB checkpoint: keep everything but the zeros of the big tensor."""
    scratch = tempfile.mkdtemp(prefix="mergestream-zip64-", dir=os.environ.get("ZIP64_SCRATCH", "/tmp"))
    try:
        f = os.path.join(scratch, "pytorch_model.bin")
        sd = {
            "before": torch.arange(6, dtype=torch.float32),
            "zeros": torch.zeros(4_400_000_000, dtype=torch.uint8),
            "after": torch.arange(5, dtype=torch.int64) * 1000 + 7,
        }
        torch.save(sd, f)
        with zipfile.ZipFile(f) as z:
            info = z.getinfo("pytorch_model/data/1")
            assert info.file_size == 4_400_000_000
        with open(f, "rb") as fh:
            head = fh.read(64 * 1024)
            # The zeros member's data starts where the local header ends.
            lh = info.header_offset
            name_len = int.from_bytes(head[lh + 26 : lh + 28], "little")
            extra_len = int.from_bytes(head[lh + 28 : lh + 30], "little")
            start = lh + 30 + name_len + extra_len
            end = start + info.file_size
            fh.seek(start)
            left = info.file_size
            while left:  # the gap really is all zeros
                n = min(left, 64 << 20)
                assert fh.read(n).count(0) == n
                left -= n
            fh.seek(end)
            tail = fh.read()
            size = end + len(tail)
        assert size == os.path.getsize(f)
        with open(path("zip64", "head.bin"), "wb") as out:
            out.write(head[:start])
        with open(path("zip64", "tail.bin"), "wb") as out:
            out.write(tail)
        with open(path("zip64", "layout.json"), "w") as out:
            json.dump({"file_len": size, "tail_offset": end, "zeros_start": start}, out, indent=2)
            out.write("\n")
        del sd["zeros"]
        reference("zip64", sd)
    finally:
        shutil.rmtree(scratch)


def llama_like(seed, dtype, vocab=48, hidden=16, inter=40, layers=2):
    """A tiny Llama-shaped state dict in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = torch.randn(hidden, hidden, generator=g) / 4
        sd[p + "mlp.gate_proj.weight"] = torch.randn(inter, hidden, generator=g) / 4
        sd[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden, generator=g) / 4
        sd[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=g) / 4
        sd[p + "input_layernorm.weight"] = 1 + torch.randn(hidden, generator=g) / 10
        sd[p + "post_attention_layernorm.weight"] = 1 + torch.randn(hidden, generator=g) / 10
    sd["model.norm.weight"] = 1 + torch.randn(hidden, generator=g) / 10
    sd["lm_head.weight"] = torch.randn(vocab, hidden, generator=g)
    return {k: v.to(dtype) for k, v in sd.items()}


def aligned_of(sft, seed):
    """The SFT weights nudged (computed in f32, stored in each tensor's dtype)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + torch.randn(v.shape, generator=g) / 50).to(v.dtype) for k, v in sft.items()}


def with_specials(sd):
    """NaN, +-Inf, -0 and a subnormal in the first rows of q_proj, identical in both formats."""
    w = sd["model.layers.0.self_attn.q_proj.weight"].clone()
    tiny = torch.finfo(w.dtype).tiny / 4  # a subnormal of this dtype
    w.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, tiny]).to(w.dtype)
    return {**sd, "model.layers.0.self_attn.q_proj.weight": w}


def safetensors_order(file):
    """The tensor names of a safetensors file in the order of their data."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def write_model(sd, bin_dir, st_dir, shards):
    """`sd` as torch.save checkpoints in bin_dir and as safetensors in st_dir, unsharded when
    `shards` is 1, else split the same way in both formats into about `shards` files (as
    huggingface_hub's greedy split of total/shards bytes falls), each .bin listing its tensors in
    the order of its safetensors twin."""
    os.makedirs(bin_dir)
    os.makedirs(st_dir)
    if shards == 1:
        files = {"model.safetensors": ("pytorch_model.bin", list(sd))}
    else:
        total = sum(v.numel() * v.element_size() for v in sd.values())
        limit = total // shards + 1
        st_split = huggingface_hub.split_torch_state_dict_into_shards(
            sd, filename_pattern="model{suffix}.safetensors", max_shard_size=limit
        )
        bin_split = huggingface_hub.split_torch_state_dict_into_shards(
            sd, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=limit
        )
        assert st_split.is_sharded, st_split.filename_to_tensors
        files = {}
        for (st_name, names), (bin_name, bin_names) in zip(
            sorted(st_split.filename_to_tensors.items()), sorted(bin_split.filename_to_tensors.items())
        ):
            assert names == bin_names
            files[st_name] = (bin_name, names)
        for d, split in ((st_dir, st_split), (bin_dir, bin_split)):
            index_name = "model.safetensors.index.json" if d == st_dir else "pytorch_model.bin.index.json"
            with open(os.path.join(d, index_name), "w") as f:
                json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=2, sort_keys=True)
                f.write("\n")
    for st_name, (bin_name, names) in files.items():
        part = {n: sd[n].contiguous().clone() for n in names}
        st_file = os.path.join(st_dir, st_name)
        safetensors.torch.save_file(part, st_file, metadata={"format": "pt"})
        ordered = collections.OrderedDict((n, part[n]) for n in safetensors_order(st_file))
        torch.save(ordered, os.path.join(bin_dir, bin_name))
        check_loads(os.path.join(bin_dir, bin_name), ordered)


CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 16,
    "intermediate_size": 40,
    "model_type": "llama",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "vocab_size": 48,
}


def pairs():
    cases = {
        # case: (dtype, sft shards, aligned shards, extras)
        "bf16": (torch.bfloat16, 1, 1, True),
        "f16": (torch.float16, 2, 3, False),
        "f32": (torch.float32, 3, 1, False),
    }
    for seed, (case, (dtype, sft_shards, aligned_shards, extras)) in enumerate(cases.items()):
        sft = llama_like(100 + seed, dtype)
        aligned = aligned_of(sft, 200 + seed)
        if extras:
            sft, aligned = with_specials(sft), with_specials(aligned)
            ids = torch.arange(48, dtype=torch.int64).unsqueeze(0)
            sft["model.position_ids"] = ids
            aligned["model.position_ids"] = ids.clone()
        for role, sd, shards in (("sft", sft, sft_shards), ("aligned", aligned, aligned_shards)):
            dirs = [os.path.join(OUT, "pairs", case, fmt, role) for fmt in ("bin", "st")]
            write_model(sd, *dirs, shards)
        for fmt in ("bin", "st"):
            with open(path("pairs", case, fmt, "aligned", "config.json"), "w") as f:
                json.dump({**CONFIG, "torch_dtype": str(dtype).removeprefix("torch.")}, f, indent=2, sort_keys=True)
                f.write("\n")


def many():
    sd = collections.OrderedDict()
    for i in range(2000):
        layer, expert, w = i // 24, (i // 3) % 8, i % 3 + 1
        sd[f"model.layers.{layer}.block_sparse_moe.experts.{expert}.w{w}.weight"] = torch.full((1,), i, dtype=torch.bfloat16)
    torch.save(sd, path("many", "pytorch_model.bin"))
    check_loads(path("many", "pytorch_model.bin"), sd)


def manifest():
    files = {}
    for root, _, names in os.walk(OUT):
        for n in sorted(names):
            p = os.path.join(root, n)
            rel = os.path.relpath(p, OUT)
            if rel == "MANIFEST.json":
                continue
            with open(p, "rb") as fh:
                files[rel] = hashlib.sha256(fh.read()).hexdigest()
    info = {
        "generator": "tests/python/make_torch_fixtures.py",
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "sha256": dict(sorted(files.items())),
    }
    with open(path("MANIFEST.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


STEPS = {f.__name__: f for f in (single, sharded, protocol4, refused, malicious, zip64, pairs, many)}
# The directories each step writes (zip64 also writes reference/zip64.safetensors, and the first
# three their reference/*.safetensors: rerun those with their step).
DIRS = {"single": ["single"], "sharded": ["sharded"], "protocol4": ["protocol4"], "refused": ["refused"],
        "malicious": ["malicious"], "zip64": ["zip64"], "pairs": ["pairs"], "many": ["many"]}

if __name__ == "__main__":
    if ONLY:
        for name in ONLY:
            for d in DIRS[name]:
                if os.path.isdir(os.path.join(OUT, d)):
                    shutil.rmtree(os.path.join(OUT, d))
    elif os.path.isdir(OUT):
        shutil.rmtree(OUT)
    for name in ONLY or list(STEPS):
        print(name, file=sys.stderr)
        STEPS[name]()
    manifest()
    print(f"wrote {OUT}", file=sys.stderr)

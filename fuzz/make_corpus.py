#!/usr/bin/env python3
"""Regenerates the seed corpus in fuzz/corpus/ from `mergestream synth` output.

The synth pair (tiny-llama, one layer) is cut down to a few elements per tensor, so each seed is
a real model's names, dtypes and values in well under 4 KiB. Broken variants sit beside the valid
ones. The input formats are those of `mergestream::fuzzing` (src/fuzzing.rs).

Usage (from the repository root): python3 fuzz/make_corpus.py [path/to/mergestream [TARGET...]]
(all targets when none is named).
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.abspath(__file__))
SEPARATOR = b"\n--shard--\n"
SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
         "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_st(path):
    """(metadata, [(name, dtype, shape, data)] in data order) of a safetensors file."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    data = raw[8 + n:]
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return meta, [(k, v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
                  for k, v in items]


def read_model(directory):
    tensors, meta = [], None
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            meta, ts = read_st(os.path.join(directory, name))
            tensors += ts
    return meta, tensors


def cut(tensors, maxdim=4):
    """Every dimension capped at `maxdim`, keeping the first elements' bytes."""
    out = []
    for name, dtype, shape, data in tensors:
        shape = [min(d, maxdim) for d in shape]
        n = SIZES[dtype]
        for d in shape:
            n *= d
        out.append((name, dtype, shape, data[:n]))
    return out


def encode(tensors, meta=None, pad=0, header=None, data=None):
    """A safetensors file; `header` overrides the JSON text, `data` the data section."""
    if header is None:
        obj, at = {}, 0
        if meta:
            obj["__metadata__"] = meta
        for name, dtype, shape, d in tensors:
            obj[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(d)]}
            at += len(d)
        header = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    text = header.encode() if isinstance(header, str) else header
    text += b" " * pad
    if data is None:
        data = b"".join(t[3] for t in tensors)
    return struct.pack("<Q", len(text)) + text + data


def put(target, name, data):
    """Writes a seed; header seeds go to the differential target's corpus too."""
    if target == "header":
        put("differential", name, data)
    directory = os.path.join(ROOT, "corpus", target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def header_seeds(full, small, ints, f32, f16):
    put("header", "valid-full", encode(full, {"format": "pt"}))
    put("header", "valid-small", encode(small, {"format": "pt"}))
    put("header", "valid-int-buffer", encode(ints))
    put("header", "valid-f32", encode(f32[:3]))
    put("header", "valid-f16", encode(f16[:3]))
    put("header", "valid-padded", encode(small, pad=13))
    put("header", "valid-no-tensors", encode([]))
    edge = [("empty", "BF16", [0], b""), ("empty2d", "BF16", [3, 0], b""),
            ("scalar", "F32", [], b"\x00\x00\x80\x3f"), ("模型.权重", "BF16", [2], b"\x80\x3f\x00\x40"),
            ("é", "U8", [1], b"\x07")]
    put("header", "valid-edge", encode(edge))

    one = '{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}'
    four = b"\x00\x00\x80\x3f"
    # Unknown keys inside a tensor's entry are ignored, as the reference ignores them.
    put("header", "valid-unknown-field", encode([], header=one[:-2] + ',"x":1}}', data=four))
    put("header", "valid-metadata-null", encode([], header='{"__metadata__":null,' + one[1:],
                                                data=four))

    one = '{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}'
    four = b"\x00\x00\x80\x3f"
    broken = {
        "empty": b"",
        "short": b"\x02\x00\x00\x00\x00\x00\x00",
        "len-past-end": struct.pack("<Q", 500) + b"{}",
        "len-huge": struct.pack("<Q", 200_000_000) + b"{}",
        "not-utf8": encode([], header=b'{"\xff\xfe":1}'),
        "not-json": encode([], header="{this is not json"),
        "json-array": encode([], header="[1,2,3]"),
        "duplicate": encode([], header=one[:-1] + ',' + one[1:], data=four + four),
        "unknown-dtype": encode([], header=one.replace("BF16", "Q7"), data=four),
        "shape-negative": encode([], header=one.replace("[2]", "[-2]"), data=four),
        "shape-fraction": encode([], header=one.replace("[2]", "[1.5]"), data=four),
        "shape-overflow": encode([], header=one.replace("[2]", "[4294967296,4294967296]"), data=four),
        "nbytes-mismatch": encode([], header=one.replace("[2]", "[3]"), data=four),
        "offsets-oob": encode([], header=one.replace("[0,4]", "[0,400]"), data=four),
        "offsets-reversed": encode([], header=one.replace("[0,4]", "[4,0]"), data=four),
        "offsets-overlap": encode([], header=one[:-1] + ',' + one[1:].replace('"a"', '"b"').replace("[0,4]", "[2,6]"),
                                  data=four + four),
        "offsets-gap": encode([], header=one.replace("[0,4]", "[2,6]"), data=four + b"\0\0"),
        "trailing-bytes": encode([], header=one, data=four + b"\0\0"),
        "metadata-not-string": encode([], header='{"__metadata__":{"k":1}}'),
        "missing-field": encode([], header='{"a":{"dtype":"BF16","shape":[2]}}', data=four),
    }
    for name, data in broken.items():
        put("header", "broken-" + name, data)


def differential_seeds(small):
    """Seeds for the differential target beyond the header seeds: named `valid-*` when
    mergestream and the safetensors crate both read them, `broken-*` when both refuse them, and
    `differs-*` when mergestream refuses them for a difference listed in fuzz/README.md."""
    one = '{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}'
    four = b"\x00\x00\x80\x3f"
    entry = '{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}'
    f = lambda header, data=four: encode([], header=header, data=data)
    seeds = {
        # Both read these.
        "valid-metadata-null": f('{"__metadata__":null,"a":%s}' % entry),
        "valid-metadata-empty": f('{"__metadata__":{},"a":%s}' % entry),
        "valid-metadata-key-twice": f('{"__metadata__":{"k":"1","k":"2"},"a":%s}' % entry),
        "valid-unknown-fields": f('{"a":{"x":{"y":[1,{"z":null}]},"dtype":"BF16","shape":[2],'
                                  '"data_offsets":[0,4],"n":null,"x2":"s"}}'),
        "valid-leading-whitespace": f(" \t\r\n" + one),
        "valid-newer-dtypes": f('{"c":{"dtype":"C64","shape":[1],"data_offsets":[0,8]},'
                                '"e":{"dtype":"F8_E8M0","shape":[1],"data_offsets":[8,9]},'
                                '"f":{"dtype":"F8_E4M3FNUZ","shape":[1],"data_offsets":[9,10]},'
                                '"g":{"dtype":"F8_E5M2FNUZ","shape":[1],"data_offsets":[10,11]}}',
                                bytes(11)),
        # Both refuse these.
        "broken-field-twice": f('{"a":{"dtype":"BF16","dtype":"BF16","shape":[2],'
                                '"data_offsets":[0,4]}}'),
        "broken-metadata-array": f('{"__metadata__":[],"a":%s}' % entry),
        "broken-metadata-twice": f('{"__metadata__":{},"__metadata__":{},"a":%s}' % entry),
        "broken-shape-minus-zero": f(one.replace("[2]", "[-0]")),
        "broken-offsets-object": f(one.replace("[0,4]", '{"0":0,"1":4}')),
        "broken-dtype-object-map": f(one.replace('"BF16"', '{"BF16":{}}')),
        "broken-sub-byte-odd": f('{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}',
                                 b"\x00"),
        # mergestream refuses these, the reference reads them (documented differences).
        "differs-name-twice": f('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":%s}'
                                % entry),
        "differs-entry-array": f('{"a":["BF16",[2],[0,4]]}'),
        "differs-dtype-object": f(one.replace('"BF16"', '{"BF16":null}')),
        "differs-sub-byte-dtype": f('{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}',
                                    b"\x00"),
        "differs-all-spellings": f('{"a":["F32",[1],[0,4]],"b":{"dtype":{"U8":null},"shape":[0],'
                                   '"data_offsets":[4,4]},"b":{"dtype":"U8","shape":[0],'
                                   '"data_offsets":[4,4]}}'),
    }
    for name, data in seeds.items():
        put("differential", name, data)
    # A real model's header, spelled the reference's loose ways.
    obj, at = {}, 0
    for name, dtype, shape, d in small:
        obj[name] = [{dtype: None}, shape, [at, at + len(d)]]
        at += len(d)
    put("differential", "differs-model-spelled-loosely",
        f(json.dumps(obj, separators=(",", ":")), b"".join(t[3] for t in small)))


def index_json(weight_map):
    return json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map},
                      ensure_ascii=False).encode()


def index_input(weight_map, *shards, raw_index=None):
    idx = raw_index if raw_index is not None else index_json(weight_map)
    return SEPARATOR.join([idx] + list(shards))


def index_seeds(small):
    a, b = small[:2], small[2:]
    fa, fb = encode(a, {"format": "pt"}), encode(b, {"format": "pt"})
    wm = {t[0]: "a.safetensors" for t in a}
    wm.update({t[0]: "b.safetensors" for t in b})
    put("index", "valid-two-shards", index_input(wm, fa, fb))
    put("index", "valid-one-shard", index_input({t[0]: "a.safetensors" for t in small},
                                                encode(small)))
    three = {t[0]: "abc"[i] + ".safetensors" for i, t in enumerate(small[:3])}
    put("index", "valid-three-shards",
        index_input(three, *[encode([t]) for t in small[:3]]))
    first = a[0][0]
    put("index", "missing-shard", index_input({**wm, first: "c.safetensors"}, fa, fb))
    put("index", "tensor-absent", index_input({**wm, "nope": "a.safetensors"}, fa, fb))
    put("index", "unlisted-tensor", index_input({k: v for k, v in wm.items() if k != first}, fa, fb))
    put("index", "wrong-shard", index_input({**wm, first: "b.safetensors"}, fa, fb))
    dup = index_json(wm).replace(b'"weight_map": {', b'"weight_map": {"%s": "a.safetensors", ' % first.encode())
    put("index", "listed-twice", index_input(None, fa, fb, raw_index=dup))
    put("index", "traversal", index_input({**wm, first: "../a.safetensors"}, fa, fb))
    put("index", "absolute", index_input({**wm, first: "/etc/passwd"}, fa, fb))
    put("index", "names-itself", index_input({**wm, first: "model.safetensors.index.json"}, fa, fb))
    put("index", "in-two-shards", index_input(wm, fa, encode(a + b)))
    put("index", "not-json", index_input(None, fa, raw_index=b'{"weight_map": '))
    put("index", "no-weight-map", index_input(None, fa, raw_index=b'{"metadata": {}}'))
    put("index", "shard-not-string", index_input(None, fa, raw_index=b'{"weight_map": {"x": 1}}'))


def merge_input(file, alpha=0, shard=0, chunk=0, edits=0, which=0, seed=0, roles=0):
    params = bytes([roles, alpha, shard, chunk, edits, which, seed >> 8, seed & 0xFF])
    return params + file


def merge_seeds(small, ints, specials):
    f = encode(small, {"format": "pt"})
    put("merge", "identical", merge_input(f))
    put("merge", "perturbed", merge_input(f, seed=0x5A3C))
    put("merge", "sharded-output", merge_input(f, shard=4, chunk=1, seed=0x1234))
    put("merge", "roles-swapped", merge_input(encode(ints), roles=1, alpha=2, seed=0x0F0F))
    put("merge", "specials", merge_input(encode(specials), alpha=4, seed=0x7777))
    put("merge", "reversed-layout", merge_input(f, which=0x81, seed=0x0101))
    for name, bits in [("rename", 1), ("reshape", 2), ("retype", 4), ("drop", 8), ("add", 16),
                       ("all-edits", 31)]:
        put("merge", "edit-" + name, merge_input(f, edits=bits, which=1))
    put("merge", "alpha-nan", merge_input(f, alpha=10))
    edge = [("empty", "BF16", [0], b""), ("empty2d", "BF16", [3, 0], b""),
            ("scalar", "BF16", [], b"\x80\x3f"), ("模型.权重", "BF16", [2], b"\x80\x3f\x00\x40"),
            ("é", "U8", [1], b"\x07")]
    put("merge", "edge-shapes", merge_input(encode(edge), shard=1, seed=0x4242))
    put("merge", "broken-file", merge_input(b"\x10\x00\x00\x00\x00\x00\x00\x00{}"))
    # --compress: `roles` bit 1, bits 2-3 the block size (64 << n), bit 4 two threads.
    put("merge", "compress-sharded", merge_input(f, roles=0b10, shard=4, chunk=1, seed=0x1234))
    put("merge", "compress-specials-threads",
        merge_input(encode(specials), roles=0b11110, alpha=4, seed=0x7777))
    put("merge", "compress-edge-shapes", merge_input(encode(edge), roles=0b0110, shard=1, seed=0x4242))


def packed_input(file, block=0, level=0, base=0, threads=0, corrupt=0):
    params = bytes([block | level << 3, base | threads << 1, corrupt & 0xFF, corrupt >> 8])
    return params + file


def packed_seeds(binary, tmp, small, ints, specials, f32, f16):
    """Safetensors files to pack (then corrupt), and packed files made by the binary to read."""
    f = encode(small, {"format": "pt"})
    put("packed", "pack-small", packed_input(f))
    put("packed", "pack-small-base", packed_input(f, block=1, base=1, corrupt=0x3A5C))
    put("packed", "pack-ints-threads", packed_input(encode(ints), block=2, threads=1))
    put("packed", "pack-specials", packed_input(encode(specials), level=2, corrupt=0x0101))
    put("packed", "pack-f32-base", packed_input(encode(f32), block=3, base=1, threads=1))
    put("packed", "pack-f16", packed_input(encode(f16), block=7, corrupt=0xBEEF))
    edge = [("a", "U8", [3], b"\x01\x02\x03"), ("empty", "F32", [0], b""),
            ("scalar", "F64", [], b"\x00\x00\x00\x00\x00\x00\xf8\x7f"),
            ("odd", "F32", [2], b"\x01\x00\xc0\x7f\x00\x00\x80\xff")]
    put("packed", "pack-edge-offsets", packed_input(encode(edge), base=1))
    # Tensors starting at odd offsets and longer than a 64-byte block, so block boundaries fall
    # inside elements (segments with a phase).
    mid = [("b", "U8", [3], bytes(range(3))),
           ("f32", "F32", [40], struct.pack("<40f", *[i * 0.37 - 7 for i in range(40)])),
           ("u", "U8", [1], b"\x09"),
           ("f64", "F64", [20], struct.pack("<20d", *[i * -1.5e-3 for i in range(20)])),
           ("v", "U8", [1], b"\x0a"),
           ("bf16", "BF16", [33], bytes((i * 37) % 256 for i in range(66)))]
    put("packed", "pack-mid-element", packed_input(encode(mid)))
    put("packed", "pack-mid-element-base", packed_input(encode(mid), base=1, threads=1))
    put("packed", "pack-no-tensors", packed_input(encode([])))
    # Packed files as the tool writes them, for the reader.
    for name, tensors, extra in [("small", small, []), ("specials", specials, ["--level", "3"])]:
        model = os.path.join(tmp, "model-" + name)
        os.makedirs(model)
        with open(os.path.join(model, "model.safetensors"), "wb") as out:
            out.write(encode(tensors, {"format": "pt"}))
        packed = os.path.join(tmp, "packed-" + name)
        subprocess.run([binary, "pack", model, "--out", packed, "--block-size", "64", "-q",
                        *extra], check=True, capture_output=True)
        with open(os.path.join(packed, "model.safetensors.mszst"), "rb") as p:
            put("packed", "read-" + name, packed_input(p.read()))


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "..", "target", "debug",
                                                                "mergestream")
    tmp = tempfile.mkdtemp(prefix="mergestream-corpus-")
    try:
        def synth(name, *extra):
            subprocess.run([binary, "synth", os.path.join(tmp, name), "--preset", "tiny-llama",
                            "--layers", "1", *extra], check=True, capture_output=True)
            return read_model(os.path.join(tmp, name, "aligned"))[1]

        full = cut(synth("bf16", "--int-buffer"))
        specials = cut(synth("specials", "--specials"), maxdim=16)
        f32 = cut(synth("f32", "--dtype", "F32"))
        f16 = cut(synth("f16", "--dtype", "F16"))
        norms = [t for t in full if t[0].endswith("norm.weight")]
        small = norms + [t for t in full if t[0].endswith("q_proj.weight")]
        ints = [t for t in full if t[1] == "I64"] + norms[:1]
        targets = sys.argv[2:] or ["header", "differential", "index", "merge", "packed"]
        for target in targets:
            shutil.rmtree(os.path.join(ROOT, "corpus", target), ignore_errors=True)
        if "header" in targets:
            header_seeds(full, small, ints, f32, f16)
        if "differential" in targets:
            differential_seeds(small)
        if "index" in targets:
            index_seeds(small)
        if "merge" in targets:
            merge_seeds(small, ints, specials[:6])
        if "packed" in targets:
            packed_seeds(binary, tmp, small, ints, specials[:6], f32, f16)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

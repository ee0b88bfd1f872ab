"""Loads a mergestream output the way users do — `transformers.AutoModelForCausalLM.from_pretrained`
— runs a forward pass, checks that every weight transformers loaded equals the bytes stored in
the shards (read here with a few lines of independent code, not with the `safetensors`
package transformers itself uses), and that the model card's front matter is YAML that
names the inputs.

Usage: check_transformers.py CASES_JSON
  CASES_JSON   [{"out": DIR, "method": NAME, "base_model": [INPUT, ...]}, ...]: each output, the
               merge method its card must tag, and every input as its `base_model:` must list
               them, in order (one process for all, so torch is imported once)
Exits 0 and prints a line per output when all holds.
"""

import json
import os
import struct
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def raw_tensors(path):
    """{name: (dtype, shape, bytes)} of one safetensors file, parsed by hand."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        out[name] = (entry["dtype"], entry["shape"], data[base + start : base + end])
    return out


def stored(out_dir):
    """Every tensor of the output, through its index when it has one."""
    index = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(raw_tensors(os.path.join(out_dir, name)))
    return tensors


TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def front_matter(out_dir):
    with open(os.path.join(out_dir, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("---\n"), "the card does not start with front matter"
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4 : end + 1])


def check(out_dir, method, inputs):
    meta = front_matter(out_dir)
    assert isinstance(meta, dict), meta
    assert meta["base_model"] == inputs, f"base_model {meta['base_model']!r}, want {inputs!r}"
    assert meta["tags"][:2] == ["merge", "mergestream"] and method in meta["tags"], meta["tags"]
    assert meta.get("library_name") == "transformers", meta

    model, info = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype="auto", output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"loading reported {problems}"

    tensors = stored(out_dir)
    state = model.state_dict()
    assert set(state) == set(tensors), (
        f"transformers has {sorted(set(state) - set(tensors))} the files lack, "
        f"the files have {sorted(set(tensors) - set(state))} transformers lacks"
    )
    for name, value in state.items():
        dtype, shape, data = tensors[name]
        assert value.dtype == TORCH_DTYPES[dtype], f"{name}: {value.dtype} vs {dtype}"
        assert list(value.shape) == shape, f"{name}: {list(value.shape)} vs {shape}"
        loaded = value.detach().contiguous().view(torch.uint8).numpy().tobytes()
        assert loaded == data, f"{name}: the loaded weights differ from the stored bytes"

    model.eval()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    vocab = model.config.vocab_size
    assert tuple(logits.shape) == (1, 5, vocab), logits.shape
    assert bool(torch.isfinite(logits.float()).all()), "the forward pass gave non-finite logits"
    elements = sum(v.numel() for v in state.values())
    print(
        f"{out_dir}: transformers {__import__('transformers').__version__} loaded a "
        f"{type(model).__name__} of {len(state)} tensors ({elements} elements, "
        f"{sorted({str(v.dtype) for v in state.values()})}) equal to the stored bytes; forward "
        f"pass logits {tuple(logits.shape)} finite; the card's front matter names {len(inputs)} inputs"
    )


def main():
    for case in json.loads(sys.argv[1]):
        check(case["out"], case["method"], case["base_model"])


if __name__ == "__main__":
    main()

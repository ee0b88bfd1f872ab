#!/usr/bin/env python3
"""Record how mergekit 0.1.5 resolves merge parameters, tensor by tensor.

For each config below this script makes tiny Llama checkpoints (7 layers, and a 1-layer set for
the one-layer rule), runs mergekit's own planner on the config (`MergePlanner._plan()`, the step
that resolves filters, gradients, scopes and defaults; no tensor is merged) and writes every
tensor's resolved parameters to `tests/data/mergekit_params.json`. `tests/spec.rs` parses the same
configs with `mergestream::spec` and checks that every value agrees bit for bit.

Floats are written as `repr()` strings so that they round-trip exactly (JSON number parsers are
not all correctly rounded).

Usage (needs torch, transformers and mergekit 0.1.5, e.g. a throwaway venv):
    python scripts/mergekit-params-fixture.py [OUT.json]
"""

import json
import os
import re
import sys
import tempfile

CASES = {
    # gradients of several lengths, filters (substring, first match wins, catch-all last),
    # a conditional whose value is itself a gradient
    "linear_gradients_filters": (
        "seven",
        """\
merge_method: linear
models:
  - model: m1
    parameters:
      weight: [0, 0.3, 1.0]
  - model: m2
    parameters:
      weight:
        - filter: self_attn
          value: [1, 0]
        - filter: mlp
          value: 0.25
        - value: 0.7
  - model: m3
    parameters:
      weight: [0.1, 0.7, 0.2, 0.9, 0.3, 0.123456789, 1e-3]
dtype: float32
""",
    ),
    # global parameters as the fallback of per-model ones; filters that only match some
    # tensors fall through to the next scope; a wildcard '*' filter; bool gradient
    "linear_global_fallback": (
        "seven",
        """\
merge_method: linear
models:
  - model: m1
    parameters:
      weight:
        - filter: q_proj
          value: 2
  - model: m2
  - model: m3
    parameters:
      weight:
        - filter: layers.3.
          value: -1
        - filter: "*"
          value: [0.5, 1.5]
parameters:
  weight: [0.2, 0.4, 0.6, 0.8]
  normalize: [true, true, false]
""",
    ),
    # linear with a base model that is not among the models: mergekit adds it as an input
    "linear_base_appended": (
        "seven",
        """\
merge_method: linear
base_model: base
models:
  - model: m1
    parameters:
      weight: 0.5
parameters:
  weight: 2
  normalize: false
""",
    ),
    # task arithmetic: weight is per non-base model, the base's own parameters are ignored,
    # lambda gradient, defaults normalize=false
    "task_arithmetic": (
        "seven",
        """\
merge_method: task_arithmetic
base_model: base
models:
  - model: base
  - model: m1
    parameters:
      weight: 0.7
  - model: m2
    parameters:
      weight: [-0.5, 0.5]
parameters:
  lambda: [1.0, 0.6]
""",
    ),
    "ties_defaults": (
        "seven",
        """\
merge_method: ties
base_model: base
models:
  - model: m1
    parameters:
      weight: 1
      density: [0.2, 0.8]
  - model: m2
    parameters:
      weight: 0.3
      density: 0.5
parameters:
  int8_mask: true
""",
    ),
    "dare_ties_defaults": (
        "seven",
        """\
merge_method: dare_ties
base_model: base
models:
  - model: m1
    parameters:
      weight: 0.5
      density: 0.53
  - model: m2
    parameters:
      weight: 0.5
parameters:
  density: 0.7
""",
    ),
    "dare_linear_defaults": (
        "seven",
        """\
merge_method: dare_linear
base_model: base
models:
  - model: m1
    parameters:
      weight: 0.6
      density: 0.4
  - model: m2
    parameters:
      weight: 0.4
parameters:
  rescale: false
""",
    ),
    "breadcrumbs_defaults": (
        "seven",
        """\
merge_method: breadcrumbs
base_model: base
models:
  - model: m1
    parameters:
      weight: 0.5
      density: 0.9
      gamma: [0.01, 0.05]
  - model: m2
    parameters:
      weight: 0.5
""",
    ),
    "breadcrumbs_ties_defaults": (
        "seven",
        """\
merge_method: breadcrumbs_ties
base_model: base
models:
  - model: m1
    parameters:
      weight: 0.5
  - model: m2
    parameters:
      weight: 0.5
      gamma: 0.02
parameters:
  density: 0.8
""",
    ),
    "della_defaults": (
        "seven",
        """\
merge_method: della
base_model: base
models:
  - model: m1
    parameters:
      weight: 0.5
      density: 0.5
  - model: m2
    parameters:
      weight: 0.5
      density: 0.6
      epsilon: 0.05
parameters:
  lambda: 1.1
""",
    ),
    "della_linear_defaults": (
        "seven",
        """\
merge_method: della_linear
base_model: base
models:
  - model: m1
    parameters:
      weight: 0.5
      density: 0.5
  - model: m2
    parameters:
      weight: 0.5
      density: 0.5
parameters:
  epsilon: 0.1
""",
    ),
    # the classic SLERP config: t gradients selected by filter
    "slerp_classic": (
        "seven",
        """\
merge_method: slerp
base_model: base
models:
  - model: base
  - model: m1
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
    ),
    "model_stock": (
        "seven",
        """\
merge_method: model_stock
base_model: base
models:
  - model: m1
  - model: m2
  - model: m3
parameters:
  filter_wise: [false, true]
""",
    ),
    # number spellings: YAML 1.1 integers and floats, signed zeros, exponents without a dot
    # (a string to PyYAML, a number once pydantic converts it), booleans spelt yes/off
    "number_spellings": (
        "seven",
        """\
merge_method: task_arithmetic
base_model: base
models:
  - model: m1
    parameters:
      weight: -0
  - model: m2
    parameters:
      weight: -0.0
  - model: m3
    parameters:
      weight: [.5, 1., 2E-1, 1e-3, +3, 9007199254740993]
parameters:
  lambda: 1e0
  normalize: yes
  int8_mask: off
""",
    ),
    # one layer: t is 1 for that layer, 0 for the others
    "one_layer": (
        "one",
        """\
merge_method: linear
models:
  - model: m1
    parameters:
      weight: [0.25, 0.75]
  - model: m2
    parameters:
      weight: [0.1, 0.2, 0.9]
""",
    ),
}


def make_models(root, layers):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    for name in ["base", "m1", "m2", "m3"]:
        transformers.LlamaForCausalLM(cfg).save_pretrained(os.path.join(root, name))


def value(v):
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return repr(float(v))
    raise TypeError(f"unexpected parameter value {v!r}")


def plan(text):
    import yaml
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    options = MergeOptions()
    arch = get_architecture_info(cfg, options)
    planner = MergePlanner(
        cfg, arch, options=options, out_model_config=_model_out_config(cfg, arch)
    )
    planner._plan()
    rows = []
    for weight, task in planner._tensors:
        m = re.search(r"\.layers\.(\d+)\.", weight.name)
        rows.append(
            {
                "tensor": weight.name,
                "layer": int(m.group(1)) if m else None,
                "global": {k: value(v) for k, v in task.parameters.items()},
                "per_model": {
                    str(model): {k: value(v) for k, v in params.items()}
                    for model, params in task.input_parameters.items()
                },
                "order": [str(model) for model in task.model_order],
                "base": str(task.base_model) if task.base_model else None,
            }
        )
    return rows


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "..", "tests", "data", "mergekit_params.json"
    )
    import mergekit

    version = getattr(mergekit, "__version__", None)
    if version is None:
        from importlib.metadata import version as v

        version = v("mergekit")
    result = {"mergekit": version, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"seven": (os.path.join(tmp, "seven"), 7), "one": (os.path.join(tmp, "one"), 1)}
        for root, layers in sets.values():
            make_models(root, layers)
        cwd = os.getcwd()
        try:
            for name, (models, text) in CASES.items():
                root, layers = sets[models]
                os.chdir(root)  # mergekit resolves relative model paths against the cwd
                result["cases"].append(
                    {"name": name, "num_layers": layers, "config": text, "tensors": plan(text)}
                )
        finally:
            os.chdir(cwd)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {sum(len(c['tensors']) for c in result['cases'])} tensors in "
          f"{len(result['cases'])} cases to {out}")


if __name__ == "__main__":
    main()

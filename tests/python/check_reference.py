"""Prints, for each safetensors file named on the command line, whether the Python
`safetensors` package reads it (`ACCEPT`) or refuses it (`REJECT`): its header opened with
`safe_open` and its tensor names listed, as a loader would. Used by tests/it/python_client.rs to
check that the package and the Rust crate the differential fuzz target compares with agree."""

import sys

from safetensors import safe_open

for path in sys.argv[1:]:
    try:
        with safe_open(path, framework="numpy") as f:
            list(f.keys())
        print("ACCEPT")
    except Exception:  # noqa: BLE001 - any refusal is a refusal
        print("REJECT")

#!/usr/bin/env python3
"""Loads a checkpoint's data.pkl with Python's own pickle machinery, as torch.load(weights_only=False)
would, but without torch: globals under `torch.` become inert stubs and persistent ids (storages)
load as None; every other global is imported and called for real. Used by tests/it/torch_bin.rs to
show that the malicious fixtures really run their payload under pickle.load (which creates a
marker file in the current directory) while mergestream's reader refuses them. Standard library
only.

    python run_pickle.py CHECKPOINT.bin
"""

import io
import pickle
import sys
import zipfile


def stub(*args, **kwargs):
    return None


class Loader(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch" or module.startswith("torch."):
            return stub
        return super().find_class(module, name)

    def persistent_load(self, pid):
        return None


def main():
    with zipfile.ZipFile(sys.argv[1]) as z:
        (pkl,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
        data = z.read(pkl)
    try:
        Loader(io.BytesIO(data)).load()
    except Exception as e:  # the payload ran before whatever failed after it
        print(f"pickle.load raised {type(e).__name__}: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()

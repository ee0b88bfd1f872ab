#!/usr/bin/env python3
"""Regenerates the seeds of the `pickle` and `torch` fuzz targets from the PyTorch fixtures in
tests/fixtures/torch/ (written by real torch.save, see tests/python/make_torch_fixtures.py).

- fuzz/corpus/pickle/: the data.pkl of every fixture checkpoint (valid, refused, malicious) and
  the legacy format's leading pickles;
- fuzz/corpus/torch/: every fixture checkpoint under 16 KiB, whole.

Standard library only. Usage (from the repository root): python3 fuzz/make_torch_corpus.py
"""

import os
import shutil
import zipfile

ROOT = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(ROOT, "..", "tests", "fixtures", "torch")


def put(target, name, data):
    with open(os.path.join(ROOT, "corpus", target, name), "wb") as f:
        f.write(data)


def main():
    for target in ("pickle", "torch"):
        d = os.path.join(ROOT, "corpus", target)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    for kind in ("single", "sharded", "protocol4", "refused", "malicious"):
        folder = os.path.join(FIXTURES, kind)
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".bin"):
                continue
            path = os.path.join(folder, name)
            seed = f"{kind}-{name[:-4]}"
            raw = open(path, "rb").read()
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as z:
                    (pkl,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
                    put("pickle", seed, z.read(pkl))
            else:
                put("pickle", seed, raw)
            if len(raw) <= 16 * 1024:
                put("torch", seed, raw)


if __name__ == "__main__":
    main()

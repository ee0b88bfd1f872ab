#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this script) and as the README tells a new
# user to run it: sets up what the tests need (scripts/test-env.sh: a Python venv with safetensors,
# numpy, PyYAML, maturin, torch and transformers, and b3sum; the Slurm test installs Slurm itself), then formatting, lints, warning-free docs, and every test in
# release mode (unit, property, end-to-end, Python client, transformers, memory, Slurm) against
# the product as shipped, then the tests that need the test hooks (fault injection, fuzz-corpus
# replay) with the `failpoints` and `fuzzing` cargo features on, then the pip wheel
# (scripts/wheel-test.sh: maturin builds it, a fresh venv installs it and runs it).
set -euo pipefail
cd "$(dirname "$0")/.."

export MERGESTREAM_TEST_PYTHON
MERGESTREAM_TEST_PYTHON=$(bash scripts/test-env.sh)

# The memory tests write gigabytes in the temporary directory, one test at a time (the largest
# 8.4 GB, some 15 GB with the smaller ones beside it); an ENOSPC there is the disk, not the tool.
tmp=${TMPDIR:-/tmp}
echo "== disk: $(df -Ph "$tmp" | awk 'NR==2 {print $4}') free in $tmp (the memory tests need up to ~15 GB)"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (default features, then with the test hooks)"
cargo clippy --release --all-targets -- -D warnings
cargo clippy --release --all-targets --features failpoints,fuzzing -- -D warnings
echo "== cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps
echo "== cargo test --release (the product: default features)"
cargo test --release
echo "== cargo test --release --features failpoints,fuzzing (fault injection, fuzz corpus)"
cargo test --release --features failpoints,fuzzing --test it -- faults:: fuzz_corpus::
echo "== the pip wheel (maturin), installed alone into a fresh venv"
bash scripts/wheel-test.sh

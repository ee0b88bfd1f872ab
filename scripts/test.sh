#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this script) and as the README tells a new
# user to run it: sets up what the tests need (a Python venv with safetensors + numpy, b3sum; the
# Slurm test installs Slurm itself), then formatting, lints, and every test in release mode
# (unit, property, end-to-end, faults, fuzz-corpus replay, Python client, memory, Slurm).
set -euo pipefail
cd "$(dirname "$0")/.."

export MERGESTREAM_TEST_PYTHON
MERGESTREAM_TEST_PYTHON=$(bash scripts/test-env.sh)

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --all-targets -- -D warnings
echo "== cargo test --release"
cargo test --release

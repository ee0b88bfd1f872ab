#!/usr/bin/env bash
# wheel-test.sh — build the pip wheel with maturin and use it as a pip user would: install it,
# alone, into a fresh venv and run `mergestream --version` and a small synth + expo + verify
# with the command pip put on the venv's PATH. scripts/test.sh runs it after the Rust tests.
#
# maturin comes from the test venv (scripts/test-env.sh pins it). The wheel is built with the
# project's target directory, so the dependencies compiled for `cargo test --release` are
# reused and only the binary is compiled again (maturin strips it).
#
# Usage: scripts/wheel-test.sh     (prints what it checked; exit 0 when all held)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${MERGESTREAM_TEST_PYTHON:-$(bash scripts/test-env.sh)}
VENV_BIN=$(dirname "$PY")
WORK=$(mktemp -d /tmp/mergestream-wheel.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

started=$(date +%s)
"$VENV_BIN/maturin" build --release --quiet --out "$WORK/wheels" >&2
wheel=$(ls "$WORK"/wheels/mergestream-*.whl)
echo "built $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB) in $(( $(date +%s) - started )) s"

# A venv with nothing but the wheel: no index, no other package.
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check --no-index "$wheel"
mergestream=$WORK/venv/bin/mergestream
[ -x "$mergestream" ] || { echo "pip did not install a mergestream command" >&2; exit 1; }

want="mergestream $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
got=$(PATH="$WORK/venv/bin:/usr/bin:/bin" mergestream --version)
[ "$got" = "$want" ] || { echo "--version says '$got', want '$want'" >&2; exit 1; }

cd "$WORK"
PATH="$WORK/venv/bin:/usr/bin:/bin" bash -euo pipefail -c '
    mergestream synth pair --preset tiny-llama --layers 1 2>/dev/null
    mergestream expo --sft pair/sft --aligned pair/aligned --alpha 0.3 --out out --quiet --hash-inputs
    mergestream verify out --inputs pair/sft pair/aligned --quiet
    test -f out/README.md
'
echo "pip install of the wheel gives '$got', which merges and verifies a pair (from $(command -v "$mergestream"))"

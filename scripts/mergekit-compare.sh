#!/usr/bin/env bash
# mergekit-compare.sh — run scripts/mergekit-compare.py (mergekit 0.1.5 itself vs the numpy
# reference of its arithmetic, byte for byte; optionally more engines) in a Python venv that
# has mergekit==0.1.5.
#
# Usage:
#   scripts/mergekit-compare.sh [--quick] [--work DIR] [--threads N] \
#       [--engine 'mergestream=target/release/mergestream merge {config} --out {out}'] ...
#
# Environment:
#   MERGEKIT_VENV   an existing venv with mergekit==0.1.5 to reuse (e.g. /tmp/mkvenv); it is
#                   checked, never modified. Without it, a throwaway venv is created under
#                   ${TMPDIR:-/tmp}, `pip install mergekit==0.1.5` (with CPU-only torch from
#                   the PyTorch CPU index) runs into it, and it is deleted at exit.
#   PYTHON          interpreter for the throwaway venv (default: python3)
#   KEEP_VENV=1     keep the throwaway venv (its path is printed)
#
# Exit status: that of mergekit-compare.py (0: every aligned merge byte-identical and no
# difference other than NaN encodings anywhere), or non-zero if the venv cannot be set up.
set -euo pipefail

MERGEKIT_VERSION=0.1.5
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { printf '[mergekit-compare] %s\n' "$*" >&2; }

have_mergekit() {
    "$1/bin/python" - "$MERGEKIT_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
import numpy  # noqa: F401
sys.exit(0 if version("mergekit") == sys.argv[1] else 1)
PYEOF
}

if [ -n "${MERGEKIT_VENV:-}" ]; then
    if ! have_mergekit "$MERGEKIT_VENV"; then
        log "ERROR: MERGEKIT_VENV=$MERGEKIT_VENV has no mergekit==$MERGEKIT_VERSION (with numpy)"
        exit 2
    fi
    venv=$MERGEKIT_VENV
    log "reusing $venv"
else
    venv=$(mktemp -d "${TMPDIR:-/tmp}/mergekit-venv.XXXXXX")
    if [ "${KEEP_VENV:-0}" != 1 ]; then
        trap 'rm -rf "$venv"' EXIT
    fi
    log "creating throwaway venv $venv"
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        --extra-index-url https://download.pytorch.org/whl/cpu \
        "mergekit==$MERGEKIT_VERSION" >&2
    have_mergekit "$venv" || { log "ERROR: mergekit==$MERGEKIT_VERSION did not install"; exit 2; }
fi

log "$("$venv/bin/python" -c 'import torch, mergekit.merge_methods; print("torch", torch.__version__, "cpu capability", torch.backends.cpu.get_cpu_capability(), "threads", torch.get_num_threads())')"
# Not `exec`: the EXIT trap must still remove a throwaway venv afterwards.
status=0
"$venv/bin/python" "$here/mergekit-compare.py" --mergekit "$venv/bin/mergekit-yaml" "$@" || status=$?
exit "$status"

#!/usr/bin/env bash
# hash-inputs-cost.sh — what `--hash-inputs` costs: wall time and bytes read from disk by an
# `expo` run with and without it, warm and cold (the inputs' pages evicted from the page cache
# with `dd iflag=nocache`, so other processes' caches are left alone), and the SHA-256
# throughput of the `sha2` crate as the binary runs it (`verify --inputs` re-hashes the inputs
# alone, from the page cache).
#
# Usage: scripts/hash-inputs-cost.sh [WORKDIR] [RUNS]
#   WORKDIR  where the pair and outputs go (default /tmp/mergestream-hash-cost; ~5.5 GB)
#   RUNS     runs per configuration (default 3)
# Bytes read come from the kernel's per-process I/O accounting (`read_bytes` of /proc/PID/io,
# which includes reaped children): what the run made the disk read, page-cache hits excluded.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
M=$PWD/target/release/mergestream
WORK=${1:-/tmp/mergestream-hash-cost}
RUNS=${2:-3}
mkdir -p "$WORK"
cd "$WORK"
[ -d pair/aligned ] || "$M" synth pair --preset mistral-7b --layers 3 >&2
inputs=$(cat pair/*/*.safetensors | wc -c)
echo "inputs: $inputs bytes in $(ls pair/*/*.safetensors | wc -l) files; $(nproc) CPUs; load: $(cut -d' ' -f1-3 /proc/loadavg)"

evict() { for f in pair/*/*.safetensors; do dd of=/dev/null if="$f" iflag=nocache count=0 status=none; done; }
one() { # $1 = cold|warm, $2 = extra flag
    rm -rf out
    sync
    if [ "$1" = cold ]; then evict; else cat pair/*/*.safetensors >/dev/null; fi
    bash -c '
        s=$(date +%s.%N)
        "$0" expo --sft pair/sft --aligned pair/aligned --alpha 0.3 --out out -q $1
        e=$(date +%s.%N)
        r=$(awk "/read_bytes/ {print \$2}" /proc/$$/io)
        printf "%.2f s, %.2f x the inputs read from disk\n" "$(echo "$e - $s" | bc)" "$(echo "$r / $2" | bc -l)"
    ' "$M" "$2" "$inputs"
}
for cache in warm cold; do
    for i in $(seq "$RUNS"); do
        echo "$cache, plain:          $(one "$cache" "")"
        echo "$cache, --hash-inputs:  $(one "$cache" --hash-inputs)"
    done
done
cat pair/*/*.safetensors >/dev/null
s=$(date +%s.%N)
"$M" verify out --inputs pair/sft pair/aligned -q
e=$(date +%s.%N)
echo "verify --inputs (blake3 of the output, SHA-256 of the inputs, warm): $(echo "$e - $s" | bc) s"

#!/usr/bin/env bash
# A complete ExPO merge on a pair of small Llama-shaped checkpoints that this script generates,
# then the two ways to check the result. Everything lands in ./demo (removed first).
#   bash examples/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet
ms=target/release/mergestream
rm -rf demo

echo "== generate an SFT/aligned pair (Llama-shaped, BF16, sharded differently)"
$ms synth demo/pair --preset tiny-llama --layers 4 --sft-shards 3 --aligned-shards 2

echo "== check the pair and show the output layout"
$ms plan --sft demo/pair/sft --aligned demo/pair/aligned --alpha 0.3 --max-shard-size 200KB

echo "== merge: aligned + 0.3 * (aligned - sft)"
$ms expo --sft demo/pair/sft --aligned demo/pair/aligned --alpha 0.3 --out demo/expo --max-shard-size 200KB

echo "== the output"
ls -l demo/expo

echo "== verify it"
$ms verify demo/expo
if command -v b3sum >/dev/null; then
  (cd demo/expo && b3sum --check --quiet checksums.b3 && echo "b3sum --check: OK")
else
  echo "(b3sum is not installed; 'apt-get install b3sum' or 'cargo install b3sum' to check with it too)"
fi

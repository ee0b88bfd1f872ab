#!/usr/bin/env bash
# submit.sh — submit a streamed ExPO merge to Slurm: an N-task job array of
# expo.sbatch (one output part per task, all writing into OUT) and a
# finalize.sbatch job that starts only if every task succeeded.
#
# Usage:
#   examples/slurm/submit.sh SFT ALIGNED ALPHA OUT NPARTS
#
# Environment (optional):
#   MERGESTREAM  mergestream binary for the jobs (default: `mergestream`
#                found on PATH at submit time, else looked up by the jobs)
#   LOG_DIR      where job output files go (default: sbatch's default, the
#                submission directory); created if missing
#   MERGESTREAM_ARGS  more `mergestream expo` options for every part, e.g.
#                "--max-shard-size 5GB" (see expo.sbatch)
#   SBATCH_ARGS  extra sbatch options for both jobs, e.g.
#                "--partition=cpu --account=proj --cpus-per-task=4"
#                (expo.sbatch asks for 8 CPUs per part, finalize for 1)
#   SLURM_CONF   as usual for Slurm clients
#
# Output (stdout, two lines, eval-able):
#   EXPO_JOBID=<array job id>
#   FINALIZE_JOBID=<finalize job id>
# Job output: mergestream-expo-<array>_<task>.out and
#   mergestream-finalize-<jobid>.out (in LOG_DIR if set).
# The finalize job uses --kill-on-invalid-dep=yes: if any expo task fails it
# is cancelled instead of pending forever. Re-running submit.sh with the same
# arguments resumes (expo runs with --resume).
#
# Exit codes: 0 submitted; 1 sbatch failed (an already submitted array is
#   cancelled); 2 usage error.
set -euo pipefail

usage() { echo "usage: $0 SFT ALIGNED ALPHA OUT NPARTS" >&2; exit 2; }
[ $# -eq 5 ] || usage
SFT=$1 ALIGNED=$2 ALPHA=$3 OUT=$4 NPARTS=$5
[[ $NPARTS =~ ^[1-9][0-9]*$ ]] || { echo "submit.sh: NPARTS must be a positive integer, got '$NPARTS'" >&2; exit 2; }
[ -n "$ALPHA" ] || usage

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Jobs may start in another working directory: pass absolute paths.
abspath() { realpath -m -- "$1"; }
SFT=$(abspath "$SFT") ALIGNED=$(abspath "$ALIGNED") OUT=$(abspath "$OUT")
for d in "$SFT" "$ALIGNED"; do
    [ -d "$d" ] || echo "submit.sh: warning: $d is not a directory here" >&2
done
if [ -n "${MERGESTREAM:-}" ]; then
    [[ $MERGESTREAM == */* ]] && MERGESTREAM=$(abspath "$MERGESTREAM")
elif command -v mergestream >/dev/null 2>&1; then
    MERGESTREAM=$(command -v mergestream)
fi

extra=()
if [ -n "${SBATCH_ARGS:-}" ]; then read -r -a extra <<<"$SBATCH_ARGS"; fi
out_expo=() out_fin=()
if [ -n "${LOG_DIR:-}" ]; then
    mkdir -p "$LOG_DIR"
    LOG_DIR=$(abspath "$LOG_DIR")
    out_expo=(--output="$LOG_DIR/mergestream-expo-%A_%a.out")
    out_fin=(--output="$LOG_DIR/mergestream-finalize-%j.out")
fi

# The variables travel in the environment (--export=ALL) rather than as
# --export=ALL,SFT=...: sbatch splits --export at commas, which would break
# paths containing a comma.
export SFT ALIGNED ALPHA OUT
if [ -n "${MERGESTREAM:-}" ]; then export MERGESTREAM; fi
if [ -n "${MERGESTREAM_ARGS:-}" ]; then export MERGESTREAM_ARGS; fi

# --parsable prints "jobid" or "jobid;cluster".
expo=$(sbatch --parsable --export=ALL --array="0-$((NPARTS - 1))" \
    "${out_expo[@]}" "${extra[@]}" "$HERE/expo.sbatch")
expo=${expo%%;*}
[[ $expo =~ ^[0-9]+$ ]] || { echo "submit.sh: unexpected sbatch output '$expo'" >&2; exit 1; }

if ! fin=$(sbatch --parsable --export=ALL --dependency="afterok:$expo" \
    --kill-on-invalid-dep=yes "${out_fin[@]}" "${extra[@]}" "$HERE/finalize.sbatch"); then
    echo "submit.sh: submitting finalize failed; cancelling array job $expo" >&2
    scancel "$expo" || true
    exit 1
fi
fin=${fin%%;*}

echo "submit.sh: expo array $expo (${NPARTS} tasks), finalize $fin (afterok:$expo); OUT=$OUT" >&2
echo "EXPO_JOBID=$expo"
echo "FINALIZE_JOBID=$fin"

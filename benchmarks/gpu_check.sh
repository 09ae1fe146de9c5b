#!/usr/bin/env bash
# The GPU check: bash benchmarks/gpu_check.sh OUTDIR [--dry-run] [--budget S] [--no-dali] ...
# (all options: python3 benchmarks/gpu_check.py --help; what it measures: its docstring).
#
# On the GPU host, through the device tool (one call; wheels: bash benchmarks/gpu_wheels/fetch.sh
# here first): carry ["benchmarks/gpu_wheels/cache"], timeout_s 600,
#   command: bash benchmarks/gpu_check.sh $OUT
# Here, without a GPU: bash benchmarks/gpu_check.sh /tmp/gpu_check_dry --dry-run
#
# Exit: 0 every step ran; 1 a step failed or timed out; 2 a prerequisite is missing (no GPU, CUDA
# build mismatch, no DALI, no lmdb: named on stderr and in OUTDIR/gpu_check.json); 3 usage;
# 124 the whole run overran its hard bound (budget + 30 s: 8 min by default) and was killed
# (what it measured is in OUTDIR/gpu_check.json, written after every step).
set -u
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run] [--budget SECONDS] [--no-dali]" \
    "[--skip setup,pytest,sweep,train,dali] (more: python3 benchmarks/gpu_check.py --help)" >&2
  exit 3
fi
# OUTDIR is taken relative to where the script is called from, then the run moves to the repo
mkdir -p "$1" && out="$(cd "$1" && pwd)" || { echo "gpu_check.sh: cannot create OUTDIR $1" >&2; exit 3; }
shift
cd "$(dirname "$0")/.." || exit 3
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null \
  || { echo "gpu_check.sh: no $PY on the PATH (set PYTHON=...)" >&2; exit 2; }
command -v timeout >/dev/null || { echo "gpu_check.sh: coreutils' timeout is missing" >&2; exit 2; }
# the hard bound: the driver's own budget (default 450 s, dry run 240 s) + 30 s to wind down
budget=450
prev=""
for a in "$@"; do
  [ "$a" = "--dry-run" ] && [ "$budget" = 450 ] && budget=240
  [ "$prev" = "--budget" ] && budget="${a%.*}"
  case "$a" in --budget=*) budget="${a#--budget=}"; budget="${budget%.*}";; esac
  prev="$a"
done
export PYTHONUNBUFFERED=1
timeout -k 5 $((budget + 30)) "$PY" benchmarks/gpu_check.py "$out" "$@"
rc=$?
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
  echo "gpu_check.sh: killed after $((budget + 30)) s; partial results in $out/gpu_check.json" >&2
  rc=124
fi
exit $rc

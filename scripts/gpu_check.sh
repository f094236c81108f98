#!/usr/bin/env bash
# Every GPU path exercised and timed once, with a JSON report (scripts/gpu_check.py's docstring
# lists the sections; BENCHMARKS.md describes the report). At most 8 minutes on one H100/H200.
#   bash scripts/gpu_check.sh                      # DEVICE=cuda, report gpu_check.json
#   DEVICE=cpu SMALL=1 bash scripts/gpu_check.sh   # the CPU dry run (tests/test_gpu_check.py)
# Environment: DEVICE (cuda), SMALL (empty: full sizes), OUT (gpu_check.json), PY (python),
# LIMIT (480 seconds; the check is stopped there, the report keeps the sections that ran).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu_check.json}
PY=${PY:-python}
LIMIT=${LIMIT:-480}
exec timeout "$LIMIT" "$PY" scripts/gpu_check.py --device "$DEVICE" --json "$OUT" ${SMALL:+--small} "$@"

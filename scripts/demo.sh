#!/usr/bin/env bash
# What `make demo` runs: a short subset of the offline digits benchmark
# (scripts/run_digits_table.sh): two digits teachers, the vanilla student, students distilled
# with a few methods on a same- and a cross-architecture pair, one seed, then the comparison
# table. A few minutes on 2 CPU cores; finished runs are skipped when it is run again.
#   METHODS="kd at crd dkd" TRIALS=1 SAVE=save/demo EPOCHS=6 from the environment
set -euo pipefail
cd "$(dirname "$0")/.."
METHODS=${METHODS:-kd at crd dkd} TRIALS=${TRIALS:-1} SAVE=${SAVE:-save/demo} exec bash scripts/run_digits_table.sh "$@"

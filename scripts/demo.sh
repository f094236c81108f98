#!/usr/bin/env bash
# What `make demo` runs: a short subset of the offline digits benchmark
# (scripts/run_digits_table.sh): two digits teachers (resnet20, vgg8; 6 epochs), the vanilla
# student (resnet8) and students distilled with KD, AT, CRD and DKD on a same- and a
# cross-architecture pair (5 epochs), one seed, then the comparison table, its figure and where
# the TensorBoard logs are. Under 5 minutes on 2 cores of an AVX2-only CPU (README); finished
# runs are skipped when it is run again.
#   METHODS="kd at crd dkd" TRIALS=1 SAVE=save/demo EPOCHS=5 TEACHER_EPOCHS=6 from the environment
set -euo pipefail
cd "$(dirname "$0")/.."
export METHODS=${METHODS:-kd at crd dkd} TRIALS=${TRIALS:-1} SAVE=${SAVE:-save/demo}
export EPOCHS=${EPOCHS:-5} TEACHER_EPOCHS=${TEACHER_EPOCHS:-6}
exec bash scripts/run_digits_table.sh "$@"

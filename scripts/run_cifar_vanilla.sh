#!/usr/bin/env bash
# Every teacher (trial 0) and every vanilla student (TRIALS trials) of the CIFAR-100 tables
# (CRD, Tian et al. ICLR 2020, Tables 1 and 2; the DKD tables use the same networks).
#   bash scripts/run_cifar_vanilla.sh [--dry-run]
#   EPOCHS=240 TRIALS=3 GPU=0 SAVE=save DATA=./data PY=python from the environment
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

TEACHERS="wrn_40_2 resnet56 resnet110 resnet32x4 vgg13 ResNet50"
STUDENTS="wrn_16_2 wrn_40_1 resnet20 resnet32 resnet8x4 vgg8 MobileNetV2 ShuffleV1 ShuffleV2"

for model in $TEACHERS; do
  run train_teacher.py --model "$model" --trial 0 "${common[@]}"
done
for model in $STUDENTS; do
  for trial in $(seq 1 "$TRIALS"); do
    run train_teacher.py --model "$model" --trial "$trial" "${common[@]}"
  done
done
finish_runs   # under a submitit launcher: submit the queued runs

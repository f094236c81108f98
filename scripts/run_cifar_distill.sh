#!/usr/bin/env bash
# Both CIFAR-100 tables of CRD (Tian et al., ICLR 2020) with RepDistiller's published weights
# (each method's -r/-a/-b as the registry in distiller_zoo/ records them, which train_student.py
# takes when the flags are omitted):
# Table 1, 7 same-architecture pairs x 13 methods; Table 2, 6 cross-architecture pairs x 12
# methods; plus CRD+KD on every pair. FSP needs equal channel counts, so, as in the paper, it
# runs on neither the cross pairs nor wrn_40_2 -> wrn_40_1. Train the teachers first
# (scripts/run_cifar_vanilla.sh).
#   bash scripts/run_cifar_distill.sh [--dry-run]
#   EPOCHS=240 TRIALS=3 GPU=0 SAVE=save DATA=./data PY=python from the environment
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

SAME="wrn_40_2:wrn_16_2 wrn_40_2:wrn_40_1 resnet56:resnet20 resnet110:resnet20 resnet110:resnet32
resnet32x4:resnet8x4 vgg13:vgg8"
CROSS="vgg13:MobileNetV2 ResNet50:MobileNetV2 ResNet50:vgg8 resnet32x4:ShuffleV1 resnet32x4:ShuffleV2
wrn_40_2:ShuffleV1"

# one table cell: the method with its published weights
cell() {
  local t=$1 s=$2 method=$3
  case "$method" in
    fsp)    [ "$t:$s" = wrn_40_2:wrn_40_1 ] || distill "$t" "$s" fsp ;;
    # registry departure (crd+kd): the CRD+KD row weights KD in at -a 1 (RepDistiller's), crd's own default is 0
    crd+kd) distill "$t" "$s" crd -a 1 ;;
    *)      distill "$t" "$s" "$method" ;;
  esac
}

for pair in $SAME; do
  for method in kd fitnet at sp cc vid rkd pkt ab ft fsp nst crd crd+kd; do
    cell "${pair%%:*}" "${pair##*:}" "$method"
  done
done
for pair in $CROSS; do
  for method in kd fitnet at sp cc vid rkd pkt ab ft nst crd crd+kd; do
    cell "${pair%%:*}" "${pair##*:}" "$method"
  done
done
finish_runs   # under a submitit launcher: submit the queued runs

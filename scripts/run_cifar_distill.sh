#!/usr/bin/env bash
# Both CIFAR-100 tables of CRD (Tian et al., ICLR 2020) with RepDistiller's published weights:
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

# method and its RepDistiller command-line weights
cell() {
  local t=$1 s=$2 method=$3
  case "$method" in
    kd)     distill "$t" "$s" kd -r 0.1 -a 0.9 -b 0 ;;
    fitnet) distill "$t" "$s" hint -a 0 -b 100 ;;
    at)     distill "$t" "$s" attention -a 0 -b 1000 ;;
    sp)     distill "$t" "$s" similarity -a 0 -b 3000 ;;
    cc)     distill "$t" "$s" correlation -a 0 -b 0.02 ;;
    vid)    distill "$t" "$s" vid -a 0 -b 1 ;;
    rkd)    distill "$t" "$s" rkd -a 0 -b 1 ;;
    pkt)    distill "$t" "$s" pkt -a 0 -b 30000 ;;
    ab)     distill "$t" "$s" abound -a 0 -b 1 ;;
    ft)     distill "$t" "$s" factor -a 0 -b 200 ;;
    fsp)    [ "$t:$s" = wrn_40_2:wrn_40_1 ] || distill "$t" "$s" fsp -a 0 -b 50 ;;
    nst)    distill "$t" "$s" nst -a 0 -b 50 ;;
    crd)    distill "$t" "$s" crd -a 0 -b 0.8 ;;
    crd+kd) distill "$t" "$s" crd -a 1 -b 0.8 ;;
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

#!/usr/bin/env bash
# DKD (Zhao et al., CVPR 2022) on the pairs of its CIFAR-100 tables (per-pair beta from the
# registry, warm-up 20 epochs; the reference table lists resnet32x4 -> MobileNetV2 at 77.07, a
# figure mdistiller gives for resnet32x4 -> ShuffleV2, so both run), then the newer logit
# methods on resnet32x4 -> resnet8x4, WTTM, ITRD and ICKD on every pair of their READMEs' tables,
# SemCKD and SimKD on theirs, and DOT with KD.
# Train the teachers first (scripts/run_cifar_vanilla.sh).
#   bash scripts/run_cifar_dkd.sh [--dry-run]
#   EPOCHS=240 TRIALS=3 GPU=0 SAVE=save DATA=./data PY=python from the environment
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

PAIRS="resnet56:resnet20 resnet110:resnet32 resnet32x4:resnet8x4 wrn_40_2:wrn_16_2 wrn_40_2:wrn_40_1
vgg13:vgg8 resnet32x4:ShuffleV1 wrn_40_2:ShuffleV1 vgg13:MobileNetV2 ResNet50:MobileNetV2 resnet32x4:ShuffleV2
resnet32x4:MobileNetV2"
for pair in $PAIRS; do
  distill "${pair%%:*}" "${pair##*:}" dkd
done

# newer logit methods, each with its published defaults
distill resnet32x4 resnet8x4 kd --logit_stand
distill resnet32x4 resnet8x4 dkd --logit_stand
distill resnet32x4 resnet8x4 dist
distill resnet32x4 resnet8x4 mlkd --learning_rate 0.025   # its CIFAR-100 configs' lr
distill resnet32x4 resnet8x4 ctkd
distill resnet32x4 resnet8x4 reviewkd
distill resnet32x4 resnet8x4 cat_kd
distill resnet32x4 resnet8x4 sdd_kd
distill resnet32x4 resnet8x4 sdd_dkd
distill resnet32x4 resnet8x4 wkd_l,wkd_f
distill resnet32x4 resnet8x4 kd --dot
distill resnet32x4 resnet8x4 wsld
distill resnet32x4 resnet8x4 nkd

# WTTM (ICLR 2024) on the 13 pairs of RepDistiller's tables, as its README reports them
WTTM_PAIRS="wrn_40_2:wrn_16_2 wrn_40_2:wrn_40_1 resnet56:resnet20 resnet110:resnet20 resnet110:resnet32
resnet32x4:resnet8x4 vgg13:vgg8 vgg13:MobileNetV2 ResNet50:MobileNetV2 ResNet50:vgg8 resnet32x4:ShuffleV1
resnet32x4:ShuffleV2 wrn_40_2:ShuffleV1"
for pair in $WTTM_PAIRS; do
  distill "${pair%%:*}" "${pair##*:}" wttm
done
# ITRD (BMVC 2022): its README reports the same 13 pairs
for pair in $WTTM_PAIRS; do
  distill "${pair%%:*}" "${pair##*:}" itrd
done
# ICKD (ICCV 2021) on the 7 pairs of its README: ICKD-C with KL (the registry's default, -a 1)
# and without it
ICKD_PAIRS="wrn_40_2:wrn_16_2 wrn_40_2:wrn_40_1 resnet56:resnet20 resnet110:resnet20 resnet110:resnet32
resnet32x4:resnet8x4 vgg13:vgg8"
for pair in $ICKD_PAIRS; do
  distill "${pair%%:*}" "${pair##*:}" ickd
  distill "${pair%%:*}" "${pair##*:}" ickd -a 0   # registry departure (ickd): the README's "w/o KL" rows
done
# SemCKD (AAAI 2021) and SimKD (CVPR 2022) on the pairs of their READMEs' tables
distill resnet32x4 resnet8x4 semckd
distill vgg13 vgg8 semckd
distill resnet32x4 ShuffleV2 semckd
distill resnet32x4 resnet8x4 simkd
finish_runs   # under a submitit launcher: submit the queued runs

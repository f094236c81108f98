#!/usr/bin/env bash
# The ImageNet table (mdistiller's and the DKD paper's): ResNet-34 -> ResNet-18 and
# ResNet-50 -> MobileNetV1 with torchvision's published teachers, each method under torchrun on
# GPUS GPUs per node and NODES nodes, with the published recipe (100 epochs, a total batch of
# 256, lr 0.1 x total batch / 256, x0.1 at 30/60/90, weight decay 1e-4: engine/recipe.py) and
# each method's ImageNet settings from mdistiller's configs/imagenet (KD: -r 0.5 -a 0.5 at T 1;
# DKD: T 1, a 1-epoch warm-up, beta per pair; ReviewKD: its per-pair weight, a 1-epoch warm-up;
# OFD: its per-pair weight), then the table.
#   bash scripts/run_imagenet.sh [--dry-run]
#   GPUS=8 NODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 TRIALS=1 SAVE=save
#   DATA=./data/imagenet PY=python EPOCHS (default: the recipe's 100) from the environment
# DATA holds train/<class>/*.JPEG and val/<class>/*.JPEG. Every run uses --auto_resume, so an
# interrupted script continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-100}
TRIALS=${TRIALS:-1}
DATA=${DATA:-./data/imagenet}
GPUS=${GPUS:-8}
NODES=${NODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPU=${GPU:-$(seq -s, 0 $(( GPUS - 1 )))}
source scripts/lib.sh
if [ "$LAUNCHER" = shell ]; then
  LAUNCH=("$PY" -m torch.distributed.run --nproc_per_node "$GPUS" --nnodes "$NODES" --node_rank "$NODE_RANK"
          --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
else
  # one job per torchrun group: NODES nodes of GPUS GPUs; each node's rank and the master come
  # from the job (scripts/slurm.py)
  LAUNCH=("$PY" -m torch.distributed.run --nproc_per_node "$GPUS" --nnodes "$NODES")
  GPUS_PER_JOB=$GPUS NODES_PER_JOB=$NODES CPUS_PER_JOB=${CPUS_PER_JOB:-$(( 8 * GPUS ))}
fi
common+=(--dataset imagenet)

# student, torchvision teacher
PAIRS="imagenet_resnet18:resnet34 imagenet_mobilenet_v1:resnet50"
for pair in $PAIRS; do
  student=${pair%%:*} teacher=torchvision:${pair##*:}
  for trial in $(seq 1 "$TRIALS"); do
    cell=(--path_t "$teacher" --model_s "$student" --trial "$trial" "${common[@]}")
    # registry departure (kd): mdistiller's ImageNet KD weights, -r 0.5 -a 0.5 (the registry's are CIFAR's)
    run train_student.py --distill kd -r 0.5 -a 0.5 --kd_T 1 "${cell[@]}"
    run train_student.py --distill at "${cell[@]}"
    run train_student.py --distill ofd "${cell[@]}"
    run train_student.py --distill crd "${cell[@]}"
    run train_student.py --distill reviewkd --reviewkd_warmup 1 "${cell[@]}"
    run train_student.py --distill dkd --kd_T 1 --dkd_warmup 1 "${cell[@]}"
    run train_student.py --distill dist "${cell[@]}"
  done
done

finish_runs   # under a submitit launcher: submit the queued runs
if runs_ended_here; then
  "$PY" scripts/make_table.py "$SAVE" --out "$SAVE/imagenet_table.md"
fi

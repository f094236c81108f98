#!/usr/bin/env bash
# The offline benchmark on the embedded digits data: one teacher per pair, the vanilla student,
# then every registered method on a same-architecture pair (resnet20 -> resnet8) and a
# cross-architecture pair (vgg8 -> resnet8: four stages of 64..512 channels against three of
# 16..64), TRIALS seeds each, and the table (mean +- std, best epoch). About 20 minutes on 2
# CPU cores; all runs share one Python process. FSP and KDSVD need equal channel counts, so
# they run on the same-architecture pair only.
#   bash scripts/run_digits_table.sh [--dry-run]
#   EPOCHS=4 TEACHER_EPOCHS=10 TRIALS=3 SAVE=save/digits_table METHODS="..." PY=python
#   from the environment
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-4}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-10}
SAVE=${SAVE:-save/digits_table}
PY=${PY:-.venv/bin/python}
IN_PROCESS=1
DATASET=digits
source scripts/lib.sh
# the CPU fast path (bf16 autocast, channels_last) and batch 128: several times the plain
# path's speed on a CPU with bf16 instructions
common+=(--dataset digits --batch_size 128 --amp bf16 --channels_last --print_freq 1000)
student=(--init_epochs 1 --nce_k 1024)
METHODS=${METHODS:-$("$PY" -c "import distiller_zoo; print(' '.join(sorted(distiller_zoo.METHODS)))")}

for teacher in resnet20 vgg8; do
  run train_teacher.py --model "$teacher" --trial 0 "${common[@]}" --epochs "$TEACHER_EPOCHS"
done
for trial in $(seq 1 "$TRIALS"); do
  run train_teacher.py --model resnet8 --trial "$trial" "${common[@]}"
done
for method in $METHODS; do
  distill resnet20 resnet8 "$method" "${student[@]}"
  case "$method" in fsp|kdsvd) ;; *) distill vgg8 resnet8 "$method" "${student[@]}" ;; esac
done

if [ "$DRY_RUN" = 0 ]; then
  start=$(date +%s)
  finish_runs
  echo "digits table: $(( $(date +%s) - start )) s"
  "$PY" scripts/make_table.py "$SAVE" --metric best --out "$SAVE/table.md" --figure "$SAVE/table.png"
  cat "$SAVE/table.md"
fi

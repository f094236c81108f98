#!/usr/bin/env bash
# The offline benchmark on the embedded digits data: one teacher per pair, the vanilla student,
# then every registered method on a same-architecture pair (resnet20 -> resnet8) and a
# cross-architecture pair (vgg8 -> resnet8: four stages of 64..512 channels against three of
# 16..64), TRIALS seeds each, and the table (mean +- std, last epoch). About 23 minutes on 2
# CPU cores with 27 methods (2026-12-02); all runs share one Python process. FSP and KDSVD need equal channel counts, so
# they run on the same-architecture pair only.
#   bash scripts/run_digits_table.sh [--dry-run]
#   EPOCHS=6 TEACHER_EPOCHS=10 TRIALS=3 JOBS=2 SAVE=save/digits_table METHODS="..." PY=python
#   from the environment
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-6}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-10}
SAVE=${SAVE:-save/digits_table}
PY=${PY:-.venv/bin/python}
IN_PROCESS=1
DATASET=digits
source scripts/lib.sh
# RepDistiller's lr 0.05 decayed once at three quarters of the (short) run; precision and memory
# format are left to --amp auto (bf16 and channels_last only where this CPU measures them faster). Batch 32: digits has 1,437 training images, and at 128 a 6-epoch
# run gets 66 steps, too few for any student to converge (vanilla resnet8 56%, MLKD near chance);
# at 32 it gets 270 steps for about the same compute.
common+=(--dataset digits --batch_size 32 --learning_rate 0.05 --print_freq 1000)
# a milestone is an epoch >= 1: three quarters of the run, at least the first epoch
decay=(--lr_decay_epochs $(( EPOCHS * 3 / 4 > 0 ? EPOCHS * 3 / 4 : 1 )))
student=(--init_epochs 1 --nce_k 1024)
METHODS=${METHODS:-$("$PY" -c "import distiller_zoo; print(' '.join(sorted(distiller_zoo.METHODS)))")}

JOBS=${JOBS:-2}
start=$(date +%s)
for teacher in resnet20 vgg8; do
  run train_teacher.py --model "$teacher" --trial 0 "${common[@]}" --epochs "$TEACHER_EPOCHS" \
    --lr_decay_epochs $(( TEACHER_EPOCHS * 3 / 4 > 0 ? TEACHER_EPOCHS * 3 / 4 : 1 ))
done
[ "$DRY_RUN" = 1 ] || finish_runs --jobs "$JOBS"   # the students need their teachers
for trial in $(seq 1 "$TRIALS"); do
  run train_teacher.py --model resnet8 --trial "$trial" "${common[@]}" "${decay[@]}"
done
for method in $METHODS; do
  flags=("${student[@]}" "${decay[@]}")
  # MLKD's published recipe halves the lr (0.025 against 0.05); at the full lr one seed in three
  # collapsed to chance on digits.
  [ "$method" = mlkd ] && flags+=(--learning_rate 0.025)
  # CAT-KD's MSE averages over the classes' maps: with digits' 10 classes instead of CIFAR-100's
  # 100 the term is about 10x larger at the same weight, and at its published 15 the students
  # stayed at chance; 1.5 keeps the share the weight was tuned for. registry departure (cat_kd)
  [ "$method" = cat_kd ] && flags+=(-b 1.5)
  # DKD's and ReviewKD's 20 warm-up epochs are 1/12 of CIFAR's 240; in a 6-epoch run they would
  # end at a quarter of the method's weight, so the warm-up keeps its proportion: one epoch.
  case "$method" in dkd|sdd_dkd) flags+=(--dkd_warmup 1) ;; reviewkd) flags+=(--reviewkd_warmup 1) ;; esac
  # SSKD's teacher head has its own stage length (60 epochs); one, like every init stage here
  [ "$method" = sskd ] && flags+=(--sskd_head_epochs 1)
  distill resnet20 resnet8 "$method" "${flags[@]}"
  case "$method" in fsp|kdsvd) ;; *) distill vgg8 resnet8 "$method" "${flags[@]}" ;; esac
done

[ "$DRY_RUN" = 1 ] || finish_runs --jobs "$JOBS"
if runs_ended_here; then
  echo "digits table: $(( $(date +%s) - start )) s"
  "$PY" scripts/make_table.py "$SAVE" --out "$SAVE/table.md" --figure "$SAVE/table.png"
  cat "$SAVE/table.md"
  echo
  echo "table:       $SAVE/table.md"
  echo "figure:      $SAVE/table.png and $SAVE/table.pdf"
  echo "TensorBoard: $SAVE (every run's scalars; the HParams tab compares them)"
  echo "             tensorboard --logdir $SAVE"
  echo "(the commands run in the installed environment: source .venv/bin/activate)"
fi

#!/usr/bin/env bash
# The quick start: on the embedded digits data, train a teacher, distil students with a few
# methods, and print the comparison. Offline, a few minutes on a laptop CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SAVE=${SAVE:-save/demo}
EPOCHS=${EPOCHS:-10}
TEACHER=${TEACHER:-resnet32x4}
STUDENT=${STUDENT:-resnet8x4}
METHODS=${METHODS:-kd at crd dkd}
common=(--dataset digits --save_dir "$SAVE" --epochs "$EPOCHS" --trial 0)

done_run() { [ -f "$1/results.json" ]; }

tdir="$SAVE/teachers/${TEACHER}_digits_trial0"
done_run "$tdir" || "$PY" train_teacher.py --model "$TEACHER" "${common[@]}"
vdir="$SAVE/teachers/${STUDENT}_digits_trial0"
done_run "$vdir" || "$PY" train_teacher.py --model "$STUDENT" "${common[@]}"
for method in $METHODS; do
  if ! ls "$SAVE"/students/S-"${STUDENT}"_T-"${TEACHER}"_digits_"${method}"_*_trial0/results.json >/dev/null 2>&1; then
    "$PY" train_student.py --path_t "$tdir/best.pth" --model_s "$STUDENT" --distill "$method" "${common[@]}" --nce_k 1024
  fi
done
"$PY" scripts/make_table.py "$SAVE"

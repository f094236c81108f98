# Shared by the table scripts (source it): options, environment overrides and the runner.
#   --dry-run   print the commands instead of running them
#   PY (python), SAVE (save), EPOCHS (240), TRIALS (3), GPU (0), DATA (./data) from the environment
# Every command runs with --auto_resume: a finished run is skipped and an interrupted one
# resumed, so an interrupted table script continues where it stopped.
PY=${PY:-python}
SAVE=${SAVE:-save}
EPOCHS=${EPOCHS:-240}
TRIALS=${TRIALS:-3}
GPU=${GPU:-0}
DATA=${DATA:-./data}
DRY_RUN=0

for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set/p' "$0" | sed -n 's/^# \{0,1\}//p'; exit 0 ;;
    *) echo "error: unknown argument '$arg'; the only option is --dry-run (settings come from the environment)" >&2
       exit 2 ;;
  esac
done

common=(--epochs "$EPOCHS" --save_dir "$SAVE" --data_folder "$DATA" --auto_resume)

# run ENTRY_POINT ARGS...: one training run on GPU(s) $GPU, started by "${LAUNCH[@]}" (default:
# $PY; the ImageNet script sets a torchrun launcher). With IN_PROCESS=1 the runs are queued and
# `finish_runs` executes them all in one Python process (short runs then do not pay the
# interpreter's and torch's start-up each time).
QUEUE=()
run() {
  local line launch=("${LAUNCH[@]:-$PY}")
  line="CUDA_VISIBLE_DEVICES=$GPU $(printf '%q ' "${launch[@]}" "$@")"
  if [ "$DRY_RUN" = 1 ]; then
    echo "$line"
  elif [ "${IN_PROCESS:-0}" = 1 ]; then
    QUEUE+=("$line")
  else
    CUDA_VISIBLE_DEVICES="$GPU" "${launch[@]}" "$@"
  fi
}

# finish_runs [--jobs N]: execute the queued runs (independent of each other), then empty the queue
finish_runs() {
  if [ "${#QUEUE[@]}" -gt 0 ]; then
    printf '%s\n' "${QUEUE[@]}" | "$PY" scripts/run_commands.py "$@"
  fi
  QUEUE=()
}

# teacher_ckpt MODEL: the checkpoint the distillation tables start from (trial 0, last epoch,
# like RepDistiller's ckpt_epoch_240.pth)
teacher_ckpt() {
  echo "$SAVE/teachers/${1}_${DATASET:-cifar100}_trial0/ckpt_last.pth"
}

# distill TEACHER STUDENT METHOD [FLAGS...]: TRIALS runs of one table cell
distill() {
  local teacher=$1 student=$2 method=$3
  shift 3
  for trial in $(seq 1 "$TRIALS"); do
    # the cell's flags come after the script-wide ones, so they override them
    run train_student.py --path_t "$(teacher_ckpt "$teacher")" --model_s "$student" --distill "$method" \
      --trial "$trial" "${common[@]}" "$@"
  done
}

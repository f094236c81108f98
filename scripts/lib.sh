# Shared by the table scripts (source it): options, environment overrides and the runner.
#   --dry-run            print the commands instead of running them
#   --launcher L         shell (default: run them here, one after another), slurm (one Slurm job
#                        per run through submitit, requeued on preemption and time-out; the script
#                        returns once they are queued, a later phase waiting for the earlier one)
#                        or submitit-local (the same jobs through submitit on this machine, JOBS at
#                        a time, each phase waited for)
#   --status             the sweep's finished, running, failed and not started runs (scripts/slurm.py
#                        status); running the script again resubmits the failed and not started ones
#   PY (python), SAVE (save), EPOCHS (240), TRIALS (3), GPU (0), DATA (./data) from the environment;
#   for slurm: PARTITION, TIME_LIMIT (minutes per job, 1440), GPUS_PER_JOB (1), CPUS_PER_JOB (8),
#   MEM_GB, AFTER (job ids the script's first phase waits for, e.g. the teachers'), SWEEP
#   ($SAVE/slurm: submitit's logs and the sweep's record), and any SBATCH_* variable sbatch
#   reads itself (SBATCH_ACCOUNT, SBATCH_QOS, ...)
# Every command runs with --auto_resume: a finished run is skipped and an interrupted one
# resumed, so an interrupted table script (or a requeued job) continues where it stopped.
PY=${PY:-python}
SAVE=${SAVE:-save}
EPOCHS=${EPOCHS:-240}
TRIALS=${TRIALS:-3}
GPU=${GPU:-0}
DATA=${DATA:-./data}
DRY_RUN=0
LAUNCHER=shell
SWEEP=${SWEEP:-$SAVE/slurm}

while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --launcher) LAUNCHER=${2:-}; shift ;;
    --launcher=*) LAUNCHER=${1#--launcher=} ;;
    --status) exec "$PY" scripts/slurm.py status --folder "$SWEEP" ;;
    -h|--help) sed -n '2,/^set/p' "$0" | sed -n 's/^# \{0,1\}//p'
               sed -n '2,/^[^#]/p' scripts/lib.sh | sed -n 's/^# \{0,1\}//p'; exit 0 ;;
    *) echo "error: unknown argument '$1'; the options are --dry-run, --launcher shell|slurm|submitit-local and --status (settings come from the environment)" >&2
       exit 2 ;;
  esac
  shift
done
case "$LAUNCHER" in
  shell|slurm|submitit-local) ;;
  *) echo "error: --launcher '$LAUNCHER' is not one of shell, slurm, submitit-local" >&2; exit 2 ;;
esac

common=(--epochs "$EPOCHS" --save_dir "$SAVE" --data_folder "$DATA" --auto_resume)

# run ENTRY_POINT ARGS...: one training run on GPU(s) $GPU, started by "${LAUNCH[@]}" (default:
# $PY; the ImageNet script sets a torchrun launcher). With IN_PROCESS=1 the runs are queued and
# `finish_runs` executes them all in one Python process (short runs then do not pay the
# interpreter's and torch's start-up each time). Under a submitit launcher every run is queued
# and `finish_runs` submits them, one job each (the scheduler assigns the GPUs).
QUEUE=()
run() {
  local line launch=("${LAUNCH[@]:-$PY}")
  line=$(printf '%q ' "${launch[@]}" "$@")
  [ "$LAUNCHER" = shell ] && line="CUDA_VISIBLE_DEVICES=$GPU $line"
  if [ "$DRY_RUN" = 1 ]; then
    echo "$line"
  elif [ "$LAUNCHER" != shell ] || [ "${IN_PROCESS:-0}" = 1 ]; then
    QUEUE+=("$line")
  else
    CUDA_VISIBLE_DEVICES="$GPU" "${launch[@]}" "$@"
  fi
}

# finish_runs [--jobs N]: execute the queued runs (independent of each other), then empty the
# queue. On Slurm the batch waits for the previous one (AFTER: its job ids; from the environment
# for the first batch, e.g. the teachers' jobs) to succeed.
AFTER=${AFTER:-}
finish_runs() {
  if [ "${#QUEUE[@]}" -gt 0 ]; then
    if [ "$LAUNCHER" = shell ]; then
      printf '%s\n' "${QUEUE[@]}" | "$PY" scripts/run_commands.py "$@"
    else
      AFTER=$(printf '%s\n' "${QUEUE[@]}" | "$PY" scripts/slurm.py submit --launcher "$LAUNCHER" \
        --folder "$SWEEP" --after "$AFTER" --partition "${PARTITION:-}" --time_limit "${TIME_LIMIT:-1440}" \
        --gpus_per_node "${GPUS_PER_JOB:-1}" --nodes "${NODES_PER_JOB:-1}" --cpus_per_task "${CPUS_PER_JOB:-8}" \
        ${MEM_GB:+--mem_gb "$MEM_GB"} --jobs "${JOBS:-1}" "$@")
    fi
  fi
  QUEUE=()
}

# runs_ended_here: whether the queued runs have ended by now (false for --dry-run and on Slurm,
# where the table is made once `--status` says every run finished)
runs_ended_here() {
  [ "$DRY_RUN" = 0 ] && [ "$LAUNCHER" != slurm ]
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

"""Run directories: one per run under save/, holding its arguments, metrics,
TensorBoard events, checkpoints and final results."""
import json
import os
import subprocess
import sys
from pathlib import Path

from core.errors import UserError
from engine.atomic import describe_os_error, write_atomic

ARGS_FILE = "args.json"
RESULTS_FILE = "results.json"
LAST_CKPT = "ckpt_last.pth"
BEST_CKPT = "best.pth"
# a file in which a launcher (scripts/slurm.py) asks the run to say where its directory is: the
# launcher knows the command, only the run knows the directory it makes of it
RUN_DIR_NOTE = "DISTILLBENCH_RUN_DIR_NOTE"
UNSAFE_IN_NAMES = ':/\\*?"<>|'  # Windows' reserved characters and the path separators


def tell_launcher(run_dir: Path) -> None:
    """Write the run directory's absolute path to the file named by RUN_DIR_NOTE, if any (from
    one process of a torchrun group)."""
    note = os.environ.get(RUN_DIR_NOTE)
    if note and os.environ.get("RANK", "0") == "0":
        Path(note).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(note, (str(Path(run_dir).resolve()) + "\n").encode())


def dir_name(name: str) -> str:
    """A run name made safe as a directory name on every file system: the ':' of library
    networks (torchvision:resnet18) and the '/' of hub names become '-'; args.json and
    results.json keep the real names."""
    return "".join("-" if c in UNSAFE_IN_NAMES else c for c in name)


def locate_run_dir(kind: str, default_name: str, save_dir, run_name=None, resume=False) -> Path:
    """The run's directory, checked (`check_run_dir`): `resume`'s where it names one (a run
    directory or a file in it), else save_dir/kind/(run_name or default_name). Creates nothing
    (under torchrun every rank checks)."""
    if isinstance(resume, (str, Path)):
        run_dir = Path(resume)
        if run_dir.is_file():
            run_dir = run_dir.parent
    else:
        run_dir = Path(save_dir) / kind / (run_name or dir_name(default_name))
    check_run_dir(run_dir, bool(resume))
    return run_dir


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """--resume needs a run (args.json); a new run must not overwrite one that checkpointed.
    A run that never checkpointed (stopped in its first epoch) may start again either way."""
    has_args = (run_dir / ARGS_FILE).exists()
    started = bool(checkpoints(run_dir)) or (run_dir / RESULTS_FILE).exists()
    if started and not has_args:
        raise UserError(f"run directory {run_dir} holds checkpoints but no {ARGS_FILE}; restore {ARGS_FILE}, "
                        "or move the directory away, or choose another --trial or --run_name")
    if resume and not has_args:
        raise UserError(f"cannot resume: {run_dir} holds no run (no {ARGS_FILE}); start the run without --resume")
    if not resume and started:
        raise UserError(f"run directory {run_dir} already exists; pass --resume to continue it, "
                        "or choose another --trial or --run_name")


def checkpoints(run_dir: Path) -> list:
    """The checkpoints a run can resume from, newest first: ckpt_last.pth, then the kept
    ckpt_epoch_<k>.pth by epoch."""
    run_dir = Path(run_dir)
    kept = sorted(run_dir.glob("ckpt_epoch_*.pth"), key=lambda p: _epoch_of(p), reverse=True)
    last = [run_dir / LAST_CKPT] if (run_dir / LAST_CKPT).is_file() else []
    return last + [p for p in kept if _epoch_of(p) >= 0]


def _epoch_of(path: Path) -> int:
    number = path.stem.removeprefix("ckpt_epoch_")
    return int(number) if number.isdigit() else -1


def clear_unfinished(run_dir: Path) -> None:
    """Before a run that never checkpointed starts again: drop what its earlier start logged
    (metrics rows, TensorBoard events, temporary files), so nothing appears twice."""
    run_dir = Path(run_dir)
    for pattern in ("metrics.csv", "*.tmp", "events.out.tfevents.*", "*/events.out.tfevents.*"):
        for path in run_dir.glob(pattern):
            path.unlink()


def load_run_args(run_dir: Path, required=()) -> dict:
    """The run's stored arguments; one line when args.json is missing, unreadable or lacks a
    `required` key."""
    path = Path(run_dir) / ARGS_FILE
    fix = "restore it from a copy, or move the run directory away and start the run again"
    try:
        with open(path) as f:
            stored = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {describe_os_error(err)}") from None
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({str(err).splitlines()[0]}); {fix}") from None
    if not isinstance(stored, dict):
        raise UserError(f"{path} does not map argument names to values; {fix}")
    missing = [k for k in required if k not in stored]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; {fix}")
    return stored


def write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically so a reader never sees half a file."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    write_atomic(path, text.encode())


def read_results(path: Path):
    """A results.json's contents, or None with a warning naming it when it is unreadable (one
    broken run must not stop a table or the teacher lookup)."""
    try:
        with open(path) as f:
            results = json.load(f)
        if isinstance(results, dict):
            return results
        reason = "not a JSON object"
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    print(f"warning: skipping unreadable {path} ({reason})", file=sys.stderr)
    return None


def code_version() -> str:
    """The git commit of the code that ran (with -dirty for local edits), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=root,
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version
        return "distillbench-" + version("distillbench")
    except Exception:
        return "unknown"

"""Run directories: one per run under save/, holding its arguments, metrics,
TensorBoard events, checkpoints and final results."""
import json
import os
import subprocess
from pathlib import Path

from core.errors import UserError

ARGS_FILE = "args.json"
RESULTS_FILE = "results.json"
LAST_CKPT = "ckpt_last.pth"
BEST_CKPT = "best.pth"


def locate_run_dir(args, kind: str, default_name: str) -> Path:
    """The run's directory, checked: --resume needs its checkpoint, a new run must not
    overwrite an existing one. Creates nothing (under torchrun every rank checks)."""
    if isinstance(args.resume, str):
        run_dir = Path(args.resume)
        if run_dir.is_file():
            run_dir = run_dir.parent
    else:
        run_dir = Path(args.save_dir) / kind / (args.run_name or default_name)
    if args.resume:
        if not (run_dir / LAST_CKPT).is_file():
            raise UserError(f"cannot resume: {run_dir / LAST_CKPT} does not exist; "
                            "start the run without --resume")
        return run_dir
    if (run_dir / ARGS_FILE).exists():
        raise UserError(f"run directory {run_dir} already exists; pass --resume to continue it, "
                        "or choose another --trial or --run_name")
    return run_dir


def load_run_args(run_dir: Path) -> dict:
    with open(Path(run_dir) / ARGS_FILE) as f:
        return json.load(f)


def write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically so a reader never sees half a file."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


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

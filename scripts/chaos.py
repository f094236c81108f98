"""Kill a training run at random moments, resume it each time, and check that it ends exactly
as an uninterrupted run: the same final weights, the same metrics.csv (timing columns aside).

    python scripts/chaos.py --kills 20 -- train_teacher.py --model resnet8 --dataset digits \
        --epochs 3 --batch_size 256 --deterministic --amp off --no-channels_last

Each start uses --auto_resume (what the table scripts do). The kills mix SIGKILL, SIGTERM and
SIGINT and cycle through three moments: before the first checkpoint (while one is not yet
on disk), during a checkpoint write (the child slows its writes down, so the temporary file
is there to be caught), and at a random time. Exit status 0 when the run survived every
kill exactly, 1 otherwise; the last line says how many kills it survived.

    python scripts/chaos.py --preemptions 5 -- train_student.py --path_t T.pth --distill crd ...

runs the entry point as a submitit job instead (scripts/slurm.py, submitit's local executor)
and preempts it N times, as Slurm does: its notice (SIGUSR2) to every process of the job, then
the requeue; alternately once the run has trained an epoch since its start and while it starts
(its imports, its data). The local executor restarts a job at most 5 times.

Relative paths (--save_dir, the entry point's --path_t, --data_folder) are the current
directory's: the runs start in it, whichever directory holds this script.
"""
import argparse
import csv
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from scripts import slurm  # noqa: E402  (after the path insert)

SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
MOMENTS = ("first epoch", "checkpoint write", "random")
TIMING = ("epoch_time", "images_per_s")
SLOW_WRITE_S = 0.3
# submitit's local controller starts a job at most 6 times
MAX_PREEMPTIONS = 5
PREEMPTION_MOMENTS = ("training", "starting")


def child(entry: str, argv: list) -> None:
    """Run the entry point in this process with checkpoint writes slowed down: half of the
    temporary file, a pause, then the real atomic write."""
    import runpy
    sys.path.insert(0, str(ROOT))
    import engine.checkpoint
    real = engine.checkpoint.write_atomic

    def slow_write(path, data):
        Path(str(path) + ".tmp").write_bytes(bytes(data[:len(data) // 2]))
        time.sleep(SLOW_WRITE_S)
        real(path, data)

    engine.checkpoint.write_atomic = slow_write
    sys.argv = [entry, *argv]
    runpy.run_path(str(ROOT / entry), run_name="__main__")


def start(entry: str, argv: list, save: Path) -> subprocess.Popen:
    command = [sys.executable, __file__, "--child", entry, *argv, "--save_dir", str(save), "--auto_resume"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_dir_of(save: Path):
    found = sorted(save.glob("*/*/args.json"))
    return found[0].parent if found else None


def wait_for(running, condition, limit_s: float) -> bool:
    """Poll `condition` every 10 ms while `running()`; whether it came true in time."""
    deadline = time.monotonic() + limit_s
    while running() and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def strike(process, save: Path, moment: str, rng: random.Random, duration_s: float) -> bool:
    """Wait for `moment`, then send a random signal; whether the process was still running."""
    def run_file(pattern):
        run_dir = run_dir_of(save)
        return run_dir is not None and any(run_dir.glob(pattern))

    def running():
        return process.poll() is None

    if moment == "first epoch" and not run_file("ckpt_last.pth"):
        wait_for(running, lambda: run_file("args.json"), duration_s)
        time.sleep(rng.uniform(0, 1.0))
        if run_file("ckpt_last.pth"):
            return False
    elif moment == "checkpoint write":
        wait_for(running, lambda: run_file("*.tmp"), duration_s)
    else:  # timed from the run's start: SIGINT during the interpreter's imports is Python's, not the run's
        wait_for(running, lambda: run_file("args.json"), duration_s)
        time.sleep(rng.uniform(0, duration_s / 2))
    if process.poll() is not None:
        return False
    process.send_signal(rng.choice(SIGNALS))
    return True


def finish(entry: str, argv: list, save: Path) -> None:
    process = start(entry, argv, save)
    _, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"chaos: the run did not finish (status {process.returncode}):\n{err}")


def metrics(run_dir: Path) -> list:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def differences(reference: Path, chaos: Path) -> list:
    import torch
    a = torch.load(reference / "ckpt_last.pth", weights_only=False)["model"]
    b = torch.load(chaos / "ckpt_last.pth", weights_only=False)["model"]
    problems = [f"weights differ: {k}" for k in a if not torch.equal(a[k], b[k])]
    if metrics(reference) != metrics(chaos):
        problems.append("metrics.csv differs")
    return problems


def survive(entry: str, argv: list, save: Path, kills: int, seed: int) -> int:
    """Run the reference, then the killed-and-resumed run; the number of kills delivered."""
    rng = random.Random(seed)
    began = time.monotonic()
    finish(entry, argv, save / "reference")
    duration_s = time.monotonic() - began
    delivered = 0
    for k in range(kills):
        process = start(entry, argv, save / "chaos")
        hit = strike(process, save / "chaos", MOMENTS[k % len(MOMENTS)], rng, duration_s)
        _, err = process.communicate()
        if "Traceback" in err:
            raise SystemExit(f"chaos: a traceback after kill {k + 1}:\n{err}")
        delivered += hit
    finish(entry, argv, save / "chaos")
    problems = differences(run_dir_of(save / "reference"), run_dir_of(save / "chaos"))
    if problems:
        raise SystemExit("chaos: " + "; ".join(problems))
    return delivered


def processes_of(pid: int) -> list:
    """Every descendant of a process (a job's processes under submitit's local controller)."""
    found = []
    for thread in Path(f"/proc/{pid}/task").iterdir():
        for child in (thread / "children").read_text().split():
            found += [int(child), *processes_of(int(child))]
    return found


def notify(job) -> None:
    """Slurm's notice of a preemption: SIGUSR2 to every process of the job."""
    for pid in processes_of(job._process.pid):
        try:
            os.kill(pid, signal.SIGUSR2)
        except ProcessLookupError:
            pass


def log_count(job, text: str) -> int:
    log = job.paths.stdout
    return log.read_text().count(text) if log.exists() else 0


def epochs_done(save: Path) -> int:
    run_dir = run_dir_of(save)
    if run_dir is None or not (run_dir / "metrics.csv").exists():
        return 0
    return max(0, len((run_dir / "metrics.csv").read_text().splitlines()) - 1)


def local_executor(folder: Path):
    """scripts/slurm.py's executor for --launcher submitit-local, on the CPU."""
    return slurm.make_executor(slurm.parse_args(["submit", "--launcher", "submitit-local", "--folder", str(folder),
                                                 "--gpus_per_node", "0", "--cpus_per_task", "1"]))


def survive_preemptions(entry: str, argv: list, save: Path, preemptions: int, seed: int) -> int:
    """Run the reference, then the run as a submitit job preempted `preemptions` times,
    alternately in training and while it starts; the number of notices delivered."""
    rng = random.Random(seed)
    began = time.monotonic()
    finish(entry, argv, save / "reference")
    duration_s = time.monotonic() - began
    command = [sys.executable, str(ROOT / entry), *argv, "--save_dir", str(save / "chaos"), "--auto_resume"]
    job = local_executor(save / "jobs").submit(slurm.TrainingJob(command, {}, os.getcwd()))
    line = shlex.join(command)

    def running():
        return not job.done()
    delivered = 0
    for k in range(preemptions):
        # submitit's handler is installed as the job starts; the notice comes after it, either
        # while the run starts (imports, data) or once it has trained an epoch in this start
        wait_for(running, lambda k=k: log_count(job, "Starting with") > k, duration_s)
        if PREEMPTION_MOMENTS[k % len(PREEMPTION_MOMENTS)] == "training":
            trained = epochs_done(save / "chaos")
            wait_for(running, lambda trained=trained: epochs_done(save / "chaos") > trained, duration_s)
            time.sleep(rng.uniform(0, 0.5))
        else:
            time.sleep(rng.uniform(0.2, 1.0))
        if job.done():
            break
        notify(job)
        delivered += 1
        wait_for(running, lambda k=k: log_count(job, "Requeued job") > k, 2 * duration_s)
    wait_for(running, lambda: False, 4 * duration_s)
    outcome = slurm.job_state(save / "jobs", {"job": job.job_id, "cluster": "local", "command": line, "submitted": 0})
    if outcome[0] != "finished":
        raise SystemExit(f"chaos: the job did not finish: {outcome}")
    problems = differences(run_dir_of(save / "reference"), run_dir_of(save / "chaos"))
    if problems:
        raise SystemExit("chaos: " + "; ".join(problems))
    return delivered


def main(argv=None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["--child"]:
        child(raw[1], raw[2:])
        return 0
    parser = argparse.ArgumentParser(description="Kill a run at random moments and check it resumes exactly.")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--preemptions", type=int, default=0,
                        help=f"instead of kills: run it as a submitit job and preempt it (at most {MAX_PREEMPTIONS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save_dir", type=lambda text: Path(text).absolute(), default="save/chaos",
                        help="relative to the current directory")
    parser.add_argument("entry", choices=("train_teacher.py", "train_student.py"))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the entry point's flags (no --save_dir)")
    args = parser.parse_args(raw)
    if not 0 <= args.preemptions <= MAX_PREEMPTIONS:
        parser.error(f"--preemptions must be between 0 and {MAX_PREEMPTIONS} (submitit's local executor "
                     "restarts a job at most that often)")
    if args.preemptions:
        delivered = survive_preemptions(args.entry, args.args, args.save_dir, args.preemptions, args.seed)
        print(f"chaos: survived {delivered} preemptions of {args.preemptions} tries, requeued each time, "
              "ended exactly as the uninterrupted run")
        return 0
    delivered = survive(args.entry, args.args, args.save_dir, args.kills, args.seed)
    print(f"chaos: survived {delivered} kills of {args.kills} tries, ended exactly as the uninterrupted run")
    return 0


if __name__ == "__main__":
    sys.exit(main())

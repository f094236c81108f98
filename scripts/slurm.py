"""Run a table script's runs as Slurm jobs through submitit: one job per run (one per torchrun
group for ImageNet), requeued on preemption or time-out, each run resuming from its checkpoint.

    PARTITION=gpu TIME_LIMIT=1440 bash scripts/run_cifar_distill.sh --launcher slurm
    python scripts/slurm.py status --folder save/slurm

The table scripts (scripts/lib.sh) pipe their command lines to `slurm.py submit`; `status`
sorts a sweep's runs into finished, running, failed and not started. Each job runs its command
(which carries --auto_resume) as a child process, which writes its run directory's path to a
note in the sweep folder (engine/runs.py): the directory's results.json and lock say whether the
run finished or is training; the scheduler only says whether its job is still alive. A run dies
with its job (`die_with`): resubmitting it never finds it still training.

Slurm's notice (USR2, `--signal=USR2@<delay>`: before the time limit, and on preemption where
the cluster sends it) reaches every process of the job: the run stops after its current step
(engine/signals.py), and submitit calls `TrainingJob.checkpoint`, which also sends the run
SIGTERM (submitit's local executor signals the job's own process only), waits for it to stop
and requeues the job. The requeued job runs the same command, which resumes the run from its
last completed epoch.

`--launcher submitit-local` runs the same jobs through submitit's local executor on this
machine (--jobs at a time, each batch waited for): the same requeue path, without a cluster.
"""
import argparse
import ctypes
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from core.errors import UserError, exits_cleanly  # noqa: E402  (after the path insert)
from engine import lock, runs  # noqa: E402
from scripts.run_commands import split_line  # noqa: E402

SWEEP_FILE = "sweep.jsonl"
POLL_S = 0.5
# the scheduler's notice: submitit's signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL names another),
# which it asks Slurm for with --signal
NOTICE = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
# the job's notice comes this long before the time limit; a run stops within one step of it
SIGNAL_DELAY_S = 120
# how long the job waits for its run to stop after a notice before killing it (the last
# completed epoch is on disk either way)
STOP_GRACE_S = 90
# time-outs are expected (a 240-epoch run may span several time limits), so allow many
MAX_TIMEOUTS = 50
ACTIVE = {"RUNNING", "PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "UNKNOWN"}
RECORD_KEYS = ("job", "cluster", "label", "command", "submitted")
STATES = ("finished", "running", "failed", "not started")
NOTES = "runs"  # the runs' notes of their directories, in the sweep folder
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LABEL_FLAGS = ("--model", "--model_s", "--models", "--distill", "-b", "--trial")


class RunFailed(Exception):
    """The run's command ended with a non-zero status outside a requeue."""


class TrainingJob:
    """One run as a checkpointable submitit job: its command, environment and directory."""

    def __init__(self, command: list, env: dict, cwd: str):
        self.command, self.env, self.cwd = command, env, cwd
        self.child = None

    def __call__(self) -> int:
        prctl = find_prctl()
        if os.environ.get("SUBMITIT_EXECUTOR") == "local":
            # submitit's local controller (its pid is the job id) is the job: when it is killed,
            # this process goes with it, and with this process its run
            die_with(prctl, int(os.environ["SUBMITIT_LOCAL_JOB_ID"]), signal.SIGKILL)
        me = os.getpid()
        self.child = subprocess.Popen(with_rendezvous(self.command), cwd=self.cwd, env={**os.environ, **self.env},
                                      preexec_fn=lambda: prepare_the_run(prctl, me))
        # polling rather than wait(): checkpoint() may wait on the child from a signal handler
        while (status := self.child.poll()) is None:
            time.sleep(POLL_S)
        if status != 0:
            raise RunFailed(f"{ended_how(status)}: {shlex.join(self.command)}")
        return status

    def checkpoint(self):
        """Called by submitit on the scheduler's notice: stop the run after its current step,
        then requeue the same command."""
        import submitit
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            try:
                self.child.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
        return submitit.helpers.DelayedSubmission(TrainingJob(self.command, self.env, self.cwd))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "child": None}


def prepare_the_run(prctl, job_process: int) -> None:
    """In the run's process, before it starts: it ignores the notice (`ignore_the_notice`) and
    ends with its job's process (`die_with`, SIGTERM: the run stops after its current step, a
    torchrun agent takes its workers down with it)."""
    ignore_the_notice()
    die_with(prctl, job_process, signal.SIGTERM)


def find_prctl():
    """The C library's prctl on Linux, else None; looked up before a fork, so that the child
    loads nothing."""
    return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with(prctl, parent: int, signum: int) -> None:
    """The kernel sends this process `signum` when `parent`, the process that started it, ends,
    however it ends, SIGKILL included (Linux's PR_SET_PDEATHSIG); a parent already gone sends it
    now. Without prctl nothing: a Slurm job's processes end with the job anyway."""
    if prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, int(signum))
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)


def ignore_the_notice() -> None:
    """In the run's process, before it starts: Slurm's notice (NOTICE) reaches every process of
    the job. The training loop handles it (engine/signals.py); before that, and in a torchrun
    agent, which does not handle it and would die of it, leaving its workers to be killed
    mid-step, it is ignored (an ignored signal stays ignored in the programs a process starts)."""
    signal.signal(getattr(signal, NOTICE), signal.SIG_IGN)


def ended_how(status: int) -> str:
    """A child's exit status in words: a stop on a signal (the run's own, status 128 + signal,
    or the kernel's, a negative status) is told apart from a failure."""
    try:
        name = signal.Signals(-status if status < 0 else status - 128).name
    except ValueError:
        return f"exit status {status}"
    return f"killed by {name}" if status < 0 else f"stopped by {name} (not the scheduler's notice to this job)"


def with_rendezvous(command: list) -> list:
    """A torchrun command inside a job gets the job's rendezvous: standalone on one node; on
    several, the node's rank and the first node as master (a port derived from the job id,
    so two jobs sharing a node do not collide)."""
    launcher = next((k for k, word in enumerate(command) if word in ("torch.distributed.run", "torchrun")
                     or word.endswith("/torchrun")), None)
    if launcher is None:
        return command
    import submitit
    job = submitit.JobEnvironment()
    if job.num_nodes == 1:
        extra = ["--standalone"]
    else:
        port = 20000 + int("".join(ch for ch in job.job_id if ch.isdigit()) or 0) % 20000
        extra = ["--node_rank", str(job.node), "--master_addr", job.hostnames[0], "--master_port", str(port)]
    return command[:launcher + 1] + extra + command[launcher + 1:]


def label(argv: list) -> str:
    """A short name for a run: its entry point and the flags that tell runs of a table apart."""
    entry = next((Path(w).stem for w in argv if w.endswith(".py")), argv[0])
    picked = [f"{flag} {argv[k + 1]}" for k, flag in enumerate(argv[:-1]) if flag in LABEL_FLAGS]
    teacher = [Path(argv[k + 1]).parent.name for k, flag in enumerate(argv[:-1]) if flag == "--path_t"]
    return " ".join([entry, *(f"--path_t {t}" for t in teacher if t), *picked])


def make_executor(args):
    try:
        import submitit
    except ImportError:
        raise UserError("the Slurm launcher needs submitit: pip install 'distillbench[slurm]' "
                        "(or pip install submitit)") from None
    if __name__ != "__main__":
        import cloudpickle
        # the jobs unpickle TrainingJob without scripts/ on their module path
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if not hasattr(signal, NOTICE):
        raise UserError(f"SUBMITIT_PREEMPT_SIGNAL names no signal ({NOTICE}); leave it unset for USR2")
    cluster = "slurm" if args.launcher == "slurm" else "local"
    if cluster == "slurm" and not all(shutil.which(tool) for tool in ("sbatch", "srun")):
        raise UserError("--launcher slurm needs Slurm's sbatch and srun on PATH (run it on a login node); "
                        "--launcher submitit-local runs the same jobs on this machine")
    executor = submitit.AutoExecutor(folder=args.folder, cluster=cluster,
                                     slurm_max_num_timeout=MAX_TIMEOUTS)
    # requeue: a job that Slurm itself requeues (a node failure, a preemption in REQUEUE mode)
    # also resumes its run
    sbatch = {"requeue": True}
    if args.after:
        sbatch["dependency"] = "afterok:" + ":".join(args.after.split(","))
    slurm = {"slurm_signal_delay_s": SIGNAL_DELAY_S, "slurm_partition": args.partition or None,
             "slurm_additional_parameters": sbatch}
    executor.update_parameters(name=args.name, timeout_min=args.time_limit, nodes=args.nodes, tasks_per_node=1,
                               gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                               mem_gb=args.mem_gb, **slurm)
    return executor


def training_job(line: str, defaults: dict = None) -> TrainingJob:
    """The job of one command line; `defaults`: environment the line's own assignments override."""
    env, argv = split_line(line)
    if not argv:
        raise UserError(f"not a command line: {line!r}")
    return TrainingJob(argv, {**(defaults or {}), **env}, str(ROOT))


def note_of(folder: Path, line: str) -> Path:
    """Where the run of `line` writes the path of its directory (engine/runs.py tell_launcher)."""
    return Path(folder).resolve() / NOTES / hashlib.sha1(line.encode()).hexdigest()[:16]


def job_of(folder: Path, line: str, defaults: dict = None) -> TrainingJob:
    """The sweep's job of one line: its run notes its directory in the sweep folder."""
    return training_job(line, {**(defaults or {}), runs.RUN_DIR_NOTE: str(note_of(folder, line))})


def record(folder: Path, cluster: str, line: str, job) -> None:
    """Add a submitted job to the sweep's record (what `status` reads)."""
    entry = {"job": job.job_id, "cluster": cluster, "label": label(split_line(line)[1]), "command": line,
             "submitted": time.time()}
    with open(folder / SWEEP_FILE, "a") as sweep:
        sweep.write(json.dumps(entry) + "\n")


def submit_all(executor, folder: Path, lines: list) -> list:
    """Every line as a task of one Slurm job array (Slurm queues them)."""
    with executor.batch():
        jobs = [executor.submit(job_of(folder, line)) for line in lines]
    for line, job in zip(lines, jobs):
        record(folder, "slurm", line, job)
    return jobs


def run_here(executor, folder: Path, lines: list, at_once: int, elsewhere: list = ()) -> None:
    """The local executor: at most `at_once` jobs at a time, until every one has ended, the
    cores shared among them (as scripts/run_commands.py shares them); then until the runs of
    `elsewhere` (lines an earlier submission still runs) have ended too."""
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or at_once) // at_once))}
    waiting, running = list(lines), []
    while waiting or running or (elsewhere and still_going(folder, elsewhere)):
        running = [job for job in running if not job.done()]
        while waiting and len(running) < at_once:
            line = waiting.pop(0)
            running.append(executor.submit(job_of(folder, line, threads)))
            record(folder, "local", line, running[-1])
        time.sleep(POLL_S)


# ----- status -----

def latest_records(folder: Path) -> list:
    """The sweep's jobs, the newest submission of each command only."""
    path = Path(folder) / SWEEP_FILE
    if not path.is_file():
        raise UserError(f"no sweep in {folder} ({SWEEP_FILE} is missing); the table scripts write it with "
                        "--launcher slurm or submitit-local")
    latest = {}
    for number, text in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(text)
            latest[record["command"]] = {key: record[key] for key in RECORD_KEYS}
        except (json.JSONDecodeError, TypeError, KeyError):
            print(f"warning: skipping line {number} of {path}: not a job record", file=sys.stderr)
    return list(latest.values())


def slurm_states(job_ids: list) -> dict:
    """Slurm's state of each job, from one sacct call."""
    from submitit.slurm.slurm import SlurmInfoWatcher
    watcher = SlurmInfoWatcher()
    for job in job_ids:
        watcher.register_job(job)
    watcher.update()
    return {job: watcher.get_state(job, mode="cache") for job in job_ids}


def local_job_alive(job: str) -> bool:
    """Whether a local job's controller is still running: submitit's id of the job is the
    controller's process id, which counts only while that process is submitit's controller
    (an id the system has given to another process since does not) and has not ended (a
    zombie has)."""
    try:
        state = Path(f"/proc/{int(job)}/stat").read_text().rsplit(")", 1)[1].split()[0]
        command = Path(f"/proc/{int(job)}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return False
    return state not in ("Z", "X") and b"submitit.local._local" in command


def noted_run_dir(folder: Path, line: str):
    """The run directory the run of `line` has noted, while it holds a run (args.json); else None."""
    try:
        run_dir = Path(note_of(folder, line).read_text().strip())
    except OSError:
        return None
    return run_dir if (run_dir / runs.ARGS_FILE).is_file() else None


def job_result(folder: Path, record: dict) -> tuple:
    """('success' | 'error' | 'none', value) of the recorded job, from submitit's result file
    (one older than the submission is an earlier job's)."""
    from submitit.core.utils import JobPaths, pickle_load
    result = JobPaths(folder, record["job"]).result_pickle
    if not result.is_file() or result.stat().st_mtime < record["submitted"]:
        return "none", ""
    try:
        return pickle_load(result)
    except Exception:  # a truncated or foreign file: whatever unpickling raises
        return "error", f"unreadable result file {result}"


def job_state(folder: Path, record: dict, scheduler: str = "UNKNOWN") -> tuple:
    """(state, detail, whether its job is alive) of one recorded command. The run directory
    says finished (results.json) or running (its lock held); without either, a live job (its
    Slurm state, or this machine's controller) is about to start or resume the run; a job that
    has ended leaves it failed (it started: it noted its directory, or its job reports an
    error) or not started."""
    from submitit.core.utils import JobPaths
    log = f"log: {JobPaths(folder, record['job']).stderr}"
    if record["cluster"] == "slurm":
        alive, how = scheduler.split()[0] in ACTIVE, f"Slurm state {scheduler}"
    else:
        alive = local_job_alive(record["job"])
        how = "local job " + ("alive" if alive else "ended")
    run_dir = noted_run_dir(folder, record["command"])
    if run_dir is not None and (run_dir / runs.RESULTS_FILE).is_file():
        return "finished", "", alive
    holder = lock.holder(run_dir) if run_dir is not None else None
    if holder:
        return "running", holder + ("" if alive else f"; its job has ended ({how}): end it before resubmitting"), alive
    if alive:
        return ("running", f"{how}, resuming", alive) if run_dir else ("not started", how, alive)
    outcome, value = job_result(folder, record)
    if outcome == "success" and run_dir is None:  # a command that is no run: its job's word
        return "finished", "", alive
    if outcome == "error":
        return "failed", f"{value.strip().splitlines()[-1]} ({log})", alive
    if run_dir is not None:
        return "failed", f"stopped without a result, {how} ({log})", alive
    return "not started", f"{how} before the run started ({log})", alive


def sweep_states(folder: Path) -> list:
    """(record, state, detail, alive) of the newest job of each command of the sweep."""
    records = latest_records(folder)
    on_slurm = [record["job"] for record in records if record["cluster"] == "slurm"]
    scheduler = slurm_states(on_slurm) if on_slurm else {}
    return [(record, *job_state(folder, record, scheduler.get(record["job"], "UNKNOWN"))) for record in records]


def to_resubmit(state: str, alive: bool) -> bool:
    """A run neither finished nor running whose job has ended: the next submission starts it again."""
    return state in ("failed", "not started") and not alive


def summarize(folder: Path, out=None, lines: list = None) -> dict:
    """Print each run's state (of `lines` only, when given) and the totals, to `out` (standard
    output by default); (the counts by state, how many runs a new submission would start again)."""
    out = out or sys.stdout
    counts = dict.fromkeys(STATES, 0)
    again = 0
    for record, state, detail, alive in sweep_states(folder):
        if lines is not None and record["command"] not in lines:
            continue
        counts[state] += 1
        again += to_resubmit(state, alive)
        print(f"{state:11} {record['job']:>12}  {record['label']}" + (f"  [{detail}]" if detail else ""), file=out)
    print(", ".join(f"{n} {state}" for state, n in counts.items())
          + (f" ({again} to submit again: run the table script again, each resumes from its checkpoint)"
             if again else ""), file=out)
    return counts, again


def still_going(folder: Path, lines: list) -> bool:
    """Whether a run of `lines` is running or its job alive."""
    return any(record["command"] in lines and (state == "running" or alive)
               for record, state, _, alive in sweep_states(folder))


def still_to_run(folder: Path, lines: list) -> tuple:
    """(the lines to submit, the lines an earlier submission still runs, their live jobs): a
    command whose run finished is not submitted again, nor one whose run is training or whose
    job is still queued or running (two runs on one directory would fight for its lock)."""
    if not (folder / SWEEP_FILE).is_file():
        return lines, [], []
    known = {record["command"]: (record, state, alive) for record, state, _, alive in sweep_states(folder)}
    settled = [line for line in lines if line in known and not to_resubmit(*known[line][1:])]
    if settled:
        print(f"{len(settled)} of {len(lines)} runs already finished, running or queued in {folder}: "
              "not submitted again", file=sys.stderr)
    going = [line for line in settled if known[line][1] != "finished"]
    live_jobs = [known[line][0]["job"] for line in going if known[line][2]]
    return [line for line in lines if line not in settled], going, live_jobs


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Submit a table's runs to Slurm through submitit, or summarise a sweep.")
    commands = parser.add_subparsers(dest="action", required=True)
    submit = commands.add_parser("submit", help="submit the command lines read from stdin, one job each")
    submit.add_argument("--launcher", choices=("slurm", "submitit-local"), default="slurm")
    submit.add_argument("--folder", default="save/slurm", help="submitit's logs and the sweep's record")
    submit.add_argument("--after", default="", help="job ids (comma-separated) these jobs wait for (afterok)")
    # the defaults are the table scripts' settings from the environment (scripts/lib.sh), so
    # every tool that submits (ablate.py, tune.py) reads them the same way
    env = os.environ
    submit.add_argument("--partition", default=env.get("PARTITION", ""), help="default: $PARTITION")
    submit.add_argument("--time_limit", type=int, default=env.get("TIME_LIMIT", "1440"),
                        help="minutes per job (requeued past it); default: $TIME_LIMIT or 1440")
    submit.add_argument("--gpus_per_node", type=int, default=env.get("GPUS_PER_JOB", "1"),
                        help="default: $GPUS_PER_JOB or 1")
    submit.add_argument("--nodes", type=int, default=env.get("NODES_PER_JOB", "1"),
                        help="nodes per job (a torchrun group); default: $NODES_PER_JOB or 1")
    submit.add_argument("--cpus_per_task", type=int, default=env.get("CPUS_PER_JOB", "8"),
                        help="default: $CPUS_PER_JOB or 8")
    submit.add_argument("--mem_gb", type=float, default=env.get("MEM_GB") or None, help="default: $MEM_GB")
    submit.add_argument("--name", default="distillbench")
    submit.add_argument("--jobs", type=int, default=1, help="submitit-local: jobs at a time")
    status = commands.add_parser("status", help="finished, running and failed runs of a sweep")
    status.add_argument("--folder", default="save/slurm")
    args = parser.parse_args(argv)
    for name in ("time_limit", "nodes", "jobs"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def submit_to_slurm(executor, folder: Path, lines: list) -> list:
    """Submit the lines as one job array; the array's id (it stands for all its tasks in a
    later phase's afterok), or none when there is nothing to submit."""
    if not lines:
        return []
    from submitit.core.utils import FailedJobError
    try:
        jobs = submit_all(executor, folder, lines)
    except FailedJobError as refused:
        said = str(refused).strip().splitlines() or ["no message"]
        raise UserError(f"sbatch refused the jobs, nothing was submitted: {said[-1]}") from None
    arrays = list(dict.fromkeys(job.job_id.split("_")[0] for job in jobs))
    print(f"submitted {len(jobs)} runs as Slurm job(s) {','.join(arrays)}; their state: "
          f"python scripts/slurm.py status --folder {folder}", file=sys.stderr)
    return arrays


@exits_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.action == "status":
        return 1 if summarize(Path(args.folder))[1] else 0
    executor = make_executor(args)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    given = [line.strip() for line in sys.stdin if line.strip() and not line.startswith("#")]
    lines, going, live_jobs = still_to_run(folder, given)
    if args.launcher == "slurm":
        arrays = submit_to_slurm(executor, folder, lines)
        # what a later phase waits for: these jobs and the earlier ones still alive
        print(",".join(arrays + live_jobs))
        return 0
    run_here(executor, folder, lines, args.jobs, going)
    # this phase's runs only: a failure elsewhere in the sweep must not stop the script here
    # before it reaches (and resubmits) that run's phase
    counts, _ = summarize(folder, out=sys.stderr, lines=given)
    return 0 if counts["finished"] == len(set(given)) else 1

if __name__ == "__main__":
    sys.exit(main())

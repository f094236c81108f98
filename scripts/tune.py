"""Tune a method's weights and temperatures with Optuna (Akiba et al., KDD 2019): a seeded TPE
sampler (Bergstra et al., NeurIPS 2011), trials stopped by the median rule (Golovin et al.,
Google Vizier, KDD 2017) on the test top-1 that every epoch of a run reports, the study in a
database that any number of workers share.

    python scripts/tune.py --study kd_digits --n_trials 20 \\
        --search kd_T=float:1:8 --search alpha=float:0.1:2:log -- \\
        --dataset digits --distill kd --path_t save/teachers/resnet8_digits_trial0/best.pth --epochs 5
    python scripts/tune.py --study kd_digits --report      # table, figure and best command only
    python scripts/tune.py ... --launcher slurm --workers 8  # 8 Slurm jobs on one study

A search (--search NAME=SPEC, NAME a flag of train_student.py without its dashes, method
options included):
    NAME=float:LOW:HIGH[:log]   a real number (log: uniform in log space, LOW > 0)
    NAME=int:LOW:HIGH[:log]     an integer
    NAME=choice:A,B,...         one of the values, given to the flag as written
    NAME=bool                   a switch (--dot): given or not (--no-NAME where the flag has one)
The flags after `--` are the same for every trial. Each trial is a real train_student.py run,
a child process in its own run directory (<out>/students/trial_<k>); the worker reads the run's
metrics.csv as it grows, reports each epoch's test_top1 to the pruner, and stops a pruned run
with SIGTERM (the suite's clean stop). The trial's value is results.json's --metric.

The study lives in --storage (default sqlite:///<out>/study.db; any database URL Optuna takes,
e.g. postgresql://...), with the search space and command stored in it: a worker given other
ones is refused, a worker given the same ones joins. Workers keep a heartbeat: a trial whose
worker died (SIGKILL, a lost node) is failed once its heartbeat is older than twice
--heartbeat and retried with the same values, resuming the same run directory; a worker
stopped by SIGTERM/SIGINT (Slurm's preemption) hands its trial back at once the same way. A
finished trial (complete, pruned, or failed by its run) is never run again. Workers stop when
the study holds --n_trials finished trials, waiting for the others' running trials first.
"""
import argparse
import csv
import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from core.errors import UserError, exits_cleanly  # noqa: E402  (after the path insert)
from engine import lock  # noqa: E402
from engine.atomic import write_atomic  # noqa: E402
from engine.runs import ARGS_FILE, RESULTS_FILE, RUN_DIR_NOTE, read_results  # noqa: E402
from scripts.make_table import METRICS, add_metric_flag  # noqa: E402
from scripts.slurm import die_with, ended_how, find_prctl  # noqa: E402

DEFAULT_PROGRAM = "python train_student.py"
# flags the tuner sets on every trial: where its run lives, and that a retry resumes it
OWNED_FLAGS = ("--save_dir", "--run_name", "--resume", "--auto_resume")
KINDS = ("float", "int", "choice", "bool")
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*$")
POLL_S = 0.5
# a pruned or interrupted run stops after its current step; past this it is killed (its last
# completed epoch is on disk either way)
STOP_GRACE_S = 300
MAIN_STAGE = "main"
STUDY_ATTR = "tune"  # the study's user attribute holding its settings
# a run stopped by one of these exits with 128 + the signal, its last epoch kept (engine/signals.py)
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2}


class TrialFailed(Exception):
    """The trial's run ended with an error of its own (a non-finite loss, a crash): the trial
    fails and the study goes on."""


class TrialInterrupted(Exception):
    """The trial's run was stopped by a signal (this worker's, or a scheduler's notice that
    reached the run): the trial is handed back for a retry that resumes its run."""


class WorkerStopped(Exception):
    """This worker was told to stop (SIGTERM, SIGINT)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ----- the search space -----

@dataclass(frozen=True)
class Param:
    """One searched flag: `name` as the user wrote it, `flag` as train_student.py spells it."""
    name: str
    kind: str
    low: float = None
    high: float = None
    log: bool = False
    choices: tuple = ()

    @property
    def flag(self) -> str:
        return ("-" if len(self.name) == 1 else "--") + self.name

    def suggest(self, trial):
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_categorical(self.name, self.choices)

    def words(self, value, switches: dict) -> list:
        """The command-line words that give the flag `value`; `switches` maps a switch to its
        negative form, where it has one."""
        if self.kind == "bool":
            return [self.flag] if value else ([switches[self.flag]] if switches.get(self.flag) else [])
        return [self.flag, repr(value) if isinstance(value, float) else str(value)]


def parse_search(spec: str) -> Param:
    """A --search NAME=SPEC as a Param; a malformed one is a UserError naming the syntax."""
    syntax = "float:LOW:HIGH[:log], int:LOW:HIGH[:log], choice:A,B,... or bool"
    name, eq, body = spec.partition("=")
    name = name.strip().lstrip("-")
    if not eq or not NAME.match(name):
        raise UserError(f"--search {spec!r}: write NAME=SPEC with NAME a train_student.py flag without "
                        f"its dashes (kd_T=float:1:8); SPEC is {syntax}")
    kind, _, rest = body.partition(":")
    if kind not in KINDS:
        raise UserError(f"--search {spec!r}: the kind {kind!r} is not one of {', '.join(KINDS)} ({syntax})")
    if kind == "bool":
        if rest:
            raise UserError(f"--search {spec!r}: bool takes nothing after it")
        return Param(name, kind, choices=(True, False))
    if kind == "choice":
        choices = tuple(c.strip() for c in rest.split(","))
        if not rest or "" in choices or len(set(choices)) != len(choices):
            raise UserError(f"--search {spec!r}: choice wants distinct non-empty values, comma-separated")
        return Param(name, kind, choices=choices)
    return parse_range(spec, name, kind, rest.split(":"))


def parse_range(spec: str, name: str, kind: str, parts: list) -> Param:
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise UserError(f"--search {spec!r}: {kind} wants LOW:HIGH or LOW:HIGH:log")
    number = int if kind == "int" else float
    try:
        low, high = number(parts[0]), number(parts[1])
    except ValueError:
        raise UserError(f"--search {spec!r}: LOW and HIGH must be {kind} numbers") from None
    log = len(parts) == 3
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise UserError(f"--search {spec!r}: LOW must be below HIGH, both finite")
    if log and low <= 0:
        raise UserError(f"--search {spec!r}: a log range needs LOW > 0")
    return Param(name, kind, low, high, log)


# ----- train_student.py's flags, from its --help -----

@dataclass(frozen=True)
class Flag:
    """One option of the program: its spellings, whether it takes a value, its choices."""
    spellings: tuple
    takes_value: bool
    choices: tuple = ()


def read_flags(help_text: str) -> dict:
    """Every spelling of every option in argparse's --help text -> its Flag (`-a ALPHA, --alpha
    ALPHA`, `--dot`, `--compile, --no-compile`, `--mode {exact,relax}`)."""
    flags = {}
    for line in help_text.splitlines():
        match = re.match(r"^  (-[^ ].*?)(?:  |$)", line)
        if not match:
            continue
        forms = [form.split(" ", 1) for form in re.split(r", (?=-)", match.group(1))]
        metavar = forms[0][1] if len(forms[0]) > 1 else ""
        choices = tuple(metavar[1:-1].split(",")) if metavar.startswith("{") else ()
        flag = Flag(tuple(form[0] for form in forms), bool(metavar), choices)
        flags.update({spelling: flag for spelling in flag.spellings})
    return flags


def program_flags(program: list) -> dict:
    """The program's options, from its --help (the command line is the tuner's only contract
    with train_student.py)."""
    out = subprocess.run([*program, "--help"], capture_output=True, text=True, cwd=os.getcwd())
    flags = read_flags(out.stdout)
    if out.returncode != 0 or not flags:
        said = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"--program {shlex.join(program)!r} did not list its flags with --help ({said})")
    return flags


def check_space(params: list, command: list, flags: dict) -> dict:
    """Each searched name a flag of the program, of the right kind, searched once and not also
    fixed in the command; the fixed command leaves the run directory to the tuner. Returns the
    switches' negative forms (for bool searches)."""
    given = {flags[w.split("=", 1)[0]] for w in command if w.split("=", 1)[0] in flags}
    for word in command:
        if word.split("=", 1)[0] in OWNED_FLAGS:
            raise UserError(f"{word.split('=', 1)[0]} is set by the tuner (each trial has its own run "
                            "directory under --out); leave it out of the command after --")
    seen = set()
    for param in params:
        flag = flags.get(param.flag)
        if flag is None:
            raise UserError(f"--search {param.name}: {param.flag} is not a flag of the program (see "
                            "python train_student.py --help)")
        if flag in seen:
            raise UserError(f"--search {param.name}: {'/'.join(flag.spellings)} is searched twice")
        if flag in given:
            raise UserError(f"--search {param.name}: {'/'.join(flag.spellings)} is also given in the command "
                            "after --; give it in one place")
        if (param.kind == "bool") == flag.takes_value:
            fix = f"{param.name}=float:LOW:HIGH or another kind" if flag.takes_value else f"{param.name}=bool"
            raise UserError(f"--search {param.name}: {param.flag} {'takes a value' if flag.takes_value else 'is a switch'}; "
                            f"search it as {fix}")
        outside = [c for c in param.choices if flag.choices and c not in flag.choices]
        if param.kind == "choice" and outside:
            raise UserError(f"--search {param.name}: {', '.join(outside)} not among {param.flag}'s choices "
                            f"{', '.join(flag.choices)}")
        seen.add(flag)
    return {p.flag: next((s for s in flags[p.flag].spellings if s.startswith("--no-")), None)
            for p in params if p.kind == "bool"}


# ----- the study -----

def optuna_module():
    try:
        import optuna
    except ImportError:
        raise UserError("tuning needs Optuna: pip install 'distillbench[tune]' (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def sqlite_file(url: str):
    """The database file of a sqlite URL (None for other URLs and in-memory databases)."""
    if not url.startswith("sqlite:///") or url == "sqlite:///:memory:":
        return None
    return Path(url[len("sqlite:///"):])


def retry_callback(args):
    """What a trial whose worker died (or was stopped) gets: the same values queued again."""
    return optuna_module().storages.RetryHeartbeatStaleTrialCallback(max_retry=args.max_retry)


def make_storage(args):
    optuna = optuna_module()
    file = sqlite_file(args.storage)
    engine = {}
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        # workers wait for each other's writes rather than fail on a locked file
        engine = {"connect_args": {"timeout": 120}}
    try:
        storage = optuna.storages.RDBStorage(
            args.storage, engine_kwargs=engine, heartbeat_interval=args.heartbeat, grace_period=2 * args.heartbeat,
            heartbeat_stale_trial_callback=retry_callback(args))
    except Exception as err:  # SQLAlchemy's errors for a bad URL, a missing driver, a refused connection
        raise UserError(f"cannot open --storage {args.storage}: {str(err).splitlines()[0]}") from None
    if file is not None:
        serialize_sqlite(storage.engine)
    return storage


def serialize_sqlite(engine) -> None:
    """Make each of the engine's transactions take SQLite's write lock when it begins (BEGIN
    IMMEDIATE). Optuna claims a queued trial by reading its state and then writing it, guarded
    by SELECT ... FOR UPDATE, which SQLite ignores: in SQLite's default deferred transactions two
    workers both read WAITING and both take the trial (seen in tests/test_tune.py's two-worker
    study: two runs in one directory). This is SQLAlchemy's recipe for pysqlite's transactions."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def leave_begin_to_sqlalchemy(connection, record):
        connection.isolation_level = None  # pysqlite would otherwise begin (deferred) by itself

    @event.listens_for(engine, "begin")
    def begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while Optuna made its tables start afresh with the hooks


def stored_config(args, params) -> dict:
    return {"search": list(args.search), "command": args.command, "program": args.program,
            "metric": args.metric, "names": [p.name for p in params]}


def open_study(args, config: dict, check):
    """The study `args.study` in its storage; with a `config` (the search space, command,
    program, metric), created with it if new, refused if stored with another. `check()`
    validates the space against the program and returns the switches' negative forms, stored
    with the config; it runs before a new database file is made."""
    optuna = optuna_module()
    file = sqlite_file(args.storage)
    switches = check() if config is not None and (file is None or not file.exists()) else None
    storage = make_storage(args)
    sampler = optuna.samplers.TPESampler(n_startup_trials=args.random_trials, seed=args.seed + args.worker)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=args.prune_startup, n_warmup_steps=args.prune_warmup + 1)
              if args.pruner == "median" else optuna.pruners.NopPruner())
    try:
        study = optuna.load_study(study_name=args.study, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        if config is None:
            raise UserError(f"no study {args.study!r} in {args.storage}") from None
        study = optuna.create_study(study_name=args.study, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=True)
    if config is None:
        if STUDY_ATTR not in study.user_attrs:
            raise UserError(f"study {args.study!r} in {args.storage} was not made by scripts/tune.py")
        return study
    if STUDY_ATTR not in study.user_attrs:  # one attribute, written at once: a joining worker sees all or none
        study.set_user_attr(STUDY_ATTR, {**config, "switches": check() if switches is None else switches})
    stored = settings(study)
    differs = [f"{key} {stored.get(key)!r} (given: {value!r})" for key, value in config.items() if stored.get(key) != value]
    if differs:
        raise UserError(f"study {args.study!r} in {args.storage} was made with {'; '.join(differs)}; "
                        "give the same, or another --study")
    return study


def settings(study) -> dict:
    """The search space, command, program, metric and switches the study was made with."""
    return study.user_attrs[STUDY_ATTR]


def tally(study, max_retry: int) -> dict:
    """The study's trials by what they mean for its end: done (complete, pruned, failed by
    their run, or interrupted once more than --max_retry allows), running, waiting (a retry
    queued). An interrupted trial with retries left is none of these: its retry counts."""
    optuna = optuna_module()
    from optuna.trial import TrialState
    tries = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history
    counts = {"done": 0, "running": 0, "waiting": 0}
    for trial in study.get_trials(deepcopy=False):
        gave_up = trial.state == TrialState.FAIL and len(tries(trial)) >= max_retry
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or "failure" in trial.user_attrs or gave_up:
            counts["done"] += 1
        elif trial.state == TrialState.RUNNING:
            counts["running"] += 1
        elif trial.state == TrialState.WAITING:
            counts["waiting"] += 1
    return counts


# ----- one trial -----

class Worker:
    """Runs trials of one study until it holds --n_trials finished ones."""

    def __init__(self, args, study):
        self.args, self.study = args, study
        self.params = [parse_search(spec) for spec in settings(study)["search"]]
        self.switches = settings(study)["switches"]
        self.out = Path(args.out)
        self.retry = retry_callback(args)
        self.child = self.current = self.stop_signal = None

    def stop(self, signum, frame) -> None:
        """SIGTERM/SIGINT: the running trial's run stops after its current step, the trial is
        handed back, the worker ends."""
        self.stop_signal = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def run(self) -> None:
        previous = {signum: signal.signal(signum, self.stop) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.trials()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def trials(self) -> None:
        import optuna
        while self.stop_signal is None:
            optuna.storages.fail_stale_trials(self.study)
            counts = tally(self.study, self.args.max_retry)
            if counts["done"] >= self.args.n_trials:
                return
            if not counts["waiting"] and counts["done"] + counts["running"] >= self.args.n_trials:
                time.sleep(min(self.args.heartbeat, 5))  # the others' trials end the study, or come back
                continue
            try:
                self.study.optimize(self.objective, n_trials=1, catch=(TrialFailed,))
            except TrialInterrupted as interrupted:
                # failed by optimize; queued again with its values at once (as the heartbeat
                # would after a kill, only later)
                print(f"trial {self.current} interrupted ({interrupted}): queued again, its run resumes", flush=True)
                self.retry(self.study, next(t for t in self.study.get_trials(deepcopy=False)
                                            if t.number == self.current))
        raise WorkerStopped(self.stop_signal)

    def objective(self, trial) -> float:
        self.current = trial.number
        values = {p.name: p.suggest(trial) for p in self.params}
        # a retry carries its first try's user attributes: it resumes the same run directory
        run_name = trial.user_attrs.get("run") or f"trial_{trial.number}"
        trial.set_user_attr("run", run_name)
        run_dir = self.out / "students" / run_name
        log = self.out / "logs" / f"trial_{trial.number}.log"
        said = ", ".join(f"{name}={value!r}" for name, value in values.items())
        print(f"trial {trial.number} ({run_name}, worker {self.args.worker}): {said}; log {log}", flush=True)
        status = self.run_trial(trial, trial_command(self.args, self.params, values, self.switches, run_name),
                                run_dir, log)
        if self.stop_signal is not None:
            raise TrialInterrupted(f"this worker got {signal.Signals(self.stop_signal).name}")
        if status - 128 in STOP_SIGNALS:
            raise TrialInterrupted(ended_how(status))
        if status == 2:
            raise UserError(f"trial {trial.number}'s command was refused: {last_line(log)}; fix --search or the "
                            f"command after -- (log: {log})")
        if status != 0:
            trial.set_user_attr("failure", f"{ended_how(status)}: {last_line(log)}")
            print(f"trial {trial.number} failed: {trial.user_attrs['failure']} (log: {log})", flush=True)
            raise TrialFailed(trial.user_attrs["failure"])
        results = read_results(run_dir / RESULTS_FILE) or {}
        if METRICS[self.args.metric] not in results:
            trial.set_user_attr("failure", f"no {METRICS[self.args.metric]} in {run_dir / RESULTS_FILE}")
            raise TrialFailed(trial.user_attrs["failure"])
        value = float(results[METRICS[self.args.metric]])
        print(f"trial {trial.number} complete: {self.args.metric} top-1 {value:.2f}", flush=True)
        return value

    def run_trial(self, trial, command: list, run_dir: Path, log: Path) -> int:
        """Run the trial's command as a child process (it ends with this worker, however the
        worker ends), feeding its epochs to the pruner; its exit status."""
        import optuna
        log.parent.mkdir(parents=True, exist_ok=True)
        wait_for_release(run_dir)
        # the trials are not a launcher's runs: the worker is (scripts/slurm.py)
        env = {k: v for k, v in os.environ.items() if k != RUN_DIR_NOTE}
        prctl, me = find_prctl(), os.getpid()
        with open(log, "ab") as out:
            self.child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                          preexec_fn=lambda: die_with(prctl, me, signal.SIGTERM))
        if self.stop_signal is not None:  # a signal between the check and the start
            self.child.send_signal(signal.SIGTERM)
        pruned = watch(self.child, run_dir / "metrics.csv", trial)
        status = self.child.returncode
        self.child = None
        if pruned and self.stop_signal is None:
            print(f"trial {trial.number} pruned at epoch {pruned[0]}: top-1 {pruned[1]:.2f}", flush=True)
            raise optuna.TrialPruned(f"epoch {pruned[0]}: test top-1 {pruned[1]:.2f}")
        return status


def wait_for_release(run_dir: Path) -> None:
    """A retry's run directory may still be held by the killed worker's run, stopping after its
    step (it got SIGTERM when its worker died): wait for it, as long as a stop may take."""
    deadline = time.monotonic() + STOP_GRACE_S
    while run_dir.is_dir() and lock.holder(run_dir) and time.monotonic() < deadline:
        time.sleep(POLL_S)


def trial_command(args, params: list, values: dict, switches: dict, run_name: str) -> list:
    words = [w for p in params for w in p.words(values[p.name], switches)]
    return [*program_words(args.program), *args.command, *words, "--save_dir", str(Path(args.out).resolve()),
            "--run_name", run_name, "--auto_resume"]


def program_words(program: str) -> list:
    """The program's words; the default's `python` is this interpreter."""
    words = shlex.split(program)
    if program == DEFAULT_PROGRAM:
        return [sys.executable, str(ROOT / "train_student.py")]
    return words


def watch(child, metrics: Path, trial):
    """Until `child` ends: report each new main-stage epoch's test_top1 of `metrics` (a growing
    metrics.csv) to `trial`; when the pruner says so, stop the child with SIGTERM and wait for
    it (never after the run's last epoch, which args.json beside it gives). Returns (epoch,
    top-1) of the epoch that pruned it, or None."""
    reported, pruned = 0, None
    while True:
        ended = child.poll() is not None
        for epoch, top1 in new_epochs(metrics, reported):
            trial.report(top1, epoch)
            reported = epoch
            if pruned is None and not ended and epoch < last_epoch(metrics.parent) and trial.should_prune():
                pruned = (epoch, top1)
                child.send_signal(signal.SIGTERM)
                break
        if ended or pruned:
            break
        time.sleep(POLL_S)
    try:
        child.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    return pruned


def last_epoch(run_dir: Path) -> float:
    """The run's --epochs from its args.json (unknown: infinity)."""
    try:
        return int(json.loads((run_dir / ARGS_FILE).read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.inf


def new_epochs(metrics: Path, after: int) -> list:
    """(epoch, test_top1) of the main stage's complete rows past epoch `after` (a row still being
    written, without its newline, is left for the next look)."""
    try:
        text = metrics.read_text()
    except (OSError, UnicodeDecodeError):
        return []
    text = text[:text.rfind("\n") + 1]
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        try:
            epoch, top1 = int(row["epoch"]), float(row["test_top1"])
        except (KeyError, TypeError, ValueError):
            continue
        if row.get("stage") == MAIN_STAGE and epoch > after:
            rows.append((epoch, top1))
    return rows


def last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"


# ----- the report -----

def best_command(study) -> str:
    """The command line that reproduces the best trial (in the default save directory)."""
    config = settings(study)
    best = study.best_trial
    words = [w for spec in config["search"] for p in [parse_search(spec)]
             for w in p.words(best.params[p.name], config["switches"])]
    return shlex.join([*shlex.split(config["program"]), *config["command"], *words])


def export(study, out: Path) -> list:
    """trials.csv, trials.md and the parallel-coordinates figure (PNG and PDF) in `out`; the
    paths written."""
    names, metric = settings(study)["names"], settings(study)["metric"]
    header = ["trial", "state", f"{metric}_top1", *names, "epochs", "run"]
    rows = []
    for t in study.get_trials(deepcopy=False):
        value = "" if t.value is None else f"{t.value:.2f}"
        epochs = max(t.intermediate_values, default="")
        state = t.state.name.lower() + (f" ({t.user_attrs['failure']})" if "failure" in t.user_attrs else "")
        rows.append([t.number, state, value, *(fmt(t.params.get(n, "")) for n in names), epochs,
                     t.user_attrs.get("run", "")])
    text = io.StringIO(newline="")
    csv.writer(text).writerows([header, *rows])
    write_atomic(out / "trials.csv", text.getvalue().encode())
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    write_atomic(out / "trials.md", ("\n".join(md) + "\n").encode())
    return [out / "trials.csv", out / "trials.md", *figure(study, out, metric)]


def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def figure(study, out: Path, metric: str) -> list:
    """Parallel coordinates (PNG and PDF): a line per complete trial through its values, each on
    its searched range (log where searched so), ending at its top-1, coloured by it, the best
    one in red; pruned trials dashed grey, ending at the top-1 of the epoch that pruned them.
    Optuna's own plot draws complete trials only and loses the lines at an axis's ends."""
    from optuna.trial import TrialState
    params = [parse_search(spec) for spec in settings(study)["search"]]
    drawn = [t for t in study.get_trials(deepcopy=False) if set(t.params) >= {p.name for p in params}
             and (t.state == TrialState.COMPLETE or (t.state == TrialState.PRUNED and t.intermediate_values))]
    complete = [t for t in drawn if t.state == TrialState.COMPLETE]
    if not complete:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    score = {t.number: t.value if t.value is not None else t.intermediate_values[max(t.intermediate_values)]
             for t in drawn}
    low, high = min(score.values()), max(score.values())
    high = high if high > low else low + 1
    axes = [(p.name, lambda t, p=p: position(p, t.params[p.name]), ticks(p)) for p in params]
    label = f"{metric}-epoch top-1 (%)"
    axes.append((label, lambda t: (score[t.number] - low) / (high - low),
                 [((v - low) / (high - low), f"{v:.1f}") for v in (low + k * (high - low) / 4 for k in range(5))]))
    fig, ax = plt.subplots(figsize=(2.2 * len(axes) + 1.5, 4.5))
    colours = plt.get_cmap("viridis")
    best = study.best_trial.number
    for t in sorted(drawn, key=lambda t: (t.number == best, t.state == TrialState.COMPLETE, score[t.number])):
        ys = [where(t) for _, where, _ in axes]
        if t.state == TrialState.PRUNED:
            ax.plot(range(len(axes)), ys, color="0.6", linestyle="--", linewidth=1)
        else:
            ax.plot(range(len(axes)), ys, color="tab:red" if t.number == best else colours(ys[-1]),
                    linewidth=3 if t.number == best else 1.6)
    for x, (_, _, marks) in enumerate(axes):
        ax.axvline(x, color="black", linewidth=0.8)
        for y, text in marks:
            ax.text(x - 0.04, y, text, ha="right", va="center", fontsize=8, zorder=5,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    ax.set_xticks(range(len(axes)), [name for name, _, _ in axes])
    ax.set_yticks([])
    ax.set_ylim(-0.06, 1.06)
    ax.set_xlim(-0.45, len(axes) - 0.8)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    fig.colorbar(plt.cm.ScalarMappable(norm=plt.Normalize(low, high), cmap=colours), ax=ax, label=label)
    ax.plot([], [], color="tab:red", linewidth=3, label=f"best: trial {best}")
    if len(complete) < len(drawn):
        ax.plot([], [], color="0.6", linestyle="--", label="pruned (top-1 when pruned)")
    ax.legend(loc="upper left", bbox_to_anchor=(0, -0.1), ncol=2, frameon=False, fontsize=8)
    ax.set_title(f"{study.study_name}: {len(complete)} complete and {len(drawn) - len(complete)} pruned trials")
    fig.tight_layout()
    paths = []
    for suffix in ("png", "pdf"):
        data = io.BytesIO()
        fig.savefig(data, format=suffix, dpi=150)
        write_atomic(out / f"parallel_coordinates.{suffix}", data.getvalue())
        paths.append(out / f"parallel_coordinates.{suffix}")
    plt.close(fig)
    return paths


def position(param: Param, value) -> float:
    """Where `value` lies on the axis of `param`, 0 to 1: on its searched range (in log space
    where searched so), or by the order of its choices."""
    if param.kind in ("choice", "bool"):
        return param.choices.index(value) / (len(param.choices) - 1)
    scale = math.log if param.log else float
    return (scale(value) - scale(param.low)) / (scale(param.high) - scale(param.low))


def ticks(param: Param) -> list:
    """(position, label) of the axis's marks: every choice, or five values across the range."""
    if param.kind in ("choice", "bool"):
        return [(position(param, c), str(c)) for c in param.choices]
    if param.log:
        values = [param.low * (param.high / param.low) ** (k / 4) for k in range(5)]
    else:
        values = [param.low + (param.high - param.low) * k / 4 for k in range(5)]
    return [(position(param, v), f"{v:.3g}") for v in values]


def report(study, out: Path) -> None:
    """Print the study's counts and best command; export its table and figure."""
    from optuna.trial import TrialState
    out.mkdir(parents=True, exist_ok=True)
    written = export(study, out)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = ", ".join(f"{states.count(s)} {s.name.lower()}" for s in TrialState if states.count(s))
    print(f"study {study.study_name}: {counts or 'no trials'}; table and figure: "
          f"{', '.join(str(p) for p in written)}")
    if TrialState.COMPLETE in states:
        best = study.best_trial
        print(f"best trial {best.number}: {settings(study)['metric']}-epoch top-1 {best.value:.2f}; "
              f"reproduce it with:\n  {best_command(study)}")


# ----- workers through the launchers -----

def worker_lines(argv: list, args) -> list:
    """One `python scripts/tune.py ... --worker k` line per worker, run by this interpreter, with
    --out and --storage absolute (a job runs in the checkout's root)."""
    kept, skip = [], False
    for word in argv[:argv.index("--")] if "--" in argv else argv:
        if skip:
            skip = False
            continue
        name = word.split("=", 1)[0]
        if name in ("--launcher", "--workers", "--out", "--storage", "--worker"):
            skip = "=" not in word
            continue
        if name != "--dry-run":
            kept.append(word)
    command = argv[argv.index("--"):] if "--" in argv else ["--", *args.command]
    base = [sys.executable, "scripts/tune.py", *kept, "--out", str(Path(args.out).resolve()), "--storage", args.storage]
    return [shlex.join([*base, "--worker", str(k), *command]) for k in range(args.workers)]


def launch(lines: list, args) -> int:
    """Hand the worker lines to scripts/slurm.py submit (a job each; the launcher the table
    scripts use), which reads the table scripts' Slurm settings from the environment."""
    submit = [sys.executable, str(ROOT / "scripts" / "slurm.py"), "submit", "--launcher", args.launcher,
              "--folder", str(Path(args.out).resolve() / "slurm"), "--jobs", str(args.workers),
              "--name", f"tune-{args.study}"]
    return subprocess.run(submit, input="".join(line + "\n" for line in lines), text=True, cwd=ROOT).returncode


# ----- command line -----

def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Tune train_student.py's flags with Optuna (TPE, median pruning); the flags after -- are "
                    "every trial's.", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--study", default="tune", help="the study's name in the storage (default: tune)")
    parser.add_argument("--out", default=None, help="trials' run directories, logs, table and figure "
                                                    "(default: save/tune/<study>)")
    parser.add_argument("--storage", default=None, help="database URL (default: sqlite:///<out>/study.db)")
    parser.add_argument("--search", action="append", default=[], metavar="NAME=SPEC",
                        help="a searched flag (see below); repeat for each")
    parser.add_argument("--n_trials", type=int, default=20, help="finished trials the study wants, all workers together")
    add_metric_flag(parser)
    parser.add_argument("--pruner", choices=("median", "none"), default="median")
    parser.add_argument("--prune_warmup", type=int, default=1, help="epochs of a trial never pruned (default 1)")
    parser.add_argument("--prune_startup", type=int, default=5, help="complete trials before any is pruned (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="TPE's seed; worker k samples with seed + k")
    parser.add_argument("--random_trials", type=int, default=10,
                        help="trials drawn at random before TPE models the others (default 10, Optuna's)")
    parser.add_argument("--worker", type=int, default=0, help="this worker's number (its sampler's seed offset)")
    parser.add_argument("--heartbeat", type=int, default=60,
                        help="seconds between a running trial's heartbeats; a trial silent for twice this is retried")
    parser.add_argument("--max_retry", type=int, default=3, help="retries of a trial whose worker died")
    parser.add_argument("--program", default=DEFAULT_PROGRAM,
                        help="what runs a trial, before its flags (e.g. 'torchrun --standalone --nproc_per_node 4 "
                             "train_student.py')")
    parser.add_argument("--report", action="store_true", help="only print the best command and export the table "
                                                              "and figure of the stored study")
    parser.add_argument("--launcher", choices=("here", "slurm", "submitit-local"), default="here",
                        help="here: this process is a worker; slurm / submitit-local: submit --workers worker jobs "
                             "through scripts/slurm.py")
    parser.add_argument("--workers", type=int, default=1, help="with --launcher slurm or submitit-local")
    parser.add_argument("--dry-run", action="store_true", help="print the workers' command lines, run nothing")
    ours, command = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser.parse_args(ours)
    args.command = command
    for name in ("n_trials", "heartbeat", "workers"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("prune_warmup", "prune_startup", "seed", "random_trials", "worker", "max_retry"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not NAME.match(args.study):
        raise UserError(f"--study must be a plain name (letters, digits, _), got {args.study!r}")
    args.out = args.out or str(Path("save") / "tune" / args.study)
    args.storage = args.storage or f"sqlite:///{Path(args.out).resolve() / 'study.db'}"
    file = sqlite_file(args.storage)
    if file is not None and not file.is_absolute():  # the same file for workers started elsewhere
        args.storage = f"sqlite:///{file.resolve()}"
    if not args.report and not args.search:
        raise UserError("nothing to search: give --search NAME=SPEC (e.g. --search kd_T=float:1:8), or --report")
    return args


@exits_cleanly
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.report:
        study = open_study(args, None, None)
        report(study, Path(args.out))
        return 0
    params = [parse_search(spec) for spec in args.search]
    if args.dry_run:
        print("\n".join(worker_lines(argv, args)))
        return 0
    study = open_study(args, stored_config(args, params),
                       lambda: check_space(params, args.command, program_flags(program_words(args.program))))
    if args.launcher != "here":
        return launch(worker_lines(argv, args), args)
    worker = Worker(args, study)
    try:
        worker.run()
    except WorkerStopped as stopped:
        print(f"stopped: {stopped}; this worker's trial goes back to the study, run the same command to go on",
              file=sys.stderr)
        return 128 + stopped.signum
    report(study, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/tune.py: the search-space syntax, the pruning hook on a growing metrics.csv, the best
trial's command parsed back by train_student.py's parser, and a digits study shared by two
workers and resumed after one of them is killed."""
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest

import train_student
from conftest import ROOT
from core.errors import UserError
from scripts import tune

HELP = train_student.build_parser().format_help()
FLAGS = tune.read_flags(HELP)
WRAPPER = f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'tests' / 'quarter_student.py'))}"


@pytest.mark.parametrize("spec, expected", [
    ("kd_T=float:1:8", tune.Param("kd_T", "float", 1.0, 8.0)),
    ("alpha=float:0.01:2:log", tune.Param("alpha", "float", 0.01, 2.0, log=True)),
    ("--nce_k=int:256:16384:log", tune.Param("nce_k", "int", 256, 16384, log=True)),
    ("init_epochs=int:0:30", tune.Param("init_epochs", "int", 0, 30)),
    ("mode=choice:exact,relax", tune.Param("mode", "choice", choices=("exact", "relax"))),
    ("dot=bool", tune.Param("dot", "bool", choices=(True, False))),
    ("a=float:0:2", tune.Param("a", "float", 0.0, 2.0)),
])
def test_search_specs(spec, expected):
    param = tune.parse_search(spec)
    assert param == expected
    assert param.flag == ("-a" if param.name == "a" else "--" + param.name)


BAD_SPECS = ["kd_T", "kd_T=", "kd_T=normal:1:2", "kd_T=float:8:1", "kd_T=float:1:1", "kd_T=float:1",
             "kd_T=float:1:x", "alpha=float:0:2:log", "kd_T=float:1:2:exp", "kd_T=float:1:inf", "nce_k=int:1.5:3",
             "mode=choice:", "mode=choice:exact,,relax", "mode=choice:exact,exact", "dot=bool:1", "=float:1:2",
             "../x=float:1:2"]


@pytest.mark.parametrize("spec", BAD_SPECS)
def test_bad_spec_is_one_line_before_anything_is_written(spec, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        tune.main(["--out", str(tmp_path / "out"), "--search", spec, "--", "--dataset", "digits"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --search") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_flags_read_from_the_real_help():
    assert FLAGS["-a"] is FLAGS["--alpha"] and FLAGS["-a"].takes_value
    assert not FLAGS["--dot"].takes_value
    assert FLAGS["--mode"].choices == ("exact", "relax")
    assert FLAGS["--no-compile"] is FLAGS["--compile"]


@pytest.mark.parametrize("specs, command, said", [
    (["kd_TT=float:1:8"], [], "--kd_TT is not a flag"),
    (["alpha=float:0:2", "a=float:0:1"], [], "searched twice"),
    (["alpha=float:0:2"], ["-a", "0.9"], "also given in the command"),
    (["kd_T=float:1:8"], ["--kd_T=4"], "also given in the command"),
    (["dot=float:0:1"], [], "is a switch"),
    (["kd_T=bool"], [], "takes a value"),
    (["mode=choice:exact,fast"], [], "fast not among --mode's choices"),
    (["kd_T=float:1:8"], ["--save_dir", "x"], "--save_dir is set by the tuner"),
    (["kd_T=float:1:8"], ["--auto_resume"], "--auto_resume is set by the tuner"),
])
def test_space_checked_against_the_program(specs, command, said, tmp_path, monkeypatch, capsys):
    with pytest.raises(UserError, match=said):
        tune.check_space([tune.parse_search(s) for s in specs], command, FLAGS)
    # through the command line: one line, status 2, no database
    monkeypatch.setattr(tune, "program_flags", lambda program: FLAGS)
    argv = ["--out", str(tmp_path / "out"), *(w for s in specs for w in ("--search", s)), "--", *command]
    with pytest.raises(SystemExit) as stop:
        tune.main(argv)
    assert stop.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_best_command_parses_back(tmp_path):
    """The best trial's command, read by train_student.py's own parser, sets every searched
    value exactly, and the fixed flags."""
    specs = ["kd_T=float:1:8", "a=float:0.01:2:log", "nce_k=int:16:4096:log", "mode=choice:exact,relax", "dot=bool",
             "logit_stand=bool"]
    params = [tune.parse_search(s) for s in specs]
    study = optuna.create_study(direction="maximize")
    command = ["--dataset", "digits", "--distill", "crd", "--path_t", str(tmp_path / "best.pth"), "--epochs", "3"]
    config = {"search": specs, "command": command, "program": tune.DEFAULT_PROGRAM, "metric": "last",
              "names": [p.name for p in params], "switches": tune.check_space(params, command, FLAGS)}
    study.set_user_attr("tune", config)
    chosen = {"kd_T": 3.141592653589793, "a": 0.123456789012345, "nce_k": 1234, "mode": "relax", "dot": True,
              "logit_stand": False}
    distributions = {p.name: optuna.distributions.FloatDistribution(p.low, p.high, log=p.log) if p.kind == "float"
                     else optuna.distributions.IntDistribution(p.low, p.high, log=p.log) if p.kind == "int"
                     else optuna.distributions.CategoricalDistribution(p.choices) for p in params}
    study.add_trial(optuna.create_trial(params={**chosen, "kd_T": 2.0}, distributions=distributions, value=50.0))
    study.add_trial(optuna.create_trial(params=chosen, distributions=distributions, value=60.0))
    words = shlex.split(tune.best_command(study))
    assert words[:2] == ["python", "train_student.py"]
    args = train_student.parse_args(words[2:])
    assert (args.kd_T, args.alpha, args.nce_k, args.mode, args.dot, args.logit_stand) == \
        (3.141592653589793, 0.123456789012345, 1234, "relax", True, False)
    assert (args.dataset, args.distill, args.epochs) == ("digits", "crd", 3)


FAKE_RUN = textwrap.dedent("""
    import sys, time
    path, values = sys.argv[1], sys.argv[2:]
    with open(path, "w") as f:
        f.write("stage,epoch,test_top1\\ninit,1,1.0\\n")
    for epoch, value in enumerate(values, 1):
        time.sleep(0.05)
        with open(path, "a") as f:
            f.write(f"main,{epoch},{value}\\n")
            f.flush()
            f.write("main,99,")  # a row being written: the watcher waits for its newline
        with open(path, "r+") as f:
            text = f.read()
            f.seek(0)
            f.truncate()
            f.write(text[:text.rindex("\\n") + 1])
    time.sleep(120)  # until stopped
""")


def test_pruning_stops_the_run_at_the_pruned_epoch(tmp_path):
    """A run whose metrics.csv grows one epoch at a time: every main-stage epoch reaches the
    trial, and the first one under the threshold stops the run with SIGTERM; the last epoch
    (args.json's) is never pruned."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=50.0))
    trial = study.ask()
    metrics = tmp_path / "metrics.csv"
    (tmp_path / "args.json").write_text('{"epochs": 4}')
    child = subprocess.Popen([sys.executable, "-c", FAKE_RUN, str(metrics), "90", "70", "20", "95"])
    pruned = tune.watch(child, metrics, trial)
    assert pruned == (3, 20.0)
    assert child.returncode == -signal.SIGTERM
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert study.trials[0].intermediate_values == {1: 90.0, 2: 70.0, 3: 20.0}
    (tmp_path / "args.json").write_text('{"epochs": 3}')
    child = subprocess.Popen([sys.executable, "-c", FAKE_RUN.replace("time.sleep(120)", "pass"), str(metrics),
                              "90", "70", "20"])
    assert tune.watch(child, metrics, study.ask()) is None and child.returncode == 0


def test_an_unpruned_run_reports_every_epoch(tmp_path):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    metrics = tmp_path / "metrics.csv"
    fake = FAKE_RUN.replace("time.sleep(120)", "pass")
    child = subprocess.Popen([sys.executable, "-c", fake, str(metrics), "10", "30"])
    assert tune.watch(child, metrics, trial) is None and child.returncode == 0
    study.tell(trial, 30.0)
    assert study.trials[0].intermediate_values == {1: 10.0, 2: 30.0}


def test_worker_lines_for_the_launchers(tmp_path, capsys):
    argv = ["--study", "s", "--out", str(tmp_path / "o"), "--search", "kd_T=float:1:8", "--launcher", "slurm",
            "--workers", "3", "--dry-run", "--", "--dataset", "digits", "--epochs", "2"]
    assert tune.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and not (tmp_path / "o").exists()
    for k, line in enumerate(lines):
        words = shlex.split(line)
        assert words[:2] == [sys.executable, "scripts/tune.py"]
        args = tune.parse_args(words[2:])
        assert (args.worker, args.launcher, args.search, args.command) == \
            (k, "here", ["kd_T=float:1:8"], ["--dataset", "digits", "--epochs", "2"])
        assert args.storage == f"sqlite:///{tmp_path / 'o' / 'study.db'}"


FAKE_PROGRAM = textwrap.dedent("""
    # a stand-in for train_student.py: its --help lists --kd_T; a run appends its argv to
    # calls.txt, then exits with the status its run directory's first line of plan.txt gives
    # (one line used per start), having written results.json when that status is 0
    import json, os, sys
    if "--help" in sys.argv:
        print("options:\\n  --kd_T KD_T  the temperature\\n  --dot  a switch")
        sys.exit(0)
    argv = sys.argv[1:]
    run = os.path.join(argv[argv.index("--save_dir") + 1], "students", argv[argv.index("--run_name") + 1])
    os.makedirs(run, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "calls.txt"), "a") as f:
        f.write(" ".join(argv) + "\\n")
    with open(os.path.join(here, "plan.txt")) as f:
        plan = f.read().split()
    with open(os.path.join(here, "plan.txt"), "w") as f:
        f.write(" ".join(plan[1:]))
    if plan[0] == "stop":  # the worker is told to stop (a Slurm preemption): it stops this run
        import signal, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(60)
    status = int(plan[0])
    if status == 0:
        with open(os.path.join(run, "results.json"), "w") as f:
            json.dump({"last_top1": 10 * float(argv[argv.index("--kd_T") + 1]), "best_top1": 0}, f)
    print("stopped: SIGTERM at step 3 of main 1/1" if status == 143 else "the run's last line")
    sys.exit(status)
""")


def fake_study(tmp_path, plan: str, *flags):
    """scripts/tune.py in this process on FAKE_PROGRAM, whose successive runs exit with the
    statuses of `plan`: (exit status, the study, the runs' command lines)."""
    (tmp_path / "fake.py").write_text(FAKE_PROGRAM)
    (tmp_path / "plan.txt").write_text(plan)
    argv = ["--study", "fake", "--out", str(tmp_path / "out"), "--program", f"{sys.executable} {tmp_path / 'fake.py'}",
            "--search", "kd_T=float:1:8", "--pruner", "none", *flags, "--", "--epochs", "1"]
    try:
        status = tune.main(argv)
    except SystemExit as stop:
        status = stop.code
    study = optuna.load_study(study_name="fake", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    return status, study, calls


def test_a_run_stopped_by_a_signal_is_retried_in_its_run_directory(tmp_path):
    """A run that exits 128 + SIGTERM (a scheduler's notice reached it): its trial is handed
    back at once and its values run again with --auto_resume in the same run directory; a
    complete trial is never run again."""
    status, study, calls = fake_study(tmp_path, "143 0 143 0", "--n_trials", "2")
    assert status == 0
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    assert [t.user_attrs["run"] for t in study.trials] == ["trial_0", "trial_0", "trial_2", "trial_2"]
    assert study.trials[1].params == study.trials[0].params and study.trials[3].params == study.trials[2].params
    assert len(calls) == 4 and calls[0] == calls[1] and calls[2] == calls[3] and "--auto_resume" in calls[0]
    assert study.trials[1].value == pytest.approx(10 * study.trials[1].params["kd_T"])


def test_a_stopped_worker_hands_its_trial_back(tmp_path, capsys):
    """SIGTERM to the worker: it stops its run, queues the trial's values again and exits 143;
    the same command again resumes that trial's run and ends the study."""
    status, study, calls = fake_study(tmp_path, "stop 0", "--n_trials", "1")
    assert status == 128 + signal.SIGTERM and "stopped: SIGTERM" in capsys.readouterr().err
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]
    assert study.trials[1].params == study.trials[0].params and study.trials[1].user_attrs["run"] == "trial_0"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the worker's handler is gone with it
    status, study, calls = fake_study(tmp_path, "0", "--n_trials", "1")
    assert status == 0 and [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"] and calls[0] == calls[1]


def test_failures_count_and_retries_end(tmp_path):
    """A run that fails (status 1) is a finished trial with its reason; a run stopped more often
    than --max_retry allows is given up, so the study still ends."""
    status, study, calls = fake_study(tmp_path, "1 143 143", "--n_trials", "2", "--max_retry", "1")
    assert status == 0 and len(calls) == 3
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL", "FAIL"]
    assert study.trials[0].user_attrs["failure"] == "exit status 1: the run's last line"
    assert "failure" not in study.trials[2].user_attrs and study.trials[2].user_attrs["run"] == "trial_1"


def test_a_refused_trial_command_stops_the_worker(tmp_path, capsys):
    status, study, calls = fake_study(tmp_path, "2 0", "--n_trials", "2")
    assert status == 2 and len(calls) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: trial 0's command was refused: the run's last line;") and "\n" not in err


def test_a_worker_with_another_space_is_refused(tmp_path, capsys):
    fake_study(tmp_path, "0", "--n_trials", "1")
    with pytest.raises(SystemExit) as stop:
        tune.main(["--study", "fake", "--out", str(tmp_path / "out"), "--search", "kd_T=float:1:9", "--",
                   "--epochs", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "was made with search ['kd_T=float:1:8'] (given: ['kd_T=float:1:9']); program " in err


def start_worker(out, teacher, worker: int, log, **env):
    argv = [sys.executable, str(ROOT / "scripts" / "tune.py"), "--study", "kd", "--out", str(out), "--n_trials", "2",
            "--heartbeat", "1", "--worker", str(worker), "--program", WRAPPER, "--pruner", "none",
            "--search", "kd_T=float:1:8", "--search", "a=float:0.1:2:log", "--",
            "--dataset", "digits", "--path_t", str(teacher), "--distill", "kd", "--epochs", "1", "--batch_size", "128",
            "--amp", "off", "--no-channels_last", "--print_freq", "5"]
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_two_workers_share_a_study_and_resume_a_killed_one(digits_teacher, tmp_path):
    """Worker 0 is killed (SIGKILL) inside its first trial (its run held before it starts);
    once that trial's heartbeat (1 s) is past its grace (2 s), workers 1 and 2 share the same
    SQLite file: one fails the trial and runs its values again in its run directory while the
    other runs a new trial, and the study ends with 2 complete trials and its best command."""
    _, teacher_dir = digits_teacher
    out = tmp_path / "tune"
    with open(tmp_path / "w0.log", "w") as log:
        first = start_worker(out, teacher_dir / "best.pth", 0, log, QUARTER_STUDENT_HOLD="1")
        while not (out / "logs" / "trial_0.log").exists():  # the trial is running: its run started
            assert first.poll() is None, (tmp_path / "w0.log").read_text()
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait()
    time.sleep(3)  # past the grace: the next worker to look finds trial 0 stale
    logs = [open(tmp_path / f"w{k}.log", "w") for k in (1, 2)]
    workers = [start_worker(out, teacher_dir / "best.pth", k, log) for k, log in zip((1, 2), logs)]
    for worker, log in zip(workers, logs):
        assert worker.wait(timeout=600) == 0, (tmp_path / f"w{logs.index(log) + 1}.log").read_text()
        log.close()
    study = optuna.load_study(study_name="kd", storage=f"sqlite:///{out / 'study.db'}")
    states = {t.number: t.state.name for t in study.trials}
    assert states[0] == "FAIL" and "failure" not in study.trials[0].user_attrs
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2 and list(states.values()).count("FAIL") == 1
    runs = [t.user_attrs["run"] for t in complete]
    assert "trial_0" in runs and len(set(runs)) == 2  # the killed trial's values, in its own run directory
    retry = next(t for t in complete if t.user_attrs["run"] == "trial_0")
    assert retry.params == study.trials[0].params
    for trial in complete:
        assert (out / "students" / trial.user_attrs["run"] / "results.json").is_file()
    said = (tmp_path / "w1.log").read_text() + (tmp_path / "w2.log").read_text()
    best = said.split("reproduce it with:\n")[-1].splitlines()[0]
    words = shlex.split(best)
    assert shlex.join(words[:2]) == WRAPPER
    args = train_student.parse_args(words[2:])
    assert (args.kd_T, args.alpha) == (study.best_params["kd_T"], study.best_params["a"])
    assert {"trials.csv", "trials.md", "parallel_coordinates.png", "parallel_coordinates.pdf"} <= \
        {p.name for p in out.iterdir()}
    assert len((out / "trials.csv").read_text().splitlines()) == 1 + len(study.trials)


def test_an_unusable_storage_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tune, "program_flags", lambda program: FLAGS)
    with pytest.raises(SystemExit) as stop:
        tune.main(["--storage", "nosuchdb://host/x", "--out", str(tmp_path / "out"), "--search", "kd_T=float:1:8"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("error: cannot open --storage nosuchdb://host/x") and "\n" not in err


def test_figure_axes_place_values_on_the_searched_range():
    log = tune.parse_search("alpha=float:0.1:10:log")
    assert tune.position(log, 1.0) == pytest.approx(0.5) and tune.position(log, 10.0) == pytest.approx(1.0)
    assert [label for _, label in tune.ticks(log)] == ["0.1", "0.316", "1", "3.16", "10"]
    linear = tune.parse_search("kd_T=float:1:9")
    assert tune.position(linear, 3.0) == pytest.approx(0.25)
    choice = tune.parse_search("gamma=choice:0.1,0.5,1")
    assert [tune.position(choice, c) for c in ("0.1", "0.5", "1")] == [0.0, 0.5, 1.0]

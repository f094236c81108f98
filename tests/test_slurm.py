"""The submitit launcher (scripts/slurm.py, the table scripts' --launcher): a sweep run through
submitit's local executor in which one job gets the scheduler's notice mid-run is requeued and
ends with every run complete and equal to an uninterrupted run; a digits table whose run was
killed finishes, with its table, when the script runs again; a killed job takes its run with
it; the Slurm submission (a fake sbatch records it) carries the partition, GPUs, time limit,
notice and the phases' dependency; `status` sorts the runs into finished, running, failed and
not started by their run directories; the rendezvous of torchrun groups."""
import fcntl
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

pytest.importorskip("submitit")
from submitit.core.utils import JobPaths, cloudpickle_dump  # noqa: E402

from engine import lock  # noqa: E402
from scripts import chaos, slurm  # noqa: E402

EPOCHS = 4
TEACHER = [sys.executable, "train_teacher.py", "--model", "resnet8", "--dataset", "digits", "--epochs", str(EPOCHS),
           "--batch_size", "128", "--deterministic", "--amp", "off", "--no-channels_last", "--threads", "1",
           "--print_freq", "1", "--auto_resume"]


def command(save: Path, trial: int) -> str:
    return " ".join([*TEACHER, "--save_dir", str(save), "--trial", str(trial)])


@pytest.mark.slow  # CI budget; what is resubmitted is decided in still_to_run, tested below in `make test`
def test_a_preempted_job_is_requeued_and_its_run_ends_exactly(tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    executor = chaos.local_executor(folder)
    lines = [command(tmp_path / "preempted", 1), command(tmp_path / "reference", 1), command(tmp_path / "preempted", 2)]
    jobs = []
    for line in lines:
        jobs.append(executor.submit(slurm.job_of(folder, line)))
        slurm.record(folder, "local", line, jobs[-1])
    run = tmp_path / "preempted" / "teachers" / "resnet8_digits_trial1"
    assert chaos.wait_for(lambda: True, lambda: (run / "ckpt_last.pth").exists(), 120)
    chaos.notify(jobs[0])
    assert chaos.wait_for(lambda: True, lambda: all(job.done() for job in jobs), 240)

    assert slurm.summarize(folder) == ({"finished": 3, "running": 0, "failed": 0, "not started": 0}, 0)
    log, err = jobs[0].paths.stdout.read_text(), jobs[0].paths.stderr.read_text()
    assert "Requeued job" in log and "resuming" in log, log
    assert "stopped: SIGUSR2" in err and "Traceback" not in err, err
    reference = tmp_path / "reference" / "teachers" / "resnet8_digits_trial1"
    assert chaos.differences(reference, run) == []
    assert len(chaos.metrics(run)) == EPOCHS


@pytest.mark.slow  # CI budget (60 s): test_status_tells_... keeps the resubmission decision in `make test`
def test_a_digits_table_whose_run_was_killed_is_finished_by_running_it_again(tmp_path):
    save = tmp_path / "save"
    env = {**os.environ, "SAVE": str(save), "EPOCHS": "2", "TEACHER_EPOCHS": "1", "TRIALS": "1", "METHODS": "crd",
           "JOBS": "2", "PY": sys.executable}
    table = ["bash", "scripts/run_digits_table.sh", "--launcher", "submitit-local"]
    target = {}

    def a_crd_run_in_its_second_epoch() -> bool:
        for run in save.glob("students/*_crd_*"):
            holder = lock.holder(run) if (run / "ckpt_last.pth").exists() else None
            if holder:
                target.update(run=run, pid=int(holder.split()[1]))
                return True
        return False
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(table, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        assert chaos.wait_for(lambda: first.poll() is None, a_crd_run_in_its_second_epoch, 900)
        os.kill(target["pid"], signal.SIGKILL)
        assert first.wait(900) == 1  # the students' phase ends with one run failed, and no table
    said = (tmp_path / "first.log").read_text()
    assert "2 finished, 0 running, 1 failed, 0 not started" in said and "killed by SIGKILL" in said, said
    assert not (save / "table.md").exists()
    status = subprocess.run([*table[:2], "--status"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 1 and status.stdout.splitlines()[-1].startswith("4 finished, 0 running, 1 failed")

    again = subprocess.run(table, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 of 2 runs already finished, running or queued" in again.stderr
    assert "2 of 3 runs already finished, running or queued" in again.stderr
    assert "3 finished, 0 running, 0 failed, 0 not started" in again.stderr
    assert "crd" in (save / "table.md").read_text()
    # resumed from its first epoch: each epoch once in its metrics
    assert [row["epoch"] for row in chaos.metrics(target["run"])] == ["1", "2"]


def process_start(pid: int):
    """(pid, start time) of a live process, or None once it has ended (a zombie has ended): a
    process id the system gives to another process later does not count as this one."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else (pid, fields[19])


@pytest.mark.parametrize("killed", ["the job's controller", "the job's process"])
def test_a_killed_job_takes_its_run_with_it(tmp_path, killed):
    started = tmp_path / "started"
    run = f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); time.sleep(600)"
    job = chaos.local_executor(tmp_path).submit(slurm.job_of(tmp_path, shlex.join([sys.executable, "-c", run])))
    assert chaos.wait_for(lambda: not job.done(), started.exists, 120)
    controller = int(job.job_id)
    processes = [process_start(pid) for pid in [controller, *chaos.processes_of(controller)]]
    assert len(processes) == 3 and None not in processes  # controller, job process (TrainingJob), run
    assert slurm.local_job_alive(job.job_id) and not slurm.local_job_alive(str(os.getpid()))
    os.kill(processes[0 if killed == "the job's controller" else 1][0], signal.SIGKILL)
    assert chaos.wait_for(lambda: True, lambda: all(process_start(pid) != (pid, start) for pid, start in processes), 60)
    assert not slurm.local_job_alive(job.job_id)


FAKE_SBATCH = """#!/bin/bash
if grep -q -- "--partition=nope" "$1"; then
  echo "sbatch: error: invalid partition specified: nope" >&2
  exit 1
fi
n=$(( $(cat "$FAKE_SLURM/count" 2>/dev/null || echo 1000) + 1 ))
echo $n > "$FAKE_SLURM/count"
cp "$1" "$FAKE_SLURM/sbatch_$n.sh"
echo "Submitted batch job $n"
"""
FAKE_SACCT = """#!/bin/bash
printf 'JobID|State|NodeList\\n1001_0|RUNNING|n1\\n1001_1|RUNNING|n1\\n1002_0|PENDING|\\n'
printf '1002_1|PENDING|\\n1002_2|FAILED|n2\\n'
"""


@pytest.fixture()
def fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT), ("srun", "#!/bin/bash\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM": str(tmp_path)}


def test_the_digits_table_on_slurm_submits_two_dependent_phases(tmp_path, fake_slurm):
    env = {**fake_slurm, "SAVE": str(tmp_path / "save"), "METHODS": "kd", "TRIALS": "1", "PY": sys.executable,
           "PARTITION": "gpu", "TIME_LIMIT": "240", "GPUS_PER_JOB": "1", "CPUS_PER_JOB": "6"}
    done = subprocess.run(["bash", "scripts/run_digits_table.sh", "--launcher", "slurm"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "digits table" not in done.stdout  # no table before the jobs have run
    teachers, students = (tmp_path / "sbatch_1001.sh").read_text(), (tmp_path / "sbatch_1002.sh").read_text()
    for script in (teachers, students):
        for directive in ("--partition=gpu", "--time=240", "--gpus-per-node=1", "--cpus-per-task=6",
                          "--signal=USR2@120", "--ntasks-per-node=1", "--requeue"):
            assert f"#SBATCH {directive}" in script
    assert "#SBATCH --array=0-1" in teachers and "dependency" not in teachers
    assert "#SBATCH --array=0-2" in students and "#SBATCH --dependency=afterok:1001" in students
    assert "submitted 3 runs as Slurm job(s) 1002" in done.stderr

    status = subprocess.run(["bash", "scripts/run_digits_table.sh", "--status"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 1  # a run to submit again
    lines = status.stdout.splitlines()
    assert lines[-1].startswith("0 finished, 0 running, 0 failed, 5 not started (1 to submit again: run the "
                                "table script again")
    ended = [line for line in lines if "before the run started" in line]
    assert len(ended) == 1 and ended[0].startswith("not started") and "1002_2" in ended[0]
    assert "Slurm state FAILED" in ended[0]
    assert "train_student --path_t vgg8_digits_trial0 --model_s resnet8 --distill kd --trial 1" in ended[0]

    # again: only the failed run is submitted, and it waits for the teachers still running
    again = subprocess.run(["bash", "scripts/run_digits_table.sh", "--launcher", "slurm"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "2 of 2 runs already finished, running or queued" in again.stderr
    assert "2 of 3 runs already finished, running or queued" in again.stderr
    assert not (tmp_path / "sbatch_1004.sh").exists()
    resubmitted = (tmp_path / "sbatch_1003.sh").read_text()
    assert "#SBATCH --dependency=afterok:1001_0:1001_1" in resubmitted and "--array" not in resubmitted
    assert "--distill kd --trial 1" in (tmp_path / "save" / "slurm" / slurm.SWEEP_FILE).read_text().splitlines()[-1]


def test_a_refused_submission_is_one_line(tmp_path, fake_slurm):
    env = {**fake_slurm, "SAVE": str(tmp_path / "save"), "PY": sys.executable, "PARTITION": "nope"}
    done = subprocess.run(["bash", "scripts/run_cifar_vanilla.sh", "--launcher", "slurm"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("error: sbatch refused the jobs, nothing was submitted: "
                                                    "sbatch: error: invalid partition specified: nope")


def a_sweep(folder: Path, records: dict) -> None:
    """A sweep record of `records` (command -> (job id, cluster))."""
    with open(folder / slurm.SWEEP_FILE, "w") as sweep:
        for command, (job, cluster) in records.items():
            sweep.write(json.dumps({"job": job, "cluster": cluster, "label": command, "command": command,
                                    "submitted": time.time() - 60}) + "\n")
        sweep.write("{not json\n")
        sweep.write('{"job": "13"}\n')


def a_run(folder: Path, command: str, *files: str) -> Path:
    """The run directory of `command`, noted as its run notes it, holding `files`."""
    run_dir = folder / "save" / command
    run_dir.mkdir(parents=True)
    for name in ("args.json", *files):
        (run_dir / name).write_text("{}")
    slurm.note_of(folder, command).parent.mkdir(exist_ok=True)
    slurm.note_of(folder, command).write_text(f"{run_dir}\n")
    return run_dir


def test_status_tells_finished_running_failed_and_not_started_apart(tmp_path, monkeypatch, capsys):
    # which jobs are alive is the test's word, not this machine's processes
    monkeypatch.setattr(slurm, "local_job_alive", lambda job: job == "16")
    monkeypatch.setattr(slurm, "slurm_states", lambda jobs: {"7": "PENDING", "8": "FAILED"})
    a_sweep(tmp_path, {"done": ("11", "local"), "training": ("12", "local"), "killed": ("14", "local"),
                       "crashed": ("15", "local"), "resuming": ("16", "local"), "queued": ("7", "slurm"),
                       "never": ("8", "slurm"), "no run": ("17", "local")})
    a_run(tmp_path, "done", "results.json")
    a_run(tmp_path, "killed", "ckpt_last.pth")
    a_run(tmp_path, "resuming", "ckpt_last.pth")
    training = a_run(tmp_path, "training")
    cloudpickle_dump(("error", "Traceback ...\nslurm.RunFailed: exit status 2: python x.py"),
                     JobPaths(tmp_path, "15").result_pickle)
    cloudpickle_dump(("success", 0), JobPaths(tmp_path, "17").result_pickle)
    # its job ended with an error (an earlier start of it), but a later rerun by hand finished the run
    cloudpickle_dump(("error", "Traceback ...\nslurm.RunFailed: killed by SIGKILL"),
                     JobPaths(tmp_path, "11").result_pickle)
    with open(training / ".lock", "w") as held:  # a process training it (flock is per open file)
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 1 on elsewhere\n")
        held.flush()
        counts, again = slurm.summarize(tmp_path)
        lines, going, live = slurm.still_to_run(tmp_path, ["done", "training", "killed", "crashed", "resuming",
                                                           "queued", "never", "no run", "new"])
    assert counts == {"finished": 2, "running": 2, "failed": 2, "not started": 2} and again == 3
    assert lines == ["killed", "crashed", "never", "new"]
    assert going == ["training", "resuming", "queued"] and live == ["16", "7"]
    captured = capsys.readouterr()
    assert captured.err.count("not a job record") == 4
    out = captured.out.splitlines()
    for state, command, detail in [("finished", "done", ""), ("finished", "no run", ""),
                                   ("running", "training", "pid 1 on elsewhere; its job has ended (local job ended)"),
                                   ("running", "resuming", "local job alive, resuming"),
                                   ("failed", "killed", "stopped without a result, local job ended"),
                                   ("failed", "crashed", "slurm.RunFailed: exit status 2: python x.py"),
                                   ("not started", "queued", "Slurm state PENDING"),
                                   ("not started", "never", "Slurm state FAILED before the run started")]:
        shown = [line for line in out if line.split("  [")[0].endswith(f"  {command}")]
        assert len(shown) == 1 and shown[0].startswith(state), (command, out)
        assert ("  [" + detail in shown[0]) if detail else "[" not in shown[0], (command, shown)
    assert slurm.main(["status", "--folder", str(tmp_path)]) == 1  # runs to submit again
    # the lock released, the training run's job ended: failed, to be submitted again
    assert slurm.job_state(tmp_path, {"job": "12", "cluster": "local", "command": "training",
                                      "submitted": 0})[:2] == ("failed", "stopped without a result, local job ended "
                                                               f"(log: {JobPaths(tmp_path, '12').stderr})")


def test_a_result_older_than_the_submission_is_not_the_jobs(tmp_path):
    cloudpickle_dump(("success", 0), JobPaths(tmp_path, "999999999").result_pickle)
    record = {"job": "999999999", "cluster": "local", "label": "x", "command": "x", "submitted": time.time() + 60}
    assert slurm.job_state(tmp_path, record)[0] == "not started"


def test_without_sbatch_or_a_sweep_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        slurm.main(["submit", "--launcher", "slurm", "--folder", str(tmp_path)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --launcher slurm needs Slurm's sbatch and srun on PATH (run it on a "
                                               "login node); --launcher submitit-local runs the same jobs on this machine")
    with pytest.raises(SystemExit) as stop:
        slurm.main(["status", "--folder", str(tmp_path / "none")])
    assert stop.value.code == 2 and "no sweep in" in capsys.readouterr().err


def test_an_unknown_launcher_is_one_line():
    done = subprocess.run(["bash", "scripts/run_cifar_distill.sh", "--launcher", "lsf"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == "error: --launcher 'lsf' is not one of shell, slurm, submitit-local\n"


def test_a_torchrun_group_gets_the_jobs_rendezvous(monkeypatch):
    torchrun = ["python", "-m", "torch.distributed.run", "--nproc_per_node", "8", "--nnodes", "2",
                "train_student.py", "--trial", "1"]
    assert slurm.with_rendezvous(["python", "train_student.py"]) == ["python", "train_student.py"]
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for key, value in {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    assert slurm.with_rendezvous(torchrun)[:4] == ["python", "-m", "torch.distributed.run", "--standalone"]
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[3-4]")
    assert slurm.with_rendezvous(torchrun) == [
        "python", "-m", "torch.distributed.run", "--node_rank", "1", "--master_addr", "gpu3", "--master_port",
        "20077", "--nproc_per_node", "8", "--nnodes", "2", "train_student.py", "--trial", "1"]


def test_labels_name_what_tells_runs_apart():
    argv = ["python", "train_student.py", "--path_t", "save/teachers/resnet56_cifar100_trial0/ckpt_last.pth",
            "--model_s", "resnet20", "--distill", "crd", "-a", "0", "-b", "0.8", "--trial", "2"]
    assert slurm.label(argv) == ("train_student --path_t resnet56_cifar100_trial0 --model_s resnet20 --distill crd "
                                 "-b 0.8 --trial 2")


def test_how_a_run_ended_is_told_apart():
    assert slurm.ended_how(2) == "exit status 2"
    assert slurm.ended_how(-9) == "killed by SIGKILL"
    assert slurm.ended_how(128 + 15) == "stopped by SIGTERM (not the scheduler's notice to this job)"


def test_the_run_ignores_the_notice_until_its_training_loop_handles_it(capfd):
    probe = "import signal; print(signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN)"
    assert slurm.TrainingJob([sys.executable, "-c", probe], {}, str(ROOT))() == 0
    assert capfd.readouterr().out.strip() == "True"


def test_submitit_local_runs_the_lines_a_few_at_a_time_and_reports_them(tmp_path, monkeypatch, capsys):
    code = f"import os; assert os.environ['OMP_NUM_THREADS'] == '{os.cpu_count()}'"  # one job at a time
    ok = f"{sys.executable} -c {shlex.quote(code)}"
    failing = f"{sys.executable} -c 'import sys; sys.exit(3)'"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{ok}\n# a comment\n{failing}\n"))
    assert slurm.main(["submit", "--launcher", "submitit-local", "--folder", str(tmp_path), "--gpus_per_node", "0",
                       "--jobs", "1"]) == 1
    err = capsys.readouterr().err
    assert "1 finished, 0 running, 1 failed, 0 not started" in err
    assert f"exit status 3: {failing}".replace("'", "") in err.replace("'", "")
    records = [json.loads(line) for line in (tmp_path / slurm.SWEEP_FILE).read_text().splitlines()]
    assert [r["command"] for r in records] == [ok, failing]

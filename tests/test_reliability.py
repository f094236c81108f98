"""The README's bad-input table for runs: every case ends in one line (exit status 2, or a
warning where the run goes on), never a traceback; a run that never checkpointed starts
again; one process per run directory; signals stop cleanly with the resume command."""
import errno
import fcntl
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import engine.atomic
import train_student
import train_teacher
from conftest import ROOT, fast_args, read_json
from core.errors import UserError
from engine.signals import StopRequest
from engine.teacher import build_teacher, find_best_teacher
from method_helpers import quarter_digits

RUN = "teachers/resnet8_digits_trial0"
QUICK = ["--model", "resnet8", "--epochs", "1", "--batch_size", "256"]


@pytest.fixture(scope="module", autouse=True)
def quarter_of_the_digits(digits_teacher):
    """Every fourth digit for this module's in-process runs (what they test is the stop, the
    message and the files, not the learning); the session's teacher is trained on every digit
    before, whichever module asks for it first."""
    with pytest.MonkeyPatch.context() as patch:
        quarter_digits(patch)
        yield


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch teacher run that also kept ckpt_epoch_1.pth (--save_freq 1)."""
    save = tmp_path_factory.mktemp("finished")
    train_teacher.main(fast_args(save, *QUICK, "--save_freq", "1"))
    return save


@pytest.fixture()
def copy(finished, tmp_path):
    """A private copy of the finished run: (save_dir, run_dir)."""
    shutil.copytree(finished, tmp_path / "save")
    return tmp_path / "save", tmp_path / "save" / RUN


def one_line_exit(capsys, main, argv, status=2) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == status, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_run_stopped_by_nan_in_its_first_epoch_can_start_again(tmp_path, capsys):
    err = one_line_exit(capsys, train_teacher.main, fast_args(tmp_path, *QUICK, "--learning_rate", "1e30"), status=1)
    assert "became non-finite" in err and "no checkpoint was written yet" in err
    one_line_exit(capsys, train_teacher.main, fast_args(tmp_path, *QUICK, "--resume"), status=1)  # same lr
    results = train_teacher.main(fast_args(tmp_path, *QUICK))
    assert "starting it again from scratch" in capsys.readouterr().out
    assert results["epochs"] == 1 and len((tmp_path / RUN / "metrics.csv").read_text().splitlines()) == 2


def test_a_run_directory_has_one_owner(tmp_path, capsys):
    run_dir = tmp_path / RUN
    run_dir.mkdir(parents=True)
    with open(run_dir / ".lock", "w") as held:  # another process's lock (flock is per open file)
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 1 on elsewhere\n")
        held.flush()
        err = one_line_exit(capsys, train_teacher.main, fast_args(tmp_path, *QUICK))
    assert f"run directory {run_dir} is in use by another process (pid 1 on elsewhere)" in err
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "args.json").write_text("{"), "args.json is not valid JSON"),
    (lambda run: (run / "args.json").unlink(), "holds checkpoints but no args.json"),
    (lambda run: (run / "args.json").write_text('{"model": "resnet8"}'), "args.json lacks dataset"),
])
def test_a_damaged_args_json_is_one_line(copy, capsys, damage, message):
    save, run_dir = copy
    damage(run_dir)
    assert message in one_line_exit(capsys, train_teacher.main, ["--resume", str(run_dir)])


def test_deleting_args_json_never_lets_a_new_run_overwrite(copy, capsys):
    save, run_dir = copy
    (run_dir / "args.json").unlink()
    assert "holds checkpoints but no args.json" in one_line_exit(capsys, train_teacher.main, fast_args(save, *QUICK))


def test_a_foreign_last_checkpoint_falls_back_to_the_newest_good_one(copy, capsys):
    save, run_dir = copy
    torch.save({"model": torch.load(run_dir / "best.pth")["model"], "epoch": 1}, run_dir / "ckpt_last.pth")
    (run_dir / "results.json").unlink()
    train_teacher.main(["--resume", str(run_dir)])
    err = capsys.readouterr().err
    assert "ckpt_last.pth has no stage, rows, optimizer, best_acc" in err
    assert "resuming from ckpt_epoch_1.pth (main epoch 1) instead" in err
    (run_dir / "ckpt_epoch_1.pth").write_bytes(b"garbage")
    (run_dir / "results.json").unlink()
    assert "move the checkpoints away" in one_line_exit(capsys, train_teacher.main, ["--resume", str(run_dir)])


def test_garbage_metrics_and_another_world_size_warn_and_go_on(copy, capsys):
    save, run_dir = copy
    state = torch.load(run_dir / "ckpt_last.pth", weights_only=False)
    torch.save({**state, "world_size": 2}, run_dir / "ckpt_last.pth")
    (run_dir / "metrics.csv").write_bytes(b"\x00\xff garbage")
    (run_dir / "results.json").unlink()
    with pytest.raises(UserError, match="holds no evaluated epoch"):  # the 1-epoch run had finished
        train_teacher.main.__wrapped__(["--resume", str(run_dir)])
    err = capsys.readouterr().err
    assert "metrics.csv is unreadable" in err and (run_dir / "metrics.csv.unreadable").exists()
    assert "checkpointed with 2 process(es), effective batch 512; resumed with 1" in err


def test_runs_record_processes_and_effective_batch(finished):
    assert read_json(finished / RUN / "results.json")["effective_batch"] == 256
    assert read_json(finished / RUN / "args.json")["world_size"] == 1


def test_a_read_only_save_dir_is_one_line(tmp_path, monkeypatch, capsys):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
    err = one_line_exit(capsys, train_teacher.main, fast_args(tmp_path, *QUICK))
    assert "permission denied (EACCES); choose a writable --save_dir" in err


@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "disk full"), (errno.EFBIG, "file too large"),
                                         (errno.EPERM, "operation not permitted")])
def test_a_failed_checkpoint_write_is_one_line(tmp_path, monkeypatch, capsys, code, cause):
    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(engine.atomic.os, "fsync", lambda fd: fail(fd) if os.fstat(fd).st_size > 10000 else None)
    err = one_line_exit(capsys, train_teacher.main, fast_args(tmp_path, *QUICK))
    assert f"cannot write {tmp_path / RUN / 'ckpt_last.pth'}: {cause}" in err
    assert "there was no earlier ckpt_last.pth" in err
    assert not list((tmp_path / RUN).glob("*.tmp"))


def test_unreadable_results_are_skipped_with_a_warning(finished, tmp_path, capsys):
    shutil.copytree(finished, tmp_path / "save")
    (tmp_path / "save" / "teachers" / "x").mkdir()
    (tmp_path / "save" / "teachers" / "x" / "results.json").write_text("{")
    assert find_best_teacher(tmp_path / "save", "digits") == tmp_path / "save" / RUN / "best.pth"
    assert "warning: skipping unreadable" in capsys.readouterr().err
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_table.py"), str(tmp_path / "save")],
                           capture_output=True, text=True)
    assert "warning: skipping unreadable" in table.stderr and "Traceback" not in table.stderr


def test_a_teacher_of_another_data_set_is_refused(finished):
    state = torch.load(finished / RUN / "best.pth", weights_only=False)
    with pytest.raises(UserError, match="was trained on digits, not cifar10"):
        build_teacher(state, "resnet8", 10, "t.pth", "cifar10")


def test_a_directory_as_path_t_is_one_line(finished, tmp_path, capsys):
    argv = fast_args(tmp_path, "--path_t", str(finished / RUN), "--epochs", "1")
    err = one_line_exit(capsys, train_student.main, argv)
    assert f"{finished / RUN} is a directory; name a checkpoint file in it such as" in err


def test_sigint_stops_after_the_step_and_prints_the_resume_command(tmp_path):
    argv = [sys.executable, str(ROOT / "train_teacher.py"), *fast_args(tmp_path, "--model", "resnet8",
                                                                     "--epochs", "3", "--batch_size", "64")]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / RUN / "ckpt_last.pth").exists() and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGINT and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("stopped: SIGINT")
    assert f"go on with: python train_teacher.py --resume {tmp_path / RUN}" in err
    assert "keeps main epoch" in err


class ExitedAtOnce(Exception):
    pass


@pytest.fixture()
def stop_request(monkeypatch):
    def exit_at_once(code):
        raise ExitedAtOnce(code)
    monkeypatch.setattr(os, "_exit", exit_at_once)
    return StopRequest()


def test_the_same_signal_again_exits_at_once(stop_request, capsys):
    stop_request.handle(signal.SIGINT, None)
    with pytest.raises(ExitedAtOnce) as exited:
        stop_request.handle(signal.SIGINT, None)
    assert exited.value.args == (128 + signal.SIGINT,)
    assert "SIGINT again: exiting now" in capsys.readouterr().err


def test_another_signal_of_the_same_stop_does_not(stop_request, capsys):
    """A scheduler's several notices (Slurm's USR2 to every process, the launcher's SIGTERM)
    keep the clean stop after the current step."""
    stop_request.handle(signal.SIGUSR2, None)
    stop_request.handle(signal.SIGTERM, None)
    assert stop_request.requested() and stop_request.signal == "SIGUSR2"
    assert "SIGTERM: already stopping after the current step (SIGUSR2)" in capsys.readouterr().err
    with pytest.raises(ExitedAtOnce):
        stop_request.handle(signal.SIGUSR2, None)


@pytest.mark.parametrize("entry", ["train_teacher.py", "train_student.py", "evaluate.py"])
def test_ctrl_c_while_the_entry_point_imports_is_one_line(entry):
    """torch's import takes seconds; a Ctrl-C in them ends with one line, not a traceback. The
    interpreter reports each import as it finishes (-X importtime): the signal goes once an
    import after core.errors's (the first) has finished, so after the handler was installed."""
    child = subprocess.Popen([sys.executable, "-X", "importtime", entry, "--help"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reported = iter(child.stderr)
    next(line for line in reported if line.rstrip().endswith("| core.errors"))
    next(reported)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    said = [line for line in err.splitlines() if not line.startswith("import time:")]
    assert child.returncode == 128 + signal.SIGINT
    assert said == ["interrupted (Ctrl-C) while starting; nothing was written"]

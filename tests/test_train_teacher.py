import csv
import errno
import subprocess
import sys

import pytest
import torch

import engine.atomic
import engine.trainer
import train_teacher
from conftest import ROOT, Crash, crash_after_checkpoint, fast_args, read_json
from core.errors import UserError
from engine.checkpoint import save_checkpoint
from method_helpers import quarter_digits


def test_run_directory_is_complete(digits_teacher):
    _, run_dir = digits_teacher
    names = {p.name for p in run_dir.iterdir()}
    assert {"args.json", "metrics.csv", "ckpt_last.pth", "best.pth", "results.json"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    for column in ("train_loss", "train_ce", "train_top1", "train_top5", "test_top1", "test_top5",
                   "test_loss", "lr", "epoch_time", "images_per_s"):
        assert float(rows[0][column]) >= 0
    best = torch.load(run_dir / "best.pth", weights_only=False)
    assert {"model", "epoch", "best_acc"} <= set(best)
    last = torch.load(run_dir / "ckpt_last.pth", weights_only=False)
    assert {"model", "epoch", "best_acc", "optimizer"} <= set(last)
    results = read_json(run_dir / "results.json")
    assert results["best_top1"] == pytest.approx(float(rows[0]["test_top1"]))
    assert results["params"] == sum(v.numel() for k, v in best["model"].items()
                                    if "running" not in k and "num_batches" not in k)
    for key in ("seed", "wall_time_s", "code_version", "epochs", "last_top1"):
        assert key in results


def test_tensorboard_holds_the_epoch_scalars(digits_teacher):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, run_dir = digits_teacher
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/top1", "test/top1", "lr", "images_per_s"} <= tags


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_s")} for r in rows]


def _rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, monkeypatch, capsys):
    quarter_digits(monkeypatch)
    flags = ["--model", "resnet8", "--epochs", "3", "--deterministic", "--batch_size", "128"]
    full_dir = tmp_path / "full"
    train_teacher.main(fast_args(full_dir, *flags))
    assert "deterministic: on, warn_only" in capsys.readouterr().out

    cut_dir = tmp_path / "cut"
    crash_after_checkpoint(train_teacher.main, fast_args(cut_dir, *flags), monkeypatch, epoch=2)
    train_teacher.main(fast_args(cut_dir, *flags, "--resume"))

    name = "teachers/resnet8_digits_trial0"
    full = torch.load(full_dir / name / "ckpt_last.pth", weights_only=False)
    resumed = torch.load(cut_dir / name / "ckpt_last.pth", weights_only=False)
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert _strip_timing(_rows(full_dir / name)) == _strip_timing(_rows(cut_dir / name))


def test_rows_logged_after_the_last_checkpoint_are_dropped_on_resume(tmp_path, monkeypatch):
    quarter_digits(monkeypatch)
    flags = ["--model", "resnet8", "--epochs", "2", "--batch_size", "256"]
    real_save = engine.trainer.save_checkpoint

    def lose_second_checkpoint(state, path):
        if state["epoch"] == 2:
            raise Crash  # the row of epoch 2 is logged, its checkpoint never lands
        real_save(state, path)

    monkeypatch.setattr(engine.trainer, "save_checkpoint", lose_second_checkpoint)
    with pytest.raises(Crash):
        train_teacher.main(fast_args(tmp_path, *flags))
    run_dir = tmp_path / "teachers" / "resnet8_digits_trial0"
    assert [r["epoch"] for r in _rows(run_dir)] == ["1", "2"]
    monkeypatch.setattr(engine.trainer, "save_checkpoint", real_save)
    train_teacher.main(fast_args(tmp_path, *flags, "--resume"))
    assert [r["epoch"] for r in _rows(run_dir)] == ["1", "2"]


def test_existing_run_is_never_overwritten(digits_teacher, capsys):
    save, run_dir = digits_teacher
    before = (run_dir / "ckpt_last.pth").stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_info:
        train_teacher.main(fast_args(save, "--model", "resnet8", "--epochs", "1", "--trial", "0"))
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err
    assert (run_dir / "ckpt_last.pth").stat().st_mtime_ns == before


def test_a_failed_checkpoint_write_keeps_the_old_file_and_says_disk_full(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine.atomic.os, "fsync", disk_full)
    with pytest.raises(UserError, match=f"cannot write {path}: disk full .*the previous ckpt.pth is kept"):
        save_checkpoint({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


@pytest.mark.parametrize("flags, message", [
    (["--model", "resnet9"], "unknown model 'resnet9'"),
    (["--model", "resnet8", "--dataset", "mnist"], "unknown dataset"),
    (["--model", "resnet8", "--epochs", "0"], "--epochs must be an integer >= 1"),
    (["--model", "resnet8", "--learning_rate", "-0.1"], "--learning_rate must be a positive number"),
    (["--model", "resnet8", "--batch_size", "5000"], "exceeds"),
])
def test_user_mistakes_end_with_one_line_and_status_2(tmp_path, capsys, flags, message):
    argv = ["--save_dir", str(tmp_path), "--dataset", "digits", *flags]
    with pytest.raises(SystemExit) as exit_info:
        train_teacher.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_cifar_folder_names_the_folder(tmp_path, monkeypatch, capsys):
    import dataset.cifar100 as cifar
    monkeypatch.setattr(cifar, "network_reachable", lambda *a, **k: False)
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit) as exit_info:
        train_teacher.main(["--model", "resnet8", "--dataset", "cifar100", "--data_folder", str(missing),
                            "--save_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert str(missing) in capsys.readouterr().err


def test_command_line_error_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "train_teacher.py"), "--model", "nope",
                           "--save_dir", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error: unknown model 'nope'")


def test_auto_resume_skips_a_finished_run_and_resumes_an_interrupted_one(tmp_path, monkeypatch, capsys):
    quarter_digits(monkeypatch)
    flags = fast_args(tmp_path, "--model", "resnet8", "--epochs", "2", "--batch_size", "256", "--auto_resume")
    crash_after_checkpoint(train_teacher.main, flags, monkeypatch, epoch=1)
    results = train_teacher.main(flags)
    run_dir = tmp_path / "teachers" / "resnet8_digits_trial0"
    assert results["epochs"] == 2 and [r["epoch"] for r in _rows(run_dir)] == ["1", "2"]
    with pytest.raises(SystemExit) as exit_info:
        train_teacher.main(flags)
    assert exit_info.value.code == 0
    assert f"finished already, skipped: {run_dir}" in capsys.readouterr().out

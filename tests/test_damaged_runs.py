"""A resume tells what it ignores and repairs what an interruption damaged: a torn metrics.csv
row, a finished run's unreadable results.json, a ckpt_last.pth of another architecture; a
resumed run reports as an uninterrupted one, and resumes from any working directory."""
import csv
import shutil
import subprocess
import sys

import pytest
import torch

import train_student
import train_teacher
from conftest import ROOT, crash_after_checkpoint, fast_args, read_json
from deploy.network import run_data
from engine.build import build_model
from method_helpers import quarter_digits

TEACHER = ["--model", "resnet8", "--epochs", "1", "--trial", "0"]  # digits_teacher's run


@pytest.fixture()
def teacher_copy(digits_teacher, tmp_path):
    """A private copy of the finished digits teacher run: (save_dir, run_dir)."""
    save, run_dir = digits_teacher
    shutil.copytree(save / "teachers", tmp_path / "save" / "teachers")
    return tmp_path / "save", tmp_path / "save" / "teachers" / run_dir.name


def test_a_ckpt_last_of_another_architecture_falls_back_to_a_kept_checkpoint(teacher_copy, capsys):
    save, run_dir = teacher_copy
    shutil.copy(run_dir / "ckpt_last.pth", run_dir / "ckpt_epoch_1.pth")
    state = torch.load(run_dir / "ckpt_last.pth", weights_only=False)
    torch.save({**state, "model": build_model("resnet14", 10).state_dict()}, run_dir / "ckpt_last.pth")
    (run_dir / "results.json").unlink()
    results = train_teacher.main(["--resume", str(run_dir)])
    err = capsys.readouterr().err
    assert "ckpt_last.pth does not fit architecture resnet8 (" in err
    assert "resuming from ckpt_epoch_1.pth (main epoch 1) instead" in err
    assert results["best_top1"] == state["best_acc"]


def test_flags_a_resume_ignores_are_named_in_one_warning(teacher_copy, capsys):
    save, run_dir = teacher_copy
    results = train_teacher.main(["--resume", str(run_dir), "--epochs", "4", "--learning_rate", "0.5",
                                  "--num_workers", "0"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--epochs 4 (the run's: 1), --learning_rate 0.5 (the run's: 0.05)" in warnings[0]
    assert results["epochs"] == 1


@pytest.mark.parametrize("damage", [lambda path: path.write_text('{"best_top1": '), lambda path: path.unlink()])
def test_auto_resume_rewrites_a_finished_runs_results(teacher_copy, capsys, damage):
    save, run_dir = teacher_copy
    before = read_json(run_dir / "results.json")
    damage(run_dir / "results.json")
    train_teacher.main(fast_args(save, *TEACHER, "--auto_resume"))
    assert read_json(run_dir / "results.json") == before
    with pytest.raises(SystemExit) as skipped:
        train_teacher.main(fast_args(save, *TEACHER, "--auto_resume"))
    assert skipped.value.code == 0 and "finished already, skipped" in capsys.readouterr().out


def test_a_torn_metrics_row_is_dropped_with_a_warning(tmp_path, monkeypatch, capsys):
    argv = fast_args(tmp_path, "--model", "resnet8", "--epochs", "2", "--batch_size", "256")
    crash_after_checkpoint(train_teacher.main, argv, monkeypatch, epoch=1)
    run_dir = tmp_path / "teachers" / "resnet8_digits_trial0"
    text = (run_dir / "metrics.csv").read_text()
    (run_dir / "metrics.csv").write_text(text[:len(text) - len(text.splitlines()[-1]) // 2 - 1])
    train_teacher.main(["--resume", str(run_dir)])
    assert "metrics.csv holds torn rows (main epoch 1)" in capsys.readouterr().err
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["2"] and all(value for row in rows for value in row.values())
    assert torch.load(run_dir / "ckpt_last.pth", weights_only=False)["rows"] == 1


def student_args(path_t, save, *extra):
    return fast_args(save, "--path_t", path_t, "--model_s", "resnet8", "--distill", "dkd", "--epochs", "2",
                     "--batch_size", "256", "--deterministic", "--amp", "off", "--no-channels_last", *extra)


@pytest.fixture(scope="module")
def reference_student(digits_teacher, tmp_path_factory):
    """results.json of an uninterrupted 2-epoch DKD student (its options at their defaults)."""
    save = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        quarter_digits(patch)
        return train_student.main(student_args(str(digits_teacher[1] / "best.pth"), save))


@pytest.fixture(scope="module")
def resumed_student(digits_teacher, tmp_path_factory):
    """The same student started in the teacher's save folder with a relative --path_t and
    --save_dir, crashed after epoch 1 and resumed by its run directory from another folder:
    (results, run_dir)."""
    teacher_save, teacher_dir = digits_teacher
    here, elsewhere = tmp_path_factory.mktemp("started_here"), tmp_path_factory.mktemp("resumed_elsewhere")
    shutil.copytree(teacher_dir, here / "teacher")
    with pytest.MonkeyPatch.context() as patch:
        quarter_digits(patch)
        patch.chdir(here)
        crash_after_checkpoint(train_student.main, student_args("teacher/best.pth", "save"), patch, epoch=1)
        run_dir = next((here / "save" / "students").iterdir())
        patch.chdir(elsewhere)
        results = train_student.main(["--resume", str(run_dir)])
    return results, run_dir


def test_a_resumed_run_reports_as_an_uninterrupted_one(reference_student, resumed_student):
    results, _ = resumed_student
    assert "(default)" in results["methods"]["dkd"]
    same = {k: v for k, v in results.items() if k not in ("wall_time_s", "path_t")}
    assert same == {k: v for k, v in reference_student.items() if k not in ("wall_time_s", "path_t")}


def test_paths_are_stored_absolute_so_a_run_resumes_from_any_folder(resumed_student):
    results, run_dir = resumed_student
    stored = read_json(run_dir / "args.json")
    assert stored["path_t"] == results["path_t"] == str(run_dir.parent.parent.parent / "teacher" / "best.pth")
    assert stored["save_dir"] == str(run_dir.parent.parent) and stored["data_folder"].startswith("/")
    assert "command_line" not in stored and results["epochs"] == 2
    assert run_data(run_dir / "best.pth", {}) == ("digits", stored["data_folder"])  # what evaluate/export read


@pytest.mark.slow  # CI budget: two real training subprocesses
def test_chaos_resolves_a_relative_save_dir_against_the_current_folder(tmp_path):
    name = f"chaos_relative_{tmp_path.name}"
    try:
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "chaos.py"), "--kills", "0", "--save_dir", name,
                               "train_teacher.py", "--model", "resnet8", "--dataset", "digits", "--epochs", "1",
                               "--batch_size", "256", "--deterministic", "--amp", "off", "--no-channels_last"],
                              cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert not (ROOT / name).exists()
        assert {p.name for p in (tmp_path / name).iterdir()} == {"reference", "chaos"}
    finally:
        shutil.rmtree(ROOT / name, ignore_errors=True)

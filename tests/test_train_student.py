"""End to end through train_student.py on the embedded digits data: every method for one
epoch on a same-architecture pair and a cross-architecture pair, teacher discovery and
RepDistiller-format checkpoints, and the mistakes that must end with exit status 2."""
import csv
import subprocess
import sys

import pytest
import torch

import dataset.digits
import dataset.loaders
import distiller_zoo
import train_student
import train_teacher
from conftest import ROOT, fast_args, read_json
from core.errors import UserError
from dataset.contrast import NCE_K
from dataset.loaders import build_loaders
from engine import student_run
from engine.args import absolute_paths, split_paths

METHODS = sorted(distiller_zoo.METHODS)
# vgg8 has four stages of 64..512 channels, resnet8 three of 16..64: stage pairing and
# connectors must bridge both differences.
CROSS_TEACHER, STUDENT = "vgg8", "resnet8"
# Methods whose formula compares per-channel quantities of paired stages (FSP matrices,
# KDSVD's singular-vector correlations): a pair with unequal channels must be refused.
NEEDS_EQUAL_CHANNELS = ("fsp", "kdsvd")
FAST = ["--epochs", "1", "--init_epochs", "1", "--sskd_head_epochs", "1", "--nce_k", "64", "--batch_size", "128"]


@pytest.fixture(scope="module", autouse=True)
def small_digits():
    """Every fourth digit: an epoch of ~35 runs then fits the CI budget, and the code path
    (the real loader on the real images) is unchanged."""
    full = dataset.digits.load_digits_split
    with pytest.MonkeyPatch.context() as patch:
        for module in (dataset.digits, dataset.loaders):  # the torch path's and the in-memory path's
            patch.setattr(module, "load_digits_split", lambda train: tuple(t[::4] for t in full(train)))
        yield


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A save folder holding a one-epoch resnet8 and a one-epoch vgg8 digits teacher."""
    save = tmp_path_factory.mktemp("students")
    for model in (STUDENT, CROSS_TEACHER):
        train_teacher.main(fast_args(save, "--model", model, "--epochs", "1", "--batch_size", "128"))
    return save


def teacher_ckpt(save, model):
    return save / "teachers" / f"{model}_digits_trial0" / "best.pth"


def rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def distill(save, teacher, method, *extra):
    return train_student.main(fast_args(save, "--path_t", str(teacher_ckpt(save, teacher)), "--model_s", STUDENT,
                                        "--distill", method, *FAST, *extra))


def check_run(save, results, method):
    run_dir = save / "students" / results["run_name"]
    names = {p.name for p in run_dir.iterdir()}
    assert {"args.json", "metrics.csv", "ckpt_last.pth", "best.pth", "results.json"} <= names
    main_rows = [r for r in rows(run_dir) if r["stage"] == "main"]
    assert len(main_rows) == 1
    logged = main_rows[0]
    weight = read_json(run_dir / "args.json")
    assert float(logged["train_ce"]) > 0
    if distiller_zoo.METHODS[method].cls is not None and distiller_zoo.METHODS[method].beta:
        assert logged[f"train_{method}"] != "" and torch.isfinite(torch.tensor(float(logged[f"train_{method}"])))
    assert read_json(run_dir / "results.json")["method"] == weight["method"]
    return run_dir


# SSKD's epoch (four rotations of each image, its own init stage) is trained through train_student.py
# in test_method_sskd.py with its checks; here it is `make test-slow`'s, for CI's budget
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m == "sskd" else m for m in METHODS])
def test_every_method_runs_one_epoch_on_a_same_architecture_pair(teachers, method):
    results = distill(teachers, STUDENT, method)
    run_dir = check_run(teachers, results, method)
    if method in ("ab", "ft", "fsp"):
        assert any(r["stage"].startswith("init_") for r in rows(run_dir)), "the init stage was not run"


# CI's budget holds one end-to-end epoch per method (the same-architecture pair above); the
# cross-architecture connectors are tested per method on tensors, and this run of them all is
# `make test-slow`'s
@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHODS if m not in NEEDS_EQUAL_CHANNELS])
def test_every_method_runs_one_epoch_on_a_cross_architecture_pair(teachers, method):
    check_run(teachers, distill(teachers, CROSS_TEACHER, method), method)


@pytest.mark.parametrize("method", NEEDS_EQUAL_CHANNELS)
def test_unequal_channels_stop_before_training(teachers, capsys, method):
    with pytest.raises(SystemExit) as exit_info:
        distill(teachers, CROSS_TEACHER, method, "--trial", "unequal")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and method in err.lower() and "channel" in err
    assert not list((teachers / "students").glob("*unequal*"))


def test_crd_with_a_mobilenet_student(teachers):
    results = train_student.main(fast_args(teachers, "--path_t", str(teacher_ckpt(teachers, CROSS_TEACHER)),
                                           "--model_s", "MobileNetV2", "--distill", "crd", *FAST))
    assert results["method"] == "crd"


def test_a_repdistiller_checkpoint_works_as_path_t(teachers, tmp_path):
    ours = torch.load(teacher_ckpt(teachers, STUDENT), weights_only=False)
    folder = tmp_path / "resnet8_digits_lr_0.05_decay_0.0005_trial_0"  # RepDistiller's folder naming
    folder.mkdir()
    torch.save({"model": ours["model"]}, folder / "resnet8_best.pth")
    results = train_student.main(fast_args(tmp_path, "--path_t", str(folder / "resnet8_best.pth"),
                                           "--model_s", STUDENT, "--distill", "kd", *FAST))
    assert results["teacher"] == "resnet8"


def test_without_path_t_the_best_teacher_is_taken(teachers, capsys):
    best = max((read_json(p.parent / "results.json")["best_top1"], p.parent.name)
               for p in (teachers / "teachers").glob("*/best.pth"))[1]
    results = train_student.main(fast_args(teachers, "--model_s", STUDENT, "--distill", "kd", *FAST,
                                           "--trial", "auto"))
    assert f"{best}/best.pth" in capsys.readouterr().out
    assert results["teacher"] == best.split("_")[0]


def test_combined_objective_logs_each_term(teachers):
    results = distill(teachers, STUDENT, "crd:0.8,at:1000", "-a", "0.5")
    run_dir = teachers / "students" / results["run_name"]
    logged = rows(run_dir)[-1]
    assert results["method"] == "crd+at+kd"
    for term in ("ce", "kd", "crd", "at", "loss"):
        assert logged[f"train_{term}"] != ""
    ce, kd, crd, at, total = (float(logged[f"train_{t}"]) for t in ("ce", "kd", "crd", "at", "loss"))
    assert total == pytest.approx(ce + 0.5 * kd + 0.8 * crd + 1000 * at, rel=1e-4)


def test_no_teacher_at_all_prints_the_command_that_trains_one(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "train_student.py"), "--model_s", "resnet8",
                           "--dataset", "digits", "--save_dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "python train_teacher.py --model" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (["--distill", "nonsense"], "unknown distillation method 'nonsense'"),
    (["--distill", "crd:x"], "is not a number"),
    (["--distill", "crd,at", "-b", "1"], "-b is ambiguous"),
    (["--model_s", "resnet9"], "unknown model 'resnet9'"),
])
def test_student_mistakes_end_with_one_line_and_status_2(teachers, capsys, flags, message):
    argv = fast_args(teachers, "--path_t", str(teacher_ckpt(teachers, STUDENT)), *FAST, *flags)
    with pytest.raises(SystemExit) as exit_info:
        train_student.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_teacher_of_another_class_count_is_refused(teachers, tmp_path, capsys):
    state = torch.load(teacher_ckpt(teachers, STUDENT), weights_only=False)
    from models import model_dict
    state["model"] = model_dict["resnet8"](num_classes=100).state_dict()
    path = tmp_path / "resnet8_cifar100_trial_0" / "best.pth"
    path.parent.mkdir()
    torch.save(state, path)
    with pytest.raises(SystemExit) as exit_info:
        train_student.main(fast_args(tmp_path, "--path_t", str(path), *FAST))
    assert exit_info.value.code == 2
    assert "100 classes" in capsys.readouterr().err


def test_logit_standardisation_and_a_temperature_schedule(teachers):
    results = distill(teachers, STUDENT, "dkd", "--logit_stand", "--kd_T_schedule", "linear", "--kd_T", "4",
                      "--kd_T_end", "2", "--epochs", "2")
    assert results["method"] == "dkd+ls"
    logged = [r for r in rows(teachers / "students" / results["run_name"]) if r["stage"] == "main"]
    assert [float(r["kd_T"]) for r in logged] == [4.0, 2.0]


def test_a_schedule_without_its_end_temperature_is_refused(teachers, capsys):
    with pytest.raises(SystemExit) as exit_info:
        distill(teachers, STUDENT, "kd", "--kd_T_schedule", "cosine")
    assert exit_info.value.code == 2
    assert "--kd_T_end" in capsys.readouterr().err


def test_dot_trains_the_main_stage_of_any_method(teachers):
    results = distill(teachers, STUDENT, "kd", "--dot", "--dot_delta", "0.05")
    assert results["method"] == "kd+dot"
    run_dir = check_run(teachers, results, "kd")
    logged = rows(run_dir)[-1]
    # the task share DOT steps apart is gamma * CE (KD's published gamma 0.1)
    assert float(logged["train_task"]) == pytest.approx(0.1 * float(logged["train_ce"]), rel=1e-5)
    state = torch.load(run_dir / "ckpt_last.pth", weights_only=False)["optimizer"]
    assert {"task_momentum", "distill_momentum"} <= set(state["state"][0])
    assert state["param_groups"][0]["delta"] == 0.05


@pytest.mark.parametrize("flags, env, message", [
    (["--amp", "fp16"], {}, "--amp fp16"),
    ([], {"WORLD_SIZE": "2"}, "without torchrun"),
    (["--dot_delta", "0.2"], {}, "--dot_delta"),
])
def test_dot_refusals_end_with_one_line_and_status_2(teachers, capsys, monkeypatch, flags, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        distill(teachers, STUDENT, "kd", "--dot", *flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_nce_k_has_one_rule_for_the_command_line_and_the_loaders(tmp_path, capsys):
    """--nce_k's range is declared once (dataset.contrast.NCE_K): CRD's option parses with it,
    and the contrast sampler the loaders build checks it for library callers."""
    option = next(o for o in distiller_zoo.METHODS["crd"].options if o.name == "nce_k")
    assert option.valid is NCE_K
    with pytest.raises(SystemExit) as exit_info:
        train_student.main(fast_args(tmp_path / "save", "--model_s", STUDENT, "--distill", "crd", "--nce_k", "0"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --nce_k must be a positive integer, got 0"
    assert not (tmp_path / "save").exists()
    for bad in (0, 2.5, True):
        with pytest.raises(UserError, match="--nce_k must be a"):
            build_loaders("digits", batch_size=8, num_workers=0, contrast=(bad, "exact"))


def test_path_t_is_split_in_one_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    given = absolute_paths("a.pth,torchvision:resnet34,sub/b.pth")
    assert split_paths(given) == [str(tmp_path / "a.pth"), "torchvision:resnet34", str(tmp_path / "sub" / "b.pth")]
    args = train_student.parse_args(["--path_t", "a.pth,b.pth", "--model_t", "resnet8", "--model_s", STUDENT])
    with pytest.raises(UserError, match="--model_t names 1 architectures for 2 --path_t checkpoints"):
        student_run.read_teachers(vars(args))
    for source in (ROOT / "train_student.py", *ROOT.glob("engine/*.py")):
        assert "path_t.split(" not in source.read_text(), source

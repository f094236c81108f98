"""RepDistiller's command lines and folders: `train_teacher.py -t 3`, and teachers kept in
its layout (save/models/<arch>_vanilla/ckpt_epoch_240.pth) found without --path_t, ranked
after this suite's own teacher runs."""
import json

import pytest
import torch

import train_student
import train_teacher
from core.errors import UserError
from engine import student_run
from engine.teacher import find_best_teacher
from models import model_dict


def repdistiller_teacher(save, folder, arch, accuracy):
    """A checkpoint as RepDistiller's train_teacher.py writes it at epoch 240."""
    path = save / "models" / folder / "ckpt_epoch_240.pth"
    path.parent.mkdir(parents=True)
    weights = model_dict[arch](num_classes=100).state_dict()
    torch.save({"epoch": 240, "model": weights, "accuracy": torch.tensor(accuracy)}, path)
    return path


def suite_teacher(save, name, dataset, best_top1):
    run = save / "teachers" / name
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"dataset": dataset, "best_top1": best_top1}))
    torch.save({"model": {}}, run / "best.pth")
    return run / "best.pth"


def test_short_trial_flag():
    args = train_teacher.parse_args(["--model", "resnet8", "-t", "3"])
    assert args.trial == "3" and train_teacher.run_name(args) == "resnet8_cifar100_trial3"


def test_repdistiller_teachers_rank_by_recorded_accuracy(tmp_path):
    repdistiller_teacher(tmp_path, "resnet8_vanilla", "resnet8", 60.0)
    best = repdistiller_teacher(tmp_path, "wrn_16_1_vanilla", "wrn_16_1", 66.5)
    assert find_best_teacher(tmp_path, "cifar100") == best
    with pytest.raises(UserError, match="no trained teacher for digits"):
        find_best_teacher(tmp_path, "digits")  # RepDistiller's teachers are CIFAR-100 networks


def test_our_runs_rank_before_repdistillers(tmp_path):
    repdistiller_teacher(tmp_path, "resnet8_vanilla", "resnet8", 79.0)
    ours = suite_teacher(tmp_path, "resnet14_cifar100_trial0", "cifar100", 50.0)
    suite_teacher(tmp_path, "resnet20_cifar10_trial0", "cifar10", 90.0)
    assert find_best_teacher(tmp_path, "cifar100") == ours


def test_student_without_path_t_takes_a_repdistiller_teacher(tmp_path, capsys):
    path = repdistiller_teacher(tmp_path, "wrn_16_1_vanilla", "wrn_16_1", 66.5)
    args = train_student.parse_args(["--save_dir", str(tmp_path), "--model_s", "resnet8", "--distill", "kd"])
    config = student_run.configure(vars(args)).config
    assert config.path_t == str(path) and config.model_t == "wrn_16_1"  # architecture from the folder name
    assert str(path) in capsys.readouterr().out

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import evaluate
from conftest import ROOT, read_json
from deploy import metrics
from models import model_dict

FAST = ["--dataset", "digits", "--device", "cpu", "--latency_runs", "2", "--latency_warmup", "1",
        "--cpu_threads", "1"]
REPORT_KEYS = {"checkpoint", "model", "dataset", "device", "amp", "teacher", "model_t", "n_test",
               "top1", "top5", "test_loss", "params", "macs", "input_shape", "cpu_threads",
               "latency_runs", "latency_warmup", "cpu_latency_ms_b1", "cpu_latency_ms_b64",
               "cuda_latency_ms_b1", "cuda_latency_ms_b64", "cpu_latency_iqr_ms_b1", "cpu_latency_iqr_ms_b64",
               "cuda_latency_iqr_ms_b1", "cuda_latency_iqr_ms_b64", "ece", "ece_bins", "mean_entropy",
               "agreement", "kl_teacher_student"}


def ece_by_loops(probs, targets, bins=15):
    """Guo et al.'s ECE written out: bin (m/bins, (m+1)/bins] by bin, sample by sample."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    total = 0.0
    for m in range(bins):
        lo, hi = m / bins, (m + 1) / bins
        members = [i for i in range(len(probs)) if lo < probs[i].max() <= hi]
        if not members:
            continue
        accuracy = sum(int(np.argmax(probs[i]) == targets[i]) for i in members) / len(members)
        confidence = sum(probs[i].max() for i in members) / len(members)
        total += len(members) / len(probs) * abs(accuracy - confidence)
    return total


def entropy_by_loops(probs):
    rows = []
    for row in probs:
        rows.append(-sum(p * math.log(p) for p in row if p > 0))
    return sum(rows) / len(rows)


def two_class(confidences, correct):
    """Probabilities [c, 1 - c] (prediction: class 0), target 0 where `correct`, else 1."""
    conf = torch.tensor(confidences, dtype=torch.float64)
    return torch.stack([conf, 1 - conf], 1), torch.tensor([0 if ok else 1 for ok in correct])


def test_ece_of_a_hand_made_case():
    # bin (13/15, 14/15]: confidence 0.9, accuracy 1/2 -> 2/4 * 0.4; bin (9/15, 10/15]: 0.62 vs 1 -> 2/4 * 0.38
    probs, targets = two_class([0.9, 0.9, 0.62, 0.62], [True, False, True, True])
    assert metrics.expected_calibration_error(probs, targets) == pytest.approx(0.39, abs=1e-12)


def test_ece_matches_the_loop_version_on_random_probabilities():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 7, generator=gen), 1)
    targets = torch.randint(0, 7, (500,), generator=gen)
    expected = ece_by_loops(probs.numpy(), targets.numpy())
    assert metrics.expected_calibration_error(probs, targets) == pytest.approx(expected, abs=1e-6)
    assert metrics.expected_calibration_error(probs.double(), targets, bins=4) == pytest.approx(
        ece_by_loops(probs.numpy(), targets.numpy(), bins=4), abs=1e-12)


def test_ece_of_a_calibrated_predictor_is_zero():
    # in every bin the accuracy equals the confidence exactly
    groups = [(0.5, 2, 1), (0.75, 4, 3), (0.9, 10, 9), (1.0, 3, 3)]
    confidences = [c for c, n, _ in groups for _ in range(n)]
    correct = [i < k for _, n, k in groups for i in range(n)]
    probs, targets = two_class(confidences, correct)
    assert metrics.expected_calibration_error(probs, targets) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_a_sampled_calibrated_predictor_is_small():
    gen = torch.Generator().manual_seed(1)
    conf = 0.5 + 0.5 * torch.rand(100_000, generator=gen, dtype=torch.float64)
    correct = torch.rand(100_000, generator=gen, dtype=torch.float64) < conf
    probs, targets = torch.stack([conf, 1 - conf], 1), (~correct).long()
    assert metrics.expected_calibration_error(probs, targets) < 0.01


def test_mean_entropy_against_loops():
    probs = [[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25], [0.7, 0.2, 0.1]]
    assert metrics.mean_entropy(torch.tensor(probs)) == pytest.approx(entropy_by_loops(probs), abs=1e-6)
    assert metrics.mean_entropy(torch.tensor([[0.25] * 4])) == pytest.approx(math.log(4), abs=1e-6)
    assert metrics.mean_entropy(torch.tensor([[0.0, 1.0]])) == 0.0


def test_agreement_and_kl_against_numpy():
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(50, 5, generator=gen), torch.randn(50, 5, generator=gen)
    p_s = np.exp(student.double().numpy()); p_s /= p_s.sum(1, keepdims=True)
    p_t = np.exp(teacher.double().numpy()); p_t /= p_t.sum(1, keepdims=True)
    kl = np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))
    assert metrics.kl_teacher_student(student, teacher) == pytest.approx(kl, abs=1e-9)
    assert metrics.kl_teacher_student(teacher, teacher) == pytest.approx(0.0, abs=1e-12)
    same = np.mean(p_s.argmax(1) == p_t.argmax(1)) * 100
    assert metrics.agreement(student, teacher) == pytest.approx(same)
    assert metrics.agreement(teacher, teacher) == 100.0


def test_topk_accuracy_in_percent():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.5, 0.3, 0.2], [0.0, 0.1, 0.9]])
    top1, top2 = metrics.topk_accuracy(logits, torch.tensor([0, 0, 1, 2]), ks=(1, 2))
    assert (top1, top2) == (50.0, 100.0)


@pytest.mark.parametrize("module, shape, macs", [
    (nn.Linear(20, 7), (20,), 20 * 7),
    (nn.Conv2d(3, 8, 3, padding=1), (3, 32, 32), 8 * 32 * 32 * 3 * 3 * 3),
    (nn.Conv2d(4, 8, 3, stride=2, groups=2, bias=False), (4, 9, 9), 8 * 4 * 4 * 2 * 3 * 3),
])
def test_macs_of_small_modules_equal_the_hand_count(module, shape, macs):
    assert metrics.count_macs(module, shape) == macs


def test_end_to_end_on_the_digits_teacher(digits_teacher, tmp_path, capsys):
    _, run_dir = digits_teacher
    best = str(run_dir / "best.pth")
    out_json, out_md = tmp_path / "out" / "eval.json", tmp_path / "eval.md"
    report = evaluate.main([best, *FAST, "--teacher", best, "--json", str(out_json), "--markdown", str(out_md)])
    results = read_json(run_dir / "results.json")
    # the trainer evaluated the same 360 test images in eval mode, float32, no augmentation
    assert report["top1"] == pytest.approx(results["best_top1"], abs=1e-6)
    assert report["top5"] == pytest.approx(results["last_top5"], abs=1e-6)  # one epoch: best = last
    assert report["params"] == results["params"]
    assert report["agreement"] == 100.0
    assert report["kl_teacher_student"] == pytest.approx(0.0, abs=1e-9)
    assert (report["model"], report["model_t"], report["n_test"]) == ("resnet8", "resnet8", 360)
    assert report["cpu_threads"] == 1 and report["cpu_latency_ms_b64"] > 0
    q1, q3 = report["cpu_latency_iqr_ms_b64"]
    assert q1 <= report["cpu_latency_ms_b64"] <= q3
    assert 0 <= report["ece"] <= 1 and 0 <= report["mean_entropy"] <= math.log(10) + 1e-9
    written = read_json(out_json)
    assert set(written) == REPORT_KEYS
    assert written["top1"] == report["top1"] and written["macs"] == report["macs"] > 0
    table = out_md.read_text()
    assert table in capsys.readouterr().out
    assert f"| top-1 (%) | {results['best_top1']:.2f} |" in table
    assert "| top-1 agreement with the teacher (%) | 100.00 |" in table


def _foreign_checkpoint(folder, weights, args_json=None):
    folder.mkdir(parents=True)
    if args_json is not None:
        (folder / "args.json").write_text(args_json)
    path = folder / "resnet8_best.pth"
    torch.save({"model": weights}, path)
    return str(path)


@pytest.mark.parametrize("folder, args_json", [
    ("resnet8_digits_lr_0.05_decay_0.0005_trial_0", None),  # RepDistiller: the folder names the model
    ("S-resnet8_T-resnet8_digits_kd_trial1", '{"model_s": "resnet8", "model_t": "resnet8"}'),
])
def test_checkpoint_without_arch(digits_teacher, tmp_path, folder, args_json):
    _, run_dir = digits_teacher
    weights = torch.load(run_dir / "best.pth", weights_only=False)["model"]
    path = _foreign_checkpoint(tmp_path / folder, weights, args_json)
    report = evaluate.main([path, *FAST])
    assert report["model"] == "resnet8"
    assert report["top1"] == pytest.approx(read_json(run_dir / "results.json")["best_top1"], abs=1e-6)


def test_class_count_mismatch_is_one_line(tmp_path, capsys):
    weights = model_dict["resnet8"](num_classes=100).state_dict()
    path = _foreign_checkpoint(tmp_path / "resnet8_cifar100_lr_0.05_decay_0.0005_trial_0", weights)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([path, *FAST])
    assert exit_info.value.code == 2
    assert "predicts 100 classes but digits has 10" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--model", "resnet14"], "does not fit architecture resnet14"),
    (["--model", "resnet_eight"], "unknown model 'resnet_eight' for --model"),
    (["--model_t", "nope", "--teacher", "TEACHER"], "unknown model 'nope' for --model_t"),
])
def test_wrong_architecture_is_one_line(digits_teacher, capsys, flags, message):
    _, run_dir = digits_teacher
    best = str(run_dir / "best.pth")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([best, *FAST, *[best if f == "TEACHER" else f for f in flags]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_checkpoint_exits_2_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), str(tmp_path / "nope.pth"), "--dataset",
                           "digits"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: checkpoint {tmp_path / 'nope.pth'} does not exist")

import math

import pytest
import torch

import train_student
from conftest import fast_args
from distiller_zoo.kd import DistillKL
from distiller_zoo.multi_teacher import TeacherEnsemble
from engine.build import build_model
from engine.checkpoint import save_checkpoint


def softmax_list(row, T):
    exps = [math.exp(v / T) for v in row]
    return [e / sum(exps) for e in exps]


def test_average_soft_targets_by_hand():
    z1, z2 = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.0, -1.0, 3.0]])
    T = 4.0
    p1, p2 = softmax_list([1, 2, 0], T), softmax_list([0, -1, 3], T)
    want = [(a + b) / 2 for a, b in zip(p1, p2)]
    ensemble = TeacherEnsemble(T, "average")
    got = torch.softmax(ensemble([z1, z2], torch.tensor([0])) / T, dim=1)  # what DistillKL softens it to
    assert got[0].tolist() == pytest.approx(want, rel=1e-5)


def test_camkd_soft_targets_by_hand():
    rows = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]]
    label, T = 0, 2.0
    ce = [-math.log(softmax_list(r, 1.0)[label]) for r in rows]
    e = [math.exp(c) for c in ce]
    w = [(1 - x / sum(e)) / 2 for x in e]
    assert sum(w) == pytest.approx(1.0)
    probs = [softmax_list(r, T) for r in rows]
    want = [sum(w[k] * probs[k][c] for k in range(3)) for c in range(3)]
    ensemble = TeacherEnsemble(T, "camkd")
    logits = [torch.tensor([r]) for r in rows]
    got = ensemble.probabilities(logits, torch.tensor([label]))
    assert got[0].tolist() == pytest.approx(want, rel=1e-5)
    # KD against the mix has the gradient of CA-MKD's sum_k w_k KL(p_k || p_s)
    z_s = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    DistillKL(T)(z_s, ensemble(logits, torch.tensor([label]))).backward()
    z_ref = z_s.detach().clone().requires_grad_()
    log_ps = torch.log_softmax(z_ref / T, dim=1)[0]
    sum(w[k] * sum(probs[k][c] * (math.log(probs[k][c]) - log_ps[c]) for c in range(3))
        for k in range(3)).mul(T * T).backward()
    torch.testing.assert_close(z_s.grad, z_ref.grad)


def test_one_digits_epoch_with_two_teachers(tmp_path, digits_teacher):
    _, teacher_dir = digits_teacher
    second = tmp_path / "resnet14.pth"  # another architecture; untrained weights are enough here
    save_checkpoint({"model": build_model("resnet14", 10).state_dict(), "arch": "resnet14", "dataset": "digits",
                     "num_classes": 10}, second)
    results = train_student.main(fast_args(
        tmp_path, "--model_s", "resnet8", "--epochs", "1", "--batch_size", "128", "--distill", "at", "-a", "0.5",
        "--multi_teacher", "camkd", "--feature_teacher", "1", "--path_t", f"{teacher_dir / 'best.pth'},{second}"))
    assert results["method"] == "at+kd+camkd" and results["teacher"] == "resnet8,resnet14"
    [run] = (tmp_path / "students").iterdir()
    assert run.name.startswith("S-resnet8_T-resnet8+resnet14_digits_at+kd+camkd_")
    assert (run / "best.pth").is_file()


def test_feature_teacher_out_of_range_is_a_user_error(tmp_path, digits_teacher):
    _, teacher_dir = digits_teacher
    with pytest.raises(SystemExit) as stop:
        train_student.main(fast_args(tmp_path, "--path_t", f"{teacher_dir / 'best.pth'}", "--feature_teacher", "1"))
    assert stop.value.code == 2
